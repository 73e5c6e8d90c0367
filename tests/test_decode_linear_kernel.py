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
import pytest
import torch
import torch.nn.functional as F
from conftest import KERNEL_DEVICE as DEVICE, tiny_qwen2

from adfast.decoder import LINEAR_KERNEL_ROWS
from adfast.kernels.decode_linear import MAX_ROWS, counters_for, decode_linear, plan_linear

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
    """The default plan and explicit ones: one split, several splits of small K blocks."""
    device = torch.device(DEVICE)
    return [plan_linear(copies, rows, outputs, inputs, device),
            plan_linear(copies, rows, outputs, inputs, device, block_n=16, block_k=16, split_k=1),
            plan_linear(copies, rows, outputs, inputs, device, block_n=32, block_k=16, split_k=3)]


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


def test_plan():
    cpu = torch.device("cpu")
    plan = plan_linear(2, 5, 100, 1000, cpu, block_k=64, split_k=4)
    assert plan.block_m == 16 and plan.k_split % 64 == 0 and plan.split_k * plan.k_split >= 1000
    assert (plan.split_k - 1) * plan.k_split < 1000, "no split may be empty"
    assert plan_linear(1, 33, 16, 16, cpu).block_m == 64
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        plan_linear(1, 1, 16, 16, cpu, block_n=24)


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


def _bad_calls():
    x, w, b = make(2, 3, 20, 40, torch.float32)
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
    ]


@pytest.mark.parametrize("match,call", _bad_calls())
def test_rejects_malformed_inputs(match, call):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape", [(1, 1, 4608, 3584), (2, 32, 2560, 2048)])
def test_cuda_graph_replay_at_model_shapes(shape):
    """The real GPU plans (split K reduced through the tickets) at the 7B teacher's and the 3B pair's
    qkv shapes: captured in a CUDA graph, replays on new inputs equal eager launches, bit for bit,
    and leave the tickets at zero."""
    x, w, b = make(*shape, torch.bfloat16)
    counters = counters_for(shape[0], shape[2], DEVICE)
    assert plan_linear(*shape, x.device).split_k > 1
    assert_close_to_reference(decode_linear(x, w, b, counters=counters), x, w, b)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_linear(x, w, b, counters=counters)
    for seed in (1, 2, 3):
        x.copy_(make(*shape, torch.bfloat16, seed=seed)[0])
        graph.replay()
        torch.testing.assert_close(out, decode_linear(x, w, b, counters=counters), rtol=0, atol=0)
        assert_close_to_reference(out, x, w, b)
    assert not counters.any()
