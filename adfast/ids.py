"""Token ids as users pass them: checked, never rounded or flattened."""
from __future__ import annotations

import numbers
from collections.abc import Iterable

import torch


def token_ids(ids, name: str) -> list[int]:
    """``ids`` (a sequence of Python or numpy ints or one-element integer tensors, or a 1-D integer
    tensor) as a list of ints.

    Anything else raises ``ValueError`` naming ``name``: floats (3.7 is not read as 3), booleans,
    text ("12" is not read as [1, 2]), nested sequences, other tensors. The ids' range is the
    caller's to check (it knows the vocabulary).
    """
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"{name} must be a 1-D integer tensor of token ids, got {ids.dtype} of shape "
                             f"{tuple(ids.shape)}")
        return ids.tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise ValueError(f"{name} must be a sequence of token ids (ints), got {type(ids).__name__} {ids!r:.40}")
    ids = list(ids)
    wrong = [t for t in ids if not _is_int(t)]
    if wrong:
        raise ValueError(f"{name} must hold token ids (ints), got {wrong[0]!r}")
    return [int(t) for t in ids]


def _is_int(value) -> bool:
    """A Python or numpy integer (not a bool), or a one-element integer tensor."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
