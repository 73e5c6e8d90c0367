"""Loading one block of the two proxy rows (or of the exact ``D`` row), straight or through a permutation."""
import triton
import triton.language as tl


@triton.jit
def load_proxy_block(plus_ptr, minus_ptr, perm_ptr, row, stride_p, stride_perm, offs, pmask,
                     PERMUTE: tl.constexpr, HAS_MINUS: tl.constexpr):
    """``p[idx], m[idx]`` as float32 for entries ``offs`` of ``row`` (0 where ``pmask`` is False;
    ``pmask`` None: every entry is read, unmasked), with ``idx = perm[row, offs]`` in permutation
    mode, else ``offs``. Without ``HAS_MINUS`` (exact-D input: ``plus_ptr`` holds ``D`` itself)
    ``minus_ptr`` is not read and ``m`` is 0."""
    if PERMUTE:
        idx = tl.load(perm_ptr + row.to(tl.int64) * stride_perm + offs, mask=pmask, other=None if pmask is None else 0)
    else:
        idx = offs
    other = None if pmask is None else 0.0
    p = tl.load(plus_ptr + row.to(tl.int64) * stride_p + idx, mask=pmask, other=other).to(tl.float32)
    if HAS_MINUS:
        m = tl.load(minus_ptr + row.to(tl.int64) * stride_p + idx, mask=pmask, other=other).to(tl.float32)
    else:
        m = tl.zeros_like(p)
    return p, m
