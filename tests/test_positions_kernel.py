"""kernels/positions.py (a forward's cache positions, rotary rows and new lengths in one launch)
against adfast.layer_ops.step_positions, on KERNEL_DEVICE (the interpreter on CPU)."""
import pytest
import torch
from conftest import KERNEL_DEVICE

from adfast.kernels.positions import step_positions as kernel_positions
from adfast.layer_ops import step_positions


@pytest.mark.parametrize("seq", [1, 5, 20])
def test_positions_kernel_equals_pytorch(seq):
    """Rows that fill their slot past the cache (their tokens go to the scratch position and the
    length stops at the end), an idle row (0 tokens: it writes nothing and keeps its length),
    right-padded rows, and more tokens than one block of the kernel's loop (20)."""
    max_seq_len, dim = 24, 8
    g = torch.Generator().manual_seed(seq)
    cos_table, sin_table = torch.randn(max_seq_len, dim, generator=g), torch.randn(max_seq_len, dim, generator=g)
    lengths = torch.tensor([0, 22, 7, 3, 24, 11])
    slots = torch.tensor([4, 1, 0, 5, 2])
    num_tokens = torch.tensor([seq, seq, 0, max(seq - 2, 0), 1])
    want_lengths = lengths.clone()
    want = step_positions(want_lengths, slots, num_tokens, seq, cos_table, sin_table)
    on = lambda x: x.to(KERNEL_DEVICE)  # noqa: E731
    got_lengths = on(lengths.clone())
    got = kernel_positions(got_lengths, on(slots), on(num_tokens), seq, on(cos_table), on(sin_table))
    for name, a, b in zip(["write_pos", "query_pos", "cos", "sin", "live"], got, want):
        assert torch.equal(a.cpu(), b), name
    assert torch.equal(got_lengths.cpu(), want_lengths)
    assert want_lengths.tolist() != lengths.tolist()  # the forward advanced some slots
