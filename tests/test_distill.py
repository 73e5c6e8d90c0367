"""The distillation-evaluation harness: answer checking by kind, the LoRA wrapper, distillation
(completion-only loss, schedule, memorisation) and the ``distill`` / ``evaluate`` commands."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama, tiny_qwen2
from test_cli import BOS, EOS, char_tokenizer, save_model, write_jsonl
from torch import nn

from adfast import tasks
from adfast.cli import main
from adfast.distill import (LoRALinear, add_lora, completion_nll, distill, lr_multiplier, merge_lora,
                            save_student, warmup_steps_for)
from adfast.evaluate import evaluate
from adfast.models import load_model


@pytest.mark.parametrize("text, answer, kind, correct", [
    ("3 + 4 = 7 #### 7", 7, "number", True),
    ("so \\boxed{1,200} apples", "1200", "number", True),
    ("I think 12, no 13", 12, "number", False),
    ("the result is \\boxed{ \\frac{1}{2} } done", "\\frac{1}{2}", "boxed", True),
    ("first \\boxed{x+1} then \\boxed{x + 2}", "x+2", "boxed", True),
    ("first \\boxed{x+1} then \\boxed{x + 2}", "x+1", "boxed", False),
    ("no box: 1/2", "1/2", "boxed", False),
    ("x = \\boxed{\\sqrt{2}}", "$\\boxed{\\sqrt{ 2 }}$", "boxed", True),
    ("Answer: C", "C", "choice", True),
    ("I would say (B), then on reflection (D)", "D", "choice", True),
    ("so the answer is \\boxed{E}.", "(e)", "choice", True),
    ("Options A and B are wrong, so it must be C.", "C", "choice", True),
    ("The answer is A", "B", "choice", False),
    ("Answer: Because of this, nothing.", "B", "choice", False),
])
def test_check_answer(text, answer, kind, correct):
    assert tasks.check_answer(text, answer, kind) is correct


def test_extract_by_kind_and_bad_references():
    assert tasks.extract("Answer: 5", "number") == 5 and tasks.extract("no letter here", "choice") is None
    assert tasks.extract("\\boxed{a  b}", "boxed") == "ab" and tasks.extract("42", "boxed") is None
    assert tasks.check_answer("#### 7", 7) and tasks.is_correct("#### 7", 7)  # "number" is the default
    with pytest.raises(ValueError, match="letter A-E"):
        tasks.check_answer("A", "F", "choice")
    with pytest.raises(ValueError, match="integer"):
        tasks.check_answer("7", "seven", "number")
    with pytest.raises(ValueError, match="unknown answer kind"):
        tasks.check_answer("7", 7, "essay")


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


IDS = [BOS, 10, 11, 12, 13, 14, 15, 16]


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2])
def test_lora_starts_exact_trains_adapters_only_and_merges(make):
    model = make()
    before = logits(model, IDS)
    wrapped = add_lora(model, rank=4, alpha=8.0)
    assert len(wrapped) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    assert all(isinstance(model.get_submodule(name), LoRALinear) for name in wrapped)
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, LoRALinear)
    assert torch.equal(logits(model, IDS), before)  # B = 0: exactly the original model
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.endswith(("lora_A", "lora_B")) for name in trainable)
    assert len(trainable) == 2 * len(wrapped)
    with torch.no_grad():  # give the adapters some weight, as training would
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.normal_(0, 0.05)
    adapted = logits(model, IDS)
    assert not torch.allclose(adapted, before, atol=1e-3)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(type(model.get_submodule(name)) is nn.Linear for name in wrapped)
    torch.testing.assert_close(logits(model, IDS), adapted, atol=1e-5, rtol=1e-5)
    assert set(model.state_dict()) == set(make().state_dict())  # plain weights again, same names


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2])
def test_lora_equals_peft_lora_with_the_same_adapters(make):
    """Our LoRA against peft's (the reference implementation of LoRA): same adapted modules, and
    with the same A and B the same logits."""
    import peft  # a test dependency (pyproject extra "test")
    ours, theirs = make(), make()
    wrapped = add_lora(ours, rank=4, alpha=8.0)
    targets = sorted({name.rpartition(".")[2] for name in wrapped})
    config = peft.LoraConfig(r=4, lora_alpha=8.0, lora_dropout=0.0, target_modules=targets, bias="none")
    theirs = peft.get_peft_model(theirs, config)
    adapted = {name.removeprefix("base_model.model.") for name, module in theirs.named_modules()
               if isinstance(module, peft.tuners.lora.LoraLayer)}
    assert adapted == set(wrapped)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in wrapped:
            mine, reference = ours.get_submodule(name), theirs.base_model.model.get_submodule(name)
            mine.lora_B.copy_(torch.randn(mine.lora_B.shape, generator=generator) * 0.05)
            reference.lora_A["default"].weight.copy_(mine.lora_A)
            reference.lora_B["default"].weight.copy_(mine.lora_B)
    torch.testing.assert_close(logits(ours, IDS), logits(theirs, IDS), atol=1e-5, rtol=1e-5)


EXAMPLES = [([BOS, 10, 11, 12], [30, 31, 32, 33, EOS]), ([BOS, 20, 21, 22, 23, 24, 25], [40, 41, EOS])]


def test_completion_nll_scores_completion_tokens_only():
    model = tiny_llama()
    expected_sum, count = 0.0, 0
    for prompt, completion in EXAMPLES:  # one at a time, no padding, by hand
        ids = prompt + completion
        logprobs = torch.log_softmax(logits(model, ids)[0].float(), dim=-1)
        for t in range(len(prompt), len(ids)):
            expected_sum -= logprobs[t - 1, ids[t]].item()
            count += 1
    with torch.no_grad():
        mean = completion_nll(model, EXAMPLES, pad_token_id=0)
        total = completion_nll(model, EXAMPLES, pad_token_id=0, reduction="sum")
    assert mean.item() == pytest.approx(expected_sum / count, rel=1e-5)
    assert total.item() == pytest.approx(expected_sum, rel=1e-5)
    # changing a prompt's last token changes the loss only through conditioning, never by scoring it:
    with torch.no_grad():
        everything = F.cross_entropy(model(torch.tensor([EXAMPLES[0][0] + EXAMPLES[0][1]])).logits[0, :-1],
                                     torch.tensor(EXAMPLES[0][0] + EXAMPLES[0][1])[1:])
        only = completion_nll(model, EXAMPLES[:1])
    assert abs(everything.item() - only.item()) > 1e-3  # a loss over every token would differ


def test_distill_trains_on_the_completion_only_loss():
    """distill's first step loss is completion_nll of the whole batch (prompt tokens unscored), and
    its first update is the one that loss's gradient gives."""
    model, reference = tiny_llama(), tiny_llama()
    with torch.no_grad():
        expected = completion_nll(reference, EXAMPLES).item()
    history = []
    distill(model, None, EXAMPLES, batch_size=2, epochs=1, full_finetune=True, warmup_frac=0.0, lr=1e-3,
            weight_decay=0.0, max_grad_norm=1e9, progress=False, history=history)
    assert len(history) == 1 and history[0]["loss"] == pytest.approx(expected, rel=1e-5)
    completion_nll(reference, EXAMPLES).backward()  # Adam's first step moves every weight by ~lr * sign(grad)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        moved = q.detach() - p.detach()
        significant = q.grad.abs() > 1e-6
        assert torch.equal(torch.sign(moved[significant]), torch.sign(q.grad[significant])), name


def test_lr_schedule_warms_up_then_follows_the_cosine():
    total, warmup = 20, warmup_steps_for(20, 0.1)
    assert warmup == 2
    assert [lr_multiplier(s, total, warmup) for s in range(2)] == [0.5, 1.0]
    for s in range(warmup, total):
        assert lr_multiplier(s, total, warmup) == pytest.approx(
            0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))))
    assert lr_multiplier(0, 10, 0) == 1.0
    history = []
    distill(tiny_llama(), None, EXAMPLES, lora_rank=2, batch_size=1, epochs=5, lr=1e-3, warmup_frac=0.2,
            progress=False, history=history)
    assert len(history) == 10
    assert [h["lr"] for h in history] == pytest.approx([1e-3 * lr_multiplier(s, 10, 2) for s in range(10)])
    assert all(h["grad_norm"] >= 0 and math.isfinite(h["loss"]) for h in history)


def learnable(**overrides):
    """A tiny Llama whose (tied, frozen under LoRA) embeddings are large enough for confident logits:
    at the default init (std 0.02) the logits stay within about +-0.6 whatever the adapters do, so
    the completion NLL cannot fall much below log(96)."""
    return tiny_llama(initializer_range=0.5, **overrides)


def greedy(model, prompt, n):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=0, eos_token_id=EOS)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("full", [False, True])
def test_distill_memorises_a_completion(full):
    model = learnable()
    prompt, completion = EXAMPLES[0]
    traces = [(prompt, completion)] * 8
    with torch.no_grad():
        start = completion_nll(model, traces[:1]).item()
    assert greedy(model, prompt, len(completion)) != completion
    frozen = {name: p.detach().clone() for name, p in model.named_parameters()}
    history = []
    student = distill(model, char_tokenizer(), traces, lora_rank=8, lora_alpha=16, lr=1e-2,
                      batch_size=4, epochs=15, full_finetune=full, progress=False, history=history)
    assert student is model and not student.training
    assert not any(isinstance(m, LoRALinear) for m in student.modules())  # merged
    assert set(dict(student.named_parameters())) == set(frozen)
    with torch.no_grad():
        end = completion_nll(student, traces[:1]).item()
    assert end < 0.05 * start and history[-1]["loss"] < 0.1 * history[0]["loss"]
    assert greedy(student, prompt, len(completion)) == completion
    unchanged = {name for name, p in student.named_parameters() if torch.equal(p, frozen[name])}
    if full:
        assert "model.embed_tokens.weight" not in unchanged
    else:  # LoRA touches only the adapted projections
        assert all(("self_attn" in name or "mlp" in name) for name in set(frozen) - unchanged)
        assert "model.embed_tokens.weight" in unchanged and "model.norm.weight" in unchanged


def test_save_student_merges_and_reloads(tmp_path):
    model = tiny_llama()
    add_lora(model, rank=2, alpha=2.0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.normal_(0, 0.05)
    expected = logits(model, IDS)
    save_model_dir = save_student(tmp_path / "student", model, char_tokenizer())
    assert (save_model_dir / "model.safetensors").is_file()
    reloaded, tokenizer = load_model(save_model_dir)
    torch.testing.assert_close(logits(reloaded, IDS), expected, atol=1e-5, rtol=1e-5)
    assert tokenizer.decode(tokenizer("ab")["input_ids"], skip_special_tokens=True) == "ab"


def test_evaluate_checks_rows_by_kind():
    model, tokenizer = learnable(), char_tokenizer()
    model.generation_config.update(eos_token_id=EOS, pad_token_id=0)
    rows = [{"question": "1+1?", "answer": 2}, {"prompt": "pick", "answer": "B", "kind": "choice"},
            {"prompt_ids": [BOS, 5, 6]}]
    accuracy, traces = evaluate(model, tokenizer, rows, max_new_tokens=5, batch_size=2, progress=False)
    assert len(traces) == 3 and 0.0 <= accuracy <= 1.0
    assert accuracy == sum(t["correct"] for t in traces[:2]) / 2 and "correct" not in traces[2]
    for row, trace in zip(rows, traces):
        assert {k: trace[k] for k in row} == row and 1 <= trace["tokens"] <= 5
        assert trace["completion"] == tokenizer.decode(trace["completion_ids"], skip_special_tokens=True)
        assert trace["prompt_ids"] == tasks.prompt_ids(tokenizer, row)
    one = [evaluate(model, tokenizer, [row], max_new_tokens=5, progress=False)[1][0] for row in rows]
    assert [t["completion_ids"] for t in one] == [t["completion_ids"] for t in traces]  # left padding is exact
    # memorised answers score 1.0
    prompt = tasks.prompt_ids(tokenizer, rows[0])
    target = tokenizer("#### 2", add_special_tokens=False)["input_ids"] + [EOS]
    distill(model, tokenizer, [(prompt, target)] * 4, lora_rank=8, lora_alpha=16, lr=1e-2, batch_size=4,
            epochs=20, progress=False)
    accuracy, traces = evaluate(model, tokenizer, rows[:1], max_new_tokens=8, progress=False)
    assert accuracy == 1.0 and traces[0]["extracted"] == 2 and traces[0]["completion"] == "#### 2"


def test_cli_distill_then_evaluate(tmp_path, capsys):
    student = save_model(tiny_llama(seed=2), tmp_path / "student")
    traces = write_jsonl(tmp_path / "traces.jsonl", [
        {"question": "A bag has 2 red balls and 3 blue balls. How many balls?", "completion": "#### 5"},
        {"prompt_ids": [BOS, 20, 21], "completion_ids": [30, 31, EOS]},
        {"prompt": "<s>user: pick</s>\n<s>assistant: ", "completion": "Answer: B"}])
    out = tmp_path / "distilled"
    assert main(["distill", "--student", student, "--traces", traces, "--out", str(out), "--epochs", "2",
                 "--batch-size", "2", "--lora-rank", "4", "--lr", "1e-3", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote the student to {out}" in printed and "LoRA rank 4" in printed and "4 steps" in printed
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    model, _ = load_model(out)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())

    task_rows = [{"question": "A bag has 2 red balls and 3 blue balls. How many balls?", "answer": 5},
                 {"prompt": "<s>user: pick</s>\n<s>assistant: ", "answer": "B", "kind": "choice"},
                 {"question": "Simplify", "answer": "\\frac{1}{2}", "kind": "boxed"}]
    results = tmp_path / "eval.jsonl"
    assert main(["evaluate", "--model", str(out), "--tasks", write_jsonl(tmp_path / "tasks.jsonl", task_rows),
                 "--out", str(results), "--max-new-tokens", "4", "--batch-size", "2", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    rows = tasks.read_jsonl(results)
    assert len(rows) == 3 and all("correct" in row and "extracted" in row for row in rows)
    right = sum(row["correct"] for row in rows)
    assert f"accuracy {right / 3:.1%} ({right}/3)" in printed

    assert main(["distill", "--student", student, "--traces", traces, "--out", str(tmp_path / "full"),
                 "--epochs", "1", "--batch-size", "4", "--full", "--threads", "1"]) == 0
    assert "full fine-tune" in capsys.readouterr().out and (tmp_path / "full" / "model.safetensors").is_file()
    with pytest.raises(SystemExit, match="adfast evaluate: error: .*letter A-E"):
        main(["evaluate", "--model", str(out), "--out", str(results), "--tasks",
              write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "answer": "Z", "kind": "choice"}])])
