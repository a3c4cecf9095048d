"""Statistics for comparing policies on a sweep: bootstrap intervals by problem, matched target tokens.

A sweep (`arbitrage eval`) gives one row per (problem, policy, threshold). The research
question is whether one policy reaches higher accuracy than another *at the same target
compute*, so comparisons here are

- paired by problem: both policies' rows of the same problems, resampled together;
- matched on target tokens, not on step counts or thresholds: a threshold policy's curve
  is sampled at a few thresholds, so the policy is evaluated at a reference cell's mean
  target tokens T by mixing its two neighbouring cells per problem with weights that make
  the mixture's mean target tokens exactly T (a policy that draws its threshold per problem
  from those two realises it: `matched_difference`). `draft_only` and `target_only` are the
  ends of every policy's curve: a threshold at which no step escalates gives draft_only's
  chains, one at which every step does target_only's (greedy steps on the same prefixes),
  whatever the policy. Exactly so when the cells' steps come from one step cache; steps
  recomputed in another batch can differ at near-ties (docs/BENCHMARKS.md s.12.4).

Intervals are percentile bootstraps over problems (95% by default): accuracy of a cell
(`accuracy_interval`) and the paired difference of two (`paired_difference`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from arbitrage.policies import THRESHOLD_FREE


@dataclass(frozen=True)
class Cell:
    """One (policy, threshold) cell's rows by problem: correctness and target tokens."""

    label: str
    policy: str
    threshold: float
    correct: Mapping[str, float]  # problem id -> 1.0 / 0.0
    target_tokens: Mapping[str, int]
    draft_tokens: Mapping[str, int]
    kept_draft_tokens: Mapping[str, int]

    def mean_target_tokens(self, problems: Sequence[str]) -> float:
        return sum(self.target_tokens[p] for p in problems) / len(problems)

    def accuracy(self, problems: Sequence[str]) -> float:
        return sum(self.correct[p] for p in problems) / len(problems)

    def token_acceptance(self, problems: Sequence[str]) -> float | None:
        drafted = sum(self.draft_tokens[p] for p in problems)
        return sum(self.kept_draft_tokens[p] for p in problems) / drafted if drafted else None


def cells_from_rows(rows: Iterable[dict], label_of) -> dict[str, Cell]:
    """Group sweep rows (`results.jsonl`) into cells; `label_of(policy, threshold)` names them."""
    acc: dict[str, dict] = {}
    for r in rows:
        if r.get("correct") is None:
            continue
        lab = label_of(r["policy"], float(r["threshold"]))
        c = acc.setdefault(
            lab,
            {
                "policy": r["policy"],
                "threshold": float(r["threshold"]),
                "correct": {},
                "target_tokens": {},
                "draft_tokens": {},
                "kept": {},
            },
        )
        pid = str(r["problem_id"])
        c["correct"][pid] = float(bool(r["correct"]))
        c["target_tokens"][pid] = int(r["target_tokens"])
        c["draft_tokens"][pid] = sum(int(s["draft_tokens"]) for s in r["steps"])
        c["kept"][pid] = sum(int(s["num_tokens"]) for s in r["steps"] if s["author"] == "draft")
    return {
        lab: Cell(lab, c["policy"], c["threshold"], c["correct"], c["target_tokens"], c["draft_tokens"], c["kept"])
        for lab, c in acc.items()
    }


def common_problems(cells: Iterable[Cell]) -> list[str]:
    """Problems every given cell has a graded row for, sorted."""
    sets = [set(c.correct) for c in cells]
    return sorted(set.intersection(*sets)) if sets else []


def _percentile(values: list[float], q: float) -> float:
    v = sorted(values)
    k = (len(v) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def bootstrap_mean(
    per_problem: Sequence[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(mean, lower, upper): percentile bootstrap interval of a per-problem quantity's mean."""
    n = len(per_problem)
    if n == 0:
        raise ValueError("no problems to bootstrap over")
    rng = random.Random(seed)
    means = []
    for _ in range(n_boot):
        means.append(sum(per_problem[rng.randrange(n)] for _ in range(n)) / n)
    a = (1 - level) / 2
    return sum(per_problem) / n, _percentile(means, a), _percentile(means, 1 - a)


def accuracy_interval(cell: Cell, problems: Sequence[str], n_boot: int = 2000, seed: int = 0):
    """(accuracy, lower, upper) over `problems`, bootstrap by problem."""
    return bootstrap_mean([cell.correct[p] for p in problems], n_boot, seed)


def paired_difference(a: Sequence[float], b: Sequence[float], n_boot: int = 2000, seed: int = 0):
    """(mean of a - b, lower, upper): paired per-problem values, bootstrap by problem."""
    if len(a) != len(b):
        raise ValueError("paired values need the same problems")
    return bootstrap_mean([x - y for x, y in zip(a, b)], n_boot, seed)


@dataclass(frozen=True)
class Matched:
    """A policy's curve evaluated at a reference cell's mean target tokens."""

    reference: str
    policy: str
    tokens: float  # the reference's mean target tokens per problem (= the mixture's)
    lower_cell: str
    upper_cell: str
    weight: float  # weight of upper_cell in the per-problem mixture
    accuracy: float  # the mixture's
    reference_accuracy: float
    difference: tuple[float, float, float]  # mixture - reference: mean, 95% lower, upper


def matched_difference(
    curve: Sequence[Cell], reference: Cell, problems: Sequence[str], n_boot: int = 2000, seed: int = 0
) -> Matched | None:
    """The curve's accuracy at the reference's target tokens, paired with the reference by problem.

    Args:
        curve: the cells of one threshold policy (any order).
        reference: the cell to match (another policy's).
        problems: the problems all of them share.
    Returns:
        None when the reference's tokens lie outside the curve's range (no interpolation
        without extrapolation).
    """
    t_ref = reference.mean_target_tokens(problems)
    pts = sorted(curve, key=lambda c: c.mean_target_tokens(problems))
    for lo, hi in zip(pts, pts[1:]):
        t_lo, t_hi = lo.mean_target_tokens(problems), hi.mean_target_tokens(problems)
        if t_lo <= t_ref <= t_hi:
            w = 0.0 if t_hi == t_lo else (t_ref - t_lo) / (t_hi - t_lo)
            mix = [(1 - w) * lo.correct[p] + w * hi.correct[p] for p in problems]
            ref = [reference.correct[p] for p in problems]
            return Matched(
                reference.label,
                curve[0].policy,
                t_ref,
                lo.label,
                hi.label,
                w,
                sum(mix) / len(mix),
                sum(ref) / len(ref),
                paired_difference(mix, ref, n_boot, seed),
            )
    exact = [c for c in pts if c.mean_target_tokens(problems) == t_ref]
    if exact:
        c = exact[0]
        mix, ref = [c.correct[p] for p in problems], [reference.correct[p] for p in problems]
        return Matched(
            reference.label,
            c.policy,
            t_ref,
            c.label,
            c.label,
            0.0,
            sum(mix) / len(mix),
            sum(ref) / len(ref),
            paired_difference(mix, ref, n_boot, seed),
        )
    return None


def versus_random(cells: Mapping[str, Cell], problems: Sequence[str], n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """Each threshold cell minus spending its target tokens at random: draft_only and target_only
    mixed per problem to the cell's mean target tokens (a policy that escalates every step of a
    random share of problems), paired by problem. A scorer that picks steps worth more than an
    average target token lies above 0. Empty without both ends."""
    ends = [c for c in cells.values() if c.policy in THRESHOLD_FREE]
    if len(ends) < 2:
        return []
    out = []
    for c in sorted(cells.values(), key=lambda c: (c.policy, c.threshold)):
        if c.policy in THRESHOLD_FREE:
            continue
        m = matched_difference(ends, c, problems, n_boot, seed)
        if m is None:
            continue
        d, lo, hi = m.difference  # random - cell
        out.append(
            {
                "cell": c.label,
                "tokens_per_problem": m.tokens,
                "random_accuracy": m.accuracy,
                "accuracy": m.reference_accuracy,
                "difference": -d,
                "ci": [-hi, -lo],
            }
        )
    return out


def research_summary(
    cells: Mapping[str, Cell],
    policy: str = "router",
    baselines: Sequence[str] = ("rsd", "confidence"),
    n_boot: int = 2000,
    seed: int = 0,
) -> dict:
    """Per-cell accuracy intervals, acceptance and target tokens, and `policy` vs each baseline matched.

    Returns:
        {"problems": n, "cells": [...], "matched": [...], "vs_random": [...], "goal": {...}}
        over the problems every cell shares.
    """
    problems = common_problems(cells.values())
    if not problems:
        raise ValueError("the cells share no graded problems")
    out: dict = {"problems": len(problems), "cells": [], "matched": []}
    for lab, c in sorted(cells.items(), key=lambda kv: (kv[1].policy, kv[1].threshold)):
        acc, lo, hi = accuracy_interval(c, problems, n_boot, seed)
        out["cells"].append(
            {
                "cell": lab,
                "policy": c.policy,
                "threshold": c.threshold,
                "accuracy": acc,
                "ci": [lo, hi],
                "token_acceptance": c.token_acceptance(problems),
                "target_tokens": sum(c.target_tokens[p] for p in problems),
                "target_tokens_per_problem": c.mean_target_tokens(problems),
            }
        )
    curve = [c for c in cells.values() if c.policy == policy]
    # every threshold policy's ends: never escalate = draft_only's chains, always = target_only's
    ends = [c for c in cells.values() if c.policy in THRESHOLD_FREE]
    for base in baselines:
        for ref in sorted((c for c in cells.values() if c.policy == base), key=lambda c: c.threshold):
            m = matched_difference(curve + ends, ref, problems, n_boot, seed) if len(curve) else None
            out["matched"].append(
                {
                    "policy": policy,
                    "baseline": ref.label,
                    **(
                        {"matched": False}
                        if m is None
                        else {
                            "matched": True,
                            "tokens_per_problem": m.tokens,
                            "between": [m.lower_cell, m.upper_cell],
                            "weight": m.weight,
                            "accuracy": m.accuracy,
                            "baseline_accuracy": m.reference_accuracy,
                            "difference": m.difference[0],
                            "ci": [m.difference[1], m.difference[2]],
                        }
                    ),
                }
            )
    out["vs_random"] = versus_random(cells, problems, n_boot, seed)
    target = next((c for c in cells.values() if c.policy == "target_only"), None)
    if target is not None:
        t_acc, t_tok = target.accuracy(problems), target.mean_target_tokens(problems)
        out["goal"] = {
            "target_only_accuracy": t_acc,
            "cells": [
                {
                    "cell": c.label,
                    "accuracy_share": c.accuracy(problems) / t_acc if t_acc else None,
                    "target_token_share": c.mean_target_tokens(problems) / t_tok if t_tok else None,
                }
                for c in sorted(curve, key=lambda c: c.threshold)
            ],
        }
    return out
