"""Weight-only quantization of a model's linear layers through torchao, kept quantized on the device.

`models.<role>.quantization` (configs/schema.py) picks the scheme; `load_causal_lm` applies it
as the model loads:

- `int8`: `Int8WeightOnlyConfig` -- int8 weights with one scale per output channel (about
  half of bf16's bytes). Runs on the CPU and the GPU.
- `int4`: `Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")` --
  int4 weights with a bf16 scale and zero point per 128 inputs (about 4.25 bits a weight; this
  layout pads in_features to a multiple of 1024), run by PyTorch's own tinygemm kernel
  (`aten._weight_int4pack_mm`, sm80 and newer): no extra package on the GPU. CUDA only. On an
  H200 (docs/BENCHMARKS.md, "Quantized draft") it beats bf16 at batch 1 and falls behind from
  batch 8 on (a GEMV-shaped kernel; activations are padded per call).
- `int4_mslk`: the same quantization in torchao's default ("plain") layout, run by the
  `mslk-cuda` package's kernels: flat in batch size (slower than tinygemm at batch 1, 2.4x
  faster at batch 32 on the H200). CUDA and `mslk-cuda` only.

Why torchao: it is PyTorch's own quantization library (maintained with PyTorch, supported by
transformers as `TorchAoConfig`), its quantized weights are tensor subclasses, so every
`F.linear` over them -- transformers' modules and the fast engine's own forward alike, inside
CUDA graphs too -- runs the quantized kernel with no model changes, and it is a 3.4 MiB wheel.
bitsandbytes' matching wheel is 105 MB and its 4-bit path dequantises per call.

The input embedding and `lm_head` stay in the model's dtype (the logits decide each token, and
the tinygemm layout wants in_features divisible by 128 and out_features by 8; layers that are
not are left as they are). Quantization runs layer by layer on the target device, so a model
loaded on the CPU never holds its bf16 weights on the GPU all at once.
"""

from __future__ import annotations

import torch
from torch import nn

SCHEMES = ("none", "int8", "int4", "int4_mslk")
INT4_GROUP = 128


def _config(scheme: str, device: torch.device):
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig
    except ImportError as e:
        raise ValueError(f"quantization {scheme!r} needs torchao: pip install 'arbitrage[quant]'") from e
    if scheme == "int8":
        return Int8WeightOnlyConfig()
    if device.type != "cuda":
        raise ValueError(f"quantization {scheme!r} runs on CUDA only; use int8 on the CPU")
    if scheme == "int4_mslk":
        try:
            import mslk  # noqa: F401  (the kernels of torchao's plain int4 layout)
        except ImportError as e:
            raise ValueError(
                "quantization 'int4_mslk' needs the mslk-cuda package (pip install mslk-cuda); 'int4' needs none"
            ) from e
        return Int4WeightOnlyConfig(group_size=INT4_GROUP)
    return Int4WeightOnlyConfig(group_size=INT4_GROUP, int4_packing_format="tile_packed_to_4d")


def quantizable(module: nn.Module, name: str, scheme: str) -> bool:
    """Whether `quantize_weights` converts this module: a Linear, not the LM head, of a shape the kernel takes."""
    if not isinstance(module, nn.Linear) or name.split(".")[-1] == "lm_head":
        return False
    if scheme.startswith("int4"):
        return module.in_features % INT4_GROUP == 0 and module.out_features % 8 == 0
    return True


def quantize_weights(model: nn.Module, scheme: str, device: torch.device | str) -> nn.Module:
    """Quantize `model`'s linear weights in place with `scheme` and put the model on `device`.

    Args:
        model: any module (a transformers causal LM, a PRM backbone); weights in bf16 for int4.
        scheme: none | int8 | int4.
        device: where the model runs; quantization happens there, one layer at a time.
    Returns:
        The model, on `device`.
    Raises:
        ValueError: an unknown scheme, torchao missing, or int4 off CUDA (one line).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization {scheme!r}; known: {', '.join(SCHEMES)}")
    device = torch.device(device)
    if scheme == "none":
        return model.to(device)
    from torchao.quantization import quantize_

    quantize_(model, _config(scheme, device), filter_fn=lambda m, n: quantizable(m, n, scheme), device=device)
    return model.to(device)


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters hold (a tied weight once; a quantized weight counts its packed data and scales)."""
    return sum(_tensor_bytes(p) for p in model.parameters())


def _tensor_bytes(t: torch.Tensor) -> int:
    flatten = getattr(t, "__tensor_flatten__", None)  # a tensor subclass (e.g. quantized) names its parts
    if flatten is not None and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = flatten()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()
