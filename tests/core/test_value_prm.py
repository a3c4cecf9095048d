"""The value-head PRM: trained on labelled rows over a real llama.cpp backbone (a tiny GGUF), loaded as
`models.prm.kind: value`, and scoring a draft step from the state the draft returned equals reading it anew."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("llama_cpp", reason="llama-cpp-python (the `cpu` extra) is not installed: pip install -e '.[cpu]'")

from arbitrage.prm import PRMRequest, build_prm  # noqa: E402
from arbitrage.prm_train import examples_from_rows, train_prm  # noqa: E402
from arbitrage.tiny import write_tiny_gguf  # noqa: E402
from arbitrage.value_prm import HeadTraining, train_value_head  # noqa: E402
from configs.schema import PRMConfig, PromptConfig  # noqa: E402


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    path, _, _ = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "draft.gguf", seed=5)
    return path


def _rows(n_problems: int = 6) -> list[dict]:
    rows = []
    for p in range(n_problems):
        history = []
        for i in range(3):
            draft, target = f"step {i} of problem {p}: add {p} and {i}", f"target step {i}: {p} + {i} = {p + i}"
            rows.append(
                {
                    "problem_id": f"q{p}",
                    "step_index": i,
                    "num_steps": 3,
                    "problem": f"What is {p} + {i}?",
                    "reference": str(p + i),
                    "correct": p % 2 == 0,
                    "history": [list(h) for h in history],
                    "draft": draft,
                    "draft_tokens": 9,
                    "draft_score": 0.5,
                    "targets": [{"text": target if i != 1 else draft, "score": 0.5, "num_tokens": 9}],
                    "author": "draft" if i != 2 else "target",
                    "v_draft": 0.25 * (p % 4),
                    "v_target": 1.0 if i != 1 else 0.25 * (p % 4),
                }
            )
            history.append(("draft", draft))
    return rows


def _engine(gguf):
    from arbitrage.models import load_engine
    from configs.schema import ModelConfig

    cfg = ModelConfig(
        source={"kind": "gguf", "name": str(gguf)},
        engine="llamacpp",
        device="cpu",
        max_context=512,
        max_slots=8,
        threads=2,
        cpu_lock=False,
        hidden_states=True,
    )
    return load_engine(cfg), cfg


def test_head_fits_soft_labels():
    torch.manual_seed(0)
    x = torch.randn(200, 8)
    v = torch.sigmoid(3 * x[:, 0])
    head, fit = train_value_head(x[:150], v[:150], HeadTraining(epochs=400, lr=0.05), x[150:], v[150:])
    pred = torch.sigmoid(head(x[150:])).detach()
    assert torch.corrcoef(torch.stack([pred, v[150:]]))[0, 1] > 0.95
    assert fit["val_loss"] is not None


def test_train_prm_then_load_it_as_a_prm(gguf, tmp_path):
    rows = _rows()
    ex = examples_from_rows(rows)
    assert len(ex) == 6 * 3 * 2 - 6  # the tie (step 1) is one example
    engine, mcfg = _engine(gguf)
    try:
        report = train_prm(rows, engine, tmp_path / "head", "draft", "sys", val_fraction=0.34, seed=0, widths=(0,))
    finally:
        engine.close()
    assert report["examples"] == len(ex) and report["hidden_size"] == 64
    assert set(report["validation"]) >= {"step", "chain_auc_min_step", "judge_chain_auc_min_step"}
    scored = [json.loads(line) for line in (tmp_path / "head" / "scored.jsonl").read_text().splitlines()]
    mc = [json.loads(line) for line in (tmp_path / "head" / "mc.jsonl").read_text().splitlines()]
    assert len(scored) == len(mc) == len(rows)
    assert all(r["advantage"] == pytest.approx(r["v_target"] - r["v_draft"]) for r in mc)
    assert all(0.0 <= r["draft_score"] <= 1.0 and r["prm"].startswith("value:") for r in scored)
    assert all(len(r["draft_hidden"]) == 64 for r in scored + mc)  # for the hidden-state router
    # A_mc as the label, the trained PRM's draft score as RSD's ranking (eval-router's fair baseline)
    base = [json.loads(line) for line in (tmp_path / "head" / "mc_prm_baseline.jsonl").read_text().splitlines()]
    assert [b["draft_score"] for b in base] == [s["draft_score"] for s in scored]
    assert [b["advantage"] for b in base] == pytest.approx([m["advantage"] for m in mc])

    # the router the paper's way on these labels: started from the PRM, fitted to A, evaluated on A_mc
    from arbitrage.router_data import build_dataset, load_rows
    from arbitrage.router_train import TrainSettings, evaluate_folder, train

    ds = build_dataset(load_rows(tmp_path / "head" / "mc.jsonl"), val_fraction=0.34, seed=0)
    train(ds, tmp_path / "router", TrainSettings(kind="hidden", init_prm=str(tmp_path / "head"), probe_steps=50))
    ev = evaluate_folder(tmp_path / "router", tmp_path / "head" / "mc_prm_baseline.jsonl", split="all")
    assert ev["kind"] == "hidden" and ev["steps"] == len(rows)

    prm_cfg = PRMConfig(**{**mcfg.model_dump(), "kind": "value", "head": str(tmp_path / "head")})
    prm = build_prm(prm_cfg, prompt=PromptConfig(system_prompt="sys"))
    try:
        r = rows[4]
        req = PRMRequest(r["problem"], tuple(t for _, t in r["history"]) + (r["draft"],), chain_id="c")
        score = prm.score([req])[0]
        assert score == pytest.approx(
            next(
                s["draft_score"]
                for s in scored
                if s["step_index"] == r["step_index"] and s["problem_id"] == r["problem_id"]
            ),
            abs=1e-4,
        )
        # the vector a draft engine returns with a step is used as is: no forward pass
        calls = prm.forward_calls
        h = prm.engine.hidden_states([[1, 2, 3]], [None])[0].tolist()
        free = prm.score([PRMRequest("p", ("s",), hidden=h)])[0]
        assert prm.forward_calls == calls and prm.free_reads == 1
        assert free == pytest.approx(float(torch.sigmoid(prm.head(torch.tensor([h])))[0]), abs=1e-6)
    finally:
        prm.engine.close()


def test_generated_state_equals_reading_the_step_again(gguf):
    """The hidden state a step comes back with is the one a scoring read of the same tokens gives."""
    from arbitrage.engine_common import render_prompt
    from arbitrage.types import SamplingParams, StepRequest

    engine, _ = _engine(gguf)
    try:
        req = StepRequest(problem="What is 2 + 3?", system="sys", params=SamplingParams(max_tokens=6, forced_tokens=6))
        out = engine.generate_steps([req])[0]
        ids = engine.tokenizer(render_prompt(engine.tokenizer, req), add_special_tokens=False)["input_ids"]
        for _ in range(5):  # greedy, token by token: the first 5 tokens of the step
            ids = ids + [int(engine.next_token_logits([ids], [None])[0].argmax())]
        again = engine.hidden_states([ids], [None])[0]
        assert torch.allclose(torch.tensor(out.hidden), again, atol=1e-4)
    finally:
        engine.close()


def test_value_prm_needs_a_head(tmp_path):
    with pytest.raises(ValueError, match="models.prm.head"):
        build_prm(PRMConfig(kind="value", source={"kind": "gguf", "name": "x.gguf"}, engine="llamacpp"))
    with pytest.raises(FileNotFoundError, match="train-prm"):
        build_prm(
            PRMConfig(kind="value", head=str(tmp_path), source={"kind": "gguf", "name": "x.gguf"}, engine="llamacpp")
        )
