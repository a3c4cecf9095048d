"""The `arbitrage` command line: parses arguments and calls the runtime; no logic of its own.

Bad input (a malformed config, an unknown policy, tau outside [0, 1], a missing model,
an empty dataset file) ends with one line on stderr and exit code 2, no traceback.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="ARBITRAGE: advantage-aware step-level speculative decoding on Ray.")

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError)


def fail(msg: str) -> None:
    """Print one line and exit with code 2."""
    typer.echo(f"error: {msg}".splitlines()[0], err=True)
    raise typer.Exit(code=2)


def load_cli_config(config: str, **overrides):
    """Load a config with CLI overrides; None values are not overrides."""
    from configs import load_config

    return load_config(config, **{k: v for k, v in overrides.items() if v is not None})


def _print_result(i: int, n: int, r: dict) -> None:
    authors = [s["author"] for s in r["steps"]]
    mark = {True: "correct", False: "wrong", None: "ungraded"}[r["correct"]]
    err = f"  error={r['error']}" if r.get("error") else ""
    typer.echo(f"[{i}/{n}] {r['problem_id']}: {mark} answer={r['answer']!r} ref={r['reference']!r} "
               f"steps={len(authors)} (draft {authors.count('draft')}, target {authors.count('target')}) "
               f"stop={r['stop_reason']} {r['wall_s']:.1f}s{err}")


def print_summary(rows_by_group: dict[tuple[str, float], list[dict]], elapsed: float | None = None) -> None:
    """A summary table per (policy, threshold)."""
    from rich.console import Console
    from rich.table import Table

    from arbitrage.metrics import summarize

    t = Table(title="arbitrage summary")
    cols = ["policy", "tau", "n", "accuracy", "accept", "target calls", "wasted", "draft tok",
            "target tok", "lat mean s", "lat p50 s", "lat p90 s", "errors"]
    for c in cols:
        t.add_column(c, justify="right")
    for (policy, tau), rows in rows_by_group.items():
        m = summarize(rows, elapsed)
        acc = "-" if m["accuracy"] is None else f"{m['accuracy']:.3f}"
        t.add_row(policy, f"{tau:g}", str(m["problems"]), acc, f"{m['acceptance_rate']:.3f}",
                  str(m["target_calls"]), str(m["wasted_escalations"]), str(m["draft_tokens"]),
                  str(m["target_tokens"]), f"{m['latency_mean_s']:.2f}", f"{m['latency_p50_s']:.2f}",
                  f"{m['latency_p90_s']:.2f}", str(m["errors"]))
    Console(width=200).print(t)


@app.command()
def run(
    config: str = typer.Option("configs/local.yaml", "--config", "-c", help="YAML config or preset name."),
    policy: Optional[str] = typer.Option(None, help="draft_only | target_only | rsd | oracle | router | fixed_rate"),
    threshold: Optional[float] = typer.Option(None, help="tau in [0, 1]."),
    limit: Optional[int] = typer.Option(None, help="First N problems."),
    dataset: Optional[str] = typer.Option(None, help="gsm8k, math500, ... or a .jsonl path."),
    split: Optional[str] = typer.Option(None, help="test or train."),
    out: Optional[Path] = typer.Option(None, help="Write chain traces as JSONL here."),
    address: Optional[str] = typer.Option(None, help="Ray address to join (default: start a local Ray)."),
    in_process: bool = typer.Option(False, "--in-process", help="Run without Ray (core engines in this process)."),
) -> None:
    """Solve problems with the step loop under one policy; print results and a summary."""
    try:
        cfg = load_cli_config(config, **{"policy.name": policy, "policy.threshold": threshold,
                                         "data.limit": limit, "data.dataset": dataset,
                                         "data.split": split, "runtime.address": address})
        from arbitrage.data import load_problems

        problems = load_problems(cfg.data)
    except USER_ERRORS as e:
        fail(str(e))
    items = [{"id": p.id, "problem": p.problem, "answer": p.answer} for p in problems]
    typer.echo(f"config={cfg.name} policy={cfg.policy.name} tau={cfg.policy.threshold} "
               f"problems={len(items)} dataset={cfg.data.dataset}/{cfg.data.split}", err=True)
    sink = out.open("a") if out else None
    done: list[dict] = []

    def on_result(r: dict) -> None:
        done.append(r)
        _print_result(len(done), len(items), r)
        if sink:
            sink.write(json.dumps(r) + "\n")
            sink.flush()

    t0 = time.perf_counter()
    try:
        _execute(cfg, items, on_result, in_process)
    except USER_ERRORS as e:
        fail(str(e))
    finally:
        if sink:
            sink.close()
    print_summary({(cfg.policy.name, cfg.policy.threshold): done}, time.perf_counter() - t0)


def _execute(cfg, items: list[dict], on_result, in_process: bool) -> None:
    """Run items through the Ray runtime, or in-process with the same loop."""
    if in_process:
        from arbitrage.runner import run_in_process

        run_in_process(cfg, items, on_result=on_result)
        return
    from cluster.runtime import Runtime

    with Runtime(cfg) as rt:
        rt.run(items, cfg.policy.name, cfg.policy.threshold, on_result=on_result)


def _thresholds(text: str) -> list[float] | dict[str, list[float]]:
    """`0.3,0.5,0.7` (every policy) or `rsd=0.65,0.7;router=0.4,0.5` (a list per policy)."""
    if "=" not in text:
        return _floats(text)
    out: dict[str, list[float]] = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        name, sep, vals = part.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--thresholds: expected policy=t1,t2,... separated by ';', got {part!r}")
        out[name.strip()] = _floats(vals)
    return out


def _floats(text: str) -> list[float]:
    try:
        vals = [float(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise ValueError(f"--thresholds must be comma-separated numbers, got {text!r}") from e
    bad = [v for v in vals if not 0.0 <= v <= 1.0]
    if bad:
        raise ValueError(f"--thresholds must lie in [0, 1], got {bad[0]}")
    return vals


@app.command("eval")
def eval_cmd(
    out: Path = typer.Option(..., "--out", help="Run folder (results.jsonl, segments.jsonl)."),
    config: str = typer.Option("configs/local.yaml", "--config", "-c"),
    dataset: Optional[str] = typer.Option(None), split: Optional[str] = typer.Option(None),
    limit: Optional[int] = typer.Option(None),
    policies: str = typer.Option("rsd,router", help="Comma-separated policies."),
    thresholds: str = typer.Option("0.5", help="Comma-separated thresholds in [0, 1] for every policy, "
                                   "or per policy: 'rsd=0.65,0.7;router=0.45,0.55'."),
    address: Optional[str] = typer.Option(None, help="Ray address to join."),
    in_process: bool = typer.Option(False, "--in-process", help="Run without Ray."),
    step_cache: bool = typer.Option(True, "--step-cache/--no-step-cache",
                                    help="Reuse greedy steps and PRM scores across the sweep's groups."),
    groups_arg: Optional[str] = typer.Option(
        None, "--groups", help="Explicit cells in run order instead of --policies x --thresholds, "
        "e.g. 'draft_only,rsd@0.7,router@0.55,target_only' (interleave policies so a partial run compares them)."),
) -> None:
    """Resumable sweep over policies x thresholds; one JSONL row per finished chain."""
    from configs.schema import POLICY_NAMES

    try:
        names = [p.strip() for p in policies.split(",") if p.strip()]
        unknown = [p for p in names if p not in POLICY_NAMES]
        if unknown:
            raise ValueError(f"unknown policy {unknown[0]!r}; choose from {', '.join(POLICY_NAMES)}")
        taus = _thresholds(thresholds)
        cfg = load_cli_config(config, **{"data.dataset": dataset, "data.split": split,
                                         "data.limit": limit, "runtime.address": address,
                                         "generation.step_cache": step_cache})
        from arbitrage.data import load_problems
        from cluster.evaluate import cache_line, parse_groups, run_sweep, sweep_groups

        problems = load_problems(cfg.data)
        groups = parse_groups(groups_arg) if groups_arg else sweep_groups(names, taus)
        for g in groups:  # each policy's models must be configured
            cfg.with_overrides(**{"policy.name": g.policy, "policy.threshold": g.threshold})
    except USER_ERRORS as e:
        fail(str(e))
    typer.echo(f"sweep: {len(problems)} problems x {len(groups)} groups -> {out}", err=True)
    try:
        if in_process:  # one backend for every group: models load once, the step cache spans the sweep
            from arbitrage.backend import LocalBackend
            from arbitrage.runner import roles_for, run_in_process

            roles = tuple(sorted({r for g in groups for r in roles_for(g.policy, cfg)}))
            backend = LocalBackend.from_config(cfg, roles=roles)
            done = run_sweep(cfg, problems, groups, out,
                             lambda items, p, t, cb: run_in_process(cfg, items, p, t, backend=backend, on_result=cb))
        else:
            from cluster.runtime import Runtime

            with Runtime(cfg) as rt:
                done = run_sweep(cfg, problems, groups, out,
                                 lambda items, p, t, cb: rt.run(items, p, t, on_result=cb))
    except USER_ERRORS as e:
        fail(str(e))
    from cluster.report import write_report

    table, _ = write_report(out)
    typer.echo(table)
    typer.echo(cache_line(done.values()))


@app.command("report")
def report_cmd(run_dir: Path = typer.Argument(..., help="A run folder written by `arbitrage eval`.")) -> None:
    """Metrics table and plots for a sweep folder."""
    from cluster.report import write_report

    try:
        table, plots = write_report(run_dir)
    except USER_ERRORS as e:
        fail(str(e))
    typer.echo(table)
    for p in plots:
        typer.echo(f"plot: {p}")


@app.command("setup-models")
def setup_models(config: str = typer.Option("configs/local.yaml", "--config", "-c")) -> None:
    """Assemble and convert the config's offline models once (cached)."""
    try:
        cfg = load_cli_config(config)
        from arbitrage.models import model_location

        for role in ("draft", "target", "prm"):
            m = getattr(cfg.models, role)
            if m is not None and m.source.kind in ("packaged", "gguf"):
                typer.echo(f"{role}: {model_location(m.source)}")
    except USER_ERRORS as e:
        fail(str(e))


# Commands that live in their own modules (heavy imports stay inside the functions).
from cluster.serve_cli import serve  # noqa: E402
app.command("serve")(serve)
from cluster.router_cli import collect, train_router, eval_router  # noqa: E402
app.command("collect")(collect)
app.command("train-router")(train_router)
app.command("eval-router")(eval_router)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
