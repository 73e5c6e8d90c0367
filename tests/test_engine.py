"""Engine: continuous batching against transformers' greedy generate, the Hugging Face logits processor,
single-prompt runs, full teacher forwards, CUDA-graph replay, a two-process torchrun, and exact D
(delta="jvp") against float64 full-forward references."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch
from conftest import VOCAB, tiny_llama, tiny_qwen2

from adfast.engine import Engine, batch_buckets
from adfast.hf import AntidistillationLogitsProcessor
from adfast.hf import generate as hf_generate
from adfast.proxy_pair import ProxyPair

EPS = 1e-2
SMALL_VOCAB = 90  # a proxy narrower than the teacher: the teacher's ids 90..95 are out of its reach
MAX_NEW = 6
# Six prompts of different lengths (ids < SMALL_VOCAB, valid for every proxy here).
PROMPTS = [torch.randint(0, SMALL_VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist()
           for n in (3, 1, 7, 4, 9, 2)]
TESTS = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def pytorch_sampler(monkeypatch):
    """adfast.sample on CPU runs the PyTorch twin of its Triton kernels (adfast.reference): the same
    draws (test_sampling checks it) without the interpreter's ~50 ms per row and step."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture
def interpreted_kernels(monkeypatch):
    """Run the Triton kernels themselves, in the interpreter, where there is no GPU (conftest's setting)."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def make_pair(vocab: int = VOCAB, seed: int = 1) -> ProxyPair:
    """A float32 ProxyPair of a tiny Llama proxy and a random gradient."""
    proxy = tiny_llama(vocab=vocab, seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    grads = {name: torch.randn(p.shape, generator=g) for name, p in proxy.named_parameters()}
    return ProxyPair.from_gradient(proxy, grads, eps=EPS)


@pytest.fixture(scope="module")
def teachers():
    return {"qwen2": tiny_qwen2(), "llama": tiny_llama(seed=3)}


@pytest.fixture(scope="module")
def pair():
    return make_pair()


@pytest.fixture(scope="module")
def engine(teachers, pair):
    """Qwen2 teacher, full-vocabulary pair, 3 slots for 6 prompts (buckets 1, 2, 3)."""
    return Engine(teachers["qwen2"], pair, max_batch_size=3, max_seq_len=20)


def hf_greedy(model, prompt, max_new_tokens=MAX_NEW, stop=None, **kwargs):
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop, pad_token_id=0,
                         **kwargs)
    return out[0, len(prompt):].tolist()


def teacher_mean_logprob(model, prompt, tokens) -> float:
    """The mean of ``log_softmax`` of a full transformers forward at the generated tokens."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
    return logits.log_softmax(-1).gather(1, torch.tensor(tokens)[:, None]).mean().item()


def test_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(3) == [1, 2, 3]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]


@pytest.mark.parametrize("mode", ["temperature", "antidistill"])
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_greedy_matches_transformers(teachers, pair, family, mode):
    teacher = teachers[family]
    plain = [hf_greedy(teacher, p) for p in PROMPTS]
    stop = plain[0][2]  # ends prompt 0 (and maybe others) early: slots free at different steps
    expected = [hf_greedy(teacher, p, stop=stop) for p in PROMPTS]
    engine = Engine(teacher, pair if mode == "antidistill" else None, max_batch_size=3, max_seq_len=16)
    results = engine.generate(PROMPTS, max_new_tokens=MAX_NEW, tau=0.0, lam=0.0, mode=mode,
                              stop_token_ids=[stop])
    assert [r.tokens for r in results] == expected
    assert [r.finish_reason for r in results] == ["stop" if e[-1] == stop else "length" for e in expected]
    assert {r.finish_reason for r in results} == {"stop", "length"}
    assert [r.num_tokens for r in results] == [len(e) for e in expected]
    for prompt, r in zip(PROMPTS, results):
        assert r.mean_logprob == pytest.approx(teacher_mean_logprob(teacher, prompt, r.tokens), abs=1e-4)
        assert r.seconds > 0


@pytest.mark.parametrize("proxy_vocab", [VOCAB, SMALL_VOCAB])
def test_lam_matches_logits_processor(teachers, proxy_vocab, interpreted_kernels):
    teacher, lam = teachers["qwen2"], 0.5
    pair = make_pair(vocab=proxy_vocab, seed=2)
    # The engine never emits ids the proxies cannot read; transformers is told the same.
    suppress = {"suppress_tokens": list(range(proxy_vocab, VOCAB))} if proxy_vocab < VOCAB else {}
    expected = [hf_generate(teacher, AntidistillationLogitsProcessor(pair, lam=lam, tau=0.0),
                            input_ids=torch.tensor([p]), max_new_tokens=MAX_NEW, **suppress)[0, len(p):].tolist()
                for p in PROMPTS]
    engine = Engine(teacher, pair, max_batch_size=2, max_seq_len=16)
    results = engine.generate(PROMPTS, max_new_tokens=MAX_NEW, tau=0.0, lam=lam)
    assert [r.tokens for r in results] == expected
    assert expected != [hf_greedy(teacher, p) for p in PROMPTS]  # lam changed something
    for prompt, r in zip(PROMPTS, results):  # unadjusted, unmasked teacher log-probabilities
        assert r.mean_logprob == pytest.approx(teacher_mean_logprob(teacher, prompt, r.tokens), abs=1e-4)


def test_per_prompt_lam_equals_each_prompt_alone(engine):
    lams = [0.0, 2.0, 0.5, 1.0, 3.0, 0.25]
    together = engine.generate(PROMPTS, max_new_tokens=MAX_NEW, tau=[0.0] * len(PROMPTS), lam=torch.tensor(lams))
    alone = [engine.generate([p], max_new_tokens=MAX_NEW, tau=0.0, lam=lam)[0] for p, lam in zip(PROMPTS, lams)]
    assert [r.tokens for r in together] == [r.tokens for r in alone]
    for a, b in zip(together, alone):
        assert a.mean_logprob == pytest.approx(b.mean_logprob, abs=1e-5)
    unadjusted = engine.generate(PROMPTS, max_new_tokens=MAX_NEW, tau=0.0, lam=0.0)
    assert [r.tokens for r in together] != [r.tokens for r in unadjusted]


def test_eager_steps_attend_the_positions_the_slots_reach(teachers, pair, monkeypatch):
    """An eager (CPU) engine's steps gather, for the reference attention, the positions its slots
    reach, not the cache's max_seq_len: a cache 20x longer draws the same tokens."""
    import adfast.attention as attention_module

    keys_seen = []
    sdpa = attention_module.F.scaled_dot_product_attention
    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: keys_seen.append(k.shape[2]) or sdpa(q, k, v, **kw))
    kw = dict(max_new_tokens=MAX_NEW, tau=0.7, lam=0.5, seed=3)
    tight = Engine(teachers["qwen2"], pair, max_batch_size=3, max_seq_len=20).generate(PROMPTS, **kw)
    keys_seen.clear()
    long = Engine(teachers["qwen2"], pair, max_batch_size=3, max_seq_len=400).generate(PROMPTS, **kw)
    assert [r.tokens for r in long] == [r.tokens for r in tight]
    assert [r.mean_logprob for r in long] == pytest.approx([r.mean_logprob for r in tight], abs=1e-5)
    assert max(keys_seen) == max(map(len, PROMPTS)) + MAX_NEW - 1  # the longest slot's last step


def test_stop_tokens_and_stream(engine):
    greedy = engine.generate(PROMPTS, max_new_tokens=MAX_NEW, tau=0.0, lam=1.0)
    stop = greedy[2].tokens[1]
    results = engine.generate(PROMPTS, max_new_tokens=MAX_NEW, tau=0.0, lam=1.0, stop_token_ids=(stop, VOCAB + 5))
    for full, r in zip(greedy, results):
        if stop in full.tokens:
            assert r.finish_reason == "stop" and r.tokens == full.tokens[:full.tokens.index(stop) + 1]
        else:
            assert r.finish_reason == "length" and r.tokens == full.tokens and r.num_tokens == MAX_NEW
    assert results[2].finish_reason == "stop" and results[2].num_tokens == 2
    one_id = engine.generate(PROMPTS, max_new_tokens=MAX_NEW, tau=0.0, lam=1.0, stop_token_ids=stop)
    assert [r.tokens for r in one_id] == [r.tokens for r in results]

    events = list(engine.stream(PROMPTS, max_new_tokens=MAX_NEW, tau=0.0, lam=1.0, stop_token_ids=[stop]))
    for i, r in enumerate(results):
        mine = [(token, logprob) for index, token, logprob in events if index == i]
        assert [token for token, _ in mine] == r.tokens
        assert sum(lp for _, lp in mine) / len(mine) == pytest.approx(r.mean_logprob, abs=1e-6)


def assert_seeded_draws_with_teacher_logprobs(engine, teacher, kw):
    """The same seed draws the same tokens, another seed others; mean_logprob is the teacher's own."""
    first = engine.generate(PROMPTS, seed=0, **kw)
    assert [r.tokens for r in engine.generate(PROMPTS, seed=0, **kw)] == [r.tokens for r in first]
    assert [r.tokens for r in engine.generate(PROMPTS, seed=1, **kw)] != [r.tokens for r in first]
    for prompt, r in zip(PROMPTS, first):
        assert r.mean_logprob == pytest.approx(teacher_mean_logprob(teacher, prompt, r.tokens), abs=1e-4)


@pytest.mark.parametrize("mode, interpreted", [("antidistill", True), ("permutation", False), ("temperature", False)])
def test_sampling_seeds_and_logprobs(engine, teachers, mode, interpreted, request):
    if interpreted:
        request.getfixturevalue("interpreted_kernels")
    kw = dict(max_new_tokens=MAX_NEW, tau=1.0, lam=[0.5, 1.0, 0.0, 2.0, 1.0, 0.5], mode=mode)
    assert_seeded_draws_with_teacher_logprobs(engine, teachers["qwen2"], kw)


def test_top_k_one_is_greedy(engine):
    kw = dict(max_new_tokens=MAX_NEW, lam=1.0)
    greedy = engine.generate(PROMPTS, tau=0.0, **kw)
    assert [r.tokens for r in engine.generate(PROMPTS, tau=1.0, top_k=1, seed=3, **kw)] == [r.tokens for r in greedy]
    assert [r.tokens for r in engine.generate(PROMPTS, tau=1.0, top_p=1e-6, seed=3, **kw)] == [r.tokens for r in greedy]


@pytest.mark.parametrize("where", ["teacher", "proxy"])
def test_nan_logits_during_decode_are_an_error_naming_the_prompt(where):
    """The decode step runs unchecked (as a captured graph must) but hands back each row's bad-input
    bits with its tokens: a NaN in a model's head is an error naming the prompt and the model."""
    teacher, pair = tiny_qwen2(), make_pair()
    model = teacher if where == "teacher" else pair.plus
    with torch.no_grad():
        model.lm_head.weight[5, 0] = math.nan
    engine = Engine(teacher, pair, max_batch_size=2, max_seq_len=16)
    message = "teacher logits contain NaN" if where == "teacher" else "proxy logits .* contain NaN"
    with pytest.raises(ValueError, match=f"prompt 0, generated token 0: {message}"):
        engine.generate(PROMPTS[:2], max_new_tokens=3, tau=1.0, lam=0.1, seed=0)


def test_errors(teachers, pair, engine):
    kw = dict(max_new_tokens=4)
    assert engine.generate([], **kw) == []
    with pytest.raises(ValueError, match=r"prompt 1 has 18 tokens; with max_new_tokens=4 it needs 22 .*max_seq_len=20"):
        engine.generate([[1, 2], [3] * 18], **kw)
    with pytest.raises(ValueError, match="prompt 0 has 25 tokens"):
        engine.generate([torch.ones(25, dtype=torch.long)], **kw)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1], []], **kw)
    with pytest.raises(ValueError, match="prompt 0 has a token id outside"):
        engine.generate([[VOCAB]], **kw)
    with pytest.raises(ValueError, match="eps=0.5 differs"):
        engine.generate([[1]], eps=0.5, **kw)
    engine.generate([[1]], eps=EPS, **kw)
    with pytest.raises(ValueError, match="lam has 1 values for 2 prompts"):
        engine.generate([[1], [2]], lam=[1.0], **kw)
    with pytest.raises(ValueError, match="tau must be 0 \\(greedy\\) or .*got -1:"):
        engine.generate([[1], [2]], tau=[1.0, -1.0], **kw)
    with pytest.raises(ValueError, match="tau must be 0 \\(greedy\\) or .*got 1e-09"):
        engine.generate([[1], [2]], tau=[1.0, 1e-9], **kw)
    with pytest.raises(ValueError, match="prompt 1 must hold token ids \\(ints\\), got 1.5"):
        engine.generate([[1], [1.5, 2]], **kw)
    with pytest.raises(ValueError, match="prompt 0 must be a 1-D integer tensor"):
        engine.generate([torch.ones(1, 3, dtype=torch.long)], **kw)
    with pytest.raises(ValueError, match="prompt 0 must be a 1-D integer tensor"):
        engine.generate([torch.ones(3)], **kw)
    with pytest.raises(ValueError, match="stop_token_ids must hold token ids"):
        engine.generate([[1]], stop_token_ids=[2.0], **kw)
    as_ints = engine.generate([[1, 2]], tau=0.0, **kw)[0].tokens
    assert engine.generate([[torch.tensor(1), numpy.int64(2)]], tau=0.0, **kw)[0].tokens == as_ints
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate([[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="mode must be one of"):
        engine.generate([[1]], mode="greedy", **kw)
    with pytest.raises(ValueError, match="top_p"):
        engine.generate([[1]], top_p=0.0, **kw)
    with pytest.raises(ValueError, match="prompt 0 has 3 tokens"):
        engine.stream([[1, 2, 3]], max_new_tokens=18)  # validated when called, not when iterated
    teacher_only = Engine(teachers["qwen2"], None, max_batch_size=1, max_seq_len=8)
    with pytest.raises(ValueError, match="needs a proxy pair"):
        teacher_only.generate([[1]], mode="antidistill", **kw)
    with pytest.raises(ValueError, match="proxy vocabulary"):
        Engine(tiny_qwen2(vocab=SMALL_VOCAB), pair, max_batch_size=1, max_seq_len=8)
    far_pair = ProxyPair(pair.plus, pair.minus.to("meta"), EPS, 0.0, "")
    with pytest.raises(ValueError, match="different devices"):
        Engine(teachers["qwen2"], far_pair, max_batch_size=1, max_seq_len=8)
    with pytest.raises(ValueError, match="max_batch_size"):
        Engine(teachers["qwen2"], pair, max_batch_size=0, max_seq_len=8)


def cuda_test(test):
    """Marked ``gpu`` and skipped where no CUDA device exists."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


@cuda_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replay_equals_eager(teachers, pair, dtype):
    kw = dict(max_new_tokens=MAX_NEW, tau=[1.0, 0.0, 0.7, 1.0, 1.3, 1.0], lam=[0.5, 1.0, 0.0, 2.0, 1.0, 0.5],
              seed=7, stop_token_ids=[5])
    engines = {graph: Engine(teachers["qwen2"], pair, max_batch_size=4, max_seq_len=16, device="cuda", dtype=dtype,
                             cuda_graph=graph) for graph in (False, True)}
    for mode in ("antidistill", "permutation", "temperature"):
        eager, graphed = (engines[graph].generate(PROMPTS, mode=mode, **kw) for graph in (False, True))
        assert [r.tokens for r in graphed] == [r.tokens for r in eager], mode
        assert [r.finish_reason for r in graphed] == [r.finish_reason for r in eager], mode
        for a, b in zip(graphed, eager):
            assert a.mean_logprob == pytest.approx(b.mean_logprob, abs=1e-5)
    assert engines[True]._graphs and not engines[False]._graphs
    filtered = [engines[graph].generate(PROMPTS, top_k=3, top_p=0.9, **kw) for graph in (False, True)]
    assert [r.tokens for r in filtered[0]] == [r.tokens for r in filtered[1]]


@cuda_test
def test_dependent_launch_changes_no_result(teachers, pair, monkeypatch):
    """Programmatic dependent launch (the default on Hopper: our kernels start while the one before
    them finishes and wait for it inside) gives the same tokens and log-probs as ordinary launches
    (``ADFAST_PDL=0``), in captured graphs, with the layers' linears in cuBLAS and in the
    decode-time kernel (bf16)."""
    from adfast.kernels.split import dependent_launch_supported

    if not dependent_launch_supported(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs a Hopper (sm_90) or later GPU")
    kw = dict(max_new_tokens=MAX_NEW, tau=[1.0, 0.0, 0.7, 1.0, 1.3, 1.0], lam=[0.5, 1.0, 0.0, 2.0, 1.0, 0.5],
              seed=3, stop_token_ids=[5])

    def run(linear_kernel):
        engine = Engine(teachers["qwen2"], pair, max_batch_size=4, max_seq_len=16, device="cuda",
                        dtype=torch.bfloat16)
        for model in (engine.teacher, engine.proxies):
            model.linear_kernel = linear_kernel
        return [(r.tokens, r.mean_logprob) for mode in ("antidistill", "temperature")
                for r in engine.generate(PROMPTS, mode=mode, **kw)]

    dependent = [run(False), run(True)]
    monkeypatch.setenv("ADFAST_PDL", "0")
    assert [run(False), run(True)] == dependent


@cuda_test
@pytest.mark.parametrize("batch,plan_options", [(1, {}), (3, dict(swap_ab=True, prefetch_steps=64))],
                         ids=["batch1", "batch3_swapped"])
def test_fused_norms_replay_as_eager(teachers, pair, monkeypatch, batch, plan_options):
    """With every linear in the decode-time kernel, a decode step of ``linear_norm_rows`` rows runs
    the norms inside the linears (Decoder._fuses_norms; their split tickets and partial sums of
    squares written and read within the captured graph): at batch 1 with the default plans, and at
    batch 3 with swapped operands and each program's whole split prefetched, graph replay gives
    the eager steps' tokens and log-probs, with programmatic dependent launch on (where it applies)
    and off (bf16)."""
    kw = dict(max_new_tokens=MAX_NEW, tau=1.0, lam=0.5, seed=7, stop_token_ids=[5])

    def run(graph):
        engine = Engine(teachers["qwen2"], pair, max_batch_size=batch, max_seq_len=16, device="cuda",
                        dtype=torch.bfloat16, cuda_graph=graph)
        for model in (engine.teacher, engine.proxies):
            model.linear_kernel, model.linear_norm_rows, model.linear_plan_options = True, batch, plan_options
        return [(r.tokens, r.mean_logprob) for first in range(0, 2 * batch, batch)
                for mode in ("antidistill", "temperature")
                for r in engine.generate(PROMPTS[first:first + batch], mode=mode, **kw)]

    eager = run(False)
    assert run(True) == eager
    monkeypatch.setenv("ADFAST_PDL", "0")
    assert run(True) == eager


@cuda_test
def test_weight_prefetch_changes_no_result(teachers, pair):
    """The decoders' L2 weight prefetch (a side stream forked and joined in every captured decode
    step) gives the same tokens and log-probs as none, with whole weights (a budget they fit) and
    row heads (a budget of one 128-byte line a row) prefetched; bf16, CUDA graphs."""
    from adfast.kernels.l2_prefetch import prefetch_supported

    if not prefetch_supported(torch.device("cuda")):
        pytest.skip("the bulk prefetch needs a Hopper (sm_90) or later GPU")
    kw = dict(max_new_tokens=MAX_NEW, tau=[1.0, 0.0, 0.7, 1.0, 1.3, 1.0], lam=[0.5, 1.0, 0.0, 2.0, 1.0, 0.5],
              seed=5, stop_token_ids=[5])

    def run(budget_per_row, graph=True):
        engine = Engine(teachers["qwen2"], pair, max_batch_size=4, max_seq_len=16, device="cuda",
                        dtype=torch.bfloat16, cuda_graph=graph)
        for model in (engine.teacher, engine.proxies):
            model.prefetch_bytes = budget_per_row * model.layers[0].w_gate_up.shape[1] * model.num_copies
        results = [(r.tokens, r.mean_logprob) for mode in ("antidistill", "permutation", "temperature")
                   for r in engine.generate(PROMPTS, mode=mode, **kw)]
        assert bool(engine._graphs) == graph
        return results

    none = run(0)
    assert run(1 << 20) == none
    assert run(128) == none
    assert run(1 << 20, graph=False) == run(0, graph=False)  # eager: the side stream forks and joins every step


# ------------------------------------------------------------------------------- torchrun sharding

DIST_PROMPTS = PROMPTS[:5]
DIST_KW = dict(max_new_tokens=4, tau=0.0, lam=[0.0, 1.0, 2.0, 0.5, 1.0])


def build_engine() -> Engine:
    """The same tiny teacher and pair in every process (fixed seeds), on the CPU."""
    return Engine(tiny_qwen2(), make_pair(), max_batch_size=2, max_seq_len=16)


DIST_SCRIPT = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
from test_engine import DIST_KW, DIST_PROMPTS, build_engine
from adfast.engine import generate_distributed

local = []
def factory():
    engine = build_engine()
    generate = engine.generate
    def counted(prompts, **kw):
        local.append(len(prompts))
        return generate(prompts, **kw)
    engine.generate = counted
    return engine

results = generate_distributed(factory, DIST_PROMPTS, backend="gloo", **DIST_KW)
with open(os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump({"local": local, "results": [[r.tokens, r.finish_reason, r.mean_logprob] for r in results]}, f)
"""


def test_generate_distributed_matches_one_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(DIST_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script), str(TESTS), str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    single = build_engine().generate(DIST_PROMPTS, **DIST_KW)
    expected = [[r.tokens, r.finish_reason, r.mean_logprob] for r in single]
    for rank, local in ((0, [3]), (1, [2])):  # round robin: prompts 0, 2, 4 and 1, 3
        out = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert out["local"] == local
        assert [r[:2] for r in out["results"]] == [e[:2] for e in expected]
        assert [r[2] for r in out["results"]] == pytest.approx([e[2] for e in expected], abs=1e-5)


# ------------------------------------------------------------------------------- exact D (delta="jvp")

def proxy_and_gradient(vocab: int = VOCAB, seed: int = 1):
    """A float32 tiny Llama proxy and a random gradient (the ones make_pair perturbs)."""
    proxy = tiny_llama(vocab=vocab, seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    return proxy, {name: torch.randn(p.shape, generator=g) for name, p in proxy.named_parameters()}


def exact_greedy(teacher, proxy, grads, prompt, lam, max_new_tokens=MAX_NEW):
    """Greedy ``argmax(log_softmax(t) + lam * D)`` over full forwards: transformers' teacher logits and
    the float64 exact D (adfast.exact_delta) at the last position; ids the proxy cannot read are
    excluded, as the engine does. Also returns the smallest margin between the best two tokens."""
    from adfast.exact_delta import exact_delta

    ids, out, margin = list(prompt), [], math.inf
    vocab_p = proxy.config.vocab_size
    for _ in range(max_new_tokens):
        x = torch.tensor([ids])
        with torch.no_grad():
            t = teacher(x).logits[0, -1].double()
        d = exact_delta(proxy, grads, x, dtype=torch.float64)[0, -1]
        objective = torch.log_softmax(t, -1)[:vocab_p] + lam * d
        top = objective.topk(2).values
        margin = min(margin, float(top[0] - top[1]))
        token = int(objective.argmax())
        out.append(token)
        ids.append(token)
    return out, margin


@pytest.mark.parametrize("proxy_vocab", [VOCAB, SMALL_VOCAB])
def test_jvp_greedy_matches_exact_delta_reference(teachers, proxy_vocab):
    teacher, lam = teachers["qwen2"], 0.05
    proxy, grads = proxy_and_gradient(vocab=proxy_vocab)
    engine = Engine(teacher, proxy, max_batch_size=3, max_seq_len=20, delta="jvp", gradient=grads)
    assert engine.proxies.num_copies == 1 and engine.proxies.cache.dk is not None and engine.eps is None
    results = engine.generate(PROMPTS, max_new_tokens=MAX_NEW, tau=0.0, lam=lam)
    expected = [exact_greedy(teacher, proxy, grads, p, lam) for p in PROMPTS]
    assert min(margin for _, margin in expected) > 1e-3  # no near-tie that float32 round-off could flip
    assert [r.tokens for r in results] == [tokens for tokens, _ in expected]
    plain = [exact_greedy(teacher, proxy, grads, p, 0.0)[0] for p in PROMPTS]
    assert [r.tokens for r in results] != plain  # lam changed something
    assert [r.tokens for r in engine.generate(PROMPTS, max_new_tokens=MAX_NEW, tau=0.0, lam=0.0)] == plain
    for prompt, r in zip(PROMPTS, results):  # unadjusted, unmasked teacher log-probabilities
        assert r.mean_logprob == pytest.approx(teacher_mean_logprob(teacher, prompt, r.tokens), abs=1e-4)


def test_jvp_close_to_fd_and_pair_with_gradient(teachers):
    """A ProxyPair plus its gradient builds the jvp engine from the pair's midpoint; the fd engine
    with a small eps draws the same greedy tokens here."""
    teacher, lam = teachers["qwen2"], 0.05
    proxy, grads = proxy_and_gradient()
    pair = ProxyPair.from_gradient(proxy, grads, eps=1e-3)
    kw = dict(max_new_tokens=MAX_NEW, tau=0.0, lam=lam)
    jvp = Engine(teacher, proxy, max_batch_size=3, max_seq_len=20, delta="jvp", gradient=grads).generate(PROMPTS, **kw)
    from_pair = Engine(teacher, pair, max_batch_size=3, max_seq_len=20, delta="jvp",
                       gradient=grads).generate(PROMPTS, **kw)
    fd = Engine(teacher, pair, max_batch_size=3, max_seq_len=20).generate(PROMPTS, **kw)
    assert [r.tokens for r in from_pair] == [r.tokens for r in jvp]
    assert [r.tokens for r in fd] == [r.tokens for r in jvp]


@pytest.mark.parametrize("mode, interpreted", [("antidistill", True), ("permutation", False), ("temperature", False)])
def test_jvp_sampling_is_reproducible(teachers, mode, interpreted, request):
    if interpreted:
        request.getfixturevalue("interpreted_kernels")
    proxy, grads = proxy_and_gradient()
    engine = Engine(teachers["qwen2"], proxy, max_batch_size=3, max_seq_len=20, delta="jvp", gradient=grads)
    kw = dict(max_new_tokens=MAX_NEW, tau=1.0, lam=[0.05, 0.1, 0.0, 0.2, 0.1, 0.05], mode=mode)
    assert_seeded_draws_with_teacher_logprobs(engine, teachers["qwen2"], kw)


def test_jvp_errors(teachers, pair):
    teacher = teachers["qwen2"]
    proxy, grads = proxy_and_gradient()
    kw = dict(max_batch_size=1, max_seq_len=8)
    with pytest.raises(ValueError, match="delta='jvp' needs the direction g: pass gradient=.*a ProxyPair holds only"):
        Engine(teacher, pair, delta="jvp", **kw)
    with pytest.raises(ValueError, match="delta='jvp' needs the direction g"):
        Engine(teacher, proxy, delta="jvp", **kw)
    with pytest.raises(ValueError, match="delta must be 'fd'"):
        Engine(teacher, pair, delta="exact", **kw)
    with pytest.raises(ValueError, match="gradient= is only used with delta='jvp'"):
        Engine(teacher, pair, gradient=grads, **kw)
    with pytest.raises(ValueError, match="delta='jvp' needs the proxy model"):
        Engine(teacher, None, delta="jvp", gradient=grads, **kw)
    with pytest.raises(ValueError, match="gradient does not match"):
        Engine(teacher, proxy, delta="jvp", gradient={k: v for k, v in list(grads.items())[1:]}, **kw)
    with pytest.raises(ValueError, match="proxy vocabulary"):
        Engine(tiny_qwen2(vocab=SMALL_VOCAB), proxy, delta="jvp", gradient=grads, **kw)
    engine = Engine(teacher, proxy, delta="jvp", gradient=grads, **kw)
    with pytest.raises(ValueError, match="eps=0.01 is not used with delta='jvp'"):
        engine.generate([[1]], max_new_tokens=2, eps=EPS)


def low_rank_of(proxy, grads, rank: int):
    from adfast.gradient import ProxyGradient
    from adfast.provenance import model_identity
    from adfast.low_rank import low_rank_gradient

    gradient = ProxyGradient(grads=grads, loss=1.0, num_examples=1, num_tokens=1, model_id=model_identity(proxy))
    return low_rank_gradient(gradient, rank)


@pytest.mark.parametrize("rank", [4, 16])
def test_jvp_low_rank_gradient_draws_as_its_dense_reconstruction(teachers, rank, tmp_path):
    """gradient=LowRankGradient (or its file) keeps the tangent factored and draws the tokens of
    gradient=G_r: greedy with lam > 0, and sampled under a fixed seed."""
    from adfast.tangent import FactoredTangent
    from adfast.low_rank import save_low_rank_gradient

    teacher, lam = teachers["qwen2"], 0.05
    proxy, grads = proxy_and_gradient()
    lr = low_rank_of(proxy, grads, rank)
    path = tmp_path / "g.safetensors"
    save_low_rank_gradient(path, lr)
    kw = dict(max_batch_size=3, max_seq_len=20, delta="jvp")
    engines = [Engine(teacher, proxy, gradient=g, **kw) for g in (lr, path, lr.to_dense())]
    for engine in engines[:2]:
        assert isinstance(engine.proxies.tangent_weights["layers.0.wqkv"], FactoredTangent)
        assert engine.proxies.tangent_numel() == lr.numel() < engines[2].proxies.tangent_numel()
    greedy = [[r.tokens for r in e.generate(PROMPTS, max_new_tokens=MAX_NEW, tau=0.0, lam=lam)] for e in engines]
    assert greedy[0] == greedy[1] == greedy[2]
    plain = [r.tokens for r in engines[2].generate(PROMPTS, max_new_tokens=MAX_NEW, tau=0.0, lam=0.0)]
    assert greedy[0] != plain  # lam changed something
    sampled = [[r.tokens for r in e.generate(PROMPTS, max_new_tokens=MAX_NEW, tau=1.0, lam=lam, seed=7)]
               for e in (engines[0], engines[2])]
    assert sampled[0] == sampled[1]


# ------------------------------------------------------------------------------- CUDA: graphs and references



@cuda_test
@pytest.mark.parametrize("rank", [0, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replay_equals_eager_jvp(teachers, rank, dtype):
    """Exact D (delta="jvp"), dense and factored gradients: the captured step draws what the eager one does."""
    proxy, grads = proxy_and_gradient(vocab=SMALL_VOCAB)
    gradient = low_rank_of(proxy, grads, rank) if rank else grads
    kw = dict(max_new_tokens=MAX_NEW, tau=[1.0, 0.0, 0.7, 1.0, 1.3, 1.0], lam=[0.05, 0.1, 0.0, 0.2, 0.1, 0.05],
              seed=7)
    engines = {graph: Engine(teachers["qwen2"], proxy, max_batch_size=4, max_seq_len=16, device="cuda",
                             dtype=dtype, cuda_graph=graph, delta="jvp", gradient=gradient) for graph in (False, True)}
    for mode in ("antidistill", "permutation", "temperature"):
        eager, graphed = (engines[graph].generate(PROMPTS, mode=mode, **kw) for graph in (False, True))
        assert [r.tokens for r in graphed] == [r.tokens for r in eager], mode
        for a, b in zip(graphed, eager):
            assert a.mean_logprob == pytest.approx(b.mean_logprob, abs=1e-5)
    assert engines[True]._graphs and not engines[False]._graphs
    filtered = [engines[graph].generate(PROMPTS, top_k=3, top_p=0.9, **kw) for graph in (False, True)]
    assert [r.tokens for r in filtered[0]] == [r.tokens for r in filtered[1]]


@cuda_test
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_cuda_graph_greedy_matches_transformers(teachers, pair, family):
    """float32 on the GPU, captured: the Triton decode attention and sampler give transformers' greedy tokens."""
    teacher = teachers[family]
    engine = Engine(teacher, pair, max_batch_size=3, max_seq_len=16, device="cuda", dtype=torch.float32)
    results = engine.generate(PROMPTS, max_new_tokens=MAX_NEW, tau=0.0, lam=0.0)
    assert engine._graphs
    assert [r.tokens for r in results] == [hf_greedy(teacher, p) for p in PROMPTS]
    for prompt, r in zip(PROMPTS, results):
        assert r.mean_logprob == pytest.approx(teacher_mean_logprob(teacher, prompt, r.tokens), abs=1e-4)


@cuda_test
@pytest.mark.parametrize("rank", [0, 4])
def test_cuda_graph_jvp_greedy_matches_exact_delta_reference(teachers, rank):
    """float32 on the GPU, captured, exact D: the float64 full-forward reference's greedy tokens."""
    teacher, lam = teachers["qwen2"], 0.2  # smallest top-two margin of the reference: 5e-3 (rank 0), 4e-2 (rank 4)
    proxy, grads = proxy_and_gradient(vocab=SMALL_VOCAB)
    gradient = low_rank_of(proxy, grads, rank) if rank else grads
    if rank:  # the reference takes the dense reconstruction G_r = U V^T
        grads = gradient.to_dense()
    engine = Engine(teacher, proxy, max_batch_size=3, max_seq_len=20, device="cuda", dtype=torch.float32,
                    delta="jvp", gradient=gradient)
    results = engine.generate(PROMPTS, max_new_tokens=MAX_NEW, tau=0.0, lam=lam)
    assert engine._graphs
    expected = [exact_greedy(teacher, proxy, grads, p, lam) for p in PROMPTS]
    assert min(margin for _, margin in expected) > 1e-3
    assert [r.tokens for r in results] == [tokens for tokens, _ in expected]
