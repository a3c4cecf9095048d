"""A gpt-fast-style step engine: own Llama/Qwen2 forward, static slot KV cache, CUDA graphs.

`FastStepEngine` is a drop-in for `arbitrage.engine.HFStepEngine` (same `StepEngine`
contract, and the stop rules, sampling RNG and counters of `arbitrage.engine_common`) built
for speed:

- **Own forward.** `_FastLM` runs Llama / Qwen2 directly over the HF model's weight tensors
  (no copies): embed -> per layer RMSNorm, q/k/v (+ Qwen2 biases), RoPE, GQA attention
  over the static cache, o_proj, residual, RMSNorm, SwiGLU MLP, residual -> final norm ->
  lm_head. cos/sin come from the HF model's own `rotary_emb`, evaluated once for every
  position 0..max_context-1 (exact for every static rope type, llama3 included).
  On CUDA (defaults) two things cut the kernels per decode step, which at batch 1 cost as
  much as the weight streaming: the pointwise pieces (residual add + RMSNorm, RoPE of q
  and k, SwiGLU, log-softmax/entropy/argmax) are `torch.compile`d into one Triton kernel
  each inside the CUDA graphs (compiled on first capture), and q/k/v and
  gate/up become one GEMM each: their weights are concatenated once and the model's
  parameters re-pointed at views of the fused tensors (one copy in memory; the HF model
  keeps working). Timings: docs/BENCHMARKS.md (benchmarks/engine_bench.py).
- **Static slot KV cache.** Per layer, keys and values are [n_slots + 1, n_kv_heads,
  max_context, head_dim] each, allocated once as one tensor [n_slots + 1, 2, ...] (so a
  step writes and gathers both with one kernel each); the last slot is a dummy that
  absorbs the writes of padding. Memory:
  2 (k, v) * layers * n_kv_heads * max_context * head_dim * dtype bytes per slot, e.g. at
  max_context 4096 in bf16: Llama-3.2-1B 128 MiB, Llama-3.1-8B 512 MiB per slot (64 slots:
  8 GiB and 32 GiB). A chain (`chain_id`) owns a slot while cached; the slot remembers its
  token ids, and the chain's next request reuses the longest common token prefix
  (rollback = shortening that list; this is how an escalated step that replaces the draft
  step is handled). Slots are evicted LRU; requests without a chain get a temporary slot.
- **Prefill** writes the uncached tail of each admitted row into its slot, rows batched
  right-padded (padding writes go to the dummy slot), at most `PREFILL_TOKENS` padded
  tokens per forward.
- **Decode** feeds one token for every running row. On CUDA its attention is one Triton
  kernel per layer (`arbitrage.decode_attention`) that reads each row's own slot in place,
  positions 0..pos only. Elsewhere (and with `decode_kernel=False`) attention gathers the
  rows' slots (index_select) over a window of the cache rounded up to `WINDOW_BLOCK`
  positions and masks each row by its own position (a copy of B x window positions per
  layer, which dominates at large batches and long contexts). On CUDA the decode step
  (forward, log-softmax, entropy, argmax) is captured once per batch bucket (and per window
  on the gather path) into a `torch.cuda.CUDAGraph` over static input buffers (tokens,
  positions, slots), lazily, and replayed; a batch is padded to its bucket (1, 2, 4, ...,
  64) with the dummy slot. Graphs are captured when first needed (a fraction of a second;
  they share one memory pool). On CPU the step runs eagerly.
- **Numerics.** float32 matches HFStepEngine to ~1e-6 in log-probs; in bf16 results differ
  from HF's by rounding (other kernels, fused norms), like any two engines.
- **Continuous admission.** One scheduler thread owns the model and the cache. Callers
  (any number of threads) queue their requests and wait on futures; between two decode
  steps the scheduler admits waiting requests (prefills them into the running batch) and
  retires finished rows, so no request waits for the slowest member of another's batch.

- **Tensor parallel.** Given a shard built by DeepSpeed AutoTP (`actors/target_group.py`:
  q/k/v and gate/up split by output rows, o_proj/down and lm_head by input columns) and its
  process group (`tp=TensorParallel(group, lm_head_cols)`), the same forward runs on the
  rank's heads and MLP columns and all-reduces after o_proj, down and lm_head (NCCL
  collectives are captured in the CUDA graphs too). Every rank must see the same requests in
  the same order: with `tp` the scheduler runs one submitted batch to completion before it
  takes the next (no mid-decode admission), so all ranks run the same forward sequence and,
  since the reduced logits are equal on every rank, decode the same tokens.

Not supported: sliding-window layers, and rope types that recompute frequencies per call
("dynamic", "longrope").
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from arbitrage import decode_attention
from arbitrage.engine_base import QueuedStepEngine
from arbitrage.engine_common import Job, SlotPool, advance, eos_ids, pad_id, step_output, token_stats
from configs.schema import kv_slots

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
WINDOW_BLOCK = 256  # decode attends over the cache rounded up to a multiple of this
PREFILL_TOKENS = 8192  # padded tokens per prefill forward (rows x longest tail)
PREFILL_BLOCK = 32  # a prefill's tail length is padded up to a multiple of this
_DYNAMIC_ROPE = ("dynamic", "longrope")


# ---- the forward ----------------------------------------------------------------------
Linear = tuple[torch.Tensor, torch.Tensor | None]  # (weight [O, I], bias [O] or None)


@dataclass
class _Layer:
    """One decoder layer's weight tensors: the HF model's own (or views of one fused tensor)."""

    in_norm: torch.Tensor
    in_eps: float
    qkv: list[Linear]  # [q, k, v], or one fused [q; k; v]
    o: Linear
    post_norm: torch.Tensor
    post_eps: float
    gate_up: list[Linear]  # [gate, up], or one fused [gate; up]
    down: Linear


@dataclass(frozen=True)
class TensorParallel:
    """How a rank's shard is split: its process group, and its columns of lm_head's input."""

    group: object  # torch.distributed ProcessGroup (None: the default world)
    lm_head_cols: tuple[int, int] | None = None  # [start, stop) of the hidden dim; None: lm_head unsplit

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        torch.distributed.all_reduce(x, group=self.group)
        return x


def _layer_weights(layer, fuse: bool) -> _Layer:
    a, m = layer.self_attn, layer.mlp
    qkv, gate_up = [a.q_proj, a.k_proj, a.v_proj], [m.gate_proj, m.up_proj]
    # Quantized weights (torchao tensor subclasses, arbitrage.quant) cannot be concatenated: keep them apart.
    fuse = fuse and all(type(x.weight) in (torch.Tensor, torch.nn.Parameter) for x in qkv + gate_up)
    return _Layer(
        layer.input_layernorm.weight,
        _eps(layer.input_layernorm),
        [_fuse_linears(qkv)] if fuse else [_linear(x) for x in qkv],
        _linear(a.o_proj),
        layer.post_attention_layernorm.weight,
        _eps(layer.post_attention_layernorm),
        [_fuse_linears(gate_up)] if fuse else [_linear(x) for x in gate_up],
        _linear(m.down_proj),
    )


def _linear(module) -> Linear:
    return module.weight, module.bias


def _fuse_linears(modules) -> Linear:
    """Concatenate linears' weights (and biases) into one tensor, then point each module's
    parameters at its rows of it: the HF model keeps working and no second copy is kept.
    A second engine on the same model finds the fused tensors and reuses them."""
    done = getattr(modules[0], "_fused_linear", None)
    if done is not None and done[0].data_ptr() == modules[0].weight.data_ptr():
        return done
    with torch.no_grad():
        w = torch.cat([m.weight for m in modules])  # [sum O, I]
        b = torch.cat([m.bias for m in modules]) if modules[0].bias is not None else None
        row = 0
        for m in modules:
            n = m.weight.shape[0]
            m.weight.data = w[row : row + n]
            if b is not None:
                m.bias.data = b[row : row + n]
            row += n
    modules[0]._fused_linear = (w, b)
    return w, b


def _linears(h: torch.Tensor, parts: list[Linear], sizes: list[int]) -> list[torch.Tensor]:
    """One GEMM per weight; a fused weight's output is split into the parts' columns."""
    if len(parts) == 1:
        return list(F.linear(h, *parts[0]).split(sizes, dim=-1))
    return [F.linear(h, w, b) for w, b in parts]


def _eps(norm) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def check_supported(model) -> None:
    """Raise ValueError unless `model` is a Llama / Qwen2 causal LM this engine can run."""
    cfg = model.config
    mt = getattr(cfg, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"FastStepEngine runs model_type {' or '.join(SUPPORTED_MODEL_TYPES)}, got {mt!r}; "
            "use arbitrage.engine.HFStepEngine for this model"
        )
    kinds = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"} or getattr(cfg, "use_sliding_window", False):
        raise ValueError(
            f"FastStepEngine has no sliding-window attention (layer_types {sorted(kinds)}); "
            "use arbitrage.engine.HFStepEngine"
        )
    rope = getattr(model.model.rotary_emb, "rope_type", "default")
    if any(d in str(rope) for d in _DYNAMIC_ROPE):
        raise ValueError(
            f"rope_type {rope!r} recomputes frequencies per call; FastStepEngine needs a "
            "static rope type (default, linear, llama3, yarn); use arbitrage.engine.HFStepEngine"
        )
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ValueError(
            f"FastStepEngine's MLP is SwiGLU (hidden_act 'silu'), got {cfg.hidden_act!r}; "
            "use arbitrage.engine.HFStepEngine"
        )


# Pointwise pieces of the forward. On CUDA they are torch.compile'd, so each is one fused
# kernel (fewer launches per decode step); on CPU they run as written.
def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """HF Llama/Qwen2 RMSNorm: normalise in float32, cast back, then scale."""
    return w * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _add_rms_norm(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, eps: float):
    """Residual add, then RMSNorm: returns (x + r, norm(x + r))."""
    x = x + r
    return x, _rms_norm(x, w, eps)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with rotate_half's sign folded into sin_signed.

    x: [N, heads, D]; cos, sin_signed: [N, 1, D], sin_signed = [-sin[:D/2], sin[D/2:]].
    """
    half = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * sin_signed


def _rope_qkv(q, k, v, cos, sin_signed):
    """Rotate q and k; return q [N, H, D] and the new cache entries kv [N, 2, Hkv, D]."""
    return _rope(q, cos, sin_signed), torch.stack((_rope(k, cos, sin_signed), v), dim=1)


def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@dataclass(frozen=True)
class _Ops:
    """The pointwise pieces, eager or compiled."""

    norm: Callable
    add_norm: Callable
    rope_qkv: Callable
    swiglu: Callable
    stats: Callable


def make_ops(compiled: bool) -> _Ops:
    fns = (_rms_norm, _add_rms_norm, _rope_qkv, _swiglu, token_stats)
    return _Ops(*(_compiled(f) for f in fns)) if compiled else _Ops(*fns)


def _compiled(fn: Callable) -> Callable:
    """torch.compile(fn); if compiling fails (no Triton, no C compiler), warn once and run fn eagerly."""
    state = {"fn": torch.compile(fn, dynamic=True, fullgraph=True)}

    def call(*args):
        if state["fn"] is fn:
            return fn(*args)
        try:
            return state["fn"](*args)
        except Exception as e:  # noqa: BLE001 - a compiler failure must not stop serving
            warnings.warn(f"FastStepEngine: torch.compile of {fn.__name__} failed ({e!r:.200}); running eagerly")
            state["fn"] = fn
            return fn(*args)

    return call


class _FastLM:
    """Llama / Qwen2 forward over the HF model's own weights and a static slot KV cache."""

    def __init__(
        self,
        model,
        n_slots: int,
        max_context: int,
        compiled: bool = False,
        fuse: bool = False,
        tp: TensorParallel | None = None,
        decode_kernel: bool | None = None,
    ):
        check_supported(model)
        cfg, inner = model.config, model.model
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        # Heads and MLP columns from the weights: a tensor-parallel shard holds a share of them.
        attn, mlp = inner.layers[0].self_attn, inner.layers[0].mlp
        self.n_heads = attn.q_proj.weight.shape[0] // self.head_dim
        self.n_kv = attn.k_proj.weight.shape[0] // self.head_dim
        if (self.n_heads, self.n_kv) != (cfg.num_attention_heads, cfg.num_key_value_heads) and tp is None:
            raise ValueError("the model's attention is a tensor-parallel shard; pass tp=TensorParallel(...)")
        if self.n_kv == 0 or self.n_heads * cfg.num_key_value_heads != self.n_kv * cfg.num_attention_heads:
            raise ValueError(f"shard holds {self.n_heads} query / {self.n_kv} KV heads: not whole GQA groups")
        self.tp = tp
        self.qkv_sizes = [self.n_heads * self.head_dim] + [self.n_kv * self.head_dim] * 2
        self.mlp_sizes = [mlp.gate_proj.weight.shape[0]] * 2
        self.embed = model.get_input_embeddings().weight  # [V, E]
        self.lm_head = model.get_output_embeddings().weight  # [V, E] (tied: the same tensor)
        self.norm, self.norm_eps = inner.norm.weight, _eps(inner.norm)
        self.layers = [_layer_weights(layer, fuse) for layer in inner.layers]
        self.device, self.dtype = self.embed.device, self.embed.dtype
        self.n_slots, self.max_context = n_slots, max_context
        self.dummy = n_slots  # the extra slot that padding writes into
        # Compiled pieces only inside CUDA graphs: called eagerly, a compiled function's
        # guards and wrappers cost more host time than the kernels they save.
        self.eager_ops, self.graph_ops = make_ops(False), make_ops(compiled)
        self.kv_cache = self._allocate_cache()  # per layer [slots + 1, 2, Hkv, C, D]
        self.k_cache = [kv[:, 0] for kv in self.kv_cache]  # views [slots + 1, Hkv, C, D]
        self.v_cache = [kv[:, 1] for kv in self.kv_cache]
        self.cos, self.sin = self._rope_table(inner.rotary_emb)  # [C, D] each
        # Decode attention in place over the slots (Triton) instead of gather + SDPA.
        can = decode_attention.supported(self.device, self.head_dim)
        if decode_kernel and not can:
            raise ValueError(
                "decode_kernel needs CUDA, Triton and a power-of-two head_dim >= 16 "
                f"(device {self.device}, head_dim {self.head_dim})"
            )
        self.decode_kernel = can if decode_kernel is None else decode_kernel

    @property
    def bytes_per_slot(self) -> int:
        """KV bytes one slot holds: 2 (k, v) * layers * kv heads * max_context * head_dim * dtype."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * len(self.layers) * self.n_kv * self.max_context * self.head_dim * elem

    def _allocate_cache(self) -> list[torch.Tensor]:
        # Zeros, not empty: masked positions are multiplied by 0 in attention, and 0 * NaN = NaN.
        shape = (self.n_slots + 1, 2, self.n_kv, self.max_context, self.head_dim)
        try:
            with torch.inference_mode():
                kv = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        except torch.OutOfMemoryError as e:
            gib = self.bytes_per_slot * (self.n_slots + 1) / 2**30
            raise ValueError(
                f"KV cache of {self.n_slots} slots x max_context {self.max_context} needs "
                f"{gib:.1f} GiB; lower max_slots, max_context or kv_cache_tokens"
            ) from e
        return kv

    def _rope_table(self, rotary_emb) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin for positions 0..C-1 from the HF model's own rotary_emb."""
        with torch.inference_mode():
            pos = torch.arange(self.max_context, device=self.device)[None]  # [1, C]
            cos, sin = rotary_emb(self.embed[:1], pos)  # [1, C, D] each, model dtype
            half = self.head_dim // 2
            sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        return cos[0].contiguous(), sin[0].contiguous()

    def forward(self, tokens, pos, write_slots, read_slots, window: int, last=None, ops=None) -> torch.Tensor:
        """Run new tokens against the cache, writing their K/V into it.

        Args:
            tokens, pos, write_slots: [B, S] ids, positions and the slot each token's K/V goes to.
            read_slots: [B] the slot each row attends over (positions < window).
            window: cache positions attended, > every position in `pos`.
            last: [B] index of the token whose logits are wanted (None: the last one).
            ops: the pointwise pieces (default: eager).
        Returns:
            logits: [B, V] float32.
        """
        B, S = tokens.shape
        ops, layers = ops or self.eager_ops, self.layers
        x = F.embedding(tokens, self.embed).view(B * S, -1)  # x: [N, E], N = B * S
        cos, sin = self.cos[pos].view(B * S, 1, -1), self.sin[pos].view(B * S, 1, -1)  # [N, 1, D]
        # [B, 1, G*S, W]; the decode kernel needs none (it reads positions <= pos itself).
        mask = None if self._uses_kernel(S) else self._mask(pos, window)
        h = ops.norm(x, layers[0].in_norm, layers[0].in_eps)
        for i, layer in enumerate(layers):
            a = self._attention(i, layer, h, (cos, sin, mask), (write_slots, pos, read_slots, window), ops)
            x, h = ops.add_norm(x, a, layer.post_norm, layer.post_eps)
            gate, up = _linears(h, layer.gate_up, self.mlp_sizes)
            m = self._row_linear(ops.swiglu(gate, up), layer.down)
            nxt = (layers[i + 1].in_norm, layers[i + 1].in_eps) if i + 1 < len(layers) else (self.norm, self.norm_eps)
            x, h = ops.add_norm(x, m, *nxt)  # h: the next layer's input (after the last: the final norm)
        h = h.view(B, S, -1)
        h = h[:, -1] if last is None else h[torch.arange(B, device=h.device), last]  # [B, E]
        if self.tp is not None and self.tp.lm_head_cols is not None:  # row-parallel head
            lo, hi = self.tp.lm_head_cols
            return self.tp.all_reduce(F.linear(h[:, lo:hi], self.lm_head)).float()  # [B, V]
        return F.linear(h, self.lm_head).float()  # [B, V]

    def _uses_kernel(self, S: int) -> bool:
        """Whether attention of S new tokens per row runs the decode kernel (decode steps only)."""
        return S == 1 and self.decode_kernel

    def _row_linear(self, x: torch.Tensor, linear: Linear) -> torch.Tensor:
        """o_proj / down_proj: on a TP shard, sum the ranks' partial outputs, then add the bias once."""
        w, b = linear
        if self.tp is None:
            return F.linear(x, w, b)
        out = self.tp.all_reduce(F.linear(x, w))
        return out if b is None else out + b

    def _mask(self, pos: torch.Tensor, window: int) -> torch.Tensor:
        """Additive mask: query at position p sees cache positions <= p. Repeated per query head of a group."""
        B, S = pos.shape
        G = self.n_heads // self.n_kv
        seen = torch.arange(window, device=pos.device)[None, None, :] <= pos[:, :, None]  # [B, S, W]
        mask = torch.zeros(seen.shape, dtype=self.dtype, device=pos.device).masked_fill_(~seen, float("-inf"))
        return mask[:, None, None].expand(B, 1, G, S, window).reshape(B, 1, G * S, window)

    def _attention(self, i: int, layer: _Layer, h, rope_mask, where, ops: _Ops) -> torch.Tensor:
        """GQA attention of N = B*S new tokens over their rows' slots. h: [N, E] -> [N, E]."""
        (cos, sin, mask), (write_slots, pos, read_slots, window) = rope_mask, where
        B, S = pos.shape
        H, Hkv, D = self.n_heads, self.n_kv, self.head_dim
        q, k, v = _linears(h, layer.qkv, self.qkv_sizes)  # [N, H*D], [N, Hkv*D], [N, Hkv*D]
        q, kv = ops.rope_qkv(q.view(B * S, H, D), k.view(B * S, Hkv, D), v.view(B * S, Hkv, D), cos, sin)
        cache = self.kv_cache[i]  # [slots + 1, 2, Hkv, C, D]: keys and values in one tensor,
        cache[write_slots, :, :, pos] = kv.view(B, S, 2, Hkv, D)  # so one write (indexed: [B, S, 2, Hkv, D])
        if self._uses_kernel(S):  # decode: attend in place over each row's slot
            out = decode_attention.decode_attention(q.view(B, H, D), cache, read_slots, pos[:, 0])
            return self._row_linear(out.view(B, H * D), layer.o)
        kv = cache[:, :, :, :window].index_select(0, read_slots)  # and one gather: [B, 2, Hkv, W, D]
        keys, values = kv[:, 0], kv[:, 1]  # [B, Hkv, W, D] each
        # GQA without repeating K/V: the G query heads of a KV head act as G*S query rows.
        G = H // Hkv
        q = q.view(B, S, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * S, D)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # [B, Hkv, G*S, D]
        out = out.view(B, Hkv, G, S, D).permute(0, 3, 1, 2, 4).reshape(B * S, H * D)
        return self._row_linear(out, layer.o)  # [N, E]

    def decode(self, inp: torch.Tensor, window: int, graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step. inp: [3, B] (token, position, slot); returns logits [B, V], stats [3, B].

        graph: being captured into a CUDA graph (use the compiled pointwise pieces).
        """
        ops = self.graph_ops if graph else self.eager_ops
        tokens, pos, slots = inp[0][:, None], inp[1][:, None], inp[2]  # [B, 1], [B, 1], [B]
        logits = self.forward(tokens, pos, slots[:, None], slots, window, ops=ops)
        return logits, ops.stats(logits)


# ---- CUDA graphs of the decode step -----------------------------------------------------
@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    inp: torch.Tensor  # [3, Bb] static input: token, position, slot
    logits: torch.Tensor  # [Bb, V] static output
    stats: torch.Tensor  # [3, Bb] static output


class DecodeGraphs:
    """Decode step captured as CUDA graphs, one per (batch bucket, window), captured on first use."""

    def __init__(self, lm: _FastLM, pad_id: int):
        self.lm, self.pad_id = lm, pad_id
        self.buckets = _batch_buckets(lm.n_slots)
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle()  # one memory pool: graphs replay one at a time
        # Captured on a stream of its own: cuBLAS keys its workspace by stream, and a graph keeps
        # the workspace of the stream it was captured on, so two engines' graphs captured on
        # torch's one default capture stream would share a workspace when they replay at once
        # (colocated engines on two CUDA streams).
        self.capture_stream = torch.cuda.Stream(lm.device)

    def run(self, toks: list[int], pos: list[int], slots: list[int], window: int):
        """Replay the graph for this batch; returns (stats [3, B] on CPU, logits [B, V] on device)."""
        B = len(toks)
        Bb = next(b for b in self.buckets if b >= B)
        if self.lm.decode_kernel:  # the kernel reads each row's own length: one graph per bucket
            window = self.lm.max_context
        g = self.graphs.get((Bb, window)) or self._capture(Bb, window)
        pad = Bb - B  # padding rows: the dummy slot at position 0
        host = torch.tensor([toks + [self.pad_id] * pad, pos + [0] * pad, slots + [self.lm.dummy] * pad])
        g.inp.copy_(host)
        g.graph.replay()
        return g.stats[:, :B].cpu(), g.logits[:B]

    def _capture(self, Bb: int, window: int) -> _Graph:
        lm = self.lm
        inp = torch.zeros((3, Bb), dtype=torch.long, device=lm.device)
        inp[0], inp[2] = self.pad_id, lm.dummy  # warm-up and capture touch only the dummy slot
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (cuBLAS handles, workspaces) outside the capture
            for _ in range(2):
                lm.decode(inp, window, graph=True)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.capture_stream, capture_error_mode="thread_local"):
            logits, stats = lm.decode(inp, window, graph=True)
        g = _Graph(graph, inp, logits, stats)
        self.graphs[(Bb, window)] = g
        return g


def _batch_buckets(n_slots: int) -> list[int]:
    """1, 2, 4, ... up to the first power of two >= n_slots."""
    out = [1]
    while out[-1] < n_slots:
        out.append(out[-1] * 2)
    return out


# ---- the engine -----------------------------------------------------------------------------
class FastStepEngine(QueuedStepEngine):
    """Step engine with its own Llama/Qwen2 forward, slot KV cache, CUDA graphs and continuous batching."""

    def __init__(
        self,
        model,
        tokenizer,
        max_context: int = 4096,
        max_slots: int | None = 64,
        kv_cache_tokens: int | None = None,
        use_cuda_graphs: bool = True,
        compile_ops: bool | None = None,
        fuse_weights: bool | None = None,
        tp: TensorParallel | None = None,
        decode_kernel: bool | None = None,
    ):
        """Args:
        model: an HF Llama or Qwen2 causal LM (its weights are used in place).
        tokenizer: the model's tokenizer.
        max_context: tokens per slot (prompt + step).
        max_slots: KV slots = most chains cached and rows decoded at once.
        kv_cache_tokens: optional bound on cached tokens; the slots are
            `configs.schema.kv_slots(max_slots, max_context, kv_cache_tokens)`; 0 keeps no
            chain's KV between requests.
        use_cuda_graphs: replay the decode step as CUDA graphs (CUDA only).
        compile_ops: torch.compile the pointwise pieces (norms, rope, SwiGLU, sampling
            statistics) of the CUDA-graph decode step into fused kernels; default: on CUDA.
        fuse_weights: concatenate q/k/v and gate/up weights into one GEMM each; the model's
            parameters are re-pointed at views of the fused tensors (no second copy; the
            model still works, e.g. for an HFStepEngine or PRM sharing it); default: on CUDA only.
        tp: the model is this rank's AutoTP shard (see TensorParallel); every rank must
            submit the same requests in the same order, one batch at a time.
        decode_kernel: decode attention with the Triton kernel of arbitrage.decode_attention
            (in place over the slots) instead of gather + SDPA; default: where it can run.
        """
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.eos = eos_ids(model, tokenizer)
        self.pad_id = pad_id(tokenizer, self.eos)
        self.forward_calls = 0
        self.prefill_tokens = 0
        self.reused_tokens = 0
        self.reuse = kv_cache_tokens != 0
        n_slots = kv_slots(max_slots, max_context, kv_cache_tokens)
        on_cuda = next(model.parameters()).device.type == "cuda"
        compiled = on_cuda if compile_ops is None else compile_ops
        fuse = on_cuda if fuse_weights is None else fuse_weights
        self.lm = _FastLM(model, n_slots, max_context, compiled=compiled, fuse=fuse, tp=tp, decode_kernel=decode_kernel)
        self.continuous = tp is None  # TP ranks run each batch alone, in lockstep
        self.device = self.lm.device
        self.slots = SlotPool(n_slots)
        use_graphs = use_cuda_graphs and self.device.type == "cuda"
        self.graphs = DecodeGraphs(self.lm, self.pad_id) if use_graphs else None
        # Counters; the *_s entries are scheduler-thread seconds (prefill: forward + first token;
        # decode: forward or graph replay + sampling bookkeeping; idle: waiting for requests).
        self.stats = {
            "decode_steps": 0,
            "admitted_mid_decode": 0,
            "max_running": 0,
            "prefill_s": 0.0,
            "decode_s": 0.0,
            "idle_s": 0.0,
        }
        self._init_queue()
        self._thread = threading.Thread(target=self._loop, name="fast-step-engine", daemon=True)
        self._thread.start()

    # ---- public -------------------------------------------------------------------
    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of the static KV cache (all slots and the dummy slot)."""
        return self.lm.bytes_per_slot * (self.lm.n_slots + 1)

    def close(self) -> None:
        """Stop the scheduler thread; requests still queued or running fail with RuntimeError."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join(timeout=60)

    # ---- the scheduler thread ---------------------------------------------------------------
    def _loop(self) -> None:
        """Admit waiting requests, run one decode step, retire finished rows; repeat."""
        dev = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with torch.inference_mode(), dev:
            while True:
                idle = not self._running and not self._waiting
                t0 = time.perf_counter()
                if (idle or self.continuous) and not self._pull(block=idle):
                    break
                t1 = time.perf_counter()
                self.stats["idle_s"] += t1 - t0
                try:
                    self._admit()
                    t2 = time.perf_counter()
                    self.stats["prefill_s"] += t2 - t1
                    if self._running:
                        self._decode_step()
                        self.stats["decode_s"] += time.perf_counter() - t2
                except Exception as e:  # noqa: BLE001 - fail the requests in flight, keep serving
                    self._fail(self._running, e, keep=False)
                    self._running = []
            self._fail(self._running + list(self._waiting), RuntimeError("FastStepEngine closed"), keep=False)

    def _admit(self) -> None:
        """Give waiting jobs slots (FIFO, while slots last) and prefill them into the batch."""
        admitted = self._take_slots()
        if not admitted:
            return
        if self._running:
            self.stats["admitted_mid_decode"] += len(admitted)
        self._running += [job for job, _ in admitted]
        for group in _prefill_groups(admitted):
            self._prefill(group)
        self.stats["max_running"] = max(self.stats["max_running"], len(self._running))

    def _prefill(self, group: list[tuple[Job, int]]) -> None:
        """One forward over the uncached tails of a group of rows (right-padded)."""
        # Shapes are rounded (tail to PREFILL_BLOCK, window to WINDOW_BLOCK) so they repeat:
        # every new shape costs kernel selection / planning on first use.
        B, S = len(group), _round_up(max(len(job.ids) - n for job, n in group), PREFILL_BLOCK)
        C, dummy = self.max_context, self.lm.dummy
        tokens = torch.full((B, S), self.pad_id, dtype=torch.long)
        pos = torch.zeros((B, S), dtype=torch.long)
        write = torch.full((B, S), dummy, dtype=torch.long)  # padding writes go to the dummy slot
        for i, (job, n) in enumerate(group):
            tail = job.ids[n:]
            tokens[i, : len(tail)] = torch.tensor(tail)
            pos[i] = torch.arange(n, n + S).clamp_(max=C - 1)
            write[i, : len(tail)] = job.slot
            self.slots.ids[job.slot] = list(job.ids)
        read = torch.tensor([job.slot for job, _ in group])
        last = torch.tensor([len(job.ids) - n - 1 for job, n in group])
        window = min(C, _round_up(max(len(job.ids) for job, _ in group), WINDOW_BLOCK))
        dev = self.device
        self.forward_calls += 1
        with _prefill_attention(dev):
            logits = self.lm.forward(tokens.to(dev), pos.to(dev), write.to(dev), read.to(dev), window, last.to(dev))
        jobs = [job for job, _ in group]
        self._consume(jobs, token_stats(logits).cpu(), logits)

    def _decode_step(self) -> None:
        """Feed every running row its last sampled token; sample the next."""
        jobs = self._running
        toks = [j.next_tok for j in jobs]
        slots = [j.slot for j in jobs]
        pos = [len(self.slots.ids[s]) for s in slots]
        window = min(self.max_context, _round_up(max(pos) + 1, WINDOW_BLOCK))
        if self.graphs is not None:
            stats, logits = self.graphs.run(toks, pos, slots, window)
        else:
            inp = torch.tensor([toks, pos, slots], device=self.device)  # [3, B]
            logits, stats = self.lm.decode(inp, window)
            stats = stats.cpu()
        for j in jobs:
            self.slots.ids[j.slot].append(j.next_tok)
        self.forward_calls += 1
        self.stats["decode_steps"] += 1
        self._consume(jobs, stats, logits)

    def _consume(self, jobs: list[Job], stats: torch.Tensor, logits: torch.Tensor) -> None:
        """Record each row's next token (greedy from stats, or sampled); retire finished rows.

        stats: [3, B] float64 on CPU (greedy id, its log-prob, entropy); logits: [B, V].
        """
        done = set()
        greedy, greedy_lp, entropy = stats.tolist()  # python floats: cheap per-row reads
        for i, job in enumerate(jobs):
            if job.row is None:  # next_token_logits: the prefill logits are the answer
                job.future.set_result(logits[i])
                self.slots.release(job.slot, keep=True)
                done.add(job)
                continue
            if advance(job, logits[i], int(greedy[i]), greedy_lp[i], entropy[i], self.eos, self.tokenizer):
                job.future.set_result(step_output(job.row, len(job.ids), self.tokenizer))
                self.slots.release(job.slot, keep=True)
                done.add(job)
        if done:
            self._running = [j for j in self._running if j not in done]

    def _fail(self, jobs: list[Job], err: Exception, keep: bool) -> None:
        for job in jobs:
            if job.slot >= 0:
                self.slots.release(job.slot, keep=keep)
            if not job.future.done():
                job.future.set_exception(err)


def _prefill_groups(admitted: list[tuple[Job, int]]) -> list[list[tuple[Job, int]]]:
    """Rows sorted by tail length, grouped so rows x longest tail <= PREFILL_TOKENS."""
    order = sorted(admitted, key=lambda a: len(a[0].ids) - a[1])
    groups: list[list[tuple[Job, int]]] = []
    for job, n in order:
        tail = len(job.ids) - n
        if groups and (len(groups[-1]) + 1) * tail <= PREFILL_TOKENS:
            groups[-1].append((job, n))
        else:
            groups.append([(job, n)])
    return groups


def _prefill_attention(device: torch.device):
    """On CUDA, SDPA's memory-efficient kernel (or math) for prefill: it takes our additive
    mask and needs no per-shape planning, whereas a backend that builds a plan per new
    (batch, tail, window) shape pays for it on nearly every admission."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block
