"""Split-K ("flash-decoding") attention of one new query per row over its slot's live cache.

Shapes (one layer; ``C`` weight copies, ``B`` rows, ``H`` query heads, ``KV`` key/value heads,
``GROUP = H // KV``, ``D`` head dim, ``S = max_seq_len``)::

    q                 [C, B, 1, H, D]          any float dtype
    k_cache, v_cache  [C, max_batch, S + 1, KV, D]  fp32 / bf16 / fp16 (any strides, last dim 1)
    slots             [B]  int               cache slot of row b
    lengths           [B]  int               live positions of row b (= query_pos[b, 0] + 1, >= 1)
    out               [C, B, 1, H, D]          q's dtype

Math, for copy ``c``, row ``b``, head ``h`` (kv head ``j = h // GROUP``), ``n < L = lengths[b]``::

    s_n   = <q[c, b, 0, h], K[c, slots[b], n, j]> / sqrt(D)
    out   = sum_n softmax(s)_n V[c, slots[b], n, j]

One launch (:func:`_decode_attention`, grid ``(C * B * KV, num_splits)``): program ``(p, s)`` with
``p = (c * B + b) * KV + j`` takes all GROUP query heads of kv head ``j`` together as one
``[GROUP_PAD, HEAD_PAD]`` tile (``GROUP_PAD = max(16, next_pow2(GROUP))``, ``HEAD_PAD =
max(16, next_pow2(D))``: any head dim, e.g. 8 or 80; padded rows and columns are zero, masked on
load, never stored) so that every K/V block is loaded once for the whole group and both products run on
``tl.dot`` (which needs M >= 16 on tensor cores; the padding costs idle MMA rows, not bytes; fp32
caches use ``input_precision="ieee"`` so no TF32 rounding). Under the Triton interpreter
(CPU tensors) ``tl.dot`` on bf16/fp16 operands returns garbage (triton 3.9), so there the
operands (already rounded to the cache dtype) are upcast to fp32 and multiplied in IEEE fp32:
the same products, exact in fp32, so the result matches the GPU's bf16 MMA with fp32
accumulation up to summation order. It walks positions
``[s * chunk, min((s + 1) * chunk, L))`` in ``BLOCK_N`` blocks (K/V loads masked to ``n < L``: a
position ``>= L`` is never read, and a split with ``s * chunk >= L`` runs no iteration and stores
nothing), keeping the online-softmax state (running max ``m`` in the log2 domain, sum ``l``,
unnormalised ``acc [GROUP_PAD, D]``) in float32. Probabilities are cast to V's dtype for the
second ``tl.dot`` (as flash-attention does), so bf16/fp16 caches see bf16/fp16 rounding of P.

With one split the program holds the whole row and writes ``acc / l`` in q's dtype. With several
it writes ``m, l [GROUP]`` and ``acc [GROUP, D]`` to a float32 workspace, then takes a ticket from
its kv head's counter (:func:`adfast.kernels.launch_order.last_ticket`); the program that draws
the last ticket merges the ``ceil(L / chunk)`` live splits in split order (deterministic whichever
program finishes last), ``sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s``, and writes it in q's
dtype. No second kernel: a decode step launches one attention kernel per layer.

Bytes: the live K and V rows, ``2 * C * KV * D * itemsize * sum_b L_b`` (the blocks round up to
``BLOCK_N`` only in masked lanes, which load nothing), plus q and out, plus the workspace
(``C * B * KV * splits * GROUP * (D + 2) * 4`` written and read once, small beside the cache
for long rows). Nothing scales with ``max_seq_len`` except the number of (empty) programs.

Splits: ``chunk`` (a multiple of ``BLOCK_N``) is fixed from ``max_seq_len`` so that
``C * B * KV * splits`` programs cover the GPU about four times (``splits <= S / 256``, so each
split has at least 256 positions of work when rows are full); short rows simply use fewer live
splits. Choosing from ``max_seq_len`` (not ``lengths.max()``) keeps the launch free of host syncs
and CUDA-graph safe. On CPU (Triton interpreter) a small ``BLOCK_N`` and at most 4 splits keep
tests fast while still crossing block and split boundaries.
"""
import torch
import triton
import triton.language as tl

from . import split as launch_plan
from .launch_order import last_ticket, wait_for_predecessor, zeroed_counters

LOG2E = 1.4426950408889634


@triton.jit
def _program_rows(lengths_ptr, slots_ptr, batch, kv_heads, chunk):
    """Stage 1's program ``(p, s)``: ``p``, ``s``, its kv head ``j``, row ``b``, copy ``c``
    (``p = (c B + b) KV + j``), the row's length and cache slot, and the positions ``[lo, hi)`` of its split."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    j = pid % kv_heads
    cb = pid // kv_heads
    b = cb % batch
    c = cb // batch
    length = tl.load(lengths_ptr + b).to(tl.int32)
    slot = tl.load(slots_ptr + b).to(tl.int64)
    lo = split * chunk
    return pid, split, j, b, c, length, slot, lo, tl.minimum(lo + chunk, length)


@triton.jit
def _decode_attention(
    q_ptr, k_ptr, v_ptr, slots_ptr, lengths_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, count_ptr, out_ptr,
    batch, kv_heads, chunk, num_splits, qk_scale,
    sq_c, sq_b, sq_h,
    sk_c, sk_s, sk_n, sk_j,
    sv_c, sv_s, sv_n, sv_j,
    so_c, so_b, so_h,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, IEEE: tl.constexpr, SPLIT: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_predecessor(PDL)
    pid, split, j, b, c, length, slot, lo, hi = _program_rows(lengths_ptr, slots_ptr, batch, kv_heads, chunk)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_PAD)
    gmask = g < GROUP
    dmask = d < HEAD_DIM
    q_off = c.to(tl.int64) * sq_c + b.to(tl.int64) * sq_b + (j * GROUP + g).to(tl.int64)[:, None] * sq_h
    q = tl.load(q_ptr + q_off + d[None, :], mask=gmask[:, None] & dmask[None, :], other=0.0)
    k_base = k_ptr + c.to(tl.int64) * sk_c + slot * sk_s + j.to(tl.int64) * sk_j
    v_base = v_ptr + c.to(tl.int64) * sv_c + slot * sv_s + j.to(tl.int64) * sv_j
    q = q.to(k_ptr.dtype.element_ty)

    m_i = tl.full([GROUP_PAD], -float("inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_PAD], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        nmask = n < hi
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_base + n.to(tl.int64)[:, None] * sk_n + d[None, :], mask=kv_mask, other=0.0)
        if IEEE:  # fp32 operands (exact products of the cache-dtype values), no TF32
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(nmask[None, :], s * qk_scale, -float("inf"))  # log2 domain
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every block has a live position
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + n.to(tl.int64)[:, None] * sv_n + d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    o_rows = out_ptr + c.to(tl.int64) * so_c + b.to(tl.int64) * so_b + (j * GROUP + g).to(tl.int64) * so_h
    o_mask = gmask[:, None] & dmask[None, :]
    if not SPLIT:  # the one split holds the whole row
        l_i = tl.where(gmask, l_i, 1.0)  # padded heads: no 0 / 0
        tl.store(o_rows[:, None] + d[None, :], (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        smask = gmask & (lo + g * 0 < length)  # nothing stored by splits past the row's length
        first = pid.to(tl.int64) * num_splits
        tl.store(part_m_ptr + (first + split) * GROUP + g, m_i, mask=smask)
        tl.store(part_l_ptr + (first + split) * GROUP + g, l_i, mask=smask)
        tl.store(part_acc_ptr + ((first + split) * GROUP + g)[:, None] * HEAD_DIM + d[None, :], acc,
                 mask=smask[:, None] & dmask[None, :])
        if last_ticket(count_ptr + pid, num_splits):  # the last split of this kv head: merge the live ones, in order
            live = (length + chunk - 1) // chunk
            m_max = tl.full([GROUP_PAD], -float("inf"), tl.float32)
            for i in range(live):
                m_s = tl.load(part_m_ptr + (first + i) * GROUP + g, mask=gmask, other=0.0, cache_modifier=".cg")
                m_max = tl.maximum(m_max, m_s)
            num = tl.zeros([GROUP_PAD, HEAD_PAD], tl.float32)
            den = tl.zeros([GROUP_PAD], tl.float32)
            for i in range(live):
                idx = (first + i) * GROUP + g
                w = tl.exp2(tl.load(part_m_ptr + idx, mask=gmask, other=0.0, cache_modifier=".cg") - m_max)
                den += tl.load(part_l_ptr + idx, mask=gmask, other=0.0, cache_modifier=".cg") * w
                num += tl.load(part_acc_ptr + idx[:, None] * HEAD_DIM + d[None, :], mask=o_mask, other=0.0,
                               cache_modifier=".cg") * w[:, None]
            den = tl.where(gmask, den, 1.0)
            tl.store(o_rows[:, None] + d[None, :], (num / den[:, None]).to(out_ptr.dtype.element_ty), mask=o_mask)


CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_inputs(q, k_cache, v_cache, slots, lengths, tangents: dict | None = None) -> None:
    """Raise ValueError for inputs the kernels cannot take (shapes, dtypes, strides, devices);
    ``tangents``: the tangent kernel's ``dq``, ``dk_cache``, ``dv_cache`` by name, checked against q
    and the caches. The lengths' values are not checked (that would sync with the device)."""
    tangents = tangents or {}
    tensors = dict(q=q, k_cache=k_cache, v_cache=v_cache, slots=slots, lengths=lengths, **tangents)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    if q.dim() != 5:
        raise ValueError(f"q must be [C, B, 1, H, D], got shape {tuple(q.shape)}")
    num_copies, batch, seq, heads, head_dim = q.shape
    if seq != 1:
        raise ValueError(f"decode attention handles one query per row (T == 1), got T = {seq}")
    if not q.is_floating_point():
        raise ValueError(f"q must be a floating tensor, got {q.dtype}")
    if "dq" in tangents and (tangents["dq"].shape != q.shape or tangents["dq"].dtype != q.dtype):
        raise ValueError(f"dq must match q ({tuple(q.shape)}, {q.dtype}), got {tuple(tangents['dq'].shape)}, "
                         f"{tangents['dq'].dtype}")
    if head_dim < 1:
        raise ValueError(f"head_dim must be >= 1, got {head_dim}")
    if k_cache.dim() != 5:
        raise ValueError(f"k_cache must be [C, max_batch, max_seq_len + 1, KV, D], got shape {tuple(k_cache.shape)}")
    if k_cache.dtype not in CACHE_DTYPES:
        raise ValueError(f"cache dtype must be one of {CACHE_DTYPES}, got {k_cache.dtype}")
    for name, t in (("v_cache", v_cache), *((n, t) for n, t in tangents.items() if n != "dq")):
        if t.shape != k_cache.shape or t.dtype != k_cache.dtype:
            raise ValueError(f"{name} must match k_cache ({tuple(k_cache.shape)}, {k_cache.dtype}), "
                             f"got {tuple(t.shape)}, {t.dtype}")
    if k_cache.shape[0] != num_copies:
        raise ValueError(f"caches hold {k_cache.shape[0]} copies, q has {num_copies}")
    if k_cache.shape[4] != head_dim:
        raise ValueError(f"caches have head_dim {k_cache.shape[4]}, q has {head_dim}")
    if k_cache.shape[2] < 2:
        raise ValueError(f"caches need max_seq_len + 1 >= 2 positions, got {k_cache.shape[2]}")
    kv_heads = k_cache.shape[3]
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of kv heads ({kv_heads})")
    for name, t in tensors.items():
        if name not in ("slots", "lengths") and t.stride(4) != 1:
            raise ValueError(f"{name} must have a unit stride in its last (head_dim) dimension")
    for name, t in (("slots", slots), ("lengths", lengths)):
        if t.shape != (batch,):
            raise ValueError(f"{name} must be [B] = [{batch}], got shape {tuple(t.shape)}")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")


def plan_attention(num_programs: int, max_seq_len: int, device: torch.device, num_splits: int | None,
          block_n: int | None) -> tuple[int, int, int, int]:
    """``(splits, chunk, block_n, num_warps)`` of a launch of ``num_programs = C B KV`` kv heads over
    caches of ``max_seq_len`` positions (module docstring, Splits); ``num_splits`` / ``block_n``
    override it (tests, tuning, ``bench/attention.py``)."""
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be an int >= 1 (None: the plan's choice), got {num_splits!r}")
    if block_n is not None and (isinstance(block_n, bool) or not isinstance(block_n, int) or block_n < 1
                                or block_n & (block_n - 1)):
        raise ValueError(f"block_n must be a power of two (None: the plan's choice), got {block_n!r}")
    sms = launch_plan.multiprocessor_count(device)
    if sms is not None:
        block_n = block_n or 64
        num_warps = 4
        if num_splits is None:
            num_splits = max(1, min(-(-4 * sms // num_programs), max_seq_len // 256))
    else:
        block_n = block_n or 16
        num_warps = 4
        num_splits = num_splits or max(1, min(4, max_seq_len // (2 * block_n)))
    chunk = -(-max_seq_len // num_splits)
    chunk = -(-chunk // block_n) * block_n
    num_splits = -(-max_seq_len // chunk)
    return num_splits, chunk, block_n, num_warps


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     lengths: torch.Tensor, num_splits: int | None = None,
                     block_n: int | None = None, counters: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention of ``q [C, B, 1, H, D]`` over positions ``< lengths[b]`` of cache slot
    ``slots[b]`` (cache ``[C, max_batch, max_seq_len + 1, KV, D]``), grouped-query, scale
    ``1 / sqrt(D)``. Returns ``[C, B, 1, H, D]`` in q's dtype. ``lengths`` must be in
    ``[1, max_seq_len]``. ``num_splits``/``block_n`` override the plan (tests, tuning).
    ``counters``: the split tickets, int32, at least ``C B KV`` of them, zero at entry and left zero
    (a CUDA-graph captured step passes its own, one buffer per stream); None
    allocates zeroed ones when the plan splits. Same result as :func:`adfast.attention.attend` with
    ``query_pos = (lengths - 1)[:, None]``. Raises ValueError for malformed inputs
    (:func:`check_inputs`, and a plan override that is not a positive int / a power of two).
    """
    check_inputs(q, k_cache, v_cache, slots, lengths)
    num_copies, batch, _, heads, head_dim = q.shape
    kv_heads = k_cache.shape[3]
    group = heads // kv_heads
    head_pad = max(16, triton.next_power_of_2(head_dim))
    max_seq_len = k_cache.shape[2] - 1
    slots = slots.contiguous()
    lengths = lengths.contiguous()

    programs = num_copies * batch * kv_heads
    interpreted = launch_plan.multiprocessor_count(q.device) is None
    splits, chunk, block_n, num_warps = plan_attention(programs, max_seq_len, q.device, num_splits, block_n)
    out = torch.empty((num_copies, batch, 1, heads, head_dim), device=q.device, dtype=q.dtype)
    if splits > 1:
        part_m = torch.empty(programs * splits * group, device=q.device, dtype=torch.float32)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(programs * splits * group * head_dim, device=q.device, dtype=torch.float32)
        if counters is None:
            counters = zeroed_counters(programs, q.device)
        elif counters.dtype != torch.int32 or counters.numel() < programs or not counters.is_contiguous():
            raise ValueError(f"counters must be contiguous int32 with at least C B KV = {programs} entries, got "
                             f"{counters.dtype} with {counters.numel()}")
    else:
        part_m = part_l = part_acc = counters = out  # unused: the one split writes the output

    _decode_attention[(programs, splits)](
        q, k_cache, v_cache, slots, lengths, part_m, part_l, part_acc, counters, out,
        batch, kv_heads, chunk, splits, LOG2E / head_dim ** 0.5,
        q.stride(0), q.stride(1), q.stride(3),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        out.stride(0), out.stride(1), out.stride(3),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, HEAD_PAD=head_pad,
        BLOCK_N=block_n, IEEE=k_cache.dtype == torch.float32 or interpreted, SPLIT=splits > 1,
        num_warps=num_warps, **launch_plan.dependent_launch(q.device),
    )
    return out

