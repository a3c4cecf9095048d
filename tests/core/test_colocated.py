"""Colocated engines (arbitrage/colocated.py): two FastStepEngines on one scheduler thread
give exactly the outputs of the HF StepEngine, concurrently, with KV reuse, judge logits and
clean shutdown; admission gates hold rows while other work keeps the GPU busy, open when it
would idle, at a bound or for a judge. CPU here; the CUDA path (graphs, streams, pinned
async copies, async prefill) is `-m gpu`."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import torch

from arbitrage.colocated import DRAFT_GATE, EAGER, TARGET_GATE, ColocatedEngine, ColocatedScheduler, Gate
from arbitrage.engine import HFStepEngine
from arbitrage.tiny import random_causal_lm
from step_checks import assert_same_steps, step_request


_req, _same = step_request, assert_same_steps


REQS = [
    dict(problem="Short?", max_tokens=16),
    dict(problem="A longer problem statement " * 4, forced_tokens=9),
    dict(problem="Sample me", max_tokens=10, temperature=1.0, top_p=0.9, seed=3),
    dict(problem="Mid", steps=("step one",), max_tokens=12),
]


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


@contextlib.contextmanager
def _pair(
    tokenizer,
    draft_gate=EAGER,
    target_gate=EAGER,
    target_shape="tiny-llama",
    slots=4,
    context=1024,
    device="cpu",
    **sched,
):
    """(draft, target, draft model, target model) on one scheduler, closed on exit; seeds 1 and 2."""
    dm = random_causal_lm("tiny-llama", seed=1, device=device)
    tm = random_causal_lm(target_shape, seed=2, device=device)
    scheduler = ColocatedScheduler(**sched)
    try:
        kw = dict(max_context=context, max_slots=slots)
        d = ColocatedEngine(dm, tokenizer, scheduler, gate=draft_gate, priority=True, **kw)
        t = ColocatedEngine(tm, tokenizer, scheduler, gate=target_gate, **kw)
        yield d, t, dm, tm
    finally:
        scheduler.close()


def _concurrent_equal(tokenizer, d, t, dm, tm, rounds: int) -> None:
    """`rounds` callers per engine at once get exactly the HF StepEngine's outputs."""
    want = {
        "d": HFStepEngine(dm, tokenizer, kv_cache_tokens=0).generate_steps(_reqs()),
        "t": HFStepEngine(tm, tokenizer, kv_cache_tokens=0).generate_steps(_reqs()),
    }
    got: dict[str, list] = {}
    threads = [
        threading.Thread(target=lambda n=n, e=e, i=i: got.__setitem__(f"{n}{i}", e.generate_steps(_reqs())))
        for i in range(rounds)
        for n, e in (("d", d), ("t", t))
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert len(got) == 2 * rounds
    for key, outs in got.items():
        _same(outs, want[key[0]])


@pytest.fixture(scope="module")
def colocated(tokenizer):
    """(reference draft, reference target, colocated draft, colocated target, scheduler)."""
    dm, tm = random_causal_lm("tiny-llama", seed=1), random_causal_lm("tiny-llama-wide", seed=2)
    sched = ColocatedScheduler()
    d = ColocatedEngine(dm, tokenizer, sched, max_context=1024, max_slots=8)
    t = ColocatedEngine(tm, tokenizer, sched, max_context=1024, max_slots=8)
    yield (HFStepEngine(dm, tokenizer, kv_cache_tokens=0), HFStepEngine(tm, tokenizer, kv_cache_tokens=0), d, t, sched)
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


def test_gated_engines_equal_step_engine_under_concurrency(tokenizer):
    """The default role gates (draft batches admissions, target waits for a share) change when
    rows run, never what they produce; every row is admitted in the end."""
    with _pair(tokenizer, DRAFT_GATE, TARGET_GATE, target_shape="tiny-llama-wide", slots=8) as (d, t, dm, tm):
        _concurrent_equal(tokenizer, d, t, dm, tm, rounds=3)
        assert t.stats["admitted_rows"] == 12 and d.stats["admitted_rows"] == 12
        assert t.stats["decode_rows"] >= t.stats["decode_steps"] > 0


def _long(i, tokens=600):
    return _req(f"long {i}", forced_tokens=tokens)


def test_gate_holds_rows_while_another_engine_decodes(tokenizer):
    """A target row that is not yet a share of the rows held waits while the draft decodes, and
    is admitted once the draft is idle (its step ends after every draft row's)."""
    order: list[str] = []
    with _pair(tokenizer, target_gate=Gate(share=1.0, max_hold_s=600)) as (d, t, _, _):
        fd = d.submit_steps([_long(i, 40) for i in range(3)])
        ft = t.submit_steps([_req("held", forced_tokens=4)])
        for name, fs in (("d", fd), ("t", ft)):
            for f in fs:
                f.add_done_callback(lambda _, name=name: order.append(name))
        assert [f.result(timeout=120).num_tokens for f in fd + ft] == [40, 40, 40, 4]
        assert order == ["d", "d", "d", "t"]
        assert t.stats["held_turns"] > 0 and t.stats["admitted_mid_decode"] == 0


def test_gate_opens_at_its_bound_and_for_a_judge(tokenizer):
    """max_hold_s wakes the scheduler and admits a held row while the other engine still decodes;
    next-token logits (a judge) pass a closed gate at once."""
    order: list[str] = []
    with _pair(tokenizer, target_gate=Gate(share=2.0, max_hold_s=0.001)) as (d, t, _, _):
        fd = d.submit_steps([_long(i, 900) for i in range(2)])
        ft = t.submit_steps([_req("bounded", forced_tokens=2)])
        for name, fs in (("d", fd), ("t", ft)):
            for f in fs:
                f.add_done_callback(lambda _, name=name: order.append(name))
        assert ft[0].result(timeout=120).num_tokens == 2
        t.gate = Gate(share=2.0, max_hold_s=600)  # closed now, except for the judge's request
        logits = t.next_token_logits([[5, 6, 7]], [None])
        assert logits.shape[0] == 1 and not all(f.done() for f in fd)
        assert [f.result(timeout=300).num_tokens for f in fd] == [900, 900]
        assert order[0] == "t"


def test_gate_opens_after_the_idle_grace_without_another_event(tokenizer):
    """A row no share admits waits while the other engine decodes and then out the grace once it
    is idle; the scheduler wakes for it by itself (no later submit)."""
    with _pair(tokenizer, target_gate=Gate(share=2.0, idle_grace_s=0.05), slots=2, context=256) as (d, t, _, _):
        fd = d.submit_steps([_long(0, 30)])
        assert t.generate_steps([_req("alone", forced_tokens=3)])[0].num_tokens == 3
        assert fd[0].done() and t.stats["held_turns"] > 0 and t.stats["admitted_rows"] == 1


@pytest.mark.parametrize("balance, target_first", [(1e-9, True), (1e9, False)])
def test_cost_rule_admits_when_the_wait_outweighs_the_delay(tokenizer, balance, target_first):
    """The balance gate weighs the held rows' wait against the delay to the draft's running rows:
    a tiny balance admits while the draft decodes, a huge one holds the row until the draft is
    done (then the GPU would idle, and the row is admitted)."""
    order: list[str] = []
    with _pair(tokenizer, target_gate=Gate(share=0.0, balance=balance)) as (d, t, _, _):
        assert t.generate_steps([_req("alone", forced_tokens=2)])[0].num_tokens == 2  # measures a step
        assert t.step_floor_s is not None and t.step_floor_s > 0
        fd = d.submit_steps([_long(i, 300) for i in range(2)])
        while not d.stats["decode_steps"]:  # the draft rows are running
            time.sleep(0.001)
        ft = t.submit_steps([_req("weighed", forced_tokens=2)])
        for name, fs in (("d", fd), ("t", ft)):
            for f in fs:
                f.add_done_callback(lambda _, name=name: order.append(name))
        assert [f.result(timeout=300).num_tokens for f in fd + ft] == [300, 300, 2]
        assert (order[0] == "t") == target_first, order


def test_free_share_gate_waits_for_the_chains_no_other_engine_holds(tokenizer, monkeypatch):
    """A draft wave is admitted whole: with one chain on the target and three seen lately, one
    draft row waits until the other two come, then all three are admitted together; and a row
    that comes while two of the three still decode waits for them (no joining mid-wave)."""
    from arbitrage import colocated

    monkeypatch.setattr(colocated, "PEAK_HALF_LIFE_S", 1e9)  # the rows seen lately do not fade
    gate = Gate(free_share=1.0, max_hold_s=30)
    with _pair(tokenizer, draft_gate=gate, context=4096) as (d, t, _, _):
        ft = t.submit_steps([_long(0, 3000)])  # one chain held by the target throughout
        while not t.stats["decode_steps"]:
            time.sleep(0.001)
        assert [f.result(timeout=60).num_tokens for f in d.submit_steps([_long(i, 4) for i in range(3)])] == [4] * 3
        a0 = d.stats["admissions"]
        first = d.submit_steps([_long(3, 4)])
        time.sleep(0.3)
        assert not first[0].done() and d.stats["admissions"] == a0  # 1 of the 3 free chains came
        rest = d.submit_steps([_long(i, 4) for i in (4, 5)])
        assert [f.result(timeout=60).num_tokens for f in first + rest] == [4] * 3
        assert d.stats["admissions"] == a0 + 1 and not ft[0].done()  # one admission, target still busy
        wave = d.submit_steps([_long(i, 3000) for i in (6, 7)])  # 2 of the 3 free chains: held, then
        time.sleep(0.3)
        d.gate = Gate(free_share=1.0, max_hold_s=0.05)  # admitted by the hold
        while d.stats["admissions"] == a0 + 1:
            time.sleep(0.001)
        d.gate = gate
        late = d.submit_steps([_long(8, 4)])
        time.sleep(0.3)
        assert not late[0].done() and not wave[0].done() and d.stats["admissions"] == a0 + 2
        assert d.stats["admitted_mid_decode"] == 0


def test_an_sm_split_needs_cuda(tokenizer, monkeypatch):
    """Off CUDA the split is refused with a clear error, and a scheduler asked for one runs
    its engines unsplit (there are no streams to put on partitions); a bad SM count is named."""
    from arbitrage import green

    monkeypatch.setenv("ARBITRAGE_COLOCATED_DRAFT_SMS", "a third")
    with pytest.raises(ValueError, match="ARBITRAGE_COLOCATED_DRAFT_SMS"):
        ColocatedScheduler()
    monkeypatch.delenv("ARBITRAGE_COLOCATED_DRAFT_SMS")

    with pytest.raises(green.GreenContextError, match="CUDA device"):
        green.split(torch.device("cpu"), 16)
    with _pair(tokenizer, draft_sms=16) as (d, t, _, _):
        assert d.sms is None and t.sms is None
        assert [f.result(timeout=60).num_tokens for f in d.submit_steps([_long(0, 4)])] == [4]


def test_layout_is_a_config_field(tiny_config):
    from configs.schema import ConfigError

    assert tiny_config().runtime.layout == "auto" and tiny_config().runtime.placement() == "separate"  # CPU
    assert tiny_config(**{"runtime.layout": "colocated"}).runtime.placement() == "colocated"
    with pytest.raises(ConfigError, match="tensor_parallel 1"):
        tiny_config(**{"runtime.layout": "colocated", "runtime.target.tensor_parallel": 2})


@pytest.mark.parametrize(
    "settings, placement",
    [
        ({"runtime.draft.num_gpus": 0.4, "runtime.target.num_gpus": 0.6}, "colocated"),  # one GPU, shared
        ({"runtime.draft.num_gpus": 1, "runtime.target.num_gpus": 1}, "separate"),  # a GPU each
        ({"runtime.draft.num_gpus": 0.5, "runtime.target.num_gpus": 0}, "separate"),  # target on the CPU
        (
            {"runtime.draft.num_gpus": 0.3, "runtime.target.num_gpus": 0.5, "runtime.target.tensor_parallel": 2},
            "separate",
        ),
        ({"runtime.draft.num_gpus": 0.3, "runtime.target.num_gpus": 0.5, "runtime.draft.replicas": 2}, "separate"),
        (
            {
                "runtime.draft.num_gpus": 0.3,
                "runtime.target.num_gpus": 0.5,
                "runtime.draft.resources": {"small_gpu": 0.01},
            },
            "separate",  # pinned to different node types
        ),
        ({"runtime.draft.num_gpus": 0.4, "runtime.target.num_gpus": 0.6, "runtime.layout": "separate"}, "separate"),
    ],
)
def test_auto_layout_colocates_the_roles_a_placement_puts_on_one_gpu(tiny_config, settings, placement):
    assert tiny_config(**settings).runtime.placement() == placement


def test_the_one_gpu_preset_runs_colocated_and_the_two_node_one_does_not():
    from configs.schema import load_config

    assert load_config("llama-1b-8b-1gpu").runtime.placement() == "colocated"
    assert load_config("llama-1b-8b").runtime.placement() == "separate"


# ---- CUDA (`-m gpu` on a GPU machine) -------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("streams, draft_sms", [(True, 0), (False, 0), (True, 16)])
def test_cuda_colocated_equals_step_engine(tokenizer, streams, draft_sms):
    """CUDA graphs, one stream per engine (or one shared; or the SMs split between the two
    engines' green contexts), pinned async stats: same outputs as HF."""
    pair = _pair(tokenizer, target_shape="tiny-qwen2", slots=8, device="cuda", streams=streams, draft_sms=draft_sms)
    with pair as (d, t, dm, tm):
        assert (d.stream is not None) == streams and d.graphs is not None
        if draft_sms:  # disjoint partitions: the draft's ~16 SMs and the rest
            total = torch.cuda.get_device_properties(0).multi_processor_count
            assert draft_sms <= d.sms < total and 0 < t.sms <= total - d.sms
        # each engine captures its graphs on its own stream, so their cuBLAS workspaces differ
        # (shared, two engines' graphs replaying at once on two streams hung at the 1B + 8B shapes)
        assert d.graphs.capture_stream != t.graphs.capture_stream
        if streams:  # the draft's stream goes first when both engines' kernels wait for the SMs
            assert d.stream.priority < t.stream.priority
        _concurrent_equal(tokenizer, d, t, dm, tm, rounds=2)
        ref_d, ref_t = HFStepEngine(dm, tokenizer, kv_cache_tokens=0), HFStepEngine(tm, tokenizer, kv_cache_tokens=0)
        _same(_chains(d), _chains(ref_d))
        _same(_chains(t), _chains(ref_t))
        ids = [[5, 6, 7, 8]]
        assert torch.allclose(t.next_token_logits(ids, [None]), ref_t.next_token_logits(ids, [None]), atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("ready_first", [True, False])
def test_cuda_draft_steps_on_while_a_longer_target_step_runs(tokenizer, ready_first):
    """Ready first, the 2-layer draft takes several of its short steps per step of a 32-layer
    target; in round-robin order each turn waits for both engines' steps, so the draft takes
    about one step per target step. Outputs are the same either way (the other GPU tests)."""
    with _pair(
        tokenizer, target_shape="tiny-llama-deep", slots=2, context=2048, device="cuda", ready_first=ready_first
    ) as (d, t, _, _):
        for e in (d, t):  # capture the graphs, measure a step
            assert e.generate_steps([_req("warm up", forced_tokens=8)])[0].num_tokens == 8
        d0, t0, during = d.stats["decode_steps"], t.stats["decode_steps"], {}
        ft = t.submit_steps([_req("long target", forced_tokens=300)])
        ft[0].add_done_callback(lambda _: during.update(d=d.stats["decode_steps"] - d0))
        fd = d.submit_steps([_req("long draft", forced_tokens=1500)])
        assert ft[0].result(timeout=120).num_tokens == 300 and fd[0].result(timeout=120).num_tokens == 1500
        target_steps = t.stats["decode_steps"] - t0
        if ready_first:
            assert during["d"] >= min(1499, 2 * target_steps), (during, target_steps)
        else:
            assert during["d"] <= target_steps + 2, (during, target_steps)
