"""``adfast sweep``: the paper's distillation experiment end to end, from one config file, resumable.

Pipeline (the antidistillation paper's section 5):

1. *holdout traces*: the teacher answers the holdout prompts (temperature sampling at
   ``holdout.tau``);
2. *gradient*: ``g``, the gradient of the proxy's mean completion NLL on those traces
   (:func:`adfast.proxy_gradient`), and the proxy pair ``theta_P +- eps g``;
3. *undistilled student*: its greedy test accuracy (the plot's horizontal line) and its mean NLL
   per completion token of the holdout traces;
4. for every setting ``(mode, tau, lam)`` and every seed: training traces (the teacher answers
   the train prompts under that setting), the teacher's own accuracy on the test rows under the
   same setting, a fresh copy of the student distilled on the training traces
   (:func:`adfast.distill.distill`), that student's greedy test accuracy and its holdout NLL (the
   loss that antidistillation aims to raise, to first order);
5. the table (``results.json``, ``results.csv`` per setting with 95% intervals over seeds,
   ``results_by_seed.csv``) and the paper's plot (``results.png``: teacher accuracy on x, student
   accuracy on y, one curve per mode, the undistilled student as a horizontal line; beside it the
   same with the students' holdout NLL on y).

Trace generation goes through :func:`adfast.traces.sample_traces` (the engine when it can run
the models, else Hugging Face ``generate``); the students are evaluated greedily with Hugging Face
``generate`` (:func:`adfast.evaluate.evaluate`). When the student's tokenizer differs from the
teacher's, its training examples are the traces' text re-encoded (:meth:`Sweep.student_examples`).

Files under ``out``: ``config.json``, ``holdout_traces.jsonl``, ``gradient.safetensors``,
``student_base/`` and, per setting and seed, ``runs/<label>/seed<k>/`` with
``train_traces.jsonl``, ``teacher_test.jsonl``, ``student_test.jsonl``, ``student.json`` and
``result.json`` (the row); the distilled students themselves are not kept.

Config (TOML or JSON; relative paths are relative to the config file)::

    out = "runs/small"                  # output directory
    seeds = [0, 1, 2]
    backend = "auto"                    # trace generation: "engine", "hf", or "auto" (engine if it can)
    dtype = "float32"
    device = "cpu"
    [models]                            # each a directory, a .gguf file or "smollm2" (adfast.models)
    teacher = "teacher"
    proxy = "proxy"
    student = "student"
    [tasks]                             # jsonl rows (adfast.tasks): a prompt and, for test, an answer
    train = "train.jsonl"
    holdout = "holdout.jsonl"
    test = "test.jsonl"
    [sampling]                          # every trace generation
    max_new_tokens = 256
    batch_size = 64
    top_k = 0
    top_p = 1.0
    eps = 1e-4
    [holdout]
    tau = 1.0
    [gradient]
    batch_size = 8
    [distill]                           # keyword arguments of adfast.distill.distill (paper defaults)
    epochs = 4
    [evaluate]                          # the students' greedy evaluation
    max_new_tokens = 256
    batch_size = 64
    [[settings]]                        # a list value expands into one setting per value
    mode = "temperature"
    tau = [0.6, 1.0]
    [[settings]]
    mode = "antidistill"
    tau = 1.0
    lam = [0.01, 0.03]

Resuming: every stage writes its file atomically (a temporary name, then a rename) and is
skipped when the file exists, so an interrupted sweep re-run with the same config continues where
it stopped. ``out/config.json`` records the resolved config; a re-run whose config differs in
anything but ``seeds`` and ``settings`` (which may grow) is refused, since the finished stages
would no longer match it. Seed ``k`` seeds a setting's training traces (``k``), the teacher's test
traces (``k + 1000``) and the distillation (``k``); holdout traces and the gradient use seed 0.
"""
from __future__ import annotations

import copy
import csv
import json
import math
import os
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from . import tasks
from .distill import completion_nll, distill
from .evaluate import eos_ids, evaluate
from .gradient import load_gradient, proxy_gradient, save_gradient
from .models import load_model
from .proxy_pair import ProxyPair
from .sampling import MODES, check_tau
from .traces import BACKENDS, check_traces, sample_traces, summarize

DEFAULTS = {
    "seeds": [0],
    "backend": "auto",
    "dtype": "float32",
    "device": "cpu",
    "sampling": {"max_new_tokens": 256, "batch_size": 64, "top_k": 0, "top_p": 1.0, "eps": 1e-4},
    "holdout": {"tau": 1.0},
    "gradient": {"batch_size": 8},
    "distill": {},
    "evaluate": {"max_new_tokens": 256, "batch_size": 64},
}
SECTIONS = {"sampling", "holdout", "gradient", "distill", "evaluate"}
GROWABLE = ("seeds", "settings")  # may change between runs of one output directory
TEACHER_SEED_OFFSET = 1000  # the teacher's test traces of seed k use seed k + 1000
# two-sided 95% Student-t quantiles t_{0.975, df}, df = 1..30 (beyond: the normal 1.96)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)


@dataclass(frozen=True)
class Setting:
    """One sampling setting of the teacher: ``mode`` with temperature ``tau`` and strength ``lam``."""

    mode: str
    tau: float
    lam: float

    @property
    def label(self) -> str:
        """A directory-safe name, e.g. ``antidistill_tau1_lam0.03``."""
        return f"{self.mode}_tau{self.tau:g}" + ("" if self.mode == "temperature" else f"_lam{self.lam:g}")


# ------------------------------------------------------------------------------------- config


def read_config(path) -> dict:
    """The config file (``.toml`` or ``.json``) resolved: defaults filled, paths made absolute,
    settings expanded and checked (:func:`expand_settings`). ValueError names what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such config file: {path}")
    if path.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10: the same parser as the tomli package (a dependency there)
            import tomli as tomllib
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    elif path.suffix == ".json":
        raw = json.loads(path.read_text())
    else:
        raise ValueError(f"{path}: the config must be a .toml or .json file")
    return resolve_config(raw, path.parent)


def resolve_config(raw: dict, base: Path) -> dict:
    """:func:`read_config` on an already parsed mapping, with relative paths taken from ``base``."""
    unknown = sorted(set(raw) - set(DEFAULTS) - {"out", "models", "tasks", "settings"})
    if unknown:
        raise ValueError(f"unknown config keys {unknown}")
    config = copy.deepcopy(DEFAULTS)
    for key, value in raw.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ValueError(f"config [{key}] must be a table")
            config[key].update(value)
        else:
            config[key] = copy.deepcopy(value)
    for key in ("out", "models", "tasks", "settings"):
        if key not in config:
            raise ValueError(f"the config needs {key!r}")

    def local(value: str) -> str:
        return value if value == "smollm2" or Path(value).is_absolute() else str((base / value).resolve())

    config["out"] = local(config["out"])
    for section, keys in (("models", ("teacher", "proxy", "student")), ("tasks", ("train", "holdout", "test"))):
        missing = [k for k in keys if k not in config[section]]
        if missing or set(config[section]) - set(keys):
            raise ValueError(f"config [{section}] needs exactly the keys {list(keys)}, got {sorted(config[section])}")
        config[section] = {k: local(str(config[section][k])) for k in keys}
    seeds = config["seeds"]
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of non-negative ints, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds repeat: {seeds}")
    if config["backend"] not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {config['backend']!r}")
    if config["holdout"]["tau"] <= 0:
        raise ValueError(f"[holdout] tau must be > 0 (the holdout traces are sampled), got {config['holdout']['tau']}")
    config["settings"] = [vars(s) for s in expand_settings(config["settings"])]
    return config


def expand_settings(entries: list[dict]) -> list[Setting]:
    """Each entry's ``mode`` (one of :data:`adfast.MODES`), ``tau`` (>= 0, default 1) and ``lam``
    (default 0; > 0 for antidistill and permutation, unused by temperature), where a list expands
    into one setting per value (the product over keys), in order, duplicates dropped."""
    if not isinstance(entries, list) or not entries:
        raise ValueError("settings must be a non-empty list of tables with mode, tau and lam")
    out: list[Setting] = []
    for i, entry in enumerate(entries, 1):
        unknown = sorted(set(entry) - {"mode", "tau", "lam"})
        if unknown or "mode" not in entry:
            raise ValueError(f"setting {i}: needs 'mode' and optionally 'tau', 'lam'; got keys {sorted(entry)}")
        mode = entry["mode"]
        if mode not in MODES:
            raise ValueError(f"setting {i}: mode must be one of {MODES}, got {mode!r}")
        taus = entry.get("tau", 1.0)
        lams = entry.get("lam", 0.0)
        for tau in taus if isinstance(taus, list) else [taus]:
            for lam in lams if isinstance(lams, list) else [lams]:
                try:
                    check_tau(float(tau))
                except ValueError as error:
                    raise ValueError(f"setting {i}: {error}") from None
                if mode != "temperature" and lam <= 0:
                    raise ValueError(f"setting {i}: {mode} needs lam > 0, got {lam}")
                setting = Setting(mode, float(tau), 0.0 if mode == "temperature" else float(lam))
                if setting not in out:
                    out.append(setting)
    return out


def _fixed_part(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in GROWABLE}


def claim_output(config: dict) -> Path:
    """Create ``out`` and record the config there; refuse an ``out`` holding a run of a config that
    differs beyond :data:`GROWABLE` (its finished stages would not match)."""
    out = Path(config["out"])
    out.mkdir(parents=True, exist_ok=True)
    recorded = out / "config.json"
    if recorded.exists():
        before = json.loads(recorded.read_text())
        changed = sorted(k for k in set(_fixed_part(before)) | set(_fixed_part(config))
                         if before.get(k) != config.get(k))
        if changed:
            raise ValueError(f"{out} holds a sweep with a different config (changed: {changed}); "
                             "use another output directory or delete it")
    _write_atomic(recorded, json.dumps(config, indent=2))
    return out


# ------------------------------------------------------------------------------------- stages


@contextmanager
def _replacing(path: Path):
    """Yield a temporary path beside ``path`` (same suffix) to write; on success it replaces ``path``
    in one rename, so a stage's file exists only once complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{path.suffix}")
    yield tmp
    os.replace(tmp, path)


def _write_atomic(path: Path, text: str) -> None:
    with _replacing(path) as tmp:
        tmp.write_text(text)


def _write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    with _replacing(path) as tmp:
        tasks.write_jsonl(tmp, rows)


def _log(message: str) -> None:
    print(f"[sweep {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Sweep:
    """The pipeline of the module docstring over a resolved config (:func:`read_config`).

    Models load lazily, once; every stage method returns its result from the stage's file when it
    exists and computes (and writes) it otherwise.
    """

    def __init__(self, config: dict, *, progress: bool = False):
        self.config = config
        self.out = claim_output(config)
        self.progress = progress
        self._models: dict[str, tuple] = {}
        self._pair = None
        rows = {split: tasks.read_jsonl(config["tasks"][split]) for split in ("train", "holdout", "test")}
        for split, split_rows in rows.items():
            if not split_rows:
                raise ValueError(f"the {split} task file {config['tasks'][split]} holds no rows")
            tasks.check_rows(split_rows, config["tasks"][split])
        if not all("answer" in row for row in rows["test"]):
            raise ValueError(f"every test row needs an answer ({config['tasks']['test']})")
        self.rows = rows

    # models ---------------------------------------------------------------------------------

    def model(self, role: str):
        """``(model, tokenizer)`` of ``role`` ("teacher", "proxy" or "student"), loaded once."""
        if role not in self._models:
            self._models[role] = load_model(self.config["models"][role], dtype=self.config["dtype"],
                                            device=self.config["device"])
        return self._models[role]

    def prompts(self, split: str) -> list[list[int]]:
        _, tokenizer = self.model("teacher")
        where = self.config["tasks"][split]
        return [tasks.prompt_ids(tokenizer, row, f"{where} row {i}") for i, row in enumerate(self.rows[split], 1)]

    def traces(self, split: str, setting: Setting, seed: int, pair) -> list[dict]:
        """The teacher's checked traces (:func:`adfast.traces.check_traces`) for ``split``'s prompts."""
        teacher, tokenizer = self.model("teacher")
        sampling = self.config["sampling"]
        prompts = self.prompts(split)
        traces = sample_traces(teacher, tokenizer, prompts, None if setting.mode == "temperature" else pair,
                               mode=setting.mode, lam=setting.lam, tau=setting.tau,
                               max_new_tokens=sampling["max_new_tokens"], batch_size=sampling["batch_size"],
                               top_k=sampling["top_k"], top_p=sampling["top_p"], eps=sampling["eps"], seed=seed,
                               backend=self.config["backend"], device=self.config["device"],
                               desc=f"{setting.label} {split}")
        rows = [{**row, "prompt_ids": ids} for row, ids in zip(self.rows[split], prompts)]
        return check_traces(rows, traces)

    # stages ---------------------------------------------------------------------------------

    def holdout_traces(self) -> list[dict]:
        path = self.out / "holdout_traces.jsonl"
        if not path.exists():
            setting = Setting("temperature", float(self.config["holdout"]["tau"]), 0.0)
            _log(f"holdout traces: {len(self.rows['holdout'])} prompts, tau {setting.tau:g}")
            _write_jsonl_atomic(path, self.traces("holdout", setting, 0, None))
        return tasks.read_jsonl(path)

    def pair(self) -> ProxyPair:
        """The proxy pair ``theta_P +- eps g``, from the stored gradient (computed on first use)."""
        if self._pair is None:
            path = self.out / "gradient.safetensors"
            proxy, tokenizer = self.model("proxy")
            if not path.exists():
                traces = self.holdout_traces()
                examples = [(t["prompt_ids"], t["completion_ids"]) for t in traces if t["completion_ids"]]
                gradient = proxy_gradient(proxy, examples, batch_size=self.config["gradient"]["batch_size"],
                                          pad_token_id=tokenizer.pad_token_id, progress=self.progress)
                with _replacing(path) as tmp:
                    save_gradient(tmp, gradient)
                _log(f"gradient: proxy loss {gradient.loss:.4f} on {gradient.num_tokens} holdout completion tokens")
            self._pair = ProxyPair.from_gradient(proxy, load_gradient(path), self.config["sampling"]["eps"])
        return self._pair

    def student_stats(self, where: Path, student) -> dict:
        """Greedy test accuracy of ``student`` (traces in ``where/student_test.jsonl``) and its mean
        completion NLL on the holdout traces (the loss whose gradient is ``g``), stored in
        ``where/student.json``; read back when that file exists (``student`` may then be None)."""
        path = where / "student.json"
        if not path.exists():
            _, tokenizer = self.model("student")
            ev = self.config["evaluate"]
            accuracy, traces = evaluate(student, tokenizer, self.rows["test"], max_new_tokens=ev["max_new_tokens"],
                                        batch_size=ev["batch_size"], progress=self.progress)
            _write_jsonl_atomic(where / "student_test.jsonl", traces)
            stats = {"accuracy": accuracy, "holdout_nll": self.holdout_nll(student)}
            _write_atomic(path, json.dumps(stats, indent=2))
        return json.loads(path.read_text())

    def holdout_nll(self, student, batch_size: int = 64) -> float:
        """``student``'s mean NLL per completion token of the holdout traces (:meth:`student_examples`)."""
        _, tokenizer = self.model("student")
        examples = self.student_examples(self.holdout_traces())
        pad = tokenizer.pad_token_id or 0
        with torch.no_grad():
            total = sum(completion_nll(student, examples[i:i + batch_size], pad_token_id=pad, reduction="sum").item()
                        for i in range(0, len(examples), batch_size))
        return total / sum(len(c) for _, c in examples)

    def base_student(self) -> dict:
        """The undistilled student's :meth:`student_stats`."""
        return self.student_stats(self.out / "student_base", self.model("student")[0])

    def run_setting(self, setting: Setting, seed: int) -> dict:
        """Stage 4 for one setting and seed; returns its result row (also in ``result.json``)."""
        where = self.out / "runs" / setting.label / f"seed{seed}"
        result_path = where / "result.json"
        if result_path.exists():
            return json.loads(result_path.read_text())
        began = time.perf_counter()
        pair = None if setting.mode == "temperature" else self.pair()
        train = self._traces_file(where / "train_traces.jsonl", "train", setting, seed, pair)
        teacher_test = self._traces_file(where / "teacher_test.jsonl", "test", setting,
                                         seed + TEACHER_SEED_OFFSET, pair)
        history: list[dict] = []
        student = None
        if not (where / "student.json").exists():
            student = self._fresh_student()
            examples = self.student_examples(train)
            _log(f"{setting.label} seed {seed}: distilling the student on {len(examples)} traces")
            distill(student, self.model("student")[1], examples, seed=seed, progress=self.progress,
                    history=history, **self.config["distill"])
        student_stats = self.student_stats(where, student)
        train_stats, test_stats = summarize(train), summarize(teacher_test)
        result = {
            "mode": setting.mode, "tau": setting.tau, "lam": setting.lam, "seed": seed,
            "teacher_accuracy": test_stats["accuracy"], "student_accuracy": student_stats["accuracy"],
            "student_holdout_nll": student_stats["holdout_nll"], "teacher_logprob": test_stats["mean_logprob"],
            "train_trace_accuracy": train_stats["accuracy"], "train_trace_logprob": train_stats["mean_logprob"],
            "train_tokens": train_stats["tokens"], "distill_final_loss": history[-1]["loss"] if history else None,
            "seconds": time.perf_counter() - began,
        }
        _write_atomic(result_path, json.dumps(result, indent=2))
        _log(f"{setting.label} seed {seed}: teacher {result['teacher_accuracy']:.3f}, "
             f"student {result['student_accuracy']:.3f} ({result['seconds']:.0f} s)")
        return result

    def student_examples(self, traces: list[dict]) -> list[tuple[list[int], list[int]]]:
        """``(prompt_ids, completion_ids)`` of the traces for the student: the teacher's ids when the
        two tokenizers have the same vocabulary, else the row's prompt and the completion text
        re-encoded with the student's tokenizer (plus its EOS where the trace ended with one)."""
        _, teacher_tokenizer = self.model("teacher")
        _, tokenizer = self.model("student")
        traces = [t for t in traces if t["completion_ids"]]
        if tokenizer.get_vocab() == teacher_tokenizer.get_vocab():
            return [(t["prompt_ids"], t["completion_ids"]) for t in traces]
        teacher_eos = set(eos_ids(self.model("teacher")[0], teacher_tokenizer))
        examples = []
        for i, t in enumerate(traces, 1):
            row = {k: v for k, v in t.items() if k not in ("prompt_ids", "completion_ids")}
            completion = tokenizer(t["completion"], add_special_tokens=False)["input_ids"]
            if t["completion_ids"][-1] in teacher_eos and tokenizer.eos_token_id is not None:
                completion.append(tokenizer.eos_token_id)
            if completion:
                examples.append((tasks.prompt_ids(tokenizer, row, f"train trace {i}"), completion))
        return examples

    def _traces_file(self, path: Path, split: str, setting: Setting, seed: int, pair) -> list[dict]:
        if not path.exists():
            _write_jsonl_atomic(path, self.traces(split, setting, seed, pair))
        return tasks.read_jsonl(path)

    def _fresh_student(self):
        """A new copy of the undistilled student (distillation changes it in place)."""
        student, _ = self.model("student")
        return copy.deepcopy(student)

    # everything -----------------------------------------------------------------------------

    def run(self) -> dict:
        """Every stage (finished ones skipped), then the table and the plot. Returns ``results.json``'s
        content."""
        began = time.perf_counter()
        base = self.base_student()
        _log(f"undistilled student: test accuracy {base['accuracy']:.3f}, holdout NLL {base['holdout_nll']:.4f}")
        settings = [Setting(**s) for s in self.config["settings"]]
        rows = [self.run_setting(setting, seed) for setting in settings for seed in self.config["seeds"]]
        report = {"student_base_accuracy": base["accuracy"], "student_base_holdout_nll": base["holdout_nll"],
                  "seeds": self.config["seeds"],
                  "summary": summarize_settings(rows), "rows": rows}
        _write_atomic(self.out / "results.json", json.dumps(report, indent=2))
        write_csv(self.out / "results.csv", report["summary"])
        write_csv(self.out / "results_by_seed.csv", rows)
        plotted = plot_results(report, self.out / "results.png")
        _log(f"done in {time.perf_counter() - began:.0f} s: {self.out / 'results.csv'}"
             + (f", {self.out / 'results.png'}" if plotted else " (no plot: matplotlib is not installed)"))
        return report


# ------------------------------------------------------------------------------------- report


def interval(values: list[float]) -> tuple[float, float]:
    """``(mean, half-width)`` of the two-sided 95% Student-t interval of the mean (half-width NaN
    for a single value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    t = T975[len(values) - 2] if len(values) - 1 <= len(T975) else 1.96
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


SUMMARIZED = ("teacher_accuracy", "student_accuracy", "student_holdout_nll", "teacher_logprob",
              "train_trace_accuracy")


def summarize_settings(rows: list[dict]) -> list[dict]:
    """One row per setting (in first-seen order): the seed count and, for each of :data:`SUMMARIZED`,
    its mean and 95% interval half-width (:func:`interval`) over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["mode"], row["tau"], row["lam"]), []).append(row)
    out = []
    for (mode, tau, lam), group in groups.items():
        entry = {"mode": mode, "tau": tau, "lam": lam, "seeds": len(group)}
        for key in SUMMARIZED:
            values = [r[key] for r in group if r[key] is not None]
            entry[key], entry[f"{key}_ci95"] = interval(values) if values else (None, None)
        out.append(entry)
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    """``rows`` (dicts with the same keys) as CSV, atomically."""
    with _replacing(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_results(report: dict, path: Path) -> bool:
    """The paper's plot (left): per mode, teacher accuracy (x) against distilled-student accuracy (y)
    with 95% intervals, points joined in order of tau (temperature) or lam, the undistilled student
    as a dashed line; right, the same against the students' holdout NLL (the loss antidistillation
    targets). False (nothing written) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    panels = (("student_accuracy", "distilled student accuracy", report["student_base_accuracy"]),
              ("student_holdout_nll", "distilled student holdout NLL / token", None))
    for ax, (key, label, base) in zip(axes, panels):
        for mode, marker in zip(MODES, "osD"):
            points = sorted((r for r in report["summary"] if r["mode"] == mode),
                            key=lambda r: r["tau"] if mode == "temperature" else (r["lam"], r["tau"]))
            if not points:
                continue
            ax.errorbar([r["teacher_accuracy"] for r in points], [r[key] for r in points],
                        xerr=[_finite(r["teacher_accuracy_ci95"]) for r in points],
                        yerr=[_finite(r[f"{key}_ci95"]) for r in points], marker=marker, capsize=3, label=mode)
            for r in points:
                ax.annotate(f"tau {r['tau']:g}" if mode == "temperature" else f"lam {r['lam']:.3g}",
                            (r["teacher_accuracy"], r[key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if base is not None:
            ax.axhline(base, color="gray", linestyle="--", label="undistilled student")
        ax.set_xlabel("teacher accuracy (same sampling)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(f"teacher vs distilled student ({len(report['seeds'])} seeds, 95% intervals)")
    fig.tight_layout()
    with _replacing(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return True


def _finite(value) -> float:
    return 0.0 if value is None or not math.isfinite(value) else value


def run_sweep(config_path, *, progress: bool = False) -> dict:
    """Read the config (:func:`read_config`) and run the whole sweep (:meth:`Sweep.run`)."""
    return Sweep(read_config(config_path), progress=progress).run()


__all__ = ["Setting", "Sweep", "read_config", "resolve_config", "expand_settings", "run_sweep", "interval",
           "summarize_settings", "plot_results"]
