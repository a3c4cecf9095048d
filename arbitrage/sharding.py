"""One rank's shard of a tensor-parallel causal LM, built without Ray (DeepSpeed AutoTP + our loader).

The model is always built on the `meta` device (no memory), then DeepSpeed AutoTP
(`deepspeed.init_inference(model, tensor_parallel={"tp_size": N}, dtype=...,
replace_with_kernel_inject=False)`) swaps the Linear layers for its tensor-parallel ones:
q/k/v/gate/up column-parallel (output dim split), o_proj/down_proj and lm_head row-parallel
(input dim split, all-reduce after; AutoTP splits in grains of 64, so a tiny head may be
uneven); embeddings and norms stay replicated. Only contiguous splits are supported (models
with separate q/k/v and gate/up projections: Llama, Qwen2, Mistral). AutoTP handles meta
tensors only half way: it slices them, still on meta, and would then `to_empty` the model
(uninitialised memory); its own meta checkpoint loading needs kernel injection and its own
checkpoint format. So we keep AutoTP's layers and partition metadata, skip its `to_empty`,
and fill each parameter ourselves at shard size, straight on the rank's device
(`shard_plan` -> `materialize_`). Where the values come from:

- source kind "random" (named shapes, e.g. "llama-3.1-70b"): `RandomWeights`, a seeded
  generator per (tensor, block of rows), so a slice of any tensor is computed without the
  rest: the union of the ranks' shards equals the TP=1 model built by the same code
  (`load_tp_causal_lm(cfg, tp_size=1)`), whatever N. Values are normal(0,
  initializer_range) like HF's init, but NOT the values of `arbitrage.tiny.random_causal_lm`
  at the same seed; they differ between CPU and CUDA generators.
- "local", "gguf", "packaged" (a safetensors folder; gguf and packaged models are converted
  once by `arbitrage.models.model_folder`, which dequantises the whole model in rank 0's
  host memory that one time) and "hub" (a snapshot of json + safetensors): rank 0
  prepares the folder first, then `SafetensorsWeights` on every rank reads only its slice of
  each tensor (`safe_open(...).get_slice(key)[a:b]`). `.bin`-only checkpoints are refused.

Memory per rank: its slices of every column/row-parallel weight (about 1/N of the layers and
of lm_head), plus full copies of the replicated tensors (input embedding, norms, rotary
buffers), plus the KV of its heads. Transient: a row block (~16 MiB fp32, two temporaries)
while generating random weights; one tensor slice while reading a checkpoint (safetensors is
memory-mapped, so the OS page cache may hold file pages it read). No rank ever holds the
whole model. With TP=1 (or `tp_size=1` in-process) DeepSpeed is not used.

The rank serves its shard with the engine its config names (`arbitrage.models.wrap_engine`):
`engine: fast` gets `tp_layout(model, N)` (it all-reduces after o_proj, down and lm_head
itself, inside its CUDA graphs), `hf` runs AutoTP's own layers (eager). The Ray side --
rank actors, the group, restarts -- is `actors.target_group`.

Imports: torch only at module level; DeepSpeed, transformers and the config schema are
imported where used.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from configs.schema import ModelConfig

ROW_BLOCK_ELEMENTS = 1 << 22  # random weights are generated in blocks of rows of ~4M elements
# Hub snapshot of a TP target: configs, safetensors weights and the tokenizer files.
TP_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]


@dataclass(frozen=True)
class ShardSlice:
    """The part of one full (unsplit) tensor that a rank holds."""

    key: str  # name of the full tensor in the checkpoint / random-init namespace
    full_shape: tuple[int, ...]
    dim: int | None = None  # split dimension; None = the whole tensor (replicated)
    start: int = 0
    stop: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        if self.dim is None:
            return self.full_shape
        return tuple(self.stop - self.start if d == self.dim else n for d, n in enumerate(self.full_shape))


def build_meta_model(hf_config, dtype: torch.dtype):
    """A causal LM from a transformers config, on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    return model.eval()


def tied_keys(model) -> dict[str, str]:
    """{output-embedding weight name: input-embedding weight name} when the two are tied.

    AutoTP unties them (lm_head becomes row-parallel); mapping the head onto the embedding's
    key keeps its values equal to the tied model's, and finds it in checkpoints that store
    only the embedding.
    """
    cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    if not getattr(cfg, "tie_word_embeddings", False):
        return {}
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    if out is None or inp is None or id(out) not in names:
        return {}
    return {f"{names[id(out)]}.weight": f"{names[id(inp)]}.weight"}


def apply_autotp(model, tp_size: int, dtype: torch.dtype):
    """Shard a meta-device model in place with DeepSpeed AutoTP; parameters stay on meta.

    torch.distributed must be initialised with world size `tp_size` (the whole world is the
    TP group). No-op for tp_size 1.
    """
    if tp_size <= 1:
        return model
    if not torch.cuda.is_available():
        _patch_deepspeed_for_cpu()
    import deepspeed

    # init_inference would `to_empty` a meta model (uninitialised memory, every tensor);
    # materialize_ fills each shard instead, so keep it on meta here.
    model.to_empty = lambda *args, **kwargs: model
    try:
        deepspeed.init_inference(
            model, tensor_parallel={"tp_size": tp_size}, dtype=dtype, replace_with_kernel_inject=False
        )
    finally:
        del model.to_empty
    return model


def _patch_deepspeed_for_cpu() -> None:
    """Route DeepSpeed's inference all-reduce to torch.distributed (gloo) in this process.

    DeepSpeed's shared-memory all-reduce op segfaults on our CPUs, and building it costs
    ~100 s of JIT compilation on a fresh machine; without it DeepSpeed uses the process group.
    """
    import importlib

    # `import deepspeed.comm.torch as m` would bind deepspeed.comm's `torch` attribute (torch itself).
    ds_torch = importlib.import_module("deepspeed.comm.torch")

    def inference_all_reduce(self, tensor, op, group=None):
        return torch.distributed.all_reduce(tensor, op=self._reduce_op(op), group=group)

    setattr(ds_torch, "build_shm_op", lambda: None)  # a module global DeepSpeed's stubs do not declare
    ds_torch.TorchBackend.inference_all_reduce = inference_all_reduce


def _autotp_meta(param) -> dict | None:
    try:
        from deepspeed.checkpoint.constants import DS_AUTOTP_UC_META
    except ImportError:  # no DeepSpeed: nothing was sharded
        return None
    return getattr(param, DS_AUTOTP_UC_META, None)


def _param_slice(key: str, param, module) -> ShardSlice:
    """Which slice of the full tensor `param` (a possibly AutoTP-sharded parameter) holds."""
    meta = _autotp_meta(param)
    if meta is None or meta.get("replicated") or meta.get("partition_dim") is None:
        return ShardSlice(key, tuple(param.shape))
    dim, sizes = meta["partition_dim"], meta.get("partition_sizes")
    if sizes is None or dim not in (0, 1) or meta.get("sub_param_shape") or meta.get("sub_param_sizes"):
        raise NotImplementedError(
            f"{key}: AutoTP layout {meta.get('partition_type')!r} (dim {dim}, sub-parameters "
            f"{meta.get('sub_param_sizes')}) is not a contiguous split; only models with separate "
            "q/k/v and gate/up projections (Llama, Qwen2, Mistral) are supported"
        )
    full = tuple(meta.get("original_shape") or meta["logical_shape"])
    start = sum(sizes[: module.tp_index])
    s = ShardSlice(key, full, dim, start, start + sizes[module.tp_index])
    assert s.shape == tuple(param.shape), f"{key}: plan {s.shape} != shard {tuple(param.shape)}"
    return s


def shard_plan(model, tied: dict[str, str] | None = None) -> dict[str, ShardSlice]:
    """Every parameter name (tied aliases included) -> the slice of the full tensor it holds."""
    tied = tied or {}
    plan: dict[str, ShardSlice] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for p_name, p in mod._parameters.items():
            if p is not None:
                name = f"{mod_name}.{p_name}" if mod_name else p_name
                plan[name] = _param_slice(tied.get(name, name), p, mod)
    return plan


def materialize_(model, plan: dict[str, ShardSlice], weights, dtype: torch.dtype, device: torch.device) -> None:
    """Replace every meta parameter by its slice, read from `weights`, on `device`.

    Parameters shared by several modules (tied weights) are read once and stay shared.
    """
    done: dict[int, torch.nn.Parameter] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for p_name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) not in done:
                s = plan[f"{mod_name}.{p_name}" if mod_name else p_name]
                value = weights.read(s, dtype, device)
                assert tuple(value.shape) == s.shape, f"{s.key}: read {tuple(value.shape)}, want {s.shape}"
                done[id(p)] = torch.nn.Parameter(value, requires_grad=False)
            mod._parameters[p_name] = done[id(p)]


def rebuild_buffers_(model, device: torch.device) -> None:
    """Recompute buffers left on meta (rotary `inv_freq`) from a fresh copy of their module."""
    for name, mod in model.named_modules():
        missing = [n for n, b in mod._buffers.items() if b is not None and b.is_meta]
        if not missing:
            continue
        if not hasattr(mod, "config"):
            raise NotImplementedError(
                f"buffer(s) {missing} of {name} ({type(mod).__name__}) cannot be rebuilt off the meta device"
            )
        with torch.device("cpu"):
            twin = type(mod)(mod.config)
        for n in missing:
            mod._buffers[n] = twin._buffers[n].to(device)


class RandomWeights:
    """Seeded random values for any slice of any tensor, identical whatever the split.

    A 2-D tensor is generated in blocks of rows, each from its own generator seeded by
    (seed, key, block); a slice costs its own blocks (row split) or every block, one at a
    time (column split). 1-D tensors: biases are zeros, other vectors (norms) ones.
    """

    def __init__(self, seed: int = 0, std: float = 0.02):
        self.seed = seed
        self.std = std

    def read(self, s: ShardSlice, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if len(s.full_shape) == 1:
            fill = 0.0 if s.key.endswith("bias") else 1.0
            return torch.full(s.shape, fill, dtype=dtype, device=device)
        if len(s.full_shape) != 2:
            raise NotImplementedError(f"{s.key}: random init of {len(s.full_shape)}-d tensors")
        rows, cols = s.full_shape
        r0, r1 = (s.start, s.stop) if s.dim == 0 else (0, rows)
        c0, c1 = (s.start, s.stop) if s.dim == 1 else (0, cols)
        block = max(1, ROW_BLOCK_ELEMENTS // cols)
        out = torch.empty((r1 - r0, c1 - c0), dtype=dtype, device=device)
        for b in range(r0 // block, -(-r1 // block)):
            lo, hi = b * block, min(rows, (b + 1) * block)
            chunk = self._block(s.key, b, (hi - lo, cols), device)  # [rows in block, cols]
            a, z = max(lo, r0), min(hi, r1)
            out[a - r0 : z - r0] = chunk[a - lo : z - lo, c0:c1]
        return out

    def _block(self, key: str, index: int, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
        digest = hashlib.sha256(f"{self.seed}|{key}|{index}".encode()).digest()
        gen = torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * self.std


class SafetensorsWeights:
    """Reads one rank's slice of each tensor from a folder of .safetensors files."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.files = _safetensors_index(self.folder)  # key -> file name
        self._handles: dict[str, Any] = {}

    def read(self, s: ShardSlice, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = self._key(s.key)
        sl = self._handle(self.files[key]).get_slice(key)
        if s.dim is None:
            t = sl[:]
        elif s.dim == 0:
            t = sl[s.start : s.stop]
        else:
            t = sl[:, s.start : s.stop]
        return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

    def _key(self, key: str) -> str:
        if key in self.files:
            return key
        stripped = key.split(".", 1)[-1]  # checkpoints saved from the base model lack "model."
        if stripped in self.files:
            return stripped
        raise KeyError(
            f"tensor {key!r} not found in {self.folder} ({len(self.files)} tensors); "
            "is this checkpoint for the same architecture as its config.json?"
        )

    def _handle(self, file: str):
        if file not in self._handles:
            from safetensors import safe_open

            self._handles[file] = safe_open(str(self.folder / file), framework="pt", device="cpu")
        return self._handles[file]


def _safetensors_index(folder: Path) -> dict[str, str]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return dict(json.loads(index.read_text())["weight_map"])
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no .safetensors weights in {folder}; the TP target loads per-rank slices from "
            "safetensors only (convert with `save_pretrained(..., safe_serialization=True)`)"
        )
    from safetensors import safe_open

    out: dict[str, str] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            out.update({k: f.name for k in h.keys()})
    return out


def _weights_for(cfg: ModelConfig):
    """(transformers config, weight source, checkpoint folder or None) for a model config."""
    from arbitrage.models import model_folder
    from arbitrage.tiny import shape_config

    src = cfg.source
    if src.kind == "random":
        hf_config = shape_config(src.name)
        return hf_config, RandomWeights(cfg.seed, hf_config.initializer_range), None
    from transformers import AutoConfig

    folder = str(model_folder(src, allow_patterns=TP_PATTERNS))
    return AutoConfig.from_pretrained(folder), SafetensorsWeights(folder), folder


def load_tp_causal_lm(cfg: ModelConfig, tp_size: int = 1, device: torch.device | None = None):
    """This rank's shard of a model config's causal LM, and its tokenizer.

    Args:
        cfg: the model config (source, dtype, seed).
        tp_size: ranks in the group; >1 needs torch.distributed initialised with that world.
        device: where the shard lives; default `resolve_device(cfg.device)`.
    Returns:
        (model, tokenizer): an HF causal LM whose Linear layers are AutoTP layers when tp_size > 1.
    """
    from arbitrage.models import load_tokenizer, resolve_device, resolve_dtype

    device = device or resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    hf_config, weights, folder = _weights_for(cfg)
    model = build_meta_model(hf_config, dtype)
    tied = tied_keys(model)
    apply_autotp(model, tp_size, dtype)
    materialize_(model, shard_plan(model, tied), weights, dtype, device)
    rebuild_buffers_(model, device)
    if folder is not None:
        _load_generation_config(model, folder)
    return model.eval(), load_tokenizer(cfg.source)


def tp_layout(model, tp_size: int):
    """The fast engine's view of an AutoTP shard: the TP group (the whole world) and the
    hidden-dim columns of lm_head this rank holds (AutoTP makes lm_head row-parallel)."""
    from arbitrage.fast_engine import TensorParallel

    if tp_size <= 1:
        return None
    head = model.get_output_embeddings()
    hidden = model.get_input_embeddings().weight.shape[1]
    if head.weight.shape[1] == hidden:  # replicated head: every rank computes the full logits
        return TensorParallel(None, None)
    sizes, i = getattr(head, "_partition_sizes", None), getattr(head, "tp_index", None)
    if sizes is None or i is None or sizes[i] != head.weight.shape[1]:
        raise NotImplementedError(
            f"lm_head shard {tuple(head.weight.shape)} is not AutoTP's row-parallel "
            "head (input columns split); FastStepEngine cannot run it"
        )
    start = sum(sizes[:i])
    return TensorParallel(None, (start, start + sizes[i]))


def _load_generation_config(model, folder: str) -> None:
    """Keep the checkpoint's generation config (its EOS ids end steps), as from_pretrained does."""
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(folder)
    except OSError:  # no generation_config.json: keep the one derived from config.json
        pass
