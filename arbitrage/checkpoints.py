"""The checkpoint resolver: which weight files a model folder holds, and reading them safely.

Released checkpoints come in four layouts, tried in this order:

1. `model.safetensors.index.json` + the shards it names,
2. `*.safetensors` (usually one `model.safetensors`),
3. `pytorch_model.bin.index.json` + the shards it names (`pytorch_model-00001-of-00002.bin`, ...),
4. `pytorch_model.bin` (e.g. Skywork-o1-Open-PRM-Qwen-2.5-1.5B ships only this).

`.bin` files are read with `torch.load(weights_only=True)` (memory-mapped when they are
zip archives, as every `torch.save` since 1.6 writes): the restricted unpickler builds
tensors and plain containers only, so a checkpoint that carries code is refused with an
error instead of running it. Nothing here ever unpickles fully.

`arbitrage.models` (causal LMs, via transformers, which reads `.bin` the same restricted way)
and `arbitrage.prm` (PRM backbones and heads, read here) find weights through `weight_files`.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal

import torch

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


class CheckpointError(ValueError):
    """Weights that cannot be found or read safely; the message is one line."""


@dataclass(frozen=True)
class WeightFiles:
    """The weight files of one checkpoint folder."""

    format: Literal["safetensors", "bin"]
    files: tuple[Path, ...]
    index: dict[str, str] | None = None  # key -> file name, when the folder has an index

    def keys(self) -> set[str]:
        """Every tensor name in the checkpoint (from the index when there is one)."""
        if self.index is not None:
            return set(self.index)
        keys: set[str] = set()
        for f in self.files:
            keys.update(_read_file(self.format, f, lambda k: True, meta=True))
        return keys


def weight_files(folder: str | Path) -> WeightFiles:
    """The weights of a checkpoint folder, in the order of the module docstring.

    Raises:
        CheckpointError: the folder holds none of the four layouts, or an index names a missing shard.
    """
    folder = Path(folder)
    for index_name, fmt in ((SAFETENSORS_INDEX, "safetensors"), (BIN_INDEX, "bin")):
        index = folder / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = tuple(folder / n for n in sorted(set(weight_map.values())))
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index} names shards that are missing: {', '.join(missing)}")
            return WeightFiles(fmt, files, dict(weight_map))  # type: ignore[arg-type]
        if fmt == "safetensors":
            found = tuple(sorted(folder.glob("*.safetensors")))
            if found:
                return WeightFiles("safetensors", found)
    single = folder / BIN_SINGLE
    if single.is_file():
        return WeightFiles("bin", (single,))
    raise CheckpointError(
        f"no weights in {folder}: expected model.safetensors, {SAFETENSORS_INDEX}, "
        f"{BIN_SINGLE} or {BIN_INDEX} with its shards"
    )


def read_weights(folder: str | Path, keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint folder (those whose name `keep` accepts), on the CPU.

    Raises:
        CheckpointError: no weights, or a `.bin` file the restricted unpickler refuses.
    """
    wf = weight_files(folder)
    keep = keep or (lambda k: True)
    files: Iterable[Path] = wf.files
    if wf.index is not None:  # read only the shards that hold a wanted key
        wanted = {name for k, name in wf.index.items() if keep(k)}
        files = [f for f in wf.files if f.name in wanted]
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(_read_file(wf.format, f, keep))
    return out


def load_bin(path: str | Path) -> dict[str, torch.Tensor]:
    """One `.bin` state dict through the restricted unpickler (`weights_only=True`).

    Raises:
        CheckpointError: the file holds anything but tensors and plain containers.
    """
    path = Path(path)
    mmap = zipfile.is_zipfile(path)  # legacy (pre-1.6) files cannot be memory-mapped
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise CheckpointError(
            f"{path} is not a plain tensor checkpoint; refusing to unpickle it (torch.load weights_only=True: {first})"
        ) from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return state


def _read_file(fmt: str, f: Path, keep: Callable[[str], bool], meta: bool = False):
    if fmt == "bin":
        state = load_bin(f)
        return list(state) if meta else {k: v for k, v in state.items() if keep(k)}
    from safetensors import safe_open

    with safe_open(str(f), framework="pt") as sf:
        if meta:
            return list(sf.keys())
        return {k: sf.get_tensor(k) for k in sf.keys() if keep(k)}
