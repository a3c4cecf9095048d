"""Step cache on tiny random models: a cached sweep gives the uncached sweep's rows, with fewer model calls."""

from __future__ import annotations

import asyncio
import importlib.util
import math
from pathlib import Path

import pytest

from arbitrage.backend import LocalBackend
from arbitrage.runner import run_in_process
from arbitrage.step_cache import StepCache, step_key
from arbitrage.types import SamplingParams, StepOutput, StepRequest
from cluster.evaluate import cache_line, cache_totals

PROBLEMS = [
    {"id": f"p{i}", "problem": f"Tom has {i} apples and buys {i + 3} more. How many?", "answer": str(2 * i + 3)}
    for i in range(2)
]
GROUPS = [("draft_only", 0.0), ("rsd", 0.3), ("rsd", 0.7), ("router", 0.5)]
VOLATILE = ("wall_s", "cache")  # timing, and the cache's own record


def _sweep(cfg, backend) -> list[dict]:
    rows = []
    for policy, tau in GROUPS:
        rows += run_in_process(cfg, PROBLEMS, policy, tau, backend=backend)
    return rows


def _same(a, b) -> bool:
    """Equal, floats up to batch-composition noise (the uncached run batches differently)."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _stable(row: dict) -> dict:
    out = {k: v for k, v in row.items() if k not in VOLATILE}
    out["steps"] = [{k: v for k, v in st.items() if k != "wall_s"} for st in row["steps"]]
    return out


@pytest.fixture(scope="module")
def cfg():
    from configs import load_config

    return load_config("tiny")


def _backend(cfg):
    return LocalBackend.from_config(cfg, roles=("draft", "target", "prm", "router"))


def test_cached_sweep_rows_equal_uncached_rows(cfg):
    plain = _sweep(cfg, _backend(cfg))
    assert all(r["cache"] is None for r in plain)
    cached_cfg = cfg.with_overrides(**{"generation.step_cache": True})
    backend = _backend(cached_cfg)
    cached = _sweep(cached_cfg, backend)
    assert len(cached) == len(plain) == len(PROBLEMS) * len(GROUPS)
    for c, p in zip(cached, plain):
        assert _same(_stable(c), _stable(p)), (c["problem_id"], c["policy"], c["threshold"])
    tot = cache_totals(cached)
    # every chain starts with the same draft step and PRM score under each draft policy and threshold
    assert tot["hits"]["draft"] >= len(PROBLEMS) * 3 and tot["hits"]["prm"] >= len(PROBLEMS)
    st = backend.step_cache().stats()
    assert st["hits"] == tot["hits"] and st["misses"] == tot["misses"]
    # the models were asked only the misses
    for role in ("draft", "target", "prm"):
        sizes = backend.batchers[role].stats()["batch_sizes"]
        assert sum(size * count for size, count in sizes.items()) == tot["misses"][role], role
    assert "model calls answered from cache" in cache_line(cached)
    # benchmarks/cache_replay.py counts, from the traces alone, exactly the hits the live cache had
    spec = importlib.util.spec_from_file_location(
        "cache_replay", Path(__file__).resolve().parents[2] / "benchmarks" / "cache_replay.py"
    )
    cache_replay = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cache_replay)
    from cluster.evaluate import Group

    replayed = cache_replay.replay({str(i): r for i, r in enumerate(cached)}, [Group(p, t) for p, t in GROUPS])
    for label, rep in replayed.items():
        for kind in ("hits", "misses"):
            assert rep[kind] == {k: n for k, n in rep["recorded"][kind].items() if n}, (label, kind)


def test_no_cache_when_sampling(cfg):
    sampled = cfg.with_overrides(**{"generation.step_cache": True, "generation.temperature": 0.7})
    backend = _backend(sampled)
    rows = run_in_process(sampled, PROBLEMS[:2], "rsd", 0.5, backend=backend)
    assert all(r["cache"] is None for r in rows) and len(backend.step_cache()) == 0


def test_step_cache_lru_and_counters():
    cache = StepCache(max_entries=2)
    calls = []

    async def call(text):
        calls.append(text)
        return StepOutput(text=text, num_tokens=3, logprobs=[-0.1] * 3, stop_reason="separator")

    def req(steps, chain):
        return StepRequest(problem="q", steps=steps, params=SamplingParams(max_tokens=8), chain_id=chain)

    async def run():
        a, hit = await cache.get_or_call(step_key("draft", req((), "c1")), lambda: call("a"))
        assert not hit
        b, hit = await cache.get_or_call(step_key("draft", req((), "c2")), lambda: call("b"))  # chain id ignored
        assert hit and b is a
        await cache.get_or_call(step_key("draft", req(("x",), "c1")), lambda: call("c"))
        await cache.get_or_call(step_key("target", req((), "c1")), lambda: call("d"))  # evicts the first
        _, hit = await cache.get_or_call(step_key("draft", req((), "c1")), lambda: call("e"))
        assert not hit

    asyncio.run(run())
    assert calls == ["a", "c", "d", "e"] and len(cache) == 2
    assert cache.stats()["hits"]["draft"] == 1 and cache.stats()["tokens_saved"]["draft"] == 3


def test_a_persisted_cache_reloads_its_answers_and_sets_aside_another_models_file(tmp_path):
    path = tmp_path / "run" / "step_cache.jsonl"
    req = StepRequest(problem="q", steps=("s1",), params=SamplingParams(max_tokens=8, separator="\n\n"))
    step = StepOutput(
        text="t",
        num_tokens=2,
        logprobs=[-0.5, -0.25],
        stop_reason="separator",
        entropies=[0.1, 0.2],
        prompt_tokens=7,
        hidden=[0.1, -2.5e-8, 3.0],
    )

    async def fill(cache):
        await cache.get_or_call(step_key("draft", req), lambda: _answer(step))
        await cache.get_or_call(("prm", "q", ("s1",)), lambda: _answer(0.75))

    first = StepCache()
    assert first.persist(path, "models-a") == 0
    asyncio.run(fill(first))
    first.close()
    with path.open("a") as f:
        f.write('["draft", "torn')  # a run killed mid-write
    again = StepCache()
    assert again.persist(path, "models-a") == 2
    got, hit = asyncio.run(again.get_or_call(step_key("draft", req), lambda: _answer(None)))
    assert hit and got == step
    score, hit = asyncio.run(again.get_or_call(("prm", "q", ("s1",)), lambda: _answer(None)))
    assert hit and score == 0.75
    again.close()
    other = StepCache()
    assert other.persist(path, "models-b") == 0 and len(other) == 0
    assert (tmp_path / "run" / "step_cache.jsonl.stale").is_file()
    other.close()


async def _answer(value):
    return value
