"""The built-in task (small arithmetic word problems), prompt formatting, answer checking, jsonl I/O.

Problems come from a few templates filled from a seeded RNG, so every run sees the same ones.
Each unique question lands in exactly one split, ``"holdout"`` (teacher traces for the proxy
gradient) or ``"test"`` (evaluation), by a hash of its text: the splits never overlap and a
split's first ``n`` problems do not depend on ``n``.

jsonl rows (one JSON object a line) describe prompts, traces or both. A prompt is, by priority:
``prompt_ids`` (token ids, used as is), ``question`` (wrapped in the tokenizer's chat template
with :data:`INSTRUCTION`, ending with the assistant turn's header), or ``prompt`` (text encoded
verbatim, without adding special tokens). A completion is ``completion_ids`` or ``completion``
(text encoded verbatim). An optional ``answer`` lets outputs be checked (:func:`check_answer`), by
the row's ``kind``: ``"number"`` (the default: an integer), ``"boxed"`` (a LaTeX string compared
with the last ``\\boxed{...}``) or ``"choice"`` (a letter A-E).
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Callable, NamedTuple

SPLITS = ("holdout", "test")
INSTRUCTION = "Write the calculation in one line, then the final answer as a number."
NAMES = ("Tom", "Anna", "Ben", "Lily", "Sam", "Mia", "Jack", "Emma", "Leo", "Sara")


class Problem(NamedTuple):
    question: str
    answer: int


def _add(rng: random.Random) -> Problem:
    name, a, b = rng.choice(NAMES), rng.randint(2, 9), rng.randint(2, 9)
    return Problem(f"{name} has {a} apples and buys {b} more. How many apples does {name} have now?", a + b)


def _sub(rng: random.Random) -> Problem:
    name, b = rng.choice(NAMES), rng.randint(1, 9)
    a = b + rng.randint(1, 9)
    return Problem(f"{name} had {a} candies and gave {b} of them to a friend. How many candies does {name} have left?",
                   a - b)


def _mul_boxes(rng: random.Random) -> Problem:
    a, b = rng.randint(2, 9), rng.randint(2, 5)
    return Problem(f"There are {a} boxes with {b} pencils in each box. How many pencils are there in total?", a * b)


def _mul_days(rng: random.Random) -> Problem:
    name, a, b = rng.choice(NAMES), rng.randint(2, 10), rng.randint(2, 5)
    return Problem(f"{name} reads {a} pages every day for {b} days. How many pages does {name} read in total?", a * b)


def _more_than(rng: random.Random) -> Problem:
    first, second = rng.sample(NAMES, 2)
    a, b = rng.randint(2, 9), rng.randint(1, 9)
    return Problem(f"{first} has {a} marbles. {second} has {b} more marbles than {first}. "
                   f"How many marbles does {second} have?", a + b)


def _add_two(rng: random.Random) -> Problem:
    name, a, b, c = rng.choice(NAMES), rng.randint(1, 6), rng.randint(1, 6), rng.randint(1, 6)
    return Problem(f"{name} picks {a} flowers in the morning, {b} at noon and {c} in the evening. "
                   f"How many flowers does {name} pick in total?", a + b + c)


def _add_colors(rng: random.Random) -> Problem:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return Problem(f"A bag has {a} red balls and {b} blue balls. How many balls are in the bag?", a + b)


def _sub_bus(rng: random.Random) -> Problem:
    b = rng.randint(1, 9)
    a = b + rng.randint(1, 9)
    return Problem(f"A bus has {a} people on it. At the next stop {b} people get off. "
                   "How many people are on the bus now?", a - b)


TEMPLATES: tuple[Callable[[random.Random], Problem], ...] = (
    _add, _sub, _mul_boxes, _mul_days, _more_than, _add_two, _add_colors, _sub_bus)


def split_of(question: str) -> str:
    """The split a question belongs to, from a hash of its text."""
    return SPLITS[hashlib.sha256(question.encode()).digest()[0] % len(SPLITS)]


def problems(split: str, n: int, *, seed: int = 0) -> list[Problem]:
    """The first ``n`` problems of ``split`` ("holdout" or "test"), cycling through the templates."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[Problem] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * (n + 10):
            raise ValueError(f"could not draw {n} distinct {split} problems; ask for fewer")
        problem = TEMPLATES[attempts % len(TEMPLATES)](rng)
        if problem.question not in seen and split_of(problem.question) == split:
            out.append(problem)
        seen.add(problem.question)
    return out


def format_prompt(tokenizer, question: str, *, instruction: str = INSTRUCTION) -> list[int]:
    """Token ids of ``question`` (plus ``instruction``) as a user turn in the tokenizer's chat template,
    followed by the assistant turn's header (``add_generation_prompt=True``)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; give prompts as `prompt` text or `prompt_ids` instead")
    content = f"{question}\n{instruction}" if instruction else question
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                         add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


_NUMBER = r"-?\d[\d,]*"
_EXPRESSION = rf"{_NUMBER}(?:\s*[-+*/x×=]\s*\$?{_NUMBER})*"  # "12", "8 + 4 = 12": the answer is the last number
_MARKED = (rf"####\s*\$?({_EXPRESSION})",  # GSM8K style
           rf"\\boxed\{{\s*\$?({_EXPRESSION})",  # LaTeX
           rf"(?i)\banswer\s*(?:is\s*)?[:=]?\s*\**\s*\$?({_EXPRESSION})")  # "Answer: 42", "the answer is **42**"


def extract_answer(text: str) -> int | None:
    """The integer answer in a completion: the last one marked ``#### 42``, else in ``\\boxed{42}``,
    else after "answer" ("Answer: 42", "the answer is 8 + 4 = 12"), else the last integer in the
    text. A marked calculation counts by its result; thousands separators are dropped ("1,200" is
    1200); None if the text has no integer."""
    for marker in _MARKED:
        found = re.findall(marker, text)
        if found:
            return _last_integer(found[-1])
    return _last_integer(text)


def _last_integer(text: str) -> int | None:
    numbers = re.findall(_NUMBER, text)
    return int(numbers[-1].replace(",", "")) if numbers else None


def is_correct(text: str, answer: int) -> bool:
    """Whether :func:`extract_answer` of ``text`` equals ``answer``."""
    return extract_answer(text) == int(answer)


KINDS = ("number", "boxed", "choice")


def boxed_contents(text: str) -> list[str]:
    """The contents of every ``\\boxed{...}`` in ``text``, in order, with nested braces balanced
    (``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``); an unclosed box is skipped."""
    found = []
    for match in re.finditer(r"\\boxed\s*\{", text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                found.append(text[start:i])
                break
    return found


def normalize_boxed(text: str) -> str:
    """A LaTeX answer for comparison: whitespace removed, surrounding ``$`` and one outer
    ``\\boxed{...}`` stripped."""
    text = str(text).strip().strip("$").strip()
    boxes = boxed_contents(text)
    if len(boxes) == 1 and text.startswith("\\boxed") and text.endswith("}"):
        text = boxes[0]
    return re.sub(r"\s+", "", text)


_CHOICE_MARKED = (r"\\boxed\s*\{\s*\(?([A-E])\)?\s*\}",  # \boxed{C}
                  r"(?i:\banswer)\s*(?:(?i:is)\s*)?[:=]?\s*\**\s*\(?([A-E])\b",  # "Answer: C", "the answer is (C)"
                  r"\(([A-E])\)")  # "(C)"
_CHOICE_FINAL = r"(?:^|[^A-Za-z0-9])([A-E])[\s.)*]*$"  # a lone letter ending the text: "... so C."


def extract_choice(text: str) -> str | None:
    """The multiple-choice letter (A-E) of a completion: the last one in ``\\boxed{C}``, else after
    "answer" ("Answer: C", "the answer is (C)"), else the last "(C)", else a lone letter ending the
    text; None if there is none. Letters must be capitals."""
    for marker in _CHOICE_MARKED:
        found = re.findall(marker, text)
        if found:
            return found[-1]
    final = re.search(_CHOICE_FINAL, text.strip())
    return final.group(1) if final else None


def extract(text: str, kind: str = "number"):
    """The answer in a completion for a task ``kind``: an int (``"number"``, :func:`extract_answer`),
    the last boxed string, normalised (``"boxed"``), or a letter A-E (``"choice"``); None if absent."""
    if kind == "number":
        return extract_answer(text)
    if kind == "boxed":
        boxes = boxed_contents(text)
        return normalize_boxed(boxes[-1]) if boxes else None
    if kind == "choice":
        return extract_choice(text)
    raise ValueError(f"unknown answer kind {kind!r}; expected one of {KINDS}")


def reference_answer(answer, kind: str = "number"):
    """A row's reference ``answer`` in the form :func:`extract` returns for ``kind`` (ValueError if
    it cannot be: a non-integer for "number", not a letter A-E for "choice")."""
    if kind == "number":
        text = str(answer).strip().replace(",", "")
        if isinstance(answer, bool) or not re.fullmatch(r"-?\d+", text):
            raise ValueError(f"a 'number' answer must be an integer, got {answer!r}")
        return int(text)
    if kind == "boxed":
        return normalize_boxed(answer)
    if kind == "choice":
        letter = str(answer).strip().strip("()").strip().upper()
        if letter not in ("A", "B", "C", "D", "E"):
            raise ValueError(f"a 'choice' answer must be a letter A-E, got {answer!r}")
        return letter
    raise ValueError(f"unknown answer kind {kind!r}; expected one of {KINDS}")


def check_answer(text: str, answer, kind: str = "number") -> bool:
    """Whether the completion ``text`` answers ``answer`` for a task ``kind``:

    * ``"number"``: :func:`extract_answer` (``#### 42``, ``\\boxed{42}``, "Answer: 42", else the last
      integer) equals the integer ``answer`` (an int or a digit string);
    * ``"boxed"``: the last ``\\boxed{...}`` equals ``answer`` after :func:`normalize_boxed`
      (whitespace removed);
    * ``"choice"``: :func:`extract_choice` (``\\boxed{C}``, "Answer: C", "(C)", a final lone letter)
      equals the letter ``answer`` ("C" or "(C)", any case).
    """
    return extract(text, kind) == reference_answer(answer, kind)


def check_token_ids(id_lists: list[list[int]], vocab: int, where: str, model: str) -> None:
    """Raise a ValueError naming the row (``"<where> row i"``, from 1) whose ids leave ``[0, vocab)``."""
    for i, ids in enumerate(id_lists, 1):
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{where} row {i}: token id {bad[0]} is outside the {model}'s vocabulary [0, {vocab})")


def check_rows(rows: list[dict], where: str = "") -> None:
    """Raise a ValueError naming the row (``"<where> row i"``) if a row's ``kind`` is unknown or its
    ``answer`` is not a valid reference for that kind (:func:`reference_answer`)."""
    for i, row in enumerate(rows, 1):
        name = f"{where} row {i}".strip()
        kind = row.get("kind", "number")
        if kind not in KINDS:
            raise ValueError(f"{name}: unknown kind {kind!r}; expected one of {KINDS}")
        if "answer" in row:
            try:
                reference_answer(row["answer"], kind)
            except ValueError as error:
                raise ValueError(f"{name}: {error}") from None


def read_jsonl(path: str | Path) -> list[dict]:
    """The JSON objects of a jsonl file (blank lines skipped); ValueError names the bad line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: not UTF-8 text ({error})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def write_jsonl(path: str | Path, rows) -> None:
    """Write ``rows`` (dicts) to ``path``, one JSON object a line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _ids(row: dict, key: str, where: str) -> list[int]:
    ids = row[key]
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"{where}: {key} must be a list of non-negative ints")
    return ids


def _text(row: dict, key: str, where: str) -> str:
    text = row[key]
    if not isinstance(text, str):
        raise ValueError(f"{where}: {key} must be a string, got {type(text).__name__} ({text!r:.40})")
    return text


def prompt_ids(tokenizer, row: dict, where: str = "row") -> list[int]:
    """A row's prompt as token ids (module docstring: ``prompt_ids`` > ``question`` > ``prompt``)."""
    if "prompt_ids" in row:
        ids = _ids(row, "prompt_ids", where)
    elif "question" in row:
        ids = format_prompt(tokenizer, _text(row, "question", where))
    elif "prompt" in row:
        ids = tokenizer(_text(row, "prompt", where), add_special_tokens=False)["input_ids"]
    else:
        raise ValueError(f"{where}: needs one of 'prompt_ids', 'question' or 'prompt'")
    if not ids:
        raise ValueError(f"{where}: the prompt is empty")
    return ids


def completion_ids(tokenizer, row: dict, where: str = "row") -> list[int]:
    """A row's completion as token ids: ``completion_ids``, else ``completion`` text encoded verbatim."""
    if "completion_ids" in row:
        ids = _ids(row, "completion_ids", where)
    elif "completion" in row:
        ids = tokenizer(_text(row, "completion", where), add_special_tokens=False)["input_ids"]
    else:
        raise ValueError(f"{where}: needs 'completion_ids' or 'completion'")
    if not ids:
        raise ValueError(f"{where}: the completion is empty")
    return ids
