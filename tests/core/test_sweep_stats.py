"""Sweep statistics: matched-token comparison, bootstrap intervals, acceptance from hand-made rows."""

import pytest

from arbitrage.sweep_stats import (
    accuracy_interval,
    bootstrap_mean,
    cells_from_rows,
    common_problems,
    matched_difference,
    paired_difference,
    research_summary,
)


def _row(pid, policy, tau, correct, steps):
    """A results.jsonl row: steps are (author, num_tokens, draft_tokens, target_tokens)."""
    return {
        "problem_id": pid,
        "policy": policy,
        "threshold": tau,
        "correct": correct,
        "target_tokens": sum(s[3] for s in steps),
        "steps": [{"author": a, "num_tokens": n, "draft_tokens": d, "target_tokens": t} for a, n, d, t in steps],
    }


def _label(p, t):
    return p if p in ("draft_only", "target_only") else f"{p}@{t:g}"


def test_token_acceptance_is_kept_draft_tokens_over_generated():
    # step 1: draft 10 tokens kept; step 2: draft wrote 8, target replaced with 12; step 3: draft 5 kept
    rows = [_row("a", "router", 0.5, True, [("draft", 10, 10, 0), ("target", 12, 8, 12), ("draft", 5, 5, 0)])]
    cell = cells_from_rows(rows, _label)["router@0.5"]
    assert cell.token_acceptance(["a"]) == pytest.approx(15 / 23)
    assert cell.target_tokens["a"] == 12


def test_matched_difference_mixes_neighbours_to_the_reference_tokens():
    probs = [str(i) for i in range(4)]
    rows = []
    # router@0.7: 10 target tokens per problem, correct on 0, 1; router@0.3: 30 tokens, correct on all
    for p in probs:
        rows.append(_row(p, "router", 0.7, p in ("0", "1"), [("target", 10, 5, 10)]))
        rows.append(_row(p, "router", 0.3, True, [("target", 30, 5, 30)]))
        # rsd@0.5: 25 tokens, correct on 0 only
        rows.append(_row(p, "rsd", 0.5, p == "0", [("target", 25, 5, 25)]))
    cells = cells_from_rows(rows, _label)
    curve = [cells["router@0.7"], cells["router@0.3"]]
    m = matched_difference(curve, cells["rsd@0.5"], probs, n_boot=200)
    assert m.weight == pytest.approx(0.75)  # 10 + 0.75 * 20 = 25
    # mixture accuracy: 0.25 * 0.5 + 0.75 * 1.0 = 0.875; rsd 0.25
    assert m.accuracy == pytest.approx(0.875)
    assert m.difference[0] == pytest.approx(0.625)
    assert m.difference[1] <= m.difference[0] <= m.difference[2]
    # outside the curve's range: no extrapolation
    far = cells_from_rows([_row(p, "rsd", 0.9, True, [("target", 99, 1, 99)]) for p in probs], _label)["rsd@0.9"]
    assert matched_difference(curve, far, probs) is None


def test_bootstrap_intervals_cover_the_mean_and_shrink_with_data():
    small = bootstrap_mean([1.0, 0.0] * 10, n_boot=500)
    large = bootstrap_mean([1.0, 0.0] * 200, n_boot=500)
    assert small[0] == large[0] == 0.5
    assert small[1] < 0.5 < small[2]
    assert (large[2] - large[1]) < (small[2] - small[1])
    assert paired_difference([1, 1, 1], [1, 1, 1], n_boot=50) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        paired_difference([1], [1, 0])


def test_research_summary_uses_shared_problems_and_reports_goal_shares():
    rows = [_row(p, "target_only", 0, True, [("target", 40, 0, 40)]) for p in "abc"]
    rows += [_row(p, "router", t, p != "c", [("target", n, 5, n)]) for p in "abc" for t, n in ((0.2, 30), (0.8, 10))]
    rows += [_row(p, "rsd", 0.5, p == "a", [("target", 20, 5, 20)]) for p in "ab"]  # rsd lacks problem c
    cells = cells_from_rows(rows, _label)
    assert common_problems(cells.values()) == ["a", "b"]
    res = research_summary(cells, n_boot=100)
    assert res["problems"] == 2
    (m,) = [m for m in res["matched"] if m["baseline"] == "rsd@0.5"]
    assert m["matched"] and m["difference"] == pytest.approx(0.5)
    shares = {c["cell"]: c for c in res["goal"]["cells"]}
    assert shares["router@0.8"]["target_token_share"] == pytest.approx(0.25)
    assert shares["router@0.8"]["accuracy_share"] == pytest.approx(1.0)
    acc, lo, hi = accuracy_interval(cells["rsd@0.5"], ["a", "b"], n_boot=100)
    assert acc == 0.5 and lo <= acc <= hi


def test_draft_only_is_the_low_end_of_every_policy_curve():
    # rsd@0.9 spends 5 tokens a problem; router's only cell spends 20: without draft_only's 0-token
    # end the rsd cell lies outside router's range and cannot be matched
    probs = ["a", "b", "c", "d"]
    rows = [_row(p, "draft_only", 0, p == "a", [("draft", 10, 10, 0)]) for p in probs]
    rows += [_row(p, "router", 0.5, p in ("a", "b"), [("target", 20, 10, 20)]) for p in probs]
    rows += [_row(p, "rsd", 0.9, p == "a", [("target", 5, 10, 5)]) for p in probs]
    res = research_summary(cells_from_rows(rows, _label), baselines=("rsd",), n_boot=100)
    (m,) = res["matched"]
    assert m["matched"] and m["between"] == ["draft_only", "router@0.5"]
    assert m["weight"] == pytest.approx(0.25)
    # mixture: 0.75 * draft_only (0.25) + 0.25 * router (0.5) = 0.3125; rsd 0.25
    assert m["accuracy"] == pytest.approx(0.3125)
    assert m["difference"] == pytest.approx(0.0625)


def test_each_cell_is_compared_with_spending_its_tokens_at_random():
    # draft_only right on a; target_only right on a, b, c, d (40 tokens each); rsd spends 10
    # tokens a problem and is right on a, b: the random mix at 10 tokens is 0.75 * 0.25 + 0.25 * 1
    probs = ["a", "b", "c", "d"]
    rows = [_row(p, "draft_only", 0, p == "a", [("draft", 10, 10, 0)]) for p in probs]
    rows += [_row(p, "target_only", 0, True, [("target", 40, 0, 40)]) for p in probs]
    rows += [_row(p, "rsd", 0.3, p in ("a", "b"), [("target", 10, 10, 10)]) for p in probs]
    res = research_summary(cells_from_rows(rows, _label), baselines=(), n_boot=200)
    (v,) = res["vs_random"]
    assert v["cell"] == "rsd@0.3" and v["tokens_per_problem"] == pytest.approx(10.0)
    assert v["random_accuracy"] == pytest.approx(0.4375) and v["accuracy"] == pytest.approx(0.5)
    assert v["difference"] == pytest.approx(0.0625) and v["ci"][0] <= 0.0625 <= v["ci"][1]
    no_ends = research_summary(cells_from_rows([r for r in rows if r["policy"] != "target_only"], _label), baselines=())
    assert no_ends["vs_random"] == []


def test_research_section_leaves_out_unfinished_cells_and_titles_its_plot(tmp_path):
    import json

    from cluster.report import research_section, run_title

    probs = [str(i) for i in range(20)]
    rows = [_row(p, "draft_only", 0, p < "5", [("draft", 10, 10, 0)]) for p in probs]
    rows += [_row(p, "router", 0.5, p < "6", [("target", 20, 10, 20)]) for p in probs]
    rows += [_row(p, "rsd", 0.1, True, [("target", 20, 10, 20)]) for p in probs[:4]]  # 4 of 20: unfinished
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "data": {"dataset": "gsm8k", "split": "test"},
                "models": {"draft": {"source": {"name": "small"}}, "target": {"source": {"name": "large"}}},
            }
        )
    )
    title = run_title(tmp_path)
    assert title == "gsm8k test, small -> large"
    md, plot_path = research_section(rows, tmp_path, title=title)
    res = json.loads((tmp_path / "research.json").read_text())
    assert res["problems"] == 20  # the unfinished cell does not shrink the shared problems
    assert res["unfinished"] == {"rsd@0.1": 4}
    assert "rsd@0.1 (4 of 20 problems)" in md
    assert {c["cell"] for c in res["cells"]} == {"draft_only", "router@0.5"}
    assert plot_path.exists() and res["title"] == title
    assert run_title(tmp_path / "missing") == ""


def test_target_only_is_the_high_end_of_every_policy_curve():
    # confidence@0.5 spends 30 tokens a problem, beyond router's one cell (10): matched between
    # router@0.9 and target_only (40), the always-escalate end
    probs = ["a", "b"]
    rows = [_row(p, "target_only", 0, True, [("target", 40, 0, 40)]) for p in probs]
    rows += [_row(p, "router", 0.9, p == "a", [("target", 10, 10, 10)]) for p in probs]
    rows += [_row(p, "confidence", 0.5, p == "b", [("target", 30, 10, 30)]) for p in probs]
    res = research_summary(cells_from_rows(rows, _label), baselines=("confidence",), n_boot=50)
    (m,) = res["matched"]
    assert m["between"] == ["router@0.9", "target_only"] and m["weight"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(1 / 3 * 0.5 + 2 / 3 * 1.0)


def test_plot_lines_reach_the_ends_each_policy_threshold_stands_for():
    from cluster.report import _with_ends

    ends = {"draft_only": {"cell": "draft_only"}, "target_only": {"cell": "target_only"}}
    cs = [{"cell": "a"}, {"cell": "b"}]  # in ascending threshold order
    # router escalates above tau: its lowest threshold is nearest target_only
    assert [c["cell"] for c in _with_ends(cs, ends, "router")] == ["target_only", "a", "b", "draft_only"]
    # rsd and confidence escalate below tau: their lowest threshold is nearest draft_only
    assert [c["cell"] for c in _with_ends(cs, ends, "rsd")] == ["draft_only", "a", "b", "target_only"]
    assert [c["cell"] for c in _with_ends(cs, {"draft_only": ends["draft_only"]}, "confidence")] == [
        "draft_only",
        "a",
        "b",
    ]
