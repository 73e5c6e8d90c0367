"""The proxy gradient ``g``: the gradient of the proxy's downstream loss, computed once and stored.

For held-out teacher traces ``x_i = prompt_i + completion_i`` (``s_i = len(prompt_i) >= 1``,
``n_i = len(completion_i) >= 1``) the downstream loss is the token-weighted mean NLL over
completion tokens only:

    L(theta) = (1 / N) * sum_i sum_{t = s_i}^{s_i + n_i - 1} -log p_theta(x_i[t] | x_i[:t]),
    N = sum_i n_i,

so every completion token of the dataset counts equally (an example weighs in proportion to its
completion length); prompt tokens condition the completion but are never scored. ``g = dL/dtheta``.

The examples run in right-padded batches (pad positions masked in the attention mask and in the
loss). Batch ``k`` backpropagates ``(sum of its token NLLs) / N``, so the per-batch gradients,
accumulated in float32 whatever the model's dtype, sum exactly to ``g``.

Gradients are stored as safetensors with string metadata (:func:`save_gradient`); never pickle.
"""
from __future__ import annotations

import math
import numbers
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from .ids import token_ids
from .provenance import model_identity, parse_signature, weights_signature

FORMAT = "adfast.proxy_gradient"
FORMAT_VERSION = "1"


@dataclass
class ProxyGradient:
    """``g`` for one proxy.

    ``grads``: parameter name -> float32 CPU tensor ``dL/dtheta`` of the parameter's shape, keyed
    as ``named_parameters()`` names them (tied weights once); ``loss``: the dataset mean NLL ``L``
    at the proxy's weights; ``num_examples``; ``num_tokens``: ``N``, the completion tokens scored;
    ``model_id``: :func:`adfast.provenance.model_identity` of the proxy; ``weights_signature``:
    :func:`adfast.provenance.weights_signature` of its weights (``None`` skips that check).
    """

    grads: dict[str, torch.Tensor]
    loss: float
    num_examples: int
    num_tokens: int
    model_id: str
    weights_signature: str | None = None


def _check_examples(examples, vocab: int) -> list[tuple[list[int], list[int]]]:
    """``examples`` as a list of ``(prompt, completion)`` int lists, validated."""
    checked = []
    for i, example in enumerate(examples):
        if not isinstance(example, (tuple, list)) or len(example) != 2:
            raise ValueError(f"example {i} must be a (prompt_ids, completion_ids) pair")
        prompt, completion = (token_ids(part, f"example {i}") for part in example)
        if not prompt:
            raise ValueError(f"example {i} has an empty prompt: the first completion token needs a context "
                             "(start the prompt with BOS)")
        if not completion:
            raise ValueError(f"example {i} has an empty completion: there is no token to score")
        bad = [t for t in prompt + completion if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"example {i} has token ids outside the proxy's vocabulary [0, {vocab}): {bad[:8]}")
        checked.append((prompt, completion))
    if not checked:
        raise ValueError("examples is empty: need at least one (prompt_ids, completion_ids) pair")
    return checked


def _batch(examples: list[tuple[list[int], list[int]]], pad: int, device):
    """Right-padded ``input_ids, attention_mask [B, T]`` and ``scored [B, T - 1]``.

    ``scored[b, t]`` is True where the logits at position ``t`` predict a completion token
    ``input_ids[b, t + 1]``.
    """
    width = max(len(p) + len(c) for p, c in examples)
    input_ids = torch.full((len(examples), width), pad, dtype=torch.long)
    attention_mask = torch.zeros(len(examples), width, dtype=torch.long)
    scored = torch.zeros(len(examples), width - 1, dtype=torch.bool)
    for b, (prompt, completion) in enumerate(examples):
        length = len(prompt) + len(completion)
        input_ids[b, :length] = torch.tensor(prompt + completion)
        attention_mask[b, :length] = 1
        scored[b, len(prompt) - 1:length - 1] = True
    return input_ids.to(device), attention_mask.to(device), scored.to(device)


def proxy_gradient(proxy: nn.Module, examples: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                   batch_size: int = 8, pad_token_id: int | None = None, progress: bool = True) -> ProxyGradient:
    """``g = dL/dtheta`` of the token-weighted completion NLL ``L`` (module docstring) of a causal LM.

    Args:
        proxy: a Hugging Face causal LM; only parameters with ``requires_grad`` are differentiated.
        examples: ``(prompt_ids, completion_ids)`` pairs of int lists; the trace is their concatenation.
        batch_size: examples per forward/backward pass (the result does not depend on it beyond rounding).
        pad_token_id: the id right padding uses (masked, so any valid id); default the config's, else 0.
        progress: show a tqdm bar over batches.

    The model runs in eval mode (dropout off); its parameters, their ``.grad`` and every module's
    train/eval mode are left as they were.
    """
    vocab = proxy.get_input_embeddings().num_embeddings
    examples = _check_examples(examples, vocab)
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    pad = getattr(proxy.config, "pad_token_id", None) if pad_token_id is None else pad_token_id
    pad = 0 if pad is None else int(pad)
    if not 0 <= pad < vocab:
        raise ValueError(f"pad_token_id {pad} is outside the proxy's vocabulary [0, {vocab})")
    params = {name: p for name, p in proxy.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("the proxy has no parameter with requires_grad=True: nothing to differentiate")
    device = next(iter(params.values())).device

    total = sum(len(c) for _, c in examples)
    order = sorted(examples, key=lambda ex: len(ex[0]) + len(ex[1]), reverse=True)  # less padding
    grads = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in params.items()}
    saved_grads = {name: p.grad for name, p in params.items()}
    saved_modes = [(module, module.training) for module in proxy.modules()]
    nll_total = 0.0
    proxy.eval()
    try:
        with torch.enable_grad():
            for start in tqdm(range(0, len(order), batch_size), desc="proxy gradient", disable=not progress):
                input_ids, attention_mask, scored = _batch(order[start:start + batch_size], pad, device)
                for p in params.values():
                    p.grad = None
                logits = proxy(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
                nll = F.cross_entropy(logits[:, :-1][scored].float(), input_ids[:, 1:][scored], reduction="sum")
                (nll / total).backward()
                nll_total += nll.item()
                for name, p in params.items():
                    if p.grad is not None:
                        grads[name] += p.grad
    finally:
        for name, p in params.items():
            p.grad = saved_grads[name]
        for module, training in saved_modes:
            module.training = training
    gradient = ProxyGradient(grads={name: g.cpu() for name, g in grads.items()}, loss=nll_total / total,
                             num_examples=len(examples), num_tokens=total, model_id=model_identity(proxy),
                             weights_signature=weights_signature(proxy))
    _check_finite(gradient, "the proxy's")
    return gradient


def _check_finite(gradient: ProxyGradient, whose: str) -> None:
    """Raise ``ValueError`` when the loss or a gradient tensor holds NaN or inf (naming them)."""
    bad = [name for name, g in gradient.grads.items() if not bool(torch.isfinite(g).all())]
    if bad or not math.isfinite(gradient.loss):
        raise ValueError(f"{whose} loss is {gradient.loss} and {len(bad)} gradient tensors hold NaN or inf "
                         f"({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''}): a NaN or inf weight or "
                         "logit upstream (check the model)")


def save_gradient(path, gradient: ProxyGradient) -> None:
    """Write ``gradient`` to a safetensors file: float32 tensors plus string metadata. A loss or
    gradient with NaN or inf is refused (``ValueError``)."""
    _check_finite(gradient, "the gradient's")
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "model_id": gradient.model_id,
                "loss": repr(float(gradient.loss)), "num_examples": str(int(gradient.num_examples)),
                "num_tokens": str(int(gradient.num_tokens))}
    if gradient.weights_signature is not None:
        metadata["weights_signature"] = gradient.weights_signature
    tensors = {name: g.detach().to("cpu", torch.float32).contiguous() for name, g in gradient.grads.items()}
    save_file(tensors, str(path), metadata=metadata)


def read_tensor_file(path, fmt: str, version: str, kind: str, writer: str):
    """``(tensors, metadata)`` of a safetensors file whose metadata names format ``fmt``, ``version``.

    Anything else (not safetensors, another format or version, a tensor not in float32) raises
    ``ValueError`` naming ``kind`` (e.g. "proxy gradient") and ``writer``, the function that writes
    such files. Never unpickles.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a safetensors file, or cannot be read ({e}); {kind}s are read only from "
                         f"safetensors files written by {writer} (pickles are never loaded)") from None
    if metadata.get("format") != fmt:
        raise ValueError(f"{path} is a safetensors file but not an adfast {kind} "
                         f"(metadata format={metadata.get('format')!r}, expected {fmt!r})")
    if metadata.get("format_version") != version:
        raise ValueError(f"{path} has {kind.replace(' ', '-')} format version {metadata.get('format_version')!r}; "
                         f"this adfast reads version {version}")
    wrong = [f"{name} ({t.dtype})" for name, t in tensors.items() if t.dtype != torch.float32]
    if wrong:
        raise ValueError(f"{path}: a {kind} holds float32 tensors; {', '.join(wrong[:4])} are not")
    return tensors, metadata


def load_gradient(path) -> ProxyGradient:
    """Read a file written by :func:`save_gradient`, or by :func:`adfast.low_rank.save_low_rank_gradient`
    (returned as its dense rank-r ``G_r``); anything else raises ``ValueError``."""
    from . import low_rank

    if low_rank.is_low_rank_file(path):  # otherwise read_tensor_file says what is wrong with the file
        return low_rank.load_low_rank_gradient(path).to_dense()
    grads, metadata = read_tensor_file(path, FORMAT, FORMAT_VERSION, "proxy gradient", "save_gradient")
    with metadata_fields(path):
        fields = dict(loss=float(metadata["loss"]), num_examples=int(metadata["num_examples"]),
                      num_tokens=int(metadata["num_tokens"]), model_id=metadata["model_id"],
                      weights_signature=signature_field(metadata))
    return ProxyGradient(grads=grads, **fields)


def signature_field(metadata: dict[str, str]) -> str | None:
    """The metadata's ``weights_signature`` (``None`` in files written before it existed), checked."""
    signature = metadata.get("weights_signature")
    if signature is not None:
        parse_signature(signature)
    return signature


@contextmanager
def metadata_fields(path):
    """Within the block, a missing or malformed metadata field of ``path`` raises ``ValueError`` naming it."""
    try:
        yield
    except KeyError as e:
        raise ValueError(f"{path}: its metadata lacks the field {e.args[0]!r}") from None
    except ValueError as e:
        raise ValueError(f"{path}: malformed metadata ({e})") from None
