"""Dynamic batching: concurrent single requests from many chains share one batched call.

`DynamicBatcher.submit(item)` is awaited by each chain; a background task collects
items for up to `max_wait_ms` (or until `max_batch_size`), runs the batch function in
a worker thread so the event loop never blocks, and resolves each caller's future.
While one batch runs, the next fills. The model actors and the in-process backend
both use it; it records a batch-size histogram.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections import Counter
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class DynamicBatcher(Generic[T, R]):
    """Collects awaited requests into batches for `batch_fn(list[T]) -> list[R]`."""

    def __init__(self, batch_fn: Callable[[list[T]], list[R]], max_batch_size: int = 16,
                 max_wait_ms: float = 5.0, run_in_thread: bool = True, max_inflight: int = 1):
        """
        Args:
            batch_fn: the batched call; a coroutine function is awaited on the event loop.
            max_batch_size, max_wait_ms: how a batch forms.
            run_in_thread: run batch_fn in a worker thread (never block the event loop).
            max_inflight: batches handed to batch_fn at once. 1 for engines that run one
                batch at a time; more for engines that admit new rows into a running batch
                (continuous batching), so a new chain's step never waits for a batch to end.
        """
        self.batch_fn = batch_fn
        self.max_inflight = max_inflight
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.run_in_thread = run_in_thread
        self.batch_sizes: Counter[int] = Counter()
        self.busy_s = 0.0
        self._queue: asyncio.Queue[tuple[T, asyncio.Future]] | None = None
        self._task: asyncio.Task | None = None

    async def submit(self, item: T) -> R:
        """Queue one request and wait for its result."""
        self._ensure_started()
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put((item, fut))
        return await fut

    def stats(self) -> dict[str, Any]:
        return {"batch_sizes": dict(sorted(self.batch_sizes.items())), "busy_s": self.busy_s}

    def _ensure_started(self) -> None:
        if self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _collect(self) -> list[tuple[T, asyncio.Future]]:
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except asyncio.TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        slots = asyncio.Semaphore(self.max_inflight)
        while True:
            batch = await self._collect()
            batch = [(item, fut) for item, fut in batch if not fut.cancelled()]
            if not batch:
                continue
            if self.max_inflight == 1:
                await self._execute(batch)
                continue
            await slots.acquire()
            task = asyncio.get_running_loop().create_task(self._execute(batch))
            task.add_done_callback(lambda _: slots.release())

    async def _execute(self, batch: list[tuple[T, asyncio.Future]]) -> None:
        items = [item for item, _ in batch]
        self.batch_sizes[len(items)] += 1
        t0 = time.perf_counter()
        try:
            if inspect.iscoroutinefunction(self.batch_fn):  # e.g. hands rows to a continuous engine
                results = await self.batch_fn(items)
            elif self.run_in_thread:
                results = await asyncio.to_thread(self.batch_fn, items)
            else:
                results = self.batch_fn(items)
            if len(results) != len(items):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
        except Exception as e:  # every caller of this batch sees the error
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(e)
            return
        finally:
            self.busy_s += time.perf_counter() - t0
        for (_, fut), res in zip(batch, results):
            if not fut.done():
                fut.set_result(res)
