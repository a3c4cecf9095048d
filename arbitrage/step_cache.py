"""Step cache for sweeps: a greedy step or PRM score computed once is reused across policies and thresholds.

With greedy decoding (temperature 0) a step is a function of (model, prompt, sampling
parameters): every policy and threshold of a sweep that reaches the same prefix asks the
draft, the target and the PRM the same questions. A sweep over rsd and router at several
thresholds shares the first step of every chain, and every later step up to the first
decision on which two thresholds disagree. `StepCache` answers those repeats from memory.

Scope and key: one cache belongs to one `ModelBackend` instance (`ModelBackend.step_cache()`),
so the model behind a role is fixed for its lifetime and the role names the model. Keys are

    ("draft" | "target", problem, steps so far, system prompt, chat flag, SamplingParams)
    ("prm", problem, steps so far including the scored step)

The chain id is not part of the key (it only names the engine's KV slot). The loop
(`arbitrage.loop`) consults the cache only when `LoopSettings.step_cache` is on and the
temperature is 0; with sampling every call goes to the model. Router probabilities are
not cached (the router is cheap and its calls depend on the policy).

On the Ray runtime the backend is the coordinator's `RayBackend`, which lives as long as
the runtime, so the cache spans every (policy, threshold) group of one `arbitrage eval`.
In a process, `arbitrage eval --in-process` reuses one `LocalBackend` for all groups.

Counters: hits, misses and the generated tokens a hit saved, per role. A cached answer
also makes repeats exactly equal, where batched bf16 kernels could otherwise flip a
near-tie token depending on what else was in the batch.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Awaitable, Callable

from arbitrage.roles import CACHED_ROLES
from arbitrage.types import StepOutput, StepRequest


def step_key(role: str, req: StepRequest) -> tuple:
    """Cache key of one step request (everything that determines a greedy step, not the chain id)."""
    return (role, req.problem, tuple(req.steps), req.system, req.chat, req.params)


def prm_key(problem: str, steps: tuple[str, ...]) -> tuple:
    """Cache key of one PRM score: the problem and all steps up to the scored one."""
    return ("prm", problem, tuple(steps))


class StepCache:
    """An LRU map from request key to the model's answer, with hit / miss counters per role."""

    def __init__(self, max_entries: int = 200_000):
        self.max_entries = max_entries
        self._data: OrderedDict[tuple, Any] = OrderedDict()
        self.hits = {r: 0 for r in CACHED_ROLES}
        self.misses = {r: 0 for r in CACHED_ROLES}
        self.tokens_saved = {r: 0 for r in CACHED_ROLES}

    def __len__(self) -> int:
        return len(self._data)

    async def get_or_call(self, key: tuple, call: Callable[[], Awaitable[Any]]) -> tuple[Any, bool]:
        """The cached answer for `key`, or `await call()` stored under it.

        Args:
            key: from `step_key` or `prm_key`; key[0] is the role.
            call: the model call to make on a miss.
        Returns:
            (answer, hit). A concurrent miss on the same key calls the model twice and
            keeps the first answer stored; sweeps run a key's repeats in later groups.
        """
        role = key[0]
        if key in self._data:
            self._data.move_to_end(key)
            value = self._data[key]
            self.hits[role] += 1
            if isinstance(value, StepOutput):
                self.tokens_saved[role] += value.num_tokens
            return value, True
        self.misses[role] += 1
        value = await call()
        if key not in self._data:
            self._data[key] = value
            if len(self._data) > self.max_entries:
                self._data.popitem(last=False)
        return self._data[key], False

    def stats(self) -> dict[str, Any]:
        """Hits, misses and saved tokens per role, and the number of entries."""
        return {"entries": len(self._data), "hits": dict(self.hits), "misses": dict(self.misses),
                "tokens_saved": dict(self.tokens_saved)}
