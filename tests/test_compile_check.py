"""Every Triton kernel compiles for an H100 (sm_90) with its GPU launch plan, without spilling.

The kernels' other tests run them in the Triton interpreter, which accepts programs the compiler
rejects and never sees the GPU plans. :mod:`adfast.compile_check` compiles them for real (Triton's
LLVM and bundled ptxas; no GPU needed). It runs in a subprocess because the interpreter, which
conftest turns on for this process, replaces ``triton.jit`` at import; its cases are shared out
over two processes, so the report is also the merge of two shares.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

KERNELS = {"_fused_sample_partials", "_fused_sample_merge", "_adjusted_partials", "_adjusted_write",
           "_decode_attention", "_decode_jvp_partials", "_decode_jvp_merge",
           "_add_rms_norm", "_add_rms_norm_jvp", "_silu_mul", "_rope_and_cache_write", "_decode_linear",
           "_permutation_keys", "_step_positions", "_prefetch_l2"}


def run_python(code: str, tmp_path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, not from an old cache
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=900)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compile")
    done = run_python(f"""
        import sys
        from adfast.compile_check import main
        sys.exit(main(["--arch", "90", "--sms", "132", "--jobs", "2", "--json", {str(tmp / "report.json")!r}]))
    """, tmp)
    assert (tmp / "report.json").exists(), done.stdout + done.stderr
    return done, json.loads((tmp / "report.json").read_text())


def test_every_kernel_compiles_for_sm90_without_spills(report):
    done, data = report
    assert data["failures"] == [], data["failures"]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert {k["kernel"] for k in data["compiled"]} == KERNELS
    for k in data["compiled"]:
        if k["registers"] is not None:  # cuobjdump ships with triton's NVIDIA backend
            assert k["local_bytes"] == 0, k
            assert 0 < k["registers"] <= 255, k
        assert k["shared_bytes"] <= 227 * 1024, k  # H100's per-block limit


def test_gpu_plans_were_compiled(report):
    """The GPU plans, not the interpreter's: 2048-wide vocabulary blocks for the fused sampler (one
    group of 8 of each input to each of 256 threads) and 1024-wide for the adjusted logits,
    64-position attention blocks, the bf16/fp16 tensor-core products (``IEEE`` off) next to the
    fp32 ones, and the layer kernels at every model's widths."""
    compiled = report[1]["compiled"]
    assert {k["constexprs"]["BLOCK"] for k in compiled if k["kernel"] == "_fused_sample_partials"} == {2048}
    adjusted = ("_adjusted_partials", "_adjusted_write")
    assert {k["constexprs"]["BLOCK"] for k in compiled if k["kernel"] in adjusted} == {1024}
    norm_blocks = {k["constexprs"]["BLOCK"] for k in compiled if k["kernel"].startswith("_add_rms_norm")}
    assert norm_blocks == {4096, 2048, 1024, 32}  # whole rows of hidden 3584, 2048, 576 and the tests' 32
    low_rank = {k["kernel"] for k in compiled if k["constexprs"].get("RANK")}
    assert low_rank == {"_add_rms_norm_jvp", "_silu_mul", "_rope_and_cache_write"}  # the terms the jvp kernels add
    rope = {(c["HEADS"], c["KV_HEADS"], c["HEAD_DIM"], c["TANGENT"])
            for c in (k["constexprs"] for k in compiled if k["kernel"] == "_rope_and_cache_write")}
    assert rope == {(h, kv, d, t) for h, kv, d in ((28, 4, 128), (16, 2, 128), (9, 3, 64), (4, 2, 8))
                    for t in (False, True)}
    partials = [k["constexprs"] for k in compiled if k["kernel"] == "_decode_attention"]
    assert {c["BLOCK_N"] for c in partials} == {64}
    assert {c["IEEE"] for c in partials} == {True, False}
    assert {c["SPLIT"] for c in partials} == {True, False}  # merged in the launch, or one split
    assert {(c["GROUP"], c["HEAD_DIM"], c["HEAD_PAD"]) for c in partials} == {
        (7, 128, 128), (8, 128, 128), (3, 64, 64), (2, 8, 16)}
    linears = {(c["BLOCK_M"], c["BLOCK_K"], c["SPLIT"], c["PRECISION"], c["PDL"])
               for c in (k["constexprs"] for k in compiled if k["kernel"] == "_decode_linear")}
    assert linears >= {(16, 128, True, "tf32", True), (16, 256, False, "tf32", True), (32, 128, True, "tf32", True),
                       (64, 128, True, "tf32", True), (16, 128, True, "ieee", True)}  # split-K or not, 1/32/64 rows
    assert all(k["constexprs"]["PDL"] for k in compiled if "PDL" in k["constexprs"]), "as on Hopper"
    prefetches = {c["PREFETCH_ITERS"] for c in (k["constexprs"] for k in compiled if k["kernel"] == "_decode_linear")}
    assert {1, 7} <= prefetches  # the default 2 steps of 128 bf16 inputs; the 7B qkv's whole 1792-input split
    modes = {(c["HAS_PROXY"], c["SHIFT"], c["PERMUTE"], c["EXACT_D"])
             for c in (k["constexprs"] for k in compiled if k["kernel"] == "_fused_sample_partials")}
    assert modes == {(False, False, False, False), (True, True, False, False), (True, False, False, False),
                     (True, True, True, False), (True, False, False, True)}


def test_swapped_linear_operands_compile_to_the_warpgroup_mma(report):
    """The decode-time linear kernel with the weight tile leading its product (``swap_ab``, 64 or
    128 weight rows a tile) runs on Hopper's warpgroup MMA (``HGMMA``), in every fusion and at 1 to
    64 rows; the default operand order, the rows padded to 16 or more on the MMA's ``M`` side, on
    the warp-level one (``HMMA``) below 64 rows, where the warpgroup MMA's ``M`` of 64 is not met."""
    linears = [k for k in report[1]["compiled"] if k["kernel"] == "_decode_linear" and k["tensor_core"] is not None]
    if not linears:
        pytest.skip("no cuobjdump beside triton's NVIDIA backend: the SASS is not read")
    swapped = [k for k in linears if k["constexprs"]["SWAP_AB"]]
    assert {k["constexprs"]["BLOCK_M"] for k in swapped} == {16, 32, 64}
    assert {k["constexprs"]["OUTPUT"] for k in swapped} == {0, 1, 2, 3}  # plain, gated, residual, rotary
    assert {k["tensor_core"] for k in swapped} == {"HGMMA"}, [k["case"] for k in swapped if k["tensor_core"] != "HGMMA"]
    default_order = {(k["constexprs"]["BLOCK_M"], k["tensor_core"]) for k in linears if not k["constexprs"]["SWAP_AB"]}
    assert default_order == {(16, "HMMA"), (32, "HMMA"), (64, "HGMMA")}


def test_a_kernel_the_interpreter_accepts_but_the_compiler_rejects_is_reported(tmp_path):
    """A global read inside a kernel without ``constexpr``: fine in the interpreter, a compile error."""
    (tmp_path / "bad_kernel.py").write_text(textwrap.dedent("""
        import triton
        import triton.language as tl

        SCALE = 2.0

        @triton.jit
        def scale_kernel(x_ptr, n, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            x = tl.load(x_ptr + offs, mask=offs < n)
            tl.store(x_ptr + offs, x * SCALE, mask=offs < n)

        @triton.jit
        def double_kernel(x_ptr, n, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            x = tl.load(x_ptr + offs, mask=offs < n)
            tl.store(x_ptr + offs, x * 2.0, mask=offs < n)
    """))
    done = run_python("""
        import json, sys, torch
        sys.path.insert(0, ".")
        from bad_kernel import double_kernel, scale_kernel
        from adfast.compile_check import compile_all
        x = torch.zeros(100)
        compiled, failures = compile_all(cases=[("bad", lambda: scale_kernel[(1,)](x, 100, BLOCK=128)),
                                                ("good", lambda: double_kernel[(1,)](x, 100, BLOCK=128))])
        print(json.dumps(dict(compiled=[k.kernel for k in compiled], failures=failures)))
    """, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["compiled"] == ["double_kernel"]
    assert [label for label, _ in result["failures"]] == ["bad"]
    assert "SCALE" in result["failures"][0][1]


def test_fused_sampler_loop_stays_within_its_instruction_budget(report):
    """Stage 1 of the fused sampler is bound by instruction issue and its exponentials
    (kernels/fused_sample.py): its loop lists about 40 SASS instructions a vocabulary entry with
    three bf16 inputs (at most 51, fp32 permutation; a Philox call among them runs every fourth
    block); the grouped draw with the pick in every group and running maxes listed 52, the
    per-entry Gumbel-max design before it 91, and the one before that, with cross-thread reductions
    in every iteration, 160. The bound catches such a regression."""
    for k in report[1]["compiled"]:
        if k["kernel"] == "_fused_sample_partials" and k["loop_instructions"] is not None:
            logits_per_thread = k["constexprs"]["BLOCK"] / (32 * k["num_warps"])
            assert k["loop_instructions"] / logits_per_thread <= 55, k


def test_loop_instructions_counts_the_largest_backward_branch():
    from adfast.compile_check import loop_instructions

    listing = "\n".join([
        "        /*0000*/                   MOV R1, c[0x0][0x28] ;",
        "        /*0010*/                   IADD3 R2, R1, 0x1, RZ ;",  # outer loop from here
        "        /*0020*/                   FADD R3, R3, 1 ;",  # inner loop from here
        "        /*0030*/               @P0 BRA 0x20 ;",  # inner: 2 instructions
        "        /*0040*/              @!P1 BRA 0x10 ;",  # outer: 4 instructions
        "        /*0050*/               @P2 BRA 0x70 ;",  # forward: not a loop
        "        /*0060*/                   EXIT ;",
    ])
    assert loop_instructions(listing) == 4
    assert loop_instructions("        /*0000*/                   EXIT ;") is None


def test_tensor_core_instruction_names_the_mma_kind():
    from adfast.compile_check import tensor_core_instruction

    line = "        /*0100*/                   {} ;"
    assert tensor_core_instruction(line.format("HGMMA.64x16x16.F32.BF16 R24, gdesc[UR4], R24")) == "HGMMA"
    assert tensor_core_instruction(line.format("HMMA.16816.F32.BF16 R4, R8, R12, R4")) == "HMMA"
    assert tensor_core_instruction(line.format("FFMA R4, R8, R12, R4")) is None
