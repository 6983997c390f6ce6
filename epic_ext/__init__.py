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

# The model-level API imports transformers; load it on first use so `import epic_ext` stays light.
_LAZY = {"apply": ("models", "apply"), "revert": ("models", "revert"), "infer": ("inference", "infer"),
         "available_methods": ("methods", "available_methods")}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{mod}", __name__), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Compressed", "IQRSelection", "apply", "attn_scores", "available_methods", "backends", "compress",
           "fused_linear_kl", "gather_merge", "infer", "revert",
           "iqr_select", "kl_div", "reference", "resolve_k", "select_topk", "use_backend"]
