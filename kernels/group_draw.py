"""One draw per group of vocabulary entries inside Triton kernels: :func:`adfast.reference.draw_groups`'s
arithmetic, bit for bit in the interpreter.

The fused sampler cuts each row into groups of ``GROUP`` consecutive entries (and a group that
straddles the proxies' vocabulary end into its two parts). A part holding scores ``s_v`` enters a
Gumbel-max race with key ``max(s) + log(sum exp(s - max(s))) + G``, ``G`` standard Gumbel noise:
the part with the largest key wins with probability proportional to ``sum exp(s_v)``. Inside the
part, one uniform ``u`` picks entry ``v`` by inverse CDF (the first ``v`` whose running sum of
``exp(s - max(s))`` exceeds ``u`` times the total), with probability ``exp(s_v) / sum exp(s)``.
Together: ``v`` with probability ``softmax(s)_v`` over the row, exactly as Gumbel-max over every
entry, for one Gumbel variate and one uniform per group instead of one Gumbel variate per entry.
A greedy row (``tau == 0``) keys a part by ``max(s)`` and picks its first maximal entry.
"""
import triton
import triton.language as tl
from triton.language.extra import libdevice

GROUP_SIZE = 8
"""Entries per group: a thread holds one group of each input (16 bytes of a bf16 row)."""
GROUP = tl.constexpr(GROUP_SIZE)


@triton.jit
def split_offset(offset_ptr):
    """Load the int64 RNG offset from device memory and split it into uint32 low / high words."""
    offset = tl.load(offset_ptr)
    return (offset & 0xFFFFFFFF).to(tl.uint32), ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32)


@triton.jit
def group_words(seed, groups, row, off_lo, off_hi):
    """The four Philox words of each group index in ``groups`` (counter ``(group, row, off_lo,
    off_hi)``): ``r0, r1`` serve a group's proxy-covered part, ``r2, r3`` its teacher-only part."""
    c0 = groups.to(tl.uint32)
    c1 = tl.zeros_like(c0) + row.to(tl.uint32)
    c2 = tl.zeros_like(c0) + off_lo
    c3 = tl.zeros_like(c0) + off_hi
    return tl.philox(seed, c0, c1, c2, c3)


@triton.jit
def gumbel_from_word(word, FAST_OUTER_LOG: tl.constexpr):
    """``-log(-log(u))`` with ``u = (w >> 9) * 2**-23 + 2**-24`` in (0, 1).

    The inner ``E = -log(u)`` needs a log accurate relative to its result: near ``u = 1``, ``E`` is
    tiny and ``-log(E)``, the largest noise, is as accurate as ``E``. The outer ``log(E)`` only needs
    an absolute error far below the scores' spacing: with ``FAST_OUTER_LOG`` (GPU launches; the
    interpreter cannot run libdevice) it is the hardware ``lg2.approx`` times ``ln 2`` (absolute
    error below 1e-6 over ``E``'s range), so the noise differs from the CPU twin's in its last bits
    and a draw can differ only where two keys tie to within that.
    """
    u = (word >> 9).to(tl.float32) * 1.1920928955078125e-07 + 5.9604644775390625e-08
    exponential = -tl.log(u)
    if FAST_OUTER_LOG:
        return -libdevice.fast_logf(exponential)
    return -tl.log(exponential)


@triton.jit
def part_draw(s, groups, greedy, seed, row, off_lo, off_hi, TAIL: tl.constexpr, NOISE: tl.constexpr,
              FAST_LOG: tl.constexpr):
    """Key and drawn entry of each part: ``s [R, GROUP]`` float32 scores (-inf off the part) of
    groups ``groups [R]`` (vocabulary indices ``groups * GROUP + j``); ``greedy``: the row's
    ``tau == 0`` (one row per program: a uniform branch); ``TAIL``: the parts beyond the proxies'
    vocabulary (Philox words ``r2, r3`` instead of ``r0, r1``). Returns ``(key [R], index [R])``,
    key -inf for a part whose scores are all -inf (module docstring). Without ``NOISE`` every row
    is drawn greedily."""
    top = tl.max(s, axis=1)
    if greedy or not NOISE:
        first_top = tl.min(tl.where(s == top[:, None], tl.arange(0, GROUP)[None, :], GROUP), axis=1)
        key, index = top, groups * GROUP + first_top
    else:
        r0, r1, r2, r3 = group_words(seed, groups, row, off_lo, off_hi)
        gumbel_word, pick_word = (r2, r3) if TAIL else (r0, r1)
        ref = tl.where(top == -float("inf"), 0.0, top)
        # exp as the bare ex2.approx (tl.exp adds a denormal-range fix-up that no term needs here)
        running = tl.cumsum(tl.math.exp2((s - ref[:, None]) * 1.4426950408889634), axis=1)  # sequential
        total = tl.max(running, axis=1)  # the last running sum: the terms are >= 0
        target = (pick_word >> 9).to(tl.float32) * 1.1920928955078125e-07 * total  # in [0, total)
        below = tl.sum(tl.where(running <= target[:, None], 1, 0), axis=1)
        if FAST_LOG:
            log_total = libdevice.fast_logf(total)
        else:
            log_total = tl.log(total)
        key, index = top + log_total + gumbel_from_word(gumbel_word, FAST_LOG), groups * GROUP + below
    return key, index
