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

Every tensor here is batched; image position and length come from ``input_ids`` per sample.
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
class VisionReduction:
    features: Tensor                 # [B, S, Dv] pre-projector features of the S slots, in sequence order
    valid: Optional[Tensor] = None   # [B, S] bool; invalid slots are masked out of the LLM (None: all valid)


@dataclass
class LLMContext:
    """What an in-LLM method sees just before decoder layer K, for a sequence batch [B, L]."""
    hidden: Tensor                   # [B, L, D] input of layer K (output of layer K-1; the embeddings when K = 0)
    image_start: Tensor              # [B] int64 index of each row's first image token
    num_image_tokens: int            # N, the same for every row
    grid: tuple[int, int]            # patch grid of the image span, (24, 24) for N = 576
    attention_mask: Tensor           # [B, L] bool, True = real token (left padding is False)
    query_index: Tensor              # [B] int64 index of each row's last real prompt token
    keys: Optional[Tensor] = None    # [B, Hkv, L, d] post-RoPE keys of layer K-1 (None when K = 0)
    query: Optional[Tensor] = None   # [B, H, 1, d] post-RoPE query of the last prompt token at layer K-1
    scale: Optional[float] = None    # attention scale of layer K-1
    final_norm: Optional[Callable[[Tensor], Tensor]] = None   # the LLM's final norm (DART)
    generator: Optional[torch.Generator] = None               # randomness of the "random" method

    def image_hidden(self) -> Tensor:
        """[B, N, D] hidden states of the image span of every row (one batched gather)."""
        idx = self.image_start[:, None] + torch.arange(self.num_image_tokens, device=self.hidden.device)
        return take_rows(self.hidden, idx)


@dataclass
class LLMSelection:
    index: Tensor                    # [B, S] int64 positions inside the image span, ascending
    hidden: Optional[Tensor] = None  # [B, S, D] replacement hidden states (pooling); None: gather the kept ones


def take_rows(x: Tensor, idx: Tensor) -> Tensor:
    """x[b, idx[b, s]] for x [B, L, ...] and idx [B, S]: whole rows copied with one index_select
    (about 2x faster than ``gather`` with an expanded index on a CPU)."""
    b, length = x.shape[:2]
    flat = (idx + torch.arange(b, device=idx.device)[:, None] * length).reshape(-1)
    return x.reshape(b * length, *x.shape[2:]).index_select(0, flat).view(*idx.shape, *x.shape[2:])


def config_fields(cfg_cls) -> set[str]:
    return {f.name for f in fields(cfg_cls)}
