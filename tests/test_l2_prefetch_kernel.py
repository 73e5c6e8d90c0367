"""The L2 prefetch (adfast.kernels.l2_prefetch): which bytes of a weight its items cover.

The prefetch itself changes no value (it is a hint to the cache), so what can be wrong is the
layout of its work: items that miss or overlap bytes, sizes the bulk prefetch refuses (not a
multiple of 16, or past a chunk), the order (every row's first chunk before any second one),
or items past a row's span. A test kernel runs the production item helper (``prefetch_items``)
over the launcher's grid and stores what each item would fetch; the test checks that against the
byte ranges of the specification (the whole weight when it fits the budget, else the first
``budget / rows`` bytes of every row in whole 128-byte lines). On a CUDA device the production
kernel also runs (a bulk prefetch of every case; Hopper and later), and a decode step's logits
are the same with and without the decoder's prefetch (tests/test_decoder.py).
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import triton
import triton.language as tl
from conftest import KERNEL_DEVICE as DEVICE

from adfast.kernels import l2_prefetch
from adfast.kernels.l2_prefetch import CHUNK, LINE, prefetch_items, prefetch_plan


@triton.jit
def _items(offset_ptr, size_ptr, rows, row_bytes, span, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    pid = tl.program_id(0)
    offset, size = prefetch_items(pid, rows, row_bytes, span, BLOCK, CHUNK)
    out = pid * BLOCK + tl.arange(0, BLOCK)
    tl.store(offset_ptr + out, offset)
    tl.store(size_ptr + out, size)


def kernel_items(rows: int, row_bytes: int, budget: int, block: int):
    """``[(offset, size)]`` of every item the launcher's grid would issue, in item order (size 0 dropped)."""
    rows, row_bytes, span, items = prefetch_plan(rows, row_bytes, budget)
    if items == 0:
        return []
    programs = triton.cdiv(items, block)
    offsets = torch.full((programs * block,), -1, dtype=torch.int64, device=DEVICE)
    sizes = torch.full((programs * block,), -1, dtype=torch.int32, device=DEVICE)
    _items[(programs,)](offsets, sizes, rows, row_bytes, span, BLOCK=block, CHUNK=CHUNK)
    assert (sizes >= 0).all()
    return [(o, s) for o, s in zip(offsets.tolist(), sizes.tolist()) if s > 0]


def expected_bytes(rows: int, row_bytes: int, budget: int) -> set[tuple[int, int]]:
    """The specification, as ``(start, end)`` byte ranges: the whole weight (down to 16 bytes)
    when it fits, else each row's first ``budget // rows`` bytes rounded down to lines."""
    total = rows * row_bytes
    if total <= budget:
        return {(0, total // 16 * 16)} if total >= 16 else set()
    head = min(row_bytes, budget // rows // LINE * LINE)
    if head == 0 or row_bytes % 16:
        return set()
    return {(r * row_bytes, r * row_bytes + head) for r in range(rows)}


def merged(items):
    """Sorted items merged into maximal contiguous ranges; overlaps are an error."""
    ranges = []
    for offset, size in sorted(items):
        if ranges and offset < ranges[-1][1]:
            raise AssertionError(f"items overlap at byte {offset}")
        if ranges and offset == ranges[-1][1]:
            ranges[-1] = (ranges[-1][0], offset + size)
        else:
            ranges.append((offset, offset + size))
    return ranges


# (rows, row_bytes, budget): whole weights (one and several chunks, a ragged tail), row heads of
# one line and of several chunks (spans past CHUNK), a budget under a line a row, odd row widths.
CASES = [
    (4, 256, 1 << 20),             # whole, one item
    (64, 1024, 1 << 20),           # whole, 4 chunks
    (3, 1000, 3000),               # whole, bytes not a multiple of 16
    (300, 7168, 300 * 7168 // 5),  # heads of 1433 -> 1408 bytes (11 lines)
    (40, 4 * CHUNK + 256, 40 * (2 * CHUNK + 300)),  # heads over two chunks and a part
    (1000, 4096, 1000 * 100),      # a budget under one line a row: nothing
    (50, 200, 50 * 130),           # row width not a multiple of 16: nothing
    (7, 22016, 7 * 22016 - 1),     # heads of nearly a whole row
]


@pytest.mark.parametrize("rows,row_bytes,budget", CASES)
@pytest.mark.parametrize("block", [16, l2_prefetch.BLOCK])
def test_items_cover_the_specified_bytes(rows, row_bytes, budget, block):
    items = kernel_items(rows, row_bytes, budget, block)
    assert all(s % 16 == 0 and 0 < s <= CHUNK and o % 16 == 0 for o, s in items)
    assert merged(items) == merged([(start, end - start) for start, end in expected_bytes(rows, row_bytes, budget)])

@pytest.mark.parametrize("rows,row_bytes,budget", [(300, 7168, 300 * 7168 // 5), (40, 4 * CHUNK + 256, 40 * 2 * CHUNK)])
def test_items_are_chunk_major(rows, row_bytes, budget):
    """Every row's first chunk comes before any row's second: a matmul's tiles all start ahead."""
    items = kernel_items(rows, row_bytes, budget, l2_prefetch.BLOCK)
    chunk_of = [(o % row_bytes) // CHUNK for o, _ in items]
    assert chunk_of == sorted(chunk_of)
    assert [o // row_bytes for o, _ in items[:rows]] == list(range(rows))


def test_compiles_to_hopper_bulk_prefetch(tmp_path):
    """For sm_90 the kernel's asm becomes the bulk prefetch instruction (``UBLKPF.L2``): the hint
    the decoder relies on is in the machine code, not dropped as an unused value. Compiled in a
    subprocess (the interpreter, on in this process, replaces ``triton.jit``)."""
    code = textwrap.dedent("""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from adfast.compile_check import _cuobjdump
        from adfast.kernels.l2_prefetch import BLOCK, CHUNK, _prefetch_l2
        signature = {"weight_ptr": "*bf16", "rows": "i32", "row_bytes": "i32", "span": "i32",
                     "BLOCK": "constexpr", "CHUNK": "constexpr"}
        kernel = triton.compile(ASTSource(_prefetch_l2, signature, constexprs={"BLOCK": BLOCK, "CHUNK": CHUNK}),
                                target=GPUTarget("cuda", 90, 32))
        sass = _cuobjdump(kernel.asm["cubin"], "-sass")
        print("no cuobjdump" if sass is None else sass.count("UBLKPF.L2"))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = done.stdout.strip().splitlines()[-1]
    if result == "no cuobjdump":
        pytest.skip("triton ships no cuobjdump here")
    assert int(result) >= 1


def test_budget_must_not_be_negative():
    with pytest.raises(ValueError, match="budget"):
        l2_prefetch.prefetch_l2(torch.zeros(4, 8), -1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the bulk prefetch runs on a CUDA device")
@pytest.mark.parametrize("shape,dtype,budget", [((2, 4608, 3584), torch.bfloat16, 32 << 20),
                                                 ((1, 37888, 3584), torch.bfloat16, 24 << 20),
                                                 ((3, 1000), torch.float32, 1 << 20)])
def test_prefetch_runs_and_changes_nothing(shape, dtype, budget):
    """The production kernel launches (eagerly and in a CUDA graph) and leaves the weight as it was."""
    weight = torch.randn(shape, device="cuda").to(dtype)
    before = weight.clone()
    l2_prefetch.prefetch_l2(weight, budget)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        l2_prefetch.prefetch_l2(weight, budget)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(weight, before)
