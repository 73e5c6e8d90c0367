"""A synthetic reasoning task with known answers and freedom of wording, and tiny models trained on it.

The task (*order-free sums*): a prompt ``"7+3+4+7="`` asks for the sum of ``terms`` digits 1-9; a
correct trace adds them one at a time, **in any order**, writing each partial sum, and ends with
the answer after ``#``::

    7+3=10;10+4=14;14+7=21#21        4+7=11;11+7=18;18+3=21#21        ... (any of the 4! orders)

so, as in natural-language reasoning, many different traces are correct and a teacher trained on
uniformly random orders has real choices to make at every step (which number next), besides the
arithmetic, where it has (almost) none. Answers are checked as ``kind="number"`` rows of
:mod:`adfast.tasks` (the last integer). Every problem (an ordered tuple of digits) belongs to one
split, by a hash of its prompt: ``"teacher"`` (the teacher's own training problems),
``"pretrain"`` (the weak pre-training of proxy and student), ``"train"`` (prompts of the
distillation traces), ``"holdout"`` (prompts of the proxy-gradient traces) and ``"test"``.

Models are Hugging Face Llama / Qwen2 causal LMs from :func:`tiny_model`, trained from scratch by
:func:`train_from_scratch` (full fine-tuning with :func:`adfast.distill.distill` on reference
traces) over the character tokenizer of :func:`char_tokenizer`, and saved as safetensors
directories that :func:`adfast.models.load_model` reads.
"""
from __future__ import annotations

import hashlib
import random
from pathlib import Path

SPLITS = {"teacher": 0.5, "pretrain": 0.1, "train": 0.2, "holdout": 0.05, "test": 0.15}  # shares of problems
CHARACTERS = "0123456789+=;#"
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
ARCHITECTURES = ("llama", "qwen2")


def char_tokenizer():
    """A ``PreTrainedTokenizerFast`` with one token per character of :data:`CHARACTERS`, plus
    ``<pad>`` (id 0), ``</s>`` (id 1, EOS) and ``<unk>`` (id 2); decoding concatenates the characters."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, EOS: 1, UNK: 2, **{c: i + 3 for i, c in enumerate(CHARACTERS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS, unk_token=UNK)


def prompt_text(numbers) -> str:
    """``"7+3+4+7="`` for ``(7, 3, 4, 7)``."""
    return "+".join(map(str, numbers)) + "="


def split_of(numbers) -> str:
    """The split of a problem, from the SHA-256 of its prompt (fixed, disjoint, shares :data:`SPLITS`)."""
    u = int.from_bytes(hashlib.sha256(prompt_text(numbers).encode()).digest()[:8], "big") / 2 ** 64
    for split, share in SPLITS.items():
        if u < share:
            return split
        u -= share
    return split


def problems(split: str, n: int, *, terms: int = 4, seed: int = 0) -> list[tuple[int, ...]]:
    """``n`` distinct problems of ``split`` (tuples of ``terms`` digits 1-9), drawn with ``seed``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if terms < 2:
        raise ValueError(f"terms must be >= 2, got {terms}")
    available = int(SPLITS[split] * 9 ** terms * 0.9)
    if not 0 <= n <= available:
        raise ValueError(f"the {split} split has about {available / 0.9:.0f} problems with {terms} terms; "
                         f"ask for at most {available}, got {n}")
    rng, seen, out = random.Random(f"{split}/{terms}/{seed}"), set(), []
    while len(out) < n:
        numbers = tuple(rng.randint(1, 9) for _ in range(terms))
        if numbers not in seen and split_of(numbers) == split:
            out.append(numbers)
        seen.add(numbers)
    return out


def reference_trace(numbers, rng: random.Random) -> str:
    """A correct trace adding ``numbers`` in a uniformly random order (module docstring)."""
    order = list(numbers)
    rng.shuffle(order)
    total, steps = order[0], []
    for x in order[1:]:
        steps.append(f"{total}+{x}={total + x}")
        total += x
    return ";".join(steps) + f"#{total}"


def task_rows(numbers_list) -> list[dict]:
    """:mod:`adfast.tasks` rows: ``prompt`` text and integer ``answer``."""
    return [{"prompt": prompt_text(numbers), "answer": sum(numbers)} for numbers in numbers_list]


def reference_examples(tokenizer, numbers_list, *, samples_per_problem: int = 1, seed: int = 0):
    """``(prompt_ids, completion_ids)`` pairs: ``samples_per_problem`` reference traces (random
    orders) per problem, each completion ending with EOS."""
    rng = random.Random(seed)
    examples = []
    for numbers in numbers_list:
        prompt = tokenizer(prompt_text(numbers), add_special_tokens=False)["input_ids"]
        for _ in range(samples_per_problem):
            completion = tokenizer(reference_trace(numbers, rng), add_special_tokens=False)["input_ids"]
            examples.append((prompt, completion + [tokenizer.eos_token_id]))
    return examples


def tiny_model(architecture: str, tokenizer, *, hidden: int, layers: int, heads: int, kv_heads: int,
               seed: int = 0, max_positions: int = 64):
    """A randomly initialised ``architecture`` ("llama" or "qwen2") causal LM over ``tokenizer``'s
    vocabulary: ``layers`` blocks of width ``hidden``, MLP width ``4 * hidden``, ``heads`` query and
    ``kv_heads`` key/value heads, tied embeddings; EOS and pad ids from the tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM),
                                 "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[architecture]
    config = config_class(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                          num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                          max_position_embeddings=max_positions, tie_word_embeddings=True,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=None)
    torch.manual_seed(seed)
    model = model_class(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def train_from_scratch(model, tokenizer, examples, *, epochs: int, lr: float = 3e-3, batch_size: int = 64,
                       seed: int = 0, progress: bool = False) -> float:
    """Full fine-tuning of ``model`` on ``examples`` (:func:`adfast.distill.distill`: completion-only
    loss, AdamW with weight decay 0.01, warm-up then cosine); returns the last batch's loss."""
    from .distill import distill

    history: list[dict] = []
    distill(model, tokenizer, examples, full_finetune=True, lr=lr, weight_decay=0.01, batch_size=batch_size,
            epochs=epochs, seed=seed, progress=progress, history=history)
    return history[-1]["loss"]


def save(directory, model, tokenizer) -> Path:
    """Save ``model`` and ``tokenizer`` to ``directory`` (safetensors), loadable by
    :func:`adfast.models.load_model`."""
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


__all__ = ["SPLITS", "char_tokenizer", "prompt_text", "split_of", "problems", "reference_trace", "task_rows",
           "reference_examples", "tiny_model", "train_from_scratch", "save"]
