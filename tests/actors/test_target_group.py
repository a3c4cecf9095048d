"""The tensor-parallel target group on CPU (gloo): TP=2 matches the unsplit model exactly.

The group runs on the session's local Ray (`ray_local`, tests/conftest.py); the unsplit
reference is the same model config built in-process with `tp_size=1` and run through the
same StepEngine. A subprocess with a fake process group checks, without allocating, that a
70B shape is split about N ways.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from actors.target_group import TargetGroup, _bundles, local_cuda_index
from arbitrage.sharding import RandomWeights, ShardSlice, build_meta_model, load_tp_causal_lm, tied_keys
from arbitrage.engine import HFStepEngine
from arbitrage.types import SamplingParams, StepRequest
from configs.schema import ArbitrageConfig

ROOT = Path(__file__).resolve().parents[2]
PROBLEMS = ["What is 2 + 3?", "Name a prime number.", "Sort 3, 1, 2.", "Why is the sky blue?"]


def make_config(source: dict, **target_runtime) -> ArbitrageConfig:
    """A config whose target is `source` on CPU in float32, TP=2 by default."""
    model = {"source": source, "dtype": "float32", "device": "cpu", "max_context": 512, "seed": 3}
    # 0.5 CPU per rank: two groups fit beside the session's tiny runtime on a 4-CPU Ray
    runtime = {
        "num_cpus": 0.5,
        "tensor_parallel": 2,
        "batching": {"max_batch_size": 8, "max_wait_ms": 100},
        **target_runtime,
    }
    return ArbitrageConfig.model_validate(
        {
            "models": {"draft": {"source": {"kind": "random", "name": "tiny-llama"}}, "target": model},
            "policy": {"name": "target_only"},
            "runtime": {"target": runtime},
        }
    )


def requests(max_tokens: int = 10) -> list[StepRequest]:
    return [StepRequest(problem=p, params=SamplingParams(max_tokens=max_tokens)) for p in PROBLEMS]


@pytest.fixture(scope="module")
def random_cfg():
    return make_config({"kind": "random", "name": "tiny-llama-wide"})


@pytest.fixture(scope="module")
def reference(random_cfg):
    """The unsplit model of the same config, in-process."""
    model, tok = load_tp_causal_lm(random_cfg.models.target, tp_size=1)
    return HFStepEngine(model, tok, max_context=random_cfg.models.target.max_context)


@pytest.fixture(scope="module")
def group(ray_local, random_cfg):
    g = TargetGroup.create(random_cfg, ready_timeout_s=60)
    yield g
    g.shutdown()


def test_tp2_greedy_steps_match_unsplit_model(group, reference):
    outs = asyncio.run(group.generate_steps(requests()))
    want = reference.generate_steps(requests())
    assert [(o.text, o.num_tokens, o.stop_reason) for o in outs] == [
        (w.text, w.num_tokens, w.stop_reason) for w in want
    ]
    assert all(o.num_tokens > 0 for o in outs)


def test_chain_kv_reuse_across_steps_matches_unsplit_model(group, reference):
    """Two steps per chain: the second reuses each rank's cached KV of the first."""
    first = [
        StepRequest(problem=p, params=SamplingParams(max_tokens=6), chain_id=f"c{i}")
        for i, p in enumerate(PROBLEMS[:3])
    ]
    for engine_out in (asyncio.run(group.generate_steps(first)), reference.generate_steps(first)):
        assert all(o.num_tokens > 0 for o in engine_out)
    second = [
        StepRequest(problem=r.problem, steps=("First, think.",), params=r.params, chain_id=r.chain_id) for r in first
    ]
    reused_before, ref_before = group.stats()["engine"]["reused_tokens"], reference.reused_tokens
    outs = asyncio.run(group.generate_steps(second))
    want = reference.generate_steps(second)
    reused = group.stats()["engine"]["reused_tokens"] - reused_before
    assert reused > 0 and reused == reference.reused_tokens - ref_before
    assert [(o.text, o.num_tokens) for o in outs] == [(w.text, w.num_tokens) for w in want]


def test_concurrent_steps_share_a_batch(group, reference):
    async def fire():
        return await asyncio.gather(*(group.generate_step(r) for r in requests()))

    outs = asyncio.run(fire())
    want = reference.generate_steps(requests())
    assert [o.text for o in outs] == [w.text for w in want]
    assert any(size > 1 for size in group.stats()["methods"]["generate_step"]["batch_sizes"]), group.stats()


def test_sampled_steps_agree_across_ranks_and_with_unsplit(group, reference):
    params = SamplingParams(max_tokens=8, temperature=0.8, seed=11)
    reqs = [StepRequest(problem=p, params=params) for p in PROBLEMS[:2]]
    outs = asyncio.run(group.generate_steps(reqs))
    assert [o.text for o in outs] == [w.text for w in reference.generate_steps(reqs)]


def test_tp2_logits_match_unsplit_model(group, reference):
    prompts = ["hello world", "2 + 2 ="]
    got = asyncio.run(group.logits(prompts))
    tok, model = reference.tokenizer, reference.model
    with torch.inference_mode():
        want = torch.stack(
            [
                model(input_ids=torch.tensor([tok(p, add_special_tokens=False)["input_ids"]])).logits[0, -1].float()
                for p in prompts
            ]
        )
    assert got.shape == want.shape
    assert ((got - want).norm() / want.norm()).item() < 1e-5


def test_request_error_on_every_rank_keeps_group_usable(group):
    too_long = StepRequest(problem="x" * 600, params=SamplingParams(max_tokens=4))
    with pytest.raises(Exception, match="max_context"):
        asyncio.run(group.generate_steps([too_long]))
    assert group.health()["healthy"]
    assert asyncio.run(group.generate_steps(requests(2)))[0].num_tokens > 0


def test_each_rank_holds_about_half_and_group_is_healthy(group, reference):
    full = sum(p.numel() for p in reference.model.parameters())
    embed = reference.model.get_input_embeddings().weight.numel()
    info = group.stats()["ranks"]
    assert len(info) == 2 and {r["device"] for r in info} == {"cpu"}
    for r in info:
        assert r["params"] < full  # nobody holds the whole model
    assert sum(r["params"] for r in info) == pytest.approx(full + embed, rel=0.02)  # embeddings replicated
    h = group.health()
    assert h["healthy"] and [r["status"] for r in h["ranks"]] == ["ok", "ok"]


def test_local_checkpoint_loads_per_rank_slices_and_dead_rank_is_unhealthy(ray_local, reference, tmp_path):
    import ray

    reference.model.save_pretrained(tmp_path, safe_serialization=True)
    reference.tokenizer.save_pretrained(tmp_path)
    g = TargetGroup.create(make_config({"kind": "local", "name": str(tmp_path)}), ready_timeout_s=60)
    try:
        outs = asyncio.run(g.generate_steps(requests(8)))
        assert [o.text for o in outs] == [w.text for w in reference.generate_steps(requests(8))]
        ray.kill(g.ranks[1])
        h = g.health(timeout_s=10)
        assert not h["healthy"] and h["ranks"][1]["status"] == "dead"
    finally:
        g.shutdown()


def test_fast_engine_tp2_matches_unsplit_fast_engine(ray_local, random_cfg):
    """engine: fast on the ranks (own forward on each shard, all-reduce after o_proj, down and
    lm_head, one batch at a time in lockstep) equals the unsplit model in FastStepEngine,
    also for a chain's second step served from each rank's slot KV."""
    from arbitrage.fast_engine import FastStepEngine

    data = random_cfg.model_dump()
    data["models"]["target"]["engine"] = "fast"
    cfg = ArbitrageConfig.model_validate(data)
    model, tok = load_tp_causal_lm(cfg.models.target, tp_size=1)
    first = [
        StepRequest(problem=p, params=SamplingParams(max_tokens=8), chain_id=f"f{i}") for i, p in enumerate(PROBLEMS)
    ]
    second = [
        StepRequest(problem=r.problem, steps=("First, think.",), params=r.params, chain_id=r.chain_id) for r in first
    ]
    g = TargetGroup.create(cfg, ready_timeout_s=60)
    try:
        with FastStepEngine(model, tok, max_context=cfg.models.target.max_context) as ref:
            for batch in (first, second):
                outs, want = asyncio.run(g.generate_steps(batch)), ref.generate_steps(batch)
                assert [(o.text, o.num_tokens) for o in outs] == [(w.text, w.num_tokens) for w in want]
            assert g.stats()["engine"]["reused_tokens"] == ref.reused_tokens > 0
    finally:
        g.shutdown()


# ---- shard construction, without Ray ---------------------------------------------------
def test_random_weights_are_the_same_whatever_the_split(monkeypatch):
    import arbitrage.sharding as tg

    monkeypatch.setattr(tg, "ROW_BLOCK_ELEMENTS", 70 * 7)  # 7-row blocks: slices cross blocks
    w, cpu = RandomWeights(seed=5), torch.device("cpu")
    full = w.read(ShardSlice("w", (30, 70)), torch.float32, cpu)
    rows = [w.read(ShardSlice("w", (30, 70), 0, a, b), torch.float32, cpu) for a, b in [(0, 11), (11, 30)]]
    cols = [w.read(ShardSlice("w", (30, 70), 1, a, b), torch.float32, cpu) for a, b in [(0, 35), (35, 70)]]
    assert torch.equal(torch.cat(rows, 0), full) and torch.equal(torch.cat(cols, 1), full)
    assert not torch.equal(full, RandomWeights(seed=6).read(ShardSlice("w", (30, 70)), torch.float32, cpu))
    assert torch.equal(w.read(ShardSlice("n.weight", (8,)), torch.float32, cpu), torch.ones(8))


def test_tied_head_maps_to_embedding():
    from arbitrage.tiny import shape_config

    model = build_meta_model(shape_config("llama-3.2-1b"), torch.bfloat16)
    assert tied_keys(model) == {"lm_head.weight": "model.embed_tokens.weight"}
    assert tied_keys(build_meta_model(shape_config("tiny-llama"), torch.float32)) == {}


def test_bundles_pin_custom_resources_on_bundle_zero():
    cfg = make_config(
        {"kind": "random", "name": "tiny-llama"},
        num_cpus=1,
        num_gpus=1,
        tensor_parallel=4,
        resources={"tp_gpu_node": 0.01},
    )
    b = _bundles(cfg.runtime.target)
    assert b[0] == {"CPU": 1, "GPU": 1, "tp_gpu_node": 0.01} and b[1:] == [{"CPU": 1, "GPU": 1}] * 3
    assert local_cuda_index([5], "4,5,6") == 1 and local_cuda_index([2], None) == 2


COUNT_SCRIPT = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    tp, rank = int(sys.argv[1]), int(sys.argv[2])
    dist.init_process_group("fake", rank=rank, world_size=tp, store=FakeStore())
    from arbitrage.sharding import apply_autotp, build_meta_model, shard_plan, tied_keys
    from arbitrage.tiny import shape_config
    model = build_meta_model(shape_config("llama-3.1-70b"), torch.bfloat16)
    full = sum(p.numel() for p in model.parameters())
    replicated = model.get_input_embeddings().weight.numel()
    tied = tied_keys(model)
    apply_autotp(model, tp, torch.bfloat16)
    plan = shard_plan(model, tied)
    print(json.dumps({"full": full, "replicated": replicated,
                      "shard": sum(p.numel() for p in model.parameters()),
                      "on_meta": all(p.is_meta for p in model.parameters()),
                      "split": sum(s.dim is not None for s in plan.values()),
                      "q": list(plan["model.layers.0.self_attn.q_proj.weight"].shape)}))
""")


@pytest.mark.parametrize("tp,rank", [(4, 1)])
def test_70b_shard_plan_splits_about_n_ways_without_allocating(tp, rank):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", COUNT_SCRIPT, str(tp), str(rank)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["on_meta"] and r["q"] == [8192 // tp, 8192]
    assert r["split"] == 80 * 7 + 1  # q k v o gate up down per layer, and lm_head
    want = r["replicated"] + (r["full"] - r["replicated"]) / tp
    assert r["shard"] == pytest.approx(want, rel=0.01)
    assert r["shard"] < 1.1 * r["full"] / tp
