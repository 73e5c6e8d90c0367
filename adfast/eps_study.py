"""Choosing the finite-difference step ``eps``: the proxy pair's ``D_eps`` against the exact ``D``, per dtype.

For each dtype (the proxy pair's weights and compute: float32, float16, bfloat16) and each ``eps``
of a grid, :func:`sweep_eps` builds the pair ``theta +- eps g`` as the sampler does
(:class:`adfast.exact_delta.FiniteDifference`) and compares its ``D_eps`` with the exact ``D``
(:func:`adfast.exact_delta.exact_delta`, float64 by default) at every scored position:

    sine      = sin angle(D_eps[t, :], D[t, :])          (over the vocabulary; paper appendix C.1)
    rel_error = |D_eps[t, :] - D[t, :]| / |D[t, :]|

averaged over positions. ``sine`` measures the direction only, which is what matters up to the
scale that ``lam`` absorbs; ``rel_error`` also sees a wrong scale. Too small an ``eps`` rounds the
perturbation away (``vanished_fraction`` -> 1; at 1 ``D_eps`` is identically 0, flagged
``all_zero``, sine 1) or drowns it in rounded logits; too large an ``eps`` adds truncation error
``~eps^2``. The reference is the derivative at the proxy's own weights (as loaded, usually
float32), so a low-precision curve also contains the error of rounding weights and activations
to that dtype: the error the low-precision sampler really makes.

Positions: a sequence given as ``(prompt_ids, completion_ids)`` is scored at the positions that
predict its completion tokens (``t = s - 1 .. s + n - 2`` for ``s`` prompt and ``n`` completion
tokens: where the sampler evaluates ``D`` while writing that text); a plain id list at all of its
positions.

Command line (:func:`main`, or ``adfast check-eps`` via :func:`add_parser`): prints the table and
the recommended ``eps`` per dtype, writes ``<out>/<name>.json`` and ``<out>/<name>.png`` (sine
against ``eps``, log-log, one curve per dtype; needs matplotlib).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .exact_delta import FiniteDifference, angle_sine, exact_delta, relative_error, resolve_gradient

DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ALIASES = {"fp64": "float64", "fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
DEFAULT_DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_EPS = tuple(float(f"{10 ** (k / 2):.3g}") for k in range(-14, -1))  # 1e-7, 3.16e-7, ..., 1e-1
PLATEAU_RTOL = 0.1


def dtype_name(dtype: str | torch.dtype) -> str:
    """The canonical name (``"bfloat16"``, ...) of a torch dtype, a name or an alias (``bf16``, ``fp16``, ...)."""
    if isinstance(dtype, torch.dtype):
        names = [name for name, d in DTYPES.items() if d == dtype]
        if not names:
            raise ValueError(f"unsupported dtype {dtype}: choose from {sorted(DTYPES)}")
        return names[0]
    name = ALIASES.get(str(dtype), str(dtype))
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose from {sorted(DTYPES)} or {sorted(ALIASES)}")
    return name


def _scored_batches(sequences, batch_size: int):
    """Right-padded ``(input_ids, attention_mask, scored)`` batches, each ``[B, T]`` (``scored`` bool)."""
    items = []
    for i, seq in enumerate(sequences):
        if isinstance(seq, tuple) and len(seq) == 2:
            prompt, completion = (list(map(int, part)) for part in seq)
            if not prompt or not completion:
                raise ValueError(f"sequence {i}: prompt and completion must both be non-empty")
            items.append((prompt + completion, len(prompt) - 1, len(prompt) + len(completion) - 1))
        else:
            ids = list(map(int, seq))
            if not ids:
                raise ValueError(f"sequence {i} is empty")
            items.append((ids, 0, len(ids)))
    if not items:
        raise ValueError("no sequences to score")
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        width = max(len(ids) for ids, _, _ in chunk)
        input_ids = torch.zeros(len(chunk), width, dtype=torch.int64)
        mask = torch.zeros(len(chunk), width, dtype=torch.int64)
        scored = torch.zeros(len(chunk), width, dtype=torch.bool)
        for b, (ids, first, end) in enumerate(chunk):
            input_ids[b, :len(ids)] = torch.tensor(ids)
            mask[b, :len(ids)] = 1
            scored[b, first:end] = True
        yield input_ids, mask, scored


def sweep_eps(proxy: nn.Module, g, sequences: Sequence, *, dtypes: Sequence = DEFAULT_DTYPES,
              eps_values: Sequence[float] = DEFAULT_EPS, reference_dtype: str | torch.dtype = "float64",
              batch_size: int = 4, progress: bool = True) -> list[dict]:
    """Compare ``D_eps`` with the exact ``D`` for every (dtype, eps) pair (module docstring).

    Args:
        proxy: a transformers Llama or Qwen2 causal LM (its weights, as loaded, are ``theta``).
        g: a ProxyGradient, a mapping name -> tensor, or a gradient file.
        sequences: token id lists, or ``(prompt_ids, completion_ids)`` pairs (scored positions above).
        dtypes: names or torch dtypes of the pairs (aliases ``fp32``, ``fp16``, ``bf16`` accepted).
        eps_values: the grid (default 1e-7 to 1e-1 in half decades).
        reference_dtype: ``float64`` (true float64, the default) or ``float32`` for the exact ``D``.
        batch_size: sequences per forward pass.

    Returns:
        One dict per (dtype, eps), dtypes in the given order and ``eps`` ascending, with ``dtype``,
        ``eps``, ``sine`` (mean over positions), ``sine_median``, ``rel_error`` (mean),
        ``vanished_fraction``, ``zero_fraction`` (positions where ``D_eps`` is identically 0),
        ``all_zero``, ``positions`` and ``seconds``.
    """
    names = [dtype_name(d) for d in dtypes]
    reference = DTYPES[dtype_name(reference_dtype)]
    eps_grid = sorted(float(e) for e in eps_values)
    if not names or not eps_grid:
        raise ValueError("dtypes and eps_values must be non-empty")
    if len(set(names)) != len(names) or len(set(eps_grid)) != len(eps_grid):
        raise ValueError(f"dtypes and eps_values must not repeat, got {names} and {eps_grid}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    grads = resolve_gradient(proxy, g)
    device = next(proxy.parameters()).device
    batches = list(_scored_batches(sequences, batch_size))
    exact = [exact_delta(proxy, grads, ids, attention_mask=mask, dtype=reference)[scored.to(device)].cpu()
             for ids, mask, scored in tqdm(batches, desc="exact D (JVP)", disable=not progress)]
    rows = []
    for name in names:
        pair = FiniteDifference(proxy, grads, dtype=DTYPES[name])
        for eps in tqdm(eps_grid, desc=f"D_eps {name}", disable=not progress):
            began = time.perf_counter()
            pair.set_eps(eps)
            sines, errors, zeros = [], [], []
            for (ids, mask, scored), reference_d in zip(batches, exact):
                approx = pair.delta(ids, mask)[scored.to(device)].cpu()
                sines.append(angle_sine(approx, reference_d))
                errors.append(relative_error(approx, reference_d))
                zeros.append((approx == 0).all(dim=-1))
            sine, error, zero = torch.cat(sines), torch.cat(errors), torch.cat(zeros)
            rows.append({"dtype": name, "eps": eps, "sine": sine.mean().item(), "sine_median": sine.median().item(),
                         "rel_error": error.mean().item(), "vanished_fraction": pair.vanished_fraction,
                         "zero_fraction": zero.double().mean().item(), "all_zero": bool(zero.all()),
                         "positions": int(sine.numel()), "seconds": time.perf_counter() - began})
        del pair  # free this pair before the next dtype's is built
    return rows


def recommend_eps(rows: list[dict], dtype: str | torch.dtype, *, rtol: float = PLATEAU_RTOL) -> float:
    """The grid ``eps`` that minimises the mean sine for ``dtype``, plateaus broken towards their middle.

    Rows whose sine is NaN (non-finite ``D_eps``) are skipped. Every ``eps`` whose mean sine is
    within ``(1 + rtol)`` of the minimum counts as a tie; of the contiguous run of such grid
    points around the (smallest) minimiser, the middle one is returned (the larger of the two
    middle points for an even count): the choice farthest from both the round-off and the
    truncation cliffs, so the least sensitive to a different gradient scale or model.
    """
    name = dtype_name(dtype)
    grid = sorted((r for r in rows if r["dtype"] == name and not math.isnan(r["sine"])), key=lambda r: r["eps"])
    if not grid:
        raise ValueError(f"no finite rows for dtype {name}")
    if rtol < 0:
        raise ValueError(f"rtol must be >= 0, got {rtol}")
    best = min(range(len(grid)), key=lambda i: grid[i]["sine"])
    bound = grid[best]["sine"] * (1 + rtol)
    low = high = best
    while low > 0 and grid[low - 1]["sine"] <= bound:
        low -= 1
    while high < len(grid) - 1 and grid[high + 1]["sine"] <= bound:
        high += 1
    return grid[(low + high + 1) // 2]["eps"]


def format_table(rows: list[dict], *, markdown: bool = False) -> str:
    """One line per ``eps``; per dtype the mean sine, the mean relative error and the vanished fraction.

    A ``D_eps`` that is identically 0 everywhere shows as ``D=0``.
    """
    names = list(dict.fromkeys(r["dtype"] for r in rows))
    by_key = {(r["dtype"], r["eps"]): r for r in rows}
    header = ["eps"] + [f"{name} {col}" for name in names for col in ("sine", "rel.err", "vanished")]
    lines = []
    for eps in sorted({r["eps"] for r in rows}):
        cells = [f"{eps:.3g}"]
        for name in names:
            r = by_key.get((name, eps))
            if r is None:
                cells += ["-"] * 3
            elif r["all_zero"]:
                cells += ["D=0", "D=0", f"{r['vanished_fraction']:.1%}"]
            else:
                cells += [f"{r['sine']:.3g}", f"{r['rel_error']:.3g}", f"{r['vanished_fraction']:.1%}"]
        lines.append(cells)
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(out + ["| " + " | ".join(cells) + " |" for cells in lines])
    widths = [max(len(row[i]) for row in [header] + lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [header] + lines)


def plot_sweep(rows: list[dict], path, *, title: str = "finite-difference D vs exact D") -> None:
    """Save a log-log plot of mean sine against ``eps``, one curve per dtype, to ``path`` (PNG).

    All-zero points (every perturbation rounded away) are drawn as crosses at sine 1; each dtype's
    :func:`recommend_eps` is starred.
    """
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name in dict.fromkeys(r["dtype"] for r in rows):
        grid = sorted((r for r in rows if r["dtype"] == name), key=lambda r: r["eps"])
        (line,) = ax.plot([r["eps"] for r in grid], [r["sine"] for r in grid], marker="o", ms=4, label=name)
        zero = [r["eps"] for r in grid if r["all_zero"]]
        if zero:
            ax.plot(zero, [1.0] * len(zero), "x", color=line.get_color(), ms=8)
        best = recommend_eps(rows, name)
        ax.plot([best], [next(r["sine"] for r in grid if r["eps"] == best)], "*", color=line.get_color(), ms=14)
    ax.set(xscale="log", yscale="log", xlabel="eps", ylabel="mean sin angle(D_eps, D) over positions", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title="pair dtype (x: D_eps = 0, *: recommended)", fontsize=8, title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(rows: list[dict], out_dir, name: str = "eps_sweep", **meta) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.json`` (``meta``, ``rows``, ``recommended`` per dtype) and ``<name>.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    recommended = {dtype: recommend_eps(rows, dtype) for dtype in dict.fromkeys(r["dtype"] for r in rows)}
    json_path, png_path = out_dir / f"{name}.json", out_dir / f"{name}.png"
    json_path.write_text(json.dumps({**meta, "plateau_rtol": PLATEAU_RTOL, "recommended": recommended,
                                     "rows": rows}, indent=1) + "\n")
    plot_sweep(rows, png_path)
    return json_path, png_path


def greedy_completions(model: nn.Module, tokenizer, prompts: list[list[int]], *, max_new_tokens: int,
                       batch_size: int = 8) -> list[list[int]]:
    """Greedy completions (ids up to and including the first EOS) of ``prompts`` by ``model`` (HF generate,
    left-padded batches)."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    device = next(model.parameters()).device
    completions = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        width = max(map(len, batch))
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad)
        for ids in out[:, width:].tolist():
            completions.append(ids[:ids.index(eos) + 1] if eos in ids else ids)
    return completions


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    models = "a Hugging Face directory with safetensors weights, a .gguf file, or 'smollm2' (embedded)"
    parser.add_argument("--proxy", required=True, help=models + " (loaded in float32: theta)")
    parser.add_argument("--grad", required=True, type=Path, help="the proxy gradient from `adfast grad`")
    parser.add_argument("--dtype", nargs="+", default=list(DEFAULT_DTYPES),
                        help="proxy-pair dtypes to sweep (float32/fp32, float16/fp16, bfloat16/bf16, float64)")
    parser.add_argument("--eps", nargs="+", type=float, default=list(DEFAULT_EPS), help="the eps grid")
    parser.add_argument("--prompts", type=Path,
                        help="jsonl of prompts, with or without completions (default: built-in test problems); "
                             "rows without a completion get the proxy's greedy one")
    parser.add_argument("--num-prompts", type=int, default=4, help="use the first N prompts")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="length of generated completions")
    parser.add_argument("--reference", choices=("float64", "float32"), default="float64",
                        help="dtype of the exact D (the JVP)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for <name>.json and <name>.png")
    parser.add_argument("--name", default="eps_sweep", help="stem of the output files")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: torch's choice; on a small shared CPU 1 is often fastest)")


def run(args: argparse.Namespace) -> None:
    """The ``check-eps`` command on parsed arguments."""
    from . import tasks
    from .gradient import load_gradient
    from .models import load_model

    began = time.perf_counter()
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    dtypes = [dtype_name(d) for d in args.dtype]
    gradient = load_gradient(args.grad)
    proxy, tokenizer = load_model(args.proxy, dtype="float32", device=args.device)
    if args.prompts is None:
        rows = [{"question": p.question} for p in tasks.problems("test", args.num_prompts)]
    else:
        rows = tasks.read_jsonl(args.prompts)[:args.num_prompts]
        if not rows:
            raise ValueError(f"{args.prompts} holds no prompts")
    prompts = [tasks.prompt_ids(tokenizer, row, f"prompt {i}") for i, row in enumerate(rows, 1)]
    missing = [i for i, row in enumerate(rows) if "completion_ids" not in row and "completion" not in row]
    generated = dict(zip(missing, greedy_completions(proxy, tokenizer, [prompts[i] for i in missing],
                                                     max_new_tokens=args.max_new_tokens)))
    sequences = [(p, generated[i] if i in generated else tasks.completion_ids(tokenizer, row, f"prompt {i + 1}"))
                 for i, (p, row) in enumerate(zip(prompts, rows))]
    sweep = sweep_eps(proxy, gradient, sequences, dtypes=dtypes, eps_values=args.eps,
                      reference_dtype=args.reference, batch_size=args.batch_size)
    print(format_table(sweep))
    json_path, png_path = write_outputs(
        sweep, args.out, args.name, proxy=str(args.proxy), grad=str(args.grad), reference_dtype=args.reference,
        sequences=len(sequences), seconds=time.perf_counter() - began)
    for dtype in dtypes:
        print(f"recommended eps for {dtype}: {recommend_eps(sweep, dtype):g}")
    print(f"wrote {json_path} and {png_path} ({time.perf_counter() - began:.0f} s)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``check-eps`` on an argparse subparsers object (``adfast check-eps``); returns its parser."""
    parser = subparsers.add_parser("check-eps", help="measure the finite-difference error of D against eps",
                                   description=__doc__.split("\n")[0])
    _add_arguments(parser)
    parser.set_defaults(run=run)
    return parser


__all__ = ["DEFAULT_EPS", "add_parser", "dtype_name", "format_table", "greedy_completions", "plot_sweep",
           "recommend_eps", "sweep_eps", "write_outputs"]
