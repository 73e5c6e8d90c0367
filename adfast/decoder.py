"""A Llama / Qwen2 decoder with ``C`` stacked weight sets and a static, slotted KV cache.

The model half of a lockstep decode engine: the teacher is a :class:`Decoder` with one copy
(``C = 1``); the proxy pair ``theta_P + eps g`` and ``theta_P - eps g`` is one :class:`Decoder`
with two copies (``C = 2``) that share their input tokens, so every layer of the pair runs as one
batched matmul over the copy dimension (``torch.bmm`` on ``[C, out, in]`` weights), which is the
fastest arrangement measured on an H100 (``/work/shared/notes/h100-ceilings.md``); a one-copy
decoder (the teacher, the jvp proxy) runs the plain 2-D GEMM, the path those measurements timed
for the teacher (:mod:`adfast.matmul`).

Every weight has a leading copy dimension ``C``. With ``H`` query heads, ``KV`` key/value heads,
head size ``D``, hidden size ``E``, MLP size ``I`` and vocabulary ``V``::

    embed          [C, V, E]            lm_head   [C, V, E]  (the same Parameter when tied)
    attention_norm [C, E]               ffn_norm  [C, E]     norm [C, E]
    wqkv           [C, (H + 2 KV) D, E] rows: q_proj, k_proj, v_proj (bqkv [C, (H + 2 KV) D])
    wo             [C, E, H D]          (bo [C, E] when the config has it)
    w_gate_up      [C, 2 I, E]          rows: gate_proj, up_proj (b_gate_up [C, 2 I])
    w_down         [C, E, I]            (b_down [C, E])

One layer, per copy ``c`` and token (``rms(x) = x / sqrt(mean(x^2) + eps)``)::

    h   = x + wo @ attn(rope(q), rope(k), v),   (q, k, v) = wqkv @ (attention_norm * rms(x)) + bqkv
    out = h + w_down @ (silu(gate) * up),        (gate, up) = w_gate_up @ (ffn_norm * rms(h))

and ``logits = lm_head @ (norm * rms(x_L))``, as transformers' ``LlamaForCausalLM`` and
``Qwen2ForCausalLM`` compute them.

Precision follows transformers for float32, bfloat16 and float16 weights (RMSNorm statistics and
the rotary table in float32, softmax in float32 or better), and stays float64 throughout for
float64 weights (transformers' own float64 models do not: their RMSNorm and rotary tables are
float32), so a float64 :class:`Decoder` is a true float64 reference.

Cache and positions (:meth:`Decoder.forward`): each sequence lives in a *slot* of the cache; the
cache knows how many tokens each slot holds (``lengths``), new tokens are appended at the end of
their slot and ``forward`` advances ``lengths`` itself, with device tensors only, so a captured
CUDA graph replays the whole step. ``KVCache.reset(slots)`` empties slots for new prompts.

Tangent (JVP) mode: :meth:`Decoder.set_tangent` stores a weight direction ``g`` (a proxy gradient)
in the fused layout, and ``forward(..., tangent=True)`` returns the logits and their exact
derivative ``d/dh logits(theta + h g)`` from one pass that carries primal and tangent together
(tangent K/V cached per slot); :func:`adfast.tangent.log_softmax_tangent` / :meth:`Decoder.delta`
turn that into ``D = d/dh log_softmax``, the antidistillation term, with no ``eps``. A linear layer
``y = x W^T + b`` carries ``dy = dx W^T + x G^T + db`` (:func:`adfast.tangent.linear_jvp`), the
embedding ``dx = G_embed[tokens]``. The direction is dense (``G`` shaped as its weight, ``m n``
numbers per ``[m, n]`` weight) or, from a :class:`adfast.low_rank.LowRankGradient`, factored
(:class:`adfast.tangent.FactoredTangent`): with ``G_i = U_i V_i^T`` (``U_i [m_i, r]``,
``V_i [n, r]``) for each source block of a fused weight (q/k/v of ``wqkv``, gate/up of
``w_gate_up``), ``x G^T`` is ``z = x [V_1 | V_2 | ...]`` (one matmul, ``[N, sum r_i]``) then
``z_i U_i^T`` per block, concatenated, and the embedding's rows are ``U[tokens] V^T``:
``r (m_i + n)`` numbers per factored block instead of ``m_i n``. Blocks too small to factor
(``min(m_i, n) <= r``) stay dense inside the factored weight (``V_i = G_i^T``, no ``U_i``); a weight
with no factored block stays dense. On CUDA the norms, rotary and gated activation with their
tangents are fused Triton kernels (:mod:`adfast.layer_ops`) and decode attention runs the split-K
tangent kernel over live positions (:func:`adfast.attention.attend_jvp`); a decode step is captured
in a CUDA graph like the finite-difference one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .attention import attend, attend_jvp
from .kernels.decode_linear import NormedInput, ResidualSum, RotaryCacheWrite, counters_for, decode_linear
from .layer_ops import TORCH, LowRankTerm, compute_dtype, layer_ops
from .matmul import linear
from .tangent import (BLOCK_DIAGONAL_PADDING_BYTES, FactoredTangent, linear_jvp, log_softmax_tangent, source_shape,
                      tangent_sources)
from .weight_prefetch import side_stream, weight_prefetcher

MODEL_TYPES = ("llama", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class DecoderConfig:
    """Shapes and constants of a Llama / Qwen2 decoder (see :meth:`from_hf`).

    ``qkv_bias``: q/k/v projections have biases (always for Qwen2, ``attention_bias`` for Llama);
    ``o_bias``: the output projection has one (Llama's ``attention_bias``); ``mlp_bias``: gate, up
    and down have biases. Rotary embedding: ``rope_type`` ``"default"``, ``"linear"`` (inverse
    frequencies divided by ``rope_factor``) or ``"llama3"`` (``rope_factor``,
    ``rope_low_freq_factor``, ``rope_high_freq_factor``, ``rope_original_max_position_embeddings``).
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float | None = None
    rope_high_freq_factor: float | None = None
    rope_original_max_position_embeddings: int | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope type {self.rope_type!r}: Decoder supports {ROPE_TYPES}")
        llama3 = (self.rope_low_freq_factor, self.rope_high_freq_factor, self.rope_original_max_position_embeddings)
        if self.rope_type == "llama3" and None in llama3:
            raise ValueError("llama3 rope scaling needs low_freq_factor, high_freq_factor and "
                             "original_max_position_embeddings")

    @classmethod
    def from_hf(cls, hf_config) -> "DecoderConfig":
        """The config of a transformers Llama or Qwen2 model (``model_type`` ``"llama"`` / ``"qwen2"``).

        Rotary settings come from transformers 5's ``rope_parameters``, else from the older
        ``rope_theta`` and ``rope_scaling``. Raises ``ValueError`` for other model types, rope
        types other than default / linear / llama3, partial rotary embeddings, sliding-window
        attention and activations other than SiLU.
        """
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r}: Decoder supports {MODEL_TYPES} "
                             "(Llama and Qwen2 families)")
        if getattr(hf_config, "hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported activation {hf_config.hidden_act!r}: Decoder supports silu")
        layer_types = getattr(hf_config, "layer_types", None) or ()
        if getattr(hf_config, "use_sliding_window", False) or any(t != "full_attention" for t in layer_types):
            raise ValueError("sliding-window attention is not supported: every layer must be full attention")
        rope = getattr(hf_config, "rope_parameters", None)
        if rope is None:  # transformers < 5
            rope = {"rope_theta": getattr(hf_config, "rope_theta", 10000.0),
                    **(getattr(hf_config, "rope_scaling", None) or {})}
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"partial rotary embeddings are not supported (factor {rope['partial_rotary_factor']})")
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        num_heads = hf_config.num_attention_heads
        return cls(
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads,
            intermediate_size=hf_config.intermediate_size,
            rms_norm_eps=hf_config.rms_norm_eps,
            rope_theta=float(rope["rope_theta"]),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type == "llama" and attention_bias,
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            rope_type=rope.get("rope_type", rope.get("type", "default")),
            rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=rope.get("low_freq_factor"),
            rope_high_freq_factor=rope.get("high_freq_factor"),
            rope_original_max_position_embeddings=rope.get("original_max_position_embeddings"),
        )


def rope_inv_freq(config: DecoderConfig, dtype: torch.dtype) -> torch.Tensor:
    """Inverse frequencies ``[D / 2]`` in ``dtype``, with transformers' formulas (and, in float32, its rounding).

    ``inv_freq[i] = theta^(-2i / D)``; ``"linear"`` divides them by ``factor``; ``"llama3"`` divides
    the low frequencies (wavelength ``2 pi / inv_freq`` above ``L / low_freq_factor``, ``L`` the
    original context) by ``factor``, keeps the high ones (below ``L / high_freq_factor``) and
    interpolates in between with ``s = (L / wavelength - low) / (high - low)``.
    """
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype) / dim))
    if config.rope_type == "linear":
        return inv_freq / config.rope_factor
    if config.rope_type == "llama3":
        factor, low, high = config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
        context = config.rope_original_max_position_embeddings
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
        smooth = (context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < context / high) & ~(wavelen > context / low)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


LINEAR_KERNEL_ROWS = 32
"""The default of :attr:`Decoder.linear_kernel_rows`, the most rows a call gives the decode-time
GEMM: at 64 rows it was slower than cuBLAS on every layer of the 7B teacher and 3B pair on an H200
(``bench/linear.py``)."""
LINEAR_PROJECTIONS = ("qkv", "o", "gate_up", "down", "lm_head")
"""The decoder's linears by name, as :attr:`Decoder.linear_kernel` may list them."""


class KVCache(nn.Module):
    """Static per-layer keys and values of ``max_batch`` slots, and each slot's length.

    ``k``, ``v``: ``[num_layers, C, max_batch, max_seq_len + 1, KV, D]``. Layer ``i``'s
    ``k[i]`` is contiguous ``[C, max_batch, seq, KV, D]``: flash-attn's ``[batch, seqlen,
    heads, dim]`` cache layout with (copy, slot) as the batch, which a decode kernel reads in
    place. Position ``max_seq_len`` is scratch: padding tokens write there and nothing reads it,
    so writes need no data-dependent shapes. ``lengths``: int64 ``[max_batch]``, the number of
    live positions of each slot (positions ``>= lengths[s]`` hold stale data and are never read).
    ``attention_counters``: int32 ``[C max_batch KV]``, zero between steps (the decode attention
    kernel's split tickets). ``dk``, ``dv`` (``tangent=True``, else None): the tangents of ``k``
    and ``v`` (same shape and layout), written by :meth:`Decoder.forward` with ``tangent=True``.
    """

    def __init__(self, num_layers: int, num_copies: int, max_batch: int, max_seq_len: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str | None, *, tangent: bool = False):
        super().__init__()
        shape = (num_layers, num_copies, max_batch, max_seq_len + 1, num_kv_heads, head_dim)
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        for name in ("dk", "dv"):
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device) if tangent else None,
                                 persistent=False)
        self.register_buffer("lengths", torch.zeros(max_batch, dtype=torch.int64, device=device), persistent=False)
        # the split tickets of CUDA decode attention (kernels/decode_attention.py): one buffer for
        # every layer, as a decoder's layers run one after another on one stream
        self.register_buffer("attention_counters", torch.zeros(num_copies * max_batch * num_kv_heads,
                                                               dtype=torch.int32, device=device), persistent=False)

    def reset(self, slots) -> None:
        """Empty the given slots (int64 tensor or list of ids): their next ``forward`` starts at position 0."""
        self.lengths[torch.as_tensor(slots, dtype=torch.int64, device=self.lengths.device)] = 0


class Block(nn.Module):
    """One pre-norm decoder layer's stacked weights (module docstring for names and shapes)."""

    def __init__(self, config: DecoderConfig, num_copies: int, dtype: torch.dtype, device):
        super().__init__()

        def param(*shape, present=True):
            if not present:
                return None
            return nn.Parameter(torch.empty(num_copies, *shape, dtype=dtype, device=device), requires_grad=False)

        e, d, i = config.hidden_size, config.head_dim, config.intermediate_size
        qkv = (config.num_heads + 2 * config.num_kv_heads) * d
        self.attention_norm, self.ffn_norm = param(e), param(e)
        self.wqkv, self.bqkv = param(qkv, e), param(qkv, present=config.qkv_bias)
        self.wo, self.bo = param(e, config.num_heads * d), param(e, present=config.o_bias)
        self.w_gate_up, self.b_gate_up = param(2 * i, e), param(2 * i, present=config.mlp_bias)
        self.w_down, self.b_down = param(e, i), param(e, present=config.mlp_bias)


class Decoder(nn.Module):
    """A Llama / Qwen2 decoder with ``num_copies`` stacked weight sets fed the same tokens (module docstring).

    ``Decoder(config, num_copies)`` allocates uninitialised weights; build one with
    :meth:`from_hf`, :meth:`from_state_dicts` or :meth:`load`, then call :meth:`setup_cache`.
    """

    def __init__(self, config: DecoderConfig, num_copies: int = 1, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        if num_copies < 1:
            raise ValueError(f"num_copies must be >= 1, got {num_copies}")
        self.config, self.num_copies = config, num_copies

        def param(*shape):
            return nn.Parameter(torch.empty(num_copies, *shape, dtype=dtype, device=device), requires_grad=False)

        self.embed = param(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, num_copies, dtype, device) for _ in range(config.num_layers))
        self.norm = param(config.hidden_size)
        self.lm_head = self.embed if config.tie_word_embeddings else param(config.vocab_size, config.hidden_size)
        self.cache: KVCache | None = None
        self.tangent_weights: dict[str, torch.Tensor | FactoredTangent] | None = None
        # The layers' elementwise chains: None runs the Triton kernels on CUDA and PyTorch elsewhere;
        # True / False force one (adfast.layer_ops.layer_ops).
        self.fused: bool | None = None
        # The linears (layers and lm_head): True runs calls of at most linear_kernel_rows rows (decode
        # steps, short prefills) in the decode-time Triton GEMM (adfast.kernels.decode_linear; on CPU
        # tensors it needs TRITON_INTERPRET=1), a set of LINEAR_PROJECTIONS names only those linears
        # (per product the kernel beat cuBLAS on some and lost on others, bench/linear.py), False (the
        # default: cuBLAS was faster in the engine) runs them all as `linear`. With the Triton layer
        # ops and linear_fusions (the default; False for comparisons) the kernel also computes the
        # rotary embeddings with the cache write (qkv epilogue), the MLP's activation (gate/up
        # epilogue) and, at decode steps of at most linear_norm_rows rows (1: batch 1) with every
        # linear in it, the norms (_fuses_norms).
        # linear_plan_options: keyword arguments of the kernel's plan_linear (e.g. swap_ab,
        # prefetch_steps; none by default: the plans measured best per layer). The kernel's split-K
        # tickets (one buffer: a decoder runs on one stream at a time) come with setup_cache.
        self.linear_kernel = False
        self.linear_kernel_rows = LINEAR_KERNEL_ROWS
        self.linear_fusions = True
        self.linear_plan_options: dict = {}
        self.linear_norm_rows = 1
        self.linear_counters: torch.Tensor | None = None
        # Decode steps' weight prefetch (adfast.weight_prefetch): bytes of each layer matmul's weight
        # pulled into L2 on a side stream while the kernels before that matmul run; 0 (the default
        # until measured) turns it off. The side stream comes with setup_cache (None where the
        # prefetch does not apply: CPU, GPUs before Hopper).
        self.prefetch_bytes = 0
        self.prefetch_stream: torch.cuda.Stream | None = None

    # ----------------------------------------------------------------------------------- loading

    @classmethod
    def from_hf(cls, models, *, dtype: torch.dtype | None = None, device=None) -> "Decoder":
        """One copy per transformers causal LM of ``models`` (identical configs), weights copied.

        ``dtype`` and ``device`` default to the first model's.
        """
        models = list(models)
        if not models:
            raise ValueError("from_hf needs at least one model")
        configs = [DecoderConfig.from_hf(m.config) for m in models]
        if any(c != configs[0] for c in configs[1:]):
            raise ValueError("the models' configs differ; stacked copies need identical shapes")
        first = next(models[0].parameters())
        return cls.from_state_dicts(configs[0], [m.state_dict() for m in models],
                                    dtype=dtype or first.dtype, device=device or first.device)

    @classmethod
    def from_state_dicts(cls, config: DecoderConfig, state_dicts, *, dtype: torch.dtype | None = None,
                         device=None) -> "Decoder":
        """One copy per state dict with transformers' names (``model.layers.0.self_attn.q_proj.weight``, ...).

        q/k/v and gate/up are concatenated into the fused weights. Raises ``ValueError`` on a
        missing key, an unexpected key (another architecture) or a shape mismatch. ``dtype``
        defaults to the first tensor's dtype, ``device`` to the CPU.
        """
        state_dicts = list(state_dicts)
        if not state_dicts:
            raise ValueError("from_state_dicts needs at least one state dict")
        dtype = dtype or next(iter(state_dicts[0].values())).dtype
        decoder = cls(config, len(state_dicts), dtype=dtype, device=device)
        sources = decoder._hf_sources()
        params = dict(decoder.named_parameters())
        used = {key for keys in sources.values() for key in keys}
        ignored = {"lm_head.weight"} if config.tie_word_embeddings else set()
        for copy, state in enumerate(state_dicts):
            missing = sorted(used - state.keys())
            unexpected = sorted(state.keys() - used - ignored)
            if missing or unexpected:
                raise ValueError(f"state dict {copy} does not fit {config}: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
            for name, keys in sources.items():
                value = torch.cat([state[key] for key in keys])
                target = params[name][copy]
                if value.shape != target.shape:
                    raise ValueError(f"state dict {copy}: {'+'.join(keys)} has shape {tuple(value.shape)}, "
                                     f"expected {tuple(target.shape)}")
                target.copy_(value)
        return decoder

    def _hf_sources(self) -> dict[str, tuple[str, ...]]:
        """Each parameter's transformers keys, concatenated along dim 0 in this order."""
        sources = {"embed": ("model.embed_tokens.weight",), "norm": ("model.norm.weight",)}
        if not self.config.tie_word_embeddings:
            sources["lm_head"] = ("lm_head.weight",)
        for i, block in enumerate(self.layers):
            a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
            proj = {
                "attention_norm": (f"model.layers.{i}.input_layernorm.weight",),
                "ffn_norm": (f"model.layers.{i}.post_attention_layernorm.weight",),
                "wqkv": (a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"),
                "bqkv": (a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"),
                "wo": (a + "o_proj.weight",), "bo": (a + "o_proj.bias",),
                "w_gate_up": (m + "gate_proj.weight", m + "up_proj.weight"),
                "b_gate_up": (m + "gate_proj.bias", m + "up_proj.bias"),
                "w_down": (m + "down_proj.weight",), "b_down": (m + "down_proj.bias",),
            }
            sources.update((f"layers.{i}.{name}", keys) for name, keys in proj.items()
                           if getattr(block, name) is not None)
        return sources

    @classmethod
    def load(cls, source, *, dtype: torch.dtype | None = None, device=None) -> "Decoder":
        """A one-copy Decoder from a transformers causal LM, a local HF directory or a ``.gguf`` file.

        A directory is read with ``AutoModelForCausalLM.from_pretrained(dir, use_safetensors=True)``
        (pickle weights are refused); a GGUF file with :func:`adfast.models.load_model`
        (dequantised by transformers, cached as safetensors). ``dtype`` defaults to the model's
        (float32 for files).
        """
        if not isinstance(source, nn.Module):
            path = Path(source)
            file_dtype = dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32
            if path.is_dir():
                from transformers import AutoModelForCausalLM

                source = AutoModelForCausalLM.from_pretrained(path, dtype=file_dtype, use_safetensors=True)
            elif path.suffix == ".gguf" and path.is_file():
                from .models import load_model

                source, _ = load_model(path, dtype=file_dtype)
            else:
                raise ValueError(f"{path} is neither a Hugging Face model directory nor a .gguf file")
        return cls.from_hf([source], dtype=dtype, device=device)

    # ----------------------------------------------------------------------------------- tangent

    def set_tangent(self, gradient, *, max_padding_bytes: int = BLOCK_DIAGONAL_PADDING_BYTES) -> None:
        """Store the direction ``g`` of tangent mode (``forward(..., tangent=True)``), or clear it (None).

        ``gradient``: a :class:`adfast.gradient.ProxyGradient`, a
        :class:`adfast.low_rank.LowRankGradient`, or a mapping from transformers parameter names
        (``named_parameters()`` of the model this decoder was built from, tied weights once) to
        tensors or to factors ``(U [m, r], V [n, r])`` of ``G = U V^T``. It is stored in this
        decoder's fused layout, dtype and device, in ``tangent_weights`` (keyed as
        ``named_parameters()``): q/k/v and gate/up concatenated as the weights are, and one
        tangent shared by a tied embedding and ``lm_head``. A weight whose sources are all dense
        tensors gets a dense tangent; one with a factored source gets a :class:`FactoredTangent`
        (its dense sources become dense blocks of it), which holds ``r (m + n)`` numbers per
        factored ``m x n`` source instead of ``m n``. Every copy of a ``num_copies > 1`` decoder
        gets the same direction. Raises ``ValueError`` listing missing names, unexpected names
        and shape mismatches (a dense ``lm_head.weight`` of a tied model is accepted only when
        equal to ``model.embed_tokens.weight``). A fused weight's factored blocks share one
        block-diagonal ``U`` where its zeros take at most ``max_padding_bytes``
        (:meth:`FactoredTangent.from_blocks`).
        """
        if gradient is None:
            self.tangent_weights = None
            return
        grads = tangent_sources(gradient)
        self._check_tangent_sources(grads)
        dtype, device = self.embed.dtype, self.embed.device
        tangent = {}
        for name, keys in self._hf_sources().items():
            blocks = [grads[key] for key in keys]
            if all(isinstance(block, torch.Tensor) for block in blocks):
                value = torch.cat([block.detach().to(device, dtype) for block in blocks])
                tangent[name] = value[None].expand(self.num_copies, *value.shape)
            else:
                tangent[name] = FactoredTangent.from_blocks(blocks, self.num_copies, dtype, device,
                                                            max_padding_bytes)
        if self.config.tie_word_embeddings:
            tangent["lm_head"] = tangent["embed"]
        for name, value in tangent.items():
            if isinstance(value, FactoredTangent) and name != "embed":
                tangent[name] = self._stack_with_factors(name, value)
        self.tangent_weights = tangent

    def _stack_with_factors(self, name: str, tangent: FactoredTangent) -> FactoredTangent:
        """Give the linear weight ``name`` the storage ``[W | V^T]`` (rows) and return ``tangent`` holding it."""
        weight = self.lm_head if name == "lm_head" else self.get_parameter(name)
        rows = weight.shape[1]
        stacked = torch.cat((weight.data, tangent.v.transpose(1, 2).to(weight.dtype)), dim=1)
        weight.data = stacked[:, :rows]
        return replace(tangent, stacked=stacked)

    def _check_tangent_sources(self, grads: dict) -> None:
        """Raise ``ValueError`` unless ``grads`` (name -> tensor or ``(U, V)``) has this decoder's names and shapes."""
        sources = self._hf_sources()
        params = dict(self.named_parameters())
        used = {key for keys in sources.values() for key in keys}
        missing = sorted(used - grads.keys())
        unexpected = sorted(grads.keys() - used)
        tied_head = "lm_head.weight"
        if self.config.tie_word_embeddings and tied_head in unexpected:
            embed = grads.get("model.embed_tokens.weight")
            head = grads[tied_head]
            if (isinstance(head, torch.Tensor) and isinstance(embed, torch.Tensor) and head.shape == embed.shape
                    and torch.equal(head, embed.to(head.device, head.dtype))):
                unexpected.remove(tied_head)
        cfg = self.config
        bad_shapes = []
        for name, keys in sources.items():
            shape = tuple(params[name].shape[1:])
            if name.endswith("qkv"):
                rows = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim)
            elif name.endswith("gate_up"):
                rows = (cfg.intermediate_size, cfg.intermediate_size)
            else:
                rows = (shape[0],)
            for key, row in zip(keys, rows):
                value, want = grads.get(key), (row, *shape[1:])
                if value is not None and source_shape(value) != want:
                    got = source_shape(value) or type(value).__name__
                    bad_shapes.append(f"{key}: {got}, expected {want}")
        if missing or unexpected or bad_shapes:
            raise ValueError(f"the gradient does not fit this decoder ({self.config}): missing {missing}, "
                             f"unexpected {unexpected}, shape mismatches {bad_shapes}")

    def tangent_numel(self) -> int:
        """Numbers the stored tangent holds per copy (a tied embedding and ``lm_head`` once): ``m n`` per
        dense weight, :meth:`FactoredTangent.numel` per factored one. 0 without a tangent."""
        tangents = (self.tangent_weights or {}).values()
        unique = {id(t.v if isinstance(t, FactoredTangent) else t): t for t in tangents}  # a tied pair shares V
        return sum(t.numel() if isinstance(t, FactoredTangent) else t[0].numel() for t in unique.values())

    # ------------------------------------------------------------------------------------- cache

    def setup_cache(self, max_batch: int, max_seq_len: int, dtype: torch.dtype | None = None,
                    device=None, *, tangent: bool | None = None) -> KVCache:
        """Allocate the KV cache (all slots empty) and the rotary tables; returns the cache.

        ``dtype`` / ``device`` default to the weights'. The rotary tables ``cos, sin [max_seq_len, D]``
        are computed in float32 (float64 for float64 weights) as transformers computes them.
        ``tangent``: also allocate the tangent caches ``dk``, ``dv`` that ``forward(...,
        tangent=True)`` needs; None (the default) allocates them when a tangent is set
        (:meth:`set_tangent`).
        """
        if max_batch < 1 or max_seq_len < 1:
            raise ValueError(f"max_batch and max_seq_len must be >= 1, got {max_batch}, {max_seq_len}")
        dtype, device = dtype or self.embed.dtype, device or self.embed.device
        cfg = self.config
        if tangent is None:
            tangent = self.tangent_weights is not None
        self.cache = KVCache(cfg.num_layers, self.num_copies, max_batch, max_seq_len, cfg.num_kv_heads,
                             cfg.head_dim, dtype, device, tangent=tangent)
        table_dtype = compute_dtype(self.embed.dtype)
        inv_freq = rope_inv_freq(cfg, table_dtype).to(device)
        angles = torch.arange(max_seq_len, device=device).to(table_dtype)[:, None] * inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)
        widest = max(cfg.vocab_size, cfg.hidden_size, 2 * cfg.intermediate_size,
                     (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim)
        self.linear_counters = counters_for(self.num_copies, widest, device)
        self.prefetch_stream = side_stream(torch.device(device))
        return self.cache

    @property
    def linear_kernel(self) -> bool | frozenset[str]:
        """Which linears run in the decode-time GEMM (comment in ``__init__``): True (all), False
        (none) or a set of :data:`LINEAR_PROJECTIONS` names."""
        return self._linear_kernel

    @linear_kernel.setter
    def linear_kernel(self, value) -> None:
        if not isinstance(value, bool):
            value = frozenset(value)
            unknown = sorted(value - set(LINEAR_PROJECTIONS))
            if unknown:
                raise ValueError(f"linear_kernel names linears of {LINEAR_PROJECTIONS}, got {unknown}")
        self._linear_kernel = value

    def _linear(self, x: torch.Tensor | NormedInput, weight: torch.Tensor, bias: torch.Tensor | None,
                projection: str, residual: torch.Tensor | None = None) -> torch.Tensor | ResidualSum:
        """``x W^T + b`` of the linear named ``projection``: in the decode-time Triton GEMM where
        :attr:`linear_kernel` takes it and ``x`` has at most :attr:`linear_kernel_rows` rows (the
        same function: float32 accumulation, bias added before one rounding), else :func:`linear`.
        A :class:`NormedInput` ``x`` and a ``residual`` (then the result is a :class:`ResidualSum`)
        come only where :meth:`_fuses_norms` says the kernel takes them."""
        if not isinstance(x, torch.Tensor) or residual is not None or self._linear_kernel_takes(x.shape[1],
                                                                                                projection):
            return self._decode_linear(x, weight, bias, residual=residual)
        return linear(x, weight, bias)

    def _decode_linear(self, x: torch.Tensor | NormedInput, weight: torch.Tensor, bias: torch.Tensor | None,
                       **fusion) -> torch.Tensor | ResidualSum:
        """:func:`decode_linear` with this decoder's tickets and :attr:`linear_plan_options`; ``fusion``:
        its ``gated`` / ``residual`` / ``rotary``."""
        return decode_linear(x, weight, bias, counters=self.linear_counters, plan_options=self.linear_plan_options,
                             **fusion)

    def _gated_mlp_input(self, ops, h: torch.Tensor | NormedInput, layer) -> torch.Tensor:
        """``silu(gate) up`` of the gate/up projection of ``h``: with :meth:`_fuses`, in the kernel's
        epilogue where it takes the projection (the same bits as the separate kernel, one launch and
        the ``[C, N, 2 I]`` round trip fewer), else the projection then ``ops.silu_mul``."""
        if not isinstance(h, torch.Tensor) or (self._fuses(ops) and self._linear_kernel_takes(h.shape[1], "gate_up")):
            return self._decode_linear(h, layer.w_gate_up, layer.b_gate_up, gated=True)
        return ops.silu_mul(self._linear(h, layer.w_gate_up, layer.b_gate_up, "gate_up"))

    def _linear_kernel_takes(self, rows: int, projection: str) -> bool:
        kernel = self.linear_kernel
        return rows <= self.linear_kernel_rows and kernel is not False and (kernel is True or projection in kernel)

    def _fuses(self, ops) -> bool:
        """Whether the linear kernel may take the layer ops' work: Triton layer ops and :attr:`linear_fusions`."""
        return ops is not TORCH and self.linear_fusions

    def _fuses_norms(self, ops, rows: int, seq: int) -> bool:
        """Whether a forward of ``rows = B T`` rows runs the layers' norms inside the linear kernel:
        a decode step (``T == 1``) of at most :attr:`linear_norm_rows` rows (1 by default: batch-1
        decode), :meth:`_fuses`, and every linear in the kernel. Then each
        residual add and its RMSNorm's sums of squares are the epilogue of the o and down
        projections (a :class:`ResidualSum`), and the norm itself the prologue of the qkv, gate/up
        and lm_head projections (a :class:`NormedInput`): the arithmetic of
        :func:`adfast.layer_ops.add_rms_norm`'s kernel (only the sum of squares added in another
        order), two launches a layer fewer (the first layer's norm stays one). At more rows every
        output tile normalises a ``[BLOCK_M, BLOCK_K]`` tile per step, as much issue as the weight's
        bytes allow (``compile_check``, the 7B's qkv normalising its padded 16-row tile: 340 SASS
        instructions a loop iteration against 79 unfused; 104 normalising the one row's vector; at
        32 rows 362 against 90, and with ``swap_ab`` plans, whose tiles of 128 weight rows share one
        normalised input tile, 385 against 179)."""
        return seq == 1 and rows <= self.linear_norm_rows and self._fuses(ops) and all(
            self._linear_kernel_takes(rows, p) for p in LINEAR_PROJECTIONS)

    def _add_rms_norm(self, ops, x: torch.Tensor, weight: torch.Tensor, update
                      ) -> tuple[torch.Tensor, torch.Tensor | NormedInput]:
        """``(s, h)``: the residual stream ``x`` with a sublayer's output ``update`` (or None) added, and
        its RMSNorm with ``weight`` (``ops.add_rms_norm``). A :class:`ResidualSum` ``update`` is
        already added (by the linear that computed it): ``h`` is then the :class:`NormedInput` the
        next linear computes from its statistics."""
        eps = self.config.rms_norm_eps
        if isinstance(update, ResidualSum):
            return update.s, NormedInput(update.s, update.stats, weight, eps)
        return ops.add_rms_norm(x, weight, eps, update)

    def _rotated_queries(self, ops, h: torch.Tensor | NormedInput, rows: int, layer, k_cache, v_cache, cos, sin,
                         slots, write_pos) -> torch.Tensor:
        """The qkv projection of ``h`` (``rows`` rows) with rotary embeddings and the KV-cache write
        (``ops.rope_and_cache_write``'s arguments): returns the rotated queries. With :meth:`_fuses`
        where the kernel takes the projection, all of it in the kernel's epilogue
        (:class:`RotaryCacheWrite`; one launch and the ``[C, N, (H + 2 KV) D]`` round trip fewer).
        Otherwise the projection, then the rotary op; with the rotary kernel, several weight copies
        add their bias there: their batched matmul has no bias epilogue (``baddbmm`` would first copy
        the bias into its output, a kernel a layer), so ``qkv + bias`` rounds twice (as a separate add
        would) instead of once."""
        heads, kv_heads = self.config.num_heads, self.config.num_kv_heads
        kernel = not isinstance(h, torch.Tensor) or self._linear_kernel_takes(rows, "qkv")
        if kernel and self._fuses(ops):
            rotary = RotaryCacheWrite(cos, sin, k_cache, v_cache, slots, write_pos, heads, kv_heads)
            return self._decode_linear(h, layer.wqkv, layer.bqkv, rotary=rotary)
        bias_in_rotary = ops is not TORCH and layer.bqkv is not None and self.num_copies > 1 and not kernel
        qkv = self._linear(h, layer.wqkv, None if bias_in_rotary else layer.bqkv, "qkv")
        return ops.rope_and_cache_write(qkv, cos, sin, k_cache, v_cache, slots, write_pos, heads, kv_heads,
                                        layer.bqkv if bias_in_rotary else None)

    # ----------------------------------------------------------------------------------- forward

    def _check(self, tokens, slots, num_tokens, check: bool) -> int | None:
        """Raise ``ValueError`` for inputs :meth:`forward` cannot take (shapes always; with ``check``,
        ids and lengths on the host, one sync). Returns, with ``check``, the positions the call's
        queries attend at most (its slots' largest length after it; at least 1), else None."""
        cache = self.cache
        if cache is None:
            raise ValueError("call setup_cache(max_batch, max_seq_len) before forward")
        if tokens.dim() != 2 or tokens.dtype != torch.int64:
            raise ValueError(f"tokens must be an int64 [batch, seq] tensor, got {tokens.dtype} {tuple(tokens.shape)}")
        batch, seq = tokens.shape
        if slots.shape != (batch,) or slots.dtype != torch.int64:
            raise ValueError(f"slots must be an int64 [batch={batch}] tensor, got {slots.dtype} {tuple(slots.shape)}")
        if num_tokens is not None and (num_tokens.shape != (batch,) or num_tokens.dtype != torch.int64):
            raise ValueError(f"num_tokens must be an int64 [batch={batch}] tensor or None")
        if not tokens.device == slots.device == cache.lengths.device or (
                num_tokens is not None and num_tokens.device != cache.lengths.device):
            raise ValueError(f"tokens, slots and num_tokens must be on the cache's device {cache.lengths.device}")
        if batch > cache.max_batch:
            raise ValueError(f"more slots than max_batch: {batch} rows, cache has {cache.max_batch} slots")
        if seq > cache.max_seq_len:
            raise ValueError(f"prompt longer than the cache: {seq} tokens > max_seq_len={cache.max_seq_len}")
        if not check:
            return None
        if bool(((tokens < 0) | (tokens >= self.config.vocab_size)).any()):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size})")
        slot_list = slots.tolist()
        if any(not 0 <= s < cache.max_batch for s in slot_list) or len(set(slot_list)) != batch:
            raise ValueError(f"slots must be distinct ids in [0, max_batch={cache.max_batch}), got {slot_list}")
        counts = [seq] * batch if num_tokens is None else num_tokens.tolist()
        if any(not 0 <= n <= seq for n in counts):
            raise ValueError(f"num_tokens must be in [0, {seq}], got {counts}")
        held = cache.lengths[slots].tolist()
        for slot, h, n in zip(slot_list, held, counts):
            if h + n > cache.max_seq_len:
                raise ValueError(f"prompt longer than the cache: slot {slot} holds {h} tokens, {n} more "
                                 f"exceed max_seq_len={cache.max_seq_len}")
        return max(1, *(h + n for h, n in zip(held, counts)))

    def forward(self, tokens: torch.Tensor, slots: torch.Tensor, num_tokens: torch.Tensor | None = None, *,
                last_only: bool = True, check: bool = True, tangent: bool = False, float_logits: bool = True,
                key_span: int | None = None):
        """Append ``tokens`` to their slots, attend causally over each slot, return logits.

        Args:
            tokens: int64 ``[B, T]``, the same for every copy. Prefill is ``T > 1`` (several
                prompts right-padded to ``T``), decode ``T = 1``; both are this one function.
            slots: int64 ``[B]``, distinct cache slots in ``[0, max_batch)``.
            num_tokens: int64 ``[B]`` in ``[0, T]``, how many tokens of each row are real (the
                rest is right padding); None means all ``T``. 0 leaves a row idle: nothing is
                written and its slot's length stays, so a fixed-size decode batch can carry
                finished or empty slots.
            last_only: return only the logits of each row's last real token.
            check: validate ids and lengths on the host (one sync); the reference attention path
                (CPU, prefill) then gathers only the positions the call's queries reach, not all
                ``max_seq_len`` (:func:`adfast.attention.attend`'s ``key_span``). Pass False under
                CUDA-graph capture; then only shapes are checked, and tokens past ``max_seq_len``
                are dropped into the scratch position and the length stops at ``max_seq_len``
                (never out of bounds, but that slot's results are wrong).
            key_span: for an unchecked call, the slots' largest length after it if the caller
                knows it (the engine's eager steps), which the reference attention path then
                gathers instead of all ``max_seq_len``; a checked call computes its own.
            float_logits: return float32 logits; False returns them in the decoder's dtype, as its
                ``lm_head`` computes them (the same values: the fused sampler reads bf16 logits
                directly, so a decode step skips the conversion's kernel and half the bytes).

        Cache update, with ``start_b = lengths[slots[b]]`` read at entry and ``n_b = num_tokens[b]``:
        token ``t < n_b`` of row ``b`` has position ``start_b + t``; its key and value are written
        to that position of slot ``slots[b]`` in every layer, and its query attends positions
        ``0 .. start_b + t`` of the slot (causal, and only live positions). Padding tokens write
        to the scratch position and their outputs are unspecified (finite). At exit
        ``lengths[slots[b]] = start_b + n_b``. All of it is computed on the device from the
        tensors' contents, so one captured graph serves every step.

        Returns:
            logits ``[C, B, 1, V]`` (``last_only``) or ``[C, B, T, V]``, float32 (float64 for a
            float64 decoder; the decoder's dtype without ``float_logits``). Rows with ``n_b = 0``
            hold unspecified values.

        Tangent mode (``tangent=True``; needs :meth:`set_tangent` and a cache with tangent K/V,
        :meth:`setup_cache`): returns ``(logits, dlogits)``, both shaped and typed as above, with
        ``dlogits = d/dh logits(theta + h g)`` at ``h = 0``, exact (forward-mode AD by hand,
        primal and tangent carried together through one pass): each linear layer reads ``W``
        once for ``x`` and ``dx`` and adds ``G x`` (and the bias tangent) to the tangent; the
        embedding, RMSNorms (with their weights' tangents), rotary, attention (softmax tangent,
        the keys' and values' tangents cached per slot as keys and values are) and the SiLU-gated
        MLP propagate it. :func:`log_softmax_tangent` (or :meth:`delta`) turns it into ``D``.
        Attention is :func:`attend_jvp` (a Triton kernel over live positions in CUDA decode, an
        explicit masked softmax over all ``max_seq_len`` positions elsewhere); the rest is plain
        torch ops. Its logits equal ``tangent=False``'s up to round-off.
        Calls with ``tangent=False`` on a tangent cache leave the tangent K/V of the positions
        they write stale: keep one mode per slot.
        """
        if tangent and self.tangent_weights is None:
            raise ValueError("forward(tangent=True) needs a direction: call set_tangent(gradient) first")
        if tangent and (self.cache is None or self.cache.dk is None):
            raise ValueError("forward(tangent=True) needs tangent K/V caches: call setup_cache(..., tangent=True) "
                             "(or setup_cache after set_tangent)")
        key_span = self._check(tokens, slots, num_tokens, check) or key_span
        cfg, cache = self.config, self.cache
        batch, seq = tokens.shape
        n = torch.full_like(slots, seq) if num_tokens is None else num_tokens
        ops = layer_ops(self.embed, self.fused)
        # the slots' lengths advance here; every layer uses these positions
        write_pos, query_pos, cos, sin, live = ops.step_positions(cache.lengths, slots, n, seq, self.rope_cos,
                                                                  self.rope_sin)
        lengths = live if seq == 1 else None  # decode attention's live lengths, once for all layers
        if tangent:
            return self._forward_tangent(tokens, slots, n, write_pos, query_pos, lengths, key_span, cos, sin,
                                         last_only, float_logits)

        copies, heads, head_dim = self.num_copies, cfg.num_heads, cfg.head_dim
        rows = batch * seq
        x = self.embed[:, tokens].view(copies, rows, cfg.hidden_size)
        fuse = self._fuses_norms(ops, rows, seq)
        update = None  # each sublayer's output joins the residual stream in the next norm
        prefetch = weight_prefetcher(self.prefetch_stream, self.prefetch_bytes, seq)
        for i, layer in enumerate(self.layers):
            prefetch(layer.wqkv)  # each weight once the matmul before has read its own
            x, h = self._add_rms_norm(ops, x, layer.attention_norm, update)
            q = self._rotated_queries(ops, h, rows, layer, cache.k[i], cache.v[i], cos, sin, slots, write_pos)
            prefetch(layer.wo)
            out = attend(q, cache.k[i], cache.v[i], slots, query_pos, lengths, cache.attention_counters, key_span)
            update = self._linear(out.reshape(copies, rows, heads * head_dim), layer.wo, layer.bo, "o",
                                  residual=x if fuse else None)
            prefetch(layer.w_gate_up)
            x, h = self._add_rms_norm(ops, x, layer.ffn_norm, update)
            activation = self._gated_mlp_input(ops, h, layer)
            prefetch(layer.w_down)
            update = self._linear(activation, layer.w_down, layer.b_down, "down", residual=x if fuse else None)
        prefetch.join()

        x, update = self._output_rows(x, update, n=n, last_only=last_only)
        _, h = self._add_rms_norm(ops, x, self.norm, update)
        logits = self._linear(h, self.lm_head, None, "lm_head").view(copies, batch, -1, cfg.vocab_size)
        return logits.float() if float_logits and logits.dtype != torch.float64 else logits

    @staticmethod
    def _output_rows(*streams, n: torch.Tensor, last_only: bool):
        """The rows of each ``[C, B T, E]`` stream (None stays None) whose logits are returned: all of
        them, or with ``last_only`` each row's last real token (row ``b T + n_b - 1``), ``[C, B, E]``.
        With ``T = 1`` (decode) that is every row already (an idle row's output is unspecified)."""
        batch = n.shape[0]
        if not last_only or streams[0].shape[1] == batch:
            return streams
        rows = torch.arange(batch, device=n.device) * (streams[0].shape[1] // batch) + (n - 1).clamp(min=0)
        return tuple(None if s is None else s[:, rows] for s in streams)

    def _forward_tangent(self, tokens, slots, n, write_pos, query_pos, lengths, key_span, cos, sin, last_only: bool,
                         float_logits: bool):
        """The body of ``forward(..., tangent=True)``: the primal pass of :meth:`forward` with tangents."""
        cfg, cache, g = self.config, self.cache, self.tangent_weights
        batch, seq = tokens.shape
        copies, heads, kv_heads, head_dim = self.num_copies, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        eps = cfg.rms_norm_eps
        x = self.embed[:, tokens].view(copies, batch * seq, cfg.hidden_size)
        dx = (g["embed"].rows(tokens) if isinstance(g["embed"], FactoredTangent)
              else g["embed"][:, tokens]).reshape(copies, batch * seq, cfg.hidden_size)
        ops = layer_ops(x, self.fused)
        mlp_out = dmlp_out = mlp_term = None  # each layer's MLP output joins the residual stream in the next norm
        for i, layer in enumerate(self.layers):
            prefix = f"layers.{i}."
            d = {name[len(prefix):]: value for name, value in g.items() if name.startswith(prefix)}.get
            x, dx, h, dh = ops.add_rms_norm_jvp(x, dx, layer.attention_norm, d("attention_norm"), eps, mlp_out,
                                                dmlp_out, low_rank=mlp_term)
            # each factored x G^T that is one product z U^T joins in the op that reads the tangent next
            qkv, dqkv, term = linear_jvp(h, dh, layer.wqkv, d("wqkv"), defer=True)  # the bias joins there too
            q, dq = ops.rope_and_cache_write_jvp(qkv, dqkv, cos, sin, cache.k[i], cache.v[i], cache.dk[i],
                                                 cache.dv[i], slots, write_pos, heads, kv_heads, layer.bqkv,
                                                 d("bqkv"), low_rank=term)
            out, dout = attend_jvp(q, dq, cache.k[i], cache.v[i], cache.dk[i], cache.dv[i], slots, query_pos,
                                   lengths, key_span)
            o, do, term = linear_jvp(out.reshape(copies, batch * seq, heads * head_dim),
                                     dout.reshape(copies, batch * seq, heads * head_dim), layer.wo, d("wo"),
                                     layer.bo, d("bo"), defer=True)
            x, dx, h, dh = ops.add_rms_norm_jvp(x, dx, layer.ffn_norm, d("ffn_norm"), eps, o, do, low_rank=term)
            gate_up, dgate_up, term = linear_jvp(h, dh, layer.w_gate_up, d("w_gate_up"), layer.b_gate_up,
                                                 d("b_gate_up"), defer=True)
            act, dact = ops.silu_mul_jvp(gate_up, dgate_up, low_rank=term)
            mlp_out, dmlp_out, mlp_term = linear_jvp(act, dact, layer.w_down, d("w_down"), layer.b_down,
                                                     d("b_down"), defer=True)

        z = None if mlp_term is None else mlp_term.z
        x, dx, mlp_out, dmlp_out, z = self._output_rows(x, dx, mlp_out, dmlp_out, z, n=n, last_only=last_only)
        _, _, h, dh = ops.add_rms_norm_jvp(x, dx, self.norm, g["norm"], eps, mlp_out, dmlp_out,
                                           low_rank=None if z is None else LowRankTerm(z, mlp_term.u))
        logits, dlogits = linear_jvp(h, dh, self.lm_head, g["lm_head"])
        logits = logits.reshape(copies, batch, -1, cfg.vocab_size)  # column slices with a stacked lm_head
        dlogits = dlogits.reshape(copies, batch, -1, cfg.vocab_size)
        if float_logits and logits.dtype != torch.float64:
            logits, dlogits = logits.float(), dlogits.float()
        return logits, dlogits

    def delta(self, tokens: torch.Tensor, slots: torch.Tensor, num_tokens: torch.Tensor | None = None, *,
              last_only: bool = True, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, D)`` of one tangent-mode :meth:`forward` (same arguments and cache update), with
        ``D = d/dh log_softmax(logits(theta + h g))`` at ``h = 0`` (:func:`log_softmax_tangent`),
        ``[C, B, 1 | T, V]``, float32 (float64 for a float64 decoder)."""
        logits, dlogits = self(tokens, slots, num_tokens, last_only=last_only, check=check, tangent=True)
        return logits, log_softmax_tangent(logits, dlogits)

    def extra_repr(self) -> str:
        return f"num_copies={self.num_copies}, {self.config}"


__all__ = ["Decoder", "DecoderConfig", "KVCache", "rope_inv_freq"]
