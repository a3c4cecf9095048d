"""Dynamic batching: requests share batches, a bad request fails alone, in-flight limit holds."""

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


class Broken(RuntimeError):
    retryable = True  # like a broken tensor-parallel group: the process failed, not the request


@pytest.mark.parametrize("coroutine", [False, True])
def test_one_bad_request_fails_alone(coroutine):
    """A batch that fails is split until the bad request is alone; the others get their results."""
    calls = []

    def fn(items):
        calls.append(list(items))
        if 5 in items:
            raise ValueError("item 5 cannot be sampled")
        return [x * 10 for x in items]

    async def afn(items):
        return fn(items)

    async def main():
        b = DynamicBatcher(afn if coroutine else fn, max_batch_size=16, max_wait_ms=50)
        out = await asyncio.gather(*(b.submit(i) for i in range(16)), return_exceptions=True)
        return out, b.stats()

    out, stats = asyncio.run(main())
    assert [r for i, r in enumerate(out) if i != 5] == [i * 10 for i in range(16) if i != 5]
    assert isinstance(out[5], ValueError) and "item 5" in str(out[5])
    assert calls[0] == list(range(16)) and stats["isolated"] == 4  # 16 -> 8 -> 4 -> 2 -> 1
    assert len(calls) == 9 and [5] in calls


def test_process_failure_is_not_split():
    """A retryable failure (the serving process, not a request) reaches every caller, batch run once."""
    calls = []

    def fn(items):
        calls.append(len(items))
        raise Broken("group broken")

    async def main():
        b = DynamicBatcher(fn, max_batch_size=8, max_wait_ms=50)
        return await asyncio.gather(*(b.submit(i) for i in range(8)), return_exceptions=True)

    out = asyncio.run(main())
    assert all(isinstance(r, Broken) for r in out) and calls == [8]


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


def test_a_long_prompt_does_not_shorten_its_batch_mates_steps():
    """HF engine: a row near max_context stops at its own limit; the other rows decode as alone."""
    from arbitrage.models import load_engine
    from arbitrage.types import SamplingParams, StepRequest
    from configs.schema import load_config

    cfg = load_config("tiny")
    engine = load_engine(cfg.models.draft.model_copy(update={"max_context": 256, "kv_cache_tokens": 0}))
    params = SamplingParams(max_tokens=12, separator="\n\n")
    short = StepRequest(problem="2 + 2 = ?", params=params)
    long = StepRequest(problem="a" * 250, chat=False, params=params)  # 6 tokens of room left
    alone = engine.generate_steps([short])[0]
    together = engine.generate_steps([short, long])
    assert (together[0].text, together[0].num_tokens) == (alone.text, alone.num_tokens)
    assert (
        alone.num_tokens > 6
        and together[1].num_tokens <= 256 - 250
        and together[1].stop_reason in ("length", "separator", "eos")
    )


def test_rows_answered_by_futures_reach_their_callers_one_by_one():
    """A continuous engine answers a batch with per-row futures: a finished row's caller does not
    wait for its batch mates, and a row that fails fails only its own caller."""
    from concurrent.futures import Future

    rows: list[Future] = []

    async def fn(items):
        rows[:] = [Future() for _ in items]
        return list(rows)

    async def main():
        b = DynamicBatcher(fn, max_batch_size=3, max_wait_ms=20, max_inflight=4)
        calls = [asyncio.ensure_future(b.submit(i)) for i in range(3)]
        while len(rows) < 3:
            await asyncio.sleep(0.01)
        rows[1].set_result("short step")
        first = await asyncio.wait_for(calls[1], 5)
        pending = [c.done() for c in (calls[0], calls[2])]
        rows[2].set_exception(ValueError("this row's own fault"))
        rows[0].set_result("long step")
        rest = await asyncio.gather(calls[0], calls[2], return_exceptions=True)
        return first, pending, rest, b.stats()

    first, pending, rest, stats = asyncio.run(main())
    assert first == "short step" and pending == [False, False]
    assert rest[0] == "long step" and isinstance(rest[1], ValueError)
    assert stats["isolated"] == 0 and stats["batch_sizes"] == {3: 1}
