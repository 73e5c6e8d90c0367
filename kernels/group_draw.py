"""One draw per group of vocabulary entries inside Triton kernels: :func:`adfast.reference.draw_groups`'s
arithmetic, bit for bit in the interpreter.

The fused sampler cuts each row into groups of ``GROUP`` consecutive entries (and a group that
straddles the proxies' vocabulary end into its two parts). A part holding scores ``s_v`` enters a
Gumbel-max race with key ``max(s) + log(sum exp(s - max(s))) + G``, ``G`` standard Gumbel noise:
the part with the largest key wins with probability proportional to ``sum exp(s_v)``. Inside the
winning part, one uniform ``u`` picks entry ``v`` by inverse CDF (the first ``v`` whose running sum
of ``exp(s - max(s))`` exceeds ``u`` times the total), with probability ``exp(s_v) / sum exp(s)``.
Together: ``v`` with probability ``softmax(s)_v`` over the row, exactly as Gumbel-max over every
entry, for one Gumbel variate per group and one uniform per row instead of a Gumbel variate per
entry. The race runs over the whole row (:func:`part_keys`); the pick, for the winner alone, after
it (:func:`part_pick`). A greedy row (``tau == 0``) keys a part by ``max(s)`` and picks its first
maximal entry.

Units. The kernels hold a row's scores as ``s' = tau * s`` (``tau`` 1 for a greedy row) and
exponentiate with base 2: ``exp(s - max s) = 2 ** (s' * scale - max s' * scale)``, ``scale =
log2(e) / tau``, one fused multiply-add. A sampled part's key is ``log2(e)`` times the key above,
``max s' * scale + log2(sum) - log2(-log(u))``; a greedy part's key is ``max s'``.
"""
import triton
import triton.language as tl
from triton.language.extra import libdevice

GROUP_SIZE = 8
"""Entries per group: a thread holds one group of each input (16 bytes of a bf16 row)."""
GROUP = tl.constexpr(GROUP_SIZE)
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def split_offset(offset_ptr):
    """Load the int64 RNG offset from device memory and split it into uint32 low / high words."""
    offset = tl.load(offset_ptr)
    return (offset & 0xFFFFFFFF).to(tl.uint32), ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32)


@triton.jit
def row_scaling(tau, coef):
    """A row's ``(greedy, a, scale)`` from its ``tau`` and ``coef``: scores ``s' = t + a * diff``
    with ``a = coef * tau`` (``coef`` for a greedy row, ``tau == 0``), exponent scale
    ``log2(e) / tau`` (``log2(e)`` for a greedy row)."""
    greedy = tau == 0.0
    tau_or_one = tl.where(greedy, 1.0, tau)
    return greedy, coef * tau_or_one, (1.0 / tau_or_one) * LOG2E


@triton.jit
def group_words(seed, groups, row, off_lo, off_hi):
    """The four Philox words of each group index in ``groups`` (counter ``(group, row, off_lo,
    off_hi)``): ``r0, r1`` serve a group's proxy-covered part (Gumbel variate, pick), ``r2, r3``
    its teacher-only part."""
    c0 = groups.to(tl.uint32)
    c1 = tl.zeros_like(c0) + row.to(tl.uint32)
    c2 = tl.zeros_like(c0) + off_lo
    c3 = tl.zeros_like(c0) + off_hi
    return tl.philox(seed, c0, c1, c2, c3)


@triton.jit
def _log2(x, FAST_LOG: tl.constexpr):
    """``log2(x)``: the hardware ``lg2.approx`` with ``FAST_LOG`` (GPU launches), else ``log(x) *
    log2(e)`` (the interpreter, as the CPU twin computes it)."""
    if FAST_LOG:
        return libdevice.fast_log2f(x)
    return tl.log(x) * LOG2E


@triton.jit
def gumbel2_from_word(word, FAST_LOG: tl.constexpr):
    """``log2(e)`` times standard Gumbel noise: ``-log2(-log(u))``, ``u = (w >> 9) * 2**-23 + 2**-24``.

    The inner ``E = -log(u)`` needs a log accurate relative to its result: near ``u = 1``, ``E`` is
    tiny and ``-log2(E)``, the largest noise, is as accurate as ``E``. The outer log only needs an
    absolute error far below the scores' spacing: with ``FAST_LOG`` it is the hardware
    ``lg2.approx`` (absolute error below 1e-6 over ``E``'s range), so the noise differs from the
    CPU twin's in its last bits and a draw can differ only where two keys tie to within that.
    """
    u = (word >> 9).to(tl.float32) * 1.1920928955078125e-07 + 5.9604644775390625e-08
    return -_log2(-tl.log(u), FAST_LOG)


@triton.jit
def part_weights(s, top, scale):
    """``2 ** (s' * scale - max s' * scale)`` per entry of ``s`` with ``top`` its max, broadcast to
    it (a part of -inf scores has max -inf: it gets weights 0). The bare ``ex2.approx``
    (``tl.exp`` adds a denormal-range fix-up that no term needs here)."""
    ref = tl.where(top == -float("inf"), 0.0, top)
    return tl.math.exp2(tl.fma(s, scale, -(ref * scale)))


@triton.jit
def _tree_sum(w):
    """``((w0 + w1) + (w2 + w3)) + ((w4 + w5) + (w6 + w7))`` per row of ``w [R, 8]``: an order the
    compiled kernel, the interpreter and the CPU twin share."""
    rows: tl.constexpr = w.shape[0]
    a, b = tl.split(tl.reshape(w, [rows, 4, 2]))
    a, b = tl.split(tl.reshape(a + b, [rows, 2, 2]))
    a, b = tl.split(a + b)
    return a + b


@triton.jit
def part_keys(s, groups, greedy, scale, seed, row, off_lo, off_hi, TAIL: tl.constexpr, NOISE: tl.constexpr,
              FAST_LOG: tl.constexpr):
    """Race key of each part: ``s [R, GROUP]`` float32 scores ``s'`` (-inf off the part) of groups
    ``groups [R]``; ``greedy``: the row's ``tau == 0`` (one row per program: a uniform branch);
    ``TAIL``: the parts beyond the proxies' vocabulary (Philox word ``r2`` instead of ``r0``).
    Returns ``key [R]`` (module docstring's units; -inf for a part whose scores are all -inf).
    Without ``NOISE`` every row is keyed greedily."""
    top = tl.max(s, axis=1)
    if greedy or not NOISE:
        key = top
    else:
        r0, r1, r2, r3 = group_words(seed, groups, row, off_lo, off_hi)
        total = _tree_sum(part_weights(s, top[:, None], scale))
        key = tl.fma(top, scale, _log2(total, FAST_LOG)) + gumbel2_from_word(r2 if TAIL else r0, FAST_LOG)
    return key


@triton.jit
def part_pick(s, group, greedy, scale, seed, row, off_lo, off_hi, tail):
    """The entry the winning part gives up: ``s [GROUP]`` its scores ``s'`` (-inf off the part,
    not all -inf), ``group`` its group index, ``tail``: whether it is a teacher-only part (pick word
    ``r3``, else ``r1``). By inverse CDF over the running sums (in order) of :func:`part_weights`
    with one uniform; a greedy row takes the first maximal entry. Returns the vocabulary index."""
    top = tl.max(s, axis=0)
    entries = tl.arange(0, GROUP)
    if greedy:
        below = tl.min(tl.where(s == top, entries, GROUP), axis=0)
    else:
        r0, r1, r2, r3 = group_words(seed, group, row, off_lo, off_hi)
        running = tl.cumsum(part_weights(s, top, scale), axis=0)
        total = tl.max(running, axis=0)  # the last running sum: the terms are >= 0
        target = (tl.where(tail, r3, r1) >> 9).to(tl.float32) * 1.1920928955078125e-07 * total  # [0, total)
        below = tl.sum(tl.where(running <= target, 1, 0), axis=0)
    return group * GROUP + below
