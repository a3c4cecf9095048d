"""llama.cpp KV layout probe: the draft's prefill and decode tok/s at one batch size, per KV layout.

    python benchmarks/llamacpp_kv_probe.py --layout small --batch 32   # unified KV, 32 slots x 1024 cells
    python benchmarks/llamacpp_kv_probe.py --layout split --batch 32   # one KV stream per sequence, 32 x 1024
    python benchmarks/llamacpp_kv_probe.py --layout big --batch 32     # unified, 64 x 4096 (default sizing)
    python benchmarks/llamacpp_kv_probe.py --layout research --hidden  # split, 32 x 4096, hidden states on

One layout per process (run them one after the other, on a quiet machine); figures in
docs/BENCHMARKS.md s.11. Decode tok/s = B * 16 / (t(17 forced tokens) - t(1)): both timed runs
prefill the same number of prompt tokens, so the difference is decode alone.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from arbitrage.types import SamplingParams, StepRequest  # noqa: E402

LAYOUTS = {
    "big": dict(max_context=4096, max_slots=64),
    "small": dict(max_context=1024, max_slots=32),
    "split": dict(max_context=1024, max_slots=32, kv_unified=False),
    "research": dict(max_context=4096, max_slots=32, kv_unified=False),
}  # configs/research-gsm8k.yaml
PROMPT = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May? "
) * 3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="big")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hidden", action="store_true", help="engine with hidden states on (embeddings)")
    args = p.parse_args(argv)
    from arbitrage.llamacpp_engine import LlamaCppStepEngine
    from arbitrage.models import gguf_location, load_gguf_tokenizer
    from configs import load_config

    src = load_config(str(Path(__file__).resolve().parents[1] / "configs/local.yaml")).models.draft.source
    gguf = gguf_location(src)
    eng = LlamaCppStepEngine(
        gguf,
        load_gguf_tokenizer(src, gguf),
        kv_cache_tokens=0,
        n_threads=args.threads,
        embeddings=args.hidden,
        **LAYOUTS[args.layout],
    )

    def timed(n: int, tag: str) -> float:
        reqs = [
            StepRequest(problem=f"({tag}-{i}) {PROMPT}", params=SamplingParams(max_tokens=n, forced_tokens=n))
            for i in range(args.batch)
        ]
        t0 = time.perf_counter()
        eng.generate_steps(reqs)
        return time.perf_counter() - t0

    try:
        t1, t17 = timed(1, "a"), timed(17, "b")
        prompt_tokens = args.batch * eng.count_tokens(PROMPT)
        print(
            f"{args.layout}{' +hidden' if args.hidden else ''}: b{args.batch} prefill {prompt_tokens / t1:.0f} tok/s, "
            f"decode {args.batch * 16 / (t17 - t1):.1f} tok/s"
        )
    finally:
        eng.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
