"""Decoder tangent (JVP) mode: forward(..., tangent=True) and D = log_softmax_tangent against exact_delta."""
import pytest
import torch
from conftest import VOCAB, tiny_llama, tiny_qwen2

from adfast.decoder import Decoder, DecoderConfig
from adfast.exact_delta import exact_delta, relative_error
from adfast.gradient import proxy_gradient
from adfast.layer_ops import LOW_RANK_MAX_RANK
from adfast.low_rank import low_rank_gradient
from adfast.tangent import FactoredTangent, linear_jvp, log_softmax_tangent, primal_tangent_rows

# torch's forward AD (exact_delta) loads its JVP decompositions with torch.jit.script, deprecated in torch 2.13
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
MODELS = {"qwen2": tiny_qwen2, "llama3-tied": tiny_llama}


def random_tokens(count: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def right_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 ``[B, max len]`` zero-padded ids and their ``[B]`` lengths."""
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.int64)
    for b, row in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(row)
    return ids, torch.tensor([len(row) for row in rows])


def mask_of(lengths: torch.Tensor, seq: int) -> torch.Tensor:
    return (torch.arange(seq)[None] < lengths[:, None]).long()


@pytest.fixture(scope="module", params=sorted(MODELS))
def setup(request):
    """A tiny proxy and its real proxy gradient on a few random traces."""
    model = MODELS[request.param]()
    traces = [(random_tokens(4, 2 * i), random_tokens(5, 2 * i + 1)) for i in range(3)]
    return model, proxy_gradient(model, traces, progress=False)


def tangent_decoder(model, gradient, dtype=torch.float64, copies=1, **set_tangent_kwargs) -> Decoder:
    decoder = Decoder.from_hf([model] * copies, dtype=dtype)
    decoder.set_tangent(gradient, **set_tangent_kwargs)
    return decoder


def test_prefill_matches_exact_delta(setup):
    """One right-padded prefill of prompts of lengths 9, 4, 7 in slots 2, 0, 1: D at every real position."""
    model, gradient = setup
    ids, lengths = right_padded([random_tokens(9, 10), random_tokens(4, 11), random_tokens(7, 12)])
    reference = exact_delta(model, gradient, ids, attention_mask=mask_of(lengths, ids.shape[1]))
    decoder = tangent_decoder(model, gradient)
    cache = decoder.setup_cache(4, 12)
    assert cache.dk is not None and cache.dv is not None
    logits, dlogits = decoder(ids, torch.tensor([2, 0, 1]), lengths, last_only=False, tangent=True)
    assert logits.shape == dlogits.shape == (1, 3, 9, VOCAB) and dlogits.dtype == torch.float64
    delta = log_softmax_tangent(logits, dlogits)[0]
    real = mask_of(lengths, ids.shape[1]).bool()
    assert relative_error(delta, reference)[real].max() < 1e-10
    assert (torch.softmax(logits[0], -1) * delta).sum(-1)[real].abs().max() < 1e-12  # sum_v p_v D_v = 0
    assert cache.lengths.tolist() == [4, 7, 9, 0]


def test_prefill_then_decode_matches_exact_delta(setup):
    """Prefill, then single-token steps (one with an idle row): the tangent K/V cache carries each slot."""
    model, gradient = setup
    rows = [random_tokens(5, 20), random_tokens(3, 21), random_tokens(6, 22)]
    slots = torch.tensor([1, 3, 0])
    decoder = tangent_decoder(model, gradient)
    decoder.setup_cache(4, 12)
    ids, lengths = right_padded(rows)
    outputs = [(lengths - 1, decoder.delta(ids, slots, lengths)[1][0, :, 0])]  # (position, D) per step
    for step in range(4):
        new = random_tokens(3, 30 + step)
        num = torch.tensor([1, 0 if step == 2 else 1, 1])
        for row, token, count in zip(rows, new, num.tolist()):
            row.extend([token] * count)
        _, delta = decoder.delta(torch.tensor(new)[:, None], slots, num)
        outputs.append((torch.tensor([len(row) - 1 for row in rows]), delta[0, :, 0]))
    ids, lengths = right_padded(rows)
    reference = exact_delta(model, gradient, ids, attention_mask=mask_of(lengths, ids.shape[1]))
    for step, (position, delta) in enumerate(outputs):
        for b in range(len(rows)):
            if step == 3 and b == 1:
                continue  # idle row: unspecified output
            error = relative_error(delta[b], reference[b, position[b]])
            assert error < 1e-10, (step, b, float(error))


def test_checked_and_unchecked_calls_agree(setup):
    """A checked call's reference attention reads only the positions its queries reach (attend_jvp's
    key_span), an unchecked one all of max_seq_len: the same logits and tangents."""
    model, gradient = setup
    decoders = [tangent_decoder(model, gradient) for _ in range(2)]
    for decoder in decoders:
        decoder.setup_cache(3, 30)
    ids, lengths = right_padded([random_tokens(6, 40), random_tokens(2, 41)])
    slots = torch.tensor([1, 2])
    for tokens, num_tokens in ((ids, lengths), (torch.tensor([[3], [4]]), None)):
        (logits, dlogits), (logits_all, dlogits_all) = (
            decoder(tokens, slots, num_tokens, last_only=False, check=check, tangent=True)
            for decoder, check in zip(decoders, (True, False)))
        torch.testing.assert_close(logits, logits_all, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dlogits, dlogits_all, rtol=1e-12, atol=1e-12)


def test_float32_close_to_float64(setup):
    model, gradient = setup
    ids, lengths = right_padded([random_tokens(8, 40), random_tokens(5, 41)])
    deltas = []
    for dtype in (torch.float64, torch.float32):
        decoder = tangent_decoder(model, gradient, dtype)
        decoder.setup_cache(2, 8)
        logits, delta = decoder.delta(ids, torch.arange(2), lengths, last_only=False)
        assert logits.dtype == delta.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        deltas.append(delta[0])
    real = mask_of(lengths, ids.shape[1]).bool()
    assert relative_error(deltas[1], deltas[0])[real].max() < 1e-4


def test_primal_unchanged_and_copies_share_the_direction(setup):
    """tangent=False gives the same logits with or without a tangent; tangent=True's logits agree to
    round-off; every copy of a C = 2 decoder gets the same direction."""
    model, gradient = setup
    ids, lengths = right_padded([random_tokens(6, 50), random_tokens(4, 51)])
    slots = torch.arange(2)
    plain = Decoder.from_hf([model], dtype=torch.float64)
    plain.setup_cache(2, 8)
    assert plain.cache.dk is None
    expected = plain(ids, slots, lengths, last_only=False)
    decoder = tangent_decoder(model, gradient, copies=2)
    decoder.setup_cache(2, 8)
    assert torch.equal(decoder(ids, slots, lengths, last_only=False), expected.expand(2, -1, -1, -1))
    decoder.cache.reset(slots)
    logits, dlogits = decoder(ids, slots, lengths, last_only=False, tangent=True)
    torch.testing.assert_close(logits, expected.expand(2, -1, -1, -1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dlogits[0], dlogits[1], rtol=0, atol=0)
    single = tangent_decoder(model, gradient)
    single.setup_cache(2, 8)
    torch.testing.assert_close(single(ids, slots, lengths, last_only=False, tangent=True)[1], dlogits[:1],
                               rtol=1e-12, atol=1e-13)


def test_refusals(setup):
    model, gradient = setup
    decoder = Decoder.from_hf([model], dtype=torch.float64)
    decoder.setup_cache(1, 4)
    tokens, slots = torch.tensor([[1, 2]]), torch.arange(1)
    with pytest.raises(ValueError, match="set_tangent"):
        decoder(tokens, slots, tangent=True)
    grads = dict(gradient.grads)
    wrong = dict(grads)
    del wrong["model.norm.weight"]
    wrong["model.layers.0.self_attn.k_proj.weight"] = grads["model.layers.0.self_attn.k_proj.weight"][:-1]
    wrong["model.extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError) as info:
        decoder.set_tangent(wrong)
    message = str(info.value)
    assert "model.norm.weight" in message and "model.extra.weight" in message and "k_proj" in message
    assert decoder.tangent_weights is None
    decoder.set_tangent(gradient.grads)
    assert decoder.tangent_weights["layers.0.wqkv"].dtype == torch.float64
    with pytest.raises(ValueError, match="tangent K/V"):  # cache made before the tangent was set
        decoder(tokens, slots, tangent=True)
    decoder.setup_cache(1, 4)
    assert decoder(tokens, slots, tangent=True)[1].shape == (1, 1, 1, VOCAB)
    decoder.set_tangent(None)
    assert decoder.setup_cache(1, 4).dk is None


# ------------------------------------------------------------------------- low-rank (factored) tangent
# The tiny configs: hidden 32, 4 heads of 8, 2 KV heads (k, v have 16 rows), MLP 64, vocabulary 96.
# Rank 4 factors every matrix; rank 16 keeps k_proj and v_proj dense (min(16, 32) <= 16), so each
# wqkv is a mix of factored q and dense k, v blocks.


def low_rank_decoders(model, lr, dtype, copies=1, **set_tangent_kwargs) -> tuple[Decoder, Decoder]:
    """Tangent decoders along ``lr`` kept factored and along its dense ``G_r`` (in float64, unrounded)."""
    return (tangent_decoder(model, lr, dtype, copies, **set_tangent_kwargs),
            tangent_decoder(model, lr.to_dense(torch.float64), dtype, copies))


@pytest.mark.parametrize("block_diagonal", [True, False])
@pytest.mark.parametrize("rank", [4, 16])
@pytest.mark.parametrize("dtype, rtol, atol", [(torch.float64, 1e-12, 1e-12), (torch.float32, 1e-4, 1e-4)])
def test_low_rank_tangent_matches_dense_reconstruction(setup, rank, dtype, rtol, atol, block_diagonal):
    """set_tangent(LowRankGradient) gives the logits and D of set_tangent(G_r): a prefill at every
    position, then decode steps through the tangent K/V cache; with the blocks' U_i merged into one
    block-diagonal matrix (all of a fused weight's blocks factored) or not (no padding allowed)."""
    model, gradient = setup
    lr = low_rank_gradient(gradient, rank)
    factored, dense = low_rank_decoders(model, lr, dtype, **({} if block_diagonal else dict(max_padding_bytes=0)))
    qkv = factored.tangent_weights["layers.0.wqkv"]
    assert isinstance(qkv, FactoredTangent) and isinstance(factored.tangent_weights["embed"], FactoredTangent)
    assert [u is None for u in qkv.u] == ([False] * 3 if rank == 4 else [False, True, True])
    merged = block_diagonal and rank == 4
    assert (qkv.block_diagonal is not None) == merged
    if merged:  # the U_i are the diagonal blocks of one matrix, zeros elsewhere
        rebuilt = torch.block_diag(*(u[0] for u in qkv.u))
        assert torch.equal(qkv.block_diagonal[0], rebuilt)
        assert all(u.untyped_storage().data_ptr() == qkv.block_diagonal.untyped_storage().data_ptr() for u in qkv.u)
    head, embed = factored.tangent_weights["lm_head"], factored.tangent_weights["embed"]
    assert isinstance(head, FactoredTangent) and (head.v is embed.v) == model.config.tie_word_embeddings
    for name, tangent in factored.tangent_weights.items():  # linear weights live in [W | V^T]
        if isinstance(tangent, FactoredTangent) and name != "embed":
            weight = factored.lm_head if name == "lm_head" else factored.get_parameter(name)
            assert weight.data_ptr() == tangent.stacked.data_ptr()
            assert torch.equal(tangent.stacked[:, weight.shape[1]:], tangent.v.transpose(1, 2))
    assert not any(isinstance(t, FactoredTangent) for t in dense.tangent_weights.values())
    rows = [random_tokens(7, 60), random_tokens(4, 61)]
    ids, lengths = right_padded(rows)
    slots = torch.tensor([1, 0])
    outputs = []
    for decoder in (factored, dense):
        decoder.setup_cache(2, 10)
        steps = [decoder.delta(ids, slots, lengths, last_only=False)]
        for step in range(2):
            steps.append(decoder.delta(torch.tensor(random_tokens(2, 70 + step))[:, None], slots))
        outputs.append(steps)
    real = mask_of(lengths, ids.shape[1]).bool()
    for step, ((logits, delta), (logits_ref, delta_ref)) in enumerate(zip(*outputs)):
        assert delta.dtype == delta_ref.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        if step == 0:  # padding positions of the prefill are unspecified
            logits, delta, logits_ref, delta_ref = (t[0][real] for t in (logits, delta, logits_ref, delta_ref))
        torch.testing.assert_close(logits, logits_ref, rtol=rtol, atol=atol)
        torch.testing.assert_close(delta, delta_ref, rtol=rtol, atol=atol * float(delta_ref.abs().max()))


def test_low_rank_tangent_is_shared_by_copies(setup):
    model, gradient = setup
    factored, dense = low_rank_decoders(model, low_rank_gradient(gradient, 4), torch.float64, copies=2)
    ids, lengths = right_padded([random_tokens(5, 80), random_tokens(3, 81)])
    results = []
    for decoder in (factored, dense):
        decoder.setup_cache(2, 6)
        results.append(decoder(ids, torch.arange(2), lengths, last_only=False, tangent=True)[1])
    torch.testing.assert_close(results[0][0], results[0][1], rtol=0, atol=0)
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-12 * float(results[1].abs().max()))


def tangent_numel_from_config(cfg: DecoderConfig, rank: int | None) -> int:
    """The numbers a tangent holds for this config: ``r (m + n)`` per ``[m, n]`` matrix with
    ``min(m, n) > r`` (every matrix dense when ``rank`` is None), ``m n`` per other matrix, every
    1-D entry in full; a tied head once."""
    e, i = cfg.hidden_size, cfg.intermediate_size
    hd, kvd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    matrices = [(cfg.vocab_size, e)] * (1 if cfg.tie_word_embeddings else 2)
    matrices += [(hd, e), (kvd, e), (kvd, e), (e, hd), (i, e), (i, e), (e, i)] * cfg.num_layers
    vectors = e + cfg.num_layers * (2 * e + (hd + 2 * kvd if cfg.qkv_bias else 0))
    return vectors + sum(rank * (m + n) if rank is not None and min(m, n) > rank else m * n for m, n in matrices)


@pytest.mark.parametrize("rank", [4, 16, 32])
def test_low_rank_tangent_numel(setup, rank):
    """The stored factored tangent holds the r (m + n) numbers the config predicts, fewer than dense
    (rank 32 >= every min(m, n) of the tiny configs: nothing is factored)."""
    model, gradient = setup
    lr = low_rank_gradient(gradient, rank)
    factored, dense = low_rank_decoders(model, lr, torch.float32)
    expected, full = tangent_numel_from_config(factored.config, rank), tangent_numel_from_config(factored.config, None)
    assert factored.tangent_numel() == expected == lr.numel()
    assert dense.tangent_numel() == full
    assert (expected < full) == (rank < 32)


@pytest.mark.parametrize("layout", ["pair buffer", "pair buffer, two copies", "row slices", "separate"])
def test_primal_tangent_rows(layout):
    """Primal rows then tangent rows, per copy: a view exactly where the memory already lies that way
    (the fused jvp kernels' one-copy outputs, linear_jvp's own outputs), else a copy; same values."""
    g = torch.Generator().manual_seed(0)
    if layout.startswith("pair buffer"):
        copies = 2 if layout.endswith("two copies") else 1
        x, dx = torch.randn(2, copies, 3, 5, generator=g)
    elif layout == "row slices":
        buffer = torch.randn(2, 6, 7, generator=g)
        x, dx = buffer[:, :3, :5], buffer[:, 3:, :5]
    else:
        x, dx = torch.randn(1, 3, 5, generator=g), torch.randn(1, 3, 5, generator=g)
    rows = primal_tangent_rows(x, dx)
    assert torch.equal(rows, torch.cat((x, dx), dim=1))
    is_view = rows.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    assert is_view == (layout in ("pair buffer", "row slices"))


@pytest.mark.parametrize("block_diagonal", [True, False])
def test_linear_jvp_defers_a_single_product(setup, block_diagonal):
    """With ``defer``, a factored tangent that is one product ``z U^T`` (block-diagonal ``U``, or one
    block) comes back as a term instead of being added: ``dy + z U^T`` equals the tangent added in
    place; several separate blocks, dense tangents and ranks above LOW_RANK_MAX_RANK are added."""
    model, gradient = setup
    kwargs = {} if block_diagonal else dict(max_padding_bytes=0)
    decoder = tangent_decoder(model, low_rank_gradient(gradient, 4), torch.float64, **kwargs)
    layer, tangents = decoder.layers[0], decoder.tangent_weights
    x, dx = torch.randn(2, 1, 3, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    deferred = {}
    for name, weight in [("wqkv", layer.wqkv), ("wo", layer.wo), ("w_gate_up", layer.w_gate_up)]:
        y, dy, term = linear_jvp(x, dx, weight, tangents[f"layers.0.{name}"], defer=True)
        y_ref, dy_ref = linear_jvp(x, dx, weight, tangents[f"layers.0.{name}"])
        deferred[name] = term is not None
        assert torch.equal(y, y_ref)
        torch.testing.assert_close(dy if term is None else term.added_to(dy), dy_ref, rtol=1e-12, atol=1e-12)
    assert deferred == dict(wqkv=block_diagonal, wo=True, w_gate_up=block_diagonal)
    assert tangents["layers.0.wo"].whole_u.stride()[1:] == (1, 32)  # U^T contiguous: the kernels read along m
    dense = tangent_decoder(model, gradient, torch.float64)  # a dense G: nothing to defer
    assert linear_jvp(x, dx, layer.wo, dense.tangent_weights["layers.0.wo"], defer=True)[2] is None
    rank = LOW_RANK_MAX_RANK + 1
    wide = FactoredTangent.from_blocks([(torch.randn(32, rank), torch.randn(32, rank))], 1, torch.float64, "cpu")
    assert linear_jvp(x, dx, layer.wo, wide, defer=True)[2] is None
