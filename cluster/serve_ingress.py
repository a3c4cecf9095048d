"""The HTTP ingress of the Serve app: auth, validation, OpenAI shapes, SSE, backpressure, health, metrics.

`OpenAIIngress` is a plain class; `make_ingress` turns it into a Serve ingress whose FastAPI
app each replica builds after its constructor (`build_fastapi_app`). It imports no torch, so
new replicas start in about a second. It hands each validated request to the coordinator
deployment (`cluster.serve_chains.ChainServer.solve_request`) as a `ChainJob`.
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve

from actors.backend import UNAVAILABLE, is_retryable
from actors.model_actor import as_config
from cluster.serve_api import ChainJob, ChatCompletionRequest, CompletionBase, CompletionRequest, ResponseView, sse
from cluster.serve_errors import (
    APIError,
    RequestContext,
    error_event,
    install_error_handlers,
    server_error,
    validation_error,
)
from cluster.serve_metrics import MetricSet, Pusher

HEALTH_PERIOD_S = 1.0  # the ingress asks the coordinator this often
HEALTH_PROBE_TIMEOUT_S = 5.0  # one probe's limit
HEALTH_STALE_S = 3.0  # no answer for this long: /health says 503
CHAIN_ATTEMPTS = 3  # tries of one request when its coordinator replica dies before answering
CHAIN_RETRY_WAIT_S = 1.0  # wait before the next try (times the try number)


class OpenAIIngress:
    """HTTP front of the app: auth, validation, OpenAI shapes, SSE, backpressure, health, metrics."""

    def __init__(self, cfg: dict, chains, metrics=None):
        """Args: cfg: the config's dict; chains: handle to the coordinator deployment; metrics: the
        MetricsHub handle (None: no /metrics)."""
        self.cfg = as_config(cfg)
        self.chains = chains
        self.model_id = self.cfg.serve.model_id
        self.separator = self.cfg.generation.step_separator
        self.limit = self.cfg.serve.max_queued_requests
        self.active = 0  # requests this replica holds (the event loop is single-threaded)
        self.created = int(time.time())
        self.hub = metrics
        self.metrics = MetricSet()
        self._pusher = Pusher(metrics, self._metrics_snapshot)
        self._health: dict[str, Any] = {"ok": None, "since": None, "info": None, "error": "not probed yet"}
        self._health_task: asyncio.Task | None = None
        self._start_background()

    def _start_background(self) -> None:
        """The health prober and the metrics pusher, on this replica's event loop (once it runs)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._health_task is None or self._health_task.done():
            self._health_task = loop.create_task(self._probe_health())
        self._pusher.ensure_started()

    # ---- endpoints ---------------------------------------------------------------------
    async def chat_completions(self, request: Request):
        """POST /v1/chat/completions."""
        return await self._complete(await self._parse(request, ChatCompletionRequest), chat=True)

    async def completions(self, request: Request):
        """POST /v1/completions."""
        return await self._complete(await self._parse(request, CompletionRequest), chat=False)

    def _model_card(self) -> dict:
        p, m = self.cfg.policy, self.cfg.models
        return {
            "id": self.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "arbitrage",
            "arbitrage": {
                "policy": p.name,
                "threshold": p.threshold,
                "draft": m.draft.source.name,
                "target": m.target.source.name,
                "max_context": min(m.draft.max_context, m.target.max_context),
            },
        }

    async def models(self, request: Request) -> dict:
        """GET /v1/models: the one served model."""
        self._authorize(request)
        return {"object": "list", "data": [self._model_card()]}

    async def model(self, request: Request) -> dict:
        """GET /v1/models/{model_id}: the served model, or 404."""
        self._authorize(request)
        model_id = request.path_params["model_id"]
        if model_id != self.model_id:
            raise APIError(
                404,
                f"the model {model_id!r} does not exist; this server serves {self.model_id!r}",
                param="model",
                code="model_not_found",
            )
        return self._model_card()

    async def health(self):
        """GET /health: at once, from the state the background prober keeps (200, or 503 + Retry-After)."""
        self._start_background()
        h = self._health
        if h["ok"] is None:  # first call of this replica: one quick probe
            await self._probe_once(timeout_s=0.8)
            h = self._health
        fresh = h["since"] is not None and time.monotonic() - h["since"] <= HEALTH_STALE_S
        if not (h["ok"] and fresh):
            why = h["error"] or f"no answer for over {HEALTH_STALE_S:g} s"
            raise APIError(
                503,
                f"coordinator not ready: {why}",
                code="not_ready",
                headers={"Retry-After": str(self.cfg.serve.retry_after_s)},
            )
        return {
            "status": "ok",
            "model": self.model_id,
            "coordinator": h["info"],
            "in_flight": self.active,
            "max_queued_requests": self.limit,
        }

    async def prometheus(self):
        """GET /metrics: every replica's metrics, summed, as Prometheus text."""
        if self.hub is None:
            raise APIError(404, "metrics are off (serve.metrics: false)")
        self._start_background()
        await self._pusher.push()  # this replica's own figures are current
        text = await asyncio.wait_for(self.hub.render.remote(), 10.0)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Serve hook, called in the replica after __init__: this replica's FastAPI app."""
        return build_fastapi_app(self)

    # ---- background -------------------------------------------------------------------
    async def _probe_once(self, timeout_s: float) -> None:
        try:
            info = await asyncio.wait_for(self.chains.health.remote(), timeout_s)
        except Exception as e:
            self._health.update(ok=False, error=f"no answer ({type(e).__name__})")
            return
        self._health.update(ok=True, since=time.monotonic(), info=info, error=None)

    async def _probe_health(self) -> None:
        while True:
            await self._probe_once(HEALTH_PROBE_TIMEOUT_S)
            await asyncio.sleep(HEALTH_PERIOD_S)

    def _metrics_snapshot(self) -> dict:
        self.metrics.set("requests_in_flight", self.active)
        self.metrics.set("request_slots", self.limit)
        return self.metrics.snapshot()

    def _record(self, r: dict, prompt_tokens: int) -> None:
        """Count one chain result."""
        m = self.metrics
        m.inc("chains", policy=r["policy"], stop_reason=r["stop_reason"])
        if r["error"] is not None:
            return
        m.observe("chain_duration_seconds", r["wall_s"], policy=r["policy"])
        if r["steps"]:
            m.observe("chain_acceptance", r["accepted_draft_steps"] / len(r["steps"]))
        for s in r["steps"]:
            m.inc("steps", author=s["author"])
            m.observe("step_duration_seconds", s["wall_s"], author=s["author"])
            if s["escalated"]:
                m.inc("escalations")
            if s["wasted"]:
                m.inc("wasted_escalations")
            if s["router_prob"] is not None:
                m.observe("router_probability", s["router_prob"])
            if s["author"] == "draft":
                m.inc("accepted_draft_tokens", s["num_tokens"])
        m.inc("draft_tokens", r["draft_tokens"])
        m.inc("target_tokens", r["target_tokens"])
        m.inc("prompt_tokens", prompt_tokens)
        m.inc("completion_tokens", sum(s["num_tokens"] for s in r["steps"]))
        for role in ("draft", "target", "prm", "router"):
            m.inc("model_calls", r[f"{role}_calls"], role=role)

    # ---- request handling --------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        key = self.cfg.serve.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        challenge = {"WWW-Authenticate": "Bearer"}
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'", headers=challenge)
        if not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "invalid API key", code="invalid_api_key", headers=challenge)

    async def _parse(self, request: Request, model: type[CompletionBase]) -> CompletionBase:
        """The validated body; 401 / 408 / 413 / 400 with a message otherwise.

        The proxy guard (`cluster.serve_proxy`) has normally read the body already, within its
        limits; these checks hold where it is not installed.
        """
        self._start_background()
        self._authorize(request)
        s = self.cfg.serve
        length = request.headers.get("content-length") or "0"
        if length.isdigit() and int(length) > s.max_body_bytes:
            raise APIError(413, f"request body over {s.max_body_bytes} bytes")
        try:
            raw = await asyncio.wait_for(request.body(), s.body_timeout_s)
        except asyncio.TimeoutError as e:
            raise APIError(408, f"request body not received within {s.body_timeout_s:g} s") from e
        if len(raw) > s.max_body_bytes:
            raise APIError(413, f"request body over {s.max_body_bytes} bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise APIError(400, f"request body is not valid UTF-8 (bad byte at offset {e.start})") from e
        if not text.strip():
            raise APIError(400, "request body is empty; send a JSON object")
        try:
            body = model.model_validate_json(text, strict=True)
        except ValidationError as e:
            raise validation_error(e) from e
        if body.model != self.model_id:
            raise APIError(
                404,
                f"the model {body.model!r} does not exist; this server serves {self.model_id!r} (GET /v1/models)",
                param="model",
                code="model_not_found",
            )
        return body

    def _job(self, body: CompletionBase, chat: bool) -> ChainJob:
        a = body.arbitrage
        return ChainJob(
            id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            problem=body.problem,
            system=body.system if chat else None,
            chat=chat,
            policy=a.policy,
            threshold=a.threshold,
            max_tokens=body.token_budget,
            max_steps=a.max_steps,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stream_steps=body.stream,
        )

    def _admit(self) -> None:
        if self.active >= self.limit:
            raise APIError(
                503,
                f"server busy: {self.active} requests in flight on this replica "
                f"(serve.max_queued_requests={self.limit}); retry later",
                code="server_busy",
                headers={"Retry-After": str(self.cfg.serve.retry_after_s)},
            )
        self.active += 1

    async def _complete(self, body: CompletionBase, chat: bool):
        """Admit, start the chain on the coordinator, answer as JSON or as server-sent events.

        A coordinator replica lost before anything reached the client: the request runs again
        (up to CHAIN_ATTEMPTS tries), then 503.
        """
        job = self._job(body, chat)
        self._admit()
        stream, handed_off = None, False  # once the SSE generator owns the slot, it releases it
        try:
            for attempt in range(1, CHAIN_ATTEMPTS + 1):
                try:
                    stream = self.chains.options(stream=True).solve_request.remote(job)
                    first = await stream.__anext__()
                    if first["event"] == "error":
                        raise APIError(first["status"], first["message"])
                    view = ResponseView(
                        job.id,
                        self.model_id,
                        int(time.time()),
                        chat,
                        self.separator,
                        first["prompt_tokens"],
                        body.include_usage,
                    )
                    if body.stream:
                        handed_off = True
                        return StreamingResponse(self._stream(stream, view), media_type="text/event-stream")
                    result = await _final_result(stream)
                    break
                except Exception as e:
                    if not is_retryable(e):
                        raise
                    if stream is not None:
                        stream.cancel()
                        stream = None
                    if attempt == CHAIN_ATTEMPTS:
                        raise self._unavailable(e) from e
                    await asyncio.sleep(CHAIN_RETRY_WAIT_S * attempt)
            self._record(result, view.prompt_tokens)
            self._raise_for_chain(result)
            return JSONResponse(view.completion(result))
        finally:
            if not handed_off:
                if stream is not None:
                    stream.cancel()  # no-op when finished; stops the chain when our client left
                self.active -= 1

    async def _stream(self, stream, view: ResponseView) -> AsyncIterator[str]:
        """Server-sent events: one chunk per decided step, the final chunk(s), then [DONE]."""
        try:
            async for event in stream:
                if event["event"] == "step":
                    yield sse(view.step_chunk(event["step"]))
                elif event["event"] == "result":
                    r = event["result"]
                    self._record(r, view.prompt_tokens)
                    if r["error"] is None:
                        for chunk in view.final_chunks(r):
                            yield sse(chunk)
                    else:
                        yield sse(error_event(self._chain_error(r)))
            yield "data: [DONE]\n\n"
        except Exception as e:  # the status line is gone: report in-band
            err = (
                self._unavailable(e)
                if is_retryable(e)
                else server_error(500, "internal error while streaming", f"{type(e).__name__}: {e}")
            )
            yield sse(error_event(err))
            yield "data: [DONE]\n\n"
        finally:
            stream.cancel()
            self.active -= 1

    def _unavailable(self, err: BaseException) -> APIError:
        """503 for a replica lost under a request: transient, the client should retry."""
        cause = getattr(err, "cause", None)
        cause = cause if isinstance(cause, BaseException) else err
        return server_error(
            503,
            "service temporarily unavailable: a replica serving this request was lost; retry",
            f"{type(cause).__name__}: {cause}",
            code="replica_unavailable",
            headers={"Retry-After": str(self.cfg.serve.retry_after_s)},
        )

    def _chain_error(self, r: dict) -> APIError:
        """The error answer of a chain that ended with an error (the error itself is only logged)."""
        if r["error"].startswith(UNAVAILABLE):
            return server_error(
                503,
                "service temporarily unavailable: a model stayed unreachable; retry",
                r["error"],
                code="replica_unavailable",
                headers={"Retry-After": str(self.cfg.serve.retry_after_s)},
            )
        if r["stop_reason"] == "timeout":
            return server_error(504, "the chain timed out (runtime.chain_timeout_s)", r["error"], code="timeout")
        if r["stop_reason"] == "cancelled":
            return server_error(
                503,
                "the chain was cancelled; retry",
                r["error"],
                code="cancelled",
                headers={"Retry-After": str(self.cfg.serve.retry_after_s)},
            )
        return server_error(500, "internal error while running the chain", r["error"], code="chain_error")

    def _raise_for_chain(self, r: dict) -> None:
        if r["error"] is not None:
            raise self._chain_error(r)


INGRESS_ROUTES: dict[str, tuple[str, list[str]]] = {
    "chat_completions": ("/v1/chat/completions", ["POST"]),
    "completions": ("/v1/completions", ["POST"]),
    "models": ("/v1/models", ["GET"]),
    "model": ("/v1/models/{model_id:path}", ["GET"]),
    "health": ("/health", ["GET"]),
    "prometheus": ("/metrics", ["GET"]),
}


def build_fastapi_app(ingress: OpenAIIngress) -> FastAPI:
    """A FastAPI app routing INGRESS_ROUTES to one ingress object's bound methods."""
    app = FastAPI(title="arbitrage", description="ARBITRAGE step-level speculative decoding, OpenAI-compatible.")
    install_error_handlers(app)
    app.add_middleware(RequestContext, metrics=ingress.metrics)
    for name, (path, methods) in INGRESS_ROUTES.items():
        app.add_api_route(path, getattr(ingress, name), methods=methods, name=name)
    schema = openapi_schema(app, ingress.model_id, ingress.cfg.serve.api_key is not None)
    app.openapi = lambda: schema
    return app


REQUEST_BODIES = {"/v1/chat/completions": "ChatCompletionRequest", "/v1/completions": "CompletionRequest"}


def openapi_schema(app: FastAPI, model_id: str, with_key: bool) -> dict:
    """FastAPI's OpenAPI document plus what the raw-Request routes hide: their JSON bodies
    (from the pydantic request models, `model` fixed to `model_id`), the bearer key, and
    the error statuses (OpenAI error body)."""
    from fastapi.openapi.utils import get_openapi

    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    error = {
        "description": "OpenAI error body",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["message", "type"],
                            "properties": {"message": {"type": "string"}, "type": {"type": "string"}},
                        }
                    },
                }
            }
        },
    }
    models = {"ChatCompletionRequest": ChatCompletionRequest, "CompletionRequest": CompletionRequest}
    for name, model in models.items():
        js = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(js.pop("$defs", {}))
        js["properties"]["model"] = {"type": "string", "enum": [model_id], "description": "serve.model_id."}
        schemas[name] = js
    for path, name in REQUEST_BODIES.items():
        op = doc["paths"][path]["post"]
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}},
        }
        op["responses"] = {
            "200": {"description": "A completion (JSON), or server-sent events when stream is true"},
            **{str(c): error for c in (400, 401, 404, 408, 413, 503)},
        }
    if with_key:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, methods in doc["paths"].items():
            if path.startswith("/v1/"):
                for op in methods.values():
                    op["security"] = [{"bearer": []}]
    return doc


def make_ingress(cls: type = OpenAIIngress) -> type:
    """`cls` as a Serve ingress whose FastAPI app each replica builds after its constructor.

    The app is late-bound (`__serve_build_asgi_app__`, built in the replica) rather than
    pickled from the driver, so routes are plain bound methods and nothing depends on
    how FastAPI resolves class-based views across processes.
    """
    return serve.ingress()(cls)


async def _final_result(stream) -> dict:
    async for event in stream:
        if event["event"] == "result":
            return event["result"]
    raise server_error(500, "internal error", "the coordinator ended the chain without a result")
