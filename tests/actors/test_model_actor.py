"""ModelActor: options from ActorConfig, dynamic batching across concurrent callers, health."""

from __future__ import annotations

import asyncio

import pytest

from actors.model_actor import MAX_CONCURRENCY, actor_options, prm_on_target
from arbitrage.types import SamplingParams, StepRequest


def test_concurrent_requests_share_a_batch_and_match_in_process(tiny_runtime, tiny_config):
    from arbitrage.models import load_engine

    draft = tiny_runtime.handles["draft"][0]
    params = SamplingParams(max_tokens=6)
    reqs = [StepRequest(problem=f"Batch problem {i}?", params=params) for i in range(6)]
    before = _hist(draft)

    async def fire():
        return await asyncio.gather(*(draft.generate_step.remote(r) for r in reqs))

    outs = asyncio.run(fire())
    after = _hist(draft)
    new = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert any(size > 1 and n > 0 for size, n in new.items()), after

    engine = load_engine(tiny_config().models.draft)
    for req, out in zip(reqs, outs):
        (alone,) = engine.generate_steps([req])
        assert out.text == alone.text and out.num_tokens == alone.num_tokens


def test_health_reports_role_node_and_methods(tiny_runtime):
    import ray

    target = tiny_runtime.handles["target"][0]
    h = ray.get(target.health.remote())
    assert h["role"] == "target" and h["ready"] and h["node_id"]
    assert set(h["methods"]) == {"generate_step", "score"}  # the judge PRM rides on the target
    r = ray.get(tiny_runtime.handles["router"][0].health.remote())
    assert r["methods"] == ["predict"]


def test_missing_method_is_a_clear_error(tiny_runtime):
    import ray

    from arbitrage.router import RouterRequest

    with pytest.raises(Exception, match="does not serve 'predict'"):
        ray.get(tiny_runtime.handles["draft"][0].predict.remote(RouterRequest("p", (), "c")))


def test_actor_options_follow_actor_config(tiny_config):
    cfg = tiny_config(
        **{
            "runtime.draft.num_gpus": 0.5,
            "runtime.draft.resources": {"small_gpu_node": 0.01},
            "runtime.draft.label_selector": {"node-pool": "small_gpu"},
        }
    )
    opts = actor_options("draft", cfg, name="draft-0")
    assert opts["num_gpus"] == 0.5 and opts["num_cpus"] == 0.25
    assert opts["resources"] == {"small_gpu_node": 0.01}
    assert opts["label_selector"] == {"node-pool": "small_gpu"}
    assert opts["max_restarts"] == -1 and opts["max_task_retries"] == 0  # RayBackend re-sends lost calls
    assert actor_options("draft", tiny_config(**{"runtime.draft.max_restarts": 2}))["max_restarts"] == 2
    assert opts["max_concurrency"] == MAX_CONCURRENCY and opts["name"] == "draft-0"
    assert "label_selector" not in actor_options("target", cfg)
    assert prm_on_target(cfg)


def _hist(handle) -> dict[int, int]:
    import ray

    stats = ray.get(handle.stats.remote())
    return stats["methods"].get("generate_step", {}).get("batch_sizes", {})
