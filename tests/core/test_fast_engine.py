"""FastStepEngine (own forward, slot KV cache, scheduler thread) against the HF StepEngine."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from arbitrage.engine import HFStepEngine
from arbitrage.engine_common import SlotPool
from arbitrage.fast_engine import FastStepEngine
from arbitrage.tiny import random_causal_lm
from step_checks import assert_same_steps, step_request

SHAPES = ["tiny-llama", "tiny-qwen2"]


_req, _same = step_request, assert_same_steps


@pytest.fixture(scope="module", params=SHAPES)
def pair(request, tokenizer):
    """(reference StepEngine without KV reuse, FastStepEngine) on one tiny random model."""
    model = random_causal_lm(request.param, seed=3)
    fast = FastStepEngine(model, tokenizer, max_context=1024, max_slots=8)
    yield HFStepEngine(model, tokenizer, kv_cache_tokens=0), fast
    fast.close()


PROMPTS = [("Short?", ()), ("A much longer problem statement " * 4, ()), ("Mid length problem", ("step one",))]


def test_greedy_steps_equal_step_engine_batched_and_alone(pair):
    ref, fast = pair
    reqs = [_req(p, s, max_tokens=16) for p, s in PROMPTS]
    want = ref.generate_steps(reqs)
    _same(fast.generate_steps(reqs), want)
    for r, w in zip(reqs, want):
        _same(fast.generate_steps([r]), [w])


def test_separator_eos_and_forced_stops_match(pair):
    ref, fast = pair
    probe = ref.generate_steps([_req("Stop here", max_tokens=12)])[0]
    sep = next(c for c in probe.text[3:] if c.isprintable() and c.strip())  # occurs after content
    reqs = [
        _req("Stop here", max_tokens=12, separator=sep),
        _req("Forced", forced_tokens=7),
        _req("Other", max_tokens=5),
    ]
    out = fast.generate_steps(reqs)
    _same(out, ref.generate_steps(reqs))
    assert out[0].stop_reason == "separator" and out[1].num_tokens == 7
    # EOS: declare a byte the step generates (byte tokenizer: id == byte) an EOS id on both engines.
    plain = probe.text.replace("x", "")[2:]  # without padding tokens (they decode to "x")
    byte = next(ord(c) for c in plain if c.isascii() and c.isprintable())
    old_ref, old_fast = ref.eos, fast.eos
    ref.eos = fast.eos = old_ref | {byte}
    try:
        want = ref.generate_steps([_req("Stop here", max_tokens=12)])
        got = fast.generate_steps([_req("Stop here", max_tokens=12)])
    finally:
        ref.eos, fast.eos = old_ref, old_fast
    _same(got, want)
    assert got[0].stop_reason == "eos"


def test_sampling_uses_the_same_seeded_rows(pair):
    ref, fast = pair
    reqs = [
        _req("Sample me", max_tokens=10, temperature=1.0, top_p=0.9, seed=3),
        _req("other", max_tokens=10, temperature=0.7, seed=4),
        _req("greedy row", max_tokens=10),
    ]
    _same(fast.generate_steps(reqs), ref.generate_steps(reqs))


def test_next_token_logits_equal_step_engine(pair, tokenizer):
    ref, fast = pair
    base = tokenizer("judge this chain", add_special_tokens=False)["input_ids"]
    for extra in ([], tokenizer(" and more", add_special_tokens=False)["input_ids"]):
        seqs = [base + extra, base[:5] + extra]
        want = ref.next_token_logits(seqs, ["j1", None])
        got = fast.next_token_logits(seqs, ["j1", None])
        assert got.shape == want.shape and (got - want).abs().max() < 1e-4
    assert fast.reused_tokens > 0


def _run_chains(engine, steps=3, replace="c1"):
    """3 chains x `steps` steps; chain `replace` takes a different step each time (a rollback)."""
    chains = {f"c{i}": [] for i in range(3)}
    outs = []
    for step in range(steps):
        reqs = [
            _req(f"Problem {k} " * (i + 1), s, chain_id=k, max_tokens=10) for i, (k, s) in enumerate(chains.items())
        ]
        out = engine.generate_steps(reqs)
        outs += out
        for (k, s), x in zip(chains.items(), out):
            s.append(x.text if k != replace else f"replaced step {step}")
    return outs


def test_kv_reuse_with_rollback_equals_recomputation(tokenizer):
    model = random_causal_lm("tiny-llama-wide", seed=2)
    with (
        FastStepEngine(model, tokenizer, max_context=1024, max_slots=4) as cached,
        FastStepEngine(model, tokenizer, max_context=1024, max_slots=4, kv_cache_tokens=0) as fresh,
    ):
        want = _run_chains(HFStepEngine(model, tokenizer, kv_cache_tokens=0))
        _same(_run_chains(cached), want)
        _same(_run_chains(fresh), want)
        assert cached.reused_tokens > 0 and fresh.reused_tokens == 0
        assert cached.prefill_tokens < fresh.prefill_tokens


def test_fused_weights_equal_and_leave_the_model_working(tokenizer):
    model = random_causal_lm("tiny-qwen2", seed=8)  # q/k/v biases are fused too
    ref = HFStepEngine(model, tokenizer, kv_cache_tokens=0)
    reqs = [_req(p, s, max_tokens=12) for p, s in PROMPTS]
    want = ref.generate_steps(reqs)
    q_ptr = model.model.layers[0].self_attn.q_proj.weight.data_ptr()
    with FastStepEngine(model, tokenizer, max_context=1024, max_slots=4, fuse_weights=True) as fast:
        _same(fast.generate_steps(reqs), want)
        fused_w, fused_b = fast.lm.layers[0].qkv[0]
        attn = model.model.layers[0].self_attn
        assert fused_w.data_ptr() == attn.q_proj.weight.data_ptr() != q_ptr  # a view, not a copy
        assert attn.k_proj.bias.data_ptr() == fused_b.data_ptr() + attn.q_proj.bias.numel() * 4
        with FastStepEngine(model, tokenizer, max_context=64, max_slots=1, fuse_weights=True) as again:
            assert again.lm.layers[0].qkv[0][0] is fused_w  # fused once per model
    _same(ref.generate_steps(reqs), want)  # the HF model gives the same steps afterwards


def test_compile_failure_falls_back_to_eager():
    from arbitrage.fast_engine import _compiled

    def breaks_the_graph(x):
        return torch.tensor(x.tolist()) * 2  # a graph break: fullgraph compilation fails

    f = _compiled(breaks_the_graph)
    with pytest.warns(UserWarning, match="running eagerly"):
        assert torch.equal(f(torch.ones(2)), torch.full((2,), 2.0))
    assert torch.equal(f(torch.ones(3)), torch.full((3,), 2.0))


def test_slot_eviction_with_two_slots_stays_correct(tokenizer):
    model = random_causal_lm("tiny-llama", seed=4)
    want = _run_chains(HFStepEngine(model, tokenizer, kv_cache_tokens=0))
    with FastStepEngine(model, tokenizer, max_context=1024, max_slots=2) as fast:
        _same(_run_chains(fast), want)
        assert fast.slots.evictions > 0 and fast.stats["max_running"] <= 2


def test_continuous_admission_from_two_threads(tokenizer):
    model = random_causal_lm("tiny-llama", seed=5)
    long_req = [_req("The long one", forced_tokens=300, chain_id="long")]
    short_req = [_req("Short", max_tokens=6), _req("Short too", forced_tokens=4)]
    with FastStepEngine(model, tokenizer, max_context=1024, max_slots=4) as fast:
        results = {}

        def run(name, reqs, wait_for_decode):
            while wait_for_decode and fast.stats["decode_steps"] < 3:
                time.sleep(0.0005)
            results[name] = fast.generate_steps(reqs)

        threads = [
            threading.Thread(target=run, args=("long", long_req, False)),
            threading.Thread(target=run, args=("short", short_req, True)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert fast.stats["admitted_mid_decode"] >= 2  # the short rows joined the running long row
        assert fast.stats["max_running"] == 3
    with FastStepEngine(model, tokenizer, max_context=1024, max_slots=4) as alone:
        _same(results["long"], alone.generate_steps(long_req))
        _same(results["short"], alone.generate_steps(short_req))
    _same(results["short"], HFStepEngine(model, tokenizer).generate_steps(short_req))


def test_more_requests_than_slots_wait_for_a_slot(tokenizer):
    model = random_causal_lm("tiny-llama", seed=6)
    reqs = [_req(f"Problem number {i}", max_tokens=8) for i in range(5)]
    with FastStepEngine(model, tokenizer, max_context=1024, max_slots=2) as fast:
        _same(fast.generate_steps(reqs), HFStepEngine(model, tokenizer).generate_steps(reqs))


def test_slot_pool_rollback_and_lru():
    pool = SlotPool(2)
    a, _, _ = pool.acquire("a", [1, 2, 3])
    pool.ids[a] = [1, 2, 3, 4]
    pool.release(a, keep=True)
    assert pool.acquire("a", [1, 2, 9, 9])[:2] == (a, 2) and pool.ids[a] == [1, 2]  # rollback
    assert pool.acquire("a", [1, 2])[2] is None  # busy chain: a temporary, uncached slot
    assert pool.acquire("b", [5]) is None  # both slots busy
    pool.release(a, keep=True)
    pool.release(1 - a, keep=False)
    b, _, _ = pool.acquire("b", [5])
    pool.release(b, keep=True)
    c, n, _ = pool.acquire("c", [7])  # evicts the least recently used chain, "a"
    assert (c, n, pool.evictions) == (a, 0, 1) and "a" not in pool.owner


def test_errors_name_the_fix(tokenizer):
    from transformers import AutoModelForCausalLM, GPT2Config

    gpt2 = AutoModelForCausalLM.from_config(
        GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=320, bos_token_id=0, eos_token_id=0)
    )
    with pytest.raises(ValueError, match="StepEngine"):
        FastStepEngine(gpt2, tokenizer)
    with FastStepEngine(random_causal_lm("tiny-llama"), tokenizer, max_context=64, max_slots=1) as fast:
        with pytest.raises(ValueError, match="max_context is 64"):
            fast.generate_steps([_req("x" * 100)])
        assert fast.generate_steps([]) == []
    with pytest.raises(RuntimeError, match="closed"):
        fast.generate_steps([_req("x")])


def test_cache_memory_is_reported(tokenizer):
    with FastStepEngine(random_causal_lm("tiny-llama"), tokenizer, max_context=64, max_slots=3) as fast:
        # 2 (k, v) x 2 layers x 2 kv heads x 64 positions x 16 head_dim x 4 bytes, 3 slots + dummy
        assert fast.lm.bytes_per_slot == 2 * 2 * 2 * 64 * 16 * 4
        assert fast.kv_cache_bytes == 4 * fast.lm.bytes_per_slot
        assert torch.equal(fast.lm.k_cache[0][0], torch.zeros_like(fast.lm.k_cache[0][0]))


# ---- CUDA (run on a GPU machine with `-m gpu`) ---------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_graphs_match_step_engine(shape, tokenizer):
    model = random_causal_lm(shape, seed=3, device="cuda")  # float32: comparable to HF within 1e-4
    ref = HFStepEngine(model, tokenizer, kv_cache_tokens=0)
    with FastStepEngine(model, tokenizer, max_context=1024, max_slots=8) as fast:
        reqs = [_req(p, s, max_tokens=16) for p, s in PROMPTS]
        reqs += [_req("Sample me", max_tokens=10, temperature=1.0, top_p=0.9, seed=3)]
        _same(fast.generate_steps(reqs), ref.generate_steps(reqs))
        _same(fast.generate_steps(reqs[:1]), ref.generate_steps(reqs[:1]))
        _same(_run_chains(fast), _run_chains(ref))
        assert fast.graphs is not None and len(fast.graphs.graphs) >= 2
        # A window past the first 256 positions: a second length bucket on the gather path;
        # the decode kernel reads each row's own length, so its graphs are per bucket only.
        long = [_req("long " * 60, forced_tokens=40)]
        _same(fast.generate_steps(long), ref.generate_steps(long))
        windows = {w for _, w in fast.graphs.graphs}
        assert windows == {1024} if fast.lm.decode_kernel else len(windows) >= 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_bf16_equal_eager(tokenizer):
    model = random_causal_lm("tiny-llama-wide", seed=7, device="cuda", dtype=torch.bfloat16)
    reqs = [_req("bf16 row", forced_tokens=24)]
    with (
        FastStepEngine(model, tokenizer, max_context=512, max_slots=4, compile_ops=False) as graphs,
        FastStepEngine(model, tokenizer, max_context=512, max_slots=4, use_cuda_graphs=False) as eager,
    ):
        a, b = graphs.generate_steps(reqs), eager.generate_steps(reqs)  # the same kernels, replayed
    _same(a, b, tol=1e-3)
    assert all(lp == lp and lp <= 0 for lp in a[0].logprobs)  # finite, no NaN


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n", [1, 5])  # decode (N = 1 is specialised) and prefill shapes
def test_compiled_ops_match_eager_in_bf16(n):
    from arbitrage.fast_engine import make_ops

    eager, compiled = make_ops(False), make_ops(True)
    torch.manual_seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    x, r, w = torch.randn(n, 64, **bf), torch.randn(n, 64, **bf), torch.rand(64, **bf) + 0.5
    q, k, v = torch.randn(n, 4, 16, **bf), torch.randn(n, 2, 16, **bf), torch.randn(n, 2, 16, **bf)
    cos, sin = torch.rand(n, 1, 16, **bf), torch.rand(n, 1, 16, **bf)
    cases = [
        ("norm", (x, w, 1e-6)),
        ("add_norm", (x, r, w, 1e-6)),
        ("rope_qkv", (q, k, v, cos, sin)),
        ("swiglu", (x, r)),
    ]
    for name, args in cases:
        want, got = getattr(eager, name)(*args), getattr(compiled, name)(*args)
        for a, b in zip(want if isinstance(want, tuple) else [want], got if isinstance(got, tuple) else [got]):
            assert a.shape == b.shape and a.dtype == b.dtype
            torch.testing.assert_close(b.float(), a.float(), atol=3e-2, rtol=3e-2)
    logits = torch.randn(n, 320, device="cuda") * 3
    want, got = eager.stats(logits), compiled.stats(logits)
    assert torch.equal(want[0], got[0])  # greedy ids
    torch.testing.assert_close(got[1:], want[1:], atol=1e-5, rtol=1e-5)


def test_decode_kernel_off_cuda_is_a_clear_error(tokenizer):
    model = random_causal_lm("tiny-llama", seed=3)
    with pytest.raises(ValueError, match="decode_kernel needs CUDA"):
        FastStepEngine(model, tokenizer, max_context=64, max_slots=1, decode_kernel=True)
    with FastStepEngine(model, tokenizer, max_context=64, max_slots=1) as eng:
        assert eng.lm.decode_kernel is (torch.cuda.is_available() and eng.lm.device.type == "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,G,D", [(torch.float32, 2, 16), (torch.bfloat16, 4, 64), (torch.bfloat16, 8, 128)])
def test_decode_kernel_equals_attention_in_float64(dtype, G, D):
    from arbitrage.decode_attention import decode_attention

    torch.manual_seed(0)
    Hkv, C, n_slots = 2, 700, 6
    cache = torch.randn(n_slots + 1, 2, Hkv, C, D, device="cuda", dtype=dtype)
    slots = torch.tensor([3, 0, 5, 3, 1, 6], device="cuda")
    pos = torch.tensor([0, 63, 64, 699, 200, 1], device="cuda")  # block edges, the last position
    q = torch.randn(len(slots), Hkv * G, D, device="cuda", dtype=dtype)
    got = decode_attention(q, cache, slots, pos)
    for i in range(len(slots)):
        k, v = cache[slots[i], :, :, : pos[i] + 1].double()  # [Hkv, T, D] each
        w = torch.softmax(q[i].double().view(Hkv, G, D) @ k.transpose(-1, -2) / D**0.5, dim=-1)
        want = (w @ v).view(Hkv * G, D)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got[i].double(), want, atol=tol, rtol=tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_kernel_engine_equals_gather_engine(tokenizer):
    model = random_causal_lm("tiny-llama-wide", seed=5, device="cuda")  # float32
    reqs = [
        _req("long " * 60, forced_tokens=40),
        _req("short", forced_tokens=12),
        _req("mid " * 20, ("one", "two"), max_tokens=30),
    ]
    with (
        FastStepEngine(model, tokenizer, max_context=1024, max_slots=4, decode_kernel=True) as kern,
        FastStepEngine(model, tokenizer, max_context=1024, max_slots=4, decode_kernel=False) as gather,
    ):
        _same(kern.generate_steps(reqs), gather.generate_steps(reqs))
        _same(_run_chains(kern), _run_chains(gather))  # second steps decode from slot KV
        assert {w for _, w in kern.graphs.graphs} == {1024}  # one graph per bucket, not per window
        assert len({w for _, w in gather.graphs.graphs}) >= 2  # the gather path: per window too
