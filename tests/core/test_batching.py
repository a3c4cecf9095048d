"""Dynamic batching: requests share batches, errors reach every caller, in-flight limit holds."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from arbitrage.batching import DynamicBatcher


def test_concurrent_submits_share_a_batch():
    seen = []

    def fn(items):
        seen.append(len(items))
        return [x * 2 for x in items]

    async def main():
        b = DynamicBatcher(fn, max_batch_size=8, max_wait_ms=20)
        out = await asyncio.gather(*(b.submit(i) for i in range(8)))
        return out, b.stats()

    out, stats = asyncio.run(main())
    assert out == [i * 2 for i in range(8)]
    assert max(seen) > 1 and sum(k * v for k, v in stats["batch_sizes"].items()) == 8


def test_batch_error_reaches_every_caller():
    def fn(items):
        raise RuntimeError("bad batch")

    async def main():
        b = DynamicBatcher(fn, max_batch_size=4, max_wait_ms=10)
        return await asyncio.gather(*(b.submit(i) for i in range(3)), return_exceptions=True)

    assert all(isinstance(r, RuntimeError) for r in asyncio.run(main()))


@pytest.mark.parametrize("inflight, expect_overlap", [(1, False), (4, True)])
def test_max_inflight_batches(inflight, expect_overlap):
    active, peak, lock = [0], [0], threading.Lock()

    def fn(items):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1
        return items

    async def main():
        b = DynamicBatcher(fn, max_batch_size=1, max_wait_ms=0, max_inflight=inflight)
        return await asyncio.gather(*(b.submit(i) for i in range(6)))

    assert asyncio.run(main()) == list(range(6))
    assert (peak[0] > 1) == expect_overlap
