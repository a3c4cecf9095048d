"""The model deployments of the Serve app: one role's model per replica, with metrics for the hub.

`ServedModel` is `actors.model_actor.ModelActor` (dynamic batching inside each replica);
`TargetGroupServer` is one whole tensor-parallel target group per replica, so the target
deployment scales by whole groups. Both answer the `arbitrage.service.ModelService` methods.
`ServedColocated` is `actors.colocated_actor.ColocatedActor` (every role in one replica, the
fast engines on one scheduler thread: the layout for roles that share one GPU); the coordinator
reaches its roles through `actors.colocated_actor.RoleView`s over its deployment handle.
"""

from __future__ import annotations

import asyncio
import logging

from actors.colocated_actor import ColocatedActor
from actors.model_actor import ModelActor
from arbitrage.service import PartialService
from cluster.serve_metrics import MetricSet, Pusher

logger = logging.getLogger("ray.serve")


METHOD_ROLE = {"score": "prm", "predict": "router"}  # generate_step: the replica's own role


def batch_metrics(
    role: str, methods: dict[str, dict], queues: dict[str, int] | None = None, into: MetricSet | None = None
) -> dict:
    """A model replica's metric snapshot from its per-method batcher stats (added to `into`)."""
    m = MetricSet() if into is None else into
    for method, st in methods.items():
        labels = {"role": METHOD_ROLE.get(method, role), "method": method}
        m.set_hist("batch_size", {int(k): int(v) for k, v in st.get("batch_sizes", {}).items()}, **labels)
        m.inc("batch_isolations", st.get("isolated", 0), **labels)
        if queues is not None:
            m.set("batch_queue_depth", queues.get(method, 0), **labels)
    return m.snapshot()


def _batcher_metrics(server: ModelActor, into: MetricSet | None = None) -> dict:
    """`batch_metrics` of one ModelActor's batchers."""
    methods = {name: b.stats() for name, b in server._batchers.items()}
    queues = {name: b.queued() for name, b in server._batchers.items()}
    return batch_metrics(server.role, methods, queues, into)


class ServedModel(ModelActor):
    """`ModelActor` as a Serve deployment: the same batched methods, plus metrics for the hub."""

    def __init__(self, role: str, cfg: dict, metrics=None):
        super().__init__(role, cfg)
        self._pusher = Pusher(metrics, self._metrics_snapshot)

    async def generate_step(self, req):
        self._pusher.ensure_started()
        return await super().generate_step(req)

    async def score(self, req) -> float:
        self._pusher.ensure_started()
        return await super().score(req)

    async def predict(self, req) -> float:
        self._pusher.ensure_started()
        return await super().predict(req)

    def _metrics_snapshot(self) -> dict:
        return _batcher_metrics(self)


class ServedColocated(ColocatedActor):
    """`ColocatedActor` as a Serve deployment: every role in one replica, plus metrics for the hub
    (each role's batchers under its own `role` label)."""

    def __init__(self, cfg: dict, metrics=None):
        super().__init__(cfg)
        self._pusher = Pusher(metrics, self._metrics_snapshot)

    async def call(self, role: str, method: str, *args):
        self._pusher.ensure_started()
        return await super().call(role, method, *args)

    def _metrics_snapshot(self) -> dict:
        m = MetricSet()
        for server in self.roles.values():
            _batcher_metrics(server, m)
        return m.snapshot()


class TargetGroupServer(PartialService):
    """A tensor-parallel target (`actors.target_group.TargetGroupHost`) behind one Serve replica.

    One replica is one whole group, so autoscaling the target deployment adds or removes whole
    groups. The host restarts the whole group when a rank dies (and a watchdog does so while idle).
    """

    role = "target"

    def __init__(self, cfg: dict, metrics=None):
        from actors.target_group import TargetGroupHost  # lazy: DeepSpeed / torch.distributed

        self.host = TargetGroupHost(cfg)
        self._stats: dict = {}
        self._pusher = Pusher(metrics, lambda: batch_metrics("target", self._stats.get("methods", {})))

    async def generate_step(self, req):
        """Decode one step on every rank (StepRequest -> StepOutput)."""
        if self._pusher.hub is not None and (self._pusher._task is None or self._pusher._task.done()):
            self._pusher.ensure_started()
            asyncio.get_running_loop().create_task(self._refresh_stats())
        return await self.host.generate_step(req)

    async def _refresh_stats(self) -> None:
        while True:
            try:
                self._stats = await self.host.stats()
            except Exception as e:  # a group restarting: keep the last figures
                logger.debug("target group stats: %s", e)
            await asyncio.sleep(1.0)

    async def health(self) -> dict:
        """The group's health (its ranks' readiness, epoch and restarts)."""
        return await self.host.health()

    async def stats(self) -> dict:
        """The group's batch statistics."""
        return await self.host.stats()

    def __del__(self):
        try:
            self.host.shutdown()
        except Exception:  # best effort: its ranks may already be gone
            pass
