"""Fused residual add + RMSNorm (adfast.kernels.rms_norm) and its tangent, against the decoder's
PyTorch functions (adfast.layer_ops: the residual added in torch, then rms_norm / rms_norm_jvp),
against float64 references, and for the tangent against torch.func.jvp of the float64 function.

Tolerances are stated per element in units of ``eps = torch.finfo(dtype).eps`` (the spacing at
1.0, so ``k eps |v|`` is at least ``k`` ulps of ``v``) times a magnitude bound of the quantity:
``|y|`` for the primal, and for ``dy = dw normed + w dnormed`` the sum of its terms' magnitudes
(``|dw normed| + |w| r (|ds| + |s| r^2 mean(|s ds|))``), because its terms cancel and rounding
and summation errors scale with them, not with ``|dy|``.

* float32, 8 eps (about 1e-6 relative): only summation order and ``rsqrt`` differ (measured:
  up to 2.5 eps).
* float16 (rounded to nearest, as on the GPU): ``y`` 2 eps. Against float64 the kernel's three
  roundings (``s``, ``normed``, ``y``) cost at most 0.5 eps each; against torch, which rounds
  the same values the same way, the two agree bit for bit except where their float32 ``s r``
  (summed in different orders) straddle a rounding boundary of ``normed`` (then one ulp of
  ``normed``, up to two of ``y``), which the test also checks (>= 99% of ``y`` bitwise equal).
  ``dy`` 3 eps: ``dnormed``'s and ``dy``'s roundings, plus ``s``'s and ``normed``'s moving the
  terms (torch rounds its two products separately: half an eps more). Measured: 1.2 and 1.3 eps.
* bfloat16: the triton 3.9 interpreter truncates fp32 to bf16 (an error below 1 eps per rounding
  instead of 0.5), so three truncations give up to 3 eps against float64, plus torch's own
  rounding against torch: ``y`` 4 eps, ``dy`` 5 (measured: 2.8 and 2.6).
"""
import pytest
import torch
from conftest import KERNEL_DEVICE as DEVICE, assert_within
from torch.func import jvp

from adfast import layer_ops
from adfast.kernels.rms_norm import MAX_HIDDEN, add_rms_norm, add_rms_norm_jvp

EPS = 1e-6
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1, 576), (2, 3, 200), (2, 1, 48), (1, 4, 48)]  # (C, N, E): E not a power of two
PRIMAL_K = {torch.float32: 8, torch.float16: 2, torch.bfloat16: 4}
TANGENT_K = {torch.float32: 8, torch.float16: 3, torch.bfloat16: 5}


def make_inputs(num_copies, rows, hidden, dtype, seed=0):
    """x, residual, dx, dresidual [C, N, E] (rows at scales 0.05 .. 20), weight ~ 1, dweight ~ 0.1."""
    g = torch.Generator().manual_seed(seed)
    scale = 10 ** torch.linspace(-1.3, 1.3, rows)[None, :, None]

    def rand(*shape, s=1.0):
        return (torch.randn(shape, generator=g) * s).to(device=DEVICE, dtype=dtype)

    x, res = rand(num_copies, rows, hidden, s=scale), rand(num_copies, rows, hidden, s=scale)
    dx, dres = rand(num_copies, rows, hidden, s=scale), rand(num_copies, rows, hidden, s=scale)
    weight = (1 + 0.2 * torch.randn((num_copies, hidden), generator=g)).to(device=DEVICE, dtype=dtype)
    dweight = rand(num_copies, hidden, s=0.1)
    return x, res, dx, dres, weight, dweight


def f64(*tensors):
    return [t.double().cpu() for t in tensors]


def norm64(x, weight, eps=EPS):
    """``(normed, y, r)`` in float64."""
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x * r, weight[:, None] * x * r, r


def tangent64(s, ds, weight, dweight, eps=EPS):
    """The closed form in float64: ``(dy, scale)``, scale the magnitude bound of dy's terms."""
    normed, _, r = norm64(s, weight, eps)
    mean = (s * ds).mean(-1, keepdim=True)
    dnormed = r * (ds - s * r * r * mean)
    dy = dweight[:, None] * normed + weight[:, None] * dnormed
    mean_abs = (s * ds).abs().mean(-1, keepdim=True)  # bounds the summation error of mean(s ds)
    scale = (dweight[:, None] * normed).abs() + weight[:, None].abs() * r * (ds.abs() + s.abs() * r * r * mean_abs)
    return dy, scale


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm(shape, dtype, with_residual):
    x, res, _, _, weight, _ = make_inputs(*shape, dtype)
    residual = res if with_residual else None
    s, y = add_rms_norm(x, weight, EPS, residual=residual)
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    k = PRIMAL_K[dtype]

    # (a) the decoder's PyTorch functions: the residual added in torch, then rms_norm
    s_torch, y_torch = layer_ops.add_rms_norm(x, weight, EPS, residual)
    if residual is None:
        assert s is x
    elif dtype == torch.bfloat16 and DEVICE == "cpu":  # interpreter: truncated instead of rounded
        assert_within(s, s_torch, s_torch.abs(), 1, dtype, "s")
    else:  # the float32 sum of two dtype values rounded to nearest: torch's add exactly
        assert torch.equal(s, s_torch)
    assert_within(y, y_torch, y_torch.abs(), k, dtype, "y vs torch")
    if dtype == torch.float16 or (dtype == torch.bfloat16 and DEVICE == "cuda"):
        # the same roundings as torch (normed, then y): bitwise equal except where the float32
        # s r of the two straddle a rounding boundary of normed (different summation order)
        assert (y == y_torch).float().mean() >= 0.99

    # (b) float64, from the inputs as given (the rounding of s included)
    x64, res64, w64 = f64(x, res, weight)
    s64 = x64 + res64 if with_residual else x64
    _, y64, _ = norm64(s64, w64)
    assert_within(s, s64, s64.abs(), 1, dtype, "s vs float64")
    assert_within(y, y64, y64.abs(), k, dtype, "y vs float64")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_jvp(shape, dtype, with_residual):
    x, res, dx, dres, weight, dweight = make_inputs(*shape, dtype)
    residual, dresidual = (res, dres) if with_residual else (None, None)
    s, ds, y, dy = add_rms_norm_jvp(x, dx, weight, dweight, EPS, residual=residual, dresidual=dresidual)
    assert dy.shape == x.shape and dy.dtype == dtype and dy.is_contiguous()
    if not with_residual:
        assert s is x and ds is dx

    # the primal is add_rms_norm's, bit for bit
    s_primal, y_primal = add_rms_norm(x, weight, EPS, residual=residual)
    assert torch.equal(s, s_primal) and torch.equal(y, y_primal)

    # (a) the decoder's PyTorch functions (torch rounds dw * normed and w * dnormed separately)
    s_t, ds_t, y_t, dy_t = layer_ops.add_rms_norm_jvp(x, dx, weight, dweight, EPS, residual, dresidual)
    if with_residual and not (dtype == torch.bfloat16 and DEVICE == "cpu"):
        assert torch.equal(s, s_t) and torch.equal(ds, ds_t)
    else:
        assert_within(ds, ds_t, ds_t.abs(), 1, dtype, "ds vs torch")
    assert_within(y, y_t, y_t.abs(), PRIMAL_K[dtype], dtype, "y vs torch")
    s64, ds64, w64, dw64 = f64(s_t, ds_t, weight, dweight)
    _, scale = tangent64(s64, ds64, w64, dw64)
    assert_within(dy, dy_t, scale, TANGENT_K[dtype], dtype, "dy vs torch")
    if dtype == torch.float16 or (dtype == torch.bfloat16 and DEVICE == "cuda"):
        # the kernel's rounding, from torch's normed and dnormed: dw normed + w dnormed summed in
        # float32 and rounded once; bitwise equal but where summation order flips a rounding
        h, dh = s_t.float(), ds_t.float()
        r = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
        normed = (h * r).to(dtype).float()
        dnormed = (r * (dh - h * (r * r) * (h * dh).mean(-1, keepdim=True))).to(dtype).float()
        dy_once = (dweight.float()[:, None] * normed + weight.float()[:, None] * dnormed).to(dtype)
        assert (dy == dy_once).float().mean() >= 0.99

    # (b) float64: the closed form, and torch.func.jvp of the float64 function (autograd checks the
    # formula), both from the inputs as given (so the rounding of s and ds is part of the error)
    x64, res64, dx64, dres64, w64, dw64 = f64(x, res, dx, dres, weight, dweight)
    if not with_residual:
        res64, dres64 = torch.zeros_like(x64), torch.zeros_like(dx64)

    def fn(x, res, w):
        s = x + res
        return s, w[:, None] * s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + EPS)

    (s_ad, y_ad), (ds_ad, dy_ad) = jvp(fn, (x64, res64, w64), (dx64, dres64, dw64))
    dy64, scale = tangent64(s_ad, ds_ad, w64, dw64)
    torch.testing.assert_close(dy64, dy_ad, rtol=1e-12, atol=1e-12 * scale.max().item())
    assert_within(ds, ds_ad, ds_ad.abs(), 1, dtype, "ds vs float64")
    assert_within(y, y_ad, y_ad.abs(), PRIMAL_K[dtype], dtype, "y vs float64")
    assert_within(dy, dy_ad, scale, TANGENT_K[dtype], dtype, "dy vs jvp")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_without_tangent(dtype):
    """A residual given without dresidual has a zero tangent: ds is dx itself."""
    x, res, dx, _, weight, dweight = make_inputs(2, 2, 48, dtype)
    s, ds, y, dy = add_rms_norm_jvp(x, dx, weight, dweight, EPS, residual=res)
    assert ds is dx
    s2, _, y2, dy2 = add_rms_norm_jvp(x, dx, weight, dweight, EPS, residual=res, dresidual=torch.zeros_like(dx))
    assert torch.equal(s, s2) and torch.equal(y, y2) and torch.equal(dy, dy2)


def test_strided_inputs_match_contiguous():
    """Row strides are taken as given (slices, transposed copy/row dimensions): same bits."""
    C, N, E, dtype = 2, 3, 200, torch.bfloat16
    x, res, dx, dres, weight, dweight = make_inputs(C, N, E, dtype)
    x_s = torch.zeros(C, N, E + 24, device=DEVICE, dtype=dtype)[:, :, 8:8 + E].copy_(x)
    res_s = res.transpose(0, 1).contiguous().transpose(0, 1)
    dx_s = torch.zeros(N, C, E + 8, device=DEVICE, dtype=dtype)[:, :, :E].transpose(0, 1).copy_(dx)
    w_s = torch.zeros(C, E + 3, device=DEVICE, dtype=dtype)[:, 3:].copy_(weight)
    assert not x_s.is_contiguous() and not res_s.is_contiguous() and not dx_s.is_contiguous()
    got = add_rms_norm_jvp(x_s, dx_s, w_s, dweight, EPS, residual=res_s, dresidual=dres)
    want = add_rms_norm_jvp(x, dx, weight, dweight, EPS, residual=res, dresidual=dres)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(add_rms_norm(x_s, w_s, EPS, res_s), add_rms_norm(x, weight, EPS, res)))


def test_empty_rows():
    x = torch.empty(2, 0, 48, device=DEVICE)
    w = torch.ones(2, 48, device=DEVICE)
    s, y = add_rms_norm(x, w, EPS, residual=x)
    assert s.shape == y.shape == (2, 0, 48)
    assert add_rms_norm_jvp(x, x, w, w, EPS, x, x)[3].shape == (2, 0, 48)


def _bad_calls():
    x = torch.randn(2, 3, 48, device=DEVICE)
    w = torch.randn(2, 48, device=DEVICE)
    half = x.half()
    big = torch.zeros(1, 1, MAX_HIDDEN + 1, device=DEVICE)
    return [
        ("x must be \\[C, N, E\\]", lambda: add_rms_norm(x[0], w, EPS)),
        ("x dtype must be one of", lambda: add_rms_norm(x.double(), w.double(), EPS)),
        ("weight must be \\[C, E\\] = \\[2, 48\\]", lambda: add_rms_norm(x, w[:, :47], EPS)),
        ("weight must be \\[C, E\\] = \\[2, 48\\]", lambda: add_rms_norm(x, w[:1], EPS)),
        ("weight must be .* in x's dtype", lambda: add_rms_norm(half, w, EPS)),
        ("residual must match x", lambda: add_rms_norm(x, w, EPS, residual=x[:, :2])),
        ("residual must match x", lambda: add_rms_norm(x, w, EPS, residual=half.float().bfloat16())),
        ("hidden size E must be in", lambda: add_rms_norm(big, torch.ones(1, MAX_HIDDEN + 1), EPS)),
        ("x must have a unit stride in its last", lambda: add_rms_norm(x[:, :, ::2], w[:, :24], EPS)),
        ("all inputs must be on one device", lambda: add_rms_norm(x, w.to("meta"), EPS)),
        ("eps must be a non-negative float", lambda: add_rms_norm(x, w, -1.0)),
        ("dx must match x", lambda: add_rms_norm_jvp(x, half, w, w, EPS)),
        ("dx must match x", lambda: add_rms_norm_jvp(x, x[:, :1], w, w, EPS)),
        ("dweight must be", lambda: add_rms_norm_jvp(x, x, w, w.half(), EPS)),
        ("dresidual must match x", lambda: add_rms_norm_jvp(x, x, w, w, EPS, residual=x, dresidual=half)),
        ("dresidual given without residual", lambda: add_rms_norm_jvp(x, x, w, w, EPS, dresidual=x)),
        ("x must be a torch.Tensor", lambda: add_rms_norm([1.0], w, EPS)),
    ]


@pytest.mark.parametrize("match,call", _bad_calls())
def test_rejects_malformed_inputs(match, call):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replay():
    """The launch is sync-free: captured in a CUDA graph, a replay on new inputs gives new outputs."""
    x, res, dx, dres, weight, dweight = make_inputs(2, 1, 576, torch.bfloat16)
    args = (x, dx, weight, dweight, EPS)
    add_rms_norm_jvp(*args, residual=res, dresidual=dres)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = add_rms_norm_jvp(*args, residual=res, dresidual=dres)
    x2, res2, dx2, dres2, _, _ = make_inputs(2, 1, 576, torch.bfloat16, seed=1)
    for t, new in ((x, x2), (res, res2), (dx, dx2), (dres, dres2)):
        t.copy_(new)
    graph.replay()
    want = add_rms_norm_jvp(*args, residual=res, dresidual=dres)
    for a, b in zip(out, want):
        assert torch.equal(a, b)
