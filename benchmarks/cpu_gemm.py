"""CPU matmul speed by dtype: why the embedded default runs in bf16 on this machine.

Times x @ W.T for a Qwen2.5-0.5B MLP projection (896 -> 4864) and its LM head
(896 -> 151936) at batch 1..16, in fp32 and bf16, side by side in one run.

    python benchmarks/cpu_gemm.py --out benchmarks/results/cpu_gemm.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def time_ms(fn, reps: int = 20) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/cpu_gemm.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for name, (n_out, n_in) in {"mlp_up": (4864, 896), "lm_head": (151936, 896)}.items():
        for batch in (1, 2, 4, 16):
            row = {"matrix": name, "batch": batch}
            for dt in (torch.float32, torch.bfloat16):
                w, x = torch.randn(n_out, n_in, dtype=dt), torch.randn(batch, n_in, dtype=dt)
                row[str(dt).removeprefix("torch.")] = time_ms(lambda: x @ w.T)
            row["fp32_over_bf16"] = row["float32"] / row["bfloat16"]
            rows.append(row)
            print(
                f"{name:8s} B={batch:2d} fp32 {row['float32']:8.2f} ms  bf16 {row['bfloat16']:8.2f} ms  "
                f"x{row['fp32_over_bf16']:.1f}",
                flush=True,
            )
    with open(a.out, "w") as f:
        json.dump({"threads": torch.get_num_threads(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
