"""The fused sampler's launch plan on a CUDA device: stage-1 block, warps and programs per SM, timed.

For each batch size and each combination of ``--blocks`` (logits a program handles per loop
step), ``--warps`` and ``--programs-per-sm`` (how many programs per SM the ``[B, S]`` grid aims
at), times :func:`adfast.kernels.fused_sample.fused_sample` in antidistill mode on the sampler
benchmark's inputs (Qwen2.5 vocabularies, bf16; a replayed CUDA graph, median of
``triton.testing.do_bench``) and reports the fraction of the device-to-device copy bandwidth it
reaches, counting each logit read once. The row marked ``default`` is the plan
:data:`adfast.kernels.fused_sample.NUM_WARPS` / ``PROGRAMS_PER_SM`` / ``NUM_STAGES`` picks.
Writes ``bench/results/sampler_tune-<device>.json`` (rows: ``device, batch, block, num_warps,
programs_per_sm, num_stages, noise, splits, us, bandwidth_frac, default``).

``--stages`` adds the main loop's software-pipelining depth, ``--noise off`` times the kernel
without its Gumbel noise (a decomposition: what the RNG and its logs cost).

Usage: ``python bench/sampler_tune.py [--batches 1 64] [--blocks 1024 2048 4096] [--warps 4 8]
[--programs-per-sm 2 4 8] [--stages 1 3] [--noise on off]``
"""
import argparse
import importlib
import itertools
import pathlib
import sys

import torch

from adfast.kernels.split import plan_splits
from sampler import VOCAB_T, device_and_bandwidth, fused_bytes, graph_time_ms, qwen_logits, write_results

# the module itself: adfast.kernels exports a function of the same name
fs = importlib.import_module("adfast.kernels.fused_sample")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--blocks", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--programs-per-sm", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 3],
                        help="software-pipelining depths of the main loop (num_stages)")
    parser.add_argument("--noise", choices=["on", "off"], nargs="+", default=["on"],
                        help="off: time the kernel without its Gumbel noise (what the noise costs)")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    found = device_and_bandwidth("bench/sampler_tune.py")
    if found is None:
        return 2
    device, bandwidth = found
    rows = []
    for batch in args.batches:
        t, p, m = qwen_logits(batch)
        tau = torch.full((batch,), 0.7, device="cuda")
        coef = torch.full((batch,), 0.5 / 2e-4, device="cuda")
        offset = torch.zeros(1, dtype=torch.int64, device="cuda")
        nbytes = fused_bytes(batch)
        for block, warps, per_sm, stages, noise in itertools.product(args.blocks, args.warps, args.programs_per_sm,
                                                                     args.stages, args.noise):
            plan = plan_splits(batch, VOCAB_T, t.device, block=block, num_warps=warps, programs_per_sm=per_sm)
            ms, _ = graph_time_ms(lambda: fs.fused_sample(t, p, m, None, tau, coef, 1, offset, block=block,
                                                          num_warps=warps, programs_per_sm=per_sm,
                                                          num_stages=stages, noise=noise == "on"))
            default = (block, warps, per_sm, stages, noise) == (fs.default_block(fs.NUM_WARPS), fs.NUM_WARPS, fs.PROGRAMS_PER_SM,
                                                                fs.NUM_STAGES, "on")
            frac = nbytes / (ms * 1e-3) / bandwidth
            rows.append(dict(device=device, batch=batch, block=block, num_warps=warps, programs_per_sm=per_sm,
                             num_stages=stages, noise=noise == "on", splits=plan.splits, us=ms * 1e3,
                             bandwidth_frac=frac, default=default))
            print(f"B={batch:3d} block {block:5d} warps {warps:2d} programs/SM {per_sm:2d} (S={plan.splits:3d}) "
                  f"stages {stages} noise {noise:3s} {ms * 1e3:7.1f} us {frac:6.1%} of copy"
                  f"{'  (default)' if default else ''}", flush=True)
    write_results(rows, args.out, "sampler_tune", device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
