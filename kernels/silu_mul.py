"""Fused gated activation ``silu(gate) * up`` of the MLP, and its forward-mode tangent (JVP).

Shapes (``C`` weight copies, ``N`` rows, MLP size ``I``)::

    gate_up, dgate_up   [C, N, 2 I]   one float dtype: float32, bfloat16 or float16
                                      (gate = columns [0, I), up = columns [I, 2 I))
    a, da               [C, N, I]     that dtype (new contiguous tensors)

``gate_up`` is the output of the fused ``w_gate_up`` projection (``gate, up = gate_up.chunk(2,
dim=-1)`` in :mod:`adfast.layer_ops`); inputs may have any strides in their first two
dimensions but need a unit stride in the last one (else ValueError); nothing is copied.

Math per element, in float32 from the inputs' values, each output rounded once to the dtype::

    sig = sigmoid(gate),  silu = gate * sig,  silu' = sig (1 + gate (1 - sig))
    a   = silu * up
    da  = silu' * dgate * up + silu * dup

With a factored weight tangent's term ``(z, U)`` (:mod:`adfast.kernels.low_rank_term`), ``dgate_up``
is first ``round(dgate_up + z U^T)``. Here ``e = exp(-gate)``, ``sig = 1 / (1 + e)`` (``e = inf``
for ``gate < -88.7``: ``sig = 0``, ``silu = -0``, ``silu' = -0``) and ``1 - sig`` taken as ``e sig``
for ``gate >= 0``: the same value without the cancellation of ``1 - sig`` as ``sig -> 1``, which in
float32 would cost ``silu'`` about ``gate`` float32 ulps (8 at ``gate = 16``; below 2 this way). On
the GPU ``exp`` is libdevice's ``expf`` (CUDA's, 2 ulp: Triton's ``tl.exp`` is ``ex2.approx(x log2
e)``, whose rounded argument costs about ``|x| / 2`` ulps) and the division is IEEE
(``tl.math.div_rn``; Triton's ``/`` is the 2-ulp ``div.full.f32``); the interpreter, which cannot
run libdevice, uses ``tl.exp`` (numpy's ``exp``): the ``LIBDEVICE_EXP`` constexpr follows the launch
plan.

torch's ``F.silu(gate) * up`` (:func:`adfast.layer_ops.silu_mul`) rounds ``silu(gate)`` to the
dtype before the product, and its tangent (:func:`adfast.layer_ops.silu_mul_jvp`) rounds
``sigmoid(gate)``, ``silu(gate)`` and every intermediate product and sum to the dtype; the
kernel rounds only the outputs, so bf16/fp16 results can differ from torch's by an ulp or so
(the kernel's are the more accurate); float32 results agree to a few float32 ulps.

Grid ``(C * N, ceil(I / BLOCK))``: program ``(row, j)`` handles columns ``[j BLOCK, (j + 1) BLOCK)``
of one row (masked past ``I``), reading gate, up (and dgate, dup) once and writing a (and da) once:
``3 I itemsize`` bytes a row for the primal, ``6 I itemsize`` for the JVP. On a GPU ``BLOCK`` is the
largest of 1024, 512, 256 that still gives at least two programs per SM (else 256), so batch-1
decode (``C * N`` = 1 or 2 rows, a few hundred KiB) spreads over the whole GPU instead of a few
dozen programs; ``BLOCK / 128`` warps (4 elements a thread: one 16-byte load in fp32, 8 bytes in
bf16/fp16). Compiled for sm_90 with triton 3.9 (:mod:`adfast.compile_check`, I = 1536, 11008,
18944): 28-30 registers a thread for the primal, 39-40 for the JVP (56-100 with a low-rank
term), no spills. The plan depends on shapes and the SM count only: the launch is sync-free and
CUDA-graph safe. Under the Triton interpreter (CPU tensors; :func:`adfast.kernels.split.multiprocessor_count`
is None) ``BLOCK`` is 64, so that small test shapes cross several column blocks and a masked tail.
The triton 3.9 interpreter converts fp32 to bf16 by truncation rather than round-to-nearest-even
(the GPU rounds to nearest; fp16 is rounded to nearest in both), so interpreted bf16 results can be
one ulp off the GPU's.
"""
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import split as launch_plan
from .launch_order import wait_for_predecessor
from .low_rank_term import add_low_rank, check_low_rank, low_rank_args

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def exp_sigmoid(gate, LIBDEVICE_EXP: tl.constexpr):
    """``(e, sig)`` of float32 ``gate``: ``e = exp(-gate)``, ``sig = 1 / (1 + e)`` (module docstring:
    libdevice's ``expf`` on a GPU, ``tl.exp`` under the interpreter; IEEE division). ``silu = gate
    sig``; the decode-time GEMM's gated input (:mod:`adfast.kernels.decode_linear`) uses it too."""
    if LIBDEVICE_EXP:  # CUDA's expf (2 ulp); tl.exp is ex2.approx(x log2 e), off by about |x| / 2 ulp
        e = libdevice.exp(-gate)
    else:  # the interpreter (numpy's exp; libdevice is not interpreted)
        e = tl.exp(-gate)
    return e, tl.math.div_rn(1.0, 1.0 + e)  # IEEE division (Triton's / is div.full.f32, 2 ulp)


@triton.jit
def _silu_mul(
    gu_ptr, dgu_ptr, a_ptr, da_ptr, z_ptr, u_ptr,
    rows_per_copy, inter,
    sg_c, sg_n, sdg_c, sdg_n, sz_c, sz_n, sz_r, su_c, su_m, su_r,
    TANGENT: tl.constexpr, RANK: tl.constexpr, BLOCK: tl.constexpr, LIBDEVICE_EXP: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_predecessor(PDL)
    row = tl.program_id(0)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = col < inter
    c = (row // rows_per_copy).to(tl.int64)
    n = (row % rows_per_copy).to(tl.int64)
    dtype = a_ptr.dtype.element_ty
    gate_ptr = gu_ptr + c * sg_c + n * sg_n + col
    gate = tl.load(gate_ptr, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptr + inter, mask=mask, other=0.0).to(tl.float32)
    e, sig = exp_sigmoid(gate, LIBDEVICE_EXP)
    silu = gate * sig
    out = row.to(tl.int64) * inter + col  # outputs are contiguous [C, N, I]
    tl.store(a_ptr + out, (silu * up).to(dtype), mask=mask)
    if TANGENT:
        dgate_ptr = dgu_ptr + c * sdg_c + n * sdg_n + col
        dgate = tl.load(dgate_ptr, mask=mask, other=0.0).to(tl.float32)
        dup = tl.load(dgate_ptr + inter, mask=mask, other=0.0).to(tl.float32)
        if RANK > 0:  # dgate_up + z U^T, rounded as an in-place addmm_ would (kernels/low_rank_term.py)
            z_row = z_ptr + c * sz_c + n * sz_n
            u_c = u_ptr + c * su_c
            dgate = add_low_rank(dgate, z_row, sz_r, u_c, su_m, su_r, col, mask, RANK).to(dtype).to(tl.float32)
            dup = add_low_rank(dup, z_row, sz_r, u_c, su_m, su_r, col + inter, mask, RANK).to(dtype).to(tl.float32)
        # 1 - sig, without its cancellation as sig -> 1 (min: no inf * 0 in the unused branch)
        one_minus_sig = tl.where(gate >= 0.0, tl.minimum(e, 1.0) * sig, 1.0 - sig)
        dsilu = sig * (1.0 + gate * one_minus_sig)
        tl.store(da_ptr + out, (dsilu * dgate * up + silu * dup).to(dtype), mask=mask)


def _plan(rows: int, inter: int, device: torch.device, block: int | None) -> tuple[int, int]:
    """``(BLOCK, num_warps)``; see the module docstring."""
    sms = launch_plan.multiprocessor_count(device)
    if block is None:
        if sms is None:
            block = 64
        else:
            block = 1024
            while block > 256 and rows * triton.cdiv(inter, block) < 2 * sms:
                block //= 2
    if block < 1 or block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")
    return block, max(1, min(8, block // 128))


def _check_inputs(gate_up, dgate_up=None) -> None:
    """Raise ValueError for inputs the kernel cannot take (shapes, dtypes, strides, devices)."""
    tensors = dict(gate_up=gate_up) if dgate_up is None else dict(gate_up=gate_up, dgate_up=dgate_up)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if gate_up.dim() != 3:
        raise ValueError(f"gate_up must be [C, N, 2 I], got shape {tuple(gate_up.shape)}")
    if gate_up.shape[2] % 2 or gate_up.shape[2] == 0:
        raise ValueError(f"gate_up's last dimension must be 2 I (even, > 0), got {gate_up.shape[2]}")
    if gate_up.dtype not in DTYPES:
        raise ValueError(f"gate_up dtype must be one of {DTYPES}, got {gate_up.dtype}")
    if dgate_up is not None:
        if dgate_up.shape != gate_up.shape or dgate_up.dtype != gate_up.dtype:
            raise ValueError(f"dgate_up must match gate_up ({tuple(gate_up.shape)}, {gate_up.dtype}), "
                             f"got {tuple(dgate_up.shape)}, {dgate_up.dtype}")
        if dgate_up.device != gate_up.device:
            raise ValueError(f"gate_up and dgate_up must be on one device, got {gate_up.device}, {dgate_up.device}")
    for name, t in tensors.items():
        if t.stride(2) != 1:
            raise ValueError(f"{name} must have a unit stride in its last dimension, got strides {t.stride()}")


def _launch(gate_up, dgate_up, block, low_rank=None):
    num_copies, rows, two_inter = gate_up.shape
    inter = two_inter // 2
    if dgate_up is None:
        a, da = torch.empty((num_copies, rows, inter), device=gate_up.device, dtype=gate_up.dtype), None
    else:  # halves of one buffer: see adfast.tangent.primal_tangent_rows
        a, da = torch.empty((2, num_copies, rows, inter), device=gate_up.device, dtype=gate_up.dtype)
    if num_copies * rows == 0:
        return a, da
    block, num_warps = _plan(num_copies * rows, inter, gate_up.device, block)
    dgu = gate_up if dgate_up is None else dgate_up
    z, u, sz_c, sz_n, sz_r, su_c, su_m, su_r, rank = low_rank_args(low_rank, gate_up)
    _silu_mul[(num_copies * rows, triton.cdiv(inter, block))](
        gate_up, dgu, a, a if da is None else da, z, u,
        rows, inter,
        gate_up.stride(0), gate_up.stride(1), dgu.stride(0), dgu.stride(1), sz_c, sz_n, sz_r, su_c, su_m, su_r,
        TANGENT=dgate_up is not None, RANK=rank, BLOCK=block,
        LIBDEVICE_EXP=launch_plan.multiprocessor_count(gate_up.device) is not None, num_warps=num_warps,
        **launch_plan.dependent_launch(gate_up.device),
    )
    return a, da


def silu_mul(gate_up: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up [C, N, 2 I]`` (``gate, up = gate_up.chunk(2, -1)``),
    ``[C, N, I]`` in its dtype, computed in float32 and rounded once. ``block`` (a power of two)
    overrides the plan's column block (tests, tuning). Raises ValueError for malformed inputs."""
    _check_inputs(gate_up)
    return _launch(gate_up, None, block)[0]


def silu_mul_jvp(gate_up: torch.Tensor, dgate_up: torch.Tensor, block: int | None = None,
                 low_rank: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, da)``: :func:`silu_mul` and its tangent along ``dgate_up`` (same shape and dtype),
    ``da = silu'(gate) dgate up + silu(gate) dup``, ``silu'(g) = s (1 + g (1 - s))``,
    ``s = sigmoid(g)``, in float32, each rounded once. ``a`` and ``da`` are the two halves of one
    ``[2, C, N, I]`` buffer. ``low_rank = (z [C, N, R], U [C, 2 I, R])``: the tangent is
    ``dgate_up + z U^T`` (rounded once, :mod:`adfast.kernels.low_rank_term`). Raises ValueError for
    malformed inputs."""
    _check_inputs(gate_up, dgate_up)
    if low_rank is not None:
        check_low_rank(low_rank, *dgate_up.shape, dgate_up, "dgate_up")
    return _launch(gate_up, dgate_up, block, low_rank)
