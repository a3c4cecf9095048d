"""Loopback load test of the OpenAI-compatible Serve app: requests/s and latency per concurrency.

Bounded by design: it only talks to 127.0.0.1 / localhost, and every level stops at
`--duration` seconds or `--max-requests` requests, whichever comes first. By default it
starts the app itself (a local Ray, the config's models, a free loopback port) and shuts it
down afterwards; `--url` targets an app already running on this machine instead. Each
client sends greedy chat completions one after another (distinct problems); the table has
completed requests/s, p50/p99 latency, errors by status, steps and completion tokens/s
(streamed requests also report time to the first step with `--stream`). `--bad-every N`
makes every Nth request unsampleable (temperature 1e-300 or top_p 5e-324: they must still
get 200, decoded greedily, and fail nothing else); each level also records what the app's
`GET /metrics` counted meanwhile (requests by status, escalations, acceptance, batch sizes).

    python benchmarks/serve_load.py --config configs/tiny.yaml --levels 1,8,32 --duration 20 \
        --out benchmarks/results/serve_load_tiny.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/tiny.yaml", help="arbitrage config (when starting the app)")
    p.add_argument("--url", default=None, help="base URL of a running app on this machine (loopback only)")
    p.add_argument("--api-key", default=None, help="bearer key for --url")
    p.add_argument("--levels", default="1,8,32", help="comma-separated concurrent clients")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per level (upper bound)")
    p.add_argument("--max-requests", type=int, default=2000, help="requests per level (upper bound)")
    p.add_argument("--warmup", type=int, default=4, help="requests before each level, not measured")
    p.add_argument("--max-tokens", type=int, default=None, help="max_tokens per request (default: config)")
    p.add_argument("--policy", default=None, help="arbitrage.policy per request (default: config)")
    p.add_argument("--threshold", type=float, default=None, help="arbitrage.threshold per request")
    p.add_argument("--stream", action="store_true", help="stream responses; also report time to first step")
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout, seconds")
    p.add_argument(
        "--bad-every",
        type=int,
        default=0,
        help="every Nth request is unsampleable (temperature 1e-300 / top_p 5e-324); 0: none",
    )
    p.add_argument("--out", default="benchmarks/results/serve_load.json", help="JSON results path")
    a = p.parse_args(argv)
    a.levels = [int(x) for x in a.levels.split(",") if x.strip()]
    if not a.levels or min(a.levels) < 1 or max(a.levels) > 256:
        p.error("--levels must be integers in [1, 256]")
    if a.duration <= 0 or a.duration > 600 or a.max_requests < 1:
        p.error("--duration must be in (0, 600] and --max-requests >= 1")
    if a.url is not None and urlparse(a.url).hostname not in LOOPBACK:
        p.error(f"--url must point at this machine ({', '.join(sorted(LOOPBACK))}), got {a.url!r}")
    return a


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(a: argparse.Namespace):
    """Start the app on a free loopback port with room for the largest level; returns (url, cfg)."""
    from cluster.serve_app import run_openai_app
    from configs.schema import load_config

    cfg = load_config(a.config)
    queue = max(cfg.serve.max_queued_requests, max(a.levels) + a.warmup)
    cfg = cfg.with_overrides(
        **{"serve.host": "127.0.0.1", "serve.port": _free_port(), "serve.max_queued_requests": queue}
    )
    run_openai_app(cfg, name="arbitrage")
    return f"http://127.0.0.1:{cfg.serve.port}", cfg


def request_body(a: argparse.Namespace, i: int, model: str) -> dict:
    body = {
        "model": model,
        "stream": a.stream,
        "messages": [
            {
                "role": "user",
                "content": f"A shop sells {i % 97 + 2} pens for {i % 13 + 3} dollars "
                f"each. How much do {i % 7 + 2} pens cost?",
            }
        ],
    }
    if a.max_tokens is not None:
        body["max_tokens"] = a.max_tokens
    opts = {k: v for k, v in (("policy", a.policy), ("threshold", a.threshold)) if v is not None}
    if a.bad_every and i >= 0 and i % a.bad_every == a.bad_every - 1:  # parameters no engine can sample
        body |= {"temperature": 1e-300} if (i // a.bad_every) % 2 else {"temperature": 1.0, "top_p": 5e-324}
    return body | ({"arbitrage": opts} if opts else {})


async def one_request(http, body: dict) -> dict:
    """Send one request; latency, status, steps and tokens (time to first step when streamed)."""
    t0 = time.perf_counter()
    if not body["stream"]:
        r = await http.post("/v1/chat/completions", json=body)
        out = {"status": r.status_code, "latency_s": time.perf_counter() - t0}
        if r.status_code == 200:
            j = r.json()
            out |= {"steps": j["arbitrage"]["num_steps"], "tokens": j["usage"]["completion_tokens"]}
        return out
    first, final = None, None
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                first = first or time.perf_counter() - t0
                final = json.loads(line[6:])
        out = {"status": r.status_code, "latency_s": time.perf_counter() - t0, "ttft_s": first}
    if r.status_code == 200 and final and "usage" in final:
        out |= {"steps": final["arbitrage"]["num_steps"], "tokens": final["usage"]["completion_tokens"]}
    return out


async def run_level(a: argparse.Namespace, url: str, model: str, clients: int, key: str | None) -> dict:
    """`clients` loops sending requests until the duration or the request budget runs out."""
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=a.timeout, limits=limits) as http:
        await asyncio.gather(*(one_request(http, request_body(a, -1 - i, model)) for i in range(a.warmup)))
        rows: list[dict] = []
        issued = iter(range(a.max_requests))
        t0 = time.perf_counter()
        deadline = t0 + a.duration

        async def client() -> None:
            for i in issued:
                if time.perf_counter() >= deadline:
                    return
                try:
                    rows.append(await one_request(http, request_body(a, i, model)))
                except httpx.HTTPError as e:
                    rows.append({"status": type(e).__name__, "latency_s": time.perf_counter() - t0})

        before = await scrape(http)
        await asyncio.gather(*(client() for _ in range(clients)))
        row = summarize(rows, clients, time.perf_counter() - t0)
        await asyncio.sleep(1.5)  # model replicas push their batch histograms every second
        row["metrics"] = metrics_delta(before, await scrape(http))
        return row


async def scrape(http) -> dict:
    """The app's /metrics, summed by (name, labels); {} when it has none."""
    from prometheus_client.parser import text_string_to_metric_families

    r = await http.get("/metrics")
    if r.status_code != 200:
        return {}
    out: dict = {}
    for fam in text_string_to_metric_families(r.text):
        for smp in fam.samples:
            key = (smp.name, tuple(sorted(smp.labels.items())))
            out[key] = out.get(key, 0.0) + smp.value
    return out


def metrics_delta(before: dict, after: dict) -> dict:
    """What the app's counters say about the level: requests by status, escalation rate, acceptance,
    mean batch size per role."""
    if not after:
        return {}

    def d(name: str, **labels) -> float:
        want = {(k, str(v)) for k, v in labels.items()}
        return sum(v - before.get(k, 0.0) for k, v in after.items() if k[0] == name and want <= set(k[1]))

    statuses = sorted({dict(k[1]).get("status") for k in after if k[0] == "arbitrage_requests_total"} - {None})
    steps = d("arbitrage_steps_total")
    batches = {}
    for role in ("draft", "target", "prm", "router"):
        n = d("arbitrage_batch_size_count", role=role)
        if n:
            batches[role] = round(d("arbitrage_batch_size_sum", role=role) / n, 2)
    return {
        "requests": {st: d("arbitrage_requests_total", status=st) for st in statuses},
        "steps": steps,
        "escalation_rate": d("arbitrage_escalations_total") / steps if steps else None,
        "wasted_escalations": d("arbitrage_wasted_escalations_total"),
        "acceptance_tokens": (
            d("arbitrage_accepted_draft_tokens_total") / d("arbitrage_draft_tokens_total")
            if d("arbitrage_draft_tokens_total")
            else None
        ),
        "mean_batch_size": batches,
        "batch_isolations": d("arbitrage_batch_isolations_total"),
    }


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def summarize(rows: list[dict], clients: int, elapsed: float) -> dict:
    ok = [r for r in rows if r["status"] == 200]
    lat = [r["latency_s"] for r in ok]
    ttft = [r["ttft_s"] for r in ok if r.get("ttft_s") is not None]
    return {
        "clients": clients,
        "requests": len(rows),
        "ok": len(ok),
        "elapsed_s": elapsed,
        "errors": dict(Counter(str(r["status"]) for r in rows if r["status"] != 200)),
        "rps": len(ok) / elapsed if elapsed else 0.0,
        "latency_p50_s": _pct(lat, 0.5),
        "latency_p99_s": _pct(lat, 0.99),
        "latency_mean_s": statistics.fmean(lat) if lat else None,
        "ttft_p50_s": _pct(ttft, 0.5),
        "ttft_p99_s": _pct(ttft, 0.99),
        "steps_mean": statistics.fmean(r["steps"] for r in ok) if ok else None,
        "completion_tokens_per_s": sum(r["tokens"] for r in ok) / elapsed if elapsed else 0.0,
    }


def replica_counts(app_name: str = "arbitrage") -> dict[str, int]:
    """Running replicas per deployment (only when this script started the app)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    return {} if app is None else {n: d.replica_states.get("RUNNING", 0) for n, d in app.deployments.items()}


def print_table(levels: list[dict]) -> None:
    f = lambda v, spec: format(v, spec) if v is not None else "-".rjust(int(spec.split(".")[0]))  # noqa: E731
    print(
        f"{'clients':>7} {'requests':>8} {'ok':>5} {'req/s':>7} {'p50 s':>7} {'p99 s':>7} {'ttft p50':>8} "
        f"{'steps':>5} {'tok/s':>7}  errors / ingress replicas"
    )
    for r in levels:
        print(
            f"{r['clients']:>7} {r['requests']:>8} {r['ok']:>5} {r['rps']:>7.2f} "
            f"{f(r['latency_p50_s'], '7.3f')} {f(r['latency_p99_s'], '7.3f')} {f(r['ttft_p50_s'], '8.3f')} {f(r['steps_mean'], '5.2f')} "
            f"{r['completion_tokens_per_s']:>7.1f}  {r['errors'] or '-'} / {r.get('replicas', {}).get('ingress', '-')}"
        )


def main(argv=None) -> dict:
    a = parse_args(argv)
    load_start = os.getloadavg()
    owned = a.url is None
    if owned:
        url, cfg = start_app(a)
        model, key = cfg.serve.model_id, cfg.serve.api_key
    else:
        url, model, key, cfg = a.url.rstrip("/"), "arbitrage", a.api_key, None
    levels = []
    try:
        for clients in a.levels:
            row = asyncio.run(run_level(a, url, model, clients, key))
            if owned:
                row["replicas"] = replica_counts()
            levels.append(row)
            print_table(levels[-1:])
            if row.get("metrics"):
                print("  /metrics:", json.dumps(row["metrics"]))
    finally:
        if owned:
            import ray
            from ray import serve

            serve.shutdown()
            ray.shutdown()
    result = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "url": url,
        "config": a.config if owned else None,
        "policy": a.policy or (cfg.policy.name if cfg else None),
        "threshold": a.threshold if a.threshold is not None else (cfg.policy.threshold if cfg else None),
        "stream": a.stream,
        "duration_s": a.duration,
        "max_requests": a.max_requests,
        "bad_every": a.bad_every,
        "host": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
        },
        "levels": levels,
    }
    print()
    print_table(levels)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
