"""The exact directional derivative ``D`` of a proxy's log-probabilities along ``g``, and its finite difference.

For a proxy with weights ``theta``, a direction ``g`` (the proxy gradient, :mod:`adfast.gradient`)
and token sequences ``x [B, T]``,

    D[b, t, v] = d/dh log_softmax(logits(theta + h g))[b, t, v] at h = 0
               = <grad_theta log p_theta(v | x_b[:t + 1]), g>,

the term antidistillation sampling adds to the teacher's log-probabilities (paper eq. 8). The
sampler approximates it by the central finite difference of the proxy pair
(:mod:`adfast.proxy_pair`, eq. 11 and appendix C.1),

    D_eps = (log_softmax(logits(theta + eps g)) - log_softmax(logits(theta - eps g))) / (2 eps)
          = D + (eps^2 / 6) d^3/dh^3 log_softmax + round-off,

whose truncation error grows like ``eps^2`` and whose round-off (weights that do not move by a
rounding step, logits rounded to the compute dtype) grows like ``u / eps`` for unit round-off ``u``.

* :func:`exact_delta` computes ``D`` by forward-mode AD: one Jacobian-vector product through the
  proxy, every weight a dual number ``theta + h g`` (``torch.autograd.forward_ad`` with
  ``torch.func.functional_call``), no ``eps`` at all.
* :func:`finite_difference_delta` computes ``D_eps`` the way the sampler does: both perturbed
  copies built as :class:`adfast.proxy_pair.ProxyPair` builds them, then run in ``dtype``.
* :func:`angle_sine` and :func:`relative_error` compare the two over the vocabulary.

Model path. Both functions run the proxy's weights through adfast's own
:class:`adfast.decoder.Decoder` (``Decoder.from_hf``), not through transformers: a transformers
Llama / Qwen2 cast to float64 still takes its RMSNorm statistics and rotary tables in float32,
whereas a float64 Decoder is float64 end to end, and in float32 / bfloat16 / float16 the Decoder
rounds as transformers does. So ``proxy`` must be a transformers Llama or Qwen2 causal LM; its
own attention implementation does not matter. Attention runs on PyTorch's math SDPA backend
during the JVP (the CPU flash kernel has no forward AD).

Why dual tensors and not ``torch.func.jvp``: the Decoder writes its KV cache in place (keys,
values and slot lengths), and ``torch.func.jvp`` refuses in-place writes into tensors created
outside the transformed function; ``forward_ad`` dual tensors carry the tangent through those
writes. Both compute the same JVP.

Inputs are right-padded: ``input_ids`` int64 ``[B, T]`` and an optional ``attention_mask [B, T]``
of ones followed by zeros (at least one real token per row). Outputs are ``[B, T, V]``; position
``t`` holds ``D`` for the token after ``x_b[:t + 1]``, and padding positions hold 0.
"""
from __future__ import annotations

import math
import os

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from .decoder import Decoder, DecoderConfig
from .low_rank import LowRankGradient, is_low_rank_file, load_low_rank_gradient
from .provenance import check_provenance
from .proxy_pair import _check_gradient, _listing, _resolve

FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def resolve_gradient(proxy: nn.Module, g) -> dict[str, torch.Tensor]:
    """``g`` (a ProxyGradient, a mapping name -> tensor or a gradient file) as a checked dict.

    Raises ``ValueError`` as :meth:`ProxyPair.from_gradient` does: a gradient stored for another
    architecture or other weights, names or shapes that differ from ``proxy.named_parameters()``,
    non-finite or all-zero entries.
    """
    grads, stored_id, signature = _resolve(g)
    check_provenance(proxy, stored_id, signature)
    _check_gradient(dict(proxy.named_parameters()), grads)
    return grads


def resolve_direction(proxy: nn.Module, g) -> dict[str, torch.Tensor] | LowRankGradient:
    """The direction of a tangent-mode proxy (``Engine(delta="jvp")``), checked against ``proxy``.

    A :class:`LowRankGradient`, or a file from :func:`adfast.low_rank.save_low_rank_gradient`, stays
    factored (``G_r = U V^T`` is never formed): refused as :func:`resolve_gradient` refuses (another
    architecture or other weights, names or shapes of ``G_r`` that differ from
    ``proxy.named_parameters()``, non-finite factors or dense entries, all zero, where a factored
    entry counts as zero when ``U`` or ``V`` is). Anything else is :func:`resolve_gradient`'s dense dict.
    """
    if isinstance(g, (str, os.PathLike)) and is_low_rank_file(g):
        g = load_low_rank_gradient(g)
    if not isinstance(g, LowRankGradient):
        return resolve_gradient(proxy, g)
    check_provenance(proxy, g.model_id, g.weights_signature)
    params, shapes = {name: tuple(p.shape) for name, p in proxy.named_parameters()}, g.shapes()
    differ = sorted(name for name in params.keys() | shapes.keys() if params.get(name) != shapes.get(name))
    if differ:
        raise ValueError(f"gradient does not match the proxy's parameters: names or shapes differ ({len(differ)}): "
                         f"{_listing(differ)}")
    tensors = [*g.dense.values(), *(t for pair in g.factors.values() for t in pair)]
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise ValueError("gradient has NaN or inf entries")
    if not (any(bool(t.any()) for t in g.dense.values())
            or any(bool(u.any()) and bool(v.any()) for u, v in g.factors.values())):
        raise ValueError("gradient is zero everywhere: D would be 0")
    return g


def sequence_lengths(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """int64 ``[B]`` real-token counts of right-padded ``input_ids [B, T]`` (all ``T`` without a mask)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.int64:
        raise ValueError("input_ids must be an int64 [batch, seq] tensor")
    batch, seq = input_ids.shape
    if batch == 0 or seq == 0:
        raise ValueError(f"input_ids is empty: shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        return torch.full((batch,), seq, dtype=torch.int64, device=input_ids.device)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}")
    mask = attention_mask.to(input_ids.device).long()
    lengths = mask.sum(1)
    right_padded = torch.arange(seq, device=mask.device)[None] < lengths[:, None]
    if bool(((mask != 0) & (mask != 1)).any()) or not torch.equal(mask.bool(), right_padded):
        raise ValueError("attention_mask must be right padding: ones, then zeros, in every row")
    if bool((lengths == 0).any()):
        raise ValueError("every row needs at least one real token (attention_mask has an all-zero row)")
    return lengths


def _run(decoder: Decoder, input_ids: torch.Tensor, lengths: torch.Tensor, weights=None) -> torch.Tensor:
    """All-position logits ``[C, B, T, V]`` of a freshly cached ``decoder`` (``weights`` replace its parameters)."""
    batch, seq = input_ids.shape
    decoder.setup_cache(batch, seq)
    slots = torch.arange(batch, device=input_ids.device)
    args, kwargs = (input_ids, slots, lengths), {"last_only": False}
    if weights is None:
        return decoder(*args, **kwargs)
    return functional_call(decoder, weights, args, kwargs)


def _zero_padding(delta: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    real = torch.arange(delta.shape[1], device=delta.device)[None] < lengths[:, None]
    return delta.masked_fill(~real[..., None], 0)


def exact_delta(proxy: nn.Module, g, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``D [B, T, V]`` exactly (module docstring): one forward-mode JVP of ``log_softmax(logits)`` along ``g``.

    Args:
        proxy: a transformers Llama or Qwen2 causal LM (weights of any dtype; they are cast to ``dtype``).
        g: the direction: a ProxyGradient, a mapping ``named_parameters()`` name -> tensor, or a
            gradient file from :func:`adfast.gradient.save_gradient`.
        input_ids: int64 ``[B, T]``, right padded.
        attention_mask: optional ``[B, T]`` ones then zeros.
        dtype: ``torch.float64`` (true float64 end to end: the reference) or ``torch.float32``.

    Returns:
        ``D`` in ``dtype`` on the proxy's device; padding positions are 0.
    """
    if dtype not in (torch.float64, torch.float32):
        raise ValueError(f"exact_delta computes in float64 or float32, got {dtype}")
    grads = resolve_gradient(proxy, g)
    lengths = sequence_lengths(input_ids, attention_mask)
    device = next(proxy.parameters()).device
    config = DecoderConfig.from_hf(proxy.config)
    decoder = Decoder.from_hf([proxy], dtype=dtype, device=device)
    tangent = dict(Decoder.from_state_dicts(config, [grads], dtype=dtype, device=device).named_parameters())
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), fwAD.dual_level():
        weights = {name: fwAD.make_dual(w, tangent[name]) for name, w in decoder.named_parameters()}
        logits = _run(decoder, input_ids.to(device), lengths.to(device), weights)[0]
        delta = fwAD.unpack_dual(torch.log_softmax(logits, dim=-1)).tangent
    return _zero_padding(delta, lengths.to(device))


class FiniteDifference:
    """The proxy pair ``theta +- eps g`` in ``dtype``, as one two-copy :class:`Decoder` (copy 0 plus, 1 minus).

    The pair is made as :meth:`ProxyPair.from_gradient` makes one from a proxy stored in ``dtype``:
    each weight is cast to ``dtype``, perturbed in float32 (float64 for float64),
    ``w +- eps g``, and cast back to ``dtype``. ``theta`` (already rounded to ``dtype``) and ``g``
    are kept in that working precision, so :meth:`set_eps` re-perturbs in place for each ``eps``
    of a sweep (about 4x the proxy's float32 size in memory). Unlike ``ProxyPair`` it never refuses
    a small ``eps``: it is for studying exactly that.

    Attributes: ``decoder``; ``eps`` (None until :meth:`set_eps`); ``vanished_fraction``, the
    fraction of weight elements with ``g != 0`` whose perturbation rounded away
    (``plus == minus``): at 1, ``D_eps`` is identically 0.
    """

    def __init__(self, proxy: nn.Module, g, *, dtype: torch.dtype):
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype}")
        grads = resolve_gradient(proxy, g)
        config, device = DecoderConfig.from_hf(proxy.config), next(proxy.parameters()).device
        work = torch.float64 if dtype == torch.float64 else torch.float32
        rounded = {name: w.detach().to(dtype) for name, w in proxy.named_parameters()}
        self._theta = Decoder.from_state_dicts(config, [rounded], dtype=work, device=device)
        self._direction = Decoder.from_state_dicts(config, [grads], dtype=work, device=device)
        self.decoder = Decoder(config, 2, dtype=dtype, device=device)
        self.eps: float | None = None
        self.vanished_fraction = math.nan

    def set_eps(self, eps: float) -> float:
        """Set the pair's weights to ``theta +- eps g``; returns ``vanished_fraction``."""
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"eps must be a finite float > 0, got {eps!r}")
        perturbed = vanished = 0
        with torch.no_grad():
            for pair, theta, direction in zip(self.decoder.parameters(), self._theta.parameters(),
                                              self._direction.parameters()):
                pair[0].copy_(theta[0] + eps * direction[0])  # copy_ rounds to the pair's dtype
                pair[1].copy_(theta[0] - eps * direction[0])
                moved = direction[0] != 0
                perturbed += int(moved.sum())
                vanished += int((moved & (pair[0] == pair[1])).sum())
        self.eps, self.vanished_fraction = float(eps), vanished / max(perturbed, 1)
        return self.vanished_fraction

    def delta(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``D_eps [B, T, V]``: float32 (float64 for a float64 pair), log-softmax taken in that dtype."""
        if self.eps is None:
            raise ValueError("call set_eps(eps) before delta")
        lengths = sequence_lengths(input_ids, attention_mask)
        device = self.decoder.embed.device
        with torch.no_grad():
            plus, minus = torch.log_softmax(_run(self.decoder, input_ids.to(device), lengths.to(device)), dim=-1)
        return _zero_padding((plus - minus) / (2 * self.eps), lengths.to(device))


def finite_difference_delta(proxy: nn.Module, g, input_ids: torch.Tensor, eps: float, *, dtype: torch.dtype,
                            attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``D_eps [B, T, V]``, the central finite difference the sampler uses (:class:`FiniteDifference`)."""
    pair = FiniteDifference(proxy, g, dtype=dtype)
    pair.set_eps(eps)
    return pair.delta(input_ids, attention_mask)


def angle_sine(a: torch.Tensor, b: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``sin`` of the angle between ``a`` and ``b`` along ``dim`` (the vocabulary), in float64.

    The angle is ``2 atan2(|a^ - b^|, |a^ + b^|)`` with ``a^ = a / |a|`` (Kahan's formula, accurate
    for tiny angles, where ``sqrt(1 - cos^2)`` loses every digit). A zero vector has no direction:
    its sine with anything is 1. The paper's appendix C.1 measures the finite difference this way.
    """
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.double(), b.double()
    norm_a, norm_b = a.norm(dim=dim, keepdim=True), b.norm(dim=dim, keepdim=True)
    unit_a, unit_b = a / norm_a.clamp_min(1e-300), b / norm_b.clamp_min(1e-300)
    angle = 2 * torch.atan2((unit_a - unit_b).norm(dim=dim), (unit_a + unit_b).norm(dim=dim))
    zero = (norm_a == 0).squeeze(dim) | (norm_b == 0).squeeze(dim)
    return torch.where(zero, torch.ones_like(angle), angle.sin())


def relative_error(approx: torch.Tensor, exact: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``|approx - exact| / |exact|`` along ``dim``, in float64 (0 where both are 0, inf where only ``exact`` is)."""
    if approx.shape != exact.shape:
        raise ValueError(f"shapes differ: {tuple(approx.shape)} and {tuple(exact.shape)}")
    error = (approx.double() - exact.double()).norm(dim=dim)
    scale = exact.double().norm(dim=dim)
    return torch.where(error == 0, torch.zeros_like(error), error / scale)


__all__ = ["FiniteDifference", "angle_sine", "exact_delta", "finite_difference_delta", "relative_error",
           "resolve_direction", "resolve_gradient", "sequence_lengths"]
