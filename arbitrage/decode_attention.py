"""Decode attention straight over the slot KV cache: one Triton kernel, no gather (CUDA only).

The FastStepEngine keeps every chain's keys and values in a slot of a static cache
[slots + 1, 2, Hkv, C, D] per layer. Its generic attention gathers each running row's slot
over the batch's padded window into a new tensor and runs SDPA on it, so one decode step at
batch B and window W copies B x W positions per layer and reads them again: at batch 64 and
2k-token contexts that traffic, not the weights, sets the step time (docs/BENCHMARKS.md s.3).

`decode_attention` computes the same thing in place: one program per (row, KV head) reads
only positions 0..pos of its row's slot, block by block, with an online softmax (as in flash
decoding, without the split over the sequence). The G query heads that share a KV head are
one [G, D] tile (padded to 16 rows for `tl.dot`), so K/V are read once per group. Shapes and
strides are runtime values except the head geometry, so one compiled kernel serves every
batch and context, and it can be captured in the engine's CUDA graphs.
"""

from __future__ import annotations

import math

import torch

try:  # Triton ships with CUDA builds of torch; CPU builds and some platforms lack it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None

BLOCK = 64  # cache positions per inner iteration


def supported(device: torch.device, head_dim: int) -> bool:
    """Whether the kernel can run: a CUDA device, Triton importable, head_dim a power of two >= 16."""
    return triton is not None and device.type == "cuda" and head_dim >= 16 and head_dim & (head_dim - 1) == 0


def decode_attention(q: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Causal GQA attention of one new token per row over its own slot of the cache.

    Args:
        q: [B, H, D] queries (RoPE applied), heads grouped by KV head (h = kv_head * G + g).
        cache: [slots + 1, 2, Hkv, C, D] one layer's keys (index 0) and values (1); the new
            token's K/V must already be written at `pos`.
        slots: [B] int64, the slot each row attends over.
        pos: [B] int64, each row's position: it attends over cache positions 0..pos.
    Returns:
        [B, H, D] in q's dtype.
    """
    B, H, D = q.shape
    Hkv = cache.shape[2]
    G = H // Hkv
    if q.stride(-1) != 1 or cache.stride(-1) != 1:
        raise ValueError("decode_attention needs the head dimension contiguous in q and the cache")
    slots, pos = slots.contiguous(), pos.contiguous()  # the kernel indexes them with stride 1
    out = torch.empty_like(q)
    _kernel[(B, Hkv)](
        q,
        cache,
        slots,
        pos,
        out,
        1.0 / math.sqrt(D),
        q.stride(0),
        q.stride(1),
        cache.stride(0),
        cache.stride(1),
        cache.stride(2),
        cache.stride(3),
        out.stride(0),
        out.stride(1),
        G=G,
        GP=max(16, triton.next_power_of_2(G)),
        D=D,
        BLOCK=BLOCK,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4,
    )
    return out


if triton is not None:

    @triton.jit
    def _kernel(
        Q,
        KV,
        Slots,
        Pos,
        Out,
        scale,
        sq_b,
        sq_h,
        skv_s,
        skv_kv,
        skv_h,
        skv_t,
        so_b,
        so_h,
        G: tl.constexpr,
        GP: tl.constexpr,
        D: tl.constexpr,
        BLOCK: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        slot = tl.load(Slots + b).to(tl.int64)
        p = tl.load(Pos + b).to(tl.int32)
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        rows = g < G  # GP >= 16 rows for tl.dot; the padding rows are zero queries, never stored
        q = tl.load(Q + b * sq_b + (h * G + g)[:, None] * sq_h + d[None, :], mask=rows[:, None], other=0.0)
        k_base = KV + slot * skv_s + h * skv_h
        v_base = k_base + skv_kv
        m_i = tl.full([GP], float("-inf"), tl.float32)  # running max of the scores
        l_i = tl.zeros([GP], tl.float32)  # running sum of exp(score - max)
        acc = tl.zeros([GP, D], tl.float32)
        for start in range(0, p + 1, BLOCK):
            t = start + tl.arange(0, BLOCK)
            seen = t <= p
            k = tl.load(k_base + t[:, None] * skv_t + d[None, :], mask=seen[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [GP, BLOCK]
            s = tl.where(seen[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: position 0 is always seen
            alpha = tl.exp(m_i - m_new)
            w = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(w, 1)
            v = tl.load(v_base + t[:, None] * skv_t + d[None, :], mask=seen[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(w.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(
            Out + b * so_b + (h * G + g)[:, None] * so_h + d[None, :], out.to(Out.dtype.element_ty), mask=rows[:, None]
        )
