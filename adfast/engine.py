"""Continuous-batching generation with antidistillation sampling on a lockstep teacher / proxy pair.

The teacher is a :class:`adfast.decoder.Decoder` with one weight set, the proxy pair
``theta_P +- eps g`` one ``Decoder`` with two stacked copies (``delta="fd"``, the finite
difference), or, with ``delta="jvp"``, the unperturbed proxy ``theta_P`` as a one-copy ``Decoder``
in tangent mode along ``g`` (:meth:`Decoder.set_tangent`; dense, or a low-rank gradient's factors),
whose one pass gives ``D`` exactly and feeds it to :func:`adfast.sample` as ``delta`` (as the
logits' tangent ``dlogits``, which is ``D`` plus a per-row constant: see :func:`_proxy_logits`).
Both have a static KV cache of ``max_batch_size`` slots of ``max_seq_len`` positions, used in
lockstep: a sequence occupies the same slot in both, and every forward gives both the same
tokens, so both hold the same lengths.

Pieces, in the manner of gpt-fast's ``generate.py``:

* :func:`prefill` empties slots and writes prompts into them (eager, batched, one forward).
* :func:`decode_one_token` is one step for a fixed-size batch of rows: teacher forward, proxy
  forward (``T = 1``; the tangent-mode forward and ``D`` with ``delta="jvp"``),
  :func:`adfast.sample` and the in-place advance of the sampling offset,
  all on static device tensors with no host synchronisation. On CUDA it is captured as one CUDA
  graph per batch-size bucket, with the teacher and the stacked proxies on two streams joined
  before the sampler (the overlap measured in ``/work/shared/notes/h100-ceilings.md``).
* :class:`Engine` schedules: a sequence whose prompt has ``L`` tokens is prefilled with its
  first ``L - 1`` tokens; its last prompt token is the input of its first decode step, so every
  token, the first included, is drawn by :func:`decode_one_token`. When a sequence ends, its slot
  takes the next waiting prompt, which keeps the batch full over a long list of prompts.

Rows, buckets and randomness. A decode step runs the smallest bucket (1, 2, 4, ...,
``max_batch_size``) that holds the active sequences; they are packed into its first rows and the
remaining rows are idle (``num_tokens = 0`` on free slots: nothing is written, their draws are
discarded). The draw of row ``b`` is a pure function of ``(seed, offset, b)``: ``seed`` is the
generate call's, ``offset`` the number of decode steps of that call so far, and ``b`` the row's
position in the bucket. A sequence's tokens therefore depend on where and when the scheduler
puts it (on ``max_batch_size`` and on the other prompts), not only on its own prompt; for the
same inputs and seed the schedule is the same, so eager and graph runs draw the same tokens.
Greedy decoding (``tau = 0``) uses no randomness and depends on the prompt alone.

Costs. Each step reads the drawn tokens back to the host (one synchronisation) to stream them
and to retire finished sequences. A captured graph holds the step's mode, seed and whether
top-k / top-p filtering is on as constants (:class:`StepConfig`): a call that changes one of them
captures its buckets again. Temperature mode runs no proxy forward at all (prefill included).
"""
from __future__ import annotations

import math
import numbers
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .decoder import Decoder
from .ids import token_ids
from .sampling import BAD_INPUT_BITS, MODES, check_tau, sample

# Seeds of ranks > 0 in generate_distributed: rank r samples with seed + r * RANK_SEED_STRIDE (mod 2**63).
RANK_SEED_STRIDE = 0x9E3779B97F4A7C15


@dataclass
class GenerationResult:
    """One prompt's generation.

    ``tokens``: the generated ids, the stop token included; ``finish_reason``: ``"stop"`` (the last
    token is a stop token) or ``"length"`` (``max_new_tokens`` reached); ``mean_logprob``: the mean
    over the generated tokens of the teacher's unadjusted ``log_softmax(t)[token]``;
    ``num_tokens``: ``len(tokens)``; ``seconds``: wall time from the prompt's prefill to its last token.
    """

    tokens: list[int]
    finish_reason: str
    mean_logprob: float
    num_tokens: int
    seconds: float


@dataclass(frozen=True)
class StepConfig:
    """What a captured decode step holds as constants: a change needs another capture.

    ``filtered``: top-k / top-p are on (their values are read from the per-row buffers).
    ``delta``: ``"fd"`` (the proxies are the pair ``theta +- eps g``) or ``"jvp"`` (one proxy in
    tangent mode gives ``D`` exactly; ``eps`` is unused).
    """

    mode: str
    eps: float
    seed: int
    filtered: bool
    delta: str = "fd"


@dataclass
class StepInputs:
    """The static per-row device tensors of a decode step (row ``r`` of a bucket reads entry ``r``).

    ``tokens`` int64: each row's last token, overwritten in place by the drawn one; ``slots``
    int64: the rows' cache slots (distinct); ``num_tokens`` int64: 1 for active rows, 0 for idle
    ones; ``tau``, ``lam`` float32; ``top_k`` int64, ``top_p`` float32 (read only when the
    step's config is ``filtered``); ``bad`` int32: written by the step, each row's bad-input bits
    (:data:`adfast.sampling.BAD_INPUT_BITS`); ``offset``: int64 ``[1]``, advanced by one per step.
    """

    tokens: torch.Tensor
    slots: torch.Tensor
    num_tokens: torch.Tensor
    tau: torch.Tensor
    lam: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    bad: torch.Tensor
    offset: torch.Tensor

    @classmethod
    def zeros(cls, max_batch: int, device: torch.device) -> "StepInputs":
        ints = lambda: torch.zeros(max_batch, dtype=torch.int64, device=device)  # noqa: E731
        floats = lambda: torch.zeros(max_batch, dtype=torch.float32, device=device)  # noqa: E731
        return cls(ints(), ints(), ints(), floats(), floats(), ints(), floats(),
                   torch.zeros(max_batch, dtype=torch.int32, device=device),
                   torch.zeros(1, dtype=torch.int64, device=device))

    def head(self, rows: int) -> "StepInputs":
        """Views of the first ``rows`` entries (the same memory, as a captured graph needs)."""
        return StepInputs(*(t[:rows] for t in (self.tokens, self.slots, self.num_tokens, self.tau, self.lam,
                                                self.top_k, self.top_p, self.bad)), self.offset)


def batch_buckets(max_batch: int) -> list[int]:
    """The decode batch sizes: powers of two below ``max_batch``, then ``max_batch``."""
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return sizes + [max_batch]


@torch.no_grad()
def prefill(model: Decoder, prompts: Sequence[Sequence[int]], slots: Sequence[int], *, tangent: bool = False) -> None:
    """Empty ``slots`` of ``model``'s cache and write ``prompts[i]`` (0 or more tokens) into ``slots[i]``.

    One right-padded forward ``[len(prompts), max length]``; the logits are discarded. ``tangent``:
    run it in tangent mode (``forward(..., tangent=True)``), which also fills the tangent K/V caches
    that later tangent-mode steps read.
    """
    cache = model.cache
    cache.reset(list(slots))
    longest = max(len(p) for p in prompts)
    if longest == 0:
        return
    device = cache.lengths.device
    tokens = torch.zeros(len(prompts), longest, dtype=torch.int64)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = torch.as_tensor(prompt, dtype=torch.int64)
    model(tokens.to(device), torch.tensor(list(slots), device=device),
          torch.tensor([len(p) for p in prompts], device=device), check=True, tangent=tangent)


def _proxy_logits(proxies: Decoder, tokens, slots, num_tokens, exact: bool = False,
                  key_span: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(plus, minus)`` logits of the pair, or ``(dlogits, None)`` from a tangent-mode proxy (``exact``).

    ``dlogits`` is ``D`` plus the row constant ``sum_v p_v dlogits_v``
    (:func:`adfast.tangent.log_softmax_tangent` subtracts it), and a constant added to a row of
    ``D`` changes nothing the sampler computes: the adjusted softmax, its argmax, its top-k/top-p
    sets, a permuted and sign-flipped ``D`` (still a constant per row). So the step skips the
    softmax over the proxy's vocabulary that ``D`` would cost, as the finite-difference path leaves
    the proxies' normalisers to cancel.
    """
    if exact:
        _, dlogits = proxies(tokens[:, None], slots, num_tokens, check=False, tangent=True, float_logits=False,
                             key_span=key_span)
        return dlogits[0, :, 0], None
    logits = proxies(tokens[:, None], slots, num_tokens, check=False, float_logits=False, key_span=key_span)[:, :, 0]
    return logits[0], logits[1]


@torch.no_grad()
def decode_one_token(teacher: Decoder, proxies: Decoder | None, rows: StepInputs, config: StepConfig,
                     proxy_stream: torch.cuda.Stream | None = None,
                     key_span: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of ``B = rows.tokens.numel()`` rows; no host synchronisation (capturable).

    Appends ``rows.tokens`` to the slots of the rows with ``num_tokens == 1`` in the teacher's and
    (unless ``proxies`` is None, temperature mode) the proxies' caches, draws each row's next
    token with :func:`adfast.sample` (``seed = config.seed``, ``offset = rows.offset``), then
    writes the drawn tokens into ``rows.tokens`` and adds 1 to ``rows.offset``, in place.
    With ``config.delta == "jvp"``, ``proxies`` is one tangent-mode proxy (tangent caches
    filled by ``prefill(..., tangent=True)``): its tangent-mode forward gives ``D`` exactly (up to
    a per-row constant the sampler cancels, :func:`_proxy_logits`) and the sampler gets it as
    ``delta`` instead of the pair's logits.

    When the proxy vocabulary ``V_P`` is smaller than the teacher's, the teacher's ids ``>= V_P``
    are never drawn (``proxy_vocab_only``: the proxies could not read them at the next step; in
    the Qwen2.5 family they are padding rows of the head) and the returned log-probabilities are
    still those of the whole teacher.

    ``proxy_stream`` (CUDA): run the proxies on that stream, concurrently with the teacher on the
    current one, and join before sampling. Each step forks after all earlier work of the current
    stream and joins before anything reads the proxies' outputs, so no extra stream bookkeeping is
    needed.

    ``key_span``: the slots' largest length after the step, where the caller knows it (the
    engine's eager steps: the reference attention then gathers that many positions, not all
    ``max_seq_len``, :func:`adfast.attention.attend`); None (captured steps) reads them all there.

    Returns:
        drawn tokens int64 ``[B]`` and the teacher's unadjusted ``log_softmax(t)[token]`` float32 ``[B]``;
        idle rows hold unspecified values.
    """
    tokens, slots, num_tokens = rows.tokens, rows.slots, rows.num_tokens
    exact = config.delta == "jvp"
    plus = minus = None
    if proxies is not None and proxy_stream is not None:
        proxy_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(proxy_stream):
            plus, minus = _proxy_logits(proxies, tokens, slots, num_tokens, exact, key_span)
    teacher_logits = teacher(tokens[:, None], slots, num_tokens, check=False, float_logits=False,
                             key_span=key_span)[0, :, 0]
    if proxies is not None and proxy_stream is not None:
        torch.cuda.current_stream().wait_stream(proxy_stream)
    elif proxies is not None:
        plus, minus = _proxy_logits(proxies, tokens, slots, num_tokens, exact, key_span)
    proxy_inputs = dict(delta=plus) if exact else dict(plus_logits=plus, minus_logits=minus)

    filters = dict(top_k=rows.top_k, top_p=rows.top_p) if config.filtered else {}
    drawn, logprobs = sample(teacher_logits, **proxy_inputs, tau=rows.tau, lam=rows.lam, eps=config.eps,
                             mode=config.mode, seed=config.seed, offset=rows.offset, return_logprobs=True,
                             proxy_vocab_only=True, check=False, bad_out=rows.bad, **filters)
    tokens.copy_(drawn)
    rows.offset += 1
    return drawn, logprobs


@dataclass
class _Sequence:
    """Host-side state of one prompt being generated."""

    index: int
    slot: int
    last_token: int
    tau: float
    lam: float
    started: float
    tokens: list[int]
    logprob_sum: float = 0.0


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _midpoint(pair) -> torch.nn.Module:
    """A frozen copy of ``pair.plus`` with weights ``(plus + minus) / 2`` (in float32, cast back):
    the unperturbed proxy ``theta`` of a pair ``theta +- eps g``, up to rounding."""
    import copy

    proxy = copy.deepcopy(pair.plus).eval().requires_grad_(False)
    minus = dict(pair.minus.named_parameters())
    for name, w in proxy.named_parameters():
        w.copy_((w.float() + minus[name].to(w.device).float()) / 2)
    return proxy


def _per_prompt(value, count: int, name: str) -> list[float]:
    """A float, or one value per prompt (sequence or 1-D tensor), as ``count`` finite floats."""
    if isinstance(value, torch.Tensor):
        value = value.tolist() if value.dim() else float(value)
    if isinstance(value, (int, float)):
        values = [float(value)] * count
    else:
        values = [float(v) for v in value]
        if len(values) != count:
            raise ValueError(f"{name} has {len(values)} values for {count} prompts (give a float or one per prompt)")
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{name} must be finite; prompts {bad[:8]} have {values[bad[0]]}")
    return values


class Engine:
    """Generates from many prompts with continuous batching (module docstring).

    Args:
        teacher: a transformers Llama / Qwen2 causal LM, or a one-copy :class:`Decoder` (used as
            is: its cache is replaced).
        pair: a :class:`adfast.ProxyPair` (``plus``, ``minus`` transformers models and ``eps``),
            or None for temperature sampling only. Its vocabulary may not be larger than the teacher's.
            With ``delta="jvp"``: the unperturbed proxy, a transformers Llama / Qwen2 causal LM
            (or a ProxyPair, whose proxy is taken as the float32 midpoint ``(plus + minus) / 2``
            of its weights, equal to ``theta`` up to rounding), with ``gradient``.
        max_batch_size: sequences decoded at once (cache slots).
        max_seq_len: positions per slot; every prompt needs ``len(prompt) + max_new_tokens <= max_seq_len``.
        device, dtype: where and in which dtype the decoders' weights (copies of the models') live;
            default the teacher's. With ``device=None`` the teacher and the pair must be on the same
            device. To keep one copy of the weights on a GPU, load the models on the CPU and pass
            ``device="cuda"``.
        cuda_graph: on CUDA, capture each decode bucket as a CUDA graph (teacher and proxies on two
            streams) and replay it; otherwise, and on CPU, the step runs eagerly with the same results.
        delta: how ``D`` is computed. ``"fd"`` (default): the central finite difference of the pair
            ``theta +- eps g`` (two proxy copies per forward). ``"jvp"``: exactly, by one tangent-mode
            pass of one proxy copy along ``gradient`` (:meth:`Decoder.delta`); no ``eps``. The
            tangent pass is the decoder's plain-torch reference path (slower per copy than a primal
            forward).
        gradient: the direction ``g`` for ``delta="jvp"`` (a :class:`adfast.ProxyGradient`, a mapping
            ``named_parameters()`` name -> tensor, a :class:`adfast.low_rank.LowRankGradient`, or a
            gradient or low-rank gradient file); checked against the proxy as
            :meth:`ProxyPair.from_gradient` checks it (:func:`adfast.exact_delta.resolve_direction`).
            A low-rank gradient stays factored in the tangent (:meth:`Decoder.set_tangent`): each
            step reads ``r (m + n)`` numbers per factored ``m x n`` weight instead of ``m n``.
            Not used with ``delta="fd"``.

    One generation at a time: :meth:`generate` and :meth:`stream` use the engine's caches.
    """

    def __init__(self, teacher, pair=None, *, max_batch_size: int, max_seq_len: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 cuda_graph: bool = True, delta: str = "fd", gradient=None):
        if max_batch_size < 1 or max_seq_len < 1:
            raise ValueError(f"max_batch_size and max_seq_len must be >= 1, got {max_batch_size}, {max_seq_len}")
        if delta not in ("fd", "jvp"):
            raise ValueError(f"delta must be 'fd' (finite difference of a ProxyPair) or 'jvp' (exact, tangent "
                             f"mode), got {delta!r}")
        proxy = None
        if delta == "fd":
            if gradient is not None:
                raise ValueError("gradient= is only used with delta='jvp'; with delta='fd' the ProxyPair already "
                                 "holds the perturbed copies")
            if pair is not None:
                missing = [name for name in ("plus", "minus", "eps") if not hasattr(pair, name)]
                if missing:
                    raise ValueError(f"pair must have plus, minus and eps attributes (a ProxyPair); missing {missing}")
        else:
            if pair is None:
                raise ValueError("delta='jvp' needs the proxy model (and gradient=); for temperature sampling "
                                 "alone pass no proxy and delta='fd'")
            is_pair = all(hasattr(pair, name) for name in ("plus", "minus", "eps"))
            if gradient is None:
                raise ValueError("delta='jvp' needs the direction g: pass gradient= (a ProxyGradient, a "
                                 "LowRankGradient, a mapping name -> tensor or a gradient file)" + (
                                     "; a ProxyPair holds only the perturbed copies theta +- eps g, not g, so "
                                     "pass the unperturbed proxy model and its gradient" if is_pair else ""))
            proxy = _midpoint(pair) if is_pair else pair
            if not hasattr(proxy, "config") or not hasattr(proxy, "named_parameters"):
                raise ValueError("with delta='jvp' the proxy must be a transformers causal LM (or a ProxyPair), "
                                 f"got {type(proxy).__name__}")
            from .exact_delta import resolve_direction

            gradient = resolve_direction(proxy, gradient)
        if isinstance(teacher, Decoder) and teacher.num_copies != 1:
            raise ValueError(f"the teacher Decoder must have one copy, got {teacher.num_copies}")
        teacher_vocab = teacher.config.vocab_size
        if pair is not None:
            proxy_vocab = (proxy.config.vocab_size if proxy is not None
                           else max(pair.plus.config.vocab_size, pair.minus.config.vocab_size))
            if proxy_vocab > teacher_vocab:
                raise ValueError(f"vocab mismatch: the proxy vocabulary ({proxy_vocab}) is larger than the "
                                 f"teacher's ({teacher_vocab}); the proxy may be at most as wide as the teacher")
        if device is None:
            if proxy is not None:
                models = {"teacher": teacher, "proxy": proxy}
            else:
                models = {"teacher": teacher} | ({"plus": pair.plus, "minus": pair.minus} if pair is not None else {})
            devices = {name: _device_of(model) for name, model in models.items()}
            if len(set(devices.values())) > 1:
                raise ValueError(f"models on different devices: {devices}; move them to one device or pass device=")
            device = devices["teacher"]
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())

        if isinstance(teacher, Decoder):
            if _device_of(teacher) != device or (dtype is not None and teacher.embed.dtype != dtype):
                raise ValueError(f"the teacher Decoder is on {_device_of(teacher)} in {teacher.embed.dtype}; "
                                 f"build it on {device}" + (f" in {dtype}" if dtype else ""))
            self.teacher = teacher
        else:
            self.teacher = Decoder.from_hf([teacher], dtype=dtype, device=device)
        self.delta = delta
        if proxy is not None:
            self.proxies = Decoder.from_hf([proxy], dtype=dtype, device=device)
            self.proxies.set_tangent(gradient)  # setup_cache below then allocates the tangent K/V caches
            self.eps = None
        else:
            self.proxies = (Decoder.from_hf([pair.plus, pair.minus], dtype=dtype, device=device)
                            if pair is not None else None)
            self.eps = float(pair.eps) if pair is not None else None
        self.max_batch_size, self.max_seq_len, self.device = max_batch_size, max_seq_len, device
        for model in (self.teacher, self.proxies):
            if model is not None:
                model.setup_cache(max_batch_size, max_seq_len)
        self.buckets = batch_buckets(max_batch_size)
        self.inputs = StepInputs.zeros(max_batch_size, device)
        self.use_graphs = cuda_graph and device.type == "cuda"
        self._proxy_stream = torch.cuda.Stream(device) if self.use_graphs and self.proxies is not None else None
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._graph_config: StepConfig | None = None
        self._graph_pool = None

    # ------------------------------------------------------------------------------------ public

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, tau=1.0, lam=0.0,
                 eps: float | None = None, mode: str = "antidistill", top_k: int = 0, top_p: float = 1.0,
                 seed: int = 0, stop_token_ids=()) -> list[GenerationResult]:
        """Generate from every prompt; returns one :class:`GenerationResult` per prompt, in prompt order.

        Args:
            prompts: token-id sequences (lists of ints or 1-D integer tensors), of any lengths >= 1.
            max_new_tokens: the most tokens generated per prompt (>= 1).
            tau, lam: a float, or one value per prompt (a sequence or a ``[len(prompts)]`` tensor):
                the temperature (0 is greedy, else at least :data:`adfast.sampling.TAU_MIN`) and the
                antidistillation strength, as in :func:`adfast.sample`.
            eps: must be None or the pair's ``eps`` (None with ``delta="jvp"``).
            mode: ``"antidistill"``, ``"temperature"`` (no proxy forwards; no pair needed) or ``"permutation"``.
            top_k, top_p: applied to the adjusted distribution (0 and 1.0 disable them).
            seed: the seed of this call's draws (module docstring).
            stop_token_ids: a token id, or ids: a generated token among them ends its sequence (finish
                reason ``"stop"``).

        Raises ``ValueError`` before any work for a bad argument, an empty prompt, a prompt that is not
        token ids (floats are refused, not rounded), a token id outside
        the vocabulary (the proxies' too, except in temperature mode) or a prompt with
        ``len(prompt) + max_new_tokens > max_seq_len``.
        """
        results: list[GenerationResult | None] = [None] * len(prompts)
        for index, _, _, result in self._start(prompts, max_new_tokens, tau, lam, eps, mode, top_k, top_p, seed,
                                               stop_token_ids):
            if result is not None:
                results[index] = result
        return results

    def stream(self, prompts: Sequence[Sequence[int]], **kwargs) -> Iterator[tuple[int, int, float]]:
        """:meth:`generate`'s tokens as they are drawn: ``(prompt_index, token, logprob)`` events.

        Takes :meth:`generate`'s arguments and validates them at once; ``logprob`` is the teacher's
        unadjusted log-probability of the token. Within a step, events come in row order.
        """
        events = self._start(prompts, **kwargs)
        return ((index, token, logprob) for index, token, logprob, _ in events)

    # ---------------------------------------------------------------------------------- schedule

    def _start(self, prompts, max_new_tokens, tau=1.0, lam=0.0, eps=None, mode="antidistill", top_k=0,
               top_p=1.0, seed=0, stop_token_ids=()):
        """Validate a call's arguments; return the generator of its events."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode != "temperature" and self.proxies is None:
            raise ValueError(f"mode={mode!r} needs a proxy pair; this engine has none (use mode='temperature')")
        if eps is not None and self.delta == "jvp":
            raise ValueError(f"eps={eps} is not used with delta='jvp' (D is exact, there is no finite-difference "
                             "step): leave eps=None")
        if eps is not None and (self.eps is None or float(eps) != self.eps):
            raise ValueError(f"eps={eps} differs from the pair's eps={self.eps}: the proxies were perturbed by "
                             "the pair's eps, and D divides by the same step")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {top_k!r}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
        prompts = [token_ids(p, f"prompt {i}") for i, p in enumerate(prompts)]
        taus = _per_prompt(tau, len(prompts), "tau")
        for value in taus:
            check_tau(value)
        lams = _per_prompt(lam, len(prompts), "lam")
        vocab = self.teacher.config.vocab_size
        if mode != "temperature":
            vocab = min(vocab, self.proxies.config.vocab_size)
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {i} is empty: a prompt needs at least one token")
            if len(prompt) + max_new_tokens > self.max_seq_len:
                raise ValueError(f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} it "
                                 f"needs {len(prompt) + max_new_tokens} positions > max_seq_len={self.max_seq_len}")
            if not all(0 <= t < vocab for t in prompt):
                raise ValueError(f"prompt {i} has a token id outside [0, {vocab}) (the vocabulary"
                                 f"{' the teacher and the proxies share' if mode != 'temperature' else ''})")
        one_id = isinstance(stop_token_ids, numbers.Integral) and not isinstance(stop_token_ids, bool)
        stop = frozenset(token_ids([stop_token_ids] if one_id else stop_token_ids, "stop_token_ids"))
        config = StepConfig(mode, self.eps if self.eps is not None else 1.0, seed, top_k != 0 or top_p != 1.0,
                            self.delta)
        self.inputs.top_k.fill_(top_k)
        self.inputs.top_p.fill_(top_p)
        return self._events(prompts, max_new_tokens, taus, lams, stop, config)

    def _events(self, prompts, max_new_tokens, taus, lams, stop, config):
        """The decode loop: yields ``(prompt_index, token, logprob, result or None)`` per drawn token."""
        proxies = self.proxies if config.mode != "temperature" else None
        waiting = deque(range(len(prompts)))
        free = list(range(self.max_batch_size - 1, -1, -1))  # pop() hands out slot 0 first
        active: list[_Sequence] = []
        self.inputs.offset.zero_()
        rows_changed = True
        while waiting or active:
            admitted = []
            while waiting and free:
                i = waiting.popleft()
                admitted.append(_Sequence(i, free.pop(), prompts[i][-1], taus[i], lams[i], time.perf_counter(), []))
            if admitted:
                slots = [seq.slot for seq in admitted]
                heads = [prompts[seq.index][:-1] for seq in admitted]
                prefill(self.teacher, heads, slots)
                if proxies is not None:
                    prefill(proxies, heads, slots, tangent=config.delta == "jvp")
                active.extend(admitted)
            bucket = next(size for size in self.buckets if size >= len(active))
            if rows_changed or admitted:
                self._load_rows(active, bucket, free)
            # an eager step's attention span: the slots' largest length after it (L prompt tokens, g drawn: L + g)
            span = None if self.use_graphs else max(len(prompts[seq.index]) + len(seq.tokens) for seq in active)
            drawn, logprobs = self._decode(bucket, config, proxies, span)
            n = len(active)  # one read of the step's tokens, log-probs and bad-input bits (exact in float64)
            drawn, logprobs, bad = torch.stack((drawn[:n].double(), logprobs[:n].double(),
                                                self.inputs.bad[:n].double())).tolist()
            for seq, bits in zip(active, bad):
                if bits:
                    problems = "; ".join(what for bit, what in BAD_INPUT_BITS.items() if int(bits) & bit)
                    raise ValueError(f"prompt {seq.index}, generated token {len(seq.tokens)}: {problems}")
            still = []
            for seq, token, logprob in zip(active, map(int, drawn), logprobs):
                seq.tokens.append(token)
                seq.last_token = token
                seq.logprob_sum += logprob
                finish = "stop" if token in stop else "length" if len(seq.tokens) == max_new_tokens else None
                result = None
                if finish is None:
                    still.append(seq)
                else:
                    free.append(seq.slot)
                    result = GenerationResult(seq.tokens, finish, seq.logprob_sum / len(seq.tokens),
                                              len(seq.tokens), time.perf_counter() - seq.started)
                yield seq.index, token, logprob, result
            rows_changed = len(still) != len(active)
            active = still

    def _load_rows(self, active: list[_Sequence], bucket: int, free: list[int]) -> None:
        """Write the rows of a bucket: the active sequences first, then idle rows on free slots."""
        idle = bucket - len(active)
        values = {
            "tokens": ([seq.last_token for seq in active] + [0] * idle, torch.int64),
            "slots": ([seq.slot for seq in active] + free[:idle], torch.int64),
            "num_tokens": ([1] * len(active) + [0] * idle, torch.int64),
            "tau": ([seq.tau for seq in active] + [0.0] * idle, torch.float32),
            "lam": ([seq.lam for seq in active] + [0.0] * idle, torch.float32),
        }
        for name, (row_values, dtype) in values.items():
            getattr(self.inputs, name)[:bucket].copy_(torch.tensor(row_values, dtype=dtype))

    # ------------------------------------------------------------------------------------ decode

    def _decode(self, bucket: int, config: StepConfig, proxies: Decoder | None, key_span: int | None):
        """Run one step of ``bucket`` rows: replay its graph (captured on first use) or run it eagerly
        (attending the ``key_span`` positions the active slots reach, :func:`decode_one_token`)."""
        if not self.use_graphs:
            return decode_one_token(self.teacher, proxies, self.inputs.head(bucket), config, key_span=key_span)
        if config != self._graph_config:
            self._graphs.clear()
            self._graph_config, self._graph_pool = config, None
        if bucket not in self._graphs:
            self._graphs[bucket] = self._capture(bucket, config, proxies)
        graph, drawn, logprobs = self._graphs[bucket]
        graph.replay()
        return drawn, logprobs

    def _capture(self, bucket: int, config: StepConfig, proxies: Decoder | None, warmup: int = 2):
        """Capture one decode step of ``bucket`` rows as a CUDA graph; returns it and its output tensors.

        Warm-up (Triton compilation, cuBLAS setup) and capture run with every row idle
        (``num_tokens = 0``: the caches' live positions are not touched), and the step's inputs and
        offset are restored afterwards, so capturing in the middle of a generation changes nothing.
        """
        saved = [t.clone() for t in (self.inputs.tokens, self.inputs.num_tokens, self.inputs.offset)]
        self.inputs.num_tokens.zero_()
        rows = self.inputs.head(bucket)

        def step():
            return decode_one_token(self.teacher, proxies, rows, config, self._proxy_stream)

        with torch.cuda.device(self.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                drawn, logprobs = step()
        self._graph_pool = graph.pool()
        for target, value in zip((self.inputs.tokens, self.inputs.num_tokens, self.inputs.offset), saved):
            target.copy_(value)
        return graph, drawn, logprobs


def generate_distributed(engine_factory, prompts: Sequence[Sequence[int]], *, backend: str | None = None,
                         **generate_kwargs) -> list[GenerationResult]:
    """:meth:`Engine.generate` over the ranks of a torch.distributed job; every rank gets all results.

    Under ``torchrun`` (``RANK`` and ``WORLD_SIZE`` set) the process group is initialised here if it
    is not yet (``backend``: default ``"nccl"`` where CUDA is available, after
    ``torch.cuda.set_device(LOCAL_RANK)``, else ``"gloo"``) and destroyed again before returning
(a group left behind makes gloo abort the process at exit); a group the caller initialised is
left as it is. Without a
    process group or those variables this is ``engine_factory().generate(prompts, ...)``.

    Rank ``r`` of ``W`` takes prompts ``r, r + W, r + 2W, ...`` (per-prompt ``tau`` / ``lam`` are
    split alike), builds its engine with ``engine_factory()`` (no arguments; on CUDA it should build
    on the rank's device) and generates with seed ``(seed + r * RANK_SEED_STRIDE) mod 2**63``, so
    that ranks do not draw the same noise; the results are exchanged with ``all_gather_object``
    (plain lists of ints and floats) and returned in prompt order. Greedy results equal a
    single-process run's; sampled ones depend on the schedule (module docstring).
    """
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return engine_factory().generate(prompts, **generate_kwargs)
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    try:
        return _generate_on_ranks(engine_factory, prompts, dist.get_rank(), dist.get_world_size(), generate_kwargs)
    finally:
        if created:
            dist.destroy_process_group()


def _generate_on_ranks(engine_factory, prompts, rank: int, world: int, generate_kwargs) -> list[GenerationResult]:
    """Rank ``rank``'s share of :func:`generate_distributed`, gathered from all ranks in prompt order."""
    import torch.distributed as dist

    mine = list(range(rank, len(prompts), world))
    kwargs = dict(generate_kwargs)
    for name in ("tau", "lam"):
        value = kwargs.get(name)
        if value is not None and not isinstance(value, (int, float)) and not (
                isinstance(value, torch.Tensor) and value.dim() == 0):
            values = _per_prompt(value, len(prompts), name)
            kwargs[name] = [values[i] for i in mine]
    kwargs["seed"] = (kwargs.get("seed", 0) + rank * RANK_SEED_STRIDE) % 2**63
    results = engine_factory().generate([prompts[i] for i in mine], **kwargs)
    gathered: list[list[GenerationResult] | None] = [None] * world
    dist.all_gather_object(gathered, results)
    ordered: list[GenerationResult | None] = [None] * len(prompts)
    for r, rank_results in enumerate(gathered):
        for j, result in enumerate(rank_results):
            ordered[r + j * world] = result
    return ordered


__all__ = ["Engine", "GenerationResult", "StepConfig", "StepInputs", "batch_buckets", "decode_one_token",
           "generate_distributed", "prefill"]
