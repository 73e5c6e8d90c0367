"""Log-sum-exp pieces shared by the kernels: a running (max, sum-exp) pair per row chunk, and sums
against a fixed reference with that pair as their fallback."""
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


# Fixed-reference sums: a loop adds ``2 ** (x * log2(e) - SUM_REF)`` per entry, with no running max
# (one fused multiply-add, one exponential and one add an entry); the sum is accurate while it stays
# a normal float32 well above the terms that flush to zero, which :func:`ref_sum_in_range` decides;
# outside that range (a row whose largest logit is above ~88 or below ~-30, or holds NaN / +inf) the
# caller falls back to the online max / sum-exp pass (:func:`row_lse`).
SUM_REF = tl.constexpr(16.0)
SUM_FLOOR = tl.constexpr(8.673617379884035e-19)  # 2**-60
"""The smallest total taken as accurate: every term that flushed to zero (below 2**-126) is then
under 2**-66 of it, 2**-48 for a 2**18-entry row."""


@triton.jit
def ref_sum_update(lane_sum, x):
    """``lane_sum [R] + sum_j 2 ** (x[:, j] * log2(e) - SUM_REF)`` for ``x [R, G]`` (-inf adds 0,
    NaN makes it NaN, +inf makes it +inf); the bare ``ex2.approx``."""
    return lane_sum + tl.sum(tl.math.exp2(tl.fma(x, 1.4426950408889634, -SUM_REF)), axis=1)


@triton.jit
def ref_sum_in_range(total):
    """Whether a row's fixed-reference total gives its log-sum-exp accurately (False for NaN)."""
    return (total >= SUM_FLOOR) & (total < float("inf"))


@triton.jit
def ref_sum_lse(total):
    """The natural log-sum-exp from a fixed-reference total in range."""
    return (SUM_REF + tl.log2(total)) * 0.6931471805599453


@triton.jit
def row_lse(row_ptr, n, BLOCK: tl.constexpr):
    """``(lse, bad)`` of ``row_ptr[0:n]`` by the online max / sum-exp pass, one program; ``bad``:
    the row holds NaN or +inf (its lse is then NaN or +inf)."""
    run_max = tl.full([], -float("inf"), tl.float32)
    run_sum = tl.full([], 0.0, tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + offs, mask=offs < n, other=-float("inf")).to(tl.float32)
        run_max, run_sum = lse_update(run_max, run_sum, x)
    bad = (run_sum != run_sum) | (run_max == float("inf"))
    ref = tl.where(run_max == -float("inf"), 0.0, run_max)
    return ref + tl.log(run_sum), bad
