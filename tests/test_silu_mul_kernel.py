"""Fused SiLU-gated activation (adfast.kernels.silu_mul) and its tangent, against the decoder's
PyTorch expressions (adfast.layer_ops.silu_mul / silu_mul_jvp: ``F.silu(gate) * up`` and
``sig (1 + gate (1 - sig)) dgate up + silu(gate) dup``), against float64 references, and for the
tangent against torch.func.jvp of the float64 function.

Tolerances are per element in units of ``eps = torch.finfo(dtype).eps`` (the spacing at 1.0:
``k eps |v|`` is at least ``k`` ulps of ``v``) times a magnitude bound: ``|a|`` for the primal,
``s (1 + |g (1 - s)|) |dg u| + |silu(g) du|`` for the tangent (``s = sigmoid(g)``: the terms of
``da`` and of ``silu'(g) = s (1 + g (1 - s))`` cancel, near ``g = -1.28`` for the latter, and
rounding errors scale with the terms, not with ``|da|``).

* Against float64 the kernel computes in float32 and rounds once: float32 8 eps (about 1e-6
  relative; measured up to 1.9), float16 1 eps (0.5 for the rounding to nearest plus float32
  noise; measured 0.47), bfloat16 2 eps (the triton 3.9 interpreter truncates fp32 to bf16:
  below 1 eps, plus float32 noise; measured 0.97).
* Against torch, whose own error adds to the kernel's: torch rounds ``silu(gate)`` before the
  product (primal: up to 1 eps from float64), so 2 eps for float16 and 3 for bfloat16 (measured
  0.98 and 1.5). Its tangent rounds ``sigmoid(gate)`` to the dtype before forming ``1 - sig``
  and multiplying by ``gate``, an absolute error of about ``eps |gate| sig`` in ``silu'``, and
  every further op adds half an eps: the bound there is ``k eps (sig (1 + |gate|) |dg u| +
  |silu du|)``, k = 4 (measured up to 1.8).
* The "rounded once" semantics are checked directly for float16 (rounded to nearest by the
  interpreter as by the GPU): the outputs equal torch's float32 computation rounded once to the
  dtype, bit for bit but where float32 ``exp`` differences flip a rounding (>= 99% equal).
"""
import pytest
import torch
import torch.nn.functional as F
from conftest import KERNEL_DEVICE as DEVICE, assert_within
from torch.func import jvp

from adfast import layer_ops
from adfast.kernels.silu_mul import silu_mul, silu_mul_jvp

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1, 200), (2, 3, 48), (2, 1, 100), (1, 4, 37)]  # (C, N, I): several column blocks, masked tails
REF_K = {torch.float32: 8, torch.float16: 1, torch.bfloat16: 2}
TORCH_K = {torch.float32: 8, torch.float16: 2, torch.bfloat16: 3}
TORCH_TANGENT_K = {torch.float32: 8, torch.float16: 4, torch.bfloat16: 4}


def make_inputs(num_copies, rows, inter, dtype, seed=0):
    """gate_up, dgate_up [C, N, 2 I]: gate ~ 3 N(0, 1) (saturated and linear regions), the rest N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn((num_copies, rows, 2 * inter), generator=g)
    gate_up[..., :inter] *= 3
    dgate_up = torch.randn((num_copies, rows, 2 * inter), generator=g)
    return gate_up.to(device=DEVICE, dtype=dtype), dgate_up.to(device=DEVICE, dtype=dtype)


def silu_mul64(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return gate * torch.sigmoid(gate) * up


def tangent64(gate_up, dgate_up):
    """Closed form in float64: ``(da, scale, torch_scale)`` (magnitude bounds, see the module docstring)."""
    (gate, up), (dgate, dup) = gate_up.chunk(2, dim=-1), dgate_up.chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    dsilu = sig * (1 + gate * (1 - sig))
    da = dsilu * dgate * up + gate * sig * dup
    scale = sig * (1 + (gate * (1 - sig)).abs()) * (dgate * up).abs() + (gate * sig * dup).abs()
    torch_scale = sig * (1 + gate.abs()) * (dgate * up).abs() + (gate * sig * dup).abs()
    return da, scale, torch_scale


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(shape, dtype):
    gate_up, _ = make_inputs(*shape, dtype)
    a = silu_mul(gate_up)
    assert a.shape == (*shape[:2], shape[2]) and a.dtype == dtype and a.is_contiguous()

    a_torch = layer_ops.silu_mul(gate_up)  # (a) the decoder's expression: silu rounded, then the product
    assert_within(a, a_torch, a_torch.abs(), TORCH_K[dtype], dtype, "a vs torch")
    a64 = silu_mul64(gate_up.double().cpu())  # (b) float64
    assert_within(a, a64, a64.abs(), REF_K[dtype], dtype, "a vs float64")
    if dtype == torch.float16 or (dtype == torch.bfloat16 and DEVICE == "cuda"):
        gate, up = gate_up.float().chunk(2, dim=-1)
        assert (a == (F.silu(gate) * up).to(dtype)).float().mean() >= 0.99  # rounded once


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_jvp(shape, dtype):
    gate_up, dgate_up = make_inputs(*shape, dtype)
    a, da = silu_mul_jvp(gate_up, dgate_up)
    assert da.shape == (*shape[:2], shape[2]) and da.dtype == dtype and da.is_contiguous()
    assert torch.equal(a, silu_mul(gate_up))  # the primal is silu_mul's, bit for bit

    gu64, dgu64 = gate_up.double().cpu(), dgate_up.double().cpu()
    da64, scale, torch_scale = tangent64(gu64, dgu64)
    a_ad, da_ad = jvp(silu_mul64, (gu64,), (dgu64,))  # autograd checks the closed form
    torch.testing.assert_close(da64, da_ad, rtol=1e-12, atol=1e-12 * scale.max().item())

    a_t, da_t = layer_ops.silu_mul_jvp(gate_up, dgate_up)  # (a) the decoder's expressions
    assert_within(a, a_t, a_t.abs(), TORCH_K[dtype], dtype, "a vs torch")
    assert_within(da, da_t, torch_scale, TORCH_TANGENT_K[dtype], dtype, "da vs torch")
    assert_within(a, a_ad, a_ad.abs(), REF_K[dtype], dtype, "a vs float64")  # (b) float64 / autograd
    assert_within(da, da_ad, scale, REF_K[dtype], dtype, "da vs jvp")
    if dtype == torch.float16 or (dtype == torch.bfloat16 and DEVICE == "cuda"):
        (gate, up), (dgate, dup) = gate_up.float().chunk(2, dim=-1), dgate_up.float().chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        da_once = (sig * (1 + gate * (1 - sig)) * dgate * up + gate * sig * dup).to(dtype)
        assert (da == da_once).float().mean() >= 0.99  # float32 inside, rounded once


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("dtype", DTYPES)
def test_saturated_gates(dtype):
    """Gates far in both tails (exp(-gate) overflows to inf at -1000 in float32): finite, with the
    right limits (at -90 the true silu, 7e-38, is below float32's normal range: not tested)."""
    gate = torch.tensor([-1000.0, -60.0, -20.0, -5.0, 0.0, 5.0, 20.0, 60.0, 1000.0])
    gate_up = torch.cat([gate, torch.linspace(-2, 2, len(gate))])[None, None].to(device=DEVICE, dtype=dtype)
    dgate_up = torch.cat([torch.ones(len(gate)), torch.full((len(gate),), 0.5)])[None, None].to(DEVICE, dtype)
    a, da = silu_mul_jvp(gate_up, dgate_up)
    assert torch.isfinite(a).all() and torch.isfinite(da).all()
    gu64, dgu64 = gate_up.double().cpu(), dgate_up.double().cpu()
    da64, scale, _ = tangent64(gu64, dgu64)
    assert_within(a, silu_mul64(gu64), silu_mul64(gu64).abs(), REF_K[dtype], dtype, "a")
    assert_within(da, da64, scale, REF_K[dtype], dtype, "da")


def test_silu_derivative_float32():
    """silu' in float32 within 2 eps of float64 relative to s (1 + |g (1 - s)|) over g in [-30, 30]:
    the kernel forms 1 - s as exp(-g) s for g >= 0 (1 - s itself would lose up to g eps there)."""
    gate = torch.linspace(-30, 30, 601)
    gate_up = torch.cat([gate, torch.ones_like(gate)])[None, None].to(DEVICE)
    dgate_up = torch.cat([torch.ones_like(gate), torch.zeros_like(gate)])[None, None].to(DEVICE)
    _, dsilu = silu_mul_jvp(gate_up, dgate_up, block=1024 if DEVICE == "cpu" else None)
    g = gate.double()
    s = torch.sigmoid(g)
    assert_within(dsilu[0, 0], s * (1 + g * (1 - s)), s * (1 + (g * (1 - s)).abs()), 2, torch.float32, "silu'")


def test_block_sizes_and_strides_give_the_same_bits():
    """Column blocks and row strides (slices, transposed copy/row dimensions) do not change any bit."""
    C, N, inter, dtype = 2, 3, 100, torch.bfloat16
    gate_up, dgate_up = make_inputs(C, N, inter, dtype)
    want = silu_mul_jvp(gate_up, dgate_up)
    for block in (16, 128, 1024):
        got = silu_mul_jvp(gate_up, dgate_up, block=block)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(silu_mul(gate_up, block=32), want[0])
    gu_s = torch.zeros(C, N, 2 * inter + 5, device=DEVICE, dtype=dtype)[:, :, 3:3 + 2 * inter].copy_(gate_up)
    dgu_s = dgate_up.transpose(0, 1).contiguous().transpose(0, 1)
    assert not gu_s.is_contiguous() and not dgu_s.is_contiguous()
    got = silu_mul_jvp(gu_s, dgu_s)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(silu_mul(gu_s), want[0])


def test_empty_rows():
    gate_up = torch.empty(2, 0, 8, device=DEVICE)
    assert silu_mul(gate_up).shape == (2, 0, 4)
    assert silu_mul_jvp(gate_up, gate_up)[1].shape == (2, 0, 4)


def _bad_calls():
    gu = torch.randn(2, 3, 8, device=DEVICE)
    return [
        ("gate_up must be \\[C, N, 2 I\\]", lambda: silu_mul(gu[0])),
        ("last dimension must be 2 I", lambda: silu_mul(gu[:, :, :7])),
        ("gate_up dtype must be one of", lambda: silu_mul(gu.double())),
        ("gate_up dtype must be one of", lambda: silu_mul(gu.int())),
        ("dgate_up must match gate_up", lambda: silu_mul_jvp(gu, gu[:, :2])),
        ("dgate_up must match gate_up", lambda: silu_mul_jvp(gu, gu.bfloat16())),
        ("gate_up must have a unit stride", lambda: silu_mul(gu[:, :, ::2])),
        ("dgate_up must have a unit stride", lambda: silu_mul_jvp(gu, gu.mT.contiguous().mT)),
        ("one device", lambda: silu_mul_jvp(gu, gu.to("meta"))),
        ("block must be a power of two", lambda: silu_mul(gu, block=48)),
        ("gate_up must be a torch.Tensor", lambda: silu_mul([1.0, 2.0])),
    ]


@pytest.mark.parametrize("match,call", _bad_calls())
def test_rejects_malformed_inputs(match, call):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replay():
    """The launch is sync-free: captured in a CUDA graph, a replay on new inputs gives new outputs."""
    gate_up, dgate_up = make_inputs(2, 1, 1536, torch.bfloat16)
    silu_mul_jvp(gate_up, dgate_up)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = silu_mul_jvp(gate_up, dgate_up)
    new_gate_up, new_dgate_up = make_inputs(2, 1, 1536, torch.bfloat16, seed=1)
    gate_up.copy_(new_gate_up)
    dgate_up.copy_(new_dgate_up)
    graph.replay()
    want = silu_mul_jvp(gate_up, dgate_up)
    assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])
