"""A model of one GPU shared by a draft and a target engine, for choosing admission gates.

Not a measurement: a discrete-event model of the runtime benchmark's shapes (forced-length
steps, fixed-rate escalation seeded per (chain, step) as `FixedRate` does) in which the GPU
runs one engine's decode step at a time -- what the colocated runs measured (docs/BENCHMARKS.md
s.10.3: the 8-chain wall was the sum of the two engines' steps). It replays lockstep and the
coordinator under a draft gate and a target gate, and prints wall times and step counts, so a
gate can be judged against the sum-of-work ceiling before a GPU call is spent on it.

    python benchmarks/coloc_sim.py --chains 8,32,64 --grid
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from arbitrage.policies import FixedRate, StepContext


def escalates(seed: int, chain: str, step: int, rate: float) -> bool:
    """FixedRate's draw for (chain, step)."""
    return FixedRate(rate, seed=seed).escalate(StepContext(chain, step))


@dataclass
class Costs:
    """Seconds per decode step of each engine at b rows (linear through the fast engine's B=1 and
    B=64 steps at 1.5k context on the H200, docs/BENCHMARKS.md s.2), and per admission: a fixed
    part and a part per row (the target prefills the context it has not seen, ~300 tokens at
    37 us a token; the draft only the tokens a target step replaced)."""

    d0: float = 1.63e-3
    d1: float = 27e-6
    t0: float = 5.63e-3
    t1: float = 65e-6
    dp: float = 1e-3
    dp1: float = 0.5e-3
    tp: float = 2e-3
    tp1: float = 11e-3

    def draft(self, b: int) -> float:
        return self.d0 + self.d1 * (b - 1)

    def target(self, b: int) -> float:
        return self.t0 + self.t1 * (b - 1)

    def admit(self, e: str, b: int) -> float:
        return self.dp + self.dp1 * b if e == "d" else self.tp + self.tp1 * b


def lockstep(n: int, steps: int, tokens: int, rate: float, c: Costs, seed: int = 0) -> tuple[float, int, int]:
    """(wall s, draft decode steps, target decode steps) of the lockstep loop."""
    wall, ds, ts = 0.0, 0, 0
    for k in range(steps):
        wall += c.admit("d", n) + tokens * c.draft(n)
        ds += tokens
        esc = sum(escalates(seed, f"c{i}", k, rate) for i in range(n))
        if esc:
            wall += c.admit("t", esc) + tokens * c.target(esc)
            ts += tokens
    return wall, ds, ts


@dataclass
class Gate:
    """Admit when `share` of the live chains wait, or `free_share` of those not on the other
    engine (waves), or the oldest waited `max_hold_s`, or the GPU would idle; with `join`, also
    whenever the other engine has no rows running (rows join this engine's running batch)."""

    share: float = 0.0
    free_share: float = 0.0
    max_hold_s: float = 0.0
    join: bool = False


def coordinator(
    n: int, steps: int, tokens: int, rate: float, c: Costs, dg: Gate, tg: Gate, seed: int = 0
) -> tuple[float, int, int]:
    """(wall s, draft decode steps, target decode steps) of the async coordinator: each engine
    is a continuous batch admitting its waiting rows when its gate opens; when both engines
    have rows the GPU alternates their steps (one step each per d + t)."""
    now = 0.0
    step = [0] * n
    wait = {"d": {i: 0.0 for i in range(n)}, "t": {}}  # chain -> queued at
    run = {"d": {}, "t": {}}  # chain -> tokens left
    counts = {"d": 0, "t": 0}
    done = 0
    turn = "d"

    def gate_open(e: str) -> bool:
        w, g = wait[e], dg if e == "d" else tg
        if not w:
            return False
        other = "t" if e == "d" else "d"
        if g.share <= 0 and g.free_share <= 0:
            return True
        live = n - done
        if g.share > 0 and len(w) >= g.share * live:
            return True
        if g.free_share > 0 and len(w) >= g.free_share * (live - len(wait[other]) - len(run[other])):
            return True
        if g.max_hold_s > 0 and now - min(w.values()) >= g.max_hold_s:
            return True
        return not run[other] and (g.join or not run[e])  # the GPU would idle (or no one to protect)

    while done < n:
        for e in ("d", "t"):
            if gate_open(e):
                now += c.admit(e, len(wait[e]))
                for i in wait[e]:
                    run[e][i] = tokens
                wait[e] = {}
        active = [e for e in ("d", "t") if run[e]]
        if not active:  # every waiting row held: advance to the soonest hold's end
            holds = [min(wait[e].values()) + (dg if e == "d" else tg).max_hold_s for e in ("d", "t") if wait[e]]
            now = max(now, min(holds))
            continue
        e = turn if turn in active else active[0]
        turn = "t" if e == "d" else "d"
        now += c.draft(len(run[e])) if e == "d" else c.target(len(run[e]))
        counts[e] += 1
        for i in list(run[e]):
            run[e][i] -= 1
            if run[e][i]:
                continue
            del run[e][i]
            if e == "d" and escalates(seed, f"c{i}", step[i], rate):
                wait["t"][i] = now
                continue
            step[i] += 1
            if step[i] == steps:
                done += 1
            else:
                wait["d"][i] = now
    return now, counts["d"], counts["t"]


GATES = {
    "eager": (Gate(), Gate()),
    "default-like": (Gate(share=0.125, max_hold_s=0.01), Gate(share=1.0, max_hold_s=0.6)),
    "waves": (Gate(free_share=1.0, max_hold_s=0.2), Gate(share=1.0, max_hold_s=0.6)),
    "waves-0.75": (Gate(free_share=0.75, max_hold_s=0.2), Gate(share=1.0, max_hold_s=0.6)),
    "waves-eager-target": (Gate(free_share=1.0, max_hold_s=0.2), Gate()),
    "waves-target-0.1": (Gate(free_share=1.0, max_hold_s=0.2), Gate(share=0.1, max_hold_s=0.6)),
    "waves-target-0.2": (Gate(free_share=1.0, max_hold_s=0.2), Gate(share=0.2, max_hold_s=0.6)),
    "waves-target-hold-0.3": (Gate(free_share=1.0, max_hold_s=0.2), Gate(share=1.0, max_hold_s=0.3)),
    "default-like-join": (Gate(share=0.125, max_hold_s=0.01), Gate(share=1.0, max_hold_s=0.6, join=True)),
}
DRAFT_GRID = (Gate(share=0.125, max_hold_s=0.01), Gate(free_share=1.0, max_hold_s=0.2))


def grid(n: int, a, c: Costs) -> tuple[float, Gate, Gate]:
    """The best (speed-up over lockstep, draft gate, target gate) over target shares and holds."""
    wl = lockstep(n, a.steps, a.tokens, a.rate, c)[0]
    targets = [Gate(share=ts, max_hold_s=th) for ts in (0.1, 0.2, 0.25, 0.3, 0.4, 1.0) for th in (0.05, 0.2, 0.45, 1.0)]
    runs = [
        (wl / coordinator(n, a.steps, a.tokens, a.rate, c, dg, tg)[0], dg, tg) for tg in targets for dg in DRAFT_GRID
    ]
    return max(runs, key=lambda r: r[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chains", default="1,8,32,64")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rate", type=float, default=0.2)
    ap.add_argument("--grid", action="store_true", help="also the best target gate of a grid, per chain count")
    a = ap.parse_args()
    c = Costs()
    for n in [int(x) for x in a.chains.split(",")]:
        if a.grid:
            best, dg, tg = grid(n, a, c)
            print(f"chains={n:3d} best of the grid x{best:.3f}: draft {dg}, target {tg}")
        wl, dl, tl = lockstep(n, a.steps, a.tokens, a.rate, c)
        print(f"chains={n:3d} lockstep {n * a.steps / wl:7.2f} steps/s  wall {wl:6.2f} s  draft {dl} target {tl}")
        for name, (dg, tg) in GATES.items():
            w, d, t = coordinator(n, a.steps, a.tokens, a.rate, c, dg, tg)
            print(f"    {name:22s} {n * a.steps / w:7.2f} steps/s  x{wl / w:.2f}  draft {d} target {t}")


if __name__ == "__main__":
    main()
