"""Step requests and output comparisons shared by the engine tests (fast, colocated)."""

from __future__ import annotations

from arbitrage.types import SamplingParams, StepRequest


def step_request(problem, steps=(), chain_id=None, **params) -> StepRequest:
    """A StepRequest with system prompt "sys" and SamplingParams(**params)."""
    return StepRequest(
        problem=problem, steps=tuple(steps), system="sys", chain_id=chain_id, params=SamplingParams(**params)
    )


def assert_same_steps(a, b, tol: float = 1e-4) -> None:
    """Two StepOutput lists agree: text, length, stop reason; log-probs and entropies within tol."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x.text, x.num_tokens, x.stop_reason, x.prompt_tokens) == (
            y.text,
            y.num_tokens,
            y.stop_reason,
            y.prompt_tokens,
        )
        assert max(abs(p - q) for p, q in zip(x.logprobs, y.logprobs)) < tol
        assert max(abs(p - q) for p, q in zip(x.entropies, y.entropies)) < tol
