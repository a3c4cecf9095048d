"""The Ray Serve application: an OpenAI-compatible API over the ARBITRAGE step loop.

`build_openai_app(cfg)` turns a validated config into one Serve application of plain
deployment classes composed through deployment handles, each with its own autoscaling
config:

    ingress (OpenAIIngress, FastAPI) -> coordinator (ChainServer) -> draft, target, prm, router
    every replica ----------> metrics (MetricsHub) <---- GET /metrics on the ingress

- `ingress`: HTTP only (auth, validation, OpenAI shapes, server-sent events,
  backpressure, /health, /metrics). It imports no torch, so new replicas start in about a
  second; it autoscales on ongoing requests within `serve.min_replicas..serve.max_replicas`.
- `coordinator`: `actors.coordinator.Coordinator` hosted as a Serve deployment
  (`ChainServer`). It runs `arbitrage.loop.run_chain` -- the one loop -- for many chains
  concurrently over a `RayBackend` whose handles are Serve deployment handles, and counts
  prompt tokens with the draft and target tokenizers to refuse prompts that do not fit.
- `draft`, `target`, `prm`, `router`: `actors.model_actor.ModelActor` as deployments
  (`ServedModel`: dynamic batching inside each replica, plus metrics). Each has
  `runtime.<role>.replicas` replicas, or autoscales within `serve.autoscaling.<role>`. A judge
  PRM that reuses the target's weights is served by the `target` deployment; a
  tensor-parallel target is `TargetGroupServer` replicas, each owning one whole `TargetGroup`
  (so the target scales by whole groups).
- `metrics`: one `cluster.serve_metrics.MetricsHub` replica that sums the replicas' metric
  snapshots; the ingress renders them at `GET /metrics` (Prometheus text) on the app's port.

API choices:
- Request bodies are validated strictly (JSON types are not coerced: "10" is not an int).
  Known OpenAI fields are accepted where their value changes nothing here -- `user`,
  `logprobs: false`, `top_logprobs: 0`, `n: 1`, `response_format: {"type": "text"}`, `tools: []`,
  `tool_choice: "none"` (or "auto" with no tools), `parallel_tool_calls`, zero penalties,
  `logit_bias: {}`, `top_k` -1 or 0 and `min_p: 0` (vLLM's "off"), `repetition_penalty: 1`,
  `store: false`, `metadata`, `service_tier` auto/default; completions' `echo: false`,
  `suffix: ""`, `best_of: 1` -- and values that would change the answer are refused with 400
  naming the field, since a chain has one answer, returns no log-probabilities, calls no tools
  and stops at its final answer, EOS, `max_steps` or `max_tokens`. Unknown fields are 400.
- Sampling that cannot be computed (temperature or top_p under 1e-5, e.g. 1e-300, or top_p
  5e-324) decodes greedily (`configs.schema.sampling_law`), as vLLM treats temperature < 1e-5.
- Chat: the last user message is the problem; system (or developer) messages, joined,
  replace `prompt.system_prompt`; earlier turns are ignored (a chain solves one problem).
  Special-token text in messages (`<|im_start|>` ...) stays plain text
  (`serve.escape_special_tokens`, default on): a zero-width space after its first character
  keeps the tokenizer from reading it as a control token, so a user cannot open turns.
  Completions: `prompt` is the raw prompt, with no chat template, no system prompt and no
  escaping (the caller writes the whole prompt).
- `max_tokens` (or `max_completion_tokens`) is the chain's total token budget
  (`generation.max_total_tokens`); prompt tokens + max_tokens must fit the smaller of the
  draft and target contexts (`max_context`), else 400 before any work. A chain whose text
  still fills a context on the way (re-tokenized steps can take more tokens than were
  generated) ends there with `finish_reason: "length"`.
- Content is the chain as the models saw it: every accepted step followed by the step
  separator. A stream sends one chunk per step as soon as it is decided (its content, and
  the step's metadata under `arbitrage.step`), then a chunk with `finish_reason` and the
  chain summary, then `data: [DONE]`; their concatenated content equals the non-streamed
  content. Usage: with `stream_options.include_usage` it comes as OpenAI sends it, in a last
  chunk with `choices: []` (the others carry `usage: null`); otherwise on the finish chunk.
- `usage.prompt_tokens` is the rendered prompt's length (the larger of the draft and
  target counts); `completion_tokens` is the sum of the accepted steps' tokens.
- Isolation: a batched model call that fails is split until the failing request is alone
  (`arbitrage.batching`), so a bad request never fails the others in its batch.
- Errors use OpenAI's body `{"error": {"message", "type", "param", "code"}}`. A 5xx never
  carries a traceback, path or internal id: its message is generic and names the request id
  (Serve's `X-Request-ID`, also a response header), under which the details are logged.
- Limits (`cluster.serve_proxy`, inside Serve's HTTP proxy): headers over
  `serve.max_header_bytes` -> 431, not received within `serve.header_timeout_s` -> 408;
  bodies over `serve.max_body_bytes` -> 413, not received within `serve.body_timeout_s` ->
  408; a body is read whole by the proxy before a replica sees the request.
- Backpressure: one ingress replica holds at most `serve.max_queued_requests` requests
  (running, or waiting for a chain slot in the coordinator); one more gets 503 with a
  message and `Retry-After` at once. Serve's own `max_queued_requests` on the ingress is a
  second bound for requests still waiting for a replica in the proxy; the proxy guard turns
  Serve's plain-text 503 into the same JSON body with `Retry-After`.
- `GET /health` answers at once from a state a background task refreshes every
  `HEALTH_PERIOD_S` (200, or 503 + `Retry-After` when the coordinator has not answered for
  `HEALTH_STALE_S`).
- With `serve.api_key` set, `/v1/*` needs `Authorization: Bearer <key>` (401 otherwise);
  `/health` and `/metrics` stay open.
- Faults: a model replica that dies is replaced by Serve, and the coordinator re-sends the
  steps it had in flight (`actors.backend.RayBackend`). A coordinator replica that dies under
  a request is replaced too: the ingress runs the request again on another replica (chains
  are deterministic for a given seed) if nothing was sent to the client yet, else ends the
  stream with an in-band error. When that does not succeed within `CHAIN_ATTEMPTS`, or a
  model stayed down through every retry, the client gets 503 with `Retry-After`, never a
  hang and never a 500.
- `GET /openapi.json` documents both request bodies (the pydantic models above, `model`
  restricted to `serve.model_id`), so schema-driven fuzzers (schemathesis) can exercise them.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from actors.backend import UNAVAILABLE, is_retryable
from actors.model_actor import MAX_CONCURRENCY, ModelActor, as_config, prm_on_target
from cluster.serve_metrics import MetricSet, MetricsHub, Pusher
from cluster.serve_proxy import ProxyLimits, proxy_env
from configs.schema import ArbitrageConfig, ConfigError, PolicyName, load_config, sampling_law

logger = logging.getLogger("ray.serve")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
APP_NAME = "arbitrage"
MAX_TOKENS_LIMIT = 1_048_576  # same bound as generation.max_total_tokens
INGRESS_HEADROOM = 32  # ingress slots beyond the in-app limit, so overflow reaches the 503 path
HEALTH_PERIOD_S = 1.0  # the ingress asks the coordinator this often
HEALTH_PROBE_TIMEOUT_S = 5.0  # one probe's limit
HEALTH_STALE_S = 3.0  # no answer for this long: /health says 503
CHAIN_ATTEMPTS = 3  # tries of one request when its coordinator replica dies before answering
CHAIN_RETRY_WAIT_S = 1.0  # wait before the next try (times the try number)
REQUEST_ID: ContextVar[str] = ContextVar("arbitrage_request_id", default="-")


# ---- request models ------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ArbitrageOptions(_Strict):
    """Per-request ARBITRAGE settings: the `arbitrage` object of a request body."""

    policy: PolicyName | None = Field(default=None, description="Escalation policy; default policy.name.")
    threshold: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False,
                                    description="tau in [0, 1]; default policy.threshold.")
    max_steps: int | None = Field(default=None, ge=1, le=4096,
                                  description="Step limit of the chain; default generation.max_steps.")


class StreamOptions(_Strict):
    """OpenAI stream options."""

    include_usage: bool | None = Field(default=None, description="A last chunk with choices: [] carries usage.")


class ResponseFormat(_Strict):
    """OpenAI response_format; only plain text is produced."""

    type: Literal["text", "json_object", "json_schema"] = Field(description="Only 'text' is supported.")
    json_schema: dict[str, Any] | None = Field(default=None, description="Unsupported.")


def _refuse(name: str, value: Any, ok: bool, why: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {why} (got {value!r})")


class _CompletionBase(_Strict):
    """Fields shared by chat and text completions."""

    model: str = Field(description="Must be serve.model_id (see GET /v1/models).")
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT,
                                   description="Total token budget of the chain (generation.max_total_tokens).")
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT,
                                              description="OpenAI's newer name for max_tokens.")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False,
                                      description="0 = greedy (so is anything under 1e-5); default from config.")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False,
                                description="Nucleus mass (under 1e-5: greedy); default from config.")
    seed: int | None = Field(default=None, ge=0, le=2**62, description="Sampling seed; default from config.")
    stream: bool = Field(default=False, description="Server-sent events, one chunk per decided step.")
    stream_options: StreamOptions | None = Field(default=None, description="include_usage: a usage chunk last.")
    n: int = Field(default=1, ge=1, le=1, description="Choices per request; only 1.")
    stop: str | list[str] | None = Field(default=None, description="Unsupported: must be unset or empty.")
    user: str | None = Field(default=None, description="End-user id; accepted and ignored.")
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False,
                                           description="Only 0 is supported.")
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False,
                                            description="Only 0 is supported.")
    logit_bias: dict[str, float] | None = Field(default=None, description="Only empty is supported.")
    top_k: int | None = Field(default=None, ge=-1, le=1_000_000, description="vLLM's top_k: only -1 or 0 (off).")
    min_p: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False, description="Only 0 (off).")
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0, allow_inf_nan=False,
                                             description="vLLM's repetition_penalty: only 1 (off).")
    store: bool | None = Field(default=None, description="Only false: nothing is stored.")
    metadata: dict[str, str] | None = Field(default=None, description="Accepted and ignored.")
    service_tier: Literal["auto", "default"] | None = Field(default=None, description="Accepted and ignored.")
    arbitrage: ArbitrageOptions = Field(default_factory=ArbitrageOptions, description="Policy, tau, max_steps.")

    @model_validator(mode="after")
    def _supported(self) -> "_CompletionBase":
        if self.stop:
            raise ValueError("stop: stop sequences are not supported; a chain stops at its final answer, "
                             "EOS, arbitrage.max_steps or max_tokens")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ValueError(f"{name}: only 0 is supported, got {getattr(self, name)}")
        _refuse("logit_bias", self.logit_bias, not self.logit_bias, "only an empty map is supported")
        _refuse("top_k", self.top_k, self.top_k in (None, -1, 0), "only -1 or 0 (no top-k cut) is supported")
        _refuse("min_p", self.min_p, not self.min_p, "only 0 is supported")
        _refuse("repetition_penalty", self.repetition_penalty, self.repetition_penalty in (None, 1.0),
                "only 1 (no penalty) is supported")
        _refuse("store", self.store, not self.store, "completions are not stored; send false or omit it")
        a, b = self.max_tokens, self.max_completion_tokens
        if a is not None and b is not None and a != b:
            raise ValueError(f"max_tokens ({a}) and max_completion_tokens ({b}) disagree; send one of them")
        return self

    @property
    def token_budget(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(_Strict):
    """One part of a message's content; only text parts are supported."""

    type: Literal["text"] = Field(description="Only 'text'.")
    text: str = Field(description="The text.")


class ChatMessage(_Strict):
    """One chat message."""

    role: Literal["system", "developer", "user", "assistant"] = Field(description="Who wrote it.")
    content: str | list[TextPart] | None = Field(default=None, description="Text, or a list of text parts.")
    name: str | None = Field(default=None, description="Participant name; ignored.")

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_CompletionBase):
    """POST /v1/chat/completions: the last user message is the problem."""

    messages: list[ChatMessage] = Field(description="System message(s) and the user's problem.")
    logprobs: bool | None = Field(default=None, description="Only false: log-probabilities are not returned.")
    top_logprobs: int | None = Field(default=None, ge=0, le=20, description="Only 0.")
    response_format: ResponseFormat | None = Field(default=None, description="Only {'type': 'text'}.")
    tools: list[dict[str, Any]] | None = Field(default=None, description="Only empty: no tool calls.")
    tool_choice: str | dict[str, Any] | None = Field(default=None, description="Only 'none' (or 'auto' without tools).")
    parallel_tool_calls: bool | None = Field(default=None, description="Accepted and ignored (no tools).")
    functions: list[dict[str, Any]] | None = Field(default=None, description="Deprecated tools; only empty.")
    function_call: str | dict[str, Any] | None = Field(default=None, description="Only 'none' or 'auto'.")

    @model_validator(mode="after")
    def _has_problem(self) -> "ChatCompletionRequest":
        if not self.messages:
            raise ValueError("messages: must not be empty; send a user message with the problem")
        if not any(m.role == "user" for m in self.messages):
            raise ValueError("messages: no user message; the last user message is the problem")
        if not self.problem.strip():
            raise ValueError("messages: the last user message is empty")
        return self

    @model_validator(mode="after")
    def _no_op_fields(self) -> "ChatCompletionRequest":
        _refuse("logprobs", self.logprobs, not self.logprobs, "log-probabilities are not returned; send false")
        _refuse("top_logprobs", self.top_logprobs, not self.top_logprobs, "log-probabilities are not returned")
        fmt = self.response_format
        _refuse("response_format", fmt and fmt.model_dump(exclude_none=True), fmt is None or fmt.type == "text",
                "only {'type': 'text'} is supported")
        _refuse("tools", self.tools, not self.tools, "tool calls are not supported; send [] or omit it")
        _refuse("functions", self.functions, not self.functions, "function calls are not supported")
        _refuse("tool_choice", self.tool_choice, self.tool_choice in (None, "none", "auto"),
                "tool calls are not supported; send 'none'")
        _refuse("function_call", self.function_call, self.function_call in (None, "none", "auto"),
                "function calls are not supported; send 'none'")
        return self

    @property
    def problem(self) -> str:
        return [m for m in self.messages if m.role == "user"][-1].text

    @property
    def system(self) -> str | None:
        parts = [m.text for m in self.messages if m.role in ("system", "developer")]
        return "\n\n".join(parts) if parts else None


class CompletionRequest(_CompletionBase):
    """POST /v1/completions: the prompt is used raw (no chat template, no system prompt)."""

    prompt: str | list[str] = Field(description="The raw prompt (a string, or a list of exactly one).")
    logprobs: int | None = Field(default=None, ge=0, le=5, description="Unsupported: must be unset.")
    echo: bool | None = Field(default=None, description="Only false.")
    suffix: str | None = Field(default=None, description="Only empty.")
    best_of: int | None = Field(default=None, ge=1, le=20, description="Only 1.")

    @model_validator(mode="after")
    def _one_prompt(self) -> "CompletionRequest":
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise ValueError(f"prompt: send one prompt per request, got a list of {len(self.prompt)}")
        if not self.problem.strip():
            raise ValueError("prompt: must not be empty")
        _refuse("logprobs", self.logprobs, self.logprobs is None, "log-probabilities are not returned")
        _refuse("echo", self.echo, not self.echo, "the prompt is not echoed; send false")
        _refuse("suffix", self.suffix, not self.suffix, "suffixes are not supported")
        _refuse("best_of", self.best_of, self.best_of in (None, 1), "only 1 is supported (a chain has one answer)")
        return self

    @property
    def problem(self) -> str:
        return self.prompt[0] if isinstance(self.prompt, list) else self.prompt


# ---- response metadata ---------------------------------------------------------------------
class StepMeta(BaseModel):
    """One accepted step of a chain, as decided (mirrors `arbitrage.types.TraceStep`)."""

    index: int = Field(description="Position in the chain, from 0.")
    author: Literal["draft", "target"] = Field(description="The model whose text was kept.")
    text: str = Field(description="The step, without the separator.")
    tokens: int = Field(description="Tokens of the kept step (including its separator / EOS token).")
    stop_reason: str = Field(description="separator, eos or length.")
    escalated: bool = Field(description="The target regenerated this step.")
    wasted: bool | None = Field(description="Escalated but the target step did not score higher (needs a PRM).")
    router_prob: float | None = Field(description="Router P(target better), when the router was asked.")
    prm_draft: float | None = Field(description="PRM score of the draft step, when computed.")
    prm_target: float | None = Field(description="PRM score of the target step, when computed.")
    draft_tokens: int = Field(description="Tokens the draft generated for this step (kept or not).")
    target_tokens: int = Field(description="Tokens the target generated for this step.")
    draft_text: str | None = Field(description="The rejected draft step, when escalated.")
    wall_s: float = Field(description="Seconds spent deciding this step.")

    @classmethod
    def from_trace(cls, s: dict) -> "StepMeta":
        keep = set(cls.model_fields) - {"tokens"}
        return cls(tokens=s["num_tokens"], **{k: v for k, v in s.items() if k in keep})


class ArbitrageMeta(BaseModel):
    """Chain-level ARBITRAGE metadata of a response (the `arbitrage` field)."""

    policy: str = Field(description="Policy that decided the steps.")
    threshold: float = Field(description="tau.")
    acceptance: float = Field(description="Share of steps kept from the draft.")
    num_steps: int = Field(description="Accepted steps.")
    accepted_draft_steps: int = Field(description="Steps kept from the draft.")
    escalations: int = Field(description="Steps regenerated by the target.")
    wasted_escalations: int = Field(description="Escalations whose target step did not score higher.")
    draft_tokens: int = Field(description="Tokens generated by the draft, rejected steps included.")
    target_tokens: int = Field(description="Tokens generated by the target.")
    draft_calls: int = Field(description="Draft step calls.")
    target_calls: int = Field(description="Target step calls.")
    prm_calls: int = Field(description="PRM scoring calls.")
    router_calls: int = Field(description="Router calls.")
    stop_reason: str = Field(description="answer, eos, max_steps or max_tokens.")
    answer: str | None = Field(description="The extracted final answer, if any.")
    wall_s: float = Field(description="Seconds the chain took in the coordinator.")
    steps: list[StepMeta] | None = Field(default=None, description="Per-step metadata (non-streamed).")

    @classmethod
    def from_result(cls, r: dict, with_steps: bool = True) -> "ArbitrageMeta":
        n = r["num_steps"]
        keep = set(cls.model_fields) - {"acceptance", "steps"}
        steps = [StepMeta.from_trace(s) for s in r["steps"]] if with_steps else None
        return cls(acceptance=r["accepted_draft_steps"] / n if n else 0.0, steps=steps,
                   **{k: v for k, v in r.items() if k in keep})


class Usage(BaseModel):
    """OpenAI token usage."""

    prompt_tokens: int = Field(description="Tokens of the rendered prompt.")
    completion_tokens: int = Field(description="Tokens of the accepted steps.")
    total_tokens: int = Field(description="prompt_tokens + completion_tokens.")

    @classmethod
    def of(cls, result: dict, prompt_tokens: int) -> "Usage":
        done = sum(s["num_tokens"] for s in result["steps"])
        return cls(prompt_tokens=prompt_tokens, completion_tokens=done, total_tokens=prompt_tokens + done)


@dataclass(frozen=True)
class ChainJob:
    """One validated request, as the ingress hands it to the coordinator deployment."""

    id: str
    problem: str
    system: str | None  # None: the config's system prompt
    chat: bool  # False: raw prompt (completions)
    policy: str | None
    threshold: float | None
    max_tokens: int | None
    max_steps: int | None
    temperature: float | None
    top_p: float | None
    seed: int | None
    stream_steps: bool


# ---- errors --------------------------------------------------------------------------------
class APIError(Exception):
    """An HTTP error answered with OpenAI's error body."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             408: "timeout_error", 413: "invalid_request_error", 503: "overloaded_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def server_error(status: int, what: str, detail: str, code: str | None = None,
                 headers: dict[str, str] | None = None) -> APIError:
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

    ENDPOINTS = (("/v1/chat/completions", "chat.completions"), ("/v1/completions", "completions"),
                 ("/v1/models", "models"))

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
                    message = {**message, "headers": list(message.get("headers", ())) + [
                        (b"x-request-id", rid.encode("latin-1"))]}
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            if endpoint is not None and self.metrics is not None:
                self.metrics.inc("requests", endpoint=endpoint, status=status[0])
                self.metrics.observe("request_duration_seconds", time.perf_counter() - t0, endpoint=endpoint)


# ---- coordinator deployment ----------------------------------------------------------------
# The loop settings of the request being admitted. Read by ChainServer.settings in the chain's
# task, which copies the context when it is created (see ChainServerLogic.solve_request).
_REQUEST_SETTINGS: ContextVar[Any] = ContextVar("arbitrage_request_settings", default=None)


class ChainServerLogic:
    """The Serve half of the coordinator deployment; `chain_server_class()` mixes it into Coordinator.

    Adds per-request loop settings (token budget, sampling, prompt), prompt-length checks
    with the models' tokenizers, special-token escaping of chat messages, metrics, and
    `solve_request`, a streaming method for the ingress.
    """

    def __init__(self, cfg: dict, draft, target, prm=None, router=None, metrics=None):
        """Args: cfg: the config's dict; draft..router: deployment handles (prm/router optional);
        metrics: the MetricsHub handle (None: no metrics)."""
        handles = {r: h for r, h in (("draft", draft), ("target", target), ("prm", prm), ("router", router))
                   if h is not None}
        super().__init__(cfg, handles)  # Coordinator
        m = self.cfg.models
        self.context_tokens = min(m.draft.max_context, m.target.max_context)
        self._tokenizers = _load_tokenizers(self.cfg)
        self._escape = special_token_escaper(self._tokenizers) if self.cfg.serve.escape_special_tokens else None
        self._pusher = Pusher(metrics, self._metrics_snapshot)

    @property
    def settings(self):
        """The admitted request's LoopSettings inside its chain; else the config's."""
        return _REQUEST_SETTINGS.get() or self._base_settings

    @settings.setter
    def settings(self, value) -> None:
        self._base_settings = value

    async def solve_request(self, job: ChainJob) -> AsyncIterator[dict]:
        """Admit one request, then run its chain through `Coordinator.solve`.

        Yields `{"event": "error", "status", "message"}` for a request that cannot run, else
        `{"event": "admitted", "prompt_tokens"}`, then the step events and the result event.
        """
        self._pusher.ensure_started()
        try:
            if job.chat and self._escape is not None:
                job = replace(job, problem=self._escape(job.problem),
                              system=None if job.system is None else self._escape(job.system))
            settings = self._job_settings(job)
            self._policy(job.policy, job.threshold)
            prompt_tokens = self._check_prompt(job, settings)
        except ValueError as e:
            yield {"event": "error", "status": 400, "message": str(e)}
            return
        yield {"event": "admitted", "prompt_tokens": prompt_tokens}
        from arbitrage.loop import ChainInput

        events = self.solve(ChainInput(id=job.id, problem=job.problem), job.policy, job.threshold,
                            stream_steps=job.stream_steps)
        token = _REQUEST_SETTINGS.set(settings)
        try:
            first = await events.__anext__()  # the chain's task exists now, holding `settings`
        finally:
            _REQUEST_SETTINGS.reset(token)
        try:
            yield first
            async for event in events:
                yield event
        finally:
            await events.aclose()  # a client that went away cancels its chain

    def _job_settings(self, job: ChainJob):
        b = self._base_settings
        pick = lambda v, default: default if v is None else v  # noqa: E731
        temperature, top_p = sampling_law(pick(job.temperature, b.temperature), pick(job.top_p, b.top_p))
        return replace(b, max_total_tokens=pick(job.max_tokens, b.max_total_tokens),
                       max_steps=pick(job.max_steps, b.max_steps), temperature=temperature, top_p=top_p,
                       seed=pick(job.seed, b.seed), use_chat_template=job.chat and b.use_chat_template,
                       system_prompt=(pick(job.system, b.system_prompt) or None) if job.chat else None)

    def _check_prompt(self, job: ChainJob, s) -> int:
        """Prompt tokens (the larger tokenizer count); ValueError when prompt + budget overflow."""
        from arbitrage.engine_common import render_prompt
        from arbitrage.types import SamplingParams, StepRequest

        req = StepRequest(problem=job.problem, system=s.system_prompt, chat=s.use_chat_template,
                          params=SamplingParams(separator=s.separator))
        n = max(len(tok(render_prompt(tok, req), add_special_tokens=False)["input_ids"])
                for tok in self._tokenizers)
        if n + s.max_total_tokens > self.context_tokens:
            raise ValueError(f"this model's context is {self.context_tokens} tokens, but the prompt has {n} "
                             f"tokens and max_tokens is {s.max_total_tokens} ({n + s.max_total_tokens} in "
                             f"total); shorten the prompt or lower max_tokens")
        return n

    def _metrics_snapshot(self) -> dict:
        m = MetricSet()
        in_flight = sum(len(t) for t in self._tasks.values())
        running = self.max_concurrent - self._sem._value if self._sem is not None else 0
        m.set("chains_in_flight", in_flight)
        m.set("chains_waiting", max(0, in_flight - running))
        m.inc("step_retries", self.backend.retry_count)
        return m.snapshot()


def special_token_escaper(tokenizers: list):
    """A function that keeps the tokenizers' special tokens in a text from being read as such.

    Each occurrence of a special token's text (e.g. `<|im_start|>`) gets a zero-width space
    (U+200B) after its first character, so it tokenizes as ordinary text; repeated until none
    is left (an escape cannot join neighbours into a new one). Returns None when there are none.
    """
    specials: set[str] = set()
    for tok in tokenizers:
        specials.update(getattr(tok, "all_special_tokens", ()) or ())
        for added in (getattr(tok, "added_tokens_decoder", None) or {}).values():
            if getattr(added, "special", False):
                specials.add(str(added.content))
    specials = {t for t in specials if len(t) >= 2}
    if not specials:
        return None
    pattern = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))

    def escape(text: str) -> str:
        for _ in range(len(text)):  # each pass breaks at least one occurrence
            text, n = pattern.subn(lambda m: m.group(0)[0] + "\u200b" + m.group(0)[1:], text)
            if not n:
                break
        return text

    return escape


def _load_tokenizers(cfg: ArbitrageConfig) -> list:
    """The draft's and the target's tokenizers (one when they share a source)."""
    from arbitrage.models import load_tokenizer

    sources = {s.model_dump_json(): s for s in (cfg.models.draft.source, cfg.models.target.source)}
    return [load_tokenizer(s) for s in sources.values()]


def chain_server_class() -> type:
    """`ChainServer(ChainServerLogic, Coordinator)`, built on use so the ingress never imports torch."""
    from actors.coordinator import Coordinator

    return type("ChainServer", (ChainServerLogic, Coordinator),
                {"__doc__": "actors.coordinator.Coordinator as a Serve deployment, with per-request settings.",
                 "__module__": __name__})


# ---- model deployments ---------------------------------------------------------------------
METHOD_ROLE = {"score": "prm", "predict": "router"}  # generate_step: the replica's own role


def batch_metrics(role: str, methods: dict[str, dict], queues: dict[str, int] | None = None) -> dict:
    """A model replica's metric snapshot from its per-method batcher stats."""
    m = MetricSet()
    for method, st in methods.items():
        labels = {"role": METHOD_ROLE.get(method, role), "method": method}
        m.set_hist("batch_size", {int(k): int(v) for k, v in st.get("batch_sizes", {}).items()}, **labels)
        m.inc("batch_isolations", st.get("isolated", 0), **labels)
        if queues is not None:
            m.set("batch_queue_depth", queues.get(method, 0), **labels)
    return m.snapshot()


class ServedModel(ModelActor):
    """`ModelActor` as a Serve deployment: the same batched methods, plus metrics for the hub."""

    def __init__(self, role: str, cfg: dict, metrics=None):
        super().__init__(role, cfg)
        self._pusher = Pusher(metrics, self._metrics_snapshot)

    async def generate_step(self, req):
        self._pusher.ensure_started()
        return await super().generate_step(req)

    async def score(self, req) -> float:
        self._pusher.ensure_started()
        return await super().score(req)

    async def predict(self, req) -> float:
        self._pusher.ensure_started()
        return await super().predict(req)

    def _metrics_snapshot(self) -> dict:
        methods = {name: b.stats() for name, b in self._batchers.items()}
        queues = {name: b.queued() for name, b in self._batchers.items()}
        return batch_metrics(self.role, methods, queues)


class TargetGroupServer:
    """A tensor-parallel target (`actors.target_group.TargetGroupHost`) behind one Serve replica.

    One replica is one whole group, so autoscaling the target deployment adds or removes whole
    groups. The host restarts the whole group when a rank dies (and a watchdog does so while idle).
    """

    def __init__(self, cfg: dict, metrics=None):
        from actors.target_group import TargetGroupHost  # lazy: DeepSpeed / torch.distributed

        self.host = TargetGroupHost(cfg)
        self._stats: dict = {}
        self._pusher = Pusher(metrics, lambda: batch_metrics("target", {"generate_step": self._stats}))

    async def generate_step(self, req):
        """Decode one step on every rank (StepRequest -> StepOutput)."""
        if self._pusher.hub is not None and (self._pusher._task is None or self._pusher._task.done()):
            self._pusher.ensure_started()
            asyncio.get_running_loop().create_task(self._refresh_stats())
        return await self.host.generate_step(req)

    async def _refresh_stats(self) -> None:
        while True:
            try:
                self._stats = await self.host.stats()
            except Exception as e:  # a group restarting: keep the last figures
                logger.debug("target group stats: %s", e)
            await asyncio.sleep(1.0)

    async def health(self) -> dict:
        """The group's health (its ranks' readiness, epoch and restarts)."""
        return await self.host.health()

    async def stats(self) -> dict:
        """The group's batch statistics."""
        return await self.host.stats()

    def __del__(self):
        try:
            self.host.shutdown()
        except Exception:  # best effort: its ranks may already be gone
            pass


# ---- ingress deployment --------------------------------------------------------------------
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
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "arbitrage",
                "arbitrage": {"policy": p.name, "threshold": p.threshold, "draft": m.draft.source.name,
                              "target": m.target.source.name, "max_context": min(m.draft.max_context,
                                                                                 m.target.max_context)}}

    async def models(self, request: Request) -> dict:
        """GET /v1/models: the one served model."""
        self._authorize(request)
        return {"object": "list", "data": [self._model_card()]}

    async def model(self, request: Request) -> dict:
        """GET /v1/models/{model_id}: the served model, or 404."""
        self._authorize(request)
        model_id = request.path_params["model_id"]
        if model_id != self.model_id:
            raise APIError(404, f"the model {model_id!r} does not exist; this server serves {self.model_id!r}",
                           param="model", code="model_not_found")
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
            raise APIError(503, f"coordinator not ready: {why}", code="not_ready",
                           headers={"Retry-After": str(self.cfg.serve.retry_after_s)})
        return {"status": "ok", "model": self.model_id, "coordinator": h["info"],
                "in_flight": self.active, "max_queued_requests": self.limit}

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
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           headers=challenge)
        if not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "invalid API key", code="invalid_api_key", headers=challenge)

    async def _parse(self, request: Request, model: type[_CompletionBase]) -> _CompletionBase:
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
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves "
                                f"{self.model_id!r} (GET /v1/models)", param="model", code="model_not_found")
        return body

    def _job(self, body: _CompletionBase, chat: bool) -> ChainJob:
        a = body.arbitrage
        return ChainJob(id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", problem=body.problem,
                        system=body.system if chat else None, chat=chat, policy=a.policy,
                        threshold=a.threshold, max_tokens=body.token_budget, max_steps=a.max_steps,
                        temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                        stream_steps=body.stream)

    def _admit(self) -> None:
        if self.active >= self.limit:
            raise APIError(503, f"server busy: {self.active} requests in flight on this replica "
                                f"(serve.max_queued_requests={self.limit}); retry later",
                           code="server_busy", headers={"Retry-After": str(self.cfg.serve.retry_after_s)})
        self.active += 1

    async def _complete(self, body: _CompletionBase, chat: bool):
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
                    view = _View(job.id, self.model_id, int(time.time()), chat, self.separator,
                                 first["prompt_tokens"], body.include_usage)
                    if body.stream:
                        handed_off = True
                        return StreamingResponse(self._sse(stream, view), media_type="text/event-stream")
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

    async def _sse(self, stream, view: "_View") -> AsyncIterator[str]:
        """Server-sent events: one chunk per decided step, the final chunk(s), then [DONE]."""
        try:
            async for event in stream:
                if event["event"] == "step":
                    yield _sse(view.step_chunk(event["step"]))
                elif event["event"] == "result":
                    r = event["result"]
                    self._record(r, view.prompt_tokens)
                    if r["error"] is None:
                        for chunk in view.final_chunks(r):
                            yield _sse(chunk)
                    else:
                        yield _sse(_error_event(self._chain_error(r)))
            yield "data: [DONE]\n\n"
        except Exception as e:  # the status line is gone: report in-band
            err = self._unavailable(e) if is_retryable(e) else server_error(
                500, "internal error while streaming", f"{type(e).__name__}: {e}")
            yield _sse(_error_event(err))
            yield "data: [DONE]\n\n"
        finally:
            stream.cancel()
            self.active -= 1

    def _unavailable(self, err: BaseException) -> APIError:
        """503 for a replica lost under a request: transient, the client should retry."""
        cause = getattr(err, "cause", None)
        cause = cause if isinstance(cause, BaseException) else err
        return server_error(503, "service temporarily unavailable: a replica serving this request was lost; retry",
                            f"{type(cause).__name__}: {cause}", code="replica_unavailable",
                            headers={"Retry-After": str(self.cfg.serve.retry_after_s)})

    def _chain_error(self, r: dict) -> APIError:
        """The error answer of a chain that ended with an error (the error itself is only logged)."""
        if r["error"].startswith(UNAVAILABLE):
            return server_error(503, "service temporarily unavailable: a model stayed unreachable; retry",
                                r["error"], code="replica_unavailable",
                                headers={"Retry-After": str(self.cfg.serve.retry_after_s)})
        if r["stop_reason"] == "timeout":
            return server_error(504, "the chain timed out (runtime.chain_timeout_s)", r["error"], code="timeout")
        if r["stop_reason"] == "cancelled":
            return server_error(503, "the chain was cancelled; retry", r["error"], code="cancelled",
                                headers={"Retry-After": str(self.cfg.serve.retry_after_s)})
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
    error = {"description": "OpenAI error body", "content": {"application/json": {"schema": {
        "type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["message", "type"],
            "properties": {"message": {"type": "string"}, "type": {"type": "string"}}}}}}}}
    models = {"ChatCompletionRequest": ChatCompletionRequest, "CompletionRequest": CompletionRequest}
    for name, model in models.items():
        js = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(js.pop("$defs", {}))
        js["properties"]["model"] = {"type": "string", "enum": [model_id], "description": "serve.model_id."}
        schemas[name] = js
    for path, name in REQUEST_BODIES.items():
        op = doc["paths"][path]["post"]
        op["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{name}"}}}}
        op["responses"] = {"200": {"description": "A completion (JSON), or server-sent events when stream is true"},
                           **{str(c): error for c in (400, 401, 404, 408, 413, 503)}}
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


# ---- response shapes -----------------------------------------------------------------------
@dataclass(frozen=True)
class _View:
    """How one request's chain is rendered in OpenAI shapes (chat or text completion)."""

    id: str
    model: str
    created: int
    chat: bool
    separator: str
    prompt_tokens: int
    include_usage: bool = False  # streams: usage in a last chunk with choices: [] (OpenAI's format)

    def _envelope(self, choices: list[dict], chunk: bool) -> dict:
        obj = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        return body | ({"usage": None} if chunk and self.include_usage else {})

    def _content(self, text: str, first: bool | None = None) -> dict:
        if not self.chat:
            return {"text": text, "logprobs": None}
        if first is None:
            return {"message": {"role": "assistant", "content": text}, "logprobs": None}
        return {"delta": ({"role": "assistant"} if first else {}) | {"content": text}, "logprobs": None}

    def completion(self, r: dict) -> dict:
        content = "".join(s["text"] + self.separator for s in r["steps"])
        body = self._envelope([{"index": 0, **self._content(content), "finish_reason": finish_reason(r)}], chunk=False)
        return body | {"usage": Usage.of(r, self.prompt_tokens).model_dump(),
                       "arbitrage": ArbitrageMeta.from_result(r).model_dump()}

    def step_chunk(self, step: dict) -> dict:
        text = step["text"] + self.separator
        choice = {"index": 0, **self._content(text, first=step["index"] == 0), "finish_reason": None}
        return self._envelope([choice], chunk=True) | {"arbitrage": {"step": StepMeta.from_trace(step).model_dump()}}

    def final_chunks(self, r: dict) -> list[dict]:
        """The finish chunk (and, with include_usage, the usage chunk after it)."""
        empty = {"delta": {}, "logprobs": None} if self.chat else {"text": "", "logprobs": None}
        body = self._envelope([{"index": 0, **empty, "finish_reason": finish_reason(r)}], chunk=True)
        meta = {"arbitrage": ArbitrageMeta.from_result(r, with_steps=False).model_dump()}
        usage = {"usage": Usage.of(r, self.prompt_tokens).model_dump()}
        if not self.include_usage:
            return [body | usage | meta]
        return [body | meta, self._envelope([], chunk=True) | usage]


def finish_reason(result: dict) -> str:
    """OpenAI finish_reason: 'stop' at a final answer or EOS, 'length' at max_steps / max_tokens."""
    return "stop" if result["stop_reason"] in ("answer", "eos") else "length"


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _error_event(err: APIError) -> dict:
    return {"error": {"message": err.message, "type": APIError.TYPES.get(err.status, "server_error"),
                      "param": None, "code": err.code}}


async def _final_result(stream) -> dict:
    async for event in stream:
        if event["event"] == "result":
            return event["result"]
    raise server_error(500, "internal error", "the coordinator ended the chain without a result")


# ---- builders ------------------------------------------------------------------------------
def _roles(cfg: ArbitrageConfig) -> tuple[str, ...]:
    m = cfg.models
    return ("draft", "target") + (("prm",) if m.prm else ()) + (("router",) if m.router else ())


def role_options(role: str, cfg: ArbitrageConfig) -> dict[str, Any]:
    """Serve options of one model role: resources from `runtime.<role>`, autoscaling from
    `serve.autoscaling.<role>` (else a fixed `runtime.<role>.replicas`). A tensor-parallel
    target's replica is one whole group (its ranks reserve the resources)."""
    a = getattr(cfg.runtime, role)
    group = role == "target" and a.tensor_parallel > 1
    actor: dict[str, Any] = {"num_cpus": 0 if group else a.num_cpus, "num_gpus": 0 if group else a.num_gpus}
    if a.resources and not group:
        actor["resources"] = dict(a.resources)
    if a.label_selector and not group:
        actor["label_selector"] = dict(a.label_selector)
    sc = getattr(cfg.serve.autoscaling, role)
    if sc is None:  # model replicas load weights (slow, GPU-bound): fixed unless configured
        scaling = {"min_replicas": a.replicas, "max_replicas": a.replicas,
                   "target_ongoing_requests": a.batching.max_batch_size}
    else:
        scaling = {"min_replicas": sc.min_replicas, "max_replicas": sc.max_replicas,
                   "initial_replicas": max(sc.min_replicas, 1),
                   "target_ongoing_requests": sc.target_ongoing_requests or a.batching.max_batch_size,
                   "upscale_delay_s": sc.upscale_delay_s, "downscale_delay_s": sc.downscale_delay_s,
                   "look_back_period_s": sc.look_back_period_s,
                   # replicas report their load this often (Serve's default, 10 s, must stay under the window)
                   "metrics_interval_s": min(10.0, sc.look_back_period_s / 2)}
    return dict(name=role, ray_actor_options=actor, max_ongoing_requests=MAX_CONCURRENCY,
                max_queued_requests=-1, autoscaling_config=scaling)


def coordinator_options(cfg: ArbitrageConfig) -> dict[str, Any]:
    """Serve options of the coordinator deployment: scales on chains in flight."""
    s = cfg.serve
    scaling = {"min_replicas": 1, "max_replicas": s.max_replicas,
               "target_ongoing_requests": cfg.runtime.max_concurrent_chains}
    return dict(name="coordinator", ray_actor_options={"num_cpus": 0}, max_queued_requests=-1,
                max_ongoing_requests=s.max_queued_requests * s.max_replicas + INGRESS_HEADROOM,
                autoscaling_config=scaling)


def ingress_options(cfg: ArbitrageConfig) -> dict[str, Any]:
    """Serve options of the ingress: autoscaling from `serve`, and the backpressure bounds."""
    s = cfg.serve
    scaling = {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
               "target_ongoing_requests": s.target_ongoing_requests}
    return dict(name="ingress", ray_actor_options={"num_cpus": 0}, autoscaling_config=scaling,
                max_ongoing_requests=s.max_queued_requests + INGRESS_HEADROOM,
                max_queued_requests=s.max_queued_requests)


def metrics_options() -> dict[str, Any]:
    """Serve options of the metrics hub: one light replica."""
    return dict(name="metrics", num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000,
                max_queued_requests=-1, logging_config={"enable_access_log": False})  # a push a second per replica


def as_serve_config(cfg: ArbitrageConfig | dict | str | Path) -> ArbitrageConfig:
    """A validated config from a config, its dict, or a YAML path / preset name; ConfigError otherwise."""
    if isinstance(cfg, (str, Path)):
        cfg = load_config(cfg)
    elif isinstance(cfg, dict):
        try:
            cfg = ArbitrageConfig.model_validate(cfg)
        except ValidationError as e:
            raise ConfigError(f"config: {validation_error(e).message}") from e
    elif not isinstance(cfg, ArbitrageConfig):
        raise ConfigError(f"expected an ArbitrageConfig, a dict or a YAML path, got {type(cfg).__name__}")
    return cfg


def build_openai_app(cfg: ArbitrageConfig | dict | str | Path) -> serve.Application:
    """The OpenAI-compatible Serve application of one config.

    Args:
        cfg: an ArbitrageConfig, its dict, or a YAML path / preset name.
    Returns:
        The application (ingress bound to the coordinator, bound to the model roles; all of
        them bound to the metrics hub when `serve.metrics`).
    Raises:
        ConfigError: the config is invalid (one line naming the field).
    """
    cfg = as_serve_config(cfg)
    data = cfg.model_dump()
    tp = cfg.runtime.target.tensor_parallel > 1
    hub = serve.deployment(MetricsHub, **metrics_options()).bind() if cfg.serve.metrics else None
    roles: dict[str, Any] = {}
    for role in _roles(cfg):
        if role == "prm" and prm_on_target(cfg) and not tp:
            roles["prm"] = roles["target"]  # the judge rides on the target's weights
        elif role == "target" and tp:
            roles[role] = serve.deployment(TargetGroupServer, **role_options(role, cfg)).bind(data, metrics=hub)
        else:
            roles[role] = serve.deployment(ServedModel, **role_options(role, cfg)).bind(role, data, metrics=hub)
    chains = serve.deployment(chain_server_class(), **coordinator_options(cfg)).bind(data, **roles, metrics=hub)
    return serve.deployment(make_ingress(), **ingress_options(cfg)).bind(data, chains, metrics=hub)


class AppBuilderArgs(_Strict):
    """Arguments of `app_builder` (the `args` of an application in a Serve config file)."""

    config: str = Field(default="configs/local.yaml", description="YAML config path or preset name.")


def app_builder(args: dict) -> serve.Application:
    """Serve's application-builder entry point: `import_path: cluster.serve_app:app_builder`.

    Args:
        args: `{"config": "configs/local.yaml"}`.
    Returns:
        `build_openai_app(args["config"])`. HTTP host and port come from the Serve config's
        `http_options`, not from the arbitrage config's `serve` branch; the proxy's request
        limits from its `controller_options` (see configs/serve.yaml).
    """
    try:
        parsed = AppBuilderArgs.model_validate(args or {})
    except ValidationError as e:
        raise ConfigError(f"app_builder args: {validation_error(e).message}") from e
    return build_openai_app(parsed.config)


def serve_start_options(cfg: ArbitrageConfig) -> dict[str, Any]:
    """`serve.start` arguments: HTTP host/port, and the proxy guard (`cluster.serve_proxy`) with
    `serve.*` limits, which the controller's env hands to the proxies it starts."""
    env = proxy_env(ProxyLimits.of(cfg.serve), pythonpath=str(PROJECT_ROOT))
    return {"http_options": {"host": cfg.serve.host, "port": cfg.serve.port},
            "controller_options": {"runtime_env": {"env_vars": env}}}


def run_openai_app(cfg: ArbitrageConfig | dict | str | Path, blocking: bool = False,
                   name: str = APP_NAME, route_prefix: str = "/"):
    """Start Ray (or join `runtime.address`), start Serve on `serve.host:serve.port` with the proxy
    guard, deploy the app.

    Args:
        cfg: the config (see build_openai_app).
        blocking: keep serving until interrupted.
        name, route_prefix: Serve application name and HTTP route prefix.
    Returns:
        The ingress deployment handle (after the app is running, when not blocking).
    """
    import ray

    cfg = as_serve_config(cfg)
    app = build_openai_app(cfg)
    if not ray.is_initialized():
        rt = cfg.runtime
        if rt.address is not None:
            ray.init(address=rt.address)
        else:  # workers import the project from its root when it is not pip-installed
            ray.init(num_cpus=rt.num_cpus, runtime_env={"env_vars": {"PYTHONPATH": str(PROJECT_ROOT)}})
    serve.start(**serve_start_options(cfg))
    return serve.run(app, name=name, route_prefix=route_prefix, blocking=blocking)
