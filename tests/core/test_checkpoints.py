"""The checkpoint resolver on tiny checkpoints in the released layouts: pytorch_model.bin only,
sharded .bin with its index, safetensors; weights_only loading refuses a pickle that carries code."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from arbitrage.checkpoints import CheckpointError, load_bin, read_weights, weight_files
from arbitrage.prm import PRMRequest, SkyworkPRM, SkyworkPRMModel, build_prm
from arbitrage.tiny import byte_tokenizer, shape_config

PROBLEM = "What is 2 + 3 * 4?"
REQUESTS = [
    PRMRequest(PROBLEM, ("First, 3 * 4 = 12.",)),
    PRMRequest(PROBLEM, ("First, 3 * 4 = 12.", "Then 2 + 12 = 14.")),
    PRMRequest("Compute 7 - 5.", ("7 - 5 = 2.",)),
]


def _skywork_state(seed: int = 3):
    """A Skywork-format state dict: the causal LM's keys (lm_head included) + v_head.summary.*."""
    from transformers import Qwen2ForCausalLM

    cfg = shape_config("tiny-qwen2")
    cfg.initializer_range = 0.3
    torch.manual_seed(seed)
    state = {k: v.contiguous() for k, v in Qwen2ForCausalLM(cfg).state_dict().items()}
    state["v_head.summary.weight"] = torch.randn(1, cfg.hidden_size)
    state["v_head.summary.bias"] = torch.tensor([0.25])
    cfg.architectures = ["Qwen2ForPrmModel"]
    return cfg, state


def _write(folder, layout: str, seed: int = 3):
    """Write a tiny Skywork checkpoint (config, tokenizer, weights in `layout`) and return its state."""
    cfg, state = _skywork_state(seed)
    folder.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    if layout == "safetensors":
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    elif layout == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    elif layout == "bin-sharded":
        keys = sorted(state)
        halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
        weight_map = {}
        for i, part in enumerate(halves, start=1):
            name = f"pytorch_model-{i:05d}-of-00002.bin"
            torch.save({k: state[k] for k in part}, folder / name)
            weight_map.update({k: name for k in part})
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return state


def test_resolver_finds_each_layout(tmp_path):
    for layout, fmt, n in [("safetensors", "safetensors", 1), ("bin", "bin", 1), ("bin-sharded", "bin", 2)]:
        state = _write(tmp_path / layout, layout)
        wf = weight_files(tmp_path / layout)
        assert (wf.format, len(wf.files)) == (fmt, n)
        assert wf.keys() == set(state)
        got = read_weights(tmp_path / layout)
        assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)
    heads = read_weights(tmp_path / "bin-sharded", keep=lambda k: k.startswith("v_head."))
    assert set(heads) == {"v_head.summary.weight", "v_head.summary.bias"}


def test_skywork_pytorch_model_bin_only_equals_its_safetensors_copy(tmp_path):
    """Skywork-o1-Open-PRM ships pytorch_model.bin only: it loads, and scores as the safetensors copy."""
    _write(tmp_path / "st", "safetensors")
    _write(tmp_path / "bin", "bin")
    _write(tmp_path / "shards", "bin-sharded")
    assert not [f for f in os.listdir(tmp_path / "bin") if f.endswith(".safetensors")]
    tok = byte_tokenizer()
    want = SkyworkPRM(SkyworkPRMModel.from_pretrained(tmp_path / "st"), tok).score(REQUESTS)
    for layout in ("bin", "shards"):
        model = SkyworkPRMModel.from_pretrained(tmp_path / layout)
        assert SkyworkPRM(model, tok).score(REQUESTS) == want
    assert len({round(s, 6) for s in want}) == len(want)  # the scores tell the requests apart


def test_skywork_bin_through_the_config(tmp_path):
    """models.prm with a local folder holding pytorch_model.bin only: build_prm loads it, in bf16 too."""
    from configs.schema import PRMConfig

    _write(tmp_path / "bin", "bin")
    _write(tmp_path / "st", "safetensors")
    want = build_prm(
        PRMConfig(kind="skywork", source={"kind": "local", "name": str(tmp_path / "st")}, device="cpu", dtype="float32")
    ).score(REQUESTS)
    prm = build_prm(
        PRMConfig(
            kind="skywork", source={"kind": "local", "name": str(tmp_path / "bin")}, device="cpu", dtype="float32"
        )
    )
    assert isinstance(prm, SkyworkPRM) and prm.score(REQUESTS) == want
    half = build_prm(
        PRMConfig(
            kind="skywork", source={"kind": "local", "name": str(tmp_path / "bin")}, device="cpu", dtype="bfloat16"
        )
    )
    assert next(half.model.model.parameters()).dtype == torch.bfloat16
    assert half.model.v_head.summary.weight.dtype == torch.float32  # the head stays float32
    assert all(abs(a - b) < 0.05 for a, b in zip(half.score(REQUESTS), want, strict=True))


class _RunsCode:
    """A pickle payload that would create a file if it were ever unpickled fully."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_bin_that_carries_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "ran"
    folder = tmp_path / "evil"
    _write(folder, "bin")
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    state["v_head.summary.bias"] = _RunsCode(marker)  # type: ignore[assignment]
    with open(folder / "pytorch_model.bin", "wb") as f:
        torch.save(state, f)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_bin(folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refusing to unpickle") as err:
        SkyworkPRMModel.from_pretrained(folder)
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_missing_or_mismatched_weights_fail_in_one_line(tmp_path):
    _write(tmp_path / "ok", "bin")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no weights in .*pytorch_model.bin"):
        SkyworkPRMModel.from_pretrained(empty)
    state = torch.load(tmp_path / "ok" / "pytorch_model.bin", weights_only=True)
    del state["v_head.summary.weight"]
    torch.save(state, tmp_path / "ok" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="missing 1 keys .*v_head.summary.weight"):
        SkyworkPRMModel.from_pretrained(tmp_path / "ok")
    shards = tmp_path / "shards"
    _write(shards, "bin-sharded")
    (shards / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match="missing: pytorch_model-00002-of-00002.bin"):
        weight_files(shards)


def test_causal_lm_folder_with_pytorch_model_bin(tmp_path):
    """A causal LM shipped as pytorch_model.bin loads through load_causal_lm like its safetensors copy."""
    from arbitrage.models import ModelNotFoundError, load_causal_lm
    from arbitrage.tiny import random_causal_lm
    from configs.schema import ModelConfig

    lm = random_causal_lm("tiny-llama", seed=4)
    lm.save_pretrained(tmp_path / "st")
    byte_tokenizer().save_pretrained(tmp_path / "st")
    (tmp_path / "bin").mkdir()
    lm.config.save_pretrained(tmp_path / "bin")
    byte_tokenizer().save_pretrained(tmp_path / "bin")
    torch.save({k: v.contiguous() for k, v in lm.state_dict().items()}, tmp_path / "bin" / "pytorch_model.bin")
    ids = torch.tensor([[1, 2, 3, 4]])
    outs = []
    for name in ("st", "bin"):
        model, _ = load_causal_lm(ModelConfig(source={"kind": "local", "name": str(tmp_path / name)}, device="cpu"))
        with torch.no_grad():
            outs.append(model(ids).logits)
    assert torch.equal(outs[0], outs[1])
    (tmp_path / "bin" / "pytorch_model.bin").unlink()
    with pytest.raises(ModelNotFoundError, match="no weights in"):
        load_causal_lm(ModelConfig(source={"kind": "local", "name": str(tmp_path / "bin")}, device="cpu"))
