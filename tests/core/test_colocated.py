"""Colocated engines (arbitrage/colocated.py): two FastStepEngines on one scheduler thread
give exactly the outputs of the HF StepEngine, concurrently, with KV reuse, judge logits and
clean shutdown. CPU here; the CUDA path (graphs, streams, pinned async copies) is `-m gpu`."""

from __future__ import annotations

import threading

import pytest
import torch

from arbitrage.colocated import ColocatedEngine, ColocatedScheduler
from arbitrage.engine import StepEngine
from arbitrage.tiny import random_causal_lm
from arbitrage.types import SamplingParams, StepRequest


def _req(problem, steps=(), chain_id=None, **params):
    return StepRequest(problem=problem, steps=tuple(steps), system="sys", chain_id=chain_id,
                       params=SamplingParams(**params))


def _same(a, b, tol=1e-4):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x.text, x.num_tokens, x.stop_reason, x.prompt_tokens) == \
               (y.text, y.num_tokens, y.stop_reason, y.prompt_tokens)
        assert max(abs(p - q) for p, q in zip(x.logprobs, y.logprobs)) < tol
        assert max(abs(p - q) for p, q in zip(x.entropies, y.entropies)) < tol


REQS = [dict(problem="Short?", max_tokens=16), dict(problem="A longer problem statement " * 4, forced_tokens=9),
        dict(problem="Sample me", max_tokens=10, temperature=1.0, top_p=0.9, seed=3),
        dict(problem="Mid", steps=("step one",), max_tokens=12)]


def _reqs(**extra):
    return [_req(**{**r, **extra}) for r in REQS]


def _chains(engine, steps=3, replace="c1"):
    """Three chains stepping with KV reuse; chain `replace` gets a different accepted step (rollback)."""
    hist = {c: [] for c in ("c0", "c1", "c2")}
    outs = []
    for k in range(steps):
        got = engine.generate_steps([_req(f"chain {c}", hist[c], chain_id=c, max_tokens=8) for c in hist])
        outs += got
        for c, o in zip(hist, got):
            hist[c].append("replaced step" if c == replace and k == 0 else o.text)
    return outs


@pytest.fixture(scope="module")
def colocated(tokenizer):
    """(reference draft, reference target, colocated draft, colocated target, scheduler)."""
    dm, tm = random_causal_lm("tiny-llama", seed=1), random_causal_lm("tiny-llama-wide", seed=2)
    sched = ColocatedScheduler()
    d = ColocatedEngine(dm, tokenizer, sched, max_context=1024, max_slots=8)
    t = ColocatedEngine(tm, tokenizer, sched, max_context=1024, max_slots=8)
    yield (StepEngine(dm, tokenizer, kv_cache_tokens=0), StepEngine(tm, tokenizer, kv_cache_tokens=0), d, t, sched)
    sched.close()


def test_both_engines_equal_step_engine(colocated):
    ref_d, ref_t, d, t, sched = colocated
    _same(d.generate_steps(_reqs()), ref_d.generate_steps(_reqs()))
    _same(t.generate_steps(_reqs()), ref_t.generate_steps(_reqs()))
    assert sched.engines == [d, t] and not d._thread.is_alive() and not t._thread.is_alive()


def test_concurrent_callers_on_both_engines_interleave(colocated):
    """Draft and target requests from several threads at once: one scheduler runs both batches."""
    ref_d, ref_t, d, t, sched = colocated
    want = {"d": ref_d.generate_steps(_reqs()), "t": ref_t.generate_steps(_reqs())}
    got: dict[str, list] = {}
    turns0, steps0 = sched.stats["turns"], (d.stats["decode_steps"], t.stats["decode_steps"])

    def call(name, eng, i):
        got[f"{name}{i}"] = eng.generate_steps(_reqs())

    threads = [threading.Thread(target=call, args=(n, e, i)) for i in range(3) for n, e in (("d", d), ("t", t))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert len(got) == 6
    for key, outs in got.items():
        _same(outs, want[key[0]])
    # Both engines decoded, in turns of the one scheduler thread.
    assert d.stats["decode_steps"] > steps0[0] and t.stats["decode_steps"] > steps0[1]
    assert sched.stats["turns"] > turns0
    assert sched._thread.is_alive()


def test_kv_reuse_with_rollback_equals_recomputation(colocated):
    ref_d, _, d, _, _ = colocated
    reused0 = d.reused_tokens
    _same(_chains(d), _chains(ref_d))
    assert d.reused_tokens > reused0


def test_next_token_logits_serve_a_judge(colocated, tokenizer):
    _, ref_t, _, t, _ = colocated
    ids = [tokenizer("Is this right? Yes", add_special_tokens=False)["input_ids"], [5, 6, 7]]
    want = ref_t.next_token_logits(ids, [None, None])
    assert torch.allclose(t.next_token_logits(ids, ["j1", None]), want, atol=1e-4)


def test_closed_engine_fails_clearly_and_leaves_the_other_serving(tokenizer):
    sched = ColocatedScheduler()
    a = ColocatedEngine(random_causal_lm("tiny-llama", seed=1), tokenizer, sched, max_context=256, max_slots=2)
    b = ColocatedEngine(random_causal_lm("tiny-llama", seed=2), tokenizer, sched, max_context=256, max_slots=2)
    try:
        a.close()
        with pytest.raises(RuntimeError, match="closed"):
            a.generate_steps([_req("x", max_tokens=3)])
        assert b.generate_steps([_req("y", max_tokens=3)])[0].num_tokens == 3
    finally:
        sched.close()
    with pytest.raises(RuntimeError, match="closed"):
        ColocatedEngine(random_causal_lm("tiny-llama", seed=1), tokenizer, sched, max_context=256, max_slots=2)


def test_tensor_parallel_engine_is_refused(tokenizer):
    with pytest.raises(ValueError, match="tensor-parallel"):
        ColocatedEngine(random_causal_lm("tiny-llama", seed=1), tokenizer, ColocatedScheduler(), tp=object())


def test_layout_is_a_config_field(tiny_config):
    from configs.schema import ConfigError

    assert tiny_config().runtime.layout == "separate"
    assert tiny_config(**{"runtime.layout": "colocated"}).runtime.layout == "colocated"
    with pytest.raises(ConfigError, match="tensor_parallel 1"):
        tiny_config(**{"runtime.layout": "colocated", "runtime.target.tensor_parallel": 2})


# ---- CUDA (`-m gpu` on a GPU machine) -------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("streams", [True, False])
def test_cuda_colocated_equals_step_engine(tokenizer, streams):
    """CUDA graphs, one stream per engine (or one shared), pinned async stats: same outputs as HF."""
    dm = random_causal_lm("tiny-llama", seed=1, device="cuda")
    tm = random_causal_lm("tiny-qwen2", seed=2, device="cuda")
    sched = ColocatedScheduler(streams=streams)
    try:
        d = ColocatedEngine(dm, tokenizer, sched, max_context=1024, max_slots=8)
        t = ColocatedEngine(tm, tokenizer, sched, max_context=1024, max_slots=8)
        assert (d.stream is not None) == streams and d.graphs is not None  # streams: tiny models only (see ColocatedScheduler)
        ref_d, ref_t = StepEngine(dm, tokenizer, kv_cache_tokens=0), StepEngine(tm, tokenizer, kv_cache_tokens=0)
        want = {"d": ref_d.generate_steps(_reqs()), "t": ref_t.generate_steps(_reqs())}
        got: dict[str, list] = {}
        threads = [threading.Thread(target=lambda n=n, e=e, i=i: got.__setitem__(f"{n}{i}", e.generate_steps(_reqs())))
                   for i in range(2) for n, e in (("d", d), ("t", t))]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=300)
        assert len(got) == 4
        for key, outs in got.items():
            _same(outs, want[key[0]])
        _same(_chains(d), _chains(ref_d))
        _same(_chains(t), _chains(ref_t))
        ids = [[5, 6, 7, 8]]
        assert torch.allclose(t.next_token_logits(ids, [None]), ref_t.next_token_logits(ids, [None]), atol=1e-3)
    finally:
        sched.close()
