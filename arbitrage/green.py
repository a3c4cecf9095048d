"""SM partitions of one GPU for colocated engines: CUDA green contexts through the driver API.

Two engines on two CUDA streams of one GPU still share its SMs: an 8B target's decode kernels
launch enough blocks to fill every SM, so a 1B draft's small kernels wait for SMs to free up,
and the two engines' steps add up instead of overlapping (docs/BENCHMARKS.md s.10.3). A green
context (CUDA 12.4+) owns a disjoint set of SMs; work on its streams runs on those SMs only.
`split` divides the device into two green contexts (`first_sms` SMs, rounded by the driver, and
the rest) and `GreenPartition.stream` makes streams on one, wrapped as torch streams.

This is the driver API through ctypes (libcuda.so.1, which every CUDA install has), so it needs
no extra package. The `CUdevResource` struct is opaque here: buffers are over-allocated and only
one resource is passed at a time (no array strides), and its `sm.smCount` is read at the offset
the CUDA 12.4-13 headers give it, only to report the split.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

_RESOURCE_BYTES = 1024  # more than sizeof(CUdevResource) in any CUDA 12.4-13 header
_SM_COUNT_OFFSET = 96  # CUdevResource: int type; unsigned char _internal_padding[92]; then sm.smCount
_CU_DEV_RESOURCE_TYPE_SM = 1
_CU_GREEN_CTX_DEFAULT_STREAM = 1
_CU_STREAM_NON_BLOCKING = 1


class GreenContextError(RuntimeError):
    """The driver cannot make green contexts here (too old, not a CUDA device, refused a split)."""


def _driver():
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise GreenContextError(f"no CUDA driver library: {e}") from e
    missing = [
        f
        for f in ("cuDeviceGetDevResource", "cuDevSmResourceSplitByCount", "cuGreenCtxCreate", "cuGreenCtxStreamCreate")
        if not hasattr(lib, f)
    ]
    if missing:
        raise GreenContextError(f"the CUDA driver has no {missing[0]} (green contexts need CUDA 12.5+)")
    return lib


def _check(lib, result: int, what: str) -> None:
    if result != 0:
        name = ctypes.c_char_p()
        lib.cuGetErrorName(result, ctypes.byref(name))
        raise GreenContextError(f"{what} failed: {(name.value or b'?').decode()} ({result})")


def _sm_count(resource) -> int:
    return ctypes.c_uint.from_buffer(resource, _SM_COUNT_OFFSET).value


@dataclass
class GreenPartition:
    """One green context: `sms` SMs of the device; `stream` makes streams that run on them."""

    sms: int
    device: torch.device
    _ctx: ctypes.c_void_p
    _lib: ctypes.CDLL

    def stream(self, priority: int = 0) -> torch.cuda.ExternalStream:
        """A non-blocking stream of this partition (priority: lower is higher, as torch's)."""
        raw = ctypes.c_void_p()
        _check(
            self._lib,
            self._lib.cuGreenCtxStreamCreate(
                ctypes.byref(raw), self._ctx, _CU_STREAM_NON_BLOCKING, ctypes.c_int(priority)
            ),
            "cuGreenCtxStreamCreate",
        )
        return torch.cuda.ExternalStream(raw.value, device=self.device)


def split(device: torch.device, first_sms: int) -> tuple[GreenPartition, GreenPartition]:
    """Two green contexts on `device`: about `first_sms` SMs (the driver rounds up to its
    granularity) and the remaining SMs. Raises GreenContextError where that cannot be done."""
    if device.type != "cuda":
        raise GreenContextError(f"green contexts need a CUDA device, not {device}")
    lib = _driver()
    torch.cuda.init()
    torch.zeros(1, device=device)  # the primary context exists before green ones are made from it
    _check(lib, lib.cuInit(0), "cuInit")
    dev = ctypes.c_int()
    _check(lib, lib.cuDeviceGet(ctypes.byref(dev), device.index or 0), "cuDeviceGet")
    whole = (ctypes.c_ubyte * _RESOURCE_BYTES)()
    _check(
        lib, lib.cuDeviceGetDevResource(dev, ctypes.byref(whole), _CU_DEV_RESOURCE_TYPE_SM), "cuDeviceGetDevResource"
    )
    group, rest = (ctypes.c_ubyte * _RESOURCE_BYTES)(), (ctypes.c_ubyte * _RESOURCE_BYTES)()
    n = ctypes.c_uint(1)
    _check(
        lib,
        lib.cuDevSmResourceSplitByCount(
            ctypes.byref(group), ctypes.byref(n), ctypes.byref(whole), ctypes.byref(rest), 0, ctypes.c_uint(first_sms)
        ),
        "cuDevSmResourceSplitByCount",
    )
    if n.value != 1:
        raise GreenContextError(f"the driver cannot split {first_sms} SMs off this device")
    parts = []
    for res in (group, rest):
        desc, ctx = ctypes.c_void_p(), ctypes.c_void_p()
        _check(
            lib, lib.cuDevResourceGenerateDesc(ctypes.byref(desc), ctypes.byref(res), 1), "cuDevResourceGenerateDesc"
        )
        _check(
            lib, lib.cuGreenCtxCreate(ctypes.byref(ctx), desc, dev, _CU_GREEN_CTX_DEFAULT_STREAM), "cuGreenCtxCreate"
        )
        parts.append(GreenPartition(_sm_count(res), device, ctx, lib))
    return parts[0], parts[1]
