"""eps_study: the eps sweep on a tiny model, the recommendation rule, the outputs and the command line."""
import json

import pytest
import torch
from conftest import VOCAB, tiny_llama

from adfast.eps_study import (DEFAULT_EPS, add_parser, dtype_name, format_table, recommend_eps, sweep_eps,
                              write_outputs)
from adfast.gradient import proxy_gradient

# torch's forward AD loads its JVP decompositions with torch.jit.script, deprecated in torch 2.13
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
EPS = (1e-8, 3e-2, 1.0)


def examples(count: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, VOCAB, (4,), generator=g).tolist(), torch.randint(0, VOCAB, (6,), generator=g).tolist())
            for _ in range(count)]


@pytest.fixture(scope="module")
def sweep():
    model = tiny_llama()
    gradient = proxy_gradient(model, examples(4, 0), progress=False)
    sequences = examples(2, 1) + [list(range(1, 8))]  # two (prompt, completion) pairs and one plain sequence
    return sweep_eps(model, gradient, sequences, dtypes=("bf16", torch.float32), eps_values=EPS[::-1],
                     batch_size=2, progress=False)


def test_table_shape_and_fields(sweep):
    assert [(r["dtype"], r["eps"]) for r in sweep] == [(d, e) for d in ("bfloat16", "float32") for e in EPS]
    assert all(r["positions"] == 2 * 6 + 7 for r in sweep)  # completion-predicting positions + every position
    for r in sweep:
        assert 0 <= r["sine"] <= 1 and 0 <= r["vanished_fraction"] <= 1 and r["rel_error"] >= 0
    text = format_table(sweep)
    assert len(text.splitlines()) == 1 + len(EPS) and "bfloat16 sine" in text
    assert format_table(sweep, markdown=True).startswith("| eps |")


def test_ends_of_the_grid(sweep):
    """Too small an eps in bf16 rounds every perturbation away (D = 0, flagged, sine 1); float32 at
    1e-8 is noisy but not zero; the middle beats both ends; 1.0 is truncation-bound."""
    rows = {(r["dtype"], r["eps"]): r for r in sweep}
    tiny = rows["bfloat16", 1e-8]
    assert tiny["vanished_fraction"] > 0.99 and (tiny["all_zero"] or tiny["sine"] > 0.95)
    if tiny["all_zero"]:
        assert tiny["sine"] == 1.0 and "D=0" in format_table(sweep)
    for dtype in ("bfloat16", "float32"):
        assert rows[dtype, 3e-2]["sine"] < min(rows[dtype, 1e-8]["sine"], rows[dtype, 1.0]["sine"])
    assert rows["float32", 3e-2]["sine"] < 0.01 and not rows["float32", 1e-8]["all_zero"]
    assert recommend_eps(sweep, "bf16") == recommend_eps(sweep, torch.float32) == 3e-2


def test_recommend_eps_plateaus():
    def rows(sines):
        return [{"dtype": "float32", "eps": 10.0 ** -k, "sine": s} for k, s in zip(range(8, 0, -1), sines)]

    assert recommend_eps(rows([1, 0.5, 0.1, 0.2, 0.5, 0.9, 1, 1]), "fp32") == 1e-6  # a sharp minimum
    # a plateau 1e-6 .. 1e-3 (within 10% of the minimum): its middle, the larger of the two middle points
    assert recommend_eps(rows([1, 0.5, 0.01, 0.0105, 0.0102, 0.0109, 0.5, 1]), "float32") == 1e-4
    assert recommend_eps(rows([1, 0.5, 0.01, 0.0105, 0.0102, 0.5, 0.9, 1]), "float32") == 1e-5
    assert recommend_eps(rows([1, 0.5, 0.01, 0.0105, 0.0102, 0.5, 0.9, 1]), "float32", rtol=0) == 1e-6
    with pytest.raises(ValueError, match="no finite rows"):
        recommend_eps(rows([0.1] * 8), "bf16")


def test_outputs_written(sweep, tmp_path):
    json_path, png_path = write_outputs(sweep, tmp_path / "out", "tiny", proxy="tiny-llama")
    data = json.loads(json_path.read_text())
    assert data["proxy"] == "tiny-llama" and len(data["rows"]) == len(sweep)
    assert data["recommended"] == {"bfloat16": 3e-2, "float32": 3e-2}
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_arguments_and_defaults():
    import argparse

    assert DEFAULT_EPS[0] == 1e-7 and DEFAULT_EPS[-1] == 1e-1 and len(DEFAULT_EPS) == 13
    assert dtype_name("bf16") == "bfloat16" and dtype_name(torch.float16) == "float16"
    with pytest.raises(ValueError, match="unknown dtype"):
        dtype_name("int8")
    parser = argparse.ArgumentParser(prog="adfast")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["check-eps", "--proxy", "smollm2", "--grad", "g.safetensors", "--dtype", "bf16", "fp16"])
    assert args.dtype == ["bf16", "fp16"] and args.eps == list(DEFAULT_EPS) and callable(args.run)


def test_sweep_validation():
    model = tiny_llama()
    gradient = proxy_gradient(model, examples(1, 0), progress=False)
    with pytest.raises(ValueError, match="must not repeat"):
        sweep_eps(model, gradient, [[1, 2]], dtypes=("bf16", "bfloat16"), progress=False)
    with pytest.raises(ValueError, match="non-empty"):
        sweep_eps(model, gradient, [([], [1, 2])], dtypes=("bf16",), progress=False)


def test_main_reports_errors_in_one_line(tmp_path):
    from adfast.cli import main

    with pytest.raises(SystemExit, match="^adfast check-eps: error: .*not-there"):
        main(["check-eps", "--proxy", "smollm2", "--grad", str(tmp_path / "not-there.safetensors"),
              "--out", str(tmp_path)])
