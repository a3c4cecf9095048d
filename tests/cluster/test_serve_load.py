"""Bounded loopback load: 64 concurrent clients for 60 s on tiny models, no errors but 503.

Runs `benchmarks/serve_load.py` as a subprocess (it starts its own local Ray and the app on a
free 127.0.0.1 port, and shuts both down), then reads its JSON. One request in 8 is
unsampleable (temperature 1e-300 / top_p 5e-324). Every answer must be 200, or a deliberate
503 from backpressure; p50 and p99 latency must be reported, and the app's /metrics must
have counted exactly the answers the clients got. Opt-in (`slow`, about 3 minutes):
`python -m pytest -m slow tests/cluster/test_serve_load.py`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_64_clients_for_60_s_get_only_200_or_503(tmp_path):
    out = tmp_path / "load.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "serve_load.py"),
        "--config",
        "configs/tiny.yaml",
        "--levels",
        "64",
        "--duration",
        "60",
        "--max-requests",
        "100000",
        "--timeout",
        "120",
        "--bad-every",
        "8",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (level,) = json.loads(out.read_text())["levels"]
    print(
        "load:", {k: level[k] for k in ("clients", "requests", "ok", "rps", "latency_p50_s", "latency_p99_s", "errors")}
    )
    assert level["clients"] == 64 and level["elapsed_s"] >= 55
    assert set(level["errors"]) <= {"503"}, level["errors"]
    assert level["ok"] > 0 and level["latency_p50_s"] <= level["latency_p99_s"] < 120
    counted = level["metrics"]["requests"]  # what GET /metrics saw during the level
    assert counted.get("200", 0) == level["ok"] and counted.get("503", 0) == level["errors"].get("503", 0)
