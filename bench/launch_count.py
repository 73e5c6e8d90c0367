"""Kernel launches per engine decode step, counted on CPU: PyTorch layer ops against the fused kernels.

At decode batch sizes a step's time is its weight reads plus, for every kernel it launches, a few
microseconds of launch and tail even inside a CUDA graph; a decoder written as plain PyTorch ops
launches ~30 kernels per layer. This script counts, for one decode step of the engine at batch 1,
the operators that would each launch a CUDA kernel (aten compute ops seen by a dispatch mode:
views, reshapes and allocations excluded) and the Triton kernel launches, with the decoder's
elementwise chains as PyTorch ops (``fused=False``) or as the fused Triton layer kernels
(``fused=True``, :mod:`adfast.layer_ops`), and for the finite-difference variants also with every
linear in the decode-time kernel (``linear_kernel=True``), where the gate/up projection computes the
gated activation and a batch-1 decode step runs the norms inside the linears
(:meth:`adfast.decoder.Decoder._fuses_norms`). Attention and sampling take the CUDA path (the Triton
decode-attention and sampler kernels, run by the interpreter). The count depends on the number of
layers, not on their widths, so the models have the real layer counts (Qwen2.5-7B teacher: 28;
Qwen2.5-3B proxy: 36) and tiny widths. The result is a count, not a time: what a launch costs is
for a GPU run to measure.

Usage: ``python bench/launch_count.py [--out bench/results]``; writes ``launch_count_cpu.json``.
"""
import argparse
import collections
import json
import os
import pathlib
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports adfast.kernels

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

import adfast.decoder as decoder_module  # noqa: E402
import adfast.engine as engine_module  # noqa: E402
from adfast import Engine, ProxyPair  # noqa: E402
from adfast.gradient import ProxyGradient  # noqa: E402
from adfast.provenance import model_identity  # noqa: E402
from adfast.kernels.decode_attention import decode_attention  # noqa: E402
from adfast.kernels.decode_attention_jvp import decode_attention_jvp  # noqa: E402
from adfast.low_rank import low_rank_gradient  # noqa: E402

NO_LAUNCH = {"view", "_unsafe_view", "reshape", "expand", "permute", "transpose", "t", "select", "slice",
             "unsqueeze", "squeeze", "split", "split_with_sizes", "chunk", "alias", "as_strided", "detach",
             "unbind", "narrow", "lift_fresh", "_reshape_alias", "empty", "empty_like", "empty_strided",
             "contiguous"}
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
            max_position_embeddings=256)


class LaunchCounter(TorchDispatchMode):
    """Counts aten ops that launch a kernel (by name) and Triton kernel launches (``"triton:<kernel>"``)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()
        self.inside_triton = 0  # the interpreter's own tensor ops while it runs a kernel are not launches

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if self.inside_triton:
            return out
        if name not in NO_LAUNCH and not (name in ("_to_copy", "copy_") and _same_dtype(args)):
            self.counts[f"aten:{name}"] += 1
        return out


def _same_dtype(args) -> bool:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    return len(tensors) < 2 or tensors[0].dtype == tensors[1].dtype


def count_triton_launches(counter_ref: list):
    from triton.runtime.interpreter import InterpretedFunction

    run = InterpretedFunction.run

    def counted(self, *args, **kwargs):
        if not counter_ref:
            return run(self, *args, **kwargs)
        counter = counter_ref[0]
        counter.counts[f"triton:{self.fn.__name__}"] += 1
        counter.inside_triton += 1
        try:
            return run(self, *args, **kwargs)
        finally:
            counter.inside_triton -= 1

    InterpretedFunction.run = counted


def cuda_attention():
    """Route T == 1 attention to the Triton kernels, as on CUDA (the CPU path uses SDPA)."""
    attend, attend_jvp = decoder_module.attend, decoder_module.attend_jvp

    def attend_like_cuda(q, k_cache, v_cache, slots, query_pos, lengths=None, counters=None, key_span=None):
        if q.shape[2] == 1:
            return decode_attention(q, k_cache, v_cache, slots, lengths, counters=counters)
        return attend(q, k_cache, v_cache, slots, query_pos, lengths, counters, key_span)

    def attend_jvp_like_cuda(q, dq, k_cache, v_cache, dk_cache, dv_cache, slots, query_pos, lengths=None,
                             key_span=None):
        if q.shape[2] == 1:
            return decode_attention_jvp(q, dq, k_cache, v_cache, dk_cache, dv_cache, slots, lengths)
        return attend_jvp(q, dq, k_cache, v_cache, dk_cache, dv_cache, slots, query_pos, lengths, key_span)

    decoder_module.attend, decoder_module.attend_jvp = attend_like_cuda, attend_jvp_like_cuda


def model(layers: int, seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=layers, **TINY)).eval()


def step_counts(engine: Engine, fused: bool, linear_kernel: bool, mode: str, counter_ref: list
                ) -> collections.Counter:
    """Launch counts of the last decode step of a short generation."""
    for decoder in (engine.teacher, engine.proxies):
        if decoder is not None:
            decoder.fused, decoder.linear_kernel = fused, linear_kernel
    step, seen = engine_module.decode_one_token, []

    def counted(*args, **kwargs):
        counter = LaunchCounter()
        counter_ref[:] = [counter]
        with counter:
            out = step(*args, **kwargs)
        counter_ref.clear()
        seen.append(counter.counts)
        return out

    engine_module.decode_one_token = counted
    try:
        kw = {} if engine.eps is None or mode == "temperature" else {"eps": engine.eps}
        engine.generate([[1, 2, 3]], max_new_tokens=2, tau=1.0, lam=0.1, mode=mode, seed=0, **kw)
    finally:
        engine_module.decode_one_token = step
    return seen[-1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    counter_ref: list = []
    count_triton_launches(counter_ref)
    cuda_attention()
    teacher, proxy = model(28, 0), model(36, 1)
    g = torch.Generator().manual_seed(2)
    grads = {name: torch.randn(p.shape, generator=g) for name, p in proxy.named_parameters()}
    rank8 = low_rank_gradient(ProxyGradient(grads=grads, loss=0.0, num_examples=0, num_tokens=0,
                                            model_id=model_identity(proxy)), 8)
    engines = {
        "temperature": (Engine(teacher, None, max_batch_size=1, max_seq_len=16), "temperature"),
        "antidistill (fd pair)": (Engine(teacher, ProxyPair.from_gradient(proxy, grads, eps=1e-2),
                                         max_batch_size=1, max_seq_len=16), "antidistill"),
        "antidistill (jvp, dense g)": (Engine(teacher, proxy, max_batch_size=1, max_seq_len=16, delta="jvp",
                                              gradient=grads), "antidistill"),
        "antidistill (jvp, rank-8 g)": (Engine(teacher, proxy, max_batch_size=1, max_seq_len=16, delta="jvp",
                                               gradient=rank8), "antidistill"),
    }
    rows = []
    for variant, (engine, mode) in engines.items():
        settings = [(False, False), (True, False)] + ([(True, True)] if "jvp" not in variant else [])
        for fused, linear_kernel in settings:
            counts = step_counts(engine, fused, linear_kernel, mode, counter_ref)
            aten = sum(n for k, n in counts.items() if k.startswith("aten:"))
            triton = sum(n for k, n in counts.items() if k.startswith("triton:"))
            layer_ops = ("fused Triton" if fused else "PyTorch") + (" in the linear kernel" if linear_kernel else "")
            rows.append(dict(variant=variant, layer_ops=layer_ops, aten_ops=aten,
                             triton_launches=triton, launches=aten + triton, breakdown=dict(counts.most_common())))
            print(f"{variant:28s} {layer_ops:33s} {aten:5d} aten + {triton:4d} triton = "
                  f"{aten + triton:5d} launches per step", flush=True)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "launch_count_cpu.json").write_text(json.dumps(dict(
        teacher_layers=28, proxy_layers=36, batch=1, rows=rows), indent=1))
    print(f"wrote {out / 'launch_count_cpu.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
