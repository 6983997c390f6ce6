"""Token reduction inside Hugging Face ``LlavaForConditionalGeneration`` (transformers 5.23).

``apply`` swaps the model's ``forward`` for :func:`reduced_forward`, one flat function that runs
vision tower -> (vision method) -> projector -> embeddings -> decoder layers, and at decoder
layer K (llm methods) drops image tokens from the hidden states, position ids, rotary tensors
and attention mask together. Layers below K keep every token in the KV cache; layers from K
on cache only the kept ones. What decoding needs to rebuild the per-layer masks (the kept map
of the prompt) rides on the cache object, so ``generate()`` works unchanged, greedy or sampled.

Only the language model's decoder layers, norm and rotary module are used, never its forward,
so any Llama-like text model with the same layer call signature works.
"""
from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast

from ..methods import MethodSpec
from ..methods.base import LLMContext, LLMSelection, VisionContext, take_rows

IGNORE_INDEX = -100


@dataclass
class Reduction:
    """What one applied method needs at run time (lives on the model as ``_epic``)."""
    spec: MethodSpec
    cfg: object
    layer: int                      # decoder layer K that first sees the reduced sequence
    hooks: list
    captured: dict                  # layer K-1's q_proj / k_proj outputs during a reducing prefill
    capturing: bool = False


@dataclass
class CachedReduction:
    """Stored on the KV cache after a reducing prefill: how the prompt was reduced."""
    layer: int
    prompt_len: int                 # original prompt length L (what layers < K hold)
    mask: Tensor                    # [B, L'] bool validity of the kept prompt tokens (layers >= K)
    pos_delta: Tensor               # [B, 1] int64 added to later position ids (layer 0 renumbers)


# --------------------------------------------------------------------------- sequence rebuild

def image_span(input_ids: Tensor, image_token_id: int, n_image: int) -> Tensor:
    """[B] index of each row's first image token. Each row must hold exactly one image of
    ``n_image`` contiguous tokens: checked on the device without a host sync."""
    is_img = input_ids == image_token_id
    start = is_img.int().argmax(dim=1)
    count = is_img.sum(dim=1)
    last = (start + n_image - 1).clamp(max=input_ids.shape[1] - 1)
    contiguous = is_img.gather(1, last[:, None]).squeeze(1)
    torch._assert_async(((count == n_image) & contiguous).all(),
                        "input_ids: every row needs exactly one image of image_seq_length contiguous image tokens")
    return start


def rebuild_index(start: Tensor, n_image: int, n_slots: int, length: int) -> tuple[Tensor, Tensor, Tensor]:
    """For a sequence of ``length`` whose image span [start, start + n_image) becomes ``n_slots``
    slots: the source position of every output position [B, L'], the slot number (or -1) of every
    output position, and L'. Text before and after the span keeps its order."""
    new_len = length - n_image + n_slots
    t = torch.arange(new_len, device=start.device)
    rel = t[None, :] - start[:, None]
    in_span = (rel >= 0) & (rel < n_slots)
    src = torch.where(rel >= n_slots, t + (n_image - n_slots), t).expand(start.shape[0], -1)
    slot = torch.where(in_span, rel, torch.full_like(rel, -1))
    return src, slot, new_len


def apply_selection(hidden: Tensor, mask: Tensor, position_ids: Tensor, start: Tensor, n_image: int,
                    sel_index: Tensor, sel_hidden: Optional[Tensor], sel_valid: Optional[Tensor],
                    renumber: bool):
    """Gather the reduced sequence: hidden [B, L', D], mask [B, L'] bool, position ids [B, L'],
    source index [B, L'] (-1 where a slot holds a new token) in one batched pass."""
    b, length, d = hidden.shape
    n_slots = sel_index.shape[1]
    src, slot, _ = rebuild_index(start, n_image, n_slots, length)
    slot_c = slot.clamp(min=0)
    in_span = slot >= 0
    src = torch.where(in_span, start[:, None] + sel_index.gather(1, slot_c), src)
    new_hidden = take_rows(hidden, src)
    if sel_hidden is not None:
        repl = take_rows(sel_hidden.to(hidden.dtype), slot_c)
        new_hidden = torch.where(in_span[..., None], repl, new_hidden)
    new_mask = mask.gather(1, src)
    if sel_valid is not None:
        new_mask = new_mask & torch.where(in_span, sel_valid.gather(1, slot_c), True)
    if renumber:
        # Before the LLM the methods' own code builds a shorter sequence: positions run on.
        first = position_ids.gather(1, mask.int().argmax(1, keepdim=True))
        new_pos = (new_mask.long().cumsum(1) - 1).clamp(min=0) + first
    else:
        new_pos = position_ids.gather(1, src)
    return new_hidden, new_mask, new_pos, src


def compact_slots(feats: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Move each row's valid slots to the front (order kept) and cut the slot axis to the
    largest valid count in the batch, so that an adaptive budget (TRIM, PruMerge) actually
    shortens the LLM's sequence. Sizing the output reads one scalar back to the host: the one
    sync of a reducing prefill, and only for adaptive budgets without a static ``max_k``."""
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
    n = int(valid.sum(1).max())
    order = order[:, :n]
    return take_rows(feats, order), valid.gather(1, order)


# --------------------------------------------------------------------------- the forward

def _text_modules(model):
    lm = model.model.language_model
    return lm, lm.layers[: lm.config.num_hidden_layers]


def _rope_fn(layer):
    return sys.modules[type(layer.self_attn).__module__].apply_rotary_pos_emb


def _vision_stage(model, red: Reduction, input_ids, attention_mask, pixel_values):
    """Vision tower + (vision method) + projector -> [B, S, D] image embeddings and validity."""
    cfg = model.config
    layer_sel = cfg.vision_feature_layer
    if not isinstance(layer_sel, int):
        raise ValueError("vision_feature_layer: token reduction supports a single feature layer")
    out = model.model.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
    hs = out.hidden_states
    feat_idx = layer_sel % len(hs)
    feats = hs[feat_idx]
    if cfg.vision_feature_select_strategy == "default":
        feats = feats[:, 1:]
    valid = None
    if red is not None and red.spec.stage == "vision":
        n = feats.shape[1]
        side = int(round(n ** 0.5))
        ctx = VisionContext(features=feats, hidden_states=hs, feature_layer=feat_idx,
                            vision_tower=model.model.vision_tower, input_ids=input_ids,
                            attention_mask=attention_mask, image_token_id=cfg.image_token_id,
                            grid=(side, n // side))
        res = red.spec.fn(ctx, red.cfg)
        feats, valid = res.features, res.valid
        if valid is not None and getattr(red.cfg, "max_k", None) is None:
            feats, valid = compact_slots(feats, valid)
    return model.model.multi_modal_projector(feats), valid


def _llm_context(model, red: Reduction, hidden, mask, start, n_image, pos_emb, query_index):
    lm, layers = _text_modules(model)
    b, length, _ = hidden.shape
    keys = query = scale = None
    if red.layer >= 1 and "k" in red.captured:
        attn = layers[red.layer - 1].self_attn
        hd = attn.head_dim
        cos, sin = pos_emb
        rope = _rope_fn(layers[red.layer - 1])
        k = red.captured.pop("k").view(b, length, -1, hd).transpose(1, 2)
        q = red.captured.pop("q").view(b, length, -1, hd)
        q = q.gather(1, query_index[:, None, None, None].expand(-1, 1, q.shape[2], hd)).transpose(1, 2)
        rows = query_index[:, None, None].expand(-1, 1, cos.shape[-1])
        cos_q, sin_q = cos.expand(b, -1, -1).gather(1, rows), sin.expand(b, -1, -1).gather(1, rows)
        query, _ = rope(q, q, cos_q, sin_q)
        _, keys = rope(k, k, cos, sin)
        scale = attn.scaling
    side = int(round(n_image ** 0.5))
    return LLMContext(hidden=hidden, image_start=start, num_image_tokens=n_image,
                      grid=(side, n_image // side), attention_mask=mask, query_index=query_index,
                      keys=keys, query=query, scale=scale, final_norm=lm.norm)


def reduced_forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                    past_key_values=None, inputs_embeds=None, labels=None, use_cache=None,
                    logits_to_keep=0, query_index=None, **kwargs):
    """Drop-in ``forward`` of an applied model. Returns logits over the reduced sequence; its
    ``kept_index`` [B, L'] says which input position each output row came from (-1: a token a
    vision method made) and ``kept_mask`` [B, L'] which rows are real (padding and the unused
    slots of an adaptive budget are False). ``query_index`` ([B] or int) marks the last prompt token the methods
    rank against (default: each row's last real token); recompute-without-cache callers pass the
    prompt's so the selection is the one the cached run made."""
    red: Reduction = self._epic
    for flag in ("output_attentions", "output_hidden_states", "return_dict"):
        kwargs.pop(flag, None)
    lm, layers = _text_modules(self)
    cfg = self.config
    n_image = cfg.image_seq_length
    if inputs_embeds is None:
        if input_ids is None:
            raise ValueError("input_ids: pass input_ids or inputs_embeds")
        inputs_embeds = self.model.get_input_embeddings()(input_ids)
    elif pixel_values is not None and input_ids is None:
        raise ValueError("input_ids: token reduction locates the image in input_ids; pass them with pixel_values")
    b, length, _ = inputs_embeds.shape
    device = inputs_embeds.device

    use_cache = cfg.text_config.use_cache if use_cache is None else use_cache
    if use_cache and past_key_values is None:
        past_key_values = DynamicCache(config=lm.config)
    if past_key_values is not None and getattr(past_key_values, "is_compileable", False):
        raise ValueError("past_key_values: token reduction needs a DynamicCache (layers hold different lengths)")
    past_len = past_key_values.get_seq_length(0) if past_key_values is not None else 0
    cached: Optional[CachedReduction] = getattr(past_key_values, "_epic", None) if past_len else None
    if cached is not None:
        # Count past tokens in the prompt's original numbering (layer 0 may hold the reduced set).
        generated = past_key_values.get_seq_length(len(layers) - 1) - cached.mask.shape[1]
        past_len = cached.prompt_len + generated
    if cached is not None and pixel_values is not None:
        raise ValueError("pixel_values: this cache already holds a reduced image prompt")

    if position_ids is None:
        position_ids = torch.arange(past_len, past_len + length, device=device)[None].expand(b, -1)
    if attention_mask is None:
        attention_mask = torch.ones(b, past_len + length, dtype=torch.bool, device=device)
    attention_mask = attention_mask.bool()
    mask_in, last_position = attention_mask, position_ids[:, -1:]
    if query_index is None:
        # Each row's last real token (left or right padding).
        current = mask_in[:, -length:]
        query_index = (length - 1) - current.flip(1).int().argmax(1)
    elif isinstance(query_index, int):
        query_index = torch.full((b,), query_index, dtype=torch.long, device=device)

    # ---- embeddings and the reduction plan of this call
    reduce_at = None        # decoder layer where this call's prefill is reduced
    start = None
    if pixel_values is not None:
        # Methods read the prompt up to query_index (TRIM's question), not tokens after it.
        prompt_mask = attention_mask[:, -length:] & (torch.arange(length, device=device) <= query_index[:, None])
        img_embeds, img_valid = _vision_stage(self, red, input_ids, prompt_mask, pixel_values)
        start = image_span(input_ids, cfg.image_token_id, n_image)
        if red.spec.stage == "vision":
            # The image span becomes the method's S slots (fewer tokens, positions renumbered).
            slots = torch.zeros(b, img_embeds.shape[1], dtype=torch.long, device=device)
            inputs_embeds, attention_mask, position_ids, kept = apply_selection(
                inputs_embeds, attention_mask, position_ids, start, n_image, slots, img_embeds, img_valid,
                renumber=True)
            span = (kept - start[:, None] >= 0) & (kept - start[:, None] < n_image)
            kept = torch.where(span, -1, kept)
            reduce_at = 0
        else:
            idx = start[:, None] + torch.arange(n_image, device=device)
            inputs_embeds = inputs_embeds.scatter(1, idx[..., None].expand(-1, -1, inputs_embeds.shape[-1]),
                                                  img_embeds.to(inputs_embeds.dtype))
            reduce_at = red.layer
            kept = torch.arange(length, device=device)[None].expand(b, -1)
    else:
        kept = torch.arange(length, device=device)[None].expand(b, -1)


    # ---- decoding after a reduced prefill: per-layer-group masks and shifted positions
    mask_reduced = None
    if cached is not None:
        mask_reduced = torch.cat([cached.mask, attention_mask[:, cached.prompt_len:]], dim=1)
        position_ids = position_ids + cached.pos_delta
        if cached.layer == 0:
            attention_mask = mask_reduced

    hidden = inputs_embeds
    pos_emb = lm.rotary_emb(hidden, position_ids)
    causal = create_causal_mask(config=lm.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                past_key_values=past_key_values, position_ids=position_ids, layer_idx=0)
    red.capturing = reduce_at is not None and reduce_at >= 1
    try:
        for i, layer in enumerate(layers):
            if i == reduce_at and red.spec.stage == "llm":
                ctx = _llm_context(self, red, hidden, attention_mask, start, n_image, pos_emb, query_index)
                sel: LLMSelection = red.spec.fn(ctx, red.cfg)
                hidden, attention_mask, position_ids, kept_now = apply_selection(
                    hidden, attention_mask, position_ids, start, n_image, sel.index, sel.hidden, None,
                    renumber=(i == 0))
                kept = kept.gather(1, kept_now)
                pos_emb = lm.rotary_emb(hidden, position_ids)
                causal = create_causal_mask(config=lm.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                            past_key_values=past_key_values, position_ids=position_ids, layer_idx=i)
            elif cached is not None and i == cached.layer and i > 0:
                causal = create_causal_mask(config=lm.config, inputs_embeds=hidden, attention_mask=mask_reduced,
                                            past_key_values=past_key_values, position_ids=position_ids, layer_idx=i)
            if red.capturing and i == red.layer - 1:
                red.captured.clear()
            hidden = layer(hidden, attention_mask=causal, position_embeddings=pos_emb, position_ids=position_ids,
                           past_key_values=past_key_values, use_cache=use_cache, **kwargs)
    finally:
        red.capturing = False
        red.captured.clear()

    if reduce_at is not None and past_key_values is not None:
        past_key_values._epic = CachedReduction(
            layer=reduce_at, prompt_len=length, mask=attention_mask,
            pos_delta=position_ids[:, -1:] - last_position)

    hidden = lm.norm(hidden)
    mask_out = attention_mask[:, -hidden.shape[1]:]
    if isinstance(logits_to_keep, int) and logits_to_keep > 0:
        hidden, kept_out, mask_out = hidden[:, -logits_to_keep:], kept[:, -logits_to_keep:], mask_out[:, -logits_to_keep:]
    elif isinstance(logits_to_keep, Tensor):
        hidden, kept_out, mask_out = hidden[:, logits_to_keep], kept[:, logits_to_keep], mask_out[:, logits_to_keep]
    else:
        kept_out = kept
    logits = self.lm_head(hidden)

    loss = None
    if labels is not None:
        lab = torch.where(kept_out >= 0, labels.gather(1, kept_out.clamp(min=0)), IGNORE_INDEX)
        loss = self.loss_function(logits=logits, labels=lab, vocab_size=cfg.text_config.vocab_size, **kwargs)
    out = LlavaCausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values)
    out["kept_index"] = kept_out
    out["kept_mask"] = mask_out
    return out


# --------------------------------------------------------------------------- apply / revert

def _capture_hook(red: Reduction, key: str):
    def hook(_module, _inputs, output):
        if red.capturing:
            red.captured[key] = output.detach()
    return hook


def apply(model, spec: MethodSpec, cfg) -> None:
    layer = getattr(cfg, "layer", 0) if spec.stage == "llm" else 0
    _, layers = _text_modules(model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer: must be in [0, {len(layers)}) for this model, got {layer}")
    red = Reduction(spec=spec, cfg=cfg, layer=layer, hooks=[], captured={})
    if spec.stage == "llm" and layer >= 1:
        attn = layers[layer - 1].self_attn
        red.hooks.append(attn.q_proj.register_forward_hook(_capture_hook(red, "q")))
        red.hooks.append(attn.k_proj.register_forward_hook(_capture_hook(red, "k")))
    model._epic = red
    model.forward = types.MethodType(reduced_forward, model)


def revert(model) -> None:
    red = model.__dict__.pop("_epic", None)
    if red is not None:
        for h in red.hooks:
            h.remove()
    model.__dict__.pop("forward", None)
