"""The two perturbed proxies ``theta_P +- eps g`` whose log-probabilities give antidistillation's ``D``.

For a proxy with weights ``theta`` and the proxy gradient ``g`` (:mod:`adfast.gradient`),

    D(x) = (log p(x; theta + eps g) - log p(x; theta - eps g)) / (2 eps)
         = <grad_theta log p(x; theta), g> + O(eps^2),

the central finite difference of the directional derivative of the proxy's log-probabilities
along ``g``. Each perturbed weight is computed in float32, ``w.float() +- eps * g.float()``, and
cast back to the weight's dtype. In low precision a perturbation smaller than half a rounding
step of its weight rounds away (``plus == minus`` there): ``vanished_fraction`` is the fraction of
weight elements with ``g != 0`` where that happened; if it is 1, ``D`` is identically zero.
"""
from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .gradient import ProxyGradient, load_gradient
from .provenance import check_provenance, model_identity
from .sampling import real_scalar


def _listing(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _resolve(gradient_or_path) -> tuple[dict[str, torch.Tensor], str | None, str | None]:
    """``(grads, stored model_id, stored weights signature)`` from a ProxyGradient, a path or a
    name -> tensor mapping (which stores neither: ``None, None``)."""
    if isinstance(gradient_or_path, (str, os.PathLike)):
        gradient_or_path = load_gradient(gradient_or_path)
    if isinstance(gradient_or_path, ProxyGradient):
        return gradient_or_path.grads, gradient_or_path.model_id, gradient_or_path.weights_signature
    if isinstance(gradient_or_path, Mapping):
        not_tensors = [str(name) for name, g in gradient_or_path.items() if not isinstance(g, torch.Tensor)]
        if not_tensors:
            raise ValueError(f"gradient entries must be tensors; not tensors: {_listing(not_tensors)}")
        return dict(gradient_or_path), None, None
    raise TypeError("gradient_or_path must be a ProxyGradient, a mapping name -> tensor or a path to a "
                    f"safetensors file from save_gradient, got {type(gradient_or_path).__name__}")


def _check_gradient(params: dict[str, nn.Parameter], grads: dict[str, torch.Tensor]) -> None:
    """Refuse a gradient whose names or shapes differ from the proxy's, or that is non-finite or zero."""
    missing = [name for name in params if name not in grads]
    unexpected = [name for name in grads if name not in params]
    shapes = [f"{name} (gradient {tuple(g.shape)}, proxy {tuple(params[name].shape)})"
              for name, g in grads.items() if name in params and g.shape != params[name].shape]
    problems = [f"{label} ({len(items)}): {_listing(items)}"
                for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
                if items]
    if problems:
        raise ValueError("gradient does not match the proxy's parameters: " + "; ".join(problems))
    non_finite = [name for name, g in grads.items() if not bool(torch.isfinite(g).all())]
    if non_finite:
        raise ValueError(f"gradient has NaN or inf entries in: {_listing(non_finite)}")
    if not any(bool(g.any()) for g in grads.values()):
        raise ValueError("gradient is zero everywhere: both proxies would equal the original and D would be 0")


def _frozen_copy(proxy: nn.Module) -> nn.Module:
    twin = copy.deepcopy(proxy).eval().requires_grad_(False)
    for p in twin.parameters():
        p.grad = None
    return twin


@dataclass
class ProxyPair:
    """``plus`` / ``minus``: eval-mode, frozen copies of the proxy at ``theta +- eps g``."""

    plus: nn.Module
    minus: nn.Module
    eps: float
    vanished_fraction: float
    model_id: str

    @classmethod
    def from_gradient(cls, proxy: nn.Module, gradient_or_path, eps: float, *,
                      warn_above: float = 0.5) -> "ProxyPair":
        """Build the pair from ``proxy`` and its gradient (a ProxyGradient, a mapping or a file path).

        Raises ``ValueError`` for ``eps`` not finite and > 0, a gradient computed for another
        architecture or other weights (:func:`adfast.provenance.check_provenance`; a bare mapping
        records neither, so it skips that check), names or shapes that differ from the
        proxy's parameters, a zero or non-finite gradient, an ``eps`` so small that every
        perturbation rounds away, and one so large that a perturbed weight overflows. Warns when
        ``vanished_fraction > warn_above``.
        """
        value = real_scalar(eps)
        if value is None or not math.isfinite(value) or value <= 0:
            raise ValueError(f"eps must be a finite float > 0, got {eps!r}")
        eps = value
        if not 0.0 <= warn_above <= 1.0:
            raise ValueError(f"warn_above must be in [0, 1], got {warn_above}")
        grads, stored_id, signature = _resolve(gradient_or_path)
        check_provenance(proxy, stored_id, signature)
        params = dict(proxy.named_parameters())
        _check_gradient(params, grads)

        plus, minus = _frozen_copy(proxy), _frozen_copy(proxy)
        plus_params, minus_params = dict(plus.named_parameters()), dict(minus.named_parameters())
        perturbed = vanished = 0
        overflowed = []
        with torch.no_grad():
            for name, w in params.items():
                g = grads[name].to(w.device, torch.float32)
                up, down = plus_params[name], minus_params[name]
                up.copy_(w.float() + eps * g)  # copy_ casts to the weight's dtype
                down.copy_(w.float() - eps * g)
                if not (bool(torch.isfinite(up).all()) and bool(torch.isfinite(down).all())):
                    overflowed.append(name)
                moved = g != 0
                perturbed += int(moved.sum())
                vanished += int((up == down)[moved].sum())
        fraction = vanished / perturbed
        dtypes = ", ".join(sorted({str(w.dtype) for w in params.values()}))
        if overflowed:
            raise ValueError(f"eps={eps:g} is too large for the proxy's dtype ({dtypes}): theta +- eps g overflows "
                             f"to inf in {_listing(overflowed)}; use a smaller eps")
        if vanished == perturbed:
            raise ValueError(f"eps={eps:g} is too small for the proxy's dtype ({dtypes}): every perturbed weight "
                             "rounds back to its original value, so plus == minus and D would be identically "
                             "zero; use a larger eps (or a higher-precision proxy)")
        if fraction > warn_above:
            warnings.warn(f"eps={eps:g}: the perturbation rounded away in {fraction:.1%} of the perturbed weights "
                          f"({dtypes}); D only sees the rest. Consider a larger eps.", stacklevel=2)
        return cls(plus=plus, minus=minus, eps=float(eps), vanished_fraction=fraction,
                   model_id=model_identity(proxy))
