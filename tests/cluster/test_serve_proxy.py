"""The proxy guard's ASGI half in-process: what it does with the answers Ray Serve's proxy writes.

The live tests (test_serve_production.py, test_serve_faults.py) drive the real proxy; these pin
each rewrite down deterministically. The inner apps below write exactly what Ray Serve's proxy
writes in each case (`ray/serve/_private/proxy.py`, `http_util.py`): a plain-text 503 with its
backpressure message, nothing at all for a replica lost before the answer started, and a
started event stream that simply stops when the replica holding it dies.
"""

from __future__ import annotations

import asyncio
import json

import httpx

from cluster.serve_proxy import ProxyGuard, ProxyLimits


def _call(inner, method: str = "GET", content: bytes = b"") -> httpx.Response:
    guard = ProxyGuard(inner, ProxyLimits(max_body_bytes=100, body_timeout_s=1.0))

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=guard), base_url="http://t") as c:
            return await c.request(method, "/x", content=content, headers={"x-request-id": "rid-1"})

    return asyncio.run(go())


def test_serve_backpressure_text_becomes_json_with_retry_after():
    async def serve_503(scope, receive, send):
        await send(
            {"type": "http.response.start", "status": 503, "headers": [(b"content-type", b"text/plain; charset=utf-8")]}
        )
        await send(
            {
                "type": "http.response.body",
                "body": b"Request dropped due to backpressure (num_queued_requests=2, max_queued_requests=2).",
            }
        )

    r = _call(serve_503)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"] == {
        "message": "server busy: too many requests queued; retry (request id rid-1)",
        "type": "overloaded_error",
        "param": None,
        "code": "backpressure",
    }


def test_nothing_sent_becomes_503_replica_unavailable():
    async def lost(scope, receive, send):
        return  # Serve's proxy sends nothing when the replica died before answering (uvicorn: plain 500)

    r = _call(lost)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "replica_unavailable" and "rid-1" in r.json()["error"]["message"]


def test_a_cut_event_stream_ends_in_band_with_done():
    async def cut(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b'data: {"choices": []}\n\n', "more_body": True})

    r = _call(cut)
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "replica_unavailable"


def test_app_json_passes_untouched_and_bodies_are_bounded():
    async def echo(scope, receive, send):
        msg = await receive()
        body = json.dumps({"got": len(msg["body"]), "more": msg.get("more_body", False)}).encode()
        await send({"type": "http.response.start", "status": 400, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    r = _call(echo, "POST", b"x" * 60)
    assert r.status_code == 400 and r.json() == {"got": 60, "more": False}  # the app's own error, whole body
    big = _call(echo, "POST", b"x" * 101)
    assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"
