"""Split-K decode attention with its tangent (adfast.kernels.decode_attention_jvp) against float64
references: torch.func.jvp of a plain softmax attention over each row's live positions (autograd
checks the tangent formula itself), adfast.attention.attend_jvp (the decoder's explicit masked
softmax), and, for ``out``, the primal kernel adfast.kernels.decode_attention. Positions >= length
and the unused slot hold NaN / huge values: any read of them would poison the output.

Tolerances (``(out, dout)``): fp32 caches run exact fp32 products with fp32 accumulation, so only
summation order and the split merge differ from float64: 1e-5, as for the primal kernel. bf16 /
fp16 caches round P and P * dS to the cache dtype before the products with V and dV (unit
roundoff 2^-8 / 2^-11) and the outputs to the cache dtype; ``out`` gets the primal kernel's
tolerances (bf16 2e-2, fp16 5e-3). ``dout = sum P (dS V + dV) - (sum P dS) out`` cancels terms of
size |dS| |V|, so its error is relative to those, not to |dout| (for a length-1 row it is,
up to the output rounding, ``(round(dS) - dS) V``). Moreover the Triton 3.9 interpreter converts fp32 to bf16 by
truncation (toward zero, up to 2^-7 relative, all errors one way), not round-to-nearest as the GPU
does, so bf16 ``dout`` gets atol 5e-2 (the largest needed over 36 seeded cases was 2.4e-2); fp16
converts round-to-nearest there and keeps 5e-3 (largest needed 1.4e-3).
"""
import pytest
import torch
from conftest import KERNEL_DEVICE as DEVICE

from adfast.attention import attend_jvp
from adfast.kernels.decode_attention import decode_attention
from adfast.kernels.decode_attention_jvp import decode_attention_jvp

# torch.func.jvp's first use imports torch's jvp decompositions, which call torch.jit.script
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

MAX_SEQ = 40
MAX_BATCH = 6
# Permuted slots (slot 2 unused). With num_splits=3 (chunk 16): length 1 (one partial block), 40
# (all three splits, last one partial), 17 and 33 (one position past a split boundary), 16 (ends
# exactly on a split boundary, so splits 1 and 2 store nothing). Blocks of 8 in the interpreter
# (two per split); 16 on a GPU, where tl.dot needs K >= 16.
BLOCK_N = 8 if DEVICE == "cpu" else 16
SLOTS = [3, 0, 5, 1, 4]
LENGTHS = [1, 40, 17, 33, 16]
TOL = {  # (out, dout); see the module docstring
    torch.float32: (dict(rtol=1e-5, atol=1e-5), dict(rtol=1e-5, atol=1e-5)),
    torch.bfloat16: (dict(rtol=2e-2, atol=2e-2), dict(rtol=2e-2, atol=5e-2)),
    torch.float16: (dict(rtol=5e-3, atol=5e-3), dict(rtol=5e-3, atol=5e-3)),
}


def make_inputs(num_copies, heads, kv_heads, head_dim, dtype, seed=0, max_seq=MAX_SEQ, slots=SLOTS,
                lengths=LENGTHS, max_batch=MAX_BATCH, q_scale=1.0):
    """``(q, dq, k, v, dk, dv, slots, lengths)`` with garbage past each row's length (including the
    scratch position ``max_seq``) and in every slot no row uses."""
    g = torch.Generator().manual_seed(seed)
    shape = (num_copies, max_batch, max_seq + 1, kv_heads, head_dim)
    k, v, dk, dv = (torch.randn(shape, generator=g) for _ in range(4))
    slots, lengths = torch.tensor(slots), torch.tensor(lengths)
    for b in range(len(slots)):
        k[:, slots[b], lengths[b]:] = float("nan")
        dk[:, slots[b], lengths[b]:] = float("nan")
        v[:, slots[b], lengths[b]:] = 1e30  # inf in fp16
        dv[:, slots[b], lengths[b]:] = -1e30
    for unused in sorted(set(range(max_batch)) - set(slots.tolist())):
        for cache in (k, v, dk, dv):
            cache[:, unused] = float("nan")
    q = torch.randn((num_copies, len(slots), 1, heads, head_dim), generator=g) * q_scale
    dq = torch.randn(q.shape, generator=g)
    to = dict(device=DEVICE, dtype=dtype)
    return (q.to(**to), dq.to(**to), k.to(**to), v.to(**to), dk.to(**to), dv.to(**to), slots.to(DEVICE),
            lengths.to(DEVICE))


def attention(q, k, v):
    """Plain softmax attention of ``q [H, D]`` over ``k, v [n, H, D]``, scale ``1 / sqrt(D)``."""
    scores = torch.einsum("hd,nhd->hn", q, k) / q.shape[-1] ** 0.5
    return torch.einsum("hn,nhd->hd", scores.softmax(-1), v)


def func_jvp_reference(q, dq, k, v, dk, dv, slots, lengths):
    """``(out, dout)`` in float64 by torch.func.jvp of :func:`attention`, row by row, live positions only."""
    num_copies, batch, _, heads, _ = q.shape
    group = heads // k.shape[3]
    out = torch.empty(q.shape, dtype=torch.float64)
    dout = torch.empty(q.shape, dtype=torch.float64)
    for c in range(num_copies):
        for b in range(batch):
            n, s = int(lengths[b]), int(slots[b])

            def live(cache):  # [n, H, D] float64
                return cache[c, s, :n].double().cpu().repeat_interleave(group, dim=1)

            primals = (q[c, b, 0].double().cpu(), live(k), live(v))
            tangents = (dq[c, b, 0].double().cpu(), live(dk), live(dv))
            out[c, b, 0], dout[c, b, 0] = torch.func.jvp(attention, primals, tangents)
    return out, dout


def attend_jvp_reference(q, dq, k, v, dk, dv, slots, lengths):
    """``(out, dout)`` by adfast.attention.attend_jvp in float64. It reads every position and masks
    the dead ones, and a masked probability times an inf or NaN value is NaN: the garbage is zeroed
    for it (the kernel gets it as is)."""
    def clean(x):
        return torch.nan_to_num(x.double().cpu(), nan=0.0, posinf=0.0, neginf=0.0)

    return attend_jvp(*map(clean, (q, dq, k, v, dk, dv)), slots.cpu(), (lengths.cpu() - 1)[:, None])


def assert_matches(got, expect, dtype):
    for g, e, tol in zip(got, expect, TOL[dtype]):
        torch.testing.assert_close(g.double().cpu(), e, **tol)


@pytest.mark.parametrize("num_copies,heads,kv_heads", [(1, 2, 2), (2, 4, 2), (1, 8, 2), (2, 3, 1), (1, 6, 1)],
                         ids=["group1", "group2-copies2", "group4", "group3-copies2", "group6"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_matches_references(num_copies, heads, kv_heads, dtype):
    head_dim = 16
    inputs = make_inputs(num_copies, heads, kv_heads, head_dim, dtype)
    out, dout = decode_attention_jvp(*inputs, num_splits=3, block_n=BLOCK_N)
    assert out.shape == dout.shape == inputs[0].shape and out.dtype == dout.dtype == dtype
    assert torch.isfinite(out).all() and torch.isfinite(dout).all()
    assert_matches((out, dout), func_jvp_reference(*inputs), dtype)
    assert_matches((out, dout), attend_jvp_reference(*inputs), dtype)
    q, _, k, v, _, _, slots, lengths = inputs
    primal = decode_attention(q, k, v, slots, lengths, num_splits=3, block_n=BLOCK_N)
    if DEVICE == "cpu":  # the interpreter runs the primal kernel's operations on out (3 splits: same sum order)
        assert torch.equal(out, primal)
    else:
        torch.testing.assert_close(out, primal, **TOL[dtype][0])


def test_garbage_is_never_read():
    """Bit-identical results whatever lies past the lengths and in the unused slot."""
    inputs = make_inputs(2, 6, 2, 16, torch.float32, seed=3)
    slots, lengths = inputs[-2:]
    caches = []
    for cache in inputs[2:6]:
        tidy = torch.zeros_like(cache)
        for b in range(len(slots)):
            tidy[:, slots[b], :lengths[b]] = cache[:, slots[b], :lengths[b]]
        caches.append(tidy)
    got = decode_attention_jvp(*inputs, num_splits=3, block_n=BLOCK_N)
    tidy = decode_attention_jvp(*inputs[:2], *caches, slots, lengths, num_splits=3, block_n=BLOCK_N)
    assert torch.equal(got[0], tidy[0]) and torch.equal(got[1], tidy[1])


@pytest.mark.parametrize("num_splits,block_n", [(None, None), (1, 16), (5, BLOCK_N)])
def test_matches_attend_jvp_fp32(num_splits, block_n):
    """Against the decoder's own fp32 path, head dim 32, several plans (5 splits of 8 positions
    in the interpreter: lengths end on and cross many split boundaries)."""
    inputs = make_inputs(2, 4, 2, 32, torch.float32, seed=1)
    got = decode_attention_jvp(*inputs, num_splits=num_splits, block_n=block_n)
    clean = [torch.nan_to_num(x, nan=0.0).clamp(-1e3, 1e3) for x in inputs[2:6]]
    expect = attend_jvp(*inputs[:2], *clean, inputs[6], (inputs[7] - 1)[:, None])
    for g, e in zip(got, expect):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert_matches(got, func_jvp_reference(*inputs), torch.float32)


def test_peaked_softmax_fp32():
    """Large scores (q scaled by 8): the running max moves across blocks and splits and most
    probabilities underflow; the rescaling of every accumulator must follow it."""
    inputs = make_inputs(1, 8, 2, 16, torch.float32, seed=4, q_scale=8.0)
    got = decode_attention_jvp(*inputs, num_splits=3, block_n=BLOCK_N)
    assert_matches(got, func_jvp_reference(*inputs), torch.float32)


def test_fp16_default_plan_crosses_splits():
    """The interpreter's default plan (block 16, two splits of 48 at max_seq_len 80) on an fp16
    cache: lengths 49 and 48 sit one past / exactly on the split boundary, 80 fills the cache."""
    inputs = make_inputs(2, 4, 2, 32, torch.float16, seed=2, max_seq=80, slots=[1, 2, 0, 3],
                         lengths=[49, 80, 1, 48], max_batch=5)
    got = decode_attention_jvp(*inputs)
    assert got[0].dtype == got[1].dtype == torch.float16
    assert_matches(got, func_jvp_reference(*inputs), torch.float16)


@pytest.mark.parametrize("head_dim", [8, 24])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_head_dims_that_are_not_powers_of_two_or_below_16(head_dim, dtype):
    """The tiles pad D to max(16, next power of two); the padding is masked on load and store."""
    inputs = make_inputs(2, 6, 2, head_dim, dtype, seed=6)
    got = decode_attention_jvp(*inputs, num_splits=2, block_n=16)
    assert got[0].shape == got[1].shape == inputs[0].shape
    assert_matches(got, func_jvp_reference(*inputs), dtype)


def test_query_dtype_differs_from_cache():
    """fp32 q and dq over bf16 caches: outputs come back in fp32 (unrounded). q and dq hold
    bf16 values, so the kernel's cast of them to the cache dtype is exact (the interpreter would
    truncate other values, the GPU round them)."""
    inputs = make_inputs(1, 4, 2, 16, torch.bfloat16, seed=5)
    q, dq = (x.float() for x in inputs[:2])
    out, dout = decode_attention_jvp(q, dq, *inputs[2:], num_splits=3, block_n=BLOCK_N)
    assert out.dtype == dout.dtype == torch.float32
    assert_matches((out, dout), func_jvp_reference(*inputs), torch.bfloat16)


def _valid():
    q = torch.randn(2, 3, 1, 4, 16)
    cache = torch.randn(2, 4, 9, 2, 16)
    return dict(q=q, dq=torch.randn_like(q), k_cache=cache, v_cache=cache.clone(), dk_cache=cache.clone(),
                dv_cache=cache.clone(), slots=torch.tensor([2, 0, 1]), lengths=torch.tensor([1, 8, 3]))


def _with(**changes):
    args = _valid()
    for name, change in changes.items():
        args[name] = change(args[name]) if callable(change) else change
    return args


BAD_INPUTS = {
    "two queries per row": (_with(q=lambda q: q.expand(-1, -1, 2, -1, -1), dq=lambda q: q.expand(-1, -1, 2, -1, -1)),
                            "one query per row"),
    "q not 5-d": (_with(q=lambda q: q[0], dq=lambda q: q[0]), "q must be"),
    "dq shape": (_with(dq=lambda q: q[:, :2]), "dq must match q"),
    "dq dtype": (_with(dq=lambda q: q.double()), "dq must match q"),
    "integer q": (_with(q=lambda q: q.int(), dq=lambda q: q.int()), "floating"),
    "empty head dim": (_with(**{n: (lambda x: x[..., :0]) for n in
                                ("q", "dq", "k_cache", "v_cache", "dk_cache", "dv_cache")}), "head_dim must be"),
    "float64 caches": (_with(**{n: (lambda x: x.double()) for n in ("k_cache", "v_cache", "dk_cache", "dv_cache")}),
                       "cache dtype"),
    "v dtype": (_with(v_cache=lambda x: x.half()), "v_cache must match k_cache"),
    "dk shape": (_with(dk_cache=lambda x: x[:, :3]), "dk_cache must match k_cache"),
    "dv dtype": (_with(dv_cache=lambda x: x.bfloat16()), "dv_cache must match k_cache"),
    "copies": (_with(q=lambda q: q[:1], dq=lambda q: q[:1]), "copies"),
    "cache head dim": (_with(**{n: (lambda x: torch.cat([x, x], -1)) for n in
                                ("k_cache", "v_cache", "dk_cache", "dv_cache")}), "head_dim"),
    "heads not a multiple of kv heads": (_with(q=lambda q: q[:, :, :, :3], dq=lambda q: q[:, :, :, :3]), "multiple"),
    "strided head dim": (_with(k_cache=lambda x: torch.cat([x, x], -1)[..., ::2]), "unit stride"),
    "slots shape": (_with(slots=torch.tensor([0, 1])), "slots must be"),
    "float lengths": (_with(lengths=torch.tensor([1.0, 8.0, 3.0])), "integer"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_rejects_bad_inputs(name):
    args, match = BAD_INPUTS[name]
    with pytest.raises(ValueError, match=match):
        decode_attention_jvp(**args)
