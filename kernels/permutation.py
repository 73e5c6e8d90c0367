"""Permutation sampling's random permutations: Philox sort keys from one kernel, then a stable sort.

For row ``b`` and vocabulary size ``V_P``: key ``v`` is word ``v % 4`` of the Philox call on counter
``(v // 4, b | PERM_STREAM, offset)`` and the sign is ``1 - 2 (w & 1)`` for word 0 of counter
``(0, b | SIGN_STREAM, offset)`` (:mod:`adfast.philox`'s layout; seed the Philox key). The keys are
stored as int32 ``w ^ 2**31`` (the same order as the uint32 words) and the permutation is their
stable argsort: exactly :func:`adfast.philox.permutation_and_sign`, which computes the words with
int64 tensor arithmetic: about 500 small kernels on a GPU (518 aten ops, counted on CPU) where this
is one.

Grid ``(rows, ceil(V_P / (4 BLOCK)))``; program ``(b, j)`` writes keys ``4 j BLOCK .. 4 (j + 1)
BLOCK`` of row ``b`` (masked past ``V_P``), and program ``(b, 0)`` the row's sign. The offset is
read from device memory, so a CUDA-graph replay draws a new permutation per step.
"""
import torch
import triton
import triton.language as tl

from . import split as launch_plan
from .group_draw import split_offset
from .launch_order import wait_for_predecessor

PERM_STREAM = tl.constexpr(1 << 31)
SIGN_STREAM = tl.constexpr(3 << 30)


@triton.jit
def _permutation_keys(keys_ptr, sign_ptr, offset_ptr, seed, vocab, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    wait_for_predecessor(PDL)
    row = tl.program_id(0)
    quad = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    off_lo, off_hi = split_offset(offset_ptr)
    lanes = tl.zeros([BLOCK], tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, quad.to(tl.uint32), lanes + (row.to(tl.uint32) | PERM_STREAM),
                               lanes + off_lo, lanes + off_hi)
    keys = keys_ptr + row.to(tl.int64) * vocab + 4 * quad
    tl.store(keys + 0, (r0 ^ 0x80000000).to(tl.int32, bitcast=True), mask=4 * quad + 0 < vocab)
    tl.store(keys + 1, (r1 ^ 0x80000000).to(tl.int32, bitcast=True), mask=4 * quad + 1 < vocab)
    tl.store(keys + 2, (r2 ^ 0x80000000).to(tl.int32, bitcast=True), mask=4 * quad + 2 < vocab)
    tl.store(keys + 3, (r3 ^ 0x80000000).to(tl.int32, bitcast=True), mask=4 * quad + 3 < vocab)
    if tl.program_id(1) == 0:
        s0, _, _, _ = tl.philox(seed, lanes, lanes + (row.to(tl.uint32) | SIGN_STREAM), lanes + off_lo,
                                lanes + off_hi)
        first = tl.arange(0, BLOCK) == 0
        tl.store(sign_ptr + row + tl.arange(0, BLOCK), 1.0 - 2.0 * (s0 & 1).to(tl.float32), mask=first)


def permutation_and_sign(seed: int, offset: torch.Tensor, rows: int, vocab: int,
                         device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`adfast.philox.permutation_and_sign` with the keys and signs from one Triton launch:
    ``offset`` an int64 tensor of one element on the device; returns ``(perm int64 [rows, vocab],
    sign float32 [rows])``."""
    device = offset.device
    block = 1024 if launch_plan.multiprocessor_count(device) is not None else 64
    keys = torch.empty(rows, vocab, dtype=torch.int32, device=device)
    sign = torch.empty(rows, dtype=torch.float32, device=device)
    _permutation_keys[(rows, triton.cdiv(vocab, 4 * block))](keys, sign, offset.reshape(1), seed, vocab,
                                                            BLOCK=block, **launch_plan.dependent_launch(device))
    return torch.argsort(keys, dim=1, stable=True), sign
