"""Coordinator: many concurrent chains share the model actors and match running alone."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import ray

from arbitrage.loop import ChainInput, LoopSettings, run_chain
from arbitrage.policies import make_policy

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"

PROBLEMS = [
    ChainInput(id=f"p{i}", problem=f"Tom has {i} apples and buys {i + 3} more. How many now?", answer=str(2 * i + 3))
    for i in range(16)
]


@pytest.fixture(scope="module")
def local_backend():
    """The same models in this process: the reference each distributed chain must match."""
    from arbitrage.backend import LocalBackend
    from configs.schema import load_config

    b = LocalBackend.from_config(load_config(TINY))
    return LocalBackend(b.draft, b.target, b.prm, b.router, max_batch_size=1, max_wait_ms=0)


def _alone(item, cfg, backend, policy, threshold):
    pol = make_policy(policy, threshold, seed=cfg.generation.seed)
    return asyncio.run(run_chain(item, backend, pol, LoopSettings.from_config(cfg)))


@pytest.mark.parametrize("policy,threshold", [("fixed_rate", 0.5), ("router", 0.45)])  # tiny router: P in [0.43, 0.49]
def test_16_concurrent_chains_batch_the_target_and_match_alone(
    tiny_runtime, tiny_config, local_backend, policy, threshold
):
    coord = tiny_runtime.coordinators[0]
    before = ray.get(coord.stats.remote())["roles"]["target"]["batch_sizes"]
    rows = ray.get(coord.run_batch.remote(PROBLEMS, policy, threshold))
    after = ray.get(coord.stats.remote())["roles"]["target"]["batch_sizes"]
    grew = {size: n - before.get(size, 0) for size, n in after.items()}
    assert any(size > 1 and n > 0 for size, n in grew.items()), after

    cfg = tiny_config()
    escalated = 0
    for item, row in zip(PROBLEMS, rows):
        assert row["error"] is None and row["problem_id"] == item.id
        alone = _alone(item, cfg, local_backend, policy, threshold)
        assert [(s["text"], s["author"]) for s in row["steps"]] == [(s.text, s.author) for s in alone.steps]
        escalated += row["escalations"]
    assert escalated > 0  # the target really was used


def test_stream_yields_every_chain_once(tiny_runtime):
    coord = tiny_runtime.coordinators[0]
    seen = {}
    for ref in coord.stream.remote(PROBLEMS[:4], "draft_only", 0.5):
        i, row = ray.get(ref)
        seen[i] = row["problem_id"]
    assert seen == {i: p.id for i, p in enumerate(PROBLEMS[:4])}


def test_solve_streams_steps_then_result(tiny_runtime):
    coord = tiny_runtime.coordinators[0]
    events = [ray.get(ref) for ref in coord.solve.remote({"id": "s1", "problem": "What is 2 + 2?"}, "fixed_rate", 0.5)]
    steps = [e["step"] for e in events if e["event"] == "step"]
    assert events[-1]["event"] == "result" and len(steps) >= 1
    assert [s["text"] for s in steps] == [s["text"] for s in events[-1]["result"]["steps"]]


def test_cancel_stops_a_running_chain(tiny_runtime):
    coord = tiny_runtime.coordinators[0]
    gen = coord.solve.remote({"id": "to-cancel", "problem": "Count to ten slowly."}, "target_only", 0.5)
    first = ray.get(next(gen))
    assert first["event"] == "step"
    assert ray.get(coord.cancel.remote("to-cancel")) == 1
    last = [ray.get(ref) for ref in gen][-1]
    assert last["event"] == "result" and last["result"]["stop_reason"] == "cancelled"
    assert ray.get(coord.cancel.remote("to-cancel")) == 0


def test_timeout_and_missing_role(tiny_runtime, tiny_config):
    from actors.coordinator import make_coordinator

    cfg = tiny_config(**{"runtime.chain_timeout_s": 0.001})
    handles = {r: h for r, h in tiny_runtime.handles.items() if r != "router"}
    coord = make_coordinator(cfg, handles)
    try:
        (row,) = ray.get(coord.run_batch.remote(PROBLEMS[:1], "draft_only", 0.5))
        assert row["stop_reason"] == "timeout" and "chain_timeout_s" in row["error"]
        with pytest.raises(Exception, match="needs the router actor"):
            ray.get(coord.run_batch.remote(PROBLEMS[:1], "router", 0.5))
    finally:
        ray.kill(coord)
