"""The finite-difference step ``eps`` of a Qwen2.5-shaped proxy with random weights.

The curve for the embedded SmolLM2-135M (``bench/eps_sweep.py``, CPU) shows where the float32,
float16 and bfloat16 sweet spots lie for a 30-layer, 576-wide model. This script measures the same
curve at the paper's proxy size (``--proxy qwen2.5-3b``: 36 layers, hidden 2048, vocabulary
151936; needs a GPU) or at Qwen2.5-0.5B's (``--proxy qwen2.5-0.5b``: 24 layers, hidden 896, the
same vocabulary; fits a 24 GiB CPU machine, where the float64 reference holds the weights and ``g``
in float64: the 3B shape's would need about 50 GB). Nothing can be downloaded, so the weights are
transformers' random initialisation (normal, std 0.02): the curve is that of a model of the real
shapes, not of a trained Qwen2.5, whose weights and gradient have other scales (so the absolute
``eps`` may move; what the curves share is what depth and width do to the round-off cliff).

The proxy gradient ``g`` is a real one: the mean completion NLL (:func:`adfast.gradient.proxy_gradient`,
float32) over ``--holdout`` random token sequences (prompt 32, completion 96 tokens). The sweep
scores every completion position of ``--test`` other random sequences: ``D_eps`` of float32,
float16 and bfloat16 pairs against the exact float64 ``D`` (:func:`adfast.eps_study.sweep_eps`),
``eps`` from 1e-6 to 10 in half decades by default: the SmolLM2 grid stops at 0.1, and a random
model's sweet spot can lie higher (bfloat16's is at 0.1 on the 0.5B shape).

Writes ``<out>/eps_sweep_<proxy>_random_<device>.json`` (``<proxy>``: ``qwen2_5_3b``,
``qwen2_5_0_5b`` or ``tiny``; rows, recommended ``eps`` per dtype, settings, timings) and ``.md``,
and the ``.png`` where matplotlib is importable (``--plot-only JSON`` draws it later from the JSON).

Usage: ``python bench/eps_sweep_random.py [--proxy qwen2.5-3b|qwen2.5-0.5b|tiny] [--holdout 16]
[--test 8] [--out bench/results]``
"""
import argparse
import json
import pathlib
import sys
import time

import torch

from adfast.eps_study import DEFAULT_DTYPES, PLATEAU_RTOL, format_table, plot_sweep, recommend_eps, sweep_eps
from adfast.gradient import proxy_gradient
from decode import SHAPES, random_model

PROMPT_LEN, COMPLETION_LEN = 32, 96
PROXIES = {  # name: (transformers Qwen2Config fields, whether it needs a GPU)
    "qwen2.5-3b": (SHAPES["real"]["proxy"], True),  # the decode benchmark's proxy
    "qwen2.5-0.5b": (dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                          num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True), False),
    "tiny": (SHAPES["tiny"]["proxy"], False),
}
EPS = tuple(float(f"{10 ** (k / 2):.3g}") for k in range(-12, 3))  # 1e-6, 3.16e-6, ..., 10


def random_sequences(count: int, vocab: int, seed: int) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (count, PROMPT_LEN + COMPLETION_LEN), generator=g).tolist()
    return [(row[:PROMPT_LEN], row[PROMPT_LEN:]) for row in ids]


def write_report(result: dict, stem: pathlib.Path) -> None:
    """``<stem>.md`` (settings, table, recommendations) and, with matplotlib, ``<stem>.png``."""
    rows, meta = result["rows"], result["meta"]
    lines = [f"# Finite-difference step eps: {meta['model']}, {meta['device']}", "",
             f"Command: `{meta['command']}` (torch {meta['torch']}; {meta['seconds']:.0f} s). Gradient: "
             f"{meta['holdout']} random sequences ({meta['gradient_tokens']} completion tokens), loss "
             f"{meta['gradient_loss']:.3f}, |g| = {meta['gradient_norm']:.3g}. Scored: {rows[0]['positions']} "
             f"completion positions of {meta['test']} other random sequences, against the exact D of a "
             "float64 JVP at the float32 weights. Mean over positions of the sine of the angle between "
             "D_eps and D (and of |D_eps - D| / |D|), and the fraction of perturbations that rounded away.",
             "", format_table(rows, markdown=True), "",
             f"Recommended eps (minimum mean sine, middle of the plateau within {PLATEAU_RTOL:.0%}): "
             + ", ".join(f"**{d}: {e:g}**" for d, e in result["recommended"].items()) + "."]
    try:
        plot_sweep(rows, stem.with_suffix(".png"), title=f"D_eps vs exact D, {meta['model']}")
        lines += ["", f"![sine vs eps]({stem.with_suffix('.png').name})"]
    except ImportError as error:
        print(f"{error}: no plot (run with --plot-only {stem.with_suffix('.json')} where it is installed)")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proxy", choices=list(PROXIES), default="qwen2.5-3b")
    parser.add_argument("--holdout", type=int, default=16, help="random sequences for the gradient")
    parser.add_argument("--test", type=int, default=8, help="random sequences whose positions are scored")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--dtypes", nargs="+", default=list(DEFAULT_DTYPES))
    parser.add_argument("--eps", nargs="+", type=float, default=list(EPS))
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    parser.add_argument("--plot-only", type=pathlib.Path, metavar="JSON",
                        help="only write the .md and .png of an earlier run's JSON")
    args = parser.parse_args(argv)
    if args.plot_only:
        write_report(json.loads(args.plot_only.read_text()), args.plot_only.with_suffix(""))
        return 0
    spec, needs_gpu = PROXIES[args.proxy]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if needs_gpu and device.type != "cuda":
        print(f"--proxy {args.proxy} needs a CUDA device (qwen2.5-0.5b and tiny run on the CPU)", file=sys.stderr)
        return 2
    began = time.perf_counter()
    torch.manual_seed(0)
    proxy = random_model(spec, torch.float32, device).requires_grad_(True)  # float32 weights: theta
    gradient = proxy_gradient(proxy, random_sequences(args.holdout, spec["vocab_size"], seed=1),
                              batch_size=args.batch_size, progress=False)
    rows = sweep_eps(proxy, gradient, random_sequences(args.test, spec["vocab_size"], seed=2), dtypes=args.dtypes,
                     eps_values=args.eps, batch_size=args.batch_size, progress=False)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    model = f"{args.proxy}-shaped, random weights"
    meta = dict(model=model, device=name, torch=torch.__version__, command=" ".join(["python"] + sys.argv),
                shapes=spec, holdout=args.holdout, test=args.test, prompt_len=PROMPT_LEN,
                completion_len=COMPLETION_LEN, gradient_loss=gradient.loss, gradient_tokens=gradient.num_tokens,
                gradient_norm=float(sum(g.double().square().sum() for g in gradient.grads.values()) ** 0.5),
                seconds=time.perf_counter() - began)
    recommended = {dtype: recommend_eps(rows, dtype) for dtype in dict.fromkeys(r["dtype"] for r in rows)}
    result = dict(meta=meta, plateau_rtol=PLATEAU_RTOL, recommended=recommended, rows=rows)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"eps_sweep_{args.proxy.replace('.', '_').replace('-', '_')}_random_{name.replace(' ', '_')}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    write_report(result, stem)
    print(format_table(rows))
    print("recommended eps: " + ", ".join(f"{d} {e:g}" for d, e in recommended.items()))
    print(f"wrote {stem}.json ({meta['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
