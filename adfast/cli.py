"""The ``adfast`` command line: ``grad`` (proxy gradient), ``generate`` (sample traces), ``demo``,
``check-eps`` (finite-difference error of D against eps, :mod:`adfast.eps_study`), ``distill``
(fine-tune a student on traces, :mod:`adfast.distill`), ``evaluate`` (a model's task accuracy,
:mod:`adfast.evaluate`) and ``sweep`` (the whole distillation experiment from one config,
:mod:`adfast.sweep`).

``adfast grad`` computes the proxy gradient ``g`` from teacher traces (jsonl; prompts and
completions as described in :mod:`adfast.tasks`) and saves it as safetensors. ``adfast generate``
samples one completion per prompt from the teacher with antidistillation (or temperature, or
permutation) sampling and writes the traces as jsonl, in prompt order, through one of two backends:

* ``--backend engine`` (the default): the lockstep continuous-batching engine
  (:class:`adfast.engine.Engine`: a static-cache teacher and a stacked proxy pair, CUDA graphs on
  a GPU), with up to ``--batch-size`` sequences in flight and ``--max-seq-len`` cache positions
  per sequence (default: the longest prompt plus ``--max-new-tokens``). It runs Llama and Qwen2
  teachers and proxies (:mod:`adfast.decoder`); for other architectures use ``--backend hf``.
  Under ``torchrun`` (``RANK`` and ``WORLD_SIZE`` set) the prompts are sharded over the ranks
  (:func:`adfast.engine.generate_distributed`) and rank 0 alone writes the one output file. The
  models are loaded on the CPU and the engine copies their weights to ``--device``.
* ``--backend hf``: Hugging Face ``generate`` with a logits processor (:mod:`adfast.hf`), over
  left-padded batches of ``--batch-size`` consecutive prompts; any architecture, one process.

Temperature mode needs neither a proxy nor a gradient (the engine then runs no proxy at all).
With ``--tau 0`` (greedy) both backends give the same completions (in float32; in half precision
near-ties can break differently); sampled completions differ
(the backends draw their noise differently), each reproducible for a fixed ``--seed``.

``adfast demo`` runs the whole method on the embedded SmolLM2 on CPU (through the HF backend).

Every trace row carries ``completion`` (text, special tokens skipped), ``completion_ids`` (the
generated ids up to and including the first EOS: generation stops at the tokenizer's / generation
config's EOS ids), ``tokens`` (their count), ``mean_logprob`` (the mean over those tokens of the
teacher's log-probability under its own unadjusted distribution at temperature 1: ``log_softmax``
of the raw logits with the engine; with the HF backend of the scores Hugging Face hands the
logits processors, the raw logits unless the teacher's generation config adds processors such as
a repetition penalty), ``seconds`` and, when the row has an ``answer``, ``correct``. ``seconds``
with the HF backend is the wall time of the row's batch divided by the batch size, so that the
rows sum to the total; with the engine it is the row's own latency as the engine reports it, the
wall time from its prompt's prefill (when it took a cache slot) to its last token. Engine rows
decode concurrently, so their ``seconds`` overlap and sum to more than the run's wall time; the
tokens/s that ``generate`` prints divides by the run's wall time, for either backend.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
from safetensors import SafetensorError

from . import eps_study, tasks
from .distill import distill, save_student
from .evaluate import evaluate
from .gradient import load_gradient, proxy_gradient, save_gradient
from .low_rank import low_rank_gradient, save_low_rank_gradient, total_energy
from .models import DTYPES, load_model
from .proxy_pair import ProxyPair
from .sampling import MODES
from .sweep import run_sweep
from .traces import (check_engine_support, check_traces, engine_traces, generate_traces, no_proxy,
                     processor_factory, summarize)

DEFAULT_EPS = 1e-4


def _torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def _same_model(a: str, b: str) -> bool:
    return a == b or Path(a).resolve() == Path(b).resolve()


def _check_out(path: Path) -> None:
    """Refuse an output path that is a directory before any work is done."""
    if Path(path).is_dir():
        raise ValueError(f"--out {path} is a directory; give a file path")


def cmd_grad(args) -> None:
    _check_out(args.out)
    rows = tasks.read_jsonl(args.traces)
    if not rows:
        raise ValueError(f"{args.traces} holds no traces")
    proxy, tokenizer = load_model(args.proxy, dtype=args.dtype, device=args.device)
    examples = [(tasks.prompt_ids(tokenizer, row, f"{args.traces} row {i}"),
                 tasks.completion_ids(tokenizer, row, f"{args.traces} row {i}")) for i, row in enumerate(rows, 1)]
    tasks.check_token_ids([p + c for p, c in examples], proxy.get_input_embeddings().num_embeddings,
                          str(args.traces), "proxy")
    gradient = proxy_gradient(proxy, examples, batch_size=args.batch_size, pad_token_id=tokenizer.pad_token_id)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if args.rank:
        factored = low_rank_gradient(gradient, args.rank)
        save_low_rank_gradient(args.out, factored)
        kept = f", rank {args.rank}: {total_energy(gradient, factored):.4f} of the gradient's energy kept"
    else:
        save_gradient(args.out, gradient)
        kept = ""
    print(f"wrote {args.out}: proxy loss {gradient.loss:.4f} over {gradient.num_tokens} completion tokens "
          f"of {gradient.num_examples} traces{kept}")


def check_same_tokenizer(teacher_tokenizer, proxy_tokenizer, proxy_vocab: int) -> None:
    """Refuse a proxy whose tokenizer maps the shared ids to other tokens than the teacher's: ``D``
    compares the two models' predictions of the same ids. Tokens either tokenizer adds (special
    tokens, which distilled checkpoints rename) are not compared."""
    added = set(teacher_tokenizer.added_tokens_decoder) | set(proxy_tokenizer.added_tokens_decoder)
    ids = [i for i in range(min(len(teacher_tokenizer), len(proxy_tokenizer), proxy_vocab)) if i not in added]
    theirs = proxy_tokenizer.convert_ids_to_tokens(ids)
    differ = [(i, mine, other) for i, mine, other in zip(ids, teacher_tokenizer.convert_ids_to_tokens(ids), theirs)
              if mine != other]
    if differ:
        i, mine, other = differ[0]
        raise ValueError(f"the proxy's tokenizer differs from the teacher's in {len(differ)} of {len(ids)} shared ids "
                         f"(id {i} is {mine!r} for the teacher, {other!r} for the proxy): antidistillation needs a "
                         "proxy with the teacher's tokenizer")


def cmd_generate(args) -> None:
    _check_out(args.out)
    rows = tasks.read_jsonl(args.prompts)
    if not rows:
        raise ValueError(f"{args.prompts} holds no prompts")
    tasks.check_rows(rows, str(args.prompts))
    engine = args.backend == "engine"
    if not engine and _torchrun():
        raise ValueError("--backend hf runs in one process and does not shard prompts over torchrun ranks; "
                         "run it without torchrun, or use --backend engine")
    if args.max_seq_len is not None and args.max_seq_len < 1:
        raise ValueError(f"--max-seq-len must be >= 1, got {args.max_seq_len}")
    gradient = None
    if args.mode != "temperature":
        if args.proxy is None or args.grad is None:
            raise ValueError(f"--mode {args.mode} needs --proxy and --grad (temperature mode needs neither)")
        if args.lam == 0:
            raise ValueError(f"--mode {args.mode} with --lam 0 samples as temperature mode does, with two proxy "
                             "forwards a step for nothing: give --lam, or use --mode temperature")
        gradient = load_gradient(args.grad)
    load_device = "cpu" if engine else args.device  # the engine copies the weights to args.device
    teacher, tokenizer = load_model(args.teacher, dtype=args.dtype, device=load_device)
    if engine:
        check_engine_support(teacher, "teacher", args.teacher)
    prompts = [tasks.prompt_ids(tokenizer, row, f"{args.prompts} row {i}") for i, row in enumerate(rows, 1)]
    tasks.check_token_ids(prompts, teacher.get_input_embeddings().num_embeddings, str(args.prompts), "teacher")
    if args.max_seq_len is not None:
        longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
        if len(prompts[longest]) + args.max_new_tokens > args.max_seq_len:
            raise ValueError(f"{args.prompts} row {longest + 1} has {len(prompts[longest])} prompt tokens; with "
                             f"--max-new-tokens {args.max_new_tokens} it needs more than --max-seq-len "
                             f"{args.max_seq_len} positions")
    rank = _rank()
    if gradient is None:
        pair = None if engine else no_proxy(args.eps)
    else:
        if _same_model(args.teacher, args.proxy):
            proxy = teacher
        else:
            proxy, proxy_tokenizer = load_model(args.proxy, dtype=args.dtype, device=load_device)
            check_same_tokenizer(tokenizer, proxy_tokenizer, proxy.get_input_embeddings().num_embeddings)
        if engine:
            check_engine_support(proxy, "proxy", args.proxy)
        pair = ProxyPair.from_gradient(proxy, gradient, args.eps)
        if rank == 0:
            print(f"proxy pair: eps {pair.eps:g}, perturbation rounded away in {pair.vanished_fraction:.1%} "
                  "of the perturbed weights", file=sys.stderr)
    began = time.perf_counter()
    if engine:
        traces = engine_traces(teacher, tokenizer, prompts, pair, mode=args.mode, lam=args.lam, tau=args.tau,
                               top_k=args.top_k, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                               batch_size=args.batch_size, seed=args.seed, max_seq_len=args.max_seq_len,
                               device=args.device, cuda_graph=not args.no_cuda_graph)
    else:
        make = processor_factory(pair, mode=args.mode, lam=args.lam, tau=args.tau, top_k=args.top_k,
                                  top_p=args.top_p, pad_token_id=tokenizer.pad_token_id)
        traces = generate_traces(teacher, tokenizer, prompts, make, max_new_tokens=args.max_new_tokens,
                                 batch_size=args.batch_size, seed=args.seed, desc=args.mode)
    wall = time.perf_counter() - began
    if rank != 0:
        return  # rank 0 writes the one output, holding every rank's rows in prompt order
    out_rows = check_traces([{**row, "prompt_ids": ids} for row, ids in zip(rows, prompts)], traces)
    tasks.write_jsonl(args.out, out_rows)
    stats = summarize(out_rows)
    accuracy = "" if stats["accuracy"] is None else f", accuracy {stats['accuracy']:.1%}"
    print(f"wrote {len(out_rows)} traces to {args.out} ({args.backend} backend): {stats['tokens']} tokens, "
          f"{stats['tokens'] / wall if wall else math.nan:.1f} tokens/s, "
          f"mean teacher log-prob {stats['mean_logprob']:.3f}/token{accuracy}")


def _d_scale(pair, prompts: list[list[int]], pad_token_id: int) -> float:
    """Mean over ``prompts`` of the standard deviation over the vocabulary of ``D`` at the first
    generated position: the scale that ``lam`` multiplies."""
    width = max(map(len, prompts))
    device = pair.plus.get_input_embeddings().weight.device
    input_ids = torch.tensor([[pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = (torch.arange(width) >= torch.tensor([width - len(p) for p in prompts])[:, None]).long().to(device)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        plus, minus = (torch.log_softmax(model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                               logits_to_keep=1).logits[:, -1].float(), dim=-1)
                       for model in (pair.plus, pair.minus))
    return float(((plus - minus) / (2 * pair.eps)).std(dim=1).mean())


def _label(mode: str, lam: float) -> str:
    return mode if mode == "temperature" else f"{mode} lam={lam:g}"


def cmd_demo(args) -> None:
    began = time.perf_counter()
    lams = sorted(args.lams)
    if not lams or min(lams) <= 0:
        raise ValueError(f"--lams must be positive numbers, got {args.lams}")
    if args.holdout < 1:
        raise ValueError(f"--holdout must be >= 1, got {args.holdout}")
    if not 0 <= args.show < args.problems:
        raise ValueError(f"--show must index one of the {args.problems} test problems, got {args.show}")
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    pad = tokenizer.pad_token_id
    print(f"model {args.model} loaded in {time.perf_counter() - began:.1f} s "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, {args.dtype}); "
          "it is the teacher and the proxy")
    holdout, test = tasks.problems("holdout", args.holdout), tasks.problems("test", args.problems)
    run = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed)

    def sample(prompts, pair, mode, lam, tau, problems, desc):
        make = processor_factory(pair, mode=mode, lam=lam, tau=tau, top_k=0, top_p=1.0, pad_token_id=pad)
        traces = generate_traces(model, tokenizer, prompts, make, desc=desc, **run)
        for trace, problem in zip(traces, problems):
            trace["correct"] = tasks.is_correct(trace["completion"], problem.answer)
        return traces

    holdout_prompts = [tasks.format_prompt(tokenizer, p.question) for p in holdout]
    greedy = sample(holdout_prompts, no_proxy(args.eps), "temperature", 0.0, 0.0, holdout, "teacher greedy (holdout)")
    print(f"teacher's greedy traces on {len(holdout)} held-out problems: accuracy {summarize(greedy)['accuracy']:.0%}")

    step = time.perf_counter()
    gradient = proxy_gradient(model, [(p, t["completion_ids"]) for p, t in zip(holdout_prompts, greedy)],
                              batch_size=args.batch_size, pad_token_id=pad)
    print(f"proxy gradient: loss {gradient.loss:.3f} over {gradient.num_tokens} completion tokens "
          f"({time.perf_counter() - step:.1f} s)")
    pair = ProxyPair.from_gradient(model, gradient, args.eps)
    test_prompts = [tasks.format_prompt(tokenizer, p.question) for p in test]
    scale = _d_scale(pair, test_prompts[:4], pad)
    print(f"proxy pair: eps {args.eps:g}, perturbation rounded away in {pair.vanished_fraction:.1%} of the "
          f"perturbed weights ({args.dtype}); D's spread over the vocabulary is ~{scale:.0f}, so lam shifts "
          "log-probabilities by ~" + ", ".join(f"{lam * scale:.1f} (lam {lam:g})" for lam in lams) + " nats")

    settings = [("temperature", 0.0), ("permutation", lams[-1]), *(("antidistill", lam) for lam in lams)]
    results = []
    for mode, lam in settings:
        pair_or_none = no_proxy(args.eps) if mode == "temperature" else pair
        traces = sample(test_prompts, pair_or_none, mode, lam, args.tau, test, _label(mode, lam))
        results.append((mode, lam, traces))

    print(f"\n{len(test)} test problems, tau {args.tau:g}, at most {args.max_new_tokens} new tokens, seed {args.seed}")
    print(f"{'mode':<12} {'lam':>6} {'tokens/s':>9} {'tokens':>7} {'teacher logprob/token':>22} {'accuracy':>9}")
    for mode, lam, traces in results:
        stats = summarize(traces)
        print(f"{mode:<12} {('-' if mode == 'temperature' else f'{lam:g}'):>6} {stats['tokens_per_s']:>9.1f} "
              f"{stats['tokens']:>7} {stats['mean_logprob']:>22.3f} {stats['accuracy']:>9.0%}")
    problem = test[args.show]
    print(f"\nproblem: {problem.question} (answer {problem.answer})")
    for mode, lam, traces in results:
        trace = traces[args.show]
        verdict = "correct" if trace["correct"] else f"wrong, extracted {tasks.extract_answer(trace['completion'])}"
        print(f"--- {_label(mode, lam)} ({verdict}, mean teacher log-prob {trace['mean_logprob']:.2f}) ---")
        print(trace["completion"].strip())
    print(f"\ndemo finished in {time.perf_counter() - began:.0f} s")


_ID_KEYS = ("prompt_ids", "completion_ids")


def cmd_distill(args) -> None:
    rows = tasks.read_jsonl(args.traces)
    if not rows:
        raise ValueError(f"{args.traces} holds no traces")
    if args.retokenize:
        rows = [{k: v for k, v in row.items() if k not in _ID_KEYS or not _has_text(row, k)} for row in rows]
    student, tokenizer = load_model(args.student, dtype=args.dtype, device=args.device)
    examples = [(tasks.prompt_ids(tokenizer, row, f"{args.traces} row {i}"),
                 tasks.completion_ids(tokenizer, row, f"{args.traces} row {i}")) for i, row in enumerate(rows, 1)]
    history: list[dict] = []
    began = time.perf_counter()
    distill(student, tokenizer, examples, lora_rank=args.lora_rank,
            lora_alpha=args.lora_rank if args.lora_alpha is None else args.lora_alpha, lr=args.lr,
            weight_decay=args.weight_decay, warmup_frac=args.warmup_frac, batch_size=args.batch_size,
            epochs=args.epochs, full_finetune=args.full, seed=args.seed, history=history)
    save_student(args.out, student, tokenizer)
    how = "full fine-tune" if args.full else f"LoRA rank {args.lora_rank}, merged"
    print(f"wrote the student to {args.out} ({how}): {len(examples)} traces, {args.epochs} epochs, "
          f"{len(history)} steps in {time.perf_counter() - began:.1f} s; loss {history[0]['loss']:.4f} "
          f"-> {history[-1]['loss']:.4f} (completion tokens)")


def _has_text(row: dict, key: str) -> bool:
    """Whether ``row`` can give ``key``'s tokens as text instead (``--retokenize``)."""
    return any(k in row for k in (("question", "prompt") if key == "prompt_ids" else ("completion",)))


def cmd_evaluate(args) -> None:
    rows = tasks.read_jsonl(args.tasks)
    if not rows:
        raise ValueError(f"{args.tasks} holds no tasks")
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    began = time.perf_counter()
    accuracy, traces = evaluate(model, tokenizer, rows, max_new_tokens=args.max_new_tokens,
                                batch_size=args.batch_size, greedy=args.tau == 0, temperature=args.tau or 1.0,
                                top_p=args.top_p, seed=args.seed)
    tasks.write_jsonl(args.out, traces)
    checked = sum("correct" in t for t in traces)
    score = "no row has an answer" if accuracy is None else (
        f"accuracy {accuracy:.1%} ({sum(t.get('correct', False) for t in traces)}/{checked})")
    print(f"wrote {len(traces)} traces to {args.out} in {time.perf_counter() - began:.1f} s: {score}")


def cmd_sweep(args) -> None:
    report = run_sweep(args.config, progress=args.progress)
    print(f"{'mode':<12} {'tau':>5} {'lam':>8} {'seeds':>5} {'teacher acc':>16} {'student acc':>16}")
    for r in report["summary"]:
        print(f"{r['mode']:<12} {r['tau']:>5g} {r['lam']:>8g} {r['seeds']:>5} "
              f"{_mean_ci(r, 'teacher_accuracy'):>16} {_mean_ci(r, 'student_accuracy'):>16}")
    print(f"undistilled student: {report['student_base_accuracy']:.3f}")


def _mean_ci(row: dict, key: str) -> str:
    half = row[f"{key}_ci95"]
    return f"{row[key]:.3f}" + ("" if half is None or math.isnan(half) else f" +- {half:.3f}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {value}")
    return value


def _device(text: str) -> str:
    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (e.g. cpu, cuda, cuda:1)") from None
    return text


def _threads_option(parser: argparse.ArgumentParser, default: int | None) -> None:
    parser.add_argument("--threads", type=_positive_int, default=default,
                        help=f"torch CPU threads (default: {default or 'torch chooses'}). On a busy machine "
                             "more threads than idle cores can slow a run down tenfold (waiting OpenMP threads)")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model weight dtype")
    common.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu")
    models = "a Hugging Face directory with safetensors weights, a .gguf file, or 'smollm2' (embedded)"

    parser = argparse.ArgumentParser(prog="adfast", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    grad = commands.add_parser("grad", parents=[common], help="compute the proxy gradient from teacher traces",
                               description="Prompts: prompt_ids, else question (chat template applied), else "
                                           "prompt (text, verbatim); completions: completion_ids, else completion.")
    grad.add_argument("--proxy", required=True, help=models)
    grad.add_argument("--traces", required=True, type=Path, help="jsonl of prompts with their completions")
    grad.add_argument("--out", required=True, type=Path, help="the gradient's safetensors file")
    grad.add_argument("--batch-size", type=int, default=8)
    grad.add_argument("--rank", type=int, default=0,
                      help="store each weight matrix's gradient as its top-RANK singular factors "
                           "(adfast.low_rank); 0 stores it dense. Every command reads either file")
    _threads_option(grad, None)
    grad.set_defaults(run=cmd_grad)

    gen = commands.add_parser("generate", parents=[common], help="sample traces from the teacher",
                              description="Prompts: prompt_ids, else question (chat template applied), else "
                                          "prompt (text, verbatim). Writes one jsonl row per prompt, in order. "
                                          "Under torchrun (--backend engine) rank 0 writes it.")
    gen.add_argument("--teacher", required=True, help=models)
    gen.add_argument("--proxy", help=models + " (not needed in temperature mode)")
    gen.add_argument("--grad", type=Path, help="the proxy gradient from `adfast grad` (not needed in temperature mode)")
    gen.add_argument("--prompts", required=True, type=Path, help="jsonl of prompts")
    gen.add_argument("--out", required=True, type=Path, help="jsonl of traces")
    gen.add_argument("--mode", choices=MODES, default="antidistill")
    gen.add_argument("--lam", type=float, default=0.0, help="antidistillation strength (multiplies D)")
    gen.add_argument("--tau", type=float, default=1.0, help="temperature; 0 is greedy")
    gen.add_argument("--eps", type=float, default=DEFAULT_EPS, help="finite-difference step of the proxy pair")
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--batch-size", type=int, default=8,
                     help="hf: prompts per generate call; engine: sequences decoded at once (cache slots)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--top-k", type=int, default=0, help="0 disables it")
    gen.add_argument("--top-p", type=float, default=1.0, help="1 disables it")
    gen.add_argument("--backend", choices=("engine", "hf"), default="engine",
                     help="engine: the lockstep continuous-batching engine (Llama / Qwen2; shards prompts "
                          "over torchrun ranks); hf: Hugging Face generate (any architecture, one process)")
    gen.add_argument("--max-seq-len", type=int, default=None,
                     help="engine: cache positions per sequence (default: longest prompt + --max-new-tokens)")
    gen.add_argument("--no-cuda-graph", action="store_true",
                     help="engine: run the decode step eagerly on CUDA instead of replaying CUDA graphs")
    _threads_option(gen, None)
    gen.set_defaults(run=cmd_generate)

    demo = commands.add_parser("demo", parents=[common], help="run the whole method on the embedded SmolLM2",
                               description="Teacher greedy traces on held-out arithmetic problems -> proxy "
                                           "gradient -> proxy pair -> temperature, permutation and "
                                           "antidistillation sampling on test problems, compared.")
    demo.add_argument("--model", default="smollm2", help=models + "; teacher and proxy")
    demo.add_argument("--problems", type=int, default=24, help="test problems")
    demo.add_argument("--holdout", type=int, default=16,
                      help="held-out problems whose teacher traces give the gradient")
    demo.add_argument("--max-new-tokens", type=int, default=48)
    demo.add_argument("--lams", type=float, nargs="+", default=[0.01, 0.02],
                      help="antidistillation strengths (the largest also for permutation sampling)")
    demo.add_argument("--tau", type=float, default=0.5, help="temperature of every test setting")
    demo.add_argument("--eps", type=float, default=1e-3,
                      help="finite-difference step (1e-3 agrees with 1e-4 to ~0.1%% in D on SmolLM2, and fewer "
                           "float32 perturbations round away)")
    demo.add_argument("--batch-size", type=int, default=16, help="prompts per generate call and gradient batch")
    demo.add_argument("--seed", type=int, default=0, help="sampling seed (the problems are fixed)")
    demo.add_argument("--show", type=int, default=0, help="index of the test problem whose traces are printed")
    _threads_option(demo, 1)
    demo.set_defaults(run=cmd_demo)
    dist = commands.add_parser("distill", parents=[common], help="fine-tune a student on traces (LoRA or full)",
                               description="Supervised fine-tuning with the loss on completion tokens only; "
                                           "defaults are the antidistillation paper's settings. The student "
                                           "(LoRA merged) is saved with safetensors.")
    dist.add_argument("--student", required=True, help=models)
    dist.add_argument("--traces", required=True, type=Path,
                      help="jsonl of prompts with completions (e.g. from `adfast generate`)")
    dist.add_argument("--out", required=True, type=Path, help="directory for the distilled student")
    dist.add_argument("--epochs", type=int, default=4)
    dist.add_argument("--batch-size", type=int, default=32)
    dist.add_argument("--lr", type=float, default=5e-4)
    dist.add_argument("--weight-decay", type=float, default=0.1)
    dist.add_argument("--warmup-frac", type=float, default=0.1)
    dist.add_argument("--lora-rank", type=int, default=128)
    dist.add_argument("--lora-alpha", type=float, default=None, help="default: the rank")
    dist.add_argument("--full", action="store_true", help="full fine-tune instead of LoRA")
    dist.add_argument("--retokenize", action="store_true",
                      help="ignore prompt_ids / completion_ids where the row has the text, and tokenize that "
                           "with the student's tokenizer (for a student whose tokenizer differs from the teacher's)")
    dist.add_argument("--seed", type=int, default=0)
    _threads_option(dist, None)
    dist.set_defaults(run=cmd_distill)

    ev = commands.add_parser("evaluate", parents=[common], help="a model's accuracy on task rows",
                             description="Rows: a prompt (prompt_ids, question or prompt), answer, optional kind "
                                         "(number, boxed, choice). Writes one jsonl row per task and prints the "
                                         "accuracy.")
    ev.add_argument("--model", required=True, help=models)
    ev.add_argument("--tasks", required=True, type=Path, help="jsonl of tasks")
    ev.add_argument("--out", required=True, type=Path, help="jsonl of the model's traces, checked")
    ev.add_argument("--max-new-tokens", type=int, default=256)
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--tau", type=float, default=0.0, help="sampling temperature; 0 (the default) is greedy")
    ev.add_argument("--top-p", type=float, default=1.0)
    ev.add_argument("--seed", type=int, default=0)
    _threads_option(ev, None)
    ev.set_defaults(run=cmd_evaluate)
    sw = commands.add_parser("sweep", help="the distillation experiment end to end from one config (resumable)",
                             description="holdout traces -> proxy gradient -> for each (mode, tau, lam) and seed: "
                                         "training traces, distilled student, teacher and student test accuracy "
                                         "-> results.json/csv and results.png. Config format: adfast.sweep.")
    sw.add_argument("config", type=Path, help="a .toml or .json sweep config")
    sw.add_argument("--progress", action="store_true", help="progress bars for every stage")
    _threads_option(sw, None)
    sw.set_defaults(run=cmd_sweep)
    eps_study.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``adfast`` command line; bad input exits with a one-line error (exit status 1)."""
    args = _parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        args.run(args)
    except (OSError, ValueError, ImportError, SafetensorError) as error:
        raise SystemExit(f"adfast {args.command}: error: {error}") from None
    return 0
