"""Colocated engines without Ray: a 1B draft and an 8B target (random weights, bf16) on one
ColocatedScheduler, many concurrent draft rows with some target rows at once; prints the
time per phase, and every thread's stack if a phase does not finish (faulthandler).

    python benchmarks/coloc_engine_probe.py --streams 1 --chains 8,64
    # do the two engines' steps overlap? both at once vs each alone, gates open, SMs split or not
    python benchmarks/coloc_engine_probe.py --chains 1,8 --eager --solo --draft-sms 32
"""

from __future__ import annotations

import argparse
import faulthandler
import sys
import time
from concurrent.futures import ThreadPoolExecutor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--chains", default="1,8,64")
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--draft", default="llama-3.2-1b")
    ap.add_argument("--target", default="llama-3.1-8b")
    ap.add_argument("--eager", action="store_true", help="both engines admit at once (no gates)")
    ap.add_argument("--solo", action="store_true", help="also time the draft rows alone and the target rows alone")
    ap.add_argument("--draft-sms", type=int, default=0, help="split the SMs: the draft gets about this many")
    ap.add_argument(
        "--no-nap", action="store_true", help="poll the engines' events without napping until a step is due"
    )
    a = ap.parse_args()
    from arbitrage import colocated
    from arbitrage.colocated import ColocatedScheduler, load_colocated_engines

    if a.no_nap:
        colocated.ColocatedEngine._due = lambda self: 0.0
    from arbitrage.types import SamplingParams, StepRequest
    from configs.schema import ModelConfig

    mk = lambda name, seed: ModelConfig.model_validate(
        {
            "source": {"kind": "random", "name": name},
            "dtype": "bfloat16" if a.device == "cuda" else "float32",
            "device": a.device,
            "max_context": 2048,
            "seed": seed,
            "engine": "fast",
            "max_slots": 64,
        }
    )
    sched = ColocatedScheduler(streams=bool(a.streams), draft_sms=a.draft_sms)
    t0 = time.perf_counter()
    gates = {"draft": colocated.EAGER, "target": colocated.EAGER} if a.eager else None
    eng = load_colocated_engines({"draft": mk(a.draft, 1), "target": mk(a.target, 2)}, sched, gates)
    sms = {k: getattr(e, "sms", None) for k, e in eng.items()}
    print(f"loaded in {time.perf_counter() - t0:.1f}s streams={a.streams} eager={a.eager} SMs={sms}", flush=True)
    params = SamplingParams(max_tokens=64, forced_tokens=64)
    req = lambda i, k: StepRequest(
        problem=f"Problem {i}",
        steps=tuple(f"step {j}" for j in range(k)),
        system="sys",
        params=params,
        chain_id=f"c{i}",
    )
    pool = ThreadPoolExecutor(256)
    for rep in range(2):  # the first round captures graphs
        for n, mode in [
            (int(c), m) for c in a.chains.split(",") for m in (("both", "draft", "target") if a.solo else ("both",))
        ]:
            faulthandler.dump_traceback_later(a.timeout, exit=True, file=sys.stderr)
            t = time.perf_counter()
            before = {k: dict(e.stats) for k, e in eng.items()}, dict(sched.stats)
            nd = n if mode != "target" else 0
            nt = max(1, n // 5) if mode != "draft" else 0
            fd = [pool.submit(eng["draft"].generate_steps, [req(i, rep)]) for i in range(nd)]
            ft = [pool.submit(eng["target"].generate_steps, [req(1000 + i, rep)]) for i in range(nt)]
            [f.result() for f in fd + ft]
            faulthandler.cancel_dump_traceback_later()
            dt = time.perf_counter() - t
            print(
                f"round {rep} {mode:6s} draft rows={nd:3d} target rows={nt} {dt * 1e3:8.1f} ms  "
                f"draft {eng['draft'].stats['decode_steps']} target {eng['target'].stats['decode_steps']} "
                f"decode steps so far",
                flush=True,
            )
            keys = ("decode_steps", "decode_rows", "admissions", "held_turns", "hold_s", "gpu_wait_s", "decode_s")
            for k, e in eng.items():
                delta = {x: round(e.stats[x] - before[0][k][x], 4) for x in keys}
                print(f"    {k}: {delta} step_floor_ms={1e3 * (e.step_floor_s or 0):.2f}", flush=True)
            print(f"    scheduler: { {x: round(v - before[1][x], 4) for x, v in sched.stats.items()} }", flush=True)
    sched.close()


if __name__ == "__main__":
    main()
