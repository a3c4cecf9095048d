"""In-process execution of many chains: the core loop over a `LocalBackend`, no Ray.

Used by tests, by `arbitrage run --in-process`, and as the reference a distributed
run is compared against. The loop itself lives in `arbitrage.loop`.
"""

from __future__ import annotations

import asyncio
from typing import Callable, Iterable

from arbitrage.backend import LocalBackend, ModelBackend
from arbitrage.loop import ChainInput, LoopSettings, run_chains
from arbitrage.policies import make_policy
from arbitrage.roles import roles_for


def as_input(item) -> ChainInput:
    """A ChainInput from a dict, a data.Problem or a ChainInput."""
    if isinstance(item, ChainInput):
        return item
    if isinstance(item, dict):
        return ChainInput(id=str(item["id"]), problem=item["problem"], answer=item.get("answer"))
    return ChainInput(id=str(item.id), problem=item.problem, answer=getattr(item, "answer", None))


def run_in_process(
    cfg,
    items: Iterable,
    policy: str | None = None,
    threshold: float | None = None,
    backend: ModelBackend | None = None,
    on_result: Callable[[dict], None] | None = None,
    on_step: Callable | None = None,
) -> list[dict]:
    """Run items through the core loop in this process.

    Args:
        cfg: an ArbitrageConfig.
        items: problems (dicts with id/problem/answer, Problems or ChainInputs).
        policy, threshold: override the config's policy.
        backend: reuse loaded models; by default the config's models are loaded.
        on_result: called with each finished chain's dict.
        on_step: called with each decided step (a TraceStep) of any chain.
    Returns:
        Result dicts in input order.
    """
    name = policy or cfg.policy.name
    tau = cfg.policy.threshold if threshold is None else threshold
    backend = backend or LocalBackend.from_config(cfg, roles=roles_for(name, cfg))
    pol = make_policy(name, tau, seed=cfg.generation.seed)
    settings = LoopSettings.from_config(cfg)

    def cb(res):
        if on_result is not None:
            on_result(res.to_dict())

    results = asyncio.run(
        run_chains(
            [as_input(i) for i in items],
            backend,
            pol,
            settings,
            max_concurrent=cfg.runtime.max_concurrent_chains,
            timeout_s=cfg.runtime.chain_timeout_s,
            on_result=cb,
            on_step=on_step,
        )
    )
    return [r.to_dict() for r in results]
