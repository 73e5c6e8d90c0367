"""How a ``[B, V]`` row-wise reduction is cut into ``[B, S]`` programs."""
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SplitPlan:
    """``splits`` chunks of ``chunk`` logits per row (``chunk`` a multiple of ``block``)."""

    splits: int
    chunk: int
    block: int
    num_warps: int


def plan_splits(batch: int, vocab: int, device: torch.device, splits: int | None = None) -> SplitPlan:
    """Cut each row into enough chunks that ``batch * splits`` programs cover the GPU about four
    times over (at least ``4 * block`` logits each), or into ``splits`` chunks when given.
    On CPU tensors (Triton interpreter) a small block keeps test vocabularies split in several chunks.
    """
    if device.type == "cuda":
        block, num_warps = 1024, 4
        if splits is None:
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            splits = max(1, min(-(-4 * sms // batch), vocab // (4 * block)))
    else:
        block, num_warps = 64, 4
        splits = splits or max(1, min(4, vocab // (2 * block)))
    chunk = -(-vocab // splits)
    chunk = -(-chunk // block) * block
    splits = -(-vocab // chunk)
    return SplitPlan(splits=splits, chunk=chunk, block=block, num_warps=num_warps)
