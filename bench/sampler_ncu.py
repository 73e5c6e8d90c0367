"""The fused sampler's launches at one batch size, for Nsight Compute to profile (no timing here).

Runs ``adfast.sample`` in antidistill mode on the Qwen2.5-shaped bf16 inputs of bench/sampler.py a
few times; bench/gpu_session.sh wraps it in ``ncu`` (hardware counters of one
``_fused_sample_partials`` launch after warm-up: issue efficiency, stall reasons per SASS line).

Usage: ``ncu ... python bench/sampler_ncu.py [--batch 64] [--launches 4]``
"""
import argparse
import sys

import torch

import adfast
from sampler import qwen_logits


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--launches", type=int, default=4)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/sampler_ncu.py launches GPU kernels and needs a CUDA device", file=sys.stderr)
        return 2
    t, p, m = qwen_logits(args.batch)
    offset = torch.zeros(1, dtype=torch.int64, device="cuda")
    for _ in range(args.launches):
        adfast.sample(t, p, m, tau=0.7, lam=0.5, eps=1e-4, seed=1, offset=offset, check=False)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
