"""Thresholds for the research sweep, chosen on training rows so each policy escalates a set share of steps.

A threshold means something different for each policy (a PRM value for `rsd`, a geometric-mean
token probability for `confidence`, a probability of advantage for `router`), so the sweep
picks, per policy, the thresholds at which it would escalate `--rates` of the draft steps of
the *training* rows (scored rows written by `arbitrage train-prm`, which carry the trained
PRM's `draft_score`, the draft's step features and hidden state). No test problem is looked at;
how many target tokens each cell then spends on the test problems is measured by the sweep,
and the comparison is made at matched target tokens (`arbitrage.sweep_stats`).

    python benchmarks/research_thresholds.py --rows prms/local-value/scored.jsonl \
        --router routers/local-hidden --rates 0.15,0.3,0.5
prints the `--groups` argument of `arbitrage eval`.

    python benchmarks/research_thresholds.py --sweep docs/runs/research-gsm8k200 \
        --groups router@0.9731,rsd@0.0043,confidence@0.8398
prints, once a sweep has rows, the share of its test steps each threshold escalates (or would):
scores read from the steps its cells recorded (`router_prob`, `prm_draft`, the draft's features),
so a threshold whose cell has not run yet is read off the cells that have. It checks how well
the training rows' shares carried over; it chooses nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere


def quantile(values: list[float], q: float) -> float:
    v = sorted(values)
    k = (len(v) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def thresholds(rows: list[dict], router, rates: list[float]) -> dict[str, list[float]]:
    """Per policy, the threshold at which it escalates each rate of the rows' draft steps.

    rsd and confidence escalate when their score is BELOW tau (tau = the rate-quantile);
    the router escalates when its probability is ABOVE tau (tau = the (1 - rate)-quantile).
    """
    from arbitrage.router_data import example_from_row

    prm = [float(r["draft_score"]) for r in rows]
    conf = [math.exp(float(r["draft_features"]["lp_mean"])) for r in rows if r.get("draft_features")]
    out = {"rsd": [quantile(prm, q) for q in rates], "confidence": [quantile(conf, q) for q in rates]}
    if router is not None:
        probs = router.predict([example_from_row(r).request for r in rows])
        out["router"] = [quantile(probs, 1 - q) for q in rates]
    return out


STEP_SCORE = {
    "router": lambda s: s.get("router_prob"),
    "rsd": lambda s: s.get("prm_draft"),
    "confidence": lambda s: math.exp(s["draft_features"]["lp_mean"]) if s.get("draft_features") else None,
}


def sweep_shares(run_dir: Path, groups: list[str]) -> list[tuple[str, float, int]]:
    """(group, share of the sweep's recorded step scores the group's threshold escalates, steps)."""
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines() if line.strip()]
    out = []
    for g in groups:
        policy, tau = g.split("@")
        scores = [v for r in rows for s in r["steps"] if (v := STEP_SCORE[policy](s)) is not None]
        esc = [v > float(tau) if policy == "router" else v < float(tau) for v in scores]
        out.append((g, sum(esc) / len(esc) if esc else float("nan"), len(esc)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", help="scored rows (<prm folder>/scored.jsonl)")
    p.add_argument("--sweep", type=Path, help="a sweep folder: print the shares its steps give --groups")
    p.add_argument("--groups", default="", help="with --sweep: policy@tau,... (router, rsd, confidence)")
    p.add_argument("--router", default=None, help="router folder (kind hidden or probe)")
    p.add_argument("--rates", default="0.15,0.3,0.5", help="escalation shares to aim for")
    p.add_argument(
        "--all-rows",
        action="store_true",
        help="also use the rows of the PRM's held-out problems (default: its training problems only)",
    )
    args = p.parse_args(argv)
    if args.sweep:
        for g, share, n in sweep_shares(args.sweep, [g for g in args.groups.split(",") if g]):
            print(f"{g}: {share:.1%} of {n} steps")
        return 0
    if not args.rows:
        p.error("--rows or --sweep is required")
    rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines() if line.strip()]
    meta_path = Path(args.rows).parent / "value_head.json"
    if not args.all_rows and meta_path.is_file():
        held = set(json.loads(meta_path.read_text()).get("validation_problem_ids", []))
        rows = [r for r in rows if str(r["problem_id"]) not in held]
    router = None
    if args.router:
        from arbitrage.router_factory import build_router
        from configs.schema import RouterConfig

        kind = json.loads(
            (
                Path(args.router) / ("router.json" if (Path(args.router) / "router.json").is_file() else "probe.json")
            ).read_text()
        )["kind"]
        router = build_router(RouterConfig(kind=kind, path=args.router, device="cpu"))
    rates = [float(x) for x in args.rates.split(",")]
    taus = thresholds(rows, router, rates)
    for policy, ts in taus.items():
        print(f"{policy}: " + ", ".join(f"{r:.0%} -> {t:.4f}" for r, t in zip(rates, ts)), file=sys.stderr)
    cells = (
        ["draft_only"]
        + [f"{pol}@{t:.4f}" for pol in ("router", "rsd", "confidence") if pol in taus for t in taus[pol]]
        + ["target_only"]
    )
    print(",".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
