"""On a fake multi-node cluster, each role's actor lands on the node type it is pinned to."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _node_args(spec: dict) -> dict:
    res = dict(spec["resources"])
    return {
        "num_cpus": res.pop("CPU", 0),
        "num_gpus": res.pop("GPU", 0),
        "resources": res,
        "labels": dict(spec.get("labels", {})),
    }


@pytest.fixture
def fake_cluster(without_session_ray):
    """head + one small_gpu + one tp_gpu node with ray_cluster.yaml's resources and labels (logical GPUs)."""
    import ray
    from ray.cluster_utils import Cluster

    types = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())["available_node_types"]
    cluster = Cluster(initialize_head=True, head_node_args=_node_args(types["head"]))
    nodes = {name: cluster.add_node(**_node_args(types[name])) for name in ("small_gpu", "tp_gpu")}
    ray.init(address=cluster.address, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        yield {name: node.node_id for name, node in nodes.items()}
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.own_ray_cluster
def test_actors_land_on_their_node_types(fake_cluster, tiny_config):
    from cluster.runtime import Runtime

    small = {"num_cpus": 1, "resources": {"small_gpu_node": 0.01}}
    cfg = tiny_config(
        **{
            "runtime.draft": {**small, "num_gpus": 0.5},
            # the router is pinned by node label instead (ray_cluster.yaml's node-pool labels)
            "runtime.router": {"num_cpus": 1, "num_gpus": 0.25, "label_selector": {"node-pool": "small_gpu"}},
            "runtime.prm": {**small, "num_gpus": 0.25},
            "runtime.target": {"num_cpus": 1, "num_gpus": 1, "resources": {"tp_gpu_node": 0.01}},
        }
    )
    with Runtime(cfg, ready_timeout_s=120) as rt:
        h = rt.health()
        assert h["draft"][0]["node_id"] == fake_cluster["small_gpu"]
        assert h["router"][0]["node_id"] == fake_cluster["small_gpu"]
        assert h["target"][0]["node_id"] == fake_cluster["tp_gpu"]
        assert h["prm"][0]["node_id"] == fake_cluster["tp_gpu"]  # the judge rides on the target
        assert h["draft"][0]["gpu_ids"] and h["target"][0]["gpu_ids"]  # logical GPUs were granted
        (row,) = rt.run([{"id": "x", "problem": "1 + 1?", "answer": "2"}], policy="fixed_rate", threshold=0.5)
        assert row["error"] is None and row["num_steps"] >= 1
