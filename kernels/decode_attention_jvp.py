"""Split-K decode attention with its forward-mode tangent (JVP): one new query per row over its
slot's live cache, and the derivative of that attention along a tangent of q, K and V.

The tangent twin of :mod:`adfast.kernels.decode_attention` (same layout and plan; its partials
and merge are two kernels, where the primal merges in the same launch).

Shapes (one layer; ``C`` weight copies, ``B`` rows, ``H`` query heads, ``KV`` key/value heads,
``GROUP = H // KV``, ``D`` head dim, ``S = max_seq_len``)::

    q, dq                        [C, B, 1, H, D]              same float dtype (dq: q's tangent)
    k_cache, v_cache             [C, max_batch, S + 1, KV, D]  fp32 / bf16 / fp16 (any strides, last dim 1)
    dk_cache, dv_cache           [C, max_batch, S + 1, KV, D]  the caches' tangents, same shape and dtype
    slots                        [B]  int               cache slot of row b
    lengths                      [B]  int               live positions of row b (= query_pos[b, 0] + 1, >= 1)
    out, dout                    [C, B, 1, H, D]        q's dtype

Math, for copy ``c``, row ``b``, head ``h`` (kv head ``j = h // GROUP``), ``n < L = lengths[b]``,
``K_n = K[c, slots[b], n, j]`` (likewise ``V_n``, ``dK_n``, ``dV_n``), ``q = q[c, b, 0, h]``::

    s_n   = <q, K_n> / sqrt(D)
    ds_n  = (<dq, K_n> + <q, dK_n>) / sqrt(D)
    p     = softmax(s)
    out   = sum_n p_n V_n
    dout  = sum_n p_n (ds_n - sum_m p_m ds_m) V_n + sum_n p_n dV_n
          = sum_n p_n (ds_n V_n + dV_n) - (sum_n p_n ds_n) out

Stage 1 (:func:`_decode_jvp_partials`, grid ``(C * B * KV, num_splits)``): program ``(p, s)``
with ``p = (c * B + b) * KV + j`` takes all GROUP query heads of kv head ``j`` together as
``[GROUP_PAD, HEAD_PAD]`` tiles of q and dq (``GROUP_PAD = max(16, next_pow2(GROUP))``,
``HEAD_PAD = max(16, next_pow2(D))``: any head dim, e.g. 8 or 80; padded rows and columns are
zero, masked on load, never stored), so that every K, dK, V, dV block is loaded once for the
whole group and all six products (``q K^T``, ``dq K^T + q dK^T``, ``P V``, ``(P ds) V + P dV``)
run on ``tl.dot`` (M >= 16 on tensor cores; fp32 caches use ``input_precision="ieee"``, no TF32;
there the products are added rather than chained through ``tl.dot``'s accumulator, which crashed
LLVM's SLP vectorizer when compiling for sm_90 with triton 3.9). q and dq are cast
to the cache dtype first, as the primal kernel casts q. Under the Triton interpreter (CPU tensors)
``tl.dot`` on bf16/fp16 operands returns garbage (triton 3.9), so there the operands (already
rounded to the cache dtype) are upcast to fp32 and multiplied in IEEE fp32: the same products,
exact in fp32, matching the GPU's bf16/fp16 MMA with fp32 accumulation up to summation order
(but the interpreter converts fp32 to bf16 by truncation, not round-to-nearest as the GPU does, so
its bf16 results are somewhat less accurate than the GPU's).
It walks positions ``[s * chunk, min((s + 1) * chunk, L))`` in ``BLOCK_N`` blocks (loads masked
to ``n < L``: a position ``>= L`` is never read, and a split with ``s * chunk >= L`` runs no
iteration and stores nothing), keeping in float32, with ``e_n = 2^(s_n log2(e) - m)``::

    m       running max of s_n log2(e)            [GROUP_PAD]
    l       sum_n e_n                             [GROUP_PAD]
    acc_ds  sum_n e_n ds_n                        [GROUP_PAD]
    acc_o   sum_n e_n V_n                         [GROUP_PAD, HEAD_PAD]
    acc_t   sum_n e_n (ds_n V_n + dV_n)           [GROUP_PAD, HEAD_PAD]

(all rescaled by ``2^(m_old - m_new)`` when the max moves) and writes their GROUP live rows to a
float32 workspace. ``e`` and ``e * ds`` are cast to V's dtype for the products with V and dV (as
flash-attention casts P), so bf16/fp16 caches see bf16/fp16 rounding of them; ``l`` and
``acc_ds`` are summed from the float32 values.

Stage 2 (:func:`_decode_jvp_merge`, grid ``(C * B * H,)``) reads the ``ceil(L / chunk)`` live
splits of its head, weights split ``s`` by ``w_s = 2^(m_s - M)`` (``M = max_s m_s``), and with
``Z = sum_s w_s l_s`` writes, in q's dtype::

    out   = sum_s w_s acc_o_s / Z
    dout  = sum_s w_s acc_t_s / Z - (sum_s w_s acc_ds_s / Z) * out     (out unrounded, float32)

Bytes: the live K, V, dK and dV rows, ``4 * C * KV * D * itemsize * sum_b L_b`` (the blocks
round up to ``BLOCK_N`` only in masked lanes, which load nothing), plus q, dq, out and dout, plus
the workspace (``C * B * KV * splits * GROUP * (2 D + 3) * 4`` written and read once). Nothing
scales with ``max_seq_len`` except the number of (empty) programs.

Splits: the plan of :mod:`adfast.kernels.decode_attention` (``chunk`` a multiple of ``BLOCK_N``,
fixed from ``max_seq_len`` so that ``C * B * KV * splits`` programs cover the GPU about four
times, at least 256 positions per split), so the launch is free of host syncs and CUDA-graph safe.
On the GPU ``BLOCK_N`` is 32 rather than the primal's 64 (each block holds four
``[BLOCK_N, HEAD_PAD]`` tiles, K, dK, V, dV, and two ``[GROUP_PAD, HEAD_PAD]`` accumulators),
and 16 with 8 warps for fp32 caches, whose IEEE products run on FMA units (compiled for sm_90:
about 200 registers a thread at D = 128 for fp32, 130 with 4 warps for bf16/fp16, no spills;
untuned: not yet measured on a GPU). On CPU (Triton interpreter) a small ``BLOCK_N`` and at most
4 splits keep tests fast while still crossing block and split boundaries.
"""
import torch
import triton
import triton.language as tl

from . import split as launch_plan
from .decode_attention import _program_rows, check_inputs, plan_attention

LOG2E = 1.4426950408889634
GPU_BLOCK_N = 32  # bf16 / fp16 caches on a GPU (tensor-core products)
GPU_BLOCK_N_FP32, GPU_WARPS_FP32 = 16, 8  # fp32 caches on a GPU (IEEE fp32 products: FMA, many registers)


@triton.jit
def _merge_head(lengths_ptr, batch, heads, chunk, GROUP: tl.constexpr):
    """Stage 2's program ``(c B + b) H + h``: ``h``, ``c B + b``, ``b``, ``c``, the kv head count, the kv
    head ``j`` and member ``g`` of ``h``'s group, and the number of live splits of row ``b``."""
    pid = tl.program_id(0)
    h = pid % heads
    cb = pid // heads
    length = tl.load(lengths_ptr + cb % batch).to(tl.int32)
    return h, cb, cb % batch, cb // batch, heads // GROUP, h // GROUP, h % GROUP, (length + chunk - 1) // chunk


@triton.jit
def _decode_jvp_partials(
    q_ptr, dq_ptr, k_ptr, v_ptr, dk_ptr, dv_ptr, slots_ptr, lengths_ptr,
    part_m_ptr, part_l_ptr, part_ds_ptr, part_o_ptr, part_t_ptr,
    batch, kv_heads, chunk, num_splits, qk_scale, sm_scale,
    sq_c, sq_b, sq_h,
    sdq_c, sdq_b, sdq_h,
    sk_c, sk_s, sk_n, sk_j,
    sv_c, sv_s, sv_n, sv_j,
    sdk_c, sdk_s, sdk_n, sdk_j,
    sdv_c, sdv_s, sdv_n, sdv_j,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):
    pid, split, j, b, c, length, slot, lo, hi = _program_rows(lengths_ptr, slots_ptr, batch, kv_heads, chunk)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_PAD)
    gmask = g < GROUP
    dmask = d < HEAD_DIM
    qmask = gmask[:, None] & dmask[None, :]
    c64 = c.to(tl.int64)
    b64 = b.to(tl.int64)
    j64 = j.to(tl.int64)
    heads64 = (j * GROUP + g).to(tl.int64)[:, None]
    q = tl.load(q_ptr + c64 * sq_c + b64 * sq_b + heads64 * sq_h + d[None, :], mask=qmask, other=0.0)
    dq = tl.load(dq_ptr + c64 * sdq_c + b64 * sdq_b + heads64 * sdq_h + d[None, :], mask=qmask, other=0.0)
    q = q.to(k_ptr.dtype.element_ty)
    dq = dq.to(k_ptr.dtype.element_ty)
    k_base = k_ptr + c64 * sk_c + slot * sk_s + j64 * sk_j
    v_base = v_ptr + c64 * sv_c + slot * sv_s + j64 * sv_j
    dk_base = dk_ptr + c64 * sdk_c + slot * sdk_s + j64 * sdk_j
    dv_base = dv_ptr + c64 * sdv_c + slot * sdv_s + j64 * sdv_j

    m_i = tl.full([GROUP_PAD], -float("inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    ds_i = tl.zeros([GROUP_PAD], tl.float32)
    acc_o = tl.zeros([GROUP_PAD, HEAD_PAD], tl.float32)
    acc_t = tl.zeros([GROUP_PAD, HEAD_PAD], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        nmask = n < hi
        kv_mask = nmask[:, None] & dmask[None, :]
        n64 = n.to(tl.int64)[:, None]
        k = tl.load(k_base + n64 * sk_n + d[None, :], mask=kv_mask, other=0.0)
        dk = tl.load(dk_base + n64 * sdk_n + d[None, :], mask=kv_mask, other=0.0)
        if IEEE:  # fp32 operands (exact products of the cache-dtype values), no TF32
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
            ds = (tl.dot(dq.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
                  + tl.dot(q.to(tl.float32), tl.trans(dk.to(tl.float32)), input_precision="ieee"))
        else:
            s = tl.dot(q, tl.trans(k))
            ds = tl.dot(dq, tl.trans(k))
            ds = tl.dot(q, tl.trans(dk), ds)
        s = tl.where(nmask[None, :], s * qk_scale, -float("inf"))  # log2 domain
        ds = tl.where(nmask[None, :], ds * sm_scale, 0.0)  # natural units (the tangent of s / log2(e))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every block has a live position
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])  # [GROUP_PAD, BLOCK_N], 0 in masked lanes
        pds = p * ds
        l_i = l_i * alpha + tl.sum(p, axis=1)
        ds_i = ds_i * alpha + tl.sum(pds, axis=1)
        v = tl.load(v_base + n64 * sv_n + d[None, :], mask=kv_mask, other=0.0)
        dv = tl.load(dv_base + n64 * sdv_n + d[None, :], mask=kv_mask, other=0.0)
        acc_o = acc_o * alpha[:, None]
        acc_t = acc_t * alpha[:, None]
        if IEEE:
            pc = p.to(v.dtype).to(tl.float32)
            acc_o += tl.dot(pc, v.to(tl.float32), input_precision="ieee")  # as the primal kernel
            acc_t += (tl.dot(pds.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
                      + tl.dot(pc, dv.to(tl.float32), input_precision="ieee"))
        else:
            pc = p.to(v.dtype)
            acc_o += tl.dot(pc, v)
            acc_t = tl.dot(pds.to(v.dtype), v, acc_t)
            acc_t = tl.dot(pc, dv, acc_t)
        m_i = m_new

    smask = gmask & (lo + g * 0 < length)  # nothing stored by splits past the row's length
    row = (pid.to(tl.int64) * num_splits + split) * GROUP + g
    tl.store(part_m_ptr + row, m_i, mask=smask)
    tl.store(part_l_ptr + row, l_i, mask=smask)
    tl.store(part_ds_ptr + row, ds_i, mask=smask)
    wmask = smask[:, None] & dmask[None, :]
    tl.store(part_o_ptr + row[:, None] * HEAD_DIM + d[None, :], acc_o, mask=wmask)
    tl.store(part_t_ptr + row[:, None] * HEAD_DIM + d[None, :], acc_t, mask=wmask)


@triton.jit
def _decode_jvp_merge(
    part_m_ptr, part_l_ptr, part_ds_ptr, part_o_ptr, part_t_ptr, lengths_ptr, out_ptr, dout_ptr,
    batch, heads, chunk, num_splits,
    so_c, so_b, so_h,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    h, cb, b, c, kv_heads, j, g, live = _merge_head(lengths_ptr, batch, heads, chunk, GROUP)
    s = tl.arange(0, SPLITS_PAD)
    smask = s < live
    d = tl.arange(0, HEAD_PAD)
    dmask = d < HEAD_DIM
    rmask = smask[:, None] & dmask[None, :]
    idx = ((cb.to(tl.int64) * kv_heads + j) * num_splits + s) * GROUP + g  # [SPLITS_PAD]
    m = tl.load(part_m_ptr + idx, mask=smask, other=-float("inf"))
    l = tl.load(part_l_ptr + idx, mask=smask, other=0.0)
    acc_ds = tl.load(part_ds_ptr + idx, mask=smask, other=0.0)
    acc_o = tl.load(part_o_ptr + idx[:, None] * HEAD_DIM + d[None, :], mask=rmask, other=0.0)
    acc_t = tl.load(part_t_ptr + idx[:, None] * HEAD_DIM + d[None, :], mask=rmask, other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.where(smask, tl.exp2(m - m_max), 0.0)
    den = tl.sum(l * w, axis=0)
    out = tl.sum(acc_o * w[:, None], axis=0) / den  # the primal kernel's formula (it sums the splits in order:
    # the same bits up to 3 live splits, within a few ulps beyond)
    mean_ds = tl.sum(acc_ds * w, axis=0) / den
    dout = tl.sum(acc_t * w[:, None], axis=0) / den - mean_ds * out
    o_off = c.to(tl.int64) * so_c + b.to(tl.int64) * so_b + h.to(tl.int64) * so_h
    tl.store(out_ptr + o_off + d, out.to(out_ptr.dtype.element_ty), mask=dmask)
    tl.store(dout_ptr + o_off + d, dout.to(dout_ptr.dtype.element_ty), mask=dmask)


def decode_attention_jvp(q: torch.Tensor, dq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         dk_cache: torch.Tensor, dv_cache: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor,
                         num_splits: int | None = None,
                         block_n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of ``q [C, B, 1, H, D]`` over positions ``< lengths[b]`` of cache slot
    ``slots[b]`` (caches ``[C, max_batch, max_seq_len + 1, KV, D]``), grouped-query, scale
    ``1 / sqrt(D)``, and its tangent along ``(dq, dk_cache, dv_cache)``.

    Returns ``(out, dout)``, each ``[C, B, 1, H, D]`` in q's dtype (the two halves of one buffer).
    ``lengths`` must be in ``[1, max_seq_len]`` (not checked: that would sync with the device).
    ``num_splits``/``block_n`` override the plan (tests, tuning). Same result as
    :func:`adfast.attention.attend_jvp` with ``query_pos = (lengths - 1)[:, None]``; ``out`` is
    :func:`adfast.kernels.decode_attention.decode_attention`'s. Raises ValueError for malformed inputs.
    """
    check_inputs(q, k_cache, v_cache, slots, lengths, tangents=dict(dq=dq, dk_cache=dk_cache, dv_cache=dv_cache))
    num_copies, batch, _, heads, head_dim = q.shape
    kv_heads = k_cache.shape[3]
    group = heads // kv_heads
    head_pad = max(16, triton.next_power_of_2(head_dim))
    max_seq_len = k_cache.shape[2] - 1
    slots = slots.contiguous()
    lengths = lengths.contiguous()

    programs = num_copies * batch * kv_heads
    interpreted = launch_plan.multiprocessor_count(q.device) is None
    fp32 = k_cache.dtype == torch.float32
    if block_n is None and not interpreted:
        block_n = GPU_BLOCK_N_FP32 if fp32 else GPU_BLOCK_N
    splits, chunk, block_n, num_warps = plan_attention(programs, max_seq_len, q.device, num_splits, block_n)
    if fp32 and not interpreted:
        num_warps = GPU_WARPS_FP32
    rows = programs * splits * group
    part_m = torch.empty(rows, device=q.device, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    part_ds = torch.empty_like(part_m)
    part_o = torch.empty(rows * head_dim, device=q.device, dtype=torch.float32)
    part_t = torch.empty_like(part_o)
    # halves of one buffer: see adfast.tangent.primal_tangent_rows
    out, dout = torch.empty((2, num_copies, batch, 1, heads, head_dim), device=q.device, dtype=q.dtype)

    _decode_jvp_partials[(programs, splits)](
        q, dq, k_cache, v_cache, dk_cache, dv_cache, slots, lengths,
        part_m, part_l, part_ds, part_o, part_t,
        batch, kv_heads, chunk, splits, LOG2E / head_dim ** 0.5, 1.0 / head_dim ** 0.5,
        q.stride(0), q.stride(1), q.stride(3),
        dq.stride(0), dq.stride(1), dq.stride(3),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        dk_cache.stride(0), dk_cache.stride(1), dk_cache.stride(2), dk_cache.stride(3),
        dv_cache.stride(0), dv_cache.stride(1), dv_cache.stride(2), dv_cache.stride(3),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, HEAD_PAD=head_pad,
        BLOCK_N=block_n, IEEE=fp32 or interpreted, num_warps=num_warps,
    )
    _decode_jvp_merge[(num_copies * batch * heads,)](
        part_m, part_l, part_ds, part_o, part_t, lengths, out, dout,
        batch, heads, chunk, splits,
        out.stride(0), out.stride(1), out.stride(3),
        GROUP=group, HEAD_DIM=head_dim, HEAD_PAD=head_pad, SPLITS_PAD=max(2, triton.next_power_of_2(splits)),
        num_warps=4,
    )
    return out, dout
