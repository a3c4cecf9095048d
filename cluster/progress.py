"""Step-level progress with an ETA for `arbitrage run`, `eval`, `demo` and `collect`.

Chains of a batch run concurrently and finish together, so a bar over chains sits at 0 for
most of a run. This bar counts decided steps instead. The number of steps a chain will take
is unknown until it ends, so the bar's total is an estimate: finished chains count their
real steps, unfinished ones the mean of the finished ones (`generation.max_steps` until one
finishes), never less than what they have done. tqdm's ETA follows the estimate.

Steps come in two ways: in-process runs call `step()` from the loop's `on_step`; Ray runs
poll the coordinators' `progress()` counters from a background thread (`poll_coordinators`).
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator


class StepProgress:
    """A tqdm bar over the decided steps of `chains` chains, each of at most `max_steps` steps."""

    def __init__(self, chains: int, max_steps: int, label: str = "steps", enabled: bool = True):
        from tqdm import tqdm

        self.chains, self.max_steps = chains, max_steps
        self.finished_chains, self.finished_steps = 0, 0
        self.decided = 0
        self._lock = threading.Lock()
        tty = sys.stderr.isatty()
        self.bar = tqdm(
            total=chains * max_steps,
            desc=label,
            unit="step",
            file=sys.stderr,
            disable=not enabled,
            dynamic_ncols=True,
            leave=True,
            mininterval=0.1 if tty else 30.0,  # a log file gets a line every 30 s
            bar_format="{desc}: {n_fmt}/~{total_fmt} steps |{bar}| {elapsed}<{remaining}, {rate_fmt}{postfix}",
        )
        self._show()

    def _estimate(self) -> int:
        left = self.chains - self.finished_chains
        per_chain = self.finished_steps / self.finished_chains if self.finished_chains else self.max_steps
        return max(self.decided, self.finished_steps + round(left * per_chain))

    def _show(self) -> None:
        self.bar.total = self._estimate()
        self.bar.set_postfix_str(f"{self.finished_chains}/{self.chains} chains done", refresh=False)
        self.bar.update(self.decided - self.bar.n)  # prints at most every `mininterval`

    def step(self, *_: object) -> None:
        """One more decided step (the loop's `on_step` callback)."""
        with self._lock:
            self.decided += 1
            self._show()

    def set_decided(self, n: int) -> None:
        """The number of steps decided so far (from a poll); never goes backwards."""
        with self._lock:
            if n > self.decided:
                self.decided = n
                self._show()

    def chain_done(self, row: dict) -> None:
        """A chain finished with `row["steps"]`."""
        with self._lock:
            self.finished_chains += 1
            self.finished_steps += len(row.get("steps") or [])
            self.decided = max(self.decided, self.finished_steps)
            self._show()

    def close(self) -> None:
        with self._lock:
            if self.finished_chains == self.chains:
                self.bar.total = max(self.decided, 1)
            self.bar.set_postfix_str(f"{self.finished_chains}/{self.chains} chains done", refresh=False)
            self.bar.close()


@contextmanager
def poll_coordinators(progress: StepProgress, coordinators: list, every_s: float = 1.0) -> Iterator[None]:
    """Update `progress` from the coordinators' step counters while the block runs."""
    import ray

    def count() -> int:
        return sum(p["steps"] for p in ray.get([c.progress.remote() for c in coordinators], timeout=30))

    try:
        base = count()
    except Exception:  # noqa: BLE001 -- progress is best effort; the run reports real failures
        base = 0
    with poll(progress, lambda: count() - base, every_s):
        yield


@contextmanager
def poll(progress: StepProgress, count: Callable[[], int], every_s: float = 1.0) -> Iterator[None]:
    """Call `count()` every `every_s` seconds in a daemon thread and show it, until the block ends."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            try:
                progress.set_decided(count())
            except Exception:  # noqa: BLE001 -- a restarting coordinator: try again next time
                continue

    t = threading.Thread(target=loop, name="arbitrage-progress", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(timeout=5)
