"""Average-pooling baseline: 2D average pooling of the image grid to exactly ``keep`` tokens.

The image span's hidden states (``ctx.image_hidden()``, row-major on ``ctx.grid`` = (gh, gw))
are pooled to an (h, w) grid with ``h * w == keep`` using the windows of
``torch.nn.functional.adaptive_avg_pool2d``: output cell (i, j) averages rows
[floor(i*gh/h), ceil((i+1)*gh/h)) and columns [floor(j*gw/w), ceil((j+1)*gw/w)). The mean is
taken in fp32 and cast back to the hidden dtype. Output tokens are in row-major order.

Grid rule. With ``grid=(h, w)`` given, it is used as is (h*w must equal the budget). Otherwise
among the factor pairs h * w = keep with h <= gh and w <= gw (no window smaller than one token,
so no token is repeated) the one closest to square is taken (smallest |h - w|; then the aspect
closest to the grid's, then the smaller h): 64 -> 8x8, 128 -> 8x16, 7 -> 1x7, 576 -> 24x24
(identity). A budget with no such pair raises ValueError: on the 24x24 grid e.g. a prime above 24
(29, 31, ...) or 575 = 23*25. ``keep = 0`` gives an empty selection.

Positions. Each pooled token stands at the floor of the mean of its window's token indices
(index = row * gw + col, inside the image span), i.e. floor(mean_row * gw + mean_col). These
representative positions increase strictly in row-major order (windows never shrink below one
token), so ``LLMSelection.index`` is ascending and, when ``layer >= 1``, the pooled tokens keep
position ids inside their windows.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from . import register_method
from .base import LLMContext, LLMMethodConfig, LLMSelection
from .fastv import _check_keep


@dataclass
class PoolingConfig(LLMMethodConfig):
    """Options of the pooling baseline.

    * ``keep``: image tokens kept per image (int count or float fraction of N); may be None when
      ``grid`` is given (the budget is then h * w).
    * ``layer``: K, tokens are pooled just before decoder layer K; default 0 (before the LLM).
    * ``grid``: (h, w) output grid; None: the factor pair of ``keep`` closest to square that fits
      the image grid (see the module notes).
    """
    layer: int = 0
    grid: Optional[tuple[int, int]] = None

    def resolved_keep(self, n: int) -> int:
        if self.keep is None and self.grid is not None:
            return int(self.grid[0]) * int(self.grid[1])
        return super().resolved_keep(n)

    def validate(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, numbers.Integral) or self.layer < 0:
            raise ValueError(f"layer: must be an int >= 0, got {self.layer!r}")
        _check_keep(self.keep)
        if self.grid is not None:
            g = self.grid
            if not isinstance(g, (tuple, list)) or len(g) != 2 or any(
                    isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in g):
                raise ValueError(f"grid: must be a pair (h, w) of ints >= 1, got {g!r}")
            if isinstance(self.keep, numbers.Integral) and self.keep != g[0] * g[1]:
                raise ValueError(f"grid: {tuple(g)} holds {g[0] * g[1]} tokens but keep = {self.keep}")


def choose_grid(keep: int, gh: int, gw: int) -> tuple[int, int]:
    """The factor pair (h, w) of ``keep`` closest to square with h <= gh and w <= gw."""
    pairs = [(h, keep // h) for h in range(1, keep + 1) if keep % h == 0 and h <= gh and keep // h <= gw]
    if not pairs:
        raise ValueError(f"keep: {keep} tokens cannot be laid out as an h x w grid with h <= {gh} and "
                         f"w <= {gw} (it has no such factor pair); choose another keep or give grid=(h, w)")
    return min(pairs, key=lambda p: (abs(p[0] - p[1]), abs(p[0] * gw - p[1] * gh), p[0]))


def representative_positions(gh: int, gw: int, h: int, w: int, device=None) -> torch.Tensor:
    """[h*w] int64 floor(mean token index) of every adaptive-pooling window, row-major. Built with
    device arithmetic: copying a host list to a GPU would synchronise the stream."""
    def bounds(out: int, size: int):
        i = torch.arange(out, device=device)
        return (i * size) // out, ((i + 1) * size + out - 1) // out     # [floor, ceil) as in the op
    r0, r1 = bounds(h, gh)
    c0, c1 = bounds(w, gw)
    # mean row = (r0 + r1 - 1) / 2 and mean col = (c0 + c1 - 1) / 2, floored exactly in integers.
    return (((r0 + r1 - 1)[:, None] * gw + (c0 + c1 - 1)[None, :]) // 2).flatten()


@register_method("pooling", "llm", PoolingConfig)
def pooling(ctx: LLMContext, cfg: PoolingConfig) -> LLMSelection:
    n = ctx.num_image_tokens
    gh, gw = (int(v) for v in ctx.grid)
    if gh * gw != n:
        raise ValueError(f"pooling: the image grid {gh}x{gw} does not hold the {n} image tokens")
    keep = cfg.resolved_keep(n)
    hidden = ctx.hidden
    B, D = ctx.num_units, hidden.shape[-1]
    if cfg.grid is not None:
        h, w = int(cfg.grid[0]), int(cfg.grid[1])
        if h * w != keep:
            raise ValueError(f"grid: {(h, w)} holds {h * w} tokens but the budget is {keep}")
        if h > gh or w > gw:
            raise ValueError(f"grid: {(h, w)} is larger than the image grid {(gh, gw)}")
    elif keep == 0:
        return LLMSelection(torch.empty(B, 0, dtype=torch.int64, device=hidden.device),
                            hidden.new_empty(B, 0, D))
    else:
        h, w = choose_grid(keep, gh, gw)
    x = ctx.image_hidden().float().view(B, gh, gw, D).permute(0, 3, 1, 2)
    pooled = F.adaptive_avg_pool2d(x, (h, w)).flatten(2).transpose(1, 2).to(hidden.dtype)   # [B, h*w, D]
    index = representative_positions(gh, gw, h, w, device=hidden.device)
    return LLMSelection(index.expand(B, -1), pooled.contiguous())
