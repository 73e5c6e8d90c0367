"""Where does an antidistilled student's extra loss go? Holdout NLL split into choice and forced tokens.

Reads a finished ``bench/distill_small.py`` run, distils the student again (same seed, same
settings as the sweep) on the training traces of the chosen settings, and splits its NLL on the
holdout traces (the teacher's temperature traces whose loss ``g`` is the gradient of) by token
class. In an order-free-sums trace ``a+b=c;c+d=e;e+f=g#g`` the *choice* tokens are the operands the
trace picks (``a``, ``b``, ``d``) while at least two different numbers of the prompt are unused
(any of them is correct there); every other token (the last operand ``f``, partial sums,
``+ = ; #``, the answer, EOS) is *forced* by the choices made so far. A student whose loss rises on choice tokens has learned other preferences
among equally correct orders; on forced tokens, it has learned to compute worse.

It also describes how each setting's training traces order their additions
(:func:`order_statistics`): a teacher that always added in one canonical order would leave the
student less to learn about choosing.

Usage: ``python bench/distill_small_tokens.py --run runs/distill_small [--seed 0] [--results bench/results]``
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from adfast import tasks
from adfast.distill import distill
from adfast.gradient import _batch
from adfast.models import load_model


def prompt_numbers(tokenizer, prompt_ids: list[int]) -> list[int]:
    """The digits of a prompt ``"7+3+4+7="``, in order."""
    return [int(x) for x in tokenizer.decode(prompt_ids).rstrip("=").split("+")]


def choice_mask(tokenizer, prompt_ids: list[int], completion_ids: list[int]) -> list[bool]:
    """Per completion token: whether it is an operand digit the trace chose while more than one
    distinct number of the prompt was still unused (module docstring); the last number is forced."""
    remaining = prompt_numbers(tokenizer, prompt_ids)
    mask, step, operand = [], 0, 0  # operand: 0 = first, 1 = second, 2 = past "=" or "#"
    for token in tokenizer.convert_ids_to_tokens(completion_ids):
        if token == ";":
            step, operand = step + 1, 0
        elif token == "+":
            operand = 1
        elif token in ("=", "#"):
            operand = 2
        picked = token.isdigit() and (operand == 1 or (operand == 0 and step == 0))
        mask.append(picked and len(set(remaining)) > 1)
        if picked and int(token) in remaining:  # operands are single digits
            remaining.remove(int(token))
    return mask


def picked_order(tokenizer, prompt_ids: list[int], completion_ids: list[int]) -> list[int] | None:
    """The prompt's numbers in the order the trace adds them, or None when the trace is not a
    well-formed order of exactly those numbers."""
    numbers = prompt_numbers(tokenizer, prompt_ids)
    steps = tokenizer.decode(completion_ids, skip_special_tokens=True).split("#")[0].split(";")
    try:
        operands = [int(steps[0].split("+")[0])] + [int(step.split("+")[1].split("=")[0]) for step in steps]
    except (IndexError, ValueError):
        return None
    return operands if sorted(operands) == sorted(numbers) else None


def order_statistics(tokenizer, traces: list[dict]) -> dict[str, float]:
    """How the traces order their additions: the fraction of well-formed orders, of orders that
    are the prompt's order, ascending or descending by value (ties as in the prompt count for
    either), and the entropy (nats) of the prompt position of the first number added (None when
    no trace is well formed)."""
    orders = [(picked_order(tokenizer, t["prompt_ids"], t["completion_ids"]),
               prompt_numbers(tokenizer, t["prompt_ids"])) for t in traces]
    valid = [(order, numbers) for order, numbers in orders if order is not None]
    if not valid:
        return {"well_formed": 0.0, "prompt_order": None, "ascending": None, "descending": None,
                "first_pick_position_entropy": None, "first_pick_position_shares": None}
    first = [0] * max(len(numbers) for _, numbers in valid)
    for order, numbers in valid:
        first[numbers.index(order[0])] += 1
    shares = [count / len(valid) for count in first]
    return {"well_formed": len(valid) / len(traces),
            "prompt_order": sum(order == numbers for order, numbers in valid) / len(valid),
            "ascending": sum(order == sorted(numbers) for order, numbers in valid) / len(valid),
            "descending": sum(order == sorted(numbers, reverse=True) for order, numbers in valid) / len(valid),
            "first_pick_position_entropy": -sum(p * math.log(p) for p in shares if p > 0),
            "first_pick_position_shares": shares}


def nll_by_class(model, tokenizer, examples, batch_size: int = 64) -> dict[str, float]:
    """Mean NLL per completion token of ``examples``, over all, choice and forced tokens (None where
    there is no such token), and the token counts."""
    sums, counts = {"all": 0.0, "choice": 0.0, "forced": 0.0}, {"all": 0, "choice": 0, "forced": 0}
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = examples[start:start + batch_size]
            input_ids, mask, scored = _batch(batch, tokenizer.pad_token_id, "cpu")
            logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
            token_nll = F.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")
            for row, (prompt, completion) in enumerate(batch):
                values = token_nll[row, len(prompt) - 1:len(prompt) - 1 + len(completion)].tolist()
                for value, chosen in zip(values, choice_mask(tokenizer, prompt, completion)):
                    for key in ("all", "choice" if chosen else "forced"):
                        sums[key] += value
                        counts[key] += 1
    means = {key: sums[key] / counts[key] if counts[key] else None for key in sums}
    return means | {f"{key}_tokens": counts[key] for key in counts}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="the --out directory of bench/distill_small.py")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settings", nargs="+", default=None,
                        help="setting labels under RUN/sweep/runs (default: all)")
    parser.add_argument("--results", type=Path, default=None, help="write distill_small[_oracle_proxy]_tokens.json here")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sweep = args.run / "sweep"
    config = json.loads((sweep / "config.json").read_text())
    base, tokenizer = load_model(config["models"]["student"])
    holdout = [(t["prompt_ids"], t["completion_ids"]) for t in tasks.read_jsonl(sweep / "holdout_traces.jsonl")]
    labels = args.settings or sorted(p.name for p in (sweep / "runs").iterdir())
    rows = []
    for label in labels:
        where = sweep / "runs" / label / f"seed{args.seed}"
        result = json.loads((where / "result.json").read_text())
        train_traces = tasks.read_jsonl(where / "train_traces.jsonl")
        train = [(t["prompt_ids"], t["completion_ids"]) for t in train_traces]
        student = copy.deepcopy(base)
        distill(student, tokenizer, train, seed=args.seed, progress=False, **config["distill"])
        nll = nll_by_class(student, tokenizer, holdout)
        rows.append({"setting": label, "seed": args.seed, "teacher_accuracy": result["teacher_accuracy"],
                     "student_accuracy": result["student_accuracy"],
                     "sweep_student_holdout_nll": result["student_holdout_nll"], **nll,
                     "train_trace_orders": order_statistics(tokenizer, train_traces)})
        orders = rows[-1]["train_trace_orders"]
        print(f"{label:36s} NLL all {nll['all']:.4f} (sweep {result['student_holdout_nll']:.4f}) "
              f"choice {nll['choice']:.4f} forced {nll['forced']:.4f}; train orders: {orders}", file=sys.stderr)
    if args.results is not None:
        args.results.mkdir(parents=True, exist_ok=True)
        oracle = config["models"]["proxy"] == config["models"]["student"]
        name = "distill_small_oracle_proxy_tokens.json" if oracle else "distill_small_tokens.json"
        (args.results / name).write_text(json.dumps(rows, indent=2))
    return {"rows": rows}


if __name__ == "__main__":
    main()
