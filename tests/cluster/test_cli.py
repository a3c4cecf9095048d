"""The `arbitrage` CLI: a real run on tiny models, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "cluster.cli"]


def _cli(*args, timeout=300):
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def problems_file(tmp_path):
    p = tmp_path / "probs.jsonl"
    p.write_text("\n".join(json.dumps({"id": f"t{i}", "problem": f"What is {i}+1?", "answer": str(i + 1)})
                           for i in range(3)) + "\n")
    return p


def test_run_in_process_prints_results_and_summary(tmp_path, problems_file):
    out = tmp_path / "traces.jsonl"
    r = _cli("run", "--config", "tiny", "--in-process", "--policy", "router", "--threshold", "0.5",
             "--dataset", str(problems_file), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "[3/3]" in r.stdout and "arbitrage summary" in r.stdout and "router" in r.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["problem_id"] for r in rows) == ["t0", "t1", "t2"]
    assert all(r["steps"] and r["policy"] == "router" for r in rows)


def _one_line_exit_2(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("config=")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_inputs_exit_2_with_one_line(tmp_path, problems_file):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("models: [unclosed")
    _one_line_exit_2(_cli("run", "--config", str(bad_yaml)), "malformed YAML")
    _one_line_exit_2(_cli("run", "--config", "tiny", "--policy", "nope"), "policy.name")
    _one_line_exit_2(_cli("run", "--config", "tiny", "--threshold", "1.5"), "policy.threshold")
    _one_line_exit_2(_cli("run", "--config", str(tmp_path / "missing.yaml")), "not found")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _one_line_exit_2(_cli("run", "--config", "tiny", "--dataset", str(empty)), "empty")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"problem": "x", "answer": "1"}\n{not json\n')
    _one_line_exit_2(_cli("run", "--config", "tiny", "--dataset", str(broken)), "broken.jsonl:2: malformed JSON")


def test_missing_model_file_exit_2(tmp_path, problems_file):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "models:\n"
        "  draft: {source: {kind: local, name: /nonexistent/model}}\n"
        "  target: {source: {kind: random, name: tiny-llama}}\n"
        "policy: {name: draft_only}\n")
    _one_line_exit_2(_cli("run", "--config", str(cfg), "--in-process", "--dataset", str(problems_file)),
                     "/nonexistent/model")
