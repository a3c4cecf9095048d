"""Model backends: what the step loop awaits to get steps, PRM scores and router probabilities.

The loop talks to a `ModelBackend`, never to Ray. `LocalBackend` runs the core
engines in-process behind dynamic batchers (tests, single-machine runs); the Ray
runtime provides `actors.backend.RayBackend`, which awaits actor handles instead
(the uni / ray executor split of vLLM).
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any

from arbitrage.batching import DynamicBatcher
from arbitrage.engine_base import step_batch_fn
from arbitrage.roles import ROLES
from arbitrage.types import StepOutput, StepRequest

if TYPE_CHECKING:
    from arbitrage.prm import PRMRequest
    from arbitrage.router import RouterRequest
    from arbitrage.step_cache import StepCache


class ModelBackend(abc.ABC):
    """Async access to the four roles; each call is one chain's single request."""

    @abc.abstractmethod
    async def draft_step(self, req: StepRequest) -> StepOutput:
        """Decode one step with the draft model."""

    @abc.abstractmethod
    async def target_step(self, req: StepRequest) -> StepOutput:
        """Decode one step with the target model."""

    @abc.abstractmethod
    async def prm_score(self, req: PRMRequest) -> float:
        """PRM score in [0, 1] of the last step of `req`."""

    @abc.abstractmethod
    async def router_prob(self, req: RouterRequest) -> float:
        """P(target step scores higher than the candidate draft step)."""

    def stats(self) -> dict[str, Any]:
        """Batch-size histograms and busy time per role (for tests and metrics)."""
        return {}

    def step_cache(self) -> "StepCache":
        """This backend's step cache (created on first use; see `arbitrage.step_cache`)."""
        cache = getattr(self, "_step_cache", None)
        if cache is None:
            from arbitrage.step_cache import StepCache

            cache = self._step_cache = StepCache()
        return cache


CONTINUOUS_INFLIGHT = 64  # batches handed to a continuous engine at once (each joins its running batch)


class LocalBackend(ModelBackend):
    """In-process engines, PRM and router, each behind a dynamic batcher."""

    def __init__(
        self, draft=None, target=None, prm=None, router=None, max_batch_size: int = 16, max_wait_ms: float = 5.0
    ):
        self.draft, self.target, self.prm, self.router = draft, target, prm, router
        fns = {
            "draft": draft and step_batch_fn(draft),
            "target": target and step_batch_fn(target),
            "prm": prm and prm.score,
            "router": router and router.predict,
        }
        engines = {"draft": draft, "target": target}
        self.batchers = {
            role: DynamicBatcher(
                fn,
                max_batch_size,
                max_wait_ms,
                max_inflight=CONTINUOUS_INFLIGHT if getattr(engines.get(role), "continuous", False) else 1,
            )
            for role, fn in fns.items()
            if fn is not None
        }

    @classmethod
    def from_config(cls, cfg, roles: tuple[str, ...] = ROLES) -> "LocalBackend":
        """Load the configured models for `roles` (an ArbitrageConfig)."""
        from arbitrage.models import load_engine
        from arbitrage.prm import build_prm
        from arbitrage.router_factory import build_router

        m = cfg.models
        draft = load_engine(m.draft) if "draft" in roles else None
        target = load_engine(m.target) if "target" in roles else None
        prm = build_prm(m.prm, target_engine=target, prompt=cfg.prompt) if m.prm and "prm" in roles else None
        router = build_router(m.router) if m.router and "router" in roles else None
        b = cfg.runtime.draft.batching
        return cls(draft, target, prm, router, b.max_batch_size, b.max_wait_ms)

    def _batcher(self, role: str) -> DynamicBatcher:
        if role not in self.batchers:
            raise RuntimeError(f"the {role} model is not loaded in this backend; configure models.{role}")
        return self.batchers[role]

    async def draft_step(self, req: StepRequest) -> StepOutput:
        return await self._batcher("draft").submit(req)

    async def target_step(self, req: StepRequest) -> StepOutput:
        return await self._batcher("target").submit(req)

    async def prm_score(self, req: PRMRequest) -> float:
        return await self._batcher("prm").submit(req)

    async def router_prob(self, req: RouterRequest) -> float:
        return await self._batcher("router").submit(req)

    def stats(self) -> dict[str, Any]:
        return {role: b.stats() for role, b in self.batchers.items()}
