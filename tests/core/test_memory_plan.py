"""The memory plan: every shipped preset fits its own plan; the arithmetic matches real models and
the fast engine's allocation; a role that does not fit fails in one line, at start-up too."""

from __future__ import annotations

from pathlib import Path

import pytest

from arbitrage.memory_plan import ARCHITECTURES, check, format_plan, plan, resolve_arch
from configs.schema import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml") if p.stem != "serve")
GPU_PRESETS = ["llama-1b-8b", "llama-1b-8b-1gpu", "llama-8b-70b", "qwen-math-7b-q3"]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_shipped_preset_passes_its_own_plan(preset):
    p = check(load_config(preset))
    assert {r.role for r in p.roles} >= {"draft", "target"}
    text = format_plan(p)
    assert f"memory plan for {load_config(preset).name}" in text and "NO" not in text.split()
    if preset in GPU_PRESETS:  # every model role is on a GPU of a known size, and checked
        gpu = [r for r in p.roles if r.gpu]
        assert {r.role for r in gpu} == {"draft", "target", "prm", "router"}
        assert all(r.fits is True and r.budget and r.weights > 0 for r in gpu), text


def test_parameter_counts_match_the_published_models():
    counts = {
        name: ARCHITECTURES[name].params() / 1e9
        for name in (
            "meta-llama/Llama-3.2-1B-Instruct",
            "meta-llama/Llama-3.1-8B-Instruct",
            "meta-llama/Llama-3.1-70B-Instruct",
            "Qwen/Qwen2.5-Math-7B-Instruct",
            "Qwen/Qwen2.5-Math-1.5B-Instruct",
        )
    }
    published = {
        "meta-llama/Llama-3.2-1B-Instruct": 1.24,
        "meta-llama/Llama-3.1-8B-Instruct": 8.03,
        "meta-llama/Llama-3.1-70B-Instruct": 70.55,
        "Qwen/Qwen2.5-Math-7B-Instruct": 7.62,
        "Qwen/Qwen2.5-Math-1.5B-Instruct": 1.54,
    }
    for name, want in published.items():
        assert counts[name] == pytest.approx(want, rel=0.01), name


def test_weights_and_kv_match_a_real_model_and_the_fast_engine(tmp_path):
    """On a tiny random model built for real: parameter bytes, and the fast engine's KV allocation."""
    from arbitrage.fast_engine import FastStepEngine
    from arbitrage.models import load_causal_lm
    from arbitrage.quant import weight_bytes

    cfg = load_config(
        "tiny",
        **{
            "models.draft.device": "cuda",
            "models.draft.engine": "fast",
            "models.draft.dtype": "bfloat16",
            "models.draft.max_slots": 3,
            "models.draft.max_context": 256,
            "models.draft.gpu_memory_gib": 2.0,
            "runtime.draft.num_gpus": 1,
        },
    )
    rp = plan(cfg, node_types={}).roles[0]
    model, tok = load_causal_lm(cfg.models.draft.model_copy(update={"device": "cpu", "dtype": "bfloat16"}))
    assert rp.weights == weight_bytes(model)
    engine = FastStepEngine(model, tok, max_context=256, max_slots=3)
    try:
        assert rp.kv == engine.kv_cache_bytes
    finally:
        engine.close()
    assert rp.fits and rp.where == "2 GiB (models.draft.gpu_memory_gib)"


def test_int8_weights_match_the_quantized_model():
    pytest.importorskip("torchao")
    from arbitrage.models import load_causal_lm
    from arbitrage.quant import weight_bytes

    cfg = load_config(
        "tiny",
        **{
            "models.draft.device": "cuda",
            "models.draft.dtype": "bfloat16",
            "models.draft.quantization": "int8",
            "models.draft.gpu_memory_gib": 1.0,
            "runtime.draft.num_gpus": 1,
        },
    )
    rp = plan(cfg, node_types={}).roles[0]
    model, _ = load_causal_lm(cfg.models.draft.model_copy(update={"device": "cpu"}))
    assert rp.weights == pytest.approx(weight_bytes(model), rel=0.02)


def test_int4_draft_is_a_third_of_bf16():
    cfg = load_config("qwen-math-7b-q3")
    draft, target = plan(cfg).roles[:2]
    assert cfg.models.draft.quantization == "int4" and draft.model.endswith("[int4]")
    assert 0.3 < draft.weights / target.weights < 0.4  # embeddings and lm_head stay bf16
    assert draft.kv == target.kv  # the KV cache is not quantized


def test_the_old_placements_fail_in_one_line_naming_role_and_numbers():
    """The issue's cases: an 8B draft on one L4; a 1B draft's 64 default slots on half an L4."""
    cases = [
        ("llama-8b-70b", {"runtime.draft.resources": {"small_gpu_node": 0.01}}, "models.draft", "22.0 GiB"),
        ("llama-1b-8b", {"runtime.draft.num_gpus": 0.5, "models.draft.max_slots": 64}, "models.draft", "11.0 GiB"),
        ("qwen-math-7b-q3", {"models.draft.quantization": "none"}, "models.draft", "22.0 GiB"),
        ("llama-8b-70b", {"runtime.target.tensor_parallel": 1}, "models.target", "139.0 GiB"),
    ]
    for preset, overrides, role, budget in cases:
        with pytest.raises(ConfigError) as err:
            check(load_config(preset, **overrides))
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith(f"memory plan: {role} ") and f"gets {budget}" in msg, msg
        assert "weights" in msg and "KV" in msg and "headroom" in msg


def test_start_up_checks_the_plan_before_ray_starts(without_session_ray):
    import ray

    from cluster.runtime import Runtime

    cfg = load_config(
        "tiny", **{"models.draft.device": "cuda", "models.draft.gpu_memory_gib": 0.001, "runtime.draft.num_gpus": 1}
    )
    with pytest.raises(ConfigError, match=r"memory plan: models.draft .* gets 0.0 GiB"):
        Runtime(cfg).start()
    assert not ray.is_initialized()


def test_cpu_roles_and_unknown_models_are_listed_not_failed():
    p = plan(load_config("local"))
    assert all(r.fits is None for r in p.roles) and "not checked" in format_plan(p)
    arch, why = resolve_arch(name="someone/unknown-model")
    assert arch is None and "unknown" in why
    cfg = load_config(
        "tiny",
        **{
            "models.draft.source": {"kind": "hub", "name": "someone/unknown-model"},
            "models.draft.device": "cuda",
            "models.draft.gpu_memory_gib": 8,
            "runtime.draft.num_gpus": 1,
        },
    )
    rp = plan(cfg, node_types={}).roles[0]
    assert rp.fits is None and "unknown" in rp.note


def test_cli_config_plan():
    import subprocess
    import sys

    cli = [sys.executable, "-c", "from cluster.cli import app; app()", "config", "plan"]
    ok = subprocess.run(cli + ["--config", "qwen-math-7b-q3"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "memory plan for qwen-math-7b-q3" in ok.stdout and "[int4]" in ok.stdout
    bad = subprocess.run(
        cli + ["-c", "qwen-math-7b-q3", "--set", "runtime.draft.num_gpus=0.5"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: memory plan: models.draft") and "gets 11.0 GiB" in lines[0]


def test_weight_bytes_equal_the_h200_measurement():
    """benchmarks/results/quant_h200.json: the tensor bytes of the quantized 7B draft, measured on an H200."""
    import json

    rows = {r["variant"]: r for r in json.loads((ROOT / "benchmarks/results/quant_h200.json").read_text())["rows"]}
    for variant, scheme in [("bf16", "none"), ("int8", "int8"), ("int4", "int4"), ("int4-mslk", "int4_mslk")]:
        cfg = load_config("qwen-math-7b-q3", **{"models.draft.quantization": scheme})
        planned = plan(cfg).roles[0].weights
        assert planned == pytest.approx(rows[variant]["weight_bytes"], rel=0.001), variant
