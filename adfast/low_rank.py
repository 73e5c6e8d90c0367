"""Low-rank proxy gradients: every weight-matrix gradient ``G [m, n]`` kept as its top-``r`` SVD factors.

The exact directional derivative ``D`` (:mod:`adfast.exact_delta`) pushes the tangent ``g`` through
the proxy: for a linear layer ``y = W x`` (``W [m, n]``, gradient ``G [m, n]``) the tangent of
``y`` is ``G x + W dx``. With the rank-``r`` truncation ``G_r = U V^T`` (``U [m, r]`` with the
singular values folded in, ``V [n, r]``) the term ``G_r x`` is ``U (V^T x)``: the tangent weights
cost ``r (m + n)`` numbers per matrix instead of ``m n`` (memory and bandwidth per step), and the
matmul ``r (m + n)`` multiply-adds per token instead of ``m n``. For the embedding
(``G [vocab, E]``) the tangent of token ``t``'s row is ``U[t] V^T``: ``r`` numbers gathered, then
``r E`` multiply-adds. :meth:`adfast.decoder.Decoder.set_tangent` takes a :class:`LowRankGradient`
and keeps it factored this way (:class:`adfast.tangent.FactoredTangent`), and so does
``Engine(delta="jvp", gradient=...)`` given one or its file. ``G_r`` is the best rank-``r``
approximation of ``G`` in Frobenius norm (Eckart-Young), with error
``||G - G_r||_F^2 = sum_{i > r} sigma_i^2``.

Because ``D`` is linear in ``g``, ``D(G_r)`` is exactly the ``D`` of the dense reconstruction
(:meth:`LowRankGradient.to_dense`), and ``D(G) - D(G_r) = D(G - G_r)``: how much of ``D``'s direction
survives the truncation is what ``bench/low_rank_fidelity.py`` measures.

What is factored: every 2-D gradient with ``min(m, n) > rank``. 1-D gradients (norm weights,
biases) and matrices with ``min(m, n) <= rank`` (where the factors would be no smaller than the
matrix and the truncation is exact anyway) are kept dense.

Stored as safetensors (:func:`save_low_rank_gradient`): keys ``<name>.U`` and ``<name>.V`` for the
factors, dense gradients under their own names, string metadata (format, rank, model id, loss);
never pickle.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .gradient import ProxyGradient, metadata_fields, read_tensor_file, signature_field

FORMAT = "adfast.low_rank_gradient"
FORMAT_VERSION = "1"
_FACTOR_SUFFIXES = (".U", ".V")


@dataclass
class LowRankGradient:
    """A :class:`ProxyGradient` with its weight matrices truncated to rank ``rank``.

    ``factors``: name -> ``(U [m, r], V [n, r])`` float32, ``G_r = U @ V.T`` (singular values folded
    into ``U``); ``dense``: name -> float32 tensor for 1-D gradients and matrices with
    ``min(m, n) <= rank``; ``rank``; ``model_id``, ``loss``, ``num_examples``, ``num_tokens``,
    ``weights_signature`` as in the source :class:`ProxyGradient`.
    """

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    dense: dict[str, torch.Tensor]
    rank: int
    model_id: str
    loss: float
    num_examples: int
    num_tokens: int
    order: list[str] = field(default_factory=list)
    weights_signature: str | None = None

    def names(self) -> list[str]:
        """Parameter names in the source gradient's order (factored and dense together)."""
        known = set(self.factors) | set(self.dense)
        ordered = [name for name in self.order if name in known]
        return ordered + sorted(known - set(ordered))

    def to_dense(self, dtype: torch.dtype = torch.float32) -> ProxyGradient:
        """The :class:`ProxyGradient` of ``G_r``: each factored matrix reconstructed as ``U @ V.T``
        (in float64, then rounded to ``dtype``; float64 keeps ``G_r`` of the float32 factors exact)."""
        grads = {}
        for name in self.names():
            if name in self.factors:
                u, v = self.factors[name]
                grads[name] = (u.double() @ v.double().T).to(dtype)
            else:
                grads[name] = self.dense[name].to(dtype, copy=True)
        return ProxyGradient(grads=grads, loss=self.loss, num_examples=self.num_examples,
                             num_tokens=self.num_tokens, model_id=self.model_id,
                             weights_signature=self.weights_signature)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """name -> shape of the gradient it stands for: ``(m, n)`` for factors ``(U [m, r], V [n, r])``."""
        return ({name: (u.shape[0], v.shape[0]) for name, (u, v) in self.factors.items()}
                | {name: tuple(g.shape) for name, g in self.dense.items()})

    def numel(self) -> int:
        """Numbers stored: ``r (m + n)`` per factored matrix plus every dense element."""
        return (sum(u.numel() + v.numel() for u, v in self.factors.values())
                + sum(g.numel() for g in self.dense.values()))

    def dense_numel(self) -> int:
        """Numbers of the dense counterpart: ``m n`` per matrix plus every dense element."""
        return (sum(u.shape[0] * v.shape[0] for u, v in self.factors.values())
                + sum(g.numel() for g in self.dense.values()))

    def bytes(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes of the tangent held in ``dtype`` (factors plus dense parts)."""
        return self.numel() * _itemsize(dtype)

    def dense_bytes(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes of the dense gradient ``G`` in ``dtype``."""
        return self.dense_numel() * _itemsize(dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _check_rank(rank) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    return rank


def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U S, V)`` of the top-``rank`` SVD of ``matrix [m, n]``, float32 factors (exact SVD in float64)."""
    rank = _check_rank(rank)
    if matrix.dim() != 2:
        raise ValueError(f"truncated_svd needs a matrix, got shape {tuple(matrix.shape)}")
    u, s, vh = torch.linalg.svd(matrix.detach().to("cpu", torch.float64), full_matrices=False)
    r = min(rank, s.numel())
    return (u[:, :r] * s[:r]).float().contiguous(), vh[:r].T.float().contiguous()


def low_rank_gradient(gradient: ProxyGradient, rank: int) -> LowRankGradient:
    """``gradient`` with every 2-D entry of ``min(m, n) > rank`` replaced by its top-``rank`` SVD factors.

    The rest (1-D entries, smaller matrices) stays dense. See the module docstring for the cost.
    """
    rank = _check_rank(rank)
    if not isinstance(gradient, ProxyGradient):
        raise TypeError(f"gradient must be a ProxyGradient, got {type(gradient).__name__}")
    factors, dense = {}, {}
    for name, g in gradient.grads.items():
        if g.dim() == 2 and min(g.shape) > rank:
            factors[name] = truncated_svd(g, rank)
        else:
            dense[name] = g.detach().to("cpu", torch.float32).clone()
    return LowRankGradient(factors=factors, dense=dense, rank=rank, model_id=gradient.model_id,
                           loss=float(gradient.loss), num_examples=int(gradient.num_examples),
                           num_tokens=int(gradient.num_tokens), order=list(gradient.grads),
                           weights_signature=gradient.weights_signature)


def captured_energy(gradient: ProxyGradient, lr: LowRankGradient) -> dict[str, float]:
    """Per factored matrix, ``||G_r||_F^2 / ||G||_F^2`` (1 for a zero matrix).

    ``G_r`` is an orthogonal projection of ``G``, so this is also ``1 - ||G - G_r||_F^2 / ||G||_F^2``.
    Dense entries are exact (energy 1) and not listed; :func:`total_energy` weighs everything.
    """
    energy = {}
    for name, (u, v) in lr.factors.items():
        full = float(gradient.grads[name].double().pow(2).sum())
        # ||U V^T||_F^2 = trace((U^T U)(V^T V)); V has orthonormal columns, so this is ||U||_F^2.
        kept = float(((u.double().T @ u.double()) * (v.double().T @ v.double())).sum())
        energy[name] = 1.0 if full == 0 else kept / full
    return energy


def total_energy(gradient: ProxyGradient, lr: LowRankGradient) -> float:
    """``||G_r||^2 / ||G||^2`` over the whole gradient (dense entries count in full)."""
    per = captured_energy(gradient, lr)
    full = kept = 0.0
    for name, g in gradient.grads.items():
        norm2 = float(g.double().pow(2).sum())
        full += norm2
        kept += norm2 * per.get(name, 1.0)
    return 1.0 if full == 0 else kept / full


def save_low_rank_gradient(path, lr: LowRankGradient) -> None:
    """Write ``lr`` as safetensors: ``<name>.U`` / ``<name>.V`` float32 factors, dense entries by name."""
    tensors = {}
    for name, (u, v) in lr.factors.items():
        tensors[name + ".U"] = u.detach().to("cpu", torch.float32).contiguous()
        tensors[name + ".V"] = v.detach().to("cpu", torch.float32).contiguous()
    for name, g in lr.dense.items():
        if name.endswith(_FACTOR_SUFFIXES):
            raise ValueError(f"dense entry {name!r} ends in .U/.V, which would read back as a factor")
        tensors[name] = g.detach().to("cpu", torch.float32).contiguous()
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "rank": str(int(lr.rank)),
                "model_id": lr.model_id, "loss": repr(float(lr.loss)), "num_examples": str(int(lr.num_examples)),
                "num_tokens": str(int(lr.num_tokens)), "order": "\n".join(lr.names())}
    if lr.weights_signature is not None:
        metadata["weights_signature"] = lr.weights_signature
    save_file(tensors, str(path), metadata=metadata)


def is_low_rank_file(path) -> bool:
    """Whether ``path`` is a safetensors file whose metadata names the low-rank format (reads the header only)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except (SafetensorError, OSError):
        return False


def load_low_rank_gradient(path) -> LowRankGradient:
    """Read a file written by :func:`save_low_rank_gradient`; anything else raises ``ValueError``."""
    tensors, metadata = read_tensor_file(path, FORMAT, FORMAT_VERSION, "low-rank gradient",
                                         "save_low_rank_gradient")
    with metadata_fields(path):
        fields = dict(rank=int(metadata["rank"]), model_id=metadata["model_id"], loss=float(metadata["loss"]),
                      num_examples=int(metadata["num_examples"]), num_tokens=int(metadata["num_tokens"]),
                      weights_signature=signature_field(metadata))
    rank = fields["rank"]
    factors, dense = {}, {}
    for key, t in tensors.items():
        if key.endswith(".U"):
            name = key[:-2]
            if name + ".V" not in tensors:
                raise ValueError(f"{path}: factor {key!r} has no matching {name + '.V'!r}")
            u, v = t, tensors[name + ".V"]
            if u.dim() != 2 or v.dim() != 2 or u.shape[1] != rank or v.shape[1] != rank:
                raise ValueError(f"{path}: factors of {name!r} are U {tuple(u.shape)}, V {tuple(v.shape)}; "
                                 f"the file's rank is {rank} (U [m, {rank}], V [n, {rank}])")
            if name in tensors:
                raise ValueError(f"{path}: {name!r} is stored both as factors and dense")
            factors[name] = (u, v)
        elif key.endswith(".V"):
            if key[:-2] + ".U" not in tensors:
                raise ValueError(f"{path}: factor {key!r} has no matching {key[:-2] + '.U'!r}")
        else:
            dense[key] = t
    order = metadata["order"].split("\n") if metadata.get("order") else []
    return LowRankGradient(factors=factors, dense=dense, order=order, **fields)


__all__ = ["LowRankGradient", "captured_energy", "is_low_rank_file", "load_low_rank_gradient",
           "low_rank_gradient", "save_low_rank_gradient", "total_energy", "truncated_svd"]
