"""Shared fixtures. Without a CUDA device the Triton kernels run under the interpreter on CPU
tensors: TRITON_INTERPRET must be set before anything imports adfast.kernels."""
import importlib.util
import os
import sys

# `python -m pytest` run from the repository root puts the root on sys.path, and there kernels/
# (installed as adfast.kernels) would shadow the Hugging Face `kernels` package that transformers
# imports. The tests use the installed package, so the root is taken off the path.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy  # noqa: E402
import pytest  # noqa: E402
import triton  # noqa: E402
from packaging.version import Version  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

VOCAB = 96
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
"""Where tests run the Triton kernels: the GPU where one exists, else CPU tensors in the interpreter."""


def pytest_configure(config):
    """Refuse to start where the Triton interpreter cannot run: before triton 3.7 it converts
    one-element arrays to Python ints, which numpy 2.4 and later refuse."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    if Version(triton.__version__) < Version("3.7") and Version(numpy.__version__) >= Version("2.4"):
        raise pytest.UsageError(
            f"triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1, how the kernels are tested "
            f"without a CUDA device) fails with numpy {numpy.__version__} ('only 0-dimensional arrays can "
            f"be converted to Python scalars'); install numpy<2.4 or triton>=3.7")


def load_bench(name: str):
    """The benchmark script ``bench/<name>.py`` as a module (bench/ is no package; a script that
    imports another from bench/ needs that directory on ``sys.path``: ``monkeypatch.syspath_prepend``)."""
    spec = importlib.util.spec_from_file_location(f"{name}_bench", os.path.join(_ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_qwen2(vocab: int = VOCAB, seed: int = 0, **overrides) -> Qwen2ForCausalLM:
    """A random 2-layer Qwen2 (grouped-query attention, qkv bias, untied head) in float32, eval mode.
    transformers initialises the qkv biases to zero: a test of a bias path takes
    :func:`with_random_biases` of it."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               tie_word_embeddings=False, attn_implementation="eager")
    cfg.update(overrides)
    return Qwen2ForCausalLM(Qwen2Config(**cfg)).eval()


def with_random_biases(model, seed: int = 0, std: float = 0.5):
    """``model`` with every bias drawn from N(0, std^2) (in place; returned)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(std * torch.randn(param.shape, generator=g))
    return model


def tiny_llama(vocab: int = VOCAB, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A random 2-layer Llama (grouped-query attention, tied embeddings, llama3 rope scaling), float32."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               tie_word_embeddings=True, attn_implementation="eager",
               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def assert_within(actual, expected, scale, k, dtype, what):
    """``|actual - expected| <= k eps(dtype) scale`` elementwise (plus the smallest normal)."""
    err = (actual.double().cpu() - expected.double().cpu()).abs()
    bound = k * torch.finfo(dtype).eps * scale.double().cpu() + torch.finfo(dtype).tiny
    worst = (err / bound).max().item()
    assert worst <= 1, f"{what}: error up to {worst:.2f}x the bound of {k} eps ({dtype})"


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine waiting OpenMP threads
    slow them down many times over: the suite runs on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def qwen2_model():
    return tiny_qwen2()


@pytest.fixture
def llama_model():
    return tiny_llama()
