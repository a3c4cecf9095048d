"""The step engine: decode one reasoning step for a batch of chains with HF transformers.

A small, direct decode loop (prefill -> decode_one_token -> decode_step), in the
manner of gpt-fast: left-padded batch, explicit position ids, a dynamic KV cache,
per-row stop at the step separator, EOS or the token limit, and per-token
log-probabilities and entropies (the probe router's features). The interface is
text-level (`StepRequest` -> `StepOutput`): each engine renders requests with its
own tokenizer, so draft and target may use different tokenizers.
"""

from __future__ import annotations

import hashlib
import inspect
import threading
from dataclasses import dataclass

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


def find_separator(text: str, sep: str) -> int:
    """Index of the separator that ends the step, ignoring separators before any content."""
    start = len(text) - len(text.lstrip())
    return text.find(sep, start) if start < len(text) else -1


@dataclass
class _Row:
    """Decode state of one request in the batch."""

    params: SamplingParams
    generator: torch.Generator | None
    ids: list[int]
    logprobs: list[float]
    entropies: list[float]
    done: bool = False
    stop_reason: str = "length"
    text: str = ""


class StepEngine:
    """Generates one step for each request of a batch with a causal LM."""

    def __init__(self, model, tokenizer, max_context: int = 4096):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.device = next(model.parameters()).device
        self.eos = eos_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else next(iter(self.eos), 0)
        self.forward_calls = 0  # forward passes (prefill + decode), for tests and metrics
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
        with self._lock, torch.inference_mode():
            return self._generate(prompts, [r.params for r in requests])

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ---- the decode ladder --------------------------------------------------------
    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        enc = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        lens = [len(e) for e in enc]
        for n in lens:
            if n >= self.max_context:
                raise ValueError(f"prompt has {n} tokens; max_context is {self.max_context}")
        width = max(lens)
        # input_ids, mask: [B, T], left padded
        ids = torch.full((len(enc), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(enc), width), dtype=torch.long)
        for i, e in enumerate(enc):
            ids[i, width - len(e):] = torch.tensor(e, dtype=torch.long)
            mask[i, width - len(e):] = 1
        return ids.to(self.device), mask.to(self.device), lens

    def _forward(self, ids, mask, pos, cache) -> torch.Tensor:
        self.forward_calls += 1
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                         use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})
        return out.logits[:, -1, :].float()  # [B, V]

    def _generate(self, prompts: list[str], params: list[SamplingParams]) -> list[StepOutput]:
        from transformers import DynamicCache

        ids, mask, prompt_lens = self._encode(prompts)
        rows = [_Row(p, _row_generator(p, prompt), [], [], []) for p, prompt in zip(params, prompts)]
        budget = min(max(p.forced_tokens or p.max_tokens for p in params),
                     self.max_context - max(prompt_lens))
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]
        cache = DynamicCache()
        logits = self._forward(ids, mask, pos, cache)  # prefill
        pos = pos[:, -1:]
        for _ in range(max(budget, 1)):
            next_ids = self._sample_and_record(logits, rows)  # [B]
            if all(r.done for r in rows):
                break
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=-1)
            pos = pos + 1
            logits = self._forward(next_ids[:, None], mask, pos, cache)
        return [self._output(r, n) for r, n in zip(rows, prompt_lens)]

    def _sample_and_record(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        logp_raw = torch.log_softmax(logits, dim=-1)  # [B, V]
        entropy = -(logp_raw.exp() * logp_raw).sum(-1)  # [B]
        greedy = logits.argmax(-1)  # [B]
        next_ids = greedy.clone()
        for i, r in enumerate(rows):
            if r.done:
                next_ids[i] = self.pad_id
                continue
            if r.params.temperature > 0:
                tok, lp = _sample(logits[i], r.params, r.generator)
            else:
                tok, lp = int(greedy[i]), float(logp_raw[i, greedy[i]])
            next_ids[i] = tok
            r.ids.append(tok)
            r.logprobs.append(lp)
            r.entropies.append(float(entropy[i]))
            self._update_stop(r, tok)
        return next_ids

    def _update_stop(self, r: _Row, tok: int) -> None:
        p = r.params
        if p.forced_tokens is not None:
            r.done = len(r.ids) >= p.forced_tokens
            return
        if tok in self.eos:
            r.done, r.stop_reason = True, "eos"
            r.text = self.tokenizer.decode(r.ids[:-1], skip_special_tokens=True)
            return
        text = self.tokenizer.decode(r.ids, skip_special_tokens=True)
        cut = find_separator(text, p.separator)
        if cut >= 0:
            r.done, r.stop_reason, r.text = True, "separator", text[:cut]
        else:
            r.text = text
            r.done = len(r.ids) >= p.max_tokens

    def _output(self, r: _Row, prompt_tokens: int) -> StepOutput:
        if r.params.forced_tokens is not None:
            r.text = self.tokenizer.decode(r.ids, skip_special_tokens=True)
        return StepOutput(text=r.text.strip(), num_tokens=len(r.ids), logprobs=r.logprobs,
                          stop_reason=r.stop_reason, entropies=r.entropies, prompt_tokens=prompt_tokens)


def _row_generator(params: SamplingParams, prompt: str) -> torch.Generator | None:
    """Per-row RNG seeded by (seed, prompt): sampling does not depend on batch composition."""
    if params.temperature <= 0:
        return None
    digest = hashlib.sha256(f"{params.seed}|{prompt}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> tuple[int, float]:
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
