"""Answer extraction (last complete \\boxed{}) and math-verify equivalence."""

from __future__ import annotations

import threading

import pytest

from arbitrage.grading import extract_answer, extract_boxed, is_correct


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so the answer is \\boxed{18}.", "18"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\left\\{ 1, 2 \\right\\}}", "\\left\\{ 1, 2 \\right\\}"),
        ("first \\boxed{3} then \\boxed{ 4 }", "4"),
        ("\\boxed{\\boxed{5}}", "\\boxed{5}"),
        ("\\fbox{7}", "7"),
        ("$\\boxed 9$", "9"),
        ("\\boxed{1} then a truncated \\boxed{2", "1"),
        ("no box here: 18", None),
        ("\\boxed{", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_answer_needs_a_box():
    assert extract_answer("The answer is 18.") is None
    assert extract_answer("Thus \\boxed{18}") == "18"


@pytest.mark.parametrize(
    "pred, ref",
    [
        ("18", "18"),
        ("18.0", "18"),
        ("\\$18", "18"),
        ("\\frac{1}{2}", "0.5"),
        ("0.5", "\\frac{1}{2}"),
        ("\\dfrac12", "\\frac{1}{2}"),
        ("1,000", "1000"),
        ("1000", "1,000"),
        ("1,450,000", "1450000"),
        ("(3,\\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("x = 5", "5"),
        ("10\\%", "10"),
        ("\\text{(C)}", "\\text{(C)}"),
    ],
)
def test_equivalent_forms(pred, ref):
    assert is_correct(f"Some work.\n\nSo the answer is \\boxed{{{pred}}}.", ref)


@pytest.mark.parametrize("pred, ref", [("19", "18"), ("\\frac{1}{3}", "0.5"), ("100", "1,000"), ("", "1")])
def test_wrong_answers(pred, ref):
    assert not is_correct(f"\\boxed{{{pred}}}", ref)


def test_missing_box_is_wrong():
    assert not is_correct("The answer is 18.", "18")
    assert not is_correct("", "18")


def test_last_box_wins():
    assert is_correct("Maybe \\boxed{17}? No: \\boxed{18}", "18")
    assert not is_correct("\\boxed{18} ... actually \\boxed{17}", "18")


def test_never_raises_on_garbage():
    assert not is_correct("\\boxed{\\frac{{}", "18")
    assert not is_correct("\\boxed{18}", "")
    assert not is_correct("\\boxed{\\unknowncommand^^}", "\\frac{1}{2")


def test_works_in_worker_threads():
    results = []
    t = threading.Thread(target=lambda: results.append(is_correct("\\boxed{\\frac{1}{2}}", "0.5")))
    t.start()
    t.join()
    assert results == [True]
