"""The service contract: what every model server answers, and the one shape of its stats.

A *model service* serves one role of the step loop. Five kinds implement it: `ModelActor`
(a Ray actor, or a Serve replica as `cluster.serve_models.ServedModel`), the tensor-parallel
target (`actors.target_group.TargetGroup`, `TargetGroupHost`, and the Serve replica
`TargetGroupServer`), one role of the colocated actor (`actors.colocated_actor.RoleView`) and
the coordinator's in-process router copy (`arbitrage.router_factory.InProcessRouter`).
`actors.backend.RayBackend` calls only the names of `ModelService`; a method a service
does not serve raises, naming it (a draft actor has no `score`; `PartialService` is the base
of the services that serve one method).

`stats()` returns one schema, built by `service_stats`, whatever the service:

    {"role": "target",                        # the role it serves
     "methods": {"generate_step": {"batch_sizes": {8: 3}, "busy_s": 1.2, "isolated": 0}},
     "busy_s": 1.2,                            # summed over methods
     "forward_calls": 42,                      # model forward passes
     "engine": {...},                          # the engine's own counters ({} if none)
     ...}                                      # extras: node_id, ranks, epoch, layout, in_process

so `merge_role_stats` and the Serve metrics read every kind the same way.
"""

from __future__ import annotations

from typing import Any, Awaitable, Protocol, runtime_checkable

from arbitrage.types import StepOutput, StepRequest

STATS_KEYS = ("role", "methods", "busy_s", "forward_calls", "engine")
METHOD_STATS_KEYS = ("batch_sizes", "busy_s")


@runtime_checkable
class ModelService(Protocol):
    """One role's model behind batched methods (any of them may be async; callers await results)."""

    def generate_step(self, req: StepRequest) -> Awaitable[StepOutput]:
        """Decode one step (draft or target)."""
        ...

    def score(self, req: Any) -> Awaitable[float]:
        """PRM score in [0, 1] of the last step of a PRMRequest."""
        ...

    def predict(self, req: Any) -> Awaitable[float]:
        """Router probability for a RouterRequest."""
        ...

    def health(self) -> dict[str, Any] | Awaitable[dict[str, Any]]:
        """Readiness: at least {"role": ..., "ready": bool}."""
        ...

    def stats(self) -> dict[str, Any] | Awaitable[dict[str, Any]]:
        """The schema of `service_stats`."""
        ...


class PartialService:
    """Base of a service that serves some of the contract's methods: the others raise, naming them.

    Subclasses set `role` and override what they serve (a tensor-parallel target serves
    `generate_step` only, the in-process router `predict` only).
    """

    role: str = "model"

    def _unserved(self, method: str) -> RuntimeError:
        return RuntimeError(f"the {self.role} service does not serve {method!r}")

    async def generate_step(self, req: StepRequest) -> StepOutput:
        raise self._unserved("generate_step")

    async def score(self, req: Any) -> float:
        raise self._unserved("score")

    async def predict(self, req: Any) -> float:
        raise self._unserved("predict")


def method_stats(batch_sizes: dict[int, int] | None = None, busy_s: float = 0.0, isolated: int = 0) -> dict[str, Any]:
    """One method's batch-size histogram (size -> batches), busy seconds and isolated failures."""
    return {"batch_sizes": dict(sorted((batch_sizes or {}).items())), "busy_s": float(busy_s), "isolated": isolated}


def service_stats(
    role: str,
    methods: dict[str, dict[str, Any]],
    forward_calls: int = 0,
    engine: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A service's stats in the one schema (module docstring).

    Args:
        role: the role served.
        methods: method name -> `method_stats` (a `DynamicBatcher.stats()` has that shape).
        forward_calls: model forward passes so far.
        engine: the engine's own counters (prefill and reused tokens, ...).
        extra: further keys (node_id, ranks, epoch, layout, in_process); they may not shadow the schema's.
    """
    clash = set(extra) & set(STATS_KEYS)
    if clash:
        raise ValueError(f"extra stats keys {sorted(clash)} shadow the schema's")
    _check_methods(methods)
    return {
        "role": role,
        "methods": {name: dict(m) for name, m in methods.items()},
        "busy_s": float(sum(m["busy_s"] for m in methods.values())),
        "forward_calls": int(forward_calls),
        "engine": dict(engine or {}),
        **extra,
    }


def check_service_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """`stats`, or ValueError naming what does not follow the schema (tests, merge_role_stats)."""
    missing = [k for k in STATS_KEYS if k not in stats]
    if missing:
        raise ValueError(f"service stats lack {missing}: {sorted(stats)}")
    _check_methods(stats["methods"])
    return stats


def _check_methods(methods: dict[str, dict[str, Any]]) -> None:
    for name, m in methods.items():
        lack = [k for k in METHOD_STATS_KEYS if k not in m]
        if lack:
            raise ValueError(f"stats of method {name!r} lack {lack}")
