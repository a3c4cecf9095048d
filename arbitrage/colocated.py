"""Colocated engines: several FastStepEngines in one process, driven by ONE scheduler thread.

Why. On one GPU, a draft and a target in two processes time-slice the device: whenever both
decode, each waits for the other's slice, and the coordinator's overlap of draft and target
work turns into waiting (docs/BENCHMARKS.md s.3). Here both engines live in one process and
one thread issues all their GPU work, so nothing is time-sliced and the GPU never idles
while either engine has rows.

How. `ColocatedEngine` is a `FastStepEngine` (same forward, slot cache, CUDA graphs, stop
rules, outputs) without a scheduler thread of its own; a `ColocatedScheduler` owns the
thread and gives each engine a *turn* in round-robin order. A turn is:

1. finish the engine's decode step that is in flight (wait for its CUDA event, read the
   sampled tokens, retire finished rows),
2. take newly queued requests and admit them (prefill their uncached tails into the batch),
3. launch the next decode step (graph replay + an async copy of its [3, B] statistics to
   pinned host memory, an event recorded after it) and return without waiting.

So while the CPU finishes engine A's step, engine B's step is already queued or running on
the GPU: the device always has the next decode step of some engine. With `streams=True`
(experimental, off by default: it hung on the H200 at real shapes) each engine issues on its own CUDA stream, so one engine's decode can run
concurrently with the other's (e.g. the launch-bound 1B draft beside the weight-bound 8B
target) instead of strictly after it. Off CUDA (tests) the same loop runs eagerly, in order.

What stays the same: requests, futures, outputs, chain KV reuse, `next_token_logits` (a
judge PRM reusing the target engine works unchanged), counters (`stats`, `forward_calls`).
Not supported: a tensor-parallel engine (its ranks must run batches in lockstep).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any

import torch

from arbitrage.fast_engine import WINDOW_BLOCK, FastStepEngine, _round_up


class ColocatedScheduler:
    """One thread that runs the turns of every registered `ColocatedEngine` in round-robin."""

    def __init__(self, streams: bool | None = None):
        """Args: streams: one CUDA stream per engine (default: off, unless the environment sets
        ARBITRAGE_COLOCATED_STREAMS=1); off issues every engine's work on the current stream,
        one after the other. Streams are EXPERIMENTAL: on the H200 with 1B + 8B engines at 8+
        concurrent rows the scheduler hung in a stream's event.synchronize() (tiny models pass;
        benchmarks/results/runtime_coloc_streams_hang_h200.log)."""
        if streams is None:
            streams = os.environ.get("ARBITRAGE_COLOCATED_STREAMS") == "1"
        self.streams = streams
        self.engines: list[ColocatedEngine] = []
        self.stats = {"turns": 0, "idle_s": 0.0, "busy_s": 0.0}
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None

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

    def close(self) -> None:
        """Stop the thread; requests still queued or running fail with RuntimeError."""
        with self._lock:
            self._closed = True
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                self._wake.clear()  # a submit after this sets it again: no lost wake-up
                with self._lock:
                    engines, closed = list(self.engines), self._closed
                if closed:
                    break
                t0 = time.perf_counter()
                busy = False
                for e in engines:
                    busy |= e._turn()
                t1 = time.perf_counter()
                if busy:
                    self.stats["turns"] += 1
                    self.stats["busy_s"] += t1 - t0
                else:
                    self._wake.wait()
                    self.stats["idle_s"] += time.perf_counter() - t1
            for e in self.engines:
                e._shutdown()


class ColocatedEngine(FastStepEngine):
    """A FastStepEngine whose decode steps are issued by a shared `ColocatedScheduler`."""

    def __init__(self, model, tokenizer, scheduler: ColocatedScheduler, **kwargs: Any):
        """Args: model, tokenizer and keyword arguments as FastStepEngine's (no `tp`);
        scheduler: the thread that runs this engine together with the others."""
        if kwargs.get("tp") is not None:
            raise ValueError("a tensor-parallel engine cannot be colocated (its ranks run batches in lockstep)")
        self.scheduler = scheduler
        self._inflight: tuple | None = None  # (jobs, host stats, logits, event) of the launched step
        self._pinned: dict[int, torch.Tensor] = {}  # batch bucket -> pinned [3, Bb] host buffer
        super().__init__(model, tokenizer, **kwargs)  # its own thread exits at once (see _loop)
        self._thread.join()
        cuda = self.device.type == "cuda"
        use_streams = cuda if scheduler.streams is None else (scheduler.streams and cuda)
        self.stream = torch.cuda.Stream(self.device) if use_streams else None
        self._ctx = (lambda: torch.cuda.device(self.device)) if cuda else contextlib.nullcontext
        scheduler.add(self)

    # ---- FastStepEngine hooks ---------------------------------------------------------
    def _loop(self) -> None:
        """No thread of its own: the scheduler drives `_turn`."""

    def _submit(self, jobs) -> None:
        super()._submit(jobs)
        self.scheduler.wake()

    def close(self) -> None:
        """Detach from the scheduler; this engine's queued and running requests fail."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self.scheduler.wake()

    # ---- one turn, on the scheduler thread --------------------------------------------
    def _turn(self) -> bool:
        """Finish the in-flight decode step, admit queued rows, launch the next step.

        Returns whether this engine has work on the GPU (a launched step) afterwards.
        """
        if self._closed and self._inflight is None and not self._running and not self._waiting \
                and self._queue.empty():
            return False
        stream = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        with self._ctx(), stream:
            try:
                t0 = time.perf_counter()
                if self._inflight is not None:
                    self._finish()
                t1 = time.perf_counter()
                self.stats["decode_s"] += t1 - t0
                if not self._pull(block=False):
                    self._shutdown()
                    return False
                self._admit()
                t2 = time.perf_counter()
                self.stats["prefill_s"] += t2 - t1
                if self._running:
                    self._launch()
                    self.stats["decode_s"] += time.perf_counter() - t2
            except Exception as e:  # noqa: BLE001 - fail the requests in flight, keep serving
                self._inflight = None
                self._fail(self._running, e, keep=False)
                self._running = []
        return self._inflight is not None

    def _launch(self) -> None:
        """Issue one decode step for every running row; its results are read by `_finish`."""
        jobs = list(self._running)
        toks = [j.next_tok for j in jobs]
        slots = [j.slot for j in jobs]
        pos = [len(self.slots.ids[s]) for s in slots]
        B = len(jobs)
        event = None
        if self.graphs is not None:
            g, Bb = self._graph(B, min(self.max_context, _round_up(max(pos) + 1, WINDOW_BLOCK)))
            pad = Bb - B
            host = torch.tensor([toks + [self.pad_id] * pad, pos + [0] * pad, slots + [self.lm.dummy] * pad])
            g.inp.copy_(host)
            g.graph.replay()
            pinned = self._pinned.get(Bb)
            if pinned is None:
                pinned = self._pinned[Bb] = torch.empty(g.stats.shape, dtype=g.stats.dtype, pin_memory=True)
            pinned.copy_(g.stats, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            stats, logits = pinned[:, :B], g.logits[:B]
        else:
            window = min(self.max_context, _round_up(max(pos) + 1, WINDOW_BLOCK))
            inp = torch.tensor([toks, pos, slots], device=self.device)
            logits, stats = self.lm.decode(inp, window)
            stats = stats.cpu()
        for j in jobs:
            self.slots.ids[j.slot].append(j.next_tok)
        self.forward_calls += 1
        self.stats["decode_steps"] += 1
        self._inflight = (jobs, stats, logits, event)

    def _graph(self, B: int, window: int):
        graphs = self.graphs
        Bb = next(b for b in graphs.buckets if b >= B)
        if self.lm.decode_kernel:  # the kernel reads each row's own length: one graph per bucket
            window = self.max_context
        return graphs.graphs.get((Bb, window)) or graphs._capture(Bb, window), Bb

    def _finish(self) -> None:
        jobs, stats, logits, event = self._inflight
        self._inflight = None
        if event is not None:
            event.synchronize()
        self._consume(jobs, stats, logits)

    def _shutdown(self) -> None:
        """Fail what is left (the scheduler or this engine closed)."""
        self._inflight = None
        self._closed = True
        self._fail(self._running + list(self._waiting), RuntimeError("ColocatedEngine closed"), keep=False)
        self._running, self._waiting = [], type(self._waiting)()
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item:
                self._fail(item, RuntimeError("ColocatedEngine closed"), keep=False)


def load_colocated_engines(models: dict[str, Any], scheduler: ColocatedScheduler) -> dict[str, Any]:
    """Step engines for the roles of `models` (role -> ModelConfig), sharing one scheduler.

    `engine: fast` roles become ColocatedEngines on `scheduler`; other engines (hf, llamacpp)
    load as usual (they batch on their own, in this same process).
    """
    from arbitrage.models import load_causal_lm, load_engine

    out = {}
    for role, cfg in models.items():
        if cfg.engine == "fast":
            model, tokenizer = load_causal_lm(cfg)
            out[role] = ColocatedEngine(model, tokenizer, scheduler, max_context=cfg.max_context,
                                        max_slots=cfg.max_slots)
        else:
            out[role] = load_engine(cfg)
    return out
