"""The llama.cpp CPU engine on a tiny random-weight GGUF written from a real Llama config.

Real llama.cpp (the `cpu` extra, built from source by `make test`), real GGUF files made by
`arbitrage.tiny.write_tiny_gguf` from the same weights transformers runs; skipped with the
reason only where llama-cpp-python is not installed.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("llama_cpp", reason="llama-cpp-python (the `cpu` extra) is not installed: pip install -e '.[cpu]'")

from arbitrage.engine import HFStepEngine  # noqa: E402
from arbitrage.llamacpp_engine import LlamaCppStepEngine  # noqa: E402
from configs.schema import kv_slots  # noqa: E402
from arbitrage.tiny import write_tiny_gguf  # noqa: E402
from arbitrage.types import ContextOverflow, SamplingParams, StepRequest  # noqa: E402

SEP = "\n\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, model, tok = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf", seed=3)
    return path, model, tok


def _engine(tiny, **kw) -> LlamaCppStepEngine:
    path, _, tok = tiny
    kw.setdefault("max_context", 512)
    kw.setdefault("max_slots", 8)
    kw.setdefault("n_threads", 2)
    return LlamaCppStepEngine(path, tok, **kw)


def _req(problem: str, steps=(), n=12, chain=None, **params) -> StepRequest:
    return StepRequest(
        problem=problem,
        steps=tuple(steps),
        params=SamplingParams(separator=SEP, max_tokens=n, **params),
        chain_id=chain,
    )


def test_logits_match_transformers_on_the_same_weights(tiny):
    path, model, tok = tiny
    ids = tok("What is 2 + 3? Let us think.", add_special_tokens=False)["input_ids"]
    with _engine(tiny) as eng:
        got = eng.next_token_logits([ids], [None])[0]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0, -1]
    assert torch.allclose(got, want, atol=2e-3, rtol=1e-3), (got - want).abs().max()


def test_greedy_steps_equal_the_hf_engine(tiny):
    _, model, tok = tiny
    reqs = [_req(f"problem {i}: add {i} and {2 * i}.") for i in range(3)]
    want = HFStepEngine(model, tok, max_context=512).generate_steps(reqs)
    with _engine(tiny) as eng:
        got = eng.generate_steps(reqs)
    assert [g.text for g in got] == [w.text for w in want]
    assert [g.num_tokens for g in got] == [w.num_tokens for w in want]
    for g, w in zip(got, want):
        assert g.stop_reason == w.stop_reason
        assert g.logprobs == pytest.approx(w.logprobs, abs=2e-3)
        assert g.entropies == pytest.approx(w.entropies, abs=2e-3)


@pytest.mark.parametrize("kv_unified", [False, True])
def test_kv_reuse_and_rollback_equal_recomputing_from_scratch(tiny, kv_unified):
    with _engine(tiny, kv_unified=kv_unified) as cached, _engine(tiny, kv_cache_tokens=0) as fresh:
        steps: list[str] = []
        for i in range(3):
            a = cached.generate_steps([_req("a chain", steps, chain="c1")])[0]
            b = fresh.generate_steps([_req("a chain", steps, chain="c1")])[0]
            assert (a.text, a.num_tokens) == (b.text, b.num_tokens)
            steps.append(a.text if i != 1 else "a replaced step")  # an escalation: the draft's text is dropped
        assert cached.reused_tokens > 0 and fresh.reused_tokens == 0
        assert cached.prefill_tokens < fresh.prefill_tokens


def test_a_step_in_a_batch_equals_the_step_alone(tiny):
    reqs = [_req(f"question number {i} about apples") for i in range(6)]
    with _engine(tiny) as eng:
        alone = [eng.generate_steps([r])[0] for r in reqs]
    for kv_unified in (False, True):  # one buffer per chain, or one for all
        with _engine(tiny, kv_unified=kv_unified) as eng:
            batched = eng.generate_steps(reqs)
        assert [b.text for b in batched] == [a.text for a in alone], kv_unified


def test_new_chains_join_the_running_batch_and_share_prefixes(tiny):
    with _engine(tiny, max_slots=4, kv_unified=True) as eng:  # sharing needs the one buffer
        futures = eng.submit_steps([_req("shared prompt, long enough to be worth sharing", n=40)])
        more = eng.submit_steps(
            [_req("shared prompt, long enough to be worth sharing", n=5, seed=s, temperature=1.0) for s in range(5)]
        )  # more rows than slots: they wait for one
        outs = [f.result(timeout=60) for f in futures + more]
    assert all(o.num_tokens > 0 for o in outs)
    assert eng.stats["admitted_mid_decode"] > 0
    assert eng.stats["shared_prefix_tokens"] > 0


def test_stop_rules_and_sampling(tiny):
    with _engine(tiny) as eng:
        forced = eng.generate_steps([_req("count", n=50, forced_tokens=7)])[0]
        assert forced.num_tokens == 7
        capped = eng.generate_steps([_req("count", n=3)])[0]
        assert capped.num_tokens <= 3
        a, b = eng.generate_steps(
            [_req("sample", n=8, temperature=1.0, seed=1), _req("sample", n=8, temperature=1.0, seed=1)]
        )
        c = eng.generate_steps([_req("sample", n=8, temperature=1.0, seed=2)])[0]
        assert a.text == b.text  # seeded by (seed, prompt): batch-independent
        assert len(a.logprobs) == a.num_tokens and all(lp <= 0 for lp in a.logprobs)
        assert c.text != a.text or c.logprobs != a.logprobs


def test_overflow_is_a_context_error(tiny):
    with _engine(tiny, max_context=32) as eng:
        with pytest.raises(ContextOverflow):
            eng.generate_steps([_req("x" * 200)])


def test_hidden_states_free_with_each_step_and_on_demand(tiny):
    _, model, tok = tiny
    with _engine(tiny, embeddings=True) as eng:
        out = eng.generate_steps([_req("hidden", n=6, forced_tokens=6)])[0]
        assert out.hidden is not None and len(out.hidden) == eng.n_embd == model.config.hidden_size
        ids = tok("some text to read", add_special_tokens=False)["input_ids"]
        h = eng.hidden_states([ids], [None])[0]
    with torch.no_grad():
        want = model.model(torch.tensor([ids])).last_hidden_state[0, -1]  # after the final norm
    assert torch.allclose(h, want, atol=2e-3, rtol=1e-3)


def test_slots_are_sized_like_the_fast_engine():
    from arbitrage.fast_engine import FastStepEngine  # noqa: F401 - same rule, one function

    assert kv_slots(64, 4096, 65536) == 16
    assert kv_slots(8, 4096, 65536) == 8
    assert kv_slots(64, 4096, 0) == 64
    assert kv_slots(64, 4096, 1000) == 1


def test_a_short_step_returns_before_its_batch_mates_finish(tiny):
    """Through the in-process backend's batcher: the rows of one batch reach their chains one by
    one, so a 2-token step does not wait for a 200-token step batched with it."""
    import asyncio

    from arbitrage.backend import LocalBackend

    async def main(eng):
        backend = LocalBackend(draft=eng, max_batch_size=8, max_wait_ms=50)
        long = asyncio.ensure_future(backend.draft_step(_req("a long step about pears", n=200, forced_tokens=200)))
        short = await backend.draft_step(_req("a short step about plums", n=2, forced_tokens=2))
        was_pending = not long.done()
        return short, was_pending, await long, backend.stats()["draft"]

    with _engine(tiny) as eng:
        short, was_pending, long, stats = asyncio.run(main(eng))
    assert short.num_tokens == 2 and long.num_tokens == 200
    assert was_pending and stats["batch_sizes"] == {2: 1}  # one batch, answered row by row
