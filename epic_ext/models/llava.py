"""The LLaVA-1.5 adapter (transformers 5.23 ``LlavaForConditionalGeneration``): CLIP vision tower,
one feature layer, [CLS] dropped ("default"), MLP projector, a Llama-like language model. Each
image is one unit of ``image_seq_length`` tokens on its square grid; a row may hold none, one
or several images (``pixel_values`` lists them in prompt order). Vision-stage methods (TRIM,
PruMerge, VisionZip) rank against the [CLS] token; their shorter sequence is renumbered, as in
the methods' own LLaVA code. Everything else is the shared forward (``forward.py``).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast

from ..methods import MethodSpec
from ..methods.base import VisionContext
from .adapter import Adapter, Prompt
from .decoder import Sequence
from .forward import Reduction, vision_slots
from .sequence import Spans, compact_slots


def vision_features(model, pixel_values, input_ids, prompt_mask, spans: Spans, red: Optional[Reduction]):
    """Vision tower + (vision method) + projector -> [S, K, D] embeddings of the units (in unit
    order) and their validity (None: all valid)."""
    cfg = model.config
    layer_sel = cfg.vision_feature_layer
    if not isinstance(layer_sel, int):
        raise ValueError("vision_feature_layer: token reduction supports a single feature layer")
    out = model.model.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
    hs = out.hidden_states
    if spans.media != list(range(len(spans))):
        order = torch.tensor(spans.media, device=pixel_values.device)
        hs = tuple(h.index_select(0, order) for h in hs)
    feat_idx = layer_sel % len(hs)
    feats = hs[feat_idx]
    if cfg.vision_feature_select_strategy == "default":
        feats = feats[:, 1:]
    valid = None
    if red is not None and red.spec.stage == "vision":
        n = feats.shape[1]
        side = int(round(n ** 0.5))
        rows = spans.row_t
        ctx = VisionContext(features=feats, hidden_states=hs, feature_layer=feat_idx,
                            vision_tower=model.model.vision_tower, input_ids=input_ids.index_select(0, rows),
                            attention_mask=prompt_mask.index_select(0, rows), image_token_id=cfg.image_token_id,
                            grid=(side, n // side))
        res = red.spec.fn(ctx, red.cfg)
        feats, valid = res.features, res.valid
        if valid is not None and getattr(red.cfg, "max_k", None) is None:
            feats, valid = compact_slots(feats, valid)
    return model.model.multi_modal_projector(feats), valid


class LlavaAdapter(Adapter):
    model_types = ("llava",)
    media_keys = ("pixel_values",)
    renumber = True
    output_cls = LlavaCausalLMOutputWithPast

    def placeholder_ids(self, model) -> dict[str, int]:
        return {"image": model.config.image_token_id}

    def unit_tokens(self, model) -> int:
        return model.config.image_seq_length

    def units(self, model, media: dict) -> list:
        pixels = media.get("pixel_values")
        n = model.config.image_seq_length
        side = int(round(n ** 0.5))
        return [("image", i, (side, n // side)) for i in range(0 if pixels is None else pixels.shape[0])]

    def check(self, model, spec: MethodSpec) -> None:
        check_model(model, spec)

    def embed(self, model, prompt: Prompt, red: Optional[Reduction]) -> Sequence:
        """Token + image embeddings of a prompt (a vision method already applied: each image
        replaced by its slots, positions renumbered as the methods' own code does)."""
        cfg = model.config
        seq = self.text_sequence(model, prompt)
        emb = seq.hidden
        b, length, d = emb.shape
        device = emb.device
        pixel_values = prompt.media.get("pixel_values")
        if pixel_values is None:
            return seq
        n = cfg.image_seq_length
        spans = self.locate(model, prompt.input_ids, prompt.attention_mask, prompt.media)
        # Methods read the prompt up to query_index (TRIM's question), not tokens after it.
        prompt_mask = prompt.attention_mask[:, -length:] & \
            (torch.arange(length, device=device) <= prompt.query_index[:, None])
        img, valid = vision_features(model, pixel_values, prompt.input_ids, prompt_mask, spans, red)
        seq = replace(seq, spans=spans)
        if red is not None and red.spec.stage == "vision":
            return vision_slots(seq, spans, img, valid, renumber=True)
        flat = ((spans.row_t * length + spans.start_t)[:, None] + torch.arange(n, device=device)).reshape(-1)
        hidden = emb.reshape(b * length, d).index_copy(0, flat, img.reshape(-1, d).to(emb.dtype))
        return replace(seq, hidden=hidden.view(b, length, d))


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


