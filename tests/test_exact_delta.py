"""exact_delta (forward-mode JVP) against finite differences, reverse-mode autograd and the proxy pair."""
import copy

import pytest
import torch
from conftest import VOCAB, tiny_llama, tiny_qwen2

from adfast.decoder import Decoder
from adfast.exact_delta import (FiniteDifference, angle_sine, exact_delta, finite_difference_delta,
                                relative_error, sequence_lengths)
from adfast.gradient import proxy_gradient
from adfast.proxy_pair import ProxyPair

# torch's forward AD loads its JVP decompositions with torch.jit.script, deprecated in torch 2.13
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
MODELS = {"qwen2": tiny_qwen2, "llama3-tied": tiny_llama}


def traces(seed: int, count: int = 4):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, VOCAB, (5,), generator=g).tolist(), torch.randint(0, VOCAB, (7,), generator=g).tolist())
            for _ in range(count)]


@pytest.fixture(scope="module", params=sorted(MODELS))
def setup(request):
    """A tiny proxy, its real proxy gradient on random traces, and a right-padded batch (row 1 has 9 tokens)."""
    model = MODELS[request.param]()
    gradient = proxy_gradient(model, traces(0), progress=False)
    input_ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.int64)
    mask[1, 9:] = 0
    delta = exact_delta(model, gradient, input_ids, attention_mask=mask)
    return model, gradient, input_ids, mask, delta


def test_exact_delta_shape_dtype_padding(setup):
    model, gradient, input_ids, mask, delta = setup
    assert delta.shape == (2, 12, VOCAB) and delta.dtype == torch.float64
    assert bool((delta[1, 9:] == 0).all()) and bool((delta[0].abs().sum(-1) > 0).all())
    # D is the derivative of log-probabilities: sum_v p_v D_v = d/dh sum_v p_v = 0
    with torch.no_grad():
        p = torch.softmax(model(input_ids[:1]).logits[0].double(), dim=-1)
    assert (p * delta[0]).sum(-1).abs().max() < 1e-5 * delta[0].abs().max()
    # a padded row equals the same row run alone
    alone = exact_delta(model, gradient.grads, input_ids[1:, :9])
    torch.testing.assert_close(delta[1:, :9], alone, rtol=1e-12, atol=1e-13)


def test_float64_finite_differences_converge_to_exact(setup):
    """Central differences in true float64 approach D with error ~ C h^2 until round-off (~u/h) takes over.

    Measured on these models: relative error 1.6e-5 at h=1e-3, 1.6e-7 at 1e-4, 1.6e-9 at 1e-5
    (truncation, exactly 100x per decade), 7e-10 at 3e-6 (the optimum, ~u^(2/3)), 2e-9 at 1e-6 (round-off).
    """
    model, gradient, input_ids, mask, delta = setup
    real = mask.bool()

    def error(h):
        fd = finite_difference_delta(model, gradient, input_ids, h, dtype=torch.float64, attention_mask=mask)
        return relative_error(fd, delta)[real].max().item()

    coarse, fine, best = error(1e-3), error(1e-4), error(1e-5)
    assert 80 < coarse / fine < 120  # second-order convergence: the FD's limit is exact_delta's D
    assert best < 1e-8


def test_matches_reverse_mode_autograd(setup):
    """D[t, v] = <grad_theta log_softmax(logits)[t, v], g>, the gradient by torch.autograd.grad.

    Through transformers' own model cast to float64 (an independent implementation, which checks
    the gradient's name mapping; its RMSNorm runs in float32, hence 1e-6), and through a float64
    Decoder (the same forward, other AD mode: to round-off).
    """
    model, gradient, input_ids, _, delta = setup
    ids = input_ids[:1]
    hf = copy.deepcopy(model).double()
    hf_params = dict(hf.named_parameters())
    decoder = Decoder.from_hf([model], dtype=torch.float64)
    dec_params = {name: p.requires_grad_(True) for name, p in decoder.named_parameters()}
    tangent = dict(Decoder.from_state_dicts(decoder.config, [gradient.grads], dtype=torch.float64).named_parameters())
    decoder.setup_cache(1, ids.shape[1])
    dec_logp = torch.log_softmax(decoder(ids, torch.arange(1), last_only=False)[0, 0], dim=-1)
    hf_logp = torch.log_softmax(hf(ids).logits[0], dim=-1)
    for t, v in [(0, 3), (5, 17), (11, VOCAB - 1)]:
        grads = torch.autograd.grad(hf_logp[t, v], list(hf_params.values()), retain_graph=True)
        via_hf = sum((d * gradient.grads[name].double()).sum() for name, d in zip(hf_params, grads))
        grads = torch.autograd.grad(dec_logp[t, v], list(dec_params.values()), retain_graph=True)
        via_decoder = sum((d * tangent[name]).sum() for name, d in zip(dec_params, grads))
        torch.testing.assert_close(via_hf, delta[0, t, v], rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(via_decoder, delta[0, t, v], rtol=1e-12, atol=1e-14)


def test_float32_exact_delta_close_to_float64(setup):
    model, gradient, input_ids, mask, delta = setup
    single = exact_delta(model, gradient, input_ids, attention_mask=mask, dtype=torch.float32)
    assert single.dtype == torch.float32
    assert relative_error(single, delta)[mask.bool()].max() < 1e-4


def test_bfloat16_eps_trade_off(setup):
    """bf16 finite differences: eps=1e-8 rounds every perturbation away (D identically 0, or pure
    noise: sine ~1); eps=0.05 follows D's direction (sine ~0.05, measured); eps=0.5 is truncation-bound."""
    model, gradient, input_ids, mask, delta = setup
    real = mask.bool()
    pair = FiniteDifference(model, gradient, dtype=torch.bfloat16)

    def sine(eps):
        pair.set_eps(eps)
        fd = pair.delta(input_ids, mask)
        return angle_sine(fd, delta)[real].mean().item(), pair.vanished_fraction, bool((fd[real] == 0).all())

    tiny, vanished, zero = sine(1e-8)
    assert vanished > 0.99 and (zero or tiny > 0.95)
    good, _, _ = sine(0.05)
    assert good < 0.1
    large, _, _ = sine(0.5)
    assert good < large < 0.9


def test_pair_matches_proxy_pair(setup):
    """FiniteDifference perturbs exactly as ProxyPair (same rounding), and its D matches the HF pair's."""
    model, gradient, input_ids, mask, _ = setup
    eps = 1e-2
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    assert (FiniteDifference(model, gradient, dtype=torch.bfloat16).set_eps(eps)
            == ProxyPair.from_gradient(bf16, gradient.grads, eps, warn_above=1.0).vanished_fraction)
    pair = ProxyPair.from_gradient(model, gradient, eps)
    with torch.no_grad():
        plus, minus = (torch.log_softmax(m(input_ids[:1]).logits.float(), -1) for m in (pair.plus, pair.minus))
    ours = finite_difference_delta(model, gradient, input_ids[:1], eps, dtype=torch.float32)
    assert relative_error(ours, (plus - minus) / (2 * eps)).max() < 1e-3


def test_angle_sine_and_relative_error():
    a = torch.tensor([[1.0, 0.0, 0.0], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 5.0, 0.0], [2.0, 4.0, 6.0], [1.0, 1.0, 1.0]])
    torch.testing.assert_close(angle_sine(a, b), torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))
    tiny = torch.tensor([1.0, 1e-9], dtype=torch.float64)  # angle 1e-9: sqrt(1 - cos^2) would give 0
    torch.testing.assert_close(angle_sine(tiny, torch.tensor([1.0, 0.0], dtype=torch.float64)),
                               torch.tensor(1e-9, dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(relative_error(b, a), torch.tensor([26 ** 0.5, 1.0, float("inf")],
                                                                  dtype=torch.float64))
    assert relative_error(a[2], a[2]).item() == 0
    with pytest.raises(ValueError, match="shapes differ"):
        angle_sine(a, b[:2])


def test_input_validation(qwen2_model):
    gradient = proxy_gradient(qwen2_model, traces(0, 1), progress=False)
    ids = torch.zeros(2, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="right padding"):
        sequence_lengths(ids, torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="at least one real token"):
        sequence_lengths(ids, torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="int64"):
        sequence_lengths(ids.int())
    with pytest.raises(ValueError, match="float64 or float32"):
        exact_delta(qwen2_model, gradient, ids, dtype=torch.bfloat16)
    pair = FiniteDifference(qwen2_model, gradient, dtype=torch.float32)
    with pytest.raises(ValueError, match="set_eps"):
        pair.delta(ids)
    with pytest.raises(ValueError, match="eps"):
        pair.set_eps(0.0)
    with pytest.raises(ValueError, match="missing"):
        exact_delta(qwen2_model, {"lm_head.weight": gradient.grads["lm_head.weight"]}, ids)
    with pytest.raises(ValueError, match="another model"):
        exact_delta(tiny_llama(), gradient, ids)
