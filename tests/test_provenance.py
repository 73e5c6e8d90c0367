"""A stored gradient knows its proxy: the architecture fingerprint and the weights signature."""
import base64
import struct

import pytest
import torch
from conftest import tiny_llama, tiny_qwen2
from safetensors import safe_open
from safetensors.torch import save_file
from test_gradient import make_examples

from adfast.exact_delta import resolve_direction, resolve_gradient
from adfast.gradient import load_gradient, proxy_gradient, save_gradient
from adfast.low_rank import low_rank_gradient, save_low_rank_gradient
from adfast.provenance import SAMPLES_PER_TENSOR, model_fingerprint, weights_signature
from adfast.proxy_pair import ProxyPair

OTHER_WEIGHTS = "computed for other weights of this architecture"


@pytest.fixture(scope="module")
def gradient():
    return proxy_gradient(tiny_qwen2(), make_examples(), progress=False)


def test_fingerprint_tracks_architecture_not_weights_or_dtype():
    base = model_fingerprint(tiny_qwen2())
    assert model_fingerprint(tiny_qwen2(seed=5)) == base
    assert model_fingerprint(tiny_qwen2().to(torch.bfloat16)) == base
    assert model_fingerprint(tiny_qwen2(num_hidden_layers=3)) != base
    assert model_fingerprint(tiny_qwen2(num_attention_heads=8, num_key_value_heads=4)) != base
    assert model_fingerprint(tiny_llama()) != base


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_signature_is_the_documented_samples(dtype):
    model = tiny_llama().to(dtype)
    dtypes, _, payload = weights_signature(model).rpartition(":")
    raw = base64.b64decode(payload)
    params = list(model.named_parameters())
    assert dtypes == str(dtype).removeprefix("torch.")
    assert len(raw) == 4 * SAMPLES_PER_TENSOR * len(params)
    values = struct.unpack(f"<{len(raw) // 4}f", raw)
    for k, (name, p) in enumerate(params):
        flat = p.detach().flatten().tolist()
        want = [flat[(i * 2654435761) % len(flat)] for i in range(SAMPLES_PER_TENSOR)]
        assert list(values[k * SAMPLES_PER_TENSOR:(k + 1) * SAMPLES_PER_TENSOR]) == want, name


def test_gradient_of_another_checkpoint_is_refused_everywhere(tmp_path, gradient):
    other = tiny_qwen2(seed=5)  # same architecture, other weights
    dense_file, low_rank_file = tmp_path / "g.safetensors", tmp_path / "g-r2.safetensors"
    save_gradient(dense_file, gradient)
    save_low_rank_gradient(low_rank_file, low_rank_gradient(gradient, 2))
    for source in (gradient, dense_file, str(low_rank_file)):
        with pytest.raises(ValueError, match=OTHER_WEIGHTS + r".*bit-equal \(same dtypes\)"):
            ProxyPair.from_gradient(other, source, 1e-3)
        with pytest.raises(ValueError, match=OTHER_WEIGHTS):
            resolve_gradient(other, source)
        with pytest.raises(ValueError, match=OTHER_WEIGHTS):
            resolve_direction(other, source)
    with pytest.raises(ValueError, match=OTHER_WEIGHTS):
        resolve_direction(other, low_rank_gradient(gradient, 2))
    # the proxy it was computed with passes every route
    for source in (gradient, dense_file, str(low_rank_file)):
        ProxyPair.from_gradient(tiny_qwen2(), source, 1e-3)
        resolve_direction(tiny_qwen2(), source)


def _nudged(model, factor):
    """``model`` with one layer's MLP weights multiplied by ``factor`` (a fine-tune-sized change)."""
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(factor)
    return model


def test_a_sub_bf16_step_change_is_caught_when_the_dtype_is_kept(gradient):
    with pytest.raises(ValueError, match=OTHER_WEIGHTS) as info:
        ProxyPair.from_gradient(_nudged(tiny_qwen2(), 1 + 2.0 ** -20), gradient, 1e-3)
    assert "model.layers.1.mlp.down_proj.weight sample" in str(info.value)
    assert f"of {SAMPLES_PER_TENSOR * len(list(tiny_qwen2().parameters()))} sampled weights" in str(info.value)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_across_dtypes_rounding_passes_and_larger_changes_do_not(gradient, dtype):
    pair = ProxyPair.from_gradient(tiny_qwen2().to(dtype), gradient, 0.1)  # computed in float32
    assert next(pair.plus.parameters()).dtype == dtype
    ProxyPair.from_gradient(_nudged(tiny_qwen2(), 1 + 2.0 ** -12).to(dtype), gradient, 0.1)  # below the rule
    with pytest.raises(ValueError, match=OTHER_WEIGHTS + r".*one bf16 rounding step \(float32 when computed, "):
        ProxyPair.from_gradient(_nudged(tiny_qwen2(), 1.05).to(dtype), gradient, 0.1)
    with pytest.raises(ValueError, match=OTHER_WEIGHTS):
        ProxyPair.from_gradient(tiny_qwen2(seed=5).to(dtype), gradient, 0.1)


def test_bare_mapping_and_unsigned_files_skip_the_weights_check(tmp_path, gradient):
    other = tiny_qwen2(seed=5)
    ProxyPair.from_gradient(other, dict(gradient.grads), 1e-3)
    path = tmp_path / "g.safetensors"
    save_gradient(path, gradient)
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    unsigned = {key: value for key, value in metadata.items() if key != "weights_signature"}
    save_file(tensors, str(path), metadata=unsigned)  # a file written before signatures existed
    assert load_gradient(path).weights_signature is None
    ProxyPair.from_gradient(other, path, 1e-3)
    save_file(tensors, str(path), metadata={**unsigned, "weights_signature": "float32:not base64!"})
    with pytest.raises(ValueError, match=f"{path}: malformed metadata .malformed weights signature"):
        load_gradient(path)
    short = weights_signature(tiny_qwen2(num_hidden_layers=1))
    save_file(tensors, str(path), metadata={**metadata, "weights_signature": short})
    with pytest.raises(ValueError, match="signature covers 15 parameters, the proxy has 27"):
        ProxyPair.from_gradient(tiny_qwen2(), path, 1e-3)
