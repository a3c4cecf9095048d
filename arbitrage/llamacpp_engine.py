"""The CPU step engine: llama.cpp over a GGUF file, many chains in one `llama_decode`.

The `StepEngine` contract (`arbitrage.engine_base`) like the HF and GPU engines
(`generate_steps`, `submit_steps`, `next_token_logits`, `count_tokens`), built on
`llama-cpp-python`'s low-level API (the optional `cpu` extra):

- The GGUF is loaded as shipped (no dequantisation); prompts are rendered and tokenized
  with the model's HF tokenizer, read from the same GGUF, so every engine sees the same
  token ids for the same request.
- Each chain owns a llama.cpp sequence id (a slot of `SlotPool`): its KV stays in the
  context between steps, and on the next step the sequence is cut back to the longest
  common prefix with the new prompt (`llama_memory_seq_rm`) -- an escalation rolls the
  draft back to the accepted text -- so only the new tail is prefilled.
- One scheduler thread runs continuous batching as llama-server does: every iteration
  puts the running rows' next tokens and chunks of newly admitted prompts into ONE
  `llama_decode` batch (at most `n_batch` tokens), reads the logits of the rows that need
  them, samples, and retires finished rows; new chains join the running batch at once.
- Stop rules, sampling, log-probabilities and entropies are the shared ones of every
  engine (`arbitrage.engine_common`), and the slot pool that of the fast engine.
- `cpu_lock`: engines in different processes on one CPU (the draft and target actors)
  take a file lock around each `llama_decode`, so they alternate on all cores instead of
  oversubscribing them with two thread pools.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from arbitrage.engine_base import QueuedStepEngine
from arbitrage.engine_common import (
    Job,
    SlotPool,
    advance,
    common_prefix,
    pad_id,
    step_output,
    token_stats,
)
from configs.schema import kv_slots

_BACKEND_READY = False
_BACKEND_LOCK = threading.Lock()


def llama_cpp_module():
    """The `llama_cpp` binding, imported on demand.

    Raises:
        ImportError: one line saying how to install it (`pip install -e '.[cpu]'`).
    """
    try:
        import llama_cpp
    except ImportError as e:  # pragma: no cover - exercised only where the extra is absent
        raise ImportError(
            "engine 'llamacpp' needs llama-cpp-python: pip install -e '.[cpu]' "
            "(a source build of llama.cpp, about 4 minutes)"
        ) from e
    return llama_cpp


def amx_compiled(ll) -> bool:
    """Whether this llama.cpp build holds ggml's AMX kernels (a native build on a CPU with AMX).

    They run only on weights in ggml's extra (repacked) buffer types, and on a guest whose
    hypervisor does not hand AMX state to processes `ldtilecfg` faults and kills the process
    (seen on an AMX Xeon VM, 2026-12-02). The engine then keeps weights in plain buffers; the
    Makefile builds llama.cpp for AVX2 without AMX (`LLAMA_CMAKE_ARGS`), so this is a fallback.
    """
    return b"AMX_INT8 = 1" in ll.llama_print_system_info()


_LOG_CALLBACK = None  # kept alive: llama.cpp holds the pointer


def _quiet_log(level, text, user_data) -> None:
    """llama.cpp's log callback: errors only (level 4 = GGML_LOG_LEVEL_ERROR)."""
    if level == 4 and text:
        os.write(2, text)


def _init_backend(ll) -> None:
    global _BACKEND_READY, _LOG_CALLBACK
    with _BACKEND_LOCK:
        if not _BACKEND_READY:
            _LOG_CALLBACK = ll.llama_log_callback(_quiet_log)
            ll.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p())
            ll.llama_backend_init()
            _BACKEND_READY = True


class CpuLock:
    """A lock shared by every engine on this machine: a threading lock plus an flock file."""

    def __init__(self, path: str | os.PathLike | None):
        self._thread_lock = threading.Lock()
        self._fd = None
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    @contextlib.contextmanager
    def held(self):
        with self._thread_lock:
            if self._fd is None:
                yield
                return
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)


_PROCESS_LOCKS: dict[str | None, CpuLock] = {}


def cpu_lock(path: str | None) -> CpuLock:
    """The process-wide CpuLock for `path` (None: only this process's engines alternate)."""
    with _BACKEND_LOCK:
        if path not in _PROCESS_LOCKS:
            _PROCESS_LOCKS[path] = CpuLock(path)
        return _PROCESS_LOCKS[path]


def default_lock_path() -> str:
    """The machine-wide lock file, beside the model cache."""
    from arbitrage.offline import cache_root

    return str(cache_root() / "cpu.lock")


class LlamaCppStepEngine(QueuedStepEngine):
    """Step engine on llama.cpp: per-chain sequences, continuous batching, one decode call per token."""

    def __init__(
        self,
        gguf_path: str | os.PathLike,
        tokenizer,
        max_context: int = 4096,
        max_slots: int | None = 16,
        kv_cache_tokens: int | None = None,
        n_threads: int | None = None,
        n_batch: int = 512,
        lock_path: str | None = None,
        embeddings: bool = False,
        kv_unified: bool = False,
    ):
        """Args:
        gguf_path: the model file.
        tokenizer: the model's HF tokenizer (same vocabulary as the GGUF).
        max_context: tokens per chain (prompt + step).
        max_slots: sequences = most chains cached and rows decoded at once.
        kv_cache_tokens: bound on cached tokens; the sequences are
            `configs.schema.kv_slots(max_slots, max_context, kv_cache_tokens)`; 0 keeps no
            chain's KV between requests.
        n_threads: llama.cpp threads (default: every core).
        n_batch: most tokens in one `llama_decode` (decode rows + prefill chunks).
        lock_path: a file every engine on the machine locks around each decode call
            (see `CpuLock`); None: only engines of this process alternate.
        embeddings: also output final hidden states (`hidden_states`, value-head PRMs).
        kv_unified: one KV buffer for every sequence (chains share prompt prefixes without
            copying); False gives each sequence its own buffer of max_context cells
            (attention reads only its own chain; no prefix sharing).
        """
        ll = self.ll = llama_cpp_module()
        _init_backend(ll)
        self.path = str(gguf_path)
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.reuse = kv_cache_tokens != 0
        n_slots = kv_slots(max_slots, max_context, kv_cache_tokens)
        self.n_batch = max(n_batch, n_slots)
        threads = n_threads or os.cpu_count() or 1
        mp = ll.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.use_extra_bufts = not amx_compiled(ll)
        self._model = ll.llama_model_load_from_file(self.path.encode(), mp)
        if not self._model:
            raise ValueError(f"llama.cpp cannot load {self.path!r} (not a GGUF model file?)")
        cp = ll.llama_context_default_params()
        cp.n_ctx = n_slots * max_context
        cp.n_batch = cp.n_ubatch = self.n_batch
        cp.n_seq_max = n_slots
        cp.n_threads = cp.n_threads_batch = threads
        cp.kv_unified = kv_unified
        cp.no_perf = True
        cp.embeddings = embeddings
        self._ctx = ll.llama_init_from_model(self._model, cp)
        if not self._ctx:
            ll.llama_model_free(self._model)
            raise RuntimeError(f"llama.cpp could not create a context of {cp.n_ctx} tokens")
        self._mem = ll.llama_get_memory(self._ctx)
        vocab = ll.llama_model_get_vocab(self._model)
        self.n_vocab = ll.llama_vocab_n_tokens(vocab)
        self.n_embd = ll.llama_model_n_embd(self._model)
        self.embeddings = embeddings
        self.kv_unified = kv_unified
        self.eos = {t for t in (ll.llama_vocab_eos(vocab), ll.llama_vocab_eot(vocab)) if t >= 0}
        self.eos |= _hf_eos(tokenizer)
        self.pad_id = pad_id(tokenizer, self.eos)
        self._batch = ll.llama_batch_init(self.n_batch, 0, 1)
        self._lock = cpu_lock(lock_path)
        self.slots = SlotPool(n_slots)
        self.n_slots = n_slots
        self.forward_calls = 0
        self.prefill_tokens = 0
        self.reused_tokens = 0
        self.min_shared_prefix = 16  # tokens; shorter shared prefixes are not worth a copy call
        self.stats = {
            "decode_calls": 0,
            "decode_tokens": 0,
            "admitted_mid_decode": 0,
            "max_running": 0,
            "shared_prefix_tokens": 0,
            "busy_s": 0.0,
            "lock_wait_s": 0.0,
            "idle_s": 0.0,
        }
        self._init_queue()  # _running: holding a slot, prefilling (fed < len(ids)) or decoding
        self._fed: dict[int, int] = {}  # id(job) -> prompt tokens in its sequence
        self._thread = threading.Thread(target=self._loop, name="llamacpp-step-engine", daemon=True)
        self._thread.start()

    # ---- public -------------------------------------------------------------------
    def hidden_states(self, token_ids: list[list[int]], keys: list[str | None]) -> torch.Tensor:
        """The final (normed) hidden state at the last token of each prompt; [B, n_embd] float32.

        Needs `embeddings=True`. Reuses and extends chains' cached KV like `next_token_logits`.
        """
        if not self.embeddings:
            raise RuntimeError("hidden_states needs an engine built with embeddings=True")
        return self._prompt_jobs(_HiddenJob, token_ids, keys)

    def close(self) -> None:
        """Stop the scheduler thread and free the llama.cpp context and model."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=60)
        self.ll.llama_batch_free(self._batch)
        self.ll.llama_free(self._ctx)
        self.ll.llama_model_free(self._model)

    # ---- the scheduler thread ---------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            idle = not self._running and not self._waiting
            t0 = time.perf_counter()
            if not self._pull(block=idle):
                break
            self.stats["idle_s"] += time.perf_counter() - t0
            try:
                self._admit()
                if self._running:
                    self._iterate()
            except Exception as e:  # noqa: BLE001 - fail the requests in flight, keep serving
                for job in self._running:
                    self._fed.pop(id(job), None)
                self._fail(self._running, e)
                self._running = []
        self._fail(self._running + list(self._waiting), RuntimeError("LlamaCppStepEngine closed"))

    def _admit(self) -> None:
        """Give waiting jobs sequences (FIFO) and cut each sequence back to its reused prefix."""
        admitted = len(self._take_slots(self._seat))
        if admitted and len(self._running) > admitted:
            self.stats["admitted_mid_decode"] += admitted
        self.stats["max_running"] = max(self.stats["max_running"], len(self._running))

    def _seat(self, job: Job, reused: int) -> int:
        """Cut the job's sequence back to its reused prefix, share a longer one, start it running."""
        self.ll.llama_memory_seq_rm(self._mem, job.slot, reused, -1)
        self.slots.ids[job.slot] = list(job.ids[:reused])
        reused = self._share_prefix(job, reused)
        self._fed[id(job)] = reused
        self._running.append(job)
        return reused

    def _share_prefix(self, job: Job, reused: int) -> int:
        """Start a sequence from the longest prompt prefix any other sequence holds.

        In the unified KV cache `llama_memory_seq_cp` only tags the source's cells with the
        new sequence id (no copy), so chains on one problem -- a sweep's policies, the
        rollouts of a step -- prefill the shared chat prefix once.
        """
        limit = len(job.ids) - 1  # keep >= 1 token to compute
        best, src = reused, -1
        for s, ids in enumerate(self.slots.ids):
            if s == job.slot or len(ids) <= best:
                continue
            n = common_prefix(ids, job.ids, limit)
            if n > best:
                best, src = n, s
        if src < 0 or best < self.min_shared_prefix or not self.kv_unified:
            return reused
        self.ll.llama_memory_seq_rm(self._mem, job.slot, 0, -1)
        self.ll.llama_memory_seq_cp(self._mem, src, job.slot, 0, best)
        self.slots.ids[job.slot] = list(job.ids[:best])
        self.stats["shared_prefix_tokens"] += best - reused
        return best

    def _iterate(self) -> None:
        """One `llama_decode`: each decoding row's next token, then prompt chunks while room lasts."""
        b, n = self._batch, 0
        outputs: list[Job] = []  # rows whose logits this call yields, in batch order
        out_index: list[int] = []

        def add(tok: int, pos: int, seq: int, want: bool) -> None:
            nonlocal n
            b.token[n], b.pos[n], b.n_seq_id[n], b.logits[n] = tok, pos, 1, int(want)
            b.seq_id[n][0] = seq
            n += 1

        prefilling = []
        for job in self._running:
            if self._fed[id(job)] < len(job.ids):
                prefilling.append(job)
                continue
            ids = self.slots.ids[job.slot]
            add(job.next_tok, len(ids), job.slot, True)
            ids.append(job.next_tok)
            outputs.append(job)
            out_index.append(n - 1)
        for job in prefilling:
            room = self.n_batch - n
            if room <= 0:
                break
            fed = self._fed[id(job)]
            chunk = job.ids[fed : fed + room]
            for k, tok in enumerate(chunk):
                last = fed + k == len(job.ids) - 1
                add(tok, fed + k, job.slot, last)
            self.slots.ids[job.slot].extend(chunk)
            self._fed[id(job)] = fed + len(chunk)
            if self._fed[id(job)] == len(job.ids):
                outputs.append(job)
                out_index.append(n - 1)
        b.n_tokens = n
        t0 = time.perf_counter()
        with self._lock.held():
            t1 = time.perf_counter()
            rc = self.ll.llama_decode(self._ctx, b)
            t2 = time.perf_counter()
        self.stats["lock_wait_s"] += t1 - t0
        self.stats["busy_s"] += t2 - t1
        self.stats["decode_calls"] += 1
        self.stats["decode_tokens"] += n
        self.forward_calls += 1
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc} ({n} tokens)")
        hidden = [(job, i) for job, i in zip(outputs, out_index) if isinstance(job, _HiddenJob)]
        if hidden:
            done: set[Job] = set()
            for job, i in hidden:
                job.future.set_result(torch.from_numpy(self._embedding(i)))
                self._retire(job, done)
            self._running = [j for j in self._running if j not in done]
            keep = [k for k, job in enumerate(outputs) if job not in done]
            outputs, out_index = [outputs[k] for k in keep], [out_index[k] for k in keep]
        if outputs:
            logits = torch.from_numpy(np.stack([self._logits(i) for i in out_index]))  # [B, V]
            self._consume(outputs, token_stats(logits), logits, out_index)

    def _logits(self, i: int) -> np.ndarray:
        ptr = self.ll.llama_get_logits_ith(self._ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def _embedding(self, i: int) -> np.ndarray:
        ptr = self.ll.llama_get_embeddings_ith(self._ctx, i)
        if not ptr:
            raise RuntimeError("llama.cpp returned no hidden state (embeddings off?)")
        return np.ctypeslib.as_array(ptr, shape=(self.n_embd,)).copy()

    def _consume(self, jobs: list[Job], stats: torch.Tensor, logits: torch.Tensor, out_index: list[int]) -> None:
        """Record each row's next token; retire finished rows (their sequences stay for the chain).

        With embeddings on, a finished step carries the hidden state that chose its last token
        (`StepOutput.hidden`: the state after reading the whole step), for value-head PRMs and
        probe routers at no extra forward pass.
        """
        done: set[Job] = set()
        greedy, greedy_lp, entropy = stats.tolist()
        for i, job in enumerate(jobs):
            if job.row is None:  # next_token_logits
                job.future.set_result(logits[i])
                self._retire(job, done)
                continue
            if advance(job, logits[i], int(greedy[i]), greedy_lp[i], entropy[i], self.eos, self.tokenizer):
                out = step_output(job.row, len(job.ids), self.tokenizer)
                if self.embeddings:
                    out.hidden = self._embedding(out_index[i]).tolist()
                job.future.set_result(out)
                self._retire(job, done)
        if done:
            self._running = [j for j in self._running if j not in done]

    def _retire(self, job: Job, done: set) -> None:
        self._fed.pop(id(job), None)
        self.slots.release(job.slot, keep=True)
        if self.slots.key_of[job.slot] is None:  # not kept for a chain: drop its KV now
            self.ll.llama_memory_seq_rm(self._mem, job.slot, 0, -1)
        done.add(job)

    def _fail(self, jobs: list[Job], err: Exception) -> None:
        for job in jobs:
            if job.slot >= 0:
                self.slots.release(job.slot, keep=False)
                self.ll.llama_memory_seq_rm(self._mem, job.slot, 0, -1)
            if not job.future.done():
                job.future.set_exception(err)


@dataclass(eq=False)
class _HiddenJob(Job):
    """A prompt whose answer is its last token's hidden state (not logits, not a step)."""


def _hf_eos(tokenizer) -> set[int]:
    val = tokenizer.eos_token_id
    return {val} if isinstance(val, int) else set()
