"""Prefill time against the cache's ``max_seq_len``: the reference attention over the positions the
prompts reach, or over all of them.

The engine prefills eagerly through :meth:`adfast.decoder.Decoder.forward` with ``check=True``,
whose host-side length check knows the largest length any slot reaches; the reference attention
path (:func:`adfast.attention.attend`, SDPA over gathered copies of the slots' keys and values,
the prefill path on every device) then gathers only those positions (``key_span``). An unchecked
forward gathers all ``max_seq_len`` of every slot, which is what every prefill did before: its
gathered keys and values, ``[B, H, max_seq_len, D]`` per layer, grow with the cache rather than
with the prompts. This script times one prefill of ``--batch`` random prompts of ``--prompt-len``
tokens each way, for each ``--max-seq-lens``, on random weights (the time does not depend on
their values): ``--shapes smollm2`` (SmolLM2-135M's widths, 30 layers, any device) or ``real``
(the Qwen2.5-7B teacher of :mod:`bench.decode`, a CUDA device).

Writes ``bench/results/prefill-<device>-<shapes>.json``: rows ``device, shapes, batch, prompt_len,
max_seq_len, positions`` (``"reached"``: the checked forward; ``"all"``: unchecked) ``, ms``
(the best of ``--repeats``).

Usage: ``python bench/prefill.py [--shapes smollm2|real] [--batch 8] [--prompt-len 128]
[--max-seq-lens 512 2048 8192] [--repeats 3] [--out bench/results]``.
"""
import argparse
import json
import pathlib
import sys

import torch
from decode import SHAPES as DECODE_SHAPES, device_for, random_model, timed

from adfast.decoder import Decoder

SHAPES = {
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "real": DECODE_SHAPES["real"]["teacher"],
}


def prefill_ms(decoder: Decoder, tokens: torch.Tensor, slots: torch.Tensor, check: bool, repeats: int) -> float:
    """The best time of ``repeats`` prefills of ``tokens`` into emptied ``slots``, in ms (after a warm-up)."""
    def once():
        decoder.cache.reset(slots)
        return timed(lambda: decoder(tokens, slots, check=check), tokens.device)

    once()
    return 1e3 * min(once() for _ in range(repeats))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="smollm2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-seq-lens", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    device = device_for(args.shapes)
    if device is None:
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    shape = SHAPES[args.shapes]
    decoder = Decoder.from_hf([random_model(shape, dtype, device)], dtype=dtype, device=device)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, shape["vocab_size"], (args.batch, args.prompt_len), generator=gen).to(device)
    slots = torch.arange(args.batch, device=device)
    rows = []
    with torch.no_grad():
        for max_seq_len in args.max_seq_lens:
            decoder.setup_cache(args.batch, max_seq_len)
            for positions, check in (("reached", True), ("all", False)):
                ms = prefill_ms(decoder, tokens, slots, check, args.repeats)
                rows.append(dict(device=name, shapes=args.shapes, batch=args.batch, prompt_len=args.prompt_len,
                                 max_seq_len=max_seq_len, positions=positions, ms=ms))
                print(f"max_seq_len {max_seq_len:6d}  positions {positions:8s} {ms:9.1f} ms", flush=True)
            decoder.cache = None  # free this cache before the next, larger one
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"prefill-{name.replace(' ', '_')}-{args.shapes}.json"
    path.write_text(json.dumps(rows, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
