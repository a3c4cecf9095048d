"""Run-level metrics over chain results: accuracy, acceptance rate, cost and latency.

Acceptance, as the ARBITRAGE authors define it, is token-level: accepted draft tokens
(tokens of the steps the draft wrote and kept) over draft tokens generated (every draft
step, kept or replaced) -- `token_acceptance`. `acceptance_rate` is the share of accepted
steps that came from the draft (steps kept). A wasted
escalation is one whose target step did not score higher than the draft step under
the PRM (counted only where both were scored).
"""

from __future__ import annotations

import statistics
from typing import Any, Iterable

from arbitrage.types import ChainResult


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    v = sorted(values)
    k = (len(v) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def summarize(results: Iterable[ChainResult | dict], elapsed_s: float | None = None) -> dict[str, Any]:
    """Aggregate metrics for one (policy, threshold) group of chain results.

    Args:
        results: ChainResult objects or their `to_dict()` rows.
        elapsed_s: wall time of the whole run, for throughput (defaults to the sum of chain times).
    Returns:
        A flat dict of metrics.
    """
    rows = [r.to_dict() if isinstance(r, ChainResult) else r for r in results]
    n = len(rows)
    graded = [r for r in rows if r.get("correct") is not None]
    steps = sum(r["num_steps"] for r in rows)
    escal = sum(r["escalations"] for r in rows)
    scored_escal = sum(1 for r in rows for s in r["steps"] if s["escalated"] and s["wasted"] is not None)
    kept_tokens = sum(s["num_tokens"] for r in rows for s in r["steps"] if s["author"] == "draft")
    drafted_tokens = sum(s["draft_tokens"] for r in rows for s in r["steps"])
    lat = [r["wall_s"] for r in rows]
    elapsed = elapsed_s if elapsed_s else sum(lat)
    return {
        "problems": n,
        "accuracy": sum(bool(r["correct"]) for r in graded) / len(graded) if graded else None,
        "acceptance_rate": sum(r["accepted_draft_steps"] for r in rows) / steps if steps else 0.0,
        "token_acceptance": kept_tokens / drafted_tokens if drafted_tokens else None,
        "correct": sum(bool(r["correct"]) for r in graded),
        "graded": len(graded),
        "steps": steps,
        "target_calls": sum(r["target_calls"] for r in rows),
        "escalations": escal,
        "wasted_escalations": sum(r["wasted_escalations"] for r in rows),
        "wasted_share": (sum(r["wasted_escalations"] for r in rows) / scored_escal) if scored_escal else None,
        "draft_tokens": sum(r["draft_tokens"] for r in rows),
        "target_tokens": sum(r["target_tokens"] for r in rows),
        "errors": sum(1 for r in rows if r.get("error")),
        "latency_mean_s": statistics.fmean(lat) if lat else 0.0,
        "latency_p50_s": _pct(lat, 0.5),
        "latency_p90_s": _pct(lat, 0.9),
        "throughput_problems_per_s": n / elapsed if elapsed else 0.0,
    }
