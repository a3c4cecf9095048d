"""Monte-Carlo step values (`arbitrage.label`): exact on a scripted model, ties, resumability, reference check."""

from __future__ import annotations

import asyncio
import json

import pytest

from arbitrage.label import (
    ROLLOUT_SEED_STRIDE,
    LabelSettings,
    label_rows,
    label_statistics,
    read_labelled,
    reference_check,
    rollouts_path,
)
from arbitrage.loop import LoopSettings, run_chains
from arbitrage.policies import make_policy
from arbitrage.types import StepOutput


class ScriptedDraft:
    """Completions whose correctness is known: after a step containing "good", rollouts j = 0..2
    of every 4 reach the answer 4; after "bad", only rollout 0 does."""

    def __init__(self):
        self.calls = 0

    async def draft_step(self, req):
        self.calls += 1
        j = req.params.seed // ROLLOUT_SEED_STRIDE - 1  # the rollout index the label module seeded
        good = "good" in req.steps[-1]
        right = (j % 4 < 3) if good else (j % 4 == 0)
        text = f"So the answer is \\boxed{{{4 if right else 5}}}."
        return StepOutput(text=text, num_tokens=6, logprobs=[-0.1] * 6, stop_reason="separator")

    def step_cache(self):
        raise AssertionError("rollouts sample: no step cache")


def _row(pid: str, i: int, draft: str, target: str, history=()):
    return {
        "problem_id": pid,
        "step_index": i,
        "num_steps": 3,
        "problem": "2 + 2?",
        "reference": "4",
        "correct": True,
        "history": [list(h) for h in history],
        "draft": draft,
        "draft_tokens": 5,
        "targets": [{"text": target, "score": 0.5, "num_tokens": 5, "sampled": False}],
        "author": "draft",
    }


def _runner(backend):
    def run(items, on_result):
        s = LoopSettings(temperature=0.7, max_steps=8, max_total_tokens=200, seed=0)
        asyncio.run(
            run_chains(
                items,
                backend,
                make_policy("draft_only"),
                s,
                max_concurrent=8,
                on_result=lambda r: on_result(r.to_dict()),
            )
        )

    return run


def test_values_are_exact_on_a_scripted_model(tmp_path):
    rows = [
        _row("p1", 0, "a bad step", "a good step"),
        _row("p1", 1, "good again", "bad again", history=[("draft", "a bad step")]),
    ]
    backend = ScriptedDraft()
    stats = label_rows(rows, tmp_path / "labels.jsonl", LabelSettings(k=8), _runner(backend))
    assert stats["labelled"] == 2 and stats["rollouts"] == 4 * 8 == backend.calls
    got = {r["step_index"]: r for r in read_labelled(tmp_path / "labels.jsonl").values()}
    assert (got[0]["v_draft"], got[0]["v_target"], got[0]["a_mc"]) == (2 / 8, 6 / 8, 0.5)
    assert (got[1]["v_draft"], got[1]["v_target"], got[1]["a_mc"]) == (6 / 8, 2 / 8, -0.5)
    assert not got[0]["tie"] and got[0]["mc_k"] == 8
    # every rollout is kept, with the steps it wrote and its grade (outcome-labelled prefixes)
    rolls = [json.loads(x) for x in rollouts_path(tmp_path / "labels.jsonl").read_text().splitlines()]
    assert len(rolls) == 32 and {r["unit"] for r in rolls} == {"p1@0/draft", "p1@0/target", "p1@1/draft", "p1@1/target"}
    good = [r for r in rolls if r["unit"] == "p1@0/target"]
    assert sum(r["correct"] for r in good) == 6 and all(r["steps"][0].startswith("So the answer") for r in good)


def test_ties_share_one_value_and_answers_are_graded_directly(tmp_path):
    rows = [
        _row("p2", 0, "same good text", "same good text"),
        _row("p2", 1, "So \\boxed{4}.", "So \\boxed{7}.", history=[("draft", "same good text")]),
    ]
    backend = ScriptedDraft()
    label_rows(rows, tmp_path / "l.jsonl", LabelSettings(k=4), _runner(backend))
    got = {r["step_index"]: r for r in read_labelled(tmp_path / "l.jsonl").values()}
    assert got[0]["tie"] and got[0]["a_mc"] == 0.0 and got[0]["v_draft"] == got[0]["v_target"] == 0.75
    assert backend.calls == 4  # one unit for the tie; the boxed steps need no rollout
    assert (got[1]["v_draft"], got[1]["v_target"]) == (1.0, 0.0)
    assert got[1]["mc_direct"] == {"draft": True, "target": True}
    st = label_statistics(got.values())
    assert st["ties"] == 1 and st["tie_share"] == 0.5


def test_labelling_resumes_and_drops_a_torn_line(tmp_path):
    rows = [_row("p3", 0, "a good step", "a bad step"), _row("p4", 0, "bad", "good")]
    out = tmp_path / "l.jsonl"
    backend = ScriptedDraft()
    label_rows(rows[:1], out, LabelSettings(k=4), _runner(backend))
    with out.open("a") as f:
        f.write('{"problem_id": "p4", "step_ind')  # a write cut off by a crash
    stats = label_rows(rows, out, LabelSettings(k=4), _runner(backend))
    assert stats["done_before"] == 1 and stats["labelled"] == 1
    assert len(out.read_text().splitlines()) == 2
    assert all(json.loads(line)["problem_id"] in ("p3", "p4") for line in out.read_text().splitlines())
    again = label_rows(rows, out, LabelSettings(k=4), _runner(backend))
    assert again["labelled"] == 0 and again["rollouts"] == 0


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="--k"):
        LabelSettings(k=0)
    with pytest.raises(ValueError, match="--temperature"):
        LabelSettings(temperature=0.0)


def test_reference_check_reads_gsm8k_annotations():
    solution = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
    assert reference_check("In May she sold 48 / 2 = 24 clips.", solution, "72") == {
        "equations": 1,
        "arith_ok": True,
        "matches_ref": True,
    }
    assert reference_check("Altogether 48 + 24 = 70 clips.", solution, "72")["arith_ok"] is False
    assert reference_check("She sold 2 x 10 = 20 pens.", solution, "72") == {
        "equations": 1,
        "arith_ok": True,
        "matches_ref": False,
    }
    assert reference_check("Let us think about the clips.", solution, "72")["arith_ok"] is None
