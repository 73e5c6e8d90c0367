"""Rotary embeddings of q and k and the KV-cache write of one layer, in one launch (and its tangent).

Shapes (``C`` weight copies, ``B`` rows of ``T`` tokens, ``H`` / ``KV`` query / key-value heads of
even dim ``D``, ``S = max_seq_len``)::

    qkv, dqkv          [C, B T, (H + 2 KV) D]     the fused projection (q heads, k heads, v heads) and its tangent
    bias, dbias        [C, (H + 2 KV) D]          optional: the projection's bias and its tangent, added first
    cos, sin           [B, T, D]  float32          the rotary tables at each token's position
    k_cache, v_cache   [C, max_batch, S + 1, KV, D]  one layer's cache (dk_cache, dv_cache: their tangents)
    slots              [B]     int                 cache slot of row b
    write_pos          [B, T]  int in [0, S]       where token (b, t) goes (S: the scratch position of padding)
    q, dq (returned)   [C, B, T, H, D]             qkv's dtype

Math, as :func:`adfast.layer_ops.rope_and_cache_write` (transformers' half-split convention),
with ``x1, x2`` the halves of a head and ``c1, c2`` / ``s1, s2`` the halves of the cos / sin rows::

    rope(x) = (x1 c1 - x2 s1,  x2 c2 + x1 s2)
    q = rope(q heads);   k_cache[c, slots[b], write_pos[b, t]] = rope(k heads), v_cache[...] = v heads

and in tangent mode (rotary is linear in x) ``dq = rope(dq heads)``, ``dk_cache[...] =
rope(dk heads)``, ``dv_cache[...] = dv heads``. With a bias, ``qkv + bias`` (rounded to qkv's
dtype, as a separate PyTorch add would) takes qkv's place, and ``dqkv + dbias`` dqkv's: the
tangent pass's projection (``adfast.tangent.linear_jvp``, one matmul for primal and tangent rows)
has no per-half bias input, so its bias add happens here instead of in two more launches. With
a factored weight tangent's term ``(z, U)`` (:mod:`adfast.kernels.low_rank_term`), ``round(dqkv + z
U^T)`` takes dqkv's place before ``dbias`` joins.
Rounding: cos and sin are first rounded to qkv's dtype (as transformers casts the tables), then
each output element is computed in float32 and rounded once to its destination's dtype; PyTorch
rounds ``x cos``, ``rotate_half(x) sin`` and their sum separately, so bf16/fp16 results may
differ from it in the last bit.

One program per (copy, token) (grid ``C B T``) handles all heads of the token as
``[H_PAD, HALF_PAD]`` tiles (next powers of two of ``H``/``KV`` and ``D / 2``, masked), so a
launch covers what PyTorch does in about twelve (two rotations of five ops each, two indexed
writes), twenty-four in tangent mode. Padding tokens of several rows may write the same scratch
position ``S`` at once; nothing ever reads it, so the race is harmless. No host reads: the launch
is CUDA-graph safe.
"""
import torch
import triton
import triton.language as tl

from . import split as launch_plan
from .launch_order import wait_for_predecessor
from .low_rank_term import add_low_rank, check_low_rank, low_rank_args


@triton.jit
def _load_halves(src, bias, low_rank, h, k, hmask, kmask, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
                 HAS_BIAS: tl.constexpr, RANK: tl.constexpr):
    """The two halves of heads ``h`` (a ``[H_PAD]`` column of head indices) of the row at ``src``,
    plus the same entries of ``z U^T`` when ``RANK > 0`` (``low_rank = (z_row, sz_r, U, su_m, su_r)``,
    ``U`` at the part's first column) and then of ``bias`` (each sum rounded to the row's dtype); ``k`` the
    ``[HALF_PAD]`` offsets within a half. In the row's dtype."""
    offsets = h[:, None] * HEAD_DIM + k[None, :]
    mask = hmask[:, None] & kmask[None, :]
    x1 = tl.load(src + offsets, mask=mask, other=0.0)
    x2 = tl.load(src + offsets + HALF, mask=mask, other=0.0)
    elem = src.dtype.element_ty
    if RANK > 0:
        z_row, sz_r, u, su_m, su_r = low_rank
        x1 = add_low_rank(x1.to(tl.float32), z_row, sz_r, u, su_m, su_r, offsets, mask, RANK).to(elem)
        x2 = add_low_rank(x2.to(tl.float32), z_row, sz_r, u, su_m, su_r, offsets + HALF, mask, RANK).to(elem)
    if HAS_BIAS:
        x1 = (x1.to(tl.float32) + tl.load(bias + offsets, mask=mask, other=0.0).to(tl.float32)).to(elem)
        x2 = (x2.to(tl.float32) + tl.load(bias + offsets + HALF, mask=mask, other=0.0).to(tl.float32)).to(elem)
    return x1, x2


@triton.jit
def rotate(x1, x2, cos1, sin1, cos2, sin2):
    """The rotated halves ``(x1 c1 - x2 s1, x2 c2 + x1 s2)`` of float32 ``x1, x2`` (tables broadcast
    to them); the decode-time linear's rotary epilogue (:mod:`adfast.kernels.decode_linear`) uses it
    too, so that both compile the same arithmetic."""
    return x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2


@triton.jit
def _rotate_heads(src, bias, low_rank, cos1, sin1, cos2, sin2, h, k, hmask, kmask, HEAD_DIM: tl.constexpr,
                  HALF: tl.constexpr, HAS_BIAS: tl.constexpr, RANK: tl.constexpr):
    """Rotated halves (:func:`rotate`) in float32 of heads ``h`` of the row at ``src`` (plus ``z U^T``
    and ``bias``: :func:`_load_halves`)."""
    x1, x2 = _load_halves(src, bias, low_rank, h, k, hmask, kmask, HEAD_DIM, HALF, HAS_BIAS, RANK)
    return rotate(x1.to(tl.float32), x2.to(tl.float32), cos1[None, :], sin1[None, :], cos2[None, :], sin2[None, :])


@triton.jit
def _store_halves(dst, out1, out2, h, k, hmask, kmask, head_stride, HALF: tl.constexpr):
    mask = hmask[:, None] & kmask[None, :]
    ptr = dst + h[:, None].to(tl.int64) * head_stride + k[None, :]
    tl.store(ptr, out1.to(dst.dtype.element_ty), mask=mask)
    tl.store(ptr + HALF, out2.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _rope_token(src, bias, low_rank, q_dst, k_dst, v_dst, tables, h, j, k, hmask, jmask, kmask, s_cache_j,
                HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
                HAS_BIAS: tl.constexpr, RANK: tl.constexpr):
    """One token's row of a fused projection at ``src`` (plus ``z U^T`` when ``RANK > 0``,
    ``low_rank = (z_row, sz_r, U, su_m, su_r)``, and ``bias``): rotated q heads to ``q_dst``
    (contiguous heads), rotated k heads and the v heads to one cache position at ``k_dst`` / ``v_dst``."""
    cos1, sin1, cos2, sin2 = tables
    z_row, sz_r, u, su_m, su_r = low_rank
    q1, q2 = _rotate_heads(src, bias, low_rank, cos1, sin1, cos2, sin2, h, k, hmask, kmask, HEAD_DIM, HALF,
                           HAS_BIAS, RANK)
    _store_halves(q_dst, q1, q2, h, k, hmask, kmask, HEAD_DIM, HALF)
    k_off = HEADS * HEAD_DIM
    k_low_rank = (z_row, sz_r, u + k_off * su_m, su_m, su_r)
    k1, k2 = _rotate_heads(src + k_off, bias + k_off, k_low_rank, cos1, sin1, cos2, sin2, j, k, jmask, kmask,
                           HEAD_DIM, HALF, HAS_BIAS, RANK)
    _store_halves(k_dst, k1, k2, j, k, jmask, kmask, s_cache_j, HALF)
    v_off = (HEADS + KV_HEADS) * HEAD_DIM
    v_low_rank = (z_row, sz_r, u + v_off * su_m, su_m, su_r)
    v1, v2 = _load_halves(src + v_off, bias + v_off, v_low_rank, j, k, jmask, kmask, HEAD_DIM, HALF, HAS_BIAS,
                          RANK)
    _store_halves(v_dst, v1, v2, j, k, jmask, kmask, s_cache_j, HALF)


@triton.jit
def _rope_and_cache_write(
    qkv_ptr, dqkv_ptr, bias_ptr, dbias_ptr, cos_ptr, sin_ptr, q_ptr, dq_ptr, k_ptr, v_ptr, dk_ptr, dv_ptr,
    slots_ptr, pos_ptr, z_ptr, u_ptr,
    tokens, seq, s_qkv_c, s_qkv_n, s_dqkv_c, s_dqkv_n, s_bias_c, s_dbias_c, s_cos_b, s_cos_t,
    s_cache_c, s_cache_s, s_cache_n, s_cache_j, sz_c, sz_n, sz_r, su_c, su_m, su_r,
    HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
    H_PAD: tl.constexpr, KV_PAD: tl.constexpr, HALF_PAD: tl.constexpr, TANGENT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_DBIAS: tl.constexpr, RANK: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_predecessor(PDL)
    pid = tl.program_id(0)
    c = pid // tokens
    n = pid % tokens  # token row b T + t
    b = n // seq
    t = n % seq
    k = tl.arange(0, HALF_PAD)
    kmask = k < HALF
    table = cos_ptr + b.to(tl.int64) * s_cos_b + t.to(tl.int64) * s_cos_t
    elem = qkv_ptr.dtype.element_ty
    cos1 = tl.load(table + k, mask=kmask, other=0.0).to(elem).to(tl.float32)
    cos2 = tl.load(table + HALF + k, mask=kmask, other=0.0).to(elem).to(tl.float32)
    table = sin_ptr + b.to(tl.int64) * s_cos_b + t.to(tl.int64) * s_cos_t
    sin1 = tl.load(table + k, mask=kmask, other=0.0).to(elem).to(tl.float32)
    sin2 = tl.load(table + HALF + k, mask=kmask, other=0.0).to(elem).to(tl.float32)

    h = tl.arange(0, H_PAD)
    hmask = h < HEADS
    j = tl.arange(0, KV_PAD)
    jmask = j < KV_HEADS
    slot = tl.load(slots_ptr + b).to(tl.int64)
    pos = tl.load(pos_ptr + n).to(tl.int64)
    cache_off = c.to(tl.int64) * s_cache_c + slot * s_cache_s + pos * s_cache_n
    q_off = (c.to(tl.int64) * tokens + n) * HEADS * HEAD_DIM
    src = qkv_ptr + c.to(tl.int64) * s_qkv_c + n.to(tl.int64) * s_qkv_n

    tables = (cos1, sin1, cos2, sin2)
    _rope_token(src, bias_ptr + c.to(tl.int64) * s_bias_c, (z_ptr, 0, u_ptr, 0, 0), q_ptr + q_off,
                k_ptr + cache_off, v_ptr + cache_off, tables, h, j, k, hmask, jmask, kmask, s_cache_j, HEADS,
                KV_HEADS, HEAD_DIM, HALF, HAS_BIAS, 0)
    if TANGENT:  # with RANK > 0, dqkv + z U^T (kernels/low_rank_term.py), then + dbias
        src = dqkv_ptr + c.to(tl.int64) * s_dqkv_c + n.to(tl.int64) * s_dqkv_n
        low_rank = (z_ptr + c.to(tl.int64) * sz_c + n.to(tl.int64) * sz_n, sz_r, u_ptr + c.to(tl.int64) * su_c, su_m,
                    su_r)
        _rope_token(src, dbias_ptr + c.to(tl.int64) * s_dbias_c, low_rank, dq_ptr + q_off, dk_ptr + cache_off,
                    dv_ptr + cache_off, tables, h, j, k, hmask, jmask, kmask, s_cache_j, HEADS, KV_HEADS, HEAD_DIM,
                    HALF, HAS_DBIAS, RANK)


def check_inputs(qkv, cos, sin, caches, slots, write_pos, heads: int, kv_heads: int, dqkv=None, biases=None) -> int:
    """Raise ValueError for shapes, dtypes and layouts the kernel cannot take (``biases``: name -> bias
    or None; ``qkv`` may be a meta tensor of the projection's shape, as for the decode-time linear's
    rotary epilogue, :class:`adfast.kernels.decode_linear.RotaryCacheWrite`); returns the head dim."""
    biases = biases or {}
    if qkv.dim() != 3 or qkv.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"qkv must be [C, B*T, (H + 2 KV) D] float32/bfloat16/float16, got {tuple(qkv.shape)} "
                         f"{qkv.dtype}")
    if heads < 1 or kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a positive multiple of kv_heads ({kv_heads})")
    width = qkv.shape[2]
    if width % (heads + 2 * kv_heads) or (width // (heads + 2 * kv_heads)) % 2:
        raise ValueError(f"qkv width {width} is not (heads + 2 kv_heads) = {heads + 2 * kv_heads} times an even "
                         f"head dim")
    head_dim = width // (heads + 2 * kv_heads)
    if dqkv is not None and (dqkv.shape != qkv.shape or dqkv.dtype != qkv.dtype):
        raise ValueError(f"dqkv must match qkv: {tuple(dqkv.shape)} {dqkv.dtype} vs {tuple(qkv.shape)} {qkv.dtype}")
    if cos.shape != sin.shape or cos.dim() != 3 or cos.shape[2] != head_dim or cos.dtype != torch.float32 \
            or sin.dtype != torch.float32:
        raise ValueError(f"cos and sin must be float32 [B, T, D={head_dim}], got {tuple(cos.shape)} {cos.dtype} "
                         f"and {tuple(sin.shape)} {sin.dtype}")
    if sin.stride() != cos.stride():
        raise ValueError(f"cos and sin must share one layout (the kernels read both with cos's strides), got "
                         f"strides {cos.stride()} and {sin.stride()}")
    batch, seq = cos.shape[:2]
    if batch * seq != qkv.shape[1]:
        raise ValueError(f"qkv has {qkv.shape[1]} token rows, cos/sin describe B*T = {batch * seq}")
    if slots.shape != (batch,) or write_pos.shape != (batch, seq):
        raise ValueError(f"slots must be [B={batch}] and write_pos [B, T]=[{batch}, {seq}], got "
                         f"{tuple(slots.shape)} and {tuple(write_pos.shape)}")
    shape = caches[0].shape
    if len(shape) != 5 or shape[0] != qkv.shape[0] or shape[3:] != (kv_heads, head_dim):
        raise ValueError(f"caches must be [C={qkv.shape[0]}, max_batch, S + 1, KV={kv_heads}, D={head_dim}], "
                         f"got {tuple(shape)}")
    for cache in caches:
        if cache.shape != shape or cache.dtype != caches[0].dtype or cache.stride() != caches[0].stride():
            raise ValueError("the caches must share shape, dtype and layout")
        if cache.stride(4) != 1:
            raise ValueError("the caches' last dimension must be contiguous")
    for name, bias in biases.items():
        if bias is not None and (bias.shape != (qkv.shape[0], width) or bias.dtype != qkv.dtype
                                 or bias.device != qkv.device):
            raise ValueError(f"{name} must be [C, (H + 2 KV) D] = [{qkv.shape[0]}, {width}] in qkv's dtype "
                             f"{qkv.dtype} on its device, got {tuple(bias.shape)} {bias.dtype} on {bias.device}")
    for tensor in (qkv, cos, sin, dqkv, *biases.values()):
        if tensor is not None and tensor.stride(-1) != 1:
            raise ValueError("qkv, dqkv, bias, dbias, cos and sin need a contiguous last dimension")
    return head_dim


def _launch(qkv, dqkv, cos, sin, k_cache, v_cache, dk_cache, dv_cache, slots, write_pos, heads, kv_heads,
            bias, dbias, low_rank=None):
    caches = (k_cache, v_cache) + ((dk_cache, dv_cache) if dqkv is not None else ())
    head_dim = check_inputs(qkv, cos, sin, caches, slots, write_pos, heads, kv_heads, dqkv,
                            dict(bias=bias, dbias=dbias))
    if low_rank is not None:
        check_low_rank(low_rank, *dqkv.shape, dqkv, "dqkv")
    copies, tokens = qkv.shape[:2]
    batch, seq = cos.shape[:2]
    q = torch.empty(copies, batch, seq, heads, head_dim, device=qkv.device, dtype=qkv.dtype)
    dq = torch.empty_like(q) if dqkv is not None else q
    tangent = dqkv is not None
    half = head_dim // 2
    pad = triton.next_power_of_2
    bias_arg = qkv if bias is None else bias
    dbias_arg = qkv if dbias is None else dbias
    z, u, sz_c, sz_n, sz_r, su_c, su_m, su_r, rank = low_rank_args(low_rank, qkv)
    _rope_and_cache_write[(copies * tokens,)](
        qkv, dqkv if tangent else qkv, bias_arg, dbias_arg, cos, sin, q, dq, k_cache, v_cache,
        dk_cache if tangent else k_cache, dv_cache if tangent else v_cache,
        slots.contiguous(), write_pos.contiguous(), z, u,
        tokens, seq, qkv.stride(0), qkv.stride(1), (dqkv if tangent else qkv).stride(0),
        (dqkv if tangent else qkv).stride(1), bias_arg.stride(0), dbias_arg.stride(0), cos.stride(0), cos.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3), sz_c, sz_n, sz_r, su_c, su_m,
        su_r,
        HEADS=heads, KV_HEADS=kv_heads, HEAD_DIM=head_dim, HALF=half, H_PAD=pad(heads), KV_PAD=pad(kv_heads),
        HALF_PAD=pad(half), TANGENT=tangent, HAS_BIAS=bias is not None, HAS_DBIAS=tangent and dbias is not None,
        RANK=rank, num_warps=4, **launch_plan.dependent_launch(qkv.device),
    )
    return (q, dq) if tangent else q


def rope_and_cache_write(qkv, cos, sin, k_cache, v_cache, slots, write_pos, heads: int, kv_heads: int, bias=None):
    """Rotate q and k of ``qkv`` (plus ``bias``), write k and v to their cache positions, return
    ``rope(q) [C, B, T, H, D]``."""
    return _launch(qkv, None, cos, sin, k_cache, v_cache, None, None, slots, write_pos, heads, kv_heads, bias, None)


def rope_and_cache_write_jvp(qkv, dqkv, cos, sin, k_cache, v_cache, dk_cache, dv_cache, slots, write_pos,
                             heads: int, kv_heads: int, bias=None, dbias=None, low_rank=None):
    """:func:`rope_and_cache_write` and its tangent (``dbias``: the bias's, None for zero) in one
    launch; returns ``(rope(q), rope(dq))``. ``low_rank = (z [C, B T, R], U [C, (H + 2 KV) D, R])``:
    the tangent is ``dqkv + z U^T`` (rounded once, :mod:`adfast.kernels.low_rank_term`) before
    ``dbias`` joins."""
    return _launch(qkv, dqkv, cos, sin, k_cache, v_cache, dk_cache, dv_cache, slots, write_pos, heads, kv_heads,
                   bias, dbias, low_rank)
