"""Sampler kernel throughput on a CUDA device: the fused kernel against the copy bandwidth and eager PyTorch.

For each batch size, with Qwen2.5 shapes (teacher vocabulary 152064, proxy 151936, bf16 logits):

- ``fused``: ``adfast.sample`` in antidistill mode (one pass: teacher + both proxies, Gumbel-max draw);
- ``fused_proxy_vocab_only``: the same with ``proxy_vocab_only=True``, the engine's draw (ids past the
  proxies' vocabulary never drawn, so no proxy log-sum-exp);
- ``fused_one_vocab``: ``fused`` with all three inputs ``[B, 152064]`` (issue 2's goal names one
  ``V = 152064``; with one vocabulary the proxies' normalisers cancel in the draw, and the kernel
  skips their log-sum-exps);
- ``fused_temperature``: ``adfast.sample`` in temperature mode (teacher only);
- ``adjusted``: ``adfast.adjusted_logits`` (two reads of the inputs, one float32 write);
- ``eager``: the same draw written plainly in eager PyTorch (three log-softmaxes, the difference,
  ``softmax`` and ``torch.multinomial``), the baseline a user would otherwise run.

Each kernel is timed as a replayed CUDA graph (median of ``triton.testing.do_bench``; a variant
that cannot be captured is timed eagerly and its row says ``cuda_graph: false``). Achieved
bandwidth counts the bytes the op must move (each logit read once, outputs written once) and is
compared with a device-to-device copy measured in the same run (bytes read + written).
Writes ``bench/results/sampler-<device>.json``.

Usage: ``python bench/sampler.py [--batches 1 8 32 64] [--out bench/results]``
"""
import argparse
import json
import pathlib
import sys

import torch

import adfast

VOCAB_T, VOCAB_P = 152064, 151936


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read plus bytes written."""
    import triton.testing

    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * nbytes / (ms * 1e-3)


def graph_time_ms(fn, rep: int = 300) -> tuple[float, bool]:
    """Median time of one replay of ``fn`` captured as a CUDA graph, and True; if ``fn`` cannot be
    captured (the eager baseline's ``torch.multinomial`` on some builds), its eager time and False.
    ``rep``: milliseconds of replays ``triton.testing.do_bench`` times."""
    import triton.testing

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as error:
        print(f"  not capturable ({str(error).splitlines()[0]}): timed eagerly", flush=True)
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=50, rep=rep, return_mode="median"), False
    return triton.testing.do_bench(graph.replay, warmup=50, rep=rep, return_mode="median"), True


def device_and_bandwidth(script: str) -> tuple[str, float] | None:
    """The CUDA device's name and its copy bandwidth (printed); None, after saying why, without one."""
    if not torch.cuda.is_available():
        print(f"{script} times GPU kernels and needs a CUDA device", file=sys.stderr)
        return None
    device, bandwidth = torch.cuda.get_device_name(), copy_bandwidth()
    print(f"{device}: copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    return device, bandwidth


def write_results(rows: list[dict], out: str, name: str, device: str) -> None:
    """Write ``rows`` as ``<out>/<name>-<device>.json`` (spaces in the device name as underscores)."""
    directory = pathlib.Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}-{device.replace(' ', '_')}.json"
    path.write_text(json.dumps(rows, indent=1))
    print(f"wrote {path}")


def qwen_logits(batch: int, proxy_vocab: int = VOCAB_P) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The benchmark's bf16 inputs on the GPU: teacher ``[B, 152064]``, plus ``[B, proxy_vocab]`` (scale
    3) and minus (plus moved by 1e-2 noise, as a nearby perturbed copy would be)."""
    t = torch.randn(batch, VOCAB_T, device="cuda", dtype=torch.bfloat16) * 3
    p = torch.randn(batch, proxy_vocab, device="cuda", dtype=torch.bfloat16) * 3
    return t, p, p + 1e-2 * torch.randn_like(p)


def fused_bytes(batch: int, proxy_vocab: int = VOCAB_P) -> int:
    """Bytes the fused antidistillation draw must move: each bf16 logit of the three inputs read once,
    and per row the token (int64) and the teacher log-prob (float32) written."""
    return batch * (VOCAB_T + 2 * proxy_vocab) * 2 + batch * 12


def eager_sample(t, p, m, tau, lam, eps):
    a = torch.log_softmax(t.float(), -1) / tau
    d = (torch.log_softmax(p.float(), -1) - torch.log_softmax(m.float(), -1)) / (2 * eps)
    a[:, : p.shape[1]] += lam * d
    return torch.multinomial(torch.softmax(a, -1), 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    found = device_and_bandwidth("bench/sampler.py")
    if found is None:
        return 2
    device, bandwidth = found
    rows = []
    for batch in args.batches:
        t, p, m = qwen_logits(batch)
        _, p1, m1 = qwen_logits(batch, VOCAB_T)
        offset = torch.zeros(1, dtype=torch.int64, device="cuda")
        kw = dict(tau=0.7, lam=0.5, eps=1e-4, seed=1, offset=offset, check=False)
        in_bytes = batch * (VOCAB_T + 2 * VOCAB_P) * 2
        variants = {
            "fused": (lambda: adfast.sample(t, p, m, **kw), fused_bytes(batch)),
            "fused_proxy_vocab_only": (lambda: adfast.sample(t, p, m, proxy_vocab_only=True, **kw), fused_bytes(batch)),
            "fused_one_vocab": (lambda: adfast.sample(t, p1, m1, **kw), fused_bytes(batch, VOCAB_T)),
            "fused_temperature": (lambda: adfast.sample(t, None, None, mode="temperature", **kw),
                                  batch * VOCAB_T * 2 + batch * 12),
            "adjusted": (lambda: adfast.adjusted_logits(t, p, m, **kw), 2 * in_bytes + batch * VOCAB_T * 4),
            "eager": (lambda: eager_sample(t, p, m, 0.7, 0.5, 1e-4), in_bytes + batch * 8),
        }
        timed = {name: graph_time_ms(fn) for name, (fn, _) in variants.items()}
        times = {name: ms for name, (ms, _) in timed.items()}
        for name, (_, nbytes) in variants.items():
            achieved = nbytes / (times[name] * 1e-3)
            rows.append(dict(device=device, batch=batch, variant=name, ms=times[name], bytes=nbytes,
                             bytes_per_s=achieved, copy_bandwidth=bandwidth, bandwidth_frac=achieved / bandwidth,
                             speedup_vs_eager=times["eager"] / times[name], cuda_graph=timed[name][1]))
            print(f"B={batch:3d} {name:22s} {times[name] * 1e3:9.1f} us  {achieved / 1e12:5.2f} TB/s "
                  f"({achieved / bandwidth:6.1%} of copy)  {times['eager'] / times[name]:5.1f}x eager")
    write_results(rows, args.out, "sampler", device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
