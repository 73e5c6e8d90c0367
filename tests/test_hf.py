"""The Hugging Face drop-in (adfast.hf) against independent references: plain greedy generate,
full non-cached forwards of each row's unpadded sequence, and a hand-written greedy loop."""
import copy
import math
from dataclasses import dataclass

import pytest
import torch
from conftest import VOCAB, tiny_llama, tiny_qwen2
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, LogitsProcessor

import adfast
from adfast.hf import AntidistillationLogitsProcessor, generate

EPS = 0.05
PAD = 0
PROXY_VOCAB = 90  # the teacher's tokens 90..95 are beyond the proxy: suppressed where it reads them
BEYOND_PROXY = list(range(PROXY_VOCAB, VOCAB))
# Left-padded prompts of lengths 3, 5 and 6.
PROMPTS = torch.tensor([[PAD, PAD, PAD, 11, 12, 13],
                        [PAD, 21, 22, 23, 24, 25],
                        [31, 32, 33, 34, 35, 36]])
MASK = (torch.arange(PROMPTS.shape[1]) >= torch.tensor([[3], [1], [0]])).long()


@dataclass
class Pair:
    """Duck-typed stand-in for adfast.proxy_pair.ProxyPair: the processor reads only these."""

    plus: torch.nn.Module
    minus: torch.nn.Module
    eps: float


def perturbed_pair(proxy, eps=EPS, seed=0):
    """Two copies of ``proxy`` at ``theta +- eps g`` for a random direction ``g``."""
    plus, minus = copy.deepcopy(proxy), copy.deepcopy(proxy)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for up, down in zip(plus.parameters(), minus.parameters()):
            g = torch.randn(up.shape, generator=gen)
            up += eps * g
            down -= eps * g
    return Pair(plus, minus, eps)


@pytest.fixture(scope="module")
def teacher():
    return tiny_qwen2()


@pytest.fixture(scope="module")
def pair():
    return perturbed_pair(tiny_llama(seed=1))


@pytest.fixture(scope="module")
def small_pair():
    return perturbed_pair(tiny_llama(vocab=PROXY_VOCAB, seed=2))


@pytest.fixture(scope="module")
def gpt2_pair():
    """Learned absolute positions: unlike RoPE, wrong position ids under left padding change its logits."""
    torch.manual_seed(3)
    cfg = GPT2Config(vocab_size=PROXY_VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                     eos_token_id=2, attn_implementation="eager")
    return perturbed_pair(GPT2LMHeadModel(cfg).eval())


class RawScores(LogitsProcessor):
    """Records the scores it is given (the teacher's, after generate's own processors)."""

    def __init__(self):
        self.scores = []

    def __call__(self, input_ids, scores):
        self.scores.append(scores.clone())
        return scores


def unpadded_rows(sequences):
    """Each row of a left-padded ``[B, L]`` batch without its padding."""
    pads = PROMPTS.shape[1] - MASK.sum(1)
    return [sequences[b, int(pads[b]):] for b in range(sequences.shape[0])]


@torch.no_grad()
def last_logits(model, rows):
    """``[B, V]`` last-position logits of full, non-cached forwards of each unpadded row."""
    return torch.stack([model(row[None]).logits[0, -1] for row in rows])


def generate_kwargs(max_new_tokens):
    return dict(input_ids=PROMPTS, attention_mask=MASK, max_new_tokens=max_new_tokens, pad_token_id=PAD)


def test_lam0_greedy_equals_plain_greedy(teacher, pair):
    expected = teacher.generate(PROMPTS, attention_mask=MASK, do_sample=False, max_new_tokens=6, pad_token_id=PAD)
    proc = AntidistillationLogitsProcessor(pair, lam=0.0, tau=0.0, pad_token_id=PAD)
    assert torch.equal(generate(teacher, proc, **generate_kwargs(6)), expected)
    proc = AntidistillationLogitsProcessor(pair, lam=0.0, tau=0.0, pad_token_id=PAD)
    raw = teacher.generate(PROMPTS, attention_mask=MASK, logits_processor=[proc], do_sample=False,
                           max_new_tokens=6, pad_token_id=PAD)
    assert torch.equal(raw, expected)


@pytest.mark.parametrize("mode,top_k,top_p,entry,proxy", [("antidistill", 0, 1.0, "adfast", "small_pair"),
                                                           ("permutation", 0, 1.0, "raw", "small_pair"),
                                                           ("antidistill", 20, 0.9, "raw", "small_pair"),
                                                           ("antidistill", 0, 1.0, "adfast", "gpt2_pair")])
def test_scores_equal_adjusted_logits_of_full_forwards(teacher, request, mode, top_k, top_p, entry, proxy):
    proxies = request.getfixturevalue(proxy)
    tau, lam, seed, steps = 0.7, 2.0, 1234, 4
    proc = AntidistillationLogitsProcessor(proxies, lam=lam, tau=tau, mode=mode, top_k=top_k, top_p=top_p,
                                           pad_token_id=PAD, seed=seed)
    raw = RawScores()
    kwargs = dict(generate_kwargs(steps), suppress_tokens=BEYOND_PROXY, output_scores=True,
                  return_dict_in_generate=True)
    torch.manual_seed(0)
    if entry == "adfast":
        out = generate(teacher, proc, logits_processor=[raw], **kwargs)
    else:
        out = teacher.generate(logits_processor=[raw, proc], do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                               **kwargs)
    assert len(out.scores) == len(raw.scores) == steps
    for step, (teacher_scores, returned) in enumerate(zip(raw.scores, out.scores)):
        assert torch.isneginf(teacher_scores[:, PROXY_VOCAB:]).all()  # -inf teacher logits are allowed
        rows = unpadded_rows(out.sequences[:, :PROMPTS.shape[1] + step])
        expected = adfast.adjusted_logits(teacher_scores, last_logits(proxies.plus, rows),
                                          last_logits(proxies.minus, rows), tau=tau, lam=lam, eps=EPS,
                                          mode=mode, seed=seed, offset=step)
        if top_k or top_p < 1.0:
            expected = adfast.top_k_top_p_mask(expected, torch.full((3,), top_k), torch.full((3,), top_p))
            assert torch.isneginf(returned).sum(1).min() > len(BEYOND_PROXY)
        torch.testing.assert_close(returned, expected, rtol=1e-4, atol=1e-4)
        token = out.sequences[:, PROMPTS.shape[1] + step]
        assert torch.isfinite(returned.gather(1, token[:, None])).all()  # drawn from the returned scores


@torch.no_grad()
def test_greedy_equals_hand_written_loop(teacher, small_pair):
    lam, steps = 3.0, 5
    rows = unpadded_rows(PROMPTS)
    for _ in range(steps):
        t = last_logits(teacher, rows)
        t[:, PROXY_VOCAB:] = -torch.inf
        d = (last_logits(small_pair.plus, rows).log_softmax(1)
             - last_logits(small_pair.minus, rows).log_softmax(1)) / (2 * EPS)
        objective = t.log_softmax(1)
        objective[:, :PROXY_VOCAB] += lam * d
        rows = [torch.cat([row, objective[b].argmax()[None]]) for b, row in enumerate(rows)]
    expected = torch.stack([row[-steps:] for row in rows])
    proc = AntidistillationLogitsProcessor(small_pair, lam=lam, tau=0.0, pad_token_id=PAD)
    out = generate(teacher, proc, suppress_tokens=BEYOND_PROXY, **generate_kwargs(steps))
    assert torch.equal(out[:, PROMPTS.shape[1]:], expected)
    plain = teacher.generate(PROMPTS, attention_mask=MASK, do_sample=False, max_new_tokens=steps, pad_token_id=PAD,
                             suppress_tokens=BEYOND_PROXY)
    assert not torch.equal(out, plain)  # lam mattered


def record_proxy_inputs(monkeypatch, pair):
    """Wrap both proxies' forward; returns the list of ``(which, input_ids shape)`` per call."""
    calls = []
    for which in ("plus", "minus"):
        model = getattr(pair, which)
        forward = model.forward

        def recorded(*args, _which=which, _forward=forward, **kwargs):
            calls.append((_which, tuple(kwargs["input_ids"].shape)))
            return _forward(*args, **kwargs)

        monkeypatch.setattr(model, "forward", recorded)
    return calls


def test_proxies_step_one_token_after_prefill(teacher, pair, monkeypatch):
    calls = record_proxy_inputs(monkeypatch, pair)
    proc = AntidistillationLogitsProcessor(pair, lam=1.0, tau=1.0, pad_token_id=PAD)
    generate(teacher, proc, **generate_kwargs(5))
    for which in ("plus", "minus"):
        shapes = [shape for name, shape in calls if name == which]
        assert shapes == [tuple(PROMPTS.shape)] + [(3, 1)] * 4


def test_consecutive_generate_calls_reset(teacher, pair, monkeypatch):
    """Raw teacher.generate (no explicit reset): a new prompt is detected, even one token longer."""
    def fresh():
        return AntidistillationLogitsProcessor(pair, lam=2.0, tau=0.0, pad_token_id=PAD)

    def run(proc, prompts, mask, steps=3):
        return teacher.generate(prompts, attention_mask=mask, logits_processor=[proc], do_sample=False,
                                max_new_tokens=steps, pad_token_id=PAD)

    # The first run's last call saw 6 + 2 tokens: a 9-token prompt is one longer, with another prefix.
    second = torch.tensor([[PAD, 41, 42, 43, 44, 45, 46, 47, 48], [51, 52, 53, 54, 55, 56, 57, 58, 59],
                           [PAD, PAD, PAD, 61, 62, 63, 64, 65, 66]])
    second_mask = (second != PAD).cumsum(1).gt(0).long()
    third = torch.tensor([[71, 72], [73, 74]])  # another batch size
    proc = fresh()
    outputs = [run(proc, PROMPTS, MASK), run(proc, second, second_mask), run(proc, third, torch.ones_like(third))]
    expected = [run(fresh(), PROMPTS, MASK), run(fresh(), second, second_mask),
                run(fresh(), third, torch.ones_like(third))]
    for got, want in zip(outputs, expected):
        assert torch.equal(got, want)

    # A prompt that is exactly the previous sequence plus one token continues the caches; reset() prefills.
    first = run(proc, PROMPTS, MASK)
    calls = record_proxy_inputs(monkeypatch, pair)
    continued = run(proc, first, (first != PAD).cumsum(1).gt(0).long(), steps=2)
    assert calls[0] == ("plus", (3, 1))
    assert torch.equal(continued, run(fresh(), first, (first != PAD).cumsum(1).gt(0).long(), steps=2))
    proc.reset()
    calls.clear()
    run(proc, first, (first != PAD).cumsum(1).gt(0).long(), steps=1)
    assert calls == [("plus", tuple(first.shape)), ("minus", tuple(first.shape))]


@pytest.mark.parametrize("setting", [dict(temperature=0.7), dict(top_k=20), dict(top_p=0.9), dict(min_p=0.1),
                                     dict(typical_p=0.5), dict(num_beams=2), dict(do_sample=False)])
def test_refuses_double_warping(teacher, pair, setting):
    proc = AntidistillationLogitsProcessor(pair, lam=1.0, tau=1.0, pad_token_id=PAD)
    with pytest.raises(ValueError, match="generation config"):
        proc.check_generation_config(GenerationConfig(**{"do_sample": True, **setting}))
    with pytest.raises(ValueError, match="generation config"):
        generate(teacher, proc, **setting, **generate_kwargs(2))


def test_generation_config_checks(teacher, pair):
    sampling = AntidistillationLogitsProcessor(pair, lam=1.0, tau=1.0, pad_token_id=PAD)
    sampling.check_generation_config(GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0))
    sampling.check_generation_config(GenerationConfig(do_sample=True))
    greedy = AntidistillationLogitsProcessor(pair, lam=1.0, tau=0.0, pad_token_id=PAD)
    greedy.check_generation_config(GenerationConfig(do_sample=False, temperature=0.7, top_k=20))  # not applied
    with pytest.raises(ValueError, match="do_sample=True with tau=0"):
        greedy.check_generation_config(GenerationConfig(do_sample=True))
    with pytest.raises(ValueError, match="differs from the pair's eps"):
        AntidistillationLogitsProcessor(pair, lam=1.0, eps=EPS / 2)
    AntidistillationLogitsProcessor(pair, lam=1.0, eps=EPS)
    for tau in (-0.5, 1e-9, math.nan):
        with pytest.raises(ValueError, match="tau must be 0 \\(greedy\\) or"):
            AntidistillationLogitsProcessor(pair, lam=1.0, tau=tau)
    unpadded = AntidistillationLogitsProcessor(pair, lam=1.0, tau=1.0)
    with pytest.raises(ValueError, match="attention_mask differs"):
        generate(teacher, unpadded, **generate_kwargs(2))


def test_qwen_style_defaults_are_neutralised(pair):
    """A teacher config shipping temperature=0.7, top_k=20, top_p=0.8: generate overrides them."""
    teacher = tiny_qwen2()
    teacher.generation_config = GenerationConfig(do_sample=True, temperature=0.7, top_k=20, top_p=0.8)
    proc = AntidistillationLogitsProcessor(pair, lam=1.0, tau=1.0, pad_token_id=PAD)
    with pytest.raises(ValueError, match="temperature=0.7"):
        proc.check_generation_config(teacher.generation_config)
    out = generate(teacher, proc, output_scores=True, return_dict_in_generate=True, **generate_kwargs(3))
    assert all(torch.isfinite(scores).all() for scores in out.scores)  # no top-k / top-p after the processor


def test_direct_calls_permutation_temperature_dtypes(pair, monkeypatch):
    ids = PROMPTS[1:]
    scores = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(3)) * 3

    def adjusted(mode, teacher_scores=scores, **kwargs):
        proc = AntidistillationLogitsProcessor(pair, lam=1.5, tau=1.0, mode=mode, pad_token_id=PAD, seed=7, **kwargs)
        return proc(ids, teacher_scores)

    log_t = scores.log_softmax(1)
    d_anti = (adjusted("antidistill") - log_t) / 1.5
    d_perm = (adjusted("permutation") - log_t) / 1.5
    assert not torch.allclose(d_anti, d_perm, atol=1e-3)
    torch.testing.assert_close(d_anti.abs().sort(1).values, d_perm.abs().sort(1).values, rtol=1e-4, atol=1e-4)

    bf16 = scores.bfloat16()
    got = adjusted("antidistill", bf16)
    assert got.dtype == torch.float32
    rows = unpadded_rows(PROMPTS)[1:]
    torch.testing.assert_close(got, adfast.adjusted_logits(bf16, last_logits(pair.plus, rows),
                                                           last_logits(pair.minus, rows), tau=1.0, lam=1.5, eps=EPS),
                               rtol=1e-4, atol=1e-4)

    calls = record_proxy_inputs(monkeypatch, pair)
    torch.testing.assert_close(adjusted("temperature"), log_t, rtol=1e-5, atol=1e-5)
    assert calls == []  # temperature mode runs no proxy


def test_teacher_ids_beyond_the_proxies_are_never_drawn(teacher, small_pair):
    """By default the processor returns -inf past the proxies' vocabulary (the rest as
    adjusted_logits gives it), so generate needs no suppress_tokens; proxy_vocab_only=False returns
    the whole row."""
    ids, scores = torch.tensor([[5, 6, 7]]), torch.zeros(1, VOCAB)
    scores[:, PROXY_VOCAB:] = 50.0  # the teacher favours its tail
    out = AntidistillationLogitsProcessor(small_pair, lam=1.0, pad_token_id=PAD)(ids, scores)
    assert torch.isneginf(out[:, PROXY_VOCAB:]).all() and torch.isfinite(out[:, :PROXY_VOCAB]).all()
    whole = AntidistillationLogitsProcessor(small_pair, lam=1.0, pad_token_id=PAD, proxy_vocab_only=False)(ids, scores)
    assert torch.isfinite(whole).all()
    torch.testing.assert_close(whole[:, :PROXY_VOCAB], out[:, :PROXY_VOCAB])
    proc = AntidistillationLogitsProcessor(small_pair, lam=1.0, tau=2.0, pad_token_id=PAD)
    torch.manual_seed(0)
    sequences = generate(teacher, proc, **generate_kwargs(8))
    assert bool((sequences[:, PROMPTS.shape[1]:] < PROXY_VOCAB).all())


def test_token_beyond_proxy_vocab_raises(small_pair):
    proc = AntidistillationLogitsProcessor(small_pair, lam=1.0, pad_token_id=PAD)
    with pytest.raises(ValueError, match="outside the proxy's vocabulary"):
        proc(torch.tensor([[5, 6, PROXY_VOCAB + 1]]), torch.zeros(1, VOCAB))


def test_proxy_pair_from_gradient_is_a_pair():
    """adfast.proxy_pair.ProxyPair works as the pair, and eps defaults to its eps."""
    proxy_pair = pytest.importorskip("adfast.proxy_pair")
    proxy = tiny_llama(seed=1)
    gen = torch.Generator().manual_seed(0)
    grads = {name: torch.randn(p.shape, generator=gen) for name, p in proxy.named_parameters()}
    ids, scores = PROMPTS[2:], torch.randn(1, VOCAB)
    got = AntidistillationLogitsProcessor(proxy_pair.ProxyPair.from_gradient(proxy, grads, EPS), lam=1.0)(ids, scores)
    expected = AntidistillationLogitsProcessor(perturbed_pair(proxy), lam=1.0)(ids, scores)
    torch.testing.assert_close(got, expected)
