"""No traceback reaches a user: each bad input is one line and exit code 2, before Ray starts;
an unexpected exception is one line naming the log with its traceback, and exit code 1."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

CLI = [sys.executable, "-m", "cluster.cli"]
REPO = Path(__file__).resolve().parents[2]


def _cli(*args, timeout=300, env=None):
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=timeout, env=env)


def one_line_exit_2(r, *needles):
    """Exit code 2, and stderr is exactly one `error:` line (phases hidden by --log-level warning)."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def _config(tmp_path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


TINY_DRAFT_ONLY = (
    "models:\n"
    "  draft: {source: {kind: random, name: tiny-llama}, device: %s}\n"
    "  target: {source: {kind: %s, name: %s}}\n"
    "policy: {name: draft_only}\n"
)


def test_bad_inputs_exit_2_with_one_line(tmp_path):
    bad_yaml = _config(tmp_path, "models: [unclosed")
    one_line_exit_2(_cli("run", "--config", str(bad_yaml), "--log-level", "warning"), "malformed YAML")
    one_line_exit_2(_cli("run", "--config", "tiny", "--policy", "nope", "--log-level", "warning"), "policy.name")
    one_line_exit_2(_cli("run", "--config", "tiny", "--threshold", "1.5", "--log-level", "warning"), "policy.threshold")
    one_line_exit_2(_cli("run", "--config", str(tmp_path / "missing.yaml"), "--log-level", "warning"), "not found")
    one_line_exit_2(_cli("run", "--config", "tiny", "--log-level", "loud"), "--log-level")


def test_config_path_that_is_a_folder(tmp_path):
    one_line_exit_2(_cli("run", "--config", str(tmp_path), "--log-level", "warning"), str(tmp_path), "folder")


def test_config_that_is_not_utf8(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("name: caf\xe9\n".encode("latin-1"))
    one_line_exit_2(
        _cli("eval", "--config", str(p), "--out", str(tmp_path / "o"), "--log-level", "warning"), str(p), "UTF-8"
    )


def test_device_that_is_not_a_device(tmp_path):
    cfg = _config(tmp_path, TINY_DRAFT_ONLY % ("banana", "random", "tiny-llama"))
    t0 = time.monotonic()
    r = _cli("run", "--config", str(cfg), "--log-level", "warning")  # the Ray path: fails before Ray starts
    one_line_exit_2(r, "models.draft.device", "banana")
    assert time.monotonic() - t0 < 60


def test_serve_with_a_missing_model_file_fails_fast(tmp_path):
    cfg = _config(tmp_path, TINY_DRAFT_ONLY % ("cpu", "gguf", "/nonexistent/target.gguf"))
    t0 = time.monotonic()
    r = _cli("serve", "--config", str(cfg), "--port", "18931", timeout=120)
    elapsed = time.monotonic() - t0
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "starting Ray" not in r.stderr, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [ln for ln in r.stderr.splitlines() if ln.strip()][-1:], r.stderr
    assert "models.target.source" in errors[0] and "/nonexistent/target.gguf" in errors[0]
    assert elapsed < 60, elapsed


def test_missing_model_folder_in_process(tmp_path):
    cfg = _config(
        tmp_path,
        TINY_DRAFT_ONLY.replace(
            "kind: random, name: tiny-llama}, device: %s", "kind: local, name: /nonexistent/model}, device: %s"
        )
        % ("cpu", "random", "tiny-llama"),
    )
    one_line_exit_2(_cli("run", "--config", str(cfg), "--in-process", "--log-level", "warning"), "/nonexistent/model")


def test_dataset_errors_name_file_and_line_within_the_limit(tmp_path):
    good = json.dumps({"problem": "What is 1+1?", "answer": "2"})
    broken = tmp_path / "broken.jsonl"
    broken.write_text(f"{good}\n{{not json\n")
    one_line_exit_2(
        _cli("run", "--config", "tiny", "--dataset", str(broken), "--log-level", "warning"),
        f"{broken}:2: malformed JSON",
    )
    not_utf8 = tmp_path / "bytes.jsonl"
    not_utf8.write_bytes(good.encode() + b"\n" + b'{"problem": "\xff"}\n')
    one_line_exit_2(
        _cli("run", "--config", "tiny", "--dataset", str(not_utf8), "--log-level", "warning"),
        f"{not_utf8}:2: not UTF-8",
    )
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    one_line_exit_2(_cli("run", "--config", "tiny", "--dataset", str(empty), "--log-level", "warning"), "empty")
    # a malformed line after the first --limit lines is never read
    r = _cli(
        "run", "--config", "tiny", "--in-process", "--policy", "draft_only", "--dataset", str(broken), "--limit", "1"
    )
    assert r.returncode == 0 and "[1/1]" in r.stdout, r.stderr


BOOM = """
import sys
from cluster.cli import app

@app.command("boom")
def boom():
    raise RuntimeError("something inside broke\\nsecond line")

sys.argv = ["arbitrage", *sys.argv[1:]]
app()
"""


def test_an_unexpected_exception_is_one_line_naming_the_log_and_exit_1(tmp_path):
    import os

    env = {**os.environ, "ARBITRAGE_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-c", BOOM]
    r = subprocess.run(cmd + ["boom"], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert r.returncode == 1, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "internal error: RuntimeError: something inside broke" in lines[0] and "-v shows it" in lines[0]
    logs = list((tmp_path / "cache" / "logs").glob("arbitrage-*.log"))
    assert len(logs) == 1 and str(logs[0].name) in lines[0]
    assert "Traceback" in logs[0].read_text() and "something inside broke" in logs[0].read_text()

    loud = subprocess.run(cmd + ["boom", "-v"], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert loud.returncode == 1 and "Traceback" in loud.stderr and "internal error" in loud.stderr
