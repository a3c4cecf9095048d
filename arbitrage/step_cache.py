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

Across runs: `StepCache.persist(path, fingerprint)` loads the answers a JSONL file holds and
appends every new one, so a resumed `arbitrage eval --in-process` keeps the hits of the runs
before it (the file's first line names what produced the answers; a file of other models or
settings is set aside, not read).

Counters: hits, misses and the generated tokens a hit saved, per role. A cached answer
also makes repeats exactly equal, where batched bf16 kernels could otherwise flip a
near-tie token depending on what else was in the batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import OrderedDict
from pathlib import Path
from typing import IO, Any, Awaitable, Callable

from arbitrage.roles import CACHED_ROLES
from arbitrage.types import SamplingParams, StepOutput, StepRequest


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
        self._file: IO[str] | None = None  # persist(): every new answer is appended here
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
            if self._file is not None:
                self._file.write(json.dumps([_key_json(key), _value_json(value)]) + "\n")
                self._file.flush()
        return self._data[key], False

    def persist(self, path: str | Path, fingerprint: str) -> int:
        """Keep this cache in `path` across runs: load the answers it holds, append new ones.

        Args:
            path: a JSONL file (created); line 1 is `{"fingerprint": ...}`, then one
                `[key, answer]` per line. A torn last line (a killed run) is skipped.
            fingerprint: what produced the answers (`fingerprint(cfg)`). A file with another
                one is renamed `<path>.stale` and a new file started: its answers may be wrong.
        Returns:
            The answers loaded.
        """
        path = Path(path)
        loaded = 0
        if path.exists():
            with path.open() as f:
                head = f.readline()
                try:
                    same = json.loads(head).get("fingerprint") == fingerprint
                except (ValueError, AttributeError):
                    same = False
                if same:
                    for line in f:
                        try:
                            key, value = json.loads(line)
                        except ValueError:
                            continue
                        self._data[_key_from_json(key)] = _value_from_json(key[0], value)
                        loaded += 1
            if not same:
                path.replace(path.with_name(path.name + ".stale"))
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"fingerprint": fingerprint}) + "\n")
        self._file = path.open("a")
        return loaded

    def close(self) -> None:
        """Stop appending to the persisted file (the in-memory answers stay)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def stats(self) -> dict[str, Any]:
        """Hits, misses and saved tokens per role, and the number of entries."""
        return {
            "entries": len(self._data),
            "hits": dict(self.hits),
            "misses": dict(self.misses),
            "tokens_saved": dict(self.tokens_saved),
        }


def fingerprint(cfg) -> str:
    """What determines a cached answer in an ArbitrageConfig: the models, prompt and generation."""
    parts = {k: getattr(cfg, k).model_dump(mode="json") for k in ("models", "prompt", "generation")}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _key_json(key: tuple) -> list:
    if key[0] == "prm":
        return [key[0], key[1], list(key[2])]
    role, problem, steps, system, chat, params = key
    return [role, problem, list(steps), system, chat, dataclasses.asdict(params)]


def _key_from_json(k: list) -> tuple:
    if k[0] == "prm":
        return ("prm", k[1], tuple(k[2]))
    role, problem, steps, system, chat, params = k
    return (role, problem, tuple(steps), system, chat, SamplingParams(**params))


def _value_json(value: Any) -> Any:
    if not isinstance(value, StepOutput):
        return value
    d = dataclasses.asdict(value)
    if d["hidden"] is not None:  # float32 states: 9 significant digits round-trip them exactly
        d["hidden"] = [float(f"{x:.9g}") for x in d["hidden"]]
    return d


def _value_from_json(role: str, value: Any) -> Any:
    return value if role == "prm" else StepOutput(**value)
