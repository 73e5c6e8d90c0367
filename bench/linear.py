"""Decode-time linear layers: cuBLAS against adfast's split-K kernel (adfast.kernels.decode_linear).

For every linear weight of a decode step (the Qwen2.5-7B-shaped teacher, one copy; the
Qwen2.5-3B-shaped proxy pair, two copies stacked as the engine holds them; bf16) and batch rows
``M``, the time of one ``x W^T (+ b)``:

- ``cublas``: :func:`adfast.matmul.linear` (``F.linear`` for one copy, ``bmm`` / ``baddbmm`` for the pair);
- ``kernel``: :func:`adfast.kernels.decode_linear.decode_linear` with its default plan;
- with ``--sweep``, the kernel with one choice of the plan changed at a time (``block_n``,
  ``block_k``, ``programs_per_sm`` which sets the K split, ``num_stages``, ``num_warps``), at the
  ``--sweep-rows`` (1 and 32) and every layer but lm_head;
- with ``--swap-sweep``, the kernel with the weight tile leading the product (``swap_ab``: the
  warpgroup MMA, 64 or 128 weight rows a tile) and the programs per SM and pipeline stages that fit
  its larger tiles, at every ``--rows`` and layer;
- with ``--prefetch-sweep``, the kernel asking L2 for more of its weight rows before it waits on the
  launch before it (``prefetch_steps`` 8 and 64 ``BLOCK_K`` steps against the default 2: with
  programmatic dependent launch, during that launch's last programs), at every ``--rows`` and layer.

Timing: one CUDA graph of calls on distinct copies of the weight (at least 4, and together at least
256 MiB, four times the L2 cache, so every call reads its weight from memory as a decode step's
layers do), replayed by ``triton.testing.do_bench`` (L2 flushed between replays), over the number
of calls. ``tb_s`` counts the weight, bias, input and output bytes; ``copy_frac`` is that rate over
the device-to-device copy bandwidth measured in the same run. The layer's bytes at the engine's
step are the weight's (``M`` rows of activations are a few KiB).

Writes ``bench/results/<stem>-<device>.json`` (``--stem``, default ``linear``; rows: ``device, model,
layer, copies, rows, outputs, inputs, backend, plan, us, tb_s, copy_frac``) and prints the table.

Usage: ``python bench/linear.py [--rows 1 8 32 64] [--sweep [--sweep-rows 1 32]] [--swap-sweep]
[--prefetch-sweep] [--stem linear] [--out bench/results]``.
"""
import argparse
import dataclasses
import json
import pathlib
import sys

import torch

from adfast.matmul import linear
from adfast.kernels.decode_linear import counters_for, decode_linear, plan_linear
from sampler import device_and_bandwidth, graph_time_ms

# (model, copies, layer, outputs, inputs, bias): the decode step's weights, lm_head included
LAYERS = [("teacher-7b", 1, "qkv", 4608, 3584, True), ("teacher-7b", 1, "o", 3584, 3584, False),
          ("teacher-7b", 1, "gate_up", 37888, 3584, False), ("teacher-7b", 1, "down", 3584, 18944, False),
          ("teacher-7b", 1, "lm_head", 152064, 3584, False),
          ("proxy-pair-3b", 2, "qkv", 2560, 2048, True), ("proxy-pair-3b", 2, "o", 2048, 2048, False),
          ("proxy-pair-3b", 2, "gate_up", 22016, 2048, False), ("proxy-pair-3b", 2, "down", 2048, 11008, False),
          ("proxy-pair-3b", 2, "lm_head", 151936, 2048, False)]
SWEEP = [dict(block_n=16), dict(block_n=64), dict(block_k=128), dict(block_k=256), dict(block_k=512),
         dict(programs_per_sm=2), dict(programs_per_sm=4), dict(programs_per_sm=8), dict(num_stages=2),
         dict(num_stages=4), dict(num_warps=8)]
SWAP_SWEEP = [dict(swap_ab=True, block_n=64), dict(swap_ab=True, block_n=128),
              dict(swap_ab=True, block_n=128, programs_per_sm=1),
              dict(swap_ab=True, block_n=128, programs_per_sm=2, num_stages=2)]
PREFETCH_SWEEP = [dict(prefetch_steps=8), dict(prefetch_steps=64)]
FLOOR_BYTES = 256 << 20


def time_layer(copies, rows, outputs, inputs, bias, run, device) -> tuple[float, int]:
    """Microseconds per call of ``run(x, w, b, out_index)`` over distinct weight copies, and its bytes."""
    weight_bytes = copies * outputs * inputs * 2
    calls = max(4, -(-FLOOR_BYTES // weight_bytes))
    ws = [torch.randn(copies, outputs, inputs, device=device, dtype=torch.bfloat16) for _ in range(calls)]
    bs = [torch.randn(copies, outputs, device=device, dtype=torch.bfloat16) if bias else None for _ in range(calls)]
    x = torch.randn(copies, rows, inputs, device=device, dtype=torch.bfloat16)
    ms, _ = graph_time_ms(lambda: [run(x, w, b) for w, b in zip(ws, bs)], rep=100)
    nbytes = weight_bytes + copies * (rows * (inputs + outputs) + (outputs if bias else 0)) * 2
    return 1e3 * ms / calls, nbytes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--sweep", action="store_true",
                        help="also the kernel with each plan choice changed (not for lm_head)")
    parser.add_argument("--sweep-rows", type=int, nargs="+", default=[1, 32], help="the rows --sweep covers")
    parser.add_argument("--swap-sweep", action="store_true",
                        help="also the kernel with swapped operands (swap_ab) and plans for it, every layer and row")
    parser.add_argument("--prefetch-sweep", action="store_true",
                        help="also the kernel prefetching more of its weight before it waits, every layer and row")
    parser.add_argument("--stem", default="linear", help="the results file's name before -<device>.json")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    found = device_and_bandwidth("bench/linear.py")
    if found is None:
        return 2
    name, bandwidth = found
    device = torch.device("cuda", torch.cuda.current_device())
    out = pathlib.Path(args.out) / f"{args.stem}-{name.replace(' ', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    print(f"{'model':<14} {'layer':<8} {'M':>3} {'backend':<62} {'us':>8} {'TB/s':>6} {'copy':>6}")
    for model, copies, layer, outputs, inputs, bias in LAYERS:
        counters = counters_for(copies, outputs, device)
        for rows in args.rows:
            default = plan_linear(copies, rows, outputs, inputs, device)
            changes = (SWEEP if args.sweep and rows in args.sweep_rows and layer != "lm_head" else []) + (
                SWAP_SWEEP if args.swap_sweep else []) + (PREFETCH_SWEEP if args.prefetch_sweep else [])
            plans = [("kernel", default)] + [
                ("kernel " + " ".join(f"{k}={v}" for k, v in change.items()),
                 plan_linear(copies, rows, outputs, inputs, device, **change)) for change in changes]
            backends = [("cublas", None, lambda x, w, b: linear(x, w, b))] + [
                (label, plan, lambda x, w, b, plan=plan: decode_linear(x, w, b, counters=counters, plan=plan))
                for label, plan in plans]
            timed = []
            for label, plan, run in backends:
                if plan is not None and plan in timed:
                    continue  # a sweep change that an earlier plan (the default first) already makes
                timed.append(plan)
                us, nbytes = time_layer(copies, rows, outputs, inputs, bias, run, device)
                row = dict(device=name, model=model, layer=layer, copies=copies, rows=rows, outputs=outputs,
                           inputs=inputs, backend=label, plan=None if plan is None else dataclasses.asdict(plan),
                           us=us, tb_s=nbytes / us / 1e6, copy_frac=nbytes / us / 1e-6 / bandwidth)
                results.append(row)
                print(f"{model:<14} {layer:<8} {rows:>3} {label:<62} {us:8.2f} {row['tb_s']:6.2f} "
                      f"{row['copy_frac']:6.1%}", flush=True)
            out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
