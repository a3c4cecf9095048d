"""The Ray Serve application: an OpenAI-compatible API over the ARBITRAGE step loop.

`build_openai_app(cfg)` turns a validated config into one Serve application of plain
deployment classes composed through deployment handles, each with its own autoscaling
config:

    ingress (OpenAIIngress, FastAPI) -> coordinator (ChainServer) -> draft, target, prm, router
    every replica ----------> metrics (MetricsHub) <---- GET /metrics on the ingress

(or `-> colocated`, one deployment holding every role, when `runtime.placement()` is colocated:
the draft and target share one GPU; `cluster.serve_models.ServedColocated`)

- `ingress`: HTTP only (auth, validation, OpenAI shapes, server-sent events,
  backpressure, /health, /metrics). It imports no torch, so new replicas start in about a
  second; it autoscales on ongoing requests within `serve.min_replicas..serve.max_replicas`.
- `coordinator`: `cluster.serve_chains.ChainServer`, holding one
  `actors.coordinator.Coordinator`. It runs `arbitrage.loop.run_chain` -- the one loop -- for many chains
  concurrently over a `RayBackend` whose handles are Serve deployment handles, and counts
  prompt tokens with the draft and target tokenizers to refuse prompts that do not fit.
- `draft`, `target`, `prm`, `router`: `actors.model_actor.ModelActor` as deployments
  (`cluster.serve_models.ServedModel`: dynamic batching inside each replica, plus metrics). Each has
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

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError
from ray import serve

from actors.model_actor import MAX_CONCURRENCY, prm_on_target
from arbitrage.roles import configured_roles
from cluster.serve_api import StrictModel
from cluster.serve_chains import ChainServer
from cluster.serve_errors import validation_error
from cluster.serve_ingress import make_ingress
from cluster.serve_metrics import MetricsHub
from cluster.serve_models import ServedColocated, ServedModel, TargetGroupServer
from cluster.serve_proxy import ProxyLimits, proxy_env
from configs.schema import ArbitrageConfig, ConfigError, load_config

PROJECT_ROOT = Path(__file__).resolve().parent.parent
APP_NAME = "arbitrage"
INGRESS_HEADROOM = 32  # ingress slots beyond the in-app limit, so overflow reaches the 503 path


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
        scaling = {
            "min_replicas": a.replicas,
            "max_replicas": a.replicas,
            "target_ongoing_requests": a.batching.max_batch_size,
        }
    else:
        scaling = {
            "min_replicas": sc.min_replicas,
            "max_replicas": sc.max_replicas,
            "initial_replicas": max(sc.min_replicas, 1),
            "target_ongoing_requests": sc.target_ongoing_requests or a.batching.max_batch_size,
            "upscale_delay_s": sc.upscale_delay_s,
            "downscale_delay_s": sc.downscale_delay_s,
            "look_back_period_s": sc.look_back_period_s,
            # replicas report their load this often (Serve's default, 10 s, must stay under the window)
            "metrics_interval_s": min(10.0, sc.look_back_period_s / 2),
        }
    return dict(
        name=role,
        ray_actor_options=actor,
        max_ongoing_requests=MAX_CONCURRENCY,
        max_queued_requests=-1,
        autoscaling_config=scaling,
    )


def colocated_serve_options(cfg: ArbitrageConfig) -> dict[str, Any]:
    """Serve options of the colocated deployment (`runtime.layout` colocated, or auto on one GPU):
    the roles' resources summed as the colocated actor's (`colocated_options`), the target's
    replicas / autoscaling (a replica holds every role)."""
    from actors.colocated_actor import colocated_options

    opts = role_options("target", cfg)
    actor = colocated_options(cfg)
    opts["name"] = "colocated"
    opts["ray_actor_options"] = {
        k: actor[k] for k in ("num_cpus", "num_gpus", "resources", "label_selector") if k in actor
    }
    return opts


def coordinator_options(cfg: ArbitrageConfig) -> dict[str, Any]:
    """Serve options of the coordinator deployment: scales on chains in flight."""
    s = cfg.serve
    scaling = {
        "min_replicas": 1,
        "max_replicas": s.max_replicas,
        "target_ongoing_requests": cfg.runtime.max_concurrent_chains,
    }
    return dict(
        name="coordinator",
        ray_actor_options={"num_cpus": 0},
        max_queued_requests=-1,
        max_ongoing_requests=s.max_queued_requests * s.max_replicas + INGRESS_HEADROOM,
        autoscaling_config=scaling,
    )


def ingress_options(cfg: ArbitrageConfig) -> dict[str, Any]:
    """Serve options of the ingress: autoscaling from `serve`, and the backpressure bounds."""
    s = cfg.serve
    scaling = {
        "min_replicas": s.min_replicas,
        "max_replicas": s.max_replicas,
        "target_ongoing_requests": s.target_ongoing_requests,
    }
    return dict(
        name="ingress",
        ray_actor_options={"num_cpus": 0},
        autoscaling_config=scaling,
        max_ongoing_requests=s.max_queued_requests + INGRESS_HEADROOM,
        max_queued_requests=s.max_queued_requests,
    )


def metrics_options() -> dict[str, Any]:
    """Serve options of the metrics hub: one light replica."""
    return dict(
        name="metrics",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=1000,
        max_queued_requests=-1,
        logging_config={"enable_access_log": False},
    )  # a push a second per replica


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
    if cfg.runtime.placement() == "colocated":  # every role in one replica (one GPU)
        models = serve.deployment(ServedColocated, **colocated_serve_options(cfg)).bind(data, metrics=hub)
        chains = serve.deployment(ChainServer, **coordinator_options(cfg)).bind(data, colocated=models, metrics=hub)
        return serve.deployment(make_ingress(), **ingress_options(cfg)).bind(data, chains, metrics=hub)
    roles: dict[str, Any] = {}
    for role in configured_roles(cfg):
        if role == "prm" and prm_on_target(cfg) and not tp:
            roles["prm"] = roles["target"]  # the judge rides on the target's weights
        elif role == "target" and tp:
            roles[role] = serve.deployment(TargetGroupServer, **role_options(role, cfg)).bind(data, metrics=hub)
        else:
            roles[role] = serve.deployment(ServedModel, **role_options(role, cfg)).bind(role, data, metrics=hub)
    chains = serve.deployment(ChainServer, **coordinator_options(cfg)).bind(data, **roles, metrics=hub)
    return serve.deployment(make_ingress(), **ingress_options(cfg)).bind(data, chains, metrics=hub)


class AppBuilderArgs(StrictModel):
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
    return {
        "http_options": {"host": cfg.serve.host, "port": cfg.serve.port},
        "controller_options": {"runtime_env": {"env_vars": env}},
    }


def run_openai_app(
    cfg: ArbitrageConfig | dict | str | Path, blocking: bool = False, name: str = APP_NAME, route_prefix: str = "/"
):
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
