"""The `arbitrage` CLI: real runs on tiny models that write into missing folders, the summary
table, resume and "nothing to do", and the self-describing commands (config, --version, help)."""

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
    p.write_text(
        "\n".join(json.dumps({"id": f"t{i}", "problem": f"What is {i}+1?", "answer": str(i + 1)}) for i in range(3))
        + "\n"
    )
    return p


def _tiny(command: str, dataset, out, *options: str) -> list[str]:
    """`arbitrage COMMAND --config tiny --in-process --dataset D OPTIONS... --out OUT` as argv."""
    return [command, "--config", "tiny", "--in-process", "--dataset", str(dataset), *options, "--out", str(out)]


def _table_rows(stdout: str) -> dict[str, str]:
    """Summary-table rows by group label (the first column)."""
    lines = stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("group "))
    rows = {}
    for ln in lines[start + 2 :]:
        if not ln or ln.startswith("accept ="):
            break
        rows[ln.split()[0]] = ln
    return rows


def test_run_in_process_writes_into_missing_folders_and_prints_the_table(tmp_path, problems_file):
    out = tmp_path / "new" / "nested" / "traces.jsonl"
    r = _cli(*_tiny("run", problems_file, out, "--policy", "router", "--threshold", "0.5"))
    assert r.returncode == 0, r.stderr
    assert "[3/3]" in r.stdout and "Traceback" not in r.stderr
    rows = _table_rows(r.stdout)
    assert list(rows) == ["router@0.5"] and rows["router@0.5"].split()[1] == "3"
    assert all(len(ln) <= 100 for ln in r.stdout.splitlines() if not ln.startswith("["))
    assert "checking models" in r.stderr and "steps" in r.stderr  # a phase and the step progress bar
    traces = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(t["problem_id"] for t in traces) == ["t0", "t1", "t2"]
    assert all(t["steps"] and t["policy"] == "router" for t in traces)


def test_eval_then_report_into_missing_folders_and_resume_says_nothing_to_do(tmp_path, problems_file):
    out = tmp_path / "runs" / "deep" / "sweep"
    args = _tiny(
        "eval", problems_file, out, "--limit", "2", "--groups", "draft_only,router@0.5,target_only", "--no-step-cache"
    )
    r = _cli(*args)
    assert r.returncode == 0, r.stderr
    rows = _table_rows(r.stdout)
    assert list(rows) == ["draft_only", "router@0.5", "target_only"]
    assert rows["target_only"].split()[-1] == "1.00x" and rows["draft_only"].split()[4] == "1.000"
    assert "step cache: off -- wall times are uncached" in r.stdout

    again = _cli(*args)  # finished: no models load, no Ray
    assert again.returncode == 0, again.stderr
    assert "nothing to do: all 6 chains" in again.stderr and "loading" not in again.stderr
    assert _table_rows(again.stdout).keys() == rows.keys()

    more = _cli(*[a if a != "2" else "3" for a in args])  # one more problem: resumes
    assert more.returncode == 0, more.stderr
    assert "6 of 9 chains done, resuming" in more.stderr

    rep = _cli("report", str(out), "--out", str(tmp_path / "reports" / "a" / "b"))
    assert rep.returncode == 0, rep.stderr
    assert (tmp_path / "reports" / "a" / "b" / "report.md").is_file()
    assert "router@0.5" in _table_rows(rep.stdout)


def test_a_resumed_in_process_sweep_keeps_the_step_cache_of_the_run_before(tmp_path, problems_file):
    out = tmp_path / "sweep"
    args = _tiny("eval", problems_file, out, "--limit", "2", "--groups", "draft_only,rsd@0.5")
    r = _cli(*args)
    assert r.returncode == 0, r.stderr
    assert "step cache: 0 answers from earlier runs" in r.stderr
    results = out / "results.jsonl"
    first = [json.loads(line) for line in results.read_text().splitlines()]
    rsd = [row for row in first if row["policy"] == "rsd"]
    results.write_text("".join(json.dumps(row) + "\n" for row in first if row["policy"] != "rsd"))
    again = _cli(*args)  # the rsd rows again, every model call answered by the file
    assert again.returncode == 0, again.stderr
    assert "step cache: 0 answers" not in again.stderr and "answers from earlier runs" in again.stderr
    redone = [json.loads(line) for line in results.read_text().splitlines() if '"policy": "rsd"' in line]
    assert [r["final_text"] for r in redone] == [r["final_text"] for r in rsd]
    assert [[s["text"] for s in r["steps"]] for r in redone] == [[s["text"] for s in r["steps"]] for r in rsd]
    assert all(not any(r["cache"]["misses"].values()) for r in redone)


def test_collect_in_process_writes_into_missing_folders(tmp_path, problems_file):
    out = tmp_path / "data" / "new" / "collect.jsonl"
    args = _tiny("collect", problems_file, out, "--limit", "1")
    r = _cli(*args)
    assert r.returncode == 0, r.stderr
    assert out.is_file() and out.read_text().strip()
    again = _cli(*args)
    assert again.returncode == 0 and "nothing to do" in again.stderr and "loading" not in again.stderr


def test_config_show_schema_version_and_help():
    import yaml

    shown = _cli("config", "show", "--config", "tiny", "--set", "policy.threshold=0.3", "--set", "data.limit=7")
    assert shown.returncode == 0, shown.stderr
    cfg = yaml.safe_load(shown.stdout)
    assert cfg["name"] == "tiny" and cfg["policy"]["threshold"] == 0.3 and cfg["data"]["limit"] == 7
    assert cfg["generation"]["step_separator"] == "\n\n"  # defaults filled in
    from configs.schema import ArbitrageConfig

    ArbitrageConfig.model_validate(cfg)  # what it prints is a valid config
    assert shown.stdout.rstrip().endswith("# runtime.layout auto runs as: separate")  # CPU roles
    gpus = ("--set", "runtime.draft.num_gpus=0.4", "--set", "runtime.target.num_gpus=0.5")
    shared = _cli("config", "show", "--config", "tiny", *gpus)
    assert shared.stdout.rstrip().endswith("# runtime.layout auto runs as: colocated"), shared.stdout[-300:]

    schema = _cli("config", "schema")
    assert schema.returncode == 0 and "policy" in json.loads(schema.stdout)["properties"]

    bad = _cli("config", "show", "--config", "tiny", "--set", "nosuch.field=1")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr

    version = _cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("arbitrage ")

    for cmd, needles in {
        "eval": ["--config", "--dataset", "--split", "--limit", "default: the config's"],
        "setup-models": ["--config", "preset name"],
        "run": ["default: the config's policy.name", "default: the config's policy.threshold"],
        "report": ["RUN_DIR"],
        "demo": ["--limit", "--threshold"],
    }.items():
        h = _cli(cmd, "--help")
        text = " ".join(h.stdout.split())  # help wraps lines
        assert h.returncode == 0 and all(n in text for n in needles), (cmd, h.stdout)


def test_run_on_ray_is_quiet_and_shows_phases(tmp_path, problems_file):
    r = _cli(
        "run",
        "--config",
        "tiny",
        "--policy",
        "router",
        "--dataset",
        str(problems_file),
        "--limit",
        "2",
        "--out",
        str(tmp_path / "a" / "b.jsonl"),
    )
    assert r.returncode == 0, r.stderr
    for phase in ("starting Ray", "loading draft: random weights (tiny-llama)", "models ready in", "router@0.5:"):
        assert phase in r.stderr, r.stderr
    noise = (
        "core_worker",
        "logging.cc",
        "constructor arguments",
        "Token authentication",
        "Loading weights",
        "LOAD REPORT",
        "Setting accelerator",
        "(ModelActor",
        "(Coordinator",
        "INFO",
        "WARNING",
        "Traceback",
    )
    assert not [n for n in noise if n in r.stderr + r.stdout], r.stderr
    assert "router@0.5" in _table_rows(r.stdout)


def test_ctrl_c_says_what_is_kept_and_exits_130(tmp_path):
    import signal
    import time

    probs = tmp_path / "many.jsonl"
    probs.write_text(
        "".join(
            json.dumps({"id": f"m{i}", "problem": f"What is {i}+2?", "answer": str(i + 2)}) + "\n" for i in range(2000)
        )
    )
    out = tmp_path / "sweep"
    p = subprocess.Popen(
        CLI + _tiny("eval", probs, out, "--groups", "draft_only", "--no-step-cache", "--limit", "2000"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # as in a terminal
    results = out / "results.jsonl"
    deadline = time.monotonic() + 240
    while not (results.exists() and results.stat().st_size) and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    rows = [json.loads(line) for line in results.read_text().splitlines()]  # every kept row is whole
    assert 0 < len(rows) < 2000
    assert f"interrupted: {len(rows)} of 2000 chains are kept" in err and "the same command resumes" in err
    assert "Traceback" not in err
