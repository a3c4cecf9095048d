"""Runtime benchmark: the async coordinator against a synchronous lockstep loop, and
per-chain latency of `target_only` against fixed-rate escalation, on the Ray runtime.

Random-weight models at real shapes (default draft Llama-3.2-1B, target Llama-3.1-8B,
bf16, both on one GPU with fractional `num_gpus`), forced step lengths, seeded
fixed-rate escalation. Everything is measured side by side in one run and written as
JSON. The lockstep baseline is the published ARBITRAGE script's structure: all chains
draft a step, wait for the slowest, then the escalated ones wait for the target, and so
on -- it runs over the very same actors, with the coordinator's escalation draws (each row
escalates the same steps in both), and each row reports the rate it realised. A row of fewer
than `--min-chains` chains runs groups of its size one after the other.

Layouts (`--layouts`, run one after the other in one call, each with its own Ray):
`separate` is one actor per role (two processes time-slicing one GPU at `--gpu-fraction`
0.45); `colocated` is `runtime.layout: colocated` (one actor, both fast engines on one
scheduler thread, a CUDA stream per engine, the draft's at high priority, a turn for each engine
whose step is done: arbitrage/colocated.py); the variants switch one of those off:
`colocated-one-stream` (every engine on one stream), `colocated-round-robin` (turns in order, each
waiting for its engine's step), `colocated-equal-priority` (both streams at one priority); see
`COLOC_ENV`; `colocated-smsN` splits the SMs, about N for the draft and the rest for the target
(CUDA green contexts, arbitrage/green.py). The JSON is written after each layout, so a cut-off run keeps the layouts that finished.

`--coloc-gates name=TS:TH:TG:DS:DH[:TB[:DF]],...` (colocated layouts) also runs the coordinator under other
admission gates (target share, max hold s, idle grace s; draft share, max hold s; target balance,
the cost rule; draft free share, its waves; see
arbitrage/colocated.py `Gate`), set on the live actor after the default gates' rows:
coordinator only, same chain counts, `gate_sweep` in the JSON.

    python benchmarks/runtime_bench.py --out benchmarks/results/runtime_h200.json
    python benchmarks/runtime_bench.py --layouts separate,colocated --skip router --steps 8 \
        --max-context 2048 --num-cpus 12 --out benchmarks/results/runtime_coloc_h200.json
    python benchmarks/runtime_bench.py --device cpu --draft tiny-llama --target tiny-llama-wide \
        --router tiny-llama --chains 1,4 --steps 3 --step-tokens 8 --out /tmp/runtime_smoke.json   # smoke test
    # 70B target over 4 GPUs (TP=4, 0.8 GPU per rank) with an 8B draft on the rest of GPU 0..3:
    python benchmarks/runtime_bench.py --draft llama-3.1-8b --target llama-3.1-70b --target-tp 4 \
        --target-gpus 0.8 --gpu-fraction 0.2 --router "" --out benchmarks/results/runtime_70b_tp4.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path

from configs.schema import ArbitrageConfig


# colocated variants: the scheduler's environment switches (arbitrage/colocated.py ColocatedScheduler)
COLOC_ENV = {
    "colocated": {},
    "colocated-one-stream": {"ARBITRAGE_COLOCATED_STREAMS": "0"},
    "colocated-round-robin": {"ARBITRAGE_COLOCATED_READY_FIRST": "0"},
    "colocated-equal-priority": {"ARBITRAGE_COLOCATED_PRIORITY": "0"},
}
LAYOUTS = ("separate", *COLOC_ENV, "colocated-smsN")
COLOC_FLAGS = ("ARBITRAGE_COLOCATED_DRAFT_SMS", *{k for f in COLOC_ENV.values() for k in f})


def coloc_env(layout: str) -> dict[str, str] | None:
    """The scheduler's environment of a colocated layout (None: not one); `colocated-smsN`
    splits the GPU's SMs, about N for the draft (arbitrage/green.py)."""
    if layout.startswith("colocated-sms") and layout[13:].isdigit():
        return {"ARBITRAGE_COLOCATED_DRAFT_SMS": layout[13:]}
    return COLOC_ENV.get(layout)


ENGINE_COUNTERS = (
    "decode_steps",
    "admitted_mid_decode",
    "prefill_s",
    "decode_s",
    "idle_s",
    # colocated engines only (arbitrage/colocated.py)
    "admissions",
    "admitted_rows",
    "hold_s",
    "held_turns",
    "decode_rows",
    "gpu_wait_s",
)


def bench_config(a, layout: str = "separate") -> ArbitrageConfig:
    gpu = a.gpu_fraction if a.device == "cuda" else 0.0
    model = lambda shape, seed: {
        "source": {"kind": "random", "name": shape},
        "dtype": a.dtype,
        "device": a.device,
        "max_context": a.max_context,
        "seed": seed,
        "engine": a.engine,
        "max_slots": max(64, a.max_chains),
    }
    batching = {"max_batch_size": max(64, a.max_chains), "max_wait_ms": a.max_wait_ms}
    models = {"draft": model(a.draft, 1), "target": model(a.target, 2)}
    if a.router.startswith("probe:"):  # a trained probe (no model; runs inside the coordinator)
        models["router"] = {"kind": "probe", "path": a.router.removeprefix("probe:")}
    elif a.router:  # a random-weight classifier at a real router shape, for the overhead figure
        models["router"] = {
            "kind": "classifier",
            "source": {"kind": "random", "name": a.router},
            "device": a.device,
            "max_length": 512,
        }
    return ArbitrageConfig.model_validate(
        {
            "name": "runtime-bench",
            "models": models,
            "generation": {
                "forced_step_tokens": a.step_tokens,
                "forced_step_tokens_min": a.step_tokens_min,
                "max_step_tokens": a.step_tokens,
                "max_steps": a.steps,
                "max_total_tokens": a.step_tokens * a.steps,
            },
            "policy": {"name": "fixed_rate", "threshold": a.rate},
            "prompt": {"use_chat_template": True, "system_prompt": "Please reason step by step."},
            "runtime": {
                "num_cpus": a.num_cpus,
                "max_concurrent_chains": a.max_chains,
                "layout": "separate" if layout == "separate" else "colocated",
                "draft": {"num_cpus": 1, "num_gpus": gpu, "batching": batching},
                "target": {
                    "num_cpus": 1,
                    "num_gpus": a.target_gpus if a.device == "cuda" else 0.0,
                    "tensor_parallel": a.target_tp,
                    "batching": batching,
                },
                "router": {"num_cpus": 1, "num_gpus": 0.1 if a.device == "cuda" else 0.0, "batching": batching},
            },
        }
    )


def problems(n: int, tag: str, draws: str | None = None) -> list[dict]:
    """n problems whose text is unique to `tag`; their ids, which seed FixedRate's escalation
    draws per (id, step), come from `draws` (default `tag`): runs given the same `draws`
    escalate the same steps, so the coordinator and lockstep do the same work."""
    return [
        {
            "id": f"{draws or tag}-{i}",
            "problem": f"Problem {tag} {i}: a train leaves at {i} o'clock at 60 km/h. "
            "How far has it travelled by noon?",
        }
        for i in range(n)
    ]


def groups(n: int, a) -> int:
    """How many groups of n chains a throughput row runs one after the other: enough for
    `--min-chains` chains, so a 1-chain row's escalation rate is realised over as many steps
    as the larger rows' (one 8-step chain at rate 0.2 escalates 0 steps 17% of the time)."""
    return max(1, -(-a.min_chains // n))


async def lockstep(backend, items: list[dict], cfg: ArbitrageConfig, rate: float) -> tuple[int, int]:
    """The synchronous baseline: every phase waits for the slowest chain. Returns (steps done,
    steps escalated)."""
    from arbitrage.loop import LoopSettings, forced_tokens
    from arbitrage.policies import FixedRate, StepContext
    from arbitrage.types import SamplingParams, StepRequest

    g = cfg.generation
    policy = FixedRate(rate, seed=cfg.generation.seed)
    settings = LoopSettings.from_config(cfg)  # the loop's step lengths, per (problem, step)
    steps: list[list[str]] = [[] for _ in items]
    escalated = 0
    for k in range(g.max_steps):
        reqs = [
            StepRequest(
                problem=it["problem"],
                steps=tuple(s),
                system=cfg.prompt.system_prompt,
                params=SamplingParams(max_tokens=g.max_step_tokens, forced_tokens=forced_tokens(settings, it["id"], k)),
                chain_id=f"lock-{it['id']}",
            )
            for it, s in zip(items, steps)
        ]
        drafts = await asyncio.gather(*(backend.draft_step(r) for r in reqs))  # wait for all
        esc = [i for i, it in enumerate(items) if policy.escalate(StepContext(it["id"], k))]
        targets = await asyncio.gather(*(backend.target_step(reqs[i]) for i in esc))  # wait again
        chosen = {i: t.text for i, t in zip(esc, targets)}
        escalated += len(esc)
        for i, d in enumerate(drafts):
            steps[i].append(chosen.get(i, d.text))
    return len(items) * g.max_steps, escalated


def run_coordinator(rt, items, policy, tau) -> tuple[float, int, list[dict]]:
    t0 = time.perf_counter()
    res = rt.run(items, policy, tau)
    dt = time.perf_counter() - t0
    errors = [r["error"] for r in res if r.get("error")]
    if errors:
        raise RuntimeError(f"chains failed: {errors[0]}")
    return dt, sum(r["num_steps"] for r in res), res


def engine_counters(rt) -> dict[str, dict[str, float]]:
    """The draft's and the target's engine counters (cumulative), by role."""
    roles = rt.stats()["roles"]
    return {
        r: {k: float(roles[r]["replicas"][0].get("engine", {}).get(k, 0)) for k in ENGINE_COUNTERS}
        for r in ("draft", "target")
        if r in roles
    }


def counters_during(rt, n: int, tag: str, a) -> tuple[float, int, int, dict]:
    """The coordinator's timed run of a throughput row (`groups` runs of n chains, one after
    the other, each with the draws of the same group of the lockstep run); (seconds, steps,
    steps escalated, the engines' counters over it with mean decode batch / step)."""
    before = engine_counters(rt)
    dt, steps, esc = 0.0, 0, 0
    for g in range(groups(n, a)):
        t, st, res = run_coordinator(rt, problems(n, f"{tag}{n}g{g}", f"pair{n}g{g}"), "fixed_rate", a.rate)
        dt, steps, esc = dt + t, steps + st, esc + sum(r["escalations"] for r in res)
    return dt, steps, esc, counters_since(rt, before)


def counters_since(rt, before: dict) -> dict:
    """The engines' counters since `before` (an `engine_counters` reading), with the mean
    decode step (host ms) and rows per decode step."""
    after = engine_counters(rt)
    during = {r: {k: after[r][k] - before[r][k] for k in ENGINE_COUNTERS} for r in after}
    for c in during.values():
        n = c["decode_steps"]
        c["ms_per_decode_step"] = 1e3 * c["decode_s"] / n if n else None
        c["rows_per_decode_step"] = c["decode_rows"] / n if n and c["decode_rows"] else None
    return during


def brief(during: dict) -> str:
    """Decode steps and mean rows per step of each engine, e.g. 'draft 540x41.2 target 130x9.8'."""
    return " ".join(f"{r} {c['decode_steps']:.0f}x{c['rows_per_decode_step'] or 0:.1f}" for r, c in during.items())


def coloc_actor(rt):
    """The colocated actor behind the runtime's target handle (a RoleView)."""
    return rt.handles["target"][0].actor


def gate_sweep(rt, a) -> dict[str, list[dict]]:
    """The coordinator at every chain count under each `--coloc-gates` variant (no lockstep)."""
    import ray

    out = {}
    default = ray.get(coloc_actor(rt).gates.remote())
    for spec in [x for x in a.coloc_gates.split(",") if x]:
        name, vals = spec.split("=")
        ts, th, tg, ds, dh, *rest = (float(v) for v in vals.split(":"))
        tb, df = (rest + [0.0, 0.0])[:2]
        gates = {
            "target": {"share": ts, "max_hold_s": th, "idle_grace_s": tg, "balance": tb},
            "draft": {"share": ds, "max_hold_s": dh, "free_share": df},
        }
        ray.get(coloc_actor(rt).set_gates.remote(gates))
        rows = []
        for n in a.chain_counts:
            dt, steps, esc, during = counters_during(rt, n, f"g{name}", a)
            rows.append(
                {
                    "chains": n,
                    "coordinator_steps_per_s": steps / dt,
                    "coordinator_s": dt,
                    "escalation_rate": esc / steps,
                    "gates": gates,
                    "engines_during_coordinator": during,
                }
            )
            print(f"gates {name:10s} chains={n:3d} coordinator {steps / dt:8.2f} steps/s  {brief(during)}", flush=True)
        for r in rows:
            r["vs_single_chain"] = r["coordinator_steps_per_s"] / rows[0]["coordinator_steps_per_s"]
        out[name] = rows
    ray.get(coloc_actor(rt).set_gates.remote(default))
    return out


def throughput(rt, cfg, a) -> list[dict]:
    """Steps/s through the coordinator vs lockstep, at each concurrency; the engines' counters
    over the timed coordinator run (decode steps, mean decode step, prefill and idle seconds)."""
    from actors.backend import RayBackend

    backend = RayBackend(rt.handles)
    rows = []
    for n in a.chain_counts:
        # Warm-up at the same concurrency: CUDA graphs for this batch bucket are captured here,
        # not inside the timed runs.
        run_coordinator(rt, problems(n, f"warm{n}"), "fixed_rate", a.rate)
        dt_c, steps_c, esc_c, during = counters_during(rt, n, "tp", a)
        dt_l, steps_l, esc_l = 0.0, 0, 0
        before = engine_counters(rt)
        for g in range(groups(n, a)):  # the same draws as the coordinator's run
            t0 = time.perf_counter()
            st, esc = asyncio.run(lockstep(backend, problems(n, f"ls{n}g{g}", f"pair{n}g{g}"), cfg, a.rate))
            dt_l, steps_l, esc_l = dt_l + time.perf_counter() - t0, steps_l + st, esc_l + esc
        row = {
            "chains": n,
            "groups": groups(n, a),
            "coordinator_steps_per_s": steps_c / dt_c,
            "lockstep_steps_per_s": steps_l / dt_l,
            "coordinator_s": dt_c,
            "lockstep_s": dt_l,
            "escalation_rate": esc_c / steps_c,
            "lockstep_escalation_rate": esc_l / steps_l,
            "engines_during_coordinator": during,
            "engines_during_lockstep": counters_since(rt, before),
        }
        row["speedup_vs_lockstep"] = row["coordinator_steps_per_s"] / row["lockstep_steps_per_s"]
        rows.append(row)
        print(
            f"chains={n:3d} coordinator {row['coordinator_steps_per_s']:8.2f} steps/s  "
            f"lockstep {row['lockstep_steps_per_s']:8.2f} steps/s  x{row['speedup_vs_lockstep']:.2f}  "
            f"escalated {row['escalation_rate']:.1%} / {row['lockstep_escalation_rate']:.1%}  {brief(during)}"
            f"  (lockstep: {brief(row['engines_during_lockstep'])})",
            flush=True,
        )
    base = rows[0]["coordinator_steps_per_s"]
    for r in rows:
        r["vs_single_chain"] = r["coordinator_steps_per_s"] / base
    return rows


def latency(rt, a) -> dict:
    """Per-chain latency of target_only vs fixed-rate escalation; ideal speed-up from step costs."""
    n = a.latency_chains
    per = {}
    for name, policy, tau in [("draft_only", "draft_only", 0.0), ("target_only", "target_only", 0.0)] + [
        (f"fixed_{p:g}", "fixed_rate", p) for p in a.rates
    ]:
        # One untimed chain first: run with `--skip throughput`, the first chains would otherwise
        # time the engines' graph captures and compiles (docs/BENCHMARKS.md s.10.3).
        run_coordinator(rt, problems(1, f"lat-{name}-warm"), policy, tau)
        lats, steps, esc = [], 0, 0
        for i in range(n):  # one chain at a time: latency, not throughput
            dt, st, res = run_coordinator(rt, problems(1, f"lat-{name}-{i}"), policy, tau)
            lats.append(dt)
            steps += st
            esc += sum(r["escalations"] for r in res)
        per[name] = {
            "latency_s": statistics.mean(lats),
            "chain_latencies_s": lats,
            "steps_per_chain": steps / n,
            "escalation_rate": esc / steps if steps else 0.0,
        }
        print(f"latency {name:12s} {per[name]['latency_s']:.3f} s/chain", flush=True)
    t_d = per["draft_only"]["latency_s"] / per["draft_only"]["steps_per_chain"]
    t_t = per["target_only"]["latency_s"] / per["target_only"]["steps_per_chain"]
    out = {"draft_step_s": t_d, "target_step_s": t_t, "by_policy": per, "rates": {}}
    for p in a.rates:
        row = per[f"fixed_{p:g}"]
        achieved = per["target_only"]["latency_s"] / row["latency_s"]
        q = row["escalation_rate"]  # realised rate over the measured steps
        ideal = t_t / (t_d + q * t_t)
        out["rates"][f"{p:g}"] = {
            "speedup": achieved,
            "ideal_speedup": ideal,
            "realised_rate": q,
            "share_of_ideal": achieved / ideal,
        }
        print(
            f"rate {p:.2f} (realised {q:.2f}): speed-up {achieved:.2f}x, ideal {ideal:.2f}x ({achieved / ideal:.0%})",
            flush=True,
        )
    return out


def router_overhead(rt, a, lat: dict) -> dict:
    """The router's cost per step: the `router` policy at a threshold it never exceeds (so it
    asks the router at every step and never escalates) against `draft_only`, one chain at a
    time; the difference per step, as a share of a draft step and of a mean step at the
    `--rate` escalation rate."""
    n, per = a.latency_chains, {}
    for name, policy, tau in [("draft_only", "draft_only", 0.0), ("router_never", "router", 1.0)]:
        lats, steps = [], 0
        for i in range(n):
            dt, st, _ = run_coordinator(rt, problems(1, f"ovh-{name}-{i}"), policy, tau)
            lats.append(dt)
            steps += st
        per[name] = statistics.mean(lats) / (steps / n)  # s per step
    over = per["router_never"] - per["draft_only"]
    fixed = lat["by_policy"].get(f"fixed_{a.rate:g}")
    step_at_rate = fixed["latency_s"] / fixed["steps_per_chain"] if fixed else None
    out = {
        "router": a.router,
        "draft_step_s": per["draft_only"],
        "router_step_s": per["router_never"],
        "overhead_s_per_step": over,
        "share_of_draft_step": over / per["draft_only"],
        "share_of_step_at_rate": over / step_at_rate if step_at_rate else None,
    }
    print(
        f"router overhead ({a.router}): {over * 1e3:.2f} ms/step = {out['share_of_draft_step']:.1%} of a "
        f"draft step" + (f", {out['share_of_step_at_rate']:.1%} of a step at rate {a.rate:g}" if step_at_rate else ""),
        flush=True,
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--engine", default="fast", choices=["hf", "fast"])
    ap.add_argument("--draft", default="llama-3.2-1b")
    ap.add_argument("--target", default="llama-3.1-8b")
    ap.add_argument("--chains", default="1,8,32,64")
    ap.add_argument("--rate", type=float, default=0.2)
    ap.add_argument("--rates", default="0.1,0.2,0.4")
    ap.add_argument("--steps", type=int, default=10, help="steps per chain")
    ap.add_argument("--step-tokens", type=int, default=64)
    ap.add_argument(
        "--step-tokens-min",
        type=int,
        default=None,
        help="steps of varying length: each forced to a length drawn from [this, --step-tokens] per "
        "(problem, step), the same in the coordinator's and lockstep's runs (default: all --step-tokens)",
    )
    ap.add_argument("--max-context", type=int, default=1024)
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    ap.add_argument("--latency-chains", type=int, default=4)
    ap.add_argument(
        "--min-chains",
        type=int,
        default=8,
        help="chains per throughput row at least: a row of fewer runs groups of its size one after "
        "the other (the 1-chain row: 8 chains, one at a time)",
    )
    ap.add_argument("--num-cpus", type=int, default=8)
    ap.add_argument(
        "--gpu-fraction",
        type=float,
        default=0.45,
        help="num_gpus of the draft and of the target actor: 0.45 shares one GPU; 1 gives "
        "each its own GPU (a 2-GPU machine), as the cluster layout does",
    )
    ap.add_argument(
        "--target-tp",
        type=int,
        default=1,
        help="tensor-parallel ranks of the target (a TargetGroup; each rank takes --target-gpus)",
    )
    ap.add_argument(
        "--target-gpus",
        type=float,
        default=None,
        help="num_gpus of the target actor, or of each TP rank (default: --gpu-fraction)",
    )
    ap.add_argument(
        "--router",
        default="minilm-l6",
        help="router for the overhead part: a random classifier shape, or probe:PATH "
        "(a trained probe router folder); '' skips it",
    )
    ap.add_argument("--skip", default="", help="comma list of parts to skip: throughput,latency,router")
    ap.add_argument(
        "--layouts",
        default="separate",
        help=f"comma list of runtime layouts to run, one after the other: {', '.join(LAYOUTS)}",
    )
    ap.add_argument(
        "--coloc-gates",
        default="",
        help="colocated layouts: also sweep admission gates, name=TS:TH:TG:DS:DH[:TB[:DF]],... (target share, "
        "max_hold_s, idle_grace_s; draft share, max_hold_s; target balance; draft free_share)",
    )
    ap.add_argument("--out", default="benchmarks/results/runtime.json")
    a = ap.parse_args()
    a.target_gpus = a.gpu_fraction if a.target_gpus is None else a.target_gpus
    a.chain_counts = [int(c) for c in a.chains.split(",")]
    a.max_chains = max(a.chain_counts)
    a.rates = [float(r) for r in a.rates.split(",")]
    a.layout_list = [x for x in a.layouts.split(",") if x]
    bad = [x for x in a.layout_list if x != "separate" and coloc_env(x) is None]
    if bad:
        ap.error(f"unknown layout {bad[0]!r}; choose from {', '.join(LAYOUTS)}")
    from cluster.runtime import Runtime

    result = {"args": vars(a), "host": platform.node(), "layouts": {}}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    for layout in a.layout_list:
        # Read by the colocated actor's scheduler (Ray's workers inherit the driver's environment).
        for k in COLOC_FLAGS:
            os.environ.pop(k, None)
        os.environ.update(coloc_env(layout) or {})
        cfg = bench_config(a, layout)
        print(f"== layout {layout}", flush=True)
        res: dict = {}
        t0 = time.perf_counter()
        with Runtime(cfg) as rt:
            res["startup_s"] = time.perf_counter() - t0
            if "throughput" not in a.skip:
                res["throughput"] = throughput(rt, cfg, a)
                if a.coloc_gates and layout != "separate":
                    res["gate_sweep"] = gate_sweep(rt, a)
            if "latency" not in a.skip:
                res["latency"] = latency(rt, a)
                if a.router and "router" not in a.skip:
                    res["router_overhead"] = router_overhead(rt, a, res["latency"])
            res["actor_stats"] = rt.stats()
        result["layouts"][layout] = res
        if len(a.layout_list) == 1:  # the single-layout format of the earlier results
            result.update(res)
        Path(a.out).write_text(json.dumps(result, indent=2, default=str))
        print(f"wrote {a.out} ({layout})", flush=True)


if __name__ == "__main__":
    main()
