"""Triton kernels of adfast (installed as ``adfast.kernels``). Each op sits in its own module
beside its launcher; :mod:`adfast.reference` holds the PyTorch twin of each."""
from .adjusted_logits import adjusted_logits
from .fused_sample import fused_sample
from .permutation import permutation_and_sign

__all__ = ["adjusted_logits", "fused_sample", "permutation_and_sign"]
