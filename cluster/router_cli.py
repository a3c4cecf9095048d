"""`arbitrage collect`, `arbitrage train-router`, `arbitrage eval-router`: the router training pipeline.

The commands parse arguments and call the core (`arbitrage.collect`, `arbitrage.router_data`,
`arbitrage.router_train`); the only logic here is the Ray-runtime path of `collect`
(oracle chains on the coordinators, extra target samples through a driver-side
`RayBackend`). Bad input ends with one line on stderr and exit code 2.

    arbitrage collect --config local --dataset gsm8k --split train --limit 24 --out data/collect.jsonl
    arbitrage train-router --data data/collect.jsonl --out routers/local-minilm --backbone all-minilm-l6-v2
    arbitrage train-router --data data/collect.jsonl --out routers/local-probe --kind probe
    arbitrage eval-router --data data/collect.jsonl --router routers/local-minilm
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import typer


def _cli():
    import cluster.cli_common as cli

    return cli


def collect(
    out: Path = typer.Option(..., "--out", help="JSONL file of step rows (appended; resumable)."),
    config: str = typer.Option("configs/local.yaml", "--config", "-c", help="YAML config or preset name."),
    dataset: Optional[str] = typer.Option(None, help="gsm8k, math500, ... or a .jsonl path (default: the config's)."),
    split: Optional[str] = typer.Option(None, help="test or train (default: the config's data.split)."),
    limit: Optional[int] = typer.Option(None, help="First N problems (default: the config's data.limit)."),
    k: int = typer.Option(1, "--k", help="Target steps per step: 1 greedy + k-1 samples."),
    temperature: float = typer.Option(0.7, help="Temperature of the k-1 extra target samples."),
    concurrency: Optional[int] = typer.Option(None, help="Chains in flight (runtime.max_concurrent_chains)."),
    address: Optional[str] = typer.Option(None, help="Ray address to join (default: start a local Ray)."),
    in_process: bool = typer.Option(False, "--in-process", help="Run without Ray (core engines in this process)."),
) -> None:
    """Collect draft-vs-target step advantages along oracle chains (router training data)."""
    cli = _cli()
    try:
        if k < 1:
            raise ValueError(f"--k must be >= 1, got {k}")
        if k > 1 and temperature <= 0:
            raise ValueError(f"--temperature must be > 0 when --k > 1, got {temperature}")
        cfg = cli.load_cli_config(
            config,
            **{
                "data.dataset": dataset,
                "data.split": split,
                "data.limit": limit,
                "runtime.address": address,
                "runtime.max_concurrent_chains": concurrency,
            },
        )
        from arbitrage.collect import oracle_config
        from arbitrage.data import load_problems

        cfg = oracle_config(cfg)
        problems = load_problems(cfg.data)
    except cli.USER_ERRORS as e:
        cli.fail(str(e))
    from arbitrage.collect import load_collected, pending_items
    from cluster import console

    console.phase(
        f"collect: config={cfg.name} problems={len(problems)} dataset={cfg.data.dataset}/"
        f"{cfg.data.split} k={k} -> {out}"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    todo = pending_items(problems, load_collected(out))
    if not todo:
        console.phase(f"nothing to do: all {len(problems)} problems are in {out}")
        return
    if len(todo) < len(problems):
        console.phase(f"{len(problems) - len(todo)} of {len(problems)} problems done, resuming")
    try:
        models = cli.check_models(cfg, ("draft", "target", "prm") if in_process else None)
    except cli.USER_ERRORS as e:
        cli.fail(str(e))
    seen: list[int] = []
    from cluster.progress import StepProgress

    progress = StepProgress(len(todo), cfg.generation.max_steps, "oracle chains", enabled=console.shows("info"))

    def on_problem(r: dict, rows: list[dict]) -> None:
        from tqdm import tqdm

        seen.append(1)
        progress.chain_done(r)
        if rows:
            adv = [row["advantage"] for row in rows]
            tqdm.write(
                f"[{len(seen)}] {r['problem_id']}: steps={len(rows)} positive={sum(a > 0 for a in adv)} "
                f"A_mean={sum(adv) / len(adv):+.3f} correct={r['correct']} {r['wall_s']:.1f}s",
                file=sys.stdout,
            )
        else:
            tqdm.write(
                f"[{len(seen)}] {r['problem_id']}: FAILED ({r.get('error') or r['stop_reason']}); retried next run",
                file=sys.stdout,
            )

    try:
        if in_process:
            from arbitrage.collect import collect_in_process

            backend = cli.local_backend(cfg, ("draft", "target", "prm"), models)
            stats = collect_in_process(cfg, problems, out, k, temperature, backend=backend, on_problem=on_problem)
        else:
            with cli.runtime(cfg, models) as rt:
                stats = collect_on_runtime(cfg, problems, out, k, temperature, on_problem, rt=rt, progress=progress)
    except cli.USER_ERRORS as e:
        cli.fail(str(e))
    finally:
        progress.close()
    typer.echo(
        f"collect: {stats.problems_done_before} problems already done, {stats.problems_new} new "
        f"({stats.steps_new} steps), {stats.problems_failed} failed, {stats.elapsed_s:.0f}s",
        err=True,
    )


def collect_on_runtime(
    cfg, problems: list, out: Path, k: int, temperature: float, on_problem=None, rt=None, progress=None
):
    """`collect_in_process` on the Ray runtime: chains on the coordinators, extra samples from here.

    Args:
        cfg: the collection config (oracle policy, a PRM).
        problems, out, k, temperature, on_problem: as for `arbitrage.collect.collect_in_process`.
        rt: a started `cluster.runtime.Runtime` to use (default: start one for `cfg` here).
        progress: a `cluster.progress.StepProgress` to update from the coordinators' step counts.
    Returns:
        `arbitrage.collect.CollectStats`.
    """
    import asyncio

    from actors.backend import RayBackend
    from arbitrage.collect import Collection
    from cluster.progress import poll_coordinators
    from cluster.runtime import Runtime

    job = Collection(cfg, problems, out, k, temperature, on_problem)
    if not job.todo:
        return job.stats
    with (
        job,
        Runtime(cfg) if rt is None else nullcontext(rt) as rt,
        poll_coordinators(progress, rt.coordinators) if progress is not None else nullcontext(),
    ):
        backend = RayBackend(rt.handles)
        rt.run(job.todo, "oracle", 0.0, on_result=lambda r: asyncio.run(job.finish(backend, r)))
    return job.stats


def train_router(
    data: Path = typer.Option(..., "--data", help="JSONL written by `arbitrage collect`."),
    out: Path = typer.Option(..., "--out", help="Router folder to write."),
    kind: str = typer.Option(
        "classifier",
        help="classifier | probe | hidden (a head on the draft's hidden state; --data: a value PRM's scored.jsonl)",
    ),
    backbone: str = typer.Option(
        "all-minilm-l6-v2", help="classifier: a packaged model name, an HF folder, or random:<shape>."
    ),
    epochs: int = typer.Option(3, help="classifier: passes over the balanced training steps."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default: 3e-5 classifier, 0.05 probe, 3e-3 hidden)."),
    batch_size: int = typer.Option(16, help="classifier: batch size."),
    max_length: int = typer.Option(384, help="classifier: input truncation in tokens (left)."),
    save_dtype: str = typer.Option("float32", help="classifier: float32 | float16 | bfloat16 weights on disk."),
    probe_hidden: int = typer.Option(0, help="probe: MLP hidden units (0 = logistic regression)."),
    probe_steps: int = typer.Option(500, help="probe / hidden: full-batch optimisation steps."),
    init_prm: Optional[Path] = typer.Option(
        None,
        "--init-prm",
        help="hidden: start from this value PRM's head (`arbitrage train-prm --out`), negated: P(escalate) = 1 - V.",
    ),
    prior: Optional[float] = typer.Option(
        None, help="hidden: L2 pull towards the initial head (default: arbitrage.hidden_router.DEFAULT_PRIOR)."
    ),
    margin: float = typer.Option(0.0, help="Label y = 1[A > margin]."),
    val_fraction: float = typer.Option(0.2, help="Share of problems held out for validation."),
    seed: int = typer.Option(0, help="Seed of the split, the balancing and the training."),
) -> None:
    """Fine-tune a classifier router (or fit a probe router) on collected steps; writes router.json."""
    cli = _cli()
    try:
        from arbitrage.router_data import build_dataset, load_rows
        from arbitrage.router_train import KINDS, TrainSettings, train

        if kind not in KINDS:
            raise ValueError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if init_prm is not None and kind != "hidden":
            raise ValueError("--init-prm applies to --kind hidden only")
        if init_prm is not None and not (init_prm / "value_head.json").is_file():
            raise ValueError(
                f"--init-prm: {init_prm} is not a value PRM folder (no value_head.json); "
                "write one with `arbitrage train-prm`"
            )
        ds = build_dataset(load_rows(data), margin=margin, val_fraction=val_fraction, seed=seed)
        ts = TrainSettings(
            kind=kind,
            backbone=backbone,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            max_length=max_length,
            save_dtype=save_dtype,
            probe_hidden=probe_hidden,
            probe_steps=probe_steps,
            seed=seed,
            init_prm=str(init_prm) if init_prm else None,
            **({} if prior is None else {"prior": prior}),
        )
        typer.echo(f"train-router: {kind} on {json.dumps(ds.stats)}", err=True)
        t0 = time.perf_counter()
        _, info = train(ds, out, ts, data_path=str(data), log=lambda m: typer.echo(m, err=True))
    except cli.USER_ERRORS as e:
        cli.fail(str(e))
    typer.echo(
        f"train-router: wrote {out} in {time.perf_counter() - t0:.0f}s (final train loss {info['train_loss'][-1]:.4f})"
    )


def eval_router(
    data: Path = typer.Option(..., "--data", help="JSONL written by `arbitrage collect`."),
    router: Path = typer.Option(..., "--router", help="Router folder written by `arbitrage train-router`."),
    split: str = typer.Option("validation", help="validation (held-out problems) | train | all"),
    out: Optional[Path] = typer.Option(None, "--out", help="JSON file (default: <router>/eval_<split>.json)."),
    batch_size: int = typer.Option(32, help="Router batch size."),
    cv: int = typer.Option(
        0,
        "--cv",
        help="K > 1: K-fold cross-validation by problem, retraining the "
        "router's kind and settings per fold (every step held out once).",
    ),
) -> None:
    """Spearman(router prob, A) and ROC-AUC(y) on held-out steps, beside the draft-PRM ranking (RSD)."""
    cli = _cli()
    try:
        from arbitrage.router_train import cross_validate_folder, evaluate_folder, format_table

        if cv:
            report = cross_validate_folder(router, data, folds=cv, log=lambda m: typer.echo(m, err=True))
        else:
            report = evaluate_folder(router, data, split=split, batch_size=batch_size)
    except cli.USER_ERRORS as e:
        cli.fail(str(e))
    out = out or router / (f"eval_cv{cv}.json" if cv else f"eval_{split}.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    typer.echo(format_table(report))
    typer.echo(f"wrote {out}")
