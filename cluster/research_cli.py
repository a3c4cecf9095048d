"""`arbitrage label`: correctness-grounded step values for collected router rows.

Parses arguments and calls the core (`arbitrage.label`); rollouts run as `draft_only`
chains of the one step loop, in this process (`--in-process`, the default: one process
holding the draft is fastest on one CPU) or on the Ray runtime. Bad input ends with one
line on stderr and exit code 2.

    arbitrage label --data data/collect.jsonl --out data/labels.jsonl --k 4 --temperature 0.7
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer


def _cli():
    import cluster.cli_common as cli

    return cli


def label(
    data: Path = typer.Option(..., "--data", help="Collected step rows (JSONL from `arbitrage collect`)."),
    out: Path = typer.Option(..., "--out", help="Labelled rows (JSONL, appended; resumable)."),
    config: str = typer.Option(
        "configs/local.yaml", "--config", "-c", help="YAML config or preset name; its draft writes the rollouts."
    ),
    k: int = typer.Option(4, "--k", help="Rollouts per step (V = share of the k that reach the gold answer)."),
    temperature: float = typer.Option(0.7, help="Rollout sampling temperature (> 0)."),
    limit_rows: Optional[int] = typer.Option(None, "--limit-rows", help="Label only the first N rows."),
    problems_from: str = typer.Option(
        "gsm8k:train",
        "--solutions",
        help="DATASET:SPLIT whose reference solutions feed the GSM8K reference check ('none' to skip).",
    ),
    concurrency: Optional[int] = typer.Option(None, help="Rollout chains in flight (runtime.max_concurrent_chains)."),
    in_process: bool = typer.Option(True, "--in-process/--ray", help="Roll out in this process (default) or on Ray."),
) -> None:
    """Monte-Carlo step values V(prefix + step) and A_mc = V(target) - V(draft) for collected rows."""
    cli = _cli()
    from arbitrage.label import LabelSettings, label_rows, label_statistics, read_labelled

    try:
        ls = LabelSettings(k=k, temperature=temperature)
        rows = _read_rows(data)[:limit_rows] if limit_rows else _read_rows(data)
        rows = with_prefix_tokens(rows)
        cfg = cli.load_cli_config(
            config,
            **{
                "generation.temperature": temperature,
                "runtime.max_concurrent_chains": concurrency,
                "models.router": None,
                "models.prm": None,
            },
        )
        solutions = _solutions(problems_from)
    except cli.USER_ERRORS as e:
        cli.fail(str(e))
    from cluster import console

    done = read_labelled(out)
    todo = [r for r in rows if f"{r['problem_id']}@{r['step_index']}" not in done]
    console.phase(f"label: {len(rows)} rows from {data}, k={k} at T={temperature} -> {out}")
    if not todo:
        console.phase(f"nothing to do: all {len(rows)} rows are in {out}")
        _print_stats(label_statistics(read_labelled(out).values()))
        return
    if done:
        console.phase(f"{len(rows) - len(todo)} of {len(rows)} rows done, resuming")
    from tqdm import tqdm

    bar = tqdm(
        total=len(todo),
        desc="rows labelled",
        unit="row",
        file=sys.stderr,
        disable=not console.shows("info"),
        dynamic_ncols=True,
    )
    try:
        models = cli.check_models(cfg, ("draft",))
        if in_process:
            backend = cli.local_backend(cfg, ("draft",), models)

            def run(items, on_result):
                from arbitrage.runner import run_in_process

                run_in_process(cfg, items, "draft_only", 0.0, backend=backend, on_result=on_result)

            stats = label_rows(
                rows, out, ls, run, solutions, cfg.generation.step_separator, on_row=lambda _: bar.update(1)
            )
        else:
            with cli.runtime(cfg, models) as rt:
                stats = label_rows(
                    rows,
                    out,
                    ls,
                    lambda items, cb: rt.run(items, "draft_only", 0.0, on_result=cb),
                    solutions,
                    cfg.generation.step_separator,
                    on_row=lambda _: bar.update(1),
                )
    except cli.USER_ERRORS as e:
        cli.fail(str(e))
    finally:
        bar.close()
    typer.echo(
        f"label: {stats['done_before']} rows already done, {stats['labelled']} new, "
        f"{stats['rollouts']} rollouts ({stats['failed_rollouts']} failed)",
        err=True,
    )
    _print_stats(label_statistics(read_labelled(out).values()))


def with_prefix_tokens(rows: list[dict]) -> list[dict]:
    """Each row with `prefix_tokens`: the tokens of the accepted steps before it (from its problem's rows)."""
    by_pid: dict[str, dict[int, dict]] = {}
    for r in rows:
        by_pid.setdefault(str(r["problem_id"]), {})[int(r["step_index"])] = r
    out = []
    for r in rows:
        steps = by_pid[str(r["problem_id"])]
        used = 0
        for i in range(int(r["step_index"])):
            prev = steps.get(i)
            if prev is None:
                used = 0
                break
            used += prev["draft_tokens"] if prev["author"] == "draft" else prev["targets"][0]["num_tokens"]
        out.append({**r, "prefix_tokens": used})
    return out


def _read_rows(path: Path) -> list[dict]:
    from arbitrage.prm_train import read_rows

    return read_rows(
        path, lambda r: (r["problem_id"], r["step_index"], r["draft"], r["targets"][0]["text"]), "a collected step row"
    )


def _solutions(spec: str) -> dict[str, str] | None:
    if spec == "none":
        return None
    dataset, _, split = spec.partition(":")
    from arbitrage.data import load_problems
    from configs.schema import DataConfig

    problems = load_problems(DataConfig(dataset=dataset, split=split or "train", limit=None))
    return {p.id: p.meta.get("solution") for p in problems if p.meta.get("solution")}


def _print_stats(st: dict) -> None:
    if not st.get("rows"):
        return
    agree = "-" if st["ref_mc_agreement"] is None else f"{st['ref_mc_agreement']:.2f}"
    typer.echo(
        f"labels: {st['rows']} rows / {st['problems']} problems; ties {st['ties']} ({st['tie_share']:.0%}); "
        f"non-tie A_mc > 0: {st['a_mc_positive']}, < 0: {st['a_mc_negative']}, = 0: {st['a_mc_zero_non_tie']}; "
        f"V histogram {st['v_histogram']}; reference check agrees with V>=0.5 on {agree} of "
        f"{st['ref_checked_steps']} steps"
    )


def train_prm(
    data: Path = typer.Option(..., "--data", help="Labelled rows (JSONL from `arbitrage label`)."),
    out: Path = typer.Option(..., "--out", help="Folder for the trained value head."),
    config: str = typer.Option("configs/local.yaml", "--config", "-c", help="YAML config or preset name."),
    backbone: str = typer.Option("draft", help="Whose hidden state the head reads: draft or target."),
    val_fraction: float = typer.Option(0.2, help="Share of problems held out for the report."),
    seed: int = typer.Option(0, help="Split and initialisation seed."),
) -> None:
    """Fit a value-head PRM (kind `value`) to Monte-Carlo step values; report held-out AUCs."""
    cli = _cli()
    from arbitrage.prm_train import load_labelled
    from arbitrage.prm_train import train_prm as fit

    try:
        if backbone not in ("draft", "target"):
            raise ValueError(f"--backbone must be draft or target, got {backbone!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in (0, 1), got {val_fraction}")
        rows = load_labelled(data)
        cfg = cli.load_cli_config(config)
        mc = getattr(cfg.models, backbone)
        if mc.engine != "llamacpp":
            raise ValueError(
                f"models.{backbone}.engine: train-prm reads hidden states through the llamacpp "
                f"engine, not {mc.engine!r}"
            )
    except cli.USER_ERRORS as e:
        cli.fail(str(e))
    from tqdm import tqdm

    from arbitrage.models import load_engine
    from cluster import console

    console.phase(f"train-prm: {len(rows)} labelled rows from {data}, backbone {backbone} -> {out}")
    engine = load_engine(mc.model_copy(update={"hidden_states": True}))
    n_ex = len(
        {
            (r["problem_id"], tuple(t for _, t in r["history"]), s)
            for r in rows
            for s in (r["draft"], r["targets"][0]["text"])
        }
    )
    bar = tqdm(total=n_ex, desc="hidden states", unit="step", file=sys.stderr, disable=not console.shows("info"))
    try:
        report = fit(
            rows,
            engine,
            out,
            backbone,
            cfg.prompt.system_prompt,
            cfg.prompt.use_chat_template,
            val_fraction=val_fraction,
            seed=seed,
            progress=bar.update,
        )
    finally:
        bar.close()
        engine.close()
    v = report["validation"]
    step, jstep = v["step"], v.get("judge_step") or {}

    def f(x):
        return "-" if x is None else f"{x:.3f}"

    typer.echo(
        f"value PRM ({backbone}, width {report['training']['width']}) on {report['validation_problems']} "
        f"held-out problems: step AUC(V>=0.5) {f(step['auc_v_ge_half'])}, Spearman(V) {f(step['spearman_v'])}, "
        f"chain AUC(min step) {f(v['chain_auc_min_step'])}; judge: step AUC {f(jstep.get('auc_v_ge_half'))}, "
        f"chain AUC {f(v['judge_chain_auc_min_step'])}"
    )
    typer.echo(f"head: {out}")
