"""The step loop under every policy: who gets called, when, and what the trace records."""

from __future__ import annotations

import asyncio

import pytest

from arbitrage.loop import ChainInput, LoopSettings, run_chain, run_chains
from arbitrage.policies import POLICIES, StepContext, make_policy
from arbitrage.types import StepOutput


class CountingBackend:
    """Wraps a real LocalBackend and counts calls per role."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = {"draft": 0, "target": 0, "prm": 0, "router": 0}

    async def draft_step(self, req):
        self.calls["draft"] += 1
        return await self.inner.draft_step(req)

    async def target_step(self, req):
        self.calls["target"] += 1
        return await self.inner.target_step(req)

    async def prm_score(self, req):
        self.calls["prm"] += 1
        return await self.inner.prm_score(req)

    async def router_prob(self, req):
        self.calls["router"] += 1
        return await self.inner.router_prob(req)


def _run(backend, policy, settings, problem):
    return asyncio.run(run_chain(problem, backend, policy, settings))


def test_draft_only_never_calls_target(make_backend, settings, problems):
    b = CountingBackend(make_backend())
    res = _run(b, make_policy("draft_only"), settings, problems[0])
    assert b.calls["target"] == 0 and b.calls["draft"] == res.num_steps > 0
    assert all(s.author == "draft" and not s.escalated for s in res.steps)
    assert res.target_tokens == 0 and res.draft_tokens > 0


def test_target_only_never_calls_draft(make_backend, settings, problems):
    b = CountingBackend(make_backend())
    res = _run(b, make_policy("target_only"), settings, problems[0])
    assert b.calls["draft"] == 0 and b.calls["target"] == res.num_steps == res.target_calls
    assert all(s.author == "target" for s in res.steps)
    assert b.calls["prm"] == 0 and b.calls["router"] == 0


@pytest.mark.parametrize("tau, escalates", [(1.0, False), (0.0, True)])
def test_router_threshold_extremes(make_backend, settings, problems, tau, escalates):
    b = CountingBackend(make_backend())
    res = _run(b, make_policy("router", tau), settings, problems[1])
    assert b.calls["router"] == res.num_steps == b.calls["draft"]
    assert all(s.escalated == escalates for s in res.steps)
    assert b.calls["target"] == (res.num_steps if escalates else 0)
    assert all(s.router_prob is not None and 0.0 <= s.router_prob <= 1.0 for s in res.steps)
    if escalates:  # both steps scored for the wasted-escalation metric
        assert all(s.wasted == (s.prm_target <= s.prm_draft) for s in res.steps)


def test_router_without_escalation_scoring_skips_prm(make_backend, settings, problems):
    from dataclasses import replace

    b = CountingBackend(make_backend())
    res = _run(b, make_policy("router", 0.0), replace(settings, score_escalations=False), problems[1])
    assert b.calls["prm"] == 0 and all(s.wasted is None for s in res.steps)


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0])
def test_rsd_uses_prm_of_draft(make_backend, settings, problems, tau):
    b = CountingBackend(make_backend())
    res = _run(b, make_policy("rsd", tau), settings, problems[2])
    for s in res.steps:
        assert s.prm_draft is not None
        assert s.escalated == (s.prm_draft < tau)
        assert s.author == ("target" if s.escalated else "draft")
    esc = res.escalations
    assert b.calls["target"] == esc
    # PRM on every draft step, plus the target step of every escalation.
    assert b.calls["prm"] == res.num_steps + esc
    if tau == 0.0:
        assert esc == 0
    if tau == 1.0:
        assert esc == res.num_steps


@pytest.mark.parametrize("tau", [0.0, 1.0])
def test_oracle_scores_both_and_uses_the_difference(make_backend, settings, problems, tau):
    b = CountingBackend(make_backend())
    res = _run(b, make_policy("oracle", tau), settings, problems[3])
    assert b.calls["draft"] == b.calls["target"] == res.num_steps
    assert b.calls["prm"] == 2 * res.num_steps
    for s in res.steps:
        assert s.escalated == (s.prm_target - s.prm_draft > tau)
    if tau == 1.0:
        assert res.escalations == 0


def test_fixed_rate_is_seeded_and_near_rate():
    pol = make_policy("fixed_rate", 0.2, seed=7)
    decisions = [pol.escalate(StepContext(problem_id=f"c{i}", step_index=j)) for i in range(50) for j in range(20)]
    again = [pol.escalate(StepContext(problem_id=f"c{i}", step_index=j)) for i in range(50) for j in range(20)]
    assert decisions == again
    assert 0.15 < sum(decisions) / len(decisions) < 0.25


def test_policy_registry_and_errors():
    assert set(POLICIES) == {"draft_only", "target_only", "rsd", "oracle", "router", "confidence", "fixed_rate"}
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        make_policy("nope")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        make_policy("rsd", 1.5)


def test_stops_max_steps_and_tokens(make_backend, settings, problems):
    from dataclasses import replace

    res = _run(
        make_backend(), make_policy("draft_only"), replace(settings, max_steps=2, max_step_tokens=4), problems[0]
    )
    assert res.num_steps <= 2
    res = _run(
        make_backend(),
        make_policy("draft_only"),
        replace(settings, max_steps=50, max_step_tokens=8, max_total_tokens=20),
        problems[0],
    )
    assert sum(s.num_tokens for s in res.steps) <= 20
    assert res.stop_reason in ("max_tokens", "eos", "answer")


def test_forced_step_tokens(make_backend, settings, problems):
    from dataclasses import replace

    s = replace(settings, forced_step_tokens=5, max_step_tokens=64, max_steps=3, max_total_tokens=1000)
    res = _run(make_backend(), make_policy("fixed_rate", 0.5), s, problems[0])
    assert res.num_steps == 3 and all(st.num_tokens == 5 for st in res.steps)


def test_forced_step_lengths_vary_per_step_and_repeat_per_problem(make_backend, settings, problems):
    """With forced_step_tokens_min every step (escalated or not) is forced to its own seeded
    length in the range; a second run of the problem writes the same lengths."""
    from dataclasses import replace

    from arbitrage.loop import forced_tokens

    s = replace(settings, forced_step_tokens=9, forced_step_tokens_min=2, max_step_tokens=64, max_steps=6)
    s = replace(s, max_total_tokens=1000)
    runs = [_run(make_backend(), make_policy("fixed_rate", 0.5), s, problems[0]) for _ in range(2)]
    lengths = [[st.num_tokens for st in r.steps] for r in runs]
    assert lengths[0] == lengths[1] and len(lengths[0]) == 6 and len(set(lengths[0])) > 1
    assert lengths[0] == [forced_tokens(s, problems[0].id, k) for k in range(6)]
    assert all(2 <= n <= 9 for n in lengths[0]) and any(st.escalated for st in runs[0].steps)
    assert forced_tokens(replace(s, forced_step_tokens_min=None), "x", 0) == 9


def test_forced_step_tokens_min_needs_a_larger_maximum(tiny_config):
    from configs.schema import ConfigError

    with pytest.raises(ConfigError, match="forced_step_tokens_min"):
        tiny_config(**{"generation.forced_step_tokens_min": 8})
    with pytest.raises(ConfigError, match="forced_step_tokens_min"):
        tiny_config(**{"generation.forced_step_tokens_min": 8, "generation.forced_step_tokens": 4})


def test_answer_stops_chain_and_is_graded():
    """A scripted backend: the second step holds the boxed answer."""

    class Scripted:
        def __init__(self):
            self.n = 0

        async def draft_step(self, req):
            self.n += 1
            text = "Add them: 2 + 2 = 4." if self.n == 1 else "So the answer is \\boxed{4}."
            return StepOutput(text=text, num_tokens=5, logprobs=[-0.1] * 5, stop_reason="separator")

    res = asyncio.run(
        run_chain(ChainInput("x", "2+2?", "4"), Scripted(), make_policy("draft_only"), LoopSettings(max_steps=10))
    )
    assert res.stop_reason == "answer" and res.num_steps == 2
    assert res.answer == "4" and res.correct is True
    assert res.final_text == "Add them: 2 + 2 = 4.\n\nSo the answer is \\boxed{4}."


def test_concurrent_chains_batch_and_match_alone(make_backend, settings, problems):
    backend = make_backend()
    pol = make_policy("router", 0.5)
    many = [ChainInput(f"q{i}", f"Compute {i} * 3 then add {i}.", None) for i in range(8)]
    together = asyncio.run(run_chains(many, backend, pol, settings, max_concurrent=8))
    assert max(backend.stats()["draft"]["batch_sizes"]) > 1
    for item, res in zip(many, together):
        alone = asyncio.run(run_chain(item, make_backend(), pol, settings))
        assert [(s.text, s.author) for s in res.steps] == [(s.text, s.author) for s in alone.steps]


def test_timeout_and_error_are_recorded(make_backend, settings, problems):
    class Broken:
        async def draft_step(self, req):
            raise RuntimeError("boom")

    res = asyncio.run(run_chains(problems[:2], Broken(), make_policy("draft_only"), settings))
    assert all(r.stop_reason == "error" and "boom" in r.error for r in res)

    class Slow:
        async def draft_step(self, req):
            await asyncio.sleep(10)

    res = asyncio.run(run_chains(problems[:1], Slow(), make_policy("draft_only"), settings, timeout_s=0.1))
    assert res[0].stop_reason == "timeout"


def test_roles_are_derived_from_what_policies_need():
    roles = {name: cls.required_roles() for name, cls in POLICIES.items()}
    assert roles == {
        "draft_only": ("draft",),
        "target_only": ("target",),
        "rsd": ("draft", "target", "prm"),
        "oracle": ("draft", "target", "prm"),
        "router": ("draft", "target", "router"),
        "confidence": ("draft", "target"),
        "fixed_rate": ("draft", "target"),
    }
    # a configured PRM scores escalations (wasted-escalation counts) for every policy that escalates
    assert POLICIES["router"].required_roles(prm_configured=True) == ("draft", "target", "prm", "router")
    assert POLICIES["confidence"].required_roles(prm_configured=True, score_escalations=False) == ("draft", "target")
    assert POLICIES["draft_only"].required_roles(prm_configured=True) == ("draft",)


def test_confidence_escalates_below_its_threshold():
    from arbitrage.policies import step_confidence

    sure = StepOutput(text="a", num_tokens=2, logprobs=[-0.01, -0.03], stop_reason="separator")
    unsure = StepOutput(text="b", num_tokens=2, logprobs=[-1.0, -2.0], stop_reason="separator")
    assert step_confidence(sure) == pytest.approx(2.718281828**-0.02)
    assert step_confidence(unsure) == pytest.approx(2.718281828**-1.5)
    pol = make_policy("confidence", 0.5)
    assert not pol.escalate(StepContext("p", 0, draft=sure))
    assert pol.escalate(StepContext("p", 0, draft=unsure))


def test_a_chain_continues_from_given_steps():
    """Rollouts: the given prefix is sent to the model, counts against the budget and is graded."""

    class Scripted:
        def __init__(self):
            self.seen = []

        async def draft_step(self, req):
            self.seen.append((req.steps, req.params.seed))
            return StepOutput(
                text="So the answer is \\boxed{4}.", num_tokens=5, logprobs=[-0.1] * 5, stop_reason="separator"
            )

    b = Scripted()
    item = ChainInput("x", "2+2?", "4", prefix=("Add them: 2 + 2 = 4.",), prefix_tokens=7, seed=100)
    res = asyncio.run(run_chain(item, b, make_policy("draft_only"), LoopSettings(max_steps=10, seed=1)))
    assert b.seen == [(("Add them: 2 + 2 = 4.",), 1 + 100 + 1)]
    assert res.num_steps == 1 and res.correct is True
    assert res.final_text == "Add them: 2 + 2 = 4.\n\nSo the answer is \\boxed{4}."
    short = asyncio.run(
        run_chain(item, Scripted(), make_policy("draft_only"), LoopSettings(max_steps=10, max_total_tokens=7))
    )
    assert short.num_steps == 0 and short.stop_reason == "max_tokens"


def test_an_escalation_scores_each_candidate_on_its_own_cached_judge_context(tokenizer, settings, problems):
    """A judge served by the target scores the draft's and the target's step of an escalation
    at once; each candidate keeps its own judge KV, so neither re-reads the chain each step."""
    from dataclasses import replace

    from arbitrage.backend import LocalBackend
    from arbitrage.engine import HFStepEngine
    from arbitrage.prm import JudgePRM
    from arbitrage.tiny import random_causal_lm

    class JudgeKeys(CountingBackend):
        """Records the judge keys; `one_context` puts both candidates under one key (the keying before)."""

        def __init__(self, inner, one_context: bool):
            super().__init__(inner)
            self.keys: set[str] = set()
            self.one_context = one_context

        async def prm_score(self, req):
            if self.one_context:
                req = replace(req, chain_id=req.chain_id.removesuffix("|target"))
            self.keys.add(req.chain_id)
            return await super().prm_score(req)

    def judge_prefill(one_context: bool):
        draft = HFStepEngine(random_causal_lm("tiny-llama", seed=1), tokenizer)
        target = HFStepEngine(random_causal_lm("tiny-llama-wide", seed=2), tokenizer)
        inner = LocalBackend(draft=draft, target=target, prm=JudgePRM.from_engine(target), max_batch_size=16)
        b = JudgeKeys(inner, one_context)
        res = _run(b, make_policy("fixed_rate", 1.0), settings, problems[2])
        assert res.num_steps >= 2 and all(s.escalated for s in res.steps)
        return target.prefill_tokens, b.keys, res

    fixed, keys, res = judge_prefill(one_context=False)
    chain = next(iter(keys - {k for k in keys if k.endswith("|target")}))
    assert keys == {chain, f"{chain}|target"}
    before, _, res_before = judge_prefill(one_context=True)
    assert [s.text for s in res.steps] == [s.text for s in res_before.steps]
    assert fixed < before
