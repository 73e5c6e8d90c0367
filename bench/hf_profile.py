"""Where Hugging Face ``generate`` with the antidistillation processor spends its host time.

At batch 1 a ``generate`` step is bound by the host (Python dispatching a few thousand kernels),
so the step time is the host's. This script builds the decode benchmark's models (random bf16
weights; ``--shapes real``: the Qwen2.5-7B teacher and 3B proxy pair on a GPU, ``tiny``: the same
layer counts at width 64, any device), warms up, then runs ``generate`` for ``--new-tokens``
tokens twice, temperature sampling and with :class:`adfast.hf.AntidistillationLogitsProcessor`,
each under ``cProfile``, and writes the step times and the functions with the most cumulative and
own time of each run to ``bench/results/hf_profile-<device>.txt``: the processor's proxies run
72 layers a step against the teacher's 28, so if its step costs much more than ``72 / 28`` times
the teacher's share, the profile says where the rest goes.

Usage: ``python bench/hf_profile.py [--shapes real|tiny] [--new-tokens 32] [--out bench/results]``.
"""
import argparse
import cProfile
import io
import pathlib
import pstats
import sys
import time

import torch

import adfast
from decode import EPS, LAM, SHAPES, TAU, device_for, hf_run, random_model

TINY_WIDTHS = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=["real", "tiny"], default="real")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    device = device_for(args.shapes)
    if device is None:
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    spec = {role: dict(SHAPES["real"][role], **({} if args.shapes == "real" else TINY_WIDTHS),
                       vocab_size=SHAPES[args.shapes][role]["vocab_size"]) for role in ("teacher", "proxy")}
    teacher, proxy = random_model(spec["teacher"], dtype, device), random_model(spec["proxy"], dtype, device)
    gradient = {n: torch.randn(p.shape, device=device, dtype=dtype) for n, p in proxy.named_parameters()}
    pair = adfast.ProxyPair.from_gradient(proxy, gradient, eps=EPS)
    del proxy, gradient
    prompts = torch.randint(1, spec["proxy"]["vocab_size"], (1, 128), generator=torch.Generator().manual_seed(0))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = [f"{name}, {args.shapes} shapes, batch 1, prompt 128, {args.new_tokens} new tokens "
              f"(tau {TAU}, lam {LAM}, eps {EPS})"]
    for mode in ("temperature", "antidistill"):
        hf_run(teacher, pair, mode, prompts.tolist(), 4)()  # warm-up: kernels compiled, caches sized
        run = hf_run(teacher, pair, mode, prompts.tolist(), args.new_tokens)
        profiler = cProfile.Profile()
        began = time.perf_counter()
        profiler.runcall(run)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ms = 1e3 * (time.perf_counter() - began) / args.new_tokens
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats("cumulative").print_stats(40)
        stats.sort_stats("tottime").print_stats(25)
        report.append(f"\n==== {mode}: {ms:.2f} ms/step under cProfile\n{text.getvalue()}")
        print(f"{mode}: {ms:.2f} ms/step", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"hf_profile-{name.replace(' ', '_')}{'' if args.shapes == 'real' else '-tiny'}.txt"
    path.write_text("\n".join(report))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
