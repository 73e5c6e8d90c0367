"""proxy_gradient against a float64 autograd reference computed on the whole dataset at once."""
import copy
import math

import pytest
import torch
from conftest import VOCAB, tiny_llama, tiny_qwen2

from adfast.gradient import ProxyGradient, load_gradient, proxy_gradient, save_gradient
from adfast.provenance import model_identity


def make_examples(seed=1, lengths=((3, 5), (1, 2), (6, 9), (2, 1), (4, 4))):
    """(prompt, completion) pairs of different prompt and completion lengths."""
    gen = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(0, VOCAB, (n,), generator=gen).tolist()  # noqa: E731
    return [(ids(p), ids(c)) for p, c in lengths]


def reference(model, examples, weighting="tokens", score_prompt=False):
    """(grads, loss) of the mean NLL in float64, one unpadded forward per example.

    weighting="tokens": sum of token NLLs / total tokens; "examples": mean of per-example means.
    score_prompt also scores the prompt tokens after the first (a wrong loss, for contrast).
    """
    ref = copy.deepcopy(model).double()
    per_example = []
    for prompt, completion in examples:
        ids = torch.tensor([prompt + completion])
        logprobs = torch.log_softmax(ref(input_ids=ids).logits[0, :-1], dim=-1)
        token_nll = -logprobs.gather(1, ids[0, 1:, None])[:, 0]
        per_example.append(token_nll if score_prompt else token_nll[len(prompt) - 1:])
    if weighting == "tokens":
        loss = torch.cat(per_example).mean()
    else:
        loss = torch.stack([nll.mean() for nll in per_example]).mean()
    loss.backward()
    return {name: p.grad for name, p in ref.named_parameters()}, loss.item()


@pytest.mark.parametrize("make_model", [tiny_qwen2, tiny_llama])
@pytest.mark.parametrize("batch_size", [2, 3])
def test_matches_float64_reference(make_model, batch_size):
    model = make_model()
    examples = make_examples()
    result = proxy_gradient(model, examples, batch_size=batch_size, progress=False)
    ref_grads, ref_loss = reference(model, examples)
    assert set(result.grads) == {name for name, _ in model.named_parameters()}
    if make_model is tiny_llama:  # tied embeddings / lm_head: once, under named_parameters' name
        assert "lm_head.weight" not in result.grads
    for name, g in result.grads.items():
        assert g.dtype == torch.float32 and g.device.type == "cpu"
        torch.testing.assert_close(g.double(), ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert result.loss == pytest.approx(ref_loss, rel=1e-6)
    assert result.num_tokens == sum(len(c) for _, c in examples)
    assert result.num_examples == len(examples)
    assert result.model_id == model_identity(model)


def test_weighting_and_masking_are_the_ones_documented():
    """The reference the result matches must differ from the per-example mean and from scoring prompts."""
    model = tiny_qwen2()
    examples = make_examples()
    result = proxy_gradient(model, examples, batch_size=2, progress=False)
    name = "model.embed_tokens.weight"
    for variant in (dict(weighting="examples"), dict(score_prompt=True)):
        grads, loss = reference(model, examples, **variant)
        assert abs(loss - result.loss) > 1e-3
        assert (grads[name].float() - result.grads[name]).abs().max() > 1e-3


def test_bfloat16_model_gives_float32_grads_and_state_is_restored():
    model = tiny_qwen2()
    examples = make_examples()
    expected = proxy_gradient(model, examples, progress=False)
    bf16 = copy.deepcopy(model).to(torch.bfloat16).train()
    bf16.model.layers[0].training = False  # a mixed train/eval state must come back as it was
    before = {name: p.detach().clone() for name, p in bf16.named_parameters()}
    old_grad = torch.ones_like(bf16.lm_head.weight)
    bf16.lm_head.weight.grad = old_grad
    result = proxy_gradient(bf16, examples, batch_size=2, progress=False)
    for name, p in bf16.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, before[name])
        assert p.grad is old_grad if name == "lm_head.weight" else p.grad is None
        assert result.grads[name].dtype == torch.float32
    assert bf16.training and not bf16.model.layers[0].training and bf16.model.layers[1].training
    flat = lambda grads: torch.cat([g.flatten() for g in grads.values()])  # noqa: E731
    cosine = torch.nn.functional.cosine_similarity(flat(result.grads), flat(expected.grads), dim=0)
    assert cosine > 0.99
    assert result.loss == pytest.approx(expected.loss, rel=2e-2)


def test_frozen_parameters_are_left_out():
    model = tiny_qwen2()
    model.model.embed_tokens.weight.requires_grad_(False)
    result = proxy_gradient(model, make_examples(), progress=False)
    assert "model.embed_tokens.weight" not in result.grads
    assert len(result.grads) == len(list(model.parameters())) - 1


def test_bad_inputs_are_refused():
    model = tiny_qwen2()
    with pytest.raises(ValueError, match="empty"):
        proxy_gradient(model, [], progress=False)
    with pytest.raises(ValueError, match="example 1 has an empty completion"):
        proxy_gradient(model, [([1, 2], [3]), ([1, 2], [])], progress=False)
    with pytest.raises(ValueError, match="empty prompt"):
        proxy_gradient(model, [([], [3])], progress=False)
    with pytest.raises(ValueError, match=rf"vocabulary \[0, {VOCAB}\).*{VOCAB}"):
        proxy_gradient(model, [([1, 2], [3, VOCAB])], progress=False)
    with pytest.raises(ValueError, match="pad_token_id"):
        proxy_gradient(model, [([1, 2], [3])], pad_token_id=VOCAB, progress=False)
    with pytest.raises(ValueError, match="example 0 must hold token ids \\(ints\\), got 3.7"):
        proxy_gradient(model, [([1, 2], [3.7])], progress=False)
    with pytest.raises(ValueError, match="example 0 must be a sequence of token ids \\(ints\\), got str '12'"):
        proxy_gradient(model, [("12", [3])], progress=False)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 2.5"):
        proxy_gradient(model, [([1, 2], [3])], batch_size=2.5, progress=False)


def test_non_finite_loss_or_gradient_is_refused(tmp_path):
    """A NaN weight gives a NaN loss and gradient: refused when computed, and when saved."""
    model = tiny_qwen2()
    with torch.no_grad():
        model.lm_head.weight[3, 0] = math.nan
    with pytest.raises(ValueError, match="the proxy's loss is nan and .* gradient tensors hold NaN or inf"):
        proxy_gradient(model, make_examples(), progress=False)
    gradient = proxy_gradient(tiny_qwen2(), make_examples(), progress=False)
    gradient.grads["lm_head.weight"][0, 0] = math.inf
    with pytest.raises(ValueError, match="1 gradient tensors hold NaN or inf \\(lm_head.weight\\)"):
        save_gradient(tmp_path / "g.safetensors", gradient)


def test_save_load_round_trip(tmp_path):
    model = tiny_llama()
    gradient = proxy_gradient(model, make_examples(), progress=False)
    path = tmp_path / "g.safetensors"
    save_gradient(path, gradient)
    loaded = load_gradient(path)
    assert isinstance(loaded, ProxyGradient)
    assert loaded.grads.keys() == gradient.grads.keys()
    for name, g in gradient.grads.items():
        assert torch.equal(loaded.grads[name], g)
    fields = ("loss", "num_examples", "num_tokens", "model_id", "weights_signature")
    assert [getattr(loaded, f) for f in fields] == [getattr(gradient, f) for f in fields]


def test_load_refuses_other_files(tmp_path):
    pickled, text = tmp_path / "g.pt", tmp_path / "g.txt"
    pickled.write_bytes(b"\x80\x02}q\x00X\x01\x00\x00\x00gq\x01K\x01s.")  # protocol-2 pickle of {"g": 1}
    text.write_text("not a gradient\n")
    for path in (pickled, text):
        with pytest.raises(ValueError, match="not a safetensors file"):
            load_gradient(path)
    from safetensors.torch import save_file
    foreign = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not an adfast proxy gradient"):
        load_gradient(foreign)
    with pytest.raises(ValueError, match="not a safetensors file, or cannot be read"):
        load_gradient(tmp_path)  # a directory
    from adfast.gradient import FORMAT, FORMAT_VERSION
    tagged = {"format": FORMAT, "format_version": FORMAT_VERSION, "model_id": "m@x", "num_examples": "1",
              "num_tokens": "2"}
    save_file({"w": torch.zeros(2)}, str(foreign), metadata=tagged)
    with pytest.raises(ValueError, match="its metadata lacks the field 'loss'"):
        load_gradient(foreign)
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={**tagged, "loss": "low"})
    with pytest.raises(ValueError, match="malformed metadata"):
        load_gradient(foreign)
    save_file({"w": torch.zeros(2, dtype=torch.float16)}, str(foreign), metadata={**tagged, "loss": "1.0"})
    with pytest.raises(ValueError, match="holds float32 tensors; w \\(torch.float16\\) are not"):
        load_gradient(foreign)

