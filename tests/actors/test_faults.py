"""Faults: a model actor or a tensor-parallel rank killed while 16 chains run loses no work.

Real local Ray, tiny random-weight models, no mocks. The kill lands while the chains are
decoding (we wait until the victim has served this batch, then kill it). Every chain must
still finish, equal to an undisturbed greedy run step for step; its trace must number the
steps 0..n-1 (none duplicated or lost) and its call counters must equal the undisturbed
run's (a re-sent call is counted once by the loop). The coordinator's retry log must show
that in-flight calls really were re-sent (else the test proves nothing).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import ray

from arbitrage.loop import ChainInput, LoopSettings, run_chain
from arbitrage.policies import make_policy

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
PROBLEMS = [
    ChainInput(
        id=f"f{i}", problem=f"Ann has {i + 2} pens and buys {i + 5} more. How many pens now?", answer=str(2 * i + 7)
    )
    for i in range(16)
]
POLICY, THRESHOLD = "fixed_rate", 0.5  # draft, target and (on escalation) the judge PRM all serve


def _served(handle) -> int:
    """Forward passes the actor's model has run (grows while it serves the batch)."""
    return ray.get(handle.stats.remote(), timeout=60)["forward_calls"]


def _kill_when_busy(handle, victim=None, timeout_s: float = 120.0) -> None:
    """Kill `victim` (default: `handle`) as soon as `handle` has served a forward pass of the new work."""
    start = _served(handle)
    deadline = time.monotonic() + timeout_s
    while _served(handle) == start:
        assert time.monotonic() < deadline, "the batch never reached the actor"
        time.sleep(0.01)
    ray.kill(victim or handle, no_restart=False)


def _same_as_undisturbed(rows: list[dict], reference: list[dict]) -> None:
    assert [r["problem_id"] for r in rows] == [p.id for p in PROBLEMS]
    for row, ref in zip(rows, reference):
        assert row["error"] is None, row["error"]
        assert [s["index"] for s in row["steps"]] == list(range(len(row["steps"])))  # none duplicated or lost
        assert [(s["text"], s["author"]) for s in row["steps"]] == [(s["text"], s["author"]) for s in ref["steps"]]
        for k in (
            "final_text",
            "stop_reason",
            "draft_calls",
            "target_calls",
            "prm_calls",
            "draft_tokens",
            "target_tokens",
        ):
            assert row[k] == ref[k], (row["problem_id"], k, row[k], ref[k])


def _retries_since(coord, before: int) -> list[dict]:
    r = ray.get(coord.stats.remote(), timeout=60)["retries"]
    assert r["failed_calls"] == 0
    return r["recent"][-(r["count"] - before) :] if r["count"] > before else []


@pytest.fixture(scope="module")
def undisturbed():
    """The 16 chains run alone, in this process, over the same models (the greedy reference)."""
    from arbitrage.backend import LocalBackend
    from configs.schema import load_config

    cfg = load_config(TINY)
    b = LocalBackend.from_config(cfg)
    backend = LocalBackend(b.draft, b.target, b.prm, b.router, max_batch_size=1, max_wait_ms=0)
    pol = make_policy(POLICY, THRESHOLD, seed=cfg.generation.seed)
    settings = LoopSettings.from_config(cfg)
    return [asyncio.run(run_chain(p, backend, pol, settings)).to_dict() for p in PROBLEMS]


def test_killed_target_actor_restarts_and_every_chain_finishes_unchanged(tiny_runtime, undisturbed):
    coord, target = tiny_runtime.coordinators[0], tiny_runtime.handles["target"][0]
    pid = ray.get(target.health.remote())["pid"]
    before = ray.get(coord.stats.remote())["retries"]["count"]
    batch = coord.run_batch.remote(PROBLEMS, POLICY, THRESHOLD)
    _kill_when_busy(target)
    rows = ray.get(batch, timeout=300)

    _same_as_undisturbed(rows, undisturbed)
    assert ray.get(target.health.remote())["pid"] != pid  # Ray restarted the actor (a new process)
    retried = _retries_since(coord, before)
    print(
        f"target kill: {len(rows)} chains, {sum(r['num_steps'] for r in rows)} steps, "
        f"{len(retried)} calls re-sent: {sorted({(r['role'], r['step']) for r in retried})}"
    )
    assert retried, "the kill hit no call in flight"
    ids = {p.id: r["num_steps"] for p, r in zip(PROBLEMS, rows)}
    for r in retried:  # keyed by (role, chain, step index): a real step of a chain of this batch
        assert r["role"] in ("target", "prm") and "Actor" in r["error"], r  # ActorDiedError / ActorUnavailableError
        assert ids[r["chain_id"].split("#")[0]] > r["step"] >= 0


def test_killed_coordinator_restarts_and_its_unfinished_chains_run_again(tiny_runtime, undisturbed):
    coord = tiny_runtime.coordinators[0]
    pid = ray.get(coord.health.remote())["pid"]
    seen: list[str] = []

    def on_result(row: dict) -> None:  # the first result is back, the other 15 are in flight: kill
        seen.append(row["problem_id"])
        if len(seen) == 1:
            ray.kill(coord, no_restart=False)

    resubmitted_before = len(tiny_runtime.resubmitted)
    rows = tiny_runtime.run(PROBLEMS, POLICY, THRESHOLD, on_result=on_result)

    _same_as_undisturbed(rows, undisturbed)
    assert sorted(seen) == sorted(p.id for p in PROBLEMS)  # every result delivered exactly once
    (again,) = tiny_runtime.resubmitted[resubmitted_before:]
    print(f"coordinator kill: {again['chains']} unfinished chains ran again ({again['error'][:80]})")
    assert 0 < again["chains"] < len(PROBLEMS) and again["try"] == 2
    assert ray.get(coord.health.remote())["pid"] != pid


def test_killed_tp_rank_restarts_the_whole_group_and_every_chain_finishes_unchanged(ray_local, tiny_config):
    """Rank 1 killed under load: the call that sees it restarts the group. Then rank 0 of the
    new group killed while idle: the host's watchdog restarts the group before any call."""
    from cluster.runtime import Runtime

    cfg = tiny_config(**{"runtime.target.tensor_parallel": 2, "models.router": None, "policy.name": POLICY})
    with Runtime(cfg, ready_timeout_s=180) as rt:
        coord, host = rt.coordinators[0], rt.handles["target"][0]
        undisturbed = ray.get(coord.run_batch.remote(PROBLEMS, POLICY, THRESHOLD), timeout=300)
        assert sum(r["target_calls"] for r in undisturbed) > 0
        old_ranks = ray.get(host.rank_handles.remote())
        before = ray.get(coord.stats.remote())["retries"]["count"]

        batch = coord.run_batch.remote(PROBLEMS, POLICY, THRESHOLD)
        _kill_when_busy(host, victim=old_ranks[1])
        rows = ray.get(batch, timeout=300)

        _same_as_undisturbed(rows, undisturbed)
        h = ray.get(host.health.remote())
        assert h["ready"] and h["epoch"] == 1 and len(h["restarts"]) == 1  # one restart, however many calls saw it
        reason = h["restarts"][0]["reason"]
        assert reason.startswith(
            ("TargetGroupBroken: target group is broken (rank failure", "ActorDiedError", "watchdog: rank(s) [1] dead")
        ), reason  # whichever noticed first
        new_ranks = ray.get(host.rank_handles.remote())
        assert len(new_ranks) == 2 and not {r._actor_id for r in new_ranks} & {r._actor_id for r in old_ranks}
        with pytest.raises(ray.exceptions.RayActorError):  # rank 0 went too: the whole group was replaced
            ray.get(old_ranks[0].ping.remote(), timeout=30)
        retried = _retries_since(coord, before)
        print(
            f"TP rank kill: {len(rows)} chains, {sum(r['num_steps'] for r in rows)} steps, {len(retried)} calls "
            f"re-sent, group restart {h['restarts'][0]['seconds']} s ({reason})"
        )
        assert retried and all(r["role"] == "target" and "TargetGroupBroken" in r["error"] for r in retried)

        ray.kill(new_ranks[0], no_restart=False)  # idle now: the host's watchdog must notice and restart
        deadline = time.monotonic() + 120
        while (h := ray.get(host.health.remote(), timeout=60))["epoch"] < 2 or not h["ready"]:
            assert time.monotonic() < deadline, h
            time.sleep(1)
        assert h["restarts"][1]["reason"] == "watchdog: rank(s) [0] dead", h["restarts"]
        again = ray.get(coord.run_batch.remote(PROBLEMS[:4], POLICY, THRESHOLD), timeout=300)
        assert [(r["error"], r["final_text"]) for r in again] == [(None, r["final_text"]) for r in undisturbed[:4]]
