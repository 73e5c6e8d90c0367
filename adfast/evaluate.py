"""Task accuracy of a (student) model: Hugging Face ``generate`` over task rows, answers checked.

Rows are :mod:`adfast.tasks` jsonl rows: a prompt (``prompt_ids``, ``question`` through the chat
template, or ``prompt`` text), an optional ``answer`` and an optional ``kind`` ("number", the
default; "boxed"; "choice"; :func:`adfast.tasks.check_answer`). Generation is greedy by default,
in left-padded batches of consecutive rows, and stops at the EOS ids.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from . import tasks


def eos_ids(model, tokenizer) -> list[int]:
    """The generation config's EOS ids, else the tokenizer's."""
    eos = model.generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    return sorted(set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set()))


def evaluate(model, tokenizer, rows: list[dict], *, max_new_tokens: int = 256, batch_size: int = 8,
             greedy: bool = True, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
             progress: bool = True) -> tuple[float | None, list[dict]]:
    """Generate one completion per row and check it against the row's ``answer``.

    ``greedy=False`` samples at ``temperature`` with ``top_p`` / ``top_k`` (0 disables top-k); batch
    ``k`` seeds torch with ``seed + k``. Returns ``(accuracy, traces)``: the fraction of rows with an
    ``answer`` answered correctly (None when no row has one) and, per row in order, the row's fields
    plus ``prompt_ids``, ``completion`` (special tokens skipped), ``completion_ids`` (up to and
    including the first EOS), ``tokens``, ``extracted`` (the answer found in the completion, or None)
    and, when the row has an ``answer``, ``correct``.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}")
    if not greedy and temperature <= 0:
        raise ValueError(f"sampling needs temperature > 0, got {temperature}")
    prompts = [tasks.prompt_ids(tokenizer, row, f"row {i}") for i, row in enumerate(rows, 1)]
    tasks.check_rows(rows)  # a bad kind or reference fails before any generation
    kinds = [row.get("kind", "number") for row in rows]
    vocab = model.get_input_embeddings().num_embeddings
    for i, prompt in enumerate(prompts, 1):
        if max(prompt) >= vocab:
            raise ValueError(f"row {i} has token id {max(prompt)} outside the model's vocabulary ({vocab})")
    pad = tokenizer.pad_token_id
    eos = eos_ids(model, tokenizer)
    if pad is None:
        pad = eos[0] if eos else 0
    device = model.get_input_embeddings().weight.device
    sampling = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None} if greedy else {
        "do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k or None}
    was_training = model.training
    model.eval()
    traces = []
    try:
        for k, start in enumerate(tqdm(range(0, len(prompts), batch_size), desc="evaluate", disable=not progress)):
            batch = prompts[start:start + batch_size]
            width = max(map(len, batch))
            input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
            attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
            torch.manual_seed(seed + k)
            with torch.no_grad():
                sequences = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                           max_new_tokens=max_new_tokens, pad_token_id=pad,
                                           eos_token_id=eos or None, **sampling)
            for ids in sequences[:, width:].tolist():
                ends = [i for i, token in enumerate(ids) if token in eos]
                traces.append(ids[:ends[0] + 1] if ends else ids)
    finally:
        model.train(was_training)
    out = []
    for row, prompt, kind, ids in zip(rows, prompts, kinds, traces):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        trace = {**row, "prompt_ids": prompt, "completion": text, "completion_ids": ids, "tokens": len(ids),
                 "extracted": tasks.extract(text, kind)}
        if "answer" in row:
            trace["correct"] = tasks.check_answer(text, row["answer"], kind)
        out.append(trace)
    checked = [t["correct"] for t in out if "correct" in t]
    return (sum(checked) / len(checked) if checked else None), out
