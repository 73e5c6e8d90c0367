"""The decoder with its fused Triton layer kernels against its PyTorch path (on KERNEL_DEVICE: the
compiled kernels on a GPU, the interpreter on CPU).

Each kernel has its own tests against the PyTorch functions of adfast.layer_ops and float64 /
autograd references; these check the wiring: the same decoder run with ``fused=True`` and
``fused=False`` (a right-padded prefill of prompts of different lengths, then decode steps) gives
the same logits, the same tangent logits and the same caches, for one copy (teacher) and two
stacked copies (proxy pair), Qwen2 (random qkv biases, untied) and Llama (tied, llama3 rope).
"""
import pytest
import torch
from conftest import KERNEL_DEVICE, VOCAB, tiny_llama, tiny_qwen2, with_random_biases

from adfast.decoder import Decoder
from adfast.gradient import ProxyGradient
from adfast.provenance import model_identity
from adfast.layer_ops import TORCH, layer_ops
from adfast.low_rank import low_rank_gradient

PROMPTS = [[5, 7, 9, 11, 2], [3], [13, 14, 15]]
SLOTS = torch.tensor([2, 0, 1])


def run(decoder: Decoder, fused: bool, tangent: bool, steps: int = 2, linear_kernel: bool = False,
        prompts: int = len(PROMPTS), swap_ab: bool = False, norm_rows: int = 1):
    """Prefill the first ``prompts`` of PROMPTS, then ``steps`` decode steps of fixed tokens: every
    step's logits (and tangent logits); ``linear_kernel``: the layers' linears in the decode-time
    GEMM kernel (``swap_ab``: with the weight tile leading its product; ``norm_rows``: the norms
    inside it at decode steps of up to that many rows)."""
    decoder.fused, decoder.linear_kernel, decoder.linear_plan_options = fused, linear_kernel, dict(swap_ab=swap_ab)
    decoder.linear_norm_rows = norm_rows
    decoder.setup_cache(4, 12)
    device = decoder.embed.device
    ids = torch.zeros(prompts, max(map(len, PROMPTS[:prompts])), dtype=torch.int64)
    for b, p in enumerate(PROMPTS[:prompts]):
        ids[b, :len(p)] = torch.tensor(p)
    lengths = torch.tensor([len(p) for p in PROMPTS[:prompts]])
    slots = SLOTS[:prompts].to(device)
    outputs = [decoder(ids.to(device), slots, lengths.to(device), last_only=False, tangent=tangent)]
    for step in range(steps):
        tokens = torch.tensor([[4 + step], [8], [VOCAB - 1 - step]][:prompts], device=device)
        outputs.append(decoder(tokens, slots, tangent=tangent))
    cache = decoder.cache
    caches = [cache.k, cache.v] + ([cache.dk, cache.dv] if tangent else [])
    return outputs, [c.clone() for c in caches], cache.lengths.clone()


def assert_same_runs(a, b, tol):
    (out_a, caches_a, lengths_a), (out_b, caches_b, lengths_b) = a, b
    assert torch.equal(lengths_a, lengths_b)
    for x, y in zip(out_a, out_b):
        for u, v in zip(x if isinstance(x, tuple) else (x,), y if isinstance(y, tuple) else (y,)):
            torch.testing.assert_close(u, v, **tol)
    for x, y in zip(caches_a, caches_b):
        torch.testing.assert_close(x.float(), y.float(), **tol)


TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=0.05, atol=0.05)}


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("copies", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_decoder_equals_pytorch_decoder(family, copies, dtype):
    model = with_random_biases((tiny_qwen2 if family == "qwen2" else tiny_llama)())
    decoder = Decoder.from_hf([model] * copies, dtype=dtype, device=KERNEL_DEVICE)
    assert_same_runs(run(decoder, True, False), run(decoder, False, False), TOLERANCE[dtype])


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("copies", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("swap_ab", [False, True])
def test_decode_linear_decoder_equals_pytorch_decoder(family, copies, dtype, swap_ab):
    """The layers' linears (prefill of 15 rows and decode steps, all within the kernel's 64 rows) in
    adfast.kernels.decode_linear, with the bias in its epilogue, and with the weight tile leading
    its product (``Decoder.linear_plan_options``): the same logits and caches."""
    model = with_random_biases((tiny_qwen2 if family == "qwen2" else tiny_llama)())
    decoder = Decoder.from_hf([model] * copies, dtype=dtype, device=KERNEL_DEVICE)
    assert_same_runs(run(decoder, True, False, linear_kernel=True, swap_ab=swap_ab), run(decoder, False, False),
                     TOLERANCE[dtype])


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("copies", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_one_fused_norms_decoder_equals_pytorch_decoder(family, copies, dtype):
    """One prompt: its decode steps run the norms inside the linear kernel (residual epilogues and
    normed inputs, Decoder._fuses_norms): the same logits and caches as the PyTorch decoder."""
    model = with_random_biases((tiny_qwen2 if family == "qwen2" else tiny_llama)())
    decoder = Decoder.from_hf([model] * copies, dtype=dtype, device=KERNEL_DEVICE)
    assert_same_runs(run(decoder, True, False, steps=3, linear_kernel=True, prompts=1),
                     run(decoder, False, False, steps=3, prompts=1), TOLERANCE[dtype])


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("swap_ab", [False, True])
def test_batched_fused_norms_decoder_equals_pytorch_decoder(family, dtype, swap_ab):
    """Three prompts with ``Decoder.linear_norm_rows = 3``: their decode steps (three rows) run the
    norms inside the linear kernel, each output tile normalising its ``[rows, BLOCK_K]`` input tile,
    in both operand orders: the same logits and caches as the PyTorch decoder."""
    model = with_random_biases((tiny_qwen2 if family == "qwen2" else tiny_llama)())
    decoder = Decoder.from_hf([model] * 2, dtype=dtype, device=KERNEL_DEVICE)
    assert_same_runs(run(decoder, True, False, steps=3, linear_kernel=True, swap_ab=swap_ab, norm_rows=3),
                     run(decoder, False, False, steps=3), TOLERANCE[dtype])


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_fused_tangent_decoder_equals_pytorch_decoder(family):
    model = with_random_biases((tiny_qwen2 if family == "qwen2" else tiny_llama)())
    g = torch.Generator().manual_seed(5)
    decoder = Decoder.from_hf([model], device=KERNEL_DEVICE)
    decoder.set_tangent({name: torch.randn(p.shape, generator=g) for name, p in model.named_parameters()})
    assert_same_runs(run(decoder, True, True), run(decoder, False, True), TOLERANCE[torch.float32])


def low_rank_tangent_decoder(model, device) -> Decoder:
    """A one-copy float32 decoder along the rank-4 factors of a random gradient: every fused weight's
    ``x G^T`` is one product ``z U^T`` that the next layer op adds (block-diagonal ``U`` for wqkv and
    w_gate_up)."""
    g = torch.Generator().manual_seed(6)
    grads = {name: torch.randn(p.shape, generator=g) for name, p in model.named_parameters()}
    gradient = ProxyGradient(grads=grads, loss=0.0, num_examples=0, num_tokens=0, model_id=model_identity(model))
    decoder = Decoder.from_hf([model], dtype=torch.float32, device=device)
    decoder.set_tangent(low_rank_gradient(gradient, 4))
    assert decoder.tangent_weights["layers.0.wqkv"].block_diagonal is not None
    return decoder


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_fused_low_rank_tangent_decoder_equals_pytorch_decoder(family):
    """The kernels add the low-rank terms of wqkv, wo, w_gate_up and w_down as they load the tangent
    (adfast.kernels.low_rank_term); the PyTorch path adds them with a matmul: same outputs."""
    model = with_random_biases((tiny_qwen2 if family == "qwen2" else tiny_llama)())
    decoder = low_rank_tangent_decoder(model, KERNEL_DEVICE)
    assert_same_runs(run(decoder, True, True), run(decoder, False, True), TOLERANCE[torch.float32])


def test_layer_ops_choice():
    cpu = torch.zeros(2)
    assert layer_ops(cpu) is TORCH and layer_ops(cpu, fused=False) is TORCH
    fused = layer_ops(cpu, fused=True)
    assert fused is not TORCH and set(vars(fused)) == set(vars(TORCH))
    assert layer_ops(cpu.double()) is TORCH
    with pytest.raises(ValueError, match="float64"):
        layer_ops(cpu.double(), fused=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_fused_decoder_equals_pytorch_decoder(dtype):
    """On the GPU: the compiled kernels (and CUDA decode attention) against the PyTorch chains; the
    GPU-marked subset of the tests above, which run on the GPU too where one exists."""
    model, qwen2 = tiny_llama(), with_random_biases(tiny_qwen2())
    for pair_model in (model, qwen2):  # a Qwen2 pair adds its qkv bias in the rotary kernel
        decoder = Decoder.from_hf([pair_model] * 2, dtype=dtype, device="cuda")
        assert_same_runs(run(decoder, True, False), run(decoder, False, False), TOLERANCE[dtype])
    for model in (model, qwen2):  # the tangent pass adds Qwen2's qkv bias in the rotary kernel
        decoder = Decoder.from_hf([model], dtype=torch.float32, device="cuda")
        g = torch.Generator().manual_seed(5)
        decoder.set_tangent({name: torch.randn(p.shape, generator=g) for name, p in model.named_parameters()})
        assert_same_runs(run(decoder, True, True), run(decoder, False, True), TOLERANCE[torch.float32])
        decoder = low_rank_tangent_decoder(model, "cuda")  # the kernels add the factored tangents' terms
        assert_same_runs(run(decoder, True, True), run(decoder, False, True), TOLERANCE[torch.float32])
