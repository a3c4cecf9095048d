"""Reports over a sweep folder: a metrics table per (policy, threshold) and the paper's plots.

`summary_table` is the one table the CLI prints (`run`, `eval`, `demo`, `report`), at most
100 columns wide: accuracy, token-level acceptance, target calls and tokens, wall time per
problem and its ratio to `target_only`. `report.md` has every metric.

Reads `results.jsonl` (and `segments.jsonl` for throughput) written by
`cluster.evaluate.run_sweep`; writes `summary.json`, `report.md` and three PNG plots:
accuracy vs acceptance rate, accuracy vs mean latency, wasted-escalation share vs
acceptance rate. When the sweep ran with the step cache, `report.md` also has a table of
the model calls it answered per group (latencies of groups with cache hits are lower than
an uncached run of the same group would measure).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from arbitrage.metrics import summarize
from cluster.evaluate import THRESHOLD_FREE, cache_line, cache_totals, load_results

COLUMNS = [
    ("accuracy", "{:.3f}"),
    ("token_acceptance", "{:.3f}"),
    ("acceptance_rate", "{:.3f}"),
    ("target_calls", "{}"),
    ("wasted_escalations", "{}"),
    ("wasted_share", "{:.3f}"),
    ("draft_tokens", "{}"),
    ("target_tokens", "{}"),
    ("latency_mean_s", "{:.2f}"),
    ("latency_p50_s", "{:.2f}"),
    ("latency_p90_s", "{:.2f}"),
    ("throughput_problems_per_s", "{:.4f}"),
    ("errors", "{}"),
]


def group_summaries(run_dir: Path) -> list[dict]:
    """One metrics dict per (policy, threshold), sorted by policy then threshold."""
    rows = load_results(run_dir / "results.jsonl")
    if not rows:
        raise ValueError(f"no results in {run_dir / 'results.jsonl'}")
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for r in rows.values():
        groups[(r["policy"], float(r["threshold"]))].append(r)
    elapsed = _elapsed_by_group(run_dir / "segments.jsonl")
    out = []
    for (policy, tau), rs in sorted(groups.items()):
        m = summarize(rs, elapsed.get((policy, tau)))
        out.append({"policy": policy, "threshold": tau, **m})
    return out


def _elapsed_by_group(path: Path) -> dict[tuple[str, float], float]:
    acc: dict[tuple[str, float], float] = defaultdict(float)
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                s = json.loads(line)
                acc[(s["policy"], float(s["threshold"]))] += s["elapsed_s"]
            except (ValueError, KeyError):
                continue
    return acc


def group_label(policy: str, tau: float) -> str:
    return policy if policy in THRESHOLD_FREE else f"{policy}@{tau:g}"


TABLE_NOTE = (
    "accept = accepted draft tokens / draft tokens generated; s/problem = mean wall time of a "
    "chain\n(chains of a group run concurrently); vs target = s/problem over target_only's."
)


def summary_table(summaries: list[dict], cache: str | None = None) -> str:
    """The CLI's summary table (plain text, at most 100 columns), one row per group, and its notes.

    Args:
        summaries: `arbitrage.metrics.summarize` dicts with `policy` and `threshold`.
        cache: the step-cache line (`cluster.evaluate.cache_line`); "step cache: off" says the
            wall times are uncached.
    """
    base = next((s["latency_mean_s"] for s in summaries if s["policy"] == "target_only"), None)
    head = ("group", "n", "accuracy", "accept", "target calls", "target tok", "s/problem", "vs target")
    rows, errors = [], []
    for s in summaries:
        acc = "-" if s["accuracy"] is None else f"{s['accuracy']:.2f} ({s['correct']}/{s['graded']})"
        ta = "-" if s.get("token_acceptance") is None else f"{s['token_acceptance']:.3f}"
        ratio = f"{s['latency_mean_s'] / base:.2f}x" if base else "-"
        label = group_label(s["policy"], s["threshold"])
        rows.append(
            (
                label,
                str(s["problems"]),
                acc,
                ta,
                str(s["target_calls"]),
                str(s["target_tokens"]),
                f"{s['latency_mean_s']:.1f}",
                ratio,
            )
        )
        if s["errors"]:
            errors.append(f"{label} {s['errors']}")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "  ".join(
        c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
        for i, (c, w) in enumerate(zip(r, widths))
    ).rstrip()
    lines = [fmt(head), "  ".join("-" * w for w in widths), *map(fmt, rows), TABLE_NOTE]
    if errors:
        lines.append("chains that ended in an error (their rows hold the message): " + ", ".join(errors))
    if cache is not None:
        lines.append(
            cache
            + (
                " -- wall times are uncached"
                if cache == "step cache: off"
                else " -- groups with hits ran faster than uncached"
            )
        )
    return "\n".join(lines)


def markdown_table(summaries: list[dict]) -> str:
    head = "| policy | tau | n | " + " | ".join(c for c, _ in COLUMNS) + " |"
    sep = "|" + "---|" * (3 + len(COLUMNS))
    lines = [head, sep]
    for s in summaries:
        tau = "-" if s["policy"] in THRESHOLD_FREE else f"{s['threshold']:g}"
        cells = ["-" if s[c] is None else f.format(s[c]) for c, f in COLUMNS]
        lines.append(f"| {s['policy']} | {tau} | {s['problems']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cache_table(run_dir: Path) -> str | None:
    """Markdown table of step-cache hits / lookups per group and role, or None without a cache."""
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for r in load_results(run_dir / "results.jsonl").values():
        groups[(r["policy"], float(r["threshold"]))].append(r)
    roles = ("draft", "target", "prm")
    lines = [
        "| policy | tau | " + " | ".join(f"{r} hits / calls" for r in roles) + " | tokens saved | calls saved |",
        "|" + "---|" * (len(roles) + 4),
    ]
    all_rows: list[dict] = []
    for (policy, tau), rs in sorted(groups.items()):
        all_rows += rs
        lines.append(_cache_line(policy, tau, cache_totals(rs), roles))
    tot = cache_totals(all_rows)
    if not tot["hits"] and not tot["misses"]:
        return None
    lines.append(_cache_line("**all**", None, tot, roles))
    return "\n".join(lines)


def _cache_line(policy: str, tau: float | None, tot: dict, roles: tuple[str, ...]) -> str:
    cells = []
    for role in roles:
        h, m = tot["hits"].get(role, 0), tot["misses"].get(role, 0)
        cells.append(f"{h} / {h + m}" if h + m else "-")
    hits, calls = sum(tot["hits"].values()), sum(tot["hits"].values()) + sum(tot["misses"].values())
    share = f"{hits / calls:.0%}" if calls else "-"
    tau_s = "-" if tau is None or policy in THRESHOLD_FREE else f"{tau:g}"
    return f"| {policy} | {tau_s} | " + " | ".join(cells) + f" | {sum(tot['tokens_saved'].values())} | {share} |"


SHARES = ("acceptance_rate", "accuracy", "wasted_share")  # axes fixed to [0, 1]


def plot(summaries: list[dict], out_dir: Path, title: str = "") -> list[Path]:
    """The three plots, one line per policy across thresholds; baselines as single markers.

    Titled with `title` (dataset and models, `run_title`) and the problem count; share axes
    span [0, 1], points are joined in threshold order.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = [
        ("acceptance_rate", "accuracy", "accuracy_vs_acceptance.png", "acceptance rate (draft steps kept)", "accuracy"),
        (
            "latency_mean_s",
            "accuracy",
            "accuracy_vs_latency.png",
            "mean wall time per problem (s), under the run's own load",
            "accuracy",
        ),
        ("acceptance_rate", "wasted_share", "wasted_vs_acceptance.png", "acceptance rate", "wasted-escalation share"),
    ]
    by_policy: dict[str, list[dict]] = defaultdict(list)
    for s in summaries:
        by_policy[s["policy"]].append(s)
    n_full = max(s["problems"] for s in summaries)  # a group with fewer rows is unfinished: say so on the plot
    colors = {policy: f"C{i}" for i, policy in enumerate(sorted(by_policy))}  # one colour per policy in every plot
    paths = []
    for x, y, name, xl, yl in specs:
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for policy, ss in by_policy.items():
            pts = sorted(
                ((s[x], s[y], s["threshold"], s["problems"]) for s in ss if s[y] is not None), key=lambda p: p[2]
            )
            if not pts:
                continue
            xs, ys, ts, ns = zip(*pts)
            style = "*" if policy in THRESHOLD_FREE else "o-"
            ax.plot(xs, ys, style, label=policy, color=colors[policy], markersize=10 if policy in THRESHOLD_FREE else 5)
            if policy not in THRESHOLD_FREE:
                for xv, yv, t, n in pts:
                    note = f"{t:g}" + (f" (n={n})" if n < n_full else "")
                    ax.annotate(note, (xv, yv), textcoords="offset points", xytext=(4, 4), fontsize=7)
            else:
                for xv, yv, _, n in pts:
                    if n < n_full:
                        ax.annotate(f"n={n}", (xv, yv), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        if x in SHARES:
            ax.set_xlim(0, 1)
        if y in SHARES:
            ax.set_ylim(0, 1)
        ax.set_title(f"{title or 'sweep'}, n = {n_full} problems", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = out_dir / name
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    return paths


def write_report(run_dir: Path, out_dir: Path | None = None) -> tuple[str, list[Path]]:
    """Write summary.json, report.md and the plots; return the CLI's summary table and the plot paths.

    Args:
        run_dir: the sweep folder (results.jsonl, segments.jsonl).
        out_dir: where to write (created with its parents); default `run_dir`.
    """
    out_dir = out_dir or run_dir
    summaries = group_summaries(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summaries, indent=2))
    table = markdown_table(summaries)
    title = run_title(run_dir)
    plots = plot(summaries, out_dir, title)
    cache = cache_table(run_dir)
    cache_md = (
        (
            "## Step cache\n\nModel calls answered from the step cache (greedy steps and PRM scores "
            "repeated across groups); groups with hits ran faster than they would uncached.\n\n"
            f"{cache}\n\n"
        )
        if cache
        else ""
    )
    (out_dir / "report.md").write_text(
        f"# Report: {run_dir.name}\n\n{table}\n\n{cache_md}" + "\n".join(f"![{p.stem}]({p.name})" for p in plots) + "\n"
    )
    rows = load_results(run_dir / "results.jsonl").values()
    research = research_section(rows, out_dir, title=title)
    if research is not None:
        md, plot_path = research
        plots.append(plot_path)
        with (out_dir / "report.md").open("a") as f:
            f.write("\n" + md + f"\n![{plot_path.stem}]({plot_path.name})\n")
    return summary_table(summaries, cache_line(rows)), plots


# A cell with fewer graded problems than this share of the largest cell's is unfinished: it is
# named in the research section and left out, so that it does not shrink every comparison.
COMPLETE_SHARE = 0.9


def run_title(run_dir: Path) -> str:
    """'<dataset> <split>, <draft> -> <target>' from the run's config.json ('' without one)."""
    try:
        cfg = json.loads((run_dir / "config.json").read_text())
        data, models = cfg["data"], cfg["models"]
        names = [(models[r].get("source") or {}).get("name") or models[r].get("path", "?") for r in ("draft", "target")]
        return f"{data['dataset']} {data['split']}, {names[0]} -> {names[1]}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return ""


def research_section(
    rows, out_dir: Path, policy: str = "router", baselines: tuple[str, ...] = ("rsd", "confidence"), title: str = ""
) -> tuple[str, Path] | None:
    """Accuracy with 95% problem-bootstrap intervals, acceptance and target tokens per cell, and
    `policy` against each baseline cell at matched target tokens (`arbitrage.sweep_stats`).

    Cells with fewer than COMPLETE_SHARE of the largest cell's problems are listed as unfinished
    and left out. Writes `research.json` and `accuracy_vs_target_tokens.png` (titled with `title`
    and n); returns the markdown and the plot, or None when the sweep has no finished `policy` cell.
    """
    from arbitrage.sweep_stats import cells_from_rows, research_summary

    cells = cells_from_rows(rows, group_label)
    n_full = max((len(c.correct) for c in cells.values()), default=0)
    unfinished = {lab: len(c.correct) for lab, c in cells.items() if len(c.correct) < COMPLETE_SHARE * n_full}
    cells = {lab: c for lab, c in cells.items() if lab not in unfinished}
    if not any(c.policy == policy for c in cells.values()) or len(cells) < 2:
        return None
    res = research_summary(cells, policy, baselines)
    res["unfinished"] = unfinished
    res["title"] = title
    (out_dir / "research.json").write_text(json.dumps(res, indent=2))
    lines = [
        f"## Accuracy at matched target tokens ({res['problems']} problems every cell shares)",
        "",
        "Accuracy with 95% bootstrap intervals by problem; acceptance = accepted draft tokens / draft "
        "tokens generated; target tokens per problem. `draft_only` and `target_only` are the ends of "
        "every threshold policy's curve (no step escalated, every step escalated).",
        "",
    ]
    if unfinished:
        lines += [
            "Unfinished cells, left out: "
            + ", ".join(f"{lab} ({n} of {n_full} problems)" for lab, n in sorted(unfinished.items()))
            + ".",
            "",
        ]
    lines += ["| cell | accuracy | 95% CI | acceptance | target tokens / problem |", "|---|---|---|---|---|"]
    for c in res["cells"]:
        ta = "-" if c["token_acceptance"] is None else f"{c['token_acceptance']:.3f}"
        lines.append(
            f"| {c['cell']} | {c['accuracy']:.3f} | {c['ci'][0]:.3f}-{c['ci'][1]:.3f} | {ta} | "
            f"{c['target_tokens_per_problem']:.1f} |"
        )
    lines += [
        "",
        f"{policy} minus each baseline cell at the baseline's target tokens: {policy}'s two "
        "neighbouring cells mixed per problem so that the mixture's mean target tokens equal the "
        "baseline's; paired bootstrap by problem.",
        "",
        f"| baseline | target tokens / problem | {policy} (between) | baseline accuracy | difference | 95% CI |",
        "|---|---|---|---|---|---|",
    ]
    for m in res["matched"]:
        if not m["matched"]:
            lines.append(f"| {m['baseline']} | outside {policy}'s range | - | - | - | - |")
            continue
        lines.append(
            f"| {m['baseline']} | {m['tokens_per_problem']:.1f} | {m['accuracy']:.3f} "
            f"({m['between'][0]} / {m['between'][1]}, w={m['weight']:.2f}) | {m['baseline_accuracy']:.3f} | "
            f"{m['difference']:+.3f} | {m['ci'][0]:+.3f}..{m['ci'][1]:+.3f} |"
        )
    if res["vs_random"]:
        lines += [
            "",
            "Each cell minus spending its target tokens at random (draft_only and target_only mixed per "
            "problem to the cell's target tokens); paired bootstrap by problem. Above 0: the policy's "
            "escalations are worth more than an average target token.",
            "",
            "| cell | target tokens / problem | cell accuracy | random mix | difference | 95% CI |",
            "|---|---|---|---|---|---|",
        ]
        for v in res["vs_random"]:
            lines.append(
                f"| {v['cell']} | {v['tokens_per_problem']:.1f} | {v['accuracy']:.3f} | {v['random_accuracy']:.3f} | "
                f"{v['difference']:+.3f} | {v['ci'][0]:+.3f}..{v['ci'][1]:+.3f} |"
            )
    return "\n".join(lines) + "\n", _plot_tokens(res, out_dir)


# Policies that escalate when their score is above the threshold; the others escalate below it.
ESCALATE_ABOVE = ("router", "oracle")


def _with_ends(cells: list[dict], ends: dict[str, dict], policy: str) -> list[dict]:
    """A policy's cells in threshold order, with draft_only and target_only at the ends they stand for."""
    lo, hi = ("target_only", "draft_only") if policy in ESCALATE_ABOVE else ("draft_only", "target_only")
    return [ends[e] for e in (lo,) if e in ends] + cells + [ends[e] for e in (hi,) if e in ends]


def _plot_tokens(res: dict, out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    by_policy: dict[str, list[dict]] = defaultdict(list)
    for c in res["cells"]:
        by_policy[c["policy"]].append(c)
    ends = {c["policy"]: c for c in res["cells"] if c["policy"] in THRESHOLD_FREE}
    for i, (policy, cs) in enumerate(sorted(by_policy.items())):
        cs = sorted(cs, key=lambda c: c["threshold"])  # joined in threshold order
        if policy not in THRESHOLD_FREE and ends:  # dashed on to the curve's ends
            line = _with_ends(cs, ends, policy)
            ax.plot(
                [c["target_tokens_per_problem"] for c in line],
                [c["accuracy"] for c in line],
                "--",
                color=f"C{i}",
                alpha=0.4,
                linewidth=1,
            )
        xs = [c["target_tokens_per_problem"] for c in cs]
        ys = [c["accuracy"] for c in cs]
        err = [[y - c["ci"][0] for y, c in zip(ys, cs)], [c["ci"][1] - y for y, c in zip(ys, cs)]]
        ax.errorbar(
            xs,
            ys,
            yerr=err,
            fmt="*" if policy in THRESHOLD_FREE else "o-",
            capsize=3,
            label=policy,
            color=f"C{i}",
            markersize=9 if policy in THRESHOLD_FREE else 5,
        )
    ax.set_xlabel("target tokens per problem")
    ax.set_ylabel("accuracy (95% bootstrap CI by problem)")
    ax.set_ylim(0, 1)
    ax.set_xlim(left=0)
    ax.set_title(f"{res.get('title') or 'sweep'}, n = {res['problems']} problems", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "accuracy_vs_target_tokens.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
