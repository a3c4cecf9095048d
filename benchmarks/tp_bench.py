"""Tensor-parallel decode benchmark: ms per decode step of a random-weight shape split N ways.

The model is built exactly as a target-group rank builds it (`actors/target_group.py`):
on the meta device, sharded by DeepSpeed AutoTP, each rank's slices generated at shard size
on its own device (no host copy of the whole model). One process per rank, started with
`torch.multiprocessing.spawn` (no torchrun, no Ray): NCCL on CUDA, gloo on CPU.

For each TP size and batch size it prefills a random prompt and times greedy decode steps
(one token per row per step), eager with a dynamic KV cache; with `--modes eager,compile` it
also times a static KV cache + `torch.compile` decode (`--compile-mode`, e.g.
"reduce-overhead" for CUDA graphs; errors are recorded, not raised). Mode `fast` serves the
shard with `FastStepEngine` exactly as a target-group rank with `engine: fast` does (own
forward, all-reduces inside CUDA graphs, lockstep batches) and times decode steps as
`benchmarks/engine_bench.py` does: (t(steps forced tokens) - t(1)) / (steps - 1). It also measures the
device copy bandwidth (read + write bytes of a large tensor copy) and reports the
weight-streaming floor = weight bytes per rank / copy bandwidth, the lower bound on a decode
step that reads every weight once.

GPU (H200 node):  python benchmarks/tp_bench.py --shape llama-3.1-70b --tp 4,8 --out benchmarks/results/tp_70b.json
CPU smoke test:   python benchmarks/tp_bench.py --device cpu --shape tiny-llama-wide --tp 1,2 --modes eager,fast --out /tmp/tp_smoke.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from arbitrage.sharding import (  # noqa: E402
    RandomWeights,
    apply_autotp,
    build_meta_model,
    materialize_,
    rebuild_buffers_,
    shard_plan,
    tied_keys,
)
from arbitrage.tiny import SHAPES, shape_config  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tp", default=None, help="comma list of TP sizes (default: all GPUs, or 2 on CPU)")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=32, help="timed decode steps")
    p.add_argument("--warmup", type=int, default=4, help="untimed decode steps first")
    p.add_argument("--modes", default="eager", help="comma list of: eager, compile, fast")
    p.add_argument("--max-context", type=int, default=1024, help="fast mode: KV slot length")
    p.add_argument("--reps", type=int, default=3, help="fast mode: timing repetitions (min taken)")
    p.add_argument("--compile-mode", default="reduce-overhead")
    p.add_argument("--cpu-threads", type=int, default=1, help="torch threads per rank on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="JSON results path")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available; use --device cpu --shape tiny-llama")
    default_tp = str(torch.cuda.device_count()) if args.device == "cuda" else "2"
    args.tp_sizes = [int(x) for x in (args.tp or default_tp).split(",")]
    args.batches = [int(x) for x in args.batch_sizes.split(",")]
    args.mode_list = [m.strip() for m in args.modes.split(",")]
    args.torch_dtype = DTYPES[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    if args.device == "cuda" and max(args.tp_sizes) > torch.cuda.device_count():
        p.error(f"--tp {max(args.tp_sizes)} > {torch.cuda.device_count()} visible GPUs")
    return args


# ---- one rank ------------------------------------------------------------------------
def setup_rank(rank: int, tp: int, device: str, port: int) -> torch.device:
    """Join the TP world (NCCL on CUDA, gloo on CPU) and pick this rank's device."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(tp), LOCAL_RANK=str(rank)
    )
    dev = torch.device("cuda", rank) if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if tp > 1:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, rank=rank, world_size=tp)
    return dev


def build_shard(shape: str, tp: int, dtype: torch.dtype, device: torch.device, seed: int):
    """This rank's shard of a random-weight shape, built like a target-group rank builds it."""
    hf_config = shape_config(shape)
    model = build_meta_model(hf_config, dtype)
    tied = tied_keys(model)
    apply_autotp(model, tp, dtype)
    materialize_(model, shard_plan(model, tied), RandomWeights(seed, hf_config.initializer_range), dtype, device)
    rebuild_buffers_(model, device)
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int, iters: int = 10) -> float:
    """Device copy bandwidth in bytes/s, counting read + write."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    sync(device)
    return 2 * src.numel() * 4 * iters / (time.perf_counter() - t0)


def _cache_kwarg(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def time_decode(model, batch: int, args, device: torch.device, compiled: bool) -> tuple[float, torch.Tensor]:
    """ms per greedy decode step (batch rows, one token each) after a prefill of prompt_len.

    Returns:
        (ms per step, logits of the first decode step [B, V] float32 on CPU, for checks).
    """
    from transformers import DynamicCache, StaticCache

    total = args.prompt_len + args.warmup + args.steps + 2
    cache = StaticCache(config=model.config, max_cache_len=total) if compiled else DynamicCache()
    kw = {_cache_kwarg(model): cache}
    gen = torch.Generator().manual_seed(args.seed + batch)  # same prompt on every rank
    ids = torch.randint(0, model.config.vocab_size, (batch, args.prompt_len), generator=gen).to(device)

    def forward(x):  # x: [B, S] -> logits of the last position [B, V]
        return model(input_ids=x, use_cache=True, logits_to_keep=1, **kw).logits[:, -1]

    step = torch.compile(forward, mode=args.compile_mode, dynamic=False) if compiled else forward
    with torch.inference_mode():
        nxt = forward(ids).argmax(-1, keepdim=True)  # prefill, eager: [B, 1]
        logits = step(nxt)
        first = logits.float().cpu()  # copied now: CUDA graphs reuse their output buffer
        nxt = logits.argmax(-1, keepdim=True)
        for _ in range(args.warmup):
            nxt = step(nxt).argmax(-1, keepdim=True)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            nxt = step(nxt).argmax(-1, keepdim=True)
        sync(device)
    return (time.perf_counter() - t0) / args.steps * 1e3, first


def weight_bytes(model) -> int:
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() * p.element_size() for p in params)


def max_over_ranks(value: float, device: torch.device, tp: int) -> float:
    if tp == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t.item())


def measure(model, args, device: torch.device, tp: int) -> list[dict]:
    """One row per (mode, batch size); step times are the slowest rank's.

    Compiled rows carry `logits_rel_err`: their first decode step against the eager one
    (a dropped all-reduce would show as an error of order 1; bf16 noise is ~1e-2).
    """
    rows, eager_logits = [], {}
    for mode in args.mode_list:
        if mode == "fast":
            rows += measure_fast(model, args, device, tp)
            continue
        for b in args.batches:
            row = {"mode": mode, "batch": b}
            try:
                ms, logits = time_decode(model, b, args, device, compiled=(mode == "compile"))
                row.update(ms_per_step=max_over_ranks(ms, device, tp))
                row["tokens_per_s"] = b / row["ms_per_step"] * 1e3
                if mode == "eager":
                    eager_logits[b] = logits
                elif b in eager_logits:
                    ref = eager_logits[b]
                    row["logits_rel_err"] = float((logits - ref).norm() / ref.norm())
            except Exception as e:  # recorded: OOM at a large batch, a compile failure
                row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:500]
                if tp > 1 and mode == "eager":
                    raise  # ranks may be out of step: stop rather than hang
            rows.append(row)
    return rows


def measure_fast(model, args, device: torch.device, tp: int) -> list[dict]:
    """FastStepEngine on this rank's shard: ms per decode step per batch size (slowest rank)."""
    from arbitrage.sharding import tp_layout
    from arbitrage.fast_engine import FastStepEngine
    from arbitrage.tiny import byte_tokenizer
    from benchmarks.engine_bench import decode_ms

    engine = FastStepEngine(
        model, byte_tokenizer(), max_context=args.max_context, max_slots=max(args.batches), tp=tp_layout(model, tp)
    )
    rows = []
    try:
        for b in args.batches:
            r = decode_ms(engine, b, args)
            rows.append(
                {
                    "mode": "fast",
                    "batch": b,
                    "ms_per_step": max_over_ranks(r["ms_per_step"], device, tp),
                    "prefill_ms": r["prefill_ms"],
                    "warmup_s": r["warmup_s"],
                    "graphs": len(engine.graphs.graphs) if engine.graphs else 0,
                }
            )
            rows[-1]["tokens_per_s"] = b / rows[-1]["ms_per_step"] * 1e3
    finally:
        engine.close()
    return rows


def rank_main(rank: int, tp: int, args: argparse.Namespace, port: int, out_path: str) -> None:
    """Spawned per rank: build the shard, measure, and (rank 0) write this TP size's result."""
    device = setup_rank(rank, tp, args.device, port)
    if device.type == "cpu":
        torch.set_num_threads(args.cpu_threads)
    t0 = time.perf_counter()
    model = build_shard(args.shape, tp, args.torch_dtype, device, args.seed)
    build_s = time.perf_counter() - t0
    wbytes = max_over_ranks(weight_bytes(model), device, tp)
    bw = copy_bandwidth(device, (2 << 30) if device.type == "cuda" else (256 << 20))
    rows = measure(model, args, device, tp)
    if rank == 0:
        floor_ms = wbytes / bw * 1e3
        result = {
            "tp": tp,
            "build_s": round(build_s, 2),
            "weight_bytes_per_rank": int(wbytes),
            "copy_bw_bytes_per_s": bw,
            "floor_ms": floor_ms,
            "rows": rows,
            "max_memory_allocated": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        }
        Path(out_path).write_text(json.dumps(result))
    if tp > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# ---- driver ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_tp(tp: int, args: argparse.Namespace) -> dict:
    """Spawn tp rank processes and return rank 0's result."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        mp.spawn(rank_main, args=(tp, args, free_port(), out), nprocs=tp, join=True)
        return json.loads(Path(out).read_text())


def environment(args: argparse.Namespace) -> dict:
    import transformers

    try:
        import deepspeed

        ds = deepspeed.__version__
    except ImportError:
        ds = None
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else None
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "deepspeed": ds,
        "device": gpu or "cpu",
        "gpus": torch.cuda.device_count() if args.device == "cuda" else 0,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    report = {
        "shape": args.shape,
        "dtype": str(args.torch_dtype).removeprefix("torch."),
        "prompt_len": args.prompt_len,
        "steps": args.steps,
        "modes": args.mode_list,
        "env": environment(args),
        "results": [],
    }
    for tp in args.tp_sizes:
        res = run_tp(tp, args)
        report["results"].append(res)
        for row in res["rows"]:
            msg = f"{row['ms_per_step']:.2f} ms/step" if "ms_per_step" in row else row["error"]
            if "logits_rel_err" in row:
                msg += f", logits rel err vs eager {row['logits_rel_err']:.1e}"
            print(
                f"{args.shape} tp={tp} {row['mode']} b={row['batch']}: {msg} (floor {res['floor_ms']:.2f} ms)",
                flush=True,
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
