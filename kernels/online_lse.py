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
