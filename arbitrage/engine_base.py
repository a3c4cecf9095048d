"""The step-engine contract: what the backends, the model actors and the PRMs call on any engine.

Every engine -- HF transformers (`arbitrage.engine.HFStepEngine`), the GPU engine
(`arbitrage.fast_engine.FastStepEngine`) and the CPU engine
(`arbitrage.llamacpp_engine.LlamaCppStepEngine`) -- subclasses `StepEngine`. Engines with
continuous admission (`continuous = True`) also subclass `QueuedStepEngine`: callers queue
rows and await futures while one scheduler thread owns the model. The one rule that sizes
a slot engine's KV pool is `configs.schema.kv_slots` (torch-free: the memory plan uses it too).
"""

from __future__ import annotations

import abc
import asyncio
import queue
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable

import torch

from arbitrage.engine_common import Job, SlotPool, new_row, render_prompt, unique_keys
from arbitrage.types import ContextOverflow, SamplingParams, StepOutput, StepRequest


def step_batch_fn(engine: "StepEngine"):
    """The `DynamicBatcher` batch function for an engine's steps.

    A continuous engine's batch is queued (prompt rendering in a worker thread) and answered
    with its rows' futures, which the batcher hands to each caller as each row finishes: a
    short step never waits for the longest step of its batch. Any other engine runs one batch
    at a time in a worker thread (`generate_steps`).
    """
    if not engine.continuous:
        return engine.generate_steps

    async def submit(requests: list[StepRequest]) -> list[Future]:
        return await asyncio.to_thread(engine.submit_steps, requests)

    return submit


class StepEngine(abc.ABC):
    """Decodes one reasoning step per request for a batch of chains (text in, text out)."""

    tokenizer: Any
    max_context: int  # tokens of prompt + step per chain
    continuous: bool = False  # True: `submit_steps` admits rows into the running batch
    forward_calls: int  # forward passes (prefill + decode), for tests and metrics
    prefill_tokens: int  # prompt tokens computed
    reused_tokens: int  # prompt tokens served from a chain's cached KV
    stats: dict[str, Any]  # engine-specific counters (ModelActor.stats()["engine"])

    @abc.abstractmethod
    def generate_steps(self, requests: list[StepRequest]) -> list[StepOutput]:
        """Decode one step per request, batched.

        Args:
            requests: one per chain; params may differ per row.
        Returns:
            One StepOutput per request, in order.
        """

    def submit_steps(self, requests: list[StepRequest]) -> list[Future]:
        """Queue one step per request; one future per request (its StepOutput). Continuous engines only."""
        raise NotImplementedError(f"{type(self).__name__} runs one batch at a time; call generate_steps")

    @abc.abstractmethod
    def next_token_logits(self, token_ids: list[list[int]], keys: list[str | None]) -> torch.Tensor:
        """Logits of the token after each prompt, reusing and then extending chains' cached KV.

        Args:
            token_ids: one prompt per row, already tokenized.
            keys: cache key per row (None: no reuse).
        Returns:
            logits: [B, V] float32.
        """

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` under this engine's tokenizer (no special tokens)."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def close(self) -> None:
        """Release threads and native memory (no-op for engines that hold none)."""

    def __enter__(self) -> "StepEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class QueuedStepEngine(StepEngine):
    """A step engine whose scheduler thread takes queued `Job`s (fast and llama.cpp engines).

    Subclasses set `tokenizer`, `max_context`, `reuse` (keep chains' KV between requests) and
    call `_init_queue()`; their scheduler loop calls `_pull` between iterations.
    """

    continuous = True
    reuse: bool
    slots: SlotPool
    prefill_tokens: int
    reused_tokens: int

    def _init_queue(self) -> None:
        self._queue: queue.Queue = queue.Queue()  # lists of Job; None closes
        self._waiting: deque[Job] = deque()  # queued, not yet holding a slot
        self._running: list[Job] = []  # holding a slot
        self._closed = False

    def generate_steps(self, requests: list[StepRequest]) -> list[StepOutput]:
        """Decode one step per request; thread-safe, batched with other callers' requests."""
        return [f.result() for f in self.submit_steps(requests)]

    def submit_steps(self, requests: list[StepRequest]) -> list[Future]:
        """Queue one step per request and return at once: one future per request (its StepOutput).

        For async callers (the model actors): the rows join the running batch, and the caller
        awaits the futures without holding a thread per batch.
        """
        if not requests:
            return []
        prompts = [render_prompt(self.tokenizer, r) for r in requests]
        keys = unique_keys([r.chain_id if self.reuse else None for r in requests])
        jobs = [self._step_job(p, r.params, k) for p, r, k in zip(prompts, requests, keys)]
        self._submit(jobs)
        return [j.future for j in jobs]

    def next_token_logits(self, token_ids: list[list[int]], keys: list[str | None]) -> torch.Tensor:
        """Logits of the token after each prompt, reusing and extending chains' cached KV; [B, V]."""
        return self._prompt_jobs(Job, token_ids, keys)

    def _prompt_jobs(self, job_cls: type[Job], token_ids: list[list[int]], keys: list[str | None]) -> torch.Tensor:
        """Queue one prompt-only job per row and stack the tensors they answer with."""
        keys = unique_keys([k if self.reuse else None for k in keys])
        for e in token_ids:
            if not 0 < len(e) <= self.max_context:
                raise ContextOverflow(f"prompt has {len(e)} tokens; it must have 1..max_context={self.max_context}")
        jobs = [job_cls(list(e), k, Future()) for e, k in zip(token_ids, keys)]
        self._submit(jobs)
        return torch.stack([j.future.result() for j in jobs])

    def _step_job(self, prompt: str, params: SamplingParams, key: str | None) -> Job:
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if len(ids) >= self.max_context:
            raise ContextOverflow(f"prompt has {len(ids)} tokens; max_context is {self.max_context}")
        budget = max(1, min(params.forced_tokens or params.max_tokens, self.max_context - len(ids)))
        return Job(ids, key, Future(), new_row(params, prompt), budget)

    def _submit(self, jobs: list[Job]) -> None:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")
        self._queue.put(jobs)

    def _take_slots(self, on_admit: Callable[[Job, int], int] | None = None) -> list[tuple[Job, int]]:
        """Admission, the part every queued engine shares: waiting jobs in FIFO order get a
        slot (`self.slots`, a SlotPool) while slots last; returns (job, reused tokens) each.

        `on_admit(job, reused)` may extend the reused prefix (llama.cpp shares another
        sequence's cells) and returns the tokens reused; prefill / reuse counters follow it.
        """
        admitted = []
        while self._waiting:
            job = self._waiting[0]
            got = self.slots.acquire(job.key, job.ids)
            if got is None:
                break  # every slot is busy: wait for a row to retire
            self._waiting.popleft()
            job.slot, reused, job.key = got
            if on_admit is not None:
                reused = on_admit(job, reused)
            self.prefill_tokens += len(job.ids) - reused
            self.reused_tokens += reused
            admitted.append((job, reused))
        return admitted

    def _pull(self, block: bool) -> bool:
        """Move queued jobs to the waiting list (blocking only when idle); False once closed."""
        try:
            item = self._queue.get(block=block)
        except queue.Empty:
            return True
        while item is not None:
            self._waiting.extend(item)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return True
        return False
