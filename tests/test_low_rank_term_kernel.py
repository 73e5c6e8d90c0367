"""The low-rank term ``z U^T`` that the fused jvp layer kernels add to a tangent as they load it
(adfast.kernels.low_rank_term), in each of the three kernels that take one.

Reference: the same kernel given the tangent with the term already added, ``round(d + z U^T)``
taken in float64 and rounded once (what an in-place ``addmm_`` leaves, exactly rounded). The
kernel sums in float32, so its tangent can sit one ulp from the reference's where the two sums
round to different sides: tangent outputs agree to a couple of the dtype's ulps, primal outputs
bit for bit. ``z`` is a column slice of a wider buffer (as linear_jvp's matmul output) and ``U`` is
expanded over the copies (stride 0), as the decoder passes them, stored as the decoder keeps it
(a contiguous ``U^T``) or row-major. Ranks 1, 11, 16: the kernels' loop over the rank unrolls by
8, so these cover the tail alone, one chunk and a tail, and whole chunks. The PyTorch twins
(adfast.layer_ops) take the same term; refusals name the problem.
"""
import pytest
import torch
from conftest import KERNEL_DEVICE as DEVICE

from adfast.kernels.low_rank_term import MAX_RANK
from adfast.kernels.rms_norm import add_rms_norm_jvp
from adfast.kernels.rotary_cache import rope_and_cache_write_jvp
from adfast.kernels.silu_mul import silu_mul_jvp
from adfast.layer_ops import LOW_RANK_MAX_RANK, TORCH, LowRankTerm

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


LAYOUTS = ["U^T contiguous", "U contiguous"]


def make_term(copies, rows, width, rank, dtype, layout=LAYOUTS[0], seed=0):
    """``z [C, N, R]`` (columns 3.. of a wider buffer) and ``U [C, m, R]`` (one matrix expanded over the
    copies, in ``layout``), scaled so that ``z U^T`` is of order 1."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(copies, rows, rank + 5, generator=g).to(DEVICE, dtype)[..., 3:3 + rank]
    u = (torch.randn(width, rank, generator=g) / rank ** 0.5).to(DEVICE, dtype)
    if layout == "U^T contiguous":
        u = u.T.contiguous().T
    return z, u[None].expand(copies, width, rank)


def added(d, z, u):
    """``round(d + z U^T)``, the sum in float64."""
    return (d.double() + torch.bmm(z.double(), u.double().transpose(1, 2))).to(d.dtype)


def randn(*shape, dtype, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def test_the_decoder_and_the_kernels_share_the_rank_bound():
    assert LOW_RANK_MAX_RANK == MAX_RANK


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rank", [1, 11, 16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_jvp(dtype, rank, layout):
    copies, rows, inter = 2, 3, 80  # 2 I = 160 columns: several column blocks and a masked tail
    gate_up, dgate_up = randn(copies, rows, 2 * inter, dtype=dtype, seed=1), randn(copies, rows, 2 * inter,
                                                                                      dtype=dtype, seed=2)
    z, u = make_term(copies, rows, 2 * inter, rank, dtype, layout)
    a, da = silu_mul_jvp(gate_up, dgate_up, low_rank=(z, u))
    a_ref, da_ref = silu_mul_jvp(gate_up, added(dgate_up, z, u))
    assert torch.equal(a, a_ref)
    torch.testing.assert_close(da, da_ref, **TOL[dtype])
    if dtype == torch.float32:  # the PyTorch twin takes the same term
        a_torch, da_torch = TORCH.silu_mul_jvp(gate_up, dgate_up, low_rank=LowRankTerm(z, u))
        torch.testing.assert_close(da_torch, TORCH.silu_mul_jvp(gate_up, added(dgate_up, z, u))[1], **TOL[dtype])
        torch.testing.assert_close(da, da_torch, **TOL[dtype])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rank", [1, 11, 16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_jvp(dtype, rank, layout):
    copies, rows, hidden = 2, 3, 48
    x, res, dx, dres = (randn(copies, rows, hidden, dtype=dtype, seed=s) for s in range(4))
    weight = (1 + 0.2 * randn(copies, hidden, dtype=torch.float32, seed=5)).to(dtype)
    dweight = 0.1 * randn(copies, hidden, dtype=dtype, seed=6)
    z, u = make_term(copies, rows, hidden, rank, dtype, layout)
    s, ds, y, dy = add_rms_norm_jvp(x, dx, weight, dweight, 1e-6, res, dres, low_rank=(z, u))
    s_ref, ds_ref, y_ref, dy_ref = add_rms_norm_jvp(x, dx, weight, dweight, 1e-6, res, added(dres, z, u))
    assert torch.equal(s, s_ref) and torch.equal(y, y_ref)
    torch.testing.assert_close(ds, ds_ref, **TOL[dtype])
    torch.testing.assert_close(dy, dy_ref, **TOL[dtype])
    if dtype == torch.float32:
        outputs = TORCH.add_rms_norm_jvp(x, dx, weight, dweight, 1e-6, res, dres, low_rank=LowRankTerm(z, u))
        for got, want in zip(outputs, (s, ds, y, dy)):
            torch.testing.assert_close(got, want, **TOL[dtype])


MAX_BATCH, MAX_SEQ = 4, 8


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("rank", [1, 11, 16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_and_cache_write_jvp(dtype, rank, with_bias, layout):
    """The term covers every column of the fused projection (q, k and v heads) and joins before the bias."""
    copies, batch, seq, heads, kv_heads, head_dim = 2, 2, 3, 6, 2, 8
    width = (heads + 2 * kv_heads) * head_dim
    qkv, dqkv = randn(copies, batch * seq, width, dtype=dtype, seed=1), randn(copies, batch * seq, width,
                                                                               dtype=dtype, seed=2)
    angles = 6 * torch.rand(batch, seq, head_dim, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    slots = torch.tensor([3, 1], device=DEVICE)
    write_pos = torch.tensor([[0, 1, 2], [4, 5, MAX_SEQ]], device=DEVICE)  # row 1's last token is padding
    bias, dbias = ((randn(copies, width, dtype=dtype, seed=s) for s in (4, 5)) if with_bias else (None, None))
    z, u = make_term(copies, batch * seq, width, rank, dtype, layout)

    def run(dqkv, low_rank):
        caches = [torch.full((copies, MAX_BATCH, MAX_SEQ + 1, kv_heads, head_dim), 7.5, dtype=dtype, device=DEVICE)
                  for _ in range(4)]
        q, dq = rope_and_cache_write_jvp(qkv, dqkv, angles.cos(), angles.sin(), *caches, slots, write_pos, heads,
                                         kv_heads, bias, dbias, low_rank=low_rank)
        for cache in caches:
            cache[:, :, MAX_SEQ] = 0  # the scratch position of padding tokens: never read
        return q, dq, caches

    q, dq, caches = run(dqkv, (z, u))
    q_ref, dq_ref, caches_ref = run(added(dqkv, z, u), None)
    assert torch.equal(q, q_ref)
    torch.testing.assert_close(dq, dq_ref, **TOL[dtype])
    for got, want in zip(caches[:2], caches_ref[:2]):  # k, v
        assert torch.equal(got, want)
    for got, want in zip(caches[2:], caches_ref[2:]):  # dk, dv
        torch.testing.assert_close(got, want, **TOL[dtype])


def _bad_terms():
    x = torch.zeros(2, 3, 16, device=DEVICE)
    z, u = make_term(2, 3, 16, 4, torch.float32)
    wide_z, wide_u = make_term(2, 3, 16, MAX_RANK + 1, torch.float32)
    return [
        ("a pair of tensors", [z]),
        ("z \\[C, N, R\\] and U \\[C, m, R\\]", (z, u[:, :8])),
        ("z \\[C, N, R\\] and U \\[C, m, R\\]", (z[:, :2], u)),
        (f"1 <= R <= {MAX_RANK}", (wide_z, wide_u)),
        ("must be torch.float32", (z.half(), u)),
    ], x


@pytest.mark.parametrize("case", range(5))
def test_malformed_terms_are_refused(case):
    cases, x = _bad_terms()
    match, low_rank = cases[case]
    w = torch.ones(2, 16, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        add_rms_norm_jvp(x, x, w, w, 1e-6, x, x, low_rank=low_rank)
    with pytest.raises(ValueError, match=match):
        silu_mul_jvp(torch.zeros(2, 3, 16, device=DEVICE), torch.zeros(2, 3, 16, device=DEVICE), low_rank=low_rank)


def test_rms_norm_term_needs_a_residual_tangent():
    x = torch.zeros(1, 2, 8, device=DEVICE)
    w = torch.ones(1, 8, device=DEVICE)
    with pytest.raises(ValueError, match="low_rank is a term of dresidual"):
        add_rms_norm_jvp(x, x, w, w, 1e-6, x, None, low_rank=make_term(1, 2, 8, 2, torch.float32))
