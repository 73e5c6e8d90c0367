"""Tangent (JVP) mode pieces: forward-mode derivatives along a weight direction ``g``.

Every function here maps a primal and its tangent (``d/dh`` at ``h = 0`` of the value at weights
``theta + h g``) to the output and its tangent: the linear layers' (:func:`linear_jvp`, with
``g`` dense or factored, :class:`FactoredTangent`) and the log-softmax's
(:func:`log_softmax_tangent`, which turns the logits' tangent into ``D``). The norms', rotary's
and activation's tangents are in :mod:`adfast.layer_ops` (PyTorch, or fused Triton kernels on
CUDA), attention's in :func:`adfast.attention.attend_jvp`; :meth:`adfast.decoder.Decoder.forward`
with ``tangent=True`` chains them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .layer_ops import LOW_RANK_MAX_RANK, LowRankTerm
from .low_rank import LowRankGradient
from .matmul import add_matmul_t_, matmul_t


BLOCK_DIAGONAL_PADDING_BYTES = 4 << 20
"""Zeros a fused weight's factored tangent may add to merge its blocks' ``U_i`` into one
block-diagonal matrix, which saves a kernel launch per extra block at each step: 4 MiB is what
an H100 reads (about 3 TB/s) in the ~1.5 us a launch costs inside a CUDA graph (an estimate)."""


@dataclass(frozen=True)
class FactoredTangent:
    """A weight's tangent ``G [C, m, n]`` kept as factors: row blocks ``G_i = U_i V_i^T`` stacked.

    The blocks are the fused weight's sources (q, k, v for ``wqkv``; gate, up for ``w_gate_up``;
    one block elsewhere), ``m = sum m_i``. ``v [C, n, R]``: the blocks' ``V_i [n, r_i]`` side by
    side, ``R = sum r_i``; ``u``: per block ``U_i [C, m_i, r_i]``, or None for a block kept dense,
    whose ``V_i`` is ``G_i^T`` (``r_i = m_i``, ``U_i = I``); ``ranks``: the ``r_i``. So ``x G^T``
    is ``z = x V`` (one matmul over every block) followed by ``z_i U_i^T`` per factored block
    (:meth:`add_products_to`): ``r_i (m_i + n)`` numbers per factored block and ``m_i n`` per dense
    one are read, instead of ``m n``.

    ``stacked`` (set by :meth:`adfast.decoder.Decoder.set_tangent` for a linear layer's weight ``W [C, m, n]``):
    ``[C, m + R, n]``, ``W`` with ``V^T`` appended as rows, the storage of ``W`` itself (the
    decoder's parameter becomes its first ``m`` rows), so that :func:`linear_jvp` gets ``x W^T``,
    ``dx W^T`` and ``z = x V`` from one matmul: a factored tangent then costs one kernel launch
    per block and no extra matmul over ``x``, and none at all where ``z U^T`` is one product
    (:attr:`whole_u`) that the next fused layer kernel adds (``linear_jvp(..., defer=True)``).

    ``block_diagonal`` (set when every block is factored and the zeros cost few bytes, see
    :meth:`from_blocks`): ``[C, m, R]``, the ``U_i`` on the diagonal and zeros elsewhere, whose
    blocks are the storage of ``u``: all blocks' products then take one kernel launch.
    """

    v: torch.Tensor
    u: tuple[torch.Tensor | None, ...]
    ranks: tuple[int, ...]
    stacked: torch.Tensor | None = None
    block_diagonal: torch.Tensor | None = None

    @classmethod
    def from_blocks(cls, blocks, num_copies: int, dtype: torch.dtype, device,
                    max_padding_bytes: int = 0) -> "FactoredTangent":
        """From row blocks, each a tensor ``G_i [m_i, n]`` or factors ``(U_i [m_i, r_i], V_i [n, r_i])``,
        cast to ``dtype`` / ``device`` and shared by ``num_copies`` copies (expanded, not copied).

        With more than one block, all factored, whose block-diagonal ``U`` would hold at most
        ``max_padding_bytes`` of zeros (``m R - sum m_i r_i`` numbers), the ``U_i`` are stored as
        the blocks of ``block_diagonal``. Every ``U`` is stored column-major (a contiguous ``U^T``
        viewed as ``U``): the fused kernels that add ``z U^T`` read ``U`` along ``m`` at each rank
        index (:mod:`adfast.kernels.low_rank_term`), and the matmuls take either layout.
        """
        def cast(t):
            return t.detach().to(device, dtype)

        def copies(t):
            return t[None].expand(num_copies, *t.shape)

        factored = [isinstance(block, tuple) for block in blocks]
        v = torch.cat([cast(block[1]) if f else cast(block).T for block, f in zip(blocks, factored)], dim=1)
        ranks = tuple(block[1].shape[1] if f else block.shape[0] for block, f in zip(blocks, factored))
        if len(blocks) > 1 and all(factored):
            heights = [block[0].shape[0] for block in blocks]
            zeros = sum(heights) * sum(ranks) - sum(m * r for m, r in zip(heights, ranks))
            if zeros * v.element_size() <= max_padding_bytes:
                merged = torch.zeros(sum(ranks), sum(heights), device=device, dtype=dtype).T
                row = col = 0
                blocks_of_merged = []
                for (u_i, _), m, r in zip(blocks, heights, ranks):
                    merged[row:row + m, col:col + r] = cast(u_i)
                    blocks_of_merged.append(merged[row:row + m, col:col + r])
                    row, col = row + m, col + r
                return cls(copies(v), tuple(map(copies, blocks_of_merged)), ranks, block_diagonal=copies(merged))
        u = tuple(copies(cast(block[0]).T.contiguous().T) if f else None for block, f in zip(blocks, factored))
        return cls(copies(v), u, ranks)

    @property
    def whole_u(self) -> torch.Tensor | None:
        """One ``U [C, m, R]`` for every row, ``G = U V^T``: the ``block_diagonal`` one, or the only
        block's when that block is factored; None otherwise."""
        if self.block_diagonal is not None:
            return self.block_diagonal
        return self.u[0] if len(self.u) == 1 else None

    def add_products_to(self, out: torch.Tensor, z: torch.Tensor) -> None:
        """``out += x G^T`` in place given ``z = x V [C, N, R]``, ``out [C, N, m]``: with a
        :attr:`whole_u`, ``out += z U^T`` (one in-place matmul, :func:`add_matmul_t_`); otherwise
        each block's columns of ``out`` get ``z_i U_i^T`` (one in-place matmul into the column
        slice) or ``z_i`` (a dense block): one kernel launch per block, no concatenation."""
        if self.whole_u is not None:
            add_matmul_t_(out, z, self.whole_u)
            return
        start = 0
        for z_i, u_i in zip(z.split(self.ranks, dim=-1), self.u):
            rows = z_i.shape[-1] if u_i is None else u_i.shape[1]
            block = out[..., start:start + rows]
            if u_i is None:
                block.add_(z_i)
            else:
                add_matmul_t_(block, z_i, u_i)
            start += rows

    def rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """Rows ``G[tokens]`` of a one-block factored ``G`` (the embedding): ``U[tokens] V^T``,
        ``[C, N, n]`` for ``N = tokens.numel()``."""
        (u,) = self.u
        return torch.bmm(u[:, tokens.flatten()], self.v.transpose(1, 2))

    def numel(self) -> int:
        """Numbers held per copy: ``n R`` in ``V`` plus ``m_i r_i`` per factored block."""
        return self.v[0].numel() + sum(u[0].numel() for u in self.u if u is not None)


def primal_tangent_rows(x: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """``[C, 2N, E]``: each copy's ``N`` rows of ``x [C, N, E]``, then those of ``dx``.

    A view when ``dx`` lies in memory where the rows after ``x``'s would (same strides, offset by
    ``N`` rows): the fused jvp layer kernels return their primal and tangent as the halves of one
    ``[2, C, N, E]`` buffer, which qualifies for ``C = 1`` (the jvp engine's one proxy), and so do
    :func:`linear_jvp`'s own outputs for any ``C``. Otherwise a concatenation (one copy kernel).
    """
    rows = x.shape[1]
    if (dx.shape == x.shape and dx.stride() == x.stride() and dx.dtype == x.dtype and dx.device == x.device
            and dx.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
            and dx.storage_offset() == x.storage_offset() + rows * x.stride(1)):
        return x.as_strided((x.shape[0], 2 * rows, x.shape[2]), x.stride(), x.storage_offset())
    return torch.cat((x, dx), dim=1)


def linear_jvp(x: torch.Tensor, dx: torch.Tensor, weight: torch.Tensor, dweight: torch.Tensor | FactoredTangent,
               bias: torch.Tensor | None = None, dbias: torch.Tensor | None = None, *, defer: bool = False):
    """:func:`adfast.matmul.linear` and its tangent ``dx W^T + x G^T + db``: ``(y, dy)``, or with ``defer``
    ``(y, dy, term)``.

    ``x`` and ``dx`` go through ``W`` as one batched matmul (``W`` read once for both; the rows
    are :func:`primal_tangent_rows`, a view where they already lie that way), then
    ``x G^T`` is added to the tangent: ``G [C, out, in]`` dense, or a :class:`FactoredTangent`,
    whose ``x G^T = (x V) U^T`` reads ``r (out + in)`` numbers per block instead of ``out in``
    (with its ``stacked`` weight, ``x V`` comes out of the same matmul as ``x W^T``). ``y`` and
    ``dy`` may be column slices of one buffer (last dimension contiguous).

    ``defer``: where ``x G^T`` is one product ``z U^T`` (a :attr:`FactoredTangent.whole_u` of rank
    at most ``LOW_RANK_MAX_RANK``), it is not added but returned as ``term``, a
    :class:`adfast.layer_ops.LowRankTerm` for the layer op that reads ``dy`` next (the fused
    kernels add it as they load ``dy``: one launch per layer and weight fewer); ``term`` is None
    where it was added here. ``dy + term`` is then the tangent (``db`` already in ``dy``).
    """
    n, out = x.shape[1], weight.shape[1]
    factored = isinstance(dweight, FactoredTangent)
    stacked = dweight.stacked if factored and dweight.stacked is not None else weight
    both = matmul_t(primal_tangent_rows(x, dx), stacked)  # [C, 2N, out (+ R)]
    y, dy = both[:, :n, :out], both[:, n:, :out]
    term = None
    if factored:  # dy is a view of ``both``: adding into it (in place) leaves y alone
        z = both[:, :n, out:] if dweight.stacked is not None else torch.bmm(x, dweight.v)
        u = dweight.whole_u
        if defer and u is not None and u.shape[-1] <= LOW_RANK_MAX_RANK:
            term = LowRankTerm(z, u)
        else:
            dweight.add_products_to(dy, z)
    else:
        add_matmul_t_(dy, x, dweight)
    if bias is not None:
        y = y + bias[:, None]
        dy = dy + dbias[:, None]
    return (y, dy, term) if defer else (y, dy)


def log_softmax_tangent(logits: torch.Tensor, dlogits: torch.Tensor) -> torch.Tensor:
    """The tangent of ``log_softmax(logits)`` along ``dlogits``: ``dlogits - sum_v softmax(logits)_v dlogits_v``.

    Over the last (vocabulary) dimension, in float64 for float64 inputs, else float32. With the
    output of ``adfast.decoder.Decoder.forward(..., tangent=True)`` it is ``D = d/dh log_softmax(logits(theta + h g))``.
    """
    work = torch.float64 if torch.float64 in (logits.dtype, dlogits.dtype) else torch.float32
    logits, dlogits = logits.to(work), dlogits.to(work)
    return dlogits - (torch.softmax(logits, dim=-1) * dlogits).sum(-1, keepdim=True)


def tangent_sources(gradient) -> dict:
    """``set_tangent``'s ``gradient`` as a dict name -> tensor ``G`` or factors ``(U, V)`` of ``G = U V^T``."""
    if isinstance(gradient, LowRankGradient):
        return {**gradient.dense, **gradient.factors}
    grads = getattr(gradient, "grads", gradient)
    if not hasattr(grads, "keys"):
        raise ValueError("gradient must be a ProxyGradient, a LowRankGradient or a mapping name -> tensor, "
                         f"got {type(gradient)}")
    return dict(grads)


def source_shape(value) -> tuple[int, ...] | None:
    """The shape of ``G`` for a tensor, ``(m, n)`` for factors ``(U [m, r], V [n, r])``; None for anything else."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    factors = isinstance(value, tuple) and len(value) == 2 and all(
        isinstance(t, torch.Tensor) and t.dim() == 2 for t in value)
    if factors and value[0].shape[1] == value[1].shape[1]:
        return value[0].shape[0], value[1].shape[0]
    return None


__all__ = ["BLOCK_DIAGONAL_PADDING_BYTES", "FactoredTangent", "linear_jvp", "log_softmax_tangent",
           "primal_tangent_rows", "source_shape", "tangent_sources"]
