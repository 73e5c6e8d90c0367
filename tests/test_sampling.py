"""The sampler (``adfast.sample`` / ``adfast.adjusted_logits``) against float64 references.

Deterministic checks run on both backends: ``torch`` (the CPU twin) and ``triton`` (the kernels,
under the Triton interpreter on CPU, or on the GPU where one exists). The statistical checks need
hundreds of thousands of draws, too many for the interpreter, so they run on the twin, and
``test_backends_draw_identical_tokens`` shows that the kernels draw exactly the twin's tokens
(same Philox noise, same tie rule) on every mode, top-k/top-p, vocabulary mismatch and offset.
"""
import importlib
import math

import numpy
import pytest
import torch
from conftest import KERNEL_DEVICE

import adfast

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def on_backend(function, *args, backend, **kwargs):
    """``function(*args, backend=backend, **kwargs)`` on the backend's device: the kernels ("triton")
    on KERNEL_DEVICE (the GPU where one exists, else CPU tensors in the interpreter), the twin
    ("torch") on CPU. Tensor arguments go there and the results come back to CPU."""
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    move = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x  # noqa: E731
    out = function(*map(move, args), backend=backend, **{k: move(v) for k, v in kwargs.items()})
    return tuple(x.cpu() for x in out) if isinstance(out, tuple) else out.cpu()


def sample(*args, **kwargs):
    return on_backend(adfast.sample, *args, **kwargs)


def adjusted_logits(*args, **kwargs):
    return on_backend(adfast.adjusted_logits, *args, **kwargs)


def make_logits(batch, vocab_t, vocab_p, dtype, eps, seed=0, scale=3.0):
    """Teacher logits and a proxy pair whose difference is O(eps), as the perturbed copies give."""
    g = torch.Generator().manual_seed(seed)
    t = (scale * torch.randn(batch, vocab_t, generator=g)).to(dtype)
    base = scale * torch.randn(batch, vocab_p, generator=g)
    direction = torch.randn(batch, vocab_p, generator=g)
    return t, (base + eps * direction).to(dtype), (base - eps * direction).to(dtype)


def reference_adjusted(t, p, m, tau, lam, eps):
    """float64 ``log_softmax(t)/tau + lam * D`` (greedy objective where tau == 0)."""
    batch = t.shape[0]
    tau = torch.as_tensor(tau, dtype=torch.float64).expand(batch)[:, None]
    lam = torch.as_tensor(lam, dtype=torch.float64).expand(batch)[:, None]
    out = torch.log_softmax(t.double(), 1) / torch.where(tau == 0, 1.0, tau)
    if p is not None:
        d = (torch.log_softmax(p.double(), 1) - torch.log_softmax(m.double(), 1)) / (2 * eps)
        out[:, : p.shape[1]] += lam * d
    return out


def adjusted_tolerance(t, p, lam, eps):
    """float32 round-off bound: each log-sum-exp is good to ~1e-7 of its size, D amplifies by lam/(2 eps)."""
    lam_max = float(torch.as_tensor(lam).abs().max())
    size = 1.0 + t.float().abs().max() + math.log(t.shape[1])
    return 2e-6 * size * (1.0 + (lam_max / (2 * eps) if p is not None else 0.0)) + 1e-5


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson goodness-of-fit p-value, bins with expected count < 5 pooled into one."""
    n = counts.sum()
    expected = probs * n
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]]).double()
    exp = torch.cat([expected[~small], expected[small].sum()[None]]).double()
    keep = exp > 0
    if bool((obs[~keep] > 0).any()):
        return 0.0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat / 2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab_t,vocab_p", [(203, 203), (203, 190), (128, 61)])
def test_adjusted_logits_matches_float64(backend, dtype, vocab_t, vocab_p):
    eps = 1e-2 if dtype != torch.float32 else 1e-3
    t, p, m = make_logits(3, vocab_t, vocab_p, dtype, eps, seed=vocab_p)
    tau = torch.tensor([0.7, 0.0, 1.3])
    lam = torch.tensor([0.05, -0.02, 0.1])
    out = adjusted_logits(t, p, m, tau=tau, lam=lam, eps=eps, backend=backend)
    ref = reference_adjusted(t, p, m, tau, lam, eps)
    assert out.dtype == torch.float32 and out.shape == (3, vocab_t)
    torch.testing.assert_close(out.double(), ref, atol=adjusted_tolerance(t, p, lam, eps), rtol=0)
    # D is zero past the proxy vocabulary: there the row is the teacher's alone
    tail = torch.log_softmax(t.double(), 1)[:, vocab_p:] / torch.tensor([0.7, 1.0, 1.3])[:, None].double()
    torch.testing.assert_close(out[:, vocab_p:].double(), tail, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_mode_ignores_proxies(backend):
    t, p, m = make_logits(2, 150, 150, torch.float32, 1e-3)
    out = adjusted_logits(t, None, None, tau=0.5, lam=3.0, eps=1e-3, mode="temperature", backend=backend)
    torch.testing.assert_close(out.double(), torch.log_softmax(t.double(), 1) / 0.5, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_logprobs_are_teacher_unadjusted(backend, dtype):
    t, p, m = make_logits(4, 177, 170, dtype, 1e-2)
    tokens, logprobs = sample(t, p, m, tau=1.0, lam=0.05, eps=1e-2, seed=3, return_logprobs=True,
                              backend=backend)
    ref = torch.log_softmax(t.double(), 1).gather(1, tokens[:, None])[:, 0]
    torch.testing.assert_close(logprobs.double(), ref, atol=1e-5, rtol=0)
    tokens_k, logprobs_k = sample(t, p, m, tau=1.0, lam=0.05, eps=1e-2, seed=3, top_k=7,
                                  return_logprobs=True, backend=backend)
    ref_k = torch.log_softmax(t.double(), 1).gather(1, tokens_k[:, None])[:, 0]
    torch.testing.assert_close(logprobs_k.double(), ref_k, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["antidistill", "temperature"])
def test_greedy_is_exact_argmax(backend, mode):
    t, p, m = make_logits(16, 211, 200, torch.bfloat16, 1e-2, seed=7)
    lam = torch.linspace(-0.2, 0.2, 16)
    tokens = sample(t, p, m, tau=0.0, lam=lam, eps=1e-2, mode=mode, seed=1, backend=backend)
    ref = reference_adjusted(t, p if mode == "antidistill" else None, m, 0.0, lam, 1e-2)
    top2 = ref.topk(2, dim=1).values
    assert bool((top2[:, 0] - top2[:, 1] > 1e-4).all()), "test data has near ties"
    assert torch.equal(tokens, ref.argmax(1))
    again = sample(t, p, m, tau=0.0, lam=lam, eps=1e-2, mode=mode, seed=99, backend=backend)
    assert torch.equal(tokens, again), "greedy must not depend on the seed"


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_outside_the_fast_sum_range(backend):
    """The fused kernel sums exponentials against a fixed reference and falls back to a pass
    relative to the row's max where that sum leaves float32's accurate range (largest logit above
    ~88 or below ~-30): such rows keep exact teacher log-probs and greedy tokens, including the
    proxies' shift between the shared vocabulary and the teacher's tail (some rows pick from the
    tail), and sampled rows draw the CPU twin's tokens."""
    t, p, m = make_logits(8, 96, 80, torch.float32, 1e-2, seed=21, scale=2.0)
    t_shift = torch.tensor([200.0, -150.0, 0.0, 0.0, 90.0, -60.0, 0.0, 500.0])[:, None]
    p_shift = torch.tensor([0.0, 0.0, 250.0, -200.0, 0.0, 0.0, 120.0, 95.0])[:, None]
    t, p, m = t + t_shift, p + p_shift, m + p_shift
    t[[2, 3, 6], [85, 82, 90]] = t[[2, 3, 6]].amax(1) + 3.0  # tail tokens where the proxies' sums overflow
    lam = torch.linspace(-0.6, 0.6, 8)
    tokens, logprobs = sample(t, p, m, tau=0.0, lam=lam, eps=1e-2, return_logprobs=True, backend=backend)
    ref = reference_adjusted(t, p, m, 0.0, lam, 1e-2)
    top2 = ref.topk(2, dim=1).values
    assert bool((top2[:, 0] - top2[:, 1] > 1e-3).all()), "test data has near ties"
    assert bool((ref.argmax(1) >= 80).any()), "no row's greedy token lies in the teacher's tail"
    assert torch.equal(tokens, ref.argmax(1))
    expected = torch.log_softmax(t.double(), 1).gather(1, tokens[:, None])[:, 0]
    torch.testing.assert_close(logprobs.double(), expected, atol=1e-4, rtol=0)
    kw = dict(tau=torch.linspace(0.3, 1.5, 8), lam=lam, eps=1e-2, seed=4, offset=2, return_logprobs=True)
    drawn, logprobs = sample(t, p, m, backend=backend, **kw)
    assert torch.equal(drawn, sample(t, p, m, backend="torch", **kw)[0])
    expected = torch.log_softmax(t.double(), 1).gather(1, drawn[:, None])[:, 0]
    torch.testing.assert_close(logprobs.double(), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 0.9)])
def test_proxy_vocab_only_draws_as_a_masked_tail(backend, top_k, top_p):
    """``proxy_vocab_only`` draws the tokens of the same call on a teacher whose ids past the
    proxies' vocabulary are -inf (the distribution restricted to the shared prefix), and returns
    the log-probs of the whole teacher; in every mode, with an exact D too."""
    t, p, m = make_logits(6, 120, 99, torch.float32, 1e-2, seed=8, scale=2.0)
    t[:, 99:] += 4.0  # a tail that would often win
    masked = t.clone()
    masked[:, 99:] = -math.inf
    delta = make_delta(6, 99, torch.float32, seed=2)
    full = torch.log_softmax(t.double(), 1)
    kw = dict(tau=torch.tensor([1.0, 0.0, 0.5, 2.0, 1.0, 0.8]), lam=torch.linspace(-0.5, 0.5, 6), eps=1e-2,
              seed=3, offset=7, top_k=top_k, top_p=top_p, return_logprobs=True, backend=backend)
    for mode in adfast.MODES:
        for proxies in (dict(plus_logits=p, minus_logits=m), dict(delta=delta)):
            tokens, logprobs = sample(t, **proxies, mode=mode, proxy_vocab_only=True, **kw)
            expected, _ = sample(t if mode == "temperature" else masked, **proxies, mode=mode, **kw)
            assert torch.equal(tokens, expected), (mode, list(proxies))
            if mode != "temperature":
                assert bool((tokens < 99).all())
            torch.testing.assert_close(logprobs.double(), full.gather(1, tokens[:, None])[:, 0], atol=1e-5, rtol=0)


def draws(backend, t, p, m, n, **kw):
    """``n`` draws from one logits row: the row repeated n times (one Philox stream per row)."""
    # (rows are independent draws: each row has its own Philox counter)
    rep = lambda x: None if x is None else x.expand(n, -1).contiguous()  # noqa: E731
    return sample(rep(t), rep(p), rep(m), backend=backend, **kw)


@pytest.mark.parametrize("tau,lam", [(1.0, 0.5), (0.6, -0.4), (1.7, 0.0)])
def test_draws_follow_adjusted_softmax(tau, lam):
    eps = 1e-2
    t, p, m = make_logits(1, 40, 37, torch.float32, eps, seed=11, scale=1.0)
    tokens = draws("torch", t, p, m, 200_000, tau=tau, lam=lam, eps=eps, seed=2024)
    counts = torch.bincount(tokens, minlength=40)
    exact = torch.softmax(reference_adjusted(t, p, m, tau, lam, eps)[0], 0)
    assert chi_square_pvalue(counts, exact) > 1e-3
    if lam != 0.0:  # the same test rejects the distribution without the adjustment
        unadjusted = torch.softmax(torch.log_softmax(t.double(), 1)[0] / tau, 0)
        assert chi_square_pvalue(counts, unadjusted) < 1e-6


def test_grouped_draw_follows_softmax_across_group_and_vocabulary_boundaries():
    """The draw races groups of 8 entries and picks inside the winner (adfast.reference.draw_groups):
    with banned (-inf) entries inside groups, a group cut by the proxies' vocabulary end (21) and
    scores spread over a wide range, the tokens still follow the exact adjusted softmax."""
    eps = 1e-2
    t, p, m = make_logits(1, 45, 21, torch.float32, eps, seed=3, scale=2.5)
    t[0, [2, 9, 10, 22, 40]] = -float("inf")
    tokens = draws("torch", t, p, m, 200_000, tau=0.8, lam=0.3, eps=eps, seed=99)
    counts = torch.bincount(tokens, minlength=45)
    exact = torch.softmax(reference_adjusted(t, p, m, 0.8, 0.3, eps)[0], 0)
    assert int(counts[exact == 0].sum()) == 0, "drew a banned token"
    assert chi_square_pvalue(counts, exact) > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_ties_go_to_the_smallest_index(backend):
    """Equal maximal scores inside one group and across groups and chunks: the first one wins."""
    t = torch.zeros(3, 300)
    t[0, [5, 6, 70]] = 4.0  # same group, then a later group
    t[1, [130, 7, 299]] = 4.0  # an early group beats later ones
    t[2, [256, 257]] = 4.0  # past the proxies' vocabulary only
    p = torch.zeros(3, 250)
    tokens = sample(t, p, p.clone(), tau=0.0, lam=0.5, eps=1e-2, seed=3, backend=backend)
    assert tokens.tolist() == [5, 7, 256]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("filters", [dict(top_k=1), dict(top_p=0.5), dict(top_k=3, top_p=0.9)])
def test_filtered_greedy_ties_go_to_the_smallest_index(backend, filters):
    """Top-k / top-p keep tied entries in index order (a stable sort), so greedy still takes the first."""
    t = torch.zeros(2, 64, dtype=torch.bfloat16)
    t[0, [48, 17, 0]] = 4.0
    t[1, [63, 41, 40]] = 4.0
    tokens = sample(t, tau=0.0, mode="temperature", seed=0, backend=backend, **filters)
    assert tokens.tolist() == [0, 40]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("filters", [dict(top_k=3), dict(top_p=0.9)])
def test_filters_keep_the_all_masked_error(backend, filters):
    """Nothing left to draw after the filters is refused as without them (the teacher bans every id
    the proxies read, and ``proxy_vocab_only`` bans the rest), not answered with token 0."""
    t, p, m = make_logits(2, 20, 12, torch.float32, 1e-2)
    t[:, :12] = -math.inf
    for extra in ({}, filters):
        with pytest.raises(ValueError, match="every token has -inf score"):
            sample(t, p, m, tau=1.0, lam=0.5, eps=1e-2, seed=3, proxy_vocab_only=True, backend=backend, **extra)


def test_top_p_one_keeps_every_token():
    """A row's top_p of 1 keeps every token even where float32 rounds the running mass to 1 before
    the last ones (one dominant logit: the others' probabilities, ~1e-13, vanish in the sum)."""
    logits = torch.zeros(2, 64)
    logits[:, 3] = 30.0
    kept = adfast.top_k_top_p_mask(logits, torch.zeros(2, dtype=torch.int64), torch.tensor([1.0, 0.5]))
    assert bool(torch.isfinite(kept[0]).all())
    assert torch.isfinite(kept[1]).nonzero().flatten().tolist() == [3]


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.6), (8, 0.8)])
def test_top_k_top_p_draws(top_k, top_p):
    eps = 1e-2
    t, p, m = make_logits(1, 30, 30, torch.float32, eps, seed=5, scale=1.0)
    tokens = draws("torch", t, p, m, 100_000, tau=0.9, lam=0.05, eps=eps, seed=78, top_k=top_k, top_p=top_p)
    a = reference_adjusted(t, p, m, 0.9, 0.05, eps)[0]
    order = a.argsort(descending=True)
    k = top_k or a.numel()
    probs_k = torch.softmax(a[order[:k]], 0)
    n_keep = int(((probs_k.cumsum(0) - probs_k) < top_p).sum())
    kept = order[:n_keep]
    exact = torch.zeros_like(a)
    exact[kept] = torch.softmax(a[kept], 0)
    counts = torch.bincount(tokens, minlength=30)
    assert int(counts[exact == 0].sum()) == 0, "drew a token outside the top-k / top-p set"
    assert chi_square_pvalue(counts, exact) > 1e-3


@pytest.mark.parametrize("vocab_t,vocab_p,dtype", [(333, 301, torch.bfloat16), (260, 260, torch.float32),
                                                   (129, 64, torch.float16)])
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (6, 0.9)])
def test_backends_draw_identical_tokens(vocab_t, vocab_p, dtype, top_k, top_p):
    t, p, m = make_logits(6, vocab_t, vocab_p, dtype, 1e-1, seed=vocab_t, scale=1.0)
    tau = torch.tensor([1.0, 0.0, 0.5, 2.0, 1.0, 0.8])
    lam = torch.tensor([0.3, 0.1, -0.2, 0.05, 1.0, 0.0])
    differs = 0
    for mode in adfast.MODES:
        for offset in (0, 5, 2**40 + 1):
            kw = dict(tau=tau, lam=lam, eps=1e-1, mode=mode, seed=1234, offset=offset, top_k=top_k, top_p=top_p,
                      return_logprobs=True)
            x_torch, lp_torch = sample(t, p, m, backend="torch", **kw)
            x_triton, lp_triton = sample(t, p, m, backend="triton", **kw)
            assert torch.equal(x_torch, x_triton), (mode, offset)
            torch.testing.assert_close(lp_torch, lp_triton, atol=1e-5, rtol=0)
            differs += int((x_torch != sample(t, p, m, backend="torch", **{**kw, "offset": offset + 1})[0]).sum())
    assert differs > 0, "the draws do not depend on the offset"


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_and_offset_determine_the_draw(backend):
    t, p, m = make_logits(32, 120, 120, torch.float32, 1e-2, scale=0.5)
    kw = dict(tau=1.0, lam=0.05, eps=1e-2, backend=backend)
    first = sample(t, p, m, seed=5, offset=3, **kw)
    assert torch.equal(first, sample(t, p, m, seed=5, offset=3, **kw))
    assert torch.equal(first, sample(t, p, m, seed=5, offset=torch.tensor(3), **kw))
    assert not torch.equal(first, sample(t, p, m, seed=5, offset=4, **kw))
    assert not torch.equal(first, sample(t, p, m, seed=6, offset=3, **kw))
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(sample(t, p, m, generator=g1, **kw), sample(t, p, m, generator=g2, **kw))


@pytest.mark.parametrize("vocab,offset", [(301, 0), (64, 7), (1001, 2**40 + 3)])
def test_permutation_kernel_equals_the_philox_reference(vocab, offset):
    """Permutation sampling's keys and signs from one Triton launch give the permutations and
    signs of adfast.philox's int64 arithmetic, bit for bit (the stable argsort of the same keys)."""
    kernel = importlib.import_module("adfast.kernels.permutation").permutation_and_sign
    perm, sign = kernel(1234, torch.tensor([offset], device=KERNEL_DEVICE), 5, vocab)
    want_perm, want_sign = adfast.philox.permutation_and_sign(1234, offset, 5, vocab)
    assert torch.equal(perm.cpu(), want_perm) and torch.equal(sign.cpu(), want_sign)
    assert set(sign.tolist()) <= {-1.0, 1.0}
    assert torch.equal(perm.sort(1).values.cpu(), torch.arange(vocab).expand(5, -1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_permutation_keeps_each_rows_multiset_of_abs_d(backend):
    eps, tau, lam = 1e-2, 0.8, 0.5
    t, p, m = make_logits(8, 150, 140, torch.float32, eps, seed=3)
    teacher_part = torch.log_softmax(t.double(), 1) / tau
    d_true = (reference_adjusted(t, p, m, tau, lam, eps) - teacher_part)[:, :140] / lam
    signs = []
    for offset in range(3):
        out = adjusted_logits(t, p, m, tau=tau, lam=lam, eps=eps, mode="permutation", seed=42,
                              offset=offset, backend=backend)
        d_perm = (out.double() - teacher_part)[:, :140] / lam
        tol = 20 * adjusted_tolerance(t, p, lam, eps) / lam
        torch.testing.assert_close(d_perm.abs().sort(1).values, d_true.abs().sort(1).values, atol=tol, rtol=0)
        assert (d_perm - d_true).abs().max() > 1.0, "permutation left D in place"
        assert torch.allclose(out[:, 140:].double(), teacher_part[:, 140:], atol=1e-5)
        # a permutation keeps the sum, so sum(D_perm) / sum(D) is the row's sign
        ratio = d_perm.sum(1) / d_true.sum(1)
        torch.testing.assert_close(ratio.abs(), torch.ones(8, dtype=torch.float64), atol=1e-3, rtol=0)
        signs.append(torch.sign(ratio))
    signs = torch.cat(signs)
    assert bool((signs > 0).any()) and bool((signs < 0).any()), "signs never flip"


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_implementation_mapping(backend):
    """locuslab's processor samples softmax((t + lam_ref (p - m) / (2 eps)) / tau): our lam = lam_ref / tau."""
    eps, tau, lam_ref = 1e-2, 0.6, 0.03
    t, p, m = make_logits(3, 90, 90, torch.float32, eps, seed=4)
    theirs = torch.softmax((t.double() + lam_ref * (p.double() - m.double()) / (2 * eps)) / tau, 1)
    ours = torch.softmax(adjusted_logits(t, p, m, tau=tau, lam=lam_ref / tau, eps=eps,
                                         backend=backend).double(), 1)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_teacher_logits_are_banned_tokens(backend):
    t, p, m = make_logits(64, 50, 50, torch.float32, 1e-2, scale=0.1)
    t[:, :25] = -math.inf
    tokens = sample(t, p, m, tau=1.0, lam=0.1, eps=1e-2, seed=0, backend=backend)
    assert bool((tokens >= 25).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where,value,message", [
    ("teacher", math.nan, "teacher logits contain NaN"),
    ("teacher", math.inf, "teacher logits contain NaN or \\+inf"),
    ("plus", math.nan, "proxy logits"),
    ("minus", -math.inf, "proxy logits"),
])
@pytest.mark.parametrize("vocab_p", [70, 61])
def test_non_finite_logits_are_refused(backend, where, value, message, vocab_p):
    t, p, m = make_logits(3, 70, vocab_p, torch.float32, 1e-2)
    {"teacher": t, "plus": p, "minus": m}[where][1, 33] = value
    with pytest.raises(ValueError, match=message):
        sample(t, p, m, tau=1.0, lam=0.1, eps=1e-2, seed=0, backend=backend)
    with pytest.raises(ValueError, match=message):
        adjusted_logits(t, p, m, tau=1.0, lam=0.1, eps=1e-2, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_row_is_refused(backend):
    t, p, m = make_logits(2, 40, 40, torch.float32, 1e-2)
    t[0] = -math.inf
    with pytest.raises(ValueError, match="every token has -inf score \\(rows \\[0\\]\\)"):
        sample(t, p, m, tau=1.0, lam=0.1, eps=1e-2, seed=0, backend=backend)
    with pytest.raises(ValueError, match="every token has -inf score \\(rows \\[0\\]\\)"):
        adjusted_logits(t, p, m, tau=1.0, lam=0.1, eps=1e-2, backend=backend)


@pytest.mark.parametrize("kwargs,message", [
    (dict(tau=-0.5), "tau must be 0 \\(greedy\\) or in \\[1e-06"),
    (dict(tau=torch.tensor([1.0, -1.0])), "tau must be 0 \\(greedy\\) or .*got -1:"),
    (dict(tau=1e-9), "tau must be 0 \\(greedy\\) or .*got 1e-09: a temperature below 1e-06"),
    (dict(tau=torch.tensor([1.0, 1e-9])), "tau must be 0 \\(greedy\\) or .*got 1e-09"),
    (dict(tau=1e39), "tau must be finite in float32"),
    (dict(eps=0.0), "eps must be"),
    (dict(eps=-1e-4), "eps must be"),
    (dict(mode="typical"), "mode must be one of"),
    (dict(lam=torch.ones(3)), "lam must be a float or a \\[batch=2\\] tensor"),
    (dict(top_p=0.0), "top_p must be in"),
    (dict(top_k=-1), "top_k >= 0"),
    (dict(top_p=math.nan), "top_p must be in"),
    (dict(top_p=torch.tensor([0.5, 0.5, 0.5])), "top_p must be a number or a \\[batch=2\\] tensor"),
    (dict(top_k=torch.tensor([[2, 2]])), "top_k must be a number or a \\[batch=2\\] tensor"),
    (dict(top_k=2.5), "top_k must hold integers"),
    (dict(offset=torch.tensor(-3)), "offset must be in \\[0, 2\\*\\*63\\)"),
])
def test_bad_parameters_are_refused(kwargs, message):
    t, p, m = make_logits(2, 40, 40, torch.float32, 1e-2)
    args = dict(tau=1.0, lam=0.1, eps=1e-2, seed=0, backend="torch")
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        adfast.sample(t, p, m, **args)


def test_shape_and_vocab_mismatches_are_refused():
    t, p, m = make_logits(2, 40, 40, torch.float32, 1e-2)
    kw = dict(tau=1.0, lam=0.1, eps=1e-2, seed=0)
    with pytest.raises(ValueError, match="vocab mismatch"):
        adfast.sample(t[:, :30], p, m, **kw)
    with pytest.raises(ValueError, match="batch mismatch"):
        adfast.sample(t, p[:1], m[:1], **kw)
    with pytest.raises(ValueError, match="differ in shape"):
        adfast.sample(t, p, m[:, :39], **kw)
    with pytest.raises(ValueError, match="needs plus_logits and minus_logits"):
        adfast.sample(t, **kw)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        adfast.sample(t.long(), p, m, **kw)
    with pytest.raises(ValueError, match="\\[batch, vocab\\]"):
        adfast.sample(t[0], p, m, **kw)
    with pytest.raises(ValueError, match="teacher_logits has an empty vocabulary"):
        adfast.sample(t[:, :0], mode="temperature", **kw)


def test_eps_is_any_real_scalar():
    """eps as a numpy scalar or a one-element tensor is the same float (sampling.py's ``_scalar``)."""
    t, p, m = make_logits(2, 40, 40, torch.float32, 1e-2)
    kw = dict(tau=1.0, lam=0.1, seed=0, backend="torch")
    expected = adjusted_logits(t, p, m, eps=1e-2, **kw)
    for eps in (numpy.float32(1e-2), torch.tensor(1e-2)):
        torch.testing.assert_close(adjusted_logits(t, p, m, eps=eps, **kw), expected)
    with pytest.raises(ValueError, match="eps must be a finite float > 0"):
        adjusted_logits(t, p, m, eps=torch.tensor([1e-2, 1e-2]), **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_temperature_with_large_scores_draws_the_argmax(backend):
    """At the smallest temperature, scores of a few thousand put ``max s' log2(e) / tau`` past
    ``2**31``: each group's weights must still be relative to its exact max (its own weight 1), so
    the draw is the argmax, inside the vocabulary (the fused form ``fma(s', scale, -max s' *
    scale)`` overflowed there and picked the index past the group's end). Both halves of the row
    race: the proxies' vocabulary and the teacher's tail."""
    t, p, m = make_logits(4, 70, 60, torch.float32, 1e-2, seed=5)
    t = t + torch.tensor([3000.0, -2500.0, 3000.0, 1800.0])[:, None]
    t[2, 66] = t[2].amax() + 2.0  # the winner in the teacher's tail
    t[3, 69] = t[3].amax() + 2.0  # the last entry of the last group
    tau = adfast.sampling.TAU_MIN
    assert float(t.abs().amax()) * 1.4427 / tau > 2**31
    for mode in ("antidistill", "temperature"):
        ref = reference_adjusted(t, p if mode == "antidistill" else None, m, tau, 0.3, 1e-2)
        top2 = ref.topk(2, dim=1).values
        assert bool((top2[:, 0] - top2[:, 1] > 10.0).all()), "test data has near ties"
        for seed in range(3):
            tokens = sample(t, p, m, tau=tau, lam=0.3, eps=1e-2, mode=mode, seed=seed, backend=backend)
            assert torch.equal(tokens, ref.argmax(1)), (mode, seed)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kernels_match_cpu_twin():
    t, p, m = make_logits(64, 151936 + 128, 151936, torch.bfloat16, 1e-2, seed=1)
    tau = torch.rand(64) + 0.1
    tau[::7] = 0.0
    for mode in adfast.MODES:
        kw = dict(tau=tau, lam=0.2, eps=1e-2, mode=mode, seed=8, offset=11)
        for proxy_vocab_only in (False, True):
            x_cpu, lp_cpu = sample(t, p, m, return_logprobs=True, backend="torch", proxy_vocab_only=proxy_vocab_only,
                                   **kw)
            x_gpu, lp_gpu = sample(t, p, m, return_logprobs=True, backend="triton", proxy_vocab_only=proxy_vocab_only,
                                   **kw)
            assert (x_cpu == x_gpu).float().mean() > 0.99, mode  # fast-math log may flip a near-tie
            torch.testing.assert_close(lp_gpu, lp_cpu, atol=1e-4, rtol=0)
        a_cpu = adjusted_logits(t, p, m, backend="torch", **kw)
        a_gpu = adjusted_logits(t, p, m, backend="triton", **kw)
        torch.testing.assert_close(a_gpu, a_cpu, atol=adjusted_tolerance(t, p, 0.2, 1e-2), rtol=0)


def test_kernel_pipelining_and_noiseless_variants_keep_the_draw():
    """The main loop's pipelining depth (``num_stages``) changes no token, log-prob or bad bit; the
    kernel without noise (the decomposition bench/sampler_tune.py times) draws the greedy tokens."""
    fused_sample = importlib.import_module("adfast.kernels.fused_sample").fused_sample
    t, p, m = (x.to(KERNEL_DEVICE) for x in make_logits(6, 3000 + 70, 3000, torch.bfloat16, 1e-2, seed=4))
    tau = torch.tensor([0.7, 1.0, 0.0, 1.3, 0.5, 0.9], device=KERNEL_DEVICE)
    coef = torch.full((6,), 0.3 / 2e-2, device=KERNEL_DEVICE)
    offset = torch.tensor([5], device=KERNEL_DEVICE)
    plan = dict(num_splits=2, block=256)
    first = fused_sample(t, p, m, None, tau, coef, 3, offset, **plan)
    for stages in (2, 3):
        again = fused_sample(t, p, m, None, tau, coef, 3, offset, num_stages=stages, **plan)
        for a, b in zip(first, again):
            assert torch.equal(a, b), stages
    noiseless = fused_sample(t, p, m, None, tau, coef, 3, offset, noise=False, **plan)[0]
    greedy = fused_sample(t, p, m, None, torch.zeros_like(tau), coef, 3, offset, **plan)[0]
    assert torch.equal(noiseless, greedy)
    assert not torch.equal(first[0], greedy)  # the noise does move the draw


@pytest.mark.parametrize("num_splits", [1, 2])
def test_gpu_block_shares_philox_calls_and_draws_the_twins_tokens(num_splits):
    """With the GPU's block (8 warps: a lane per group of a 256-group block) the main loop calls
    Philox once per four blocks and hands each block its word (adfast.philox's sampling layout);
    on 10 blocks and a chunk that starts inside a run of four (2 splits), the tokens equal the CPU
    twin's, which takes each group's word by that layout directly."""
    fused_sample = importlib.import_module("adfast.kernels.fused_sample").fused_sample
    t, p, m = make_logits(6, 20480 + 70, 20480 - 30, torch.bfloat16, 1e-2, seed=12, scale=1.0)
    tau = torch.tensor([0.7, 1.0, 0.0, 1.3, 0.5, 0.9])
    coef = torch.full((6,), 0.3 / 2e-2)
    offset = torch.tensor([9])
    twin = adfast.reference.fused_sample(t, p, m, None, tau, coef, 5, offset)
    on = lambda x: x.to(KERNEL_DEVICE)  # noqa: E731
    kernel = fused_sample(on(t), on(p), on(m), None, on(tau), on(coef), 5, on(offset), num_splits=num_splits,
                          block=2048, num_warps=8)
    same = (kernel[0].cpu() == twin[0]).float().mean()
    assert same == 1.0 if KERNEL_DEVICE == "cpu" else same >= 5 / 6  # fast-math logs may flip a near-tie
    torch.testing.assert_close(kernel[1].cpu(), twin[1], atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------- exact D (delta=)

def make_delta(batch, vocab_p, dtype, seed=0, scale=3.0):
    """A normalised D (a log-softmax tangent: zero mean under the proxy's softmax) of a random proxy."""
    g = torch.Generator().manual_seed(seed)
    proxy = scale * torch.randn(batch, vocab_p, generator=g)
    dlogits = torch.randn(batch, vocab_p, generator=g)
    return (dlogits - (torch.softmax(proxy, 1) * dlogits).sum(1, keepdim=True)).to(dtype)


def reference_adjusted_exact(t, delta, tau, lam):
    """float64 ``log_softmax(t)/tau + lam * delta`` on the prefix, the teacher's term alone beyond."""
    batch = t.shape[0]
    tau = torch.as_tensor(tau, dtype=torch.float64).expand(batch)[:, None]
    lam = torch.as_tensor(lam, dtype=torch.float64).expand(batch)[:, None]
    out = torch.log_softmax(t.double(), 1) / torch.where(tau == 0, 1.0, tau)
    out[:, : delta.shape[1]] += lam * delta.double()
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab_t,vocab_p", [(203, 203), (203, 190), (128, 61)])
def test_adjusted_logits_with_exact_delta_matches_float64(backend, dtype, vocab_t, vocab_p):
    t = (3.0 * torch.randn(3, vocab_t, generator=torch.Generator().manual_seed(vocab_t))).to(dtype)
    delta = make_delta(3, vocab_p, dtype, seed=vocab_p)
    tau = torch.tensor([0.7, 0.0, 1.3])
    lam = torch.tensor([0.5, -2.0, 1.0])
    out = adjusted_logits(t, delta=delta, tau=tau, lam=lam, backend=backend)
    ref = reference_adjusted_exact(t, delta, tau, lam)
    assert out.dtype == torch.float32 and out.shape == (3, vocab_t)
    size = 1.0 + float(t.float().abs().max()) + math.log(vocab_t)
    torch.testing.assert_close(out.double(), ref, atol=2e-6 * size * (1.0 + 2.0 * float(delta.float().abs().max())),
                               rtol=0)
    tail = torch.log_softmax(t.double(), 1)[:, vocab_p:] / torch.tensor([0.7, 1.0, 1.3])[:, None].double()
    torch.testing.assert_close(out[:, vocab_p:].double(), tail, atol=1e-5, rtol=0)
    # eps plays no part with an exact D
    torch.testing.assert_close(adjusted_logits(t, delta=delta, tau=tau, lam=lam, eps=123.0, backend=backend),
                               out, atol=0, rtol=0)


@pytest.mark.parametrize("vocab_t,vocab_p,dtype", [(333, 301, torch.bfloat16), (260, 260, torch.float32),
                                                   (129, 64, torch.float16)])
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (6, 0.9)])
def test_backends_draw_identical_tokens_with_exact_delta(vocab_t, vocab_p, dtype, top_k, top_p):
    t = torch.randn(6, vocab_t, generator=torch.Generator().manual_seed(vocab_t)).to(dtype)
    delta = make_delta(6, vocab_p, dtype, seed=vocab_p, scale=1.0)
    tau = torch.tensor([1.0, 0.0, 0.5, 2.0, 1.0, 0.8])
    lam = torch.tensor([3.0, 1.0, -2.0, 0.5, 10.0, 0.0])
    differs = 0
    for mode in adfast.MODES:
        for offset in (0, 5, 2**40 + 1):
            kw = dict(delta=delta, tau=tau, lam=lam, mode=mode, seed=1234, offset=offset, top_k=top_k, top_p=top_p,
                      return_logprobs=True)
            x_torch, lp_torch = sample(t, backend="torch", **kw)
            x_triton, lp_triton = sample(t, backend="triton", **kw)
            assert torch.equal(x_torch, x_triton), (mode, offset)
            torch.testing.assert_close(lp_torch, lp_triton, atol=1e-5, rtol=0)
            differs += int((x_torch != sample(t, backend="torch", **{**kw, "offset": offset + 1})[0]).sum())
    assert differs > 0, "the draws do not depend on the offset"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["antidistill", "permutation"])
def test_exact_delta_greedy_is_exact_argmax(backend, mode):
    t = 3.0 * torch.randn(5, 150, generator=torch.Generator().manual_seed(4))
    delta = make_delta(5, 140, torch.float32, seed=5)
    lam = torch.tensor([0.0, 0.5, 2.0, -1.0, 5.0])
    kw = dict(delta=delta, tau=0.0, lam=lam, mode=mode, seed=9, offset=2, backend=backend)
    objective = adjusted_logits(t, **kw)
    assert torch.equal(sample(t, **kw), objective.argmax(1))
    if mode == "antidistill":
        assert torch.equal(objective.argmax(1), reference_adjusted_exact(t, delta, 0.0, lam).argmax(1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab_t,vocab_p", [(203, 203), (128, 61)])
def test_exact_delta_equals_pair_given_its_difference(backend, vocab_t, vocab_p):
    """delta = (log_softmax(p) - log_softmax(m)) / (2 eps) gives what the pair p, m gives."""
    eps = 1e-3
    t, p, m = make_logits(3, vocab_t, vocab_p, torch.float32, eps, seed=vocab_p)
    delta = ((torch.log_softmax(p.double(), 1) - torch.log_softmax(m.double(), 1)) / (2 * eps)).float()
    tau = torch.tensor([0.7, 0.0, 1.3])
    lam = torch.tensor([0.05, -0.02, 0.1])
    for mode in ("antidistill", "permutation", "temperature"):
        kw = dict(tau=tau, lam=lam, mode=mode, seed=3, offset=1, backend=backend)
        from_pair = adjusted_logits(t, p, m, eps=eps, **kw)
        exact = adjusted_logits(t, delta=delta, **kw)
        torch.testing.assert_close(exact, from_pair, atol=adjusted_tolerance(t, p, lam, eps), rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 0.8)])
def test_exact_delta_row_constants_change_no_draw(backend, top_k, top_p):
    """D plus a constant per row draws the same tokens (every mode, greedy rows too): the engine's
    jvp step hands the sampler the logits' tangent, which is D plus sum_v p_v dlogits_v."""
    t = 3.0 * torch.randn(4, 150, generator=torch.Generator().manual_seed(6))
    delta = make_delta(4, 140, torch.float32, seed=7)
    shifted = delta + torch.tensor([2.5, -4.0, 0.25, 1.0])[:, None]
    kw = dict(tau=torch.tensor([1.0, 0.0, 0.7, 1.5]), lam=torch.tensor([0.5, 1.0, -2.0, 1.5]), top_k=top_k,
              top_p=top_p, return_logprobs=True, backend=backend)
    bumped = delta + 4.0 * (torch.arange(140) % 2)  # not a constant: the draws must notice
    differs = 0
    for mode in adfast.MODES:
        for offset in range(3):
            tokens, logprobs = sample(t, delta=delta, mode=mode, seed=11, offset=offset, **kw)
            tokens_shifted, logprobs_shifted = sample(t, delta=shifted, mode=mode, seed=11, offset=offset, **kw)
            assert torch.equal(tokens, tokens_shifted), (mode, offset)
            assert torch.equal(logprobs, logprobs_shifted)
            bumped_tokens = sample(t, delta=bumped, mode=mode, seed=11, offset=offset, **kw)[0]
            differs += int((bumped_tokens != tokens).sum())
    assert differs > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_delta_temperature_mode_ignores_it(backend):
    t = torch.randn(4, 80, generator=torch.Generator().manual_seed(1))
    delta = make_delta(4, 80, torch.float32)
    kw = dict(tau=torch.tensor([1.0, 0.0, 0.5, 2.0]), lam=5.0, mode="temperature", seed=2, backend=backend)
    assert torch.equal(sample(t, delta=delta, **kw), sample(t, **kw))
    torch.testing.assert_close(adjusted_logits(t, delta=delta, **kw), adjusted_logits(t, **kw))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_delta_is_refused(backend):
    t = torch.randn(3, 70)
    for value in (math.nan, math.inf, -math.inf):
        delta = make_delta(3, 60, torch.float32)
        delta[1, 33] = value
        with pytest.raises(ValueError, match="proxy logits \\(or delta\\) contain NaN or \\+-inf \\(rows \\[1\\]\\)"):
            sample(t, delta=delta, tau=1.0, lam=0.1, seed=0, backend=backend)
        with pytest.raises(ValueError, match="proxy logits \\(or delta\\)"):
            adjusted_logits(t, delta=delta, tau=1.0, lam=0.1, backend=backend)


def test_exact_delta_errors():
    t, p, m = make_logits(2, 40, 40, torch.float32, 1e-2)
    delta = make_delta(2, 40, torch.float32)
    for pair in ((p, m), (p, None), (None, m)):
        with pytest.raises(ValueError, match="either plus_logits and minus_logits .* or delta .*not both"):
            adfast.sample(t, *pair, delta=delta, tau=1.0, lam=0.1, eps=1e-2, seed=0)
        with pytest.raises(ValueError, match="not both"):
            adfast.adjusted_logits(t, *pair, delta=delta, tau=1.0, lam=0.1, eps=1e-2)
    with pytest.raises(ValueError, match="vocab mismatch: delta's vocabulary \\(40\\)"):
        adfast.sample(t[:, :30], delta=delta, tau=1.0, lam=0.1, seed=0)
    with pytest.raises(ValueError, match="batch mismatch"):
        adfast.sample(t, delta=delta[:1], tau=1.0, lam=0.1, seed=0)
    with pytest.raises(ValueError, match="delta must be float32, bfloat16 or float16"):
        adfast.sample(t, delta=delta.double(), tau=1.0, lam=0.1, seed=0)
    with pytest.raises(ValueError, match="delta must be a \\[batch, vocab\\] tensor"):
        adfast.sample(t, delta=delta[0], tau=1.0, lam=0.1, seed=0)
    with pytest.raises(ValueError, match="eps must be"):  # a pair still needs eps
        adfast.adjusted_logits(t, p, m, tau=1.0, lam=0.1)
