"""Guards inside Ray Serve's HTTP proxy: request limits, and OpenAI-style bodies for the proxy's own errors.

Ray Serve's proxy (uvicorn with httptools) accepts request headers of any size for any time,
hands a request to the ingress replica before its body has arrived (so a client that sends
half a body holds a replica slot for as long as it likes), and answers its own failures --
backpressure, a lost replica, a request timeout -- as plain text without `Retry-After`.
This module runs in the proxy process. Ray Serve loads it through its proxy callback
(`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`), which the Serve controller's runtime_env
hands to the proxy actors it starts (`proxy_env`, used by `cluster.serve_app.run_openai_app`
and by `configs/serve.yaml`'s `controller_options`).

- Headers (`install_protocol_guard`, in the HTTP protocol itself, before any ASGI code):
  at most `max_header_bytes` for the request line and headers (else 431), received within
  `header_timeout_s` of the request's first byte (else 408); a connection that sends nothing
  for `header_timeout_s` after it opens is closed. Both answers close the connection.
- Bodies (`ProxyGuard`, the outermost ASGI middleware): a `Content-Length` over
  `max_body_bytes` is refused at once (413); otherwise the proxy reads the whole body
  itself, within `body_timeout_s` (else 408) and up to `max_body_bytes` (else 413), and
  only then hands the request to a replica, so slow clients hold a coroutine in the proxy,
  not a replica slot.
- Errors: every answer of 400 or more that is not JSON (or an event stream) -- i.e. one the
  app did not write -- is replaced by an OpenAI error body `{"error": {"message", "type",
  "param", "code"}}` naming the request id; a 503 (Serve's backpressure, an unavailable
  deployment) keeps or gets `Retry-After`, and a request the proxy could not finish because
  the replica holding it died (Serve's plain 500) becomes 503 `replica_unavailable` with
  `Retry-After`, since sending it again succeeds once Serve has replaced the replica. A
  server-sent event stream cut off that way ends with an in-band `replica_unavailable`
  error event and `data: [DONE]`, as the app ends streams whose coordinator was lost.

Nothing here imports Ray: the proxy imports this module before it serves.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from dataclasses import asdict, dataclass
from typing import Any

logger = logging.getLogger("ray.serve")

PROXY_CALLBACK = "cluster.serve_proxy:proxy_middlewares"
CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
LIMITS_ENV = "ARBITRAGE_PROXY_LIMITS"
JSON_TYPES = (b"application/json", b"text/event-stream")
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "invalid_request_error",
    431: "invalid_request_error",
    503: "overloaded_error",
}
REASONS = {
    400: "Bad Request",
    404: "Not Found",
    408: "Request Timeout",
    413: "Payload Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass(frozen=True)
class ProxyLimits:
    """What the proxy accepts of one request (from `serve.*` of the arbitrage config)."""

    max_body_bytes: int = 8 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    retry_after_s: int = 1

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> "ProxyLimits":
        raw = os.environ.get(LIMITS_ENV)
        return cls(**json.loads(raw)) if raw else cls()

    @classmethod
    def of(cls, serve_cfg) -> "ProxyLimits":
        """From a `ServeConfig`."""
        s = serve_cfg
        return cls(
            max_body_bytes=s.max_body_bytes,
            max_header_bytes=s.max_header_bytes,
            header_timeout_s=s.header_timeout_s,
            body_timeout_s=s.body_timeout_s,
            retry_after_s=s.retry_after_s,
        )


def proxy_env(limits: ProxyLimits, pythonpath: str | None = None) -> dict[str, str]:
    """Environment variables for the Serve controller (inherited by the proxies it starts)."""
    env = {CALLBACK_ENV: PROXY_CALLBACK, LIMITS_ENV: limits.to_env()}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


def proxy_middlewares() -> list:
    """Ray Serve's proxy callback: install the protocol guard; the ASGI middleware to wrap the proxy in."""
    from starlette.middleware import Middleware

    limits = ProxyLimits.from_env()
    try:
        install_protocol_guard(limits)
    except Exception:  # an unexpected uvicorn: serve without the header guard rather than not at all
        logger.exception("arbitrage proxy guard: the header limits could not be installed")
    logger.info("arbitrage proxy guard: %s", limits)
    return [Middleware(ProxyGuard, limits=limits)]


# ---- error bodies ----------------------------------------------------------------------------
def error_body(status: int, message: str, code: str | None = None) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": None, "code": code}}
    ).encode()


def _raw_response(status: int, body: bytes, headers: list[tuple[bytes, bytes]] = ()) -> bytes:
    """A whole HTTP/1.1 response that closes the connection (written by the protocol guard)."""
    lines = [
        f"HTTP/1.1 {status} {REASONS.get(status, '')}".encode(),
        b"content-type: application/json",
        b"content-length: " + str(len(body)).encode(),
        b"connection: close",
    ]
    lines += [k + b": " + v for k, v in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# ---- headers: in the protocol ----------------------------------------------------------------
class _HeadTooLarge(Exception):
    """Raised from a parser callback to stop reading a head over `max_header_bytes`."""


def install_protocol_guard(limits: ProxyLimits) -> bool:
    """Bound the request line + headers of uvicorn's httptools protocol in size and time.

    Patches `HttpToolsProtocol` in this process (the proxy's), once; later calls only update
    the limits. Returns False when httptools is not what uvicorn uses (its h11 protocol has a
    16 KiB bound on incomplete events of its own).
    """
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as P
    except ImportError:  # uvicorn falls back to h11
        return False
    if getattr(P, "_arbitrage_limits", None) is not None:
        P._arbitrage_limits = limits
        return True
    P._arbitrage_limits = limits
    made, received, begin, url, header, headers_done, lost, bad = (
        P.connection_made,
        P.data_received,
        P.on_message_begin,
        P.on_url,
        P.on_header,
        P.on_headers_complete,
        P.connection_lost,
        P.send_400_response,
    )

    def _arm(self, in_request: bool) -> None:
        _disarm(self)
        self._arb_timer = self.loop.call_later(self._arbitrage_limits.header_timeout_s, _expired, self, in_request)

    def _disarm(self) -> None:
        t = getattr(self, "_arb_timer", None)
        if t is not None:
            t.cancel()
            self._arb_timer = None

    def _expired(self, in_request: bool) -> None:
        self._arb_timer = None
        if self.transport is None or self.transport.is_closing():
            return
        if in_request:  # a request started but its headers did not arrive in time
            lim = self._arbitrage_limits
            self.transport.write(
                _raw_response(
                    408,
                    error_body(
                        408, f"request headers not received within {lim.header_timeout_s:g} s", "header_timeout"
                    ),
                )
            )
        self.transport.close()  # an idle new connection is closed without an answer

    def _count(self, n: int) -> None:
        self._arb_head += n
        if self._arb_head > self._arbitrage_limits.max_header_bytes:
            self._arb_reject = True
            raise _HeadTooLarge()  # httptools turns it into a parser error: uvicorn calls send_400_response

    def connection_made(self, transport):
        made(self, transport)
        self._arb_head = None  # bytes of the current request's head; None: not reading one
        self._arb_raw = 0  # bytes received while that head is unfinished
        self._arb_reject = False
        _arm(self, in_request=False)

    def on_message_begin(self):
        begin(self)
        self._arb_head, self._arb_raw = 0, 0
        _arm(self, in_request=True)

    def on_url(self, part: bytes):
        _count(self, len(part))
        url(self, part)

    def on_header(self, name: bytes, value: bytes):
        _count(self, len(name) + len(value) + 4)
        header(self, name, value)

    def on_headers_complete(self):
        self._arb_head = None
        _disarm(self)
        headers_done(self)

    def data_received(self, data: bytes):
        received(self, data)
        if self._arb_head is None or self.transport.is_closing():
            return
        self._arb_raw += len(data)  # a head still unfinished after this chunk: all of it is head
        if self._arb_raw > self._arbitrage_limits.max_header_bytes:
            self._arb_reject = True
            self.send_400_response("")

    def send_400_response(self, msg: str):
        if not self._arb_reject:
            return bad(self, msg)
        _disarm(self)
        self._arb_head = None
        self.transport.write(
            _raw_response(
                431,
                error_body(
                    431,
                    f"request line and headers over {self._arbitrage_limits.max_header_bytes} bytes",
                    "headers_too_large",
                ),
            )
        )
        self.transport.close()

    def connection_lost(self, exc):
        _disarm(self)
        lost(self, exc)

    for name, fn in (
        ("connection_made", connection_made),
        ("data_received", data_received),
        ("on_message_begin", on_message_begin),
        ("on_url", on_url),
        ("on_header", on_header),
        ("on_headers_complete", on_headers_complete),
        ("connection_lost", connection_lost),
        ("send_400_response", send_400_response),
    ):
        setattr(P, name, fn)
    return True


# ---- bodies and error answers: ASGI middleware -----------------------------------------------
def _header(scope: dict, name: bytes) -> bytes | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v
    return None


class ProxyGuard:
    """Outermost ASGI middleware of the proxy: read the body within limits, rewrite non-JSON errors."""

    def __init__(self, app, limits: ProxyLimits | None = None):
        self.app = app
        self.limits = limits or ProxyLimits.from_env()

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = (_header(scope, b"x-request-id") or b"").decode("latin-1")[:128] or uuid.uuid4().hex
        lim = self.limits
        length = _header(scope, b"content-length")
        if length is not None and (not length.strip().isdigit() or int(length) > lim.max_body_bytes):
            status = 413 if length.strip().isdigit() else 400
            msg = f"request body over {lim.max_body_bytes} bytes" if status == 413 else "invalid Content-Length header"
            return await _answer(
                send, status, f"{msg} (request id {rid})", "body_too_large" if status == 413 else None, close=True
            )
        body = await self._read_body(receive, send, rid)
        if body is None:
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then: the client's disconnect, as the proxy expects

        out = _ErrorRewriter(send, rid, lim.retry_after_s)
        try:
            await self.app(scope, replay, out.send)
        except Exception:  # the proxy failed this request: log it here, answer without details
            logger.exception("request %s failed in the proxy", rid)
        if not out.started:  # nothing was sent: the replica holding it was lost
            await out.unavailable()
        elif out.held is not None:  # a plain error whose body never ended
            await out.flush()
        elif not out.finished and out.event_stream:  # a stream cut off: end it in-band, as the app does
            await out.end_stream()

    async def _read_body(self, receive, send, rid: str) -> bytes | None:
        """The whole body, or None after answering 408 / 413 (or when the client left)."""
        lim = self.limits
        loop = asyncio.get_running_loop()
        deadline = loop.time() + lim.body_timeout_s
        chunks, size, more = [], 0, True
        while more:
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                await _answer(
                    send,
                    408,
                    f"request body not received within {lim.body_timeout_s:g} s (request id {rid})",
                    "body_timeout",
                    close=True,
                )
                return None
            if msg["type"] == "http.disconnect":
                return None
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > lim.max_body_bytes:
                await _answer(
                    send,
                    413,
                    f"request body over {lim.max_body_bytes} bytes (request id {rid})",
                    "body_too_large",
                    close=True,
                )
                return None
            chunks.append(chunk)
            more = msg.get("more_body", False)
        return b"".join(chunks)


async def _answer(
    send, status: int, message: str, code: str | None = None, close: bool = False, retry_after: int | None = None
) -> None:
    body = error_body(status, message, code)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class _ErrorRewriter:
    """Wraps `send`: responses the app wrote (JSON, SSE) pass; the proxy's plain-text errors are rewritten."""

    def __init__(self, send, rid: str, retry_after_s: int):
        self._send, self.rid, self.retry_after_s = send, rid, retry_after_s
        self.started = self.finished = self.event_stream = False
        self.held: dict[str, Any] | None = None  # a plain error's start message, until its body ends
        self._text = b""

    async def send(self, message: dict) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.started = True
            headers = dict(message.get("headers", ()))
            ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            self.event_stream = ctype == b"text/event-stream"
            if message["status"] >= 400 and ctype not in JSON_TYPES:
                self.held = message
                return
        elif kind == "http.response.body" and not message.get("more_body", False):
            self.finished = True
        if kind == "http.response.body" and self.held is not None:
            self._text += message.get("body", b"")[: 1024 - len(self._text)]
            if not message.get("more_body", False):
                held, self.held = self.held, None
                await self._rewrite(held)
            return
        await self._send(message)

    async def flush(self) -> None:
        held, self.held = self.held, None
        await self._rewrite(held)

    async def _rewrite(self, start: dict) -> None:
        status = start["status"]
        headers = dict(start.get("headers", ()))
        text = self._text.decode("utf-8", "replace")
        retry = headers.get(b"retry-after")
        code = None
        if status == 503:
            code = "backpressure" if "backpressure" in text else "unavailable"
            msg = (
                "server busy: too many requests queued; retry"
                if code == "backpressure"
                else "service temporarily unavailable; retry"
            )
        elif status == 500:  # Serve's answer for a replica lost under the request
            status, code, msg = (
                503,
                "replica_unavailable",
                "service temporarily unavailable: a replica serving this request was lost; retry",
            )
        elif status == 408:
            code, msg = "timeout", "request timed out"
        elif status == 404:
            code, msg = "not_found", "no route for this path"
        else:
            msg = REASONS.get(status, "request failed").lower()
        if status == 503 and retry is None:
            retry = str(self.retry_after_s).encode()
        logger.warning("request %s: proxy answered %s %r; sent as JSON", self.rid, start["status"], text[:200])
        self.finished = True
        await _answer(
            self._send,
            status,
            f"{msg} (request id {self.rid})",
            code,
            retry_after=int(retry) if retry is not None and retry.isdigit() else None,
        )

    async def end_stream(self) -> None:
        """Close a server-sent event stream whose replica was lost: an error event, then [DONE]."""
        logger.warning("request %s: stream cut off by a lost replica; ended in-band", self.rid)
        event = json.loads(
            error_body(
                503,
                "service temporarily unavailable: a replica serving this request "
                f"was lost; retry (request id {self.rid})",
                "replica_unavailable",
            )
        )
        body = f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n".encode()
        try:
            await self._send({"type": "http.response.body", "body": body, "more_body": False})
        except Exception:  # the client left too
            pass
        self.finished = True

    async def unavailable(self) -> None:
        self.started = True
        await _answer(
            self._send,
            503,
            f"service temporarily unavailable: a replica serving this request was lost; retry (request id {self.rid})",
            "replica_unavailable",
            retry_after=self.retry_after_s,
        )
