"""bench/goals.py decides each issue goal from result rows: hand-made rows on both sides of every
threshold, a smoke file that must be ignored, and a device missing rows."""
import json
from pathlib import Path

import pytest
from conftest import load_bench


@pytest.fixture
def goals():
    return load_bench("goals")


def decode_row(device, batch, variant, ms_step, limit_ms, tok_s=None, decode_ms_step=None):
    row = dict(device=device, batch=batch, variant=variant, tok_s=tok_s or batch * 1e3 / ms_step, ms_step=ms_step,
               limit_ms=limit_ms, limit_frac=limit_ms / ms_step, attention="adfast split-K", engine_gb=1.0)
    if decode_ms_step:  # rows of bench/decode.py before it timed the decode steps alone lack these
        row.update(decode_ms_step=decode_ms_step, decode_limit_frac=limit_ms / decode_ms_step)
    return row


def write(path: Path, rows):
    path.write_text(json.dumps(rows))


def test_each_goal_is_decided_from_the_rows(goals, tmp_path):
    gpu = "NVIDIA H200"
    write(tmp_path / "decode-NVIDIA_H200.json", [
        decode_row(gpu, 1, "engine_antidistill", 10.0, 9.1, tok_s=100.0, decode_ms_step=9.5),  # 0.91 of its limit
        decode_row(gpu, 1, "engine_temperature", 6.0, 5.07),  # 0.845: below 0.85
        decode_row(gpu, 1, "hf_antidistill", 70.0, 9.1, tok_s=15.0),  # 100 / 15 = 6.67x
        decode_row(gpu, 1, "engine_jvp_r8", 8.5, 7.1),  # 8.5 / 6 = 1.417x temperature
        decode_row(gpu, 1, "engine_jvp", 11.0, 9.1),
        decode_row(gpu, 32, "engine_antidistill", 12.0, 9.1),  # 0.758
        decode_row(gpu, 32, "engine_temperature", 5.5, 5.03),  # 0.915
        decode_row(gpu, 32, "engine_jvp_r8", 8.0, 7.1),  # 1.4545x
    ])
    write(tmp_path / "decode-NVIDIA_H200-tiny.json", [decode_row(gpu, 1, "engine_temperature", 1.0, 5.03)])
    write(tmp_path / "sampler-NVIDIA_H200.json", [
        dict(device=gpu, batch=64, variant="fused", bandwidth_frac=0.81, speedup_vs_eager=4.9),
        dict(device=gpu, batch=64, variant="fused_one_vocab", bandwidth_frac=0.79, speedup_vs_eager=5.1),
        dict(device=gpu, batch=1, variant="fused", bandwidth_frac=0.1, speedup_vs_eager=9.0)])
    write(tmp_path / "low_rank_fidelity_smollm2_cpu.json", {"first_rank_reaching_cosine_target": 8})
    write(tmp_path / "decode-other.json", [decode_row("other", 1, "engine_antidistill", 10.0, 9.5)])

    assert goals.main(["--results", str(tmp_path)]) == 0
    report = (tmp_path / "goals-NVIDIA_H200.md").read_text()
    rows = [line.split(" | ") for line in report.splitlines() if line.startswith("| #")]
    verdicts = [(issue.strip("| "), batch, verdict.strip(" |")) for issue, _, batch, _, _, verdict in rows]
    assert verdicts == [
        ("#2", "64", "met"), ("#2", "64", "missed"), ("#2", "64", "missed"),  # the one-vocabulary row: 0.79
        ("#3", "1", "met"), ("#3", "1", "missed"),
        ("#3", "1", "reported"), ("#3", "1", "not measured"),  # the decode steps alone: only (d) has them
        ("#3", "1", "met"),  # (d)/(c) 1.667 <= 1.05 * 9.1 / 5.07 = 1.885
        ("#3", "32", "missed"), ("#3", "32", "met"), ("#3", "32", "not measured"), ("#3", "32", "not measured"),
        ("#3", "32", "missed"),  # 2.182 > 1.885
        ("#3", "1", "met"),
        ("#4", "1", "met"), ("#4", "1", "reported"), ("#4", "32", "missed")]
    measured = [None if r[3] == "-" else float(r[3]) for r in rows]
    assert measured[2] == pytest.approx(0.79) and "one vocabulary" in rows[2][1]
    assert measured[5] == pytest.approx(9.1 / 9.5, abs=1e-3) and "decode steps alone" in rows[5][1]
    assert measured[7] == pytest.approx(10 / 6, abs=1e-3) and rows[7][4] == "<= 1.885"
    assert measured[13] == pytest.approx(100 / 15, abs=1e-3)
    assert measured[15] == pytest.approx(11 / 10, abs=1e-3)

    other = [line for line in (tmp_path / "goals-other.md").read_text().splitlines() if line.startswith("| #")]
    assert [line.split(" | ")[-1] for line in other].count("met |") == 1  # (d) at batch 1: 0.95 of its limit
    assert all(line.endswith("not measured |") for line in other if "(d) engine antidistill" not in line
               or "| 32 |" in line)


def test_nothing_to_check_is_an_error(goals, tmp_path, capsys):
    assert goals.main(["--results", str(tmp_path)]) == 2
    assert "nothing to check" in capsys.readouterr().err


def test_profiles_are_broken_down_beside_the_goals(goals, tmp_path):
    gpu = "NVIDIA H200"
    write(tmp_path / "decode-NVIDIA_H200.json", [decode_row(gpu, 1, "engine_temperature", 4.0, 3.3)])
    (tmp_path / "profile-NVIDIA_H200-engine_temperature-b1.json").write_text(json.dumps(dict(
        device=gpu, variant="engine_temperature", batch=1, steps=4, busy_ms=3.5, span_ms=3.9, idle_frac=0.1,
        kernels=[dict(name="nvjet_sm90_tst_384x8", launches_per_step=28.0, ms_per_step=2.5),
                 dict(name="void cublasLt::splitKreduce_kernel<32>", launches_per_step=28.0, ms_per_step=0.25),
                 dict(name="_add_rms_norm", launches_per_step=57.0, ms_per_step=0.5)])))
    write(tmp_path / "decode-other.json", [decode_row("other", 1, "engine_temperature", 4.0, 3.3)])
    assert goals.main(["--results", str(tmp_path)]) == 0
    report = (tmp_path / "goals-NVIDIA_H200.md").read_text()
    assert "| engine_temperature | 1 | 3.90 | 3.50 | 0.40 | 2.75 | 0.50 | 113 | 3.30 |" in report
    assert "Where the profiled steps" not in (tmp_path / "goals-other.md").read_text()


def test_ratios_of_rows_from_two_runs_are_marked(goals):
    """A ratio of rows that different decode runs wrote carries '(rows of two runs)'; one run's do not."""
    def row(batch, variant, ms_step, run):
        return dict(decode_row("gpu", batch, variant, ms_step, 5.0), run=run)

    rows = [row(1, "engine_antidistill", 8.0, "a"), row(1, "engine_temperature", 5.0, "a"),
            row(1, "hf_antidistill", 80.0, "b"), row(1, "engine_jvp_r8", 6.0, "b"),
            row(32, "engine_antidistill", 9.0, "a"), row(32, "engine_temperature", 6.0, "a")]
    verdicts = {(g.goal, g.batch): g.verdict for g in goals.decode_goals(rows, 8)}
    assert verdicts[("(d)/(c) step time, against 1.05x their limits' ratio", 1)] == "missed"  # one run: no mark
    assert verdicts[("(d) tok/s over HF generate + processor", 1)].endswith("(rows of two runs)")
    assert verdicts[("exact-D rank 8 step time over temperature", 1)].endswith("(rows of two runs)")
    assert not verdicts[("(d) engine antidistill, fraction of its limit", 32)].endswith("(rows of two runs)")


def test_settings_off_the_defaults_are_listed_against_the_defaults(goals, tmp_path):
    gpu = "NVIDIA H200"
    write(tmp_path / "decode-NVIDIA_H200.json", [
        decode_row(gpu, 1, "engine_temperature", 4.4, 3.34),
        decode_row(gpu, 1, "engine_temperature_pf24", 4.0, 3.34),
        decode_row(gpu, 1, "engine_temperature_kernel-o-gate_up-down-lm_head_pf24", 3.9, 3.34),
        decode_row(gpu, 32, "engine_antidistill_nopdl", 8.6, 6.27),  # no default row at batch 32
        decode_row(gpu, 1, "engine_jvp_r8_kernel", 6.0, 4.81), decode_row(gpu, 1, "engine_jvp_r8", 6.3, 4.81)])
    assert goals.main(["--results", str(tmp_path)]) == 0
    report = (tmp_path / "goals-NVIDIA_H200.md").read_text()
    assert "| engine_temperature | 1 | pf24 | 4.00 | 83.5% | 4.40 | 75.9% | 0.909 |" in report
    assert ("| engine_temperature | 1 | kernel-o-gate_up-down-lm_head_pf24 | 3.90 | 85.6% | 4.40 | 75.9% | "
            "0.886 |") in report
    assert "| engine_antidistill | 32 | nopdl | 8.60 | 72.9% | - | - | - |" in report
    assert "| engine_jvp_r8 | 1 | kernel | 6.00 | 80.2% | 6.30 | 76.3% | 0.952 |" in report
    assert report.count("| engine_") == 4  # the default rows are not settings
    write(tmp_path / "decode-NVIDIA_H200.json", [decode_row(gpu, 1, "engine_temperature", 4.4, 3.34)])
    assert goals.main(["--results", str(tmp_path)]) == 0
    assert "settings off the defaults" not in (tmp_path / "goals-NVIDIA_H200.md").read_text()
