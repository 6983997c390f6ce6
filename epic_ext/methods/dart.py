"""DART (Wen et al., 2025, "Stop looking for important tokens ... duplication matters more"),
batched, with an exact token budget.

Just before decoder layer K (``layer``, default 2):

1. Pivots. With ``k`` = layer K-1's post-RoPE keys, heads concatenated, each token's score is
   the L1 norm of its key. The ``pivot_image`` image tokens with the largest norm are image
   pivots (they are kept); the ``pivot_text`` text tokens after the image with the largest norm
   are text pivots (they are not image tokens, so they are never kept).
2. Greedy de-duplication. On ``final_norm(hidden)`` (the LLM's final norm applied to layer K-1's
   output, upcast to fp32), each pivot in turn takes, among the image tokens not yet kept, those
   with the lowest cosine similarity to it.

Exact, batched budget (the published code keeps 4 + 8 * ceil(budget / 8), e.g. 132 for 128, and
runs one sample at a time): kept = the image pivots + ``budget - #image pivots`` greedy picks,
split over the valid pivots as evenly as possible, the first pivots taking one more when it does
not divide. A budget below ``pivot_image`` keeps the ``budget`` image tokens of largest norm and
nothing else. Every row keeps exactly ``cfg.resolved_keep(N)`` tokens.

Readings of points the published code leaves open (batch size 1, no padding, prompt only):

* Text candidates are the real tokens after the image span up to the last prompt token
  (``query_index``) inclusive: later tokens (answers under teacher forcing, right padding) are
  not prompt text and would make training and inference select differently. With several
  visual units in a row (several images, a video's frame groups), each unit is reduced on its
  own budget and its text candidates exclude every visual token (the published Qwen2-VL code
  handles the first image only; its candidates are all tokens after that image's span).
* A row with fewer than ``pivot_text`` such tokens (short prompt) has that many text pivots: the
  missing ones are masked out and their share of the budget goes to the remaining pivots.
* Pivot order (who goes first in the greedy loop, who gets the remainder): image pivots in
  ascending position, then text pivots in ascending position (the published code walks a Python
  set, whose order is arbitrary).
* Ties (equal norms, equal similarities) go to the lower position.
* The similarity is computed in fp32 on the final-norm output (the published code uses the model
  dtype).

No host syncs, no Python loop over tokens: one loop over the pivots, each step a batched stable
sort of [B, N] similarities.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops import select_topk
from . import register_method
from .base import LLMContext, LLMMethodConfig, LLMSelection, take_rows
from .fastv import _check_keep


@dataclass
class DARTConfig(LLMMethodConfig):
    """Options of DART.

    * ``keep``: image tokens kept per image (int count or float fraction of N); required.
    * ``layer``: K, tokens are dropped just before decoder layer K (>= 1: pivots come from layer
      K-1's keys and output). Default 2, as published.
    * ``pivot_image``: number of image pivots (>= 1), default 4.
    * ``pivot_text``: number of text pivots (>= 0), default 4.
    """
    layer: int = 2
    pivot_image: int = 4
    pivot_text: int = 4

    def validate(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, numbers.Integral) or self.layer < 1:
            raise ValueError(f"layer: DART needs layer K-1's keys and output, so layer must be an int >= 1, "
                             f"got {self.layer!r}")
        _check_keep(self.keep)
        for name, low in (("pivot_image", 1), ("pivot_text", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
                raise ValueError(f"{name}: must be an int >= {low}, got {v!r}")


def _unit(x: torch.Tensor) -> torch.Tensor:
    # Same eps as F.cosine_similarity, which clamps each norm separately.
    return F.normalize(x.float(), dim=-1, eps=1e-8)


def split_budget(valid: torch.Tensor, picks: int) -> torch.Tensor:
    """[B, P] int64 quota of each pivot: ``picks`` split as evenly as possible over the valid
    pivots of each row, the first valid ones getting the remainder; invalid pivots get 0."""
    nvalid = valid.sum(dim=1, keepdim=True).clamp_min(1)
    rank = valid.cumsum(dim=1) - 1
    quota = picks // nvalid + (rank < picks % nvalid).long()
    return torch.where(valid, quota, torch.zeros_like(quota))


@register_method("dart", "llm", DARTConfig)
@torch.no_grad()  # a selection only: no autograd graph through q, k or the hidden states
def dart(ctx: LLMContext, cfg: DARTConfig) -> LLMSelection:
    hidden = ctx.hidden
    B, L = ctx.num_units, hidden.shape[1]
    n = ctx.num_image_tokens
    dev = hidden.device
    budget = cfg.resolved_keep(n)
    if budget == 0:
        return LLMSelection(torch.empty(B, 0, dtype=torch.int64, device=dev))
    if ctx.keys is None:
        raise ValueError(f"dart needs layer K-1's keys (LLMContext.keys); they are missing, is layer >= 1? "
                         f"(layer={cfg.layer})")
    if ctx.final_norm is None:
        raise ValueError("dart needs the LLM's final norm (LLMContext.final_norm)")

    # L1 norm of every token's key with the heads concatenated, accumulated in fp32.
    knorm = ctx.rows(torch.linalg.vector_norm(ctx.keys, ord=1, dim=(1, 3), dtype=torch.float32))   # [S, L]
    ar = torch.arange(n, device=dev)
    img_norm = knorm.gather(1, ctx.image_start[:, None] + ar)
    p_img = min(cfg.pivot_image, budget)
    img_piv = select_topk(img_norm, p_img)                               # [B, p_img] local, ascending
    if budget == p_img:
        return LLMSelection(img_piv)

    # Text candidates: real prompt tokens after the image, up to the last prompt token.
    t_max = L - n
    text_pos = ctx.image_start[:, None] + n + torch.arange(t_max, device=dev)          # [B, t_max]
    safe = text_pos.clamp(max=L - 1)
    text_ok = (text_pos <= ctx.rows(ctx.query_index)[:, None]) & (text_pos < L) \
        & ctx.rows(ctx.attention_mask).gather(1, safe).bool()
    if ctx.visual_mask is not None:                                      # other images' tokens are not text
        text_ok &= ~ctx.rows(ctx.visual_mask).gather(1, safe)
    text_norm = knorm.gather(1, safe).masked_fill(~text_ok, float("-inf"))
    p_txt = min(cfg.pivot_text, t_max)
    txt_sel = select_topk(text_norm, p_txt)                              # [B, p_txt], ascending
    txt_valid = text_ok.gather(1, txt_sel)
    txt_abs = safe.gather(1, txt_sel)

    # Unit vectors of final_norm(hidden) (per-token norm: gathering first is equivalent).
    img_u = _unit(ctx.final_norm(ctx.image_hidden()))                    # [B, N, D]
    txt_u = _unit(ctx.final_norm(ctx.tokens(txt_abs)))
    piv_u = torch.cat([take_rows(img_u, img_piv), txt_u], dim=1)
    neg_cos = -torch.bmm(piv_u, img_u.transpose(1, 2))                   # [B, P, N]; high = dissimilar

    valid = torch.cat([torch.ones(B, p_img, dtype=torch.bool, device=dev), txt_valid], dim=1)
    quota = split_budget(valid, budget - p_img)                         # [B, P]
    free = torch.ones(B, n, dtype=torch.bool, device=dev)
    free.scatter_(1, img_piv, False)
    slot = ar.expand(B, n)
    for p in range(valid.shape[1]):
        s = neg_cos[:, p].masked_fill(~free, float("-inf"))
        # Stable descending sort: ties to the lower position; taken tokens (-inf) sort last, and
        # each row has at least quota free tokens left since the quotas sum to budget - p_img.
        order = torch.sort(s, dim=1, descending=True, stable=True).indices
        picked = torch.zeros_like(free).scatter_(1, order, slot < quota[:, p:p + 1])
        free &= ~picked
    # Exactly `budget` tokens are not free: read them back in ascending order on the device.
    return LLMSelection(select_topk((~free).float(), budget))
