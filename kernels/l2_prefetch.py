"""Pull (part of) a weight matrix into the GPU's L2 cache ahead of the matmul that reads it.

At decode a layer's matmuls are reads of their weights, and between two of them run small kernels
(norms, rotary and cache writes, attention, the gated activation) and launch gaps during which the
memory system idles: on an H200 at batch 1 about a fifth of the 7B teacher's step
(``bench/results/goals-NVIDIA_H200.md``). Launched on a side stream when the matmul before has
finished, this kernel fills that idle time with the next matmul's bytes, which that matmul then
reads from L2 instead of memory; the bytes read from memory stay the same, they move earlier.

What is prefetched, for a contiguous weight of ``rows`` rows of ``row_bytes`` bytes (``[C, N, K]``:
``C N`` rows of ``K`` elements) and a budget of ``budget`` bytes (what L2 should hold of it):

* the whole weight when it fits the budget (at 40 MB the 7B's qkv and o, 33 and 26 MB);
* else the head of every row, ``head = budget / rows`` bytes rounded down to 128-byte lines:
  a matmul that streams ``W[n, k]`` in ``k`` order on every tile at once (no split over ``k``)
  finds its first ``head`` bytes of every tile in L2, so all its programs start ahead, not a few.

Work items: the prefetched span of each row is cut into chunks of ``CHUNK`` bytes; item ``i`` is
chunk ``i // rows`` of row ``i % rows`` (chunk-major: the first chunk of every row before any
second one), at byte offset ``row * row_bytes + chunk * CHUNK``, ``min(CHUNK, span - chunk *
CHUNK)`` bytes; a whole weight is one row of all its bytes. Each item is one Hopper bulk prefetch
(``cp.async.bulk.prefetch.L2``: the copy engine fetches the span, the program issues one
instruction and moves on); grid ``ceil(items / BLOCK)`` programs of ``BLOCK`` items.

A prefetch computes nothing and writes nothing: on CPU tensors, and on GPUs before Hopper (no bulk
prefetch), :func:`prefetch_l2` does nothing; so do weights that are not contiguous. The item
layout (:func:`prefetch_items`, a Triton helper) is tested in the interpreter against the byte
ranges it should cover (``tests/test_l2_prefetch_kernel.py``).
"""
import torch
import triton
import triton.language as tl

from . import split as launch_plan

CHUNK = 16384
"""Bytes per bulk prefetch (a multiple of 16, as the instruction requires)."""
LINE = 128
"""L2 line size: row heads are whole lines."""
BLOCK = 128
"""Items per program (four warps, one item a thread)."""


def prefetch_plan(rows: int, row_bytes: int, budget: int) -> tuple[int, int, int, int]:
    """``(rows, row_bytes, span, items)`` of the work for a weight of ``rows`` rows of
    ``row_bytes`` bytes and a budget of ``budget`` bytes: the whole weight as one row when it fits
    (its bytes rounded down to 16, the bulk prefetch's unit), else every row's first ``span`` bytes
    (a multiple of :data:`LINE`; 0, nothing to prefetch, where that does not fit or rows do not
    start on 16-byte boundaries); ``items`` chunks of at most :data:`CHUNK` bytes in all."""
    total = rows * row_bytes
    if total <= budget:
        rows, row_bytes, span = 1, total, total // 16 * 16
    elif row_bytes % 16:
        span = 0
    else:
        span = min(row_bytes, budget // rows // LINE * LINE)
    return rows, row_bytes, span, rows * triton.cdiv(span, CHUNK)


@triton.jit
def prefetch_items(pid, rows, row_bytes, span, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """Byte offsets (int64) and sizes (int32, 0 past the last item) of program ``pid``'s ``BLOCK``
    items (module docstring)."""
    item = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    row = item % rows
    chunk = item // rows
    rest = span - chunk * CHUNK
    size = tl.where(rest > 0, tl.minimum(rest, CHUNK), 0)
    return row * row_bytes + chunk * CHUNK, size.to(tl.int32)


@triton.jit
def _prefetch_l2(weight_ptr, rows, row_bytes, span, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    offset, size = prefetch_items(tl.program_id(0), rows, row_bytes, span, BLOCK, CHUNK)
    base = weight_ptr.to(tl.pointer_type(tl.int8))
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; }",
        "=r,l,r", [base + offset, size], dtype=tl.int32, is_pure=False, pack=1)


def prefetch_supported(device: torch.device) -> bool:
    """Whether :func:`prefetch_l2` launches on ``device``: a CUDA GPU of compute capability 9.0 or
    later (Hopper's bulk prefetch)."""
    return launch_plan.dependent_launch_supported(device)


def prefetch_l2(weight: torch.Tensor, budget: int) -> None:
    """Prefetch up to ``budget`` bytes of ``weight`` (any dtype, contiguous, rows along its last
    dimension) into L2 on the current stream: all of it when it fits, else the same head of every
    row (module docstring). Nothing happens where :func:`prefetch_supported` is False, for a
    weight that is not contiguous or not 16-byte aligned, or for a budget below one line a row."""
    if budget < 0:
        raise ValueError(f"budget must be >= 0 bytes, got {budget}")
    if (not prefetch_supported(weight.device) or not weight.is_contiguous() or weight.numel() == 0
            or weight.data_ptr() % 16):
        return
    row_bytes = weight.shape[-1] * weight.element_size()
    rows, row_bytes, span, items = prefetch_plan(weight.numel() // weight.shape[-1], row_bytes, budget)
    if items == 0:
        return
    _prefetch_l2[(triton.cdiv(items, BLOCK),)](weight, rows, row_bytes, span, BLOCK=BLOCK, CHUNK=CHUNK,
                                               num_warps=BLOCK // 32)
