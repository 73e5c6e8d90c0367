"""Decode-time linear layer ``y = x W^T + b`` for a few rows: a weight-streaming split-K GEMM.

Shapes (``C`` weight copies, ``M`` rows, ``K`` inputs, ``N`` outputs)::

    x       [C, M, K]   float32, bfloat16 or float16 (unit stride in K)
    weight  [C, N, K]   x's dtype (unit stride in K)
    bias    [C, N]      x's dtype, or None
    y       [C, M, N]   x's dtype (a new contiguous tensor)

Math: ``y[c, m, n] = round(sum_k x[c, m, k] W[c, n, k] + b[c, n])``, products accumulated in
float32 (tensor cores; float32 inputs as IEEE float32, not TF32) and the bias added in float32
before the one rounding to the dtype, as cuBLAS's bias epilogue (``F.linear``) does; the sum's
order differs from cuBLAS's, so results agree with it to float32 round-off before that rounding.

Why: at decode a step's matmuls have ``M`` = batch (1 to 64) rows and are reads of ``W``, nothing
else; what they cost is how fast ``W`` streams from memory. On an H200 cuBLAS reads the small
matrices of a 7B/3B model at 41-62% of the copy bandwidth (the 7B's qkv projection, 33 MB, in
12.7 us where its bytes need 7.7; ``bench/linear.py``), adds a split-K reduction kernel to some,
and for a proxy pair's biased batched product a copy of the bias into the output before the GEMM. Here one
launch covers all ``C`` copies, the grid is cut along ``N`` and ``K`` to cover the GPU several
times over, and the split-K partial sums are reduced in the same launch: each program stores its
float32 partial tile, then takes a ticket from a per-tile counter
(:func:`adfast.kernels.launch_order.last_ticket`); the program that draws the last ticket adds the
``SPLIT_K`` partials in split order (deterministic: the same bits whichever program finishes last;
``SPLIT_K`` is a runtime argument, so plans differing only in it share one compiled kernel), adds
the bias and writes ``y``.

Grid ``(ceil(N / BLOCK_N), SPLIT_K, C)``; program ``(j, s, c)`` reduces ``K`` range
``[s k_split, (s + 1) k_split)`` for output columns ``[j BLOCK_N, (j + 1) BLOCK_N)`` of copy ``c``
and all ``M`` rows (``BLOCK_M >= M``, at least 16 for the tensor-core product). Counters: int32,
``C * ceil(N / BLOCK_N)`` of them, all zero at entry and at exit (:func:`counters_for` sizes a
buffer; callers that launch concurrently on several streams pass their own).
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import split as launch_plan
from .launch_order import last_ticket, wait_for_predecessor, zeroed_counters

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_ROWS = 64
"""The most rows (``C``-wise ``M``) the kernel takes: beyond it a GEMM is no longer a weight read."""
MIN_BLOCK_N = 16
PREFETCH_STEPS = 2
"""``BLOCK_K`` steps of its weight rows a program prefetches to L2 before waiting on the kernel before it (PDL)."""


@triton.jit
def _decode_linear(
    x_ptr, w_ptr, b_ptr, y_ptr, part_ptr, count_ptr,
    M, N, K, k_split, split_k,
    sx_c, sx_m, sw_c, sw_n, sb_c,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, PREFETCH_LINES: tl.constexpr,
    PDL: tl.constexpr = False,
):
    j = tl.program_id(0)
    s = tl.program_id(1)
    c = tl.program_id(2).to(tl.int64)
    rm = tl.arange(0, BLOCK_M)
    rn = j * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    x_rows = x_ptr + c * sx_c + rm[:, None] * sx_m
    w_rows = w_ptr + c * sw_c + rn[:, None].to(tl.int64) * sw_n
    k_end = tl.minimum((s + 1) * k_split, K)
    if PDL:  # programmatic dependent launch (split.dependent_launch): the weights are no kernel's
        # output, so pull this program's first PREFETCH_LINES 128-byte lines of each weight row into
        # L2 while the kernel before finishes, then wait for it
        line = s * k_split + tl.arange(0, PREFETCH_LINES) * (1024 // w_ptr.dtype.element_ty.primitive_bitwidth)
        ahead = n_mask[:, None] & (line < k_end)[None, :]
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];", "=r,l", [tl.where(ahead, w_rows + line[None, :], w_ptr)],
                                  dtype=tl.int32, is_pure=False, pack=1)
    wait_for_predecessor(PDL)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in range(s * k_split, k_end, BLOCK_K):
        kk = k + rk
        k_mask = kk < k_end
        xt = tl.load(x_rows + kk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        wt = tl.load(w_rows + kk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        if UPCAST:  # the interpreter's dot takes bfloat16 tiles as raw bits: give it their float32 values
            xt, wt = xt.to(tl.float32), wt.to(tl.float32)
        acc = tl.dot(xt, tl.trans(wt), acc, input_precision=PRECISION)
    out_mask = m_mask[:, None] & n_mask[None, :]
    y_tile = y_ptr + (c * M + rm[:, None]) * N + rn[None, :]
    if not SPLIT:
        if HAS_BIAS:
            acc += tl.load(b_ptr + c * sb_c + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_tile, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        tile = c * tl.num_programs(0) + j
        tile_elems = BLOCK_M * BLOCK_N
        offsets = rm[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        parts = part_ptr + tile * split_k * tile_elems + offsets
        tl.store(parts + s * tile_elems, acc)
        if last_ticket(count_ptr + tile, split_k):  # the last program of this tile: the partials are visible
            total = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for i in range(split_k):  # split order, whichever program got here
                total += tl.load(parts + i * tile_elems, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(b_ptr + c * sb_c + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(y_tile, total.to(y_ptr.dtype.element_ty), mask=out_mask)


@dataclass(frozen=True)
class LinearPlan:
    """Tile sizes, the K split (``split_k`` programs of ``k_split`` inputs per output tile) and
    the launch's warps and pipeline stages."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    k_split: int
    num_warps: int
    num_stages: int


def plan_linear(copies: int, rows: int, outputs: int, inputs: int, device: torch.device, *,
                block_n: int | None = None, block_k: int | None = None, split_k: int | None = None,
                num_warps: int | None = None, num_stages: int | None = None,
                programs_per_sm: int | None = None) -> LinearPlan:
    """The launch plan for ``[C, M, K] x [C, N, K]^T``; keyword arguments override its choices.

    GPU: ``BLOCK_N = 32`` output columns; ``K`` split so that ``C ceil(N / BLOCK_N) SPLIT_K``
    programs cover the SMs ``programs_per_sm`` times over (2 up to 16 rows, else 4), each with at
    least two 128-input steps; ``BLOCK_K = 128`` inputs a step, or 256 for an unsplit ``K <= 2048``
    at up to 16 rows; 4 warps, 3 stages. These are the best single changes to a first plan (256
    inputs, 4 programs per SM) measured per layer of the 7B teacher and the 3B pair at 1 and 32
    rows on an H200 (``bench/linear.py --sweep``: e.g. the 7B's down projection at one row 52 ->
    39 us). Interpreter (CPU tensors): 16 x 32 tiles and up to 3 splits, so that test shapes cross
    tiles, splits and masked tails.
    """
    block_m = max(16, triton.next_power_of_2(rows))
    sms = launch_plan.multiprocessor_count(device)
    if sms is not None:
        block_n = block_n or 32
        programs_per_sm = programs_per_sm or (2 if block_m <= 16 else 4)
        tiles = copies * triton.cdiv(outputs, block_n)
        if split_k is None:
            split_k = max(1, min(-(-programs_per_sm * sms // tiles), inputs // (2 * (block_k or 128))))
        block_k = block_k or (256 if split_k == 1 and inputs <= 2048 and block_m <= 16 else 128)
        num_warps, num_stages = num_warps or 4, num_stages or 3
    else:
        block_n, block_k = block_n or 16, block_k or 32
        split_k = split_k or max(1, min(3, inputs // (2 * block_k)))
        num_warps, num_stages = num_warps or 4, num_stages or 1
    for name, value in (("block_n", block_n), ("block_k", block_k)):
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {value}")
    k_split = triton.cdiv(triton.cdiv(inputs, split_k), block_k) * block_k
    split_k = triton.cdiv(inputs, k_split)  # no empty splits
    return LinearPlan(block_m, block_n, block_k, split_k, k_split, num_warps, num_stages)


def counters_for(copies: int, outputs: int, device) -> torch.Tensor:
    """A zeroed int32 counter buffer big enough for any plan of ``C`` copies of ``N`` outputs."""
    return zeroed_counters(copies * triton.cdiv(outputs, MIN_BLOCK_N), device)


def _check_inputs(x, weight, bias, counters) -> None:
    if x.dim() != 3 or weight.dim() != 3:
        raise ValueError(f"x must be [C, M, K] and weight [C, N, K], got shapes {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}")
    (copies, rows, inputs), (w_copies, outputs, w_inputs) = x.shape, weight.shape
    if w_copies != copies or w_inputs != inputs:
        raise ValueError(f"weight {tuple(weight.shape)} does not fit x {tuple(x.shape)}: copies and inputs must match")
    if not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"decode_linear takes 1 to {MAX_ROWS} rows, got {rows}")
    if x.dtype not in DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"x and weight must share one dtype of {DTYPES}, got {x.dtype}, {weight.dtype}")
    if x.stride(2) != 1 or weight.stride(2) != 1:
        raise ValueError(f"x and weight need a unit stride in K, got strides {x.stride()}, {weight.stride()}")
    if bias is not None:
        if bias.shape != (copies, outputs) or bias.dtype != x.dtype or bias.stride(1) != 1:
            raise ValueError(f"bias must be [C, N] = {(copies, outputs)} in {x.dtype} with a unit stride in N, "
                             f"got {tuple(bias.shape)}, {bias.dtype}, strides {bias.stride()}")
    if counters is not None and (counters.dtype != torch.int32 or counters.numel() < copies * triton.cdiv(
            outputs, MIN_BLOCK_N)):
        raise ValueError(f"counters must be int32 with at least {copies * triton.cdiv(outputs, MIN_BLOCK_N)} "
                         f"entries (counters_for), got {counters.dtype} with {counters.numel()}")
    devices = {t.device for t in (x, weight, bias, counters) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"x, weight, bias and counters must be on one device, got {sorted(map(str, devices))}")


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  counters: torch.Tensor | None = None, plan: LinearPlan | None = None) -> torch.Tensor:
    """``x W^T + b`` per copy (see the module docstring), ``[C, M, N]`` in x's dtype.

    ``counters``: the split-K tickets (:func:`counters_for`; zero at entry, left zero); None
    allocates zeroed ones (an extra fill kernel each call; a CUDA-graph captured step passes its
    own, one buffer per stream that may run concurrently). ``plan`` overrides :func:`plan_linear`
    (tests, tuning). Raises ValueError for inputs the kernel cannot take.
    """
    _check_inputs(x, weight, bias, counters)
    copies, rows, inputs = x.shape
    outputs = weight.shape[1]
    plan = plan or plan_linear(copies, rows, outputs, inputs, x.device)
    y = torch.empty((copies, rows, outputs), device=x.device, dtype=x.dtype)
    interpreted = launch_plan.multiprocessor_count(x.device) is None
    tiles = triton.cdiv(outputs, plan.block_n)
    if plan.split_k > 1:
        parts = torch.empty(copies * tiles * plan.split_k * plan.block_m * plan.block_n, device=x.device,
                            dtype=torch.float32)
        counters = counters if counters is not None else counters_for(copies, outputs, x.device)
    else:
        parts = counters = y  # unused
    _decode_linear[(tiles, plan.split_k, copies)](
        x, weight, weight if bias is None else bias, y, parts, counters,
        rows, outputs, inputs, plan.k_split, plan.split_k,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), 0 if bias is None else bias.stride(0),
        HAS_BIAS=bias is not None, SPLIT=plan.split_k > 1, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n,
        BLOCK_K=plan.block_k, PRECISION="ieee" if x.dtype == torch.float32 or interpreted else "tf32",
        UPCAST=interpreted, PREFETCH_LINES=max(1, PREFETCH_STEPS * plan.block_k * x.element_size() // 128),
        num_warps=plan.num_warps, num_stages=plan.num_stages,
        **launch_plan.dependent_launch(x.device),
    )
    return y
