"""adfast.sweep (config, intervals, resuming) and the CI miniature of bench/distill_small.py: every
stage of the distillation experiment runs and the table has every row (nothing about who wins)."""
import csv
import json
import math

import pytest
import torch
from conftest import load_bench

from adfast import synthetic, tasks
from adfast.sweep import T975, Setting, expand_settings, interval, read_config, resolve_config


def test_settings_expand_lists_in_order_without_duplicates():
    settings = expand_settings([{"mode": "temperature", "tau": [0.5, 1.0]},
                                {"mode": "antidistill", "tau": 0.5, "lam": [0.1, 0.2]},
                                {"mode": "temperature", "tau": 1.0, "lam": 0.3}])  # lam unused: a duplicate
    assert settings == [Setting("temperature", 0.5, 0.0), Setting("temperature", 1.0, 0.0),
                        Setting("antidistill", 0.5, 0.1), Setting("antidistill", 0.5, 0.2)]
    assert settings[2].label == "antidistill_tau0.5_lam0.1" and settings[0].label == "temperature_tau0.5"


@pytest.mark.parametrize("entries, message", [
    ([], "non-empty"),
    ([{"mode": "greedy"}], "mode must be one of"),
    ([{"mode": "antidistill", "tau": 1.0}], "needs lam > 0"),
    ([{"mode": "permutation", "lam": -1.0}], "needs lam > 0"),
    ([{"mode": "temperature", "tau": -0.5}], "setting 1: tau must be 0 \\(greedy\\) or"),
    ([{"mode": "temperature", "tau": [1.0, 1e-8]}], "setting 1: tau must be 0 \\(greedy\\) or .*got 1e-08"),
    ([{"mode": "temperature", "temp": 1.0}], "got keys"),
])
def test_bad_settings_are_named(entries, message):
    with pytest.raises(ValueError, match=message):
        expand_settings(entries)


def minimal_config(**overrides):
    raw = {"out": "out", "models": {"teacher": "t", "proxy": "p", "student": "s"},
           "tasks": {"train": "a.jsonl", "holdout": "b.jsonl", "test": "c.jsonl"},
           "settings": [{"mode": "temperature"}]}
    raw.update(overrides)
    return raw


def test_config_resolves_paths_and_fills_defaults(tmp_path):
    config = resolve_config(minimal_config(sampling={"eps": 1e-3}), tmp_path)
    assert config["out"] == str(tmp_path / "out") and config["models"]["teacher"] == str(tmp_path / "t")
    assert config["sampling"]["eps"] == 1e-3 and config["sampling"]["max_new_tokens"] == 256
    assert config["settings"] == [{"mode": "temperature", "tau": 1.0, "lam": 0.0}]
    assert resolve_config(minimal_config(models={"teacher": "smollm2", "proxy": "p", "student": "s"}),
                          tmp_path)["models"]["teacher"] == "smollm2"


@pytest.mark.parametrize("overrides, message", [
    ({"outdir": "x"}, "unknown config keys"),
    ({"models": {"teacher": "t", "proxy": "p"}}, r"\[models\] needs exactly"),
    ({"seeds": []}, "seeds must be"),
    ({"seeds": [1, 1]}, "seeds repeat"),
    ({"backend": "vllm"}, "backend must be one of"),
    ({"holdout": {"tau": 0}}, "holdout traces are sampled"),
    ({"sampling": 3}, "must be a table"),
])
def test_bad_configs_are_named(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        resolve_config(minimal_config(**overrides), tmp_path)


def test_config_files_toml_and_json_agree(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps(minimal_config(seeds=[0, 2])))
    (tmp_path / "c.toml").write_text('out = "out"\nseeds = [0, 2]\n[models]\nteacher = "t"\nproxy = "p"\n'
                                     'student = "s"\n[tasks]\ntrain = "a.jsonl"\nholdout = "b.jsonl"\n'
                                     'test = "c.jsonl"\n[[settings]]\nmode = "temperature"\n')
    assert read_config(tmp_path / "c.json") == read_config(tmp_path / "c.toml")
    (tmp_path / "c.yaml").write_text("")
    with pytest.raises(ValueError, match=".toml or .json"):
        read_config(tmp_path / "c.yaml")


def student_t_coverage(t: float, df: int, steps: int = 200_001) -> float:
    """P(|T| <= t) for Student's t with ``df`` degrees of freedom, by integrating its density."""
    x = torch.linspace(-t, t, steps, dtype=torch.float64)
    density = torch.distributions.StudentT(torch.tensor(float(df), dtype=torch.float64)).log_prob(x).exp()
    return float(torch.trapezoid(density, x))


@pytest.mark.parametrize("df", [1, 2, 3, 5, 10, 30])
def test_t_quantiles_cover_95_percent(df):
    assert student_t_coverage(T975[df - 1], df) == pytest.approx(0.95, abs=2e-4)


def test_interval_is_the_t_interval_of_the_mean():
    values = [0.2, 0.4, 0.9]
    mean, half = interval(values)
    sd = math.sqrt(sum((v - 0.5) ** 2 for v in values) / 2)
    assert mean == pytest.approx(0.5) and half == pytest.approx(4.303 * sd / math.sqrt(3))
    assert math.isnan(interval([0.3])[1])


def test_synthetic_splits_are_disjoint_and_traces_correct():
    tokenizer = synthetic.char_tokenizer()
    seen = {split: set(synthetic.problems(split, 40)) for split in synthetic.SPLITS}
    for a in seen:
        for b in seen:
            assert a == b or not seen[a] & seen[b]
    for numbers, (prompt, completion) in zip(seen["test"], synthetic.reference_examples(tokenizer, seen["test"])):
        text = tokenizer.decode(completion, skip_special_tokens=True)
        assert completion[-1] == tokenizer.eos_token_id and tokenizer.decode(prompt) == synthetic.prompt_text(numbers)
        assert tasks.check_answer(text, sum(numbers))
        steps = text.split("#")[0].split(";")
        assert sorted([int(steps[0].split("+")[0])] + [int(s.split("+")[1].split("=")[0]) for s in steps]) \
            == sorted(numbers)
        assert all(int(a) + int(b.split("=")[0]) == int(b.split("=")[1])
                   for a, b in (s.split("+") for s in steps))


def test_synthetic_problem_count_is_checked():
    with pytest.raises(ValueError, match="ask for at most"):
        synthetic.problems("holdout", 10_000)


@pytest.fixture(scope="module")
def miniature(tmp_path_factory):
    """The CI miniature, sampling through the PyTorch twins of the kernels (the kernels' own tests
    run them under the Triton interpreter, which would take minutes here)."""
    out = tmp_path_factory.mktemp("distill_small")
    bench = load_bench("distill_small")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("TRITON_INTERPRET", raising=False)
        summary = bench.main(["--preset", "mini", "--out", str(out), "--results", str(out / "results")])
    return bench, out, summary


def test_miniature_runs_every_stage_and_reports_every_row(miniature):
    bench, out, summary = miniature
    preset = bench.PRESETS["mini"]
    settings = len(preset["temperature_taus"]) + 2 * len(preset["lam_nats"])
    seeds = preset["seeds"]
    sweep = out / "sweep"
    report = json.loads((sweep / "results.json").read_text())
    assert len(report["rows"]) == settings * len(seeds) and len(report["summary"]) == settings
    assert {r["mode"] for r in report["summary"]} == {"temperature", "antidistill", "permutation"}
    assert all(r["seeds"] == len(seeds) for r in report["summary"])
    for row in report["rows"]:
        for key in ("teacher_accuracy", "student_accuracy", "student_holdout_nll", "teacher_logprob"):
            assert row[key] is not None and math.isfinite(row[key]), (row, key)
        where = sweep / "runs" / Setting(row["mode"], row["tau"], row["lam"]).label / f"seed{row['seed']}"
        for name, count in (("train_traces.jsonl", preset["prompts"]["train"]),
                            ("teacher_test.jsonl", preset["prompts"]["test"]),
                            ("student_test.jsonl", preset["prompts"]["test"])):
            rows = tasks.read_jsonl(where / name)
            assert len(rows) == count and all("correct" in r for r in rows)
            assert row["teacher_accuracy" if name == "teacher_test.jsonl" else "student_accuracy"] == pytest.approx(
                sum(r["correct"] for r in rows) / count) or name == "train_traces.jsonl"
    with open(sweep / "results_by_seed.csv") as f:
        assert len(list(csv.DictReader(f))) == settings * len(seeds)
    with open(sweep / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == settings
    assert (sweep / "results.png").stat().st_size > 0 and (out / "results" / "distill_small_mini.png").exists()
    assert len(summary["matched"]) == 2 * len(preset["lam_nats"])
    assert (sweep / "gradient.safetensors").exists() and len(tasks.read_jsonl(sweep / "holdout_traces.jsonl")) \
        == preset["prompts"]["holdout"]


def test_antidistillation_traces_differ_from_temperature_traces(miniature):
    _, out, summary = miniature
    runs = out / "sweep" / "runs"
    lam = next(r["lam"] for r in summary["summary"] if r["mode"] == "antidistill")
    tau = next(r["tau"] for r in summary["summary"] if r["mode"] == "antidistill")
    adjusted = tasks.read_jsonl(runs / Setting("antidistill", tau, lam).label / "seed0" / "train_traces.jsonl")
    plain = tasks.read_jsonl(runs / Setting("temperature", tau, 0.0).label / "seed0" / "train_traces.jsonl")
    assert [r["completion_ids"] for r in adjusted] != [r["completion_ids"] for r in plain]


def test_rerun_resumes_and_a_new_seed_only_adds_its_runs(miniature, capsys):
    from adfast.sweep import Sweep

    bench, out, _ = miniature
    sweep = out / "sweep"
    stamps = {p: p.stat().st_mtime_ns for p in (sweep / "runs").rglob("*") if p.is_file()}
    stamps[sweep / "gradient.safetensors"] = (sweep / "gradient.safetensors").stat().st_mtime_ns
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("TRITON_INTERPRET", raising=False)
        bench.main(["--preset", "mini", "--out", str(out)])
        assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing recomputed
        assert "distilling" not in capsys.readouterr().err
        config = json.loads((sweep / "config.json").read_text())
        config["seeds"] = config["seeds"] + [7]
        report = Sweep(config).run()
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    settings = len(config["settings"])
    assert capsys.readouterr().err.count("distilling") == settings  # one new run per setting
    assert len(report["rows"]) == settings * len(config["seeds"])
    assert sorted({r["seed"] for r in report["rows"]}) == sorted(config["seeds"])


def test_changed_config_is_refused(miniature):
    _, out, _ = miniature
    config = json.loads((out / "sweep" / "config.json").read_text())
    config["sampling"]["eps"] = 1e-2
    from adfast.sweep import Sweep

    with pytest.raises(ValueError, match=r"different config \(changed: \['sampling'\]\)"):
        Sweep(config)


def test_token_breakdown_classes_and_orders(miniature):
    tokens = load_bench("distill_small_tokens")
    tokenizer = synthetic.char_tokenizer()

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prompt, completion = ids("7+3+4+7="), ids("7+3=10;10+4=14;14+7=21#21") + [tokenizer.eos_token_id]
    chosen = [t for t, c in zip(tokenizer.convert_ids_to_tokens(completion), tokens.choice_mask(
        tokenizer, prompt, completion)) if c]
    assert chosen == ["7", "3", "4"]  # the last 7 is forced: only one number is left
    assert tokens.choice_mask(tokenizer, ids("5+5+5+5="), ids("5+5=10;10+5=15;15+5=20#20")) == [False] * 25
    assert tokens.picked_order(tokenizer, prompt, completion) == [7, 3, 4, 7]
    assert tokens.picked_order(tokenizer, prompt, ids("7+7=14;14+4=18;18+4=22#22")) is None
    traces = [{"prompt_ids": prompt, "completion_ids": completion},
              {"prompt_ids": prompt, "completion_ids": ids("3+4=7;7+7=14;14+7=21#21")},
              {"prompt_ids": prompt, "completion_ids": ids("3+3=6#6")}]
    stats = tokens.order_statistics(tokenizer, traces)
    assert stats["well_formed"] == pytest.approx(2 / 3) and stats["prompt_order"] == 0.5
    assert stats["ascending"] == 0.5 and stats["first_pick_position_shares"] == [0.5, 0.5, 0.0, 0.0]
    assert stats["first_pick_position_entropy"] == pytest.approx(math.log(2))

    _, out, _ = miniature
    label = Setting("temperature", 1.0, 0.0).label
    rows = tokens.main(["--run", str(out), "--settings", label])["rows"]
    (row,) = rows
    assert row["choice_tokens"] + row["forced_tokens"] == row["all_tokens"] > 0
    assert row["all"] == pytest.approx(row["sweep_student_holdout_nll"], rel=1e-4)  # the same student again
    assert row["all"] == pytest.approx((row["choice"] * row["choice_tokens"] + row["forced"] * row["forced_tokens"])
                                       / row["all_tokens"])
