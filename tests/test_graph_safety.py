"""The decode step is free of host synchronisation in every engine mode, checked on CPU.

A CUDA graph can only capture a step that never waits on the device: no ``.item()``, ``bool(t)``,
``.tolist()``, data-dependent output shapes (``nonzero``, ``masked_select``, ``unique``,
``repeat_interleave`` by a tensor) and no tensors built from host data (``torch.tensor(list)``,
an unpinned host-to-device copy). :class:`HostSyncDetector` records every such operation run
inside :func:`adfast.engine.decode_one_token` while the engine generates, in each decode
configuration (fd pair, exact D with dense and factored gradients, every mode, top-k/top-p, a
proxy vocabulary narrower than the teacher's); the GPU tests capture and replay the same function.
"""
import pytest
import torch
from conftest import VOCAB, tiny_llama, tiny_qwen2
from torch.utils._python_dispatch import TorchDispatchMode

import adfast.engine
from adfast.engine import Engine
from adfast.gradient import ProxyGradient
from adfast.provenance import model_identity
from adfast.kernels.decode_attention import decode_attention  # imported under conftest's TRITON_INTERPRET=1
from adfast.low_rank import low_rank_gradient
from adfast.proxy_pair import ProxyPair

SMALL_VOCAB = 90
PROMPTS = [[5, 7, 9], [3], [11, 12, 13, 14, 15], [8, 2]]
SYNCING_OPS = {
    "aten._local_scalar_dense.default",  # .item(), bool(t), int(t), float(t)
    "aten.nonzero.default", "aten.masked_select.default", "aten._unique2.default", "aten.unique_dim.default",
    "aten.unique_consecutive.default", "aten.repeat_interleave.Tensor", "aten.equal.default",
    "aten.lift_fresh.default",  # torch.tensor(data) / as_tensor(list): host data copied to the device
}

MASK_INDEXING_OPS = {"aten.index.Tensor", "aten.index_put.default", "aten.index_put_.default"}  # x[mask]: nonzero


class HostSyncDetector(TorchDispatchMode):
    """Records the operations of :data:`SYNCING_OPS` and calls of ``Tensor.tolist`` / ``Tensor.numpy``
    (which read tensor data without dispatching an operator), and indexing by a boolean mask."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in SYNCING_OPS:
            self.seen.append(str(func))
        if str(func) in MASK_INDEXING_OPS and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None):
            self.seen.append(f"{func} by a boolean mask")
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}
        for name, method in self._saved.items():
            def reading(tensor, *args, _name=name, _method=method, **kwargs):
                self.seen.append(f"Tensor.{_name}")
                return _method(tensor, *args, **kwargs)
            setattr(torch.Tensor, name, reading)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)


@pytest.fixture
def watched_decode(monkeypatch):
    """Run every decode step of the engine under one detector; returns it."""
    detector, steps = HostSyncDetector(), []
    step = adfast.engine.decode_one_token

    def watched(*args, **kwargs):
        steps.append(1)
        with detector:
            return step(*args, **kwargs)

    monkeypatch.setattr(adfast.engine, "decode_one_token", watched)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the PyTorch twins of the kernels: no interpreter noise
    detector.steps = steps
    return detector


def gradient_for(proxy):
    g = torch.Generator().manual_seed(7)
    return {name: torch.randn(p.shape, generator=g) for name, p in proxy.named_parameters()}


def fd_engine(proxy_vocab):
    proxy = tiny_llama(vocab=proxy_vocab, seed=1)
    pair = ProxyPair.from_gradient(proxy, gradient_for(proxy), eps=1e-2)
    return Engine(tiny_qwen2(), pair, max_batch_size=3, max_seq_len=24)


def jvp_engine(rank):
    proxy = tiny_llama(vocab=SMALL_VOCAB, seed=1)
    grads = gradient_for(proxy)
    if rank:
        grads = low_rank_gradient(ProxyGradient(grads=grads, loss=1.0, num_examples=1, num_tokens=1,
                                                model_id=model_identity(proxy)), rank)
    return Engine(tiny_qwen2(), proxy, max_batch_size=3, max_seq_len=24, delta="jvp", gradient=grads)


ENGINES = {"fd": lambda: fd_engine(VOCAB), "fd-narrow-proxy": lambda: fd_engine(SMALL_VOCAB),
           "jvp-dense": lambda: jvp_engine(0), "jvp-rank4": lambda: jvp_engine(4)}
SETTINGS = {"antidistill": dict(mode="antidistill"), "permutation": dict(mode="permutation"),
            "temperature": dict(mode="temperature"), "greedy": dict(mode="antidistill", tau=0.0),
            "top-k-top-p": dict(mode="antidistill", top_k=5, top_p=0.9)}


@pytest.mark.parametrize("engine_kind", sorted(ENGINES))
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_decode_step_never_waits_on_the_device(engine_kind, setting, watched_decode):
    engine = ENGINES[engine_kind]()
    kw = {"tau": 0.8, "lam": [0.1, 0.0, 0.2, 0.05], "seed": 3, **SETTINGS[setting]}
    if engine_kind.startswith("fd"):
        kw["eps"] = 1e-2
    results = engine.generate(PROMPTS, max_new_tokens=4, **kw)
    assert all(r.num_tokens == 4 for r in results)
    assert len(watched_decode.steps) >= 4  # the detector saw the decode steps (4 prompts over 3 slots)
    assert watched_decode.seen == []


def test_the_detector_catches_each_kind_of_sync():
    x = torch.arange(6.0)
    cases = [lambda: x.sum().item(), lambda: bool(x.any()), lambda: x.tolist(), lambda: torch.nonzero(x),
             lambda: torch.tensor([1, 2]), lambda: x.repeat_interleave(torch.ones(6, dtype=torch.int64)),
             lambda: x[x > 2], lambda: x.numpy()]
    for case in cases:
        with HostSyncDetector() as detector:
            case()
        assert detector.seen, case
    with HostSyncDetector() as detector:  # what a capturable step does: device ops, shapes from shapes
        x.repeat_interleave(2), torch.where(x > 2, x, 0.0), torch.full((3,), 2.0), x.softmax(0).argmax()
    assert detector.seen == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs only where no GPU exists (conftest); "
                    "on a GPU the graph tests capture these launchers, which fails on any host sync")
@pytest.mark.parametrize("engine_kind, setting", [("fd-narrow-proxy", "permutation"), ("jvp-rank4", "top-k-top-p")])
def test_triton_launchers_never_wait_on_the_device(engine_kind, setting, watched_decode, monkeypatch):
    """The sampler's Triton launchers (run here by the interpreter) and the decode-attention launcher."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kw = {"tau": 0.8, "lam": 0.1, "seed": 3, **SETTINGS[setting]}
    ENGINES[engine_kind]().generate(PROMPTS[:2], max_new_tokens=2, **kw)
    assert watched_decode.steps and watched_decode.seen == []

    q = torch.randn(2, 3, 1, 4, 16)
    k, v = torch.randn(2, 5, 33, 2, 16), torch.randn(2, 5, 33, 2, 16)
    slots, lengths = torch.tensor([4, 0, 2]), torch.tensor([1, 32, 17])
    with HostSyncDetector() as detector:
        decode_attention(q, k, v, slots, lengths)
    assert detector.seen == []
