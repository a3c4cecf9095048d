"""Plain data types shared by the engine, the step loop, the actors and the API.

Everything here is a dataclass of builtins so it pickles cheaply across Ray and
serialises to JSON for traces (`asdict`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

Author = Literal["draft", "target"]
StopReason = Literal["separator", "eos", "length"]
# How a chain that produced no answer ended (`loop.failed_chain`): redone by resumable runs.
FAILED_STOPS = ("error", "timeout", "cancelled")
AUTHOR_ID: dict[str, int] = {"draft": 0, "target": 1}


class ContextOverflow(ValueError):
    """A prompt (a chain's text so far) that no longer fits a model's `max_context`.

    Engines raise it instead of decoding; the step loop ends that chain as `max_tokens` (the
    API's finish_reason "length"), since the chain has simply run out of room.
    """


@dataclass(frozen=True)
class SamplingParams:
    """How one step is decoded."""

    separator: str = "\n\n"
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    forced_tokens: int | None = None  # benchmarks: exactly this many tokens, no stop check


@dataclass(frozen=True)
class StepRequest:
    """One step to decode for one chain: the problem and the steps accepted so far.

    The request is text-level: each engine renders it with its own tokenizer and chat
    template, so draft and target may use different tokenizers.
    """

    problem: str
    steps: tuple[str, ...] = ()
    system: str | None = None
    chat: bool = True
    params: SamplingParams = SamplingParams()
    chain_id: str | None = None  # engines keep this chain's KV between steps


@dataclass
class StepOutput:
    """One decoded step, as the engine returns it."""

    text: str  # the step, without the separator
    num_tokens: int  # tokens generated (including the separator / EOS token)
    logprobs: list[float]  # per generated token, under the sampling distribution
    stop_reason: StopReason
    entropies: list[float] = field(default_factory=list)  # per token, nats (probe features)
    prompt_tokens: int = 0
    hidden: list[float] | None = None  # engines with embeddings on: the state after reading the step

    @property
    def features(self) -> dict[str, float]:
        """Draft-side features a probe router reads (no extra forward pass)."""
        lp = self.logprobs or [0.0]
        ent = self.entropies or [0.0]
        return {
            "lp_mean": sum(lp) / len(lp),
            "lp_min": min(lp),
            "lp_last": lp[-1],
            "ent_mean": sum(ent) / len(ent),
            "ent_max": max(ent),
            "num_tokens": float(self.num_tokens),
        }


@dataclass
class TraceStep:
    """One accepted step in a chain's trace."""

    index: int
    text: str
    author: Author
    num_tokens: int
    stop_reason: StopReason
    escalated: bool = False
    draft_text: str | None = None  # the draft step when escalated, or when both steps exist (oracle)
    draft_tokens: int = 0
    target_tokens: int = 0
    prm_draft: float | None = None
    prm_target: float | None = None
    router_prob: float | None = None
    wasted: bool | None = None  # escalated and the target step did not score higher
    wall_s: float = 0.0
    draft_features: dict[str, float] | None = None
    target_text: str | None = None  # the target step whenever both steps exist (router training data)


@dataclass
class ChainResult:
    """A finished chain: its steps, answer, grade and cost counters."""

    problem_id: str
    problem: str
    policy: str
    threshold: float
    steps: list[TraceStep]
    final_text: str
    stop_reason: str  # answer | eos | max_steps | max_tokens | error | cancelled
    answer: str | None = None
    reference: str | None = None
    correct: bool | None = None
    draft_tokens: int = 0
    target_tokens: int = 0
    target_calls: int = 0
    draft_calls: int = 0
    prm_calls: int = 0
    router_calls: int = 0
    wall_s: float = 0.0
    error: str | None = None
    cache: dict | None = None  # step cache use: {"hits"|"misses"|"tokens_saved": {role: n}}; None when off

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def accepted_draft_steps(self) -> int:
        return sum(1 for s in self.steps if s.author == "draft")

    @property
    def escalations(self) -> int:
        return sum(1 for s in self.steps if s.escalated)

    @property
    def wasted_escalations(self) -> int:
        return sum(1 for s in self.steps if s.wasted)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            num_steps=self.num_steps,
            accepted_draft_steps=self.accepted_draft_steps,
            escalations=self.escalations,
            wasted_escalations=self.wasted_escalations,
        )
        return d
