"""`Coordinator`: an async Ray actor that runs the step loop for many concurrent chains.

Each chain is one asyncio task running `arbitrage.loop.run_chain` (the one loop
implementation) over a `RayBackend`; every model call is an awaited ObjectRef, so
hundreds of chains interleave on one event loop and their requests meet in the model
actors' dynamic batchers. Concurrency is bounded by `runtime.max_concurrent_chains`
(per coordinator, shared by all calls) and each chain by `runtime.chain_timeout_s`.

Results cross Ray as plain dicts (`ChainResult.to_dict()`, `asdict(TraceStep)`).
`stream` and `solve` are async generator methods: callers get an `ObjectRefGenerator`
and receive each item as soon as it is yielded.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter, defaultdict
from dataclasses import asdict, replace
from typing import Any, AsyncIterator, Iterable

import ray

from actors.backend import UNAVAILABLE, RayBackend, is_retryable
from actors.model_actor import as_config
from arbitrage.loop import ChainInput, LoopSettings, failed_chain, run_chain
from arbitrage.policies import DecisionPolicy, make_policy
from arbitrage.roles import check_available
from arbitrage.runner import as_input
from arbitrage.types import ChainResult

COORDINATOR_MAX_CONCURRENCY = 10_000  # concurrent method calls (run_batch / stream / solve)


class Coordinator:
    """Runs many chains concurrently through the step loop over Ray model actors."""

    def __init__(self, cfg, handles: dict[str, Any]):
        """Args: cfg: ArbitrageConfig or its dict; handles: role -> actor handle(s)."""
        self.cfg = as_config(cfg)
        self.backend = RayBackend(handles, self.cfg.runtime.retry)
        settings = LoopSettings.from_config(self.cfg)
        self.settings = replace(settings, has_prm=settings.has_prm and "prm" in self.backend.handles)
        self.max_concurrent = self.cfg.runtime.max_concurrent_chains
        self.timeout_s = self.cfg.runtime.chain_timeout_s
        self._sem: asyncio.Semaphore | None = None  # created in the actor's event loop
        self._tasks: dict[str, set[asyncio.Task]] = defaultdict(set)
        self._stops: Counter[str] = Counter()
        self._steps_decided = 0  # over this actor's lifetime, for the CLI's progress bar

    # ---- policy and one chain ---------------------------------------------------------
    def policy(self, name: str | None = None, threshold: float | None = None) -> DecisionPolicy:
        """The policy a call asks for (default: the config's), checked against the roles served here.

        Raises:
            ValueError: an unknown policy, tau outside [0, 1], or a role the policy needs is missing.
        """
        p = self.cfg.policy
        policy = make_policy(
            name or p.name, p.threshold if threshold is None else threshold, seed=self.cfg.generation.seed
        )
        check_available(policy, self.backend.handles)
        return policy

    async def _run_one(
        self, item: ChainInput, policy: DecisionPolicy, on_step=None, settings: LoopSettings | None = None
    ) -> ChainResult:
        """One chain under the concurrency bound and timeout; never raises for the chain's own failure."""
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.max_concurrent)

        def counted(step):
            self._steps_decided += 1
            return on_step(step) if on_step is not None else None

        async def guarded() -> ChainResult:
            async with self._sem:
                return await asyncio.wait_for(
                    run_chain(item, self.backend, policy, settings or self.settings, counted), self.timeout_s
                )

        task = asyncio.ensure_future(guarded())
        self._tasks[item.id].add(task)
        try:
            await asyncio.wait({task})
        finally:
            if not task.done():  # our caller went away: stop the chain too
                task.cancel()
            self._tasks[item.id].discard(task)
            if not self._tasks[item.id]:
                del self._tasks[item.id]
        res = _outcome(task, item, policy, self.timeout_s)
        self._stops[res.stop_reason] += 1
        return res

    # ---- public methods ---------------------------------------------------------------
    async def run_batch(self, items: Iterable, policy: str | None = None, threshold: float | None = None) -> list[dict]:
        """Run chains concurrently and return their results in input order.

        Args:
            items: dicts with id/problem/answer, ChainInputs or data.Problems.
            policy, threshold: override the config's policy.
        Returns:
            `ChainResult.to_dict()` per item.
        """
        pol = self.policy(policy, threshold)
        results = await asyncio.gather(*(self._run_one(as_input(i), pol) for i in items))
        return [r.to_dict() for r in results]

    async def stream(
        self, items: Iterable, policy: str | None = None, threshold: float | None = None
    ) -> AsyncIterator[tuple[int, dict]]:
        """Run chains concurrently; yield `(input index, result dict)` as each finishes."""
        pol = self.policy(policy, threshold)
        inputs = [as_input(i) for i in items]

        async def indexed(i: int, item: ChainInput) -> tuple[int, ChainResult]:
            return i, await self._run_one(item, pol)

        tasks = [asyncio.ensure_future(indexed(i, it)) for i, it in enumerate(inputs)]
        try:
            for fut in asyncio.as_completed(tasks):
                i, res = await fut
                yield i, res.to_dict()
        finally:
            for t in tasks:
                t.cancel()

    async def solve(
        self,
        item,
        policy: str | DecisionPolicy | None = None,
        threshold: float | None = None,
        stream_steps: bool = True,
        settings: LoopSettings | None = None,
    ) -> AsyncIterator[dict]:
        """Run one chain; yield `{"event": "step", "step": ...}` per decided step, then the result.

        Args:
            item: one problem (dict, ChainInput or data.Problem).
            policy, threshold: override the config's policy (a policy object: used as it is).
            stream_steps: False yields only the final `{"event": "result", "result": ...}`.
            settings: this chain's loop settings (default: the config's; the Serve app passes
                each request's own).
        """
        pol = policy if isinstance(policy, DecisionPolicy) else self.policy(policy, threshold)
        queue: asyncio.Queue[dict] = asyncio.Queue()
        on_step = (lambda st: queue.put_nowait({"event": "step", "step": asdict(st)})) if stream_steps else None

        async def runner() -> None:
            res = await self._run_one(as_input(item), pol, on_step, settings)
            queue.put_nowait({"event": "result", "result": res.to_dict()})

        task = asyncio.ensure_future(runner())
        try:
            while True:
                event = await queue.get()
                yield event
                if event["event"] == "result":
                    return
        finally:
            task.cancel()

    def cancel(self, chain_id: str) -> int:
        """Cancel the in-flight chains with this id; returns how many were cancelled."""
        tasks = [t for t in self._tasks.get(str(chain_id), ()) if not t.done()]
        for t in tasks:
            t.cancel()
        return len(tasks)

    def in_flight(self) -> list[str]:
        """Ids of the chains running or queued here."""
        return sorted(self._tasks)

    async def stats(self) -> dict[str, Any]:
        """Per-role batch histograms from the model actors, and this coordinator's chain counts."""
        return {
            "roles": await self.backend.astats(),
            "in_flight": sum(len(t) for t in self._tasks.values()),
            "finished": dict(self._stops),
            "retries": self.backend.retry_stats(),
        }

    def progress(self) -> dict[str, int]:
        """Steps decided and chains finished since this actor started (cheap; polled for progress bars)."""
        return {
            "steps": self._steps_decided,
            "finished": sum(self._stops.values()),
            "in_flight": sum(len(t) for t in self._tasks.values()),
        }

    def health(self) -> dict[str, Any]:
        """Readiness and placement of this coordinator."""
        return {
            "role": "coordinator",
            "ready": True,
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "roles": sorted(self.backend.handles),
            "in_flight": sum(len(t) for t in self._tasks.values()),
        }


def _outcome(task: asyncio.Task, item: ChainInput, policy: DecisionPolicy, timeout_s: float) -> ChainResult:
    """The finished task's ChainResult, or the failure record for cancel / timeout / error."""
    if task.cancelled():
        return failed_chain(item, policy, "cancelled", "chain cancelled")
    exc = task.exception()
    if isinstance(exc, asyncio.TimeoutError):
        return failed_chain(item, policy, "timeout", f"chain exceeded runtime.chain_timeout_s={timeout_s}s")
    if exc is not None and is_retryable(exc):  # a model actor stayed down through every retry
        return failed_chain(item, policy, "error", f"{UNAVAILABLE}{type(exc).__name__}: {exc}".splitlines()[0])
    if exc is not None:  # one broken chain must not take down the others
        return failed_chain(item, policy, "error", f"{type(exc).__name__}: {exc}")
    return task.result()


def make_coordinator(cfg, handles: dict[str, Any], name: str | None = None):
    """Create one Coordinator actor (no model resources: it only awaits other actors).

    Args:
        cfg: ArbitrageConfig (or dict).
        handles: role -> actor handle(s) (or a TargetGroup for the target).
        name: optional actor name.
    Returns:
        The actor handle.
    """
    cfg = as_config(cfg)
    opts: dict[str, Any] = dict(num_cpus=0, max_concurrency=COORDINATOR_MAX_CONCURRENCY, max_restarts=-1)
    if name is not None:
        opts["name"] = name
    return ray.remote(Coordinator).options(**opts).remote(cfg.model_dump(), handles)
