"""`RayBackend`: the step loop's `ModelBackend` over Ray actor handles.

Each call awaits one actor method (`generate_step`, `score`, `predict`); ObjectRefs are
awaitable, so nothing blocks the caller's event loop. Replicas of a role are used
round-robin. A role's "handle" may also be an in-process object with async methods
of the same names (e.g. `actors.target_group.TargetGroup`, which fans out to its ranks).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
from collections import Counter
from typing import Any

import ray

from actors.model_actor import ROLE_METHOD
from arbitrage.backend import ModelBackend


async def call_handle(handle, method: str, *args):
    """Await `handle.method(*args)`: `.remote()` on an actor handle, a plain call otherwise."""
    fn = getattr(handle, method)
    remote = getattr(fn, "remote", None)
    out = remote(*args) if remote is not None else fn(*args)
    return await out if inspect.isawaitable(out) else out


def call_handle_sync(handle, method: str, *args):
    """`call_handle` for driver code outside an event loop (ray.get on ObjectRefs)."""
    fn = getattr(handle, method)
    remote = getattr(fn, "remote", None)
    if remote is not None:
        return ray.get(remote(*args))
    out = fn(*args)
    return asyncio.run(out) if inspect.iscoroutine(out) else out


def merge_role_stats(role: str, per_actor: list[dict]) -> dict[str, Any]:
    """One role's batch histogram, busy time and forward calls, summed over its replicas."""
    method = ROLE_METHOD[role]
    hist: Counter[int] = Counter()
    busy, forward = 0.0, 0
    for s in per_actor:
        m = s.get("methods", {}).get(method) or s  # a TargetGroup may report flat stats
        hist.update({int(k): int(v) for k, v in m.get("batch_sizes", {}).items()})
        busy += float(m.get("busy_s", 0.0))
        forward += int(s.get("forward_calls", 0))
    return {"batch_sizes": dict(sorted(hist.items())), "busy_s": busy,
            "forward_calls": forward, "replicas": per_actor}


class RayBackend(ModelBackend):
    """Awaits Ray actor handles per role, round-robin across replicas."""

    def __init__(self, handles: dict[str, Any]):
        """Args: handles: role -> a handle or a list of replica handles (roles may be missing)."""
        self.handles: dict[str, list] = {}
        for role, hs in handles.items():
            if role not in ROLE_METHOD:
                raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLE_METHOD)}")
            hs = list(hs) if isinstance(hs, (list, tuple)) else [hs]
            if hs and hs[0] is not None:
                self.handles[role] = hs
        self._rr = {role: itertools.count() for role in self.handles}

    def _pick(self, role: str):
        hs = self.handles.get(role)
        if not hs:
            raise RuntimeError(f"no {role} actor in this runtime; configure models.{role}")
        return hs[next(self._rr[role]) % len(hs)]

    async def _call(self, role: str, req):
        return await call_handle(self._pick(role), ROLE_METHOD[role], req)

    async def draft_step(self, req):
        return await self._call("draft", req)

    async def target_step(self, req):
        return await self._call("target", req)

    async def prm_score(self, req) -> float:
        return await self._call("prm", req)

    async def router_prob(self, req) -> float:
        return await self._call("router", req)

    async def astats(self) -> dict[str, Any]:
        """Per-role stats gathered from every replica, without blocking the event loop."""
        roles = list(self.handles)
        per_role = await asyncio.gather(*(asyncio.gather(*(call_handle(h, "stats") for h in self.handles[r]))
                                          for r in roles))
        return {r: merge_role_stats(r, list(s)) for r, s in zip(roles, per_role)}

    def stats(self) -> dict[str, Any]:
        """As `astats`, for driver code (blocks on ray.get; not for use inside an actor)."""
        return {r: merge_role_stats(r, [call_handle_sync(h, "stats") for h in hs])
                for r, hs in self.handles.items()}
