"""What every step engine shares: prompt rendering, per-row decode state, stop rules, sampling, KV slots.

The HF (`arbitrage.engine`), fast (`arbitrage.fast_engine`) and llama.cpp
(`arbitrage.llamacpp_engine`) engines render a `StepRequest` with the same chat template,
record each row's tokens in a `Row`, stop it with `update_stop` and sample with `sample`
under a per-row generator seeded by (seed, prompt), so the same request gives the same step
on any engine. The slot engines (fast, llama.cpp) also share `SlotPool` (which chain owns
which KV slot) and `Job` (one queued prompt).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Literal

import torch

from arbitrage.types import SamplingParams, StepOutput, StepRequest


def render_prompt(tokenizer, req: StepRequest) -> str:
    """Chat prefix (or raw prompt) followed by the accepted steps, each ending in the separator."""
    sep = req.params.separator
    if req.chat and getattr(tokenizer, "chat_template", None):
        msgs = ([{"role": "system", "content": req.system}] if req.system else []) + [
            {"role": "user", "content": req.problem}
        ]
        head = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    elif req.chat:  # base model without a chat template
        head = (f"{req.system}\n\n" if req.system else "") + f"Problem: {req.problem}\n\nSolution:\n"
    else:
        head = req.problem
    return head + "".join(s + sep for s in req.steps)


def eos_ids(model, tokenizer) -> set[int]:
    """Every id that ends generation: the tokenizer's EOS and the generation config's."""
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        val = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(val, int):
            ids.add(val)
        elif isinstance(val, (list, tuple)):
            ids.update(int(v) for v in val)
    return ids


def pad_id(tokenizer, eos: set[int]) -> int:
    """The id padding rows carry: the tokenizer's pad token, else an EOS id, else 0."""
    pad = tokenizer.pad_token_id
    return pad if pad is not None else next(iter(eos), 0)


def find_separator(text: str, sep: str) -> int:
    """Index of the separator that ends the step, ignoring separators before any content."""
    start = len(text) - len(text.lstrip())
    return text.find(sep, start) if start < len(text) else -1


@dataclass
class Row:
    """Decode state of one request in the batch."""

    params: SamplingParams
    generator: torch.Generator | None
    ids: list[int]
    logprobs: list[float]
    entropies: list[float]
    done: bool = False
    stop_reason: Literal["separator", "eos", "length"] = "length"
    text: str = ""
    limit: int = 1 << 30  # tokens this row may add before its prompt + step fills max_context


def new_row(params: SamplingParams, prompt: str, limit: int = 1 << 30) -> Row:
    """A row with nothing generated yet, its RNG seeded by (seed, prompt)."""
    return Row(params, row_generator(params, prompt), [], [], [], limit=limit)


def unique_keys(keys: list[str | None]) -> list[str | None]:
    """A chain appears once per batch; a duplicate key runs uncached."""
    seen: set[str] = set()
    out = []
    for k in keys:
        out.append(k if k is not None and k not in seen else None)
        if k is not None:
            seen.add(k)
    return out


def row_generator(params: SamplingParams, prompt: str) -> torch.Generator | None:
    """Per-row RNG seeded by (seed, prompt): sampling does not depend on batch composition."""
    if params.temperature <= 0:
        return None
    digest = hashlib.sha256(f"{params.seed}|{prompt}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> tuple[int, float]:
    """Temperature + top-p sampling for one row; returns (token, log-prob under that law)."""
    logp = torch.log_softmax(logits / params.temperature, dim=-1).cpu()  # [V]
    if params.top_p < 1.0:
        sorted_lp, order = logp.sort(descending=True)
        keep = sorted_lp.exp().cumsum(0) - sorted_lp.exp() < params.top_p
        masked = torch.full_like(logp, float("-inf"))
        masked[order[keep]] = logp[order[keep]]
        logp = torch.log_softmax(masked, dim=-1)
    tok = int(torch.multinomial(logp.exp(), 1, generator=gen))
    return tok, float(logp[tok])


def token_stats(logits: torch.Tensor) -> torch.Tensor:
    """[B, V] float32 logits -> [3, B] float64: greedy id, its log-prob, entropy (one D2H copy)."""
    logp = torch.log_softmax(logits, dim=-1)  # [B, V]
    entropy = -(logp.exp() * logp).sum(-1)  # [B]
    greedy = logits.argmax(-1)  # [B]
    lp = logp.gather(-1, greedy[:, None])[:, 0]  # [B]
    return torch.stack([greedy.double(), lp.double(), entropy.double()])


def record_token(r: Row, logits: torch.Tensor, greedy: int, greedy_lp: float, entropy: float) -> int:
    """Append this row's next token (greedy, or sampled from `logits` [V]) with its log-prob and entropy."""
    if r.params.temperature > 0:
        tok, lp = sample(logits, r.params, r.generator)
    else:
        tok, lp = greedy, greedy_lp
    r.ids.append(tok)
    r.logprobs.append(lp)
    r.entropies.append(entropy)
    return tok


def update_stop(r: Row, tok: int, eos: set[int], tokenizer) -> None:
    """The stop rule: forced length, EOS, the separator after content, or max_tokens (within r.limit)."""
    p = r.params
    if p.forced_tokens is not None:
        r.done = len(r.ids) >= min(p.forced_tokens, r.limit)
        return
    if tok in eos:
        r.done, r.stop_reason = True, "eos"
        r.text = tokenizer.decode(r.ids[:-1], skip_special_tokens=True)
        return
    text = tokenizer.decode(r.ids, skip_special_tokens=True)
    cut = find_separator(text, p.separator)
    if cut >= 0:
        r.done, r.stop_reason, r.text = True, "separator", text[:cut]
    else:
        r.text = text
        r.done = len(r.ids) >= min(p.max_tokens, r.limit)


def advance(
    job: "Job", logits: torch.Tensor, greedy: int, greedy_lp: float, entropy: float, eos: set[int], tokenizer
) -> bool:
    """One decoded token of a step job: record it on its row, update the stop rules (separator,
    EOS, the job's budget), keep it as the next token to feed; True once the step is done."""
    r = job.row
    assert r is not None, "a prompt-only job has no row to advance"
    tok = record_token(r, logits, greedy, greedy_lp, entropy)
    update_stop(r, tok, eos, tokenizer)
    r.done = r.done or len(r.ids) >= job.budget
    job.next_tok = tok
    return r.done


def step_output(r: Row, prompt_tokens: int, tokenizer) -> StepOutput:
    """The finished row as a StepOutput."""
    if r.params.forced_tokens is not None:
        r.text = tokenizer.decode(r.ids, skip_special_tokens=True)
    return StepOutput(
        text=r.text.strip(),
        num_tokens=len(r.ids),
        logprobs=r.logprobs,
        stop_reason=r.stop_reason,
        entropies=r.entropies,
        prompt_tokens=prompt_tokens,
    )


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """Length of the longest common prefix of a and b, at most `limit`."""
    n, limit = 0, min(len(a), len(b), limit)
    while n < limit and a[n] == b[n]:
        n += 1
    return n


# ---- slot engines ----------------------------------------------------------------------
@dataclass(eq=False)
class Job:
    """One queued prompt: a step to decode (row set) or next-token logits only (row None)."""

    ids: list[int]  # prompt token ids
    key: str | None  # chain id: the slot is kept for it afterwards
    future: Future
    row: Row | None = None
    budget: int = 0  # most tokens this row may generate
    slot: int = -1
    next_tok: int = -1  # sampled, not yet fed
    queued_at: float = 0.0  # perf_counter() when submitted (set by ColocatedEngine, whose gate reads it)


class SlotPool:
    """Which chain owns which KV slot, what tokens each slot holds, and LRU eviction."""

    def __init__(self, n: int):
        self.ids: list[list[int]] = [[] for _ in range(n)]  # tokens whose K/V is in slot s
        self.busy = [False] * n  # a running request holds the slot
        self.owner: OrderedDict[str, int] = OrderedDict()  # chain -> slot, least recently used first
        self.key_of: list[str | None] = [None] * n
        self.evictions = 0

    def acquire(self, key: str | None, ids: list[int]) -> tuple[int, int, str | None] | None:
        """Take a slot for a prompt.

        Returns:
            (slot, reused prefix length, key to keep the slot under), or None when every slot
            is busy. A chain whose slot is busy (a concurrent request) runs uncached (key None).
        """
        s = self.owner.get(key) if key is not None else None
        if key is not None and s is not None and not self.busy[s]:
            n = common_prefix(self.ids[s], ids, limit=len(ids) - 1)  # keep >= 1 token to compute
            del self.ids[s][n:]  # rollback: a replaced step's tokens are dropped
            self.busy[s] = True
            self.owner.move_to_end(key)
            return s, n, key
        if s is not None:
            key = None
        s = self._free_slot()
        if s is None:
            return None
        self.busy[s], self.ids[s] = True, []
        if key is not None:
            self.owner[key], self.key_of[s] = s, key
        return s, 0, key

    def release(self, s: int, keep: bool) -> None:
        """A request is done with slot s: keep its tokens for its chain, or free it."""
        self.busy[s] = False
        if keep and self.key_of[s] is not None:
            return
        self.ids[s] = []
        key = self.key_of[s]
        if key is not None:
            del self.owner[key]
            self.key_of[s] = None

    def _free_slot(self) -> int | None:
        for s, (busy, key) in enumerate(zip(self.busy, self.key_of)):
            if not busy and key is None:
                return s
        for key, s in self.owner.items():  # least recently used first
            if not self.busy[s]:
                del self.owner[key]
                self.key_of[s] = None
                self.evictions += 1
                return s
        return None
