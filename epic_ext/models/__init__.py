"""Applying a token-reduction method to a model in one call.

    import epic_ext
    epic_ext.apply(model, method="dart", keep=64, layer=2)
    out = model.generate(**inputs)          # reduced prefill, per-layer KV cache
    epic_ext.revert(model)                  # the original forward again

Architectures are found by ``config.model_type`` in a registry, so more can be added with
:func:`register_adapter` (the contract: ``epic_ext/models/adapter.py``).
"""
from __future__ import annotations

import types

from ..methods import get_method
from .adapter import Adapter

_ADAPTERS: dict[str, Adapter] = {}


def register_adapter(adapter: Adapter) -> None:
    """Make ``apply`` support every ``config.model_type`` in ``adapter.model_types``."""
    for model_type in adapter.model_types:
        _ADAPTERS[model_type] = adapter


def adapter_of(model) -> Adapter:
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in _ADAPTERS:
        raise ValueError(f"model: no token-reduction integration for model_type {model_type!r}; "
                         f"supported: {sorted(_ADAPTERS)}")
    return _ADAPTERS[model_type]


def apply(model, method: str = "dart", keep=None, **options):
    """Make ``model`` reduce its visual tokens with ``method`` (see
    ``epic_ext.methods.available_methods()``); ``keep`` is the visual-token budget of every image
    and every video frame group (a count or a ratio; None: the method's adaptive default), other
    options go to the method's config (e.g. ``layer`` for in-LLM methods). Applying again
    replaces the previous method."""
    from .decoder import text_modules
    from .forward import Reduction, reduced_forward
    adapter = adapter_of(model)
    spec = get_method(method)
    if spec.stage == "vision" and "layer" in options and not spec.has_option("layer"):
        raise ValueError(f"layer: {spec.name} reduces before the projector and has no layer option")
    cfg = spec.make_config(keep=keep, **options)
    revert(model)
    adapter.check(model, spec)
    layer = getattr(cfg, "layer", 0) if spec.stage == "llm" else 0
    n_layers = len(text_modules(adapter.language_model(model)))
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer: must be in [0, {n_layers}) for this model, got {layer}")
    model._epic = Reduction(spec=spec, cfg=cfg, layer=layer, adapter=adapter)
    model.forward = types.MethodType(reduced_forward, model)
    return model


def revert(model):
    """Undo :func:`apply` (a no-op on a model without a method)."""
    adapter_of(model)
    model.__dict__.pop("_epic", None)
    model.__dict__.pop("forward", None)
    return model


def applied_method(model):
    """(MethodSpec, config) of the applied method, or None."""
    red = getattr(model, "_epic", None)
    return None if red is None else (red.spec, red.cfg)


def _register_builtin() -> None:
    from .llava import LlavaAdapter
    from .qwen_vl import QwenVLAdapter
    register_adapter(LlavaAdapter())
    register_adapter(QwenVLAdapter())


_register_builtin()

__all__ = ["Adapter", "adapter_of", "applied_method", "apply", "register_adapter", "revert"]
