"""Decode benchmark: HF `StepEngine` vs `FastStepEngine`, ms per decode step against the weight-streaming floor.

For each random-weight shape (built directly on the device in bf16) it measures, in one run:
- the device copy bandwidth (read + written bytes of a large tensor copy, CUDA events);
- the floor per decode step = weight bytes / copy bandwidth (every weight read once);
- ms per decode step at each batch size for each engine: `hf` (StepEngine, eager, dynamic
  cache), `fast` (FastStepEngine with CUDA graphs), `fast_eager` (FastStepEngine without),
  `fast_gather` (CUDA graphs, decode attention as gather + SDPA instead of the Triton kernel).
  A decode step is timed as (t(forced_tokens=steps) - t(forced_tokens=1)) / (steps - 1):
  both runs prefill the same prompts, so the difference is `steps - 1` decode steps (with
  each engine's per-step sampling and bookkeeping).
It prints a table and writes JSON (`--out`). Each model and engine is freed before the next.

GPU (H200):  python benchmarks/engine_bench.py
CPU smoke:   python benchmarks/engine_bench.py --device cpu --shapes tiny-llama --out /tmp/engine_smoke.json
Long contexts, decode kernel vs gather (H200):
             python benchmarks/engine_bench.py --engines fast,fast_gather --batch-sizes 1,8,32,64 \
                 --prompt-len 1536 --max-context 2048 --steps 32 --out benchmarks/results/decode_kernel_h200.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from arbitrage.engine import HFStepEngine  # noqa: E402
from arbitrage.fast_engine import FastStepEngine  # noqa: E402
from arbitrage.tiny import SHAPES, byte_tokenizer, random_causal_lm  # noqa: E402
from arbitrage.types import SamplingParams, StepRequest  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ENGINES = ("hf", "fast", "fast_eager", "fast_gather")
GOALS = {"llama-3.1-8b": 1.6, "llama-3.2-1b": 3.0}  # fast engine, batch 1: ms / floor at most


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--shapes", default="llama-3.2-1b,llama-3.1-8b", help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma list of {', '.join(ENGINES)}")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per row")
    p.add_argument("--steps", type=int, default=64, help="forced tokens per timed run")
    p.add_argument("--reps", type=int, default=2, help="timed runs of each length (the minimum is kept)")
    p.add_argument("--max-context", type=int, default=1024, help="FastStepEngine slot length")
    p.add_argument("--out", default="benchmarks/results/engine.json", help="JSON results path")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available; use --device cpu --shapes tiny-llama")
    args.shape_list = [s.strip() for s in args.shapes.split(",")]
    bad = [s for s in args.shape_list if s not in SHAPES]
    if bad:
        p.error(f"unknown shapes {bad}; known: {', '.join(SHAPES)}")
    args.engine_list = [e.strip() for e in args.engines.split(",")]
    if set(args.engine_list) - set(ENGINES):
        p.error(f"--engines takes {', '.join(ENGINES)}")
    args.batches = [int(x) for x in args.batch_sizes.split(",")]
    args.torch_dtype = DTYPES[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    return args


# ---- measurements -----------------------------------------------------------------------
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: str, nbytes: int | None = None, iters: int = 10) -> float:
    """Bytes per second of a large device copy, counting bytes read plus bytes written."""
    nbytes = nbytes or (2 << 30 if device == "cuda" else 256 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            dst.copy_(src)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        t = time.perf_counter()
        for _ in range(iters):
            dst.copy_(src)
        seconds = time.perf_counter() - t
    del src, dst
    return 2 * nbytes * iters / seconds


def weight_bytes(model) -> int:
    """Bytes of the model's distinct parameter tensors (a tied embedding counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def requests(batch: int, prompt_len: int, forced: int) -> list[StepRequest]:
    """`batch` distinct raw prompts of exactly prompt_len byte tokens, no chain (no KV reuse)."""
    out = []
    for i in range(batch):
        text = (f"row {i}: " + "the quick brown fox jumps over the lazy dog " * (prompt_len // 40 + 2))[:prompt_len]
        out.append(StepRequest(problem=text, chat=False, params=SamplingParams(forced_tokens=forced)))
    return out


def timed(engine, reqs, device: str) -> float:
    sync(device)
    t = time.perf_counter()
    engine.generate_steps(reqs)
    sync(device)
    return time.perf_counter() - t


def decode_ms(engine, batch: int, args) -> dict:
    """ms per decode step of one engine at one batch size (and the prefill + first token ms)."""
    long, short = requests(batch, args.prompt_len, args.steps), requests(batch, args.prompt_len, 1)
    warm = timed(engine, long, args.device)  # first use: CUDA graph capture, cuBLAS autotuning
    t_long = min(timed(engine, long, args.device) for _ in range(args.reps))
    t_short = min(timed(engine, short, args.device) for _ in range(args.reps))
    ms = (t_long - t_short) / (args.steps - 1) * 1e3
    return {
        "ms_per_step": ms,
        "prefill_ms": t_short * 1e3,
        "warmup_s": warm,
        "tokens_per_s": batch * 1e3 / ms if ms > 0 else None,
    }


def build_engine(kind: str, model, tokenizer, args):
    if kind == "hf":
        return HFStepEngine(model, tokenizer, max_context=args.max_context)
    return FastStepEngine(
        model,
        tokenizer,
        max_context=args.max_context,
        max_slots=max(args.batches),
        use_cuda_graphs=kind != "fast_eager",
        decode_kernel=False if kind == "fast_gather" else None,
    )


def run_engine(kind: str, model, tokenizer, args, floor_ms: float) -> list[dict]:
    engine = build_engine(kind, model, tokenizer, args)
    rows = []
    try:
        for batch in args.batches:
            r = decode_ms(engine, batch, args)
            r.update(engine=kind, batch=batch, ratio_to_floor=r["ms_per_step"] / floor_ms)
            if kind != "hf":
                r.update(
                    kv_cache_gib=engine.kv_cache_bytes / 2**30, graphs=len(engine.graphs.graphs) if engine.graphs else 0
                )
            rows.append(r)
            print(
                f"  {kind:10s} B={batch:<3d} {r['ms_per_step']:8.3f} ms/step  x{r['ratio_to_floor']:.2f} floor",
                flush=True,
            )
    finally:
        if hasattr(engine, "close"):
            engine.close()
        del engine
        free(args.device)
    return rows


def run_shape(shape: str, args, bandwidth: float) -> dict:
    """Build one random-weight model on the device, time every engine on it, free it."""
    model = random_causal_lm(shape, device=args.device, dtype=args.torch_dtype)
    tokenizer = byte_tokenizer(model.config.vocab_size)
    wbytes = weight_bytes(model)
    floor_ms = wbytes / bandwidth * 1e3
    print(f"{shape}: {wbytes / 1e9:.2f} GB of weights, floor {floor_ms:.3f} ms/step", flush=True)
    rows = []
    try:
        for kind in args.engine_list:
            rows += [dict(r, shape=shape) for r in run_engine(kind, model, tokenizer, args, floor_ms)]
    finally:
        del model
        free(args.device)
    return {"shape": shape, "weight_bytes": wbytes, "floor_ms": floor_ms, "rows": rows}


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# ---- report -------------------------------------------------------------------------------
def goals(shapes: list[dict]) -> dict:
    """Batch-1 FastStepEngine ratio to floor against the issue's goals (8B <= 1.6x, 1B <= 3x)."""
    out = {}
    for s in shapes:
        if s["shape"] not in GOALS:
            continue
        r = next((r for r in s["rows"] if r["engine"] == "fast" and r["batch"] == 1), None)
        if r is not None:
            out[s["shape"]] = {
                "ratio": r["ratio_to_floor"],
                "goal": GOALS[s["shape"]],
                "met": r["ratio_to_floor"] <= GOALS[s["shape"]],
            }
    return out


def table(shapes: list[dict]) -> str:
    lines = [
        f"{'shape':14s} {'engine':10s} {'B':>3s} {'ms/step':>9s} {'floor ms':>9s} {'x floor':>8s} "
        f"{'tok/s':>9s} {'prefill ms':>10s}"
    ]
    for s in shapes:
        for r in s["rows"]:
            tps = f"{r['tokens_per_s']:9.0f}" if r["tokens_per_s"] else f"{'-':>9s}"
            lines.append(
                f"{s['shape']:14s} {r['engine']:10s} {r['batch']:3d} {r['ms_per_step']:9.3f} "
                f"{s['floor_ms']:9.3f} {r['ratio_to_floor']:8.2f} {tps} {r['prefill_ms']:10.1f}"
            )
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    bandwidth = copy_bandwidth(args.device)
    print(f"copy bandwidth: {bandwidth / 1e12:.3f} TB/s (read + write)", flush=True)
    t0 = time.perf_counter()
    shapes = [run_shape(s, args, bandwidth) for s in args.shape_list]
    import transformers

    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": str(args.torch_dtype),
        "prompt_len": args.prompt_len,
        "steps": args.steps,
        "max_context": args.max_context,
        "copy_bandwidth_Bps": bandwidth,
        "shapes": shapes,
        "goals": goals(shapes),
        "wall_s": time.perf_counter() - t0,
    }
    print(table(shapes))
    print("goals:", json.dumps(result["goals"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
