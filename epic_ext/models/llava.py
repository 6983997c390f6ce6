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

import types
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast

from ..methods import MethodSpec
from ..methods.base import VisionContext
from .decoder import LayerReduction, Sequence, run_layers, text_modules
from .sequence import apply_selection, compact_slots, image_span

IGNORE_INDEX = -100


@dataclass
class Reduction:
    """The applied method (lives on the model as ``_epic``)."""
    spec: MethodSpec
    cfg: object
    layer: int                      # decoder layer K that first sees the reduced sequence (0: before the LLM)

    def in_llm(self) -> Optional[LayerReduction]:
        return LayerReduction(self.spec, self.cfg, self.layer) if self.spec.stage == "llm" else None


@dataclass
class CachedReduction:
    """Stored on the KV cache after a reducing prefill: how the prompt was reduced."""
    layer: int
    prompt_len: int                 # original prompt length L (what layers < K hold)
    mask: Tensor                    # [B, L'] bool validity of the kept prompt tokens (layers >= K)
    pos_delta: Tensor               # [B, 1] int64 added to later position ids (layer 0 renumbers)


# --------------------------------------------------------------------------- the forward

def vision_features(model, pixel_values, input_ids, prompt_mask, red: Optional[Reduction]):
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
                            attention_mask=prompt_mask, image_token_id=cfg.image_token_id,
                            grid=(side, n // side))
        res = red.spec.fn(ctx, red.cfg)
        feats, valid = res.features, res.valid
        if valid is not None and getattr(red.cfg, "max_k", None) is None:
            feats, valid = compact_slots(feats, valid)
    return model.model.multi_modal_projector(feats), valid


def embed(model, input_ids, pixel_values, attention_mask, position_ids, query_index,
          red: Optional[Reduction], inputs_embeds=None) -> Sequence:
    """Token + image embeddings of a prompt as a :class:`Sequence` (a vision method already
    applied: the image span shortened, positions renumbered as the methods' own code does)."""
    cfg = model.config
    n_image = cfg.image_seq_length
    if inputs_embeds is None:
        inputs_embeds = model.model.get_input_embeddings()(input_ids)
    b, length, _ = inputs_embeds.shape
    device = inputs_embeds.device
    kept = torch.arange(length, device=device)[None].expand(b, -1)
    seq = Sequence(hidden=inputs_embeds, mask=attention_mask, pos=position_ids, kept=kept,
                   query_index=query_index)
    if pixel_values is None:
        return seq
    # Methods read the prompt up to query_index (TRIM's question), not tokens after it.
    prompt_mask = attention_mask[:, -length:] & (torch.arange(length, device=device) <= query_index[:, None])
    img, valid = vision_features(model, pixel_values, input_ids, prompt_mask, red)
    start = image_span(input_ids, cfg.image_token_id, n_image)
    seq = replace(seq, start=start, n_image=n_image)
    if red is not None and red.spec.stage == "vision":
        slots = torch.zeros(b, img.shape[1], dtype=torch.long, device=device)
        hidden, mask, pos, src = apply_selection(inputs_embeds, attention_mask, position_ids, start, n_image,
                                                 slots, img, valid, renumber=True)
        rel = src - start[:, None]
        kept = torch.where((rel >= 0) & (rel < n_image), -1, src)
        return replace(seq, hidden=hidden, mask=mask, pos=pos, kept=kept)
    idx = start[:, None] + torch.arange(n_image, device=device)
    hidden = inputs_embeds.scatter(1, idx[..., None].expand(-1, -1, inputs_embeds.shape[-1]),
                                   img.to(inputs_embeds.dtype))
    return replace(seq, hidden=hidden)


def default_query_index(attention_mask: Tensor, length: int) -> Tensor:
    """Each row's last real token among the current ``length`` (left or right padding)."""
    current = attention_mask[:, -length:]
    return (length - 1) - current.flip(1).int().argmax(1)


def reduced_forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                    past_key_values=None, inputs_embeds=None, labels=None, use_cache=None,
                    logits_to_keep=0, query_index=None, **kwargs):
    """Drop-in ``forward`` of an applied model. Returns logits over the reduced sequence, with
    ``kept_index`` [B, L'] (which input position each row came from; -1: a token a vision method
    made) and ``kept_mask`` [B, L'] (False for padding and unused adaptive slots).
    ``query_index`` ([B] or int) marks the last prompt token the methods rank against (default:
    each row's last real token); recompute-without-cache callers pass the prompt's so the
    selection is the one the cached run made."""
    red: Reduction = self._epic
    for flag in ("output_attentions", "output_hidden_states", "return_dict"):
        kwargs.pop(flag, None)
    lm = self.model.language_model
    n_layers = len(text_modules(lm))
    cfg = self.config
    if inputs_embeds is None and input_ids is None:
        raise ValueError("input_ids: pass input_ids or inputs_embeds")
    if pixel_values is not None and input_ids is None:
        raise ValueError("input_ids: token reduction locates the image in input_ids; pass them with pixel_values")
    b, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
    device = (input_ids if input_ids is not None else inputs_embeds).device

    use_cache = cfg.text_config.use_cache if use_cache is None else use_cache
    if use_cache and past_key_values is None:
        past_key_values = DynamicCache(config=lm.config)
    if past_key_values is not None and getattr(past_key_values, "is_compileable", False):
        raise ValueError("past_key_values: token reduction needs a DynamicCache (layers hold different lengths)")
    past_len = past_key_values.get_seq_length(0) if past_key_values is not None else 0
    cached: Optional[CachedReduction] = getattr(past_key_values, "_epic", None) if past_len else None
    if cached is not None:
        if pixel_values is not None:
            raise ValueError("pixel_values: this cache already holds a reduced image prompt")
        # Count past tokens in the prompt's original numbering (layer 0 may hold the reduced set).
        past_len = cached.prompt_len + past_key_values.get_seq_length(n_layers - 1) - cached.mask.shape[1]

    if attention_mask is None:
        attention_mask = torch.ones(b, past_len + length, dtype=torch.bool, device=device)
    attention_mask = attention_mask.bool()
    if position_ids is None:
        # Count each row's real tokens (what generate() passes): with left padding, positions
        # starting at 0 on the pad would change absolute-position-dependent rankings (DART's L1
        # key norms after RoPE), so a padded row would not select what it selects alone.
        position_ids = (attention_mask.long().cumsum(1) - 1).clamp(min=0)[:, -length:]
    last_position = position_ids[:, -1:]
    if query_index is None:
        query_index = default_query_index(attention_mask, length)
    elif isinstance(query_index, int):
        query_index = torch.full((b,), query_index, dtype=torch.long, device=device)

    seq = embed(self, input_ids, pixel_values, attention_mask, position_ids, query_index, red, inputs_embeds)
    reducing = pixel_values is not None
    mask_switch = None
    if cached is not None:
        # Decoding after a reduced prefill: layers >= K attend over the kept prompt + new tokens.
        reduced_mask = torch.cat([cached.mask, attention_mask[:, cached.prompt_len:]], dim=1)
        seq = replace(seq, pos=seq.pos + cached.pos_delta)
        mask_switch = (cached.layer, reduced_mask)
    seq = run_layers(lm, seq, 0, n_layers, reduction=red.in_llm() if reducing else None, cache=past_key_values,
                     use_cache=use_cache, mask_switch=mask_switch, **kwargs)

    if reducing and past_key_values is not None:
        past_key_values._epic = CachedReduction(layer=red.layer if red.spec.stage == "llm" else 0,
                                                prompt_len=length, mask=seq.mask,
                                                pos_delta=seq.pos[:, -1:] - last_position)
    return _lm_output(self, seq, labels, logits_to_keep, past_key_values, **kwargs)


def _lm_output(model, seq: Sequence, labels, logits_to_keep, cache, **kwargs):
    hidden = model.model.language_model.norm(seq.hidden)
    kept, mask = seq.kept, seq.mask[:, -hidden.shape[1]:]
    if isinstance(logits_to_keep, int) and logits_to_keep > 0:
        hidden, kept, mask = hidden[:, -logits_to_keep:], kept[:, -logits_to_keep:], mask[:, -logits_to_keep:]
    elif isinstance(logits_to_keep, Tensor):
        hidden, kept, mask = hidden[:, logits_to_keep], kept[:, logits_to_keep], mask[:, logits_to_keep]
    logits = model.lm_head(hidden)
    loss = None
    if labels is not None:
        lab = torch.where(kept >= 0, labels.gather(1, kept.clamp(min=0)), IGNORE_INDEX)
        loss = model.loss_function(logits=logits, labels=lab, vocab_size=model.config.text_config.vocab_size,
                                   **kwargs)
    out = LlavaCausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)
    out["kept_index"] = kept
    out["kept_mask"] = mask
    return out


# --------------------------------------------------------------------------- apply / revert

def check_model(model, spec: MethodSpec) -> None:
    """What the reduced forward would reject (or get wrong) later, rejected when applying."""
    inner = getattr(model, "model", None)
    if not hasattr(model, "lm_head") or not hasattr(inner, "language_model") or not hasattr(inner, "vision_tower"):
        raise ValueError(f"model: token reduction replaces the forward of LlavaForConditionalGeneration, got "
                         f"{type(model).__name__}; pass the ...ForConditionalGeneration (it holds the LM head), "
                         f"not its inner LlavaModel")
    cfg = model.config
    if isinstance(cfg.vision_feature_layer, bool) or not isinstance(cfg.vision_feature_layer, int):
        raise ValueError(f"vision_feature_layer: token reduction supports a single vision feature layer (an int), "
                         f"this model's config has {cfg.vision_feature_layer!r}")
    if spec.stage == "vision":
        # Vision methods rank patches with the [CLS] token's attention (VisionZip, PruMerge) or
        # need LLaVA to drop it ("default"); an encoder without one (SigLIP) has no rule yet.
        has_cls = any(name.endswith("class_embedding") for name, _ in inner.vision_tower.named_parameters())
        strategy = cfg.vision_feature_select_strategy
        if strategy != "default" or not has_cls:
            what = "has no [CLS] token" if not has_cls else f"keeps its [CLS] token (strategy {strategy!r})"
            raise ValueError(f"model: {spec.name} reduces vision-encoder tokens ranked against the [CLS] token, "
                             f"which LLaVA must drop (vision_feature_select_strategy='default'); this model's "
                             f"vision tower {what}. Use an in-LLM method (dart, fastv, random, pooling) instead")


def apply(model, spec: MethodSpec, cfg) -> None:
    check_model(model, spec)
    layer = getattr(cfg, "layer", 0) if spec.stage == "llm" else 0
    n_layers = len(text_modules(model.model.language_model))
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer: must be in [0, {n_layers}) for this model, got {layer}")
    model._epic = Reduction(spec=spec, cfg=cfg, layer=layer)
    model.forward = types.MethodType(reduced_forward, model)


def revert(model) -> None:
    model.__dict__.pop("_epic", None)
    model.__dict__.pop("forward", None)
