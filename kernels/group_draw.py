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
exponentiate with base 2: ``exp(s - max s) = 2 ** ((s' - max s') * scale)``, ``scale = log2(e) /
tau``. A sampled part's key is ``log2(e)`` times the key above,
``max s' * scale + log2(sum) - log2(-log(u))``; a greedy part's key is ``max s'``.
"""
import triton
import triton.language as tl
from triton.language.extra import libdevice

GROUP_SIZE = 8
"""Entries per group: a thread holds one group of each input (16 bytes of a bf16 row)."""
GROUP = tl.constexpr(GROUP_SIZE)
WORD_RUN = tl.constexpr(256)
"""Groups whose Gumbel words come from one Philox call spread over four runs of this many groups
(:func:`prefix_gumbel_word`): a loop over blocks of ``WORD_RUN`` groups calls Philox every fourth
block."""
SECOND_STREAM = tl.constexpr(1 << 30)
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
def _philox(seed, c0, row, off_lo, off_hi):
    """The four Philox words of counters ``(c0, row, off_lo, off_hi)``, ``c0`` any integer tensor."""
    c0 = c0.to(tl.uint32)
    c1 = tl.zeros_like(c0) + row.to(tl.uint32)
    c2 = tl.zeros_like(c0) + off_lo
    c3 = tl.zeros_like(c0) + off_hi
    return tl.philox(seed, c0, c1, c2, c3)


@triton.jit
def shared_gumbel_words(seed, block, row, off_lo, off_hi, ROWS: tl.constexpr):
    """The four words of the Philox call that serves lane ``l``'s groups in blocks ``4 (block //
    4) .. + 3`` of ``WORD_RUN * GROUP`` entries (``ROWS == WORD_RUN``: lane ``l`` holds group
    ``block * WORD_RUN + l``), word ``block % 4`` for block ``block``: one call per four blocks of a
    loop instead of one per block."""
    return _philox(seed, (block // 4) * ROWS + tl.arange(0, ROWS), row, off_lo, off_hi)


@triton.jit
def word_k(k, r0, r1, r2, r3):
    """Word ``k`` (0 to 3, a scalar or per lane) of a Philox call's four."""
    return tl.where(k == 0, r0, tl.where(k == 1, r1, tl.where(k == 2, r2, r3)))


@triton.jit
def prefix_gumbel_word(seed, groups, row, off_lo, off_hi):
    """The Gumbel word of each proxy-covered part, by the layout of :mod:`adfast.philox`: call
    ``(g // (4 WORD_RUN)) WORD_RUN + g % WORD_RUN``, word ``(g // WORD_RUN) % 4``."""
    r0, r1, r2, r3 = _philox(seed, (groups // (4 * WORD_RUN)) * WORD_RUN + groups % WORD_RUN, row, off_lo, off_hi)
    return word_k((groups // WORD_RUN) % 4, r0, r1, r2, r3)


@triton.jit
def second_words(seed, groups, row, off_lo, off_hi):
    """Words on the second stream (counter ``(g, row | SECOND_STREAM, ...)``): ``r0`` the Gumbel
    word of a teacher-only part, ``r1`` / ``r2`` the pick of a group's proxy-covered / teacher-only
    part."""
    r0, r1, r2, _ = _philox(seed, groups, row | SECOND_STREAM, off_lo, off_hi)
    return r0, r1, r2


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
    """``2 ** ((s' - max s') * scale)`` per entry of ``s`` with ``top`` its max, broadcast to it (a
    part of -inf scores has max -inf: it gets weights 0). The difference comes first, so the
    largest entry's weight is exactly 1 and every weight lies in [0, 1] whatever the scale: the
    fused form ``fma(s', scale, -(max s' * scale))`` would leave the rounding error of ``max s' *
    scale`` in every exponent (up to 128 once ``|max s'| log2(e) / tau`` passes ``2**31``, where
    the weights overflow, and a bias between parts of that error at any scale). The bare
    ``ex2.approx`` (``tl.exp`` adds a denormal-range fix-up that no term needs here)."""
    ref = tl.where(top == -float("inf"), 0.0, top)
    return tl.math.exp2((s - ref) * scale)


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
def part_keys(s, groups, greedy, scale, seed, row, off_lo, off_hi, shared_word, TAIL: tl.constexpr,
              SHARED_WORD: tl.constexpr, NOISE: tl.constexpr, FAST_LOG: tl.constexpr):
    """Race key of each part: ``s [R, GROUP]`` float32 scores ``s'`` (-inf off the part) of groups
    ``groups [R]``; ``greedy``: the row's ``tau == 0`` (one row per program: a uniform branch);
    ``TAIL``: the parts beyond the proxies' vocabulary (Gumbel word from :func:`second_words`,
    else :func:`prefix_gumbel_word`, or ``shared_word [R]`` with ``SHARED_WORD``). Returns ``key [R]``
    (module docstring's units; -inf for a part whose scores are all -inf). Without ``NOISE`` every
    row is keyed greedily."""
    top = tl.max(s, axis=1)
    if greedy or not NOISE:
        key = top
    else:
        if SHARED_WORD:
            word = shared_word
        elif TAIL:
            word, _, _ = second_words(seed, groups, row, off_lo, off_hi)
        else:
            word = prefix_gumbel_word(seed, groups, row, off_lo, off_hi)
        total = _tree_sum(part_weights(s, top[:, None], scale))
        key = tl.fma(top, scale, _log2(total, FAST_LOG)) + gumbel2_from_word(word, FAST_LOG)
    return key


@triton.jit
def part_pick(s, group, greedy, scale, seed, row, off_lo, off_hi, tail):
    """The entry the winning part gives up: ``s [GROUP]`` its scores ``s'`` (-inf off the part,
    not all -inf), ``group`` its group index, ``tail``: whether it is a teacher-only part (pick word
    ``r2`` of :func:`second_words`, else ``r1``). By inverse CDF over the running sums (in order) of
    :func:`part_weights` with one uniform; a greedy row takes the first maximal entry. Returns the
    vocabulary index."""
    top = tl.max(s, axis=0)
    entries = tl.arange(0, GROUP)
    if greedy:
        below = tl.min(tl.where(s == top, entries, GROUP), axis=0)
    else:
        _, pick_prefix, pick_tail = second_words(seed, group, row, off_lo, off_hi)
        running = tl.cumsum(part_weights(s, top, scale), axis=0)
        total = tl.max(running, axis=0)  # the last running sum: the terms are >= 0
        target = (tl.where(tail, pick_tail, pick_prefix) >> 9).to(tl.float32) * 1.1920928955078125e-07 * total
        below = tl.sum(tl.where(running <= target, 1, 0), axis=0)
    return group * GROUP + below
