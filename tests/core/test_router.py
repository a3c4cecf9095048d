"""Router: input format, tiny random classifier, save/load, truncation, batching (byte tokenizer;
the real Qwen2.5 tokenizer's ids are in test_router_format.py)."""

from __future__ import annotations

import pytest
import torch

from arbitrage.router import ClassifierRouter, RouterRequest, encode_router_input, format_router_input
from arbitrage.router_factory import build_router
from arbitrage.tiny import byte_tokenizer, shape_config
from configs.schema import RouterConfig

HISTORY = (("draft", "3 * 4 = 12."), ("target", "2 + 12 = 14."))


def _requests():
    return [
        RouterRequest("What is 2 + 3 * 4?", (), "First, 3 * 4 = 12."),
        RouterRequest("What is 2 + 3 * 4?", HISTORY, "The answer is \\boxed{14}."),
        RouterRequest("Compute 7 - 5.", (("target", "7 - 5 = 2."),), "So the answer is 2."),
        RouterRequest("What is 2 + 3 * 4?", HISTORY, "The answer is \\boxed{15}, I think."),
    ]


def _close(a, b, tol=1e-5):
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def router():
    from transformers import AutoModelForSequenceClassification

    cfg = shape_config("tiny-llama", num_labels=2)
    cfg.initializer_range = 0.3
    torch.manual_seed(0)
    return ClassifierRouter(AutoModelForSequenceClassification.from_config(cfg), byte_tokenizer(), max_length=256)


def test_format_router_input_exact():
    text = format_router_input("What is 2 + 3 * 4?", HISTORY, "The answer is 14.")
    assert text == (
        "What is 2 + 3 * 4?\nModel 0: 3 * 4 = 12.\n\nModel 1: 2 + 12 = 14.\n\nModel 0: The answer is 14.\n\n"
    )
    assert format_router_input("P", (), "c") == "P\nModel 0: c\n\n"
    with pytest.raises(ValueError):
        format_router_input("P", (("human", "x"),), "c")


def test_encode_router_input_appends_the_step_id_after_each_piece(router):
    tok = router.tokenizer
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    sid = enc("\n\n")[-1]
    ids, positions = encode_router_input(tok, "P", HISTORY, "c")
    want = (
        enc("P\n")
        + enc("Model 0: 3 * 4 = 12.")
        + [sid]
        + enc("Model 1: 2 + 12 = 14.")
        + [sid]
        + enc("Model 0: c")
        + [sid]
    )
    assert ids == want and router.encode(RouterRequest("P", HISTORY, "c")) == want
    assert positions == [i for i, t in enumerate(ids) if t == sid and i > len(enc("P\n")) - 1]
    assert positions[-1] == len(ids) - 1 and router.step_token_id == sid


def test_probabilities_in_range_and_forward_calls(router):
    before = router.forward_calls
    probs = router.predict(_requests())
    assert router.forward_calls == before + 1
    assert len(probs) == 4 and all(0.0 <= p <= 1.0 for p in probs)
    assert abs(probs[1] - probs[3]) > 1e-4  # the candidate matters
    assert router.predict([]) == [] and router.forward_calls == before + 1


def test_batched_equals_alone(router):
    reqs = _requests()
    batched = router.predict(reqs)
    alone = [router.predict([r])[0] for r in reqs]
    assert _close(batched, alone)


def test_prob_is_softmax_class1_of_unpadded_input(router):
    req = _requests()[1]
    ids, _ = encode_router_input(router.tokenizer, req.problem, req.history, req.candidate)
    with torch.no_grad():
        logits = router.model(input_ids=torch.tensor([ids])).logits[0]
    assert router.predict([req])[0] == pytest.approx(torch.softmax(logits, -1)[1].item(), abs=1e-6)


def test_truncation_drops_the_oldest_steps_and_keeps_problem_and_candidate(router):
    history = tuple(("draft" if i % 2 else "target", f"Earlier step {i} with some words.") for i in range(40))
    req = RouterRequest("A long problem statement.", history, "CANDIDATE STEP")
    ids = router.encode(req)
    assert router.max_length - 40 < len(ids) <= router.max_length
    text = router.tokenizer.decode(ids)
    assert text.startswith("A long problem statement.\n") and text.endswith("Model 0: CANDIDATE STEP\n")
    assert "Earlier step 39" in text and "Earlier step 0 " not in text
    assert 0.0 <= router.predict([req])[0] <= 1.0
    huge = RouterRequest("x " * 400, (), "CANDIDATE STEP")  # the problem alone is too long: cut from the left
    ids = router.encode(huge)
    assert len(ids) == router.max_length and router.tokenizer.decode(ids).endswith("Model 0: CANDIDATE STEP\n")


def test_save_load_round_trip(router, tmp_path):
    router.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "config.json").exists()
    loaded = ClassifierRouter.from_pretrained(tmp_path, max_length=router.max_length)
    assert loaded.model.config.num_labels == 2
    assert loaded.predict(_requests()) == router.predict(_requests())


def test_token_classifier_router_uses_last_token(tmp_path):
    from transformers import AutoModelForTokenClassification

    cfg = shape_config("tiny-qwen2", num_labels=2)
    torch.manual_seed(0)
    r = ClassifierRouter(AutoModelForTokenClassification.from_config(cfg), byte_tokenizer())
    reqs = _requests()
    batched = r.predict(reqs)
    assert _close(batched, [r.predict([q])[0] for q in reqs])
    r.save_pretrained(tmp_path)
    loaded = ClassifierRouter.from_pretrained(tmp_path)
    assert "TokenClassification" in type(loaded.model).__name__
    assert _close(loaded.predict(reqs), batched, tol=1e-6)


def test_build_router(tmp_path, router):
    r = build_router(RouterConfig(source={"kind": "random", "name": "tiny-llama"}, device="cpu", max_length=128))
    assert isinstance(r, ClassifierRouter) and r.max_length == 128
    assert all(0.0 <= p <= 1.0 for p in r.predict(_requests()))
    router.save_pretrained(tmp_path)
    from_path = build_router(RouterConfig(path=str(tmp_path), device="cpu", max_length=256))
    assert from_path.predict(_requests()) == router.predict(_requests())
    from_local = build_router(
        RouterConfig(source={"kind": "local", "name": str(tmp_path)}, device="cpu", max_length=256)
    )
    assert from_local.predict(_requests()) == router.predict(_requests())
    with pytest.raises(FileNotFoundError):  # a probe router folder without its files
        build_router(RouterConfig(kind="probe", path=str(tmp_path)))
