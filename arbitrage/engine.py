"""The reference step engine: decode one reasoning step for a batch of chains with HF transformers.

A small, direct decode loop (prefill -> decode_one_token -> decode_step), in the
manner of gpt-fast: left-padded batch, explicit position ids, a dynamic KV cache,
per-row stop at the step separator, EOS or the token limit, and per-token
log-probabilities and entropies (the probe router's features). The interface is
text-level (`StepRequest` -> `StepOutput`): each engine renders requests with its
own tokenizer, so draft and target may use different tokenizers.
"""

from __future__ import annotations

import inspect
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from arbitrage.engine_base import StepEngine
from arbitrage.engine_common import (
    Row,
    common_prefix,
    eos_ids,
    new_row,
    pad_id,
    record_token,
    render_prompt,
    step_output,
    unique_keys,
    update_stop,
)
from arbitrage.types import ContextOverflow, SamplingParams, StepOutput, StepRequest
from configs.schema import DEFAULT_KV_CACHE_TOKENS


class HFStepEngine(StepEngine):
    """Generates one step for each request of a batch with an HF transformers causal LM."""

    def __init__(self, model, tokenizer, max_context: int = 4096, kv_cache_tokens: int | None = None):
        """Args:
        model, tokenizer: an HF causal LM and its tokenizer.
        max_context: tokens of prompt + step per chain.
        kv_cache_tokens: tokens of per-chain KV kept between steps (LRU; None:
            DEFAULT_KV_CACHE_TOKENS); 0 keeps none.
        """
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.device = next(model.parameters()).device
        self.eos = eos_ids(model, tokenizer)
        self.pad_id = pad_id(tokenizer, self.eos)
        self.forward_calls = 0
        self.prefill_tokens = 0
        self.reused_tokens = 0
        self.stats = {}
        self.prefix_cache = PrefixCache(DEFAULT_KV_CACHE_TOKENS if kv_cache_tokens is None else kv_cache_tokens)
        self._lock = threading.Lock()  # one batch at a time per engine
        # transformers >= 5.2x names the KV cache argument `cache`; older 5.x `past_key_values`.
        params = inspect.signature(type(model).forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    # ---- public -------------------------------------------------------------------
    def generate_steps(self, requests: list[StepRequest]) -> list[StepOutput]:
        """Decode one step per request, batched.

        Args:
            requests: one per chain; params may differ per row.
        Returns:
            One StepOutput per request, in order.
        """
        if not requests:
            return []
        prompts = [render_prompt(self.tokenizer, r) for r in requests]
        keys = unique_keys([r.chain_id for r in requests])
        with self._lock, torch.inference_mode():
            return self._generate(prompts, [r.params for r in requests], keys)

    def next_token_logits(self, token_ids: list[list[int]], keys: list[str | None]) -> torch.Tensor:
        """Logits of the token after each prompt, reusing and then extending chains' cached KV.

        Used by scorers that share this engine's model (the LLM-judge PRM); see StepEngine.
        """
        keys = unique_keys(keys)
        with self._lock, torch.inference_mode():
            past = [self.prefix_cache.take(k, e) for k, e in zip(keys, token_ids)]
            self.prefill_tokens += sum(len(e) - p.length for e, p in zip(token_ids, past))
            self.reused_tokens += sum(p.length for p in past)
            ids, mask, pos, cache = self._prefill_inputs(token_ids, past)
            logits = self._forward(ids, mask, pos, cache)
            self._store(keys, [list(e) for e in token_ids], mask, cache)
        return logits

    # ---- the decode ladder --------------------------------------------------------
    def _prefill_inputs(self, enc: list[list[int]], past: list["_Past"]):
        """Batch the uncached tail of each prompt behind its cached KV.

        Row i of the batched cache is laid out [pad | past_i | pad | delta_i]: the cached
        prefix left-padded to the longest one, then the new tokens left-padded to the
        longest delta. Padding is masked; position ids are explicit, so rows are exact.
        """
        from transformers import DynamicCache

        B = len(enc)
        p_len = [p.length for p in past]
        deltas = [e[n:] for e, n in zip(enc, p_len)]
        P, D = max(p_len), max(len(d) for d in deltas)
        ids = torch.full((B, D), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, P + D), dtype=torch.long)
        pos = torch.zeros((B, D), dtype=torch.long)
        for i, (d, n) in enumerate(zip(deltas, p_len)):
            ids[i, D - len(d) :] = torch.tensor(d, dtype=torch.long)
            mask[i, P - n : P] = 1
            mask[i, P + D - len(d) :] = 1
            pos[i, D - len(d) :] = torch.arange(n, n + len(d))
        cache = DynamicCache()
        if P > 0:
            for layer in range(len(next(p for p in past if p.length).kv)):
                k = torch.cat([_left_pad(p.kv[layer][0] if p.length else None, P, past) for p in past])
                v = torch.cat([_left_pad(p.kv[layer][1] if p.length else None, P, past) for p in past])
                cache.update(k, v, layer)  # [B, H, P, Dh]
        dev = self.device
        return ids.to(dev), mask.to(dev), pos.to(dev), cache

    def _forward(self, ids, mask, pos, cache) -> torch.Tensor:
        self.forward_calls += 1
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kw: cache},
        )
        return out.logits[:, -1, :].float()  # [B, V]

    def _generate(self, prompts: list[str], params: list[SamplingParams], keys: list[str | None]) -> list[StepOutput]:
        enc = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        for e in enc:
            if len(e) >= self.max_context:
                raise ContextOverflow(f"prompt has {len(e)} tokens; max_context is {self.max_context}")
        past = [self.prefix_cache.take(k, e) for k, e in zip(keys, enc)]
        self.prefill_tokens += sum(len(e) - p.length for e, p in zip(enc, past))
        self.reused_tokens += sum(p.length for p in past)
        rows = [new_row(p, prompt, limit=self.max_context - len(e)) for p, prompt, e in zip(params, prompts, enc)]
        # Each row stops at its own context limit: a long prompt does not cut its batch-mates' steps.
        budget = max(min(r.params.forced_tokens or r.params.max_tokens, r.limit) for r in rows)
        ids, mask, pos, cache = self._prefill_inputs(enc, past)
        logits = self._forward(ids, mask, pos, cache)  # prefill
        pos = pos[:, -1:]
        fed = [0] * len(rows)  # generated tokens whose KV is in the cache, per row
        for _ in range(max(budget, 1)):
            next_ids = self._sample_and_record(logits, rows)  # [B]
            if all(r.done for r in rows):
                break
            live = [0 if r.done else 1 for r in rows]  # finished rows feed masked padding
            fed = [f + a for f, a in zip(fed, live)]
            mask = torch.cat([mask, torch.tensor(live, device=mask.device)[:, None]], dim=-1)
            pos = pos + 1
            logits = self._forward(next_ids[:, None], mask, pos, cache)
        self._store(keys, [e + r.ids[:f] for e, r, f in zip(enc, rows, fed)], mask, cache)
        return [step_output(r, len(e), self.tokenizer) for r, e in zip(rows, enc)]

    def _store(self, keys, cached_ids: list[list[int]], mask, cache) -> None:
        """Keep each chain's KV (prompt + the step tokens fed back) for its next step."""
        if not self.prefix_cache.capacity:
            return
        for i, key in enumerate(keys):
            if key is None:
                continue
            valid = mask[i].bool()  # [T]: this row's real positions in the batched cache
            kv = [
                (layer.keys[i : i + 1, :, valid].clone(), layer.values[i : i + 1, :, valid].clone())
                for layer in cache.layers
            ]
            self.prefix_cache.put(key, cached_ids[i], kv)

    def _sample_and_record(self, logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
        logp_raw = torch.log_softmax(logits, dim=-1)  # [B, V]
        entropy = -(logp_raw.exp() * logp_raw).sum(-1)  # [B]
        greedy = logits.argmax(-1)  # [B]
        next_ids = greedy.clone()
        for i, r in enumerate(rows):
            if r.done:
                next_ids[i] = self.pad_id
                continue
            g = int(greedy[i])
            tok = record_token(r, logits[i], g, float(logp_raw[i, g]), float(entropy[i]))
            next_ids[i] = tok
            update_stop(r, tok, self.eos, self.tokenizer)
        return next_ids


@dataclass
class _Past:
    """A chain's cached KV: `length` prompt tokens, per layer (keys, values) [1, H, length, Dh]."""

    length: int = 0
    kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # empty when length is 0


class PrefixCache:
    """Per-chain KV kept between steps, bounded in tokens with LRU eviction.

    `take` pops a chain's entry and crops it to the longest common token prefix with the
    new prompt, so an escalation (the target's step replacing the draft's) rolls the
    draft back to the shared prefix and only the accepted text is prefilled.
    """

    def __init__(self, capacity_tokens: int = 65536):
        self.capacity = capacity_tokens
        self._entries: OrderedDict[str, tuple[list[int], list]] = OrderedDict()
        self._tokens = 0

    def take(self, key: str | None, ids: list[int]) -> _Past:
        if key is None or key not in self._entries:
            return _Past()
        cached_ids, kv = self._entries.pop(key)
        self._tokens -= len(cached_ids)
        n = common_prefix(cached_ids, ids, limit=len(ids) - 1)  # keep >= 1 new token to get logits from
        if n == 0:
            return _Past()
        return _Past(n, [(k[:, :, :n], v[:, :, :n]) for k, v in kv])

    def put(self, key: str, ids: list[int], kv: list) -> None:
        if len(ids) > self.capacity:
            return
        self._entries[key] = (ids, kv)
        self._tokens += len(ids)
        while self._tokens > self.capacity:
            _, (old_ids, _) = self._entries.popitem(last=False)
            self._tokens -= len(old_ids)

    def __len__(self) -> int:
        return len(self._entries)


def _left_pad(t: torch.Tensor | None, width: int, past: list[_Past]) -> torch.Tensor:
    """[1, H, n, Dh] -> [1, H, width, Dh], zeros on the left (masked out)."""
    if t is None:
        ref = next(p for p in past if p.length).kv[0][0]
        return ref.new_zeros((1, ref.shape[1], width, ref.shape[3]))
    if t.shape[2] == width:
        return t
    return torch.cat([t.new_zeros((1, t.shape[1], width - t.shape[2], t.shape[3])), t], dim=2)
