"""Fused residual add + RMSNorm, and its forward-mode tangent (JVP): one launch per norm.

Shapes (``C`` weight copies, ``N`` rows, hidden size ``E``, ``1 <= E <= MAX_HIDDEN``)::

    x, residual, dx, dresidual   [C, N, E]   one float dtype: float32, bfloat16 or float16
    weight, dweight              [C, E]      the same dtype; copy c uses weight[c]
    s, ds, y, dy                 [C, N, E]   that dtype (new contiguous tensors)

Inputs may have any strides in their first dimensions but need a unit stride in the last (E)
one (else ValueError): the launchers pass the strides and never copy. With ``round`` the
rounding of a float32 value to the dtype (the identity for float32), for copy ``c`` and row
``n``, statistics in float32::

    s       = round(x + residual)                       (s = x itself when residual is None)
    r       = rsqrt(mean_E(s^2) + eps)                  float32, from the rounded s
    normed  = round(s r)
    y       = round(weight[c] * normed)

    ds      = round(dx + dresidual)                     (ds = dx itself when dresidual is None;
                                                         dresidual + z U^T with a low-rank term)
    dnormed = round(r (ds - s r^2 mean_E(s ds)))        float32 inside
    dy      = round(dweight[c] * normed + weight[c] * dnormed)

``s`` is the new residual stream ``h = x + residual`` of the decoder (the float32 sum of two
bf16/fp16 values rounded to the dtype: torch's bf16/fp16 add bit for bit, since float32 carries
more than twice their bits plus two, so its own rounding never changes the final one), and
``(y, dy)`` is :func:`adfast.layer_ops.rms_norm` / :func:`adfast.layer_ops.rms_norm_jvp` of ``s``:
the same roundings of ``normed`` and ``dnormed`` to the dtype and of ``y``. One difference:
torch rounds ``dweight * normed`` and ``weight * dnormed`` to the dtype separately and then
their sum, while the kernel adds the two (exact) float32 products and rounds once, so bf16/fp16
``dy`` can differ from torch's in the last bit (the kernel's is the more accurate). The means
divide by ``E`` with IEEE division (``tl.math.div_rn``, as torch does; Triton's ``/`` is the
2-ulp ``div.full.f32``), ``rsqrt`` is the GPU's approximate one (as torch's CUDA ``rsqrt``), and
the sums run in a different order than torch's, so float32 results agree with torch's to a few
float32 ulps, not bitwise.

Grid ``(C * N,)``: one program per (copy, row) holds the whole row in registers, ``BLOCK =
next_pow2(E)`` lanes (masked past ``E``; masked lanes load nothing), so every input is read from
memory exactly once and every output written once. A loop over ``E`` in blocks would need a second
pass over ``s`` and ``ds`` after the sums (re-reading them, or recomputing ``x + residual``) for no
gain at these sizes: a row is at most 16 KiB in bf16 (``E = 8192``). The registers this costs are
bounded by the warps: ``num_warps = BLOCK / 256`` (1 to 16), so each thread holds 8 elements of each
row tensor (16 at ``E = 8192``; x and residual are folded into s on load, dx and dresidual into ds;
the JVP keeps s, ds, weight, dweight live). Compiled for sm_90 with triton 3.9
(:mod:`adfast.compile_check`) at ``E`` = 576, 2048, 3584: 27-34 registers a thread for the primal,
40-53 for the JVP (62-80 with a low-rank term), no spills; at ``E = 8192`` (16 warps, hence
``MAX_HIDDEN``) up to 60 and 100 (float32), no spills; larger rows would need a looped variant.
Bytes per row: ``E itemsize`` times 2 (x, y) or 4 (x, residual, s, y) for the primal, 4 or 8 for the
JVP, plus the weights (``C E``, from L2 after the first rows).

The launch is sync-free and CUDA-graph safe: the plan depends on shapes and dtypes only (no
tensor values are read on the host), outputs are fresh ``torch.empty`` tensors. The plan is the
same under the Triton interpreter (CPU tensors), where the triton 3.9 interpreter converts fp32
to bf16 by truncation rather than round-to-nearest-even (the GPU rounds to nearest; fp16 is
rounded to nearest in both), so interpreted bf16 results can be one ulp off the GPU's.
"""
import torch
import triton
import triton.language as tl

from . import split as launch_plan
from .launch_order import wait_for_predecessor
from .low_rank_term import add_low_rank, check_low_rank, low_rank_args

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HIDDEN = 8192


@triton.jit
def _residual_stream(x_ptr, res_ptr, s_ptr, c64, n64, sx_c, sx_n, sr_c, sr_n, e, out, mask, dtype,
                     HAS_RES: tl.constexpr, low_rank, RANK: tl.constexpr):
    """One row of ``s = round(x + residual)`` (stored at ``s_ptr + out``) or of ``x``, in float32;
    with ``RANK > 0`` the residual is first ``round(residual + z U^T)`` (``low_rank = (z_row, sz_r,
    u_c, su_m, su_r)``: the row's ``z`` and the copy's ``U``, :mod:`adfast.kernels.low_rank_term`)."""
    s = tl.load(x_ptr + c64 * sx_c + n64 * sx_n + e, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        res = tl.load(res_ptr + c64 * sr_c + n64 * sr_n + e, mask=mask, other=0.0)
        if RANK > 0:
            z_row, sz_r, u_c, su_m, su_r = low_rank
            res = add_low_rank(res.to(tl.float32), z_row, sz_r, u_c, su_m, su_r, e, mask, RANK).to(dtype)
        s_low = (s + res.to(tl.float32)).to(dtype)
        tl.store(s_ptr + out, s_low, mask=mask)
        s = s_low.to(tl.float32)
    return s


@triton.jit
def reciprocal_rms(squares, hidden_f, eps):
    """``r = rsqrt(squares / E + eps)`` from a row's float32 sum of squares (IEEE division, as torch's
    mean); the decode-time linear's normed input (:mod:`adfast.kernels.decode_linear`) uses it and
    :func:`normalized` too, so that both compile the same arithmetic."""
    return tl.rsqrt(tl.math.div_rn(squares, hidden_f) + eps)


@triton.jit
def normalized(s, r, w, dtype):
    """``y = round(w round(s r))`` of float32 ``s``, ``r``, ``w`` (broadcast), in ``dtype``."""
    return (w * (s * r).to(dtype).to(tl.float32)).to(dtype)


@triton.jit
def _add_rms_norm(
    x_ptr, res_ptr, w_ptr, s_ptr, y_ptr,
    rows, hidden, hidden_f, eps,
    sx_c, sx_n, sr_c, sr_n, sw_c,
    HAS_RES: tl.constexpr, BLOCK: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_predecessor(PDL)
    pid = tl.program_id(0)
    c = pid // rows
    n = pid % rows
    e = tl.arange(0, BLOCK)
    mask = e < hidden
    dtype = y_ptr.dtype.element_ty
    out = pid.to(tl.int64) * hidden + e  # outputs are contiguous [C, N, E]
    s = _residual_stream(x_ptr, res_ptr, s_ptr, c.to(tl.int64), n.to(tl.int64), sx_c, sx_n, sr_c, sr_n, e, out,
                         mask, dtype, HAS_RES, (x_ptr, 0, x_ptr, 0, 0), 0)
    w = tl.load(w_ptr + c.to(tl.int64) * sw_c + e, mask=mask, other=0.0).to(tl.float32)
    r = reciprocal_rms(tl.sum(s * s, axis=0), hidden_f, eps)
    tl.store(y_ptr + out, normalized(s, r, w, dtype), mask=mask)


@triton.jit
def _add_rms_norm_jvp(
    x_ptr, res_ptr, dx_ptr, dres_ptr, w_ptr, dw_ptr, s_ptr, ds_ptr, y_ptr, dy_ptr, z_ptr, u_ptr,
    rows, hidden, hidden_f, eps,
    sx_c, sx_n, sr_c, sr_n, sdx_c, sdx_n, sdr_c, sdr_n, sw_c, sdw_c, sz_c, sz_n, sz_r, su_c, su_m, su_r,
    HAS_RES: tl.constexpr, HAS_DRES: tl.constexpr, RANK: tl.constexpr, BLOCK: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_predecessor(PDL)
    pid = tl.program_id(0)
    c = pid // rows
    n = pid % rows
    c64, n64 = c.to(tl.int64), n.to(tl.int64)
    e = tl.arange(0, BLOCK)
    mask = e < hidden
    dtype = y_ptr.dtype.element_ty
    out = pid.to(tl.int64) * hidden + e  # outputs are contiguous [C, N, E]
    s = _residual_stream(x_ptr, res_ptr, s_ptr, c64, n64, sx_c, sx_n, sr_c, sr_n, e, out, mask, dtype, HAS_RES,
                         (x_ptr, 0, x_ptr, 0, 0), 0)
    ds = _residual_stream(dx_ptr, dres_ptr, ds_ptr, c64, n64, sdx_c, sdx_n, sdr_c, sdr_n, e, out, mask, dtype,
                          HAS_DRES, (z_ptr + c64 * sz_c + n64 * sz_n, sz_r, u_ptr + c64 * su_c, su_m, su_r), RANK)
    r = reciprocal_rms(tl.sum(s * s, axis=0), hidden_f, eps)
    mean_sds = tl.math.div_rn(tl.sum(s * ds, axis=0), hidden_f)
    normed = (s * r).to(dtype).to(tl.float32)
    dnormed = (r * (ds - s * (r * r) * mean_sds)).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + c64 * sw_c + e, mask=mask, other=0.0).to(tl.float32)
    dw = tl.load(dw_ptr + c64 * sdw_c + e, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + out, (w * normed).to(dtype), mask=mask)
    tl.store(dy_ptr + out, (dw * normed + w * dnormed).to(dtype), mask=mask)


def _plan(hidden: int) -> tuple[int, int]:
    """``(BLOCK, num_warps)``: the whole row, 256 lanes a warp (see the module docstring)."""
    block = triton.next_power_of_2(hidden)
    return block, min(16, max(1, block // 256))


def _check_inputs(rows: dict, weights: dict, eps) -> None:
    """Raise ValueError for inputs the kernels cannot take. ``rows``: name -> ``[C, N, E]`` tensor or
    None (the first is ``x``); ``weights``: name -> ``[C, E]`` tensor."""
    for name, t in {**rows, **weights}.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    x = rows["x"]
    if x.dim() != 3:
        raise ValueError(f"x must be [C, N, E], got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"x dtype must be one of {DTYPES}, got {x.dtype}")
    num_copies, _, hidden = x.shape
    if not 1 <= hidden <= MAX_HIDDEN:
        raise ValueError(f"hidden size E must be in [1, {MAX_HIDDEN}], got {hidden}")
    given = {name: t for name, t in {**rows, **weights}.items() if t is not None}
    for name, t in rows.items():
        if t is not None and (t.shape != x.shape or t.dtype != x.dtype):
            raise ValueError(f"{name} must match x ({tuple(x.shape)}, {x.dtype}), got {tuple(t.shape)}, {t.dtype}")
    for name, t in weights.items():
        if t.shape != (num_copies, hidden) or t.dtype != x.dtype:
            raise ValueError(f"{name} must be [C, E] = [{num_copies}, {hidden}] in x's dtype {x.dtype}, "
                             f"got {tuple(t.shape)}, {t.dtype}")
    devices = {t.device for t in given.values()}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    for name, t in given.items():
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{name} must have a unit stride in its last (E) dimension, got strides {t.stride()}")
    if isinstance(eps, torch.Tensor) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float (not a tensor), got {eps!r}")


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, y)``: ``s = x + residual`` (``x`` itself when ``residual`` is None) and
    ``y = weight * rms_norm(s)`` for ``x, residual [C, N, E]``, ``weight [C, E]``, one launch.

    Same values as ``s = x + residual; y = adfast.layer_ops.rms_norm(s, weight, eps)`` (statistics
    in float32, ``normed`` and ``y`` rounded to the dtype; see the module docstring). Raises
    ValueError for malformed inputs (shapes, dtypes, devices, strides).
    """
    _check_inputs(dict(x=x, residual=residual), dict(weight=weight), eps)
    num_copies, rows, hidden = x.shape
    y = torch.empty((num_copies, rows, hidden), device=x.device, dtype=x.dtype)
    s = x if residual is None else torch.empty_like(y)
    if num_copies * rows == 0:
        return s, y
    res = x if residual is None else residual
    block, num_warps = _plan(hidden)
    _add_rms_norm[(num_copies * rows,)](
        x, res, weight, s, y,
        rows, hidden, float(hidden), float(eps),
        x.stride(0), x.stride(1), res.stride(0), res.stride(1), weight.stride(0),
        HAS_RES=residual is not None, BLOCK=block, num_warps=num_warps, **launch_plan.dependent_launch(x.device),
    )
    return s, y


def add_rms_norm_jvp(x: torch.Tensor, dx: torch.Tensor, weight: torch.Tensor, dweight: torch.Tensor, eps: float,
                     residual: torch.Tensor | None = None, dresidual: torch.Tensor | None = None,
                     low_rank: tuple[torch.Tensor, torch.Tensor] | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(s, ds, y, dy)``: :func:`add_rms_norm` and its tangent along ``(dx, dresidual, dweight)``.

    ``ds = dx + dresidual`` (``dx`` itself when ``dresidual`` is None: a residual with a zero
    tangent), ``(y, dy)`` as ``adfast.layer_ops.rms_norm_jvp(s, ds, weight, dweight, eps)`` except
    that ``dy``'s two products are summed in float32 and rounded once (see the module docstring).
    ``y`` and ``dy`` are the two halves of one ``[2, C, N, E]`` buffer. ``low_rank = (z [C, N, R],
    U [C, E, R])``: the residual's tangent is ``dresidual + z U^T`` (rounded once,
    :mod:`adfast.kernels.low_rank_term`).
    Raises ValueError for malformed inputs, and for ``dresidual`` without ``residual`` or
    ``low_rank`` without ``dresidual``.
    """
    if dresidual is not None and residual is None:
        raise ValueError("dresidual given without residual: pass residual too (or add dresidual to dx)")
    if low_rank is not None and dresidual is None:
        raise ValueError("low_rank is a term of dresidual: pass dresidual too")
    _check_inputs(dict(x=x, residual=residual, dx=dx, dresidual=dresidual), dict(weight=weight, dweight=dweight),
                  eps)
    if low_rank is not None:
        check_low_rank(low_rank, *dresidual.shape, dresidual, "dresidual")
    num_copies, rows, hidden = x.shape
    # halves of one buffer: see adfast.tangent.primal_tangent_rows
    y, dy = torch.empty((2, num_copies, rows, hidden), device=x.device, dtype=x.dtype)
    s = x if residual is None else torch.empty_like(y)
    ds = dx if dresidual is None else torch.empty_like(y)
    if num_copies * rows == 0:
        return s, ds, y, dy
    res = x if residual is None else residual
    dres = dx if dresidual is None else dresidual
    block, num_warps = _plan(hidden)
    z, u, sz_c, sz_n, sz_r, su_c, su_m, su_r, rank = low_rank_args(low_rank, x)
    _add_rms_norm_jvp[(num_copies * rows,)](
        x, res, dx, dres, weight, dweight, s, ds, y, dy, z, u,
        rows, hidden, float(hidden), float(eps),
        x.stride(0), x.stride(1), res.stride(0), res.stride(1), dx.stride(0), dx.stride(1),
        dres.stride(0), dres.stride(1), weight.stride(0), dweight.stride(0), sz_c, sz_n, sz_r, su_c, su_m, su_r,
        HAS_RES=residual is not None, HAS_DRES=dresidual is not None, RANK=rank, BLOCK=block,
        num_warps=num_warps, **launch_plan.dependent_launch(x.device),
    )
    return s, ds, y, dy
