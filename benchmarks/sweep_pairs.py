"""Where a sweep's cells differ from draft_only, and paired differences of named cells.

For each threshold cell: problems gained and lost against draft_only, split by whether the cell
escalated on the problem; among the problems it never escalated, how many end in another text
(steps recomputed in other batches can differ at near-ties). Then, for each `--pair A,B`, A - B
paired by problem with a 95% bootstrap interval (not matched on target tokens: see
`arbitrage report` for that).

    python benchmarks/sweep_pairs.py docs/runs/research-gsm8k200 \\
        --pair router@0.9731,rsd@0.0043 --pair router@0.9006,rsd@0.0289 --pair router@0.9006,confidence@0.8398
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere


def main(argv=None) -> int:
    from arbitrage.policies import THRESHOLD_FREE
    from arbitrage.sweep_stats import cells_from_rows, common_problems, paired_difference
    from cluster.evaluate import load_results
    from cluster.report import group_label as label

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--pair", action="append", default=[], help="A,B: cell labels as `arbitrage report` names them")
    args = p.parse_args(argv)
    rows = list(load_results(args.run_dir / "results.jsonl").values())  # as `arbitrage report` reads them
    by_cell: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_cell.setdefault(label(r["policy"], float(r["threshold"])), {})[str(r["problem_id"])] = r
    base = by_cell.get("draft_only", {})
    for lab, d in sorted(by_cell.items()):
        if lab in THRESHOLD_FREE or not base:
            continue
        ps = [q for q in d if q in base]
        esc = [q for q in ps if d[q]["escalations"] > 0]
        quiet = [q for q in ps if d[q]["escalations"] == 0]

        def moved(qs):
            return (
                sum(d[q]["correct"] and not base[q]["correct"] for q in qs),
                sum(base[q]["correct"] and not d[q]["correct"] for q in qs),
            )

        (ge, le), (gq, lq) = moved(esc), moved(quiet)
        texts = sum(d[q]["final_text"] != base[q]["final_text"] for q in quiet)
        print(
            f"{lab}: {len(ps)} problems; escalated on {len(esc)}: +{ge} -{le} vs draft_only; "
            f"never escalated on {len(quiet)}: +{gq} -{lq}, {texts} end in another text"
        )
    cells = cells_from_rows(rows, label)
    for pair in args.pair:
        a, b = pair.split(",")
        ps = common_problems([cells[a], cells[b]])
        m, lo, hi = paired_difference([cells[a].correct[q] for q in ps], [cells[b].correct[q] for q in ps])
        print(f"{a} - {b}: {m:+.3f} [{lo:+.3f}, {hi:+.3f}] over {len(ps)} problems")
    return 0


if __name__ == "__main__":
    sys.exit(main())
