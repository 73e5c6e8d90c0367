"""Teacher traces: one sampled completion per prompt, through the engine or Hugging Face ``generate``.

Two backends draw the same distribution (:func:`adfast.sample`'s) with different noise:

* :func:`engine_traces`: the lockstep continuous-batching :class:`adfast.engine.Engine` (Llama and
  Qwen2 teachers and proxies; CUDA graphs on a GPU; sharded over ranks under torchrun);
* :func:`generate_traces`: Hugging Face ``generate`` with :class:`adfast.hf.AntidistillationLogitsProcessor`
  over left-padded batches of consecutive prompts (any architecture, one process).

:func:`sample_traces` picks one (``backend="auto"``: the engine when it can run the models).
Every trace is a dict with ``completion`` (text, special tokens skipped), ``completion_ids`` (the
generated ids up to and including the first EOS), ``tokens`` (their count), ``mean_logprob`` (the
mean of the teacher's unadjusted temperature-1 log-probabilities of those tokens) and ``seconds``
(:mod:`adfast.cli` says how each backend times a row). :func:`check_traces` adds ``correct``.
"""
from __future__ import annotations

import math
import time
from types import SimpleNamespace

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor

from . import tasks
from .decoder import DecoderConfig
from .engine import Engine, generate_distributed
from .evaluate import eos_ids
from .hf import AntidistillationLogitsProcessor, generate

BACKENDS = ("auto", "engine", "hf")


class _StepRecorder(LogitsProcessor):
    """Runs before the sampling processor: records the teacher's log-probabilities of the chosen
    tokens (one step late, when the next call shows the token) and ticks a progress bar. Returns
    the scores unchanged."""

    def __init__(self, bar):
        self.bar = bar
        self.logprobs: list[torch.Tensor] = []  # [B] per step
        self._pending = None  # [B, V] log-probabilities of the step whose token is not known yet

    def __call__(self, input_ids, scores):
        if self._pending is not None:
            self.logprobs.append(self._pending.gather(1, input_ids[:, -1:])[:, 0])
        self._pending = torch.log_softmax(scores.float(), dim=-1)
        self.bar.update(1)
        return scores

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """``[B, steps]`` log-probabilities of the generated tokens, given the final ``sequences``."""
        self.logprobs.append(self._pending.gather(1, sequences[:, -1:].to(self._pending.device))[:, 0])
        return torch.stack(self.logprobs, dim=1).cpu()


def generate_traces(teacher, tokenizer, prompts: list[list[int]], make_processor, *, max_new_tokens: int,
                    batch_size: int, seed: int, desc: str = "generate") -> list[dict]:
    """Generate one completion per prompt (left-padded batches of consecutive prompts).

    ``make_processor(seed)`` returns the :class:`adfast.hf.AntidistillationLogitsProcessor` for one
    batch (batch ``k`` uses ``seed + k``, also for torch's sampling generator). Returns, per
    prompt in order, a dict with ``completion``, ``completion_ids``, ``tokens``, ``mean_logprob``
    and ``seconds`` (module docstring).
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}")
    vocab = teacher.get_input_embeddings().num_embeddings
    for i, prompt in enumerate(prompts):
        if max(prompt) >= vocab:
            raise ValueError(f"prompt {i} has token id {max(prompt)} outside the teacher's vocabulary ({vocab})")
    pad, eos = tokenizer.pad_token_id, set(eos_ids(teacher, tokenizer))
    if pad is None:
        raise ValueError("the tokenizer has no pad token (nor an EOS token to pad with)")
    device = teacher.get_input_embeddings().weight.device
    starts = range(0, len(prompts), batch_size)
    traces = []
    with tqdm(total=len(starts) * max_new_tokens, desc=desc, unit="step", leave=False) as bar:
        for k, start in enumerate(starts):
            batch = prompts[start:start + batch_size]
            width = max(map(len, batch))
            input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
            attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
            recorder = _StepRecorder(bar)
            torch.manual_seed(seed + k)
            began = time.perf_counter()
            with torch.no_grad():
                sequences = generate(teacher, make_processor(seed + k), input_ids=input_ids,
                                     attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                     pad_token_id=pad, eos_token_id=sorted(eos) or None,
                                     logits_processor=[recorder])
            seconds = time.perf_counter() - began
            bar.update((k + 1) * max_new_tokens - bar.n)  # the steps skipped when every row stopped early
            logprobs = recorder.finish(sequences)
            for row, ids in enumerate(sequences[:, width:].tolist()):
                ends = [i for i, token in enumerate(ids) if token in eos]
                ids = ids[:ends[0] + 1] if ends else ids
                traces.append({"completion": tokenizer.decode(ids, skip_special_tokens=True), "completion_ids": ids,
                               "tokens": len(ids), "mean_logprob": float(logprobs[row, :len(ids)].mean()),
                               "seconds": seconds / len(batch)})
    return traces


def engine_traces(teacher, tokenizer, prompts: list[list[int]], pair=None, *, mode: str, lam: float, tau: float,
                  top_k: int, top_p: float, max_new_tokens: int, batch_size: int, seed: int,
                  max_seq_len: int | None = None, device=None, cuda_graph: bool = True) -> list[dict]:
    """:func:`generate_traces`' rows from the lockstep :class:`adfast.engine.Engine` (module docstring).

    ``pair`` is a :class:`adfast.ProxyPair`, or None in temperature mode. The engine holds
    ``batch_size`` sequences (at most ``len(prompts)``) of ``max_seq_len`` positions (default the
    longest prompt plus ``max_new_tokens``) on ``device`` (default the teacher's); generation stops
    at the EOS ids. Under torchrun the prompts are sharded over the ranks and every rank gets all
    rows, in prompt order (:func:`adfast.engine.generate_distributed`).
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}")
    if max_seq_len is None:
        max_seq_len = max(map(len, prompts)) + max_new_tokens
    eos = eos_ids(teacher, tokenizer)

    def factory() -> Engine:
        return Engine(teacher, pair, max_batch_size=min(batch_size, len(prompts)), max_seq_len=max_seq_len,
                      device=device, cuda_graph=cuda_graph)

    results = generate_distributed(factory, prompts, max_new_tokens=max_new_tokens, tau=tau, lam=lam, mode=mode,
                                   top_k=top_k, top_p=top_p, seed=seed, stop_token_ids=eos)
    return [{"completion": tokenizer.decode(r.tokens, skip_special_tokens=True), "completion_ids": list(r.tokens),
             "tokens": r.num_tokens, "mean_logprob": float(r.mean_logprob), "seconds": float(r.seconds)}
            for r in results]


def check_engine_support(model, role: str, path: str) -> None:
    """Raise a ValueError pointing at ``--backend hf`` when the engine cannot run ``model``."""
    try:
        DecoderConfig.from_hf(model.config)
    except ValueError as error:
        raise ValueError(f"--backend engine cannot run the {role} {path}: {error}; use --backend hf") from None


def summarize(traces: list[dict]) -> dict:
    """Totals over traces: ``tokens``, ``seconds``, ``tokens_per_s``, token-weighted ``mean_logprob``
    and ``accuracy`` (None when no trace was checked)."""
    tokens = sum(t["tokens"] for t in traces)
    seconds = sum(t["seconds"] for t in traces)
    checked = [t["correct"] for t in traces if "correct" in t]
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds if seconds else math.nan,
            "mean_logprob": sum(t["mean_logprob"] * t["tokens"] for t in traces) / max(tokens, 1),
            "accuracy": sum(checked) / len(checked) if checked else None}


def no_proxy(eps: float) -> SimpleNamespace:
    """The pair stand-in for temperature mode, in which the processor never runs the proxies."""
    return SimpleNamespace(plus=None, minus=None, eps=eps)


def processor_factory(pair, *, mode: str, lam: float, tau: float, top_k: int, top_p: float, pad_token_id: int):
    def make(seed: int):
        return AntidistillationLogitsProcessor(pair, lam=lam, tau=tau, mode=mode, top_k=top_k, top_p=top_p,
                                               pad_token_id=pad_token_id, seed=seed)

    make(0)  # validate the settings before any generation
    return make


def engine_can_run(*models) -> bool:
    """Whether the engine's decoder supports every given transformers model (:func:`check_engine_support`)."""
    try:
        for model in models:
            check_engine_support(model, "model", type(model).__name__)
    except ValueError:
        return False
    return True


def sample_traces(teacher, tokenizer, prompts: list[list[int]], pair=None, *, mode: str, lam: float, tau: float,
                  max_new_tokens: int, batch_size: int, seed: int, top_k: int = 0, top_p: float = 1.0,
                  eps: float = 1e-4, backend: str = "auto", device=None, desc: str = "generate") -> list[dict]:
    """One trace per prompt (module docstring) from ``teacher`` under ``mode`` / ``lam`` / ``tau``.

    ``pair``: the :class:`adfast.ProxyPair` (None in temperature mode, where ``eps`` is unused).
    ``backend``: ``"engine"`` (:func:`engine_traces`, on ``device``), ``"hf"``
    (:func:`generate_traces`, on the teacher's device) or ``"auto"`` (the engine when
    :func:`engine_can_run` the teacher and the pair's models, else Hugging Face).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    models = [teacher] + ([] if pair is None else [pair.plus])
    if backend == "auto":
        backend = "engine" if engine_can_run(*models) else "hf"
    elif backend == "engine":
        for model, role in zip(models, ("teacher", "proxy")):
            check_engine_support(model, role, type(model).__name__)
    if backend == "engine":
        return engine_traces(teacher, tokenizer, prompts, pair, mode=mode, lam=lam, tau=tau, top_k=top_k,
                             top_p=top_p, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
                             device=device)
    make = processor_factory(no_proxy(eps) if pair is None else pair, mode=mode, lam=lam, tau=tau, top_k=top_k,
                             top_p=top_p, pad_token_id=tokenizer.pad_token_id)
    return generate_traces(teacher, tokenizer, prompts, make, max_new_tokens=max_new_tokens,
                           batch_size=batch_size, seed=seed, desc=desc)


def check_traces(rows: list[dict], traces: list[dict]) -> list[dict]:
    """Each row merged with its trace, plus ``correct`` (:func:`adfast.tasks.check_answer` by the
    row's ``kind``) where the row has an ``answer``."""
    out = []
    for row, trace in zip(rows, traces, strict=True):
        merged = {**row, **trace}
        if "answer" in row:
            merged["correct"] = tasks.check_answer(trace["completion"], row["answer"], row.get("kind", "number"))
        out.append(merged)
    return out
