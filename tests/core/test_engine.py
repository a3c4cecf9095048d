"""The step engine: separator / EOS / length stops, log-probs, batched == alone."""

from __future__ import annotations

import torch

from arbitrage.engine import HFStepEngine
from arbitrage.engine_common import find_separator, render_prompt
from arbitrage.tiny import random_causal_lm
from arbitrage.types import SamplingParams, StepRequest


def _req(problem, steps=(), **params):
    return StepRequest(problem=problem, steps=tuple(steps), system="sys", params=SamplingParams(**params))


def test_render_prompt_uses_chat_template_and_steps(tokenizer):
    r = _req("What is 1+1?", ["First.", "Second."])
    text = render_prompt(tokenizer, r)
    assert text.startswith("<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nWhat is 1+1?")
    assert text.endswith("<|im_start|>assistant\nFirst.\n\nSecond.\n\n")


def test_find_separator_skips_leading():
    assert find_separator("\n\nabc\n\ndef", "\n\n") == 5
    assert find_separator("abc", "\n\n") == -1
    assert find_separator("\n\n", "\n\n") == -1


class BiasedLM(torch.nn.Module):
    """Wraps a tiny LM and forces a scripted sequence of tokens (tests stop reasons exactly)."""

    def __init__(self, inner, script):
        super().__init__()
        self.inner, self.script, self.config = inner, script, inner.config
        self.generation_config = inner.generation_config
        self.t = 0

    def forward(self, input_ids, cache=None, **kw):
        out = self.inner(input_ids=input_ids, cache=cache, **kw)
        if input_ids.shape[1] > 1:
            self.t = 0
        tok = self.script[min(self.t, len(self.script) - 1)]
        self.t += 1
        out.logits[:, -1, tok] += 1000.0
        return out


def test_stop_reasons(tokenizer):
    inner = random_causal_lm("tiny-llama")
    ab = [ord("a"), ord("b")]
    sep = BiasedLM(inner, ab + [10, 10, ord("c")])
    out = HFStepEngine(sep, tokenizer).generate_steps([_req("x", max_tokens=20)])[0]
    assert (out.text, out.stop_reason, out.num_tokens) == ("ab", "separator", 4)
    assert len(out.logprobs) == 4 and all(lp <= 0 for lp in out.logprobs)

    eos = BiasedLM(inner, ab + [tokenizer.eos_token_id])
    out = HFStepEngine(eos, tokenizer).generate_steps([_req("x", max_tokens=20)])[0]
    assert (out.text, out.stop_reason, out.num_tokens) == ("ab", "eos", 3)

    length = BiasedLM(inner, ab * 10)
    out = HFStepEngine(length, tokenizer).generate_steps([_req("x", max_tokens=5)])[0]
    assert (out.text, out.stop_reason, out.num_tokens) == ("ababa", "length", 5)

    custom = BiasedLM(inner, ab + [ord("|"), ord("|"), ord("c")])
    out = HFStepEngine(custom, tokenizer).generate_steps([_req("x", max_tokens=20, separator="||")])[0]
    assert (out.text, out.stop_reason) == ("ab", "separator")


def test_batched_equals_alone_greedy(target_engine):
    reqs = [
        _req("Short?", max_tokens=16),
        _req("A much longer problem statement " * 4, max_tokens=16),
        _req("Mid length problem", ["step one"], max_tokens=16),
    ]
    together = target_engine.generate_steps(reqs)
    for r, t in zip(reqs, together):
        alone = target_engine.generate_steps([r])[0]
        assert (alone.text, alone.num_tokens, alone.stop_reason) == (t.text, t.num_tokens, t.stop_reason)
        assert max(abs(a - b) for a, b in zip(alone.logprobs, t.logprobs)) < 1e-4


def test_sampling_is_seeded_per_row(draft_engine):
    r = _req("Sample me", max_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    a = draft_engine.generate_steps([r, _req("other", max_tokens=10, temperature=1.0, seed=4)])[0]
    b = draft_engine.generate_steps([r])[0]
    assert a.text == b.text
    c = draft_engine.generate_steps([_req("Sample me", max_tokens=10, temperature=1.0, top_p=0.9, seed=5)])[0]
    assert c.text != a.text


def test_prompt_too_long_is_an_error(tokenizer):
    eng = HFStepEngine(random_causal_lm("tiny-llama"), tokenizer, max_context=32)
    import pytest

    with pytest.raises(ValueError, match="max_context is 32"):
        eng.generate_steps([_req("x" * 100)])


def test_features_for_probe(draft_engine):
    out = draft_engine.generate_steps([_req("feat", max_tokens=6)])[0]
    f = out.features
    assert set(f) >= {"lp_mean", "lp_min", "lp_last", "ent_mean", "num_tokens"}
    assert f["lp_min"] <= f["lp_mean"] <= 0 and f["num_tokens"] == out.num_tokens


def test_kv_reuse_equals_recomputation(tokenizer):
    model = random_causal_lm("tiny-llama-wide", seed=2)
    cached, fresh = HFStepEngine(model, tokenizer), HFStepEngine(model, tokenizer, kv_cache_tokens=0)
    chains = {f"c{i}": [] for i in range(3)}
    for step in range(3):
        reqs = [
            StepRequest(
                problem=f"Problem {k} " * (i + 1),
                steps=tuple(s),
                system="sys",
                params=SamplingParams(max_tokens=10),
                chain_id=k,
            )
            for i, (k, s) in enumerate(chains.items())
        ]
        a, b = cached.generate_steps(reqs), fresh.generate_steps(reqs)
        for (k, s), x, y in zip(chains.items(), a, b):
            assert (x.text, x.num_tokens) == (y.text, y.num_tokens)
            assert max(abs(p - q) for p, q in zip(x.logprobs, y.logprobs)) < 1e-4
            # Chain c1 takes a different ("target") step: the cache rolls back to the prefix.
            s.append(x.text if k != "c1" else f"replaced step {step}")
    assert cached.reused_tokens > 0 and fresh.reused_tokens == 0
    assert cached.prefill_tokens < fresh.prefill_tokens


def test_prefix_cache_is_bounded(tokenizer):
    from arbitrage.engine import PrefixCache

    c = PrefixCache(capacity_tokens=10)
    kv = [(torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2))]
    c.put("a", [1, 2, 3, 4], kv)
    c.put("b", [1, 2, 3, 4], kv)
    c.put("c", [1, 2, 3, 4], kv)  # evicts "a"
    assert len(c) == 2 and c.take("a", [1, 2, 3, 4, 5]).length == 0
    past = c.take("b", [1, 2, 9, 9])
    assert past.length == 2 and past.kv[0][0].shape[2] == 2
