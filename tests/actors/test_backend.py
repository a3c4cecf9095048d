"""RayBackend routing and stats merging, over in-process stand-ins for actor handles."""

from __future__ import annotations

import asyncio

import pytest

from actors.backend import RayBackend, merge_role_stats
from arbitrage.service import ModelService, check_service_stats, method_stats, service_stats
from arbitrage.types import StepRequest


class FakeReplica:
    """Answers like a ModelActor: async generate_step, sync stats (as a TargetGroup does)."""

    def __init__(self, name: str):
        self.name = name
        self.seen: list[str | None] = []

    async def generate_step(self, req):
        self.seen.append(req.chain_id)
        return self.name

    def stats(self) -> dict:
        return service_stats(
            "target", {"generate_step": method_stats({1: len(self.seen)}, 0.5)}, forward_calls=2 * len(self.seen)
        )


def test_chains_stick_to_one_replica_others_round_robin():
    replicas = [FakeReplica(f"r{i}") for i in range(3)]
    backend = RayBackend({"target": replicas})

    async def go():
        for _ in range(3):
            for c in ("a", "b", "c", "d"):
                await backend.target_step(StepRequest(problem="p", chain_id=c))
        return [await backend.target_step(StepRequest(problem="p")) for _ in range(6)]

    assert asyncio.run(go()) == ["r0", "r1", "r2", "r0", "r1", "r2"]
    for c in ("a", "b", "c", "d"):
        assert sum(r.seen.count(c) == 3 for r in replicas) == 1  # all 3 steps of a chain on one replica
    stats = asyncio.run(backend.astats())["target"]
    assert stats["batch_sizes"] == {1: 18} and stats["forward_calls"] == 36 and stats["busy_s"] == 1.5


def test_missing_role_and_unknown_role_are_clear():
    backend = RayBackend({"draft": [FakeReplica("d")]})
    with pytest.raises(RuntimeError, match="no target actor .*configure models.target"):
        asyncio.run(backend.target_step(StepRequest(problem="p")))
    with pytest.raises(ValueError, match="unknown role 'verifier'"):
        RayBackend({"verifier": [FakeReplica("v")]})


def test_every_service_kind_implements_the_contract():
    from actors.colocated_actor import RoleView
    from actors.model_actor import ModelActor
    from actors.target_group import TargetGroup, TargetGroupHost
    from arbitrage.router_factory import InProcessRouter
    from cluster.serve_models import ServedModel, TargetGroupServer

    for cls in (ModelActor, ServedModel, TargetGroup, TargetGroupHost, TargetGroupServer, RoleView, InProcessRouter):
        assert issubclass(cls, ModelService), cls.__name__
    assert not issubclass(FakeReplica, ModelService)  # it lacks score, predict and health


def test_stats_follow_one_schema_and_a_flat_report_is_refused():
    s = service_stats("draft", {"generate_step": method_stats({4: 2}, 1.0)}, forward_calls=3, engine={"x": 1}, pid=7)
    assert check_service_stats(s) == {
        "role": "draft",
        "methods": {"generate_step": {"batch_sizes": {4: 2}, "busy_s": 1.0, "isolated": 0}},
        "busy_s": 1.0,
        "forward_calls": 3,
        "engine": {"x": 1},
        "pid": 7,
    }
    with pytest.raises(ValueError, match=r"shadow the schema's"):
        service_stats("draft", {}, busy_s=2.0)
    with pytest.raises(ValueError, match=r"method 'score' lack \['busy_s'\]"):
        service_stats("prm", {"score": {"batch_sizes": {}}})
    flat = {"batch_sizes": {1: 3}, "busy_s": 0.5, "forward_calls": 3}  # what a TP group used to send
    with pytest.raises(ValueError, match=r"service stats lack \['role', 'methods', 'engine'\]"):
        merge_role_stats("target", [flat])
