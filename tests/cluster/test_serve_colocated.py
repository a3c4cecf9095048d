"""The Serve app in the colocated layout (tiny models, CPU, real HTTP): one deployment serves every
role (the layout for a draft and target that share one GPU); a greedy chat completion equals the
same chain run in this process, and that replica's batch metrics reach /metrics under each role."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
from ports import free_port

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
APP = "arbitrage-colocated"
PROBLEM = "Tom has 3 apples and buys 4 more. How many apples does he have?"
SETTINGS = {
    "runtime.layout": "colocated",
    "models.draft.engine": "fast",
    "models.target.engine": "fast",
    "serve.max_replicas": 1,
}


def _reference(cfg, policy: str, threshold: float) -> list[tuple[str, str]]:
    """The same chain in this process (the one loop over a LocalBackend)."""
    from arbitrage.backend import LocalBackend
    from arbitrage.loop import ChainInput, LoopSettings, run_chain
    from arbitrage.policies import make_policy

    b = LocalBackend.from_config(cfg)
    backend = LocalBackend(b.draft, b.target, b.prm, b.router, max_batch_size=1, max_wait_ms=0)
    pol = make_policy(policy, threshold, seed=cfg.generation.seed)
    res = asyncio.run(run_chain(ChainInput("ref", PROBLEM), backend, pol, LoopSettings.from_config(cfg)))
    return [(s.text, s.author) for s in res.steps]


def _batched(base: str) -> dict[str, float]:
    """Items batched per role of generate_step / score / predict, from GET /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=30).text):
        for s in fam.samples:
            if s.name == "arbitrage_batch_size_sum":
                out[s.labels["role"]] = out.get(s.labels["role"], 0.0) + s.value
    return out


def test_colocated_app_serves_every_role_from_one_deployment(ray_local):
    from ray import serve

    from cluster.serve_app import run_openai_app
    from configs.schema import load_config

    port = free_port()
    cfg = load_config(TINY, **{**SETTINGS, "serve.port": port})
    assert cfg.runtime.placement() == "colocated"
    serve.shutdown()
    run_openai_app(cfg, name=APP)
    base = f"http://127.0.0.1:{port}"
    try:
        deployments = set(serve.status().applications[APP].deployments)
        assert "colocated" in deployments and not {"draft", "target", "prm", "router"} & deployments
        authors = set()
        for threshold in (1.0, 0.0):  # no step escalated; every step escalated
            body = {
                "model": cfg.serve.model_id,
                "messages": [{"role": "user", "content": PROBLEM}],
                "temperature": 0,
                "arbitrage": {"policy": "router", "threshold": threshold},
            }
            r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=300)
            assert r.status_code == 200, r.text
            got = [(s["text"], s["author"]) for s in r.json()["arbitrage"]["steps"]]
            assert got == _reference(cfg, "router", threshold)
            authors |= {a for _, a in got}
        assert authors == {"draft", "target"}  # both engines of the one replica answered
        assert httpx.get(f"{base}/health", timeout=30).json()["status"] == "ok"
        deadline, batched = time.monotonic() + 20, {}
        while time.monotonic() < deadline:  # replicas push their metrics every second
            batched = _batched(base)
            if batched.get("draft", 0) > 0 and batched.get("target", 0) > 0:
                break
            time.sleep(0.5)
        assert batched.get("draft", 0) > 0 and batched.get("target", 0) > 0, batched
    finally:
        serve.shutdown()
