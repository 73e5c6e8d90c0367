"""Where a decode step's time goes: the engine's kernels, per step, from a profiler trace.

``bench/decode.py`` says how far a variant is from its weight-read limit; this script says why. It
builds one engine on the decode benchmark's shapes (random bf16 weights), captures its decode graph,
then profiles ``--steps`` steps (torch.profiler with CUDA activity: the kernels replayed from the
graph are traced one by one) and reduces the trace to, per step:

- ``busy_ms``: the union of kernel execution intervals (any stream), and ``span_ms``: first kernel
  start to last kernel end, so ``1 - busy / span`` is the share of the step in which no kernel ran
  (launch gaps and stream joins inside the graph, and the host's work between two replays: reading
  the drawn tokens, loading the next rows);
- per kernel name: launches and milliseconds per step, largest first: the matmuls' share against
  the weight-read limit, and the small kernels' count and cost.

:mod:`bench.decode`'s settings (``--linear kernel``, ``--linear-projections``, ``--linear-rows``,
``--prefetch-mb``; ``ADFAST_PDL=0``) profile those settings and name the variant as there. Writes
``bench/results/profile-<device>-<variant>-b<batch>.json`` (``device, variant, batch, steps,
busy_ms, span_ms, idle_frac, kernels: [{name, launches_per_step, ms_per_step}]``).
On CPU (``--shapes tiny``, a smoke test) the same reduction runs over the CPU operators instead.

Usage: ``python bench/profile_step.py [--shapes real|tiny] [--variant engine_antidistill] [--batch 1]
[--steps 16] [--rank 8] [--linear cublas|kernel] [--linear-projections ...] [--linear-rows 32]
[--prefetch-mb 0]``; variants: engine_temperature, engine_antidistill, engine_jvp, engine_jvp_lowrank.
"""
import argparse
import collections
import json
import pathlib
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import adfast
from adfast.decoder import Decoder
from decode import (EPS, LAM, SHAPES, TAU, add_setting_arguments, apply_settings, device_for, random_low_rank,
                    random_model, variant_suffix)

VARIANTS = ("engine_temperature", "engine_antidistill", "engine_jvp", "engine_jvp_lowrank")
PROMPT_LEN = 128


def build_engine(variant: str, spec: dict, rank: int, max_batch: int, max_seq_len: int, dtype, device):
    """The engine of ``variant`` on random models of ``spec``'s shapes (only the models it needs)."""
    teacher = Decoder.from_hf([random_model(spec["teacher"], dtype, device)], dtype=dtype, device=device)
    kw = dict(max_batch_size=max_batch, max_seq_len=max_seq_len, device=device, dtype=dtype)
    if variant == "engine_temperature":
        return adfast.Engine(teacher, None, **kw)
    proxy = random_model(spec["proxy"], dtype, device)
    if variant == "engine_jvp_lowrank":
        return adfast.Engine(teacher, proxy, delta="jvp", gradient=random_low_rank(proxy, rank, dtype, device), **kw)
    gradient = {n: torch.randn(p.shape, device=device, dtype=dtype) for n, p in proxy.named_parameters()}
    if variant == "engine_jvp":
        return adfast.Engine(teacher, proxy, delta="jvp", gradient=gradient, **kw)
    return adfast.Engine(teacher, adfast.ProxyPair.from_gradient(proxy, gradient, eps=EPS), **kw)


def summarize(events, steps: int, on_device: bool) -> dict:
    """Per-step busy time, span and per-name totals of the kernel events (CPU operators on CPU)."""
    kind = torch.autograd.DeviceType.CUDA if on_device else torch.autograd.DeviceType.CPU
    kernels = [e for e in events if e.device_type == kind and e.time_range.end > e.time_range.start]
    if not on_device:  # outermost aten operators only: their children would count twice
        kernels = [e for e in kernels if e.name.startswith("aten::")
                   and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))]
    intervals = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy, covered_to = 0.0, float("-inf")
    for start, end in intervals:  # by start: each interval adds the part past everything before it
        busy += max(0.0, end - max(start, covered_to))
        covered_to = max(covered_to, end)
    span = intervals[-1][1] - intervals[0][0] if intervals else 0.0
    per_name = collections.defaultdict(lambda: [0, 0.0])
    for e in kernels:
        per_name[e.name][0] += 1
        per_name[e.name][1] += e.time_range.end - e.time_range.start
    table = [dict(name=name, launches_per_step=count / steps, ms_per_step=us / steps / 1e3)
             for name, (count, us) in sorted(per_name.items(), key=lambda item: -item[1][1])]
    return dict(busy_ms=busy / steps / 1e3, span_ms=span / steps / 1e3,
                idle_frac=1 - busy / span if span else 0.0, kernels=table)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="real")
    parser.add_argument("--variant", choices=VARIANTS, default="engine_antidistill")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8, help="engine_jvp_lowrank: the gradient's rank")
    add_setting_arguments(parser)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    device = device_for(args.shapes)
    if device is None:
        return 2
    on_device = device.type == "cuda"
    dtype = torch.bfloat16 if on_device else torch.float32
    spec = SHAPES[args.shapes]
    engine = build_engine(args.variant, spec, args.rank, args.batch, PROMPT_LEN + args.steps + 8, dtype, device)
    for model in (engine.teacher, engine.proxies):
        if model is not None:
            apply_settings(model, args)
    prompts = torch.randint(1, spec["proxy"]["vocab_size"], (args.batch, PROMPT_LEN),
                            generator=torch.Generator().manual_seed(0)).tolist()
    mode = "temperature" if args.variant == "engine_temperature" else "antidistill"
    kw = dict(tau=TAU, lam=LAM, mode=mode, seed=0)
    engine.generate(prompts, max_new_tokens=4, **kw)  # graph capture, compilation
    # Profile decode steps only: the first step (which follows the prompts' prefill) runs before the
    # profiler starts; each step's events come out together, B per step.
    events = engine.stream(prompts, max_new_tokens=args.steps + 2, **kw)
    for _ in range(args.batch):
        next(events)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps * args.batch):
            next(events)
        if on_device:
            torch.cuda.synchronize(device)
    name = torch.cuda.get_device_name(device) if on_device else "cpu"
    variant = args.variant if args.variant != "engine_jvp_lowrank" else f"engine_jvp_r{args.rank}"
    variant += variant_suffix(args, device)
    result = dict(device=name, variant=variant, batch=args.batch, steps=args.steps,
                  **summarize(prof.events(), args.steps, on_device))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"profile-{name.replace(' ', '_')}-{variant}-b{args.batch}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{name} {variant} B={args.batch}: busy {result['busy_ms']:.3f} ms/step of {result['span_ms']:.3f} "
          f"({result['idle_frac']:.1%} idle)")
    for row in result["kernels"][:25]:
        print(f"  {row['ms_per_step']:8.3f} ms {row['launches_per_step']:7.1f}x  {row['name'][:100]}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
