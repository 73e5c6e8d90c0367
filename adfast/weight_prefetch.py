"""A decoder's weight prefetch: each matmul's weight pulled into L2 while the kernels before it run.

A decode step's matmuls read their weights; between two of them run kernels that read little
(norms, rotary, attention, the gated activation) and launch gaps, during which the memory system
idles. :class:`WeightPrefetcher` launches :func:`adfast.kernels.l2_prefetch.prefetch_l2` of the
next matmul's weight on a side stream as soon as the work enqueued before it on the current
stream has finished (the matmul before), so those bytes stream in beside the small kernels and the
matmul finds them in L2. :meth:`WeightPrefetcher.join` makes the current stream wait for the side
stream (a CUDA graph's capture needs every forked stream joined; the prefetches write nothing, so
the join orders nothing else). Under capture the forks and joins become graph edges: a replay
costs no host work for them.

The budget is the bytes of one weight to hold in L2 at a time (the whole weight when it fits, else
every row's head; :mod:`adfast.kernels.l2_prefetch`); 0 turns the prefetch off. It applies on a CUDA
GPU with Hopper's bulk prefetch, at decode (one token a row: a prefill's matmuls are bound by their
arithmetic, not their weight reads); elsewhere :data:`NO_PREFETCH` stands in and does nothing.
"""
from __future__ import annotations

import torch

from .kernels.l2_prefetch import prefetch_l2, prefetch_supported


class WeightPrefetcher:
    """Prefetches weights on ``stream`` (a CUDA stream of the weights' device), ``budget`` bytes each."""

    def __init__(self, stream: torch.cuda.Stream, budget: int):
        self.stream, self.budget = stream, budget

    def __call__(self, weight: torch.Tensor) -> None:
        """Prefetch ``weight`` once the work enqueued so far on the current stream has finished."""
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            prefetch_l2(weight, self.budget)

    def join(self) -> None:
        """Make the current stream wait for the prefetches issued so far."""
        torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)


class _NoPrefetch:
    """The stand-in where nothing is prefetched: calls and joins do nothing."""

    def __call__(self, weight: torch.Tensor) -> None:
        pass

    def join(self) -> None:
        pass


NO_PREFETCH = _NoPrefetch()


def side_stream(device: torch.device) -> torch.cuda.Stream | None:
    """A new stream for a decoder's prefetches where they apply on ``device``, else None."""
    return torch.cuda.Stream(device) if prefetch_supported(device) else None


def weight_prefetcher(stream: torch.cuda.Stream | None, budget: int, tokens_per_row: int):
    """The prefetcher of a forward: a :class:`WeightPrefetcher` on ``stream`` for a decode step
    (``tokens_per_row == 1``) with a positive ``budget`` where there is a side stream, else
    :data:`NO_PREFETCH`."""
    if budget < 0:
        raise ValueError(f"prefetch_bytes must be >= 0, got {budget}")
    if stream is None or budget == 0 or tokens_per_row != 1:
        return NO_PREFETCH
    return WeightPrefetcher(stream, budget)
