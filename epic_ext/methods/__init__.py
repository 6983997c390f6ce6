"""Token-reduction methods, one file each, found by name through a registry.

    from epic_ext.methods import get_method, available_methods
    spec = get_method("dart")            # MethodSpec(name, stage, config_cls, fn)
    cfg = spec.make_config(keep=64, layer=2)

Each method file registers itself with :func:`register_method`; the model integration
(``epic_ext.models``) calls ``spec.fn(context, cfg)`` at the right place of the forward.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, fields
from typing import Callable

from .base import (LLMContext, LLMMethodConfig, LLMSelection, MethodConfig, VisionContext,
                   VisionReduction, VisionUnitsContext)

_REGISTRY: dict[str, "MethodSpec"] = {}
_LOADED = False


@dataclass(frozen=True)
class MethodSpec:
    name: str
    stage: str                 # "vision" (before the projector) or "llm" (before decoder layer K)
    config_cls: type
    fn: Callable
    no_cls: bool = False       # a vision method that also takes a VisionUnitsContext (encoders without [CLS])

    def has_option(self, name: str) -> bool:
        return any(f.name == name for f in fields(self.config_cls))

    def make_config(self, **options) -> MethodConfig:
        known = {f.name for f in fields(self.config_cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"method {self.name!r} has no option(s) {unknown}; its options are {sorted(known)}")
        cfg = self.config_cls(**options)
        validate = getattr(cfg, "validate", None)
        if validate is not None:
            validate()
        return cfg


def register_method(name: str, stage: str, config_cls: type, *, no_cls: bool = False):
    """Register ``fn(context, cfg)`` as method ``name``. ``no_cls``: a vision method whose ``fn``
    also ranks a :class:`VisionUnitsContext` (an encoder without [CLS], e.g. Qwen-VL's)."""
    if stage not in ("vision", "llm"):
        raise ValueError(f"stage must be 'vision' or 'llm', got {stage!r}")

    def deco(fn):
        _REGISTRY[name] = MethodSpec(name, stage, config_cls, fn, no_cls=no_cls)
        return fn
    return deco


def _load_all() -> None:
    # Every module of this package except base is a method; imported on first lookup so that
    # importing epic_ext stays cheap.
    global _LOADED
    if _LOADED:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    _LOADED = True


def available_methods() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    if not isinstance(name, str):
        raise TypeError(f"method must be a method name (str), got {type(name).__name__}")
    _load_all()
    key = name.lower().replace("-", "_").replace("+", "_plus")
    if key not in _REGISTRY:
        raise ValueError(f"method: unknown method {name!r}; available: {sorted(_REGISTRY)}")
    return _REGISTRY[key]


__all__ = ["LLMContext", "LLMMethodConfig", "LLMSelection", "MethodConfig", "MethodSpec",
           "VisionContext", "VisionReduction", "VisionUnitsContext", "available_methods", "get_method", "register_method"]
