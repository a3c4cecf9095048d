"""One role's model as an async Ray actor: draft / target engine, PRM or router.

`ModelActor` is a plain class (no decorator) holding one core object and forwarding
same-named methods through a `DynamicBatcher`, so concurrent requests from many chains
(and many coordinators) share one forward pass. `make_model_actor` applies
`ray.remote(...).options(...)` from the role's `runtime.<role>` ActorConfig.

Faults: Ray restarts a dead actor (`runtime.<role>.max_restarts`, default always), which
reloads its model; the calls it had in flight fail with RayActorError and are re-sent by
`actors.backend.RayBackend` (every method is idempotent: greedy, or sampling seeded per
step, and the request carries the whole text prefix, so a fresh actor without the chain's
cached KV computes the same step).

A judge PRM with `reuse_target: true` lives inside the TARGET actor (it reads the
target's weights): that actor then also answers `score`, and the PRM handle is the
target handle (`prm_on_target(cfg)`).
"""

from __future__ import annotations

import os
import time
from typing import Any

import ray

from arbitrage.service import service_stats
from arbitrage.roles import check_role
from configs.schema import ActorConfig, ArbitrageConfig

MAX_CONCURRENCY = 1000  # async actor: requests in flight per actor (they wait in the batcher)
MAX_HANDED_BATCHES = MAX_CONCURRENCY  # continuous engines: batches handed over and awaited at once
# Ray does not re-send a lost call itself: RayBackend retries it (actors/backend.py), so a
# step is sent again exactly where we count and log it.
MAX_TASK_RETRIES = 0


def as_config(cfg: ArbitrageConfig | dict) -> ArbitrageConfig:
    """An ArbitrageConfig from a config or its `model_dump()` (what crosses Ray)."""
    if isinstance(cfg, ArbitrageConfig):
        return cfg
    if isinstance(cfg, dict):
        return ArbitrageConfig.model_validate(cfg)
    raise TypeError(f"expected an ArbitrageConfig or a dict, got {type(cfg).__name__}")


def prm_on_target(cfg: ArbitrageConfig) -> bool:
    """Whether the PRM is hosted by the target actor (a judge reusing the target's weights)."""
    prm = cfg.models.prm
    return prm is not None and prm.kind == "judge" and prm.reuse_target


class ModelActor:
    """Serves one role's model (engine, PRM or router) with dynamic batching."""

    def __init__(self, role: str, cfg: ArbitrageConfig | dict):
        import torch

        self.role = check_role(role)
        self.cfg = as_config(cfg)
        actor_cfg: ActorConfig = getattr(self.cfg.runtime, role)
        torch.set_num_threads(max(1, int(actor_cfg.num_cpus)))
        self.engine = self.prm = self.router = None
        t0 = time.perf_counter()
        self._load()
        self.load_s = time.perf_counter() - t0
        self._batching = actor_cfg.batching
        self._batchers: dict[str, Any] = {}

    def _load(self) -> None:
        m = self.cfg.models
        if self.role in ("draft", "target"):
            from arbitrage.models import load_engine

            self.engine = load_engine(getattr(m, self.role))
            if self.role == "target" and prm_on_target(self.cfg):
                from arbitrage.prm import build_prm

                self.prm = build_prm(m.prm, target_engine=self.engine, prompt=self.cfg.prompt)
        elif self.role == "prm":
            if m.prm is None:
                raise ValueError("role 'prm' needs models.prm in the config")
            from arbitrage.prm import build_prm

            # A judge that would reuse the target, but runs apart from it (e.g. the target is a
            # tensor-parallel group), loads its own copy of the judge from models.prm.
            own = None
            if prm_on_target(self.cfg):
                from arbitrage.models import load_engine

                own = load_engine(m.prm)
            self.prm = build_prm(m.prm, target_engine=own, prompt=self.cfg.prompt)
        else:
            if m.router is None:
                raise ValueError("role 'router' needs models.router in the config")
            from arbitrage.router_factory import build_router

            self.router = build_router(m.router)

    def _batcher(self, method: str, fn):
        from arbitrage.batching import DynamicBatcher
        from arbitrage.engine_base import step_batch_fn

        if fn is None:
            raise RuntimeError(f"the {self.role} actor does not serve {method!r}")
        if method not in self._batchers:  # created inside the actor's event loop
            b = self._batching
            inflight = 1
            if method == "generate_step" and getattr(self.engine, "continuous", False):
                # Continuous admission: every batch is handed over at once (its rows join the
                # running batch; the engine queues rows beyond its slots) and awaited without
                # a thread, so the running batch can hold every chain in flight.
                fn, inflight = step_batch_fn(self.engine), MAX_HANDED_BATCHES
            self._batchers[method] = DynamicBatcher(fn, b.max_batch_size, b.max_wait_ms, max_inflight=inflight)
        return self._batchers[method]

    # ---- served methods -------------------------------------------------------------
    async def generate_step(self, req):
        """Decode one step (StepRequest -> StepOutput), batched with concurrent requests."""
        return await self._batcher("generate_step", self.engine and self.engine.generate_steps).submit(req)

    async def score(self, req) -> float:
        """PRM score of the last step of a PRMRequest, batched."""
        return await self._batcher("score", self.prm and self.prm.score).submit(req)

    async def predict(self, req) -> float:
        """Router probability for a RouterRequest, batched."""
        return await self._batcher("predict", self.router and self.router.predict).submit(req)

    # ---- introspection --------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """Readiness and placement: role, node id, pid, what is served."""
        served = [
            name
            for name, obj in (("generate_step", self.engine), ("score", self.prm), ("predict", self.router))
            if obj is not None
        ]
        device = str(getattr(self.engine, "device", "cpu")) if self.engine is not None else None  # llama.cpp: cpu
        return {
            "role": self.role,
            "ready": True,
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "methods": served,
            "device": device,
            "load_s": self.load_s,
            "gpu_ids": ray.get_runtime_context().get_accelerator_ids().get("GPU", []),
        }

    def stats(self) -> dict[str, Any]:
        """Per-method batch-size histograms and busy time, the model's forward calls (arbitrage.service)."""
        return service_stats(
            self.role,
            {name: b.stats() for name, b in self._batchers.items()},
            forward_calls=sum(getattr(o, "forward_calls", 0) for o in (self.engine, self.prm, self.router) if o),
            engine=getattr(self.engine, "stats", None),
            node_id=ray.get_runtime_context().get_node_id(),
        )


def actor_options(role: str, cfg: ArbitrageConfig, name: str | None = None) -> dict[str, Any]:
    """Ray actor options for one role from its ActorConfig.

    Args:
        role: draft, target, prm or router.
        cfg: the whole config; only `runtime.<role>` is read.
        name: optional actor name (named actors can be looked up with `ray.get_actor`).
    Returns:
        Keyword arguments for `ray.remote(ModelActor).options(...)`.
    """
    a: ActorConfig = getattr(cfg.runtime, role)
    opts: dict[str, Any] = dict(
        num_cpus=a.num_cpus,
        num_gpus=a.num_gpus,
        max_restarts=a.max_restarts,
        max_task_retries=MAX_TASK_RETRIES,
        max_concurrency=MAX_CONCURRENCY,
    )
    if a.resources:
        opts["resources"] = dict(a.resources)
    if a.label_selector:  # Ray >= 2.49 schedules on node labels (`ray start --labels`)
        opts["label_selector"] = dict(a.label_selector)
    if name is not None:
        opts["name"] = name
    return opts


def make_model_actor(role: str, cfg: ArbitrageConfig | dict, name: str | None = None) -> list:
    """Create `runtime.<role>.replicas` ModelActors for one role (not yet waited on).

    Args:
        role: draft, target, prm or router.
        cfg: the config (or its dict).
        name: base actor name; replicas get "-<i>" appended.
    Returns:
        The actor handles, one per replica (the backend round-robins over them).
    """
    cfg = as_config(cfg)
    check_role(role)
    replicas = getattr(cfg.runtime, role).replicas
    data = cfg.model_dump()
    remote_cls = ray.remote(ModelActor)
    handles = []
    for i in range(replicas):
        actor_name = None if name is None else (name if replicas == 1 else f"{name}-{i}")
        handles.append(remote_cls.options(**actor_options(role, cfg, actor_name)).remote(role, data))
    return handles
