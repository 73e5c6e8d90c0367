"""Decode attention (adfast.kernels.decode_attention) against its split size: one layer's cost.

For the Qwen2.5-7B-shaped teacher's attention (28 query heads over 4 kv heads, head dim 128, one
copy) and the Qwen2.5-3B-shaped pair's (16 over 2, two copies), bf16 caches, ``B`` rows all at live
length ``L`` in caches of ``max_seq_len`` ``S``, the time of one decode-attention call with the
plan's splits (``auto``: ``C B KV`` programs covering the GPU four times, each split at least 256
positions of a full row, so ``S = 384`` gives one split) and with splits of each ``--chunks``
positions (``ceil(S / chunk)`` splits, of which ``ceil(L / chunk)`` live): the live chunks are
walked side by side and merged, in split order, by the last program of each kv head. A decode step
at batch 1 runs one such call per layer (28 and 36) between its matmuls; what a split costs is the
merge's loop, what it buys is a shorter walk.

Timing: one CUDA graph of calls on distinct caches (one per layer of the model, as a step reads
them; each call's live K/V come from memory), replayed by :func:`sampler.graph_time_ms` (L2 flushed
between replays), over the number of calls. ``live_bytes``: the K/V rows a call reads (``2 C B L KV
D`` bf16); ``tb_s`` that over the time.

Writes ``bench/results/attention-<device>.json`` (rows: ``device, model, batch, length,
max_seq_len, plan, splits, chunk, us, live_bytes, tb_s``) and prints the table.

Usage: ``python bench/attention.py [--batches 1 32] [--lengths 128 384] [--max-seq-len 384 4096]
[--chunks 64 128 256] [--out bench/results]``.
"""
import argparse
import sys

import torch

from adfast.kernels.decode_attention import decode_attention, plan_attention
from sampler import device_and_bandwidth, graph_time_ms, write_results

# (model, copies, layers, heads, kv heads, head dim)
MODELS = [("teacher-7b", 1, 28, 28, 4, 128), ("proxy-pair-3b", 2, 36, 16, 2, 128)]


def time_attention(copies, layers, heads, kv_heads, head_dim, batch, length, max_seq_len, splits, device) -> float:
    """Microseconds per :func:`decode_attention` call over ``layers`` distinct caches (``splits`` None: the plan's)."""
    def cache():
        return torch.randn(copies, batch, max_seq_len + 1, kv_heads, head_dim, device=device, dtype=torch.bfloat16)

    caches = [(cache(), cache()) for _ in range(layers)]
    q = torch.randn(copies, batch, 1, heads, head_dim, device=device, dtype=torch.bfloat16)
    slots = torch.arange(batch, device=device)
    lengths = torch.full((batch,), length, device=device)
    counters = torch.zeros(copies * batch * kv_heads, dtype=torch.int32, device=device)
    ms, _ = graph_time_ms(lambda: [decode_attention(q, k, v, slots, lengths, num_splits=splits, counters=counters)
                                   for k, v in caches], rep=100)
    return 1e3 * ms / layers


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 384])
    parser.add_argument("--max-seq-len", type=int, nargs="+", default=[384, 4096])
    parser.add_argument("--chunks", type=int, nargs="+", default=[64, 128, 256, 512],
                        help="positions per split timed beside the plan's (multiples of its 64-position blocks)")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    found = device_and_bandwidth("bench/attention.py")
    if found is None:
        return 2
    name = found[0]
    device = torch.device("cuda", torch.cuda.current_device())
    rows = []
    print(f"{'model':<14} {'B':>3} {'L':>5} {'S':>5} {'plan':>5} {'splits':>6} {'chunk':>5} {'us':>8} {'TB/s':>6}")
    for model, copies, layers, heads, kv_heads, head_dim in MODELS:
        for batch in args.batches:
            for max_seq_len in args.max_seq_len:
                timed = set()
                for count in [None] + [-(-max_seq_len // chunk) for chunk in args.chunks if chunk < max_seq_len]:
                    resolved, chunk, _, _ = plan_attention(copies * batch * kv_heads, max_seq_len, device, count, None)
                    if resolved in timed:
                        continue
                    timed.add(resolved)
                    for length in (n for n in args.lengths if n <= max_seq_len):
                        us = time_attention(copies, layers, heads, kv_heads, head_dim, batch, length, max_seq_len,
                                            count, device)
                        live = 2 * copies * batch * length * kv_heads * head_dim * 2
                        plan = "auto" if count is None else "given"
                        rows.append(dict(device=name, model=model, batch=batch, length=length, max_seq_len=max_seq_len,
                                         plan=plan, splits=resolved, chunk=chunk, us=us, live_bytes=live,
                                         tb_s=live / us / 1e6))
                        print(f"{model:<14} {batch:>3} {length:>5} {max_seq_len:>5} {plan:>5} {resolved:>6} {chunk:>5} "
                              f"{us:8.2f} {rows[-1]['tb_s']:6.2f}", flush=True)
                write_results(rows, args.out, "attention", name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
