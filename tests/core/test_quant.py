"""Weight-only quantization (torchao) of a tiny random model from its config: int8 on the CPU stays
quantized in the model, both engines decode with it, and int4 off CUDA fails in one line."""

from __future__ import annotations

import pytest
import torch

torchao = pytest.importorskip("torchao")

from arbitrage.models import load_causal_lm  # noqa: E402
from arbitrage.quant import quantizable, quantize_weights, weight_bytes  # noqa: E402
from arbitrage.types import SamplingParams, StepRequest  # noqa: E402
from configs.schema import ModelConfig  # noqa: E402


def _cfg(**kw):
    return ModelConfig(
        source={"kind": "random", "name": "tiny-llama-wide"}, device="cpu", dtype="float32", seed=2, **kw
    )


def test_int8_weights_stay_quantized_and_track_the_float_model():
    full, tok = load_causal_lm(_cfg())
    q, _ = load_causal_lm(_cfg(quantization="int8"))
    lin = q.model.layers[0].mlp.gate_proj
    assert type(lin.weight) is not torch.nn.Parameter and "Int8" in type(lin.weight).__name__
    assert type(q.lm_head.weight) in (torch.Tensor, torch.nn.Parameter)  # the LM head stays float
    assert weight_bytes(q) < 0.6 * weight_bytes(full)  # embeddings and lm_head stay float32
    ids = torch.tensor([tok.encode("Tom has 3 apples.")])
    with torch.no_grad():
        a, b = full(ids).logits, q(ids).logits
    rel = (a - b).norm() / a.norm()
    assert 0 < rel < 0.05, float(rel)


@pytest.mark.parametrize("engine", ["hf", "fast"])
def test_engines_decode_with_int8_weights(engine):
    from arbitrage.models import load_engine

    eng = load_engine(_cfg(quantization="int8", engine=engine, max_context=256, max_slots=4))
    try:
        out = eng.generate_steps([StepRequest("What is 2 + 3?", params=SamplingParams(max_tokens=6, forced_tokens=6))])
        assert out[0].num_tokens == 6
    finally:
        close = getattr(eng, "close", None)
        if close:
            close()


def test_int4_needs_cuda_and_lm_head_is_never_quantized():
    model, _ = load_causal_lm(_cfg())
    with pytest.raises(ValueError, match="runs on CUDA only"):
        quantize_weights(model, "int4", "cpu")
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize_weights(model, "int3", "cpu")
    assert not quantizable(model.lm_head, "lm_head", "int8")
    assert quantizable(model.model.layers[0].mlp.down_proj, "model.layers.0.mlp.down_proj", "int4")
    odd = torch.nn.Linear(100, 64)
    assert not quantizable(odd, "x", "int4") and quantizable(odd, "x", "int8")


def test_skywork_prm_backbone_int8():
    from arbitrage.prm import PRMRequest, build_prm
    from configs.schema import PRMConfig

    src = {"kind": "random", "name": "tiny-qwen2"}
    reqs = [PRMRequest("What is 2 + 3?", ("2 + 3 = 5.",)), PRMRequest("What is 2 + 3?", ("2 + 3 = 6.",))]
    full = build_prm(PRMConfig(kind="skywork", source=src, device="cpu", dtype="float32"))
    q = build_prm(PRMConfig(kind="skywork", source=src, device="cpu", dtype="float32", quantization="int8"))
    assert "Int8" in type(q.model.model.layers[0].mlp.up_proj.weight).__name__
    assert type(q.model.v_head.summary.weight) is torch.nn.Parameter  # the value head stays float32
    assert all(abs(a - b) < 0.02 for a, b in zip(q.score(reqs), full.score(reqs), strict=True))
