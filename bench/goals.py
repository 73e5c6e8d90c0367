"""The issues' throughput goals, checked against the results a GPU run wrote.

Reads, from ``--results`` (default ``bench/results``):

- ``decode-<device>.json`` (:mod:`bench.decode`, real shapes; the ``-tiny`` smoke files are skipped),
- ``sampler-<device>.json`` (:mod:`bench.sampler`),
- ``low_rank_fidelity_smollm2_cpu.json`` (the smallest rank whose D keeps cosine >= 0.95 with the
  full-gradient D),

and, per device, decides each goal as ``met``, ``missed`` or ``not measured`` (a row it needs is
absent). Where ``profile-<device>-<variant>-b<batch>.json`` files (:mod:`bench.profile_step`)
exist, it adds where each profiled step's time goes: the step's span and the union of its kernel
intervals (so ``span - busy`` is time with no kernel running), the summed time of the matmul
kernels (cuBLAS: ``nvjet``, ``gemm``, ``cutlass``, split-K reductions; adfast's ``_decode_linear``)
and of all other kernels,
the launches per step, and the weight-read limit of the same variant and batch. With two streams
(antidistillation: teacher and proxies overlap) the sums exceed ``busy``.

The goals, as the issues state them for the 7B/3B shapes (all ratios, so they read the same
on an H100 or an H200; ``limit_frac`` is the weight-read floor over the measured step time):

- #2: the fused sampler at batch 64 reaches >= 80% of the copy bandwidth and is >= 5x eager PyTorch
  (with the Qwen2.5 vocabularies, and the bandwidth also with one vocabulary of 152064, the goal's
  ``V``, for all three inputs);
- #3: engine antidistillation ``(d)`` at batch 1 and 32, and engine temperature ``(c)`` at batch 1
  and 32, reach >= 85% of their limits; ``(d)``'s step time over ``(c)``'s is at most 1.05x the
  ratio of their limits (about 1.81); ``(d)`` is >= 6.5x Hugging Face ``generate`` with the logits
  processor at batch 1. The verdicts take the issue's protocol (``ms_step``: the whole ``generate``,
  prefill included, over the new tokens); the fraction of the decode steps alone
  (``decode_limit_frac``, rows that have it) is reported beside, with no target;
- #4: the exact-D engine with the low-rank gradient of the smallest rank meeting the fidelity
  target costs at most 1.45x temperature sampling per step, at each batch measured; the full-rank
  jvp engine against the finite-difference pair is reported, with no target.

Engine rows of settings off the defaults (variant names with ``_kernel...``, ``_pf<N>`` or
``_nopdl``, :func:`bench.decode.variant_suffix`) are listed beside the default row of the same
variant and batch (step times and their ratio), so that a setting that would meet a goal shows.

A ratio of two rows that different runs of :mod:`bench.decode` measured (their ``run`` fields
differ: other processes, maybe other machines, which have differed by ~5% in step time) carries
"(rows of two runs)" after its verdict.

Prints one table per device and writes ``goals-<device>.md`` beside the results.

Usage: ``python bench/goals.py [--results bench/results]`` (no GPU needed).
"""
import argparse
import json
import pathlib
import re
import sys
from dataclasses import dataclass


@dataclass
class Goal:
    """One goal at one batch size: ``measured`` against ``target`` (``met`` None: nothing to decide)."""

    issue: str
    goal: str
    batch: int
    measured: float | None
    target: str
    met: bool | None
    mixed_runs: bool = False  # a ratio of rows from different benchmark runs

    @property
    def verdict(self) -> str:
        if self.measured is None:
            return "not measured"
        return {True: "met", False: "missed", None: "reported"}[self.met] + (" (rows of two runs)" if self.mixed_runs
                                                                            else "")


def find(rows: list[dict], variant: str, batch: int) -> dict | None:
    return next((r for r in rows if r["variant"] == variant and r["batch"] == batch), None)


def mixed(*rows) -> bool:
    """Whether rows (None skipped) come from different runs of bench/decode.py (their ``run`` differs)."""
    return len({r.get("run") for r in rows if r}) > 1


def at_least(issue, goal, batch, value, bound, mixed_runs=False) -> Goal:
    return Goal(issue, goal, batch, value, f">= {bound:g}", None if value is None else value >= bound, mixed_runs)


def decode_goals(rows: list[dict], rank: int | None) -> list[Goal]:
    """Issue #3's and #4's goals over one device's decode rows; ``rank``: the low-rank gradient's
    rank that the fidelity target selects (None: unknown)."""
    goals = []
    for batch in (1, 32):
        d, c = find(rows, "engine_antidistill", batch), find(rows, "engine_temperature", batch)
        goals += [at_least("#3", "(d) engine antidistill, fraction of its limit", batch, d and d["limit_frac"], 0.85),
                  at_least("#3", "(c) engine temperature, fraction of its limit", batch, c and c["limit_frac"], 0.85)]
        for name, row in (("(d) engine antidistill", d), ("(c) engine temperature", c)):
            goals.append(Goal("#3", f"{name}, decode steps alone (prefill excluded), fraction of its limit", batch,
                              row and row.get("decode_limit_frac"), "-", None))
        ratio = bound = None
        if d and c:
            ratio, bound = d["ms_step"] / c["ms_step"], 1.05 * d["limit_ms"] / c["limit_ms"]
        goals.append(Goal("#3", "(d)/(c) step time, against 1.05x their limits' ratio", batch, ratio,
                          "-" if bound is None else f"<= {bound:.3f}", None if ratio is None else ratio <= bound,
                          mixed(d, c)))
    d, hf = find(rows, "engine_antidistill", 1), find(rows, "hf_antidistill", 1)
    speedup = d and hf and d["tok_s"] / hf["tok_s"]
    goals.append(at_least("#3", "(d) tok/s over HF generate + processor", 1, speedup, 6.5, mixed(d, hf)))
    for batch in sorted({r["batch"] for r in rows}):
        c = find(rows, "engine_temperature", batch)
        low = find(rows, f"engine_jvp_r{rank}", batch) if rank else None
        ratio = low and c and low["ms_step"] / c["ms_step"]
        goals.append(Goal("#4", f"exact-D rank {rank} step time over temperature", batch, ratio, "<= 1.45",
                          None if ratio is None else ratio <= 1.45, mixed(low, c)))
        jvp, fd = find(rows, "engine_jvp", batch), find(rows, "engine_antidistill", batch)
        if jvp and fd:
            goals.append(Goal("#4", "exact-D (full g) step time over finite-difference pair", batch,
                              jvp["ms_step"] / fd["ms_step"], "-", None, mixed(jvp, fd)))
    return goals


def sampler_goals(rows: list[dict]) -> list[Goal]:
    """Issue #2's goals over one device's sampler rows (the fused antidistillation draw at batch 64)."""
    fused, one_vocab = find(rows, "fused", 64), find(rows, "fused_one_vocab", 64)
    return [at_least("#2", "fused sampler, fraction of copy bandwidth", 64, fused and fused["bandwidth_frac"], 0.8),
            at_least("#2", "fused sampler, speed-up over eager PyTorch", 64, fused and fused["speedup_vs_eager"], 5),
            at_least("#2", "fused sampler, one vocabulary of 152064 for all three inputs, fraction of copy bandwidth",
                     64, one_vocab and one_vocab["bandwidth_frac"], 0.8)]


MATMUL_MARKERS = ("nvjet", "gemm", "cutlass", "splitKreduce", "_decode_linear")


def step_breakdown(profiles: list[dict], rows: list[dict]) -> str:
    """A markdown table of where each profiled step's time goes (module docstring)."""
    lines = ["| variant | batch | span ms | busy ms | no kernel ms | matmul kernels ms | other kernels ms | "
             "launches | limit ms |", "|---|---|---|---|---|---|---|---|---|"]
    for prof in sorted(profiles, key=lambda p: (p["variant"], p["batch"])):
        matmul = sum(k["ms_per_step"] for k in prof["kernels"] if any(m in k["name"] for m in MATMUL_MARKERS))
        total = sum(k["ms_per_step"] for k in prof["kernels"])
        launches = sum(k["launches_per_step"] for k in prof["kernels"])
        row = find(rows, prof["variant"], prof["batch"])
        limit = "-" if row is None else f"{row['limit_ms']:.2f}"
        lines.append(f"| {prof['variant']} | {prof['batch']} | {prof['span_ms']:.2f} | {prof['busy_ms']:.2f} | "
                     f"{prof['span_ms'] - prof['busy_ms']:.2f} | {matmul:.2f} | {total - matmul:.2f} | "
                     f"{launches:.0f} | {limit} |")
    return "\n".join(lines)


SETTING = re.compile(r"^(engine_.+?)((?:_kernel|_pf\d|_nopdl).*)$")
"""An engine variant with settings off the defaults: the default variant, then the settings' suffix."""


def settings_table(rows: list[dict]) -> str | None:
    """A markdown table of each engine row with settings off the defaults against the default row
    of its variant and batch; None without such rows."""
    lines = ["| variant | batch | setting | ms/step | of limit | default ms/step | of limit | setting / default |",
             "|---|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: (r["variant"], r["batch"])):
        match = SETTING.match(row["variant"])
        if not match:
            continue
        base = find(rows, match.group(1), row["batch"])
        default = ("-", "-", "-") if base is None else (
            f"{base['ms_step']:.2f}", f"{base['limit_frac']:.1%}",
            f"{row['ms_step'] / base['ms_step']:.3f}" + (" (rows of two runs)" if mixed(row, base) else ""))
        lines.append(f"| {match.group(1)} | {row['batch']} | {match.group(2)[1:]} | {row['ms_step']:.2f} | "
                     f"{row['limit_frac']:.1%} | " + " | ".join(default) + " |")
    return "\n".join(lines) if len(lines) > 2 else None


def table(goals: list[Goal]) -> str:
    lines = ["| issue | goal | batch | measured | target | verdict |", "|---|---|---|---|---|---|"]
    for g in goals:
        measured = "-" if g.measured is None else f"{g.measured:.3f}"
        lines.append(f"| {g.issue} | {g.goal} | {g.batch} | {measured} | {g.target} | {g.verdict} |")
    return "\n".join(lines)


def load_rows(results: pathlib.Path, pattern: str) -> dict[str, list[dict]]:
    """Rows of the files matching ``pattern`` (smoke ``-tiny`` files skipped), grouped by device."""
    by_device = {}
    for path in sorted(results.glob(pattern)):
        if path.stem.endswith("-tiny"):
            continue
        for row in json.loads(path.read_text()):
            by_device.setdefault(row["device"], []).append(row)
    return by_device


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    fidelity = args.results / "low_rank_fidelity_smollm2_cpu.json"
    rank = json.loads(fidelity.read_text()).get("first_rank_reaching_cosine_target") if fidelity.exists() else None
    decode, sampler = load_rows(args.results, "decode-*.json"), load_rows(args.results, "sampler-*.json")
    if not decode and not sampler:
        print(f"no decode-*.json or sampler-*.json in {args.results}: nothing to check", file=sys.stderr)
        return 2
    profiles = {}
    for path in sorted(args.results.glob("profile-*.json")):
        prof = json.loads(path.read_text())
        profiles.setdefault(prof["device"], []).append(prof)
    for device in sorted(set(decode) | set(sampler)):
        text = (f"# Goals on {device}\n\nFrom {args.results}; the low-rank rank ({rank}) is the smallest "
                f"whose D keeps cosine >= 0.95 ({fidelity.name}).\n\n"
                + table(sampler_goals(sampler.get(device, [])) + decode_goals(decode.get(device, []), rank)) + "\n")
        settings = settings_table(decode.get(device, []))
        if settings:
            text += "\n## Engine settings off the defaults (bench/decode.py)\n\n" + settings + "\n"
        if profiles.get(device):
            text += ("\n## Where the profiled steps' time goes (bench/profile_step.py, ms per step)\n\n"
                     "Kernel times overlap where programmatic dependent launch is on (rows without `_nopdl`"
                     " on Hopper): a kernel starts early and its time includes the wait for its predecessor,"
                     " so its kernel columns may sum past the span.\n\n"
                     + step_breakdown(profiles[device], decode.get(device, [])) + "\n")
        print(text)
        (args.results / f"goals-{device.replace(' ', '_')}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
