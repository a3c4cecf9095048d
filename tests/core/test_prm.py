"""PRMs on tiny random models: Skywork format, Qwen2.5-Math-PRM format, LLM judge."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from arbitrage.engine import HFStepEngine
from arbitrage.prm import (
    JudgePRM,
    PRMRequest,
    QwenMathPRM,
    QwenPRMModel,
    SkyworkPRM,
    SkyworkPRMModel,
    build_prm,
    load_prm_model,
)
from arbitrage.tiny import byte_tokenizer, random_causal_lm, shape_config

PROBLEM = "What is 2 + 3 * 4?"
STEPS = ("First, 3 * 4 = 12.", "Then 2 + 12 = 14.", "The answer is \\boxed{14}.")


def _close(a, b, tol=1e-5):
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def _requests():
    return [
        PRMRequest(PROBLEM, STEPS[:1]),
        PRMRequest(PROBLEM, STEPS),
        PRMRequest("Compute 7 - 5.", ("7 - 5 = 2.",)),
        PRMRequest(PROBLEM, STEPS[:2] + ("Then 2 + 12 = 15, a longer and wrong step.",)),
    ]


def _tiny_config(**kw):
    cfg = shape_config("tiny-qwen2", **kw)
    cfg.initializer_range = 0.3  # large enough that different inputs give visibly different scores
    return cfg


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def skywork(tok):
    torch.manual_seed(0)
    return SkyworkPRM(SkyworkPRMModel(_tiny_config()), tok)


@pytest.fixture(scope="module")
def qwen_tc(tok):
    from transformers import Qwen2ForTokenClassification

    torch.manual_seed(0)
    return QwenMathPRM(Qwen2ForTokenClassification(_tiny_config(num_labels=2)), tok)


# ---- Skywork ---------------------------------------------------------------------------


def test_skywork_encode_follows_prepare_input(skywork, tok):
    ids, positions = skywork.encode(PRMRequest(PROBLEM, STEPS))
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    step_id = enc("\n\n")[-1]  # the default step token is the authors' "\n\n"
    assert skywork.step_token == "\n\n" and skywork.step_token_id == step_id
    expected = enc("<|endoftext|>" + PROBLEM + "\n")
    for s in STEPS:
        expected += enc(s) + [step_id]
    assert ids == expected
    assert ids[0] == tok.bos_token_id
    assert len(positions) == len(STEPS) and positions[-1] == len(ids) - 1
    assert all(ids[p] == step_id for p in positions)


def test_skywork_step_with_the_step_token_inside_is_cut_as_prepare_input_cuts_it(skywork, tok):
    """prepare_input splits the whole response at the step token: a step holding one becomes two pieces."""
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    ids, positions = skywork.encode(PRMRequest(PROBLEM, ("a\n\nb", "c")))
    sid = skywork.step_token_id
    assert ids == enc("<|endoftext|>" + PROBLEM + "\n") + enc("a") + [sid] + enc("b") + [sid] + enc("c") + [sid]
    assert positions == [len(ids) - 3, len(ids) - 1]  # a step's reward is read after its last piece


def test_skywork_step_token_is_a_config_field(tok):
    from configs.schema import PRMConfig

    cfg = PRMConfig(kind="skywork", source={"kind": "random", "name": "tiny-qwen2"}, device="cpu")
    assert cfg.step_token == "\n\n"
    newline = build_prm(cfg.model_copy(update={"step_token": "\n"}))
    ids, positions = newline.encode(PRMRequest(PROBLEM, STEPS))
    assert newline.step_token_id == tok.encode("\n", add_special_tokens=False)[-1]
    assert all(ids[p] == newline.step_token_id for p in positions)


def test_skywork_scores_in_range_and_depend_on_last_step(skywork):
    scores = skywork.score(_requests())
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert abs(scores[1] - scores[3]) > 1e-4  # same context, different last step


def test_skywork_batched_equals_alone(skywork):
    reqs = _requests()
    batched = skywork.score(reqs)
    alone = [skywork.score([r])[0] for r in reqs]
    assert _close(batched, alone)


def test_skywork_forward_calls(skywork):
    before = skywork.forward_calls
    skywork.score(_requests())
    skywork.score(_requests()[:1])
    assert skywork.forward_calls == before + 2
    assert skywork.score([]) == [] and skywork.forward_calls == before + 2


def test_skywork_value_is_sigmoid_of_head_at_last_step_token(skywork):
    req = PRMRequest(PROBLEM, STEPS)
    ids, _ = skywork.encode(req)
    with torch.no_grad():
        values = skywork.model(torch.tensor([ids]))
    assert skywork.score([req])[0] == pytest.approx(torch.sigmoid(values[0, -1]).item(), abs=1e-6)


def test_skywork_save_load_round_trip_real_key_names(skywork, tmp_path):
    skywork.model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert {"v_head.summary.weight", "v_head.summary.bias", "model.embed_tokens.weight", "model.norm.weight"} <= keys
    assert all(k.startswith(("model.", "v_head.")) for k in keys)
    loaded = SkyworkPRM(SkyworkPRMModel.from_pretrained(tmp_path), skywork.tokenizer)
    assert loaded.score(_requests()) == skywork.score(_requests())


def test_skywork_loads_released_layout_with_lm_head(tok, tmp_path):
    """The released checkpoint is the causal LM's state dict (lm_head included) + v_head.*."""
    from transformers import Qwen2ForCausalLM

    cfg = _tiny_config()
    torch.manual_seed(3)
    lm = Qwen2ForCausalLM(cfg).eval()
    state = {k: v.contiguous() for k, v in lm.state_dict().items()}
    state["v_head.summary.weight"] = torch.randn(1, cfg.hidden_size)
    state["v_head.summary.bias"] = torch.tensor([0.25])
    cfg.architectures = ["Qwen2ForPrmModel"]
    cfg.save_pretrained(tmp_path)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})

    model = SkyworkPRMModel.from_pretrained(tmp_path)
    ids = torch.tensor([SkyworkPRM(model, tok).encode(PRMRequest(PROBLEM, STEPS))[0]])
    with torch.no_grad():
        h = lm.model(input_ids=ids).last_hidden_state
        want = h @ state["v_head.summary.weight"].T + 0.25
        got = model(ids)
    assert torch.allclose(got, want.squeeze(-1), atol=1e-5)


# ---- Qwen2.5-Math-PRM -------------------------------------------------------------------


def test_qwen_render_and_step_positions(qwen_tc, tok):
    req = PRMRequest(PROBLEM, STEPS)
    text = qwen_tc.render(req)
    assert text == (
        "<|im_start|>system\nPlease reason step by step, and put your final answer within "
        "\\boxed{}.<|im_end|>\n<|im_start|>user\n" + PROBLEM + "<|im_end|>\n"
        "<|im_start|>assistant\n" + "<extra_0>".join(STEPS) + "<extra_0><|im_end|>\n"
    )
    ids, positions = qwen_tc.encode(req)
    assert qwen_tc.step_token_id == tok.convert_tokens_to_ids("<extra_0>")
    assert len(positions) == len(STEPS) == ids.count(qwen_tc.step_token_id)


def test_qwen_scores_in_range_batched_equals_alone(qwen_tc):
    reqs = _requests()
    before = qwen_tc.forward_calls
    batched = qwen_tc.score(reqs)
    assert qwen_tc.forward_calls == before + 1
    alone = [qwen_tc.score([r])[0] for r in reqs]
    assert qwen_tc.forward_calls == before + 1 + len(reqs)
    assert all(0.0 <= s <= 1.0 for s in batched)
    assert _close(batched, alone)
    assert abs(batched[1] - batched[3]) > 1e-4


def test_qwen_score_is_softmax_at_last_extra0(qwen_tc):
    req = PRMRequest(PROBLEM, STEPS)
    ids, positions = qwen_tc.encode(req)
    with torch.no_grad():
        logits = qwen_tc.model(input_ids=torch.tensor([ids])).logits[0, positions[-1]]
    assert qwen_tc.score([req])[0] == pytest.approx(torch.softmax(logits, -1)[1].item(), abs=1e-6)


def test_qwen_prm_model_round_trip_real_key_names(tok, tmp_path):
    torch.manual_seed(0)
    prm = QwenMathPRM(QwenPRMModel(_tiny_config()), tok)
    prm.model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert {"score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias"} <= keys
    loaded = QwenMathPRM(load_prm_model("qwen_prm", tmp_path), tok)
    assert isinstance(loaded.model, QwenPRMModel)
    scores = prm.score(_requests())
    assert loaded.score(_requests()) == scores
    assert all(0.0 <= s <= 1.0 for s in scores)


def test_qwen_token_classifier_checkpoint_loads(qwen_tc, tmp_path):
    qwen_tc.model.save_pretrained(tmp_path)
    loaded = QwenMathPRM(load_prm_model("qwen_prm", tmp_path), qwen_tc.tokenizer)
    assert _close(loaded.score(_requests()), qwen_tc.score(_requests()), tol=1e-6)


def test_long_history_drops_oldest_steps_keeps_last(qwen_tc):
    many = tuple(f"Step number {i} says something long enough." for i in range(30))
    req = PRMRequest(PROBLEM, many)
    short = QwenMathPRM(qwen_tc.model, qwen_tc.tokenizer, max_length=300)
    from arbitrage.prm import _fit

    ids, positions = _fit(short.encode, req, 300)
    assert len(ids) <= 300 and positions
    assert ids[positions[-1]] == short.step_token_id
    assert 0.0 <= short.score([req])[0] <= 1.0


def test_empty_steps_rejected(skywork):
    with pytest.raises(ValueError):
        skywork.score([PRMRequest(PROBLEM, ())])


# ---- judge --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def judge(tok):
    return JudgePRM(random_causal_lm("tiny-llama", seed=5, init_std=0.3), tok)


def test_judge_score_is_digit_expectation(judge, tok):
    req = PRMRequest(PROBLEM, STEPS)
    prompt = judge.render(req)
    assert prompt.endswith("<|im_start|>assistant\nRating: ")
    assert f"Step {len(STEPS)}: " + STEPS[-1] in prompt and f"Rate step {len(STEPS)}," in prompt
    assert "Step 1: " + STEPS[0] in prompt
    ids = tok.encode(prompt, add_special_tokens=False)
    with torch.no_grad():
        logits = judge.model(input_ids=torch.tensor([ids])).logits[0, -1]
    digit_ids = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    assert judge.digit_ids == digit_ids
    p = torch.softmax(logits[digit_ids], -1)
    want = float((p * torch.arange(10.0)).sum() / 9)
    before = judge.forward_calls
    got = judge.score([req])[0]
    assert judge.forward_calls == before + 1
    assert 0.0 <= got <= 1.0
    assert got == pytest.approx(want, abs=1e-6)


def test_judge_batched_equals_alone(judge):
    reqs = _requests()
    batched = judge.score(reqs)
    alone = [judge.score([r])[0] for r in reqs]
    assert all(0.0 <= s <= 1.0 for s in batched)
    assert _close(batched, alone)


# ---- build_prm ---------------------------------------------------------------------------


def test_build_prm_from_config(tok):
    from configs.schema import PRMConfig

    src = {"kind": "random", "name": "tiny-qwen2"}
    sky = build_prm(PRMConfig(kind="skywork", source=src, device="cpu"))
    qwen = build_prm(PRMConfig(kind="qwen_prm", source=src, device="cpu"))
    assert isinstance(sky, SkyworkPRM) and isinstance(sky.model, SkyworkPRMModel)
    assert isinstance(qwen, QwenMathPRM) and isinstance(qwen.model, QwenPRMModel)
    for prm in (sky, qwen):
        assert all(0.0 <= s <= 1.0 for s in prm.score(_requests()))

    engine = HFStepEngine(random_causal_lm("tiny-llama", seed=1), tok, max_context=1024)
    judge_cfg = PRMConfig(kind="judge", source=src, reuse_target=True, device="cpu")
    judge = build_prm(judge_cfg, target_engine=engine)
    assert isinstance(judge, JudgePRM) and judge.model is engine.model
    with pytest.raises(ValueError, match="target engine"):
        build_prm(judge_cfg)


def test_judge_on_engine_reuses_chain_kv_and_matches_plain_judge():
    from arbitrage.engine import HFStepEngine
    from arbitrage.prm import JudgePRM, PRMRequest
    from arbitrage.tiny import byte_tokenizer, random_causal_lm

    model, tok = random_causal_lm("tiny-llama-wide", seed=5), byte_tokenizer()
    engine = HFStepEngine(model, tok)
    on_engine, plain = JudgePRM.from_engine(engine), JudgePRM(model, tok)
    steps = ("First we add.", "Then we multiply.", "So the answer is 4.")
    for k in range(1, len(steps) + 1):
        req = PRMRequest("What is 2+2?", steps[:k], chain_id="c0")
        a, b = on_engine.score([req])[0], plain.score([req])[0]
        assert abs(a - b) < 1e-4
    assert engine.reused_tokens > 0
