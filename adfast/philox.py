"""Counter-based random numbers shared bit for bit by the Triton kernels and the PyTorch path.

Philox4x32-10 (Salmon et al., SC'11), the generator behind ``tl.philox``: a 64-bit key (the
sampling seed) and a 128-bit counter map to four independent 32-bit words. Nothing is stored
between calls, so a step's noise is a pure function of ``(seed, offset, row, vocab index)``
and a CUDA-graph replay advances it by bumping ``offset`` on the device.

Counter layouts (``g = v // 8``, the group of 8 vocabulary entries holding ``v``)::

    sampling, Gumbel variate of a group's proxy-covered part (stream 0):
        c0 = (g // (4 WORD_RUN)) WORD_RUN + g % WORD_RUN, word (g // WORD_RUN) % 4
        (one call serves groups g, g + WORD_RUN, g + 2 WORD_RUN, g + 3 WORD_RUN: the fused kernel's
        loop over blocks of WORD_RUN groups calls Philox every fourth block)
    sampling, SECOND_STREAM: c0 = g; word 0 the Gumbel variate of the group's teacher-only part,
        words 1 and 2 the uniforms that pick inside its proxy-covered / teacher-only part
    permutation (random_words): c0 = v // 4   (entry v takes word v % 4 of its counter)
    c1 = row | stream      (stream: 0, SECOND_STREAM, PERM_STREAM or SIGN_STREAM below)
    c2, c3 = offset low / high 32 bits

Gumbel uniforms are ``u = (r >> 9) * 2**-23 + 2**-24`` in (0, 1), exact in float32, so
``-log(-log(u))`` is always finite; pick uniforms are ``(r >> 9) * 2**-23`` in [0, 1 - 2**-23].

The arithmetic here runs on int64 tensors holding uint32 values, on any device.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85
ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57
N_ROUNDS = 10
SECOND_STREAM = 1 << 30
PERM_STREAM = 1 << 31
SIGN_STREAM = 3 << 30
WORD_RUN = 256


def _mul_hi_lo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * b`` for uint32 ``a`` (int64 tensor) and uint32 ``b``."""
    x = a * (b >> 16)  # < 2**48
    y = a * (b & 0xFFFF)  # < 2**48
    hi = (x + (y >> 16)) >> 16
    lo = (((x & 0xFFFF) << 16) + y) & MASK32
    return hi & MASK32, lo


def philox4x32(seed: int, c0, c1, c2, c3) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 of counters ``(c0, c1, c2, c3)`` (broadcastable int64 tensors < 2**32) under ``seed``."""
    c0, c1, c2, c3 = torch.broadcast_tensors(*(torch.as_tensor(c) for c in (c0, c1, c2, c3)))
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for _ in range(N_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(c2, ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + KEY_A) & MASK32, (k1 + KEY_B) & MASK32
    return c0, c1, c2, c3


def random_words(seed: int, offset: torch.Tensor | int, rows: int, vocab: int, stream: int = 0,
                 device=None) -> torch.Tensor:
    """``[rows, vocab]`` uint32 words (as int64) for the counter layout in the module docstring."""
    offset = torch.as_tensor(offset, dtype=torch.int64, device=device)
    device = offset.device
    quads = (vocab + 3) // 4
    c0 = torch.arange(quads, device=device, dtype=torch.int64)[None, :]
    c1 = (torch.arange(rows, device=device, dtype=torch.int64) | stream)[:, None]
    words = philox4x32(seed, c0, c1, offset & MASK32, (offset >> 32) & MASK32)
    return torch.stack(words, dim=-1).reshape(rows, quads * 4)[:, :vocab]


def gumbel2_from_words(words: torch.Tensor) -> torch.Tensor:
    """``log2(e)`` times standard Gumbel noise, ``-log2(-log(u))`` with ``u = (w >> 9) * 2**-23 +
    2**-24`` in (0, 1), in float32 (the outer log as ``log(.) * log2(e)``, as the interpreter's)."""
    u = (words >> 9).to(torch.float32) * 2.0**-23 + 2.0**-24
    return -(torch.log(-torch.log(u)) * 1.4426950408889634)


def permutation_and_sign(seed: int, offset: torch.Tensor | int, rows: int, vocab: int,
                         device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row uniform random permutations ``[rows, vocab]`` (int64) and signs ``[rows]`` (+-1.0).

    The permutation is the stable argsort of 32-bit Philox keys on stream ``PERM_STREAM`` (sorted
    as int32 ``w - 2**31``, the same order); the sign is the low bit of a word on stream
    ``SIGN_STREAM``. Used by permutation sampling (:mod:`adfast.kernels.permutation` computes the
    same in one kernel).
    """
    keys = (random_words(seed, offset, rows, vocab, stream=PERM_STREAM, device=device) - 2**31).to(torch.int32)
    perm = torch.argsort(keys, dim=1, stable=True)
    bits = random_words(seed, offset, rows, 1, stream=SIGN_STREAM, device=device)[:, 0] & 1
    return perm, 1.0 - 2.0 * bits.to(torch.float32)
