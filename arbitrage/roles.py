"""The model roles -- draft, target, prm, router -- in one place: their names, the service
method that answers each, and which roles a config provides or a policy needs.

A policy's needs come from its own declaration (`DecisionPolicy.required_roles`, derived
from its `needs_*` flags); nothing else keeps a table of them.
"""

from __future__ import annotations

from typing import Iterable

ROLES = ("draft", "target", "prm", "router")
# role -> the service method that serves it (arbitrage.service.ModelService)
ROLE_METHOD = {"draft": "generate_step", "target": "generate_step", "prm": "score", "router": "predict"}
CACHED_ROLES = ("draft", "target", "prm")  # roles whose greedy outputs the step cache keeps


def check_role(role: str) -> str:
    """`role`, or ValueError naming the known roles."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    return role


def configured_roles(cfg) -> tuple[str, ...]:
    """The roles an ArbitrageConfig has models for (draft and target always)."""
    m = cfg.models
    return ("draft", "target") + (("prm",) if m.prm else ()) + (("router",) if m.router else ())


def roles_for(policy_name: str, cfg) -> tuple[str, ...]:
    """The roles a policy needs loaded under a config (see `DecisionPolicy.required_roles`)."""
    from arbitrage.policies import POLICIES

    if policy_name not in POLICIES:
        raise ValueError(f"unknown policy {policy_name!r}; choose one of: {', '.join(POLICIES)}")
    return POLICIES[policy_name].required_roles(cfg.models.prm is not None, cfg.policy.score_escalations)


def check_available(policy, available: Iterable[str]) -> None:
    """ValueError when a policy's decision needs a role that is not served (escalation scoring is optional).

    Args:
        policy: a DecisionPolicy.
        available: the roles served here.
    """
    have = set(available)
    missing = [r for r in policy.required_roles() if r not in have]
    if missing:
        raise ValueError(
            f"policy {policy.name!r} needs the {', '.join(missing)} actor(s), which this "
            f"runtime lacks; configure models.{missing[0]} or choose another policy"
        )
