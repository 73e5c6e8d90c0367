"""How a ``[B, V]`` row-wise reduction is cut into ``[B, S]`` programs, and which machine the plans target."""
import functools
import os
from dataclasses import dataclass

import torch


def multiprocessor_count(device: torch.device) -> int | None:
    """The SM count of a CUDA device; None for CPU tensors (the kernels then run in the Triton interpreter).

    The one place the launch plans of every kernel learn where they run: GPU plans (large blocks,
    splits sized to the SM count, tensor-core products) when it returns a count, small interpreter
    plans when it returns None. :mod:`adfast.compile_check` replaces it to compile the GPU plans
    on a machine without a GPU.
    """
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def dependent_launch(device: torch.device) -> dict:
    """Launch arguments for programmatic dependent launch (PDL) on ``device``: ``{"PDL": True,
    "launch_pdl": True}`` on a CUDA GPU of compute capability 9.0 or later (Hopper) unless the
    environment sets ``ADFAST_PDL=0``; ``{}`` otherwise.

    A kernel launched this way may start while the kernel before it in the stream is still
    running: every adfast kernel that takes ``PDL`` waits (``gdc_wait``, in
    :func:`adfast.kernels.launch_order.wait_for_predecessor`) before it touches memory a
    predecessor may write or read, and then lets its own successor launch
    (``gdc_launch_dependents``); what the early start buys is the launch and ramp-up latency of
    a decode step's ~280 small kernels, which otherwise sits between every two of them (in a CUDA
    graph too: captured launches keep the attribute). Kernels that are not ours (cuBLAS, torch)
    launch and order as usual. Measured on an H200 (the ``pdl`` stage of ``bench/gpu_session.sh``,
    the engine at batch 1 and 32): 1-4% faster steps, the same tokens (``tests/test_engine.py``).
    :mod:`adfast.compile_check` replaces this function to compile the PDL variants without a GPU.
    """
    if not dependent_launch_supported(device) or os.environ.get("ADFAST_PDL") == "0":
        return {}
    return {"PDL": True, "launch_pdl": True}


def dependent_launch_supported(device: torch.device) -> bool:
    """True for a CUDA GPU of compute capability 9.0 or later, where :func:`dependent_launch` applies."""
    return device.type == "cuda" and _capability(device.index) >= (9, 0)


@functools.cache
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@dataclass(frozen=True)
class SplitPlan:
    """``splits`` chunks of ``chunk`` logits per row (``chunk`` a multiple of ``block``)."""

    splits: int
    chunk: int
    block: int
    num_warps: int


def plan_splits(batch: int, vocab: int, device: torch.device, splits: int | None = None, *,
                block: int | None = None, num_warps: int | None = None, programs_per_sm: int = 4) -> SplitPlan:
    """Cut each row into enough chunks that ``batch * splits`` programs cover the GPU
    ``programs_per_sm`` times over (at least ``4 * block`` logits each), or into ``splits`` chunks
    when given; ``block`` (logits a program handles per loop step) and ``num_warps`` override the
    GPU defaults (1024, 4). On CPU tensors (Triton interpreter) a small block keeps test
    vocabularies split in several chunks.
    """
    sms = multiprocessor_count(device)
    if sms is not None:
        block, num_warps = block or 1024, num_warps or 4
        if splits is None:
            splits = max(1, min(-(-programs_per_sm * sms // batch), vocab // (4 * block)))
    else:
        block, num_warps = block or 64, num_warps or 4
        splits = splits or max(1, min(4, vocab // (2 * block)))
    chunk = -(-vocab // splits)
    chunk = -(-chunk // block) * block
    splits = -(-vocab // chunk)
    return SplitPlan(splits=splits, chunk=chunk, block=block, num_warps=num_warps)
