"""Prometheus metrics of the Serve app, served as text at `GET /metrics` on the app's own port.

Every replica that has something to count (ingress, coordinator, model roles) keeps a
`MetricSet` of cumulative counters, histograms and gauges, and a `Pusher` sends its snapshot
to the one `MetricsHub` replica every `PUSH_PERIOD_S` (and the ingress that answers a scrape
sends its own first). The hub keeps each replica's latest snapshot and sums them: counters
and histograms over every replica it ever heard from (a replaced replica's counts stay, so
totals never go down), gauges over the replicas heard from within `GAUGE_TTL_S`. It renders
them with `prometheus_client`. Snapshots are cumulative, so a lost push or a restarted hub
loses nothing that the next push does not carry again (a restarted hub forgets replicas
that died before it).

What is measured (all names start with `arbitrage_`):

| metric | type | labels | where |
| --- | --- | --- | --- |
| requests_total | counter | endpoint, status | ingress: every HTTP answer of /v1/* |
| request_duration_seconds | histogram | endpoint | ingress: until the last byte (streams too) |
| requests_in_flight | gauge | | ingress: requests holding a slot |
| request_slots | gauge | | ingress: `serve.max_queued_requests` per replica |
| chains_total | counter | policy, stop_reason | ingress: every chain result |
| chain_duration_seconds | histogram | policy | the chain's time in the coordinator |
| step_duration_seconds | histogram | author | each decided step |
| steps_total | counter | author | kept steps, by the model that wrote them |
| escalations_total, wasted_escalations_total | counter | | steps the target regenerated; of those, not better |
| draft_tokens_total, target_tokens_total | counter | | tokens generated (rejected draft steps included) |
| accepted_draft_tokens_total | counter | | draft tokens kept (acceptance = this / draft_tokens_total) |
| chain_acceptance | histogram | | per chain: share of steps kept from the draft |
| prompt_tokens_total, completion_tokens_total | counter | | as in `usage` |
| model_calls_total | counter | role | draft / target / prm / router calls of the chains |
| router_probability | histogram | | each router P(target better) |
| chains_in_flight, chains_waiting | gauge | | coordinator: chains running or queued; queued for a slot |
| step_retries_total | counter | | coordinator: model calls re-sent after a replica loss |
| batch_size | histogram | role, method | model replicas: requests per batched forward |
| batch_queue_depth | gauge | role, method | model replicas: requests waiting for a batch |
| batch_isolations_total | counter | role, method | failed batches split to isolate a bad request |
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, Callable

logger = logging.getLogger("ray.serve")

PUSH_PERIOD_S = 1.0
PUSH_TIMEOUT_S = 5.0
GAUGE_TTL_S = 15.0
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
UNIT_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# name (without arbitrage_) -> (type, help, histogram buckets)
METRICS: dict[str, tuple[str, str, tuple | None]] = {
    "requests": ("counter", "HTTP answers of /v1/*, by endpoint and status.", None),
    "request_duration_seconds": ("histogram", "Time to the last byte of a /v1/* answer.", LATENCY_BUCKETS),
    "requests_in_flight": ("gauge", "Requests holding an ingress slot.", None),
    "request_slots": ("gauge", "Ingress slots (serve.max_queued_requests per replica).", None),
    "chains": ("counter", "Chains finished, by policy and stop reason.", None),
    "chain_duration_seconds": ("histogram", "Seconds a chain took in the coordinator.", LATENCY_BUCKETS),
    "step_duration_seconds": ("histogram", "Seconds to decide one step.", STEP_BUCKETS),
    "steps": ("counter", "Kept steps, by the model that wrote them.", None),
    "escalations": ("counter", "Steps the target regenerated.", None),
    "wasted_escalations": ("counter", "Escalations whose target step did not score higher.", None),
    "draft_tokens": ("counter", "Tokens the draft generated (rejected steps included).", None),
    "target_tokens": ("counter", "Tokens the target generated.", None),
    "accepted_draft_tokens": ("counter", "Draft tokens kept in the answer.", None),
    "chain_acceptance": ("histogram", "Per chain, the share of steps kept from the draft.", UNIT_BUCKETS),
    "prompt_tokens": ("counter", "Prompt tokens of answered chains.", None),
    "completion_tokens": ("counter", "Completion tokens of answered chains.", None),
    "model_calls": ("counter", "Model calls made by chains, by role.", None),
    "router_probability": ("histogram", "Router P(target better) of each routed step.", UNIT_BUCKETS),
    "chains_in_flight": ("gauge", "Chains running or queued in the coordinators.", None),
    "chains_waiting": ("gauge", "Chains queued for a coordinator slot.", None),
    "step_retries": ("counter", "Model calls re-sent after a replica was lost.", None),
    "batch_size": ("histogram", "Requests per batched model call.", BATCH_BUCKETS),
    "batch_queue_depth": ("gauge", "Requests waiting for a batch in a model replica.", None),
    "batch_isolations": ("counter", "Failed batches split to isolate the request at fault.", None),
}

Labels = tuple[tuple[str, str], ...]


def _labels(labels: dict[str, Any] | None) -> Labels:
    return tuple(sorted((k, str(v)) for k, v in (labels or {}).items()))


class MetricSet:
    """Cumulative counters, histograms and gauges of one replica (a plain, picklable snapshot)."""

    def __init__(self):
        self.counters: dict[tuple[str, Labels], float] = {}
        self.hists: dict[tuple[str, Labels], list] = {}  # [per-bucket counts (+Inf last), sum]
        self.gauges: dict[tuple[str, Labels], float] = {}

    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        key = (name, _labels(labels))
        self.counters[key] = self.counters.get(key, 0.0) + float(value)

    def observe(self, name: str, value: float, count: int = 1, **labels) -> None:
        buckets = METRICS[name][2]
        key = (name, _labels(labels))
        h = self.hists.setdefault(key, [[0] * (len(buckets) + 1), 0.0])
        i = next((i for i, b in enumerate(buckets) if value <= b), len(buckets))
        h[0][i] += count
        h[1] += float(value) * count

    def set_hist(self, name: str, counts: dict[float, int], **labels) -> None:
        """Replace a histogram by one built from exact value counts (e.g. a batch-size Counter)."""
        key = (name, _labels(labels))
        self.hists.pop(key, None)
        for value, n in counts.items():
            self.observe(name, float(value), int(n), **labels)

    def set(self, name: str, value: float, **labels) -> None:
        self.gauges[(name, _labels(labels))] = float(value)

    def snapshot(self) -> dict:
        return {
            "counters": dict(self.counters),
            "hists": {k: [list(v[0]), v[1]] for k, v in self.hists.items()},
            "gauges": dict(self.gauges),
        }


def replica_source() -> str:
    """A name for this replica's snapshots: Serve's replica id, else a random one."""
    try:
        from ray import serve

        ctx = serve.get_replica_context()
        return f"{ctx.deployment}#{ctx.replica_id.unique_id}"
    except Exception:  # not in a Serve replica (tests, local runs)
        return uuid.uuid4().hex


class Pusher:
    """Sends `snapshot()` to the hub every PUSH_PERIOD_S from a task on this replica's event loop."""

    def __init__(self, hub, snapshot: Callable[[], dict]):
        self.hub, self._snapshot = hub, snapshot
        self.source = replica_source()
        self._task: asyncio.Task | None = None

    def ensure_started(self) -> None:
        """Start the background task (call from the replica's event loop; a no-op without a hub)."""
        if self.hub is None or (self._task is not None and not self._task.done()):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._task = loop.create_task(self._run())

    async def push(self) -> None:
        if self.hub is not None:
            await asyncio.wait_for(self.hub.push.remote(self.source, self._snapshot()), PUSH_TIMEOUT_S)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(PUSH_PERIOD_S)
            try:
                await self.push()
            except Exception as e:  # the hub is down or restarting: the next push carries the totals again
                logger.debug("metrics push from %s failed: %s", self.source, e)


class MetricsHub:
    """The Serve deployment (one replica) that merges replicas' snapshots and renders Prometheus text."""

    def __init__(self):
        self._sources: dict[str, tuple[float, dict]] = {}

    def push(self, source: str, snapshot: dict) -> None:
        self._sources[source] = (time.monotonic(), snapshot)

    def merged(self) -> dict:
        now = time.monotonic()
        counters: dict = {}
        hists: dict = {}
        gauges: dict = {}
        for at, snap in self._sources.values():
            for k, v in snap["counters"].items():
                counters[k] = counters.get(k, 0.0) + v
            for k, (counts, total) in snap["hists"].items():
                h = hists.setdefault(k, [[0] * len(counts), 0.0])
                h[0] = [a + b for a, b in zip(h[0], counts)]
                h[1] += total
            if now - at <= GAUGE_TTL_S:
                for k, v in snap["gauges"].items():
                    gauges[k] = gauges.get(k, 0.0) + v
        return {"counters": counters, "hists": hists, "gauges": gauges}

    def render(self) -> str:
        return render(self.merged())


def render(merged: dict) -> str:
    """Prometheus text exposition (format 0.0.4) of merged snapshots; every metric is declared."""
    from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
    from prometheus_client.exposition import generate_latest

    def by_name(table: dict) -> dict[str, list]:
        out: dict[str, list] = {}
        for (name, labels), v in sorted(table.items()):
            out.setdefault(name, []).append((labels, v))
        return out

    counters, hists, gauges = (by_name(merged[k]) for k in ("counters", "hists", "gauges"))

    class Collector:
        def collect(self):
            for name, (kind, doc, buckets) in METRICS.items():
                full = f"arbitrage_{name}"
                if kind == "counter":
                    rows = counters.get(name, [])
                    fam = CounterMetricFamily(full, doc, labels=_names(rows))
                    for labels, v in rows:
                        fam.add_metric([v for _, v in labels], v)
                elif kind == "gauge":
                    rows = gauges.get(name, [])
                    fam = GaugeMetricFamily(full, doc, labels=_names(rows))
                    for labels, v in rows:
                        fam.add_metric([v for _, v in labels], v)
                else:
                    rows = hists.get(name, [])
                    fam = HistogramMetricFamily(full, doc, labels=_names(rows))
                    for labels, (counts, total) in rows:
                        cum, acc = [], 0
                        for b, n in zip(list(buckets) + ["+Inf"], counts):
                            acc += n
                            cum.append((b if b == "+Inf" else _le(b), acc))
                        fam.add_metric([v for _, v in labels], cum, total)
                yield fam

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())
    return generate_latest(registry).decode()


def _names(rows: list) -> list[str]:
    return [k for k, _ in rows[0][0]] if rows else []


def _le(b: float) -> str:
    return f"{float(b):g}" if float(b) != int(b) else f"{float(b):.1f}"
