"""The step loop: the one implementation of ARBITRAGE's per-chain algorithm.

Per chain: the draft proposes a step -> the policy decides (with the PRM or router
scores it declares it needs) -> accept, or the target regenerates the step from the
same prefix -> append -> stop on EOS, a final answer, max steps or max tokens.

`run_chain` is async and awaits a `ModelBackend`, so the same code runs in-process
(`LocalBackend`), inside the Ray coordinator actor (`RayBackend`) and behind the Serve
app. `run_chains` runs many chains concurrently with bounded concurrency and a
per-chain timeout, handing each result to a callback as soon as it finishes.

With `LoopSettings.step_cache` on and greedy decoding, draft steps, target steps and PRM
scores go through the backend's `StepCache` (`arbitrage.step_cache`): a sweep's repeats
of the same (model, prefix, sampling parameters) are answered from memory, and each
chain records its hits and misses in `ChainResult.cache`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable

from arbitrage.backend import ModelBackend
from arbitrage.policies import DecisionPolicy, StepContext, seeded_random
from arbitrage.prm import PRMRequest
from arbitrage.router import RouterRequest
from arbitrage.roles import CACHED_ROLES
from arbitrage.step_cache import prm_key, step_key
from arbitrage.types import ChainResult, ContextOverflow, SamplingParams, StepOutput, StepRequest, TraceStep


@dataclass(frozen=True)
class LoopSettings:
    """Everything the loop needs besides the backend and the policy."""

    separator: str = "\n\n"
    max_step_tokens: int = 256
    max_steps: int = 32
    max_total_tokens: int = 2048
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    forced_step_tokens: int | None = None
    forced_step_tokens_min: int | None = None
    system_prompt: str | None = None
    use_chat_template: bool = True
    score_escalations: bool = True  # score both steps of an escalation when a PRM exists
    has_prm: bool = False
    step_cache: bool = False  # reuse greedy steps / PRM scores through backend.step_cache()

    @property
    def caching(self) -> bool:
        """Whether this loop uses the step cache: asked for, and greedy decoding."""
        return self.step_cache and self.temperature == 0.0

    @classmethod
    def from_config(cls, cfg) -> "LoopSettings":
        """From an ArbitrageConfig (its generation, prompt and policy branches)."""
        g, p = cfg.generation, cfg.prompt
        return cls(
            separator=g.step_separator,
            max_step_tokens=g.max_step_tokens,
            max_steps=g.max_steps,
            max_total_tokens=g.max_total_tokens,
            temperature=g.temperature,
            top_p=g.top_p,
            seed=g.seed,
            forced_step_tokens=g.forced_step_tokens,
            forced_step_tokens_min=g.forced_step_tokens_min,
            system_prompt=p.system_prompt,
            use_chat_template=p.use_chat_template,
            score_escalations=cfg.policy.score_escalations,
            has_prm=cfg.models.prm is not None,
            step_cache=g.step_cache,
        )


def forced_tokens(s: LoopSettings, problem_id: str, step_index: int) -> int | None:
    """The forced length of a step (systems benchmarks): `forced_step_tokens`, or with
    `forced_step_tokens_min` a length drawn uniformly from [min, forced_step_tokens], seeded per
    (problem id, step index) as `FixedRate` seeds its draws; None when steps are not forced."""
    lo, hi = s.forced_step_tokens_min, s.forced_step_tokens
    if hi is None or lo is None:
        return hi
    return seeded_random(s.seed, problem_id, step_index, "length").randint(lo, hi)


@dataclass(frozen=True)
class ChainInput:
    """One problem to solve, optionally continuing from steps already written.

    `prefix` steps (with `prefix_tokens` tokens in all) are taken as accepted before the
    chain starts: the chain writes the rest (Monte-Carlo rollouts of `arbitrage.label`).
    They count against `max_total_tokens`, are graded with the chain's steps, and reach a
    router as draft-written history; the trace holds only the steps the chain wrote.
    """

    id: str
    problem: str
    answer: str | None = None
    prefix: tuple[str, ...] = ()
    prefix_tokens: int = 0
    seed: int = 0  # added to the settings' seed: distinct samples of one prompt (rollouts)


class _Counters:
    def __init__(self):
        self.draft_calls = self.target_calls = self.prm_calls = self.router_calls = 0
        self.cache: dict[str, dict[str, int]] = {
            k: {r: 0 for r in CACHED_ROLES} for k in ("hits", "misses", "tokens_saved")
        }


async def run_chain(
    item: ChainInput,
    backend: ModelBackend,
    policy: DecisionPolicy,
    s: LoopSettings,
    on_step: Callable[[TraceStep], Awaitable[None] | None] | None = None,
) -> ChainResult:
    """Run one chain to completion.

    Args:
        item: the problem (with its reference answer, if graded).
        backend: where steps, PRM scores and router probabilities come from.
        policy: the escalation rule.
        s: generation and prompt settings.
        on_step: called with each accepted step as soon as it is decided (streaming).
    Returns:
        The chain's trace, answer, grade and counters.
    """
    t_start = time.perf_counter()
    steps: list[TraceStep] = []
    counters = _Counters()
    total_tokens, stop = item.prefix_tokens, "max_steps"
    while len(item.prefix) + len(steps) < s.max_steps:
        budget = s.max_total_tokens - total_tokens
        if budget <= 0:
            stop = "max_tokens"
            break
        try:
            step = await _decide_step(item, steps, min(budget, s.max_step_tokens), backend, policy, s, counters)
        except ContextOverflow:  # the chain's text has filled a model's context: out of room, like max_tokens
            stop = "max_tokens"
            break
        steps.append(step)
        total_tokens += step.num_tokens
        if on_step is not None:
            maybe = on_step(step)
            if asyncio.iscoroutine(maybe):
                await maybe
        if step.stop_reason == "eos":
            stop = "eos"
            break
        if s.forced_step_tokens is None and "\\boxed" in step.text:
            stop = "answer"
            break
    else:
        stop = "max_steps"
    return _finish(item, steps, stop, policy, s, counters, time.perf_counter() - t_start)


async def _decide_step(
    item: ChainInput,
    steps: list[TraceStep],
    max_tokens: int,
    backend: ModelBackend,
    policy: DecisionPolicy,
    s: LoopSettings,
    c: _Counters,
) -> TraceStep:
    t0 = time.perf_counter()
    n_done = len(item.prefix) + len(steps)
    params = SamplingParams(
        separator=s.separator,
        max_tokens=max_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        seed=s.seed + item.seed + n_done,
        forced_tokens=forced_tokens(s, item.id, n_done),
    )
    texts = item.prefix + tuple(st.text for st in steps)
    req = StepRequest(
        problem=item.problem,
        steps=texts,
        system=s.system_prompt,
        chat=s.use_chat_template,
        params=params,
        chain_id=f"{item.id}#{policy.name}:{policy.threshold}",
    )
    ctx = StepContext(problem_id=item.id, step_index=n_done)
    cache = backend.step_cache() if s.caching else None

    async def through_cache(key: tuple, call):
        if cache is None:
            return await call()
        value, hit = await cache.get_or_call(key, call)
        role = key[0]
        c.cache["hits" if hit else "misses"][role] += 1
        if hit and isinstance(value, StepOutput):
            c.cache["tokens_saved"][role] += value.num_tokens
        return value

    async def target() -> StepOutput:
        c.target_calls += 1
        return await through_cache(step_key("target", req), lambda: backend.target_step(req))

    async def draft() -> StepOutput:
        c.draft_calls += 1
        return await through_cache(step_key("draft", req), lambda: backend.draft_step(req))

    async def prm(out: StepOutput) -> float:
        c.prm_calls += 1
        scored = texts + (out.text,)
        return await through_cache(
            prm_key(item.problem, scored),
            lambda: backend.prm_score(PRMRequest(item.problem, scored, judge_chain(out), hidden(out))),
        )

    def judge_chain(out: StepOutput) -> str | None:
        # The draft's and the target's candidates are scored at once on an escalation: one
        # cached judge context each, or the second would share the first's key and re-read
        # the whole chain every time (a busy key runs uncached).
        if req.chain_id is None or out is ctx.draft:
            return req.chain_id
        return f"{req.chain_id}|target"

    def hidden(out: StepOutput) -> list[float] | None:  # only the draft's state feeds draft-side scorers
        return out.hidden if out is ctx.draft else None

    if not policy.uses_draft:
        ctx.target = await target()
        return _trace(ctx, steps, escalated=False, t0=t0)
    if policy.target_first:  # both from the same prefix, concurrently
        ctx.draft, ctx.target = await asyncio.gather(draft(), target())
    else:
        ctx.draft = await draft()
    d = ctx.draft
    assert d is not None  # both branches above set it
    if policy.needs_prm_draft or policy.needs_prm_target:
        t = ctx.target if policy.needs_prm_target else None
        assert t is not None or not policy.needs_prm_target  # needs_prm_target comes with target_first
        ctx.prm_draft, ctx.prm_target = await asyncio.gather(prm(d), prm(t) if t is not None else _none())
    if policy.needs_router:
        c.router_calls += 1
        history = tuple(("draft", t) for t in item.prefix) + tuple((st.author, st.text) for st in steps)
        ctx.router_prob = await backend.router_prob(RouterRequest(item.problem, history, d.text, d.features, d.hidden))
    escalated = policy.escalate(ctx)
    if escalated and ctx.target is None:
        ctx.target = await target()
    if escalated and s.has_prm and s.score_escalations:
        ctx.prm_draft, ctx.prm_target = await asyncio.gather(
            _known_or(ctx.prm_draft, prm, ctx.draft), _known_or(ctx.prm_target, prm, ctx.target)
        )
    return _trace(ctx, steps, escalated=escalated, t0=t0)


async def _none() -> None:
    return None


async def _known_or(value, fn, arg):
    return value if value is not None else await fn(arg)


def _trace(ctx: StepContext, steps: list[TraceStep], escalated: bool, t0: float) -> TraceStep:
    d, t = ctx.draft, ctx.target
    use_target = escalated or d is None
    both = d is not None and t is not None  # oracle: keep both texts for router training data
    out = t if use_target else d
    assert out is not None  # the kept step's author produced an output
    wasted = None
    if escalated and ctx.prm_draft is not None and ctx.prm_target is not None:
        wasted = ctx.prm_target <= ctx.prm_draft
    return TraceStep(
        index=len(steps),
        text=out.text,
        author="target" if use_target else "draft",
        num_tokens=out.num_tokens,
        stop_reason=out.stop_reason,
        escalated=escalated,
        draft_text=d.text if (d is not None and (use_target or both)) else None,
        draft_tokens=d.num_tokens if d else 0,
        target_tokens=t.num_tokens if t else 0,
        prm_draft=ctx.prm_draft,
        prm_target=ctx.prm_target,
        router_prob=ctx.router_prob,
        wasted=wasted,
        wall_s=time.perf_counter() - t0,
        draft_features=d.features if d is not None else None,
        target_text=t.text if both and t is not None else None,
    )


def _finish(
    item: ChainInput,
    steps: list[TraceStep],
    stop: str,
    policy: DecisionPolicy,
    s: LoopSettings,
    c: _Counters,
    wall_s: float,
) -> ChainResult:
    from arbitrage.grading import extract_answer, is_correct

    final_text = s.separator.join(item.prefix + tuple(st.text for st in steps))
    answer = extract_answer(final_text)
    correct = is_correct(final_text, item.answer) if item.answer is not None else None
    return ChainResult(
        problem_id=item.id,
        problem=item.problem,
        policy=policy.name,
        threshold=policy.threshold,
        steps=steps,
        final_text=final_text,
        stop_reason=stop,
        answer=answer,
        reference=item.answer,
        correct=correct,
        draft_tokens=sum(st.draft_tokens for st in steps),
        target_tokens=sum(st.target_tokens for st in steps),
        target_calls=c.target_calls,
        draft_calls=c.draft_calls,
        prm_calls=c.prm_calls,
        router_calls=c.router_calls,
        wall_s=wall_s,
        cache=c.cache if s.caching else None,
    )


def failed_chain(item: ChainInput, policy: DecisionPolicy, stop: str, error: str) -> ChainResult:
    """The result recorded for a chain that timed out, was cancelled or errored."""
    return ChainResult(
        problem_id=item.id,
        problem=item.problem,
        policy=policy.name,
        threshold=policy.threshold,
        steps=[],
        final_text="",
        stop_reason=stop,
        reference=item.answer,
        correct=False if item.answer is not None else None,
        error=error,
    )


async def run_chains(
    items: Iterable[ChainInput],
    backend: ModelBackend,
    policy: DecisionPolicy,
    s: LoopSettings,
    max_concurrent: int = 32,
    timeout_s: float | None = None,
    on_result: Callable[[ChainResult], Awaitable[None] | None] | None = None,
    on_step: Callable[[TraceStep], Awaitable[None] | None] | None = None,
) -> list[ChainResult]:
    """Run many chains concurrently; each result goes to `on_result` as soon as it finishes.

    Args:
        items: problems.
        backend, policy, s: as for `run_chain`.
        max_concurrent: chains in flight at once.
        timeout_s: per-chain limit; a chain over it is cancelled and recorded with stop "timeout".
        on_result: callback per finished chain (e.g. append a JSONL row).
        on_step: callback per decided step of any chain (progress bars).
    Returns:
        Results in input order.
    """
    sem = asyncio.Semaphore(max_concurrent)

    async def one(item: ChainInput) -> ChainResult:
        async with sem:
            try:
                res = await asyncio.wait_for(run_chain(item, backend, policy, s, on_step), timeout_s)
            except asyncio.TimeoutError:
                res = failed_chain(item, policy, "timeout", f"chain exceeded {timeout_s}s")
            except Exception as e:  # one broken chain must not take down the others
                res = failed_chain(item, policy, "error", f"{type(e).__name__}: {e}")
        if on_result is not None:
            maybe = on_result(res)
            if asyncio.iscoroutine(maybe):
                await maybe
        return res

    return list(await asyncio.gather(*(one(it) for it in items)))
