"""Errors of the Serve app's HTTP layer: OpenAI's error body, the request id, and the handlers.

A 5xx never carries a traceback, path or internal id: its message is generic and names the
request id (Serve's `X-Request-ID`), under which the details are logged. `REQUEST_ID` holds
that id for the request's task (set by `RequestContext`, read by `server_error`).
"""

from __future__ import annotations

import logging
import time
import uuid
from contextvars import ContextVar

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.serve_metrics import MetricSet

logger = logging.getLogger("ray.serve")

REQUEST_ID: ContextVar[str] = ContextVar("arbitrage_request_id", default="-")


class APIError(Exception):
    """An HTTP error answered with OpenAI's error body."""

    TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        408: "timeout_error",
        413: "invalid_request_error",
        503: "overloaded_error",
    }

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {
            "error": {
                "message": self.message,
                "type": self.TYPES.get(self.status, "server_error"),
                "param": self.param,
                "code": self.code,
            }
        }
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def server_error(
    status: int, what: str, detail: str, code: str | None = None, headers: dict[str, str] | None = None
) -> APIError:
    """A 5xx whose body says only `what` and the request id; `detail` goes to the server log."""
    rid = REQUEST_ID.get()
    logger.error("request %s: %s %s: %s", rid, status, what, detail)
    return APIError(status, f"{what} (request id {rid})", code=code, headers={**(headers or {}), "X-Request-ID": rid})


def validation_error(err: ValidationError) -> APIError:
    """A 400 naming the first bad field of a pydantic error (and how many more there are)."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {first['ctx'].get('error', msg)}")
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    if not loc:
        text = f"request body: {msg}"
    else:  # model validators already name their field
        text = msg if msg.startswith(f"{loc.split('.')[0]}:") else f"{loc}: {msg}"
    return APIError(400, text + more, param=loc or None)


def install_error_handlers(app: FastAPI) -> None:
    """Every failure answers with an OpenAI error body; bad input is never a 5xx, and a 5xx
    carries no traceback, path or internal id (the details are logged under the request id)."""

    @app.exception_handler(APIError)
    async def _api(_, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _request(_, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        return APIError(400, f"{'.'.join(map(str, first['loc']))}: {first['msg']}").response()

    @app.exception_handler(ValidationError)
    async def _pydantic(_, e: ValidationError):
        return validation_error(e).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e: StarletteHTTPException):
        if e.status_code >= 500:
            return server_error(e.status_code, "internal error", repr(e.detail)).response()
        return APIError(e.status_code, str(e.detail), headers=getattr(e, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):
        logger.exception("request %s: unhandled %s", REQUEST_ID.get(), type(e).__name__)
        return server_error(500, "internal error", f"{type(e).__name__} (traceback above)").response()


class RequestContext:
    """ASGI middleware of the ingress app: the request id (Serve's X-Request-ID) for logs and error
    bodies, and the request counter and latency of /v1/* by endpoint and status."""

    ENDPOINTS = (
        ("/v1/chat/completions", "chat.completions"),
        ("/v1/completions", "completions"),
        ("/v1/models", "models"),
    )

    def __init__(self, app, metrics: MetricSet | None):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers", ()))
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        REQUEST_ID.set(rid)  # not reset: the error handlers outside this middleware read it (one task per request)
        path = scope.get("path", "")
        endpoint = next((name for prefix, name in self.ENDPOINTS if path.startswith(prefix)), None)
        status, t0 = [500], time.perf_counter()

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                if not any(k.lower() == b"x-request-id" for k, _ in message.get("headers", ())):
                    message = {
                        **message,
                        "headers": list(message.get("headers", ())) + [(b"x-request-id", rid.encode("latin-1"))],
                    }
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            if endpoint is not None and self.metrics is not None:
                self.metrics.inc("requests", endpoint=endpoint, status=status[0])
                self.metrics.observe("request_duration_seconds", time.perf_counter() - t0, endpoint=endpoint)


def error_event(err: APIError) -> dict:
    return {
        "error": {
            "message": err.message,
            "type": APIError.TYPES.get(err.status, "server_error"),
            "param": None,
            "code": err.code,
        }
    }
