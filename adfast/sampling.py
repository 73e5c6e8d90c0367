"""Antidistillation sampling over logits: plain functions over tensors (the paper's eq. 12).

For teacher logits ``t [B, V_T]`` and the logits ``p, m [B, V_P]`` of the two perturbed proxy
copies ``theta_P + eps g`` and ``theta_P - eps g`` (``V_P <= V_T``; rows past ``V_P`` are
padding of the teacher's head), each row ``b`` is drawn from ``softmax(a_b)`` with

    a_b = log_softmax(t_b) / tau_b + lam_b * D_b,
    D_b[v] = (log_softmax(p_b)[v] - log_softmax(m_b)[v]) / (2 eps)  for v < V_P, 0 beyond.

``tau_b == 0`` is greedy: ``argmax(log_softmax(t_b) + lam_b D_b)``; a sampled row needs ``tau_b >=
TAU_MIN`` (1e-6). ``tau`` and ``lam`` are floats or per-row ``[B]`` tensors; ``eps`` is one float.

Exact ``D``: instead of the pair, pass ``delta [B, V_P]`` (float32/bfloat16/float16,
``V_P <= V_T``), ``D`` itself, e.g. the exact directional derivative of the proxy's
log-softmax along ``g`` (:meth:`adfast.decoder.Decoder.delta`). It must already be normalised
like a log-softmax tangent (``sum_v softmax(proxy logits)_v D_v = 0``): it is used as given,
``a_b = log_softmax(t_b) / tau_b + lam_b * delta_b`` on ``v < V_P`` and the teacher's term alone
beyond; ``eps`` is not used, and ``plus_logits`` / ``minus_logits`` must be None. The same
kernels run, reading one ``[B, V_P]`` row instead of two and skipping the proxy normalisers.

Modes: ``"antidistill"`` (the above), ``"temperature"`` (``lam`` ignored, no proxy logits
needed; ``delta`` is ignored too) and ``"permutation"`` (the paper's appendix-A control: each
row's ``D`` is randomly permuted over ``[0, V_P)`` and sign-flipped at every step, keeping its
statistics and destroying its information; an exact ``delta`` is permuted alike).

Randomness is counter based (:mod:`adfast.philox`): a draw is a pure function of
``(seed, offset, row)``. Pass ``seed`` (and an ``offset`` that you advance per step, an int or
an int64 device tensor), or a ``generator`` from which a seed is drawn.

Relation to the reference implementation (locuslab/antidistillation-sampling): it adds
``lam_ref * (p - m) / (2 eps)`` (raw proxy logits) to the raw teacher logits and lets Hugging
Face divide by the temperature afterwards, i.e. samples ``softmax((t + lam_ref (p - m)/(2 eps)) / tau)``.
The proxies' log-sum-exps are row constants, so that is this distribution with
``lam = lam_ref / tau``; conversely pass ``lam_ref = lam * tau`` to reproduce ours there.

Dispatch: CUDA tensors run the Triton kernels of :mod:`adfast.kernels`; CPU tensors run their
PyTorch twins in :mod:`adfast.reference`, unless ``TRITON_INTERPRET=1`` is set, in which case
the Triton kernels run on CPU through the interpreter. ``backend="triton"`` / ``"torch"`` forces one.
"""
from __future__ import annotations

import math
import os
from typing import Union

import torch

from . import reference

MODES = ("antidistill", "temperature", "permutation")
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TAU_MIN = 1e-6
"""The smallest temperature of a sampled row (0 is greedy). Below it the draw is the argmax but
between logits closer than about ``tau`` (nothing a bf16 or fp16 logit can resolve), and ``t /
tau`` of large logits leaves float32's range: such a ``tau`` is refused, not rounded to 0."""
FLOAT32_MAX = torch.finfo(torch.float32).max


def check_tau(tau: float) -> None:
    """Raise ``ValueError`` unless ``tau`` is 0 (greedy) or at least :data:`TAU_MIN`."""
    if not (tau == 0 or TAU_MIN <= tau <= FLOAT32_MAX):
        raise ValueError(f"tau must be 0 (greedy) or in [{TAU_MIN:g}, float32's max], got {tau:g}: a temperature "
                         f"below {TAU_MIN:g} draws the argmax to float32 precision, so pass tau=0")
PerRow = Union[float, torch.Tensor]


def _kernels(tensor: torch.Tensor, backend: str | None):
    if backend is None:
        backend = "triton" if tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1" else "torch"
    if backend == "triton":
        from . import kernels

        return kernels
    if backend == "torch":
        return reference
    raise ValueError(f"backend must be 'triton', 'torch' or None, got {backend!r}")


def _per_row(value: PerRow, batch: int, device: torch.device, name: str, check: bool) -> torch.Tensor:
    """A float or ``[B]`` tensor as a contiguous float32 ``[B]`` tensor on ``device``."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.expand(batch)
        if value.shape != (batch,):
            raise ValueError(f"{name} must be a float or a [batch={batch}] tensor, got shape {tuple(value.shape)}")
        out = value.to(device=device, dtype=torch.float32).contiguous()
        if check and not torch.isfinite(out).all():
            raise ValueError(f"{name} has non-finite entries")
        return out
    value = float(value)
    if not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
        raise ValueError(f"{name} must be finite in float32, got {value}")
    return torch.full((batch,), value, device=device, dtype=torch.float32)


def real_scalar(value) -> float | None:
    """A real number (a Python or numpy scalar, or a one-element tensor) as a float; None otherwise."""
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        return None


def _check_logits(name: str, x: torch.Tensor, batch: int | None = None) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{name} must be a [batch, vocab] tensor, got {getattr(x, 'shape', type(x))}")
    if x.dtype not in LOGIT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has an empty vocabulary (shape {tuple(x.shape)})")
    if batch is not None and x.shape[0] != batch:
        raise ValueError(f"batch mismatch: teacher_logits has {batch} rows, {name} has {x.shape[0]}")


def _prepare(teacher, plus, minus, tau, lam, eps, mode, check, delta=None):
    """Validate inputs; return contiguous logits, float32 ``tau [B]``, ``lam [B]`` and ``eps`` as a
    float (None where it is not used).

    With ``delta`` (exact ``D``) the returned ``plus`` is ``delta`` and ``minus`` is None, the
    kernels' exact-D input.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    _check_logits("teacher_logits", teacher)
    batch, vocab_t = teacher.shape
    if delta is not None and (plus is not None or minus is not None):
        raise ValueError("pass either plus_logits and minus_logits (the perturbed proxy pair, D by finite "
                         "difference) or delta (D itself), not both")
    pair_eps = None
    if mode == "temperature":
        plus = minus = None
    elif delta is not None:
        _check_logits("delta", delta, batch)
        if delta.shape[1] > vocab_t:
            raise ValueError(
                f"vocab mismatch: delta's vocabulary ({delta.shape[1]}) is larger than the teacher's ({vocab_t}); "
                "D is defined on the shared prefix, so the proxy may be at most as wide as the teacher")
        if delta.device != teacher.device:
            raise ValueError(f"logits on different devices: {teacher.device}, delta on {delta.device}")
        plus, minus = delta.contiguous(), None
    else:
        if plus is None or minus is None:
            raise ValueError(f"mode={mode!r} needs plus_logits and minus_logits (the two perturbed proxies) "
                             "or delta (D itself)")
        _check_logits("plus_logits", plus, batch)
        _check_logits("minus_logits", minus, batch)
        if plus.shape != minus.shape:
            raise ValueError(f"plus_logits {tuple(plus.shape)} and minus_logits {tuple(minus.shape)} differ in shape")
        if plus.shape[1] > vocab_t:
            raise ValueError(
                f"vocab mismatch: the proxy vocabulary ({plus.shape[1]}) is larger than the teacher's ({vocab_t}); "
                "D is defined on the shared prefix, so the proxy may be at most as wide as the teacher")
        if plus.device != teacher.device or minus.device != teacher.device:
            raise ValueError(f"logits on different devices: {teacher.device}, {plus.device}, {minus.device}")
        pair_eps = real_scalar(eps)
        if pair_eps is None or not (math.isfinite(pair_eps) and pair_eps > 0):
            raise ValueError(f"eps must be a finite float > 0, got {eps!r}")
        plus, minus = plus.contiguous(), minus.contiguous()
    tau_t = _per_row(tau, batch, teacher.device, "tau", check)
    if not isinstance(tau, torch.Tensor):
        check_tau(float(tau))
    elif check:
        unsupported = (tau_t != 0) & (tau_t < TAU_MIN)
        if bool(unsupported.any()):
            check_tau(float(tau_t[unsupported][0]))
    lam_t = _per_row(0.0 if mode == "temperature" else lam, batch, teacher.device, "lam", check)
    return teacher.contiguous(), plus, minus, tau_t, lam_t, pair_eps


def _resolve_seed(seed: int | None, generator: torch.Generator | None) -> int:
    if seed is None:
        device = generator.device if generator is not None else "cpu"
        seed = int(torch.randint(0, 2**62, (), generator=generator, device=device))
    if not 0 <= int(seed) < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return int(seed)


def _offset_tensor(offset, device, check: bool) -> torch.Tensor:
    if isinstance(offset, torch.Tensor):
        if offset.numel() != 1 or offset.dtype != torch.int64:
            raise ValueError("offset tensor must hold one int64")
        if check and int(offset.reshape(())) < 0:
            raise ValueError(f"offset must be in [0, 2**63), got {int(offset.reshape(()))}")
        return offset.reshape(1).to(device)
    if not 0 <= int(offset) < 2**63:
        raise ValueError(f"offset must be in [0, 2**63), got {offset}")
    return torch.tensor([int(offset)], dtype=torch.int64, device=device)


def _coefficients(ops, lam, eps, mode, seed, offset, batch, vocab_p, exact=False):
    """``coef = sign * lam / (2 eps)`` per row (``sign * lam`` for an exact ``D``: multiplies ``D``
    itself), and the permutation (None unless permutation mode), from ``ops`` (the kernels or
    their twins)."""
    if mode == "temperature":
        return lam, None
    coef = lam if exact else lam / (2.0 * eps)
    if mode == "antidistill":
        return coef, None
    perm, sign = ops.permutation_and_sign(seed, offset, batch, vocab_p, device=offset.device)
    return coef * sign, perm


BAD_INPUT_BITS = {1: "teacher logits contain NaN or +inf", 2: "proxy logits (or delta) contain NaN or +-inf",
                  4: "every token has -inf score"}
"""The kernels' bad-input bits of a row and what each means."""


def _raise_on_bad(bad: torch.Tensor) -> None:
    bad = bad.cpu()
    if not bool(bad.any()):
        return
    rows = lambda bit: torch.nonzero(bad & bit).flatten().tolist()[:8]  # noqa: E731
    problems = [f"{what} (rows {rows(bit)})" for bit, what in BAD_INPUT_BITS.items() if rows(bit)]
    raise ValueError("bad logits: " + "; ".join(problems))


def adjusted_logits(teacher_logits, plus_logits=None, minus_logits=None, *, delta=None, tau: PerRow,
                    lam: PerRow = 0.0, eps: float | None = None, mode: str = "antidistill", seed: int | None = None,
                    offset=0, generator: torch.Generator | None = None, check: bool = True,
                    backend: str | None = None) -> torch.Tensor:
    """The adjusted log-probabilities ``a = log_softmax(t)/tau + lam * D`` as float32 ``[B, V_T]``.

    ``softmax(a)`` is the distribution :func:`sample` draws from; rows with ``tau == 0`` hold
    the greedy objective ``log_softmax(t) + lam * D``. In permutation mode ``D`` is permuted
    with the noise of ``(seed, offset)``, as :func:`sample` with the same seed and offset does.
    ``D`` comes from the pair ``plus_logits``, ``minus_logits`` and ``eps`` (needed then), or is
    ``delta`` itself (exact ``D``, module docstring; no pair, ``eps`` unused).
    """
    t, p, m, tau_t, lam_t, eps = _prepare(teacher_logits, plus_logits, minus_logits, tau, lam, eps, mode, check,
                                          delta)
    seed = _resolve_seed(seed, generator) if mode == "permutation" else 0
    off = _offset_tensor(offset, t.device, check)
    ops = _kernels(t, backend)
    coef, perm = _coefficients(ops, lam_t, eps, mode, seed, off, t.shape[0], p.shape[1] if p is not None else 0,
                               exact=p is not None and m is None)
    out, _, bad = ops.adjusted_logits(t, p, m, perm, tau_t, coef)
    if check:
        _raise_on_bad(bad)
    return out


def _per_row_setting(value, batch: int, device: torch.device, name: str, dtype: torch.dtype) -> torch.Tensor:
    """A top-k / top-p setting (a number, or a ``[B]`` tensor) as a ``[B]`` tensor of ``dtype``."""
    out = torch.as_tensor(value, device=device)
    if out.dim() > 1 or (out.dim() == 1 and out.shape[0] != batch):
        raise ValueError(f"{name} must be a number or a [batch={batch}] tensor, got shape {tuple(out.shape)}")
    if out.is_floating_point() and dtype == torch.int64:
        raise ValueError(f"{name} must hold integers, got {out.dtype}")
    return out.to(dtype).expand(batch)


def top_k_top_p_mask(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to ``-inf`` every logit outside each row's top-k set, then outside its top-p nucleus.

    ``logits`` float32 ``[B, V]``; ``top_k`` int ``[B]`` (0 keeps all); ``top_p`` float ``[B]`` in
    (0, 1]: the nucleus is the shortest prefix of the descending order whose probability under
    ``softmax`` of the top-k-filtered row reaches ``top_p``.
    """
    vocab = logits.shape[1]
    ordered, order = torch.sort(logits, dim=1, descending=True, stable=True)  # ties: the smaller index first
    rank = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k <= 0, vocab, top_k.clamp(max=vocab))
    keep = rank < k[:, None]
    probs = torch.softmax(ordered.masked_fill(~keep, -math.inf), dim=1)
    mass_before = probs.cumsum(1) - probs
    keep &= (mass_before < top_p[:, None]) | (top_p[:, None] >= 1)  # 1 keeps all, past float32 rounding of the sum
    keep_in_place = torch.zeros_like(keep).scatter(1, order, keep)
    return logits.masked_fill(~keep_in_place, -math.inf)


def sample(teacher_logits, plus_logits=None, minus_logits=None, *, delta=None, tau: PerRow, lam: PerRow = 0.0,
           eps: float = 1e-4, top_k=0, top_p=1.0, mode: str = "antidistill",
           generator: torch.Generator | None = None, seed: int | None = None, offset=0,
           return_logprobs: bool = False, proxy_vocab_only: bool = False, check: bool = True,
           bad_out: torch.Tensor | None = None, backend: str | None = None):
    """Draw one token per row from ``softmax(log_softmax(t)/tau + lam * D)`` (module docstring).

    Args:
        teacher_logits: ``[B, V_T]`` float32/bfloat16/float16.
        plus_logits, minus_logits: ``[B, V_P]`` logits of ``theta_P +- eps g`` (``V_P <= V_T``);
            unused in temperature mode; None when ``delta`` is given.
        delta: ``[B, V_P]`` exact ``D`` (already normalised, module docstring), instead of the pair.
        tau, lam: floats or ``[B]`` tensors; ``tau == 0`` is greedy.
        eps: the finite-difference step the proxy pair was built with (unused with ``delta``).
        top_k, top_p: int / float or ``[B]`` tensors, applied to the adjusted distribution
            (0 and 1.0 disable them; any other value costs an extra pass and a sort).
        generator, seed, offset: randomness (module docstring).
        return_logprobs: also return the teacher's unadjusted ``log_softmax(t)[x]`` of each token.
        proxy_vocab_only: draw only ids below ``V_P``, the proxies' vocabulary (what a generator
            that feeds the drawn token back to the proxies needs: the teacher's ids past ``V_P``
            are padding rows of its head in the Qwen2.5 family). The distribution is the one
            above restricted to ``[0, V_P)`` and renormalised; the log-probabilities stay those of
            the teacher's whole vocabulary. Ignored without proxies (temperature mode).
        check: validate inputs and raise on NaN/inf logits (one device sync on a ``[B]`` flag).
        bad_out: an int32 ``[B]`` tensor on the logits' device that receives each row's bad-input
            bits (:data:`BAD_INPUT_BITS`), with no sync: how a caller under ``check=False`` (a
            captured decode step) still learns of NaN logits.

    Returns:
        tokens int64 ``[B]``, and float32 ``[B]`` log-probabilities with ``return_logprobs``.
    """
    t, p, m, tau_t, lam_t, eps = _prepare(teacher_logits, plus_logits, minus_logits, tau, lam, eps, mode, check,
                                          delta)
    batch, vocab_t = t.shape
    seed = _resolve_seed(seed, generator)
    off = _offset_tensor(offset, t.device, check)
    ops = _kernels(t, backend)
    coef, perm = _coefficients(ops, lam_t, eps, mode, seed, off, batch, p.shape[1] if p is not None else 0,
                               exact=p is not None and m is None)
    proxy_vocab_only = proxy_vocab_only and p is not None
    if not isinstance(top_k, torch.Tensor) and not isinstance(top_p, torch.Tensor) and top_k == 0 and top_p == 1.0:
        tokens, logprobs, bad = ops.fused_sample(t, p, m, perm, tau_t, coef, seed, off,
                                                 proxy_vocab_only=proxy_vocab_only)
    else:
        top_k_t = _per_row_setting(top_k, batch, t.device, "top_k", torch.int64)
        top_p_t = _per_row_setting(top_p, batch, t.device, "top_p", torch.float32)
        if check and bool((~((top_p_t > 0) & (top_p_t <= 1))).any() | (top_k_t < 0).any()):
            raise ValueError(f"top_p must be in (0, 1] and top_k >= 0, got top_p={top_p}, top_k={top_k}")
        adjusted, lse_t, bad = ops.adjusted_logits(t, p, m, perm, tau_t, coef)
        if proxy_vocab_only:
            adjusted[:, p.shape[1]:].fill_(-math.inf)
        filtered = top_k_top_p_mask(adjusted, top_k_t, top_p_t)
        greedy_only = torch.where(tau_t == 0, 0.0, 1.0)
        tokens, _, filtered_bad = ops.fused_sample(filtered, None, None, None, greedy_only, torch.zeros_like(coef),
                                                   seed, off)
        bad = bad | filtered_bad  # 4: nothing left after the filters (every token was already -inf)
        logprobs = t.gather(1, tokens[:, None])[:, 0].float() - lse_t
    if bad_out is not None:
        bad_out.copy_(bad)
    if check:
        _raise_on_bad(bad)
    return (tokens, logprobs) if return_logprobs else tokens
