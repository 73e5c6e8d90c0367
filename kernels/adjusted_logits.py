"""The adjusted next-token logits, written out: ``a = log_softmax(t) / tau + lam * D``.

    D[v] = (log_softmax(p)[v] - log_softmax(m)[v]) / (2 eps)   for v < V_P, else 0

Here the normalisers matter (the output is a proper log-probability up to ``1/tau``), so all
three log-sum-exps are computed. Stage 1 (``[B, S]`` grid) writes per-chunk online
(max, sum-exp) of teacher, plus and minus rows; stage 2 (``[B, S]`` grid) merges the S partials
of its row and writes its chunk of ``a`` in float32, plus the teacher log-sum-exp and the
bad-input bits of the row (bits as in :mod:`adfast.kernels.fused_sample`; 4 = every teacher logit -inf). Inputs are read
twice, outputs written once. Rows with ``tau == 0`` hold the greedy objective
``log_softmax(t) + lam D``. In permutation mode ``D[v]`` is read at ``perm[v]`` and the row's
sign is folded into ``coef = sign * lam / (2 eps)``.

Exact-D input (``minus`` is None, ``EXACT_D``): ``plus`` holds ``D [B, V_P]`` itself, the exact
log-softmax tangent, already normalised. Then ``a = (t - lse(t)) / tau + coef * D`` on the
prefix ``v < V_P`` (``coef = lam``, times the row's sign in permutation mode, ``D`` read at
``perm[v]``) and ``(t - lse(t)) / tau`` beyond: only the teacher's log-sum-exp is computed, and
no minus row is read.
"""
import torch
import triton
import triton.language as tl

from .online_lse import lse_merge, lse_update
from .proxy_block import load_proxy_block
from .split import plan_splits


@triton.jit
def _adjusted_partials(
    teacher_ptr, plus_ptr, minus_ptr, part_ptr, part_bad_ptr,
    stride_t, stride_p, vocab_t, vocab_p, chunk, num_splits,
    HAS_PROXY: tl.constexpr, BLOCK: tl.constexpr, EXACT_D: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, vocab_t)
    t_max, t_sum = -float("inf"), 0.0
    p_max, p_sum = -float("inf"), 0.0
    m_max, m_sum = -float("inf"), 0.0
    bad = 0
    for start in range(lo, hi, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < hi
        t = tl.load(teacher_ptr + row.to(tl.int64) * stride_t + offs, mask=mask, other=-float("inf")).to(tl.float32)
        bad = bad | tl.max(((t != t) | (t == float("inf"))).to(tl.int32), axis=0)
        t_max, t_sum = lse_update(t_max, t_sum, t)
        if HAS_PROXY:
            pmask = mask & (offs < vocab_p)
            p = tl.load(plus_ptr + row.to(tl.int64) * stride_p + offs, mask=pmask, other=-float("inf")).to(tl.float32)
            if EXACT_D:
                proxy_bad = pmask & ((p != p) | (tl.abs(p) == float("inf")))
                bad = bad | (2 * tl.max(proxy_bad.to(tl.int32), axis=0))
            else:
                m = tl.load(minus_ptr + row.to(tl.int64) * stride_p + offs, mask=pmask,
                            other=-float("inf")).to(tl.float32)
                proxy_bad = pmask & ((p != p) | (m != m) | (tl.abs(p) == float("inf")) | (tl.abs(m) == float("inf")))
                bad = bad | (2 * tl.max(proxy_bad.to(tl.int32), axis=0))
                p_max, p_sum = lse_update(p_max, p_sum, p)
                m_max, m_sum = lse_update(m_max, m_sum, m)
    part = part_ptr + (row * num_splits + split) * 6
    tl.store(part + 0, t_max)
    tl.store(part + 1, t_sum)
    tl.store(part + 2, p_max)
    tl.store(part + 3, p_sum)
    tl.store(part + 4, m_max)
    tl.store(part + 5, m_sum)
    tl.store(part_bad_ptr + row * num_splits + split, bad)


@triton.jit
def _adjusted_write(
    teacher_ptr, plus_ptr, minus_ptr, perm_ptr, tau_ptr, coef_ptr, part_ptr, part_bad_ptr,
    out_ptr, lse_ptr, bad_ptr, stride_t, stride_p, stride_perm, stride_o, vocab_t, vocab_p,
    chunk, num_splits, HAS_PROXY: tl.constexpr, PERMUTE: tl.constexpr, BLOCK: tl.constexpr,
    SPLITS: tl.constexpr, EXACT_D: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    s = tl.arange(0, SPLITS)
    smask = s < num_splits
    part = part_ptr + row * num_splits * 6
    lse_t = lse_merge(part + 0, part + 1, 6, s, smask)
    if HAS_PROXY:
        if not EXACT_D:
            lse_p = lse_merge(part + 2, part + 3, 6, s, smask)
            lse_m = lse_merge(part + 4, part + 5, 6, s, smask)
    tau = tl.load(tau_ptr + row)
    inv_tau = 1.0 / tl.where(tau == 0.0, 1.0, tau)
    coef = tl.load(coef_ptr + row)
    if split == 0:
        bits = tl.load(part_bad_ptr + row * num_splits + s, mask=smask, other=0)
        all_masked = tl.where(lse_t == -float("inf"), 4, 0)
        tl.store(bad_ptr + row, tl.max(bits & 1, axis=0) | tl.max(bits & 2, axis=0) | all_masked)
        tl.store(lse_ptr + row, lse_t)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, vocab_t)
    for start in range(lo, hi, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < hi
        t = tl.load(teacher_ptr + row.to(tl.int64) * stride_t + offs, mask=mask, other=0.0).to(tl.float32)
        a = (t - lse_t) * inv_tau
        if HAS_PROXY:
            pmask = mask & (offs < vocab_p)
            if EXACT_D:
                p, m = load_proxy_block(plus_ptr, minus_ptr, perm_ptr, row, stride_p, stride_perm, offs, pmask,
                                        PERMUTE, False)
                a = a + tl.where(pmask, coef * p, 0.0)
            else:
                p, m = load_proxy_block(plus_ptr, minus_ptr, perm_ptr, row, stride_p, stride_perm, offs, pmask,
                                        PERMUTE, True)
                a = a + tl.where(pmask, coef * ((p - lse_p) - (m - lse_m)), 0.0)
        tl.store(out_ptr + row.to(tl.int64) * stride_o + offs, a, mask=mask)


def adjusted_logits(teacher, plus, minus, perm, tau, coef, num_splits=None):
    """Launch both stages; arguments as :func:`adfast.kernels.fused_sample.fused_sample` (``plus``
    with ``minus=None``: the exact-D input, module docstring).

    Returns ``(adjusted float32 [B, V_T], teacher_lse float32 [B], bad int32 [B])``.
    """
    batch, vocab_t = teacher.shape
    has_proxy = plus is not None
    exact = has_proxy and minus is None
    vocab_p = plus.shape[1] if has_proxy else 0
    plan = plan_splits(batch, vocab_t, teacher.device, num_splits)
    dev = teacher.device
    part = torch.empty(batch, plan.splits, 6, device=dev, dtype=torch.float32)
    part_bad = torch.empty(batch, plan.splits, device=dev, dtype=torch.int32)
    out = torch.empty(batch, vocab_t, device=dev, dtype=torch.float32)
    lse = torch.empty(batch, device=dev, dtype=torch.float32)
    bad = torch.empty(batch, device=dev, dtype=torch.int32)
    grid = (batch, plan.splits)
    _adjusted_partials[grid](
        teacher, plus if has_proxy else teacher, minus if minus is not None else teacher, part, part_bad,
        teacher.stride(0), plus.stride(0) if has_proxy else 0, vocab_t, vocab_p, plan.chunk, plan.splits,
        HAS_PROXY=has_proxy, BLOCK=plan.block, EXACT_D=exact, num_warps=plan.num_warps,
    )
    _adjusted_write[grid](
        teacher, plus if has_proxy else teacher, minus if minus is not None else teacher,
        perm if perm is not None else part_bad, tau, coef, part, part_bad, out, lse, bad,
        teacher.stride(0), plus.stride(0) if has_proxy else 0, perm.stride(0) if perm is not None else 0,
        out.stride(0), vocab_t, vocab_p, plan.chunk, plan.splits,
        HAS_PROXY=has_proxy, PERMUTE=perm is not None, BLOCK=plan.block,
        SPLITS=triton.next_power_of_2(plan.splits), EXACT_D=exact, num_warps=plan.num_warps,
    )
    return out, lse, bad
