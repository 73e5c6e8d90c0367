"""Decode-time linear layer (adfast.kernels.decode_linear) against a float64 reference and torch.

The kernel accumulates in float32 and rounds once (after the bias). Against the float64 product
``ref`` its error per element is at most the final rounding, ``eps(dtype) |ref|`` (half an ulp to
nearest; a whole one where the triton 3.9 interpreter truncates to bf16), plus the float32
accumulation, bounded by ``K eps(float32) sum_k |x_k w_k|`` (measured far below: the bound is the
worst case of ``K`` roundings). A missing, doubled or misplaced split-K partial, bias or row is
off by whole terms of the sum, orders of magnitude past it.

Plans are given explicitly too (one and several ``K`` splits, tiles past ``N`` and ``K``, several
``N`` tiles per copy), so the split-K reduction is exercised whatever the default plan picks on
the machine running the tests.
"""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import KERNEL_DEVICE as DEVICE, tiny_qwen2

from adfast.decoder import LINEAR_KERNEL_ROWS, LINEAR_PROJECTIONS
from adfast.kernels.decode_linear import (BLOCK_T, MAX_ROWS, NormedInput, ResidualSum, RotaryCacheWrite, counters_for,
                                         decode_linear, plan_linear)
from adfast.kernels.rotary_cache import rope_and_cache_write
from adfast.kernels.silu_mul import silu_mul

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (C, M, N, K): one and two copies, M from 1 to MAX_ROWS, odd N and K (masked tails)
SHAPES = [(1, 1, 40, 100), (2, 3, 70, 200), (2, 17, 33, 64), (1, MAX_ROWS, 48, 96), (2, 5, 16, 300)]


def make(copies, rows, outputs, inputs, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(copies, rows, inputs, generator=g)
    w = torch.randn(copies, outputs, inputs, generator=g) / inputs ** 0.5
    b = torch.randn(copies, outputs, generator=g) if bias else None
    return tuple(None if t is None else t.to(DEVICE, dtype) for t in (x, w, b))


def reference(x, w, b):
    """``(x W^T + b, sum_k |x_k w_k|)`` in float64."""
    x64, w64 = x.double().cpu(), w.double().cpu()
    y = torch.einsum("cmk,cnk->cmn", x64, w64)
    if b is not None:
        y += b.double().cpu()[:, None]
    return y, torch.einsum("cmk,cnk->cmn", x64.abs(), w64.abs())


def assert_close_to_reference(y, x, w, b):
    ref, magnitude = reference(x, w, b)
    inputs = x.shape[2]
    bound = (torch.finfo(y.dtype).eps * ref.abs() + inputs * torch.finfo(torch.float32).eps * magnitude
             + torch.finfo(y.dtype).tiny)
    worst = ((y.double().cpu() - ref).abs() / bound).max().item()
    assert worst <= 1, f"error up to {worst:.2f}x the bound ({y.dtype}, {tuple(x.shape)} x {tuple(w.shape)})"


def explicit_plans(copies, rows, outputs, inputs):
    """The default plan and explicit ones: one split, several splits of small K blocks, and both
    with the weight tile leading the product (``swap_ab``)."""
    device = torch.device(DEVICE)
    return [plan_linear(copies, rows, outputs, inputs, device),
            plan_linear(copies, rows, outputs, inputs, device, block_n=16, block_k=16, split_k=1),
            plan_linear(copies, rows, outputs, inputs, device, block_n=32, block_k=16, split_k=3),
            plan_linear(copies, rows, outputs, inputs, device, block_n=16, block_k=16, split_k=1, swap_ab=True),
            plan_linear(copies, rows, outputs, inputs, device, block_n=64, block_k=16, split_k=3, swap_ab=True)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_against_float64(dtype, shape, bias):
    x, w, b = make(*shape, dtype, bias)
    counters = counters_for(shape[0], shape[2], DEVICE)
    for plan in explicit_plans(*shape):
        y = decode_linear(x, w, b, counters=counters, plan=plan)
        assert y.shape == (shape[0], shape[1], shape[2]) and y.dtype == dtype and y.is_contiguous()
        assert_close_to_reference(y, x, w, b)
        assert not counters.any(), "the split-K tickets must be left at zero for the next launch"


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_torch_linear(dtype):
    """Against ``F.linear`` (cuBLAS on a GPU, which also adds the bias before one rounding): equal to
    a rounding of the dtype either way (both are float32 sums of the same products)."""
    x, w, b = make(2, 4, 70, 130, dtype)
    y = decode_linear(x, w, b)
    want = torch.stack([F.linear(x[c], w[c], b[c]) for c in range(2)])
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(y, want, rtol=2 * eps, atol=2 * eps * want.abs().max().item())


def test_float16_is_rounded_once():
    """float16 (rounded to nearest by the interpreter as by the GPU): the output is the float32 sum
    plus bias rounded once, so it equals the float64 value rounded to float16 except where the
    float32 sum lands on the other side of a rounding boundary (rare)."""
    x, w, b = make(1, 8, 200, 256, torch.float16)
    y = decode_linear(x, w, b, plan=plan_linear(1, 8, 200, 256, torch.device(DEVICE), split_k=2))
    ref, _ = reference(x, w, b)
    assert (y.cpu() == ref.to(torch.float16)).float().mean() >= 0.99


def test_split_k_result_is_deterministic():
    """The last program reduces the partials in split order: repeated launches give the same bits."""
    x, w, b = make(2, 3, 64, 512, torch.float32)
    plan = plan_linear(2, 3, 64, 512, torch.device(DEVICE), block_n=16, block_k=32, split_k=4)
    first = decode_linear(x, w, b, plan=plan)
    for _ in range(3):
        assert torch.equal(decode_linear(x, w, b, plan=plan), first)


def kernel_rounding(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 ``t`` rounded to ``dtype`` as the kernel rounds it: to nearest, but toward zero for
    bfloat16 under the triton 3.9 interpreter (which truncates the low 16 bits)."""
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        return (t.float().view(torch.int32) & -65536).view(torch.float32).to(dtype)
    return t.to(dtype)


def rms_normed(s: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """float64 ``weight s / sqrt(mean(s^2) + eps)`` of ``s [C, M, K]``, ``weight [C, K]``."""
    s64 = s.double().cpu()
    return weight.double().cpu()[:, None] * s64 * torch.rsqrt(s64.pow(2).mean(-1, keepdim=True) + eps)


def block_squares(s: torch.Tensor, tiles: int) -> torch.Tensor:
    """float32 ``[C, T, M]``: the sums of ``s^2`` over ``tiles`` blocks of ``s [C, M, K]``'s columns
    (the layout a residual epilogue writes; any split of K into blocks sums to the same norm)."""
    blocks = s.double().cpu().pow(2).tensor_split(tiles, dim=-1)
    return torch.stack([b.sum(-1) for b in blocks], dim=1).float()


def assert_input_within_rounding(y, a, w, b, rounds: int):
    """``y = round(a~) W^T + b`` where ``a~`` is the float64 input ``a`` computed in float32 and
    rounded ``rounds`` times to y's dtype: the bound of :func:`assert_close_to_reference` plus
    ``rounds`` dtype roundings (and a few float32 ulps) of each input element."""
    ref = torch.einsum("cmk,cnk->cmn", a, w.double().cpu())
    if b is not None:
        ref += b.double().cpu()[:, None]
    magnitude = torch.einsum("cmk,cnk->cmn", a.abs(), w.double().cpu().abs())
    eps, eps32 = torch.finfo(y.dtype).eps, torch.finfo(torch.float32).eps
    bound = eps * ref.abs() + (rounds * eps + (a.shape[2] + 8) * eps32) * magnitude + torch.finfo(y.dtype).tiny
    worst = ((y.double().cpu() - ref).abs() / bound).max().item()
    assert worst <= 1, f"error up to {worst:.2f}x the bound ({y.dtype}, {tuple(a.shape)} x {tuple(w.shape)})"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 40, 100), (2, 3, 70, 200), (2, 17, 34, 64)])
def test_gated_output(dtype, shape):
    """``gated=True``: ``silu(gate) up`` of the product's halves, written by the epilogue from column
    pairs, equals adfast.kernels.silu_mul of the plain product bit for bit (each half rounded to the
    dtype, then the same float32 arithmetic rounded once), under every plan (the pairs cross tiles
    and splits the same way), and the float64 silu of the float64 product within its roundings."""
    copies, rows, outputs, inputs = shape
    x, w, b = make(*shape, dtype)
    for plan in explicit_plans(*shape):
        a = decode_linear(x, w, b, gated=True, plan=plan)
        assert a.shape == (copies, rows, outputs // 2) and a.dtype == dtype and a.is_contiguous()
        assert torch.equal(a, silu_mul(decode_linear(x, w, b, plan=plan)))
    product, magnitude = reference(x, w, b)
    gate, up = product.chunk(2, dim=-1)
    want = F.silu(gate) * up
    eps, eps32 = torch.finfo(dtype).eps, torch.finfo(torch.float32).eps
    # |d(silu(g) u)| <= 1.1 |u| |dg| + |silu(g)| |du|; each half off by its rounding and float32 sum
    err_g, err_u = (eps * t.abs() + inputs * eps32 * m for t, m in zip(product.chunk(2, -1), magnitude.chunk(2, -1)))
    bound = eps * want.abs() + 1.1 * up.abs() * err_g + F.silu(gate).abs() * err_u + 8 * eps32 * want.abs() \
        + torch.finfo(dtype).tiny
    worst = ((a.double().cpu() - want).abs() / bound).max().item()
    assert worst <= 1, f"error up to {worst:.2f}x the bound"


def assert_equal_up_to_contraction(a, b):
    """Bit for bit under the interpreter; on a GPU within a rounding of the dtype, where the compiler
    may contract another of a rotation's products into a fused multiply-add than in the other kernel."""
    if DEVICE == "cpu":
        assert torch.equal(a, b)
    else:
        eps = torch.finfo(a.dtype).eps
        torch.testing.assert_close(a, b, rtol=eps, atol=eps * b.abs().max().item())


# (C, B, T, H, KV, D): one row; several copies, rows and tokens; head dim 8 (two heads a 16-column tile)
ROTARY_SHAPES = [(1, 1, 1, 4, 2, 8), (2, 2, 3, 4, 2, 8), (1, 3, 1, 2, 1, 32)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROTARY_SHAPES)
def test_rotary_output(dtype, shape):
    """``rotary=``: the rotated queries and the caches' keys and values equal those of
    adfast.kernels.rotary_cache on the plain product (bias included), under every plan (column pairs
    crossing tiles, heads and splits); cache positions no token writes keep their contents, and
    padding tokens write only the scratch position (whose contents are unspecified)."""
    copies, batch, seq, heads, kv_heads, head_dim = shape
    outputs, inputs, max_batch, max_seq = (heads + 2 * kv_heads) * head_dim, 40, 5, 9
    x, w, b = make(copies, batch * seq, outputs, inputs, dtype)
    g = torch.Generator().manual_seed(8)
    angles = torch.rand(batch, seq, head_dim, generator=g) * 6.0
    cos, sin = angles.cos().to(DEVICE), angles.sin().to(DEVICE)
    slots = torch.randperm(max_batch, generator=g)[:batch]
    t = torch.arange(seq)[None]
    start = torch.randint(0, max_seq - seq, (batch,), generator=g)
    write_pos = torch.where(t < seq - (torch.arange(batch) % 2)[:, None], start[:, None] + t, max_seq)  # some padding
    slots, write_pos = slots.to(DEVICE), write_pos.to(DEVICE)
    for plan in explicit_plans(copies, batch * seq, outputs, inputs):
        fused, separate = ([torch.full((copies, max_batch, max_seq + 1, kv_heads, head_dim), 7.5, dtype=dtype,
                                       device=DEVICE) for _ in range(2)] for _ in range(2))
        q = decode_linear(x, w, b, rotary=RotaryCacheWrite(cos, sin, *fused, slots, write_pos, heads, kv_heads),
                          plan=plan)
        want = rope_and_cache_write(decode_linear(x, w, b, plan=plan), cos, sin, *separate, slots, write_pos, heads,
                                    kv_heads)
        assert q.shape == (copies, batch, seq, heads, head_dim)
        assert_equal_up_to_contraction(q, want)
        for got, expected in zip(fused, separate):
            assert_equal_up_to_contraction(got[:, :, :max_seq], expected[:, :, :max_seq])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_normed_input(dtype, shape):
    """``NormedInput(s, stats, weight, eps)``: the product of the RMSNorm of ``s`` from partial sums of
    squares (in more blocks than the kernel sums at once, and fewer) equals the float64 product of
    the float64 norm within the norm's two roundings (``round(w round(s r))``)."""
    copies, rows, outputs, inputs = shape
    x, w, b = make(*shape, dtype)
    s = (3 * x).to(dtype)
    norm_weight = (1 + torch.randn(copies, inputs, generator=torch.Generator().manual_seed(4))).to(DEVICE, dtype)
    want = rms_normed(s, norm_weight, 1e-6)
    for tiles in (1, 7, min(inputs, BLOCK_T.value + 3)):
        stats = block_squares(s, tiles).to(DEVICE)
        for plan in explicit_plans(*shape):
            y = decode_linear(NormedInput(s, stats, norm_weight, 1e-6), w, b, plan=plan)
            assert_input_within_rounding(y, want, w, b, rounds=2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_residual_epilogue(dtype, shape):
    """``residual=``: ``s = round(residual + y)`` with ``y`` the plain launch's output (bit for bit: the
    float32 sum of the two rounded values, rounded once, as adfast.kernels.rms_norm adds them), and
    per block of ``BLOCK_N`` columns the float32 sum of ``s^2``, against float64 sums of the returned
    ``s``; every plan, so split-K's last program writes them as an unsplit program does."""
    copies, rows, outputs, inputs = shape
    x, w, b = make(*shape, dtype)
    residual = torch.randn(copies, rows, outputs, generator=torch.Generator().manual_seed(5)).to(DEVICE, dtype)
    for plan in explicit_plans(*shape):
        out = decode_linear(x, w, b, residual=residual, plan=plan)
        assert isinstance(out, ResidualSum)
        y = decode_linear(x, w, b, plan=plan)
        assert torch.equal(out.s, kernel_rounding(residual.float() + y.float(), dtype))
        tiles = -(-outputs // plan.block_n)
        blocks = out.s.double().cpu().pow(2).split(plan.block_n, dim=-1)
        want = torch.stack([blk.sum(-1) for blk in blocks], dim=1)
        assert out.stats.shape == (copies, tiles, rows) and out.stats.dtype == torch.float32
        torch.testing.assert_close(out.stats.double().cpu(), want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_then_normed_input_equals_separate_kernels(dtype):
    """A decoder's sublayer seam fused: the o projection adding itself to the residual stream and
    writing the sums of squares, then the gate/up projection reading the stream's RMSNorm through
    them, against the same through the separate add + RMSNorm kernel: the same stream bit for bit,
    and the product within a rounding of the dtype (the norm's sum of squares adds in another order)."""
    from adfast.kernels.rms_norm import add_rms_norm

    x, w_o, b_o = make(2, 3, 70, 50, dtype)
    _, w_up, b_up = make(2, 3, 90, 70, dtype, seed=1)
    stream = torch.randn(2, 3, 70, generator=torch.Generator().manual_seed(6)).to(DEVICE, dtype)
    norm_weight = (1 + torch.randn(2, 70, generator=torch.Generator().manual_seed(7))).to(DEVICE, dtype)
    fused = decode_linear(x, w_o, b_o, residual=stream)
    y = decode_linear(NormedInput(fused.s, fused.stats, norm_weight, 1e-5), w_up, b_up)
    s, h = add_rms_norm(stream, norm_weight, 1e-5, decode_linear(x, w_o, b_o))
    assert torch.equal(fused.s, s)
    want = decode_linear(h, w_up, b_up)
    scale = torch.einsum("cmk,cnk->cmn", h.double().cpu().abs(), w_up.double().cpu().abs()).max().item()
    torch.testing.assert_close(y, want, rtol=0, atol=2 * torch.finfo(dtype).eps * scale)


def test_plan():
    cpu = torch.device("cpu")
    plan = plan_linear(2, 5, 100, 1000, cpu, block_k=64, split_k=4)
    assert plan.block_m == 16 and plan.k_split % 64 == 0 and plan.split_k * plan.k_split >= 1000
    assert (plan.split_k - 1) * plan.k_split < 1000, "no split may be empty"
    assert plan_linear(1, 33, 16, 16, cpu).block_m == 64
    with pytest.raises(ValueError, match="prefetch_steps must be >= 0"):
        plan_linear(1, 1, 16, 16, cpu, prefetch_steps=-1)
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        plan_linear(1, 1, 16, 16, cpu, block_n=24)
    for split_k in (0, -2, 1.5):
        with pytest.raises(ValueError, match="split_k must be an int >= 1"):
            plan_linear(1, 1, 16, 64, cpu, split_k=split_k)
    with pytest.raises(ValueError, match="block_k must be a power of two >= 16, got 0"):
        plan_linear(1, 1, 16, 64, cpu, block_k=0)
    with pytest.raises(ValueError, match="inputs \\(K\\) must be >= 1"):
        plan_linear(1, 1, 16, 0, cpu)


def test_decoder_dispatch(monkeypatch):
    """A decoder runs its linears (every layer's and the lm_head) in the kernel only with
    ``linear_kernel`` and at most LINEAR_KERNEL_ROWS rows: a prefill of more rows, and every call
    without the flag (the default), stay cuBLAS."""
    import adfast.decoder

    calls = []
    monkeypatch.setattr(adfast.decoder, "decode_linear", lambda x, *a, **k: calls.append(x.shape[1]) or
                        decode_linear(x, *a, **k))
    decoder = adfast.decoder.Decoder.from_hf([tiny_qwen2()], device=DEVICE)
    decoder.setup_cache(2, 64)
    slots, layers, rows = torch.tensor([0, 1], device=DEVICE), decoder.config.num_layers, LINEAR_KERNEL_ROWS
    assert not decoder.linear_kernel
    decoder(torch.ones(2, 3, dtype=torch.int64, device=DEVICE), slots)
    assert calls == []
    decoder.linear_kernel = True
    decoder(torch.ones(2, rows // 2 + 1, dtype=torch.int64, device=DEVICE), slots)  # rows + 2: cuBLAS
    assert calls == [2]  # only the lm_head's, which reads each row's last token
    calls.clear()
    decoder(torch.ones(2, 1, dtype=torch.int64, device=DEVICE), slots)
    assert calls == [2] * (4 * layers + 1)  # qkv, o, gate_up, down of every layer, and the lm_head


def test_decoder_dispatch_by_projection_and_rows(monkeypatch):
    """``linear_kernel`` as a set of names gives the kernel those linears only, and
    ``linear_kernel_rows`` bounds the rows it takes; an unknown name is refused."""
    import adfast.decoder

    weights = []
    monkeypatch.setattr(adfast.decoder, "decode_linear", lambda x, w, *a, **k: weights.append(w) or
                        decode_linear(x, w, *a, **k))
    decoder = adfast.decoder.Decoder.from_hf([tiny_qwen2()], device=DEVICE)
    decoder.setup_cache(2, 64)
    slots, step = torch.tensor([0, 1], device=DEVICE), torch.ones(2, 1, dtype=torch.int64, device=DEVICE)
    decoder.linear_kernel = ["o", "lm_head"]
    assert decoder.linear_kernel == frozenset({"o", "lm_head"})
    decoder(step, slots)
    assert [id(w) for w in weights] == [id(layer.wo) for layer in decoder.layers] + [id(decoder.lm_head)]
    weights.clear()
    decoder.linear_kernel, decoder.linear_kernel_rows = True, 1
    decoder(step, slots)  # two rows: past the bound
    assert weights == []
    decoder(step[:1], slots[:1])
    assert len(weights) == 4 * decoder.config.num_layers + 1
    with pytest.raises(ValueError, match="'up'"):
        decoder.linear_kernel = {"qkv", "up"}


def test_decoder_fuses_layer_ops(monkeypatch):
    """A decoder with the Triton layer ops (and ``linear_fusions``, the default) whose linears run in
    the kernel takes the rotary embeddings and cache write from the qkv projection's epilogue and
    ``silu(gate) up`` from the gate/up projection's (prefill and decode); at one row (batch-1
    decode) with every linear in the kernel, qkv (after the first layer), gate/up and the lm_head
    also read a NormedInput, and o and down add themselves to the residual stream; so does a
    two-row decode step with ``linear_norm_rows = 2``, never a prefill. At two rows by default, or
    with a partial ``linear_kernel`` set, the norms stay separate; with the PyTorch layer ops or
    without ``linear_fusions`` everything does. (That the fused decoder computes the same logits:
    test_layer_ops.py.)"""
    import adfast.decoder

    calls, options = [], []

    def recording(x, w, b=None, **kwargs):
        output = [name for name in ("gated", "residual", "rotary") if kwargs.get(name) is not None
                  and kwargs.get(name) is not False]
        calls.append((type(x).__name__, output[0] if output else "plain"))
        options.append(kwargs["plan_options"])
        return decode_linear(x, w, b, **kwargs)

    monkeypatch.setattr(adfast.decoder, "decode_linear", recording)
    decoder = adfast.decoder.Decoder.from_hf([tiny_qwen2()], device=DEVICE)
    decoder.setup_cache(2, 64)
    decoder.fused, decoder.linear_kernel = True, True
    slots, layers = torch.tensor([0, 1], device=DEVICE), decoder.config.num_layers
    tensor_in = [("Tensor", "rotary"), ("Tensor", "plain"), ("Tensor", "gated"), ("Tensor", "plain")]
    head = [("Tensor", "plain")]
    for batch, seq in ((2, 3), (2, 1)):
        calls.clear()
        decoder(torch.ones(batch, seq, dtype=torch.int64, device=DEVICE), slots[:batch])
        assert calls == tensor_in * layers + head
    calls.clear()
    step = torch.ones(1, 1, dtype=torch.int64, device=DEVICE)
    decoder(step, slots[:1])
    layer = [("NormedInput", "rotary"), ("Tensor", "residual"), ("NormedInput", "gated"), ("Tensor", "residual")]
    assert calls == tensor_in[:1] + layer[1:] + layer * (layers - 1) + [("NormedInput", "plain")]
    calls.clear()
    decoder.linear_norm_rows = 2  # a two-row decode step too; a prefill (T > 1) never
    for batch, seq in ((2, 3), (2, 1)):
        calls.clear()
        decoder(torch.ones(batch, seq, dtype=torch.int64, device=DEVICE), slots[:batch])
        assert calls == (tensor_in * layers + head if seq > 1 else
                         tensor_in[:1] + layer[1:] + layer * (layers - 1) + [("NormedInput", "plain")])
    decoder.linear_norm_rows = 1
    calls.clear()
    decoder.linear_kernel = LINEAR_PROJECTIONS[:-1]
    decoder(step, slots[:1])
    assert calls == tensor_in * layers
    for fused, fusions in ((False, True), (True, False)):
        calls.clear()
        decoder.fused, decoder.linear_kernel, decoder.linear_fusions = fused, True, fusions
        decoder(step, slots[:1])
        assert calls == [("Tensor", "plain")] * (4 * layers + 1)
    assert options and all(o == {} for o in options)
    options.clear()
    decoder.linear_plan_options = dict(swap_ab=True, prefetch_steps=8)  # every call asks plan_linear for them
    decoder(step, slots[:1])
    assert options and all(o == dict(swap_ab=True, prefetch_steps=8) for o in options)


def _bad_calls():
    x, w, b = make(2, 3, 20, 40, torch.float32)
    stats, norm_weight = torch.ones(2, 5, 3, device=DEVICE), torch.ones(2, 40, device=DEVICE)
    return [
        ("x must be \\[C, M, K\\]", lambda: decode_linear(x[0], w, b)),
        ("copies and inputs must match", lambda: decode_linear(x, w[:, :, :30], b)),
        ("copies and inputs must match", lambda: decode_linear(x, w[:1], b)),
        ("1 to 64 rows", lambda: decode_linear(torch.zeros(2, 65, 40, device=DEVICE), w, b)),
        ("share one dtype", lambda: decode_linear(x, w.half(), None)),
        ("share one dtype", lambda: decode_linear(x.double(), w.double(), None)),
        ("unit stride in K", lambda: decode_linear(x.transpose(1, 2).contiguous().transpose(1, 2)[:, :, :3],
                                                   w[:, :, :3])),
        ("bias must be \\[C, N\\]", lambda: decode_linear(x, w, b[:, :10])),
        ("counters must be int32", lambda: decode_linear(x, w, b, counters=torch.zeros(3, dtype=torch.int32,
                                                                                        device=DEVICE))),
        ("must be a tensor or a NormedInput", lambda: decode_linear([x], w, b)),
        ("gated takes an even number of outputs", lambda: decode_linear(x, w[:, :19], b[:, :19], gated=True)),
        ("at most one", lambda: decode_linear(x, w, b, gated=True, residual=torch.zeros(2, 3, 20, device=DEVICE))),
        ("qkv width 20 is not", lambda: decode_linear(x, w, b, rotary=RotaryCacheWrite(
            torch.ones(3, 1, 4, device=DEVICE), torch.ones(3, 1, 4, device=DEVICE),
            torch.ones(2, 4, 5, 1, 4, device=DEVICE), torch.ones(2, 4, 5, 1, 4, device=DEVICE),
            torch.arange(3, device=DEVICE), torch.zeros(3, 1, dtype=torch.int64, device=DEVICE), 2, 1))),
        ("stats must be contiguous float32 \\[C, T, M\\]",
         lambda: decode_linear(NormedInput(x, stats[:, :, :2], norm_weight, 1e-6), w, b)),
        ("stats must be contiguous float32",
         lambda: decode_linear(NormedInput(x, stats.half(), norm_weight, 1e-6), w, b)),
        ("NormedInput weight must be \\[C, K\\]",
         lambda: decode_linear(NormedInput(x, stats, norm_weight[:1], 1e-6), w, b)),
        ("eps must be >= 0", lambda: decode_linear(NormedInput(x, stats, norm_weight, -1.0), w, b)),
        ("residual must be \\[C, M, N\\]", lambda: decode_linear(x, w, b, residual=x)),
        ("x.s must be a tensor, got list", lambda: decode_linear(NormedInput([x], stats, norm_weight, 1e-6), w, b)),
        ("weight must be a tensor, got list", lambda: decode_linear(x, [w], b)),
        ("no inputs \\(K = 0\\)", lambda: decode_linear(x[:, :, :0], w[:, :, :0], b)),
        ("block_m must be a power of two >= the call's 3 rows",
         lambda: decode_linear(x, w, b, plan=dataclasses.replace(plan_linear(2, 1, 20, 40, x.device), block_m=2))),
        ("which must cover the call's 40",
         lambda: decode_linear(x, w, b, plan=plan_linear(2, 3, 20, 20, x.device))),
        ("block_n must be a power of two >= 16",
         lambda: decode_linear(x, w, b, plan=dataclasses.replace(plan_linear(2, 3, 20, 40, x.device), block_n=8))),
        ("residual must be \\[C, M, N\\]", lambda: decode_linear(x, w, b, residual=torch.zeros(2, 3, 20, device=DEVICE,
                                                                                         dtype=torch.float16))),
    ]


@pytest.mark.parametrize("match,call", _bad_calls())
def test_rejects_malformed_inputs(match, call):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape", [(1, 1, 4608, 3584), (2, 32, 2560, 2048), (1, 64, 3584, 3584)])
@pytest.mark.parametrize("change", [{}, dict(swap_ab=True, block_n=128), dict(prefetch_steps=64)],
                         ids=["default", "swap_ab", "prefetch_whole_split"])
def test_cuda_graph_replay_at_model_shapes(shape, change):
    """The real GPU plans (split K reduced through the tickets) at the 7B teacher's and the 3B pair's
    qkv shapes and the 7B's o at 64 rows, with the weight tile leading the product (128 weight rows
    a tile, the warpgroup MMA) and with each program's whole weight range asked of L2 before it
    waits: against float64; captured in a CUDA graph, replays on new inputs equal eager launches,
    bit for bit, and leave the tickets at zero."""
    x, w, b = make(*shape, torch.bfloat16)
    counters = counters_for(shape[0], shape[2], DEVICE)
    plan = plan_linear(*shape, x.device, **change)
    assert plan.split_k > 1
    assert_close_to_reference(decode_linear(x, w, b, counters=counters, plan=plan), x, w, b)  # compiles outside
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_linear(x, w, b, counters=counters, plan=plan)
    for seed in (1, 2, 3):
        x.copy_(make(*shape, torch.bfloat16, seed=seed)[0])
        graph.replay()
        torch.testing.assert_close(out, decode_linear(x, w, b, counters=counters, plan=plan), rtol=0, atol=0)
        assert_close_to_reference(out, x, w, b)
    assert not counters.any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("copies,hidden,inter,heads,kv_heads", [(1, 3584, 18944, 28, 4), (2, 2048, 11008, 16, 2)])
def test_cuda_fused_layer_at_model_shapes(copies, hidden, inter, heads, kv_heads):
    """One batch-1 decoder layer of the 7B teacher's and the 3B pair's shapes as a fused decode step
    runs it, on the GPU plans (split K through the tickets, many tiles per norm statistic): qkv of a
    NormedInput with the rotary epilogue, o with the residual epilogue, gate/up of a NormedInput
    with the gated epilogue, down with the residual epilogue; against the plain products and the
    separate layer kernels: the same queries, cache entries, activations and residual streams within
    a rounding of bf16 (the norms' sums of squares add in another order)."""
    from adfast.kernels.rms_norm import add_rms_norm

    g = torch.Generator().manual_seed(9)
    dtype, head_dim, eps = torch.bfloat16, 128, 1e-6

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(DEVICE, dtype)

    width = (heads + 2 * kv_heads) * head_dim
    w_qkv, b_qkv = rand(copies, width, hidden, scale=hidden ** -0.5), rand(copies, width)
    w_o = rand(copies, hidden, heads * head_dim, scale=hidden ** -0.5)
    w_gate_up, w_down = rand(copies, 2 * inter, hidden, scale=hidden ** -0.5), rand(copies, hidden, inter,
                                                                                   scale=inter ** -0.5)
    norm, stream = rand(copies, hidden, scale=0.1) + 1, rand(copies, 1, hidden)
    attention = rand(copies, 1, heads * head_dim)
    cos, sin = (f(torch.rand(1, 1, head_dim, generator=g) * 6).to(DEVICE) for f in (torch.cos, torch.sin))
    slots, write_pos = torch.tensor([1], device=DEVICE), torch.tensor([[17]], device=DEVICE)
    fused_cache, separate_cache = ([torch.zeros(copies, 2, 41, kv_heads, head_dim, dtype=dtype, device=DEVICE)
                                    for _ in range(2)] for _ in range(2))
    counters = counters_for(copies, max(width, 2 * inter), DEVICE)

    normed = NormedInput(stream, block_squares(stream, 112).to(DEVICE), norm, eps)  # as a down projection hands over
    _, h = add_rms_norm(stream, norm, eps)
    q = decode_linear(normed, w_qkv, b_qkv, counters=counters,
                      rotary=RotaryCacheWrite(cos, sin, *fused_cache, slots, write_pos, heads, kv_heads))
    q_want = rope_and_cache_write(decode_linear(h, w_qkv, b_qkv, counters=counters), cos, sin, *separate_cache, slots,
                                  write_pos, heads, kv_heads)
    mid = decode_linear(attention, w_o, residual=stream, counters=counters)
    s, h = add_rms_norm(stream, norm, eps, decode_linear(attention, w_o, counters=counters))
    a = decode_linear(NormedInput(mid.s, mid.stats, norm, eps), w_gate_up, gated=True, counters=counters)
    a_want = silu_mul(decode_linear(h, w_gate_up, counters=counters))
    last = decode_linear(a, w_down, residual=mid.s, counters=counters)
    s_want, _ = add_rms_norm(s, norm, eps, decode_linear(a_want, w_down, counters=counters))
    assert torch.equal(mid.s, s)
    for got, want in ((q, q_want), *zip(fused_cache, separate_cache), (a, a_want), (last.s, s_want)):
        scale = want.float().abs().max().item()
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=2 ** -7 * scale)
    assert not counters.any()
