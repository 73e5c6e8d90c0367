"""Low-rank proxy gradients (adfast.low_rank): truncated SVD factors, storage and the fidelity of D."""
import math
import pickle

import pytest
import torch
from conftest import VOCAB, tiny_llama, tiny_qwen2

from adfast.exact_delta import angle_sine, exact_delta, resolve_direction
from adfast.gradient import ProxyGradient, proxy_gradient, save_gradient
from adfast.low_rank import (LowRankGradient, captured_energy, is_low_rank_file, load_low_rank_gradient,
                             low_rank_gradient, save_low_rank_gradient, total_energy)


def _gradient(grads: dict[str, torch.Tensor]) -> ProxyGradient:
    return ProxyGradient(grads=grads, loss=1.5, num_examples=3, num_tokens=21, model_id="test@x-v1-h1-l1-abc")


def _rank_k(m: int, n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=g, dtype=torch.float64) @ torch.randn(k, n, generator=g, dtype=torch.float64)).float()


def traces(seed: int, count: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, VOCAB, (5,), generator=g).tolist(), torch.randint(0, VOCAB, (7,), generator=g).tolist())
            for _ in range(count)]


def test_known_rank_reconstructed_exactly():
    matrix = _rank_k(40, 24, 5)
    for rank in (5, 6, 12):
        lr = low_rank_gradient(_gradient({"w": matrix}), rank)
        assert set(lr.factors) == {"w"} and not lr.dense
        u, v = lr.factors["w"]
        assert u.shape == (40, rank) and v.shape == (24, rank)
        rebuilt = lr.to_dense().grads["w"]
        assert rebuilt.dtype == torch.float32
        torch.testing.assert_close(rebuilt, matrix, rtol=1e-5, atol=1e-4 * float(matrix.abs().max()))
        assert captured_energy(_gradient({"w": matrix}), lr)["w"] == pytest.approx(1.0, abs=1e-6)


def test_truncation_error_is_discarded_singular_values():
    matrix = torch.randn(50, 30, generator=torch.Generator().manual_seed(3))
    sigma = torch.linalg.svdvals(matrix.double())
    gradient = _gradient({"w": matrix})
    for rank in (1, 4, 10, 29):
        lr = low_rank_gradient(gradient, rank)
        error = float((lr.to_dense().grads["w"].double() - matrix.double()).norm())
        assert error == pytest.approx(float(sigma[rank:].norm()), rel=1e-4)
        energy = captured_energy(gradient, lr)["w"]
        assert energy == pytest.approx(float(sigma[:rank].pow(2).sum() / sigma.pow(2).sum()), rel=1e-5)
    energies = [captured_energy(gradient, low_rank_gradient(gradient, r))["w"] for r in (1, 2, 4, 8, 16)]
    assert energies == sorted(energies)


def test_vectors_and_small_matrices_kept_dense():
    grads = {"norm.weight": torch.randn(24), "bias": torch.randn(7), "small": torch.randn(4, 30),
             "big": torch.randn(30, 20)}
    lr = low_rank_gradient(_gradient(grads), 4)
    assert set(lr.factors) == {"big"}
    assert set(lr.dense) == {"norm.weight", "bias", "small"}
    for name in lr.dense:
        assert torch.equal(lr.dense[name], grads[name])
    dense = lr.to_dense()
    assert list(dense.grads) == list(grads)
    assert dense.model_id == "test@x-v1-h1-l1-abc" and dense.loss == 1.5 and dense.num_tokens == 21
    assert lr.numel() == 24 + 7 + 4 * 30 + 4 * (30 + 20)
    assert lr.dense_numel() == 24 + 7 + 4 * 30 + 30 * 20
    assert lr.bytes(torch.bfloat16) == 2 * lr.numel() and lr.dense_bytes(torch.float32) == 4 * lr.dense_numel()
    assert total_energy(_gradient(grads), low_rank_gradient(_gradient(grads), 20)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="rank"):
        low_rank_gradient(_gradient(grads), 0)


def test_save_load_round_trip(tmp_path):
    grads = {"a.weight": torch.randn(20, 12), "a.bias": torch.randn(20), "b.weight": torch.randn(12, 16)}
    lr = low_rank_gradient(_gradient(grads), 3)
    path = tmp_path / "g.safetensors"
    save_low_rank_gradient(path, lr)
    loaded = load_low_rank_gradient(path)
    assert isinstance(loaded, LowRankGradient)
    assert (loaded.rank, loaded.model_id, loaded.loss, loaded.num_examples, loaded.num_tokens) == (
        3, lr.model_id, lr.loss, lr.num_examples, lr.num_tokens)
    assert loaded.names() == list(grads)
    assert set(loaded.factors) == {"a.weight", "b.weight"} and set(loaded.dense) == {"a.bias"}
    for name, (u, v) in lr.factors.items():
        assert torch.equal(loaded.factors[name][0], u) and torch.equal(loaded.factors[name][1], v)
    assert torch.equal(loaded.dense["a.bias"], grads["a.bias"])


def test_load_refuses_other_files(tmp_path):
    pickled = tmp_path / "g.pt"
    with open(pickled, "wb") as f:
        pickle.dump({"w": torch.randn(3, 3)}, f)
    text = tmp_path / "g.txt"
    text.write_text("not a gradient\n")
    for path in (pickled, text):
        with pytest.raises(ValueError, match="not a safetensors file"):
            load_low_rank_gradient(path)
    dense_file = tmp_path / "dense.safetensors"
    save_gradient(dense_file, _gradient({"w": torch.randn(3, 3)}))
    with pytest.raises(ValueError, match="not an adfast low-rank gradient"):
        load_low_rank_gradient(dense_file)
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    good = tmp_path / "lr.safetensors"
    save_low_rank_gradient(good, low_rank_gradient(_gradient({"a.weight": torch.randn(20, 12)}), 3))
    with safe_open(str(good), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(good))
    broken = tmp_path / "broken.safetensors"
    save_file({**tensors, "a.weight.V": tensors["a.weight.V"][:, :2].contiguous()}, str(broken), metadata=metadata)
    with pytest.raises(ValueError, match="factors of 'a.weight' are U \\(20, 3\\), V \\(12, 2\\); the file's rank is 3"):
        load_low_rank_gradient(broken)
    save_file({**tensors, "a.weight": torch.zeros(20, 12)}, str(broken), metadata=metadata)
    with pytest.raises(ValueError, match="'a.weight' is stored both as factors and dense"):
        load_low_rank_gradient(broken)
    save_file(tensors, str(broken), metadata={k: v for k, v in metadata.items() if k != "rank"})
    with pytest.raises(ValueError, match="its metadata lacks the field 'rank'"):
        load_low_rank_gradient(broken)


@pytest.mark.parametrize("make", [tiny_qwen2, tiny_llama])
def test_delta_linear_in_gradient_and_converges_with_rank(make, tmp_path):
    model = make()
    gradient = proxy_gradient(model, traces(0), progress=False)
    input_ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    full = exact_delta(model, gradient, input_ids)
    sines = []
    for rank in (1, 2, 4, 8, 16, 32):
        lr = low_rank_gradient(gradient, rank)
        assert lr.factors or rank >= 32  # hidden 32: every matrix has min(m, n) <= 32
        path = tmp_path / f"r{rank}.safetensors"
        save_low_rank_gradient(path, lr)
        dense = load_low_rank_gradient(path).to_dense()
        delta = exact_delta(model, dense, input_ids)
        # linearity: D(G_r) + D(G - G_r) = D(G)
        # G - G_r in float64 is exact (both float32), so the sum below is D(G) up to float64 round-off
        rest = {name: gradient.grads[name].double() - dense.grads[name].double() for name in gradient.grads}
        if any(bool(r.any()) for r in rest.values()):
            torch.testing.assert_close(delta + exact_delta(model, rest, input_ids), full, rtol=1e-9,
                                       atol=1e-12 * float(full.abs().max()))
        sines.append(float(angle_sine(delta, full).mean()))
    assert sines[-1] < 1e-6  # rank 32: nothing truncated
    assert all(later <= earlier + 1e-9 for earlier, later in zip(sines, sines[1:])), sines
    assert sines[0] > 1e-3


def test_resolve_direction_keeps_factors_and_refuses(tmp_path):
    """resolve_direction returns a LowRankGradient (or a low-rank file) checked but factored, a dense
    gradient as resolve_gradient's dict; it refuses another model, other shapes, NaN and zero."""
    import dataclasses

    model = tiny_qwen2()
    gradient = proxy_gradient(model, traces(2), progress=False)
    lr = low_rank_gradient(gradient, 4)
    assert resolve_direction(model, lr) is lr
    path = tmp_path / "g.safetensors"
    save_low_rank_gradient(path, lr)
    assert is_low_rank_file(path) and not is_low_rank_file(tmp_path / "missing.safetensors")
    loaded = resolve_direction(model, path)
    assert isinstance(loaded, LowRankGradient) and set(loaded.factors) == set(lr.factors)
    dense_path = tmp_path / "dense.safetensors"
    save_gradient(dense_path, gradient)
    assert not is_low_rank_file(dense_path)
    assert set(resolve_direction(model, dense_path)) == set(gradient.grads)
    assert lr.shapes() == {name: tuple(g.shape) for name, g in gradient.grads.items()}

    other = tiny_qwen2(num_hidden_layers=1)
    with pytest.raises(ValueError, match="another model"):
        resolve_direction(other, lr)
    name = "model.layers.0.self_attn.q_proj.weight"
    u, v = lr.factors[name]
    cases = {"names or shapes differ": {**lr.factors, name: (u[:-1], v)},
             "NaN or inf": {**lr.factors, name: (u, v.clone().fill_(math.nan))}}
    for message, factors in cases.items():
        with pytest.raises(ValueError, match=message):
            resolve_direction(model, dataclasses.replace(lr, factors=factors))
    zero = dataclasses.replace(lr, factors={n: (u, torch.zeros_like(v)) for n, (u, v) in lr.factors.items()},
                               dense={n: torch.zeros_like(g) for n, g in lr.dense.items()})
    with pytest.raises(ValueError, match="zero everywhere"):
        resolve_direction(model, zero)
