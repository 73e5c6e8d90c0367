"""Compile every Triton kernel of adfast for a CUDA GPU, on a machine that has none.

The kernels' tests run them in the Triton interpreter, which accepts programs that the real
compiler rejects (globals that are not ``constexpr``, non-power-of-two ranges, ``tl.dot`` shapes
below 16, type mismatches) and never exercises the GPU launch plans (large blocks, splits sized to
the SM count, tensor-core products on bf16). This module runs the real launchers on CPU tensors of
the real model shapes with the GPU plans (:func:`adfast.kernels.split.multiprocessor_count`
replaced by a fixed SM count) and the Triton driver replaced by one that reports a CUDA target, so
each ``kernel[grid](...)`` is compiled down to a cubin (Triton's own LLVM and bundled ``ptxas``)
instead of launched. Outputs stay uninitialised; nothing runs.

For each compiled specialisation it reports the kernel, the case that produced it, its
``constexpr`` values, warps, shared memory, and (from the bundled ``cuobjdump``) registers per
thread, local-memory bytes per thread, which are register spills when non-zero, and the SASS
instructions of its largest loop (one iteration: divided by the elements a thread handles per
iteration, the instruction cost of an element, which bounds a kernel that issue rather than memory
limits), and which tensor-core instruction it runs (``HGMMA``, Hopper's warpgroup MMA, or
``HMMA``, the warp-level one).

Usage: ``python -m adfast.compile_check [--arch 90] [--sms 132] [--jobs N] [--json PATH]``; exit
status 1 when a kernel fails to compile or spills. ``--jobs`` (default: the CPU count) shares the
cases out over that many fresh processes (compiling is CPU-bound; the cases are independent). Needs
``TRITON_INTERPRET`` unset (the interpreter replaces ``triton.jit`` at import). The cases cover the
Qwen2.5 vocabularies (teacher 152064, proxy 151936) at batch 1 and 64 in every sampling mode and
logit dtype, and decode attention (primal and tangent; the primal also with a cache short enough
for one split) for the 7B teacher (28 heads over 4), the 3B proxy pair (16 over 2, two copies),
SmolLM2 (9 over 3, head dim 64) and the tests' tiny models (4 over 2, head dim 8, padded to 16)
with bf16, fp16 and fp32 caches, and the fused layer kernels (norms, rotary with the cache write,
gated activation, and their tangents, with and without a factored tangent's low-rank term; the
positions of a forward) at the same models' widths, the decode-time linear kernel at every layer
shape of the 7B teacher and the 3B pair (1, 32 and 64 rows, bf16 and fp32; plain, and with the
fused activation, norms and residual adds a decoder gives it), and the L2 prefetch of
a weight (whole, and row heads). Every kernel that takes it is compiled with programmatic dependent
launch, as it launches on a Hopper GPU (unless ``ADFAST_PDL=0``).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import pathlib
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

import torch

QWEN_TEACHER_VOCAB, QWEN_PROXY_VOCAB = 152064, 151936
# (label, copies, heads, kv heads, head dim)
ATTENTION_SHAPES = (("teacher-7b", 1, 28, 4, 128), ("proxy-pair-3b", 2, 16, 2, 128), ("smollm2", 1, 9, 3, 64),
                    ("tiny-test-models", 2, 4, 2, 8))


@dataclass
class CompiledKernel:
    """One compiled specialisation of a kernel."""

    kernel: str
    case: str
    constexprs: dict
    num_warps: int
    shared_bytes: int
    registers: int | None
    local_bytes: int | None
    loop_instructions: int | None  # SASS instructions in the kernel's largest loop (one iteration)
    tensor_core: str | None  # the tensor-core instruction in its SASS: HGMMA (warpgroup), HMMA (warp) or None
    hash: str  # Triton's key of the specialisation


class _CudaTarget:
    """A Triton driver stand-in reporting a CUDA target, so that JIT functions compile for it."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def _cuobjdump(cubin: bytes, flag: str) -> str | None:
    """``cuobjdump FLAG`` of ``cubin`` with the tool Triton bundles; None without it."""
    import triton.backends.nvidia as nvidia

    tool = pathlib.Path(nvidia.__file__).parent / "bin" / "cuobjdump"
    if not tool.exists():
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), flag, f.name], capture_output=True, text=True, check=True).stdout


def _resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """``(registers, local bytes)`` per thread from ``cuobjdump --dump-resource-usage``; Nones without it."""
    text = _cuobjdump(cubin, "--dump-resource-usage")
    if text is None:
        return None, None
    regs, local = re.search(r"REG:(\d+)", text), re.search(r"LOCAL:(\d+)", text)
    return (int(regs.group(1)) if regs else None), (int(local.group(1)) if local else None)


def loop_instructions(sass: str) -> int | None:
    """Instructions in the largest loop of a SASS listing: over each backward branch (``BRA`` to a
    lower address), the instructions from its target to the branch itself; None without loops."""
    address = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
    sizes, index = [], {}
    for line in sass.splitlines():
        m = address.search(line)
        if not m:
            continue
        here = int(m.group(1), 16)
        index[here] = len(index)
        branch = re.search(r"\bBRA\s+0x([0-9a-f]+)", m.group(2))
        if branch and int(branch.group(1), 16) < here and int(branch.group(1), 16) in index:
            sizes.append(index[here] - index[int(branch.group(1), 16)] + 1)
    return max(sizes) if sizes else None


def tensor_core_instruction(sass: str) -> str | None:
    """``"HGMMA"`` (Hopper's warpgroup ``wgmma``) or ``"HMMA"`` (the warp-level ``mma.sync``) where a
    SASS listing has one (the first kind found, in that order), else None."""
    for op in ("HGMMA", "HMMA"):
        if re.search(rf"\b{op}\.", sass):
            return op
    return None


@contextlib.contextmanager
def _compile_instead_of_launch(arch: int, sms: int, compiled: list, case: list):
    """Within the block, every Triton launch compiles for ``sm_<arch>`` with GPU plans for ``sms`` SMs
    and, as on a Hopper GPU, programmatic dependent launch (:func:`adfast.kernels.split.dependent_launch`)."""
    import triton
    from triton.runtime.jit import JITFunction

    from .kernels import l2_prefetch, split

    run, count, dependent = JITFunction.run, split.multiprocessor_count, split.dependent_launch
    prefetches = l2_prefetch.prefetch_supported
    seen = set()

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        key = (self.fn.__name__, kernel.hash)
        if key not in seen:
            seen.add(key)
            constexprs = {self.arg_names[path[0]]: value for path, value in kernel.src.constants.items()
                          if len(path) == 1 and self.arg_names[path[0]].isupper()}
            registers, local = _resource_usage(kernel.asm["cubin"])
            sass = _cuobjdump(kernel.asm["cubin"], "-sass")
            compiled.append(CompiledKernel(self.fn.__name__, case[0], constexprs, kernel.metadata.num_warps,
                                           kernel.metadata.shared, registers, local,
                                           None if sass is None else loop_instructions(sass),
                                           None if sass is None else tensor_core_instruction(sass), kernel.hash))
        return kernel

    triton.runtime.driver.set_active(_CudaTarget(arch))
    JITFunction.run, split.multiprocessor_count = compile_only, lambda device: sms
    split.dependent_launch = lambda device: {"PDL": True, "launch_pdl": True}  # as on Hopper
    l2_prefetch.prefetch_supported = lambda device: True
    try:
        yield
    finally:
        JITFunction.run, split.multiprocessor_count, split.dependent_launch = run, count, dependent
        l2_prefetch.prefetch_supported = prefetches
        if torch.cuda.is_available():  # without a GPU there is no real driver to go back to
            triton.runtime.driver.reset_active()


def _sampling_cases():
    """``(label, thunk)`` pairs driving :func:`adfast.sample` / :func:`adfast.adjusted_logits` on CPU tensors."""
    import adfast

    def logits(batch, vocab, dtype):
        return torch.empty(batch, vocab, dtype=dtype)

    cases = []
    for batch in (1, 64):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            name = f"B{batch}-{str(dtype).split('.')[1]}"
            t = logits(batch, QWEN_TEACHER_VOCAB, dtype)
            p, m = logits(batch, QWEN_PROXY_VOCAB, dtype), logits(batch, QWEN_PROXY_VOCAB, dtype)
            same_p, same_m = logits(batch, QWEN_TEACHER_VOCAB, dtype), logits(batch, QWEN_TEACHER_VOCAB, dtype)
            delta = logits(batch, QWEN_PROXY_VOCAB, torch.float32)
            common = dict(tau=1.0, lam=0.5, eps=1e-2, seed=0, check=False, backend="triton")
            for fn in (adfast.sample, adfast.adjusted_logits):
                kind = fn.__name__
                cases += [
                    (f"{kind} temperature {name}", lambda fn=fn, t=t: fn(t, mode="temperature", **common)),
                    (f"{kind} antidistill {name}", lambda fn=fn, t=t, p=p, m=m: fn(t, p, m, **common)),
                    (f"{kind} antidistill same-vocab {name}",
                     lambda fn=fn, t=t, p=same_p, m=same_m: fn(t, p, m, **common)),
                    (f"{kind} permutation {name}",
                     lambda fn=fn, t=t, p=p, m=m: fn(t, p, m, mode="permutation", **common)),
                    (f"{kind} exact-delta {name}", lambda fn=fn, t=t, d=delta: fn(t, delta=d, **common)),
                ]
            cases.append((f"sample antidistill proxy-vocab-only {name}",  # the engine's draw
                          lambda t=t, p=p, m=m: adfast.sample(t, p, m, proxy_vocab_only=True, **common)))
    return cases


def _attention_cases():
    """``(label, thunk)`` pairs driving the decode-attention launchers (primal and tangent) on CPU tensors."""
    from .kernels.decode_attention import decode_attention
    from .kernels.decode_attention_jvp import decode_attention_jvp

    batch, max_batch, max_seq_len = 32, 32, 4096
    cases = []
    for label, copies, heads, kv_heads, head_dim in ATTENTION_SHAPES:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            q = torch.empty(copies, batch, 1, heads, head_dim, dtype=dtype)
            k = torch.empty(copies, max_batch, max_seq_len + 1, kv_heads, head_dim, dtype=dtype)
            v = torch.empty_like(k)
            slots = torch.arange(batch)
            lengths = torch.full((batch,), max_seq_len)
            name = f"{label} {str(dtype).split('.')[1]}"
            cases.append((f"decode_attention {name}", lambda q=q, k=k, v=v, s=slots, n=lengths:
                          decode_attention(q, k, v, s, n)))
            cases.append((f"decode_attention_jvp {name}", lambda q=q, k=k, v=v, s=slots, n=lengths:
                          decode_attention_jvp(q, q, k, v, k, v, s, n)))
        short = torch.empty(copies, batch, 257, kv_heads, head_dim, dtype=torch.bfloat16)  # one split: no merge
        cases.append((f"decode_attention {label} bf16 256 positions",
                      lambda q=torch.empty(copies, batch, 1, heads, head_dim, dtype=torch.bfloat16), k=short,
                      s=torch.arange(batch), n=torch.full((batch,), 256): decode_attention(q, k, k, s, n)))
    return cases


# (label, copies, hidden, MLP width, heads, kv heads, head dim)
LAYER_SHAPES = (("teacher-7b", 1, 3584, 18944, 28, 4, 128), ("proxy-pair-3b", 2, 2048, 11008, 16, 2, 128),
                ("smollm2", 1, 576, 1536, 9, 3, 64), ("tiny-test-models", 2, 32, 64, 4, 2, 8))


def _layer_cases():
    """``(label, thunk)`` pairs driving the fused layer kernels (:mod:`adfast.layer_ops`) at decode
    (64 rows of one token) and prefill (4 rows of 128) shapes, bf16 and fp32."""
    from .layer_ops import _triton_ops

    ops = _triton_ops()
    cases = []
    for label, copies, hidden, inter, heads, kv_heads, head_dim in LAYER_SHAPES:
        for dtype in (torch.bfloat16, torch.float32):
            for batch, seq in ((64, 1), (4, 128)):
                name = f"{label} {str(dtype).split('.')[1]} {batch}x{seq}"
                x = torch.empty(copies, batch * seq, hidden, dtype=dtype)
                w = torch.empty(copies, hidden, dtype=dtype)
                gate_up = torch.empty(copies, batch * seq, 2 * inter, dtype=dtype)
                qkv = torch.empty(copies, batch * seq, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
                cos = torch.empty(batch, seq, head_dim)
                cache = torch.empty(copies, batch, 4097, kv_heads, head_dim, dtype=dtype)
                slots, pos = torch.arange(batch), torch.zeros(batch, seq, dtype=torch.int64)

                def low_rank(width, rows=batch * seq, copies=copies, dtype=dtype, rank=31):
                    """z [C, N, R] and U [C, m, R] laid out as the decoder keeps it (U^T contiguous); R = 31:
                    the rank loop's unrolled chunks of 8 and its longest fully unrolled tail (7)."""
                    return (torch.empty(copies, rows, rank, dtype=dtype),
                            torch.empty(rank, width, dtype=dtype).T[None].expand(copies, width, rank))

                cases += [
                    (f"add_rms_norm {name}", lambda x=x, w=w: ops.add_rms_norm(x, w, 1e-6, x)),
                    (f"add_rms_norm_jvp {name}", lambda x=x, w=w: ops.add_rms_norm_jvp(x, x, w, w, 1e-6, x, x)),
                    (f"silu_mul {name}", lambda g=gate_up: ops.silu_mul(g)),
                    (f"add_rms_norm_jvp +low-rank {name}", lambda x=x, w=w, t=low_rank(hidden):
                     ops.add_rms_norm_jvp(x, x, w, w, 1e-6, x, x, low_rank=t)),
                    (f"silu_mul_jvp {name}", lambda g=gate_up: ops.silu_mul_jvp(g, g)),
                    (f"silu_mul_jvp +low-rank {name}", lambda g=gate_up, t=low_rank(2 * inter):
                     ops.silu_mul_jvp(g, g, low_rank=t)),
                    (f"rope_and_cache_write {name}", lambda a=(qkv, cos, cos, cache, cache, slots, pos, heads, kv_heads):
                     ops.rope_and_cache_write(*a)),
                    (f"rope_and_cache_write +bias {name}",  # the proxy pair's qkv bias (no bias epilogue there)
                     lambda a=(qkv, cos, cos, cache, cache, slots, pos, heads, kv_heads), b=qkv[:, 0]:
                     ops.rope_and_cache_write(*a, b)),
                    (f"step_positions {name}",
                     lambda slots=slots, seq=seq, table=torch.empty(4097, head_dim):
                     ops.step_positions(torch.zeros(slots.shape[0] + 1, dtype=torch.int64), slots, slots, seq,
                                        table, table)),
                    (f"rope_and_cache_write_jvp {name}",
                     lambda a=(qkv, qkv, cos, cos, cache, cache, cache, cache, slots, pos, heads, kv_heads):
                     ops.rope_and_cache_write_jvp(*a)),
                    (f"rope_and_cache_write_jvp +bias {name}",  # Qwen2's qkv bias, added in the tangent pass
                     lambda a=(qkv, qkv, cos, cos, cache, cache, cache, cache, slots, pos, heads, kv_heads), b=qkv[:, 0]:
                     ops.rope_and_cache_write_jvp(*a, b, b)),
                    (f"rope_and_cache_write_jvp +low-rank {name}",  # a factored tangent's z U^T, then the bias
                     lambda a=(qkv, qkv, cos, cos, cache, cache, cache, cache, slots, pos, heads, kv_heads),
                     b=qkv[:, 0], t=low_rank(qkv.shape[2]): ops.rope_and_cache_write_jvp(*a, b, b, low_rank=t)),
                ]
    return cases


def _linear_cases():
    """``(label, thunk)`` pairs driving :func:`adfast.kernels.decode_linear.decode_linear` on the
    decode-time linear layers of the teacher and the proxy pair (with the qkv bias) at 1, 32 and 64
    rows, bf16 and fp32: each with a plain input and output, and as a decoder fuses them (the
    qkv projection's ``rotary`` and the gate/up projection's ``gated`` epilogues up to
    :data:`adfast.decoder.LINEAR_KERNEL_ROWS` rows; there also the norms (``Decoder.linear_norm_rows``;
    at one row always): a normed input for qkv, gate/up and, bf16 only, the lm_head, the residual
    epilogue for o and down); in bf16 each
    again with the operands swapped (``swap_ab``, its default 128 weight rows a tile; plain, the
    lm_head too, also at 64), and plain with each program's whole split prefetched before it waits
    (``prefetch_steps``)."""
    from .decoder import LINEAR_KERNEL_ROWS
    from .kernels.decode_linear import NormedInput, RotaryCacheWrite, decode_linear

    cases = []
    for label, copies, hidden, inter, heads, kv_heads, head_dim in LAYER_SHAPES[:2]:
        qkv = (heads + 2 * kv_heads) * head_dim
        vocab = QWEN_TEACHER_VOCAB if copies == 1 else QWEN_PROXY_VOCAB
        for dtype in (torch.bfloat16, torch.float32):
            for rows in (1, 32, 64):
                layers = [("qkv", qkv, hidden, True), ("o", hidden, heads * head_dim, False),
                          ("gate_up", 2 * inter, hidden, False), ("down", hidden, inter, False)]
                if dtype == torch.bfloat16:
                    layers.append(("lm_head", vocab, hidden, False))
                for layer, outputs, inputs, bias in layers:
                    x = torch.empty(copies, rows, inputs, dtype=dtype)
                    w = torch.empty(copies, outputs, inputs, dtype=dtype)
                    b = torch.empty(copies, outputs, dtype=dtype) if bias else None
                    normed = NormedInput(x, torch.empty(copies, 112, rows), torch.empty(copies, inputs, dtype=dtype),
                                         1e-6)
                    residual = torch.empty(copies, rows, outputs, dtype=dtype)
                    if dtype == torch.bfloat16 and layer != "lm_head":  # each program's whole split prefetched
                        cases.append((f"decode_linear {label} {layer} bfloat16 M{rows} prefetch_steps=64",
                                      lambda x=x, w=w, b=b: decode_linear(x, w, b,
                                                                          plan_options=dict(prefetch_steps=64))))
                    for swap in (False, True) if dtype == torch.bfloat16 else (False,):
                        name = f"{label} {layer} {str(dtype).split('.')[1]} M{rows}" + (" swap_ab" if swap else "")
                        options = dict(swap_ab=True) if swap else {}
                        if layer != "lm_head" or swap:
                            cases.append((f"decode_linear {name}", lambda x=x, w=w, b=b, o=options:
                                          decode_linear(x, w, b, plan_options=o)))
                        if swap:
                            cases.append((f"decode_linear {name} block_n=64", lambda x=x, w=w, b=b: decode_linear(
                                x, w, b, plan_options=dict(swap_ab=True, block_n=64))))
                        if rows > LINEAR_KERNEL_ROWS:
                            continue
                        # the input a decoder gives: normed at one row; at more, plain by default and
                        # normed with Decoder.linear_norm_rows
                        for h, norm in ((normed, ""),) if rows == 1 else ((x, ""), (normed, " normed")):
                            if layer == "gate_up":
                                cases.append((f"decode_linear {name}{norm} gated", lambda h=h, w=w, o=options:
                                              decode_linear(h, w, gated=True, plan_options=o)))
                            if layer == "qkv":
                                cache = torch.empty(copies, rows, 17, kv_heads, head_dim, dtype=dtype)
                                rotary = RotaryCacheWrite(torch.empty(rows, 1, head_dim),
                                                          torch.empty(rows, 1, head_dim), cache, cache,
                                                          torch.zeros(rows, dtype=torch.int64),
                                                          torch.zeros(rows, 1, dtype=torch.int64), heads, kv_heads)
                                cases.append((f"decode_linear {name}{norm} rotary", lambda h=h, w=w, b=b, r=rotary,
                                              o=options: decode_linear(h, w, b, rotary=r, plan_options=o)))
                        if layer in ("o", "down"):
                            cases.append((f"decode_linear {name} residual", lambda x=x, w=w, r=residual, o=options:
                                          decode_linear(x, w, residual=r, plan_options=o)))
                        elif layer == "lm_head":
                            cases.append((f"decode_linear {name} normed", lambda x=normed, w=w, b=b, o=options:
                                          decode_linear(x, w, b, plan_options=o)))
    return cases


def _prefetch_cases():
    """``(label, thunk)`` pairs driving :func:`adfast.kernels.l2_prefetch.prefetch_l2` on the 7B
    teacher's qkv weight (whole) and gate/up weight (row heads), bf16."""
    from .kernels.l2_prefetch import prefetch_l2

    label, _, hidden, inter, heads, kv_heads, head_dim = LAYER_SHAPES[0]
    qkv = torch.empty(1, (heads + 2 * kv_heads) * head_dim, hidden, dtype=torch.bfloat16)
    gate_up = torch.empty(1, 2 * inter, hidden, dtype=torch.bfloat16)
    return [(f"prefetch_l2 {label} qkv", lambda: prefetch_l2(qkv, 48 << 20)),
            (f"prefetch_l2 {label} gate_up", lambda: prefetch_l2(gate_up, 24 << 20))]


def compile_all(arch: int = 90, sms: int = 132, cases=None, jobs: int = 1,
                ) -> tuple[list[CompiledKernel], list[tuple[str, str]]]:
    """Compile every case for ``sm_<arch>`` with GPU plans for ``sms`` SMs (H100 SXM: 132).

    ``cases``: ``(label, thunk)`` pairs, each thunk launching Triton kernels on CPU tensors, compiled
    in this process; by default the cases of the module docstring, shared out (every ``jobs``-th
    case) over ``jobs`` spawned processes when ``jobs > 1``.

    Returns ``(compiled, failures)``: one :class:`CompiledKernel` per distinct specialisation (in
    the order of the cases that first produced them), and ``(case, error)`` for each case whose
    compilation raised.
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("adfast.compile_check needs TRITON_INTERPRET unset: the interpreter replaces triton.jit")
    if cases is not None or jobs <= 1:
        return _compile_cases(arch, sms, _default_cases() if cases is None else cases)
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        shares = list(pool.map(_compile_share, [(arch, sms, jobs, i) for i in range(jobs)]))
    order = {label: i for share_order, _, _ in shares for label, i in share_order.items()}
    compiled = {}  # (kernel, hash) -> its first case's CompiledKernel: two shares may meet a specialisation
    for k in sorted((k for _, share, _ in shares for k in share), key=lambda k: order[k.case]):
        compiled.setdefault((k.kernel, k.hash), k)
    failures = sorted((f for _, _, share in shares for f in share), key=lambda f: order[f[0]])
    return list(compiled.values()), failures


def _default_cases():
    return _sampling_cases() + _attention_cases() + _layer_cases() + _linear_cases() + _prefetch_cases()


def _compile_share(args: tuple[int, int, int, int]):
    """Share ``index`` of ``jobs`` of the default cases (every ``jobs``-th), compiled in a worker
    process: ``({case: its place among all cases}, compiled, failures)``."""
    arch, sms, jobs, index = args
    cases = _default_cases()[index::jobs]
    return ({label: index + i * jobs for i, (label, _) in enumerate(cases)}, *_compile_cases(arch, sms, cases))


def _compile_cases(arch: int, sms: int, cases) -> tuple[list[CompiledKernel], list[tuple[str, str]]]:
    compiled, failures, case = [], [], [""]
    with _compile_instead_of_launch(arch, sms, compiled, case):
        for label, thunk in cases:
            case[0] = label
            try:
                thunk()
            except Exception as error:  # reported with the case that raised it
                failures.append((label, f"{type(error).__name__}: {error}"))
    return compiled, failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (H100: 90)")
    parser.add_argument("--sms", type=int, default=132, help="SM count the launch plans assume (H100 SXM: 132)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes compiling at once")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    import triton

    compiled, failures = compile_all(args.arch, args.sms, jobs=args.jobs)
    print(f"triton {triton.__version__}, sm_{args.arch}, {args.sms} SMs: {len(compiled)} specialisations compiled, "
          f"{len(failures)} cases failed")
    print(f"{'kernel':<24} {'warps':>5} {'regs':>5} {'local':>5} {'smem':>6} {'loop':>5} {'mma':>5}  constexprs "
          f"(first case)")
    for k in compiled:
        print(f"{k.kernel:<24} {k.num_warps:>5} {k.registers!s:>5} {k.local_bytes!s:>5} {k.shared_bytes:>6} "
              f"{k.loop_instructions!s:>5} {k.tensor_core or '-':>5}  {k.constexprs} ({k.case})")
    spills = [k for k in compiled if k.local_bytes]
    for k in spills:
        print(f"SPILL: {k.kernel} uses {k.local_bytes} bytes of local memory per thread ({k.case})")
    for label, error in failures:
        print(f"FAILED: {label}: {error}")
    if args.json:
        report = dict(triton=triton.__version__, arch=args.arch, sms=args.sms,
                      compiled=[asdict(k) for k in compiled], failures=failures)
        pathlib.Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 1 if failures or spills else 0


if __name__ == "__main__":
    sys.exit(main())
