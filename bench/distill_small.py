"""Does antidistillation poison a student? A small reproduction of the paper's experiment, on a CPU.

Everything is built here, nothing downloaded (:mod:`adfast.synthetic`): the *order-free sums* task
(add four digits one at a time in any order; many traces are correct), a Qwen2-architecture
teacher trained from scratch to high accuracy, a smaller Qwen2 proxy and a Llama student, both
only weakly pre-trained on a few reference traces (the paper pairs a Qwen teacher and proxy with a
Llama student). Then :mod:`adfast.sweep` runs the paper's pipeline: teacher traces on holdout
prompts, the proxy gradient, and for temperature sampling at several ``tau``, antidistillation at
several ``lam`` and permutation sampling at the same ``lam``: training traces, a distilled student
(full fine-tune), and the test accuracy of teacher (same sampling) and student (greedy), over
several seeds.

``lam`` is set in units of the spread of ``D``: ``lam = k / sigma_D`` for each ``k`` in
``lam_nats``, where ``sigma_D`` is the standard deviation of ``D`` over the vocabulary, averaged
over the completion positions of the holdout traces, so ``lam D`` moves log-probabilities by
about ``k`` nats.

The answer to "at matched teacher accuracy, is the antidistillation student worse?" is computed
per seed: the temperature curve of that seed (student accuracy against teacher accuracy, linear
between its points) is read at the teacher accuracy of each antidistillation / permutation
setting, and the gap (student minus temperature student) is averaged over seeds with a 95%
interval. Outputs: the sweep directory (``--out``) and, with ``--results``, a JSON summary and the
plot under ``bench/results/``.

Usage: ``python bench/distill_small.py [--preset full|mini] [--out DIR] [--results bench/results]``
(``mini`` is the CI miniature: every stage, tiny sizes, no claim about who wins).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from adfast import synthetic, tasks
from adfast.sweep import Sweep, interval, resolve_config

PRESETS = {
    "full": {
        "teacher": dict(architecture="qwen2", hidden=128, layers=4, heads=4, kv_heads=2, problems=2900,
                        samples=7, epochs=3),
        "proxy": dict(architecture="qwen2", hidden=96, layers=3, heads=4, kv_heads=2, problems=400, samples=1,
                      epochs=4),
        "student": dict(architecture="llama", hidden=96, layers=3, heads=4, kv_heads=2, problems=400, samples=1,
                        epochs=4),
        "prompts": dict(train=1100, holdout=200, test=500),
        "seeds": [0, 1, 2],
        "temperature_taus": [0.6, 0.9, 1.2, 1.5],
        "antidistill_tau": 0.6,
        "lam_nats": [1.0, 2.0],
        "distill": dict(full_finetune=True, lr=2e-3, weight_decay=0.01, batch_size=16, epochs=16, warmup_frac=0.1),
        "max_new_tokens": 32,
    },
    "mini": {
        "teacher": dict(architecture="qwen2", hidden=32, layers=1, heads=2, kv_heads=1, problems=200, samples=1,
                        epochs=1),
        "proxy": dict(architecture="qwen2", hidden=16, layers=1, heads=2, kv_heads=1, problems=50, samples=1,
                      epochs=1),
        "student": dict(architecture="llama", hidden=24, layers=1, heads=2, kv_heads=1, problems=50, samples=1,
                        epochs=1),
        "prompts": dict(train=24, holdout=8, test=16),
        "seeds": [0, 1],
        "temperature_taus": [0.8, 1.0],
        "antidistill_tau": 0.8,
        "lam_nats": [1.0],
        "distill": dict(full_finetune=True, lr=1e-3, weight_decay=0.01, batch_size=8, epochs=1, warmup_frac=0.1),
        "max_new_tokens": 28,
    },
}


def build_models(preset: dict, models_dir: Path) -> dict[str, str]:
    """Train (or reuse, when the directory exists) teacher, proxy and student; returns their paths."""
    tokenizer = synthetic.char_tokenizer()
    paths = {}
    for seed, role in enumerate(("teacher", "proxy", "student")):
        spec = dict(preset[role])
        path = models_dir / role
        paths[role] = str(path)
        if (path / "config.json").exists():
            continue
        split = "teacher" if role == "teacher" else "pretrain"
        examples = synthetic.reference_examples(tokenizer, synthetic.problems(split, spec.pop("problems")),
                                                samples_per_problem=spec.pop("samples"), seed=seed)
        epochs = spec.pop("epochs")
        model = synthetic.tiny_model(tokenizer=tokenizer, seed=seed, **spec)
        began = time.perf_counter()
        loss = synthetic.train_from_scratch(model, tokenizer, examples, epochs=epochs, seed=seed)
        record = {"seconds": time.perf_counter() - began, "final_loss": loss, "reference_traces": len(examples),
                  "parameters": sum(p.numel() for p in model.parameters())}
        tmp = path.with_name(role + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        synthetic.save(tmp, model, tokenizer)
        (tmp / "training.json").write_text(json.dumps(record, indent=2))
        tmp.rename(path)
        print(f"trained the {role} ({record['parameters'] / 1e6:.2f}M parameters) on {len(examples)} reference "
              f"traces in {record['seconds']:.0f} s, final loss {loss:.3f}", file=sys.stderr)
    return paths


def write_tasks(preset: dict, tasks_dir: Path) -> dict[str, str]:
    paths = {}
    for split, n in preset["prompts"].items():
        paths[split] = str(tasks_dir / f"{split}.jsonl")
        tasks.write_jsonl(paths[split], synthetic.task_rows(synthetic.problems(split, n)))
    return paths


def d_spread(sweep: Sweep) -> float:
    """``sigma_D``: the standard deviation over the vocabulary of ``D``, averaged over the
    completion positions of the holdout traces (teacher-forced through the proxy pair)."""
    pair = sweep.pair()
    spreads = []
    with torch.no_grad():
        for trace in sweep.holdout_traces():
            ids = torch.tensor([trace["prompt_ids"] + trace["completion_ids"]])
            plus, minus = (torch.log_softmax(m(input_ids=ids).logits[0].float(), -1) for m in (pair.plus, pair.minus))
            d = (plus - minus)[len(trace["prompt_ids"]) - 1:-1] / (2 * pair.eps)
            spreads.append(d.std(dim=-1))
    return float(torch.cat(spreads).mean())


def matched_gaps(rows: list[dict], seeds: list[int]) -> list[dict]:
    """Per antidistillation / permutation setting: the student accuracy minus the temperature
    student's at the same teacher accuracy (module docstring), per seed and as a 95% interval."""
    out = []
    settings = sorted({(r["mode"], r["tau"], r["lam"]) for r in rows if r["mode"] != "temperature"})
    for mode, tau, lam in settings:
        gaps, extrapolated = [], 0
        for seed in seeds:
            curve = sorted((r["teacher_accuracy"], r["student_accuracy"]) for r in rows
                           if r["mode"] == "temperature" and r["seed"] == seed)
            (point,) = [r for r in rows if (r["mode"], r["tau"], r["lam"], r["seed"]) == (mode, tau, lam, seed)]
            reference, outside = read_curve(curve, point["teacher_accuracy"])
            extrapolated += outside
            gaps.append(point["student_accuracy"] - reference)
        mean, half = interval(gaps)
        out.append({"mode": mode, "tau": tau, "lam": lam, "student_gap_vs_temperature": mean,
                     "student_gap_ci95": half, "per_seed": gaps, "seeds_outside_temperature_range": extrapolated})
    return out


def read_curve(curve: list[tuple[float, float]], x: float) -> tuple[float, bool]:
    """``curve`` (points sorted by x) read at ``x``: linear between neighbours (the mean y of equal
    x), the end value outside the range; also whether ``x`` was outside."""
    xs = sorted({p[0] for p in curve})
    ys = [sum(y for px, y in curve if px == cx) / sum(1 for px, _ in curve if px == cx) for cx in xs]
    if x <= xs[0] or x >= xs[-1]:
        return (ys[0] if x <= xs[0] else ys[-1]), not xs[0] <= x <= xs[-1]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0), False
    raise AssertionError("unreachable: x lies inside the curve's range")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--out", type=Path, default=Path("runs/distill_small"), help="working directory (resumable)")
    parser.add_argument("--results", type=Path, default=None,
                        help="where to write distill_small[_mini].json and .png (e.g. bench/results)")
    parser.add_argument("--models", type=Path, default=None,
                        help="directory of the trained teacher / proxy / student (default OUT/models; reused if present)")
    parser.add_argument("--proxy", choices=("trained", "student"), default="trained",
                        help="'student': use the undistilled student itself as the proxy (an oracle-proxy ablation)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="override the preset's seeds (a re-run with more seeds only runs the new ones)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = dict(PRESETS[args.preset])
    if args.seeds:
        preset["seeds"] = args.seeds
    began = time.perf_counter()
    out = args.out.resolve()
    models = build_models(preset, (args.models or out / "models").resolve())
    if args.proxy == "student":
        models["proxy"] = models["student"]
    training = {role: json.loads((Path(path) / "training.json").read_text()) for role, path in models.items()
                if (Path(path) / "training.json").exists()}
    raw = {"out": str(out / "sweep"), "seeds": preset["seeds"], "backend": "auto", "dtype": "float32", "device": "cpu",
           "models": models, "tasks": write_tasks(preset, out / "tasks"),
           "sampling": {"max_new_tokens": preset["max_new_tokens"], "batch_size": 256, "eps": 1e-4},
           "holdout": {"tau": 1.0}, "gradient": {"batch_size": 64}, "distill": preset["distill"],
           "evaluate": {"max_new_tokens": preset["max_new_tokens"], "batch_size": 512},
           "settings": [{"mode": "temperature", "tau": preset["temperature_taus"]}]}
    sigma = d_spread(Sweep(resolve_config(raw, out)))
    lams = [round(k / sigma, 6) for k in preset["lam_nats"]]
    print(f"sigma_D = {sigma:.4g}: lam = {lams} for {preset['lam_nats']} nats", file=sys.stderr)
    raw["settings"] += [{"mode": mode, "tau": preset["antidistill_tau"], "lam": lams}
                        for mode in ("antidistill", "permutation")]
    sweep = Sweep(resolve_config(raw, out))
    report = sweep.run()
    summary = {
        "preset": args.preset, "proxy": args.proxy, "device": f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
        "threads": torch.get_num_threads(),
        "seconds": {"models": sum(t["seconds"] for t in training.values()),
                    "runs": sum(r["seconds"] for r in report["rows"]),
                    "this_invocation": time.perf_counter() - began},
        "models": {role: {**preset[role], **training[role]} for role in training},
        "prompts": preset["prompts"], "sigma_D": sigma, "lam_nats": dict(zip(map(str, lams), preset["lam_nats"])),
        "student_base_accuracy": report["student_base_accuracy"],
        "student_base_holdout_nll": report["student_base_holdout_nll"], "summary": report["summary"],
        "matched": matched_gaps(report["rows"], preset["seeds"]), "rows": report["rows"],
    }
    print_tables(summary)
    if args.results is not None:
        name = "distill_small" + ("" if args.preset == "full" else f"_{args.preset}") + (
            "_oracle_proxy" if args.proxy == "student" else "")
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / f"{name}.json").write_text(json.dumps(summary, indent=2))
        if (out / "sweep" / "results.png").exists():
            shutil.copy(out / "sweep" / "results.png", args.results / f"{name}.png")
    return summary


def _fmt(mean, half) -> str:
    return "-" if mean is None else f"{mean:.3f}" + ("" if half is None or math.isnan(half) else f" ± {half:.3f}")


def print_tables(summary: dict) -> None:
    print("\n| mode | tau | lam (nats) | teacher acc | student acc | student holdout NLL | teacher log-prob/token |")
    print("|---|---|---|---|---|---|---|")
    for r in summary["summary"]:
        nats = summary["lam_nats"].get(str(r["lam"]), "")
        lam = "-" if r["mode"] == "temperature" else f"{r['lam']:.4g} ({nats})"
        print(f"| {r['mode']} | {r['tau']:g} | {lam} | {_fmt(r['teacher_accuracy'], r['teacher_accuracy_ci95'])} | "
              f"{_fmt(r['student_accuracy'], r['student_accuracy_ci95'])} | "
              f"{_fmt(r['student_holdout_nll'], r['student_holdout_nll_ci95'])} | "
              f"{_fmt(r['teacher_logprob'], r['teacher_logprob_ci95'])} |")
    print(f"| undistilled student | | | | {summary['student_base_accuracy']:.3f} | "
          f"{summary['student_base_holdout_nll']:.3f} | |")
    print("\n| mode | lam (nats) | student gap vs temperature at matched teacher accuracy | seeds outside range |")
    print("|---|---|---|---|")
    for m in summary["matched"]:
        print(f"| {m['mode']} | {summary['lam_nats'].get(str(m['lam']), m['lam'])} | "
              f"{_fmt(m['student_gap_vs_temperature'], m['student_gap_ci95'])} | {m['seeds_outside_temperature_range']} |")
    seconds = summary["seconds"]
    print(f"\ntraining the models {seconds['models']:.0f} s, the (setting, seed) runs {seconds['runs']:.0f} s; "
          f"this invocation {seconds['this_invocation']:.0f} s")


if __name__ == "__main__":
    main()
