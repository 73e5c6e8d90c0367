"""Decode throughput: Hugging Face ``generate`` against the lockstep engine, temperature against antidistillation.

Variants, each at batch sizes 1, 8, 32, 64 (prompt 128 random tokens, 256 new tokens, EOS never stops):

- ``hf_temperature``: transformers ``generate`` with temperature sampling;
- ``hf_antidistill``: transformers ``generate`` + :class:`adfast.hf.AntidistillationLogitsProcessor`;
- ``engine_temperature``, ``engine_antidistill``, ``engine_permutation``: :class:`adfast.Engine`;
- ``engine_jvp``: :class:`adfast.Engine` with ``delta="jvp"`` (exact D from one tangent-mode proxy
  pass carrying the proxy's weights and ``g``: the same bytes as two perturbed copies);
- ``engine_jvp_lowrank``: the same with ``g`` a random :class:`adfast.low_rank.LowRankGradient` of
  each rank of ``--jvp-ranks`` (rows ``engine_jvp_r<rank>``): the tangent kept factored, ``r (m + n)``
  numbers per factored ``[m, n]`` weight instead of ``m n``.

Engine rows run with the engine's defaults: the decoders' linears in cuBLAS, and on a Hopper GPU
our kernels with programmatic dependent launch (:func:`adfast.kernels.split.dependent_launch`).
Settings off the defaults name their rows: ``--linear kernel`` (adfast's decode-time kernel,
:mod:`adfast.kernels.decode_linear`) appends ``_kernel`` (the gate/up projection's epilogue
computes ``silu(gate) up``; with all five linears a batch-1 decode step also runs the norms and the
residual adds inside them, :meth:`adfast.decoder.Decoder._fuses_norms`; with ``--linear-projections
o lm_head``, only those linears: ``_kernel-o-lm_head``; with ``--no-linear-fusions``, neither:
``_kernel_unfused``; with ``--linear-rows N``, calls of at most N rows: ``-r<N>``; with
``--linear-swap``, its plans with the weight tile leading the product,
:class:`adfast.kernels.decode_linear.LinearPlan`'s ``swap_ab``: ``_kernel_swap``; with
``--linear-prefetch-steps N``, each program asking L2 for N ``BLOCK_K`` steps of its weight before it
waits on the kernel before it, instead of 2: ``_kernel_lpf<N>``; with ``--linear-norm-rows N``, the
norms inside the linears at decode steps of up to N rows, not only at batch 1: ``_kernel_norms<N>``),
``--prefetch-mb N`` (each layer weight's first N MB pulled into L2 on a side stream before its
matmul, :mod:`adfast.weight_prefetch`; teacher and finite-difference pair, not the tangent pass)
appends ``_pf<N>``, ``ADFAST_PDL=0`` on a Hopper GPU appends ``_nopdl``.

Models have the real architectures with random bf16 weights (throughput does not depend on the
values): a Qwen2.5-7B-shaped teacher and a Qwen2.5-3B-shaped proxy pair (``--shapes real``, a CUDA
device), or tiny ones (``--shapes tiny``, any device: a smoke test of this script).

``limit_ms`` is the weight-read floor of one step: the bytes of every weight a step reads (all
parameters except an untied input embedding, of which a step reads only B rows; the proxies count
twice in the antidistillation variants and ``engine_jvp``; ``engine_jvp_r<rank>`` counts the proxy
once plus every number of its factors and dense entries, all read each step as the proxies tie their
embeddings) over the device-to-device copy bandwidth measured in the same run.
``ms_step`` and ``tok_s`` follow the issue's protocol: the whole ``generate`` call, the prompts'
prefill included, over the new tokens. ``decode_ms_step`` is the decode steps alone: the same
call's time less ``first_token_s`` (a ``generate`` of the same prompts for one new token: prefill
and one step) over the other ``new_tokens - 1`` steps; at batch 32 a prefill of 32 x 128 tokens
is compute-bound, so its share of ``ms_step`` grows with the batch.
``limit_frac = limit_ms / ms_step``, ``decode_limit_frac = limit_ms / decode_ms_step``.
``kv_ms``: the keys and values a step reads from the KV caches, on average over the new tokens
(:func:`cache_read_bytes`), over the same bandwidth: bytes the weight-read limit leaves out, which
grow with the batch and the context. ``attention``: the decode attention kernel the row ran
(:func:`adfast.attention.decode_attention_backend` for the engine: flash-attn's kv-cache kernel when
it is installed, else ours); ``engine_gb`` (engine rows on CUDA): the device memory the engine
holds beyond the shared teacher decoder (proxy copies, or proxy and tangent; KV caches; graphs).
Writes ``bench/results/decode-<device>.json`` (rows: ``device, batch, variant, tok_s, ms_step,
limit_ms, limit_frac, first_token_s, decode_ms_step, decode_limit_frac, kv_ms, attention,
engine_gb, new_tokens, run``, ``run`` being when the process
started: :mod:`bench.goals` flags ratios of rows from different runs, which may be different
machines; rewritten after every row, so a run cut short keeps what it measured; ``--append``
merges into the rows already there) and a PNG of tok/s against batch (with matplotlib;
``--plot-only`` draws it from the JSON later).

Usage: ``python bench/decode.py [--shapes real|tiny] [--batches 1 8 32 64] [--variants ...]
[--jvp-ranks 8 32 128 512] [--append]``; ``python bench/decode.py --plot-only RESULTS.json``.
"""
import argparse
import gc
import json
import pathlib
import sys
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import adfast
from adfast.attention import decode_attention_backend
from adfast.decoder import LINEAR_KERNEL_ROWS, LINEAR_PROJECTIONS, Decoder
from adfast.provenance import model_identity
from adfast.hf import AntidistillationLogitsProcessor
from adfast.kernels.split import dependent_launch, dependent_launch_supported
from adfast.low_rank import LowRankGradient

SHAPES = {
    "real": dict(
        teacher=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
        proxy=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                   num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True),
        jvp_ranks=[8, 32, 128, 512]),
    "tiny": dict(
        teacher=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
        proxy=dict(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
        jvp_ranks=[4, 16]),  # hidden 32: rank 16 keeps k_proj, v_proj (16 rows) dense
}
VARIANTS = ("hf_temperature", "hf_antidistill", "engine_temperature", "engine_antidistill", "engine_permutation",
            "engine_jvp", "engine_jvp_lowrank")
EPS, LAM, TAU = 1e-2, 0.5, 1.0


def device_for(shapes: str) -> torch.device | None:
    """The device a benchmark runs on: CUDA where there is one; None (after saying why) for the
    real shapes on a machine without one."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if shapes == "real" and device.type != "cuda":
        print("--shapes real needs a CUDA device (use smaller --shapes for a smoke test)", file=sys.stderr)
        return None
    return device


def add_setting_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine settings off the defaults that name their rows (:func:`variant_suffix`)."""
    parser.add_argument("--linear", choices=["cublas", "kernel"], default="cublas",
                        help="the engine's layer linears at decode: cuBLAS (the default) or adfast's kernel "
                             "(rows named <variant>_kernel)")
    parser.add_argument("--linear-projections", nargs="+", choices=LINEAR_PROJECTIONS, default=None,
                        help="with --linear kernel: only these linears in the kernel (rows <variant>_kernel-<names>)")
    parser.add_argument("--linear-rows", type=int, default=LINEAR_KERNEL_ROWS,
                        help="with --linear kernel: the most rows a call gives the kernel (rows <variant>_kernel-r<N> "
                             f"off the default {LINEAR_KERNEL_ROWS})")
    parser.add_argument("--no-linear-fusions", action="store_true",
                        help="with --linear kernel: the activation and norms in their own kernels, not fused into "
                             "the linears (rows <variant>_kernel_unfused)")
    parser.add_argument("--linear-swap", action="store_true",
                        help="with --linear kernel: its plans with the weight tile leading the product (swap_ab, the "
                             "warpgroup MMA; rows <variant>_kernel_swap)")
    parser.add_argument("--linear-norm-rows", type=int, default=1,
                        help="with --linear kernel: the most rows of a decode step whose norms run inside it (default "
                             "1: batch 1; rows <variant>_kernel_norms<N>)")
    parser.add_argument("--linear-prefetch-steps", type=int, default=None,
                        help="with --linear kernel: BLOCK_K steps of its weight each program prefetches to L2 before "
                             "it waits on the kernel before it (default 2; rows <variant>_kernel_lpf<N>)")
    parser.add_argument("--prefetch-mb", type=int, default=0,
                        help="MB of each layer weight the engine's decoders prefetch to L2 before its matmul "
                             "(0: off, the default; rows named <variant>_pf<N>)")


def apply_settings(decoder: Decoder, args) -> None:
    """Give ``decoder`` the settings of :func:`add_setting_arguments`."""
    kernel = args.linear == "kernel"
    decoder.linear_kernel = args.linear_projections if kernel and args.linear_projections else kernel
    decoder.linear_kernel_rows = args.linear_rows
    decoder.linear_fusions = not args.no_linear_fusions
    decoder.linear_norm_rows = args.linear_norm_rows
    decoder.linear_plan_options = (dict(swap_ab=True) if args.linear_swap else {}) | (
        {} if args.linear_prefetch_steps is None else dict(prefetch_steps=args.linear_prefetch_steps))
    decoder.prefetch_bytes = args.prefetch_mb << 20


def variant_suffix(args, device) -> str:
    """What an engine row's variant name gets for settings off the defaults: ``_kernel`` (the
    linears in adfast's kernel; ``-<names>`` for some of them, ``-r<N>`` for at most N rows,
    ``_swap`` with its swapped-operand plans, ``_lpf<N>`` prefetching N steps of its weight,
    ``_norms<N>`` with the norms inside it at decode steps of up to N rows,
    ``_unfused`` without the layer ops fused into it),
    ``_pf<N>`` (N MB of each layer weight prefetched to L2), ``_nopdl`` (programmatic dependent
    launch turned off where it applies)."""
    suffix = ""
    if args.linear == "kernel":
        names = [p for p in LINEAR_PROJECTIONS if p in (args.linear_projections or LINEAR_PROJECTIONS)]
        suffix = "_kernel" + ("-" + "-".join(names) if len(names) < len(LINEAR_PROJECTIONS) else "") + (
            f"-r{args.linear_rows}" if args.linear_rows != LINEAR_KERNEL_ROWS else "") + (
            "_swap" if args.linear_swap else "") + (
            f"_lpf{args.linear_prefetch_steps}" if args.linear_prefetch_steps is not None else "") + (
            f"_norms{args.linear_norm_rows}" if args.linear_norm_rows != 1 else "") + (
            "_unfused" if args.no_linear_fusions else "")
    if args.prefetch_mb:
        suffix += f"_pf{args.prefetch_mb}"
    off = dependent_launch_supported(device) and not dependent_launch(device)
    return suffix + ("_nopdl" if off else "")


def random_model(spec: dict, dtype, device) -> Qwen2ForCausalLM:
    config = Qwen2Config(**spec, max_position_embeddings=4096, attn_implementation="sdpa")
    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)


def random_low_rank(model, rank: int, dtype, device) -> LowRankGradient:
    """A random rank-``rank`` gradient of ``model``'s shapes, as :func:`adfast.low_rank.low_rank_gradient`
    lays it out: factors ``U [m, r] / sqrt(r)``, ``V [n, r]`` (so ``U V^T`` has unit-variance entries,
    as the dense random ``g``) for each ``[m, n]`` matrix with ``min(m, n) > r``, the rest dense."""
    factors, dense = {}, {}
    for name, p in model.named_parameters():
        if p.dim() == 2 and min(p.shape) > rank:
            factors[name] = (torch.randn(p.shape[0], rank, device=device, dtype=dtype) / rank ** 0.5,
                             torch.randn(p.shape[1], rank, device=device, dtype=dtype))
        else:
            dense[name] = torch.randn(p.shape, device=device, dtype=dtype)
    return LowRankGradient(factors=factors, dense=dense, rank=rank, model_id=model_identity(model), loss=0.0,
                           num_examples=0, num_tokens=0)


def weight_bytes(model) -> int:
    """Bytes of the weights one decode step reads (an untied input embedding only by rows: left out)."""
    skip = set() if model.config.tie_word_embeddings else {id(model.get_input_embeddings().weight)}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in skip)


def cache_read_bytes(spec: dict, caches: int, batch: int, prompt_len: int, new_tokens: int, element_size: int) -> float:
    """Mean bytes of keys and values a decode step reads from ``caches`` KV caches of the model
    ``spec`` (a ``SHAPES`` entry) at ``batch`` rows: the engine's step ``t`` (0 to ``new_tokens - 1``)
    attends ``prompt_len + t`` positions of each row, so ``prompt_len + (new_tokens - 1) / 2`` on
    average, each ``2 KV D`` numbers (a key and a value per kv head) per layer."""
    head_dim = spec["hidden_size"] // spec["num_attention_heads"]
    positions = prompt_len + (new_tokens - 1) / 2
    return caches * batch * spec["num_hidden_layers"] * positions * 2 * spec["num_key_value_heads"] * head_dim * \
        element_size


def copy_bandwidth(device) -> float:
    """Bytes per second of a device-to-device copy (read + written); on CPU, of a memory copy."""
    src = torch.randn(1 << 28 if device.type == "cuda" else 1 << 24, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    began, reps = time.perf_counter(), 20
    for _ in range(reps):
        dst.copy_(src)
    sync(device)
    return 2 * src.numel() * src.element_size() * reps / (time.perf_counter() - began)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    began = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - began


def hf_run(teacher, pair, mode, prompts, new_tokens):
    """transformers ``generate`` of ``prompts`` (ids >= 1: 0 is the pad id); antidistillation suppresses
    the teacher's ids beyond the proxies' vocabulary, which they cannot read (the engine masks them too)."""
    ids = torch.tensor(prompts, device=teacher.device)
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
              min_new_tokens=new_tokens, pad_token_id=0)
    if mode == "temperature":
        return lambda: teacher.generate(**kw, do_sample=True, temperature=TAU, top_k=0, top_p=1.0)
    proc = AntidistillationLogitsProcessor(pair, lam=LAM, tau=TAU, mode=mode, pad_token_id=0)
    beyond = list(range(pair.plus.config.vocab_size, teacher.config.vocab_size))
    return lambda: adfast.hf.generate(teacher, proc, **kw, suppress_tokens=beyond or None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="real")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--jvp-ranks", type=int, nargs="+", default=None,
                        help="ranks of engine_jvp_lowrank (default: 8 32 128 512 real, 4 16 tiny)")
    add_setting_arguments(parser)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256,
                        help="tokens each prompt generates (>= 2: the decode steps alone are timed as the "
                             "difference to a one-token run)")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    parser.add_argument("--append", action="store_true",
                        help="keep the rows already in the results file (a row of the same batch and variant "
                             "is replaced): one table from several runs")
    parser.add_argument("--plot-only", type=pathlib.Path, metavar="JSON", help="only draw the PNG of a results file")
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error(f"--new-tokens must be >= 2, got {args.new_tokens}")
    if args.plot_only:
        plot(json.loads(args.plot_only.read_text()), args.plot_only.with_suffix(".png"))
        return 0
    device = device_for(args.shapes)
    if device is None:
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    element_size = torch.empty((), dtype=dtype).element_size()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    bandwidth = copy_bandwidth(device)
    run = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())  # rows of one process share it
    print(f"{name}: copy bandwidth {bandwidth / 1e12:.3f} TB/s", flush=True)

    spec = SHAPES[args.shapes]
    teacher = random_model(spec["teacher"], dtype, device)
    proxy = random_model(spec["proxy"], dtype, device)
    gradient = {n: torch.randn(p.shape, device=device, dtype=dtype) for n, p in proxy.named_parameters()}
    pair = adfast.ProxyPair.from_gradient(proxy, gradient, eps=EPS)
    if "engine_jvp" not in args.variants:
        del gradient
    if not {"engine_jvp", "engine_jvp_lowrank"} & set(args.variants):
        del proxy
    gc.collect()
    teacher_bytes, proxy_bytes = weight_bytes(teacher), weight_bytes(pair.plus)
    # One teacher Decoder shared by every engine (each engine would otherwise copy the 15 GB teacher).
    teacher_decoder = Decoder.from_hf([teacher], dtype=dtype, device=device)
    suffix = variant_suffix(args, device)
    apply_settings(teacher_decoder, args)
    if not any(v.startswith("hf_") for v in args.variants):
        del teacher
        gc.collect()
    gen = torch.Generator().manual_seed(0)
    vocab = spec["proxy"]["vocab_size"]

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"decode-{name.replace(' ', '_')}{'' if args.shapes == 'real' else '-' + args.shapes}"
    rows = json.loads(stem.with_suffix(".json").read_text()) if args.append and stem.with_suffix(".json").exists() \
        else []
    engine_attention = decode_attention_backend(dtype) if device.type == "cuda" else "sdpa (CPU reference path)"

    def record(batch, variant, seconds, first_seconds, bytes_per_step, proxy_caches, engine_gb=None):
        """Add a row (replacing an earlier one of the same batch and variant) and rewrite the JSON now,
        so that a run cut short keeps every row it finished. ``seconds``: the timed ``generate`` of
        ``new_tokens``; ``first_seconds``: that of one new token (module docstring); ``proxy_caches``:
        the proxy-shaped KV caches a step reads beside the teacher's (2: the pair's, or the jvp
        proxy's keys and values and their tangents; 0: temperature)."""
        if variant.startswith("engine_"):
            variant += suffix
        ms_step = 1e3 * seconds / args.new_tokens
        decode_ms_step = 1e3 * (seconds - first_seconds) / (args.new_tokens - 1)
        limit_ms = 1e3 * bytes_per_step / bandwidth
        kv_bytes = sum(cache_read_bytes(spec[model], caches, batch, args.prompt_len, args.new_tokens, element_size)
                       for model, caches in (("teacher", 1), ("proxy", proxy_caches)))
        attention = "transformers sdpa" if variant.startswith("hf_") else engine_attention
        row = dict(device=name, batch=batch, variant=variant, tok_s=batch * args.new_tokens / seconds,
                   ms_step=ms_step, limit_ms=limit_ms, limit_frac=limit_ms / ms_step, first_token_s=first_seconds,
                   decode_ms_step=decode_ms_step, decode_limit_frac=limit_ms / decode_ms_step,
                   kv_ms=1e3 * kv_bytes / bandwidth, attention=attention, engine_gb=engine_gb,
                   new_tokens=args.new_tokens, run=run)
        rows[:] = [r for r in rows if (r["batch"], r["variant"]) != (batch, variant)] + [row]
        stem.with_suffix(".json").write_text(json.dumps(rows, indent=1))
        print(f"B={batch:3d} {variant:20s} {row['tok_s']:9.1f} tok/s {ms_step:8.2f} ms/step "
              f"(limit {limit_ms:6.2f} ms, {row['limit_frac']:6.1%}; decode steps alone {decode_ms_step:6.2f} ms, "
              f"{row['decode_limit_frac']:6.1%}; KV reads {row['kv_ms']:5.2f} ms)", flush=True)

    def prompts(batch):
        return torch.randint(1, vocab, (batch, args.prompt_len), generator=gen).tolist()

    for variant in [v for v in args.variants if v.startswith("hf_")]:
        mode = variant.split("_", 1)[1]
        for batch in args.batches:
            hf_run(teacher, pair, mode, prompts(batch), 4)()  # warm-up
            batch_prompts = prompts(batch)
            first = timed(hf_run(teacher, pair, mode, batch_prompts, 1), device)
            proxies = mode != "temperature"
            record(batch, variant, timed(hf_run(teacher, pair, mode, batch_prompts, args.new_tokens), device), first,
                   teacher_bytes + (2 * proxy_bytes if proxies else 0), 2 if proxies else 0)

    def allocated() -> int:
        return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0

    def run_engine(engine, variant, mode, bytes_per_step, before):
        """Time ``engine`` at every batch size; ``engine_gb``: device memory allocated since ``before``
        (taken just before the engine was built) after the row: its proxy copies or proxy and
        tangent, KV caches and captured graphs, not the shared teacher decoder."""
        if engine.proxies is not None:
            apply_settings(engine.proxies, args)
        for batch in args.batches:
            kw = dict(tau=TAU, lam=LAM, mode=mode, seed=0)
            engine.generate(prompts(batch), max_new_tokens=4, **kw)  # warm-up: graph capture
            batch_prompts = prompts(batch)
            first = timed(lambda: engine.generate(batch_prompts, max_new_tokens=1, **kw), device)
            seconds = timed(lambda: engine.generate(batch_prompts, max_new_tokens=args.new_tokens, **kw), device)
            record(batch, variant, seconds, first, bytes_per_step, 0 if mode == "temperature" else 2,
                   (allocated() - before) / 1e9 if device.type == "cuda" else None)

    engine_kw = dict(max_batch_size=max(args.batches), max_seq_len=args.prompt_len + args.new_tokens + 1,
                     device=device, dtype=dtype)
    fd_variants = [v for v in args.variants if v.startswith("engine_") and not v.startswith("engine_jvp")]
    if fd_variants:
        before = allocated()
        engine = adfast.Engine(teacher_decoder, pair, **engine_kw)
        for variant in fd_variants:
            mode = variant.split("_", 1)[1]
            run_engine(engine, variant, mode, teacher_bytes + (0 if mode == "temperature" else 2 * proxy_bytes),
                       before)
        del engine
    del pair
    gc.collect()
    if "engine_jvp" in args.variants:
        before = allocated()
        engine = adfast.Engine(teacher_decoder, proxy, delta="jvp", gradient=gradient, **engine_kw)
        run_engine(engine, "engine_jvp", "antidistill", teacher_bytes + 2 * proxy_bytes, before)
        del engine
        del gradient
        gc.collect()
    if "engine_jvp_lowrank" in args.variants:
        for rank in args.jvp_ranks or spec["jvp_ranks"]:
            low_rank = random_low_rank(proxy, rank, dtype, device)
            before = allocated()
            engine = adfast.Engine(teacher_decoder, proxy, delta="jvp", gradient=low_rank, **engine_kw)
            run_engine(engine, f"engine_jvp_r{rank}", "antidistill",
                       teacher_bytes + proxy_bytes + low_rank.bytes(dtype), before)
            del engine, low_rank
            gc.collect()

    plot(rows, stem.with_suffix(".png"))
    print(f"wrote {stem}.json")
    return 0


def plot(rows, path):
    """tok/s against batch per variant, to ``path`` (PNG); a note instead where matplotlib is missing
    (``--plot-only`` redraws from the JSON elsewhere)."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no plot (python bench/decode.py --plot-only {path.with_suffix('.json')})")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        points = [(r["batch"], r["tok_s"]) for r in rows if r["variant"] == variant]
        ax.plot(*zip(*points), marker="o", label=variant)
    name = rows[0]["device"] if rows else ""
    ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="tokens / s", title=f"decode throughput, {name}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
