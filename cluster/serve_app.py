"""The Ray Serve application: an OpenAI-compatible API over the ARBITRAGE step loop.

`build_openai_app(cfg)` turns a validated config into one Serve application of plain
deployment classes composed through deployment handles, each with its own autoscaling
config:

    ingress (OpenAIIngress, FastAPI) -> coordinator (ChainServer) -> draft, target, prm, router

- `ingress`: HTTP only (auth, validation, OpenAI shapes, server-sent events,
  backpressure). It imports no torch, so new replicas start in about a second; it
  autoscales on ongoing requests within `serve.min_replicas..serve.max_replicas`.
- `coordinator`: `actors.coordinator.Coordinator` hosted as a Serve deployment
  (`ChainServer`). It runs `arbitrage.loop.run_chain` -- the one loop -- for many chains
  concurrently over a `RayBackend` whose handles are Serve deployment handles, and counts
  prompt tokens with the draft and target tokenizers to refuse prompts that do not fit.
- `draft`, `target`, `prm`, `router`: `actors.model_actor.ModelActor` as deployments
  (dynamic batching inside each replica), `runtime.<role>.replicas` replicas each. A judge
  PRM that reuses the target's weights is served by the `target` deployment; a
  tensor-parallel target is one `TargetGroupServer` replica owning a `TargetGroup`.

API choices:
- Request bodies are validated strictly (JSON types are not coerced: "10" is not an int).
  Known OpenAI fields are accepted: `user`, `stream_options` and zero penalties are
  ignored; `n` other than 1, `stop` sequences and non-zero penalties are refused with 400
  naming the field, since a chain has one answer and stops at its final answer, EOS,
  `max_steps` or `max_tokens`. Unknown fields are refused with 400.
- Chat: the last user message is the problem; system (or developer) messages, joined,
  replace `prompt.system_prompt`; earlier turns are ignored (a chain solves one problem).
  Completions: `prompt` is the raw prompt, with no chat template and no system prompt.
- `max_tokens` (or `max_completion_tokens`) is the chain's total token budget
  (`generation.max_total_tokens`); prompt tokens + max_tokens must fit the smaller of the
  draft and target contexts (`max_context`), else 400.
- Content is the chain as the models saw it: every accepted step followed by the step
  separator. A stream sends one chunk per step as soon as it is decided (its content, and
  the step's metadata under `arbitrage.step`), then a chunk with `finish_reason`, `usage`
  and the chain summary, then `data: [DONE]`; their concatenated content equals the
  non-streamed content.
- `usage.prompt_tokens` is the rendered prompt's length (the larger of the draft and
  target counts); `completion_tokens` is the sum of the accepted steps' tokens.
- Backpressure: one ingress replica holds at most `serve.max_queued_requests` requests
  (running, or waiting for a chain slot in the coordinator); one more gets 503 with a
  message and `Retry-After` at once. Serve's own `max_queued_requests` on the ingress is a
  second bound for requests still waiting for a replica in the proxy; those get Serve's
  503 "Request dropped due to backpressure (...)" as plain text.
- With `serve.api_key` set, `/v1/*` needs `Authorization: Bearer <key>` (401 otherwise);
  `/health` stays open. Errors use OpenAI's body: `{"error": {"message", "type", ...}}`.
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
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from actors.backend import UNAVAILABLE, is_retryable
from actors.model_actor import MAX_CONCURRENCY, ModelActor, as_config, prm_on_target
from configs.schema import ArbitrageConfig, ConfigError, PolicyName, load_config

PROJECT_ROOT = Path(__file__).resolve().parent.parent
APP_NAME = "arbitrage"
MAX_BODY_BYTES = 8 * 1024 * 1024  # request bodies beyond this get 413
MAX_TOKENS_LIMIT = 1_048_576  # same bound as generation.max_total_tokens
INGRESS_HEADROOM = 32  # ingress slots beyond the in-app limit, so overflow reaches the 503 path
HEALTH_TIMEOUT_S = 10.0
CHAIN_ATTEMPTS = 3  # tries of one request when its coordinator replica dies before answering
CHAIN_RETRY_WAIT_S = 1.0  # wait before the next try (times the try number)


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
    """OpenAI stream options; accepted, the final chunk always carries usage."""

    include_usage: bool | None = Field(default=None, description="Ignored: usage is always sent.")


class _CompletionBase(_Strict):
    """Fields shared by chat and text completions."""

    model: str = Field(description="Must be serve.model_id (see GET /v1/models).")
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT,
                                   description="Total token budget of the chain (generation.max_total_tokens).")
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT,
                                              description="OpenAI's newer name for max_tokens.")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False,
                                      description="0 = greedy; default from config.")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False,
                                description="Nucleus mass; default from config.")
    seed: int | None = Field(default=None, ge=0, le=2**62, description="Sampling seed; default from config.")
    stream: bool = Field(default=False, description="Server-sent events, one chunk per decided step.")
    stream_options: StreamOptions | None = Field(default=None, description="Accepted; usage is always sent.")
    n: int = Field(default=1, ge=1, le=1, description="Choices per request; only 1.")
    stop: str | list[str] | None = Field(default=None, description="Unsupported: must be unset or empty.")
    user: str | None = Field(default=None, description="End-user id; accepted and ignored.")
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False,
                                           description="Only 0 is supported.")
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False,
                                            description="Only 0 is supported.")
    arbitrage: ArbitrageOptions = Field(default_factory=ArbitrageOptions, description="Policy, tau, max_steps.")

    @model_validator(mode="after")
    def _supported(self) -> "_CompletionBase":
        if self.stop:
            raise ValueError("stop: stop sequences are not supported; a chain stops at its final answer, "
                             "EOS, arbitrage.max_steps or max_tokens")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ValueError(f"{name}: only 0 is supported, got {getattr(self, name)}")
        a, b = self.max_tokens, self.max_completion_tokens
        if a is not None and b is not None and a != b:
            raise ValueError(f"max_tokens ({a}) and max_completion_tokens ({b}) disagree; send one of them")
        return self

    @property
    def token_budget(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens


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

    @model_validator(mode="after")
    def _has_problem(self) -> "ChatCompletionRequest":
        if not self.messages:
            raise ValueError("messages: must not be empty; send a user message with the problem")
        if not any(m.role == "user" for m in self.messages):
            raise ValueError("messages: no user message; the last user message is the problem")
        if not self.problem.strip():
            raise ValueError("messages: the last user message is empty")
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

    @model_validator(mode="after")
    def _one_prompt(self) -> "CompletionRequest":
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise ValueError(f"prompt: send one prompt per request, got a list of {len(self.prompt)}")
        if not self.problem.strip():
            raise ValueError("prompt: must not be empty")
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
             413: "invalid_request_error", 503: "overloaded_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


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
    """Every failure answers with an OpenAI error body; bad input is never a 5xx."""

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
        return APIError(e.status_code, str(e.detail), headers=getattr(e, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):
        return APIError(500, f"internal error: {type(e).__name__}: {e}").response()


# ---- coordinator deployment ----------------------------------------------------------------
# The loop settings of the request being admitted. Read by ChainServer.settings in the chain's
# task, which copies the context when it is created (see ChainServerLogic.solve_request).
_REQUEST_SETTINGS: ContextVar[Any] = ContextVar("arbitrage_request_settings", default=None)


class ChainServerLogic:
    """The Serve half of the coordinator deployment; `chain_server_class()` mixes it into Coordinator.

    Adds per-request loop settings (token budget, sampling, prompt), prompt-length checks
    with the models' tokenizers, and `solve_request`, a streaming method for the ingress.
    """

    def __init__(self, cfg: dict, draft, target, prm=None, router=None):
        """Args: cfg: the config's dict; draft..router: deployment handles (prm/router optional)."""
        handles = {r: h for r, h in (("draft", draft), ("target", target), ("prm", prm), ("router", router))
                   if h is not None}
        super().__init__(cfg, handles)  # Coordinator
        m = self.cfg.models
        self.context_tokens = min(m.draft.max_context, m.target.max_context)
        self._tokenizers = _load_tokenizers(self.cfg)

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
        try:
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
        return replace(b, max_total_tokens=pick(job.max_tokens, b.max_total_tokens),
                       max_steps=pick(job.max_steps, b.max_steps),
                       temperature=pick(job.temperature, b.temperature), top_p=pick(job.top_p, b.top_p),
                       seed=pick(job.seed, b.seed), use_chat_template=job.chat and b.use_chat_template,
                       system_prompt=(pick(job.system, b.system_prompt) or None) if job.chat else None)

    def _check_prompt(self, job: ChainJob, s) -> int:
        """Prompt tokens (the larger tokenizer count); ValueError when prompt + budget overflow."""
        from arbitrage.engine import render_prompt
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


class TargetGroupServer:
    """A tensor-parallel target (`actors.target_group.TargetGroupHost`) behind one Serve replica.

    The host restarts the whole group when a rank dies (and a watchdog does so while idle).
    """

    def __init__(self, cfg: dict):
        from actors.target_group import TargetGroupHost  # lazy: DeepSpeed / torch.distributed

        self.host = TargetGroupHost(cfg)

    async def generate_step(self, req):
        """Decode one step on every rank (StepRequest -> StepOutput)."""
        return await self.host.generate_step(req)

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
    """HTTP front of the app: auth, validation, OpenAI shapes, SSE and backpressure."""

    def __init__(self, cfg: dict, chains):
        """Args: cfg: the config's dict; chains: handle to the coordinator deployment."""
        self.cfg = as_config(cfg)
        self.chains = chains
        self.model_id = self.cfg.serve.model_id
        self.separator = self.cfg.generation.step_separator
        self.limit = self.cfg.serve.max_queued_requests
        self.active = 0  # requests this replica holds (the event loop is single-threaded)
        self.created = int(time.time())

    # ---- endpoints ---------------------------------------------------------------------
    async def chat_completions(self, request: Request):
        """POST /v1/chat/completions."""
        return await self._complete(await self._parse(request, ChatCompletionRequest), chat=True)

    async def completions(self, request: Request):
        """POST /v1/completions."""
        return await self._complete(await self._parse(request, CompletionRequest), chat=False)

    async def models(self, request: Request) -> dict:
        """GET /v1/models: the one served model."""
        self._authorize(request)
        p, m = self.cfg.policy, self.cfg.models
        return {"object": "list", "data": [{
            "id": self.model_id, "object": "model", "created": self.created, "owned_by": "arbitrage",
            "arbitrage": {"policy": p.name, "threshold": p.threshold, "draft": m.draft.source.name,
                          "target": m.target.source.name, "max_context": min(m.draft.max_context,
                                                                             m.target.max_context)}}]}

    async def health(self) -> dict:
        """GET /health: 200 when the coordinator deployment answers, else 503."""
        try:
            h = await asyncio.wait_for(self.chains.health.remote(), HEALTH_TIMEOUT_S)
        except Exception as e:
            raise APIError(503, f"coordinator not ready: {type(e).__name__}: {e}".splitlines()[0]) from e
        return {"status": "ok", "model": self.model_id, "coordinator": h,
                "in_flight": self.active, "max_queued_requests": self.limit}

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Serve hook, called in the replica after __init__: this replica's FastAPI app."""
        return build_fastapi_app(self)

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
        """The validated body; 401 / 413 / 400 with a message otherwise."""
        self._authorize(request)
        if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
            raise APIError(413, f"request body over {MAX_BODY_BYTES} bytes")
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise APIError(413, f"request body over {MAX_BODY_BYTES} bytes")
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
                           headers={"Retry-After": "1"})
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
                                 first["prompt_tokens"])
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
                        raise _unavailable(e) from e
                    await asyncio.sleep(CHAIN_RETRY_WAIT_S * attempt)
            _raise_for_chain(result)
            return JSONResponse(view.completion(result))
        finally:
            if not handed_off:
                if stream is not None:
                    stream.cancel()  # no-op when finished; stops the chain when our client left
                self.active -= 1

    async def _sse(self, stream, view: "_View") -> AsyncIterator[str]:
        """Server-sent events: one chunk per decided step, the final chunk, then [DONE]."""
        try:
            async for event in stream:
                if event["event"] == "step":
                    yield _sse(view.step_chunk(event["step"]))
                elif event["event"] == "result":
                    r = event["result"]
                    yield _sse(view.final_chunk(r) if r["error"] is None else _chain_error_body(r))
            yield "data: [DONE]\n\n"
        except Exception as e:  # the status line is gone: report in-band
            err = _unavailable(e) if is_retryable(e) else APIError(500, f"internal error: {type(e).__name__}: {e}")
            yield _sse({"error": {"message": err.message, "type": APIError.TYPES.get(err.status, "server_error"),
                                  "param": None, "code": err.code}})
            yield "data: [DONE]\n\n"
        finally:
            stream.cancel()
            self.active -= 1


INGRESS_ROUTES: dict[str, tuple[str, list[str]]] = {
    "chat_completions": ("/v1/chat/completions", ["POST"]),
    "completions": ("/v1/completions", ["POST"]),
    "models": ("/v1/models", ["GET"]),
    "health": ("/health", ["GET"]),
}


def build_fastapi_app(ingress: OpenAIIngress) -> FastAPI:
    """A FastAPI app routing INGRESS_ROUTES to one ingress object's bound methods."""
    app = FastAPI(title="arbitrage", description="ARBITRAGE step-level speculative decoding, OpenAI-compatible.")
    install_error_handlers(app)
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
                           **{str(c): error for c in (400, 401, 404, 413, 503)}}
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

    def _envelope(self, choice: dict, chunk: bool) -> dict:
        obj = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": [{"index": 0, **choice}]}

    def _content(self, text: str, first: bool | None = None) -> dict:
        if not self.chat:
            return {"text": text, "logprobs": None}
        if first is None:
            return {"message": {"role": "assistant", "content": text}}
        return {"delta": ({"role": "assistant"} if first else {}) | {"content": text}}

    def completion(self, r: dict) -> dict:
        content = "".join(s["text"] + self.separator for s in r["steps"])
        body = self._envelope({**self._content(content), "finish_reason": finish_reason(r)}, chunk=False)
        return body | {"usage": Usage.of(r, self.prompt_tokens).model_dump(),
                       "arbitrage": ArbitrageMeta.from_result(r).model_dump()}

    def step_chunk(self, step: dict) -> dict:
        text = step["text"] + self.separator
        body = self._envelope({**self._content(text, first=step["index"] == 0), "finish_reason": None}, chunk=True)
        return body | {"arbitrage": {"step": StepMeta.from_trace(step).model_dump()}}

    def final_chunk(self, r: dict) -> dict:
        empty = {"delta": {}} if self.chat else {"text": "", "logprobs": None}
        body = self._envelope({**empty, "finish_reason": finish_reason(r)}, chunk=True)
        return body | {"usage": Usage.of(r, self.prompt_tokens).model_dump(),
                       "arbitrage": ArbitrageMeta.from_result(r, with_steps=False).model_dump()}


def finish_reason(result: dict) -> str:
    """OpenAI finish_reason: 'stop' at a final answer or EOS, 'length' at max_steps / max_tokens."""
    return "stop" if result["stop_reason"] in ("answer", "eos") else "length"


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _final_result(stream) -> dict:
    async for event in stream:
        if event["event"] == "result":
            return event["result"]
    raise APIError(500, "the coordinator ended the chain without a result")


def _chain_error_body(r: dict) -> dict:
    return {"error": {"message": f"chain {r['stop_reason']}: {r['error']}", "type": "server_error",
                      "param": None, "code": r["stop_reason"]}}


def _unavailable(err: BaseException) -> APIError:
    """503 for a replica lost under a request: transient, the client should retry."""
    cause = getattr(err, "cause", None)
    cause = cause if isinstance(cause, BaseException) else err
    return APIError(503, f"service temporarily unavailable: a replica serving this request was lost "
                         f"({type(cause).__name__}); retry", code="replica_unavailable", headers={"Retry-After": "1"})


def _raise_for_chain(r: dict) -> None:
    if r["error"] is not None and r["error"].startswith(UNAVAILABLE):
        raise APIError(503, f"service temporarily unavailable: {r['error']}; retry", code="replica_unavailable",
                       headers={"Retry-After": "1"})
    if r["error"] is not None:
        raise APIError(504 if r["stop_reason"] == "timeout" else 500, _chain_error_body(r)["error"]["message"],
                       code=r["stop_reason"])


# ---- builders ------------------------------------------------------------------------------
def _roles(cfg: ArbitrageConfig) -> tuple[str, ...]:
    m = cfg.models
    return ("draft", "target") + (("prm",) if m.prm else ()) + (("router",) if m.router else ())


def role_options(role: str, cfg: ArbitrageConfig) -> dict[str, Any]:
    """Serve options of one model role from `runtime.<role>`: resources, fixed-size autoscaling."""
    a = getattr(cfg.runtime, role)
    group = role == "target" and a.tensor_parallel > 1  # the ranks reserve the resources
    actor: dict[str, Any] = {"num_cpus": 0 if group else a.num_cpus, "num_gpus": 0 if group else a.num_gpus}
    if a.resources and not group:
        actor["resources"] = dict(a.resources)
    if a.label_selector and not group:
        actor["label_selector"] = dict(a.label_selector)
    # Model replicas load weights (slow, GPU-bound): the bounds are runtime.<role>.replicas.
    scaling = {"min_replicas": a.replicas, "max_replicas": a.replicas,
               "target_ongoing_requests": a.batching.max_batch_size}
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
    s = cfg.serve
    if s.min_replicas > s.max_replicas:
        raise ConfigError(f"serve.min_replicas ({s.min_replicas}) exceeds serve.max_replicas "
                          f"({s.max_replicas}); raise max_replicas or lower min_replicas")
    return cfg


def build_openai_app(cfg: ArbitrageConfig | dict | str | Path) -> serve.Application:
    """The OpenAI-compatible Serve application of one config.

    Args:
        cfg: an ArbitrageConfig, its dict, or a YAML path / preset name.
    Returns:
        The application (ingress bound to the coordinator, bound to the model roles).
    Raises:
        ConfigError: the config is invalid (one line naming the field).
    """
    cfg = as_serve_config(cfg)
    data = cfg.model_dump()
    tp = cfg.runtime.target.tensor_parallel > 1
    roles: dict[str, Any] = {}
    for role in _roles(cfg):
        if role == "prm" and prm_on_target(cfg) and not tp:
            roles["prm"] = roles["target"]  # the judge rides on the target's weights
        elif role == "target" and tp:
            roles[role] = serve.deployment(TargetGroupServer, **role_options(role, cfg)).bind(data)
        else:
            roles[role] = serve.deployment(ModelActor, **role_options(role, cfg)).bind(role, data)
    chains = serve.deployment(chain_server_class(), **coordinator_options(cfg)).bind(data, **roles)
    return serve.deployment(make_ingress(), **ingress_options(cfg)).bind(data, chains)


class AppBuilderArgs(_Strict):
    """Arguments of `app_builder` (the `args` of an application in a Serve config file)."""

    config: str = Field(default="configs/local.yaml", description="YAML config path or preset name.")


def app_builder(args: dict) -> serve.Application:
    """Serve's application-builder entry point: `import_path: cluster.serve_app:app_builder`.

    Args:
        args: `{"config": "configs/local.yaml"}`.
    Returns:
        `build_openai_app(args["config"])`. HTTP host and port come from the Serve config's
        `http_options`, not from the arbitrage config's `serve` branch.
    """
    try:
        parsed = AppBuilderArgs.model_validate(args or {})
    except ValidationError as e:
        raise ConfigError(f"app_builder args: {validation_error(e).message}") from e
    return build_openai_app(parsed.config)


def run_openai_app(cfg: ArbitrageConfig | dict | str | Path, blocking: bool = False,
                   name: str = APP_NAME, route_prefix: str = "/"):
    """Start Ray (or join `runtime.address`), start Serve on `serve.host:serve.port`, deploy the app.

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
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    return serve.run(app, name=name, route_prefix=route_prefix, blocking=blocking)
