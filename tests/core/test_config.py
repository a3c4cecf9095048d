"""Config schema: presets validate, and every wrong field fails with one line naming it."""

from __future__ import annotations

import warnings

import pytest

from configs import ConfigError, load_config
from configs.schema import PRESET_DIR

# serve.yaml is a Ray Serve config file (`serve run configs/serve.yaml`), not an arbitrage preset.
PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if p.stem != "serve")


@pytest.mark.parametrize("name", PRESETS)
def test_presets_validate(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a shipped preset loads without a sizing warning
        cfg = load_config(name)
    assert cfg.models.draft and cfg.models.target


def test_a_default_slot_pool_smaller_than_the_chains_in_flight_warns(tmp_path):
    model = "{source: {kind: random, name: tiny-llama}, engine: llamacpp, max_context: 4096%s}"
    text = "models:\n  draft: %s\n  target: %s\nruntime: {max_concurrent_chains: 32}\npolicy: {name: draft_only}\n"
    with pytest.warns(
        UserWarning,
        match=r"models.draft.max_slots is unset, so its pool holds 16 chains .* "
        r"set models.draft.max_slots to 32",
    ):
        load_config(_write(tmp_path, text % (model % "", model % ", max_slots: 32")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit max_slots is the user's choice
        load_config(_write(tmp_path, text % (model % ", max_slots: 8", model % ", max_slots: 32")))


def test_cluster_presets_are_the_papers_pairs():
    assert {"local", "llama-1b-8b", "llama-8b-70b", "qwen-math-7b-q3", "tiny"} <= set(PRESETS)
    assert load_config("llama-8b-70b").runtime.target.tensor_parallel > 1
    assert load_config("qwen-math-7b-q3").models.draft.quantization == "int4"  # stays 4-bit on the GPU
    assert "Skywork" in load_config("llama-1b-8b").models.prm.source.name


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


BASE = """
models:
  draft: {source: {kind: random, name: tiny-llama}}
  target: {source: {kind: random, name: tiny-llama}}
  prm: {kind: judge, source: {kind: random, name: tiny-llama}}
"""


@pytest.mark.parametrize(
    "extra, field",
    [
        ("policy: {name: nope}", "policy.name"),
        ("policy: {name: rsd, threshold: 1.5}", "policy.threshold"),
        ("policy: {name: rsd, threshold: -0.1}", "policy.threshold"),
        ("generation: {max_step_tokens: 0}", "generation.max_step_tokens"),
        ("generation: {temperature: hot}", "generation.temperature"),
        ("generation: {bogus: 1}", "generation.bogus"),
        ("runtime: {draft: {num_gpus: -1}}", "runtime.draft.num_gpus"),
        ("serve: {port: 70000}", "serve.port"),
    ],
)
def test_wrong_field_is_named_in_one_line(tmp_path, extra, field):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, BASE + extra))
    msg = str(e.value)
    assert "\n" not in msg and field in msg


def test_policy_needs_its_models(tmp_path):
    text = "models:\n  draft: {source: {kind: random, name: tiny-llama}}\n  target: {source: {kind: random, name: tiny-llama}}\n"
    with pytest.raises(ConfigError, match="needs models.prm"):
        load_config(_write(tmp_path, text + "policy: {name: rsd}"))
    with pytest.raises(ConfigError, match="needs models.router"):
        load_config(_write(tmp_path, text + "policy: {name: router}"))


def test_malformed_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(_write(tmp_path, "models: [unclosed"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_write(tmp_path, "- a list"))


def test_overrides_validate():
    cfg = load_config("tiny", **{"policy.name": "rsd", "policy.threshold": 0.25})
    assert (cfg.policy.name, cfg.policy.threshold) == ("rsd", 0.25)
    with pytest.raises(ConfigError, match="policy.threshold"):
        load_config("tiny", **{"policy.threshold": 2})


def test_core_import_leaves_ray_out():
    import subprocess
    import sys

    code = (
        "import sys, arbitrage.loop, arbitrage.runner, arbitrage.engine, arbitrage.prm, "
        "arbitrage.router, configs; print('ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
