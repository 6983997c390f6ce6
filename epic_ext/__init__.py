"""epic-ext: fused visual-token compression kernels and EPIC consistency distillation for
LLaVA-style multimodal LLMs.

    import epic_ext
    out = epic_ext.compress(tokens, scores, k=128)   # Compressed(tokens, indices, counts)

Kernels run on the best backend for the tensors' device (C++ CPU, CUDA, Triton, or the
pure-PyTorch reference); `epic_ext.backends()` says which are available and why not.
"""
from . import reference
from ._backend import backends, use_backend
from .attn import attn_scores
from .kl import fused_linear_kl, kl_div
from .ops import (Compressed, IQRSelection, compress, gather_merge, iqr_select, resolve_k,
                  select_topk)

__version__ = "0.1.0"

__all__ = ["Compressed", "IQRSelection", "attn_scores", "backends", "compress", "fused_linear_kl", "gather_merge",
           "iqr_select", "kl_div", "reference", "resolve_k", "select_topk", "use_backend"]
