"""Batch evaluation survives a SIGKILLed driver and a damaged results file, losing no work.

`arbitrage eval` runs as a subprocess and is killed with SIGKILL once some rows are on disk;
then the results file is damaged the way a crash or a bad disk leaves it (the last line
truncated mid-write, another line overwritten with garbage) and the same command is run
again. The file must end with exactly one row per (problem, policy, threshold) cell -- none
lost, none duplicated -- and every row (the redone ones included) must equal the row of an
undisturbed run of the same sweep. The in-process variant runs by default; the Ray-backed
one (the driver of a local Ray runtime is killed) is opt-in (`slow`).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import one_chain_sweep_inputs

CLI = [sys.executable, "-m", "cluster.cli"]
CELLS = 3 * 3  # 3 problems x (draft_only, router@0.3, router@0.7)
COMPARED = (
    "final_text",
    "stop_reason",
    "answer",
    "correct",
    "draft_calls",
    "target_calls",
    "prm_calls",
    "router_calls",
    "draft_tokens",
    "target_tokens",
)


@pytest.fixture
def sweep(tmp_path):
    """A small sweep on the tiny preset, one chain at a time (so a kill lands between rows)."""
    cfg, probs = one_chain_sweep_inputs(
        tmp_path,
        "tiny_sweep",
        dict(max_steps=4, max_step_tokens=8, max_total_tokens=32),
        [{"id": f"e{i}", "problem": f"What is {i} plus 9?", "answer": str(i + 9)} for i in range(3)],
    )

    def command(out, *extra):
        return CLI + [
            "eval",
            "--config",
            str(cfg),
            "--dataset",
            str(probs),
            "--policies",
            "draft_only,router",
            "--thresholds",
            "0.3,0.7",
            "--out",
            str(out),
            *extra,
        ]

    return command


def _rows(path) -> dict[str, dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)), "duplicated rows"
    return {r["key"]: r for r in rows}


def _kill_after(cmd: list[str], results, rows: int, timeout_s: float = 600) -> None:
    """Start `cmd`, SIGKILL it once `rows` rows are on disk."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    try:
        while not results.exists() or len(results.read_bytes().splitlines()) < rows:
            assert proc.poll() is None, "the sweep ended before it could be killed"
            assert time.monotonic() < deadline, "no rows appeared"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def _damage(results) -> list[str]:
    """Truncate the last line mid-write and overwrite the first with garbage; returns their keys."""
    lines = results.read_bytes().splitlines()
    keys = [json.loads(lines[0])["key"]]
    try:  # the kill may already have cut the last line
        keys.append(json.loads(lines[-1])["key"])
    except ValueError:
        pass
    lines[0] = b'{"key": "e0|draft_on\x00\xff garbage'
    results.write_bytes(b"\n".join(lines[:-1]) + b"\n" + lines[-1][: len(lines[-1]) // 2])
    return keys


def _run(cmd: list[str]) -> None:
    """Run an `arbitrage eval` command line to completion: in this process when it is
    --in-process (no interpreter start-up), else as a subprocess (it starts its own Ray)."""
    if "--in-process" in cmd:
        from typer.testing import CliRunner

        from cluster.cli import app

        result = CliRunner().invoke(app, cmd[len(CLI) :])
        assert result.exit_code == 0, (result.output[-2000:], result.exception)
    else:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("mode", ["in-process", pytest.param("ray", marks=pytest.mark.slow)])
def test_sigkilled_sweep_and_damaged_file_rerun_equal_an_undisturbed_sweep(sweep, tmp_path, mode):
    extra = ["--in-process"] if mode == "in-process" else []
    _run(sweep(tmp_path / "ref", "--in-process"))
    reference = _rows(tmp_path / "ref" / "results.jsonl")
    assert len(reference) == CELLS

    out = tmp_path / "run"
    results = out / "results.jsonl"
    _kill_after(sweep(out, *extra), results, rows=3)
    killed_at = len(results.read_bytes().splitlines())
    assert 3 <= killed_at < CELLS, killed_at
    damaged = _damage(results)

    _run(sweep(out, *extra))
    rows = _rows(results)  # one row per cell: none lost, none duplicated
    assert sorted(rows) == sorted(reference)
    for key, row in rows.items():
        assert [s["text"] for s in row["steps"]] == [s["text"] for s in reference[key]["steps"]], key
        assert {k: row[k] for k in COMPARED} == {k: reference[key][k] for k in COMPARED}, key
    assert set(damaged) <= set(rows)  # the corrupt and the truncated rows were redone
