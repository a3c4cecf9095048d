"""Escalation policies: given what is known about a draft step, escalate to the target or not.

All policies share the one step loop (`arbitrage.loop`) and differ only in `escalate`
and in which inputs they declare they need (`needs_*`). Policies never touch models.
"""

from __future__ import annotations

import abc
import hashlib
import math
import random
from dataclasses import dataclass

from arbitrage.types import StepOutput


@dataclass
class StepContext:
    """What the loop knows about the current step when it asks the policy."""

    problem_id: str
    step_index: int
    draft: StepOutput | None = None
    target: StepOutput | None = None
    prm_draft: float | None = None
    prm_target: float | None = None
    router_prob: float | None = None


def _given(value, field: str):
    """`value`, which the loop must have filled in (the policy declared it with a `needs_*` flag)."""
    if value is None:
        raise ValueError(f"the step context has no {field}: the policy's needs_* flags must declare it")
    return value


class DecisionPolicy(abc.ABC):
    """Decides, per step, whether the target regenerates the draft's step."""

    name: str = ""
    uses_draft: bool = True  # False: every step comes from the target
    target_first: bool = False  # generate the target step before deciding (oracle)
    needs_prm_draft: bool = False
    needs_prm_target: bool = False
    needs_router: bool = False
    escalates: bool = True  # False: the target is never called (draft_only)

    @classmethod
    def required_roles(cls, prm_configured: bool = False, score_escalations: bool = True) -> tuple[str, ...]:
        """The model roles this policy calls: derived from what it declares it needs.

        Args:
            prm_configured: the config has a PRM; escalations are then scored with it when
                `score_escalations` is on (wasted-escalation counts), for any policy that escalates.
        """
        roles = ["draft"] if cls.uses_draft else []
        if not cls.uses_draft or cls.target_first or cls.escalates:
            roles.append("target")
        scores_escalations = prm_configured and score_escalations and cls.uses_draft and cls.escalates
        if cls.needs_prm_draft or cls.needs_prm_target or scores_escalations:
            roles.append("prm")
        if cls.needs_router:
            roles.append("router")
        return tuple(roles)

    def __init__(self, threshold: float = 0.5, seed: int = 0):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.threshold = threshold
        self.seed = seed

    @abc.abstractmethod
    def escalate(self, ctx: StepContext) -> bool:
        """Whether the target should write this step instead of the draft.

        Args:
            ctx: the step's draft output and whichever scores the policy declared it needs.
        Returns:
            True to escalate to the target.
        """


class DraftOnly(DecisionPolicy):
    """Baseline: every step from the draft."""

    name = "draft_only"
    escalates = False

    def escalate(self, ctx: StepContext) -> bool:
        return False


class TargetOnly(DecisionPolicy):
    """Baseline: every step from the target; the draft is never called."""

    name = "target_only"
    uses_draft = False

    def escalate(self, ctx: StepContext) -> bool:
        return True


class RSD(DecisionPolicy):
    """Reward-guided speculative decoding: keep the draft step when PRM(draft) >= tau."""

    name = "rsd"
    needs_prm_draft = True

    def escalate(self, ctx: StepContext) -> bool:
        return _given(ctx.prm_draft, "prm_draft") < self.threshold


class Oracle(DecisionPolicy):
    """Upper bound: generate both, escalate when PRM(target) - PRM(draft) > tau."""

    name = "oracle"
    target_first = True
    needs_prm_draft = True
    needs_prm_target = True

    def escalate(self, ctx: StepContext) -> bool:
        return _given(ctx.prm_target, "prm_target") - _given(ctx.prm_draft, "prm_draft") > self.threshold


class RouterPolicy(DecisionPolicy):
    """ARBITRAGE: escalate when the router's P(target step scores higher) > tau."""

    name = "router"
    needs_router = True

    def escalate(self, ctx: StepContext) -> bool:
        return _given(ctx.router_prob, "router_prob") > self.threshold


def step_confidence(out: StepOutput) -> float:
    """The draft's own confidence in a step: its geometric-mean token probability, exp(mean log p)."""
    lp = out.logprobs or [0.0]
    return math.exp(sum(lp) / len(lp))


class Confidence(DecisionPolicy):
    """Judge-free baseline: escalate when the draft's step confidence is below tau.

    The family of ConfSpec (arXiv 2602.18447) and SpecGuard (arXiv 2604.15244): no PRM and
    no router, only the draft's own token probabilities (`step_confidence`).
    """

    name = "confidence"

    def escalate(self, ctx: StepContext) -> bool:
        return step_confidence(_given(ctx.draft, "draft")) < self.threshold


class FixedRate(DecisionPolicy):
    """Systems benchmarks: escalate with probability tau, seeded per (chain, step)."""

    name = "fixed_rate"

    def escalate(self, ctx: StepContext) -> bool:
        return seeded_random(self.seed, ctx.problem_id, ctx.step_index).random() < self.threshold


def seeded_random(*parts) -> random.Random:
    """A generator seeded by `parts` (joined with "|", hashed): the same draws in every process
    and run, e.g. per (seed, problem id, step index)."""
    key = "|".join(str(x) for x in parts).encode()
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))


THRESHOLD_FREE = ("draft_only", "target_only")  # the policies whose threshold means nothing

POLICIES: dict[str, type[DecisionPolicy]] = {
    cls.name: cls for cls in (DraftOnly, TargetOnly, RSD, Oracle, RouterPolicy, Confidence, FixedRate)
}


def make_policy(name: str, threshold: float = 0.5, seed: int = 0) -> DecisionPolicy:
    """Build a policy by name."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of: {', '.join(POLICIES)}")
    return POLICIES[name](threshold=threshold, seed=seed)
