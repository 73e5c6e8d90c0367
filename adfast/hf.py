"""Antidistillation sampling inside Hugging Face ``generate``: a ``LogitsProcessor`` drop-in.

At each decode step of the teacher, :class:`AntidistillationLogitsProcessor` gets the teacher's
next-token scores ``t [B, V_T]`` and the tokens so far ``input_ids [B, L]``, steps both
perturbed proxies of a pair (``pair.plus``, ``pair.minus``: ``theta_P +- eps g``, any object
with those two causal LMs and ``eps``) by one token on their own KV caches, and returns

    a = log_softmax(t) / tau + lam * D,   D = (log_softmax(p) - log_softmax(m)) / (2 eps)

(:func:`adfast.adjusted_logits`, then the processor's own top-k / top-p), so that Hugging Face's
sampling, a multinomial draw from ``softmax(a)``, draws from the antidistillation distribution;
``tau == 0`` returns the greedy objective ``log_softmax(t) + lam * D`` for ``argmax``.

Hugging Face must not warp the returned scores again. Either call :func:`generate`, which sets
and checks the neutral settings, or pass them to ``teacher.generate`` yourself::

    teacher.generate(input_ids, attention_mask=mask, logits_processor=[proc],
                     do_sample=tau > 0, temperature=1.0, top_k=0, top_p=1.0)

``top_k=0`` must be explicit: left unset, ``generate`` takes ``top_k`` from the teacher's
generation config or its global default (50), and Qwen-style configs ship ``temperature=0.7``,
``top_k=20``. A processor cannot see the generation config;
:meth:`AntidistillationLogitsProcessor.check_generation_config` refuses one that warps.

Padding: the processor infers the prompt's attention mask from ``pad_token_id``: in each row the
positions before its first non-pad token are padding (left padding, as decoder-only ``generate``
expects); every later token, generated pads of finished rows included, is attended, as
``generate`` does. Without ``pad_token_id`` no position is padding. Give it the id the prompts
are padded with; :func:`generate` checks it against the ``attention_mask`` it receives.
"""
from __future__ import annotations

import copy
import inspect
import math

import torch
from transformers import DynamicCache, GenerationConfig, LogitsProcessor, LogitsProcessorList

from .sampling import MODES, adjusted_logits, check_tau, top_k_top_p_mask

# Warper settings that leave the processor's distribution as it is. They are not None: a None
# in a generation config passed to ``generate`` is filled from the teacher's own config.
NEUTRAL_WARPERS = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "typical_p": 1.0,
                   "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}


class AntidistillationLogitsProcessor(LogitsProcessor):
    """Turns the teacher's scores into the antidistillation distribution (module docstring).

    Args:
        pair: ``plus`` and ``minus`` (Hugging Face causal LMs at ``theta_P +- eps g``, vocabulary
            ``V_P <= V_T``, same device for both) and ``eps``, e.g. an :class:`adfast.proxy_pair.ProxyPair`.
        lam: the antidistillation strength (ignored in temperature mode).
        eps: must equal ``pair.eps`` if given (the pair was perturbed by it).
        tau: the temperature, 0 (greedy) or at least :data:`adfast.sampling.TAU_MIN`.
        mode: ``"antidistill"``, ``"temperature"`` (no proxy forwards) or ``"permutation"``.
        top_k, top_p: applied to the adjusted distribution (0 and 1.0 disable them).
        pad_token_id: the id the prompts are left-padded with (module docstring).
        seed: permutation mode's noise seed; step ``s`` of a generation (``s = 0`` at the
            prefill) uses ``offset = s``. If None, each generation draws a seed from torch's
            global generator.
        proxy_vocab_only: where the teacher's vocabulary is longer than the proxies' (``V_T >
            V_P``, e.g. Qwen2.5-7B's padded head over 3B's), return ``-inf`` for the ids ``>= V_P``
            (except in temperature mode), so that they are never drawn: the proxies could not read
            them at the next step. The distribution is the one above restricted to ``[0, V_P)`` and
            renormalised, as :func:`adfast.sample`'s ``proxy_vocab_only`` and the engine draw.
            False returns the whole vocabulary's scores; a drawn id ``>= V_P`` then raises at the
            next step (suppress those ids in ``generate`` instead).

    State: the two proxies' ``DynamicCache``, the proxies' ``[B, L]`` attention mask and the
    previous call's ``input_ids``. A call continues the current generation iff its batch size is
    the same, it is one token longer and its first ``L - 1`` tokens are the previous call's
    (one host sync per step); then only the newest token is fed. Anything else, e.g. a new
    ``generate`` call, drops the caches and prefills the proxies with the whole prompt. A later
    ``generate`` on exactly that sequence plus one token continues, which is the same
    computation. :meth:`reset` drops the state by hand.
    """

    def __init__(self, pair, *, lam: float, eps: float | None = None, tau: float = 1.0,
                 mode: str = "antidistill", top_k: int = 0, top_p: float = 1.0,
                 pad_token_id: int | None = None, seed: int | None = None, proxy_vocab_only: bool = True):
        missing = [name for name in ("plus", "minus", "eps") if not hasattr(pair, name)]
        if missing:
            raise ValueError(f"pair must have plus, minus and eps attributes; missing {missing}")
        if eps is not None and float(eps) != float(pair.eps):
            raise ValueError(f"eps={eps} differs from the pair's eps={pair.eps}: the proxies were perturbed "
                             "by the pair's eps, and D divides by the same step")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        check_tau(float(tau))
        if not math.isfinite(lam):
            raise ValueError(f"lam must be finite, got {lam}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {top_k!r}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if pad_token_id is not None and pad_token_id < 0:
            raise ValueError(f"pad_token_id must be >= 0 or None, got {pad_token_id}")
        if seed is not None and not 0 <= seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
        self.pair = pair
        self.lam, self.eps, self.tau = float(lam), float(pair.eps), float(tau)
        self.mode, self.top_k, self.top_p = mode, top_k, float(top_p)
        self.pad_token_id, self.seed, self.proxy_vocab_only = pad_token_id, seed, bool(proxy_vocab_only)
        self.reset()

    def reset(self) -> None:
        """Forget the current generation: the next call prefills the proxies from its ``input_ids``."""
        self._caches = None      # (plus, minus) DynamicCache
        self._mask = None        # [B, L] long: the proxies' attention mask
        self._position = None    # [B, 1] long: position id of the last token fed
        self._seen = None        # [B, L]: input_ids of the previous call
        self._step = 0           # calls since the prefill: permutation mode's offset
        self._seed = self.seed

    def prompt_attention_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The ``[B, L]`` long mask inferred for a prompt: 0 before each row's first non-pad token."""
        if self.pad_token_id is None:
            return torch.ones_like(input_ids)
        return ((input_ids != self.pad_token_id).cumsum(1) > 0).long()

    def check_generation_config(self, generation_config: GenerationConfig) -> None:
        """Raise ``ValueError`` if ``generate`` with this config would change the processor's distribution.

        That is: a warper (temperature != 1, top_k, top_p < 1, min_p > 0, typical_p, epsilon or
        eta cutoff, top_h) applied a second time on the returned scores, beam search, or a
        decoding mode that does not match ``tau`` (``do_sample`` must be ``tau > 0``). The config
        is checked as ``generate`` applies it: a None counts as unset, so pass a config whose
        unset fields the teacher's config does not fill (as :func:`generate` does).
        """
        cfg = generation_config
        problems = []
        if cfg.do_sample:  # greedy decoding applies no warper
            for name, neutral in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0), ("min_p", 0.0),
                                  ("typical_p", 1.0), ("epsilon_cutoff", 0.0), ("eta_cutoff", 0.0)):
                value = getattr(cfg, name, None)
                if value is not None and value != neutral:
                    problems.append(f"{name}={value} (must be {neutral} or None)")
            if getattr(cfg, "top_h", None) is not None:
                problems.append(f"top_h={cfg.top_h} (must be None)")
        if cfg.num_beams not in (None, 1):
            problems.append(f"num_beams={cfg.num_beams} (antidistillation samples or decodes greedily; must be 1)")
        if self.tau > 0 and not cfg.do_sample:
            problems.append(f"do_sample={cfg.do_sample} with tau={self.tau} > 0 (argmax would ignore the sampling)")
        if self.tau == 0 and cfg.do_sample:
            problems.append("do_sample=True with tau=0 (greedy: the returned scores are the greedy objective)")
        if problems:
            raise ValueError("generation config would alter antidistillation sampling, which applies tau, top_k "
                             "and top_p itself: " + "; ".join(problems))

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        """``input_ids [B, L]``, teacher ``scores [B, V_T]`` -> float32 ``[B, V_T]`` adjusted scores."""
        plus = minus = None
        if self.mode != "temperature":
            plus, minus = self._proxy_logits(input_ids)
            plus, minus = plus.to(scores.device), minus.to(scores.device)
        out = adjusted_logits(scores, plus, minus, tau=self.tau, lam=self.lam, eps=self.eps, mode=self.mode,
                              seed=self._seed, offset=self._step)
        self._step += 1
        if plus is not None and self.proxy_vocab_only:
            out[:, plus.shape[1]:] = -math.inf
        if self.top_k != 0 or self.top_p != 1.0:
            batch = out.shape[0]
            out = top_k_top_p_mask(out, torch.full((batch,), self.top_k, device=out.device),
                                   torch.full((batch,), self.top_p, device=out.device))
        return out

    def _continues(self, input_ids: torch.Tensor) -> bool:
        seen = self._seen
        return (seen is not None and input_ids.shape == (seen.shape[0], seen.shape[1] + 1)
                and torch.equal(input_ids[:, :-1], seen))

    def _proxy_logits(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Step both proxies to ``input_ids``; their last-position logits ``[B, V_P]`` each."""
        embeddings = self.pair.plus.get_input_embeddings()
        input_ids = input_ids.to(embeddings.weight.device)
        if self._continues(input_ids):
            new = input_ids[:, -1:]
            self._mask = torch.cat([self._mask, self._mask.new_ones(self._mask.shape[0], 1)], dim=1)
            self._position = self._position + 1
            position_ids = self._position
        else:
            self.reset()
            new = input_ids
            self._mask = self.prompt_attention_mask(input_ids)
            position_ids = (self._mask.cumsum(1) - 1).masked_fill(self._mask == 0, 0)
            self._position = position_ids[:, -1:]
            self._caches = (DynamicCache(config=self.pair.plus.config), DynamicCache(config=self.pair.minus.config))
            if self.mode == "permutation" and self._seed is None:
                self._seed = int(torch.randint(0, 2**62, ()))
        if bool((new >= embeddings.num_embeddings).any()):
            raise ValueError(f"token id {int(new.max())} is outside the proxy's vocabulary "
                             f"({embeddings.num_embeddings} tokens): keep proxy_vocab_only=True (the default), or "
                             "suppress the teacher's tokens beyond it (generate(suppress_tokens=...)), or use a "
                             "proxy with the teacher's tokenizer")
        self._seen = input_ids
        return tuple(
            model(input_ids=new, attention_mask=self._mask, position_ids=position_ids,
                  **{_cache_argument(model): cache}, use_cache=True, logits_to_keep=1).logits[:, -1]
            for model, cache in zip((self.pair.plus, self.pair.minus), self._caches))


def _cache_argument(model) -> str:
    """The name under which ``model.forward`` takes its KV cache: ``cache`` from transformers 5.25
    on, ``past_key_values`` before (deprecated since, removed in 5.40)."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def generate(teacher, processor: AntidistillationLogitsProcessor, **generate_kwargs):
    """``teacher.generate`` with ``processor`` and warper settings that leave its distribution alone.

    The generation config is a deep copy of ``generate_kwargs["generation_config"]`` (default
    ``teacher.generation_config``), updated first with the neutral settings (temperature 1,
    ``top_k=0``, ``top_p=1``, no typical / epsilon / eta / min-p filtering, ``do_sample = tau > 0``)
    and then with ``generate_kwargs``, so explicit settings win and are checked
    (:meth:`AntidistillationLogitsProcessor.check_generation_config`, ``ValueError``). The
    processor is reset and runs after any ``logits_processor`` given (which see the teacher's raw
    logits). The ``attention_mask`` must match the processor's inferred prompt mask; if none is
    given, the inferred one is passed. Returns what ``teacher.generate`` returns.
    """
    kwargs = dict(generate_kwargs)
    processors = LogitsProcessorList([*(kwargs.pop("logits_processor", None) or []), processor])
    config = copy.deepcopy(kwargs.pop("generation_config", None) or teacher.generation_config)
    neutral = {"do_sample": False}  # greedy decoding applies no warper
    if processor.tau > 0:
        neutral = {**NEUTRAL_WARPERS, "do_sample": True}
        if teacher.generation_config.min_p is not None:
            neutral["min_p"] = 0.0  # a None would be refilled with the teacher's min_p; 0 keeps every token
    model_kwargs = config.update(**{**neutral, **kwargs})
    for name, value in neutral.items():  # an explicit None would be refilled from the teacher's config
        if getattr(config, name) is None:
            setattr(config, name, value)
    applied = copy.deepcopy(config)
    applied.update(**teacher.generation_config.to_dict(), defaults_only=True)
    processor.check_generation_config(applied)

    prompt = model_kwargs.get("input_ids", model_kwargs.get("inputs"))
    if prompt is not None:
        inferred = processor.prompt_attention_mask(prompt)
        mask = model_kwargs.get("attention_mask")
        if mask is None:
            model_kwargs["attention_mask"] = inferred
        elif not torch.equal(mask.to(inferred), inferred):
            raise ValueError("attention_mask differs from the prompt mask the processor infers from "
                             f"pad_token_id={processor.pad_token_id} (0 before each row's first non-pad token): "
                             "build the processor with the pad id the prompts are left-padded with")
    processor.reset()
    return teacher.generate(**model_kwargs, generation_config=config, logits_processor=processors)
