"""ProxyPair: perturbed weights, D against forward-mode AD, rounding diagnostics and refusals."""
import math
import warnings

import numpy
import pytest
import torch
from conftest import tiny_llama, tiny_qwen2
from test_gradient import make_examples
from torch.func import functional_call, jvp

from adfast.gradient import proxy_gradient, save_gradient
from adfast.proxy_pair import ProxyPair


@pytest.fixture(scope="module")
def qwen2_gradient():
    return proxy_gradient(tiny_qwen2(), make_examples(), progress=False)


@pytest.fixture(scope="module")
def llama_gradient():
    return proxy_gradient(tiny_llama(), make_examples(), progress=False)


def build(proxy, gradient, eps, **kwargs):
    """ProxyPair.from_gradient with any warning turned into an error (tests opt in to warnings)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return ProxyPair.from_gradient(proxy, gradient, eps, **kwargs)


@pytest.mark.parametrize("dtype, eps", [(torch.float32, 1e-3), (torch.bfloat16, 0.1)])
@pytest.mark.parametrize("make_model, gradient_name", [(tiny_qwen2, "qwen2_gradient"), (tiny_llama, "llama_gradient")])
def test_weights_are_float32_perturbation_cast_back(make_model, gradient_name, dtype, eps, request):
    gradient = request.getfixturevalue(gradient_name)
    proxy = make_model().to(dtype)
    before = {name: p.detach().clone() for name, p in proxy.named_parameters()}
    pair = build(proxy, gradient, eps)
    plus, minus = dict(pair.plus.named_parameters()), dict(pair.minus.named_parameters())
    moved = vanished = 0
    for name, w in before.items():
        g = gradient.grads[name]
        want_plus = (w.float() + eps * g.float()).to(dtype)
        want_minus = (w.float() - eps * g.float()).to(dtype)
        assert plus[name].dtype == dtype and torch.equal(plus[name], want_plus), name
        assert torch.equal(minus[name], want_minus), name
        assert not plus[name].requires_grad and not minus[name].requires_grad
        assert torch.equal(dict(proxy.named_parameters())[name], w)  # the proxy is untouched
        moved += int((g != 0).sum())
        vanished += int(((want_plus == want_minus) & (g != 0)).sum())
    assert pair.vanished_fraction == pytest.approx(vanished / moved)
    # float32 loses only the tiniest gradient entries; bfloat16's 8-bit mantissa loses many more
    assert pair.vanished_fraction < 0.01 if dtype == torch.float32 else 0.1 < pair.vanished_fraction < 0.5
    assert not pair.plus.training and not pair.minus.training
    assert pair.eps == eps and pair.model_id == gradient.model_id
    if make_model is tiny_llama:  # the tie survives the copy: the head moved with the embedding
        assert pair.plus.lm_head.weight is pair.plus.model.embed_tokens.weight


@pytest.mark.parametrize("make_model, gradient_name", [(tiny_qwen2, "qwen2_gradient"), (tiny_llama, "llama_gradient")])
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch's own jvp setup
def test_finite_difference_matches_forward_mode_directional_derivative(make_model, gradient_name, request):
    gradient = request.getfixturevalue(gradient_name)
    proxy, eps = make_model(), 1e-3
    pair = build(proxy, gradient, eps)
    x = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        d_fd = (torch.log_softmax(pair.plus(input_ids=x).logits, -1)
                - torch.log_softmax(pair.minus(input_ids=x).logits, -1)) / (2 * eps)
    params = {name: p.detach() for name, p in proxy.named_parameters()}
    logprobs = lambda p: torch.log_softmax(functional_call(proxy, p, (x,)).logits, -1)  # noqa: E731
    _, d_ad = jvp(logprobs, (params,), ({name: gradient.grads[name] for name in params},))
    assert d_ad.abs().mean() > 1e-2  # a real signal, not two zeros agreeing
    assert (d_fd - d_ad).norm() / d_ad.norm() < 5e-3  # observed ~4e-4: O(eps^2) truncation + float32 rounding


def test_too_small_eps_in_bfloat16_vanishes(llama_gradient, qwen2_gradient):
    with pytest.raises(ValueError, match=r"eps=1e-12 is too small.*bfloat16.*larger eps"):
        build(tiny_llama().to(torch.bfloat16), llama_gradient, 1e-12)
    # Qwen2's zero-initialised attention biases still move (1e-12 is representable next to 0):
    # D is not identically zero, but nearly every perturbation rounded away.
    with pytest.warns(UserWarning, match="rounded away"):
        pair = ProxyPair.from_gradient(tiny_qwen2().to(torch.bfloat16), qwen2_gradient, 1e-12)
    assert pair.vanished_fraction > 0.98


def test_moderate_rounding_warns_above_threshold(qwen2_gradient):
    proxy = tiny_qwen2().to(torch.bfloat16)
    with pytest.warns(UserWarning, match=r"eps=0.01: the perturbation rounded away in \d+\.\d%"):
        pair = ProxyPair.from_gradient(proxy, qwen2_gradient, 0.01)
    assert 0.5 < pair.vanished_fraction < 1
    build(proxy, qwen2_gradient, 0.01, warn_above=0.9)  # no warning under a higher threshold


def test_mismatched_names_and_shapes_are_listed(qwen2_gradient):
    grads = dict(qwen2_gradient.grads)
    del grads["model.norm.weight"]
    grads["model.extra.weight"] = torch.ones(3)
    grads["lm_head.weight"] = torch.ones(96, 31)
    with pytest.raises(ValueError) as info:
        build(tiny_qwen2(), grads, 1e-3)
    message = str(info.value)
    assert "missing (1): model.norm.weight" in message
    assert "unexpected (1): model.extra.weight" in message
    assert "shape mismatch (1): lm_head.weight (gradient (96, 31), proxy (96, 32))" in message
    few = {name: g for name, g in qwen2_gradient.grads.items() if "layers" not in name}
    listing = r"missing \(24\): model\.layers\.\S+(, model\.layers\.\S+){5}, \.\.\. \(18 more\)"
    with pytest.raises(ValueError, match=listing):
        build(tiny_qwen2(), few, 1e-3)


def test_gradient_file_of_another_model_is_refused(tmp_path, qwen2_gradient):
    # Same parameter names and shapes (head_dim 4 instead of 8), so only the fingerprint can tell.
    other = tiny_qwen2(num_attention_heads=8, num_key_value_heads=4)
    assert {n: p.shape for n, p in other.named_parameters()} == {n: p.shape for n, p in tiny_qwen2().named_parameters()}
    path = tmp_path / "other.safetensors"
    save_gradient(path, proxy_gradient(other, make_examples(), progress=False))
    with pytest.raises(ValueError, match="computed for another model"):
        build(tiny_qwen2(), path, 1e-3)
    bigger = tmp_path / "bigger.safetensors"
    save_gradient(bigger, proxy_gradient(tiny_qwen2(hidden_size=64), make_examples(), progress=False))
    with pytest.raises(ValueError, match="computed for another model"):
        build(tiny_qwen2(), str(bigger), 1e-3)


def test_gradient_file_of_the_same_model_gives_the_same_pair(tmp_path, qwen2_gradient):
    path = tmp_path / "g.safetensors"
    save_gradient(path, qwen2_gradient)
    from_file, from_object = build(tiny_qwen2(), path, 1e-3), build(tiny_qwen2(), qwen2_gradient, 1e-3)
    for (name, a), (_, b) in zip(from_file.plus.named_parameters(), from_object.plus.named_parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("eps", [0.0, -1e-3, math.nan, math.inf])
def test_bad_eps_is_refused(eps, qwen2_gradient):
    with pytest.raises(ValueError, match="eps must be a finite float > 0"):
        build(tiny_qwen2(), qwen2_gradient, eps)


def test_eps_is_any_real_scalar_and_overflow_is_refused(qwen2_gradient):
    """A numpy or one-element tensor eps builds the pair of the float; an eps whose perturbation
    overflows the weight dtype (float16's 65504 here) is refused, naming the tensors."""
    expected = build(tiny_qwen2(), qwen2_gradient, 1e-3)
    for eps in (numpy.float32(1e-3), torch.tensor(1e-3)):
        pair = build(tiny_qwen2(), qwen2_gradient, eps)
        assert pair.eps == pytest.approx(1e-3)
        for (name, a), (_, b) in zip(pair.plus.named_parameters(), expected.plus.named_parameters()):
            assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="eps=1e\\+07 is too large for the proxy's dtype \\(torch.float16\\): "
                                         "theta \\+- eps g overflows"):
        build(tiny_qwen2().half(), qwen2_gradient, 1e7)


def test_zero_gradient_is_refused(qwen2_gradient):
    zeros = {name: torch.zeros_like(g) for name, g in qwen2_gradient.grads.items()}
    with pytest.raises(ValueError, match="zero everywhere"):
        build(tiny_qwen2(), zeros, 1e-3)
    nan = {**zeros, "lm_head.weight": torch.full((96, 32), math.nan)}
    with pytest.raises(ValueError, match="NaN or inf entries in: lm_head.weight"):
        build(tiny_qwen2(), nan, 1e-3)
