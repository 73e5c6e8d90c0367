"""Decode-time linear layer ``y = x W^T + b`` for a few rows: a weight-streaming split-K GEMM.

Shapes (``C`` weight copies, ``M`` rows, ``K`` inputs, ``N`` outputs)::

    x       [C, M, K]   float32, bfloat16 or float16 (unit stride in K)
    weight  [C, N, K]   x's dtype (unit stride in K)
    bias    [C, N]      x's dtype, or None
    y       [C, M, N]   x's dtype (a new contiguous tensor)

Math: ``y[c, m, n] = round(sum_k x[c, m, k] W[c, n, k] + b[c, n])``, products accumulated in
float32 (tensor cores; float32 inputs as IEEE float32, not TF32) and the bias added in float32
before the one rounding to the dtype, as cuBLAS's bias epilogue (``F.linear``) does; the sum's
order differs from cuBLAS's, so results agree with it to float32 round-off before that rounding.

Why: at decode a step's matmuls have ``M`` = batch (1 to 64) rows and are reads of ``W``, nothing
else; what they cost is how fast ``W`` streams from memory. On an H200 cuBLAS reads the small
matrices of a 7B/3B model at 41-62% of the copy bandwidth (the 7B's qkv projection, 33 MB, in
12.7 us where its bytes need 7.7; ``bench/linear.py``), adds a split-K reduction kernel to some,
and for a proxy pair's biased batched product a copy of the bias into the output before the GEMM. Here one
launch covers all ``C`` copies, the grid is cut along ``N`` and ``K`` to cover the GPU several
times over, and the split-K partial sums are reduced in the same launch: each program stores its
float32 partial tile, then takes a ticket from a per-tile counter
(:func:`adfast.kernels.launch_order.last_ticket`); the program that draws the last ticket adds the
``SPLIT_K`` partials in split order (deterministic: the same bits whichever program finishes last;
``SPLIT_K`` is a runtime argument, so plans differing only in it share one compiled kernel), adds
the bias and writes ``y``.

Grid ``(ceil(N / BLOCK_N), SPLIT_K, C)``; program ``(j, s, c)`` reduces ``K`` range
``[s k_split, (s + 1) k_split)`` for output columns ``[j BLOCK_N, (j + 1) BLOCK_N)`` of copy ``c``
and all ``M`` rows (``BLOCK_M >= M``, at least 16 for the tensor-core product). Counters: int32,
``C * ceil(N / BLOCK_N)`` of them, all zero at entry and at exit (:func:`counters_for` sizes a
buffer; callers that launch concurrently on several streams pass their own).

Operand order: a program's tile product is ``x_tile [BLOCK_M, BLOCK_K] @ W_tile^T`` by default, so
that ``M``, the rows (1 to 64, padded to at least 16), is the tensor-core instruction's ``M``
side, which on Hopper gives the warp-level ``mma.sync`` (``HMMA``) below 64 rows (the warpgroup
``wgmma`` needs an ``M`` of 64 a warpgroup). With ``LinearPlan.swap_ab`` it is ``W_tile [BLOCK_N,
BLOCK_K] @ x_tile^T`` (the accumulator ``[BLOCK_N, BLOCK_M]``, transposed once before the
epilogue): the weight's ``BLOCK_N >= 64`` rows take the ``M`` side and the product compiles to
``wgmma`` (``HGMMA``) with ``BLOCK_M`` as its ``N`` (``python -m adfast.compile_check`` reports
which), as cuBLAS's decode kernels do (a 192 or 384 x 32 weight-by-rows tile at 32 rows,
``bench/results/profile-*``). Wider weight tiles also re-read the input less: every program loads
its rows' ``[BLOCK_M, K range]`` slice of ``x`` from L2, so at 32 rows with ``BLOCK_N = 32`` the
input tiles' L2 traffic equals the weight's; at ``BLOCK_N = 128`` a quarter. The same products,
accumulated in float32 in the order the instruction adds them.

Fusions (a decoder layer's elementwise chains, without their launches: :meth:`adfast.decoder.Decoder._fuses`,
:meth:`~adfast.decoder.Decoder._fuses_norms`). ``gated``: the output columns of a gate/up projection
are taken as (gate ``n``, up ``n``) pairs (tile column ``2 i + h`` reads weight row ``i + h N / 2``)
and the epilogue writes ``round(silu(round(gate)) round(up))`` (the arithmetic of
:mod:`adfast.kernels.silu_mul`, bit for bit) instead of both. ``rotary``: the columns of a qkv
projection are taken as the pairs ``(x[i], x[i + D / 2])`` of each head (tile column ``2 i + h``
of head ``e`` reads weight row ``e D + i + h D / 2``), and the epilogue rotates the q and k pairs
and writes q, and k and v to each row's cache position, as :mod:`adfast.kernels.rotary_cache`
does (:class:`RotaryCacheWrite`). ``residual``: the output becomes the
new residual stream ``s = round(residual + round(acc + b))`` (the rounded output added in float32
and rounded, as the norm kernel adds it) and each output tile also writes its rows' partial sum of
``s^2`` over its ``BLOCK_N`` columns, ``stats [C, ceil(N / BLOCK_N), M]`` float32, which a
following :class:`NormedInput` reads: its programs first add the ``T`` partials (``BLOCK_T`` at a
time, a fixed order) to each row's ``r = rsqrt(sum / K + eps)``, then load ``round(w round(s r))``
(the RMSNorm of :mod:`adfast.kernels.rms_norm`) tile by tile, so the norm needs no pass of its own.
Only the order of the sum of squares differs from the separate kernels (float32 round-off in ``r``;
an input can then differ by an ulp where ``s r`` lies at a rounding boundary). Every output tile
computes that norm again for its ``K`` range: at one row a ``BLOCK_K`` vector per step, at more
rows elementwise over the ``[BLOCK_M, BLOCK_K]`` tile, work that can outgrow the weight's reads.
"""
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import split as launch_plan
from .launch_order import last_ticket, wait_for_predecessor, zeroed_counters
from .rms_norm import normalized, reciprocal_rms
from .rotary_cache import check_inputs as check_rotary_inputs, rotate
from .silu_mul import exp_sigmoid

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_ROWS = 64
"""The most rows (``C``-wise ``M``) the kernel takes: beyond it a GEMM is no longer a weight read."""
MIN_BLOCK_N = 16
PREFETCH_STEPS = 2
"""The default of :attr:`LinearPlan.prefetch_steps`."""
PREFETCH_LINES = tl.constexpr(4)
"""128-byte lines of each weight row a program asks L2 for per (unrolled) iteration of its prefetch:
:attr:`LinearPlan.prefetch_steps` rounds up to whole iterations."""


PLAIN, GATED, RESIDUAL, ROTARY = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)
"""The kernel's ``OUTPUT`` kinds: ``y`` itself, ``silu(gate) up`` of its halves, a :class:`ResidualSum`,
the rotated queries of a :class:`RotaryCacheWrite`."""
BLOCK_T = tl.constexpr(64)
"""Partial sums of squares a :class:`NormedInput` program adds per step."""


@triton.jit
def _input_tile(x_rows, x_row0, kk, rm, m_mask, k_mask, nw_ptr, r, dtype,
                NORMED: tl.constexpr, ONE_ROW: tl.constexpr):
    """The ``[BLOCK_M, BLOCK_K]`` tile of the GEMM's input at inputs ``kk``, in ``dtype``, zero where
    masked: ``x``, or with ``NORMED`` ``round(w round(s r))`` (``x_rows`` the rows of ``s``, ``w`` at
    ``nw_ptr``, ``r [BLOCK_M]`` each row's reciprocal RMS). With ``ONE_ROW`` (``M = 1``) the norm
    is taken of row 0's ``BLOCK_K`` inputs alone (``x_row0``) and placed in the tile, instead of
    elementwise over the whole padded tile: every output tile's programs compute it again, and
    over ``BLOCK_M`` rows that work would bound the loop (:mod:`adfast.compile_check`'s loop
    instructions)."""
    if not NORMED:
        return tl.load(x_rows + kk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
    w = tl.load(nw_ptr + kk, mask=k_mask, other=0.0).to(tl.float32)
    if ONE_ROW:
        row = tl.load(x_row0 + kk, mask=k_mask, other=0.0).to(tl.float32)
        r0 = tl.sum(tl.where(rm == 0, r, 0.0), axis=0)
        return tl.where((rm == 0)[:, None], normalized(row, r0, w, dtype)[None, :], 0.0).to(dtype)
    rows = tl.load(x_rows + kk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
    return normalized(rows, r[:, None], w[None, :], dtype)


@triton.jit
def _reciprocal_rms(stats_ptr, rm, m_mask, tiles, rows, inputs_f, eps, BLOCK_M: tl.constexpr):
    """``rsqrt(sum_t stats[t, m] / K + eps)`` for the rows ``rm`` (``stats_ptr``: one copy's ``[T, M]``
    partial sums of squares, ``rows = M``), summed ``BLOCK_T`` partials at a time in ``t`` order
    (:func:`adfast.kernels.rms_norm.reciprocal_rms`)."""
    squares = tl.zeros((BLOCK_M,), tl.float32)
    for t in range(0, tiles, BLOCK_T):
        rt = t + tl.arange(0, BLOCK_T)
        part = tl.load(stats_ptr + rt[:, None] * rows + rm[None, :], mask=(rt < tiles)[:, None] & m_mask[None, :],
                       other=0.0)
        squares += tl.sum(part, axis=0)
    return reciprocal_rms(squares, inputs_f, eps)


@triton.jit
def _store_rotary(y, q_ptr, c, j, rm, m_mask, M, N, rotary, dtype, BLOCK_N: tl.constexpr, HEADS: tl.constexpr,
                  KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The qkv projection's tile ``j`` of copy ``c`` (``y [BLOCK_M, BLOCK_N]``, rounded, its columns the
    pairs ``(x[i], x[i + D / 2])`` of a head's halves) rotated and written as
    :mod:`adfast.kernels.rotary_cache` writes them: q heads to ``q_ptr`` (``[C, M, H D]``), k heads
    and (unrotated) v heads to each row's cache position. ``rotary``: ``(cos, sin, k_cache, v_cache,
    slots, write_pos, T, cos stride b, cos stride t, cache strides c, slot, position, head)``."""
    cos_ptr, sin_ptr, k_ptr, v_ptr, slots_ptr, pos_ptr, seq, s_cos_b, s_cos_t, s_c, s_s, s_n, s_j = rotary
    HALF: tl.constexpr = HEAD_DIM // 2
    x1, x2 = tl.split(tl.reshape(y.to(tl.float32), (y.shape[0], BLOCK_N // 2, 2)))
    pair = j * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)  # over all heads' first halves
    head = pair // HALF
    p = pair % HALF
    mask = m_mask[:, None] & (pair < N // 2)[None, :]
    b = rm // seq
    table = b[:, None].to(tl.int64) * s_cos_b + (rm % seq)[:, None].to(tl.int64) * s_cos_t + p[None, :]
    cos1 = tl.load(cos_ptr + table, mask=mask, other=0.0).to(dtype).to(tl.float32)  # tables rounded as the
    cos2 = tl.load(cos_ptr + table + HALF, mask=mask, other=0.0).to(dtype).to(tl.float32)  # rotary kernel's
    sin1 = tl.load(sin_ptr + table, mask=mask, other=0.0).to(dtype).to(tl.float32)
    sin2 = tl.load(sin_ptr + table + HALF, mask=mask, other=0.0).to(dtype).to(tl.float32)
    rotated = (head < HEADS + KV_HEADS)[None, :]
    rot1, rot2 = rotate(x1, x2, cos1, sin1, cos2, sin2)
    out1, out2 = tl.where(rotated, rot1, x1), tl.where(rotated, rot2, x2)
    is_q = mask & (head < HEADS)[None, :]
    q_tile = q_ptr + (c * M + rm[:, None]) * (HEADS * HEAD_DIM) + head[None, :] * HEAD_DIM + p[None, :]
    tl.store(q_tile, out1.to(dtype), mask=is_q)
    tl.store(q_tile + HALF, out2.to(dtype), mask=is_q)
    slot = tl.load(slots_ptr + b, mask=m_mask, other=0).to(tl.int64)
    pos = tl.load(pos_ptr + rm, mask=m_mask, other=0).to(tl.int64)
    is_v = head >= HEADS + KV_HEADS
    kv_head = tl.where(is_v, head - HEADS - KV_HEADS, head - HEADS)
    at = c * s_c + slot[:, None] * s_s + pos[:, None] * s_n + kv_head[None, :].to(tl.int64) * s_j + p[None, :]
    is_k = mask & ((head >= HEADS) & ~is_v)[None, :]
    tl.store(k_ptr + at, out1.to(k_ptr.dtype.element_ty), mask=is_k)
    tl.store(k_ptr + at + HALF, out2.to(k_ptr.dtype.element_ty), mask=is_k)
    tl.store(v_ptr + at, out1.to(v_ptr.dtype.element_ty), mask=mask & is_v[None, :])
    tl.store(v_ptr + at + HALF, out2.to(v_ptr.dtype.element_ty), mask=mask & is_v[None, :])


@triton.jit
def _store_output(acc, y_ptr, c, j, rm, rn, m_mask, n_mask, bias_cols, res_ptr, sr_m, stats_ptr, rotary, M, N, dtype,
                  HAS_BIAS: tl.constexpr, OUTPUT: tl.constexpr, BLOCK_N: tl.constexpr, LIBDEVICE_EXP: tl.constexpr,
                  HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Write output tile ``j`` of copy ``c`` from its float32 sums ``acc [BLOCK_M, BLOCK_N]`` (``bias_cols``:
    the bias of its columns): ``y = round(acc + b)``; ``GATED``: the columns are (gate, up) pairs, and
    ``round(silu(g) u)`` of their rounded values goes to column ``j BLOCK_N / 2 + pair`` of the
    ``[C, M, N / 2]`` output; ``RESIDUAL``: ``s = round(res + y)`` and the tile's per-row sum of ``s^2``
    (float32) at ``stats_ptr + rm``; ``ROTARY``: :func:`_store_rotary`."""
    if HAS_BIAS:
        acc += tl.load(bias_cols, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y = acc.to(dtype)
    if OUTPUT == ROTARY:
        _store_rotary(y, y_ptr, c, j, rm, m_mask, M, N, rotary, dtype, BLOCK_N, HEADS, KV_HEADS, HEAD_DIM)
    elif OUTPUT == GATED:
        gate, up = tl.split(tl.reshape(y.to(tl.float32), (acc.shape[0], BLOCK_N // 2, 2)))
        _, sig = exp_sigmoid(gate, LIBDEVICE_EXP)
        half = N // 2
        cols = j * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(y_ptr + (c * M + rm[:, None]) * half + cols[None, :], (gate * sig * up).to(dtype),
                 mask=m_mask[:, None] & (cols < half)[None, :])
    else:
        out_mask = m_mask[:, None] & n_mask[None, :]
        y_tile = y_ptr + (c * M + rm[:, None]) * N + rn[None, :]
        if OUTPUT == RESIDUAL:
            res = tl.load(res_ptr + rm[:, None] * sr_m + rn[None, :], mask=out_mask, other=0.0)
            y = (res.to(tl.float32) + y.to(tl.float32)).to(dtype)
            squares = tl.where(out_mask, y.to(tl.float32), 0.0)
            tl.store(stats_ptr + rm, tl.sum(squares * squares, axis=1), mask=m_mask)
        tl.store(y_tile, y, mask=out_mask)


@triton.jit
def _decode_linear(
    x_ptr, w_ptr, b_ptr, y_ptr, part_ptr, count_ptr, nw_ptr, stats_in_ptr, res_ptr, stats_out_ptr,
    M, N, K, k_split, split_k, tiles_in, inputs_f, eps,
    sx_c, sx_m, sw_c, sw_n, sb_c, snw_c, sr_c, sr_m, rotary,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, NORMED: tl.constexpr, ONE_ROW: tl.constexpr,
    OUTPUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SWAP_AB: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, LIBDEVICE_EXP: tl.constexpr,
    HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PREFETCH_ITERS: tl.constexpr,
    PDL: tl.constexpr = False,
):
    j = tl.program_id(0)
    s = tl.program_id(1)
    c = tl.program_id(2).to(tl.int64)
    rm = tl.arange(0, BLOCK_M)
    rn = j * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    dtype = w_ptr.dtype.element_ty
    if OUTPUT == GATED:  # column pairs (gate n, up n): weight rows n and N / 2 + n
        w_row = rn // 2 + (rn % 2) * (N // 2)
    elif OUTPUT == ROTARY:  # column pairs (x[i], x[i + D / 2]) of each head
        w_row = (rn // HEAD_DIM) * HEAD_DIM + (rn % HEAD_DIM) // 2 + (rn % 2) * (HEAD_DIM // 2)
    else:
        w_row = rn
    x_row0 = x_ptr + c * sx_c
    x_rows = x_row0 + rm[:, None] * sx_m
    w_rows = w_ptr + c * sw_c + w_row[:, None].to(tl.int64) * sw_n
    k_end = tl.minimum((s + 1) * k_split, K)
    if PDL:  # programmatic dependent launch (split.dependent_launch): the weights are no kernel's
        # output, so pull this program's first PREFETCH_ITERS x PREFETCH_LINES 128-byte lines of each
        # weight row (within its split) into L2 while the kernel before finishes, then wait for it.
        # Unrolled: a runtime loop here costs the wgmma main loop 5-9% more instructions (compile_check)
        per_line = 1024 // w_ptr.dtype.element_ty.primitive_bitwidth
        for it in tl.static_range(PREFETCH_ITERS):
            line = s * k_split + (it * PREFETCH_LINES + tl.arange(0, PREFETCH_LINES)) * per_line
            ahead = n_mask[:, None] & (line < k_end)[None, :]
            tl.inline_asm_elementwise("prefetch.global.L2 [$1];", "=r,l",
                                      [tl.where(ahead, w_rows + line[None, :], w_ptr)], dtype=tl.int32,
                                      is_pure=False, pack=1)
    wait_for_predecessor(PDL)
    r = tl.zeros((BLOCK_M,), tl.float32)
    if NORMED:
        r = _reciprocal_rms(stats_in_ptr + c * tiles_in * M, rm, m_mask, tiles_in, M, inputs_f, eps, BLOCK_M)
    if SWAP_AB:  # the weight tile is the product's left operand: acc^T [BLOCK_N, BLOCK_M]
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in range(s * k_split, k_end, BLOCK_K):
        kk = k + rk
        k_mask = kk < k_end
        xt = _input_tile(x_rows, x_row0, kk, rm, m_mask, k_mask, nw_ptr + c * snw_c, r, dtype, NORMED, ONE_ROW)
        wt = tl.load(w_rows + kk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        if UPCAST:  # the interpreter's dot takes bfloat16 tiles as raw bits: give it their float32 values
            xt, wt = xt.to(tl.float32), wt.to(tl.float32)
        if SWAP_AB:
            acc = tl.dot(wt, tl.trans(xt), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(xt, tl.trans(wt), acc, input_precision=PRECISION)
    if SWAP_AB:
        acc = tl.trans(acc)
    bias_cols = b_ptr + c * sb_c + w_row
    res_base = res_ptr + c * sr_c
    stats_out = stats_out_ptr + (c * tl.num_programs(0) + j) * M
    if not SPLIT:
        _store_output(acc, y_ptr, c, j, rm, rn, m_mask, n_mask, bias_cols, res_base, sr_m, stats_out, rotary, M, N,
                      dtype, HAS_BIAS, OUTPUT, BLOCK_N, LIBDEVICE_EXP, HEADS, KV_HEADS, HEAD_DIM)
    else:
        tile = c * tl.num_programs(0) + j
        tile_elems = BLOCK_M * BLOCK_N
        offsets = rm[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        parts = part_ptr + tile * split_k * tile_elems + offsets
        tl.store(parts + s * tile_elems, acc)
        if last_ticket(count_ptr + tile, split_k):  # the last program of this tile: the partials are visible
            total = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for i in range(split_k):  # split order, whichever program got here
                total += tl.load(parts + i * tile_elems, cache_modifier=".cg")
            _store_output(total, y_ptr, c, j, rm, rn, m_mask, n_mask, bias_cols, res_base, sr_m, stats_out,
                          rotary, M, N, dtype, HAS_BIAS, OUTPUT, BLOCK_N, LIBDEVICE_EXP, HEADS, KV_HEADS, HEAD_DIM)


@dataclass(frozen=True)
class LinearPlan:
    """Tile sizes, the K split (``split_k`` programs of ``k_split`` inputs per output tile), the
    launch's warps and pipeline stages, which operand leads the tile product (``swap_ab``: module
    docstring, Operand order), and how many ``BLOCK_K`` steps of its weight rows a program asks L2
    for before it waits on the kernel before it (``prefetch_steps``, at most its split's, rounded up
    to blocks of :data:`PREFETCH_LINES` lines a row; programmatic dependent launch only: a launch
    starts while its predecessor's last programs run, when memory has bandwidth to spare)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    k_split: int
    num_warps: int
    num_stages: int
    swap_ab: bool = False
    prefetch_steps: int = PREFETCH_STEPS


def plan_linear(copies: int, rows: int, outputs: int, inputs: int, device: torch.device, *,
                block_n: int | None = None, block_k: int | None = None, split_k: int | None = None,
                num_warps: int | None = None, num_stages: int | None = None,
                programs_per_sm: int | None = None, swap_ab: bool = False,
                prefetch_steps: int = PREFETCH_STEPS) -> LinearPlan:
    """The launch plan for ``[C, M, K] x [C, N, K]^T``; keyword arguments override its choices.

    GPU: ``BLOCK_N = 32`` output columns; ``K`` split so that ``C ceil(N / BLOCK_N) SPLIT_K``
    programs cover the SMs ``programs_per_sm`` times over (2 up to 16 rows, else 4), each with at
    least two 128-input steps; ``BLOCK_K = 128`` inputs a step, or 256 for an unsplit ``K <= 2048``
    at up to 16 rows; 4 warps, 3 stages. These are the best single changes to a first plan (256
    inputs, 4 programs per SM) measured per layer of the 7B teacher and the 3B pair at 1 and 32
    rows on an H200 (``bench/linear.py --sweep``: e.g. the 7B's down projection at one row 52 ->
    39 us). ``swap_ab`` (off by default, not yet measured) puts the weight tile on the left of the
    tile product, by default with ``BLOCK_N = 128`` (the warpgroup MMA takes 64 or more) and always
    with ``BLOCK_K = 128`` (at 128 weight rows, three stages of 256 inputs would take 221 KB of
    shared memory, an SM's whole). ``prefetch_steps``: 2 (measured only as that). Interpreter (CPU
    tensors): 16 x 32 tiles and up to 3 splits, so that test shapes cross tiles, splits and masked
    tails.
    """
    if inputs < 1:
        raise ValueError(f"inputs (K) must be >= 1, got {inputs}")
    if split_k is not None and (isinstance(split_k, bool) or not isinstance(split_k, int) or split_k < 1):
        raise ValueError(f"split_k must be an int >= 1 (None: the plan's choice), got {split_k!r}")
    block_m = max(16, triton.next_power_of_2(rows))
    sms = launch_plan.multiprocessor_count(device)
    if sms is not None:
        block_n = block_n if block_n is not None else (128 if swap_ab else 32)
        programs_per_sm = programs_per_sm or (2 if block_m <= 16 else 4)
        tiles = copies * triton.cdiv(outputs, block_n)
        if split_k is None:
            split_k = max(1, min(-(-programs_per_sm * sms // tiles), inputs // (2 * (block_k or 128))))
        if block_k is None:
            block_k = 256 if split_k == 1 and inputs <= 2048 and block_m <= 16 and not swap_ab else 128
        num_warps, num_stages = num_warps or 4, num_stages or 3
    else:
        block_n = block_n if block_n is not None else 16
        block_k = block_k if block_k is not None else 32
        split_k = split_k or max(1, min(3, inputs // max(1, 2 * block_k)))
        num_warps, num_stages = num_warps or 4, num_stages or 1
    if prefetch_steps < 0:
        raise ValueError(f"prefetch_steps must be >= 0, got {prefetch_steps}")
    _check_tile_sizes(block_n, block_k)
    k_split = triton.cdiv(triton.cdiv(inputs, split_k), block_k) * block_k
    split_k = triton.cdiv(inputs, k_split)  # no empty splits
    return LinearPlan(block_m, block_n, block_k, split_k, k_split, num_warps, num_stages, swap_ab, prefetch_steps)


def _check_tile_sizes(block_n: int, block_k: int) -> None:
    for name, value in (("block_n", block_n), ("block_k", block_k)):
        if value < MIN_BLOCK_N or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= {MIN_BLOCK_N}, got {value}")


def _check_plan(plan: LinearPlan, rows: int, inputs: int) -> None:
    """Raise ValueError for a given plan that does not cover a call of ``rows`` rows and ``inputs``
    inputs (its tile would leave rows unwritten, its splits inputs unread)."""
    _check_tile_sizes(plan.block_n, plan.block_k)
    if plan.block_m < rows or plan.block_m & (plan.block_m - 1):
        raise ValueError(f"plan.block_m must be a power of two >= the call's {rows} rows, got {plan.block_m}")
    if plan.split_k < 1 or plan.k_split < 1 or plan.k_split % plan.block_k or plan.split_k * plan.k_split < inputs:
        raise ValueError(f"plan splits K into {plan.split_k} x {plan.k_split} inputs (a multiple of block_k "
                         f"{plan.block_k}), which must cover the call's {inputs}")
    if plan.prefetch_steps < 0:
        raise ValueError(f"plan.prefetch_steps must be >= 0, got {plan.prefetch_steps}")


def counters_for(copies: int, outputs: int, device) -> torch.Tensor:
    """A zeroed int32 counter buffer big enough for any plan of ``C`` copies of ``N`` outputs."""
    return zeroed_counters(copies * triton.cdiv(outputs, MIN_BLOCK_N), device)


class NormedInput(NamedTuple):
    """RMSNorm of the residual stream ``s [C, M, K]`` as the GEMM's input: ``round(weight[c] round(s
    r))`` with ``r = rsqrt(sum_t stats[c, t, m] / K + eps)``, where ``stats [C, T, M]`` float32 are
    the partial sums of squares that a :class:`ResidualSum` epilogue wrote with ``s``: the math of
    :mod:`adfast.kernels.rms_norm` (its ``y``), the sum of squares added in another order."""

    s: torch.Tensor
    stats: torch.Tensor
    weight: torch.Tensor
    eps: float


class ResidualSum(NamedTuple):
    """What :func:`decode_linear` returns with a ``residual``: the new residual stream ``s =
    round(residual + round(x W^T + b))`` ``[C, M, N]`` (in the dtype; the rounded output added as
    :mod:`adfast.kernels.rms_norm` adds it) and ``stats [C, T, M]`` float32, ``T = ceil(N /
    BLOCK_N)``: ``stats[c, t, m] = sum of s[c, m, n]^2`` over the ``t``-th block of columns."""

    s: torch.Tensor
    stats: torch.Tensor


class RotaryCacheWrite(NamedTuple):
    """The qkv projection's epilogue (``decode_linear(..., rotary=)``): rotary embeddings of its q and
    k heads and the KV-cache write of k and v, the math and roundings of
    :func:`adfast.kernels.rotary_cache.rope_and_cache_write` (its shapes: ``cos, sin [B, T, D]``
    float32 with ``B T = M``, caches ``[C, max_batch, S + 1, KV, D]``, ``slots [B]``, ``write_pos
    [B, T]``); :func:`decode_linear` then returns the rotated queries ``[C, B, T, H, D]``."""

    cos: torch.Tensor
    sin: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slots: torch.Tensor
    write_pos: torch.Tensor
    heads: int
    kv_heads: int


def _check_inputs(x, weight, bias, residual, gated, rotary, counters) -> tuple[NormedInput | None, torch.Tensor]:
    """Raise ValueError for inputs the kernel cannot take; returns ``(the NormedInput or None, the
    tensor whose rows the kernel walks)``."""
    normed = x if isinstance(x, NormedInput) else None
    rows_of = x.s if normed else x
    if not isinstance(rows_of, torch.Tensor):
        raise ValueError(f"x.s must be a tensor, got {type(rows_of).__name__}" if normed else
                         f"x must be a tensor or a NormedInput, got {type(x).__name__}")
    for name, tensor in (("weight", weight), ("bias", bias), ("residual", residual), ("counters", counters)):
        if tensor is not None and not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(tensor).__name__}")
    if rows_of.dim() != 3 or weight.dim() != 3:
        raise ValueError(f"x must be [C, M, K] and weight [C, N, K], got shapes {tuple(rows_of.shape)}, "
                         f"{tuple(weight.shape)}")
    (copies, rows, inputs), (w_copies, outputs, w_inputs) = rows_of.shape, weight.shape
    if w_copies != copies or w_inputs != inputs:
        raise ValueError(f"weight {tuple(weight.shape)} does not fit x {tuple(rows_of.shape)}: copies and inputs "
                         f"must match")
    if not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"decode_linear takes 1 to {MAX_ROWS} rows, got {rows}")
    if inputs < 1:
        raise ValueError(f"x and weight have no inputs (K = 0): shapes {tuple(rows_of.shape)}, {tuple(weight.shape)}")
    if rows_of.dtype not in DTYPES or weight.dtype != rows_of.dtype:
        raise ValueError(f"x and weight must share one dtype of {DTYPES}, got {rows_of.dtype}, {weight.dtype}")
    if rows_of.stride(2) != 1 or weight.stride(2) != 1:
        raise ValueError(f"x and weight need a unit stride in K, got strides {rows_of.stride()}, {weight.stride()}")
    if bias is not None:
        if bias.shape != (copies, outputs) or bias.dtype != weight.dtype or bias.stride(1) != 1:
            raise ValueError(f"bias must be [C, N] = {(copies, outputs)} in {weight.dtype} with a unit stride in N, "
                             f"got {tuple(bias.shape)}, {bias.dtype}, strides {bias.stride()}")
    if normed:
        stats, norm_weight = normed.stats, normed.weight
        if stats.dim() != 3 or stats.shape[0] != copies or stats.shape[2] != rows or stats.dtype != torch.float32 \
                or not stats.is_contiguous():
            raise ValueError(f"NormedInput stats must be contiguous float32 [C, T, M] with C, M = {(copies, rows)}, "
                             f"got {tuple(stats.shape)} {stats.dtype}")
        if norm_weight.shape != (copies, inputs) or norm_weight.dtype != weight.dtype or norm_weight.stride(1) != 1:
            raise ValueError(f"NormedInput weight must be [C, K] = {(copies, inputs)} in {weight.dtype} with a unit "
                             f"stride, got {tuple(norm_weight.shape)}, {norm_weight.dtype}")
        if not normed.eps >= 0:
            raise ValueError(f"NormedInput eps must be >= 0, got {normed.eps}")
    if (gated, residual is not None, rotary is not None).count(True) > 1:
        raise ValueError("gated, residual and rotary are different outputs: give at most one")
    if gated and outputs % 2:
        raise ValueError(f"gated takes an even number of outputs (gate, up), got N = {outputs}")
    if rotary is not None:
        check_rotary_inputs(torch.empty(copies, rows, outputs, dtype=weight.dtype, device="meta"), rotary.cos,
                            rotary.sin, (rotary.k_cache, rotary.v_cache), rotary.slots, rotary.write_pos, rotary.heads,
                            rotary.kv_heads)
    if residual is not None and (residual.shape != (copies, rows, outputs) or residual.dtype != weight.dtype
                                 or residual.stride(2) != 1):
        raise ValueError(f"residual must be [C, M, N] = {(copies, rows, outputs)} in {weight.dtype} with a unit "
                         f"stride in N, got {tuple(residual.shape)}, {residual.dtype}, strides {residual.stride()}")
    if counters is not None and (counters.dtype != torch.int32 or counters.numel() < copies * triton.cdiv(
            outputs, MIN_BLOCK_N)):
        raise ValueError(f"counters must be int32 with at least {copies * triton.cdiv(outputs, MIN_BLOCK_N)} "
                         f"entries (counters_for), got {counters.dtype} with {counters.numel()}")
    extra = ((normed.stats, normed.weight) if normed else ()) + (rotary[:6] if rotary is not None else ())
    devices = {t.device for t in (rows_of, weight, bias, residual, counters, *extra) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"x, weight, bias, residual and counters must be on one device, got "
                         f"{sorted(map(str, devices))}")
    return normed, rows_of


def decode_linear(x: torch.Tensor | NormedInput, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  gated: bool = False, residual: torch.Tensor | None = None, rotary: RotaryCacheWrite | None = None,
                  counters: torch.Tensor | None = None, plan: LinearPlan | None = None,
                  plan_options: dict | None = None) -> torch.Tensor | ResidualSum:
    """``x W^T + b`` per copy (see the module docstring), ``[C, M, N]`` in x's dtype.

    Fusions (module docstring), each computing what its separate kernel would without its launch:
    ``x`` a :class:`NormedInput` (an RMSNorm whose statistics a ``residual`` launch wrote) instead
    of a ``[C, M, K]`` tensor; ``gated``: the weight is a gate/up projection's ``[gate; up]``, and
    the result is ``silu(gate) up`` ``[C, M, N / 2]`` (:mod:`adfast.kernels.silu_mul`'s ``a`` of
    this output); ``residual [C, M, N]``: the result is the :class:`ResidualSum` ``(s, stats)``, the
    residual stream with this output added and the partial sums of squares of a following
    :class:`NormedInput`; ``rotary``: the weight is a qkv projection, whose q and k heads the
    epilogue rotates and whose k and v heads it writes to the cache: the result is the rotated
    queries ``[C, B, T, H, D]`` (:class:`RotaryCacheWrite`). At most one of the three.

    ``counters``: the split-K tickets (:func:`counters_for`; zero at entry, left zero); None
    allocates zeroed ones (an extra fill kernel each call; a CUDA-graph captured step passes its
    own, one buffer per stream that may run concurrently). ``plan`` overrides :func:`plan_linear`
    (tests, tuning); without one, ``plan_options`` are keyword arguments of :func:`plan_linear` for
    the plan it chooses (e.g. ``{"swap_ab": True}``). Raises ValueError for inputs the kernel cannot
    take.
    """
    normed, rows_of = _check_inputs(x, weight, bias, residual, gated, rotary, counters)
    copies, rows, inputs = rows_of.shape
    outputs, device = weight.shape[1], weight.device
    if plan is None:
        plan = plan_linear(copies, rows, outputs, inputs, device, **(plan_options or {}))
    else:
        _check_plan(plan, rows, inputs)
    width = outputs // 2 if gated else outputs * rotary.heads // (rotary.heads + 2 * rotary.kv_heads) if rotary \
        else outputs
    y = torch.empty((copies, rows, width), device=device, dtype=weight.dtype)
    interpreted = launch_plan.multiprocessor_count(device) is None
    tiles = triton.cdiv(outputs, plan.block_n)
    if plan.split_k > 1:
        parts = torch.empty(copies * tiles * plan.split_k * plan.block_m * plan.block_n, device=device,
                            dtype=torch.float32)
        counters = counters if counters is not None else counters_for(copies, outputs, device)
    else:
        parts = counters = y  # unused
    stats = torch.empty((copies, tiles, rows), device=device, dtype=torch.float32) if residual is not None else None
    output = GATED if gated else RESIDUAL if residual is not None else ROTARY if rotary is not None else PLAIN
    if rotary is not None:
        cos, cache = rotary.cos, rotary.k_cache
        rotary_args = (cos, rotary.sin, cache, rotary.v_cache, rotary.slots.contiguous(), rotary.write_pos.contiguous(),
                       cos.shape[1], cos.stride(0), cos.stride(1), *cache.stride()[:4])
        heads, kv_heads = rotary.heads, rotary.kv_heads
    else:
        rotary_args, heads, kv_heads = (y, y, y, y, y, y, 1, 0, 0, 0, 0, 0, 0), 0, 0
    _decode_linear[(tiles, plan.split_k, copies)](
        rows_of, weight, weight if bias is None else bias, y, parts, counters,
        weight if normed is None else normed.weight, y if normed is None else normed.stats,
        y if residual is None else residual, y if stats is None else stats,
        rows, outputs, inputs, plan.k_split, plan.split_k, 0 if normed is None else normed.stats.shape[1],
        float(inputs), 0.0 if normed is None else float(normed.eps),
        rows_of.stride(0), rows_of.stride(1), weight.stride(0), weight.stride(1),
        0 if bias is None else bias.stride(0), 0 if normed is None else normed.weight.stride(0),
        0 if residual is None else residual.stride(0), 0 if residual is None else residual.stride(1), rotary_args,
        HAS_BIAS=bias is not None, SPLIT=plan.split_k > 1, NORMED=normed is not None, ONE_ROW=rows == 1,
        OUTPUT=output.value, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k,
        SWAP_AB=plan.swap_ab,
        PRECISION="ieee" if weight.dtype == torch.float32 or interpreted else "tf32",
        UPCAST=interpreted,
        LIBDEVICE_EXP=not interpreted, HEADS=heads, KV_HEADS=kv_heads,
        HEAD_DIM=outputs // (heads + 2 * kv_heads) if rotary is not None else 0,
        PREFETCH_ITERS=triton.cdiv(min(plan.prefetch_steps * plan.block_k, plan.k_split) * weight.element_size(),
                                   128 * PREFETCH_LINES.value),
        num_warps=plan.num_warps, num_stages=plan.num_stages,
        **launch_plan.dependent_launch(device),
    )
    if rotary is not None:
        return y.view(copies, *rotary.cos.shape[:2], rotary.heads, -1)
    return y if residual is None else ResidualSum(y, stats)
