"""epic-ext: fused visual-token compression kernels and EPIC consistency distillation for
LLaVA-style multimodal LLMs.

    import epic_ext
    out = epic_ext.compress(tokens, scores, k=128)   # Compressed(tokens, indices, counts)

Kernels run on the best backend for the tensors' device (C++ CPU, CUDA, Triton, or the
pure-PyTorch reference); `epic_ext.backends()` says which are available and why not.
"""
__version__ = "0.1.0"

# Every public name loads on first use (PEP 562), so `import epic_ext` (and the `epic-ext`
# command, whose --help must not wait for torch) stays light; `epic_ext.compress` etc. work as
# plain attributes, and the ops are registered with torch.library when their module loads.
_LAZY = {
    "backends": ("_backend", "backends"), "use_backend": ("_backend", "use_backend"),
    "attn_scores": ("attn", "attn_scores"),
    "fused_linear_kl": ("kl_linear", "fused_linear_kl"), "kl_div": ("kl", "kl_div"),
    **{name: ("ops", name) for name in ("Compressed", "IQRSelection", "compress", "gather_merge",
                                         "iqr_select", "resolve_k", "select_topk")},
    "apply": ("models", "apply"), "revert": ("models", "revert"), "infer": ("inference", "infer"),
    "available_methods": ("methods", "available_methods"),
}
_SUBMODULES = ("reference", "ops", "kl", "kl_linear", "attn", "cost", "inference", "machine", "methods", "models",
               "train", "triton", "cli")


def __getattr__(name):
    import importlib
    if name in _LAZY:
        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{mod}", __name__), attr)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))


__all__ = ["Compressed", "IQRSelection", "apply", "attn_scores", "available_methods", "backends", "compress",
           "fused_linear_kl", "gather_merge", "infer", "revert",
           "iqr_select", "kl_div", "reference", "resolve_k", "select_topk", "use_backend"]
