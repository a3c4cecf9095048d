"""CPU benchmark of the embedded default: engines alone, then the step loop in-process and through Ray.

In one run on this machine (ratios are measured side by side; the machine is shared):
1. raw decode tok/s of each engine at batch 1 and 8 for the draft and the target
   (`hf`: transformers bf16 from the converted cache; `llamacpp`: the shipped Q4_K_M GGUF).
   A row decodes `--steps` forced tokens; decode tok/s = B * (steps - 1) / (t(steps) - t(1)),
   so both timed runs prefill the same prompts and the difference is pure decode.
2. the loop end to end: generated tok/s (draft + target tokens of finished chains / wall)
   for `draft_only`, `rsd` and `router` with 1 and `--chains` chains, in-process and through
   the Ray runtime (start-up excluded), on `--engine` (default llamacpp), GSM8K test problems.
Each loop cell also records where its wall time went (`split`): each engine's time inside
`llama_decode` and waiting for the CPU lock, the tokens it fed (prompt tails and generated
tokens), and the time outside decode (the loop, batching, RPCs, tokenization, sampling).
It prints the ratios the issue's goals name and writes JSON (`--out`).

    python benchmarks/cpu_bench.py --out benchmarks/results/cpu_bench.json
    python benchmarks/cpu_bench.py --skip-raw --cells draft_only --chains 8     # the loop only
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from arbitrage.types import SamplingParams, StepRequest  # noqa: E402

PROMPT = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/local.yaml")
    p.add_argument("--engines", default="hf,llamacpp", help="raw decode: comma list of hf, llamacpp")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--steps", type=int, default=48, help="forced tokens per timed raw-decode run")
    p.add_argument(
        "--prompt-repeats",
        type=int,
        default=1,
        help="raw decode: the prompt repeated this many times (6 gives about the loop's contexts, ~300 tokens)",
    )
    p.add_argument("--engine", default="llamacpp", help="engine of the loop measurements")
    p.add_argument("--cells", default="draft_only,rsd,router", help="policies of the loop measurements")
    p.add_argument("--chains", type=int, default=8, help="concurrent chains of the batched loop cells")
    p.add_argument("--problems", type=int, default=8, help="GSM8K test problems per batched loop cell")
    p.add_argument("--modes", default="in_process,ray")
    p.add_argument(
        "--hf-dtype", default="bfloat16", help="dtype of the hf engine (bf16 is slow on CPUs without AVX-512 BF16)"
    )
    p.add_argument("--skip-raw", action="store_true")
    p.add_argument("--out", default="benchmarks/results/cpu_bench.json")
    return p.parse_args(argv)


def load_cfg(path: str, engine: str, hf_dtype: str = "bfloat16"):
    from configs import load_config

    cfg = load_config(path)
    upd = {"models.draft.engine": engine, "models.target.engine": engine}
    if engine != "llamacpp":
        upd.update({"models.draft.dtype": hf_dtype, "models.target.dtype": hf_dtype})
    return cfg.with_overrides(**upd)


def raw_decode(cfg, role: str, batch_sizes: list[int], steps: int, repeats: int = 1) -> dict:
    """tok/s of pure decode at each batch size for one role's engine, after a prompt of
    `repeats` copies of PROMPT."""
    from arbitrage.models import load_engine

    mc = getattr(cfg.models, role).model_copy(update={"kv_cache_tokens": 0})  # no reuse between timed runs
    engine = load_engine(mc)
    out = {}
    try:
        for b in batch_sizes:

            def run(n: int) -> float:
                params = SamplingParams(max_tokens=n, forced_tokens=n)
                reqs = [
                    StepRequest(problem=f"{' '.join([PROMPT] * repeats)} (variant {i})", params=params)
                    for i in range(b)
                ]
                t0 = time.perf_counter()
                engine.generate_steps(reqs)  # noqa: F821 - the enclosing function's (its `del` confuses ruff)
                return time.perf_counter() - t0

            run(2)  # warm-up
            t1, tn = min(run(1) for _ in range(2)), min(run(steps) for _ in range(2))
            out[str(b)] = b * (steps - 1) / max(tn - t1, 1e-9)
            print(f"  {role:6s} b{b}: {out[str(b)]:6.1f} tok/s decode", flush=True)
    finally:
        if hasattr(engine, "close"):
            engine.close()
        del engine
        gc.collect()
    return out


SPLIT_COUNTERS = ("busy_s", "lock_wait_s", "decode_calls", "decode_tokens")  # LlamaCppStepEngine.stats


def engine_counters(rt=None, backend=None) -> dict[str, dict[str, float]]:
    """Draft and target engine counters now (`llama_decode` time, tokens fed), from the
    model actors' stats (Ray) or the in-process engines."""
    out: dict[str, dict[str, float]] = {}
    for role in ("draft", "target"):
        if rt is not None:
            reps = rt.stats()["roles"].get(role, {}).get("replicas", [])
            engines = [r.get("engine", {}) for r in reps]
        else:
            e = getattr(backend, role, None)
            engines = [dict(getattr(e, "stats", None) or {})]
        out[role] = {k: float(sum(en.get(k, 0) for en in engines)) for k in SPLIT_COUNTERS}
    return out


def stage_split(before: dict, after: dict, wall: float) -> dict:
    """Where a cell's wall time went: each engine inside llama_decode, waiting for the CPU lock,
    and the rest (the loop, batching, RPCs, tokenization, sampling in Python)."""
    d = {role: {k: after[role][k] - before[role][k] for k in SPLIT_COUNTERS} for role in after}
    busy = sum(v["busy_s"] for v in d.values())
    return {
        "engines": d,
        "decode_busy_s": busy,
        "outside_decode_s": wall - busy,
        "fed_tokens": sum(v["decode_tokens"] for v in d.values()),
    }


def loop_cell(cfg, policy: str, n_chains: int, n_problems: int, mode: str, rt=None, backend=None) -> dict:
    """Generated tok/s of one policy over `n_problems` with `n_chains` in flight."""
    from arbitrage.data import load_problems
    from arbitrage.runner import run_in_process

    cfg = cfg.with_overrides(**{"runtime.max_concurrent_chains": n_chains, "generation.step_cache": False})
    problems = load_problems(cfg.data.model_copy(update={"limit": n_problems, "split": "test"}))
    items = [{"id": p.id, "problem": p.problem, "answer": p.answer} for p in problems]
    before = engine_counters(rt, backend)
    t0 = time.perf_counter()
    if mode == "ray":
        rows = rt.run(items, policy, cfg.policy.threshold)
    else:
        rows = run_in_process(cfg, items, policy, cfg.policy.threshold, backend=backend)
    wall = time.perf_counter() - t0
    split = stage_split(before, engine_counters(rt, backend), wall)
    tokens = sum(r["draft_tokens"] + r["target_tokens"] for r in rows)
    accepted = sum(s["num_tokens"] for r in rows for s in r["steps"])
    res = {
        "policy": policy,
        "chains": n_chains,
        "problems": len(rows),
        "mode": mode,
        "wall_s": wall,
        "generated_tokens": tokens,
        "accepted_tokens": accepted,
        "tok_s": tokens / wall,
        "errors": sum(1 for r in rows if r.get("error")),
        "split": split,
    }
    print(
        f"  {mode:10s} {policy:11s} chains={n_chains:2d}: {res['tok_s']:6.1f} tok/s "
        f"({tokens} tokens in {wall:.1f}s, {res['errors']} errors); in llama_decode {split['decode_busy_s']:.1f}s "
        f"for {split['fed_tokens']:.0f} tokens fed, outside it {split['outside_decode_s']:.1f}s",
        flush=True,
    )
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    results: dict = {
        "config": args.config,
        "engine": args.engine,
        "steps": args.steps,
        "prompt_repeats": args.prompt_repeats,
        "raw": {},
        "loop": [],
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every cell, so a run cut short still leaves its figures
        results["ratios"] = ratios(results, args)
        out.write_text(json.dumps(results, indent=2) + "\n")

    bs = [int(b) for b in args.batch_sizes.split(",")]
    if not args.skip_raw:
        for engine in args.engines.split(","):
            cfg = load_cfg(args.config, engine, args.hf_dtype)
            print(f"raw decode, engine {engine}", flush=True)
            results["raw"][engine] = {
                role: raw_decode(cfg, role, bs, args.steps, args.prompt_repeats) for role in ("draft", "target")
            }
            save()
    cfg = load_cfg(args.config, args.engine)
    runs = [(c, n) for c in args.cells.split(",") if c for n in sorted({1, args.chains})]
    for mode in [m for m in args.modes.split(",") if m]:  # --modes "": raw decode only
        print(f"loop, {mode}, engine {args.engine}", flush=True)
        if mode == "ray":
            from cluster.runtime import Runtime

            where = Runtime(cfg)  # started once for every cell, stopped on exit
        else:
            from arbitrage.backend import LocalBackend

            where = contextlib.nullcontext(LocalBackend.from_config(cfg))
        with where as on:
            kw = {"rt": on} if mode == "ray" else {"backend": on}
            for c, n in runs:
                results["loop"].append(loop_cell(cfg, c, n, 1 if n == 1 else args.problems, mode, **kw))
                save()
    save()
    for k, v in results["ratios"].items():
        print(f"{k}: {v:.2f}" if isinstance(v, float) else f"{k}: {v}")
    print(f"wrote {args.out}")
    return 0


def ratios(res: dict, args) -> dict:
    """The issue's goal ratios, where the run measured both sides."""
    out: dict = {}
    raw = res["raw"]
    if "hf" in raw and "llamacpp" in raw:
        for role in ("draft", "target"):
            for b in raw["hf"][role]:
                out[f"llamacpp/hf raw {role} b{b}"] = raw["llamacpp"][role][b] / raw["hf"][role][b]
    cell = {(r["mode"], r["policy"], r["chains"]): r["tok_s"] for r in res["loop"]}
    eng = raw.get(args.engine, {}).get("draft", {})
    for mode in ("ray", "in_process"):
        if (mode, "draft_only", args.chains) in cell and str(args.chains) in eng:
            out[f"{mode} draft_only {args.chains} chains / raw b{args.chains}"] = (
                cell[(mode, "draft_only", args.chains)] / eng[str(args.chains)]
            )
        if (mode, "draft_only", 1) in cell and "1" in eng:
            out[f"{mode} draft_only 1 chain / raw b1"] = cell[(mode, "draft_only", 1)] / eng["1"]
        for p in ("rsd", "router"):
            if (mode, p, args.chains) in cell and (mode, "draft_only", args.chains) in cell:
                out[f"{mode} {p} / draft_only at {args.chains} chains"] = (
                    cell[(mode, p, args.chains)] / cell[(mode, "draft_only", args.chains)]
                )
    return out


if __name__ == "__main__":
    sys.exit(main())
