"""The Serve app on tiny models: the official openai client, SSE, metadata, errors, auth, backpressure.

Production behaviour under bad input and load (isolation, limits, metrics, health, leaks)
is in test_serve_production.py, on an app of its own.

One live application (module-scoped) on the session Ray, on a free loopback port, with an
API key and `serve.max_queued_requests=2` on one ingress replica, so the auth and
backpressure tests share it. Greedy responses are checked step by step against the same
chain run in this process (`arbitrage.loop.run_chain` over a LocalBackend).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from ports import free_port

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
APP = "arbitrage-test"
KEY = "test-key-123"
LIMIT = 2  # serve.max_queued_requests of the test app (one ingress replica)
SEP = "\n\n"
PROBLEM = "Tom has 3 apples and buys 4 more. How many apples does he have?"
USER = [{"role": "user", "content": PROBLEM}]


@pytest.fixture(scope="module")
def app(ray_local):
    """The live app: base URL, config and an authorised httpx client; Serve shut down after."""
    from ray import serve

    from cluster.serve_app import run_openai_app
    from configs.schema import load_config

    port = free_port()
    cfg = load_config(
        TINY,
        **{
            "serve.port": port,
            "serve.api_key": KEY,
            "serve.max_queued_requests": LIMIT,
            "serve.max_replicas": 1,
            "serve.target_ongoing_requests": 4.0,
        },
    )
    serve.shutdown()  # a fresh controller: its proxy gets this config's guard (cluster.serve_proxy)
    run_openai_app(cfg, name=APP)
    base = f"http://127.0.0.1:{port}"
    http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    yield type("App", (), {"base": base, "cfg": cfg, "http": http})
    http.close()
    serve.shutdown()


@pytest.fixture(scope="module")
def client(app):
    import openai

    return openai.OpenAI(base_url=f"{app.base}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(app):
    """Run the same chain in this process with the config's models (the one loop, no Ray)."""
    from arbitrage.backend import LocalBackend
    from arbitrage.loop import ChainInput, LoopSettings, run_chain
    from arbitrage.policies import make_policy

    b = LocalBackend.from_config(app.cfg)
    backend = LocalBackend(b.draft, b.target, b.prm, b.router, max_batch_size=1, max_wait_ms=0)

    def run(problem: str, policy: str, threshold: float, **overrides):
        cfg = app.cfg.with_overrides(**overrides)
        pol = make_policy(policy, threshold, seed=cfg.generation.seed)
        res = asyncio.run(run_chain(ChainInput("ref", problem), backend, pol, LoopSettings.from_config(cfg)))
        return [(s.text, s.author) for s in res.steps]

    return run


def _meta_consistent(meta: dict, usage, content: str) -> None:
    """The `arbitrage` field agrees with itself, with usage and with the content."""
    steps = meta["steps"]
    assert meta["num_steps"] == len(steps) >= 1
    assert [s["index"] for s in steps] == list(range(len(steps)))
    authors = [s["author"] for s in steps]
    assert meta["accepted_draft_steps"] == authors.count("draft")
    assert meta["escalations"] == sum(s["escalated"] for s in steps) == authors.count("target")
    assert meta["acceptance"] == pytest.approx(authors.count("draft") / len(steps))
    assert meta["draft_tokens"] == sum(s["draft_tokens"] for s in steps)
    assert meta["target_tokens"] == sum(s["target_tokens"] for s in steps)
    assert meta["wasted_escalations"] == sum(bool(s["wasted"]) for s in steps)
    assert usage.completion_tokens == sum(s["tokens"] for s in steps)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens and usage.prompt_tokens > 0
    assert content == "".join(s["text"] + SEP for s in steps)
    for s in steps:
        assert s["router_prob"] is not None and 0.0 <= s["router_prob"] <= 1.0  # router policy
        if s["escalated"]:  # PRM scores both steps of an escalation (score_escalations)
            assert s["draft_text"] is not None and s["prm_draft"] is not None and s["prm_target"] is not None
            assert s["wasted"] == (s["prm_target"] <= s["prm_draft"])


# ---- happy paths -------------------------------------------------------------------------------
def test_models_and_health(app, client):
    import openai
    from openai.types import Model

    assert [m.id for m in client.models.list().data] == ["arbitrage"]
    one = client.models.retrieve("arbitrage")  # GET /v1/models/{id}
    assert isinstance(one, Model) and one.id == "arbitrage" and one.object == "model"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-9")
    assert e.value.body["code"] == "model_not_found"
    t0 = time.monotonic()
    h = httpx.get(f"{app.base}/health", timeout=30)  # open: no key needed
    assert time.monotonic() - t0 < 1.0  # from the state a background task keeps
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["coordinator"]["ready"]
    assert httpx.get(f"{app.base}/-/healthz", timeout=30).status_code == 200


def test_openai_no_op_fields_are_accepted(client):
    """Standard fields at values that change nothing: what off-the-shelf clients send."""
    from openai.types.chat import ChatCompletion
    from openai.types import Completion

    plain = client.chat.completions.create(model="arbitrage", messages=USER, max_tokens=24)
    noop = client.chat.completions.create(
        model="arbitrage",
        messages=USER,
        max_tokens=24,
        logprobs=False,
        top_logprobs=0,
        n=1,
        response_format={"type": "text"},
        tools=[],
        tool_choice="none",
        parallel_tool_calls=False,
        presence_penalty=0,
        frequency_penalty=0,
        logit_bias={},
        store=False,
        user="u1",
        metadata={"k": "v"},
        service_tier="auto",
        stream_options=None,
        extra_body={"top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0},
    )
    assert isinstance(noop, ChatCompletion) and noop.choices[0].message.content == plain.choices[0].message.content
    assert (
        client.chat.completions.create(model="arbitrage", messages=USER, max_tokens=24, extra_body={"top_k": 0})
        .choices[0]
        .message.content
        == plain.choices[0].message.content
    )  # vLLM: 0 is "off" too
    text = client.completions.create(
        model="arbitrage",
        prompt="2 + 2 =",
        max_tokens=12,
        echo=False,
        best_of=1,
        suffix="",
        n=1,
        logit_bias={},
        presence_penalty=0,
    )
    assert isinstance(text, Completion) and text.choices[0].text


def test_stream_include_usage_sends_a_usage_chunk_last(client):
    """stream_options.include_usage: OpenAI's format -- a last chunk with choices: [] carries usage."""
    from openai.types.chat import ChatCompletionChunk

    body = dict(model="arbitrage", messages=USER, max_tokens=30)
    whole = client.chat.completions.create(**body)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **body))
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    *steps, finish, usage = chunks
    assert usage.choices == [] and usage.usage.model_dump() == whole.usage.model_dump()
    assert finish.choices[0].finish_reason == whole.choices[0].finish_reason and finish.usage is None
    assert all(c.usage is None for c in steps)
    assert "".join(c.choices[0].delta.content for c in steps) == whole.choices[0].message.content


def test_chat_metadata_matches_the_trace(client, reference):
    resp = client.chat.completions.create(
        model="arbitrage",
        messages=[{"role": "system", "content": "Answer tersely."}] + USER,
        max_tokens=36,
        extra_body={"arbitrage": {"policy": "router", "threshold": 0.45}},
    )
    meta, content = resp.model_extra["arbitrage"], resp.choices[0].message.content
    _meta_consistent(meta, resp.usage, content)
    assert (meta["policy"], meta["threshold"]) == ("router", 0.45)
    assert resp.object == "chat.completion" and resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens <= 36  # max_tokens is the chain's budget
    expected = reference(
        PROBLEM, "router", 0.45, **{"prompt.system_prompt": "Answer tersely.", "generation.max_total_tokens": 36}
    )
    assert [(s["text"], s["author"]) for s in meta["steps"]] == expected


def test_threshold_zero_escalates_every_step(client):
    resp = client.chat.completions.create(
        model="arbitrage", messages=USER, extra_body={"arbitrage": {"threshold": 0.0, "max_steps": 2}}
    )
    meta = resp.model_extra["arbitrage"]
    _meta_consistent(meta, resp.usage, resp.choices[0].message.content)
    assert meta["num_steps"] <= 2 and meta["acceptance"] == 0.0
    assert all(s["author"] == "target" and s["escalated"] for s in meta["steps"])


def test_chat_stream_sends_each_step_then_usage(client):
    body = dict(model="arbitrage", messages=USER, extra_body={"arbitrage": {"threshold": 0.45}})
    whole = client.chat.completions.create(**body)
    chunks = list(client.chat.completions.create(stream=True, **body))
    steps, final = chunks[:-1], chunks[-1]
    meta = whole.model_extra["arbitrage"]
    assert len(steps) == meta["num_steps"]  # one chunk per decided step
    assert "".join(c.choices[0].delta.content for c in steps) == whole.choices[0].message.content

    # the same steps, up to wall times and float noise: a PRM score / router probability of one
    # step can differ in its last bits (~1e-8) with what else was in the batch
    def timeless(s):
        return {k: pytest.approx(v, abs=1e-6) if isinstance(v, float) else v for k, v in s.items() if k != "wall_s"}

    assert [timeless(s) for s in meta["steps"]] == [
        {k: v for k, v in c.model_extra["arbitrage"]["step"].items() if k != "wall_s"} for c in steps
    ]
    assert steps[0].choices[0].delta.role == "assistant" and all(c.choices[0].finish_reason is None for c in steps)
    assert final.choices[0].finish_reason == whole.choices[0].finish_reason
    assert final.usage.model_dump() == whole.usage.model_dump()
    assert final.model_extra["arbitrage"]["num_steps"] == meta["num_steps"]


def test_completions_raw_prompt_and_stream_with_done(app, client, reference):
    whole = client.completions.create(model="arbitrage", prompt="2 + 2 =", max_tokens=30)
    meta = whole.model_extra["arbitrage"]
    _meta_consistent(meta, whole.usage, whole.choices[0].text)
    assert whole.object == "text_completion"
    assert [(s["text"], s["author"]) for s in meta["steps"]] == reference(
        "2 + 2 =", "router", 0.5, **{"prompt.use_chat_template": False, "generation.max_total_tokens": 30}
    )
    events = []
    with app.http.stream(
        "POST", "/v1/completions", json={"model": "arbitrage", "prompt": "2 + 2 =", "max_tokens": 30, "stream": True}
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole.choices[0].text
    assert chunks[-1]["usage"] == whole.usage.model_dump(exclude_none=True)
    assert [c["arbitrage"]["step"]["index"] for c in chunks[:-1]] == list(range(meta["num_steps"]))


def test_request_settings_apply(client):
    one = client.chat.completions.create(
        model="arbitrage", messages=USER, extra_body={"arbitrage": {"policy": "draft_only", "max_steps": 1}}
    )
    assert one.model_extra["arbitrage"]["num_steps"] == 1 and one.choices[0].finish_reason == "length"
    assert one.model_extra["arbitrage"]["policy"] == "draft_only"
    sampled = [
        client.chat.completions.create(model="arbitrage", messages=USER, temperature=1.0, seed=seed, max_tokens=24)
        .choices[0]
        .message.content
        for seed in (7, 7, 8)
    ]
    assert sampled[0] == sampled[1] != sampled[2]


# ---- bad requests ------------------------------------------------------------------------------
def _chat(**fields) -> dict:
    return {"model": "arbitrage", "messages": USER, **fields}


def _raw(extra: str) -> bytes:
    """A chat body with `extra` spliced in as raw JSON text (for NaN, Infinity, 400-digit numbers)."""
    return ('{"model": "arbitrage", "messages": [{"role": "user", "content": "hi"}], ' + extra + "}").encode()


BAD_REQUESTS = [  # (id, path, body (dict, or raw bytes), status, words in the message)
    ("unknown model", "/v1/chat/completions", _chat(model="gpt-9"), 404, "does not exist"),
    ("messages not a list", "/v1/chat/completions", _chat(messages="hi"), 400, "messages"),
    ("max_tokens a string", "/v1/chat/completions", _chat(max_tokens="10"), 400, "max_tokens"),
    ("temperature a string", "/v1/chat/completions", _chat(temperature="hot"), 400, "temperature"),
    ("stream a string", "/v1/chat/completions", _chat(stream="yes"), 400, "stream"),
    ("content a number", "/v1/chat/completions", _chat(messages=[{"role": "user", "content": 5}]), 400, "content"),
    ("negative max_tokens", "/v1/chat/completions", _chat(max_tokens=-5), 400, "max_tokens"),
    ("huge max_tokens", "/v1/chat/completions", _chat(max_tokens=10**12), 400, "max_tokens"),
    ("max_tokens over context", "/v1/chat/completions", _chat(max_tokens=5000), 400, "context"),
    ("threshold 1.5", "/v1/chat/completions", _chat(arbitrage={"threshold": 1.5}), 400, "threshold"),
    ("unknown policy", "/v1/chat/completions", _chat(arbitrage={"policy": "magic"}), 400, "policy"),
    ("unknown arbitrage field", "/v1/chat/completions", _chat(arbitrage={"tau": 0.1}), 400, "arbitrage.tau"),
    ("empty messages", "/v1/chat/completions", _chat(messages=[]), 400, "empty"),
    (
        "no user message",
        "/v1/chat/completions",
        _chat(messages=[{"role": "system", "content": "hi"}]),
        400,
        "no user message",
    ),
    ("bad role", "/v1/chat/completions", _chat(messages=[{"role": "wizard", "content": "x"}]), 400, "role"),
    (
        "oversize prompt",
        "/v1/chat/completions",
        _chat(messages=[{"role": "user", "content": "x" * 3000}]),
        400,
        "context",
    ),
    ("n=2", "/v1/chat/completions", _chat(n=2), 400, "n"),
    ("stop sequences", "/v1/chat/completions", _chat(stop=["\n"]), 400, "stop"),
    ("unknown field", "/v1/chat/completions", _chat(frobnicate=True), 400, "frobnicate"),
    ("invalid JSON", "/v1/chat/completions", b'{"model": "arbitrage", "messages": [', 400, "JSON"),
    ("invalid UTF-8", "/v1/chat/completions", b'{"model": "arbitrage", "x": "\xff\xfe"}', 400, "UTF-8"),
    ("empty body", "/v1/chat/completions", b"", 400, "empty"),
    ("array body", "/v1/chat/completions", b"[1, 2]", 400, "object"),
    ("two prompts", "/v1/completions", {"model": "arbitrage", "prompt": ["a", "b"]}, 400, "one prompt"),
    ("empty prompt", "/v1/completions", {"model": "arbitrage", "prompt": ""}, 400, "prompt"),
    ("missing prompt", "/v1/completions", {"model": "arbitrage"}, 400, "prompt"),
    # numbers: NaN / infinities (Python's JSON extensions), negative, huge, wrong kind
    (
        "NaN temperature",
        "/v1/chat/completions",
        _raw('"temperature": NaN'),
        400,
        "temperature: input should be a finite",
    ),
    (
        "Infinity threshold",
        "/v1/chat/completions",
        _raw('"arbitrage": {"threshold": Infinity}'),
        400,
        "arbitrage.threshold: input should be a finite",
    ),
    ("1e999 top_p", "/v1/chat/completions", _raw('"top_p": 1e999'), 400, "top_p"),
    ("negative temperature", "/v1/chat/completions", _chat(temperature=-1), 400, "temperature"),
    ("negative max_steps", "/v1/chat/completions", _chat(arbitrage={"max_steps": -1}), 400, "arbitrage.max_steps"),
    ("huge seed", "/v1/chat/completions", _chat(seed=2**70), 400, "seed"),
    ("400-digit max_tokens", "/v1/chat/completions", _raw('"max_tokens": ' + "9" * 400), 400, "max_tokens"),
    ("fractional max_tokens", "/v1/chat/completions", _chat(max_tokens=10.5), 400, "max_tokens"),
    # wrong JSON types
    ("bool max_tokens", "/v1/chat/completions", _chat(max_tokens=True), 400, "max_tokens"),
    ("null messages", "/v1/chat/completions", _chat(messages=None), 400, "messages"),
    ("arbitrage a string", "/v1/chat/completions", _chat(arbitrage="fast"), 400, "arbitrage"),
    ("model a number", "/v1/chat/completions", _chat(model=7), 400, "model"),
    (
        "image content part",
        "/v1/chat/completions",
        _chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        400,
        "content",
    ),
    ("string body", "/v1/chat/completions", b'"hello"', 400, "object"),
    ("null body", "/v1/chat/completions", b"null", 400, "object"),
    # text and encoding
    ("blank user message", "/v1/chat/completions", _chat(messages=[{"role": "user", "content": "  "}]), 400, "empty"),
    (
        "invalid UTF-8 in content",
        "/v1/chat/completions",
        b'{"model": "arbitrage", "messages": [{"role": "user", "content": "\xc3\x28"}]}',
        400,
        "UTF-8",
    ),
    (
        "lone surrogate escape",
        "/v1/chat/completions",
        b'{"model": "arbitrage", "messages": [{"role": "user", "content": "\\ud800"}]}',
        400,
        "JSON",
    ),
    (
        "JSON nested 100k deep",
        "/v1/chat/completions",
        b'{"model": "arbitrage", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        400,
        "JSON",
    ),
    (
        "body over 8 MiB",
        "/v1/chat/completions",
        b'{"model": "arbitrage", "messages": [{"role": "user", "content": "' + b"x" * (9 << 20) + b'"}]}',
        413,
        "bytes",
    ),
    (
        "unknown field, completions",
        "/v1/completions",
        {"model": "arbitrage", "prompt": "1+1", "best_of": 2},
        400,
        "best_of",
    ),
    ("unknown model, completions", "/v1/completions", {"model": "gpt-9", "prompt": "1+1"}, 404, "does not exist"),
    # standard OpenAI / vLLM fields at values that would change the answer: refused, field named
    ("logprobs true", "/v1/chat/completions", _chat(logprobs=True), 400, "logprobs"),
    ("top_logprobs 3", "/v1/chat/completions", _chat(top_logprobs=3), 400, "top_logprobs"),
    (
        "json response_format",
        "/v1/chat/completions",
        _chat(response_format={"type": "json_object"}),
        400,
        "response_format",
    ),
    ("unknown response_format", "/v1/chat/completions", _chat(response_format={"type": "xml"}), 400, "response_format"),
    (
        "tools given",
        "/v1/chat/completions",
        _chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        400,
        "tools",
    ),
    ("tool_choice required", "/v1/chat/completions", _chat(tool_choice="required"), 400, "tool_choice"),
    ("top_k 5", "/v1/chat/completions", _chat(top_k=5), 400, "top_k"),
    ("min_p 0.1", "/v1/chat/completions", _chat(min_p=0.1), 400, "min_p"),
    ("repetition_penalty 1.2", "/v1/chat/completions", _chat(repetition_penalty=1.2), 400, "repetition_penalty"),
    ("logit_bias set", "/v1/chat/completions", _chat(logit_bias={"42": 5.0}), 400, "logit_bias"),
    ("store true", "/v1/chat/completions", _chat(store=True), 400, "store"),
    ("presence_penalty 1", "/v1/chat/completions", _chat(presence_penalty=1.0), 400, "presence_penalty"),
    ("echo true", "/v1/completions", {"model": "arbitrage", "prompt": "1+1", "echo": True}, 400, "echo"),
    ("suffix set", "/v1/completions", {"model": "arbitrage", "prompt": "1+1", "suffix": "x"}, 400, "suffix"),
    (
        "completions logprobs",
        "/v1/completions",
        {"model": "arbitrage", "prompt": "1+1", "logprobs": 2},
        400,
        "logprobs",
    ),
]


def test_bad_requests_get_4xx_with_a_message(app):
    failures = []
    for name, path, body, status, words in BAD_REQUESTS:
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = app.http.post(path, headers={"Content-Type": "application/json"}, **kw)
        err = r.json().get("error", {}) if r.headers.get("content-type", "").startswith("application/json") else {}
        if r.status_code != status or words.lower() not in err.get("message", "").lower():
            failures.append((name, r.status_code, r.text[:200]))
    assert not failures, failures
    assert app.http.get("/v1/nothing-here").status_code == 404
    assert app.http.get("/v1/chat/completions").json()["error"]["message"]  # 405, still an OpenAI body


def test_api_key_is_required_on_v1_only(app):
    import openai

    chat = _chat(max_tokens=8)
    assert httpx.post(f"{app.base}/v1/chat/completions", json=chat, timeout=30).status_code == 401
    wrong = httpx.post(
        f"{app.base}/v1/chat/completions", json=chat, timeout=30, headers={"Authorization": "Bearer nope"}
    )
    assert wrong.status_code == 401 and "invalid API key" in wrong.json()["error"]["message"]
    assert httpx.get(f"{app.base}/v1/models", timeout=30).status_code == 401
    bad = openai.OpenAI(base_url=f"{app.base}/v1", api_key="nope", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(f"{app.base}/health", timeout=30).status_code == 200


# ---- generated requests (schemathesis) ---------------------------------------------------------
# (path, method, generation mode, cases): valid bodies per the OpenAPI document (they may still
# break a semantic rule, e.g. no user message) and deliberately invalid ones.
FUZZ_PLAN = [
    ("/v1/chat/completions", "POST", "positive", 90),
    ("/v1/chat/completions", "POST", "negative", 90),
    ("/v1/completions", "POST", "positive", 60),
    ("/v1/completions", "POST", "negative", 60),
    ("/v1/models", "GET", "positive", 5),
    ("/health", "GET", "positive", 5),
]


def test_schemathesis_generated_requests_never_get_5xx(app):
    """>= 300 requests generated from GET /openapi.json: every answer is 2xx or a 4xx with a message."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings

    _wait_idle(app)
    schema = schemathesis.openapi.from_url(f"{app.base}/openapi.json")
    auth = {"Authorization": f"Bearer {KEY}"}
    seen: list[tuple[str, str, int, str]] = []
    for path, method, mode, n in FUZZ_PLAN:
        strategy = schema[path][method].as_strategy(generation_mode=schemathesis.GenerationMode(mode))

        @settings(
            max_examples=n,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def send(case):
            r = case.call(base_url=app.base, headers=auth, timeout=60)
            seen.append((path, mode, r.status_code, r.text[:300]))

        send()
    by_status = sorted({(p, m, c) for p, m, c, _ in seen})
    print("schemathesis cases:", len(seen), dict(Counter(f"{p} {m} {c}" for p, m, c, _ in seen)))
    assert len(seen) >= 300, len(seen)
    assert not [x for x in seen if x[2] >= 500], [x for x in seen if x[2] >= 500][:5]
    for path, mode, code, text in seen:
        if 400 <= code < 500:
            assert json.loads(text)["error"]["message"], (path, mode, code, text)
    codes = {c for _, _, c in by_status}
    assert 200 in codes and 400 in codes, by_status  # both valid chains and rejected bodies were exercised


# ---- backpressure ------------------------------------------------------------------------------
def _in_flight(app) -> int:
    return app.http.get("/health").json()["in_flight"]


def _wait_idle(app, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _in_flight(app) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _in_flight(app) == 0


def test_full_ingress_answers_503_at_once_and_frees_slots(app):
    """LIMIT open streams fill the replica; more requests get 503 immediately; closing frees it."""
    slow = _chat(stream=True, max_tokens=400, arbitrage={"policy": "draft_only", "max_steps": 40})
    _wait_idle(app)
    with (
        app.http.stream("POST", "/v1/chat/completions", json=slow) as s1,
        app.http.stream("POST", "/v1/chat/completions", json=slow) as s2,
    ):
        lines = [s.iter_lines() for s in (s1, s2)]  # kept alive: closing an iterator closes its stream
        for s, it in zip((s1, s2), lines):
            assert s.status_code == 200 and next(it).startswith("data: ")  # admitted, running
        assert _in_flight(app) == LIMIT
        t0 = time.monotonic()
        rejected = [app.http.post("/v1/chat/completions", json=_chat(max_tokens=8), timeout=10) for _ in range(3)]
        assert time.monotonic() - t0 < 10
        for r in rejected:
            assert r.status_code == 503 and "max_queued_requests" in r.json()["error"]["message"], r.text
            assert r.headers.get("retry-after") == "1"
    _wait_idle(app)  # the closed streams released their slots (and cancelled their chains)
    assert app.http.post("/v1/chat/completions", json=_chat(max_tokens=8)).status_code == 200


def test_concurrent_burst_never_hangs(app):
    """8 at once on 2 slots: 200s and 503s, every 503 an OpenAI error body with Retry-After."""
    _wait_idle(app)
    body = _chat(max_tokens=48, arbitrage={"policy": "draft_only", "max_steps": 4})

    def one(_):
        return httpx.post(
            f"{app.base}/v1/chat/completions", json=body, timeout=60, headers={"Authorization": f"Bearer {KEY}"}
        )

    t0 = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(8)))
    codes = [r.status_code for r in answers]
    assert set(codes) <= {200, 503} and codes.count(200) >= 1 and codes.count(503) >= 1, codes
    assert time.monotonic() - t0 < 60
    for r in answers:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "overloaded_error", r.text


# ---- Serve status, builder and CLI -------------------------------------------------------------
def test_serve_status_shows_deployments_and_autoscaling(app):
    from ray import serve
    from ray.serve.context import _get_global_client

    st = serve.status().applications[APP]
    assert st.status == "RUNNING"
    assert set(st.deployments) == {
        "ingress",
        "coordinator",
        "draft",
        "target",
        "router",  # prm rides on target
        "metrics",
    }
    assert all(d.status == "HEALTHY" for d in st.deployments.values())
    deps = _get_global_client().get_serve_details()["applications"][APP]["deployments"]
    scaling = {name: d["deployment_config"].get("autoscaling_config") for name, d in deps.items()}
    assert scaling["metrics"] is None and deps["metrics"]["deployment_config"]["num_replicas"] == 1
    s = app.cfg.serve
    assert (scaling["ingress"]["min_replicas"], scaling["ingress"]["max_replicas"]) == (s.min_replicas, s.max_replicas)
    assert scaling["ingress"]["target_ongoing_requests"] == s.target_ongoing_requests
    assert deps["ingress"]["deployment_config"]["max_queued_requests"] == LIMIT
    assert scaling["coordinator"]["target_ongoing_requests"] == app.cfg.runtime.max_concurrent_chains
    assert scaling["draft"]["min_replicas"] == scaling["draft"]["max_replicas"] == app.cfg.runtime.draft.replicas


def test_app_builder_and_serve_config_file():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from cluster.serve_app import app_builder, build_openai_app
    from configs.schema import ConfigError

    cfg = ServeDeploySchema.model_validate(yaml.safe_load((TINY.parent / "serve.yaml").read_text()))
    assert cfg.applications[0].import_path == "cluster.serve_app:app_builder"
    assert cfg.http_options.host == "127.0.0.1"
    env = cfg.controller_options.runtime_env["env_vars"]  # the proxy guard, with the default limits
    from cluster.serve_proxy import PROXY_CALLBACK, ProxyLimits
    from configs.schema import ServeConfig

    assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == PROXY_CALLBACK
    assert ProxyLimits(**json.loads(env["ARBITRAGE_PROXY_LIMITS"])) == ProxyLimits.of(ServeConfig())
    assert app_builder({"config": "tiny"}) is not None
    with pytest.raises(ConfigError, match="bogus"):
        app_builder({"bogus": 1})
    with pytest.raises(ConfigError, match="min_replicas"):
        build_openai_app({**yaml.safe_load(TINY.read_text()), "serve": {"min_replicas": 3, "max_replicas": 1}})


def test_cli_serve_help_and_bad_config(tmp_path):
    cli = [sys.executable, "-m", "cluster.cli", "serve"]
    h = subprocess.run(cli + ["--help"], capture_output=True, text=True, timeout=120)
    assert h.returncode == 0 and "--port" in h.stdout and "--config" in h.stdout
    bad = subprocess.run(
        cli + ["--config", str(tmp_path / "missing.yaml")], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "not found" in bad.stderr and "Traceback" not in bad.stderr
