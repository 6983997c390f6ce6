"""The contract between the model integration and the token-reduction methods.

A method is a pure function of one batch. Two stages exist:

* ``"vision"`` methods run between the vision tower and the projector. They get a
  :class:`VisionContext` and return a :class:`VisionReduction`: the (pre-projector) features
  that replace the image span, as ``S`` slots per image, some possibly marked invalid (adaptive
  budgets keep a fixed slot count so nothing syncs with the host). The LLM sequence is shortened
  and its positions renumbered, as in the methods' own LLaVA code.
* ``"llm"`` methods run inside the language model just before decoder layer ``K`` (``K = 0``:
  on the input embeddings). They get an :class:`LLMContext` and return an :class:`LLMSelection`:
  which image tokens go on, in spatial order. From layer ``K`` on, those tokens (with their
  original position ids when ``K >= 1``) replace the image span; layers below ``K`` keep every
  token in the KV cache.

Every tensor here is batched. A batch holds a ragged set of visual *units* (each image, and
each temporal patch group of a video, of ``h x w`` tokens; rows may hold none or several): an
in-LLM method is called once per group of units of the same grid, and its budget applies to each
unit. Text-only rows are never seen by a method.
Methods must not loop over tokens in Python nor sync with the host (``.item()``, ``.tolist()``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Callable, Optional

import torch
from torch import Tensor


@dataclass
class MethodConfig:
    """Options every method shares. ``keep``: visual tokens kept per image, as a count (int) or
    a fraction of the image's tokens (float in (0, 1]); ``None`` means the method's own adaptive
    budget where it has one (TRIM, PruMerge)."""
    keep: Optional[int | float] = None

    def resolved_keep(self, n: int) -> int:
        from ..ops import resolve_k
        if self.keep is None:
            raise ValueError(f"keep: this method needs a token budget (an int count or a ratio), got None")
        if isinstance(self.keep, int) and not isinstance(self.keep, bool) and self.keep > n:
            raise ValueError(f"keep: {self.keep} tokens is more than a visual unit of this batch holds ({n}; the "
                             f"budget applies to each image and video frame group); give a ratio or a smaller count")
        return resolve_k(self.keep, n)


@dataclass
class LLMMethodConfig(MethodConfig):
    """In-LLM methods drop tokens just before decoder layer ``layer`` (0 = before the LLM)."""
    layer: int = 2


@dataclass
class VisionContext:
    """What a pre-projector method sees, for B images of N patches each."""
    features: Tensor                 # [B, N, Dv] LLaVA's selected layer, CLS removed (what the projector would get)
    hidden_states: tuple             # CLIP hidden states, each [B, 1 + N, Dv]; [0] = embeddings, [i] = input of encoder layer i
    feature_layer: int               # non-negative index into hidden_states that `features` came from
    vision_tower: torch.nn.Module    # HF CLIPVisionModel; its encoder/post_layernorm: see `vision_model`
    input_ids: Tensor                # [B, L] prompt with image placeholders (TRIM reads the question from it)
    attention_mask: Tensor           # [B, L] 1 = real token
    image_token_id: int
    grid: tuple[int, int]            # patch grid (24, 24) for 576 tokens

    @property
    def vision_model(self) -> torch.nn.Module:
        """The module that holds ``encoder`` and ``post_layernorm``: ``vision_tower.vision_model``
        in transformers 4, the (flattened) CLIPVisionModel itself in transformers 5."""
        return getattr(self.vision_tower, "vision_model", self.vision_tower)

    def layer_qk(self, layer: int) -> tuple[Tensor, Tensor]:
        """Unscaled q and k of CLIP encoder layer ``layer``, recomputed from its input
        ``hidden_states[layer]``: each [B, heads, 1 + N, head_dim]."""
        block = self.vision_model.encoder.layers[layer]
        attn = block.self_attn
        x = block.layer_norm1(self.hidden_states[layer])
        b, t, _ = x.shape
        q = attn.q_proj(x).view(b, t, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, t, attn.num_heads, attn.head_dim).transpose(1, 2)
        return q, k


@dataclass
class VisionUnitsContext:
    """What a vision-side method sees on an encoder without a [CLS] token (Qwen-VL), for a group
    of S visual units of one grid (images, or video frame groups), after the patch merger. The
    [CLS] stand-in of every published Qwen port: the attention each merged token *receives* in
    the ranking vision layer (full attention over its unit: mean over heads, summed over the
    unit's queries, averaged over the m x m patches the merger joins). The method returns an
    :class:`LLMSelection` of positions inside each unit (optionally with replacement hidden
    states, e.g. merged tokens), applied before the LLM with every token's original position."""
    features: Tensor                 # [S, N, D] merged embeddings (the LLM's input), raster order
    received: Tensor                 # [S, N] fp32 attention received in the ranking layer
    keys: Tensor                     # [S, N, dk] fp32 that layer's keys, mean over heads and merged patches
    grid: tuple[int, int]            # (h, w) merged-token grid of the units
    kind: str = "image"              # "image" or "video" (a frame group)
    head_keys: Optional[Tensor] = None   # [S, N, H dk] fp32 the same keys with the heads side by side (PruMerge+)
    patches: Optional[int] = None        # patches per merged token (m x m): received / (patches N) = query mean

    @property
    def num_units(self) -> int:
        return int(self.features.shape[0])


@dataclass
class VisionReduction:
    features: Tensor                 # [B, S, Dv] pre-projector features of the S slots, in sequence order
    valid: Optional[Tensor] = None   # [B, S] bool; invalid slots are masked out of the LLM (None: all valid)


@dataclass
class LLMContext:
    """What an in-LLM method sees just before decoder layer K, for a sequence batch [B, L] and a
    group of S visual units of the same grid (every image, or video frame group, of that size in
    the batch; the model integration calls the method once per group). A unit is reduced on its
    own, with its own budget; tensors of the whole batch are indexed with ``span_row``."""
    hidden: Tensor                   # [B, L, D] input of layer K (output of layer K-1; the embeddings when K = 0)
    image_start: Tensor              # [S] int64 index of each unit's first token in its row
    num_image_tokens: int            # N = h * w tokens per unit
    grid: tuple[int, int]            # (h, w) token grid of the units, (24, 24) for LLaVA-1.5's 576
    attention_mask: Tensor           # [B, L] bool, True = real token (left padding is False)
    query_index: Tensor              # [B] int64 index of each row's last real prompt token
    keys: Optional[Tensor] = None    # [B, Hkv, L, d] post-RoPE keys of layer K-1 (None when K = 0)
    query: Optional[Tensor] = None   # [B, H, 1, d] post-RoPE query of the last prompt token at layer K-1
    scale: Optional[float] = None    # attention scale of layer K-1
    final_norm: Optional[Callable[[Tensor], Tensor]] = None   # the LLM's final norm (DART)
    generator: Optional[torch.Generator] = None               # randomness of the "random" method
    span_row: Optional[Tensor] = None     # [S] int64 row of each unit (None: unit s is in row s, S == B)
    visual_mask: Optional[Tensor] = None  # [B, L] bool, True on every visual token of the row (None: this unit's only)
    kind: str = "image"                   # "image" or "video" (a video's temporal patch group)

    @property
    def num_units(self) -> int:
        return int(self.image_start.shape[0])

    def rows(self, x: Tensor) -> Tensor:
        """``x`` [B, ...] indexed by unit: [S, ...] (no copy when unit s is in row s)."""
        return x if self.span_row is None else x.index_select(0, self.span_row)

    def tokens(self, pos: Tensor) -> Tensor:
        """[S, M, D] hidden states at positions ``pos`` [S, M] of each unit's row."""
        if self.span_row is None:
            return take_rows(self.hidden, pos)
        b, length = self.hidden.shape[:2]
        flat = (pos + self.span_row[:, None] * length).reshape(-1)
        return self.hidden.reshape(b * length, -1).index_select(0, flat).view(*pos.shape, -1)

    def image_hidden(self) -> Tensor:
        """[S, N, D] hidden states of every unit (one batched gather)."""
        idx = self.image_start[:, None] + torch.arange(self.num_image_tokens, device=self.hidden.device)
        return self.tokens(idx)


@dataclass
class LLMSelection:
    index: Tensor                    # [S, K] int64 positions inside each unit, ascending
    hidden: Optional[Tensor] = None  # [S, K, D] replacement hidden states (pooling); None: gather the kept ones


def take_rows(x: Tensor, idx: Tensor) -> Tensor:
    """x[b, idx[b, s]] for x [B, L, ...] and idx [B, S]: whole rows copied with one index_select
    (about 2x faster than ``gather`` with an expanded index on a CPU)."""
    b, length = x.shape[:2]
    flat = (idx + torch.arange(b, device=idx.device)[:, None] * length).reshape(-1)
    return x.reshape(b * length, *x.shape[2:]).index_select(0, flat).view(*idx.shape, *x.shape[2:])


def config_fields(cfg_cls) -> set[str]:
    return {f.name for f in fields(cfg_cls)}
