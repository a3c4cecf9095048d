"""The colocated layout: every model role in ONE Ray actor, fast engines on one scheduler.

`runtime.layout: colocated` (cluster/runtime.py) creates one `ColocatedActor` instead of an
actor per role. It loads the draft and target engines as `arbitrage.colocated.ColocatedEngine`s
on one `ColocatedScheduler` (one thread issues both engines' GPU work, each on a CUDA stream
of its own; the target's admission gate batches escalations, see `arbitrage.colocated.Gate`),
and the PRM and the router (a probe router still runs inside each coordinator) in the same
process. Each role is served exactly as a `ModelActor` serves it (same dynamic
batching, same methods), by a `ModelActor` object living inside this actor.

The step loop and the coordinator are unchanged: `RoleView(actor, role)` is the handle the
coordinator's `RayBackend` gets for each role; it forwards `generate_step` / `score` /
`predict` / `stats` / `health` to `ColocatedActor.call(role, method, ...)`. Faults behave as
with separate actors: Ray restarts the dead actor (all roles reload together) and
`RayBackend` re-sends the lost calls (a RayActorError surfaces through the view).

Resources: the actor asks for the roles' `num_cpus` summed and their `num_gpus` summed, at
most one GPU (the layout is for roles that share one GPU); `runtime.target.max_restarts`.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from typing import Any

import ray

from actors.model_actor import MAX_CONCURRENCY, MAX_TASK_RETRIES, ModelActor, as_config, prm_on_target
from arbitrage.router import MODEL_FREE_ROUTERS
from configs.schema import ArbitrageConfig


def colocated_roles(cfg: ArbitrageConfig) -> list[str]:
    """Roles the colocated actor serves: draft, target, the PRM unless the target hosts it
    (judge reusing the target), the router unless it is a probe (that runs in the coordinators)."""
    m = cfg.models
    roles = ["draft", "target"]
    if m.prm is not None and not prm_on_target(cfg):
        roles.append("prm")
    if m.router is not None and m.router.kind not in MODEL_FREE_ROUTERS:
        roles.append("router")
    return roles


class _RoleServer(ModelActor):
    """A ModelActor for one role whose draft / target engine was built by the colocated actor."""

    def __init__(self, role: str, cfg: ArbitrageConfig, engine=None):
        self._given_engine = engine
        super().__init__(role, cfg)

    def _load(self) -> None:
        if self._given_engine is None:  # PRM or router: loaded as a separate actor would
            return super()._load()
        self.engine = self._given_engine
        if self.role == "target" and prm_on_target(self.cfg):
            from arbitrage.prm import build_prm

            self.prm = build_prm(self.cfg.models.prm, target_engine=self.engine, prompt=self.cfg.prompt)


class ColocatedActor:
    """Draft, target, PRM and router of one config in one process (see the module docstring)."""

    def __init__(self, cfg: ArbitrageConfig | dict):
        from arbitrage.colocated import ColocatedScheduler, load_colocated_engines

        self.cfg = as_config(cfg)
        t0 = time.perf_counter()
        self.scheduler = ColocatedScheduler()
        m = self.cfg.models
        engines = load_colocated_engines({"draft": m.draft, "target": m.target}, self.scheduler)
        self.engines = engines
        self.roles: dict[str, ModelActor] = {
            role: _RoleServer(role, self.cfg, engines.get(role)) for role in colocated_roles(self.cfg)
        }
        self.load_s = time.perf_counter() - t0

    async def call(self, role: str, method: str, *args):
        """`method(*args)` of one role's server: generate_step, score, predict, stats, health."""
        server = self.roles.get(role)
        if server is None:
            raise RuntimeError(f"the colocated actor does not serve role {role!r}; it serves {sorted(self.roles)}")
        out = getattr(server, method)(*args)
        return await out if inspect.isawaitable(out) else out

    def health(self) -> dict[str, Any]:
        """Readiness of the whole actor: its roles, pid, node and GPUs."""
        h = self.roles["target"].health()
        return {**h, "role": "colocated", "roles": sorted(self.roles), "load_s": self.load_s}

    def stats(self) -> dict[str, Any]:
        """Every role's stats, the shared scheduler's turns / busy / idle seconds, the gates."""
        return {
            "roles": {r: s.stats() for r, s in self.roles.items()},
            "scheduler": dict(self.scheduler.stats),
            "gates": self.gates(),
        }

    def gates(self) -> dict[str, dict[str, float]]:
        """Admission gate of each colocated engine, by role."""
        return {r: dataclasses.asdict(e.gate) for r, e in self.engines.items() if hasattr(e, "gate")}

    def set_gates(self, gates: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        """Replace the admission gates of colocated engines by role ({"target": {"share": 0.3,
        "max_hold_s": 0.2}}); the next turn uses them. For benchmarks that sweep the policy."""
        from arbitrage.colocated import Gate

        for role, g in gates.items():
            self.engines[role].gate = Gate(**g)
        self.scheduler.wake()
        return self.gates()


class RoleView:
    """One role of a ColocatedActor (a Ray actor handle, or a Serve deployment handle of
    `cluster.serve_models.ServedColocated`) as a handle for RayBackend (async methods of the
    same names)."""

    def __init__(self, actor, role: str):
        self.actor, self.role = actor, role

    async def generate_step(self, req):
        return await self.actor.call.remote(self.role, "generate_step", req)

    async def score(self, req) -> float:
        return await self.actor.call.remote(self.role, "score", req)

    async def predict(self, req) -> float:
        return await self.actor.call.remote(self.role, "predict", req)

    async def stats(self) -> dict[str, Any]:
        s = await self.actor.call.remote(self.role, "stats")
        return {**s, "layout": "colocated"}

    async def health(self) -> dict[str, Any]:
        return await self.actor.call.remote(self.role, "health")


def colocated_options(cfg: ArbitrageConfig) -> dict[str, Any]:
    """Ray options of the colocated actor: the roles' CPUs summed, their GPUs summed (at most 1)."""
    rt = cfg.runtime
    roles = [getattr(rt, r) for r in colocated_roles(cfg)]
    opts: dict[str, Any] = dict(
        num_cpus=sum(a.num_cpus for a in roles),
        num_gpus=min(1.0, sum(a.num_gpus for a in roles)),
        max_restarts=rt.target.max_restarts,
        max_task_retries=MAX_TASK_RETRIES,
        max_concurrency=MAX_CONCURRENCY,
    )
    if rt.target.resources:
        opts["resources"] = dict(rt.target.resources)
    if rt.target.label_selector:
        opts["label_selector"] = dict(rt.target.label_selector)
    return opts


def role_views(cfg: ArbitrageConfig, handle) -> dict[str, list]:
    """The coordinator's handles for one colocated actor or Serve deployment (`handle`): a
    RoleView per role it serves, the target's view for a PRM hosted by the target, and an
    in-process router for a model-free (probe) one, which runs inside each coordinator."""
    views: dict[str, list] = {role: [RoleView(handle, role)] for role in colocated_roles(cfg)}
    if cfg.models.prm is not None and prm_on_target(cfg):
        views["prm"] = views["target"]
    router = cfg.models.router
    if router is not None and router.kind in MODEL_FREE_ROUTERS:
        from arbitrage.router_factory import InProcessRouter

        views["router"] = [InProcessRouter(router)]
    return views


def make_colocated_actor(cfg: ArbitrageConfig | dict) -> tuple[Any, dict[str, list]]:
    """Create the colocated actor (not yet waited on) and the coordinator's handles (`role_views`).

    Returns: (actor handle, role -> [handle]).
    """
    cfg = as_config(cfg)
    actor = ray.remote(ColocatedActor).options(**colocated_options(cfg)).remote(cfg.model_dump())
    return actor, role_views(cfg, actor)
