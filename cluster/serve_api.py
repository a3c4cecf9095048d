"""The OpenAI-compatible API of the Serve app: request bodies, response metadata and shapes.

Pydantic models of `POST /v1/chat/completions` and `POST /v1/completions` (strict: unknown
fields and values that would change the answer are refused, naming the field), the
`arbitrage` metadata of a response, the `ChainJob` the ingress hands the coordinator, and
`ResponseView`, which renders one chain as a completion or as stream chunks. The choices
behind them are listed in `cluster.serve_app`'s docstring.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from configs.schema import PolicyName

MAX_TOKENS_LIMIT = 1_048_576  # same bound as generation.max_total_tokens


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ArbitrageOptions(StrictModel):
    """Per-request ARBITRAGE settings: the `arbitrage` object of a request body."""

    policy: PolicyName | None = Field(default=None, description="Escalation policy; default policy.name.")
    threshold: float | None = Field(
        default=None, ge=0.0, le=1.0, allow_inf_nan=False, description="tau in [0, 1]; default policy.threshold."
    )
    max_steps: int | None = Field(
        default=None, ge=1, le=4096, description="Step limit of the chain; default generation.max_steps."
    )


class StreamOptions(StrictModel):
    """OpenAI stream options."""

    include_usage: bool | None = Field(default=None, description="A last chunk with choices: [] carries usage.")


class ResponseFormat(StrictModel):
    """OpenAI response_format; only plain text is produced."""

    type: Literal["text", "json_object", "json_schema"] = Field(description="Only 'text' is supported.")
    json_schema: dict[str, Any] | None = Field(default=None, description="Unsupported.")


def _refuse(name: str, value: Any, ok: bool, why: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {why} (got {value!r})")


class CompletionBase(StrictModel):
    """Fields shared by chat and text completions."""

    model: str = Field(description="Must be serve.model_id (see GET /v1/models).")
    max_tokens: int | None = Field(
        default=None,
        ge=1,
        le=MAX_TOKENS_LIMIT,
        description="Total token budget of the chain (generation.max_total_tokens).",
    )
    max_completion_tokens: int | None = Field(
        default=None, ge=1, le=MAX_TOKENS_LIMIT, description="OpenAI's newer name for max_tokens."
    )
    temperature: float | None = Field(
        default=None,
        ge=0.0,
        le=2.0,
        allow_inf_nan=False,
        description="0 = greedy (so is anything under 1e-5); default from config.",
    )
    top_p: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="Nucleus mass (under 1e-5: greedy); default from config.",
    )
    seed: int | None = Field(default=None, ge=0, le=2**62, description="Sampling seed; default from config.")
    stream: bool = Field(default=False, description="Server-sent events, one chunk per decided step.")
    stream_options: StreamOptions | None = Field(default=None, description="include_usage: a usage chunk last.")
    n: int = Field(default=1, ge=1, le=1, description="Choices per request; only 1.")
    stop: str | list[str] | None = Field(default=None, description="Unsupported: must be unset or empty.")
    user: str | None = Field(default=None, description="End-user id; accepted and ignored.")
    presence_penalty: float | None = Field(
        default=None, ge=-2.0, le=2.0, allow_inf_nan=False, description="Only 0 is supported."
    )
    frequency_penalty: float | None = Field(
        default=None, ge=-2.0, le=2.0, allow_inf_nan=False, description="Only 0 is supported."
    )
    logit_bias: dict[str, float] | None = Field(default=None, description="Only empty is supported.")
    top_k: int | None = Field(default=None, ge=-1, le=1_000_000, description="vLLM's top_k: only -1 or 0 (off).")
    min_p: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False, description="Only 0 (off).")
    repetition_penalty: float | None = Field(
        default=None, gt=0.0, le=10.0, allow_inf_nan=False, description="vLLM's repetition_penalty: only 1 (off)."
    )
    store: bool | None = Field(default=None, description="Only false: nothing is stored.")
    metadata: dict[str, str] | None = Field(default=None, description="Accepted and ignored.")
    service_tier: Literal["auto", "default"] | None = Field(default=None, description="Accepted and ignored.")
    arbitrage: ArbitrageOptions = Field(default_factory=ArbitrageOptions, description="Policy, tau, max_steps.")

    @model_validator(mode="after")
    def _supported(self) -> "CompletionBase":
        if self.stop:
            raise ValueError(
                "stop: stop sequences are not supported; a chain stops at its final answer, "
                "EOS, arbitrage.max_steps or max_tokens"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ValueError(f"{name}: only 0 is supported, got {getattr(self, name)}")
        _refuse("logit_bias", self.logit_bias, not self.logit_bias, "only an empty map is supported")
        _refuse("top_k", self.top_k, self.top_k in (None, -1, 0), "only -1 or 0 (no top-k cut) is supported")
        _refuse("min_p", self.min_p, not self.min_p, "only 0 is supported")
        _refuse(
            "repetition_penalty",
            self.repetition_penalty,
            self.repetition_penalty in (None, 1.0),
            "only 1 (no penalty) is supported",
        )
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


class TextPart(StrictModel):
    """One part of a message's content; only text parts are supported."""

    type: Literal["text"] = Field(description="Only 'text'.")
    text: str = Field(description="The text.")


class ChatMessage(StrictModel):
    """One chat message."""

    role: Literal["system", "developer", "user", "assistant"] = Field(description="Who wrote it.")
    content: str | list[TextPart] | None = Field(default=None, description="Text, or a list of text parts.")
    name: str | None = Field(default=None, description="Participant name; ignored.")

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(CompletionBase):
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
        _refuse(
            "response_format",
            fmt and fmt.model_dump(exclude_none=True),
            fmt is None or fmt.type == "text",
            "only {'type': 'text'} is supported",
        )
        _refuse("tools", self.tools, not self.tools, "tool calls are not supported; send [] or omit it")
        _refuse("functions", self.functions, not self.functions, "function calls are not supported")
        _refuse(
            "tool_choice",
            self.tool_choice,
            self.tool_choice in (None, "none", "auto"),
            "tool calls are not supported; send 'none'",
        )
        _refuse(
            "function_call",
            self.function_call,
            self.function_call in (None, "none", "auto"),
            "function calls are not supported; send 'none'",
        )
        return self

    @property
    def problem(self) -> str:
        return [m for m in self.messages if m.role == "user"][-1].text

    @property
    def system(self) -> str | None:
        parts = [m.text for m in self.messages if m.role in ("system", "developer")]
        return "\n\n".join(parts) if parts else None


class CompletionRequest(CompletionBase):
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
        return cls(
            acceptance=r["accepted_draft_steps"] / n if n else 0.0,
            steps=steps,
            **{k: v for k, v in r.items() if k in keep},
        )


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


@dataclass(frozen=True)
class ResponseView:
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
        return body | {
            "usage": Usage.of(r, self.prompt_tokens).model_dump(),
            "arbitrage": ArbitrageMeta.from_result(r).model_dump(),
        }

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


def sse(obj: dict) -> str:
    """One server-sent event carrying `obj` as JSON."""
    return f"data: {json.dumps(obj)}\n\n"
