"""Fused antidistillation sampling: one read of the teacher and both proxy rows, one token out.

For row ``b`` the kernel draws ``x_b ~ softmax(a_b)`` with

    a_b[v] = log_softmax(t_b)[v] / tau_b + lam_b * D_b[v]
    D_b[v] = (log_softmax(p_b)[v] - log_softmax(m_b)[v]) / (2 eps)   for v < V_P, else 0

from the scores ``s'_b[v] = t_b[v] + a_b * (p_b[v] - m_b[v])`` (``a_b = tau_b * coef_b``,
``coef_b = lam_b / (2 eps)`` times the row's sign in permutation mode; ``softmax(s'_b / tau_b) =
softmax(a_b)``), by a Gumbel-max race over groups of 8 consecutive entries
(:mod:`adfast.kernels.group_draw`: each group's part enters with its log-sum-exp plus Philox
Gumbel noise; the winning part gives up one entry by inverse CDF with one Philox uniform), exact
in distribution and bit for bit the CPU twin's (:func:`adfast.reference.draw_groups`) in the
interpreter. ``tau_b == 0`` is greedy (``a_b = coef_b``): ``argmax(log_softmax(t) + lam D)``, the
first maximal entry.

Exact-D input (``minus`` is None, ``EXACT_D``): ``plus`` holds ``D [B, V_P]`` itself, the exact
log-softmax tangent (already normalised), and the scores are ``s'_b[v] = t_b[v] + a_b * D_b[v]``
with ``coef_b = lam_b`` (times the row's sign in permutation mode, ``D`` read at ``perm[v]``): no
minus row is read and no proxy log-sum-exp is computed.

Normalisers. A constant added to a whole row cannot change the draw, so the scores use raw
logits and skip the teacher's ``1/tau * lse(t)`` and, when ``V_P == V_T``, both proxy
log-sum-exps. When the proxy vocabulary is shorter (the teacher's head is padded further), the
proxy normalisers shift only the prefix ``v < V_P`` by ``coef * (lse(m) - lse(p))``: the kernel
then sums both proxies' exponentials in the same pass, races the prefix's parts and the tail's
(``v >= V_P``; a group straddling ``V_P`` is two parts) apart and compares the two winners after
the shift (``SHIFT``). An exact ``D`` needs no shift (it is normalised already), so ``SHIFT`` is
off for it whatever ``V_P``. The teacher's log-sum-exp is always computed (same pass) because the
kernel also returns ``log_softmax(t_b)[x_b]``, the teacher's unadjusted log-probability of the
drawn token. These sums take ``2 ** (x log2(e) - 16)`` per entry, against a fixed reference
instead of a running max (:func:`adfast.kernels.online_lse.ref_sum_update`): exact while the
total stays in float32's accurate range, which holds for a row whose largest logit lies between
about -30 and 88; stage 2 redoes the log-sum-exp of a row outside it (or holding NaN / +inf) with
a pass relative to its max (:func:`adfast.kernels.online_lse.row_lse`), so every row gets it
exactly and a typical one costs no max. The reported ``D`` itself comes from
:mod:`adfast.kernels.adjusted_logits`, where all normalisers are applied.

Work split. Stage 1 runs a ``[B, S]`` grid, each program streaming one vocabulary chunk and
writing a partial (the sums of t, p, m; the best prefix and tail keys and their groups; the
proxies' bad-input bit); stage 2 runs ``[B]`` programs that merge the S partials, decide between
the prefix's and the tail's winner, and pick the token inside the winning group (it reads that
group's 8 entries of each input again, and one teacher logit). S is chosen so the grid fills the
GPU even at batch 1. Ties go to the smallest index. A loop step reads ``BLOCK / 8`` groups, one
group of each input to a thread (16 bytes of a bf16 row), and every thread keeps its own running
state (a sum per input; its best key and group; a NaN sentinel ``(p - m) * 0`` for the proxies'
bad-input bit); the threads are folded once after the loop: the loop body has no cross-thread
reduction and no barrier. The entries the proxies cover and the teacher-only tail run as two
loops, and the first runs its whole blocks unmasked. A greedy row (one row per program) branches
past the noise. With the GPU's block (a lane per group of a 256-group block) one Philox call
serves a lane's groups in four consecutive blocks (:func:`adfast.kernels.group_draw.shared_gumbel_words`;
the call sits in a branch taken every fourth block). Per vocabulary entry (a logit of each of the
three inputs) that leaves about 35 SASS instructions executed on sm_90 for bf16 inputs (280.5 per
8 entries on average, 324 in the loop's listing: ``python -m adfast.compile_check``): per input a
conversion, a fused multiply-add, an exponential and an add; per entry the difference, the score,
the part's max, the score's distance to it, scaled (:func:`adfast.kernels.group_draw.part_weights`:
exact whatever the temperature), its exponential and the sum; per group of 8 a quarter of a Philox call and one Gumbel
variate. With 4.25 special-function operations an entry (exponentials and logs) that is about as
much work for the special-function units (16 lanes a cycle an SM) as for instruction issue. The
designs before cost 52 (the pick inside every group, running maxes, a Philox call per group) and
84 (a Gumbel variate per entry); Nsight Compute on an H200 at batch 64 showed the latter's
schedulers issuing in 53% of cycles, its warps waiting
mostly on their loads (``bench/results/sampler-ncu-B64-details.txt``). The main loop is
software-pipelined (``NUM_STAGES``: loads issued two blocks ahead, through shared memory).

Bad-input bits per row: 1 = teacher NaN or +inf, 2 = proxy (or exact ``D``) NaN or +-inf,
4 = every score -inf.
"""
import torch
import triton
import triton.language as tl

from . import split as launch_plan
from .group_draw import (GROUP, GROUP_SIZE, WORD_RUN, part_keys, part_pick, row_scaling, shared_gumbel_words,
                         split_offset, word_k)
from .launch_order import wait_for_predecessor
from .online_lse import ref_sum_in_range, ref_sum_lse, ref_sum_update, row_lse
from .proxy_block import load_proxy_block
from .split import plan_splits


# GPU launch defaults of stage 1 (bench/sampler_tune.py measures the alternatives): warps per
# program (BLOCK = GROUP * 32 * warps logits a loop step: one group of each input to a thread),
# programs per SM that the [B, S] grid aims at, and the main loop's pipelining depth (3: loads
# two blocks ahead through shared memory; with the per-entry Gumbel-max design on an H200, 11.8 us
# at batch 1 and 54.1 us at batch 64 against 13.4 and 56.7 without pipelining).
NUM_WARPS, PROGRAMS_PER_SM, NUM_STAGES = 8, 4, 3

# Stage-1 partial layout: float32 [B, S, 5] and int32 [B, S, 3].
F_TSUM, F_PSUM, F_MSUM, F_BEST_PRE, F_BEST_TAIL = (tl.constexpr(i) for i in range(5))
I_GROUP_PRE, I_GROUP_TAIL, I_BAD = (tl.constexpr(i) for i in range(3))
NO_GROUP = tl.constexpr(2147483647)
EXACT_LSE_BLOCK = tl.constexpr(2048)  # stage 2's fallback pass over a row (rows out of SUM range)


@triton.jit
def _lane_argmax(best, best_group, key, groups):
    """Each lane keeps its best key and its group; a lane sees increasing groups, so a strict ``>``
    keeps the smallest group of a tie."""
    up = key > best
    return tl.where(up, key, best), tl.where(up, groups, best_group)


@triton.jit
def _lanes_argmax(best, best_group):
    """The block's best key and its smallest group (NO_GROUP when every key is -inf)."""
    top = tl.max(best, axis=0)
    group = tl.min(tl.where((best == top) & (best_group >= 0), best_group, NO_GROUP), axis=0)
    return top, group


@triton.jit
def _proxy_covered_block(t_sum, p_sum, m_sum, best, best_group, proxy_check, t_row, plus_ptr, minus_ptr, perm_ptr,
                         row, stride_p, stride_perm, start, end, a, scale, greedy, seed, off_lo, off_hi, shared_word,
                         SHIFT: tl.constexpr, PERMUTE: tl.constexpr, EXACT_D: tl.constexpr, NOISE: tl.constexpr,
                         FAST_LOG: tl.constexpr, BLOCK: tl.constexpr, MASKED: tl.constexpr,
                         SHARED_WORD: tl.constexpr):
    """Fold the block of entries ``start .. start + BLOCK`` (those below ``end`` when ``MASKED``)
    into the lane state of stage 1's proxy-covered loop; returns the state. ``SHARED_WORD``: the
    lanes' Gumbel words are ``shared_word`` (from the loop's call every fourth block)."""
    offs = start + tl.arange(0, BLOCK // GROUP)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    mask = offs < end if MASKED else None
    t = tl.load(t_row + offs, mask=mask, other=-float("inf") if MASKED else None).to(tl.float32)
    t_sum = ref_sum_update(t_sum, t)
    p, m = load_proxy_block(plus_ptr, minus_ptr, perm_ptr, row, stride_p, stride_perm, offs, mask,
                            PERMUTE, not EXACT_D)
    diff = p - m
    proxy_check = diff * 0.0 + proxy_check
    if SHIFT:
        if MASKED:
            p = tl.where(mask, p, -float("inf"))
            m = tl.where(mask, m, -float("inf"))
        p_sum = ref_sum_update(p_sum, p)
        m_sum = ref_sum_update(m_sum, m)
    groups = start // GROUP + tl.arange(0, BLOCK // GROUP)
    key = part_keys(tl.fma(a, diff, t), groups, greedy, scale, seed, row, off_lo, off_hi, shared_word, False,
                    SHARED_WORD, NOISE, FAST_LOG)
    best, best_group = _lane_argmax(best, best_group, key, groups)
    return t_sum, p_sum, m_sum, best, best_group, proxy_check


@triton.jit
def _teacher_only_block(t_sum, best, best_group, t_row, start, lo, hi, scale, greedy, seed, row, off_lo, off_hi,
                        NOISE: tl.constexpr, FAST_LOG: tl.constexpr, BLOCK: tl.constexpr, MASKED: tl.constexpr,
                        RACE: tl.constexpr):
    """Fold the block of entries ``start .. start + BLOCK`` (those in ``[lo, hi)`` when ``MASKED``)
    into the lane state of stage 1's teacher-only loop (without ``RACE``, into the teacher's sum
    alone); returns the state."""
    offs = start + tl.arange(0, BLOCK // GROUP)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    mask = (offs >= lo) & (offs < hi) if MASKED else None
    t = tl.load(t_row + offs, mask=mask, other=-float("inf") if MASKED else None).to(tl.float32)
    t_sum = ref_sum_update(t_sum, t)
    if RACE:
        groups = start // GROUP + tl.arange(0, BLOCK // GROUP)
        key = part_keys(t, groups, greedy, scale, seed, row, off_lo, off_hi, groups, True, False, NOISE, FAST_LOG)
        best, best_group = _lane_argmax(best, best_group, key, groups)
    return t_sum, best, best_group


@triton.jit
def _fused_sample_partials(
    teacher_ptr, plus_ptr, minus_ptr, perm_ptr, tau_ptr, coef_ptr, offset_ptr, fpart_ptr, ipart_ptr,
    stride_t, stride_p, stride_perm, vocab_t, vocab_p, chunk, num_splits, seed,
    HAS_PROXY: tl.constexpr, SHIFT: tl.constexpr, PERMUTE: tl.constexpr, BLOCK: tl.constexpr,
    EXACT_D: tl.constexpr = False, FAST_LOG: tl.constexpr = False,
    PDL: tl.constexpr = False, NUM_STAGES: tl.constexpr = 1, NOISE: tl.constexpr = True,
    DRAW_TAIL: tl.constexpr = True,
):
    wait_for_predecessor(PDL)
    row = tl.program_id(0)
    split = tl.program_id(1)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, vocab_t)
    greedy, a, scale = row_scaling(tl.load(tau_ptr + row), tl.load(coef_ptr + row))
    off_lo, off_hi = split_offset(offset_ptr)
    t_row = teacher_ptr + row.to(tl.int64) * stride_t
    ROWS: tl.constexpr = BLOCK // GROUP  # a block is ROWS groups, one group to a thread

    # Lane-wise running state, one lane per group row of the block (no cross-thread reduction
    # inside the loops).
    t_sum = tl.zeros([ROWS], tl.float32)
    p_sum = tl.zeros([ROWS], tl.float32)
    m_sum = tl.zeros([ROWS], tl.float32)
    best, best_group = tl.full([ROWS], -float("inf"), tl.float32), tl.full([ROWS], -1, tl.int32)
    proxy_check = tl.zeros([ROWS, GROUP], tl.float32)  # NaN once a proxy (or D) entry is NaN or +-inf

    # Entries the proxies cover: teacher, both proxy rows (or D); the groups' first parts. Whole
    # blocks run unmasked; the chunk's last, partial block (if any) masked.
    proxy_end = lo
    if HAS_PROXY:
        proxy_end = vocab_p
        end = tl.minimum(hi, proxy_end)
        whole_end = tl.maximum(lo, lo + (end - lo) // BLOCK * BLOCK)
        # With a lane per WORD_RUN group, one Philox call serves a lane's next four blocks.
        SHARED: tl.constexpr = ROWS == WORD_RUN
        w0 = tl.zeros([ROWS], tl.uint32)
        w1, w2, w3 = w0, w0, w0
        for start in tl.range(lo, whole_end, BLOCK, num_stages=NUM_STAGES):
            word = w0
            if SHARED:
                block = start // BLOCK
                k = block % 4
                if ((k == 0) | (start == lo)) & (not greedy):
                    w0, w1, w2, w3 = shared_gumbel_words(seed, block, row, off_lo, off_hi, ROWS)
                word = word_k(k, w0, w1, w2, w3)
            t_sum, p_sum, m_sum, best, best_group, proxy_check = _proxy_covered_block(
                t_sum, p_sum, m_sum, best, best_group, proxy_check, t_row, plus_ptr, minus_ptr, perm_ptr, row,
                stride_p, stride_perm, start, end, a, scale, greedy, seed, off_lo, off_hi, word,
                SHIFT, PERMUTE, EXACT_D, NOISE, FAST_LOG, BLOCK, False, SHARED)
        if whole_end < end:
            t_sum, p_sum, m_sum, best, best_group, proxy_check = _proxy_covered_block(
                t_sum, p_sum, m_sum, best, best_group, proxy_check, t_row, plus_ptr, minus_ptr, perm_ptr, row,
                stride_p, stride_perm, whole_end, end, a, scale, greedy, seed, off_lo, off_hi, w0,
                SHIFT, PERMUTE, EXACT_D, NOISE, FAST_LOG, BLOCK, True, False)

    # Entries beyond the proxies' vocabulary (the teacher's alone), from the group that holds the
    # first of them: the groups' second parts, raced apart from the first (the sampler shifts those;
    # without DRAW_TAIL they only join the teacher's sum). A block holding that group's proxy
    # entries, and the chunk's last partial block, run masked.
    tail_best, tail_group = tl.full([ROWS], -float("inf"), tl.float32), tl.full([ROWS], -1, tl.int32)
    tail_from = tl.maximum(lo, proxy_end)
    start = tl.maximum(lo, proxy_end // GROUP * GROUP)
    if (start < tail_from) & (start < hi):
        t_sum, tail_best, tail_group = _teacher_only_block(
            t_sum, tail_best, tail_group, t_row, start, tail_from, hi, scale, greedy, seed, row, off_lo, off_hi,
            NOISE, FAST_LOG, BLOCK, True, DRAW_TAIL)
        start += BLOCK
    whole_end = tl.maximum(start, start + (hi - start) // BLOCK * BLOCK)
    for block_start in tl.range(start, whole_end, BLOCK, num_stages=NUM_STAGES):
        t_sum, tail_best, tail_group = _teacher_only_block(
            t_sum, tail_best, tail_group, t_row, block_start, tail_from, hi, scale, greedy, seed, row, off_lo,
            off_hi, NOISE, FAST_LOG, BLOCK, False, DRAW_TAIL)
    if whole_end < hi:
        t_sum, tail_best, tail_group = _teacher_only_block(
            t_sum, tail_best, tail_group, t_row, whole_end, tail_from, hi, scale, greedy, seed, row, off_lo, off_hi,
            NOISE, FAST_LOG, BLOCK, True, DRAW_TAIL)

    best_pre, group_pre = _lanes_argmax(best, best_group)
    best_tail, group_tail = _lanes_argmax(tail_best, tail_group)
    proxy_sum = tl.sum(tl.sum(proxy_check, axis=1), axis=0)

    fpart = fpart_ptr + (row * num_splits + split) * 5
    tl.store(fpart + F_TSUM, tl.sum(t_sum, axis=0))
    tl.store(fpart + F_PSUM, tl.sum(p_sum, axis=0))
    tl.store(fpart + F_MSUM, tl.sum(m_sum, axis=0))
    tl.store(fpart + F_BEST_PRE, best_pre)
    tl.store(fpart + F_BEST_TAIL, best_tail)
    ipart = ipart_ptr + (row * num_splits + split) * 3
    tl.store(ipart + I_GROUP_PRE, group_pre)
    tl.store(ipart + I_GROUP_TAIL, group_tail)
    tl.store(ipart + I_BAD, tl.where(proxy_sum != proxy_sum, 2, 0))


@triton.jit
def _first_best(score_ptr, group_ptr, s, smask):
    """Best key over the partials and its smallest group (NO_GROUP when all are -inf)."""
    score = tl.load(score_ptr + s * 5, mask=smask, other=-float("inf"))
    group = tl.load(group_ptr + s * 3, mask=smask, other=NO_GROUP)
    best = tl.max(score, axis=0)
    return best, tl.min(tl.where(score == best, group, NO_GROUP), axis=0)


@triton.jit
def _lse(sum_ptr, s, smask, row_ptr, n):
    """``(lse, bad)`` of a row from its partials' fixed-reference sums, or from a pass over the row
    (:func:`adfast.kernels.online_lse.row_lse`) where their total is out of range."""
    total = tl.sum(tl.load(sum_ptr + s * 5, mask=smask, other=0.0), axis=0)
    lse = ref_sum_lse(total)
    bad = tl.zeros([], tl.int1)  # a total in range is finite: no NaN or +inf in the row
    if not ref_sum_in_range(total):
        lse, bad = row_lse(row_ptr, n, EXACT_LSE_BLOCK)
    return lse, bad


@triton.jit
def _fused_sample_merge(
    teacher_ptr, plus_ptr, minus_ptr, perm_ptr, tau_ptr, coef_ptr, offset_ptr, fpart_ptr, ipart_ptr, tokens_ptr,
    logprobs_ptr, bad_ptr, stride_t, stride_p, stride_perm, vocab_t, vocab_p, num_splits, seed,
    HAS_PROXY: tl.constexpr, SHIFT: tl.constexpr, PERMUTE: tl.constexpr, EXACT_D: tl.constexpr,
    SPLITS: tl.constexpr, NOISE: tl.constexpr = True, PDL: tl.constexpr = False,
):
    wait_for_predecessor(PDL)
    row = tl.program_id(0)
    s = tl.arange(0, SPLITS)
    smask = s < num_splits
    fpart = fpart_ptr + row * num_splits * 5
    ipart = ipart_ptr + row * num_splits * 3
    t_row = teacher_ptr + row.to(tl.int64) * stride_t
    greedy, a, scale = row_scaling(tl.load(tau_ptr + row), tl.load(coef_ptr + row))
    greedy = greedy | (not NOISE)
    lse_t, bad_t = _lse(fpart + F_TSUM, s, smask, t_row, vocab_t)
    best, group = _first_best(fpart + F_BEST_PRE, ipart + I_GROUP_PRE, s, smask)
    best_tail, group_tail = _first_best(fpart + F_BEST_TAIL, ipart + I_GROUP_TAIL, s, smask)
    shift = 0.0
    if SHIFT:
        lse_p, _ = _lse(fpart + F_PSUM, s, smask, plus_ptr + row.to(tl.int64) * stride_p, vocab_p)
        lse_m, _ = _lse(fpart + F_MSUM, s, smask, minus_ptr + row.to(tl.int64) * stride_p, vocab_p)
        # in the keys' units: a sampled row's keys are log2(e) times the scores'
        shift = tl.load(coef_ptr + row) * (lse_m - lse_p) * tl.where(greedy, 1.0, 1.4426950408889634)
    tail = (best_tail > best + shift) | (group == NO_GROUP)
    group = tl.where(tail, group_tail, group)
    bits = tl.load(ipart + I_BAD + s * 3, mask=smask, other=0)
    bad = tl.where(bad_t, 1, 0) | tl.max(bits & 2, axis=0)
    empty = group == NO_GROUP
    token = 0
    if empty:
        bad = bad | 4
    else:
        offs = group * GROUP + tl.arange(0, GROUP)
        prefix = offs < vocab_p
        part = tl.where(tail, (~prefix) & (offs < vocab_t), prefix)
        scores = tl.load(t_row + offs, mask=part, other=-float("inf")).to(tl.float32)
        if HAS_PROXY:  # a tail part reads no proxy entry: its scores stay t (fma(a, 0, t) == t)
            p, m = load_proxy_block(plus_ptr, minus_ptr, perm_ptr, row, stride_p, stride_perm, offs,
                                    part & prefix, PERMUTE, not EXACT_D)
            scores = tl.fma(a, p - m, scores)
        off_lo, off_hi = split_offset(offset_ptr)
        token = part_pick(scores, group, greedy, scale, seed, row, off_lo, off_hi, tail)
    t_tok = tl.load(t_row + token).to(tl.float32)
    tl.store(tokens_ptr + row, token.to(tl.int64))
    tl.store(logprobs_ptr + row, t_tok - lse_t)
    tl.store(bad_ptr + row, bad)


def default_block(num_warps: int) -> int:
    """Stage 1's GPU block: one group of each input to a thread."""
    return GROUP_SIZE * 32 * num_warps


def fused_sample(teacher, plus, minus, perm, tau, coef, seed: int, offset, num_splits=None, *,
                 proxy_vocab_only=False, block=None, num_warps=None, programs_per_sm=PROGRAMS_PER_SM,
                 num_stages=NUM_STAGES, noise=True):
    """Launch the two stages. Shapes: teacher ``[B, V_T]``, plus/minus ``[B, V_P]`` or None,
    perm ``[B, V_P]`` int or None, tau/coef float32 ``[B]``, offset int64 ``[1]`` on the device.
    ``plus`` given with ``minus=None`` is the exact-D input: ``plus`` holds ``D`` (module docstring).
    ``proxy_vocab_only`` (with proxies): draw only ids below ``V_P``; the teacher-only tail joins
    the teacher's log-sum-exp but not the race, and no proxy log-sum-exp is needed.
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
    draw_tail = not (has_proxy and proxy_vocab_only)
    shift = has_proxy and not exact and vocab_p < vocab_t and draw_tail
    num_warps = num_warps or NUM_WARPS
    if block is None and launch_plan.multiprocessor_count(teacher.device) is not None:
        block = default_block(num_warps)
    plan = plan_splits(batch, vocab_t, teacher.device, num_splits, block=block, num_warps=num_warps,
                       programs_per_sm=programs_per_sm)
    dev = teacher.device
    fpart = torch.empty(batch, plan.splits, 5, device=dev, dtype=torch.float32)
    ipart = torch.empty(batch, plan.splits, 3, device=dev, dtype=torch.int32)
    tokens = torch.empty(batch, device=dev, dtype=torch.int64)
    logprobs = torch.empty(batch, device=dev, dtype=torch.float32)
    bad = torch.empty(batch, device=dev, dtype=torch.int32)
    # what both stages read (absent inputs stand in as pointers never dereferenced)
    inputs = (teacher, plus if has_proxy else teacher, minus if minus is not None else teacher,
              perm if perm is not None else tokens, tau, coef, offset, fpart, ipart)
    strides = (teacher.stride(0), plus.stride(0) if has_proxy else 0, perm.stride(0) if perm is not None else 0)
    flags = dict(HAS_PROXY=has_proxy, SHIFT=shift, PERMUTE=perm is not None, EXACT_D=exact, NOISE=noise,
                 **launch_plan.dependent_launch(dev))
    _fused_sample_partials[(batch, plan.splits)](
        *inputs, *strides, vocab_t, vocab_p, plan.chunk, plan.splits, seed, BLOCK=plan.block,
        FAST_LOG=launch_plan.multiprocessor_count(dev) is not None, NUM_STAGES=num_stages, DRAW_TAIL=draw_tail,
        num_warps=plan.num_warps, **flags,
    )
    _fused_sample_merge[(batch,)](
        *inputs, tokens, logprobs, bad, *strides, vocab_t, vocab_p, plan.splits, seed,
        SPLITS=triton.next_power_of_2(plan.splits), **flags,
    )
    return tokens, logprobs, bad
