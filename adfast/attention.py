"""Causal attention of new queries over a slotted KV cache, and its tangent (forward-mode derivative).

The cache layout is :class:`adfast.decoder.KVCache`'s: one layer's keys or values are
``[C, max_batch, max_seq_len + 1, KV, D]`` (copy, slot, position, kv head, head size; position
``max_seq_len`` is scratch). :func:`attend` is the decoder's attention, :func:`attend_jvp` the
same with tangents for tangent mode (:mod:`adfast.tangent`). CUDA decode steps run kernels that
read only each slot's live positions (flash-attn's kv-cache kernel when it is installed, else
:mod:`adfast.kernels.decode_attention`; :mod:`adfast.kernels.decode_attention_jvp` for the
tangent); everything else is a PyTorch reference path over all positions, masked.
"""
import math

import torch
import torch.nn.functional as F

from .layer_ops import compute_dtype

try:
    from flash_attn import flash_attn_with_kvcache
except ImportError:
    flash_attn_with_kvcache = None


def decode_attention_backend(dtype: torch.dtype, cache_dtype: torch.dtype | None = None) -> str:
    """Which kernel :func:`attend` runs for a CUDA decode step with queries in ``dtype`` (and a
    cache in ``cache_dtype``, default the same): ``"flash-attn"`` (``flash_attn_with_kvcache``:
    flash-attn installed, fp16/bf16) or ``"adfast split-K"`` (our Triton kernel)."""
    if (flash_attn_with_kvcache is not None and dtype in (torch.float16, torch.bfloat16)
            and (cache_dtype or dtype) == dtype):
        return "flash-attn"
    return "adfast split-K"


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
           query_pos: torch.Tensor, lengths: torch.Tensor | None = None,
           counters: torch.Tensor | None = None, key_span: int | None = None) -> torch.Tensor:
    """Causal attention of new queries over their slots' cached keys and values.

    Args:
        q: ``[C, B, T, H, D]`` rotated queries.
        k_cache, v_cache: one layer's cache, ``[C, max_batch, max_seq_len + 1, KV, D]``.
        slots: int64 ``[B]``, the cache slot of each row.
        query_pos: int64 ``[B, T]``; query ``(b, t)`` attends to positions ``0 .. query_pos[b, t]``
            of slot ``slots[b]`` (all of them already written), scaled by ``1 / sqrt(D)``.
        lengths: ``query_pos[:, 0] + 1`` if the caller has it (a decode step computes it once for
            all layers rather than once per layer: one kernel launch instead of one per layer).
        counters: the CUDA decode kernel's split tickets (``adfast.decoder.KVCache.attention_counters``;
            None allocates them per call).
        key_span: a bound on the positions any query attends (every ``query_pos < key_span``), if
            the caller knows one (a checked forward does, from its host-side length check); None
            means ``max_seq_len``.

    Returns:
        ``[C, B, T, H, D]``. Head ``h`` reads key/value head ``h // (H / KV)`` (grouped-query).

    Three paths. CUDA decode (``T == 1``, fp16/bf16) with flash-attn installed calls
    ``flash_attn_with_kvcache`` on the cache in place (the layout is its ``[batch, seqlen,
    heads, dim]`` with copy and slot folded into the batch, selected by ``cache_batch_idx``), so
    its cost follows each slot's length. Without flash-attn, CUDA decode runs our split-K Triton
    kernel :func:`adfast.kernels.decode_attention.decode_attention`, which also reads only live
    positions (tested against this function's SDPA path under the Triton interpreter; not yet
    measured on a GPU). Everything else runs ``scaled_dot_product_attention``
    with a boolean mask over gathered copies of the slots' first ``key_span`` positions (all
    ``max_seq_len`` without it: the cost then grows with ``max_seq_len``, whatever the slots'
    lengths); it is the reference and the prefill path, not the fast decode path.
    """
    num_copies, batch, seq, heads, head_dim = q.shape
    max_batch, max_seq_len, kv_heads = k_cache.shape[1], k_cache.shape[2] - 1, k_cache.shape[3]
    if q.is_cuda and seq == 1 and decode_attention_backend(q.dtype, k_cache.dtype) == "flash-attn":
        rows = torch.arange(num_copies, device=q.device)[:, None] * max_batch + slots
        out = flash_attn_with_kvcache(
            q.reshape(num_copies * batch, 1, heads, head_dim), k_cache.flatten(0, 1), v_cache.flatten(0, 1),
            cache_seqlens=(query_pos[:, 0] + 1 if lengths is None else lengths).to(torch.int32).repeat(num_copies),
            cache_batch_idx=rows.flatten().to(torch.int32), causal=True)
        return out.view(num_copies, batch, 1, heads, head_dim)
    if q.is_cuda and seq == 1:
        from .kernels.decode_attention import decode_attention

        return decode_attention(q, k_cache, v_cache, slots, query_pos[:, 0] + 1 if lengths is None else lengths,
                                counters=counters)

    span = _key_span(key_span, max_seq_len)

    def gather(cache):  # [C, max_batch, S + 1, KV, D] -> [C B, H, span, D]
        x = cache[:, slots, :span].to(q.dtype).permute(0, 1, 3, 2, 4)
        x = x[:, :, :, None].expand(-1, -1, -1, heads // kv_heads, -1, -1)
        return x.reshape(num_copies * batch, heads, span, head_dim)

    keys = torch.arange(span, device=q.device)
    mask = keys[None, None, :] <= query_pos[:, :, None]  # [B, T, span]
    mask = mask[None, :, None].expand(num_copies, -1, -1, -1, -1).reshape(num_copies * batch, 1, seq, span)
    out = F.scaled_dot_product_attention(q.transpose(2, 3).reshape(num_copies * batch, heads, seq, head_dim),
                                         gather(k_cache), gather(v_cache), attn_mask=mask)
    return out.view(num_copies, batch, heads, seq, head_dim).transpose(2, 3)


def attend_jvp(q: torch.Tensor, dq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               dk_cache: torch.Tensor, dv_cache: torch.Tensor, slots: torch.Tensor, query_pos: torch.Tensor,
               lengths: torch.Tensor | None = None, key_span: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attend` and its tangent, by an explicit masked softmax (same masking and grouping).

    With ``S = Q K^T / sqrt(D)`` (keys past ``query_pos`` masked), ``P = softmax(S)``, ``O = P V``:
    ``dS = (dQ K^T + Q dK^T) / sqrt(D)``, ``dP = P (dS - sum(P dS))``, ``dO = dP V + P dV``.
    ``dk_cache``, ``dv_cache`` hold the cached keys' and values' tangents, laid out as the caches;
    ``lengths`` and ``key_span`` as in :func:`attend`. Returns ``(out, dout)``, ``[C, B, T, H, D]``.

    CUDA decode (``T == 1``) runs the split-K Triton kernel
    :func:`adfast.kernels.decode_attention_jvp.decode_attention_jvp`, which reads only each slot's
    live positions of the four caches (tested against this function's float64 path and
    ``torch.func.jvp`` under the Triton interpreter). Everything else (CPU, prefill) is the
    reference path below: scores and softmax in float32 (float64 for float64) over the first
    ``key_span`` positions (default all ``max_seq_len``) of every slot, masked.
    """
    if q.is_cuda and q.shape[2] == 1:
        from .kernels.decode_attention_jvp import decode_attention_jvp

        return decode_attention_jvp(q, dq, k_cache, v_cache, dk_cache, dv_cache, slots,
                                    query_pos[:, 0] + 1 if lengths is None else lengths)
    heads, head_dim = q.shape[3:]
    max_seq_len, kv_heads = k_cache.shape[2] - 1, k_cache.shape[3]
    dtype = q.dtype
    work = compute_dtype(dtype)

    span = _key_span(key_span, max_seq_len)

    def gather(cache):  # [C, max_batch, S + 1, KV, D] -> [C, B, H, span, D]
        x = cache[:, slots, :span].to(work).permute(0, 1, 3, 2, 4)
        return x.repeat_interleave(heads // kv_heads, dim=2)

    keys, values, dkeys, dvalues = gather(k_cache), gather(v_cache), gather(dk_cache), gather(dv_cache)
    q, dq = q.to(work).transpose(2, 3), dq.to(work).transpose(2, 3)  # [C, B, H, T, D]
    scale = 1.0 / math.sqrt(head_dim)
    mask = torch.arange(span, device=q.device)[None, None, :] <= query_pos[:, :, None]  # [B, T, span]
    mask = mask[None, :, None]  # [1, B, 1, T, span]
    scores = (q @ keys.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    dscores = ((dq @ keys.transpose(-1, -2) + q @ dkeys.transpose(-1, -2)) * scale).masked_fill(~mask, 0)
    p = torch.softmax(scores, dim=-1)
    dp = p * (dscores - (p * dscores).sum(-1, keepdim=True))
    out = p @ values
    dout = dp @ values + p @ dvalues
    return out.transpose(2, 3).to(dtype), dout.transpose(2, 3).to(dtype)


def _key_span(key_span: int | None, max_seq_len: int) -> int:
    """The positions the reference path gathers: ``key_span`` (checked) or ``max_seq_len``."""
    if key_span is None:
        return max_seq_len
    if not 1 <= key_span <= max_seq_len:
        raise ValueError(f"key_span must be in [1, max_seq_len={max_seq_len}], got {key_span}")
    return key_span


__all__ = ["attend", "attend_jvp", "decode_attention_backend"]
