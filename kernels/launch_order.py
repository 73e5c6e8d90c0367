"""Ordering between programs and kernels inside Triton kernels: split tickets and dependent launch.

``last_ticket``: split-K in one launch. Every program of a group (the splits of one output tile)
stores its partial result, then takes a ticket from the group's int32 counter; the one that draws
the last ticket sees every other partial and merges them. The barrier makes every thread's
stores precede the ticket (``atomic_add`` with acquire-release semantics at GPU scope releases
them and acquires the others'); the last program sets the counter back to 0 at once (no other
program of this launch touches it again), so the next launch or CUDA-graph replay finds it ready.
Merging reads should bypass L1 (``cache_modifier=".cg"``). Counters come from
:func:`zeroed_counters`, one buffer per stream that may run such kernels concurrently.

``wait_for_predecessor``: the prologue of a kernel launched with programmatic dependent launch
(:func:`adfast.kernels.split.dependent_launch`): wait until the kernel before it in the stream
has finished and its writes are visible, then let the kernel after it launch.
"""
import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def last_ticket(count_ptr, group_size):
    """Whether this program drew the last of ``group_size`` tickets of the counter at ``count_ptr``
    (then the counter is 0 again); call it after storing this program's partial."""
    tl.debug_barrier()
    ticket = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu")
    last = ticket == group_size - 1
    tl.atomic_xchg(count_ptr, 0, mask=last, sem="relaxed", scope="gpu")
    return last


@triton.jit
def wait_for_predecessor(PDL: tl.constexpr):
    """With ``PDL``: wait for the kernel before (``gdc_wait``), then let the next one launch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


def zeroed_counters(count: int, device) -> torch.Tensor:
    """``count`` int32 ticket counters, all zero."""
    return torch.zeros(count, dtype=torch.int32, device=device)

