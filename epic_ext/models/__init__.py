"""Applying a token-reduction method to a model in one call.

    import epic_ext
    epic_ext.apply(model, method="dart", keep=64, layer=2)
    out = model.generate(**inputs)          # reduced prefill, per-layer KV cache
    epic_ext.revert(model)                  # the original forward again

Architectures are found by ``config.model_type`` in a registry, so more can be added with
:func:`register_architecture`.
"""
from __future__ import annotations

from typing import Callable

from ..methods import get_method

_ARCHITECTURES: dict[str, tuple[Callable, Callable]] = {}


def register_architecture(model_type: str, apply_fn: Callable, revert_fn: Callable) -> None:
    _ARCHITECTURES[model_type] = (apply_fn, revert_fn)


def _arch(model):
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in _ARCHITECTURES:
        raise ValueError(f"model: no token-reduction integration for model_type {model_type!r}; "
                         f"supported: {sorted(_ARCHITECTURES)}")
    return _ARCHITECTURES[model_type]


def apply(model, method: str = "dart", keep=None, **options):
    """Make ``model`` reduce its visual tokens with ``method`` (see
    ``epic_ext.methods.available_methods()``); ``keep`` is the visual-token budget (a count or a
    ratio; None: the method's adaptive default), other options go to the method's config
    (e.g. ``layer`` for in-LLM methods). Applying again replaces the previous method."""
    apply_fn, _ = _arch(model)
    spec = get_method(method)
    if spec.stage == "vision" and "layer" in options and not spec.has_option("layer"):
        raise ValueError(f"layer: {spec.name} reduces before the projector and has no layer option")
    cfg = spec.make_config(keep=keep, **options)
    revert(model)
    apply_fn(model, spec, cfg)
    return model


def revert(model):
    """Undo :func:`apply` (a no-op on a model without a method)."""
    _, revert_fn = _arch(model)
    revert_fn(model)
    return model


def applied_method(model):
    """(MethodSpec, config) of the applied method, or None."""
    red = getattr(model, "_epic", None)
    return None if red is None else (red.spec, red.cfg)


def _register_builtin() -> None:
    from . import llava
    register_architecture("llava", llava.apply, llava.revert)


_register_builtin()

__all__ = ["applied_method", "apply", "register_architecture", "revert"]
