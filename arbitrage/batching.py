"""Dynamic batching: concurrent single requests from many chains share one batched call.

`DynamicBatcher.submit(item)` is awaited by each chain; a background task collects
items for up to `max_wait_ms` (or until `max_batch_size`), runs the batch function in
a worker thread so the event loop never blocks, and resolves each caller's future.
While one batch runs, the next fills. The model actors and the in-process backend
both use it; it records a batch-size histogram.

A batch function may answer with one future per item instead of the results (a continuous
engine's rows, `arbitrage.engine_base.step_batch_fn`): each caller then gets its own row the
moment that row finishes, and a row that fails fails only its caller.

Per-request isolation: when a batch of several requests fails, the fault may be one
request's (a prompt over the context, parameters that cannot be sampled), so the batch is
split in halves and each half runs again, down to single requests; only the requests that
fail on their own get the error, the rest get their results (`isolated` counts the splits).
A failure of the process behind the call (a dead Ray actor, a broken tensor-parallel group:
anything `retryable`) is not the requests' fault and reaches every caller at once, for the
caller's retry layer to send again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import sys
import time
from collections import Counter
from typing import Any, Callable, Generic, TypeGuard, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class DynamicBatcher(Generic[T, R]):
    """Collects awaited requests into batches for `batch_fn(list[T]) -> list[R]`."""

    def __init__(
        self,
        batch_fn: Callable[[list[T]], list[R]],
        max_batch_size: int = 16,
        max_wait_ms: float = 5.0,
        max_inflight: int = 1,
    ):
        """
        Args:
            batch_fn: the batched call; a coroutine function is awaited on the event loop, any
                other runs in a worker thread (never blocking the event loop).
            max_batch_size, max_wait_ms: how a batch forms.
            max_inflight: batches handed to batch_fn at once. 1 for engines that run one
                batch at a time; more for engines that admit new rows into a running batch
                (continuous batching), so a new chain's step never waits for a batch to end.
        """
        self.batch_fn = batch_fn
        self.max_inflight = max_inflight
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.batch_sizes: Counter[int] = Counter()
        self.busy_s = 0.0
        self.isolated = 0  # failed batches split to find the requests at fault
        self._queue: asyncio.Queue[tuple[T, asyncio.Future]] | None = None
        self._task: asyncio.Task | None = None

    async def submit(self, item: T) -> R:
        """Queue one request and wait for its result."""
        queue = self._ensure_started()
        fut = asyncio.get_running_loop().create_future()
        await queue.put((item, fut))
        return await fut

    def queued(self) -> int:
        """Requests waiting for a batch (not yet handed to batch_fn)."""
        return self._queue.qsize() if self._queue is not None else 0

    def stats(self) -> dict[str, Any]:
        return {"batch_sizes": dict(sorted(self.batch_sizes.items())), "busy_s": self.busy_s, "isolated": self.isolated}

    def _ensure_started(self) -> asyncio.Queue[tuple[T, asyncio.Future]]:
        """The queue the running batch task reads (a new queue and task if none is running)."""
        if self._queue is None or self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._run(self._queue))
        return self._queue

    async def _collect(self, queue: asyncio.Queue[tuple[T, asyncio.Future]]) -> list[tuple[T, asyncio.Future]]:
        batch = [await queue.get()]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            try:
                batch.append(queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), left))
            except asyncio.TimeoutError:
                break
        return batch

    async def _run(self, queue: asyncio.Queue[tuple[T, asyncio.Future]]) -> None:
        slots = asyncio.Semaphore(self.max_inflight)
        while True:
            batch = await self._collect(queue)
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
        batch = [(item, fut) for item, fut in batch if not fut.done()]  # a caller may have left
        if not batch:
            return
        items = [item for item, _ in batch]
        self.batch_sizes[len(items)] += 1
        t0 = time.perf_counter()
        try:
            results = await self._call(items)
            if len(results) != len(items):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
        except Exception as e:
            self.busy_s += time.perf_counter() - t0
            if len(batch) > 1 and not _process_failure(e):  # find the request(s) at fault
                self.isolated += 1
                half = len(batch) // 2
                if inspect.iscoroutinefunction(self.batch_fn):
                    await asyncio.gather(self._execute(batch[:half]), self._execute(batch[half:]))
                else:
                    await self._execute(batch[:half])
                    await self._execute(batch[half:])
                return
            for _, fut in batch:  # one request's own failure, or the process behind the call
                if not fut.done():
                    fut.set_exception(e)
            return
        rows = [_forward(res, fut) for (_, fut), res in zip(batch, results) if _is_row_future(res)]
        for (_, fut), res in zip(batch, results):
            if not _is_row_future(res) and not fut.done():
                fut.set_result(res)
        if rows:  # a continuous engine's rows: each caller gets its own the moment it finishes
            await asyncio.gather(*rows)
        self.busy_s += time.perf_counter() - t0

    async def _call(self, items: list[T]) -> list[R]:
        if inspect.iscoroutinefunction(self.batch_fn):  # e.g. hands rows to a continuous engine
            return await self.batch_fn(items)
        return await asyncio.to_thread(self.batch_fn, items)


def _is_row_future(res: Any) -> "TypeGuard[concurrent.futures.Future | asyncio.Future]":
    """A continuous engine's per-row future, handed back in place of the row's result."""
    return isinstance(res, concurrent.futures.Future) or asyncio.isfuture(res)


async def _forward(row: "concurrent.futures.Future | asyncio.Future", fut: asyncio.Future) -> None:
    """Hand one row's result (or its own error) to its caller."""
    try:
        value = await (asyncio.wrap_future(row) if isinstance(row, concurrent.futures.Future) else row)
    except Exception as e:  # noqa: BLE001 - this row's failure is its caller's alone
        if not fut.done():
            fut.set_exception(e)
        return
    if not fut.done():
        fut.set_result(value)


def _process_failure(err: BaseException) -> bool:
    """The process serving the call failed, not a request: a `retryable` error (e.g. a broken
    tensor-parallel group) or a dead / restarting Ray actor or worker."""
    if getattr(err, "retryable", False):
        return True
    ray_exceptions = sys.modules.get("ray.exceptions")  # no Ray imported: no Ray failure possible
    if ray_exceptions is None:
        return False
    kinds = tuple(
        getattr(ray_exceptions, n)
        for n in ("RayActorError", "WorkerCrashedError", "ActorUnavailableError", "NodeDiedError")
        if hasattr(ray_exceptions, n)
    )
    return isinstance(err, kinds)
