"""Autoscaling of ray_cluster.yaml's node types under Ray's fake multi-node provider.

The autoscaler's own test harness (`ray.autoscaler._private.fake_multi_node`, the provider
behind `ray.cluster_utils.AutoscalingCluster`): a real `ray start --head` with a real
autoscaler (monitor) process whose provider starts and stops real raylets on this machine
instead of cloud instances. The worker node types are ray_cluster.yaml's own (resources,
labels, min/max workers). From the head alone, the placement group of the TP=4 target group
of configs/llama-8b-70b.yaml (its bundles as `actors.target_group._bundles` builds them, on
`tp_gpu_node`) makes the autoscaler launch one node of the multi-GPU type, the group becomes
ready there, and once it is removed the idle node goes away after the idle timeout. Node
counts are asserted over time.

The cluster is ours alone: its own GCS port and temp dir, its processes in their own session
(ended by that process group at the end, never `ray stop`, which would end every Ray on the
machine). Slow (about 60-90 s on 2 busy cores): opt in with `-m slow`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from configs.schema import load_config
from ports import free_port

ROOT = Path(__file__).resolve().parents[2]
IDLE_TIMEOUT_MIN = 0.25  # 15 s


def _fake_config(port: int, ip: str) -> dict:
    """ray_cluster.yaml's worker node types on the fake provider (min_workers 0: the head alone first)."""
    real = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    types = {}
    for name, t in real["available_node_types"].items():
        if name == real["head_node_type"]:
            continue
        # object_store_memory: a small store per fake node (the provider pops it off the resources)
        types[name] = {
            "resources": {**t["resources"], "object_store_memory": 100 * 2**20},
            "labels": t.get("labels", {}),
            "node_config": {},
            "min_workers": 0,
            "max_workers": t["max_workers"],
        }
    head = {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0}
    return {
        "cluster_name": "arbitrage-fake",
        "max_workers": real["max_workers"],
        "upscaling_speed": real["upscaling_speed"],
        "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": f"{ip}:{port}",
        },
        "available_node_types": {**types, "ray.head.default": head},
        "head_node_type": "ray.head.default",
        "docker": {},
        "auth": {"ssh_user": "ubuntu"},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def _use_auth(token: str | None) -> None:
    """Point this process's Ray client at `token` (None: back to the defaults, ~/.ray/auth_token)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    for k, v in (("RAY_AUTH_MODE", "token" if token else None), ("RAY_AUTH_TOKEN", token)):
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@pytest.fixture
def fake_cluster(without_session_ray):
    import uuid

    import ray

    token = uuid.uuid4().hex  # the cluster's own token: ~/.ray/auth_token (shared) is left alone
    ip = ray._private.services.get_node_ip_address()
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="arb-as-", dir="/tmp"))
    cfg_path = tmp / "autoscaling.json"
    cfg_path.write_text(json.dumps(_fake_config(port, ip)))
    env = dict(
        os.environ,
        RAY_FAKE_CLUSTER="1",
        AUTOSCALER_UPDATE_INTERVAL_S="1",
        RAY_prestart_worker_first_driver="0",
        RAY_num_prestart_python_workers="0",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
    )
    ray_bin = str(Path(sys.executable).with_name("ray"))
    head = subprocess.Popen(
        [
            ray_bin,
            "start",
            "--head",
            f"--port={port}",
            f"--autoscaling-config={cfg_path}",
            "--num-cpus=2",
            "--include-dashboard=false",
            f"--temp-dir={tmp / 'ray'}",
            "--block",
            "--disable-usage-stats",
        ],
        env=env,
        start_new_session=True,
        stdout=(tmp / "head.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        _use_auth(token)
        deadline = time.monotonic() + 300
        while True:
            try:
                ray.init(address=f"{ip}:{port}", log_to_driver=False)
                break
            except Exception as e:  # noqa: BLE001 - the head is still starting
                if head.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"fake head did not start ({type(e).__name__}: {e}); "
                        f"log: {(tmp / 'head.log').read_text()[-1500:]}"
                    ) from e
                time.sleep(2)
        yield ray
    finally:
        if ray.is_initialized():
            ray.shutdown()
        _use_auth(None)
        _stop(head, tmp)


def _stop(head: subprocess.Popen, tmp: Path) -> None:
    """End this cluster only: the head's session (ray start --block, GCS, raylets, the autoscaler and
    its fake nodes), then any process of ours that left it (Ray's workers take their own process
    group) -- found by our private temp dir on its command line."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            break
        time.sleep(3)
    head.wait(timeout=30)
    for pid in _ours(tmp):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _ours(tmp: Path) -> list[int]:
    mine = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if str(tmp).encode() in (d / "cmdline").read_bytes():
                    mine.append(int(d.name))
            except OSError:
                pass
    return mine


def _alive(ray) -> dict[str, int]:
    """Alive nodes by kind: head, small_gpu, tp_gpu (a worker's type from its resources)."""
    out = {"head": 0, "small_gpu": 0, "tp_gpu": 0}
    for n in ray.nodes():
        if not n["Alive"]:
            continue
        res = n["Resources"]
        kind = "tp_gpu" if "tp_gpu_node" in res else "small_gpu" if "small_gpu_node" in res else "head"
        out[kind] += 1
    return out


def _wait_for(ray, want: dict[str, int], timeout: float, seen: list) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        counts = _alive(ray)
        seen.append((round(time.monotonic() - t0, 1), counts))
        if counts == want:
            return time.monotonic() - t0
        time.sleep(1)
    raise AssertionError(f"node counts never reached {want} in {timeout:.0f}s: {seen[-5:]}")


@pytest.mark.slow
def test_tp_group_launches_a_tp_gpu_node_and_idle_nodes_go_away(fake_cluster):
    ray = fake_cluster
    from ray.util.placement_group import placement_group, remove_placement_group

    from actors.target_group import _bundles

    target = load_config("llama-8b-70b").runtime.target
    assert target.tensor_parallel == 4 and "tp_gpu_node" in target.resources
    seen: list = []
    assert _alive(ray) == {"head": 1, "small_gpu": 0, "tp_gpu": 0}  # the head alone
    time.sleep(5)
    assert _alive(ray) == {"head": 1, "small_gpu": 0, "tp_gpu": 0}  # nothing asked: nothing launched

    pg = placement_group(_bundles(target), strategy="STRICT_PACK")  # the target group's reservation
    up = _wait_for(ray, {"head": 1, "small_gpu": 0, "tp_gpu": 1}, 90, seen)
    ray.get(pg.ready(), timeout=60)  # the whole TP=4 group on that one node
    table = ray.util.placement_group_table(pg)
    assert table["state"] == "CREATED" and len(set(table["bundles_to_node_id"].values())) == 1
    time.sleep(3)
    assert _alive(ray)["tp_gpu"] == 1  # one node of the multi-GPU type, not more

    remove_placement_group(pg)
    t_idle = time.monotonic()
    down = _wait_for(ray, {"head": 1, "small_gpu": 0, "tp_gpu": 0}, 120, seen)
    idle_s = time.monotonic() - t_idle
    assert idle_s >= IDLE_TIMEOUT_MIN * 60 * 0.8, f"removed after {idle_s:.0f}s, before the idle timeout"
    print(
        f"tp_gpu node up after {up:.0f}s; gone {down:.0f}s after its group was removed "
        f"(idle timeout {IDLE_TIMEOUT_MIN * 60:.0f}s)"
    )
