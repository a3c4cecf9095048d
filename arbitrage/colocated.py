"""Colocated engines: several FastStepEngines in one process, driven by ONE scheduler thread.

Why. On one GPU, a draft and a target in two processes time-slice the device: whenever both
decode, each waits for the other's slice, and the coordinator's overlap of draft and target
work turns into waiting (docs/BENCHMARKS.md s.3). Here both engines live in one process and
one thread issues all their GPU work, so nothing is time-sliced.

How. `ColocatedEngine` is a `FastStepEngine` (same forward, slot cache, CUDA graphs, stop
rules, outputs) without a scheduler thread of its own; a `ColocatedScheduler` owns the
thread and gives each engine a *turn* as soon as its GPU work is done (ready first: while the
target's step runs, the draft takes a turn after each of its own shorter steps; waiting for
the engines in round-robin order instead held the draft to one step per target step). A turn is:

1. collect the engine's GPU work in flight: wait for its decode step's CUDA event, read the
   sampled tokens, retire finished rows; then read the first tokens of the rows whose
   prefill was issued last turn, and put them in the running batch,
2. take newly queued requests and, if the engine's `Gate` lets them in, admit them: issue
   the prefill of their uncached tails *without waiting for it*,
3. launch the next decode step of the running rows (inputs through a pinned buffer, graph
   replay, an async copy of its [3, B] statistics to pinned memory, an event) and return.

Nothing in a turn waits for the GPU (every host-to-device copy is from pinned memory and
non-blocking; a blocking copy would drain the queue), so while the CPU retires one engine's
step the other's is already queued or running: the device has the next kernel of some engine
while the CPU works. Between turns the scheduler polls the engines' last CUDA events (napping
until the soonest step is nearly due: its launch time plus 3/4 of the shortest step it has
measured).

Gates: when an engine admits waiting rows. An 8B target's decode step costs about the same
at 1 row as at 30 (it streams its weights either way), and on one GPU every target step is
a step the draft does not take. So the target should decode few, large batches: its gate
holds waiting rows until their summed wait outweighs the delay a target step would impose on
the draft's running rows (`balance`, a cost rule), or they are a `share` of the rows held,
or the oldest has waited `max_hold_s`, or nothing else has been on the GPU for
`idle_grace_s` (so one chain never waits long; the grace keeps the target out of the gap
between two waves of draft requests, when the draft is empty for a few ms). Measured in
docs/BENCHMARKS.md s.10 and s.10.1. The draft's gate batches admissions lightly (each admission is an eager prefill: host launch time).
Rows that joined run to the end of their step; later arrivals wait for the gate again.
`DRAFT_GATE` / `TARGET_GATE` are the defaults (`load_colocated_engines`); `share=0` admits
at once (the engine's own continuous batching).

Each engine issues on its own CUDA stream (default on CUDA; ARBITRAGE_COLOCATED_STREAMS=0 puts
every engine on the current stream), so one engine's kernels can run beside the other's; the
draft's stream has the higher priority (its small, latency-bound kernels go first when both
engines' blocks wait for the SMs; ARBITRAGE_COLOCATED_PRIORITY=0 gives both the same).
Each engine's CUDA graphs are captured on a stream of its own (`DecodeGraphs.capture_stream`):
captured on torch's one default capture stream, two engines' graphs shared a cuBLAS workspace
and hung when they replayed at once. Off CUDA (tests) the same loop runs eagerly, in order.

What stays the same: requests, futures, outputs, chain KV reuse, `next_token_logits` (a
judge PRM reusing the target engine works unchanged), counters (`stats`, `forward_calls`).
Not supported: a tensor-parallel engine (its ranks must run batches in lockstep).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from arbitrage.engine_base import StepEngine
from arbitrage.engine_common import token_stats
from arbitrage.fast_engine import (
    PREFILL_BLOCK,
    WINDOW_BLOCK,
    FastStepEngine,
    _prefill_attention,
    _prefill_groups,
    _round_up,
)


@dataclass(frozen=True)
class Gate:
    """When a colocated engine admits its waiting rows (any one condition suffices).

    share: the waiting rows are at least this share of the rows the scheduler's engines have
        held lately (running, being prefilled or waiting; a peak that halves every
        `PEAK_HALF_LIFE_S`, so chains between two requests still count); 0 admits at once.
    max_hold_s: the oldest waiting row has waited this long.
    idle_grace_s: nothing is running on this engine and every other engine has been idle
        for this long (the GPU would idle). The grace lets a wave of chains that just
        finished a draft step come back before a small target batch takes the GPU.
    balance: a cost rule (0: off). While other engines run rows, admit once the held rows'
        summed wait (row-seconds) reaches `balance` x the delay admitting them would impose on
        the others: their running rows x the held rows' mean step budget (tokens) x this
        engine's decode step time (the floor of the steps it measured). When many chains
        wait for this engine, fewer run on the others, so it admits sooner: the rule adapts to
        the waves of escalations instead of a fixed share.
    free_share: the waiting rows are at least this share of the rows no other engine holds
        (the peak of rows held lately, less those held elsewhere; rows running here count, so
        at 1.0 a wave is admitted only once the last one has drained). For a draft on one GPU:
        wait for the chains that are not with the target, so the draft decodes in waves as
        lockstep does (its step costs about the same at 4 rows as at 8) while the target still
        batches escalations across waves; bound it with max_hold_s. Use with share 0 (either
        condition admits). Not a default: for `benchmarks/runtime_bench.py --coloc-gates`
        (BENCHMARKS s.10.4).
    Always: a waiting request asks for next-token logits only (a judge PRM: no decode steps).
    share = balance = free_share = 0 admits at once.
    """

    share: float = 0.0
    max_hold_s: float = 0.0
    idle_grace_s: float = 0.0
    balance: float = 0.0
    free_share: float = 0.0


DRAFT_GATE = Gate(share=0.125, max_hold_s=0.01)
TARGET_GATE = Gate(share=1.0, max_hold_s=0.6, idle_grace_s=0.01, balance=1.0)
EAGER = Gate()
PEAK_HALF_LIFE_S = 1.0

COUNTERS = {"admissions": 0, "admitted_rows": 0, "hold_s": 0.0, "held_turns": 0, "decode_rows": 0, "gpu_wait_s": 0.0}
POLL_S = 50e-6  # the scheduler's nap between polls of the engines' CUDA events, near a step's end
# Nap until this share of the shortest step seen has passed, then poll. Below 1, because the floor
# is measured from the host: napping a whole floor made every step end after it, and the floor
# (allowed to drift up 1% a step) grew without bound (docs/BENCHMARKS.md s.10.3).
NAP_SHARE = 0.75


def _env_flag(name: str, value: bool | None) -> bool:
    """`value`, or the environment's `name` (on unless "0") when `value` is None."""
    return os.environ.get(name, "1") != "0" if value is None else value


class ColocatedScheduler:
    """One thread that gives every registered `ColocatedEngine` a turn when its GPU work is done."""

    def __init__(
        self,
        streams: bool | None = None,
        ready_first: bool | None = None,
        priority: bool | None = None,
        draft_sms: int | None = None,
    ):
        """Args (each None: on, unless the environment variable named sets it to 0):
        streams: one CUDA stream per engine (ARBITRAGE_COLOCATED_STREAMS); off issues every
            engine's work on the current stream, one after the other (BENCHMARKS s.10.2);
        ready_first: a turn for each engine whose GPU work is done, skipping those still
            running (ARBITRAGE_COLOCATED_READY_FIRST); off runs every engine's turn in
            round-robin order, each waiting for that engine's step (the earlier loop, s.10.3);
        priority: engines created with `priority=True` (the draft) get a high-priority stream
            (ARBITRAGE_COLOCATED_PRIORITY);
        draft_sms: with streams on CUDA, split the GPU's SMs (`arbitrage.green`): the
            `priority=True` engine's stream runs on about this many SMs and the other engines'
            on the rest, so neither's kernels wait for SMs the other holds
            (ARBITRAGE_COLOCATED_DRAFT_SMS; default 0: no split; slower at the 1B / 8B shapes,
            BENCHMARKS s.10.4)."""
        self.streams = _env_flag("ARBITRAGE_COLOCATED_STREAMS", streams)
        self.ready_first = _env_flag("ARBITRAGE_COLOCATED_READY_FIRST", ready_first)
        self.priority = _env_flag("ARBITRAGE_COLOCATED_PRIORITY", priority)
        sms = os.environ.get("ARBITRAGE_COLOCATED_DRAFT_SMS", "0") if draft_sms is None else draft_sms
        if not str(sms).isdigit():
            raise ValueError(f"ARBITRAGE_COLOCATED_DRAFT_SMS / draft_sms must be a whole number of SMs, not {sms!r}")
        self.draft_sms = int(sms)
        self._partitions: dict[Any, tuple] = {}  # device -> (the draft's, the others') GreenPartition
        self.engines: list[ColocatedEngine] = []
        self.stats = {"turns": 0, "idle_s": 0.0, "busy_s": 0.0, "poll_s": 0.0, "skipped_turns": 0}
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.peak_rows, self._peak_t = 0.0, time.perf_counter()

    def add(self, engine: "ColocatedEngine") -> None:
        """Register an engine (done by ColocatedEngine's constructor); starts the thread once."""
        with self._lock:
            if self._closed:
                raise RuntimeError("ColocatedScheduler is closed")
            self.engines.append(engine)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="colocated-scheduler", daemon=True)
                self._thread.start()
        self.wake()

    def wake(self) -> None:
        self._wake.set()

    def partition(self, device: torch.device, first: bool):
        """The green partition of `device` for the draft (`first`) or the other engines, split
        once per device (`draft_sms`)."""
        from arbitrage import green

        with self._lock:
            if device not in self._partitions:
                self._partitions[device] = green.split(device, self.draft_sms)
            return self._partitions[device][0 if first else 1]

    def close(self) -> None:
        """Stop the thread; requests still queued or running fail with RuntimeError."""
        with self._lock:
            self._closed = True
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def held_rows(self) -> int:
        """Rows every engine holds: running, being prefilled, or waiting for admission."""
        return sum(e._held() for e in self.engines)

    def running_rows(self, besides: "ColocatedEngine") -> int:
        """Rows the engines other than `besides` are decoding or prefilling (not those waiting)."""
        return sum(len(e._running) + sum(len(p[0]) for p in e._pending) for e in self.engines if e is not besides)

    def others_idle_since(self, engine: "ColocatedEngine") -> float | None:
        """Since when every engine but `engine` has held no rows and had none queued (None: busy)."""
        since = [e._idle_since for e in self.engines if e is not engine]
        idle = [t for t in since if t is not None]
        return None if len(idle) < len(since) else max(idle, default=0.0)

    def _update_peak(self, now: float) -> None:
        decay = 0.5 ** ((now - self._peak_t) / PEAK_HALF_LIFE_S)
        self.peak_rows, self._peak_t = max(float(self.held_rows()), self.peak_rows * decay), now

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                self._wake.clear()  # a submit after this sets it again: no lost wake-up
                with self._lock:
                    engines, closed = list(self.engines), self._closed
                if closed:
                    break
                t0 = time.perf_counter()
                self._update_peak(t0)
                running, deadline = [], None
                for e in engines:
                    if self.ready_first and not e._gpu_done():
                        running.append(e)  # its step still runs: no turn, the others go on
                        self.stats["skipped_turns"] += 1
                        continue
                    b, d = e._turn()
                    if b:
                        running.append(e)
                    if d is not None:
                        deadline = d if deadline is None else min(deadline, d)
                t1 = time.perf_counter()
                if running:
                    self.stats["turns"] += 1
                    self.stats["busy_s"] += t1 - t0
                    if self.ready_first:
                        self._wait_any(running, deadline)
                        self.stats["poll_s"] += time.perf_counter() - t1
                else:  # nothing on the GPU: sleep until a submit, or until a held row's bound
                    self._wake.wait(None if deadline is None else max(0.0, deadline - t1))
                    self.stats["idle_s"] += time.perf_counter() - t1
            for e in self.engines:
                e._shutdown()

    def _wait_any(self, running: list["ColocatedEngine"], deadline: float | None) -> None:
        """Return when one of `running` has finished its GPU work, a request is submitted, or a
        held row's bound (`deadline`) comes; nap until the soonest step is due, then poll.
        One engine running: wait for its event (exact; a submit or a bound waits for its step,
        as in round-robin order): polling there slowed lockstep, which runs one engine at a time
        (docs/BENCHMARKS.md s.10.3)."""
        if len(running) == 1 and running[0]._last_event is not None:
            running[0]._last_event.synchronize()
            return
        while not any(e._gpu_done() for e in running):
            now = time.perf_counter()
            if self._wake.is_set() or (deadline is not None and now >= deadline):
                return
            due = min(e._due() for e in running)
            if deadline is not None:
                due = min(due, deadline)
            self._wake.wait(max(POLL_S, due - now - POLL_S))


class ColocatedEngine(FastStepEngine):
    """A FastStepEngine whose GPU work is issued by a shared `ColocatedScheduler`."""

    def __init__(
        self, model, tokenizer, scheduler: ColocatedScheduler, gate: Gate = EAGER, priority: bool = False, **kwargs: Any
    ):
        """Args: model, tokenizer and keyword arguments as FastStepEngine's (no `tp`);
        scheduler: the thread that runs this engine together with the others;
        gate: when waiting rows are admitted (see `Gate`; default: at once);
        priority: a high-priority CUDA stream (the draft's; if the scheduler's `priority` is on)."""
        if kwargs.get("tp") is not None:
            raise ValueError("a tensor-parallel engine cannot be colocated (its ranks run batches in lockstep)")
        self.scheduler = scheduler
        self.gate = gate
        self._inflight: tuple | None = None  # (jobs, host stats, logits, event) of the launched step
        self._pending: list[tuple] = []  # prefills issued, first tokens not read: (jobs, stats, logits, event, keep)
        self._pinned: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # bucket -> pinned (inputs, stats)
        self._idle_since: float | None = 0.0  # since when it holds no rows (None: it holds some)
        self._wake_at: float | None = None  # when a closed gate may open without a new event
        self._launched_at = 0.0
        self._last_event: Any = None  # the CUDA event recorded after this engine's last GPU work
        self.step_floor_s: float | None = None  # the shortest decode step seen (launch to result), drifting up 1%
        super().__init__(model, tokenizer, **kwargs)  # its own thread exits at once (see _loop)
        self._thread.join()
        self.stats.update(COUNTERS)
        cuda = self.device.type == "cuda"
        self._cuda = cuda
        use_streams = scheduler.streams and cuda
        # lower numbers are higher priorities; -1 is the highest torch offers on every CUDA device
        high = priority and scheduler.priority
        self.stream = torch.cuda.Stream(self.device, priority=-1 if high else 0) if use_streams else None
        self.sms: int | None = None  # the SMs of this engine's green partition, if split
        if use_streams and scheduler.draft_sms > 0:
            part = scheduler.partition(self.device, first=priority)
            self.stream, self.sms = part.stream(-1 if high else 0), part.sms
            if self.graphs is not None:  # captured on the partition too, so replays keep to its SMs
                self.graphs.capture_stream = part.stream()
        self._ctx = (lambda: torch.cuda.device(self.device)) if cuda else contextlib.nullcontext
        scheduler.add(self)

    # ---- FastStepEngine hooks ---------------------------------------------------------
    def _loop(self) -> None:
        """No thread of its own: the scheduler drives `_turn`."""

    def _submit(self, jobs) -> None:
        now = time.perf_counter()
        for j in jobs:
            j.queued_at = now
        super()._submit(jobs)
        self.scheduler.wake()

    def close(self) -> None:
        """Detach from the scheduler; this engine's queued and running requests fail."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self.scheduler.wake()

    def _held(self) -> int:
        return len(self._running) + len(self._waiting) + sum(len(p[0]) for p in self._pending)

    def _gpu_done(self) -> bool:
        """Whether the GPU work this engine issued has finished (its turn would not wait)."""
        return self._last_event is None or self._last_event.query()

    def _due(self) -> float:
        """When to start polling the step in flight: launch + NAP_SHARE x the shortest step seen
        (now if unknown)."""
        if self._inflight is None or self.step_floor_s is None:
            return time.perf_counter()
        return self._launched_at + NAP_SHARE * self.step_floor_s

    def _record(self) -> torch.cuda.Event:
        self._last_event = event = torch.cuda.Event()
        event.record()
        return event

    # ---- one turn, on the scheduler thread --------------------------------------------
    def _turn(self) -> tuple[bool, float | None]:
        """Collect the GPU work in flight, admit queued rows if the gate opens, launch the next step.

        Returns (whether this engine has work on the GPU afterwards, the time at which its
        held rows' `max_hold_s` runs out, or None).
        """
        if (
            self._closed
            and self._inflight is None
            and not self._pending
            and not self._running
            and not self._waiting
            and self._queue.empty()
        ):
            return False, None
        stream = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        with self._ctx(), stream:
            try:
                t0 = time.perf_counter()
                if self._inflight is not None:
                    self._finish()
                t1 = time.perf_counter()
                self.stats["decode_s"] += t1 - t0
                if self._pending:
                    self._collect_prefills()
                if not self._pull(block=False):
                    self._shutdown()
                    return False, None
                self._wake_at = None
                if self._waiting:
                    if self._gate_open():
                        self._admit_async()
                    else:
                        self.stats["held_turns"] += 1
                t2 = time.perf_counter()
                self.stats["prefill_s"] += t2 - t1
                if self._running:
                    self._launch()
                    self.stats["decode_s"] += time.perf_counter() - t2
            except Exception as e:  # noqa: BLE001 - fail the requests in flight, keep serving
                self._inflight = None
                failed = self._running + [j for p in self._pending for j in p[0]]
                self._pending, self._running = [], []
                self._fail(failed, e, keep=False)
        if self._held() or not self._queue.empty():
            self._idle_since = None
        elif self._idle_since is None:
            self._idle_since = time.perf_counter()
        return self._inflight is not None or bool(self._pending), self._wake_at

    def _gate_open(self) -> bool:
        g, now = self.gate, time.perf_counter()
        if (g.share <= 0 and g.balance <= 0 and g.free_share <= 0) or any(j.row is None for j in self._waiting):
            return True  # eager, or a judge's next-token logits (a prefill, no decode steps)
        lately = max(self.scheduler.peak_rows, self.scheduler.held_rows())
        if g.share > 0 and len(self._waiting) >= g.share * lately:
            return True
        if g.free_share > 0:
            elsewhere = sum(e._held() for e in self.scheduler.engines if e is not self)
            if len(self._waiting) >= g.free_share * (lately - elsewhere):
                return True
        wake = []
        if g.max_hold_s > 0:
            if now - self._waiting[0].queued_at >= g.max_hold_s:
                return True
            wake.append(self._waiting[0].queued_at + g.max_hold_s)
        others = self.scheduler.running_rows(besides=self)
        if g.balance > 0 and others > 0 and self.step_floor_s is not None:
            waited = sum(now - j.queued_at for j in self._waiting)
            budget = sum(j.budget for j in self._waiting) / len(self._waiting)
            owed = g.balance * others * budget * self.step_floor_s
            if waited >= owed:
                return True
            wake.append(now + (owed - waited) / len(self._waiting))
        since = self.scheduler.others_idle_since(self)
        if not self._running and not self._pending and since is not None:  # else the GPU would idle
            if now - since >= g.idle_grace_s:
                return True
            wake.append(since + g.idle_grace_s)
        self._wake_at = min(wake, default=None)
        return False

    def _admit_async(self) -> None:
        """Give waiting jobs slots (FIFO, while slots last) and issue their prefills (not awaited)."""
        admitted, now = self._take_slots(), time.perf_counter()
        if not admitted:
            return
        self.stats["hold_s"] += sum(now - job.queued_at for job, _ in admitted)
        self.stats["admissions"] += 1
        self.stats["admitted_rows"] += len(admitted)
        if self._running:
            self.stats["admitted_mid_decode"] += len(admitted)
        for group in _prefill_groups(admitted):
            self._prefill_async(group)

    def _prefill_async(self, group) -> None:
        """FastStepEngine._prefill without a host sync: one pinned input copy, stats copied back async."""
        B, S = len(group), _round_up(max(len(job.ids) - n for job, n in group), PREFILL_BLOCK)
        C, dummy = self.max_context, self.lm.dummy
        host = torch.empty((3 * B * S + 2 * B,), dtype=torch.long, pin_memory=self._cuda)
        tokens, pos, write = (host[i * B * S : (i + 1) * B * S].view(B, S) for i in range(3))
        read, last = host[3 * B * S : 3 * B * S + B], host[3 * B * S + B :]
        tokens.fill_(self.pad_id)
        write.fill_(dummy)  # padding writes go to the dummy slot
        for i, (job, n) in enumerate(group):
            tail = job.ids[n:]
            tokens[i, : len(tail)] = torch.tensor(tail)
            torch.arange(n, n + S, out=pos[i]).clamp_(max=C - 1)
            write[i, : len(tail)] = job.slot
            read[i] = job.slot
            last[i] = len(tail) - 1
            self.slots.ids[job.slot] = list(job.ids)
        window = min(C, _round_up(max(len(job.ids) for job, _ in group), WINDOW_BLOCK))
        dev = host.to(self.device, non_blocking=True)
        d_tok, d_pos, d_write = (dev[i * B * S : (i + 1) * B * S].view(B, S) for i in range(3))
        self.forward_calls += 1
        with _prefill_attention(self.device):
            logits = self.lm.forward(
                d_tok, d_pos, d_write, dev[3 * B * S : 3 * B * S + B], window, dev[3 * B * S + B :]
            )
        stats, event = token_stats(logits), None
        if self._cuda:
            pinned = torch.empty(stats.shape, dtype=stats.dtype, pin_memory=True)
            pinned.copy_(stats, non_blocking=True)
            event, stats = self._record(), pinned
        self._pending.append(([job for job, _ in group], stats, logits, event, host))

    def _collect_prefills(self) -> None:
        """Read the first token of every prefilled row; the rows join the running batch."""
        pending, self._pending = self._pending, []
        for jobs, stats, logits, event, _ in pending:
            if event is not None:
                t = time.perf_counter()
                event.synchronize()
                self.stats["gpu_wait_s"] += time.perf_counter() - t
            self._running += jobs
            self._consume(jobs, stats, logits)
        self.stats["max_running"] = max(self.stats["max_running"], len(self._running))

    def _launch(self) -> None:
        """Issue one decode step for every running row; its results are read by `_finish`."""
        self._launched_at = time.perf_counter()
        jobs = list(self._running)
        toks = [j.next_tok for j in jobs]
        slots = [j.slot for j in jobs]
        pos = [len(self.slots.ids[s]) for s in slots]
        B = len(jobs)
        event = None
        if self.graphs is not None:
            g, Bb = self._graph(B, min(self.max_context, _round_up(max(pos) + 1, WINDOW_BLOCK)))
            pad = Bb - B
            pinned = self._pinned.get(Bb)
            if pinned is None:
                pinned = self._pinned[Bb] = (
                    torch.empty(g.inp.shape, dtype=g.inp.dtype, pin_memory=True),
                    torch.empty(g.stats.shape, dtype=g.stats.dtype, pin_memory=True),
                )
            inp, out = pinned  # free to overwrite: the last step of this engine was waited for
            inp.copy_(torch.tensor([toks + [self.pad_id] * pad, pos + [0] * pad, slots + [self.lm.dummy] * pad]))
            g.inp.copy_(inp, non_blocking=True)  # a pageable copy would wait for the whole queue
            g.graph.replay()
            out.copy_(g.stats, non_blocking=True)
            event = self._record()
            stats, logits = out[:, :B], g.logits[:B]
        else:
            window = min(self.max_context, _round_up(max(pos) + 1, WINDOW_BLOCK))
            inp = torch.tensor([toks, pos, slots], device=self.device)
            logits, stats = self.lm.decode(inp, window)
            stats = stats.cpu()
        for j in jobs:
            self.slots.ids[j.slot].append(j.next_tok)
        self.forward_calls += 1
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += B
        self._inflight = (jobs, stats, logits, event)

    def _graph(self, B: int, window: int):
        graphs = self.graphs
        if graphs is None:
            raise ValueError("a graph decode step needs the engine's CUDA graphs (use_graphs on a CUDA device)")
        Bb = next(b for b in graphs.buckets if b >= B)
        if self.lm.decode_kernel:  # the kernel reads each row's own length: one graph per bucket
            window = self.max_context
        return graphs.graphs.get((Bb, window)) or graphs._capture(Bb, window), Bb

    def _finish(self) -> None:
        if self._inflight is None:
            raise ValueError("no decode step in flight to finish (_launch issues one)")
        jobs, stats, logits, event = self._inflight
        self._inflight = None
        if event is not None:
            t = time.perf_counter()
            event.synchronize()
            self.stats["gpu_wait_s"] += time.perf_counter() - t
        dt, floor = time.perf_counter() - self._launched_at, self.step_floor_s
        self.step_floor_s = dt if floor is None else min(dt, floor * 1.01)
        self._consume(jobs, stats, logits)

    def _shutdown(self) -> None:
        """Fail what is left (the scheduler or this engine closed)."""
        self._inflight = None
        self._closed = True
        pending = [j for p in self._pending for j in p[0]]
        self._pending = []
        self._fail(self._running + pending + list(self._waiting), RuntimeError("ColocatedEngine closed"), keep=False)
        self._running, self._waiting = [], type(self._waiting)()
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item:
                self._fail(item, RuntimeError("ColocatedEngine closed"), keep=False)


ROLE_GATES = {"draft": DRAFT_GATE, "target": TARGET_GATE}


def load_colocated_engines(
    models: dict[str, Any], scheduler: ColocatedScheduler, gates: dict[str, Gate] | None = None
) -> dict[str, Any]:
    """Step engines for the roles of `models` (role -> ModelConfig), sharing one scheduler.

    `engine: fast` roles become ColocatedEngines on `scheduler`, gated by `gates[role]`
    (default `ROLE_GATES`: the draft batches admissions lightly, the target waits for a
    batch); the draft gets the high-priority stream; other engines (hf, llamacpp) load as
    usual (they batch on their own, in this same process).
    """
    from arbitrage.models import load_causal_lm, load_engine

    gates = {**ROLE_GATES, **(gates or {})}
    out: dict[str, StepEngine] = {}
    for role, cfg in models.items():
        if cfg.engine == "fast":
            model, tokenizer = load_causal_lm(cfg)
            out[role] = ColocatedEngine(
                model,
                tokenizer,
                scheduler,
                gate=gates.get(role, EAGER),
                priority=role == "draft",
                max_context=cfg.max_context,
                max_slots=cfg.max_slots,
            )
        else:
            out[role] = load_engine(cfg)
    return out
