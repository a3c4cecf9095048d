"""The colocated layout through the real Ray runtime (tiny models, CPU): one actor serves the
draft, target, judge PRM and router; chains give the same results as the in-process loop."""

from __future__ import annotations

from arbitrage.runner import run_in_process

FAST = {"models.draft.engine": "fast", "models.target.engine": "fast"}
ITEMS = [{"id": f"c{i}", "problem": f"What is {i} plus 4?", "answer": str(i + 4)} for i in range(4)]


def _chain_view(rows):
    return [(r["problem_id"], [(s["text"], s["author"]) for s in r["steps"]], r["escalations"]) for r in rows]


def test_colocated_runtime_equals_in_process_loop(ray_local, tiny_config):
    from cluster.runtime import Runtime

    cfg = tiny_config(**{"runtime.layout": "colocated", **FAST})
    with Runtime(cfg) as rt:
        h = rt.health()
        assert {r for r in h if r != "coordinators"} == {"draft", "target", "prm", "router"}
        assert len({a["pid"] for r, hs in h.items() if r != "coordinators" for a in hs}) == 1  # one process
        assert h["target"][0]["methods"] == ["generate_step", "score"]  # the judge rides on the target
        assert h["coordinators"][0]["roles"] == ["draft", "prm", "router", "target"]
        got = {p: rt.run(ITEMS, policy=p, threshold=tau) for p, tau in (("router", 0.45), ("fixed_rate", 0.5))}
        stats = rt.stats()["roles"]
    for policy, rows in got.items():
        assert all(not r.get("error") for r in rows)
        want = run_in_process(tiny_config(), ITEMS, policy=policy, threshold=0.45 if policy == "router" else 0.5)
        assert _chain_view(rows) == _chain_view(want)
    assert sum(r["escalations"] for r in got["fixed_rate"]) > 0
    target = stats["target"]["replicas"][0]
    assert target["layout"] == "colocated" and target["engine"]["decode_steps"] > 0
    assert stats["draft"]["replicas"][0]["engine"]["decode_steps"] > 0
    assert stats["router"]["batch_sizes"]
