"""The finite-difference step ``eps`` of the embedded SmolLM2-135M-Instruct proxy, measured on CPU.

The model is its own teacher. Its greedy traces on the first ``--holdout`` held-out arithmetic
problems (:mod:`adfast.tasks`, ``--max-new-tokens`` each) give the proxy gradient ``g``
(:func:`adfast.gradient.proxy_gradient`, float32). Its greedy traces on the first ``--test``
test-split problems (never seen by ``g``) are the sequences of the sweep: at every position that
predicts a trace token, ``D_eps`` of a float32 / float16 / bfloat16 proxy pair is compared with the
exact float64 ``D`` (:func:`adfast.eps_study.sweep_eps`) for ``eps`` from 1e-7 to 1e-1 in half
decades.

Writes ``<out>/<name>.json`` (rows, recommendations, settings, timings), ``<out>/<name>.png`` and
``<out>/<name>.md`` (the table and the recommended ``eps`` per dtype).

Usage: ``python bench/eps_sweep.py [--holdout 16] [--test 6] [--max-new-tokens 64] [--threads 1]
[--out bench/results] [--name eps_sweep_smollm2_cpu]``
"""
import argparse
import os
from pathlib import Path

import torch

from adfast.eps_study import DEFAULT_DTYPES, DEFAULT_EPS, format_table, recommend_eps, sweep_eps, write_outputs
from smollm2_study import Stopwatch, command_line, cpu_name, smollm2_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--holdout", type=int, default=16, help="teacher traces for the proxy gradient")
    parser.add_argument("--test", type=int, default=6, help="held-out traces whose positions are scored")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtypes", nargs="+", default=list(DEFAULT_DTYPES))
    parser.add_argument("--eps", nargs="+", type=float, default=list(DEFAULT_EPS))
    parser.add_argument("--batch-size", type=int, default=3, help="sequences per forward pass in the sweep")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is fastest on a small shared CPU, where each op of a "
                             "2-thread pool waits for a busy core)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--name", default="eps_sweep_smollm2_cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    command = command_line()
    clock = Stopwatch()
    study = smollm2_study(args.holdout, args.test, args.max_new_tokens, clock)
    model, gradient, test_traces = study.model, study.gradient, study.test_traces
    sequences = list(zip(study.test_prompts, test_traces))
    rows = sweep_eps(model, gradient, sequences, dtypes=args.dtypes, eps_values=args.eps,
                     batch_size=args.batch_size)
    clock.lap("sweep")
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        clock.timings[f"sweep {dtype}"] = round(sum(r["seconds"] for r in rows if r["dtype"] == dtype), 1)

    clock.total()
    setup = {"model": "SmolLM2-135M-Instruct (embedded Q4_1 GGUF, dequantised, float32)", "command": command,
             "device": f"{cpu_name()}, {os.cpu_count()} cores (shared), {args.threads} torch thread(s)",
             "torch": torch.__version__, "holdout_traces": len(study.holdout),
             "holdout_trace_tokens": gradient.num_tokens,
             "holdout_greedy_accuracy": study.holdout_accuracy, "gradient_loss": gradient.loss,
             "gradient_norm": study.gradient_norm,
             "test_traces": len(study.test), "test_trace_tokens": [len(t) for t in test_traces],
             "max_new_tokens": args.max_new_tokens, "reference_dtype": "float64", "timings_s": clock.timings}
    json_path, png_path = write_outputs(rows, args.out, args.name, **setup)
    recommended = {dtype: recommend_eps(rows, dtype) for dtype in dict.fromkeys(r["dtype"] for r in rows)}
    table = format_table(rows, markdown=True)
    print(format_table(rows))
    print("recommended eps: " + ", ".join(f"{d} {e:g}" for d, e in recommended.items()))
    md = args.out / f"{args.name}.md"
    md.write_text(report(rows, recommended, setup, table, png_path.name))
    print(f"wrote {json_path}, {png_path}, {md} ({clock.timings['total']:.0f} s)")


def report(rows, recommended, setup, table, png_name) -> str:
    """The markdown summary: settings, the table, the recommendation per dtype."""
    lines = [
        "# Finite-difference step eps for SmolLM2-135M-Instruct on CPU",
        "",
        f"Command: `{setup['command']}` ({setup['device']}, torch {setup['torch']}; "
        f"total {setup['timings_s']['total']:.0f} s).",
        "",
        f"Proxy gradient `g`: {setup['holdout_traces']} greedy teacher traces of held-out problems "
        f"({setup['holdout_trace_tokens']} completion tokens, at most {setup['max_new_tokens']} new tokens each, "
        f"greedy accuracy {setup['holdout_greedy_accuracy']:.0%}), loss {setup['gradient_loss']:.3f}, "
        f"|g| = {setup['gradient_norm']:.3g}. Scored: every position that predicts a token of the greedy traces of "
        f"{setup['test_traces']} test-split problems ({sum(setup['test_trace_tokens'])} positions). "
        "Reference: the exact D by a float64 forward-mode JVP at the float32 weights. "
        "Per position: sine of the angle over the vocabulary between D_eps and D, and |D_eps - D| / |D|; "
        "the table shows their means over positions, and the fraction of perturbed weights whose "
        "perturbation rounded away (`D=0`: D_eps identically zero).",
        "",
        table,
        "",
        f"![sine vs eps]({png_name})",
        "",
        "Recommended eps (minimum mean sine; grid points within 10% of the minimum tie, and the middle "
        "of that plateau is taken):",
        "",
    ]
    for dtype, eps in recommended.items():
        grid = sorted((r for r in rows if r["dtype"] == dtype), key=lambda r: r["eps"])
        i = next(i for i, r in enumerate(grid) if r["eps"] == eps)
        neighbours = ", ".join(f"{r['eps']:.3g}: {r['sine']:.3g}" for r in grid[max(i - 1, 0):i + 2] if r is not grid[i])
        lines.append(f"- **{dtype}: eps = {eps:g}**: mean sine {grid[i]['sine']:.3g} (median "
                     f"{grid[i]['sine_median']:.3g}), relative error {grid[i]['rel_error']:.3g}, "
                     f"{grid[i]['vanished_fraction']:.1%} of perturbations rounded away; neighbours' mean sine "
                     f"{neighbours}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
