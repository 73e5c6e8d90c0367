"""PyTorch twins of the Triton kernels: the CPU path, computing the same function in float32.

Each function takes and returns exactly what its kernel launcher in :mod:`adfast.kernels` does,
with the same Philox noise, the same order of float32 operations and the same tie rule (the
first maximal index), so that on equal inputs both paths draw the same tokens. As there, ``plus``
given with ``minus=None`` is the exact-D input: ``plus`` holds ``D`` itself (already normalised).
"""
from __future__ import annotations

import torch

from . import philox
from .philox import MASK32, SECOND_STREAM, WORD_RUN, gumbel2_from_words, philox4x32

LOG2E = 1.4426950408889634


def _bad_bits(teacher: torch.Tensor, plus: torch.Tensor | None, minus: torch.Tensor | None) -> torch.Tensor:
    bad = (torch.isnan(teacher) | torch.isposinf(teacher)).any(1).to(torch.int32)
    if plus is not None:
        proxy_bad = (~torch.isfinite(plus)).any(1)
        if minus is not None:
            proxy_bad = proxy_bad | (~torch.isfinite(minus)).any(1)
        bad = bad | (2 * proxy_bad.to(torch.int32))
    return bad


def _proxy_difference(plus, minus, perm) -> tuple[torch.Tensor, torch.Tensor | None]:
    p = plus.float()
    m = minus.float() if minus is not None else None
    if perm is not None:
        p = p.gather(1, perm)
        m = m.gather(1, perm) if m is not None else None
    return p, m


def fma32(x, y, z) -> torch.Tensor:
    """``x * y + z`` of float32 operands rounded once to float32, as the kernels' ``tl.fma`` (the
    product is exact in float64; the float64 sum rounds before the float32 rounding, which can
    differ from a single rounding only within 2**-53 of a float32 midpoint)."""
    as64 = lambda v: torch.as_tensor(v).to(torch.float64)  # noqa: E731
    return (as64(x) * as64(y) + as64(z)).to(torch.float32)


def row_scaling(tau: torch.Tensor, coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(greedy, a, scale)`` per row, as :func:`adfast.kernels.group_draw.row_scaling`: scores
    ``s' = t + a * diff = tau * (t / tau + coef * diff)``, exponent scale ``log2(e) / tau`` (``tau``
    read as 1 for a greedy row)."""
    greedy = tau == 0
    tau_or_one = torch.where(greedy, 1.0, tau)
    return greedy, coef * tau_or_one, (1.0 / tau_or_one) * LOG2E


def draw_groups(scores: torch.Tensor, vocab_p: int, greedy: torch.Tensor, scale: torch.Tensor, seed: int,
                offset: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused sampler's draw over float32 scores ``s' [B, V]``, as :mod:`adfast.kernels.group_draw`.

    Entries ``v < vocab_p`` and ``v >= vocab_p`` race apart (the sampler shifts the first set before
    it compares the winners); each set is cut into the parts of groups of 8 entries. Per part, with
    ``w = 2 ** ((s' - max s') * scale)`` (``scale [B]``): key ``max s' * scale + log2(sum w)
    + log2(e) G`` (greedy rows, ``greedy [B]`` bool: key ``max s'``), and the entry picked by
    inverse CDF over the running sums of ``w`` with one uniform (greedy: the first maximal entry);
    per set, the first part of the largest key. The Philox words follow the sampling layout of
    :mod:`adfast.philox`. Returns ``(best_pre, index_pre, best_tail, index_tail)``, ``[B]`` each:
    the winning key (-inf when every score of the set is -inf) and vocabulary index.
    """
    batch, vocab = scores.shape
    groups = -(-vocab // 8)
    s = torch.full((batch, groups * 8), -float("inf"), dtype=torch.float32, device=scores.device)
    s[:, :vocab] = scores
    s = s.view(batch, groups, 8)
    v = torch.arange(groups * 8, device=scores.device).view(groups, 8)
    offset = torch.as_tensor(offset, dtype=torch.int64, device=scores.device)
    g = torch.arange(groups, device=scores.device)[None, :]
    rows = torch.arange(batch, device=scores.device)[:, None]
    lo, hi = offset & MASK32, (offset >> 32) & MASK32
    shared = philox4x32(seed, (g // (4 * WORD_RUN)) * WORD_RUN + g % WORD_RUN, rows, lo, hi)
    prefix_gumbel = torch.stack(shared, 0).gather(0, ((g // WORD_RUN) % 4).expand(batch, -1)[None])[0]
    second = philox4x32(seed, g, rows | SECOND_STREAM, lo, hi)
    scale = scale[:, None, None]
    results = []
    sets = ((v < vocab_p, prefix_gumbel, second[1]), (v >= vocab_p, second[0], second[2]))
    for in_set, gumbel_word, pick_word in sets:
        part = torch.where(in_set, s, -float("inf"))
        top = part.amax(2)
        ref = torch.where(torch.isneginf(top), 0.0, top)[..., None]
        w = torch.exp2((part - ref) * scale)
        pairs = w.view(batch, groups, 4, 2).sum(3)  # the kernel's tree: ((w0 + w1) + (w2 + w3)) + ...
        quads = pairs.view(batch, groups, 2, 2).sum(3)
        total = quads[..., 0] + quads[..., 1]
        running = [w[..., 0]]
        for k in range(1, 8):  # the pick's sequential running sums
            running.append(running[-1] + w[..., k])
        running = torch.stack(running, 2)
        target = (pick_word >> 9).to(torch.float32) * 2.0**-23 * running[..., 7]
        below = (running <= target[..., None]).sum(2)
        first_top = (part == top[..., None]).to(torch.int8).argmax(2)
        sampled_key = fma32(top, scale[..., 0], torch.log(total) * LOG2E) + gumbel2_from_words(gumbel_word)
        key = torch.where(greedy[:, None], top, sampled_key)
        index = v[:, 0][None, :] + torch.where(greedy[:, None], first_top, below)
        best = key.argmax(1)  # the first largest key: the smallest index
        results += [key.gather(1, best[:, None])[:, 0], index.gather(1, best[:, None])[:, 0]]
    return tuple(results)


def fused_sample(teacher, plus, minus, perm, tau, coef, seed: int, offset, num_splits=None, *,
                 proxy_vocab_only=False):
    """Twin of :func:`adfast.kernels.fused_sample.fused_sample` (``num_splits`` has no effect).

    As in the kernel, scores are ``s' = t + a * diff`` of raw logits (:func:`row_scaling`) and draw
    through :func:`draw_groups`; when ``V_P < V_T`` the prefix's best key is shifted by ``coef *
    (lse(m) - lse(p))`` (times ``log2(e)`` for a sampled row, the keys' units) before it is compared
    with the tail's best. An exact ``D`` (``minus`` None) adds ``a * D`` to the prefix and needs no
    shift; with ``proxy_vocab_only`` (and proxies) the tail is not drawn.
    """
    t = teacher.float()
    greedy, a, scale = row_scaling(tau, coef)
    z = t.clone()
    vocab_p = 0
    if plus is not None:
        vocab_p = plus.shape[1]
        p, m = _proxy_difference(plus, minus, perm)
        z[:, :vocab_p] = fma32(a[:, None], p if m is None else p - m, z[:, :vocab_p])
        if proxy_vocab_only:
            z[:, vocab_p:].fill_(-float("inf"))
    best_pre, idx_pre, best_tail, idx_tail = draw_groups(z, vocab_p, greedy, scale, seed, offset.reshape(()))
    shift = torch.zeros_like(best_pre)
    if plus is not None and minus is not None and vocab_p < t.shape[1] and not proxy_vocab_only:
        shift = coef * (torch.logsumexp(minus.float(), 1) - torch.logsumexp(plus.float(), 1))
        shift = shift * torch.where(greedy, 1.0, LOG2E)
    take_tail = (best_tail > best_pre + shift) | torch.isneginf(best_pre)
    tokens = torch.where(take_tail, idx_tail, idx_pre)
    bad = _bad_bits(teacher, plus, minus)
    empty = torch.isneginf(z).all(1)
    bad = bad | torch.where(empty, 4, 0).to(torch.int32)
    tokens = torch.where(empty, 0, tokens)
    logprobs = t.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(t, dim=1)
    return tokens, logprobs, bad


def permutation_and_sign(seed: int, offset: torch.Tensor, rows: int, vocab: int,
                         device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of :func:`adfast.kernels.permutation.permutation_and_sign`: :func:`adfast.philox.permutation_and_sign`
    (``offset`` a one-element int64 tensor)."""
    return philox.permutation_and_sign(seed, offset.reshape(()), rows, vocab, device=device)


def adjusted_logits(teacher, plus, minus, perm, tau, coef, num_splits=None):
    """Twin of :func:`adfast.kernels.adjusted_logits.adjusted_logits`."""
    t = teacher.float()
    lse_t = torch.logsumexp(t, dim=1)
    out = (t - lse_t[:, None]) * torch.where(tau == 0, 1.0, 1.0 / tau)[:, None]
    if plus is not None and minus is None:
        p, _ = _proxy_difference(plus, None, perm)
        out[:, :plus.shape[1]] = out[:, :plus.shape[1]] + coef[:, None] * p
    elif plus is not None:
        vocab_p = plus.shape[1]
        lse_p = torch.logsumexp(plus.float(), dim=1, keepdim=True)
        lse_m = torch.logsumexp(minus.float(), dim=1, keepdim=True)
        p, m = _proxy_difference(plus, minus, perm)
        out[:, :vocab_p] = out[:, :vocab_p] + coef[:, None] * ((p - lse_p) - (m - lse_m))
    all_masked = torch.where(torch.isneginf(lse_t), 4, 0).to(torch.int32)
    return out, lse_t, _bad_bits(teacher, plus, minus) | all_masked
