"""The set-up the SmolLM2 studies in ``bench/`` share: the embedded model as its own teacher, its
greedy traces on held-out and test problems, and the proxy gradient of the held-out traces."""
import platform
import shlex
import sys
import time
from dataclasses import dataclass

import torch

from adfast import tasks
from adfast.eps_study import greedy_completions
from adfast.gradient import ProxyGradient, proxy_gradient
from adfast.models import load_model


class Stopwatch:
    """Named laps in seconds (``timings``), printed as they end; ``total()`` adds the whole run."""

    def __init__(self):
        self.timings = {}
        self._began = self._step = time.perf_counter()

    def lap(self, label: str) -> None:
        self.timings[label] = round(time.perf_counter() - self._step, 1)
        print(f"{label}: {self.timings[label]:.1f} s", flush=True)
        self._step = time.perf_counter()

    def total(self) -> float:
        self.timings["total"] = round(time.perf_counter() - self._began, 1)
        return self.timings["total"]


@dataclass
class Study:
    """SmolLM2 (float32) with its greedy traces and the proxy gradient of the held-out ones."""

    model: torch.nn.Module
    tokenizer: object
    holdout: list
    test: list
    holdout_prompts: list[list[int]]
    test_prompts: list[list[int]]
    holdout_traces: list[list[int]]
    test_traces: list[list[int]]
    gradient: ProxyGradient
    gradient_norm: float
    holdout_accuracy: float


def smollm2_study(holdout: int, test: int, max_new_tokens: int, clock: Stopwatch) -> Study:
    """Load the embedded model, trace ``holdout`` + ``test`` problems greedily, take the gradient."""
    model, tokenizer = load_model(None, dtype="float32")
    clock.lap("load")
    holdout_problems, test_problems = tasks.problems("holdout", holdout), tasks.problems("test", test)
    holdout_prompts = [tasks.format_prompt(tokenizer, p.question) for p in holdout_problems]
    test_prompts = [tasks.format_prompt(tokenizer, p.question) for p in test_problems]
    traces = greedy_completions(model, tokenizer, holdout_prompts + test_prompts, max_new_tokens=max_new_tokens)
    holdout_traces, test_traces = traces[:holdout], traces[holdout:]
    accuracy = sum(tasks.is_correct(tokenizer.decode(t, skip_special_tokens=True), p.answer)
                   for t, p in zip(holdout_traces, holdout_problems)) / holdout
    clock.lap("greedy traces")
    gradient = proxy_gradient(model, list(zip(holdout_prompts, holdout_traces)), batch_size=4,
                              pad_token_id=tokenizer.pad_token_id, progress=False)
    norm = sum(float(g.double().pow(2).sum()) for g in gradient.grads.values()) ** 0.5
    clock.lap("proxy gradient")
    return Study(model, tokenizer, holdout_problems, test_problems, holdout_prompts, test_prompts,
                 holdout_traces, test_traces, gradient, norm, accuracy)


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else the machine type."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()
