"""Per-copy matmuls over stacked weights: ``[C, N, in] x [C, out, in]^T`` for ``C`` weight copies.

One copy (the teacher, the jvp proxy) runs the plain 2-D GEMM (``F.linear``: cuBLAS's GEMM
heuristics, not its batched ones for a batch of one); several (the proxy pair) run one batched
matmul over the copy dimension, the fastest arrangement measured on an H100
(``/work/shared/notes/h100-ceilings.md``).
"""
import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight^T + bias`` per copy (one batched matmul over the copy dimension; one GEMM for
    one copy, as :func:`matmul_t`).

    ``x [C, N, in]``, ``weight [C, out, in]``, ``bias [C, out]`` -> ``[C, N, out]``.
    """
    if x.shape[0] == 1:
        return F.linear(x[0], weight[0], None if bias is None else bias[0])[None]
    if bias is None:
        return torch.bmm(x, weight.transpose(1, 2))
    return torch.baddbmm(bias[:, None], x, weight.transpose(1, 2))


def matmul_t(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x w^T`` per copy: ``x [C, N, k]``, ``w [C, m, k]`` -> ``[C, N, m]``. Several copies run as
    one batched matmul; one copy as the plain 2-D GEMM (``F.linear``: cuBLAS's GEMM heuristics,
    not its batched ones for a batch of one)."""
    if x.shape[0] == 1:
        return F.linear(x[0], w[0])[None]
    return torch.bmm(x, w.transpose(1, 2))


def add_matmul_t_(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """``out += x w^T`` in place, per copy as :func:`matmul_t` (``out`` may be a strided view with a
    unit last stride, e.g. a column slice)."""
    if x.shape[0] == 1:
        out[0].addmm_(x[0], w[0].T)
    else:
        out.baddbmm_(x, w.transpose(1, 2))


__all__ = ["add_matmul_t_", "linear", "matmul_t"]
