"""Split-K decode attention (adfast.kernels.decode_attention) against a float64 reference computed
straight from the cache, and against adfast.attention.attend (SDPA path). Positions >= length hold
NaN / huge values: any read of them would poison the output."""
import pytest
import torch
from conftest import KERNEL_DEVICE as DEVICE

from adfast.attention import attend
from adfast.kernels.decode_attention import decode_attention

MAX_SEQ = 40
MAX_BATCH = 5
SMALL_BLOCK = 8 if DEVICE == "cpu" else 16  # tl.dot needs every dimension >= 16 on a GPU


def make_inputs(num_copies, heads, kv_heads, head_dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (num_copies, MAX_BATCH, MAX_SEQ + 1, kv_heads, head_dim)
    k = torch.randn(shape, generator=g)
    v = torch.randn(shape, generator=g)
    slots = torch.tensor([3, 0, 4, 1])
    lengths = torch.tensor([1, MAX_SEQ, 17, 33])
    batch = len(slots)
    for b in range(batch):  # garbage beyond each live row (incl. the scratch position max_seq_len)
        k[:, slots[b], lengths[b]:] = float("nan")
        v[:, slots[b], lengths[b]:] = 1e30
    k[:, 2], v[:, 2] = float("nan"), float("nan")  # slot 2 is used by no row
    q = torch.randn((num_copies, batch, 1, heads, head_dim), generator=g)
    to = dict(device=DEVICE, dtype=dtype)
    return q.to(**to), k.to(**to), v.to(**to), slots.to(DEVICE), lengths.to(DEVICE)


def reference(q, k, v, slots, lengths):
    num_copies, batch, _, heads, head_dim = q.shape
    group = heads // k.shape[3]
    out = torch.empty(q.shape, dtype=torch.float64)
    for c in range(num_copies):
        for b in range(batch):
            n = int(lengths[b])
            kk = k[c, int(slots[b]), :n].double().cpu().repeat_interleave(group, dim=1)  # [n, H, D]
            vv = v[c, int(slots[b]), :n].double().cpu().repeat_interleave(group, dim=1)
            qq = q[c, b, 0].double().cpu()  # [H, D]
            s = torch.einsum("hd,nhd->hn", qq, kk) / head_dim ** 0.5
            out[c, b, 0] = torch.einsum("hn,nhd->hd", s.softmax(-1), vv)
    return out


@pytest.mark.parametrize("num_copies", [1, 2])
@pytest.mark.parametrize("heads,kv_heads", [(7, 1), (4, 2), (2, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_float64_reference(num_copies, heads, kv_heads, dtype):
    head_dim = 16
    q, k, v, slots, lengths = make_inputs(num_copies, heads, kv_heads, head_dim, dtype)
    out = decode_attention(q, k, v, slots, lengths, num_splits=3, block_n=SMALL_BLOCK)
    assert out.shape == q.shape and out.dtype == dtype
    ref = reference(q, k, v, slots, lengths)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.double().cpu(), ref, **tol)


@pytest.mark.parametrize("num_splits,block_n", [(None, None), (1, 16), (5, SMALL_BLOCK)])
def test_matches_attend_fp32(num_splits, block_n):
    q, k, v, slots, lengths = make_inputs(2, 4, 2, 32, torch.float32, seed=1)
    out = decode_attention(q, k, v, slots, lengths, num_splits=num_splits, block_n=block_n)
    # attend (SDPA) gathers all max_seq_len positions and masks them: clean the garbage for it
    k_clean, v_clean = torch.nan_to_num(k, nan=0.0), torch.nan_to_num(v, nan=0.0).clamp(-1e3, 1e3)
    expect = attend(q, k_clean, v_clean, slots, (lengths - 1)[:, None])
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double().cpu(), reference(q, k, v, slots, lengths), rtol=1e-5, atol=1e-5)


def test_reference_path_refuses_a_key_span_outside_the_cache():
    q, k, v, slots, lengths = (t.cpu() for t in make_inputs(1, 2, 2, 16, torch.float32))
    for span in (0, MAX_SEQ + 1):
        with pytest.raises(ValueError, match="key_span must be in"):
            attend(q, k, v, slots, (lengths - 1)[:, None], key_span=span)


def test_fp16_cache_and_default_plan():
    q, k, v, slots, lengths = make_inputs(2, 4, 2, 32, torch.float16, seed=2)  # garbage v: 1e30 -> inf
    out = decode_attention(q, k, v, slots, lengths)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double().cpu(), reference(q, k, v, slots, lengths), rtol=5e-3, atol=5e-3)


@pytest.mark.parametrize("head_dim", [8, 24])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_dims_that_are_not_powers_of_two_or_below_16(head_dim, dtype):
    """The tile pads D to max(16, next power of two); the padding is masked on load and store."""
    q, k, v, slots, lengths = make_inputs(2, 6, 2, head_dim, dtype, seed=3)
    out = decode_attention(q, k, v, slots, lengths, num_splits=2, block_n=16)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.double().cpu(), reference(q, k, v, slots, lengths), **tol)


def test_split_tickets_are_left_at_zero_and_the_merge_is_deterministic():
    """Several splits merge in the launch (the last program of each kv head, through a ticket): the
    counters are back at zero after every launch, a reused buffer gives the same bits, and a buffer
    too small is refused. One split writes the output itself, the same values as the merge of one."""
    q, k, v, slots, lengths = make_inputs(2, 4, 2, 16, torch.float32)
    counters = torch.zeros(2 * 4 * 2, dtype=torch.int32, device=DEVICE)
    first = decode_attention(q, k, v, slots, lengths, num_splits=5, block_n=SMALL_BLOCK, counters=counters)
    assert not counters.any()
    for _ in range(2):
        assert torch.equal(decode_attention(q, k, v, slots, lengths, num_splits=5, block_n=SMALL_BLOCK,
                                            counters=counters), first)
    assert not counters.any()
    one = decode_attention(q, k, v, slots, lengths, num_splits=1, block_n=SMALL_BLOCK)
    torch.testing.assert_close(one, first, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="counters must be contiguous int32 with at least C B KV = 16"):
        decode_attention(q, k, v, slots, lengths, num_splits=5, block_n=SMALL_BLOCK, counters=counters[:15])
    with pytest.raises(ValueError, match="counters must be contiguous int32"):
        decode_attention(q, k, v, slots, lengths, num_splits=5, block_n=SMALL_BLOCK,
                         counters=torch.zeros(32, dtype=torch.int32, device=DEVICE)[::2])


@pytest.mark.parametrize("change, match", [
    (dict(slots=lambda t: t[:1]), "slots must be \\[B\\] = \\[4\\], got shape \\(1,\\)"),
    (dict(lengths=lambda t: t.float()), "lengths must be an integer tensor"),
    (dict(k=lambda t: t.to(torch.int8), v=lambda t: t.to(torch.int8)), "cache dtype must be one of"),
    (dict(v=lambda t: t.half()), "v_cache must match k_cache"),
    (dict(q=lambda t: t[0]), "q must be \\[C, B, 1, H, D\\]"),
    (dict(q=lambda t: t[:, :, :, :3]), "multiple of kv heads"),
    (dict(num_splits=-1), "num_splits must be an int >= 1"),
    (dict(block_n=0), "block_n must be a power of two"),
    (dict(block_n=12), "block_n must be a power of two"),
])
def test_rejects_bad_inputs(change, match):
    """Malformed inputs and plan overrides are ValueErrors (short slots read out of bounds, a
    negative split count gave garbage, an int8 cache wrong values)."""
    args = dict(zip(("q", "k", "v", "slots", "lengths"), make_inputs(1, 4, 2, 16, torch.float32)))
    args.update(num_splits=None, block_n=None)
    for name, value in change.items():
        args[name] = value(args[name]) if callable(value) else value
    with pytest.raises(ValueError, match=match):
        decode_attention(args["q"], args["k"], args["v"], args["slots"], args["lengths"],
                         num_splits=args["num_splits"], block_n=args["block_n"])
