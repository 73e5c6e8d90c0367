"""adfast: antidistillation sampling fast enough to leave on (Savani et al., arXiv:2504.13146)."""
from .engine import Engine, GenerationResult
from .gradient import ProxyGradient, load_gradient, proxy_gradient, save_gradient
from .proxy_pair import ProxyPair
from .sampling import MODES, adjusted_logits, sample, top_k_top_p_mask

__all__ = [
    "MODES", "Engine", "GenerationResult", "ProxyGradient", "ProxyPair", "adjusted_logits", "load_gradient",
    "proxy_gradient", "sample", "save_gradient", "top_k_top_p_mask",
]
__version__ = "0.1.0"
