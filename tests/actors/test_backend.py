"""RayBackend routing and stats merging, over in-process stand-ins for actor handles."""

from __future__ import annotations

import asyncio

import pytest

from actors.backend import RayBackend
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
        return {
            "methods": {"generate_step": {"batch_sizes": {1: len(self.seen)}, "busy_s": 0.5}},
            "forward_calls": 2 * len(self.seen),
        }


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
