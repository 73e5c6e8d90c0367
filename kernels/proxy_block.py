"""Loading one block of logits: a row's groups (bf16 rows as 32-bit words), and the two proxy rows
(or the exact ``D`` row), straight or through a permutation."""
import triton
import triton.language as tl

from .group_draw import GROUP


@triton.jit
def load_group_block(row_ptr, start, ROWS: tl.constexpr, PAIRED: tl.constexpr):
    """float32 ``[ROWS, GROUP]``: entries ``start + r * GROUP + j`` of the row at ``row_ptr``, all of
    them (unmasked). ``PAIRED`` (a bf16 row at a 4-byte aligned address, ``start`` even): read as
    32-bit words, entry ``2k`` the low half of word ``k`` and ``2k + 1`` the high half, each widened
    by one bit operation (``w << 16``, ``w & 0xffff0000``) instead of an extract and a shift."""
    if PAIRED:
        words = tl.load(row_ptr.to(tl.pointer_type(tl.uint32)) + start // 2
                        + tl.arange(0, ROWS)[:, None] * (GROUP // 2) + tl.arange(0, GROUP // 2)[None, :])
        low = (words << 16).to(tl.float32, bitcast=True)
        high = (words & 0xFFFF0000).to(tl.float32, bitcast=True)
        return tl.reshape(tl.join(low, high), [ROWS, GROUP])
    return tl.load(row_ptr + start + tl.arange(0, ROWS)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]).to(tl.float32)


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
