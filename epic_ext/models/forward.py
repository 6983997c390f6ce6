"""The reduced forward every family shares: ``apply`` swaps a model's ``forward`` for
:func:`reduced_forward`, one flat function that asks the family's adapter for the prompt's
:class:`Sequence` (vision tower, vision method, embeddings, visual units, positions), then runs
the decoder layers through :func:`run_layers`, which drops visual tokens at decoder layer K
(in-LLM methods) from the hidden states, 1-D and M-RoPE positions, rotary tensors, mask and
DeepStack injections together. Layers below K keep every token in the KV cache; layers from K on
cache only the kept ones. What decoding needs (the kept map of the prompt, position shifts, the
rope deltas) rides on the cache object, so ``generate()`` works unchanged, greedy or sampled.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..methods import MethodSpec
from .adapter import Adapter, Prompt
from .decoder import LayerReduction, Sequence, run_layers, text_modules
from .sequence import Slots, Spans, rebuild

IGNORE_INDEX = -100


@dataclass
class Reduction:
    """The applied method (lives on the model as ``_epic``)."""
    spec: MethodSpec
    cfg: object
    layer: int                      # decoder layer K that first sees the reduced sequence (0: before the LLM)
    adapter: Adapter

    def in_llm(self) -> Optional[LayerReduction]:
        if self.spec.stage != "llm":
            return None
        return LayerReduction(self.spec, self.cfg, self.layer, renumber=self.adapter.renumber)


@dataclass
class CachedReduction:
    """Stored on the KV cache after a reducing prefill: how the prompt was reduced."""
    layer: int
    prompt_len: int                 # original prompt length L (what layers < K hold)
    mask: Tensor                    # [B, L'] bool validity of the kept prompt tokens (layers >= K)
    pos_delta: Tensor               # [B, 1] int64 added to later position ids (layer 0 renumbers)
    rope_delta: Optional[Tensor] = None   # [B, 1] M-RoPE: rope position - text position of decode tokens


def default_query_index(attention_mask: Tensor, length: int) -> Tensor:
    """Each row's last real token among the current ``length`` (left or right padding)."""
    current = attention_mask[:, -length:]
    return (length - 1) - current.flip(1).int().argmax(1)


def vision_slots(seq: Sequence, spans: Spans, feats: Tensor, valid: Optional[Tensor], renumber: bool) -> Sequence:
    """Replace every unit of ``seq`` by the slots a vision method made for it (``feats`` [S, K, D]
    in unit order, ``valid`` [S, K] or None): new tokens, positions renumbered or not."""
    s, k = feats.shape[:2]
    dev = feats.device
    slots = Slots(count=[k] * s, offset=[i * k for i in range(s)],
                  src=spans.start_t.repeat_interleave(k), hidden=feats.reshape(s * k, -1),
                  made=torch.ones(s * k, dtype=torch.bool, device=dev),
                  valid=None if valid is None else valid.reshape(-1))
    length = seq.hidden.shape[1]
    hidden, mask, pos, rope_pos, kept, vis_id, _ = rebuild(seq.hidden, seq.mask[:, -length:], seq.pos, seq.rope_pos,
                                                           seq.kept, seq.vis_id, spans, slots, renumber)
    return replace(seq, hidden=hidden, mask=mask, pos=pos, rope_pos=rope_pos, kept=kept, vis_id=vis_id, spans=None)


def reduced_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                    inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, query_index=None,
                    pixel_values=None, pixel_values_videos=None, image_grid_thw=None, video_grid_thw=None,
                    mm_token_type_ids=None, second_per_grid_ts=None, **kwargs):
    """Drop-in ``forward`` of an applied model. Returns logits over the reduced sequence, with
    ``kept_index`` [B, L'] (which input position each row came from; -1: a token a vision method
    made, or padding the reduction added on the left of a shorter row) and ``kept_mask`` [B, L']
    (False for padding and unused adaptive slots). ``query_index`` ([B] or int) marks the last
    prompt token the methods rank against (default: each row's last real token);
    recompute-without-cache callers pass the prompt's so the selection is the one the cached run
    made."""
    red: Reduction = self._epic
    adapter = red.adapter
    # generate() checks its keyword arguments against this signature, hence every family's
    # visual inputs are named here; the adapter takes its own.
    given_media = dict(pixel_values=pixel_values, pixel_values_videos=pixel_values_videos,
                       image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
                       mm_token_type_ids=mm_token_type_ids, second_per_grid_ts=second_per_grid_ts)
    for key, value in given_media.items():
        if value is not None and key not in adapter.media_keys:
            raise ValueError(f"{key}: {type(self).__name__} takes no {key}")
    media = {key: given_media[key] if key in given_media else kwargs.pop(key, None) for key in adapter.media_keys}
    for flag in ("output_attentions", "output_hidden_states", "return_dict", "cache_position"):
        kwargs.pop(flag, None)
    lm = adapter.language_model(self)
    n_layers = len(text_modules(lm))
    if inputs_embeds is None and input_ids is None:
        raise ValueError("input_ids: pass input_ids or inputs_embeds")
    has_media = any(v is not None for v in media.values())
    if has_media and input_ids is None:
        raise ValueError("input_ids: token reduction locates the visual tokens in input_ids; pass them with "
                         "the images / videos")
    b, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
    device = (input_ids if input_ids is not None else inputs_embeds).device

    use_cache = lm.config.use_cache if use_cache is None else use_cache
    if use_cache and past_key_values is None:
        past_key_values = DynamicCache(config=lm.config)
    if past_key_values is not None and getattr(past_key_values, "is_compileable", False):
        raise ValueError("past_key_values: token reduction needs a DynamicCache (layers hold different lengths)")
    past_len = past_key_values.get_seq_length(0) if past_key_values is not None else 0
    cached: Optional[CachedReduction] = getattr(past_key_values, "_epic", None) if past_len else None
    if cached is not None:
        if has_media and input_ids is not None and adapter.has_placeholders(self, input_ids):
            raise ValueError("pixel_values: this cache already holds a reduced visual prompt")
        media = {key: None for key in media}
        # Count past tokens in the prompt's original numbering (layer 0 may hold the reduced set).
        past_len = cached.prompt_len + past_key_values.get_seq_length(n_layers - 1) - cached.mask.shape[1]

    if attention_mask is None:
        attention_mask = torch.ones(b, past_len + length, dtype=torch.bool, device=device)
    attention_mask = attention_mask.bool()
    given = position_ids
    if position_ids is not None and position_ids.dim() == 3:
        position_ids = position_ids[0] if position_ids.shape[0] == 4 else None
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

    prompt = Prompt(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                    position_ids=position_ids, given_positions=given, query_index=query_index, media=media)
    reducing = prompt.has_media
    seq = adapter.embed(self, prompt, red if reducing else None)
    mask_switch = None
    if cached is not None:
        # Decoding after a reduced prefill: layers >= K attend over the kept prompt + new tokens.
        reduced_mask = torch.cat([cached.mask, attention_mask[:, cached.prompt_len:]], dim=1)
        seq = replace(seq, pos=seq.pos + cached.pos_delta)
        rope = adapter.decode_rope(self, seq, cached, given)
        if rope is not None:
            seq = replace(seq, rope_pos=rope)
        mask_switch = (cached.layer, reduced_mask)
    seq = run_layers(lm, seq, 0, n_layers, reduction=red.in_llm() if reducing else None, cache=past_key_values,
                     use_cache=use_cache, mask_switch=mask_switch, **kwargs)

    if reducing and past_key_values is not None:
        past_key_values._epic = CachedReduction(layer=red.layer if red.spec.stage == "llm" else 0,
                                                prompt_len=length, mask=seq.mask,
                                                pos_delta=seq.pos[:, -1:] - last_position,
                                                rope_delta=prompt.rope_delta)
    return lm_output(self, adapter, seq, labels, logits_to_keep, past_key_values, **kwargs)


def lm_output(model, adapter: Adapter, seq: Sequence, labels, logits_to_keep, cache, **kwargs):
    hidden = adapter.language_model(model).norm(seq.hidden)
    kept, mask = seq.kept, seq.mask[:, -hidden.shape[1]:]
    if isinstance(logits_to_keep, int) and logits_to_keep > 0:
        hidden, kept, mask = hidden[:, -logits_to_keep:], kept[:, -logits_to_keep:], mask[:, -logits_to_keep:]
    elif isinstance(logits_to_keep, Tensor):
        hidden, kept, mask = hidden[:, logits_to_keep], kept[:, logits_to_keep], mask[:, logits_to_keep]
    logits = adapter.lm_head(model)(hidden)
    loss = None
    if labels is not None:
        lab = torch.where(kept >= 0, labels.gather(1, kept.clamp(min=0)), IGNORE_INDEX)
        loss = model.loss_function(logits=logits, labels=lab, vocab_size=adapter.vocab_size(model), **kwargs)
    out_cls = adapter.output_cls or CausalLMOutputWithPast
    out = out_cls(loss=loss, logits=logits, past_key_values=cache)
    out["kept_index"] = kept
    out["kept_mask"] = mask
    return out
