"""A Llama / Qwen2 decoder with ``C`` stacked weight sets and a static, slotted KV cache.

The model half of a lockstep decode engine: the teacher is a :class:`Decoder` with one copy
(``C = 1``); the proxy pair ``theta_P + eps g`` and ``theta_P - eps g`` is one :class:`Decoder`
with two copies (``C = 2``) that share their input tokens, so every layer of the pair runs as one
batched matmul over the copy dimension (``torch.bmm`` on ``[C, out, in]`` weights), which is the
fastest arrangement measured on an H100 (``/work/shared/notes/h100-ceilings.md``).

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
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:
    from flash_attn import flash_attn_with_kvcache
except ImportError:
    flash_attn_with_kvcache = None

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


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 activations, else float32: the dtype of norms, rotary tables and softmax."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)`` for ``x [C, N, E]``, ``weight [C, E]``.

    The statistics are taken in float32 (float64 for float64 ``x``), the product in ``x``'s dtype.
    """
    h = x.to(compute_dtype(x.dtype))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight[:, None] * h.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [C, B, T, heads, D]`` by the angles of ``cos, sin [B, T, D]``: ``x cos + rotate_half(x) sin``.

    ``rotate_half(x) = (-x[D/2:], x[:D/2])`` (the half-split convention of transformers'
    Llama); the tables are cast to ``x``'s dtype first, as transformers does.
    """
    cos, sin = cos[None, :, :, None].to(x.dtype), sin[None, :, :, None].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight^T + bias`` per copy (one batched matmul over the copy dimension).

    ``x [C, N, in]``, ``weight [C, out, in]``, ``bias [C, out]`` -> ``[C, N, out]``.
    """
    if bias is None:
        return torch.bmm(x, weight.transpose(1, 2))
    return torch.baddbmm(bias[:, None], x, weight.transpose(1, 2))


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
           query_pos: torch.Tensor) -> torch.Tensor:
    """Causal attention of new queries over their slots' cached keys and values.

    Args:
        q: ``[C, B, T, H, D]`` rotated queries.
        k_cache, v_cache: one layer's cache, ``[C, max_batch, max_seq_len + 1, KV, D]``.
        slots: int64 ``[B]``, the cache slot of each row.
        query_pos: int64 ``[B, T]``; query ``(b, t)`` attends to positions ``0 .. query_pos[b, t]``
            of slot ``slots[b]`` (all of them already written), scaled by ``1 / sqrt(D)``.

    Returns:
        ``[C, B, T, H, D]``. Head ``h`` reads key/value head ``h // (H / KV)`` (grouped-query).

    Three paths. CUDA decode (``T == 1``, fp16/bf16) with flash-attn installed calls
    ``flash_attn_with_kvcache`` on the cache in place (the layout is its ``[batch, seqlen,
    heads, dim]`` with copy and slot folded into the batch, selected by ``cache_batch_idx``), so
    its cost follows each slot's length. Without flash-attn, CUDA decode runs our split-K Triton
    kernel :func:`adfast.kernels.decode_attention.decode_attention`, which also reads only live
    positions (tested against this function's SDPA path under the Triton interpreter; not yet
    measured on a GPU). Everything else runs ``scaled_dot_product_attention``
    with a boolean mask over gathered copies of the slots' rows: that path reads all
    ``max_seq_len`` positions of every slot, whatever their lengths (cost grows with
    ``max_seq_len``); it is the reference and the prefill path, not the fast decode path.
    """
    num_copies, batch, seq, heads, head_dim = q.shape
    max_batch, max_seq_len, kv_heads = k_cache.shape[1], k_cache.shape[2] - 1, k_cache.shape[3]
    if (flash_attn_with_kvcache is not None and q.is_cuda and seq == 1
            and q.dtype in (torch.float16, torch.bfloat16) and k_cache.dtype == q.dtype):
        rows = torch.arange(num_copies, device=q.device)[:, None] * max_batch + slots
        out = flash_attn_with_kvcache(
            q.reshape(num_copies * batch, 1, heads, head_dim), k_cache.flatten(0, 1), v_cache.flatten(0, 1),
            cache_seqlens=(query_pos[:, 0] + 1).to(torch.int32).repeat(num_copies),
            cache_batch_idx=rows.flatten().to(torch.int32), causal=True)
        return out.view(num_copies, batch, 1, heads, head_dim)
    if q.is_cuda and seq == 1:
        from .kernels.decode_attention import decode_attention

        return decode_attention(q, k_cache, v_cache, slots, query_pos[:, 0] + 1)

    def gather(cache):  # [C, max_batch, S + 1, KV, D] -> [C B, H, S, D]
        x = cache[:, slots, :max_seq_len].to(q.dtype).permute(0, 1, 3, 2, 4)
        x = x[:, :, :, None].expand(-1, -1, -1, heads // kv_heads, -1, -1)
        return x.reshape(num_copies * batch, heads, max_seq_len, head_dim)

    keys = torch.arange(max_seq_len, device=q.device)
    mask = keys[None, None, :] <= query_pos[:, :, None]  # [B, T, S]
    mask = mask[None, :, None].expand(num_copies, -1, -1, -1, -1).reshape(num_copies * batch, 1, seq, max_seq_len)
    out = F.scaled_dot_product_attention(q.transpose(2, 3).reshape(num_copies * batch, heads, seq, head_dim),
                                         gather(k_cache), gather(v_cache), attn_mask=mask)
    return out.view(num_copies, batch, heads, seq, head_dim).transpose(2, 3)


class KVCache(nn.Module):
    """Static per-layer keys and values of ``max_batch`` slots, and each slot's length.

    ``k``, ``v``: ``[num_layers, C, max_batch, max_seq_len + 1, KV, D]``. Layer ``i``'s
    ``k[i]`` is contiguous ``[C, max_batch, seq, KV, D]``: flash-attn's ``[batch, seqlen,
    heads, dim]`` cache layout with (copy, slot) as the batch, which a decode kernel reads in
    place. Position ``max_seq_len`` is scratch: padding tokens write there and nothing reads it,
    so writes need no data-dependent shapes. ``lengths``: int64 ``[max_batch]``, the number of
    live positions of each slot (positions ``>= lengths[s]`` hold stale data and are never read).
    """

    def __init__(self, num_layers: int, num_copies: int, max_batch: int, max_seq_len: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str | None):
        super().__init__()
        shape = (num_layers, num_copies, max_batch, max_seq_len + 1, num_kv_heads, head_dim)
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("lengths", torch.zeros(max_batch, dtype=torch.int64, device=device), persistent=False)

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

    # ------------------------------------------------------------------------------------- cache

    def setup_cache(self, max_batch: int, max_seq_len: int, dtype: torch.dtype | None = None,
                    device=None) -> KVCache:
        """Allocate the KV cache (all slots empty) and the rotary tables; returns the cache.

        ``dtype`` / ``device`` default to the weights'. The rotary tables ``cos, sin [max_seq_len, D]``
        are computed in float32 (float64 for float64 weights) as transformers computes them.
        """
        if max_batch < 1 or max_seq_len < 1:
            raise ValueError(f"max_batch and max_seq_len must be >= 1, got {max_batch}, {max_seq_len}")
        dtype, device = dtype or self.embed.dtype, device or self.embed.device
        cfg = self.config
        self.cache = KVCache(cfg.num_layers, self.num_copies, max_batch, max_seq_len, cfg.num_kv_heads,
                             cfg.head_dim, dtype, device)
        table_dtype = compute_dtype(self.embed.dtype)
        inv_freq = rope_inv_freq(cfg, table_dtype).to(device)
        angles = torch.arange(max_seq_len, device=device).to(table_dtype)[:, None] * inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)
        return self.cache

    # ----------------------------------------------------------------------------------- forward

    def _check(self, tokens, slots, num_tokens, check: bool) -> None:
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
            return
        if bool(((tokens < 0) | (tokens >= self.config.vocab_size)).any()):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size})")
        slot_list = slots.tolist()
        if any(not 0 <= s < cache.max_batch for s in slot_list) or len(set(slot_list)) != batch:
            raise ValueError(f"slots must be distinct ids in [0, max_batch={cache.max_batch}), got {slot_list}")
        counts = [seq] * batch if num_tokens is None else num_tokens.tolist()
        if any(not 0 <= n <= seq for n in counts):
            raise ValueError(f"num_tokens must be in [0, {seq}], got {counts}")
        for slot, held, n in zip(slot_list, cache.lengths[slots].tolist(), counts):
            if held + n > cache.max_seq_len:
                raise ValueError(f"prompt longer than the cache: slot {slot} holds {held} tokens, {n} more "
                                 f"exceed max_seq_len={cache.max_seq_len}")

    def forward(self, tokens: torch.Tensor, slots: torch.Tensor, num_tokens: torch.Tensor | None = None, *,
                last_only: bool = True, check: bool = True) -> torch.Tensor:
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
            check: validate ids and lengths on the host (one sync). Pass False under CUDA-graph
                capture; then only shapes are checked, and tokens past ``max_seq_len`` are dropped
                into the scratch position and the length stops at ``max_seq_len`` (never out of
                bounds, but that slot's results are wrong).

        Cache update, with ``start_b = lengths[slots[b]]`` read at entry and ``n_b = num_tokens[b]``:
        token ``t < n_b`` of row ``b`` has position ``start_b + t``; its key and value are written
        to that position of slot ``slots[b]`` in every layer, and its query attends positions
        ``0 .. start_b + t`` of the slot (causal, and only live positions). Padding tokens write
        to the scratch position and their outputs are unspecified (finite). At exit
        ``lengths[slots[b]] = start_b + n_b``. All of it is computed on the device from the
        tensors' contents, so one captured graph serves every step.

        Returns:
            logits ``[C, B, 1, V]`` (``last_only``) or ``[C, B, T, V]``, float32 (float64 for a
            float64 decoder). Rows with ``n_b = 0`` hold unspecified values.
        """
        self._check(tokens, slots, num_tokens, check)
        cfg, cache = self.config, self.cache
        batch, seq = tokens.shape
        n = torch.full_like(slots, seq) if num_tokens is None else num_tokens
        start = cache.lengths[slots]
        t = torch.arange(seq, device=tokens.device)[None, :]
        position = start[:, None] + t
        real = (t < n[:, None]) & (position < cache.max_seq_len)
        write_pos = torch.where(real, position, cache.max_seq_len)
        query_pos = (start[:, None] + torch.minimum(t, n[:, None] - 1)).clamp(0, cache.max_seq_len - 1)
        cos, sin = self.rope_cos[query_pos], self.rope_sin[query_pos]

        copies, heads, kv_heads, head_dim = self.num_copies, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        x = self.embed[:, tokens].view(copies, batch * seq, cfg.hidden_size)
        for i, layer in enumerate(self.layers):
            h = rms_norm(x, layer.attention_norm, cfg.rms_norm_eps)
            q, k, v = linear(h, layer.wqkv, layer.bqkv).split(
                [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
            q = apply_rope(q.view(copies, batch, seq, heads, head_dim), cos, sin)
            k = apply_rope(k.view(copies, batch, seq, kv_heads, head_dim), cos, sin)
            cache.k[i][:, slots[:, None], write_pos] = k.to(cache.k.dtype)
            cache.v[i][:, slots[:, None], write_pos] = v.view(copies, batch, seq, kv_heads, head_dim).to(cache.v.dtype)
            out = attend(q, cache.k[i], cache.v[i], slots, query_pos)
            x = x + linear(out.reshape(copies, batch * seq, heads * head_dim), layer.wo, layer.bo)
            h = rms_norm(x, layer.ffn_norm, cfg.rms_norm_eps)
            gate, up = linear(h, layer.w_gate_up, layer.b_gate_up).chunk(2, dim=-1)
            x = x + linear(F.silu(gate) * up, layer.w_down, layer.b_down)
        cache.lengths[slots] = (start + n).clamp(max=cache.max_seq_len)

        x = x.view(copies, batch, seq, cfg.hidden_size)
        if last_only:
            x = x[:, torch.arange(batch, device=x.device), (n - 1).clamp(min=0)][:, :, None]
        out_seq = x.shape[2]
        logits = linear(rms_norm(x.reshape(copies, batch * out_seq, -1), self.norm, cfg.rms_norm_eps), self.lm_head)
        logits = logits.view(copies, batch, out_seq, cfg.vocab_size)
        return logits if logits.dtype == torch.float64 else logits.float()

    def extra_repr(self) -> str:
        return f"num_copies={self.num_copies}, {self.config}"


__all__ = ["Decoder", "DecoderConfig", "KVCache", "attend", "rope_inv_freq"]
