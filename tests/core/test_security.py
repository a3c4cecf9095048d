"""Security defaults: loopback bind, no pickle-based weight loading, no remote code.

The source scan parses every project module (AST, so docstrings and comments do not count)
and fails on a call that could run arbitrary code from a downloaded file: `torch.load`
without `weights_only=True`, any `pickle` / `dill` / `joblib` / `cloudpickle` load, or
`trust_remote_code=True`. Weights are read from safetensors (`safe_open`, `load_file`,
`from_pretrained`, which prefers safetensors and otherwise uses `torch.load(weights_only=True)`
in transformers >= 4.50). The API-key tests (401 on a missing or wrong key) are in
tests/cluster/test_serve.py (`test_api_key_is_required_on_v1_only`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from configs.schema import PRESET_DIR, ServeConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(
    p for d in ("arbitrage", "actors", "cluster", "configs", "benchmarks", "routers") for p in (ROOT / d).rglob("*.py")
)
PICKLE_MODULES = {"pickle", "dill", "joblib", "cloudpickle", "cPickle"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def unsafe_calls(source: str) -> list[str]:
    """Calls in `source` that may unpickle untrusted data or run a checkpoint's own code."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        kw = {k.arg: k.value for k in node.keywords}
        if name.endswith("torch.load"):
            safe = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
            if not safe:
                bad.append(f"line {node.lineno}: {name} without weights_only=True")
        if name.split(".")[0] in PICKLE_MODULES and name.split(".")[-1] in ("load", "loads", "Unpickler"):
            bad.append(f"line {node.lineno}: {name}")
        trc = kw.get("trust_remote_code")
        if isinstance(trc, ast.Constant) and trc.value is True:
            bad.append(f"line {node.lineno}: {name}(trust_remote_code=True)")
    return bad


def test_the_scan_catches_what_it_must():
    assert unsafe_calls("import torch\ntorch.load('x.bin')") == ["line 2: torch.load without weights_only=True"]
    assert unsafe_calls("torch.load(f, weights_only=True)") == []
    assert (
        len(unsafe_calls("import pickle\npickle.loads(b)\nAutoModel.from_pretrained(p, trust_remote_code=True)")) == 2
    )
    assert unsafe_calls('"""torch.load(x)"""\n# pickle.load(f)') == []


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_unsafe_deserialisation_in(path):
    assert unsafe_calls(path.read_text()) == []


def test_serve_binds_to_loopback_unless_configured():
    assert ServeConfig().host == "127.0.0.1"
    for preset in sorted(PRESET_DIR.glob("*.yaml")):
        if preset.stem == "serve":  # Ray Serve's own config file
            assert yaml.safe_load(preset.read_text())["http_options"]["host"] == "127.0.0.1"
        else:
            assert load_config(preset).serve.host == "127.0.0.1", preset.name
    assert load_config("tiny", **{"serve.host": "0.0.0.0"}).serve.host == "0.0.0.0"  # explicit opt-in only
