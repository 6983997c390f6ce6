"""The identity method: every token goes on. Patched and unpatched models must agree exactly."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import register_method
from .base import LLMContext, LLMMethodConfig, LLMSelection


@dataclass
class NoneConfig(LLMMethodConfig):
    layer: int = 0


@register_method("none", "llm", NoneConfig)
def keep_all(ctx: LLMContext, cfg: NoneConfig) -> LLMSelection:
    b, n = ctx.num_units, ctx.num_image_tokens
    return LLMSelection(torch.arange(n, device=ctx.hidden.device).expand(b, n))
