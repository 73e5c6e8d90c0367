"""Distillation of a student on teacher traces: supervised fine-tuning, LoRA or full.

The student learns the traces ``x_i = prompt_i + completion_i`` by next-token prediction with the
loss on completion tokens only: a batch's loss is the mean NLL over its completion tokens
(:func:`completion_nll`; prompt and pad positions condition nothing but are never scored, as in
:mod:`adfast.gradient`). The defaults are the antidistillation paper's distillation settings:
LoRA rank 128, alpha 128, AdamW (lr 5e-4, weight decay 0.1), cosine schedule with 10% linear
warm-up, grad-norm clipping at 1, batch size 32, 4 epochs.

LoRA needs no ``peft``: :func:`add_lora` replaces every ``nn.Linear`` under an attention or MLP
module (``q/k/v/o_proj``, ``gate/up/down_proj`` in Llama and Qwen2) by a :class:`LoRALinear`,
``W x + (alpha / r) B A x`` with ``A`` kaiming-uniform, ``B = 0`` (so the wrapped model starts
exactly as the original) and every base weight frozen. :func:`merge_lora` folds the adapters back
into plain ``nn.Linear`` weights, and :func:`save_student` saves the merged model as safetensors.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .gradient import _batch, _check_examples

LORA_SCOPES = ("attn", "attention", "mlp")  # a Linear is adapted when its module path has one of these


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) * B(A(dropout(x)))`` around a frozen ``nn.Linear`` ``base``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        weight = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=weight.dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and peft) initialise A
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for p in base.parameters():
            p.requires_grad_(False)

    @property
    def weight(self) -> torch.Tensor:  # some callers read .weight of a projection (dtype, device)
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def merged(self) -> nn.Linear:
        """The base ``nn.Linear`` with ``W + (alpha / r) B A`` folded into its weight (in place)."""
        with torch.no_grad():
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
            self.base.weight += delta.to(self.base.weight.dtype)
        return self.base


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def add_lora(model: nn.Module, rank: int = 128, alpha: float = 128.0, dropout: float = 0.0) -> list[str]:
    """Freeze every parameter of ``model`` and wrap each ``nn.Linear`` whose parent module's name
    contains "attn", "attention" or "mlp" in a :class:`LoRALinear` (in place). Returns the wrapped names;
    ValueError if there is none."""
    def adapted(name: str, module: nn.Module) -> bool:
        parent = name.rpartition(".")[0].rpartition(".")[2].lower()
        return type(module) is nn.Linear and any(scope in parent for scope in LORA_SCOPES)

    targets = [name for name, module in model.named_modules() if adapted(name, module)]
    if not targets:
        raise ValueError("no nn.Linear under an attention or MLP module to put LoRA adapters on")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in targets:
        _set_module(model, name, LoRALinear(model.get_submodule(name), rank, alpha, dropout))
    return targets


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every :class:`LoRALinear` in ``model`` by its merged ``nn.Linear`` (in place); the
    merged weights keep ``requires_grad=False``. Returns ``model``."""
    for name in [name for name, module in model.named_modules() if isinstance(module, LoRALinear)]:
        _set_module(model, name, model.get_submodule(name).merged())
    return model


def lr_multiplier(step: int, total_steps: int, warmup_steps: int) -> float:
    """The learning-rate factor of optimizer step ``step`` (0-based) of ``total_steps``: linear
    warm-up ``(step + 1) / warmup_steps`` over the first ``warmup_steps`` steps, then cosine decay
    ``0.5 * (1 + cos(pi * (step - warmup_steps) / (total_steps - warmup_steps)))`` from 1 towards 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))


def warmup_steps_for(total_steps: int, warmup_frac: float) -> int:
    """``round(warmup_frac * total_steps)``, at most ``total_steps``."""
    return min(total_steps, int(round(warmup_frac * total_steps)))


def completion_nll(model: nn.Module, examples: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                   pad_token_id: int = 0, reduction: str = "mean") -> torch.Tensor:
    """The NLL of the completion tokens of ``(prompt_ids, completion_ids)`` examples, run as one
    right-padded batch: their mean (``reduction="mean"``, token-weighted) or sum. Prompt and pad
    positions are not scored. Differentiable."""
    examples = _check_examples(examples, model.get_input_embeddings().num_embeddings)
    device = model.get_input_embeddings().weight.device
    input_ids, attention_mask, scored = _batch(examples, pad_token_id, device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1][scored].float(), input_ids[:, 1:][scored], reduction=reduction)


def distill(student: nn.Module, tokenizer, traces, *, lora_rank: int = 128, lora_alpha: float = 128.0,
            lora_dropout: float = 0.0, lr: float = 5e-4, weight_decay: float = 0.1, max_grad_norm: float = 1.0,
            warmup_frac: float = 0.1, batch_size: int = 32, epochs: int = 4, full_finetune: bool = False,
            seed: int = 0, progress: bool = True, merge: bool = True, history: list | None = None) -> nn.Module:
    """Fine-tune ``student`` on ``traces``, ``(prompt_ids, completion_ids)`` pairs, in place.

    Loss: the mean NLL over each batch's completion tokens (:func:`completion_nll`). AdamW
    (``weight_decay`` on matrices, none on 1-D parameters), learning rate ``lr`` times
    :func:`lr_multiplier` (warm-up over ``warmup_frac`` of the ``epochs * ceil(len / batch_size)``
    steps, then cosine), gradients clipped to norm ``max_grad_norm``; the traces are reshuffled
    every epoch (torch generator seeded with ``seed``, which also seeds the LoRA init).

    With ``full_finetune=False`` LoRA adapters (:func:`add_lora`) are trained and, with ``merge``,
    folded into the weights at the end (:func:`merge_lora`); otherwise every parameter that
    requires grad is trained. ``tokenizer`` gives the pad id (else 0). Each step appends
    ``{"step", "lr", "loss", "grad_norm"}`` to ``history`` when one is given. The student is
    returned in eval mode.
    """
    if batch_size < 1 or epochs < 1:
        raise ValueError(f"batch_size and epochs must be >= 1, got {batch_size} and {epochs}")
    if not 0 <= warmup_frac <= 1:
        raise ValueError(f"warmup_frac must be in [0, 1], got {warmup_frac}")
    examples = _check_examples(traces, student.get_input_embeddings().num_embeddings)
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    pad = 0 if pad is None else int(pad)
    torch.manual_seed(seed)
    if not full_finetune:
        add_lora(student, lora_rank, lora_alpha, lora_dropout)
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the student has no parameter with requires_grad=True: nothing to train")
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
    steps_per_epoch = math.ceil(len(examples) / batch_size)
    total = epochs * steps_per_epoch
    warmup = warmup_steps_for(total, warmup_frac)
    generator = torch.Generator().manual_seed(seed)
    student.train()
    step = 0
    try:
        with tqdm(total=total, desc="distill", unit="step", disable=not progress) as bar:
            for _ in range(epochs):
                order = torch.randperm(len(examples), generator=generator).tolist()
                for start in range(0, len(order), batch_size):
                    batch = [examples[i] for i in order[start:start + batch_size]]
                    rate = lr * lr_multiplier(step, total, warmup)
                    for group in optimizer.param_groups:
                        group["lr"] = rate
                    optimizer.zero_grad(set_to_none=True)
                    loss = completion_nll(student, batch, pad_token_id=pad)
                    loss.backward()
                    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                    optimizer.step()
                    if history is not None:
                        history.append({"step": step, "lr": rate, "loss": loss.item(), "grad_norm": float(norm)})
                    bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{rate:.2e}")
                    bar.update(1)
                    step += 1
    finally:
        optimizer.zero_grad(set_to_none=True)
        student.eval()
    if merge and not full_finetune:
        merge_lora(student)
    return student


def save_student(directory, model: nn.Module, tokenizer=None) -> Path:
    """Merge any LoRA adapters (:func:`merge_lora`) and save ``model`` (and ``tokenizer``) to
    ``directory`` with ``save_pretrained(safe_serialization=True)``. Returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    merge_lora(model)
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


__all__ = ["LoRALinear", "add_lora", "merge_lora", "lr_multiplier", "warmup_steps_for", "completion_nll",
           "distill", "save_student"]
