"""A factored tangent's product, added to a tangent by the fused layer kernel that loads it.

A linear layer whose weight tangent is factored, ``G = U V^T`` (:class:`adfast.tangent.FactoredTangent`
with one block, or with its blocks merged into one block-diagonal ``U``), adds ``x G^T = z U^T``,
``z = x V``, to its output's tangent ``d``. :func:`adfast.tangent.linear_jvp` gets ``z`` from the
matmul that computes ``x W^T`` (``V^T`` is stacked under ``W``); the in-place ``d += z U^T``
would be one more launch per layer and weight. The kernel that reads ``d`` next (the residual add
and RMSNorm after ``wo`` and ``w_down``, the rotary / cache write after ``wqkv``, the gated
activation after ``w_gate_up``) adds it instead, as it loads each element::

    d[c, n, i]  <-  round(d[c, n, i] + sum_j z[c, n, j] U[c, i, j])     sum in float32, rounded once

which is what an in-place ``addmm_`` leaves in ``d`` (one rounding to ``d``'s dtype), up to the
order of the float32 sum. Shapes: ``z [C, N, R]``, ``U [C, m, R]`` (``m``: the layer's output
width), ``1 <= R <= MAX_RANK``, both in ``d``'s dtype, any strides (``U`` is usually expanded
over the copies: stride 0 in its first dimension). A program loads ``U[i, j]`` for a tile of
columns ``i`` at each ``j``: with ``U`` stored as a contiguous ``U^T`` (unit stride along ``m``,
as :class:`adfast.tangent.FactoredTangent` keeps it) those loads are contiguous, which matters
when one program covers a whole row (batch-1 decode: the rotary kernel reads all of ``wqkv``'s
``U``, 2560 x 24 numbers for the 3B proxy at rank 8, in one program). Each element costs ``R``
loads of ``U`` and ``z``: cheap at the ranks whose blocks merge, and the launch it saves costs
more at decode batch sizes than the ``R m`` numbers read.
"""
import torch
import triton
import triton.language as tl

MAX_RANK = 64
UNROLL = tl.constexpr(8)


@triton.jit
def add_low_rank(d, z_row, sz_r, u_ptr, su_m, su_r, cols, mask, RANK: tl.constexpr):
    """``d + sum_j z_row[j] U[cols, j]`` in float32: ``d`` a float32 tile over output columns ``cols``
    (any shape, ``mask``-ed), ``z_row`` this row's ``z`` (stride ``sz_r``), ``u_ptr`` this copy's
    ``U`` (strides ``su_m``, ``su_r``). The ``j`` loop is unrolled by ``UNROLL`` (the last
    ``RANK % UNROLL`` steps fully): that many independent loads in flight at once rather than one
    memory latency per ``j`` (at batch 1 one program reads a whole ``U``), with registers bounded
    for any ``RANK``."""
    term = tl.zeros_like(d)
    rows = u_ptr + cols.to(tl.int64) * su_m
    for j0 in range(0, RANK // UNROLL * UNROLL, UNROLL):
        for step in tl.static_range(UNROLL):
            term += _rank_one(z_row, sz_r, rows, su_r, j0 + step, mask)
    for j in tl.static_range(RANK // UNROLL * UNROLL, RANK):
        term += _rank_one(z_row, sz_r, rows, su_r, j, mask)
    return d + term


@triton.jit
def _rank_one(z_row, sz_r, rows, su_r, j, mask):
    """``z[j] U[cols, j]`` in float32 (``rows``: the pointers of ``U[cols, 0]``)."""
    z = tl.load(z_row + j * sz_r).to(tl.float32)
    return z * tl.load(rows + j * su_r, mask=mask, other=0.0).to(tl.float32)


def check_low_rank(low_rank, copies: int, rows: int, width: int, like: torch.Tensor, name: str) -> None:
    """Raise ValueError unless ``low_rank = (z, U)`` fits a ``[copies, rows, width]`` tangent ``name``
    in ``like``'s dtype and device (see the module docstring)."""
    if not (isinstance(low_rank, tuple) and len(low_rank) == 2
            and all(isinstance(t, torch.Tensor) for t in low_rank)):
        raise ValueError(f"low_rank must be a pair of tensors (z, U), got {type(low_rank).__name__}")
    z, u = low_rank
    rank = z.shape[-1] if z.dim() == 3 else 0
    if z.shape != (copies, rows, rank) or u.shape != (copies, width, rank) or not 1 <= rank <= MAX_RANK:
        raise ValueError(f"low_rank for {name} [C, N, m] = [{copies}, {rows}, {width}] must be z [C, N, R] and "
                         f"U [C, m, R] with 1 <= R <= {MAX_RANK}, got {tuple(z.shape)} and {tuple(u.shape)}")
    for t in (z, u):
        if t.dtype != like.dtype or t.device != like.device:
            raise ValueError(f"low_rank's z and U must be {like.dtype} on {like.device} like {name}, got "
                             f"{t.dtype} on {t.device}")


def low_rank_args(low_rank, fallback: torch.Tensor) -> tuple:
    """Kernel arguments ``(z, U, sz_c, sz_n, sz_r, su_c, su_m, su_r, R)`` (``R``: the kernels'
    ``RANK`` constexpr); without a term, ``fallback`` stands in for both pointers (never read) and
    ``R = 0``."""
    if low_rank is None:
        return fallback, fallback, 0, 0, 0, 0, 0, 0, 0
    z, u = low_rank
    return (z, u, *z.stride(), *u.stride(), z.shape[-1])
