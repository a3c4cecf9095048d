"""The authors' input formats on the real Qwen2.5 tokenizer (the packaged Qwen2.5-Coder's, offline):
exact token ids and reward positions of the Skywork PRM and of the router; a Qwen2 token-classification
router read at the last step token (271), beside a sequence classifier read at the same position;
a missing preset router fails in one line with the commands that make it."""

from __future__ import annotations

import json

import pytest
import torch

from arbitrage.prm import PRMRequest, SkyworkPRM, SkyworkPRMModel
from arbitrage.router import ClassifierRouter, RouterRequest, encode_router_input
from arbitrage.router_factory import build_router
from arbitrage.tiny import shape_config
from configs.schema import RouterConfig

PACKAGED = "qwen2.5-coder-0.5b-instruct"
PROBLEM = "What is 2 + 3?"
HISTORY = (("draft", "2 + 3 = 5."), ("target", "So 5."))


@pytest.fixture(scope="module")
def qwen_tok():
    """The Qwen2.5 tokenizer from the packaged model: its converted folder, else read from the GGUF."""
    from transformers import AutoTokenizer

    from arbitrage import offline

    folder = offline.cache_root() / PACKAGED
    if not folder.is_dir():
        if not offline.is_installed(PACKAGED):
            pytest.skip(f"packaged {PACKAGED} not installed (make install-models)")
        folder = offline.gguf_tokenizer_dir(offline.gguf_file(PACKAGED))
    return AutoTokenizer.from_pretrained(folder)


def test_qwen_step_token_is_271(qwen_tok):
    assert qwen_tok.encode("\n\n", add_special_tokens=False) == [271]
    assert qwen_tok.encode("5.\n\n", add_special_tokens=False) == [20, 382]  # merged: why the id is appended


def test_skywork_ids_and_reward_positions_on_qwen25(qwen_tok):
    model = SkyworkPRMModel(shape_config("tiny-qwen2", vocab_size=len(qwen_tok)))
    prm = SkyworkPRM(model, qwen_tok)  # default step token: the authors' "\n\n"
    ids, positions = prm.encode(PRMRequest(PROBLEM, ("2 + 3 = 5.", "The answer is 5.")))
    bos = qwen_tok.convert_tokens_to_ids(qwen_tok.bos_token)
    assert ids == [
        bos,
        3838,
        374,
        220,
        17,
        488,
        220,
        18,
        5267,  # <bos> "What is 2 + 3?\n"
        17,
        488,
        220,
        18,
        284,
        220,
        20,
        13,
        271,  # "2 + 3 = 5." 271
        785,
        4226,
        374,
        220,
        20,
        13,
        271,
    ]  # "The answer is 5." 271
    assert positions == [17, 24] and [ids[p] for p in positions] == [271, 271]
    # the authors' call: prepare_input(problem, response, tokenizer, step_token="\n\n") over the joined response
    response = "2 + 3 = 5.\n\nThe answer is 5."
    want = qwen_tok.encode(qwen_tok.bos_token + PROBLEM + "\n")
    flags = [0] * len(want)
    for piece in response.split("\n\n"):
        step = (qwen_tok.encode(piece) if piece else []) + [qwen_tok.encode("\n\n")[-1]]
        want += step
        flags += [0] * (len(step) - 1) + [1]
    assert ids == want and positions == [i for i, f in enumerate(flags) if f]
    scores = prm.score([PRMRequest(PROBLEM, ("2 + 3 = 5.",)), PRMRequest(PROBLEM, ("2 + 3 = 6.",))])
    assert all(0 < s < 1 for s in scores)


def test_router_ids_on_qwen25(qwen_tok):
    ids, positions = encode_router_input(qwen_tok, PROBLEM, HISTORY, "The answer is 5.")
    assert ids == [
        3838,
        374,
        220,
        17,
        488,
        220,
        18,
        5267,  # "What is 2 + 3?\n"
        1712,
        220,
        15,
        25,
        220,
        17,
        488,
        220,
        18,
        284,
        220,
        20,
        13,
        271,  # "Model 0: 2 + 3 = 5." 271
        1712,
        220,
        16,
        25,
        2055,
        220,
        20,
        13,
        271,  # "Model 1: So 5." 271
        1712,
        220,
        15,
        25,
        576,
        4226,
        374,
        220,
        20,
        13,
        271,
    ]  # "Model 0: The answer is 5." 271
    assert positions == [21, 30, 41] and positions[-1] == len(ids) - 1
    # prepare_input_router(problem, annotated_response, tokenizer, "\n\n") with the authors' annotation
    annotated = "Model 0: 2 + 3 = 5.\n\nModel 1: So 5.\n\n" + "Model 0: " + "The answer is 5."
    want = qwen_tok.encode(PROBLEM + "\n")
    for piece in annotated.split("\n\n"):
        want += (qwen_tok.encode(piece) if piece else []) + [qwen_tok.encode("\n\n")[-1]]
    assert ids == want


def _token_router(qwen_tok, seed=0):
    from transformers import Qwen2ForTokenClassification

    cfg = shape_config("tiny-qwen2", vocab_size=len(qwen_tok), num_labels=2)
    cfg.initializer_range = 0.3
    cfg.pad_token_id = qwen_tok.pad_token_id
    torch.manual_seed(seed)
    return ClassifierRouter(Qwen2ForTokenClassification(cfg).eval(), qwen_tok, max_length=256)


def test_qwen2_token_classification_router_reads_the_last_step_token(qwen_tok, tmp_path):
    router = _token_router(qwen_tok)
    reqs = [
        RouterRequest(PROBLEM, HISTORY, "The answer is 5."),
        RouterRequest(PROBLEM, (), "2 + 3 = 5."),
        RouterRequest("Compute 7 - 5.", (("target", "7 - 5 = 2."),), "The answer is 2."),
    ]
    probs = router.predict(reqs)
    for req, p in zip(reqs, probs):
        ids, positions = encode_router_input(qwen_tok, req.problem, req.history, req.candidate)
        with torch.no_grad():
            logits = router.model(input_ids=torch.tensor([ids])).logits[0]  # [T, 2]
        # the authors' read: the last two values of the flattened per-token logits, softmax, index 1
        last_two = logits.flatten()[-2:]
        assert p == pytest.approx(torch.softmax(last_two, -1)[1].item(), abs=1e-5)
        assert ids[positions[-1]] == 271
    router.save_pretrained(tmp_path)
    (tmp_path / "router.json").write_text(json.dumps({"kind": "classifier", "input_format": "x"}))
    loaded = build_router(RouterConfig(path=str(tmp_path), device="cpu", max_length=256))
    assert "TokenClassification" in type(loaded.model).__name__
    assert loaded.predict(reqs) == pytest.approx(probs, abs=1e-6)


def test_sequence_classifier_pools_the_same_position(qwen_tok):
    """A decoder sequence classifier pools its last non-pad token: the same last 271."""
    from transformers import Qwen2ForSequenceClassification

    cfg = shape_config("tiny-qwen2", vocab_size=len(qwen_tok), num_labels=2)
    cfg.pad_token_id = qwen_tok.pad_token_id
    torch.manual_seed(0)
    seq = Qwen2ForSequenceClassification(cfg).eval()
    router = ClassifierRouter(seq, qwen_tok, max_length=256)
    reqs = [RouterRequest(PROBLEM, HISTORY, "The answer is 5."), RouterRequest(PROBLEM, (), "5.")]
    probs = router.predict(reqs)  # batched, left-padded
    for req, p in zip(reqs, probs):
        ids, _ = encode_router_input(qwen_tok, req.problem, req.history, req.candidate)
        with torch.no_grad():
            h = seq.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
            want = torch.softmax(seq.score(h), -1)[1].item()
        assert p == pytest.approx(want, abs=1e-5)


def test_train_router_keeps_a_token_classifier_backbone(qwen_tok, tmp_path):
    """The paper's router starts from a Qwen2 token classifier: train-router keeps that head."""
    from arbitrage.router_train import load_backbone

    src = _token_router(qwen_tok, seed=1)
    src.save_pretrained(tmp_path / "prm")
    router, info = load_backbone(str(tmp_path / "prm"), max_length=256)
    assert info["head"] == "token" and "TokenClassification" in type(router.model).__name__
    req = RouterRequest(PROBLEM, HISTORY, "5.")
    assert router.predict([req]) == pytest.approx(src.predict([req]), abs=1e-6)  # its own head, unchanged
    _, seq = load_backbone(str(tmp_path / "prm"), max_length=256, head="sequence")
    assert seq["head"] == "sequence"


def test_missing_preset_router_gives_the_commands(tmp_path):
    from arbitrage.offline import ModelNotFoundError
    from configs.schema import load_config

    cfg = load_config("llama-1b-8b")
    with pytest.raises(ModelNotFoundError) as err:
        build_router(cfg.models.router)
    msg = str(err.value)
    assert "\n" not in msg and "routers/llama-1b-8b not found" in msg
    assert (
        "arbitrage collect --config" in msg
        and "arbitrage train-router --data data/llama-1b-8b.jsonl "
        "--out routers/llama-1b-8b --backbone HuggingFaceH4/Qwen2.5-Math-1.5B-Instruct-PRM-0.2"
        in msg
    )


def test_a_router_trained_on_the_old_format_is_refused(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from arbitrage.tiny import byte_tokenizer

    cfg = shape_config("tiny-llama", num_labels=2)
    ClassifierRouter(AutoModelForSequenceClassification.from_config(cfg), byte_tokenizer()).save_pretrained(tmp_path)
    (tmp_path / "router.json").write_text(json.dumps({"kind": "classifier"}))
    with pytest.raises(ValueError, match="old input format"):
        build_router(RouterConfig(path=str(tmp_path), device="cpu"))
