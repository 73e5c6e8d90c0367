"""Online log-sum-exp pieces shared by the kernels: a running (max, sum-exp) pair per row chunk."""
import triton
import triton.language as tl


@triton.jit
def lse_update(run_max, run_sum, x):
    """Fold block ``x`` into the running pair: ``sum`` is relative to ``max`` (-inf entries add 0)."""
    new_max = tl.maximum(run_max, tl.max(x, axis=0))
    ref = tl.where(new_max == -float("inf"), 0.0, new_max)
    return new_max, run_sum * tl.exp(run_max - ref) + tl.sum(tl.exp(x - ref), axis=0)


@triton.jit
def lse_merge(max_ptr, sum_ptr, stride, s, smask):
    """``log(sum_s sum_s' * exp(max_s))`` over the partials ``s`` stored ``stride`` floats apart."""
    pmax = tl.load(max_ptr + s * stride, mask=smask, other=-float("inf"))
    psum = tl.load(sum_ptr + s * stride, mask=smask, other=0.0)
    gmax = tl.max(pmax, axis=0)
    ref = tl.where(gmax == -float("inf"), 0.0, gmax)
    return ref + tl.log(tl.sum(psum * tl.exp(pmax - ref), axis=0))


# Lane-wise variant: every lane of a block keeps its own (max, sum-exp) pair across a loop, so the
# loop body has no cross-thread reduction; the lanes are folded once at the end (lse_lanes_reduce).
LANE_FLOOR = tl.constexpr(-3.4028234663852886e38)
"""Initial lane max: the lowest float32, not -inf, so ``x - max`` is never ``-inf - -inf``."""


@triton.jit
def lse_lane_update(lane_max, lane_sum, x):
    """Fold ``x`` into each lane's pair with one exponential: ``e = exp(-|x - max|)`` rescales the
    sum when ``x`` is the new max, else is ``x``'s own term. A -inf ``x`` adds 0; a NaN makes the
    lane's sum NaN and a +inf its max +inf (what :func:`lse_lanes_reduce`'s callers test for).
    The exponential is the bare ``ex2.approx`` of ``-|x - max| log2(e)`` (``tl.exp`` adds a
    denormal-range fix-up that a term below 2**-126 of the sum does not need)."""
    up = x > lane_max
    e = tl.math.exp2(tl.abs(x - lane_max) * -1.4426950408889634)
    return tl.maximum(lane_max, x), tl.where(up, lane_sum * e + 1.0, lane_sum + e)


@triton.jit
def lse_lanes_reduce(lane_max, lane_sum):
    """The block's ``(max, sum-exp relative to max)`` from its lanes' pairs (max stays the floor,
    sum 0, when every entry was -inf)."""
    block_max = tl.max(lane_max, axis=0)
    return block_max, tl.sum(lane_sum * tl.exp(lane_max - block_max), axis=0)
