"""Smoke test of bench/decode.py on tiny shapes (CPU): every variant runs and writes its rows.
No timing is asserted here; performance claims live in bench/results/."""
import json
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from conftest import load_bench

ROOT = Path(__file__).resolve().parents[1]


def test_decode_benchmark_runs_every_variant_on_tiny_shapes(tmp_path):
    bench = load_bench("decode")
    tiny = ["--shapes", "tiny", "--prompt-len", "6", "--new-tokens", "3", "--out", str(tmp_path)]
    with pytest.MonkeyPatch.context() as patch:  # the sampler's PyTorch twin: the interpreter would take minutes
        patch.delenv("TRITON_INTERPRET", raising=False)
        assert bench.main(tiny + ["--batches", "1", "2", "--jvp-ranks", "4"]) == 0
        (result,) = tmp_path.glob("decode-*.json")
        first = json.loads(result.read_text())
        # --append: a second run replaces its own rows and keeps the others; without it, starts afresh
        assert bench.main(tiny + ["--batches", "2", "--variants", "engine_temperature", "--append"]) == 0
        rows = json.loads(result.read_text())
        assert len(rows) == len(first)
        assert [r for r in rows if (r["batch"], r["variant"]) == (2, "engine_temperature")] != \
            [r for r in first if (r["batch"], r["variant"]) == (2, "engine_temperature")]
        assert bench.main(tiny + ["--batches", "1", "--variants", "engine_temperature"]) == 0
        assert [(r["batch"], r["variant"]) for r in json.loads(result.read_text())] == [(1, "engine_temperature")]
        # a setting off the defaults names its rows (the prefetch itself does nothing on CPU)
        assert bench.main(tiny + ["--batches", "1", "--variants", "engine_temperature", "--prefetch-mb", "2",
                                  "--append"]) == 0
        assert [r["variant"] for r in json.loads(result.read_text())] == ["engine_temperature",
                                                                          "engine_temperature_pf2"]
    settings = dict(linear="kernel", linear_projections=["lm_head", "o"], linear_rows=8, no_linear_fusions=False,
                    linear_swap=False, linear_prefetch_steps=None, linear_norm_rows=1, prefetch_mb=2)
    assert bench.variant_suffix(Namespace(**settings), torch.device("cpu")) == "_kernel-o-lm_head-r8_pf2"
    settings.update(linear_projections=None, linear_rows=bench.LINEAR_KERNEL_ROWS, prefetch_mb=0)
    assert bench.variant_suffix(Namespace(**settings), torch.device("cpu")) == "_kernel"
    settings.update(no_linear_fusions=True)
    assert bench.variant_suffix(Namespace(**settings), torch.device("cpu")) == "_kernel_unfused"
    settings.update(no_linear_fusions=False, linear_swap=True, linear_prefetch_steps=8, linear_norm_rows=32)
    assert bench.variant_suffix(Namespace(**settings), torch.device("cpu")) == "_kernel_swap_lpf8_norms32"
    variants = [v for v in bench.VARIANTS if v != "engine_jvp_lowrank"] + ["engine_jvp_r4"]
    assert sorted((r["variant"], r["batch"]) for r in rows) == sorted((v, b) for v in variants for b in (1, 2))
    for row in rows:
        assert set(row) == {"device", "batch", "variant", "tok_s", "ms_step", "limit_ms", "limit_frac", "first_token_s",
                            "decode_ms_step", "decode_limit_frac", "kv_ms", "attention", "engine_gb", "new_tokens",
                            "run"}
        assert row["tok_s"] > 0 and row["limit_ms"] > 0 and 0 < row["limit_frac"] and row["first_token_s"] > 0
        # the decode steps alone: the timed call less the one-token call, over the other new_tokens - 1 steps
        assert row["decode_ms_step"] * 2 == pytest.approx(row["ms_step"] * 3 - 1e3 * row["first_token_s"])
        assert row["decode_limit_frac"] == pytest.approx(row["limit_ms"] / row["decode_ms_step"])
    assert result.with_suffix(".png").stat().st_size > 0
    result.with_suffix(".png").unlink()
    assert bench.main(["--plot-only", str(result)]) == 0  # the GPU image has no matplotlib: drawn later
    assert result.with_suffix(".png").stat().st_size > 0


def test_prefill_benchmark_times_both_ways_per_cache_size(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # it takes the decode benchmark's model builder
    bench = load_bench("prefill")
    assert bench.main(["--batch", "2", "--prompt-len", "4", "--max-seq-lens", "8", "16", "--repeats", "1",
                       "--out", str(tmp_path)]) == 0
    (result,) = tmp_path.glob("prefill-*.json")
    rows = json.loads(result.read_text())
    assert [(r["max_seq_len"], r["positions"]) for r in rows] == [(8, "reached"), (8, "all"), (16, "reached"),
                                                                 (16, "all")]
    assert all(r["ms"] > 0 and r["batch"] == 2 and r["prompt_len"] == 4 for r in rows)


def test_cache_read_bytes_is_the_mean_kv_cache_a_step_attends():
    """Against transformers' own cache: the bytes of its keys and values after each context length
    the engine's steps attend (prompt_len, prompt_len + 1, ...), averaged over the steps."""
    bench = load_bench("decode")
    shape = bench.SHAPES["tiny"]["proxy"]
    model = bench.random_model(shape, torch.float32, torch.device("cpu"))
    prompt_len, new_tokens, batch = 5, 4, 3

    def held(length):  # bytes of every layer's keys and values for `batch` rows of `length` tokens
        cache = model(torch.ones(batch, length, dtype=torch.int64), use_cache=True).past_key_values
        return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))

    mean = sum(held(prompt_len + t) for t in range(new_tokens)) / new_tokens
    assert bench.cache_read_bytes(shape, 2, batch, prompt_len, new_tokens, 4) == pytest.approx(2 * mean)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch's forward AD
def test_random_proxy_eps_sweep_runs_on_tiny_shapes(tmp_path, monkeypatch):
    """bench/eps_sweep_random.py end to end on tiny shapes, then its --plot-only redraw from the JSON."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # it takes the decode benchmark's proxy shapes
    bench = load_bench("eps_sweep_random")
    if not torch.cuda.is_available():  # the 3B shape is refused without a GPU, before anything is built
        assert bench.main(["--proxy", "qwen2.5-3b", "--out", str(tmp_path)]) == 2
    eps = ["1e-4", "0.01", "1"]
    assert bench.main(["--proxy", "tiny", "--holdout", "2", "--test", "1", "--eps", *eps, "--out",
                       str(tmp_path)]) == 0
    (result,) = tmp_path.glob("eps_sweep_*.json")
    data = json.loads(result.read_text())
    assert sorted((r["dtype"], r["eps"]) for r in data["rows"]) == sorted(
        (d, float(e)) for d in ("float32", "float16", "bfloat16") for e in eps)
    assert set(data["recommended"]) == {"float32", "float16", "bfloat16"}
    assert all(0 <= r["sine"] <= 1 and r["positions"] == 96 for r in data["rows"])
    for suffix in (".md", ".png"):
        result.with_suffix(suffix).unlink()
    assert bench.main(["--plot-only", str(result)]) == 0
    assert result.with_suffix(".png").stat().st_size > 0 and "Recommended eps" in result.with_suffix(".md").read_text()


def test_profile_step_runs_on_tiny_shapes(tmp_path, monkeypatch):
    """bench/profile_step.py on tiny shapes (CPU operators stand in for kernels): its per-step reduction."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # it imports the decode benchmark's model builders
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    bench = load_bench("profile_step")
    assert bench.main(["--shapes", "tiny", "--variant", "engine_antidistill", "--batch", "2", "--steps", "2",
                       "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "profile-cpu-engine_antidistill-b2.json").read_text())
    assert (result["variant"], result["batch"], result["steps"]) == ("engine_antidistill", 2, 2)
    assert 0 < result["busy_ms"] <= result["span_ms"] and 0 <= result["idle_frac"] < 1
    names = {row["name"] for row in result["kernels"]}
    assert "aten::bmm" in names and all(row["launches_per_step"] > 0 for row in result["kernels"])


def test_hf_profile_runs_on_tiny_shapes(tmp_path, monkeypatch):
    """bench/hf_profile.py on tiny shapes: both generate runs profiled, the processor's through adfast.hf."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    bench = load_bench("hf_profile")
    assert bench.main(["--shapes", "tiny", "--new-tokens", "2", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "hf_profile-cpu-tiny.txt").read_text()
    assert "==== temperature:" in text and "==== antidistill:" in text and "_proxy_logits" in text
