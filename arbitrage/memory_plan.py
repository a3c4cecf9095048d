"""The memory plan: for every role of a config, weights + KV cache + activations + headroom
against the GPU memory that role gets on the node type it is placed on.

`plan(cfg)` sizes each role from its model's architecture (a table of the presets' models,
else the config.json of a local folder, a packaged model or the HF cache, else a random
shape), its dtype and quantization, its engine's KV cache, and its batching:

- weights: every parameter in the role's dtype; with `quantization` int8 the linear layers
  take 1 byte a weight (+ a bf16 scale per row), int4 half a byte (+ a bf16 scale and zero
  point per 128 weights; the tinygemm layout pads in_features to a multiple of 1024); a TP rank
  holds 1/N of the layers' linears and of lm_head.
- KV cache: fast engine `(slots + 1) * max_context` tokens (slots: `ModelConfig.kv_slots`) (its static slots and the
  dummy slot, allocated at start); hf engine `kv_cache_tokens` cached plus one full batch
  (`max_batch_size * max_context`) in flight; a TP rank holds 1/N of the KV heads.
- activations: the largest forward the role runs -- fast engine one prefill chunk
  (`PREFILL_TOKENS`), hf engine and PRMs a full batch of `max_context` tokens, the router a
  batch of `max_length` -- times the widest intermediate tensors of one layer, plus the
  [B, 1, T, T] attention mask transformers builds for a padded batch, plus float32 logits.
- headroom: 1 GiB (CUDA context, cuBLAS workspace, CUDA-graph pool), +0.5 GiB for NCCL in a
  TP group, +10% of the rest (allocator fragmentation).

The GPU memory a role gets is `min(num_gpus, 1)` of one GPU of its node type: the
`ray_cluster.yaml` node type whose resources include the role's `runtime.<role>.resources`
(its `gpu-memory-gib` label), else `models.<role>.gpu_memory_gib`, else the local GPU. CPU
roles (no GPUs asked, or device cpu) and a judge PRM on the target's weights are listed but
not checked. `check(cfg)` raises one line naming the role and the numbers when a role does
not fit; `cluster.runtime.Runtime.start` and `cluster.preflight.check_models` call it, and
`arbitrage config plan --config X` prints the table.

Importable without pydantic or Ray (the GPU benchmarks read `ARCHITECTURES`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

GIB = 2**30
HEADROOM_GIB = 1.0  # CUDA context + cuBLAS workspace + CUDA-graph pool, per GPU process
TP_HEADROOM_GIB = 0.5  # NCCL buffers of a tensor-parallel rank
FRAGMENTATION = 0.10
PREFILL_TOKENS = 8192  # arbitrage.fast_engine.PREFILL_TOKENS (not imported: it pulls torch + Triton)
INT4_GROUP = 128
NODE_MEMORY_LABEL = "gpu-memory-gib"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Arch:
    """A transformer's shape, enough to count its parameters and its KV cache."""

    family: str  # llama | qwen2 (decoders with GQA; qwen2 has q/k/v biases) | bert (encoder)
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False
    head_dim: int | None = None
    max_positions: int = 4096

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in_features, out_features) of one layer's linear layers (the ones quantization and TP split)."""
        h, i = self.hidden, self.intermediate
        if self.family == "bert":
            return [(h, h)] * 4 + [(h, i), (i, h)]
        q, kv = self.heads * self.hd, self.kv_heads * self.hd
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    def layer_linear_params(self) -> int:
        """Weights of one layer's linear layers."""
        return sum(k * n for k, n in self.linear_shapes())

    def other_layer_params(self) -> int:
        """Biases and norms of one layer."""
        q, kv = self.heads * self.hd, self.kv_heads * self.hd
        bias = q + 2 * kv if self.family == "qwen2" else 0
        if self.family == "bert":
            return 4 * self.hidden + self.intermediate + self.hidden + 4 * self.hidden
        return bias + 2 * self.hidden

    def embed_params(self) -> int:
        extra = 514 * self.hidden if self.family == "bert" else 0  # positions + token types
        return self.vocab * self.hidden + extra

    def lm_head_params(self, causal_lm: bool) -> int:
        return self.vocab * self.hidden if causal_lm and not self.tied and self.family != "bert" else 0

    def params(self, causal_lm: bool = True) -> int:
        return (
            self.embed_params()
            + self.layers * (self.layer_linear_params() + self.other_layer_params())
            + self.hidden
            + self.lm_head_params(causal_lm)
        )

    def kv_bytes_per_token(self, elem: int) -> int:
        return 2 * self.layers * self.kv_heads * self.hd * elem if self.family != "bert" else 0

    def widest(self) -> int:
        """Elements per token of one layer's live intermediates (gate, up, act + q/k/v + residuals)."""
        return 3 * self.intermediate + (self.heads + 2 * self.kv_heads) * self.hd + 4 * self.hidden


_LLAMA_1B = Arch("llama", 2048, 8192, 16, 32, 8, 128256, tied=True, head_dim=64, max_positions=131072)
_LLAMA_8B = Arch("llama", 4096, 14336, 32, 32, 8, 128256, max_positions=131072)
_LLAMA_70B = Arch("llama", 8192, 28672, 80, 64, 8, 128256, max_positions=131072)
_QWEN_MATH_7B = Arch("qwen2", 3584, 18944, 28, 28, 4, 152064, max_positions=4096)
_QWEN_MATH_1_5B = Arch("qwen2", 1536, 8960, 28, 12, 2, 151936, tied=True, max_positions=4096)

# The presets' models (their config.json, which the hub would give), by hub id or packaged name.
ARCHITECTURES: dict[str, Arch] = {
    "meta-llama/Llama-3.2-1B-Instruct": _LLAMA_1B,
    "meta-llama/Llama-3.1-8B-Instruct": _LLAMA_8B,
    "meta-llama/Llama-3.1-70B-Instruct": _LLAMA_70B,
    "Qwen/Qwen2.5-Math-7B-Instruct": _QWEN_MATH_7B,
    "Qwen/Qwen2.5-Math-1.5B-Instruct": _QWEN_MATH_1_5B,
    "Skywork/Skywork-o1-Open-PRM-Qwen-2.5-1.5B": _QWEN_MATH_1_5B,
    "HuggingFaceH4/Qwen2.5-Math-1.5B-Instruct-PRM-0.2": _QWEN_MATH_1_5B,
    "qwen2.5-coder-0.5b-instruct": Arch("qwen2", 896, 4864, 24, 14, 2, 151936, tied=True, max_positions=32768),
    "qwen2.5-coder-1.5b-instruct": Arch("qwen2", 1536, 8960, 28, 12, 2, 151936, tied=True, max_positions=32768),
    "smollm2-135m-instruct": Arch("llama", 576, 1536, 30, 9, 3, 49152, tied=True, max_positions=8192),
    "all-minilm-l6-v2": Arch("bert", 384, 1536, 6, 12, 12, 30522, max_positions=512),
}


def arch_from_config(c: dict) -> Arch:
    """An `Arch` from a transformers config.json dict."""
    mt = c.get("model_type", "llama")
    family = "bert" if mt in ("bert", "roberta", "distilbert") else ("qwen2" if mt == "qwen2" else "llama")
    heads = c.get("num_attention_heads") or c.get("n_heads")
    if not heads:
        raise ValueError("config.json has no num_attention_heads: cannot plan this model's memory")
    return Arch(
        family,
        c["hidden_size"],
        c.get("intermediate_size", 4 * c["hidden_size"]),
        c["num_hidden_layers"],
        heads,
        c.get("num_key_value_heads") or heads,
        c["vocab_size"],
        tied=bool(c.get("tie_word_embeddings", False)),
        head_dim=c.get("head_dim"),
        max_positions=c.get("max_position_embeddings", 4096),
    )


def resolve_arch(source=None, name: str | None = None) -> tuple[Arch | None, str]:
    """The architecture of a `ModelSource` (or a bare name), and where it came from.

    Tried in order: the table above, a local folder's config.json, an installed packaged
    model's cached folder, the HF cache (no download), a random shape. (None, why) when none.
    """
    kind = getattr(source, "kind", None)
    name = name or getattr(source, "name", None)
    if kind == "gguf" and getattr(source, "tokenizer", None):
        name = source.tokenizer  # a GGUF of a known model: its tokenizer names the model it quantises
    if name in ARCHITECTURES:
        return ARCHITECTURES[name], "known"
    if name and kind == "random":
        from arbitrage.tiny import SHAPES

        if name in SHAPES:
            cls, kw = SHAPES[name]
            c = {
                "model_type": "bert" if cls.startswith("Bert") else cls.removesuffix("Config").lower(),
                **kw,
                "tie_word_embeddings": kw.get("tie_word_embeddings", False),
            }
            return arch_from_config(c), f"random shape {name}"
    folder = Path(name) if name else None
    if folder and (folder / "config.json").is_file():
        return arch_from_config(json.loads((folder / "config.json").read_text())), str(folder / "config.json")
    if name and "/" in name and not (folder and folder.exists()):
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(name, "config.json")
            if isinstance(hit, str):
                return arch_from_config(json.loads(Path(hit).read_text())), "HF cache"
        except Exception:  # noqa: BLE001 - no cache, no huggingface_hub: just unknown
            pass
    return None, f"size of {name!r} unknown (not a preset model, no config.json here or in the HF cache)"


# ---- the plan ---------------------------------------------------------------------------


@dataclass
class RolePlan:
    """One role's line of the plan (one TP rank for a TP target); sizes in bytes."""

    role: str
    model: str
    where: str  # "small_gpu (L4, 22.0 GiB)", "cpu", "local GPU", ...
    gpu: bool
    weights: int = 0
    kv: int = 0
    activations: int = 0
    headroom: int = 0
    budget: int | None = None  # bytes this role may use on its GPU; None: unknown
    note: str = ""
    ranks: int = 1

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.activations + self.headroom

    @property
    def fits(self) -> bool | None:
        if not self.gpu or self.budget is None:
            return None
        return self.total <= self.budget


@dataclass
class Plan:
    config: str
    roles: list[RolePlan] = field(default_factory=list)

    def failures(self) -> list[RolePlan]:
        return [r for r in self.roles if r.fits is False]


def load_node_types(cluster_yaml: str | Path | None = None) -> dict[str, dict]:
    """`available_node_types` of a cluster-launcher file (default: the project's ray_cluster.yaml)."""
    import yaml

    path = Path(cluster_yaml) if cluster_yaml else Path(__file__).resolve().parents[1] / "ray_cluster.yaml"
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text()).get("available_node_types", {})


def _node_type(actor, node_types: dict) -> tuple[str, dict] | None:
    """The one node type whose resources hold every custom resource (and labels every label) the actor asks."""
    hits = [
        (n, t)
        for n, t in node_types.items()
        if (actor.resources or actor.label_selector)
        and set(actor.resources) <= set(t.get("resources", {}))
        and all(t.get("labels", {}).get(k) == v for k, v in actor.label_selector.items())
    ]
    return hits[0] if len(hits) == 1 else None


def _gpu_budget(role: str, mc, actor, node_types: dict) -> tuple[int | None, str]:
    frac = min(actor.num_gpus, 1.0) if actor.num_gpus > 0 else 1.0
    share = "" if frac == 1 else f"{frac:g} of "
    hit = _node_type(actor, node_types)
    if hit is not None:
        name, spec = hit
        labels = spec.get("labels", {})
        if NODE_MEMORY_LABEL in labels:
            gib = float(labels[NODE_MEMORY_LABEL])
            acc = labels.get("accelerator", "GPU")
            return int(frac * gib * GIB), f"{share}{acc} {gib:g} GiB ({name})"
    if getattr(mc, "gpu_memory_gib", None):
        return int(frac * mc.gpu_memory_gib * GIB), f"{share}{mc.gpu_memory_gib:g} GiB (models.{role}.gpu_memory_gib)"
    try:
        import torch

        if torch.cuda.is_available():
            gib = torch.cuda.get_device_properties(0).total_memory / GIB
            return int(frac * gib * GIB), f"{share}local GPU {gib:.1f} GiB"
    except Exception:  # noqa: BLE001
        pass
    return None, f"{share}a GPU of unknown size (set models.{role}.gpu_memory_gib)"


def _on_gpu(device: str, actor) -> bool:
    return device.startswith("cuda") or (device == "auto" and actor.num_gpus > 0)


def _weight_bytes(arch: Arch, elem: int, quant: str, tp: int, causal_lm: bool) -> int:
    linear = arch.layers * arch.layer_linear_params()
    head = arch.lm_head_params(causal_lm)
    rest = arch.params(causal_lm) - linear - head
    shapes = arch.linear_shapes()
    if quant == "int8":  # 1 byte a weight + one bf16 scale per output row
        lin_bytes = linear + arch.layers * sum(n for _, n in shapes) * 2
    elif quant == "int4":  # tinygemm layout: in_features padded to a multiple of 1024, then half a byte
        # a weight + a bf16 scale and zero point per 128 (measured on an H200: 6.03 GB for Qwen2.5-Math-7B)
        padded = sum(-(-k // 1024) * 1024 * n for k, n in shapes)
        lin_bytes = arch.layers * (padded // 2 + padded // INT4_GROUP * 4)
    elif quant == "int4_mslk":  # torchao's plain layout: half a byte + bf16 scale and zero per 128 (5.65 GB)
        lin_bytes = linear // 2 + linear // INT4_GROUP * 4
    else:
        lin_bytes = linear * elem
    return (lin_bytes + head * elem) // tp + rest * elem


def _elem(dtype: str, gpu: bool) -> int:
    return DTYPE_BYTES.get(dtype, 2 if gpu else 4)


def _headroom(rp: RolePlan, tp: int) -> int:
    base = HEADROOM_GIB + (TP_HEADROOM_GIB if tp > 1 else 0)
    return int(base * GIB + FRAGMENTATION * (rp.weights + rp.kv + rp.activations))


def _decoder_role(role: str, mc, actor, cfg, node_types, tp: int = 1) -> RolePlan:
    gpu = _on_gpu(mc.device, actor) and getattr(mc, "engine", "hf") != "llamacpp"
    arch, origin = resolve_arch(mc.source)
    quant = getattr(mc, "quantization", "none")
    label = mc.source.name + (f" [{quant}]" if quant != "none" else "") + (f" TP={tp}" if tp > 1 else "")
    rp = RolePlan(role, label, "cpu", gpu, ranks=tp)
    if not gpu:
        rp.note = "runs on the CPU: not checked"
        return rp
    rp.budget, rp.where = _gpu_budget(role, mc, actor, node_types)
    if arch is None:
        rp.note = origin
        rp.budget = None
        return rp
    elem = _elem(mc.dtype, True)
    rp.weights = _weight_bytes(arch, elem, quant, tp, causal_lm=True)
    per_tok = arch.kv_bytes_per_token(elem) // tp
    batch = actor.batching.max_batch_size
    if mc.engine == "fast":  # the engine's own sizing rule (configs.schema.kv_slots)
        slots = mc.kv_slots
        rp.kv = (slots + 1) * mc.max_context * per_tok
        tokens = min(PREFILL_TOKENS, batch * mc.max_context)
        rp.note = f"{slots} slots x {mc.max_context} tokens"
    else:
        cached = mc.prefix_cache_tokens
        rp.kv = (cached + batch * mc.max_context) * per_tok
        tokens = batch * mc.max_context
        rp.note = f"{cached} cached + {batch} x {mc.max_context} in flight"
    rp.activations = tokens * arch.widest() * elem // tp + batch * arch.vocab * 4
    if mc.engine != "fast":  # transformers' padded-batch mask
        rp.activations += batch * mc.max_context**2 * elem
    rp.headroom = _headroom(rp, tp)
    return rp


def _encoder_role(
    role: str, mc, actor, node_types, source, tokens_per_row: int, causal_lm: bool, label: str, head_f32: bool
) -> RolePlan:
    device = getattr(mc, "device", "auto")
    gpu = _on_gpu(device, actor)
    rp = RolePlan(role, label, "cpu", gpu)
    if not gpu:
        rp.note = "runs on the CPU: not checked"
        return rp
    rp.budget, rp.where = _gpu_budget(role, mc, actor, node_types)
    arch, origin = source
    if arch is None:
        rp.note, rp.budget = origin, None
        return rp
    elem = _elem(getattr(mc, "dtype", "auto"), True)
    rp.weights = _weight_bytes(arch, elem, getattr(mc, "quantization", "none"), 1, causal_lm)
    tokens = actor.batching.max_batch_size * tokens_per_row
    rp.activations = tokens * (arch.widest() * elem + (arch.hidden * 4 if head_f32 else 0))
    rp.activations += actor.batching.max_batch_size * tokens_per_row**2 * elem  # the padded-batch mask
    if causal_lm:
        rp.activations += actor.batching.max_batch_size * arch.vocab * 4
    rp.note = f"batch {actor.batching.max_batch_size} x {tokens_per_row} tokens"
    rp.headroom = _headroom(rp, 1)
    return rp


def plan(cfg, node_types: dict | None = None) -> Plan:
    """The memory plan of an `ArbitrageConfig` (see the module docstring)."""
    node_types = load_node_types() if node_types is None else node_types
    m, rt = cfg.models, cfg.runtime
    out = Plan(cfg.name)
    out.roles.append(_decoder_role("draft", m.draft, rt.draft, cfg, node_types))
    out.roles.append(_decoder_role("target", m.target, rt.target, cfg, node_types, tp=rt.target.tensor_parallel))
    if m.prm is not None:
        if m.prm.kind == "judge" and m.prm.reuse_target:
            out.roles.append(
                RolePlan("prm", "judge on the target's weights", "with the target", False, note="counted in the target")
            )
        elif m.prm.kind == "judge":
            out.roles.append(_decoder_role("prm", m.prm, rt.prm, cfg, node_types))
        else:
            out.roles.append(
                _encoder_role(
                    "prm",
                    m.prm,
                    rt.prm,
                    node_types,
                    resolve_arch(m.prm.source),
                    m.prm.max_context,
                    False,
                    f"{m.prm.source.name} ({m.prm.kind})",
                    True,
                )
            )
    r = m.router
    if r is not None:
        if r.kind in ("probe", "hidden"):
            out.roles.append(RolePlan("router", f"{r.kind} (in each coordinator)", "cpu", False, note="no model"))
        else:
            if r.path is not None and (Path(r.path) / "config.json").is_file():
                src, label = resolve_arch(name=str(r.path)), r.path
            elif r.source is not None:
                src, label = resolve_arch(r.source), r.source.name
            elif r.backbone:
                src, label = resolve_arch(name=r.backbone), f"{r.path} (to train from {r.backbone})"
            else:
                src, label = (None, f"router {r.path} not trained yet and no models.router.backbone"), str(r.path)
            out.roles.append(_encoder_role("router", r, rt.router, node_types, src, r.max_length, False, label, False))
    return out


def _g(b: int | None) -> str:
    return "-" if not b else f"{b / GIB:.1f}"


def format_plan(p: Plan) -> str:
    """The plan as a plain-text table (GiB), one line per role."""
    head = ("role", "model", "on", "weights", "KV", "activ.", "headroom", "total", "budget", "fits", "")
    rows = [head]
    for r in p.roles:
        fits = {True: "yes", False: "NO", None: "-"}[r.fits]
        rank = " /rank" if r.ranks > 1 else ""
        rows.append(
            (
                r.role + rank,
                r.model,
                r.where,
                _g(r.weights),
                _g(r.kv),
                _g(r.activations),
                _g(r.headroom),
                _g(r.total),
                _g(r.budget),
                fits,
                r.note,
            )
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    lines = [f"memory plan for {p.config} (GiB; a TP target: one rank)"]
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def failure_message(r: RolePlan) -> str:
    """One line naming the role and the numbers."""
    return (
        f"memory plan: models.{r.role} ({r.model}) needs {r.total / GIB:.1f} GiB "
        f"(weights {r.weights / GIB:.1f} + KV {r.kv / GIB:.1f} + activations {r.activations / GIB:.1f} "
        f"+ headroom {r.headroom / GIB:.1f}) but gets {(r.budget or 0) / GIB:.1f} GiB ({r.where}); lower max_slots, "
        f"max_context or batching.max_batch_size, quantize it, or give it more GPU"
    )


def check(cfg, node_types: dict | None = None) -> Plan:
    """The plan, or a `configs.schema.ConfigError` with one line naming the first role that does not fit."""
    p = plan(cfg, node_types)
    bad = p.failures()
    if bad:
        from configs.schema import ConfigError

        raise ConfigError(failure_message(bad[0]))
    return p
