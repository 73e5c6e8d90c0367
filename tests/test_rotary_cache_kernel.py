"""The fused rotary + KV-cache-write kernel (adfast.kernels.rotary_cache) against the PyTorch path
(adfast.layer_ops) and a float64 rotation, primal and tangent.

Caches start filled with a sentinel: every position and slot the tokens do not write must stay
bit-identical. float64 reference: the rotation of the dtype-rounded inputs by the dtype-rounded
tables (what the kernel computes in float32 and rounds once), so fp32 agrees to float32 round-off
and bf16/fp16 to one rounding of the output (the interpreter's bf16 conversion truncates: up to
one bf16 ulp, 2^-7 relative, rather than half of one).
"""
import pytest
import torch
from conftest import KERNEL_DEVICE as DEVICE

from adfast.kernels.rotary_cache import rope_and_cache_write, rope_and_cache_write_jvp
from adfast.layer_ops import TORCH

SENTINEL = 7.5
MAX_BATCH, MAX_SEQ = 5, 12


def make(copies, batch, seq, heads, kv_heads, head_dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = (heads + 2 * kv_heads) * head_dim
    qkv = torch.randn(copies, batch * seq, width, generator=g).to(dtype)
    dqkv = torch.randn(copies, batch * seq, width, generator=g).to(dtype)
    # Real tables repeat one half (cat(freqs, freqs)); independent halves check each half is read.
    angles = torch.rand(batch, seq, head_dim, generator=g) * 6.0
    cos, sin = angles.cos(), angles.sin()
    slots = torch.randperm(MAX_BATCH, generator=g)[:batch]
    lengths = torch.randint(1, seq + 1, (batch,), generator=g)  # right padding goes to the scratch position
    start = torch.randint(0, MAX_SEQ - seq, (batch,), generator=g)
    t = torch.arange(seq)[None]
    write_pos = torch.where(t < lengths[:, None], start[:, None] + t, MAX_SEQ)
    return tuple(x.to(DEVICE) for x in (qkv, dqkv, cos, sin, slots, write_pos))


def caches(copies, kv_heads, head_dim, dtype, count):
    return [torch.full((copies, MAX_BATCH, MAX_SEQ + 1, kv_heads, head_dim), SENTINEL, dtype=dtype, device=DEVICE)
            for _ in range(count)]


def rotate64(x, cos, sin, dtype):
    """float64 rope of ``x [C, B, T, heads, D]`` by tables rounded to ``dtype``."""
    cos = cos.to(dtype).double().cpu()[None, :, :, None]
    sin = sin.to(dtype).double().cpu()[None, :, :, None]
    x = x.double().cpu()
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat((-x2, x1), -1) * sin


def split(qkv, batch, heads, kv_heads):
    copies, rows, width = qkv.shape
    d = width // (heads + 2 * kv_heads)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], -1)
    return (q.reshape(copies, batch, rows // batch, heads, d), k.reshape(copies, batch, rows // batch, kv_heads, d),
            v.reshape(copies, batch, rows // batch, kv_heads, d))


TOL = {torch.float32: dict(rtol=2e-6, atol=2e-6), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("copies,batch,seq,heads,kv_heads,head_dim",
                         [(1, 3, 1, 4, 2, 8), (2, 2, 4, 6, 3, 24), (2, 1, 3, 4, 4, 16)])
def test_matches_float64_rotation_and_writes_only_its_positions(dtype, copies, batch, seq, heads, kv_heads, head_dim):
    qkv, _, cos, sin, slots, write_pos = make(copies, batch, seq, heads, kv_heads, head_dim, dtype)
    k_cache, v_cache = caches(copies, kv_heads, head_dim, dtype, 2)
    q = rope_and_cache_write(qkv, cos, sin, k_cache, v_cache, slots, write_pos, heads, kv_heads)
    assert q.shape == (copies, batch, seq, heads, head_dim) and q.dtype == dtype
    q_in, k_in, v_in = split(qkv, batch, heads, kv_heads)
    torch.testing.assert_close(q.double().cpu(), rotate64(q_in, cos, sin, dtype), **TOL[dtype])
    expect_k, expect_v = rotate64(k_in, cos, sin, dtype), v_in.double().cpu()
    k_cache, v_cache, slots, write_pos = k_cache.cpu(), v_cache.cpu(), slots.cpu(), write_pos.cpu()
    written = torch.zeros(MAX_BATCH, MAX_SEQ + 1, dtype=torch.bool)
    for b in range(batch):
        for t in range(seq):
            pos = int(write_pos[b, t])
            if pos == MAX_SEQ:
                continue  # scratch: any padding token of any row may land there
            written[slots[b], pos] = True
            torch.testing.assert_close(k_cache[:, slots[b], pos].double(), expect_k[:, b, t], **TOL[dtype])
            assert torch.equal(v_cache[:, slots[b], pos].double(), expect_v[:, b, t])
    written[:, MAX_SEQ] = True
    for cache in (k_cache, v_cache):
        assert (cache[:, ~written] == SENTINEL).all()


def biases(copies, width, dtype, seed=3):
    """A bias per copy and a tangent shared by the copies (expanded: stride 0, as the decoder's)."""
    g = torch.Generator().manual_seed(seed)
    bias = torch.randn(copies, width, generator=g).to(dtype).to(DEVICE)
    dbias = torch.randn(width, generator=g).to(dtype).to(DEVICE)[None].expand(copies, width)
    return bias, dbias


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_the_pytorch_path(dtype, with_bias):
    qkv, dqkv, cos, sin, slots, write_pos = make(2, 3, 2, 4, 2, 16, dtype, seed=1)
    bias, dbias = biases(2, qkv.shape[2], dtype) if with_bias else (None, None)
    ours, theirs = caches(2, 2, 16, dtype, 4), caches(2, 2, 16, dtype, 4)
    q, dq = rope_and_cache_write_jvp(qkv, dqkv, cos, sin, *ours, slots, write_pos, 4, 2, bias, dbias)
    q_ref, dq_ref = TORCH.rope_and_cache_write_jvp(qkv, dqkv, cos, sin, *theirs, slots, write_pos, 4, 2, bias, dbias)
    # bf16: PyTorch rounds x cos, rotate_half(x) sin and their sum; the kernel rounds once, and under the
    # interpreter truncates (the bias sum too): two bf16 ulps apart, four with a bias.
    bf16_tol = 3.2e-2 if with_bias else 1.6e-2
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=bf16_tol, atol=bf16_tol)
    torch.testing.assert_close(q, q_ref, **tol)
    torch.testing.assert_close(dq, dq_ref, **tol)
    for a, b in zip(ours, theirs):
        a[:, :, MAX_SEQ], b[:, :, MAX_SEQ] = 0, 0  # scratch: which padding token lands last is unspecified
        torch.testing.assert_close(a, b, **tol)


def test_tangent_is_the_rotation_of_the_tangent():
    """Rotary is linear in x: the tangent outputs are the primal kernel applied to dqkv, bit for bit."""
    qkv, dqkv, cos, sin, slots, write_pos = make(2, 2, 3, 6, 2, 8, torch.float32, seed=2)
    both = caches(2, 2, 8, torch.float32, 4)
    q, dq = rope_and_cache_write_jvp(qkv, dqkv, cos, sin, *both, slots, write_pos, 6, 2)
    alone = caches(2, 2, 8, torch.float32, 4)
    assert torch.equal(q, rope_and_cache_write(qkv, cos, sin, alone[0], alone[1], slots, write_pos, 6, 2))
    assert torch.equal(dq, rope_and_cache_write(dqkv, cos, sin, alone[2], alone[3], slots, write_pos, 6, 2))
    for a, b in zip(both, alone):
        a[:, :, MAX_SEQ], b[:, :, MAX_SEQ] = 0, 0
        assert torch.equal(a, b)


@pytest.mark.parametrize("tangent_bias", [True, False])
def test_bias_is_added_first(tangent_bias):
    """With a bias (and a tangent bias, or None for zero) the outputs are those of the same kernel
    on ``qkv + bias`` and ``dqkv + dbias``, bit for bit (float32: the kernel's sum rounds as PyTorch's)."""
    qkv, dqkv, cos, sin, slots, write_pos = make(2, 2, 3, 6, 2, 8, torch.float32, seed=4)
    bias, dbias = biases(2, qkv.shape[2], torch.float32)
    dbias = dbias if tangent_bias else None
    with_bias = caches(2, 2, 8, torch.float32, 4)
    q, dq = rope_and_cache_write_jvp(qkv, dqkv, cos, sin, *with_bias, slots, write_pos, 6, 2, bias, dbias)
    added = caches(2, 2, 8, torch.float32, 4)
    dqkv_added = dqkv + dbias[:, None] if tangent_bias else dqkv
    q_ref, dq_ref = rope_and_cache_write_jvp(qkv + bias[:, None], dqkv_added, cos, sin, *added, slots, write_pos,
                                             6, 2)
    assert torch.equal(q, q_ref) and torch.equal(dq, dq_ref)
    assert torch.equal(q, rope_and_cache_write(qkv, cos, sin, *caches(2, 2, 8, torch.float32, 2), slots,
                                               write_pos, 6, 2, bias))
    for a, b in zip(with_bias, added):
        a[:, :, MAX_SEQ], b[:, :, MAX_SEQ] = 0, 0
        assert torch.equal(a, b)


def test_errors():
    qkv, dqkv, cos, sin, slots, write_pos = make(1, 2, 1, 4, 2, 8, torch.float32)
    k, v = caches(1, 2, 8, torch.float32, 2)
    args = (cos, sin, k, v, slots, write_pos)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        rope_and_cache_write(qkv, *args, 3, 2)
    with pytest.raises(ValueError, match="even head dim"):
        rope_and_cache_write(qkv[..., :-1], *args, 4, 2)
    with pytest.raises(ValueError, match="float32"):
        rope_and_cache_write(qkv.double(), *args, 4, 2)
    with pytest.raises(ValueError, match="cos and sin"):
        rope_and_cache_write(qkv, cos.double(), sin, k, v, slots, write_pos, 4, 2)
    with pytest.raises(ValueError, match="cos and sin must share one layout"):
        wide = torch.zeros(*sin.shape[:2], 2 * sin.shape[2], device=DEVICE)
        wide[..., :sin.shape[2]] = sin
        rope_and_cache_write(qkv, cos, wide[..., :sin.shape[2]], k, v, slots, write_pos, 4, 2)
    with pytest.raises(ValueError, match="token rows"):
        rope_and_cache_write(qkv[:, :1], *args, 4, 2)
    with pytest.raises(ValueError, match="write_pos"):
        rope_and_cache_write(qkv, cos, sin, k, v, slots, write_pos[:, :0], 4, 2)
    with pytest.raises(ValueError, match="caches must be"):
        rope_and_cache_write(qkv, cos, sin, k[..., :4], v[..., :4], slots, write_pos, 4, 2)
    with pytest.raises(ValueError, match="share shape"):
        rope_and_cache_write(qkv, cos, sin, k, v.half(), slots, write_pos, 4, 2)
    with pytest.raises(ValueError, match="bias must be"):
        rope_and_cache_write(qkv, *args, 4, 2, torch.zeros(1, qkv.shape[2] - 1, device=DEVICE))
    with pytest.raises(ValueError, match="dbias must be"):
        rope_and_cache_write_jvp(qkv, dqkv, cos, sin, k, v, k.clone(), v.clone(), slots, write_pos, 4, 2,
                                 torch.zeros(1, qkv.shape[2], device=DEVICE), torch.zeros(1, qkv.shape[2]).half())
    with pytest.raises(ValueError, match="dqkv must match"):
        rope_and_cache_write_jvp(qkv, dqkv.half(), cos, sin, k, v, k.clone(), v.clone(), slots, write_pos, 4, 2)
