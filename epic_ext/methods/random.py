"""Random baseline: a uniformly random subset of exactly ``keep`` image tokens per image.

Each row draws N i.i.d. float64 uniforms and keeps the positions of its ``keep`` smallest: the
first ``keep`` entries of a uniformly random permutation, i.e. a uniformly random subset. float64
makes ties (which would favour low positions) about 1e-13 likely for N = 576; the fp32
``select_topk`` kernels would see one in about 1% of rows, hence a device argsort here. Positions
are returned in ascending (spatial) order. No host sync.

Randomness and determinism:

* ``seed`` set: a fresh ``torch.Generator`` on the hidden states' device is seeded with it at
  every call (``ctx.generator`` is then ignored), so every call with the same seed, batch shape
  and device selects the same subsets. CPU and CUDA generators give different streams.
* ``seed`` None: ``LLMContext.generator`` when given (seed it once for a reproducible sequence of
  different draws). A generator on another device than the hidden states draws there and the
  draw is copied over (a host-to-device copy; give a generator on the hidden states' device to
  avoid it). Without a generator: the device's global RNG (``torch.manual_seed``).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional

import torch

from . import register_method
from .base import LLMContext, LLMMethodConfig, LLMSelection
from .fastv import _check_keep


@dataclass
class RandomConfig(LLMMethodConfig):
    """Options of the random baseline.

    * ``keep``: image tokens kept per image (int count or float fraction of N); required.
    * ``layer``: K, tokens are dropped just before decoder layer K; default 0 (before the LLM).
    * ``seed``: int seed for a per-call generator (see the module notes); None: ``ctx.generator``
      or the global RNG.
    """
    layer: int = 0
    seed: Optional[int] = None

    def validate(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, numbers.Integral) or self.layer < 0:
            raise ValueError(f"layer: must be an int >= 0, got {self.layer!r}")
        _check_keep(self.keep)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)):
            raise ValueError(f"seed: must be an int or None, got {self.seed!r}")


def _generator(ctx: LLMContext, cfg: RandomConfig) -> Optional[torch.Generator]:
    if cfg.seed is None:
        return ctx.generator
    gen = torch.Generator(device=ctx.hidden.device)
    gen.manual_seed(int(cfg.seed))
    return gen


@register_method("random", "llm", RandomConfig)
def random_select(ctx: LLMContext, cfg: RandomConfig) -> LLMSelection:
    b, n = ctx.num_units, ctx.num_image_tokens
    keep = cfg.resolved_keep(n)
    gen = _generator(ctx, cfg)
    dev = ctx.hidden.device if gen is None else gen.device
    u = torch.rand(b, n, generator=gen, device=dev, dtype=torch.float64)
    perm = torch.argsort(u.to(ctx.hidden.device), dim=1)
    return LLMSelection(perm[:, :keep].sort(dim=1).values)
