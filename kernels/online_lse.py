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
def lse_lanes_reduce(lane_max, lane_sum):
    """The block's ``(max, sum-exp relative to max)`` from its lanes' pairs (max stays the floor,
    sum 0, when every entry was -inf)."""
    block_max = tl.max(lane_max, axis=0)
    return block_max, tl.sum(lane_sum * tl.exp(lane_max - block_max), axis=0)


@triton.jit
def lse_group_update(lane_max, lane_sum, x):
    """Fold ``x [R, G]`` into each lane's pair, lane ``r`` taking row ``r`` (one thread's group of
    ``G`` entries): the row's max first, then one exponential per entry and one to rescale the
    sum. A -inf entry adds 0; a NaN or +inf makes the lane's sum NaN (and +inf its max), what
    :func:`lse_lanes_reduce`'s callers test for. The exponentials are the bare ``ex2.approx``
    (``tl.exp`` adds a denormal-range fix-up that a term below 2**-126 of the sum does not need)."""
    new_max = tl.maximum(lane_max, tl.max(x, axis=1))
    rescale = tl.math.exp2((lane_max - new_max) * 1.4426950408889634)
    terms = tl.math.exp2((x - new_max[:, None]) * 1.4426950408889634)
    return new_max, lane_sum * rescale + tl.sum(terms, axis=1)
