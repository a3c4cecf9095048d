"""Quantized draft on the GPU: decode ms per step and memory of bf16 vs torchao weight-only int8 / int4.

The model is the qwen-math-7b-q3 preset's draft shape (Qwen2.5-Math-7B, from
`arbitrage.memory_plan.ARCHITECTURES`) with random weights, built on the GPU in bf16 and then
quantized in place by `arbitrage.quant.quantize_weights` (the code `load_causal_lm` runs), and
decoded by `FastStepEngine` (CUDA graphs, the preset's engine). Variants:

- `bf16`: no quantization (the engine fuses q/k/v and gate/up into one GEMM each);
- `int8`: `Int8WeightOnlyConfig` (per-row scales);
- `int4`: `Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")`:
  PyTorch's own tinygemm kernel, what `quantization: int4` uses;
- `int4-mslk`: `quantization: int4_mslk`, torchao's default int4 packing ("plain"), whose
  kernels are in the `mslk-cuda` package (only when it imports).

Per variant: the GPU bytes the weights take (torch.cuda.memory_allocated after quantizing, and
the tensors' own bytes), the relative error of the logits of one 64-token prompt against bf16
(same seed, same weights), and ms per decode step at each batch size, timed as
engine_bench.py times it ((t(64 forced tokens) - t(1)) / 63, the minimum of `--reps` runs, after
one warm-up run that captures the CUDA graphs). JSON goes to `--out` after every variant.

    python benchmarks/quant_bench.py --out benchmarks/results/quant_h200.json
    python benchmarks/quant_bench.py --device cpu --shape tiny --variants bf16,int8 --batch-sizes 1  # smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # run from anywhere

from arbitrage.fast_engine import FastStepEngine  # noqa: E402
from arbitrage.memory_plan import ARCHITECTURES  # noqa: E402
from arbitrage.quant import quantize_weights, weight_bytes  # noqa: E402
from arbitrage.tiny import byte_tokenizer, shape_config  # noqa: E402
from engine_bench import copy_bandwidth, decode_ms  # noqa: E402

VARIANTS = ("bf16", "int8", "int4", "int4-mslk")
SHAPE = "Qwen/Qwen2.5-Math-7B-Instruct"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--shape", default="qwen2.5-math-7b", help="qwen2.5-math-7b or tiny (smoke)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--max-context", type=int, default=1024)
    p.add_argument("--budget-s", type=float, default=400, help="skip the remaining variants after this")
    p.add_argument("--out", default="benchmarks/results/quant.json")
    a = p.parse_args(argv)
    a.batches = [int(b) for b in a.batch_sizes.split(",")]
    a.variant_list = [v.strip() for v in a.variants.split(",")]
    return a


def build(shape: str, device: str, seed: int = 0):
    """A random-weight Qwen2 causal LM at the preset draft's shape (or a tiny one), bf16 on `device`."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    if shape == "tiny":
        cfg = shape_config("tiny-qwen2", hidden_size=128, intermediate_size=256)
    else:
        a = ARCHITECTURES[SHAPE]
        cfg = Qwen2Config(
            hidden_size=a.hidden,
            intermediate_size=a.intermediate,
            num_hidden_layers=a.layers,
            num_attention_heads=a.heads,
            num_key_value_heads=a.kv_heads,
            vocab_size=a.vocab,
            max_position_embeddings=a.max_positions,
            rope_theta=10000.0,
            tie_word_embeddings=a.tied,
        )
        base = shape_config("tiny-qwen2")  # the byte tokenizer's special ids
        cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id = base.pad_token_id, base.eos_token_id, base.bos_token_id
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return model.eval()


def quantize(model, variant: str, device: str):
    """`arbitrage.quant.quantize_weights` with the variant's scheme (int4-mslk: scheme int4_mslk)."""
    if variant == "bf16":
        return model
    return quantize_weights(model, variant.replace("-", "_"), device)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def run_variant(variant: str, args, ref_logits: torch.Tensor | None, ids: torch.Tensor) -> dict:
    dev = args.device
    free(dev)
    base = torch.cuda.memory_allocated() if dev == "cuda" else 0
    t0 = time.perf_counter()
    model = build(args.shape, dev)
    model = quantize(model, variant, dev)
    sync(dev)
    free(dev)
    row = {
        "variant": variant,
        "build_quantize_s": time.perf_counter() - t0,
        "weight_bytes": weight_bytes(model),
        "linear_type": type(model.model.layers[0].mlp.gate_proj.weight).__name__,
    }
    if dev == "cuda":
        row["gpu_bytes_resident"] = torch.cuda.memory_allocated() - base
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0].float().cpu()
    row["logits"] = logits if ref_logits is None else None
    if ref_logits is not None:
        row["logits_rel_err"] = float((logits - ref_logits).norm() / ref_logits.norm())
        row["argmax_agree"] = float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean())
    tok = byte_tokenizer(model.config.vocab_size)
    engine = FastStepEngine(model, tok, max_context=args.max_context, max_slots=max(args.batches))
    try:
        row["kv_cache_gib"] = engine.kv_cache_bytes / 2**30
        row["fused_qkv"] = len(engine.lm.layers[0].qkv) == 1
        row["batches"] = {}
        for b in args.batches:
            r = decode_ms(engine, b, args)
            row["batches"][b] = r
            print(f"  {variant:9s} B={b:<3d} {r['ms_per_step']:8.3f} ms/step", flush=True)
        if dev == "cuda":
            row["gpu_peak_bytes"] = torch.cuda.max_memory_allocated() - base
    finally:
        engine.close()
        del engine, model
        free(dev)
    return row


def table(rows: list[dict], batches: list[int]) -> str:
    head = f"{'variant':10s} {'weights GB':>10s} {'GPU GB':>7s} {'rel err':>8s} " + " ".join(
        f"{'B=' + str(b) + ' ms':>9s}" for b in batches
    )
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['variant']:10s} error: {r['error'][:120]}")
            continue
        ms = " ".join(f"{r['batches'][b]['ms_per_step']:9.3f}" for b in batches)
        gpu = r.get("gpu_bytes_resident", 0) / 1e9
        err = r.get("logits_rel_err")
        lines.append(
            f"{r['variant']:10s} {r['weight_bytes'] / 1e9:10.2f} {gpu:7.2f} "
            f"{'-' if err is None else format(err, '.4f'):>8s} {ms}"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    info = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "shape": SHAPE if args.shape != "tiny" else "tiny",
        "args": {k: v for k, v in vars(args).items() if k not in ("batches", "variant_list")},
    }
    try:
        import torchao

        info["torchao"] = torchao.__version__
    except ImportError:
        info["torchao"] = None
    if args.device == "cuda":
        info["copy_bandwidth_GBps"] = copy_bandwidth("cuda") / 1e9
    torch.manual_seed(1)
    ids = torch.randint(300, 30000 if args.shape != "tiny" else 320, (1, 64)).to(args.device)
    rows, ref = [], None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for v in args.variant_list:
        if time.perf_counter() - t_start > args.budget_s:
            rows.append({"variant": v, "error": f"skipped: past --budget-s {args.budget_s:.0f}"})
            continue
        print(f"{v}:", flush=True)
        try:
            r = run_variant(v, args, ref, ids)
            if v == "bf16":
                ref = r.pop("logits")
            else:
                r.pop("logits", None)
        except Exception as e:  # noqa: BLE001 - record it, measure the others
            r = {"variant": v, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            free(args.device)
        rows.append(r)
        out.write_text(json.dumps({**info, "rows": rows, "wall_s": time.perf_counter() - t_start}, indent=2))
        print(f"  ({time.perf_counter() - t_start:.0f}s so far)", flush=True)
    print(table(rows, args.batches))
    return {**info, "rows": rows}


if __name__ == "__main__":
    main()
