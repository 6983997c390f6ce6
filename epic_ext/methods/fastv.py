"""FastV (Chen et al., 2024, "An image is worth 1/2 tokens after layer 2"), batched.

Just before decoder layer K (``layer``, default 2), every image token is scored by the attention
the last prompt token pays to it in layer K-1, averaged over heads; the top ``keep`` go on, in
spatial order, with their original position ids (the model integration keeps those).

The score is computed with :func:`epic_ext.attn.attn_scores` from layer K-1's post-RoPE query of
the last prompt token and post-RoPE keys, so the model may run SDPA / flash attention: no eager
L x L attention matrix is needed. It is exactly what the eager layer's softmax row holds:

* the softmax runs over every key the query sees: keys from the row's first real token (left
  padding excluded, ``kv_start`` = first True of ``attention_mask``) up to the query itself
  (causal, ``q_pos = query_index``); with GQA each query head reads its key group;
* the probabilities of the image span are averaged over the H heads, in fp32 (the published code
  ranks the fp16 probabilities of its eager layer, which only adds ties);
* top-``keep`` with ties to the lower index (:func:`epic_ext.select_topk`), ascending positions.

Budget: ``keep`` (a count or a fraction of N, see :class:`MethodConfig`). When ``keep`` is None
the published parameterisation applies: drop a fraction R = ``ratio`` (default 0.5) and keep
``round(N * (1 - R))`` tokens (Python's round, as the published code): 288 of 576 by default.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional

import torch

from ..ops import select_topk
from . import register_method
from .base import LLMContext, LLMMethodConfig, LLMSelection

DEFAULT_RATIO = 0.5


@dataclass
class FastVConfig(LLMMethodConfig):
    """Options of FastV.

    * ``keep``: image tokens kept per image (int count, or float fraction of N); None: use ``ratio``.
    * ``layer``: K, tokens are dropped just before decoder layer K (>= 1: the score is layer K-1's
      attention). Default 2, as published.
    * ``ratio``: R, the fraction of image tokens dropped when ``keep`` is None; None means 0.5.
      Give ``keep`` or ``ratio``, not both.
    """
    layer: int = 2
    ratio: Optional[float] = None

    def resolved_keep(self, n: int) -> int:
        if self.keep is not None:
            return super().resolved_keep(n)
        r = DEFAULT_RATIO if self.ratio is None else float(self.ratio)
        return max(0, min(n, round(n * (1.0 - r))))

    def validate(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, numbers.Integral) or self.layer < 1:
            raise ValueError(f"layer: FastV scores with layer K-1's attention, so layer must be an int >= 1, "
                             f"got {self.layer!r}")
        _check_keep(self.keep)
        if self.ratio is not None:
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, numbers.Real) \
                    or not 0.0 <= float(self.ratio) <= 1.0:
                raise ValueError(f"ratio: the dropped fraction R must be a number in [0, 1], got {self.ratio!r}")
            if self.keep is not None:
                raise ValueError(f"ratio: give keep or ratio, not both (keep={self.keep!r}, ratio={self.ratio!r})")


def _check_keep(keep) -> None:
    if keep is None:
        return
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise ValueError(f"keep: must be an int count or a float fraction in [0, 1], got {keep!r}")
    if isinstance(keep, numbers.Integral):
        if keep < 0:
            raise ValueError(f"keep: a count must be >= 0, got {keep}")
    elif not 0.0 <= float(keep) <= 1.0:
        raise ValueError(f"keep: a fraction must lie in [0, 1], got {keep}")


def first_real_token(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] index of each row's first True (argmax returns the first maximum): the left-padding
    boundary, computed on the device."""
    return attention_mask.to(torch.int32).argmax(dim=1)


@register_method("fastv", "llm", FastVConfig)
@torch.no_grad()  # a selection only: no autograd graph through q, k or the hidden states
def fastv(ctx: LLMContext, cfg: FastVConfig) -> LLMSelection:
    from ..attn import attn_scores  # imported late: the op module may be replaced independently

    n = ctx.num_image_tokens
    keep = cfg.resolved_keep(n)
    if ctx.query is None or ctx.keys is None:
        raise ValueError("fastv needs layer K-1's query and keys (LLMContext.query / .keys); "
                         f"they are missing, is layer >= 1? (layer={cfg.layer})")
    d = ctx.query.shape[-1]
    scale = ctx.scale if ctx.scale is not None else d ** -0.5
    scores = attn_scores(ctx.rows(ctx.query), ctx.rows(ctx.keys), ctx.image_start, n, scale=scale, reduce="mean",
                         causal=True, kv_start=first_real_token(ctx.rows(ctx.attention_mask)),
                         q_pos=ctx.rows(ctx.query_index).view(-1, 1), check=False)
    return LLMSelection(select_topk(scores, keep))
