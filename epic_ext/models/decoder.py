"""Running a Hugging Face decoder stack (Llama-like: ``layers``, ``norm``, ``rotary_emb``) over a
batched :class:`Sequence`, a range of layers at a time, dropping image tokens at one layer.

Running ranges lets a caller compute a shared prefix once and continue it twice (the EPIC
trainer: teacher and student differ only from their compression layer on). Layer K-1's q/k
projections, which FastV and DART rank with, are captured by temporary forward hooks while that
layer runs, so no projection is recomputed and no L x L attention is formed.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
from torch import Tensor
from transformers.masking_utils import create_causal_mask

from ..methods.base import LLMContext, LLMSelection
from .sequence import apply_selection


@dataclass
class Sequence:
    """A batch on its way through the decoder."""
    hidden: Tensor                   # [B, T, D] current tokens
    mask: Tensor                     # [B, past + T] bool: keys this call's layers attend to (padding False)
    pos: Tensor                      # [B, T] int64 position ids
    kept: Tensor                     # [B, T] original index of each row (-1: a token a vision method made)
    query_index: Tensor              # [B] last prompt token (the methods' ranking query)
    start: Optional[Tensor] = None   # [B] first image token (None: no image in this call)
    n_image: int = 0
    captured: dict = field(default_factory=dict)   # layer -> {"q": ..., "k": ...} projection outputs

    def detach(self) -> "Sequence":
        return replace(self, hidden=self.hidden.detach(), captured=dict(self.captured))


@dataclass(frozen=True)
class LayerReduction:
    """An in-LLM method applied just before decoder layer ``layer``."""
    spec: object
    cfg: object
    layer: int


def text_modules(lm):
    return lm.layers[: lm.config.num_hidden_layers]


def _rope_fn(layer):
    return sys.modules[type(layer.self_attn).__module__].apply_rotary_pos_emb


def _causal(lm, seq: Sequence, cache, layer_idx: int, mask: Optional[Tensor] = None):
    return create_causal_mask(config=lm.config, inputs_embeds=seq.hidden,
                              attention_mask=seq.mask if mask is None else mask,
                              past_key_values=cache, position_ids=seq.pos, layer_idx=layer_idx)


def llm_context(lm, seq: Sequence, layer: int, pos_emb) -> LLMContext:
    """The context a method sees before decoder ``layer``: layer-1's post-RoPE keys and the
    query row of the last prompt token, rebuilt from the captured projections."""
    layers = text_modules(lm)
    b, length, _ = seq.hidden.shape
    keys = query = scale = None
    cap = seq.captured.get(layer - 1)
    if layer >= 1 and cap is not None:
        attn = layers[layer - 1].self_attn
        hd = attn.head_dim
        cos, sin = pos_emb
        rope = _rope_fn(layers[layer - 1])
        k = cap["k"].view(b, length, -1, hd).transpose(1, 2)
        q = cap["q"].view(b, length, -1, hd)
        q = q.gather(1, seq.query_index[:, None, None, None].expand(-1, 1, q.shape[2], hd)).transpose(1, 2)
        rows = seq.query_index[:, None, None].expand(-1, 1, cos.shape[-1])
        cos_q, sin_q = cos.expand(b, -1, -1).gather(1, rows), sin.expand(b, -1, -1).gather(1, rows)
        # The model's own RoPE takes (q, k) pairs; an empty slice of heads as the unused partner
        # (it broadcasts to zero elements) rotates each tensor once.
        query, _ = rope(q, q[:, :0], cos_q, sin_q)
        _, keys = rope(k[:, :0], k, cos, sin)
        scale = attn.scaling
    side = int(round(seq.n_image ** 0.5))
    return LLMContext(hidden=seq.hidden, image_start=seq.start, num_image_tokens=seq.n_image,
                      grid=(side, seq.n_image // side), attention_mask=seq.mask[:, -length:],
                      query_index=seq.query_index, keys=keys, query=query, scale=scale, final_norm=lm.norm)


def reduce_sequence(lm, seq: Sequence, red: LayerReduction, pos_emb) -> Sequence:
    """Apply an in-LLM method to ``seq`` (the input of decoder layer ``red.layer``)."""
    ctx = llm_context(lm, seq, red.layer, pos_emb)
    sel: LLMSelection = red.spec.fn(ctx, red.cfg)
    length = seq.hidden.shape[1]
    hidden, mask, pos, src = apply_selection(seq.hidden, seq.mask[:, -length:], seq.pos, seq.start, seq.n_image,
                                             sel.index, sel.hidden, None, renumber=(red.layer == 0))
    past = seq.mask[:, :-length] if seq.mask.shape[1] > length else seq.mask[:, :0]
    return replace(seq, hidden=hidden, mask=torch.cat([past, mask], 1), pos=pos, kept=seq.kept.gather(1, src),
                   captured={})


def _capture_hooks(layer, store: dict):
    def hook(key):
        def fn(_module, _inputs, output):
            store[key] = output.detach()
        return fn
    attn = layer.self_attn
    return [attn.q_proj.register_forward_hook(hook("q")), attn.k_proj.register_forward_hook(hook("k"))]


def run_layers(lm, seq: Sequence, lo: int, hi: int, *, reduction: Optional[LayerReduction] = None,
               cache=None, use_cache: bool = False, capture: tuple[int, ...] = (),
               mask_switch: Optional[tuple[int, Tensor]] = None, **layer_kwargs) -> Sequence:
    """Decoder layers [lo, hi) over ``seq``. ``reduction`` drops tokens before its layer (when in
    range); layer reduction.layer-1 and the layers in ``capture`` keep their q/k projections in
    ``seq.captured``. ``mask_switch=(i, mask)``: from layer i on, attend with ``mask`` (decoding
    after a reduced prefill: the layers from K on cache only the kept tokens)."""
    layers = text_modules(lm)
    red_at = reduction.layer if reduction is not None and lo <= reduction.layer < hi else None
    want = set(capture) | ({reduction.layer - 1} if reduction is not None else set())
    def mask_at(i):
        return mask_switch[1] if mask_switch is not None and i >= mask_switch[0] else None

    pos_emb = lm.rotary_emb(seq.hidden, seq.pos)
    causal = _causal(lm, seq, cache, lo, mask_at(lo))
    seq = replace(seq, captured=dict(seq.captured))
    for i in range(lo, hi):
        if i == red_at:
            seq = reduce_sequence(lm, seq, reduction, pos_emb)
            pos_emb = lm.rotary_emb(seq.hidden, seq.pos)
            causal = _causal(lm, seq, cache, i)
        elif mask_switch is not None and i == mask_switch[0] and i > lo:
            causal = _causal(lm, seq, cache, i, mask_switch[1])
        hooks = []
        if i in want:
            seq.captured[i] = {}
            hooks = _capture_hooks(layers[i], seq.captured[i])
        try:
            hidden = layers[i](seq.hidden, attention_mask=causal, position_embeddings=pos_emb, position_ids=seq.pos,
                               past_key_values=cache, use_cache=use_cache, **layer_kwargs)
        finally:
            for h in hooks:
                h.remove()
        seq = replace(seq, hidden=hidden)
    return seq
