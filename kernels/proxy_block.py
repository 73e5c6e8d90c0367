"""Loading one block of the two proxy rows, straight or through a permutation."""
import triton
import triton.language as tl


@triton.jit
def load_proxy_block(plus_ptr, minus_ptr, perm_ptr, row, stride_p, stride_perm, offs, pmask,
                     PERMUTE: tl.constexpr):
    """``p[idx], m[idx]`` as float32 for entries ``offs`` of ``row`` (0 where ``pmask`` is False),
    with ``idx = perm[row, offs]`` in permutation mode, else ``offs``."""
    if PERMUTE:
        idx = tl.load(perm_ptr + row.to(tl.int64) * stride_perm + offs, mask=pmask, other=0)
    else:
        idx = offs
    p = tl.load(plus_ptr + row.to(tl.int64) * stride_p + idx, mask=pmask, other=0.0).to(tl.float32)
    m = tl.load(minus_ptr + row.to(tl.int64) * stride_p + idx, mask=pmask, other=0.0).to(tl.float32)
    return p, m
