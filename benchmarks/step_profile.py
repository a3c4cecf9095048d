"""Where a step's time goes: the draft engine alone, THE loop in-process, and the Ray runtime.

One chain, `draft_only`, forced 64-token steps, random weights at a real shape (the
runtime benchmark's config). For each layer of the stack it prints the wall time per step
and the engine's own scheduler-thread time per step (prefill / decode / idle, from
`FastStepEngine.stats`), so the gap between layers is the cost of that layer.

    python benchmarks/step_profile.py --out benchmarks/results/step_profile_h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from benchmarks.runtime_bench import bench_config, problems  # noqa: E402


def engine_delta(before: dict, after: dict, steps: int) -> dict:
    return {k: (after[k] - before[k]) / steps * 1e3 for k in ("prefill_s", "decode_s", "idle_s")} | {
        "decode_steps": (after["decode_steps"] - before["decode_steps"]) / steps
    }


def engine_alone(engine, cfg, n_steps: int) -> dict:
    """generate_steps of one chain's growing prompt, as the loop would send it."""
    from arbitrage.types import SamplingParams, StepRequest

    g = cfg.generation
    params = SamplingParams(max_tokens=g.max_step_tokens, forced_tokens=g.forced_step_tokens)
    item = problems(1, "alone")[0]
    steps: list[str] = []
    before, t0, walls = dict(engine.stats), time.perf_counter(), []
    for _ in range(n_steps):
        t = time.perf_counter()
        out = engine.generate_steps(
            [
                StepRequest(
                    problem=item["problem"],
                    steps=tuple(steps),
                    system=cfg.prompt.system_prompt,
                    params=params,
                    chain_id="alone",
                )
            ]
        )[0]
        walls.append((time.perf_counter() - t) * 1e3)
        steps.append(out.text)
    total = (time.perf_counter() - t0) / n_steps * 1e3
    return {"ms_per_step": total, "step_ms": walls, "engine_ms_per_step": engine_delta(before, engine.stats, n_steps)}


def profile_scheduler(engine, cfg, n_steps: int, top: int = 25) -> str:
    """cProfile of the engine's scheduler thread (admission + prefill, decode) over n_steps."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    admit, decode = engine._admit, engine._decode_step
    engine._admit = lambda: prof.runcall(admit)
    engine._decode_step = lambda: prof.runcall(decode)
    try:
        engine_alone(engine, cfg, n_steps)
    finally:
        engine._admit, engine._decode_step = admit, decode
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--draft", default="llama-3.2-1b")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--step-tokens", type=int, default=64)
    ap.add_argument("--max-context", type=int, default=4096)
    ap.add_argument("--num-cpus", type=int, default=8)
    ap.add_argument("--cprofile", action="store_true", help="also print a cProfile of the engine thread")
    ap.add_argument("--engine-only", action="store_true", help="skip the loop and Ray parts")
    ap.add_argument("--out", default="benchmarks/results/step_profile.json")
    a = ap.parse_args()
    # the runtime benchmark's config, draft only
    a.engine, a.target, a.rate, a.max_chains, a.max_wait_ms, a.router = "fast", a.draft, 0.0, 1, 2.0, ""
    a.gpu_fraction = a.target_gpus = 0.45
    a.target_tp = 1
    cfg = bench_config(a)
    from arbitrage.backend import LocalBackend
    from arbitrage.models import load_engine
    from arbitrage.runner import run_in_process

    result = {"args": vars(a)}
    engine = load_engine(cfg.models.draft)
    engine_alone(engine, cfg, 2)  # warm-up: graph capture
    result["engine_alone"] = engine_alone(engine, cfg, a.steps)
    if a.cprofile:
        print(profile_scheduler(engine, cfg, a.steps), flush=True)
    if a.engine_only:
        e = result["engine_alone"]
        print(f"engine_alone {e['ms_per_step']:.1f} ms/step {e['engine_ms_per_step']}")
        Path(a.out).write_text(json.dumps(result, indent=2, default=str))
        return
    backend = LocalBackend(draft=engine)
    run_in_process(cfg, problems(1, "warm-loop"), "draft_only", 0.0, backend=backend)
    before, t0 = dict(engine.stats), time.perf_counter()
    res = run_in_process(cfg, problems(1, "loop"), "draft_only", 0.0, backend=backend)
    n = res[0]["num_steps"]
    result["loop_in_process"] = {
        "ms_per_step": (time.perf_counter() - t0) / n * 1e3,
        "engine_ms_per_step": engine_delta(before, engine.stats, n),
    }
    engine.close()
    del engine, backend
    import torch

    torch.cuda.empty_cache() if a.device == "cuda" else None
    from cluster.runtime import Runtime

    with Runtime(cfg) as rt:
        rt.run(problems(1, "warm-ray"), "draft_only", 0.0)
        before = rt.stats()["roles"]["draft"]["replicas"][0]["engine"]
        t0 = time.perf_counter()
        res = rt.run(problems(1, "ray"), "draft_only", 0.0)
        dt = time.perf_counter() - t0
        after = rt.stats()["roles"]["draft"]["replicas"][0]["engine"]
        n = res[0]["num_steps"]
        result["ray_runtime"] = {"ms_per_step": dt / n * 1e3, "engine_ms_per_step": engine_delta(before, after, n)}
    for k in ("engine_alone", "loop_in_process", "ray_runtime"):
        r = result[k]
        e = r["engine_ms_per_step"]
        print(
            f"{k:16s} {r['ms_per_step']:8.1f} ms/step  engine: prefill {e['prefill_s']:.1f} decode "
            f"{e['decode_s']:.1f} idle {e['idle_s']:.1f} ms/step, {e['decode_steps']:.0f} decode forwards/step",
            flush=True,
        )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
