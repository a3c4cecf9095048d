"""Batch evaluation: one row per (problem, policy, threshold), resume after a kill, repair bad lines."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from cluster.evaluate import load_results, row_key, sweep_groups
from tests.conftest import one_chain_sweep_inputs

CLI = [sys.executable, "-m", "cluster.cli"]


@pytest.fixture
def slow_tiny(tmp_path):
    """The tiny preset, one chain at a time, so a run can be killed between rows."""
    return one_chain_sweep_inputs(
        tmp_path,
        "slow_tiny",
        dict(max_steps=6, max_step_tokens=16, max_total_tokens=96),
        [{"id": f"q{i}", "problem": f"What is {i} times 7?", "answer": str(7 * i)} for i in range(6)],
    )


def _eval(cfg, probs, out, *extra):
    return CLI + [
        "eval",
        "--config",
        str(cfg),
        "--dataset",
        str(probs),
        "--policies",
        "draft_only,router,rsd",
        "--thresholds",
        "0.3,0.7",
        "--out",
        str(out),
        "--in-process",
        *extra,
    ]


def _keys(out):
    lines = (out / "results.jsonl").read_text().splitlines()
    return [json.loads(line)["key"] for line in lines]


def test_sweep_groups():
    gs = sweep_groups(["draft_only", "rsd", "target_only"], [0.2, 0.5])
    assert [g.label for g in gs] == ["draft_only", "rsd@0.2", "rsd@0.5", "target_only"]


def test_thresholds_per_policy():
    from cluster.cli import _thresholds

    taus = _thresholds("rsd=0.65,0.7; router=0.45")
    assert taus == {"rsd": [0.65, 0.7], "router": [0.45]}
    gs = sweep_groups(["draft_only", "rsd", "router"], taus)
    assert [g.label for g in gs] == ["draft_only", "rsd@0.65", "rsd@0.7", "router@0.45"]
    with pytest.raises(ValueError, match="oracle"):
        sweep_groups(["oracle"], taus)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        _thresholds("rsd=1.5")


def test_explicit_groups_in_run_order():
    from cluster.evaluate import parse_groups

    gs = parse_groups("rsd@0.65, router@0.55,draft_only,rsd@0.65")
    assert [g.label for g in gs] == ["rsd@0.65", "router@0.55", "draft_only"]
    for bad in ("rsd", "rsd@1.5", "nope@0.5", ""):
        with pytest.raises(ValueError, match="--groups"):
            parse_groups(bad)


def test_one_row_per_cell_then_resume_is_a_no_op(slow_tiny, tmp_path):
    cfg, probs = slow_tiny
    out = tmp_path / "run"
    r = subprocess.run(_eval(cfg, probs, out), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    keys = _keys(out)
    expected = {
        row_key(f"q{i}", p, t)
        for i in range(6)
        for p, t in [("draft_only", 0.0), ("router", 0.3), ("router", 0.7), ("rsd", 0.3), ("rsd", 0.7)]
    }
    assert sorted(keys) == sorted(expected)
    assert (out / "report.md").exists() and (out / "accuracy_vs_acceptance.png").stat().st_size > 1000
    # the step cache is on by default: rsd and router reuse draft_only's first steps
    assert "## Step cache" in (out / "report.md").read_text() and "model calls answered from cache" in r.stdout
    segs = [json.loads(line) for line in (out / "segments.jsonl").read_text().splitlines()]
    assert sum(s["cache"]["hits"].get("draft", 0) for s in segs) >= 6
    r = subprocess.run(_eval(cfg, probs, out), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and sorted(_keys(out)) == sorted(expected)


def test_kill_midway_then_rerun_has_no_lost_or_duplicate_rows(slow_tiny, tmp_path):
    cfg, probs = slow_tiny
    out = tmp_path / "run"
    proc = subprocess.Popen(_eval(cfg, probs, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = out / "results.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not results.exists() or len(results.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(_keys(out))
    assert 3 <= partial < 30, partial  # killed midway
    r = subprocess.run(_eval(cfg, probs, out), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    keys = _keys(out)
    assert len(keys) == len(set(keys)) == 30


def test_truncated_and_corrupt_lines_are_dropped_and_redone(tmp_path):
    path = tmp_path / "results.jsonl"
    good = {"key": "a|rsd|0.5", "policy": "rsd", "threshold": 0.5, "stop_reason": "answer"}
    errored = {"key": "b|rsd|0.5", "policy": "rsd", "threshold": 0.5, "stop_reason": "error"}
    path.write_text(json.dumps(good) + "\n" + "{not json}\n" + json.dumps(errored) + "\n" + '{"key": "c|rs')
    rows = load_results(path)
    assert list(rows) == ["a|rsd|0.5"]  # corrupt, errored and truncated rows will be redone
    assert path.read_text() == json.dumps(good) + "\n"  # file repaired in place


def test_bad_arguments_exit_2(tmp_path):
    r = subprocess.run(
        CLI + ["eval", "--config", "tiny", "--policies", "rsd,bogus", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "unknown policy 'bogus'" in r.stderr
    r = subprocess.run(CLI + ["report", str(tmp_path / "nothing")], capture_output=True, text=True)
    assert r.returncode == 2 and "no results" in r.stderr
