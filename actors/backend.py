"""`RayBackend`: the step loop's `ModelBackend` over Ray actor handles.

Each call awaits one actor method (`generate_step`, `score`, `predict`); ObjectRefs are
awaitable, so nothing blocks the caller's event loop. A request that names its chain
(`chain_id`) always goes to the same replica of a role, where the engine keeps that chain's
KV cache between steps; other requests are spread round-robin over the replicas. A role's
"handle" may also be an in-process object with async methods of the same names (e.g.
`actors.target_group.TargetGroup`, which fans out to its ranks).

Faults. A call lost to a dead actor (RayActorError) or to a failure the callee marks
`retryable` (a broken tensor-parallel group, which restarts itself before raising) is sent
again, up to `runtime.retry.attempts` tries, with doubling backoff. While the actor is
restarting (ActorUnavailableError: Ray is reloading it and its model) the call keeps
waiting for it, up to `runtime.retry.restart_wait_s`, without using attempts. This is the
only retry layer (the actors have `max_task_retries=0`), and it is safe: a request carries
the chain's whole text prefix and its sampling seed (`generation.seed` + step index), so a
restarted actor that lost the chain's cached KV computes the same step, and the loop
receives exactly one result per call. Each retry is recorded under its key (role, chain
id, step index) in `retries`, for stats and tests. Model errors (e.g. a prompt over
`max_context`) are not retried.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import time
import zlib
from collections import Counter
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, WorkerCrashedError

from arbitrage.service import check_service_stats
from arbitrage.backend import ModelBackend
from arbitrage.roles import ROLE_METHOD, check_role
from configs.schema import RetryConfig

MAX_RETRY_LOG = 1000  # retries kept in RayBackend.retries (the count is exact beyond it)
# ChainResult.error of a chain whose model actor stayed unreachable through every retry starts
# with this: a transient failure (the Serve app answers 503, not 500; a sweep redoes the chain).
UNAVAILABLE = "unavailable: "


def is_retryable(err: BaseException) -> bool:
    """A failure of the callee's process, not of the request: sending it again can succeed."""
    return isinstance(err, (RayActorError, WorkerCrashedError)) or bool(getattr(err, "retryable", False))


def retry_key(role: str, req) -> tuple[str, str | None, int]:
    """(role, chain id, step index) of a request: what a retry is keyed and logged by.

    StepRequest: the steps accepted so far; PRMRequest: its steps end with the scored one;
    RouterRequest: the history before the candidate.
    """
    if hasattr(req, "history"):
        index = len(req.history)
    else:
        steps = getattr(req, "steps", ())
        index = len(steps) - 1 if role == "prm" else len(steps)
    return role, getattr(req, "chain_id", None), index


async def call_handle(handle, method: str, *args):
    """Await `handle.method(*args)`: `.remote()` on an actor handle; on an in-process object,
    an async method is awaited and a sync one (which may block on ray.get) runs in a thread."""
    fn = getattr(handle, method)
    remote = getattr(fn, "remote", None)
    if remote is not None:
        return await remote(*args)
    if inspect.iscoroutinefunction(fn):
        return await fn(*args)
    out = await asyncio.to_thread(fn, *args)
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
        m = check_service_stats(s)["methods"].get(method, {})
        hist.update({int(k): int(v) for k, v in m.get("batch_sizes", {}).items()})
        busy += float(m.get("busy_s", 0.0))
        forward += int(s.get("forward_calls", 0))
    return {"batch_sizes": dict(sorted(hist.items())), "busy_s": busy, "forward_calls": forward, "replicas": per_actor}


class RayBackend(ModelBackend):
    """Awaits Ray actor handles per role: chain-sticky, else round-robin across replicas."""

    def __init__(self, handles: dict[str, Any], retry: RetryConfig | None = None):
        """Args: handles: role -> a handle or a list of replica handles (roles may be missing);
        retry: how often and how patiently a call lost to a dead actor is sent again."""
        self.retry = retry or RetryConfig()
        self.retries: list[dict[str, Any]] = []  # one entry per re-sent call (the last MAX_RETRY_LOG)
        self.retry_count = 0
        self.failed_calls = 0  # calls that exhausted their retries
        self.handles: dict[str, list] = {}
        for role, hs in handles.items():
            check_role(role)
            hs = list(hs) if isinstance(hs, (list, tuple)) else [hs]
            if hs and hs[0] is not None:
                self.handles[role] = hs
        self._rr = {role: itertools.count() for role in self.handles}

    def _pick(self, role: str, chain_id: str | None = None):
        """A chain's requests go to one replica (its KV cache lives there); others round-robin."""
        hs = self.handles.get(role)
        if not hs:
            raise RuntimeError(f"no {role} actor in this runtime; configure models.{role}")
        if chain_id is not None:  # crc32, not hash(): every coordinator process must agree
            return hs[zlib.crc32(chain_id.encode()) % len(hs)]
        return hs[next(self._rr[role]) % len(hs)]

    async def _call(self, role: str, req):
        """One call, re-sent while its actor is dead or restarting (see the module docstring)."""
        r = self.retry
        lost, restarting_since = 0, None
        for attempt in itertools.count(1):
            handle = self._pick(role, getattr(req, "chain_id", None))
            try:
                return await call_handle(handle, ROLE_METHOD[role], req)
            except Exception as e:
                if not is_retryable(e):
                    raise
                now = time.monotonic()
                if isinstance(e, ActorUnavailableError):  # restarting: wait for it, within restart_wait_s
                    restarting_since = restarting_since or now
                    give_up = now - restarting_since > r.restart_wait_s
                else:  # the call was lost (the actor died, or a TP group broke and restarted)
                    lost += 1
                    give_up = lost >= r.attempts
                if give_up:
                    self.failed_calls += 1
                    raise
                wait = min(r.max_backoff_s, r.backoff_s * 2 ** min(attempt - 1, 16))
                self._log_retry(retry_key(role, req), attempt, e, wait)
                await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    def _log_retry(self, key: tuple, attempt: int, err: BaseException, wait: float) -> None:
        role, chain_id, step = key
        cause = getattr(err, "cause", None)  # a RayTaskError carries the remote exception
        cause = cause if isinstance(cause, BaseException) else err
        self.retry_count += 1
        self.retries.append(
            {
                "role": role,
                "chain_id": chain_id,
                "step": step,
                "attempt": attempt,
                "error": f"{type(cause).__name__}: {cause}".splitlines()[0][:300],
                "wait_s": wait,
                "at": time.time(),
            }
        )
        del self.retries[:-MAX_RETRY_LOG]

    def retry_stats(self) -> dict[str, Any]:
        """Re-sent calls: how many, how many gave up, and the recent ones by key."""
        return {"count": self.retry_count, "failed_calls": self.failed_calls, "recent": list(self.retries)}

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
        per_role = await asyncio.gather(
            *(asyncio.gather(*(call_handle(h, "stats") for h in self.handles[r])) for r in roles)
        )
        return {r: merge_role_stats(r, list(s)) for r, s in zip(roles, per_role)}

    def stats(self) -> dict[str, Any]:
        """As `astats`, for driver code (blocks on ray.get; not for use inside an actor)."""
        return {r: merge_role_stats(r, [call_handle_sync(h, "stats") for h in hs]) for r, hs in self.handles.items()}
