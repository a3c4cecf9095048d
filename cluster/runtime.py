"""Bring-up of the distributed runtime from one config: Ray, model actors, coordinators.

`Runtime(cfg).start()` joins the Ray cluster at `runtime.address` (or starts a local Ray
with `runtime.num_cpus` CPUs; an already initialised Ray is reused), creates the actors
of every configured role (draft, target, prm, router) with the resources and placement
of `runtime.<role>`, waits until each answers `health()` (a role that fails to load
raises an error naming it), then creates `runtime.coordinators` Coordinator actors.
`run()` spreads problems over the coordinators and hands each result to a callback as it
finishes. `shutdown()` kills what `start()` created. Use it as a context manager:

    with Runtime(load_config("configs/tiny.yaml")) as rt:
        rows = rt.run(problems, policy="router", threshold=0.5)
        print(summarize(rows))          # arbitrage.metrics.summarize

Placement (`runtime.layout: colocated`: one `actors.colocated_actor.ColocatedActor` serves every
role instead, its fast engines on one scheduler thread). Otherwise the target is one ModelActor when `runtime.target.tensor_parallel == 1`, else
an `actors.target_group.TargetGroupHost` actor owning a `TargetGroup` (N rank actors in one
placement group), which restarts the whole group when a rank dies. A judge
PRM with `reuse_target` is served by the target actor itself (no second copy of the
weights); with a tensor-parallel target that cannot score, a separate PRM actor loads
the judge from `models.prm.source`. A probe router (`models.router.kind: probe`) has no
model, so it gets no actor: each coordinator asks its own `arbitrage.router_factory.InProcessRouter`
(no RPC per step).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterable

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from actors.backend import RayBackend, call_handle_sync
from actors.coordinator import make_coordinator
from actors.model_actor import as_config, make_model_actor, prm_on_target
from arbitrage.roles import configured_roles
from arbitrage.router import MODEL_FREE_ROUTERS
from arbitrage.router_factory import InProcessRouter
from arbitrage.runner import as_input
from configs.schema import ArbitrageConfig, load_config

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class RuntimeStartError(RuntimeError):
    """A role's actors did not come up; the message names the role and the cause."""


def _first_line(err: BaseException) -> str:
    """The most specific line of a (possibly remote) error: the last 'Type: message' line."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if ":" in ln and head.replace(".", "").isidentifier() and head.split(".")[-1][:1].isupper():
            return ln
    return lines[-1] if lines else type(err).__name__


class Runtime:
    """The Ray actors of one config, the coordinators that drive them, and their teardown."""

    def __init__(self, cfg: ArbitrageConfig | dict | str | Path, ready_timeout_s: float = 600.0):
        self.cfg = load_config(cfg) if isinstance(cfg, (str, Path)) else as_config(cfg)
        self.ready_timeout_s = ready_timeout_s
        self.handles: dict[str, list] = {}
        self.coordinators: list = []
        self._owned: list[tuple[str, Any]] = []  # (role, actor handle) created here
        self._group = None  # TargetGroupHost actor when tensor_parallel > 1
        self._owns_ray = False
        self._started = False
        self.resubmitted: list[dict[str, Any]] = []  # chains re-run after their coordinator died

    # ---- bring-up -----------------------------------------------------------------------
    def start(self) -> "Runtime":
        """Connect or start Ray, create every role's actors, wait until ready, create coordinators."""
        if self._started:
            return self
        from arbitrage.memory_plan import check as check_memory_plan

        check_memory_plan(self.cfg)  # a role that cannot fit its GPU: one line, before anything starts
        self._init_ray()
        try:
            self._create_model_actors()
            self._wait_ready()
            self._create_coordinators()
        except BaseException:
            self.shutdown()
            raise
        self._started = True
        return self

    def _init_ray(self) -> None:
        if ray.is_initialized():
            return
        rt = self.cfg.runtime
        if rt.address is not None:
            ray.init(address=rt.address)
        else:  # workers import the project from its root when it is not pip-installed
            ray.init(
                num_cpus=rt.num_cpus,
                include_dashboard=False,
                runtime_env={"env_vars": {"PYTHONPATH": str(PROJECT_ROOT)}},
            )
        self._owns_ray = True

    def _create_model_actors(self) -> None:
        """Actors of every configured role; a TP target group last (its create() blocks until loaded)."""
        roles = configured_roles(self.cfg)
        if self.cfg.runtime.placement() == "colocated":  # every role in one actor (actors/colocated_actor.py)
            from actors.colocated_actor import make_colocated_actor

            actor, views = make_colocated_actor(self.cfg)
            self._owned.append(("target", actor))  # its resources are reported as the target's
            self.handles.update(views)
            return
        as_group = self.cfg.runtime.target.tensor_parallel > 1
        prm_rides = "prm" in roles and self._prm_rides_on_target(as_group)
        for role in roles:
            if (role == "target" and as_group) or (role == "prm" and prm_rides):
                continue
            if role == "router" and self.cfg.models.router.kind in MODEL_FREE_ROUTERS:
                self.handles[role] = [InProcessRouter(self.cfg.models.router)]  # inside each coordinator
                continue
            hs = make_model_actor(role, self.cfg)
            self.handles[role] = hs
            self._owned += [(role, h) for h in hs]
        if as_group:
            self._create_target_group()
        if prm_rides:
            self.handles["prm"] = list(self.handles["target"])

    def _prm_rides_on_target(self, as_group: bool) -> bool:
        """A judge PRM reusing the target is served by the target actor; a TP group does not
        score, so beside one the judge gets a PRM actor of its own (`ModelActor` role prm)."""
        return prm_on_target(self.cfg) and not as_group

    def _create_target_group(self) -> None:
        from actors.target_group import make_target_group_actor  # lazy: DeepSpeed / torch.distributed

        self._group = make_target_group_actor(self.cfg, self.ready_timeout_s)
        try:  # the host's constructor starts the group and loads every rank's shard
            ray.get(self._group.health.remote(), timeout=self.ready_timeout_s + 60)
        except Exception as e:
            raise RuntimeStartError(f"target tensor-parallel group failed to start: {_first_line(e)}") from e
        self.handles["target"] = [self._group]

    def _wait_ready(self) -> None:
        """Wait for every actor's health(); raise naming the role that failed or timed out."""
        refs = {h.health.remote(): role for role, h in self._owned}
        deadline = time.monotonic() + self.ready_timeout_s
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                late = sorted(set(refs.values()), key=lambda r: not self._unplaceable(r))
                raise RuntimeStartError(
                    f"actors not ready after {self.ready_timeout_s:.0f}s: "
                    + ", ".join(f"{r} ({self._why_late(r)})" for r in late)
                    + "; check runtime.<role> resources against the cluster's node types, or wait longer"
                )
            role = refs.pop(ready[0])
            try:
                ray.get(ready[0])
            except Exception as e:
                raise RuntimeStartError(f"{role} actor failed to start: {_first_line(e)}") from e
        if self._group is not None:
            h = self._group_health()
            if not h["ready"]:
                raise RuntimeStartError(f"target tensor-parallel group is not healthy: {h}")

    def _group_health(self) -> dict[str, Any]:
        try:
            h = call_handle_sync(self._group, "health")
        except Exception as e:
            return {"role": "target", "ready": False, "error": _first_line(e)}
        return {"role": "target", "ready": bool(h.get("healthy", True)), **h}

    def _asks(self, role: str) -> dict[str, float]:
        a = getattr(self.cfg.runtime, role)
        asks = {"CPU": a.num_cpus, "GPU": a.num_gpus, **a.resources}
        return {k: v for k, v in asks.items() if v > 0}

    def _unplaceable(self, role: str) -> bool:
        """No live node can host one actor of this role right now (an autoscaler may add one)."""
        asks = self._asks(role)
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        return not any(all(res.get(k, 0) >= v for k, v in asks.items()) for res in nodes)

    def _why_late(self, role: str) -> str:
        if not self._unplaceable(role):
            return "still loading"
        offered = {k for n in ray.nodes() if n.get("Alive") for k in n["Resources"]}
        missing = sorted(set(self._asks(role)) - offered)
        where = f"no node offers {', '.join(missing)}" if missing else "no single node has enough free"
        return f"{where}; asks {self._asks(role)}"

    def _create_coordinators(self) -> None:
        self.coordinators = [make_coordinator(self.cfg, self.handles) for _ in range(self.cfg.runtime.coordinators)]
        try:
            ray.get([c.health.remote() for c in self.coordinators], timeout=self.ready_timeout_s)
        except Exception as e:
            raise RuntimeStartError(f"coordinator failed to start: {_first_line(e)}") from e

    # ---- running ------------------------------------------------------------------------
    def run(
        self,
        items: Iterable,
        policy: str | None = None,
        threshold: float | None = None,
        on_result: Callable[[dict], None] | None = None,
    ) -> list[dict]:
        """Solve problems on the coordinators (round-robin), streaming results back.

        Args:
            items: dicts with id/problem/answer, ChainInputs or data.Problems.
            policy, threshold: override the config's policy.
            on_result: called in this process with each result dict as soon as it finishes.
        Returns:
            `ChainResult.to_dict()` rows in input order.

        A coordinator that dies mid-run is restarted by Ray; the chains it had not returned
        run again on it (chains are deterministic, and each result is delivered once), up to
        `runtime.retry.attempts` tries; each resubmission is logged in `resubmitted`.
        """
        self._require_started()
        inputs = [as_input(i) for i in items]
        n = len(self.coordinators)
        pending: dict[int, tuple[Any, int, list[int], int]] = {}  # id -> (stream, coordinator, inputs, try)

        def submit(k: int, idxs: list[int], tries: int) -> None:
            # A restarting coordinator (max_restarts=-1) takes the call once it is back.
            gen = self.coordinators[k].stream.remote([inputs[i] for i in idxs], policy, threshold)
            pending[id(gen)] = (gen, k, idxs, tries)

        for k in range(n):
            idxs = list(range(k, len(inputs), n))
            if idxs:
                submit(k, idxs, 1)
        results: list[dict | None] = [None] * len(inputs)
        while pending:
            ready, _ = ray.wait([g for g, *_ in pending.values()], num_returns=1)
            gen, k, idxs, tries = pending.pop(id(ready[0]))
            try:
                local_i, row = ray.get(next(gen))
            except StopIteration:
                continue
            except RayActorError as e:  # the coordinator died: its unfinished chains run again
                lost = [i for i in idxs if results[i] is None]
                if tries >= self.cfg.runtime.retry.attempts:
                    raise RuntimeError(
                        f"coordinator {k} died {tries} times under this run; {len(lost)} "
                        f"chains unfinished: {_first_line(e)}"
                    ) from e
                self.resubmitted.append(
                    {"coordinator": k, "chains": len(lost), "try": tries + 1, "error": _first_line(e)}
                )
                self._await_restart(self.coordinators[k])
                submit(k, lost, tries + 1)
                continue
            results[idxs[local_i]] = row
            if on_result is not None:
                on_result(row)
            pending[id(gen)] = (gen, k, idxs, tries)
        return results  # type: ignore[return-value]

    def _await_restart(self, actor) -> None:
        """Block until a restarting actor answers `health` (within runtime.retry.restart_wait_s)."""
        deadline = time.monotonic() + self.cfg.runtime.retry.restart_wait_s
        while True:
            try:
                ray.get(actor.health.remote(), timeout=30)
                return
            except (ActorUnavailableError, ray.exceptions.GetTimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def cancel(self, chain_id: str) -> int:
        """Cancel in-flight chains with this id on every coordinator; returns how many."""
        self._require_started()
        return sum(ray.get([c.cancel.remote(chain_id) for c in self.coordinators]))

    # ---- introspection and teardown -----------------------------------------------------
    def health(self) -> dict[str, list[dict]]:
        """`health()` of every actor, by role, plus the coordinators."""
        self._require_started()
        out: dict[str, list[dict]] = {}
        for role, hs in self.handles.items():
            out[role] = [self._group_health() if h is self._group else call_handle_sync(h, "health") for h in hs]
        out["coordinators"] = ray.get([c.health.remote() for c in self.coordinators])
        return out

    def stats(self) -> dict[str, Any]:
        """Per-role batch histograms (summed over replicas) and each coordinator's chain counts."""
        self._require_started()
        coords = ray.get([c.stats.remote() for c in self.coordinators])
        return {
            "roles": RayBackend(self.handles).stats(),
            "coordinators": [{k: v for k, v in c.items() if k != "roles"} for c in coords],
        }

    def shutdown(self) -> None:
        """Kill the actors created here; shut Ray down only if this runtime started it."""
        for h in self.coordinators:
            _kill(h)
        for _, h in self._owned:
            _kill(h)
        if self._group is not None:
            try:
                ray.get(self._group.shutdown.remote(), timeout=60)
            except Exception:  # best effort: its ranks may already be gone
                pass
            _kill(self._group)
        self.coordinators, self._owned, self.handles, self._group = [], [], {}, None
        self._started = False
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False

    def _require_started(self) -> None:
        if not self._started:
            raise RuntimeError("the runtime is not started; call Runtime.start() or use `with Runtime(cfg) as rt:`")

    def __enter__(self) -> "Runtime":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _kill(handle) -> None:
    try:
        ray.kill(handle, no_restart=True)
    except Exception:  # already dead
        pass
