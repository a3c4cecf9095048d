"""Shared fixtures: the tiny config factory and a local Ray for the actor / cluster tests."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
RAY_NUM_CPUS = 4


def start_local_ray(num_cpus: int = RAY_NUM_CPUS) -> None:
    """A local Ray whose workers import the project from the repo root."""
    import ray

    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}},
    )


@pytest.fixture
def tiny_config():
    """Factory: configs/tiny.yaml with dotted overrides, e.g. tiny_config(**{"policy.name": "rsd"})."""
    from configs.schema import load_config

    def make(**overrides):
        return load_config(REPO_ROOT / "configs" / "tiny.yaml", **overrides)

    return make


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray for the whole session (tests that need another cluster restore it after)."""
    import ray

    if not ray.is_initialized():
        start_local_ray()
    yield ray
    if ray.is_initialized():
        ray.shutdown()


class _RuntimeHolder:
    """The tiny config's Runtime, started on first use and shut down when no next test needs it."""

    def __init__(self):
        self.runtime = None

    def get(self):
        from cluster.runtime import Runtime
        from configs.schema import load_config

        if self.runtime is None:
            self.runtime = Runtime(load_config(REPO_ROOT / "configs" / "tiny.yaml")).start()
        return self.runtime

    def close(self) -> None:
        if self.runtime is not None:
            self.runtime.shutdown()
            self.runtime = None


RUNTIME_KEY = pytest.StashKey[_RuntimeHolder]()


@pytest.fixture
def tiny_runtime(ray_local, request):
    """The tiny config's actors (draft, target + judge PRM, router) and one coordinator.

    Shared by consecutive tests that ask for it, and shut down (freeing its Ray CPUs for
    other tests) as soon as the next test does not.
    """
    return request.config.stash[RUNTIME_KEY].get()


@pytest.fixture
def without_session_ray():
    """Shut the session Ray down for a test that builds its own cluster; restore it afterwards."""
    import ray

    was_up = ray.is_initialized()
    ray.shutdown()
    yield
    if ray.is_initialized():
        ray.shutdown()
    if was_up:
        start_local_ray()


def pytest_configure(config):
    config.stash[RUNTIME_KEY] = _RuntimeHolder()
    config.addinivalue_line(
        "markers",
        "own_ray_cluster: replaces the session Ray with its own cluster (runs last, then restores a local Ray)",
    )


def pytest_collection_modifyitems(config, items):
    """Tests that tear down the session Ray run after every other test."""
    items.sort(key=lambda item: item.get_closest_marker("own_ray_cluster") is not None)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item, nextitem):
    if nextitem is None or "tiny_runtime" not in nextitem.fixturenames:
        item.config.stash[RUNTIME_KEY].close()


def one_chain_sweep_inputs(tmp_path: Path, name: str, generation: dict, problems: list[dict]) -> tuple[Path, Path]:
    """configs/tiny.yaml run one chain at a time (so a kill lands between rows) with `generation`
    overrides, written as tmp_path/name.yaml, and `problems` as a JSONL dataset; returns both paths."""
    import json

    import yaml

    from configs.schema import PRESET_DIR

    data = yaml.safe_load((PRESET_DIR / "tiny.yaml").read_text())
    data["runtime"]["max_concurrent_chains"] = 1
    data["data"]["limit"] = None
    data["generation"].update(generation)
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(data))
    probs = tmp_path / "probs.jsonl"
    probs.write_text("".join(json.dumps(p) + "\n" for p in problems))
    return cfg, probs
