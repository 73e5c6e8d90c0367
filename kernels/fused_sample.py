"""Fused antidistillation sampling: one read of the teacher and both proxy rows, one token out.

For row ``b`` the kernel draws ``x_b ~ softmax(a_b)`` with

    a_b[v] = log_softmax(t_b)[v] / tau_b + lam_b * D_b[v]
    D_b[v] = (log_softmax(p_b)[v] - log_softmax(m_b)[v]) / (2 eps)   for v < V_P, else 0

from the scores ``z_b[v] = t_b[v] / tau_b + coef_b * (p_b[v] - m_b[v])`` (``coef_b = lam_b /
(2 eps)``, times the row's sign in permutation mode), ``softmax(z_b) = softmax(a_b)``, by a
Gumbel-max race over groups of 8 consecutive entries (:mod:`adfast.kernels.group_draw`: each
group's part enters with ``max z + log(sum exp(z - max z))`` plus Philox Gumbel noise, and the
winning part gives up one entry by inverse CDF with one Philox uniform), exact in distribution
and bit for bit the CPU twin's (:func:`adfast.reference.draw_groups`) in the interpreter.
``tau_b == 0`` is greedy: ``argmax(log_softmax(t) + lam D)``, the first maximal entry.

Exact-D input (``minus`` is None, ``EXACT_D``): ``plus`` holds ``D [B, V_P]`` itself, the exact
log-softmax tangent (already normalised), and the scores are
``z_b[v] = t_b[v] / tau_b + coef_b * D_b[v]`` with ``coef_b = lam_b`` (times the row's sign in
permutation mode, ``D`` read at ``perm[v]``): no minus row is read and no proxy log-sum-exp is
computed.

Normalisers. A constant added to a whole row cannot change the draw, so the scores use raw
logits and skip the teacher's ``1/tau * lse(t)`` and, when ``V_P == V_T``, both proxy
log-sum-exps. When the proxy vocabulary is shorter (the teacher's head is padded further), the
proxy normalisers shift only the prefix ``v < V_P`` by ``coef * (lse(m) - lse(p))``: the kernel
then computes both proxy log-sum-exps online in the same pass, races the prefix's parts and the
tail's (``v >= V_P``; a group straddling ``V_P`` is two parts) apart and compares the two winners
after the shift (``SHIFT``). An exact ``D`` needs no shift (it is normalised already), so
``SHIFT`` is off for it whatever ``V_P``. The teacher's log-sum-exp is always computed (online,
same pass) because the kernel also returns ``log_softmax(t_b)[x_b]``, the teacher's unadjusted
log-probability of the drawn token. The reported ``D`` itself comes from
:mod:`adfast.kernels.adjusted_logits`, where all normalisers are applied.

Work split. Stage 1 runs a ``[B, S]`` grid, each program streaming one vocabulary chunk and
writing a partial (max / sum-exp of t, p, m; best prefix and tail keys and indices; bad-input
bits); stage 2 runs ``[B]`` programs that merge the S partials. S is chosen so the grid fills the
GPU even at batch 1. Each logit is read once (stage 2 reads one teacher logit per row). Ties go to
the smallest index. A loop step reads ``BLOCK / 8`` groups, one group of each input to a thread
(16 bytes of a bf16 row), and every thread keeps its own running state (a max / sum-exp pair per
input, :func:`adfast.kernels.online_lse.lse_group_update`; its best key and index; a NaN sentinel
``(p - m) * 0`` for the proxies' bad-input bit); the threads are folded once after the loop: the
loop body has no cross-thread reduction and no barrier. The entries the proxies cover and the
teacher-only tail run as two loops, and the first runs its whole blocks unmasked. A greedy row
(one row per program) branches past the noise. Per vocabulary entry (a logit of each of the three
inputs) that leaves about 50 SASS instructions on sm_90 (``python -m adfast.compile_check``): per
input a conversion and an exponential with its bookkeeping, and per group of 8 one Philox call,
one Gumbel variate, the part's exponentials and running sums; the per-entry Gumbel-max this
replaced cost about 84 (Philox a quarter call and two logs per entry), and Nsight Compute on an
H200 at batch 64 (``bench/results/sampler-ncu-B64-details.txt``, that design) showed its
schedulers issuing in 53% of cycles, its warps waiting mostly on their loads. The main loop is
software-pipelined (``NUM_STAGES``: loads issued two blocks ahead, through shared memory).

Bad-input bits per row: 1 = teacher NaN or +inf, 2 = proxy (or exact ``D``) NaN or +-inf,
4 = every score -inf.
"""
import torch
import triton
import triton.language as tl

from . import split as launch_plan
from .group_draw import GROUP, GROUP_SIZE, part_draw, split_offset
from .launch_order import wait_for_predecessor
from .online_lse import LANE_FLOOR, lse_group_update, lse_lanes_reduce, lse_merge
from .proxy_block import load_proxy_block
from .split import plan_splits


# GPU launch defaults of stage 1 (bench/sampler_tune.py measures the alternatives): warps per
# program (BLOCK = GROUP * 32 * warps logits a loop step: one group of each input to a thread),
# programs per SM that the [B, S] grid aims at, and the main loop's pipelining depth (3: loads
# two blocks ahead through shared memory; with the per-entry Gumbel-max design on an H200, 11.8 us
# at batch 1 and 54.1 us at batch 64 against 13.4 and 56.7 without pipelining).
NUM_WARPS, PROGRAMS_PER_SM, NUM_STAGES = 8, 4, 3

# Stage-1 partial layout: float32 [B, S, 8] and int32 [B, S, 3].
F_TMAX, F_TSUM, F_PMAX, F_PSUM, F_MMAX, F_MSUM, F_BEST_PRE, F_BEST_TAIL = (tl.constexpr(i) for i in range(8))
I_IDX_PRE, I_IDX_TAIL, I_BAD = (tl.constexpr(i) for i in range(3))


@triton.jit
def _lane_argmax(best, best_idx, key, idx):
    """Each lane keeps its best key and its index; a lane sees increasing indices, so a strict
    ``>`` keeps the smallest index of a tie."""
    up = key > best
    return tl.where(up, key, best), tl.where(up, idx, best_idx)


@triton.jit
def _lanes_argmax(best, best_idx):
    """The block's best key and its smallest index (-1 when every key is -inf)."""
    top = tl.max(best, axis=0)
    idx = tl.min(tl.where((best == top) & (best_idx >= 0), best_idx, 2147483647), axis=0)
    return top, tl.where(idx == 2147483647, -1, idx)


@triton.jit
def _proxy_covered_block(t_max, t_sum, p_max, p_sum, m_max, m_sum, best, idx, proxy_check, t_row, plus_ptr,
                         minus_ptr, perm_ptr, row, stride_p, stride_perm, start, end, inv_tau, coef, greedy, seed,
                         off_lo, off_hi, SHIFT: tl.constexpr, PERMUTE: tl.constexpr, EXACT_D: tl.constexpr,
                         NOISE: tl.constexpr, FAST_LOG: tl.constexpr, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    """Fold the block of entries ``start .. start + BLOCK`` (those below ``end`` when ``MASKED``)
    into the lane state of stage 1's proxy-covered loop; returns the state."""
    offs = start + tl.arange(0, BLOCK // GROUP)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    mask = offs < end if MASKED else None
    t = tl.load(t_row + offs, mask=mask, other=-float("inf") if MASKED else None).to(tl.float32)
    t_max, t_sum = lse_group_update(t_max, t_sum, t)
    p, m = load_proxy_block(plus_ptr, minus_ptr, perm_ptr, row, stride_p, stride_perm, offs, mask,
                            PERMUTE, not EXACT_D)
    diff = p - m
    proxy_check = diff * 0.0 + proxy_check
    if SHIFT:
        if MASKED:
            p = tl.where(mask, p, -float("inf"))
            m = tl.where(mask, m, -float("inf"))
        p_max, p_sum = lse_group_update(p_max, p_sum, p)
        m_max, m_sum = lse_group_update(m_max, m_sum, m)
    groups = start // GROUP + tl.arange(0, BLOCK // GROUP)
    key, drawn = part_draw(t * inv_tau + coef * diff, groups, greedy, seed, row, off_lo, off_hi, False, NOISE,
                           FAST_LOG)
    best, idx = _lane_argmax(best, idx, key, drawn)
    return t_max, t_sum, p_max, p_sum, m_max, m_sum, best, idx, proxy_check


@triton.jit
def _teacher_only_block(t_max, t_sum, best, idx, t_row, start, lo, hi, inv_tau, greedy, seed, row, off_lo, off_hi,
                        NOISE: tl.constexpr, FAST_LOG: tl.constexpr, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    """Fold the block of entries ``start .. start + BLOCK`` (those in ``[lo, hi)`` when ``MASKED``)
    into the lane state of stage 1's teacher-only loop; returns the state."""
    offs = start + tl.arange(0, BLOCK // GROUP)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    mask = (offs >= lo) & (offs < hi) if MASKED else None
    t = tl.load(t_row + offs, mask=mask, other=-float("inf") if MASKED else None).to(tl.float32)
    t_max, t_sum = lse_group_update(t_max, t_sum, t)
    groups = start // GROUP + tl.arange(0, BLOCK // GROUP)
    key, drawn = part_draw(t * inv_tau, groups, greedy, seed, row, off_lo, off_hi, True, NOISE, FAST_LOG)
    best, idx = _lane_argmax(best, idx, key, drawn)
    return t_max, t_sum, best, idx


@triton.jit
def _fused_sample_partials(
    teacher_ptr, plus_ptr, minus_ptr, perm_ptr, tau_ptr, coef_ptr, offset_ptr, fpart_ptr, ipart_ptr,
    stride_t, stride_p, stride_perm, vocab_t, vocab_p, chunk, num_splits, seed,
    HAS_PROXY: tl.constexpr, SHIFT: tl.constexpr, PERMUTE: tl.constexpr, BLOCK: tl.constexpr,
    EXACT_D: tl.constexpr = False, FAST_LOG: tl.constexpr = False,
    PDL: tl.constexpr = False, NUM_STAGES: tl.constexpr = 1, NOISE: tl.constexpr = True,
):
    wait_for_predecessor(PDL)
    row = tl.program_id(0)
    split = tl.program_id(1)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, vocab_t)
    tau = tl.load(tau_ptr + row)
    inv_tau = 1.0 / tl.where(tau == 0.0, 1.0, tau)
    greedy = tau == 0.0
    coef = tl.load(coef_ptr + row)
    off_lo, off_hi = split_offset(offset_ptr)
    t_row = teacher_ptr + row.to(tl.int64) * stride_t
    ROWS: tl.constexpr = BLOCK // GROUP  # a block is ROWS groups, one group to a thread

    # Lane-wise running state, one lane per group row of the block (no cross-thread reduction
    # inside the loops).
    floor = tl.full([ROWS], LANE_FLOOR, tl.float32)
    t_max, t_sum = floor, tl.zeros([ROWS], tl.float32)
    p_max, p_sum = floor, tl.zeros([ROWS], tl.float32)
    m_max, m_sum = floor, tl.zeros([ROWS], tl.float32)
    best, idx = tl.full([ROWS], -float("inf"), tl.float32), tl.full([ROWS], -1, tl.int32)
    proxy_check = tl.zeros([ROWS, GROUP], tl.float32)  # NaN once a proxy (or D) entry is NaN or +-inf

    # Entries the proxies cover: teacher, both proxy rows (or D); the groups' first parts. Whole
    # blocks run unmasked; the chunk's last, partial block (if any) masked.
    proxy_end = lo
    if HAS_PROXY:
        proxy_end = vocab_p
        end = tl.minimum(hi, proxy_end)
        whole_end = tl.maximum(lo, lo + (end - lo) // BLOCK * BLOCK)
        for start in tl.range(lo, whole_end, BLOCK, num_stages=NUM_STAGES):
            t_max, t_sum, p_max, p_sum, m_max, m_sum, best, idx, proxy_check = _proxy_covered_block(
                t_max, t_sum, p_max, p_sum, m_max, m_sum, best, idx, proxy_check, t_row, plus_ptr, minus_ptr,
                perm_ptr, row, stride_p, stride_perm, start, end, inv_tau, coef, greedy, seed, off_lo, off_hi,
                SHIFT, PERMUTE, EXACT_D, NOISE, FAST_LOG, BLOCK, False)
        if whole_end < end:
            t_max, t_sum, p_max, p_sum, m_max, m_sum, best, idx, proxy_check = _proxy_covered_block(
                t_max, t_sum, p_max, p_sum, m_max, m_sum, best, idx, proxy_check, t_row, plus_ptr, minus_ptr,
                perm_ptr, row, stride_p, stride_perm, whole_end, end, inv_tau, coef, greedy, seed, off_lo, off_hi,
                SHIFT, PERMUTE, EXACT_D, NOISE, FAST_LOG, BLOCK, True)

    # Entries beyond the proxies' vocabulary (the teacher's alone), from the group that holds the
    # first of them: the groups' second parts, raced apart from the first (the sampler shifts those).
    # A block holding that group's proxy entries, and the chunk's last partial block, run masked.
    tail_best, tail_idx = tl.full([ROWS], -float("inf"), tl.float32), tl.full([ROWS], -1, tl.int32)
    tail_from = tl.maximum(lo, proxy_end)
    start = tl.maximum(lo, proxy_end // GROUP * GROUP)
    if (start < tail_from) & (start < hi):
        t_max, t_sum, tail_best, tail_idx = _teacher_only_block(
            t_max, t_sum, tail_best, tail_idx, t_row, start, tail_from, hi, inv_tau, greedy, seed, row, off_lo,
            off_hi, NOISE, FAST_LOG, BLOCK, True)
        start += BLOCK
    whole_end = tl.maximum(start, start + (hi - start) // BLOCK * BLOCK)
    for block_start in tl.range(start, whole_end, BLOCK, num_stages=NUM_STAGES):
        t_max, t_sum, tail_best, tail_idx = _teacher_only_block(
            t_max, t_sum, tail_best, tail_idx, t_row, block_start, tail_from, hi, inv_tau, greedy, seed, row, off_lo,
            off_hi, NOISE, FAST_LOG, BLOCK, False)
    if whole_end < hi:
        t_max, t_sum, tail_best, tail_idx = _teacher_only_block(
            t_max, t_sum, tail_best, tail_idx, t_row, whole_end, tail_from, hi, inv_tau, greedy, seed, row, off_lo,
            off_hi, NOISE, FAST_LOG, BLOCK, True)

    t_max, t_sum = lse_lanes_reduce(t_max, t_sum)
    p_max, p_sum = lse_lanes_reduce(p_max, p_sum)
    m_max, m_sum = lse_lanes_reduce(m_max, m_sum)
    best_pre, idx_pre = _lanes_argmax(best, idx)
    best_tail, idx_tail = _lanes_argmax(tail_best, tail_idx)
    proxy_sum = tl.sum(tl.sum(proxy_check, axis=1), axis=0)
    bad = tl.where((t_sum != t_sum) | (t_max == float("inf")), 1, 0) | tl.where(proxy_sum != proxy_sum, 2, 0)

    fpart = fpart_ptr + (row * num_splits + split) * 8
    tl.store(fpart + F_TMAX, t_max)
    tl.store(fpart + F_TSUM, t_sum)
    tl.store(fpart + F_PMAX, p_max)
    tl.store(fpart + F_PSUM, p_sum)
    tl.store(fpart + F_MMAX, m_max)
    tl.store(fpart + F_MSUM, m_sum)
    tl.store(fpart + F_BEST_PRE, best_pre)
    tl.store(fpart + F_BEST_TAIL, best_tail)
    ipart = ipart_ptr + (row * num_splits + split) * 3
    tl.store(ipart + I_IDX_PRE, idx_pre)
    tl.store(ipart + I_IDX_TAIL, idx_tail)
    tl.store(ipart + I_BAD, bad)


@triton.jit
def _first_best(score_ptr, idx_ptr, s, smask):
    """Best score over the partials and its smallest index (2**31 - 1 when all are -inf)."""
    score = tl.load(score_ptr + s * 8, mask=smask, other=-float("inf"))
    idx = tl.load(idx_ptr + s * 3, mask=smask, other=-1)
    best = tl.max(score, axis=0)
    return best, tl.min(tl.where((score == best) & (idx >= 0), idx, 2147483647), axis=0)


@triton.jit
def _fused_sample_merge(
    teacher_ptr, coef_ptr, fpart_ptr, ipart_ptr, tokens_ptr, logprobs_ptr, bad_ptr, stride_t, num_splits,
    SHIFT: tl.constexpr, SPLITS: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_predecessor(PDL)
    row = tl.program_id(0)
    s = tl.arange(0, SPLITS)
    smask = s < num_splits
    fpart = fpart_ptr + row * num_splits * 8
    ipart = ipart_ptr + row * num_splits * 3
    lse_t = lse_merge(fpart + F_TMAX, fpart + F_TSUM, 8, s, smask)
    best, token = _first_best(fpart + F_BEST_PRE, ipart + I_IDX_PRE, s, smask)
    shift = 0.0
    if SHIFT:
        shift = tl.load(coef_ptr + row) * (lse_merge(fpart + F_MMAX, fpart + F_MSUM, 8, s, smask)
                                            - lse_merge(fpart + F_PMAX, fpart + F_PSUM, 8, s, smask))
    best_tail, token_tail = _first_best(fpart + F_BEST_TAIL, ipart + I_IDX_TAIL, s, smask)
    take_tail = (best_tail > best + shift) | (token == 2147483647)
    token = tl.where(take_tail, token_tail, token)
    bits = tl.load(ipart + I_BAD + s * 3, mask=smask, other=0)
    bad = tl.max(bits & 1, axis=0) | tl.max(bits & 2, axis=0)
    empty = token == 2147483647
    bad = bad | tl.where(empty, 4, 0)
    token = tl.where(empty, 0, token)
    t_tok = tl.load(teacher_ptr + row.to(tl.int64) * stride_t + token).to(tl.float32)
    tl.store(tokens_ptr + row, token.to(tl.int64))
    tl.store(logprobs_ptr + row, t_tok - lse_t)
    tl.store(bad_ptr + row, bad)


def default_block(num_warps: int) -> int:
    """Stage 1's GPU block: one group of each input to a thread."""
    return GROUP_SIZE * 32 * num_warps


def fused_sample(teacher, plus, minus, perm, tau, coef, seed: int, offset, num_splits=None, *, block=None,
                 num_warps=None, programs_per_sm=PROGRAMS_PER_SM, num_stages=NUM_STAGES, noise=True):
    """Launch the two stages. Shapes: teacher ``[B, V_T]``, plus/minus ``[B, V_P]`` or None,
    perm ``[B, V_P]`` int or None, tau/coef float32 ``[B]``, offset int64 ``[1]`` on the device.
    ``plus`` given with ``minus=None`` is the exact-D input: ``plus`` holds ``D`` (module docstring).
    ``num_splits``, ``block``, ``num_warps``, ``programs_per_sm``: stage 1's launch plan
    (:func:`adfast.kernels.split.plan_splits`; defaults above); ``num_stages``: the software
    pipelining depth of stage 1's main loop (``tl.range``: loads issued that many blocks ahead,
    through shared memory). ``noise=False`` leaves the Gumbel noise out (the draw is then greedy
    for every row, whatever ``tau``): bench/sampler_tune.py times it to measure what the noise costs.

    Returns ``(tokens int64 [B], teacher_logprobs float32 [B], bad int32 [B])``.
    """
    batch, vocab_t = teacher.shape
    has_proxy = plus is not None
    exact = has_proxy and minus is None
    vocab_p = plus.shape[1] if has_proxy else 0
    shift = has_proxy and not exact and vocab_p < vocab_t
    num_warps = num_warps or NUM_WARPS
    if block is None and launch_plan.multiprocessor_count(teacher.device) is not None:
        block = default_block(num_warps)
    plan = plan_splits(batch, vocab_t, teacher.device, num_splits, block=block, num_warps=num_warps,
                       programs_per_sm=programs_per_sm)
    dev = teacher.device
    fpart = torch.empty(batch, plan.splits, 8, device=dev, dtype=torch.float32)
    ipart = torch.empty(batch, plan.splits, 3, device=dev, dtype=torch.int32)
    tokens = torch.empty(batch, device=dev, dtype=torch.int64)
    logprobs = torch.empty(batch, device=dev, dtype=torch.float32)
    bad = torch.empty(batch, device=dev, dtype=torch.int32)
    _fused_sample_partials[(batch, plan.splits)](
        teacher, plus if has_proxy else teacher, minus if minus is not None else teacher,
        perm if perm is not None else tokens, tau, coef, offset, fpart, ipart,
        teacher.stride(0), plus.stride(0) if has_proxy else 0, perm.stride(0) if perm is not None else 0,
        vocab_t, vocab_p, plan.chunk, plan.splits, seed,
        HAS_PROXY=has_proxy, SHIFT=shift, PERMUTE=perm is not None, BLOCK=plan.block, EXACT_D=exact,
        FAST_LOG=launch_plan.multiprocessor_count(dev) is not None, NUM_STAGES=num_stages, NOISE=noise,
        num_warps=plan.num_warps, **launch_plan.dependent_launch(dev),
    )
    _fused_sample_merge[(batch,)](
        teacher, coef, fpart, ipart, tokens, logprobs, bad, teacher.stride(0), plan.splits,
        SHIFT=shift, SPLITS=triton.next_power_of_2(plan.splits), **launch_plan.dependent_launch(dev),
    )
    return tokens, logprobs, bad
