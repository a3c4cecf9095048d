"""The tensor-parallel target group: N rank actors that hold one sharded target model.

Layout. `TargetGroup.create(cfg)` reserves ONE placement group packed on one node
(`STRICT_PACK`; bundle i = {"CPU": num_cpus, "GPU": num_gpus}, and bundle 0 also carries the
config's custom resources, e.g. `tp_gpu_node`, which pin the group to a node type). It starts
one `TPRankActor` per bundle. Rank 0 picks a free port on its node; every rank then joins
`torch.distributed` (NCCL when its device is CUDA, else gloo) and uses the GPU Ray assigned
to it (local index from `ray.get_gpu_ids()` within `CUDA_VISIBLE_DEVICES`).

Sharding. The model is always built on the `meta` device (no memory), then DeepSpeed AutoTP
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
  once by `arbitrage.models.model_location`, which dequantises the whole model in rank 0's
  host memory that one time) and "hub" (`snapshot_download` of json + safetensors): rank 0
  prepares the folder first, then `SafetensorsWeights` on every rank reads only its slice of
  each tensor (`safe_open(...).get_slice(key)[a:b]`). `.bin`-only checkpoints are refused.

Memory per rank: its slices of every column/row-parallel weight (about 1/N of the layers and
of lm_head), plus full copies of the replicated tensors (input embedding, norms, rotary
buffers), plus the KV of its heads (the running batch, and up to `kv_cache_tokens` tokens
of per-chain KV kept between steps). Transient: a row block (~16 MiB fp32, two
temporaries) while generating random weights; one tensor slice while reading a checkpoint
(safetensors is memory-mapped, so the OS page cache may hold file pages it read). No rank
ever holds the whole model. With TP=1 (or `tp_size=1` in-process) DeepSpeed is not used.

Serving. Each rank wraps its shard in a step engine (`shard_engine`): with `engine: fast` a
`FastStepEngine` given the shard's layout (`tp_layout`: it all-reduces after o_proj, down and
lm_head itself, inside its CUDA graphs, and runs one batch at a time in lockstep), else an
`arbitrage.engine.StepEngine` over AutoTP's own layers (eager). All ranks run the same batch: rank 0 hosts a `DynamicBatcher`; for each batch it
sends the same requests to ranks 1..N-1 (`run_local.remote`), runs its own share, waits for
theirs and returns its own result. A lock makes every collective call (a batch, a logits
probe) start on all ranks in one order, and rank 0 waits for all ranks before the next, so
the ranks' all-reduces always pair up. Sampling is seeded per (seed, prompt) and the logits
after the all-reduce are identical on every rank, so every rank decodes the same tokens; each
rank's per-chain KV cache (StepEngine's prefix cache, its own heads only) sees the same
batches in the same order, so every rank reuses the same prefixes.

Failure: a dead or unresponsive rank makes `health()` report unhealthy, and rank 0 marks the
group broken (`TargetGroupBroken`) when a peer fails during a batch. A torch.distributed world
cannot re-admit a rank, so the group restarts whole: the `TargetGroup` whose call found rank 0
dead or the group broken kills every rank, removes the placement group, reserves a new one and
starts and loads all ranks again (once per failure, however many calls saw it: `epoch`), then
raises `TargetGroupBroken` (`retryable`) so the caller -- `actors.backend.RayBackend` -- sends
the step again to the new group. One process owns a group's restarts: `TargetGroupHost`, a
restartable Ray actor (`make_target_group_actor`) that the Runtime hands to its coordinators
(the Serve replica `cluster.serve_app.TargetGroupServer` holds one in-process); its watchdog
also restarts a group whose rank died while idle. If that owner dies, its ranks and
placement group die with it (Ray fate-sharing) and its restart builds a new group.

Imports: torch only at module level; Ray, DeepSpeed, transformers and the config schema are
imported where used, so `benchmarks/tp_bench.py` can use the sharding code without Ray.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from arbitrage.types import StepOutput, StepRequest
    from configs.schema import ActorConfig, ArbitrageConfig, BatchingConfig, ModelConfig

__all__ = [
    "RandomWeights",
    "SafetensorsWeights",
    "ShardSlice",
    "TPRankActor",
    "TargetGroup",
    "TargetGroupBroken",
    "TargetGroupHost",
    "apply_autotp",
    "build_meta_model",
    "load_tp_causal_lm",
    "local_cuda_index",
    "make_target_group_actor",
    "materialize_",
    "rebuild_buffers_",
    "shard_engine",
    "shard_plan",
    "tied_keys",
    "tp_layout",
]

class TargetGroupBroken(RuntimeError):
    """The ranks of a tensor-parallel group are out of step or dead; the group must restart.

    `retryable`: the request itself was fine, and sending it again after the restart can succeed.
    """

    retryable = True


ROW_BLOCK_ELEMENTS = 1 << 22  # random weights are generated in blocks of rows of ~4M elements
DIST_TIMEOUT = timedelta(minutes=10)  # a collective waiting on a dead peer fails after this


# ---- shard construction (Ray-free) ---------------------------------------------------
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
        deepspeed.init_inference(model, tensor_parallel={"tp_size": tp_size}, dtype=dtype,
                                 replace_with_kernel_inject=False)
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

    ds_torch.build_shm_op = lambda: None
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
            "q/k/v and gate/up projections (Llama, Qwen2, Mistral) are supported")
    full = tuple(meta.get("original_shape") or meta.get("logical_shape"))
    start = sum(sizes[:module.tp_index])
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


def materialize_(model, plan: dict[str, ShardSlice], weights, dtype: torch.dtype,
                 device: torch.device) -> None:
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
                f"buffer(s) {missing} of {name} ({type(mod).__name__}) cannot be rebuilt off the meta device")
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
            out[a - r0:z - r0] = chunk[a - lo:z - lo, c0:c1]
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
            t = sl[s.start:s.stop]
        else:
            t = sl[:, s.start:s.stop]
        return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

    def _key(self, key: str) -> str:
        if key in self.files:
            return key
        stripped = key.split(".", 1)[-1]  # checkpoints saved from the base model lack "model."
        if stripped in self.files:
            return stripped
        raise KeyError(f"tensor {key!r} not found in {self.folder} ({len(self.files)} tensors); "
                       "is this checkpoint for the same architecture as its config.json?")

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
            "safetensors only (convert with `save_pretrained(..., safe_serialization=True)`)")
    from safetensors import safe_open

    out: dict[str, str] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            out.update({k: f.name for k in h.keys()})
    return out


def _checkpoint_folder(source) -> str:
    """A local folder with config.json + safetensors for a non-random source."""
    from arbitrage.models import ModelNotFoundError, model_location

    if source.kind != "hub":
        return model_location(source)
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(source.name, revision=source.revision,
                                 allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"])
    except Exception as e:  # offline, gated or missing repo
        raise ModelNotFoundError(f"cannot download {source.name!r} from the hub: {e}".splitlines()[0]) from e


def _weights_for(cfg: ModelConfig):
    """(transformers config, weight source, checkpoint folder or None) for a model config."""
    from arbitrage.tiny import shape_config

    src = cfg.source
    if src.kind == "random":
        hf_config = shape_config(src.name)
        return hf_config, RandomWeights(cfg.seed, hf_config.initializer_range), None
    from transformers import AutoConfig

    folder = _checkpoint_folder(src)
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
        raise NotImplementedError(f"lm_head shard {tuple(head.weight.shape)} is not AutoTP's row-parallel "
                                  "head (input columns split); FastStepEngine cannot run it")
    start = sum(sizes[:i])
    return TensorParallel(None, (start, start + sizes[i]))


def shard_engine(cfg: ModelConfig, model, tokenizer, tp_size: int):
    """The step engine a rank serves its shard with: `engine: fast` -> FastStepEngine (CUDA
    graphs with the all-reduces inside), `hf` -> StepEngine (eager, AutoTP's own layers)."""
    if cfg.engine == "fast":
        from arbitrage.fast_engine import FastStepEngine

        return FastStepEngine(model, tokenizer, max_context=cfg.max_context, max_slots=cfg.max_slots,
                              kv_cache_tokens=cfg.kv_cache_tokens, tp=tp_layout(model, tp_size))
    from arbitrage.engine import StepEngine

    return StepEngine(model, tokenizer, max_context=cfg.max_context, kv_cache_tokens=cfg.kv_cache_tokens)


def _load_generation_config(model, folder: str) -> None:
    """Keep the checkpoint's generation config (its EOS ids end steps), as from_pretrained does."""
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(folder)
    except OSError:  # no generation_config.json: keep the one derived from config.json
        pass


def local_cuda_index(gpu_ids: list, visible: str | None) -> int:
    """The CUDA ordinal, inside this process, of the first GPU Ray assigned to it."""
    if not gpu_ids:
        raise ValueError("the target device is CUDA but Ray assigned this rank no GPU; "
                         "set runtime.target.num_gpus >= 1")
    gid = str(gpu_ids[0])
    ids = [v.strip() for v in (visible or "").split(",") if v.strip()]
    return ids.index(gid) if gid in ids else int(gid)


# ---- Ray actors -----------------------------------------------------------------------
class TPRankActor:
    """One tensor-parallel rank: a shard of the target model behind a StepEngine."""

    def __init__(self, model_cfg: ModelConfig, rank: int, world_size: int, num_threads: int = 1,
                 batching: BatchingConfig | None = None):
        self.model_cfg = model_cfg
        self.rank = rank
        self.world_size = world_size
        self.num_threads = max(1, num_threads)
        self.batching = batching
        self.device: torch.device | None = None
        self.engine = None
        self.info: dict[str, Any] = {"rank": rank}
        self._peers: list = []
        self._batcher = None
        self._lock = threading.Lock()  # rank 0: one collective call at a time, in order
        self._broken: str | None = None

    # ---- lifecycle: master_address -> init_distributed -> prepare_source -> load_model -> set_peers
    async def master_address(self) -> tuple[str, int]:
        """This node's IP and a free port for the torch.distributed rendezvous (rank 0)."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    async def init_distributed(self, addr: str, port: int) -> str:
        """Pick this rank's device and join the group's torch.distributed world."""
        self.device = self._init_device()
        if self.world_size > 1:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(self.rank),
                              WORLD_SIZE=str(self.world_size))
            await asyncio.to_thread(
                torch.distributed.init_process_group, backend, init_method=f"tcp://{addr}:{port}",
                rank=self.rank, world_size=self.world_size, timeout=DIST_TIMEOUT)
        return str(self.device)

    def _init_device(self) -> torch.device:
        from arbitrage.models import resolve_device

        device = resolve_device(self.model_cfg.device) if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            import ray

            index = local_cuda_index(ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"))
            torch.cuda.set_device(index)
            os.environ["LOCAL_RANK"] = str(index)  # DeepSpeed selects its device from LOCAL_RANK
            return torch.device("cuda", index)
        torch.set_num_threads(self.num_threads)
        os.environ["LOCAL_RANK"] = str(self.rank)
        return device

    async def prepare_source(self) -> None:
        """Rank 0, before the others load: download (hub) or convert (gguf, packaged) once."""
        if self.model_cfg.source.kind != "random":
            await asyncio.to_thread(_checkpoint_folder, self.model_cfg.source)

    async def load_model(self) -> dict[str, Any]:
        """Build this rank's shard and its StepEngine; returns what the rank holds."""
        t0 = time.perf_counter()
        model, tokenizer = await asyncio.to_thread(load_tp_causal_lm, self.model_cfg, self.world_size, self.device)
        self.engine = await asyncio.to_thread(shard_engine, self.model_cfg, model, tokenizer, self.world_size)
        params = list({id(p): p for p in model.parameters()}.values())
        self.info.update(device=str(self.device), params=sum(p.numel() for p in params),
                         param_bytes=sum(p.numel() * p.element_size() for p in params),
                         load_s=round(time.perf_counter() - t0, 3))
        return dict(self.info)

    async def set_peers(self, peers: list) -> None:
        """Rank 0: the handles of ranks 1..N-1, and the dynamic batcher."""
        from arbitrage.batching import DynamicBatcher

        self._peers = list(peers)
        b = self.batching
        kwargs = {"max_batch_size": b.max_batch_size, "max_wait_ms": b.max_wait_ms} if b else {}
        self._batcher = DynamicBatcher(lambda reqs: self._collective("steps", reqs), **kwargs)

    # ---- rank 0: the group's entry points -------------------------------------------------
    async def generate_step(self, req: StepRequest) -> StepOutput:
        """One step for one chain, batched with concurrent callers."""
        return await self._batcher.submit(req)

    async def generate_steps(self, reqs: list[StepRequest]) -> list[StepOutput]:
        """One step for each request, as one batch."""
        return await asyncio.to_thread(self._collective, "steps", list(reqs))

    async def logits(self, prompts: list[str]) -> torch.Tensor:
        """Next-token logits after each raw prompt: [B, V] float32."""
        return await asyncio.to_thread(self._collective, "logits", list(prompts))

    def _collective(self, method: str, payload: list) -> Any:
        """Run one call on every rank in the same order; return rank 0's result.

        A request error raised on every rank (e.g. a prompt over max_context) is re-raised
        and the group stays usable; a dead peer, or an error on some ranks only, leaves the
        ranks out of step, so the group is marked broken.
        """
        with self._lock:
            if self._broken:
                raise TargetGroupBroken(f"target group is broken ({self._broken}); restart it")
            # futures, not ray.get: this runs in a worker thread, never on the actor's event loop
            peers = [p.run_local.remote(method, payload).future() for p in self._peers]
            own, own_error = None, None
            try:
                own = self._run(method, payload)
            except Exception as e:
                own_error = e
            peer_errors = _errors_of(peers)
            self._check_in_step(method, own_error, peer_errors)
            if own_error is not None:
                raise own_error
            return own

    def _check_in_step(self, method: str, own_error, peer_errors: list[Exception]) -> None:
        from ray.exceptions import RayActorError

        dead = [e for e in peer_errors if isinstance(e, RayActorError)]
        same = (own_error is None and not peer_errors) or (
            own_error is not None and len(peer_errors) == len(self._peers))
        if dead or not same:
            first = (dead or peer_errors or [own_error])[0]
            self._broken = f"rank failure during {method!r}: {type(first).__name__}: {first}".splitlines()[0]
            raise TargetGroupBroken(f"target group is broken ({self._broken}); restart it") from first

    # ---- every rank -----------------------------------------------------------------------
    async def run_local(self, method: str, payload: list) -> None:
        """Ranks 1..N-1: run this rank's share of one collective call (the result stays here)."""
        await asyncio.to_thread(self._run, method, payload)

    def _run(self, method: str, payload: list) -> Any:
        if method == "steps":
            return self.engine.generate_steps(payload)
        if method == "logits":
            return self._logits(payload)
        raise ValueError(f"unknown collective method {method!r}; known: steps, logits")

    def _logits(self, prompts: list[str]) -> torch.Tensor:
        tok, model = self.engine.tokenizer, self.engine.model
        rows = []
        with torch.inference_mode():
            for p in prompts:
                ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]], device=self.device)
                rows.append(model(input_ids=ids).logits[0, -1].float().cpu())  # [V]
        return torch.stack(rows)  # [B, V]

    async def ping(self) -> dict[str, Any]:
        """Liveness and what this rank holds."""
        return {**self.info, "loaded": self.engine is not None, "broken": self._broken}

    async def stats(self) -> dict[str, Any]:
        """Batch-size histogram and busy time (rank 0), plus this rank's info."""
        e = self.engine
        out = {"rank": self.info, "forward_calls": e.forward_calls if e else 0,
               "prefill_tokens": e.prefill_tokens if e else 0, "reused_tokens": e.reused_tokens if e else 0}
        if self._batcher is not None:
            out.update(self._batcher.stats())
        return out


def _errors_of(futures: list) -> list[Exception]:
    """Wait for every future; return the exceptions they raised."""
    errors = []
    for f in futures:
        try:
            f.result()
        except Exception as e:
            errors.append(e)
    return errors


class TargetGroup:
    """Handle to a tensor-parallel target: N rank actors in one placement group, restarted whole.

    Not meant to be copied between processes: the process that holds it owns the restarts
    (see the module docstring, "Failure").
    """

    def __init__(self, model_cfg: ModelConfig, actor_cfg: ActorConfig, ready_timeout_s: float = 600.0):
        self.model_cfg = model_cfg
        self.actor_cfg = actor_cfg
        self.ready_timeout_s = ready_timeout_s
        self.tp_size = actor_cfg.tensor_parallel
        self.ranks: list = []
        self.placement_group = None
        self.rank_info: list[dict] = []
        self.epoch = 0  # bumped by every restart
        self.restarts: list[dict[str, Any]] = []  # {"epoch", "reason", "seconds"} per restart
        self._restart_lock = threading.Lock()

    @classmethod
    def create(cls, cfg: ArbitrageConfig, ready_timeout_s: float = 600.0) -> TargetGroup:
        """Start the target group of a config (`models.target`, `runtime.target`)."""
        return cls.from_configs(cfg.models.target, cfg.runtime.target, ready_timeout_s)

    @classmethod
    def from_configs(cls, model_cfg: ModelConfig, actor_cfg: ActorConfig,
                     ready_timeout_s: float = 600.0) -> TargetGroup:
        """Reserve the placement group, start the ranks, join them and load the shards."""
        group = cls(model_cfg, actor_cfg, ready_timeout_s)
        group.ranks, group.placement_group, group.rank_info = group._start()
        return group

    def _start(self) -> tuple[list, Any, list[dict]]:
        """Bring up a fresh group: placement group, N ranks, rendezvous, shards, peers (blocking).

        Returns (ranks, placement group, rank info); only a fully started group is published.
        """
        import ray

        n = self.tp_size
        pg = _reserve_placement_group(self.actor_cfg, self.ready_timeout_s)
        ranks = [_rank_actor(self.actor_cfg, pg, i).remote(
            self.model_cfg, i, n, max(1, int(self.actor_cfg.num_cpus)), self.actor_cfg.batching)
            for i in range(n)]
        try:
            addr, port = ray.get(ranks[0].master_address.remote())
            ray.get([r.init_distributed.remote(addr, port) for r in ranks])
            ray.get(ranks[0].prepare_source.remote())
            info = ray.get([r.load_model.remote() for r in ranks])
            ray.get(ranks[0].set_peers.remote(ranks[1:]))
        except BaseException:
            _release(ranks, pg)
            raise
        return ranks, pg, info

    def restart(self, seen_epoch: int | None = None, reason: str = "requested") -> int:
        """Replace the whole group (new placement group, all ranks); returns the new epoch.

        Blocking. `seen_epoch`: the epoch whose failure the caller saw; when the group has
        restarted since, nothing is done (many calls fail together, one restart serves them).
        """
        with self._restart_lock:
            if seen_epoch is not None and seen_epoch != self.epoch:
                return self.epoch
            t0 = time.perf_counter()
            self.shutdown()  # callers meanwhile find no ranks, wait on this lock, then retry
            ranks, pg, info = self._start()
            self.ranks, self.placement_group, self.rank_info = ranks, pg, info
            self.epoch += 1
            self.restarts.append({"epoch": self.epoch, "reason": reason[:300],
                                  "seconds": round(time.perf_counter() - t0, 3)})
            return self.epoch

    async def _lead(self, method: str, *args):
        """Call rank 0; on a dead rank 0 or a broken group, restart the group and raise TargetGroupBroken."""
        from ray.exceptions import RayActorError

        epoch, ranks = self.epoch, self.ranks
        try:
            if not ranks:
                raise TargetGroupBroken("target group has no ranks (its last start failed)")
            return await getattr(ranks[0], method).remote(*args)
        except (RayActorError, TargetGroupBroken) as e:
            cause = getattr(e, "cause", None)  # a RayTaskError carries the remote exception
            cause = cause if isinstance(cause, BaseException) else e
            reason = f"{type(cause).__name__}: {cause}".splitlines()[0]
            await asyncio.to_thread(self.restart, epoch, reason)
            raise TargetGroupBroken(f"target group restarted after a rank failure ({reason}); "
                                    "send the call again") from e

    async def generate_step(self, req: StepRequest) -> StepOutput:
        """One step for one chain (dynamically batched with concurrent callers)."""
        return await self._lead("generate_step", req)

    async def generate_steps(self, reqs: list[StepRequest]) -> list[StepOutput]:
        """One step for each request, as one explicit batch."""
        return await self._lead("generate_steps", list(reqs))

    async def logits(self, prompts: list[str]) -> torch.Tensor:
        """Next-token logits after each raw prompt, [B, V] float32 (tests, diagnostics)."""
        return await self._lead("logits", list(prompts))

    def health(self, timeout_s: float = 10.0) -> dict[str, Any]:
        """{"healthy": bool, "ranks": [per-rank status]}; any dead, silent or broken rank -> unhealthy."""
        import ray

        refs = [r.ping.remote() for r in self.ranks]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        ranks = []
        for i, ref in enumerate(refs):
            if ref not in ready:
                ranks.append({"rank": i, "status": "unresponsive"})
                continue
            try:
                info = ray.get(ref)
                status = "broken" if info.get("broken") else "ok" if info.get("loaded") else "loading"
                ranks.append({**info, "rank": i, "status": status})
            except Exception as e:  # RayActorError: the rank's process is gone
                ranks.append({"rank": i, "status": "dead", "error": f"{type(e).__name__}: {e}".splitlines()[0]})
        return {"healthy": bool(ranks) and all(r["status"] == "ok" for r in ranks), "tp_size": self.tp_size,
                "ranks": ranks,
                "epoch": self.epoch, "restarts": list(self.restarts)}

    def stats(self) -> dict[str, Any]:
        """Rank 0's batch-size histogram and busy time, and what each rank holds."""
        import ray

        out = ray.get(self.ranks[0].stats.remote(), timeout=30)
        out["ranks"] = self.rank_info
        out["epoch"] = self.epoch
        return out

    def shutdown(self) -> None:
        """Kill the ranks and remove the placement group (idempotent)."""
        ranks, pg = self.ranks, self.placement_group
        self.ranks, self.placement_group = [], None
        _release(ranks, pg)


def _release(ranks: list, pg) -> None:
    """Kill rank actors and remove their placement group, ignoring what is already gone."""
    import ray
    from ray.util.placement_group import remove_placement_group

    for r in ranks:
        try:
            ray.kill(r)
        except Exception:  # already gone
            pass
    if pg is not None:
        try:
            remove_placement_group(pg)
        except Exception:  # already removed
            pass


WATCHDOG_INTERVAL_S = 5.0  # how often TargetGroupHost pings the ranks


class TargetGroupHost:
    """A `TargetGroup` inside its own (restartable) Ray actor: the one owner of its restarts.

    Coordinators share this actor's handle like a ModelActor's; a call costs one extra hop
    to rank 0. Created by `make_target_group_actor` (and held by the Serve replica
    `TargetGroupServer`). A watchdog pings the ranks every WATCHDOG_INTERVAL_S and restarts
    the group when one is dead, so an idle group heals before the next call, and a call
    stuck in a collective with a dead peer (NCCL may wait for its timeout) is freed: the
    restart kills its rank 0, the call fails and is re-sent.
    """

    def __init__(self, cfg: ArbitrageConfig | dict, ready_timeout_s: float = 600.0):
        from actors.model_actor import as_config

        self.group = TargetGroup.create(as_config(cfg), ready_timeout_s)
        self._watchdog: asyncio.Task | None = None

    def _watch(self) -> None:
        """Start the watchdog on the actor's event loop (on the first call)."""
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().create_task(self._watch_loop())

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(WATCHDOG_INTERVAL_S)
            epoch = self.group.epoch
            try:
                h = await asyncio.to_thread(self.group.health)
                dead = [r["rank"] for r in h["ranks"] if r["status"] == "dead"]
                if dead:
                    await asyncio.to_thread(self.group.restart, epoch, f"watchdog: rank(s) {dead} dead")
            except Exception as e:  # a failed restart: the next round or the next call tries again
                print(f"target group watchdog: {type(e).__name__}: {e}".splitlines()[0])

    async def generate_step(self, req: StepRequest) -> StepOutput:
        """One step for one chain, batched on rank 0 with concurrent callers."""
        self._watch()
        return await self.group.generate_step(req)

    async def generate_steps(self, reqs: list[StepRequest]) -> list[StepOutput]:
        """One step for each request, as one batch."""
        self._watch()
        return await self.group.generate_steps(reqs)

    async def logits(self, prompts: list[str]) -> torch.Tensor:
        """Next-token logits after each raw prompt (tests, diagnostics)."""
        self._watch()
        return await self.group.logits(prompts)

    async def health(self) -> dict[str, Any]:
        """The group's health (per-rank status, epoch, restarts); `ready` when every rank is ok."""
        self._watch()
        h = await asyncio.to_thread(self.group.health)
        return {"role": "target", "ready": h["healthy"], **h}

    async def stats(self) -> dict[str, Any]:
        """Rank 0's batch statistics and what each rank holds."""
        return await asyncio.to_thread(self.group.stats)

    def rank_handles(self) -> list:
        """The current ranks' actor handles (fault-injection tests)."""
        return list(self.group.ranks)

    async def restart(self) -> int:
        """Restart the whole group now; returns the new epoch."""
        return await asyncio.to_thread(self.group.restart, None, "requested")

    def shutdown(self) -> None:
        """Kill the ranks and remove the placement group."""
        self.group.shutdown()


def make_target_group_actor(cfg: ArbitrageConfig, ready_timeout_s: float = 600.0):
    """A `TargetGroupHost` actor (no resources of its own: the ranks hold them), restarted by
    Ray per `runtime.target.max_restarts`. Its constructor builds the group; wait on `health`."""
    import ray

    return ray.remote(TargetGroupHost).options(
        num_cpus=0, max_restarts=cfg.runtime.target.max_restarts, max_task_retries=0,
        max_concurrency=1000).remote(cfg.model_dump(), ready_timeout_s)


def _bundles(actor_cfg: ActorConfig) -> list[dict[str, float]]:
    """One bundle per rank; the custom resources (node pinning) only on bundle 0."""
    base = {"CPU": actor_cfg.num_cpus, "GPU": actor_cfg.num_gpus}
    first = {**base, **actor_cfg.resources}
    return [{k: v for k, v in b.items() if v > 0} or {"CPU": 0.001}
            for b in [first] + [base] * (actor_cfg.tensor_parallel - 1)]


def _reserve_placement_group(actor_cfg: ActorConfig, ready_timeout_s: float):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundles = _bundles(actor_cfg)
    labels = [dict(actor_cfg.label_selector)] * len(bundles) if actor_cfg.label_selector else None
    pg = placement_group(bundles, strategy="STRICT_PACK", bundle_label_selector=labels)
    try:
        ray.get(pg.ready(), timeout=ready_timeout_s)
    except ray.exceptions.GetTimeoutError as e:
        remove_placement_group(pg)
        raise RuntimeError(
            f"no node could host the TP={actor_cfg.tensor_parallel} target group {bundles} within "
            f"{ready_timeout_s:.0f}s (STRICT_PACK: all on one node); lower runtime.target."
            "tensor_parallel / num_gpus / num_cpus, or add a node with these resources") from e
    return pg


def _rank_actor(actor_cfg: ActorConfig, pg, rank: int):
    """TPRankActor as a Ray actor class placed in bundle `rank` of the group's placement group."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundle = _bundles(actor_cfg)[rank]
    return ray.remote(TPRankActor).options(
        num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0),
        resources={k: v for k, v in bundle.items() if k not in ("CPU", "GPU")},
        scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=rank),
    )
