"""Gumbel noise inside Triton kernels: :func:`adfast.philox.gumbel_noise`'s, bit for bit in the interpreter."""
import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def gumbel_block(seed, start, row, off_lo, off_hi, BLOCK: tl.constexpr, FAST_OUTER_LOG: tl.constexpr = False):
    """Standard Gumbel noise for vocabulary entries ``start .. start + BLOCK`` of ``row``.

    ``start`` is a multiple of 4: one Philox call (counter ``(v // 4, row, off_lo, off_hi)``)
    yields the four words of entries ``v .. v + 3``, so the RNG costs a quarter call per logit.
    Returns ``[BLOCK]`` float32 ``-log(-log(u))`` with ``u = (w >> 9) * 2**-23 + 2**-24``.

    The inner ``E = -log(u)`` needs a log accurate relative to its result: near ``u = 1``, ``E`` is
    tiny and ``-log(E)``, the largest noise, is as accurate as ``E``. The outer ``log(E)`` only needs
    an absolute error far below the logits' spacing: with ``FAST_OUTER_LOG`` (GPU launches; the
    interpreter cannot run libdevice) it is the hardware ``lg2.approx`` times ``ln 2`` (absolute
    error below 1e-6 over ``E``'s range), two instructions instead of about twenty-four, so the
    noise differs from :func:`adfast.philox.gumbel_noise` in its last bits and a draw can differ
    only where two scores tie to within that.
    """
    quads = start // 4 + tl.arange(0, BLOCK // 4)
    c0 = quads.to(tl.uint32)
    c1 = tl.zeros_like(c0) + row.to(tl.uint32)
    c2 = tl.zeros_like(c0) + off_lo
    c3 = tl.zeros_like(c0) + off_hi
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
    words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK,))
    u = (words >> 9).to(tl.float32) * 1.1920928955078125e-07 + 5.9604644775390625e-08
    exponential = -tl.log(u)
    if FAST_OUTER_LOG:
        return -libdevice.fast_logf(exponential)
    return -tl.log(exponential)


@triton.jit
def split_offset(offset_ptr):
    """Load the int64 RNG offset from device memory and split it into uint32 low / high words."""
    offset = tl.load(offset_ptr)
    return (offset & 0xFFFFFFFF).to(tl.uint32), ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32)
