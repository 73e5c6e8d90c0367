"""Which proxy a stored gradient belongs to: its architecture and its weights.

A gradient ``g`` is only meaningful at the weights ``theta`` it was computed at, so a gradient file
records two things about its proxy, and :func:`check_provenance` compares both with the proxy
it is applied to:

- :func:`model_identity`, ``"<name>@<fingerprint>"``: the fingerprint hashes the architecture
  (model type, sizes, every parameter name and shape). A mismatch means another model.
- :func:`weights_signature`: ``SAMPLES_PER_TENSOR`` weights of every parameter at fixed positions,
  exactly (float32 holds every bf16/fp16 value). A mismatch means another checkpoint of the same
  architecture (a base model against its instruct fine-tune, a different seed).

When the proxy's parameter dtypes are those the gradient was computed with, every sampled weight
must be bit-equal. Across dtypes (a gradient computed in float32, a pair run in bfloat16) a weight
is rounded once more, so a sample may move by up to one bf16 rounding step: there the samples
must agree to ``rtol = 2**-7`` (``atol = 2**-24`` for fp16's subnormals). A checkpoint that differs
from the gradient's by less than that (fine-tuning often moves a weight by less than a bf16 step)
is then not told apart: keep the dtype, or keep the file with its proxy.
"""
from __future__ import annotations

import base64
import hashlib
import json

import numpy as np
import torch
from torch import nn

SAMPLES_PER_TENSOR = 8
_STRIDE = 2654435761  # a prime: i * _STRIDE mod numel are distinct positions for i < numel (numel < _STRIDE)
_CROSS_DTYPE_RTOL, _CROSS_DTYPE_ATOL = 2.0 ** -7, 2.0 ** -24


def model_fingerprint(model: nn.Module) -> str:
    """``"<model_type>-v<vocab>-h<hidden>-l<layers>-<hash>"``: a short identity of the architecture.

    The hash (12 hex digits of sha256) covers model type, vocabulary and hidden sizes, layer and
    head counts, and every parameter name and shape; weights, dtype and device are not part of it
    (:func:`weights_signature` covers the weights).
    """
    cfg = model.config.get_text_config()
    fields = {key: getattr(cfg, key, None) for key in (
        "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")}
    fields["parameters"] = [[name, list(p.shape)] for name, p in model.named_parameters()]
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
    sizes = f"v{fields['vocab_size']}-h{fields['hidden_size']}-l{fields['num_hidden_layers']}"
    return f"{fields['model_type']}-{sizes}-{digest}"


def model_identity(model: nn.Module) -> str:
    """``"<config._name_or_path>@<model_fingerprint>"`` (the name is ``<unnamed>`` when empty)."""
    return f"{getattr(model.config, '_name_or_path', '') or '<unnamed>'}@{model_fingerprint(model)}"


def fingerprint_of(model_id: str) -> str:
    """The fingerprint part of a :func:`model_identity` string."""
    return model_id.rpartition("@")[2]


def _dtypes(model: nn.Module) -> str:
    return "+".join(sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()}))


def _samples(model: nn.Module) -> tuple[list[str], torch.Tensor]:
    """``(names, float32 [P, SAMPLES_PER_TENSOR])``: weights at positions ``i * _STRIDE mod numel``."""
    names, rows = [], []
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            index = (torch.arange(SAMPLES_PER_TENSOR, dtype=torch.int64) * _STRIDE) % max(flat.numel(), 1)
            rows.append(flat[index.to(flat.device)].float().cpu() if flat.numel()
                        else torch.zeros(SAMPLES_PER_TENSOR))
            names.append(name)
    return names, torch.stack(rows) if rows else torch.zeros(0, SAMPLES_PER_TENSOR)


def weights_signature(model: nn.Module) -> str:
    """``"<dtypes>:<base64>"``: the parameter dtypes (sorted, ``+``-joined) and the float32 bytes
    (little-endian) of :data:`SAMPLES_PER_TENSOR` weights of each parameter in
    ``named_parameters()`` order, at flat positions ``i * 2654435761 mod numel``."""
    _, samples = _samples(model)
    return f"{_dtypes(model)}:{base64.b64encode(samples.numpy().astype('<f4').tobytes()).decode()}"


def parse_signature(signature: str) -> tuple[str, torch.Tensor]:
    """``(dtypes, float32 [P, SAMPLES_PER_TENSOR])`` of a :func:`weights_signature` string;
    ``ValueError`` when it is not one."""
    dtypes, sep, payload = str(signature).rpartition(":")
    try:
        raw = base64.b64decode(payload.encode(), validate=True)
    except ValueError:
        raw = None
    if not sep or not dtypes or raw is None or len(raw) % (4 * SAMPLES_PER_TENSOR):
        raise ValueError(f"malformed weights signature (expected '<dtypes>:<base64 of float32 rows of "
                         f"{SAMPLES_PER_TENSOR}>', got {str(signature)[:40]!r}...)")
    values = np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(-1, SAMPLES_PER_TENSOR)
    return dtypes, torch.from_numpy(values)


def check_provenance(proxy: nn.Module, model_id: str | None, signature: str | None) -> None:
    """Raise ``ValueError`` when a gradient stored for ``model_id`` (with ``signature``) is not
    ``proxy``'s: another architecture, or other weights (module docstring for the rule).
    ``None`` skips that part of the check (a bare name -> tensor mapping records neither)."""
    proxy_id = model_identity(proxy)
    if model_id is not None and fingerprint_of(model_id) != fingerprint_of(proxy_id):
        raise ValueError(f"the gradient was computed for another model: it belongs to {model_id!r}, "
                         f"the proxy is {proxy_id!r}")
    if signature is None:
        return
    names, current = _samples(proxy)
    stored_dtypes, stored = parse_signature(signature)
    if stored.shape[0] != len(names):
        raise ValueError(f"the gradient's weights signature covers {stored.shape[0]} parameters, the proxy has "
                         f"{len(names)}: it was computed for another model")
    same_dtypes = stored_dtypes == _dtypes(proxy)
    if same_dtypes:
        agree = stored.view(torch.int32) == current.view(torch.int32)
    else:
        agree = torch.isclose(current, stored, rtol=_CROSS_DTYPE_RTOL, atol=_CROSS_DTYPE_ATOL, equal_nan=True)
    if bool(agree.all()):
        return
    row, col = (int(i) for i in (~agree).nonzero()[0])
    rule = ("bit-equal (same dtypes)" if same_dtypes
            else f"equal to one bf16 rounding step ({stored_dtypes} when computed, {_dtypes(proxy)} now)")
    raise ValueError(
        f"the gradient was computed for other weights of this architecture ({model_id or 'unnamed'}): "
        f"{int((~agree).sum())} of {agree.numel()} sampled weights differ beyond {rule}, e.g. {names[row]} "
        f"sample {col}: {float(stored[row, col])!r} when the gradient was computed, {float(current[row, col])!r} "
        "in this proxy. Compute the gradient with this proxy (adfast grad), or pass the gradient's tensors "
        "as a name -> tensor mapping to skip this check")
