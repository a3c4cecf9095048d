"""Runtime bring-up: start, health, run with streaming callbacks, and clear failures."""

from __future__ import annotations

import time

import pytest

from arbitrage.metrics import summarize


def test_health_lists_every_role(tiny_runtime):
    h = tiny_runtime.health()
    assert set(h) == {"draft", "target", "prm", "router", "coordinators"}
    assert all(a["ready"] for hs in h.values() for a in hs)
    assert h["prm"][0]["pid"] == h["target"][0]["pid"]  # judge reuses the target's weights
    assert h["coordinators"][0]["roles"] == ["draft", "prm", "router", "target"]


def test_run_streams_results_in_input_order(tiny_runtime):
    items = [{"id": f"r{i}", "problem": f"What is {i} times 3?", "answer": str(3 * i)} for i in range(5)]
    seen = []
    rows = tiny_runtime.run(items, policy="router", threshold=0.45, on_result=lambda r: seen.append(r["problem_id"]))
    assert [r["problem_id"] for r in rows] == [it["id"] for it in items]
    assert sorted(seen) == sorted(it["id"] for it in items)
    m = summarize(rows)
    assert m["problems"] == 5 and m["errors"] == 0 and m["steps"] > 0
    stats = tiny_runtime.stats()
    assert stats["roles"]["router"]["batch_sizes"] and stats["coordinators"][0]["finished"]


def test_not_started_runtime_says_so(tiny_config):
    from cluster.runtime import Runtime

    with pytest.raises(RuntimeError, match="not started"):
        Runtime(tiny_config()).run([])


def test_role_that_fails_to_load_is_named(ray_local, tiny_config):
    from cluster.runtime import Runtime, RuntimeStartError

    cfg = tiny_config(**{"models.router.source": {"kind": "local", "name": "/nonexistent/router"}})
    free_before = ray_local.available_resources().get("CPU", 0)
    rt = Runtime(cfg, ready_timeout_s=120)
    with pytest.raises(RuntimeStartError, match=r"^router actor failed to start: .*nonexistent"):
        rt.start()
    assert rt.handles == {} and rt.coordinators == []
    assert ray_local.is_initialized()  # the runtime did not start Ray, so it leaves it up
    deadline = time.monotonic() + 30
    while ray_local.available_resources().get("CPU", 0) < free_before and time.monotonic() < deadline:
        time.sleep(0.5)  # the killed actors' CPUs come back
    assert ray_local.available_resources().get("CPU", 0) >= free_before


def test_unschedulable_role_times_out_naming_it(ray_local, tiny_config):
    from cluster.runtime import Runtime, RuntimeStartError

    cfg = tiny_config(**{"runtime.router.resources": {"small_gpu_node": 0.01}})
    with pytest.raises(RuntimeStartError, match=r"not ready after 3s: router \(no node offers small_gpu_node"):
        Runtime(cfg, ready_timeout_s=3).start()


def test_tensor_parallel_target_group_serves_chains(ray_local, tiny_config):
    from cluster.runtime import Runtime

    cfg = tiny_config(**{"runtime.target.tensor_parallel": 2, "models.router": None, "policy.name": "fixed_rate"})
    with Runtime(cfg, ready_timeout_s=120) as rt:
        h = rt.health()
        assert h["target"][0]["ready"] and h["target"][0]["tp_size"] == 2
        assert h["prm"][0]["role"] == "prm"  # the group cannot score: the judge gets its own actor
        rows = rt.run([{"id": f"t{i}", "problem": f"{i} + 1?"} for i in range(3)], policy="fixed_rate", threshold=0.5)
        assert all(r["error"] is None for r in rows) and sum(r["target_calls"] for r in rows) > 0
        assert rt.stats()["roles"]["target"]["batch_sizes"]


def test_probe_router_runs_inside_the_coordinator_without_an_actor(ray_local, tiny_config):
    """kind: probe needs no model, so no router actor: each coordinator asks its own copy
    (no RPC per step); chains equal the in-process loop's."""
    from arbitrage.router_factory import InProcessRouter
    from arbitrage.runner import run_in_process
    from cluster.runtime import PROJECT_ROOT, Runtime

    probe = {"kind": "probe", "path": str(PROJECT_ROOT / "routers" / "local-probe")}
    cfg = tiny_config(**{"models.router": probe, "models.prm": None})
    items = [{"id": f"p{i}", "problem": f"What is {i} plus 4?"} for i in range(3)]
    with Runtime(cfg, ready_timeout_s=120) as rt:
        assert isinstance(rt.handles["router"][0], InProcessRouter)
        assert "router" not in {role for role, _ in rt._owned}
        assert rt.health()["router"][0]["in_process"]
        rows = rt.run(items, policy="router", threshold=0.5)
    want = run_in_process(cfg, items, "router", 0.5)
    assert all(r["error"] is None and r["router_calls"] == r["num_steps"] > 0 for r in rows)
    assert [(r["final_text"], r["escalations"]) for r in rows] == [(w["final_text"], w["escalations"]) for w in want]
