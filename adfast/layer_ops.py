"""The decoder's elementwise chains, as functions over tensors with two implementations.

Between its matmuls and attention, a decoder layer runs short chains of elementwise ops: the
residual add and RMSNorm, rotary embeddings with the KV-cache write, the SiLU-gated activation,
and in tangent mode their forward-mode derivatives. In PyTorch each op is a kernel launch (about
30 per layer, 60 in tangent mode), which at decode batch sizes costs as much as reading the
weights, so on CUDA each chain is one Triton kernel (:mod:`adfast.kernels.rms_norm`,
:mod:`adfast.kernels.rotary_cache`, :mod:`adfast.kernels.silu_mul`). Where the decoder's linears
run in :mod:`adfast.kernels.decode_linear`, the primal chains fold into those launches instead
(:meth:`adfast.decoder.Decoder._fuses`), with these kernels' arithmetic.

:func:`layer_ops` returns one of two namespaces holding the same seven functions (``add_rms_norm``,
``add_rms_norm_jvp``, ``rope_and_cache_write``, ``rope_and_cache_write_jvp``, ``silu_mul``,
``silu_mul_jvp``, and ``step_positions``, a forward's cache positions and rotary rows, about 17
small ops in PyTorch and one launch as :mod:`adfast.kernels.positions`) with the same signatures
(the tangent functions take a ``low_rank`` :class:`LowRankTerm` of the tangent they read, which the
kernels add as they load it): :data:`TORCH` (this module: the CPU and float64 path, and the
reference the kernels are tested against) or the Triton kernels, whose results agree up to float32
summation order and the dtype rounding each kernel's docstring states (a kernel computes its chain
in float32 and rounds once where PyTorch rounds after each op).

Shapes: ``C`` weight copies, ``N = B T`` token rows, ``E`` hidden size, ``I`` MLP width,
``H`` / ``KV`` query / key-value heads of dim ``D``; caches are one layer's
``[C, max_batch, S + 1, KV, D]`` (position ``S`` is scratch, :class:`adfast.decoder.KVCache`).
"""
from __future__ import annotations

from functools import cache
from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.nn.functional as F


LOW_RANK_MAX_RANK = 64  # the largest R the fused kernels take (adfast.kernels.low_rank_term.MAX_RANK)


class LowRankTerm(NamedTuple):
    """``z U^T``, still to be added to a linear layer's output tangent ``d [C, N, m]``: ``z [C, N, R]``,
    ``u [C, m, R]`` (a factored weight tangent's ``x G^T``; :func:`adfast.tangent.linear_jvp`).
    The fused kernels add it as they load ``d`` (:mod:`adfast.kernels.low_rank_term`, ``R <=
    LOW_RANK_MAX_RANK``); here :meth:`added_to` is one ``baddbmm``."""

    z: torch.Tensor
    u: torch.Tensor

    def added_to(self, d: torch.Tensor) -> torch.Tensor:
        """``d + z U^T`` in ``d``'s dtype, rounded once."""
        return torch.baddbmm(d, self.z, self.u.transpose(1, 2))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 activations, else float32: the dtype of norms, rotary tables and softmax."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)`` for ``x [C, N, E]``, ``weight [C, E]``.

    The statistics are taken in float32 (float64 for float64 ``x``), the product in ``x``'s dtype.
    """
    h = x.to(compute_dtype(x.dtype))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight[:, None] * h.to(x.dtype)


def rms_norm_jvp(x: torch.Tensor, dx: torch.Tensor, weight: torch.Tensor, dweight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rms_norm` and its tangent: with ``r = rsqrt(mean(x^2) + eps)``, ``y = w x r`` and
    ``dy = dw x r + w r (dx - x r^2 mean(x dx))``, statistics in float32 (float64 for float64)."""
    h, dh = x.to(compute_dtype(x.dtype)), dx.to(compute_dtype(x.dtype))
    r = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    normed = h * r
    dnormed = r * (dh - h * (r * r) * (h * dh).mean(-1, keepdim=True))
    normed, dnormed = normed.to(x.dtype), dnormed.to(x.dtype)
    return weight[:, None] * normed, dweight[:, None] * normed + weight[:, None] * dnormed


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [C, B, T, heads, D]`` by the angles of ``cos, sin [B, T, D]``: ``x cos + rotate_half(x) sin``.

    ``rotate_half(x) = (-x[D/2:], x[:D/2])`` (the half-split convention of transformers'
    Llama); the tables are cast to ``x``'s dtype first, as transformers does.
    """
    cos, sin = cos[None, :, :, None].to(x.dtype), sin[None, :, :, None].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, rms_norm(s))`` with ``s = x + residual`` (or ``x``): the residual stream and its norm."""
    s = x if residual is None else x + residual
    return s, rms_norm(s, weight, eps)


def add_rms_norm_jvp(x, dx, weight, dweight, eps: float, residual=None, dresidual=None, low_rank=None):
    """:func:`add_rms_norm` and its tangent: ``(s, ds, y, dy)``; ``low_rank``: a :class:`LowRankTerm`
    of ``dresidual``."""
    if low_rank is not None:
        dresidual = low_rank.added_to(dresidual)
    s, ds = (x, dx) if residual is None else (x + residual, dx + dresidual)
    return (s, ds) + rms_norm_jvp(s, ds, weight, dweight, eps)


def _split_heads(qkv: torch.Tensor, batch: int, heads: int, kv_heads: int):
    """``qkv [C, B T, (H + 2 KV) D]`` -> q ``[C, B, T, H, D]``, k, v ``[C, B, T, KV, D]``."""
    copies, rows, width = qkv.shape
    head_dim = width // (heads + 2 * kv_heads)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    shape = (copies, batch, rows // batch)
    return q.reshape(*shape, heads, head_dim), k.reshape(*shape, kv_heads, head_dim), \
        v.reshape(*shape, kv_heads, head_dim)


def rope_and_cache_write(qkv, cos, sin, k_cache, v_cache, slots, write_pos, heads: int, kv_heads: int, bias=None):
    """Rotary embeddings and the KV-cache write of one layer; returns the rotated queries.

    ``qkv [C, B T, (H + 2 KV) D]`` (the fused projection: q heads, k heads, v heads; plus ``bias
    [C, (H + 2 KV) D]`` when given), ``cos, sin [B, T, D]``, ``slots [B]``, ``write_pos [B, T]``:
    ``k_cache[c, slots[b], write_pos[b, t]] = rope(k)[c, b, t]`` and likewise ``v`` (unrotated);
    returns ``rope(q) [C, B, T, H, D]``.
    """
    if bias is not None:
        qkv = qkv + bias[:, None]
    q, k, v = _split_heads(qkv, cos.shape[0], heads, kv_heads)
    k_cache[:, slots[:, None], write_pos] = apply_rope(k, cos, sin).to(k_cache.dtype)
    v_cache[:, slots[:, None], write_pos] = v.to(v_cache.dtype)
    return apply_rope(q, cos, sin)


def rope_and_cache_write_jvp(qkv, dqkv, cos, sin, k_cache, v_cache, dk_cache, dv_cache, slots, write_pos,
                             heads: int, kv_heads: int, bias=None, dbias=None, low_rank=None):
    """:func:`rope_and_cache_write` and its tangent (rotary is linear: the tangents rotate alike;
    ``dk``, ``dv`` go to ``dk_cache``, ``dv_cache``; ``dbias`` is the bias's tangent, None for
    zero; ``low_rank``: a :class:`LowRankTerm` of ``dqkv``, added before ``dbias``); returns
    ``(rope(q), rope(dq))``."""
    if low_rank is not None:
        dqkv = low_rank.added_to(dqkv)
    q = rope_and_cache_write(qkv, cos, sin, k_cache, v_cache, slots, write_pos, heads, kv_heads, bias)
    dq = rope_and_cache_write(dqkv, cos, sin, dk_cache, dv_cache, slots, write_pos, heads, kv_heads, dbias)
    return q, dq


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up [C, N, 2 I]`` = ``[gate | up]``; ``[C, N, I]``."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul_jvp(gate_up: torch.Tensor, dgate_up: torch.Tensor,
                 low_rank: LowRankTerm | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`silu_mul` and its tangent ``silu'(g) dg u + silu(g) du``, ``silu'(g) = s (1 + g (1 - s))``,
    ``s = sigmoid(g)``; ``low_rank``: a :class:`LowRankTerm` of ``dgate_up``."""
    if low_rank is not None:
        dgate_up = low_rank.added_to(dgate_up)
    (gate, up), (dgate, dup) = gate_up.chunk(2, dim=-1), dgate_up.chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    act = F.silu(gate)
    dact = sig * (1 + gate * (1 - sig)) * dgate
    return act * up, dact * up + act * dup


def step_positions(lengths, slots, num_tokens, seq: int, cos_table, sin_table):
    """A forward's positions (:mod:`adfast.kernels.positions` states the math): ``write_pos,
    query_pos [B, T]``, rotary rows ``cos, sin [B, T, D]`` and decode's live lengths ``[B]``; the
    slots' ``lengths`` advance in place."""
    max_seq_len = cos_table.shape[0]
    start = lengths[slots]
    t = torch.arange(seq, device=slots.device)[None, :]
    position = start[:, None] + t
    real = (t < num_tokens[:, None]) & (position < max_seq_len)
    write_pos = torch.where(real, position, max_seq_len)
    query_pos = (start[:, None] + torch.minimum(t, num_tokens[:, None] - 1)).clamp(0, max_seq_len - 1)
    lengths[slots] = (start + num_tokens).clamp(max=max_seq_len)
    return write_pos, query_pos, cos_table[query_pos], sin_table[query_pos], query_pos[:, 0] + 1


TORCH = SimpleNamespace(add_rms_norm=add_rms_norm, add_rms_norm_jvp=add_rms_norm_jvp,
                        rope_and_cache_write=rope_and_cache_write, rope_and_cache_write_jvp=rope_and_cache_write_jvp,
                        silu_mul=silu_mul, silu_mul_jvp=silu_mul_jvp, step_positions=step_positions)


@cache
def _triton_ops() -> SimpleNamespace:
    from .kernels.rms_norm import add_rms_norm as k_add_rms_norm, add_rms_norm_jvp as k_add_rms_norm_jvp
    from .kernels.rotary_cache import rope_and_cache_write as k_rope, rope_and_cache_write_jvp as k_rope_jvp
    from .kernels.positions import step_positions as k_step_positions
    from .kernels.silu_mul import silu_mul as k_silu_mul, silu_mul_jvp as k_silu_mul_jvp

    return SimpleNamespace(add_rms_norm=k_add_rms_norm, add_rms_norm_jvp=k_add_rms_norm_jvp,
                           rope_and_cache_write=k_rope, rope_and_cache_write_jvp=k_rope_jvp,
                           silu_mul=k_silu_mul, silu_mul_jvp=k_silu_mul_jvp, step_positions=k_step_positions)


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def layer_ops(x: torch.Tensor, fused: bool | None = None) -> SimpleNamespace:
    """:data:`TORCH` or the Triton kernels for activations like ``x``.

    ``fused=None``: the kernels for CUDA tensors in float32/bfloat16/float16, PyTorch otherwise;
    True forces the kernels (on CPU tensors they need ``TRITON_INTERPRET=1``: tests), False PyTorch.
    """
    if fused is None:
        fused = x.is_cuda and x.dtype in KERNEL_DTYPES
    if not fused:
        return TORCH
    if x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the fused layer kernels take float32, bfloat16 or float16 activations, got {x.dtype}")
    return _triton_ops()
