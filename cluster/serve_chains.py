"""The coordinator deployment of the Serve app: `ChainServer`, one `Coordinator` behind Serve.

`ChainServer` holds a `actors.coordinator.Coordinator` (it does not mix into it) and adds
what only a server needs: each request's own loop settings (token budget, sampling, prompt)
built from its `ChainJob`, prompt-length checks with the draft's and target's tokenizers,
special-token escaping of chat messages, and metrics. The request's settings and its policy
are built once, at admission, and passed to `Coordinator.solve` as arguments.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any, AsyncIterator

from cluster.serve_api import ChainJob
from cluster.serve_metrics import MetricSet, Pusher
from configs.schema import ArbitrageConfig, sampling_law


class ChainServer:
    """`actors.coordinator.Coordinator` as a Serve deployment, with per-request settings."""

    def __init__(self, cfg: dict, draft=None, target=None, prm=None, router=None, colocated=None, metrics=None):
        """Args: cfg: the config's dict; draft..router: deployment handles (prm/router optional);
        colocated: instead of those, the handle of the one deployment serving every role
        (`ServedColocated`); metrics: the MetricsHub handle (None: no metrics)."""
        from actors.coordinator import Coordinator  # torch-free ingress: imported in the replica

        if colocated is not None:
            from actors.colocated_actor import role_views
            from actors.model_actor import as_config

            cfg = as_config(cfg)  # validated once, here, for the views and the coordinator
            handles = role_views(cfg, colocated)
        else:
            handles = {
                r: h
                for r, h in (("draft", draft), ("target", target), ("prm", prm), ("router", router))
                if h is not None
            }
        self.coordinator = Coordinator(cfg, handles)
        self.cfg = self.coordinator.cfg
        m = self.cfg.models
        self.context_tokens = min(m.draft.max_context, m.target.max_context)
        self._tokenizers = _load_tokenizers(self.cfg)
        self._escape = special_token_escaper(self._tokenizers) if self.cfg.serve.escape_special_tokens else None
        self._pusher = Pusher(metrics, self._metrics_snapshot)

    async def solve_request(self, job: ChainJob) -> AsyncIterator[dict]:
        """Admit one request, then run its chain through `Coordinator.solve`.

        Yields `{"event": "error", "status", "message"}` for a request that cannot run, else
        `{"event": "admitted", "prompt_tokens"}`, then the step events and the result event.
        """
        self._pusher.ensure_started()
        try:
            if job.chat and self._escape is not None:
                job = replace(
                    job,
                    problem=self._escape(job.problem),
                    system=None if job.system is None else self._escape(job.system),
                )
            settings = self.job_settings(job)
            policy = self.coordinator.policy(job.policy, job.threshold)
            prompt_tokens = self._check_prompt(job, settings)
        except ValueError as e:
            yield {"event": "error", "status": 400, "message": str(e)}
            return
        yield {"event": "admitted", "prompt_tokens": prompt_tokens}
        from arbitrage.loop import ChainInput

        events = self.coordinator.solve(
            ChainInput(id=job.id, problem=job.problem), policy, stream_steps=job.stream_steps, settings=settings
        )
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()  # a client that went away cancels its chain

    def job_settings(self, job: ChainJob):
        """The LoopSettings of one request: the config's, with the request's overrides."""
        b = self.coordinator.settings
        pick = lambda v, default: default if v is None else v  # noqa: E731
        temperature, top_p = sampling_law(pick(job.temperature, b.temperature), pick(job.top_p, b.top_p))
        return replace(
            b,
            max_total_tokens=pick(job.max_tokens, b.max_total_tokens),
            max_steps=pick(job.max_steps, b.max_steps),
            temperature=temperature,
            top_p=top_p,
            seed=pick(job.seed, b.seed),
            use_chat_template=job.chat and b.use_chat_template,
            system_prompt=(pick(job.system, b.system_prompt) or None) if job.chat else None,
        )

    def _check_prompt(self, job: ChainJob, s) -> int:
        """Prompt tokens (the larger tokenizer count); ValueError when prompt + budget overflow."""
        from arbitrage.engine_common import render_prompt
        from arbitrage.types import SamplingParams, StepRequest

        req = StepRequest(
            problem=job.problem,
            system=s.system_prompt,
            chat=s.use_chat_template,
            params=SamplingParams(separator=s.separator),
        )
        n = max(len(tok(render_prompt(tok, req), add_special_tokens=False)["input_ids"]) for tok in self._tokenizers)
        if n + s.max_total_tokens > self.context_tokens:
            raise ValueError(
                f"this model's context is {self.context_tokens} tokens, but the prompt has {n} "
                f"tokens and max_tokens is {s.max_total_tokens} ({n + s.max_total_tokens} in "
                f"total); shorten the prompt or lower max_tokens"
            )
        return n

    # ---- the coordinator's introspection, forwarded -------------------------------------
    def health(self) -> dict[str, Any]:
        """The coordinator's readiness and placement."""
        return self.coordinator.health()

    async def stats(self) -> dict[str, Any]:
        """Per-role batch statistics from the model replicas, and the coordinator's chain counts."""
        return await self.coordinator.stats()

    def progress(self) -> dict[str, int]:
        """Steps decided and chains finished on this replica."""
        return self.coordinator.progress()

    def in_flight(self) -> list[str]:
        """Ids of the chains running or queued on this replica."""
        return self.coordinator.in_flight()

    def cancel(self, chain_id: str) -> int:
        """Cancel this replica's in-flight chains with this id."""
        return self.coordinator.cancel(chain_id)

    def _metrics_snapshot(self) -> dict:
        c = self.coordinator
        m = MetricSet()
        in_flight = sum(len(t) for t in c._tasks.values())
        running = c.max_concurrent - c._sem._value if c._sem is not None else 0
        m.set("chains_in_flight", in_flight)
        m.set("chains_waiting", max(0, in_flight - running))
        m.inc("step_retries", c.backend.retry_count)
        return m.snapshot()


def special_token_escaper(tokenizers: list):
    """A function that keeps the tokenizers' special tokens in a text from being read as such.

    Each occurrence of a special token's text (e.g. `<|im_start|>`) gets a zero-width space
    (U+200B) after its first character, so it tokenizes as ordinary text; repeated until none
    is left (an escape cannot join neighbours into a new one). Returns None when there are none.
    """
    specials: set[str] = set()
    for tok in tokenizers:
        specials.update(getattr(tok, "all_special_tokens", ()) or ())
        for added in (getattr(tok, "added_tokens_decoder", None) or {}).values():
            if getattr(added, "special", False):
                specials.add(str(added.content))
    specials = {t for t in specials if len(t) >= 2}
    if not specials:
        return None
    pattern = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))

    def escape(text: str) -> str:
        for _ in range(len(text)):  # each pass breaks at least one occurrence
            text, n = pattern.subn(lambda m: m.group(0)[0] + "\u200b" + m.group(0)[1:], text)
            if not n:
                break
        return text

    return escape


def _load_tokenizers(cfg: ArbitrageConfig) -> list:
    """The draft's and the target's tokenizers (one when they share a source)."""
    from arbitrage.models import load_tokenizer

    sources = {s.model_dump_json(): s for s in (cfg.models.draft.source, cfg.models.target.source)}
    return [load_tokenizer(s) for s in sources.values()]
