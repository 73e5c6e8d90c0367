"""A forward's positions in one launch: where its tokens go in their slots' caches, where their
queries stand, their rotary rows, and the slots' new lengths.

For row ``b`` (slot ``s = slots[b]``, ``start = lengths[s]`` at entry, ``n = num_tokens[b]``) and
``t < T``, with ``S = max_seq_len`` (position ``S`` of a cache is scratch)::

    write_pos[b, t] = start + t   if t < n and start + t < S, else S
    query_pos[b, t] = clamp(start + min(t, n - 1), 0, S - 1)
    cos[b, t], sin[b, t] = cos_table[query_pos[b, t]], sin_table[query_pos[b, t]]
    live[b] = query_pos[b, 0] + 1     (a decode step's live lengths, for attention)
    lengths[s] = min(start + n, S)    (in place)

:func:`adfast.layer_ops.step_positions` is the same in PyTorch ops, about 17 launches. One program
per row: slots are distinct, so a program reads and then writes its own slot's length only.
Shapes: ``lengths [max_batch]``, ``slots, num_tokens [B]`` int64; tables float32 ``[S, D]``;
returns ``write_pos, query_pos`` int64 ``[B, T]``, ``cos, sin`` ``[B, T, D]`` and ``live`` int64 ``[B]``.
"""
import torch
import triton
import triton.language as tl

from . import split as launch_plan
from .launch_order import wait_for_predecessor


@triton.jit
def _step_positions(lengths_ptr, slots_ptr, num_tokens_ptr, cos_table, sin_table, write_ptr, query_ptr, cos_ptr,
                    sin_ptr, live_ptr, seq, max_seq_len, dim, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                    PDL: tl.constexpr = False):
    wait_for_predecessor(PDL)
    row = tl.program_id(0)
    slot = tl.load(slots_ptr + row)
    start = tl.load(lengths_ptr + slot)
    n = tl.load(num_tokens_ptr + row)
    d = tl.arange(0, BLOCK_D)
    for t0 in range(0, seq, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        inside = t < seq
        position = start + t
        write = tl.where((t < n) & (position < max_seq_len), position, max_seq_len)
        query = tl.minimum(tl.maximum(start + tl.minimum(t, n - 1), 0), max_seq_len - 1)
        tl.store(write_ptr + row * seq + t, write, mask=inside)
        tl.store(query_ptr + row * seq + t, query, mask=inside)
        both = inside[:, None] & (d < dim)[None, :]
        table_rows = query[:, None] * dim + d[None, :]
        out_rows = (row * seq + t)[:, None] * dim + d[None, :]
        tl.store(cos_ptr + out_rows, tl.load(cos_table + table_rows, mask=both), mask=both)
        tl.store(sin_ptr + out_rows, tl.load(sin_table + table_rows, mask=both), mask=both)
        if t0 == 0:
            tl.store(live_ptr + row, tl.sum(tl.where(t == 0, query, 0), axis=0) + 1)
    tl.store(lengths_ptr + slot, tl.minimum(start + n, max_seq_len))


def step_positions(lengths: torch.Tensor, slots: torch.Tensor, num_tokens: torch.Tensor, seq: int,
                   cos_table: torch.Tensor, sin_table: torch.Tensor):
    """``(write_pos, query_pos, cos, sin, live)`` of a forward of ``seq`` tokens a row, and
    ``lengths`` advanced in place (module docstring)."""
    batch, (max_seq_len, dim) = slots.shape[0], cos_table.shape
    device = slots.device
    write_pos = torch.empty(batch, seq, dtype=torch.int64, device=device)
    query_pos = torch.empty(batch, seq, dtype=torch.int64, device=device)
    cos = torch.empty(batch, seq, dim, dtype=cos_table.dtype, device=device)
    sin = torch.empty_like(cos)
    live = torch.empty(batch, dtype=torch.int64, device=device)
    block_t = min(triton.next_power_of_2(seq), 16)
    _step_positions[(batch,)](lengths, slots, num_tokens, cos_table, sin_table, write_pos, query_pos, cos, sin, live,
                              seq, max_seq_len, dim, BLOCK_T=block_t, BLOCK_D=triton.next_power_of_2(dim),
                              **launch_plan.dependent_launch(device))
    return write_pos, query_pos, cos, sin, live
