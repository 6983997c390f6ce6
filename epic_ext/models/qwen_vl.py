"""The Qwen-VL adapter: Qwen2-VL, Qwen2.5-VL and Qwen3-VL (transformers 5.23
``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``,
``Qwen3VLForConditionalGeneration``).

What is particular to the family, and how the shared forward gets it:

* Dynamic resolution. An image of grid (1, H, W) patches is ``H/m x W/m`` tokens after the
  ``m x m`` patch merger (m = ``spatial_merge_size``, 2); a video of grid (T, H, W) is T temporal
  patch groups of ``H/m x W/m`` tokens each. Every image and every frame group is one visual
  unit with its own budget: the published video ports (FlashVID, FastVID, DyCoke) budget per
  frame, and Qwen3-VL already puts each frame group in its own span between timestamps. A
  budget larger than a unit raises (``keep: ...``).
* M-RoPE. Positions are (temporal, height, width) triples (``get_rope_index`` of the model,
  called on the unreduced prompt); text tokens use one index on all three. Every token a
  reduction keeps, before the LLM or inside it, keeps its original triple, as in the published
  ports (DART's Qwen2-VL/2.5-VL code, VisionZip's Qwen2.5-VL code): nothing is renumbered, and
  decoding continues at text position + the unreduced prompt's rope delta, so a decode token
  sits where it would without reduction.
* DeepStack (Qwen3-VL). Features of intermediate vision layers are added to the visual tokens
  after LLM layers 0, 1, ...: they ride on the sequence as ``inject`` tables indexed by each
  token's ``vis_id``, which the reduction gathers with everything else, so a token dropped at
  layer K gets no later injection and a kept one gets its own.
* Qwen2.5-VL's windowed vision attention and the vision tower in general run unchanged (the
  model's own ``get_image_features`` / ``get_video_features``).

Vision-stage methods rank against a [CLS] token this encoder does not have. The published Qwen
ports rank by the attention each merged token receives in one full-attention vision block
(``qwen_vision.py``); a method that implements that rule (``no_cls``: VisionZip, PruMerge+ as
EffiVLM-Bench's Qwen2-VL port) gets a ``VisionUnitsContext`` per group of units and its selection
is applied before the LLM with the original positions; the others (PruMerge, TRIM: no published
Qwen port of theirs was found) are rejected by ``apply`` with a clear error.
"""
from __future__ import annotations

import inspect
from dataclasses import replace
from typing import Optional

import torch
from torch import Tensor

from ..methods import MethodSpec
from ..methods.base import VisionUnitsContext
from .adapter import Adapter, Prompt
from .decoder import Sequence, select_units
from .qwen_vision import features_with_ranking
from .forward import Reduction
from .sequence import rebuild


class QwenVLAdapter(Adapter):
    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
    media_keys = ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw", "mm_token_type_ids",
                  "second_per_grid_ts")
    renumber = False
    unit_arguments = {"image": "image_grid_thw", "video": "video_grid_thw"}

    def placeholder_ids(self, model) -> dict[str, int]:
        cfg = model.config
        return {"image": cfg.image_token_id, "video": cfg.video_token_id}

    def check(self, model, spec: MethodSpec) -> None:
        inner = getattr(model, "model", None)
        if not hasattr(model, "lm_head") or not hasattr(inner, "language_model") or not hasattr(inner, "visual"):
            raise ValueError(f"model: token reduction replaces the forward of the Qwen-VL "
                             f"...ForConditionalGeneration, got {type(model).__name__}; pass the model that holds "
                             f"the LM head, not its inner model")
        text = model.config.text_config
        if getattr(text, "use_sliding_window", False) or "sliding_attention" in (getattr(text, "layer_types", None)
                                                                                  or ()):
            raise ValueError("model: token reduction builds full causal masks; this model's text config uses "
                             "sliding-window attention (use_sliding_window / layer_types)")
        if spec.stage == "vision" and not spec.no_cls:
            raise ValueError(f"model: {spec.name} ranks vision-encoder tokens against a [CLS] token, which the "
                             f"Qwen-VL encoder does not have, and has no rule for such encoders yet (visionzip and "
                             f"prumerge_plus have: the attention each token receives, as their published Qwen code). "
                             f"Use visionzip, prumerge_plus or an in-LLM method (dart, fastv, random, pooling) instead")

    # ----------------------------------------------------------------------- units and features

    def units(self, model, media: dict) -> list[tuple[str, int, tuple[int, int]]]:
        m = model.config.vision_config.spatial_merge_size
        out = []
        for kind, key in (("image", "image_grid_thw"), ("video", "video_grid_thw")):
            grid = media.get(key)
            if grid is None:
                continue
            for i, (t, h, w) in enumerate(grid.tolist()):
                if h % m or w % m:
                    raise ValueError(f"{key}: {kind} {i} has a {h}x{w} patch grid, not a multiple of the "
                                     f"{m}x{m} merger")
                if kind == "image" and t != 1:
                    raise ValueError(f"{key}: image {i} has t = {t}; images have one temporal group")
                out += [(kind, i, (h // m, w // m))] * t
        return out

    def _features(self, model, media: dict, kind: str, ranking: bool = False):
        """Per image / video: merged features [n, D], the DeepStack features per layer, and with
        ``ranking`` the (received attention [n], keys [n, d]) vision-side methods rank with."""
        pixels = media.get("pixel_values" if kind == "image" else "pixel_values_videos")
        grid = media.get(f"{kind}_grid_thw")
        if pixels is None:
            return [], [], None
        if grid is None:
            raise ValueError(f"{kind}_grid_thw: needed with the {kind} pixels")
        patches = int(grid.prod(-1).sum())
        if pixels.shape[0] != patches:
            key = "pixel_values" if kind == "image" else "pixel_values_videos"
            raise ValueError(f"{key}: {pixels.shape[0]} patches, but {kind}_grid_thw describes {patches}")
        ranked = None
        if ranking:
            out, received, keys, head_keys = features_with_ranking(model, pixels, grid, kind, head_keys=True)
            ranked = list(zip(received, keys, head_keys))
        else:
            fn = model.model.get_image_features if kind == "image" else model.model.get_video_features
            out = fn(pixels, grid, return_dict=True)
        feats = list(out.pooler_output)
        deep = [list(layer) for layer in getattr(out, "deepstack_features", None) or []]
        return feats, deep, ranked

    def rope_positions(self, model, prompt: Prompt) -> Tensor:
        """[3, B, L] M-RoPE positions of the unreduced prompt (the model's own get_rope_index)."""
        ids, media = prompt.input_ids, prompt.media
        ph = self.placeholder_ids(model)
        derived = (ids == ph["image"]).int() + 2 * (ids == ph["video"]).int()
        types = media.get("mm_token_type_ids")
        if types is None:
            types = derived
        elif types.shape != ids.shape or bool((types.to(derived.device).int() != derived).any()):
            # The model would silently give visual tokens text positions.
            raise ValueError("mm_token_type_ids: must mark image placeholders 1, video placeholders 2 and text 0, "
                             "as input_ids hold them")
        fn = model.model.get_rope_index
        names = inspect.signature(fn).parameters
        kwargs = dict(mm_token_type_ids=types, image_grid_thw=media.get("image_grid_thw"),
                      video_grid_thw=media.get("video_grid_thw"), attention_mask=prompt.attention_mask[:, -ids.shape[1]:])
        if "second_per_grid_ts" in names:
            ts, videos = media.get("second_per_grid_ts"), media.get("video_grid_thw")
            if ts is not None and videos is not None and len(ts) != len(videos):
                raise ValueError(f"second_per_grid_ts: one value per video expected ({len(videos)}), got {len(ts)}")
            kwargs["second_per_grid_ts"] = ts
        pos, _ = fn(ids, **{k: v for k, v in kwargs.items() if k in names})
        return pos

    # ----------------------------------------------------------------------- the contract

    def embed(self, model, prompt: Prompt, red: Optional[Reduction]) -> Sequence:
        seq = self.text_sequence(model, prompt)
        emb = seq.hidden
        b, length, d = emb.shape
        device = emb.device
        given = prompt.given_positions
        # The processor returns mm_token_type_ids for text-only prompts too: no pixels and no
        # grids is a text prompt.
        visual = any(prompt.media.get(k) is not None
                     for k in ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw"))
        if not visual:
            rope = given[-3:] if given is not None and given.dim() == 3 else prompt.position_ids[None].expand(3, -1, -1)
            return replace(seq, rope_pos=rope)

        spans = self.locate(model, prompt.input_ids, prompt.attention_mask, prompt.media)
        vision_method = red is not None and red.spec.stage == "vision"
        per_kind = {kind: self._features(model, prompt.media, kind, vision_method) for kind in ("image", "video")}
        feats, deep, ranked = [], None, []
        n_deep = max(len(per_kind["image"][1]), len(per_kind["video"][1]))
        if n_deep:
            deep = [[] for _ in range(n_deep)]
        for u, (kind, media_i, frame) in enumerate(zip(spans.kind, spans.media, spans.frame)):
            n = spans.length[u]
            f_all, deep_all, ranked_all = per_kind[kind]
            if media_i >= len(f_all):
                raise ValueError(f"pixel_values{'_videos' if kind == 'video' else ''}: {kind} {media_i} has "
                                 f"placeholders but no pixels")
            feats.append(f_all[media_i][frame * n:(frame + 1) * n])
            if ranked_all is not None:
                ranked.append(tuple(t[frame * n:(frame + 1) * n] for t in ranked_all[media_i]))
            for layer in range(n_deep):
                deep[layer].append(deep_all[layer][media_i][frame * n:(frame + 1) * n])
        flat_feats = torch.cat(feats).to(emb.dtype)
        pos_idx = torch.cat([torch.arange(r * length + s, r * length + s + n)
                             for r, s, n in zip(spans.row, spans.start, spans.length)]).to(device, non_blocking=True)
        hidden = emb.reshape(b * length, d).index_copy(0, pos_idx, flat_feats).view(b, length, d)

        if given is not None and given.dim() == 3:
            rope = given[-3:]
        else:
            rope = self.rope_positions(model, prompt)
        mask = prompt.attention_mask[:, -length:]
        top = rope.masked_fill(~mask[None], torch.iinfo(rope.dtype).min).amax(dim=(0, 2))
        prompt.rope_delta = (top + 1 - mask.sum(1))[:, None]
        seq = replace(seq, hidden=hidden, spans=spans, rope_pos=rope)
        if deep is not None:
            seq = replace(seq, inject=[torch.cat(layer) for layer in deep], vis_id=spans.visual_ids(b, length))
        if vision_method:
            seq = self._vision_reduce(seq, feats, ranked, red, model.config.vision_config.spatial_merge_size ** 2)
        return seq

    def _vision_reduce(self, seq: Sequence, feats: list, ranked: list, red: Reduction, patches: int) -> Sequence:
        """A vision-side method on the merged tokens of every unit (ranked by received attention),
        applied before the LLM: kept (or merged-into) tokens keep their positions, ids and
        DeepStack rows (a merged token its target's, as FlashVID does)."""
        spans = seq.spans

        def select(units, _visual_mask):
            h, w = spans.grid[units[0]]
            ctx = VisionUnitsContext(features=torch.stack([feats[u] for u in units]).to(seq.hidden.dtype),
                                     received=torch.stack([ranked[u][0] for u in units]),
                                     keys=torch.stack([ranked[u][1] for u in units]), grid=(h, w),
                                     kind=spans.kind[units[0]], head_keys=torch.stack([ranked[u][2] for u in units]),
                                     patches=patches)
            return red.spec.fn(ctx, red.cfg)

        slots = select_units(seq, select)
        length = seq.hidden.shape[1]
        hidden, mask, pos, rope_pos, kept, vis_id, _ = rebuild(seq.hidden, seq.mask[:, -length:], seq.pos, seq.rope_pos,
                                                               seq.kept, seq.vis_id, spans, slots, renumber=False)
        return replace(seq, hidden=hidden, mask=mask, pos=pos, rope_pos=rope_pos, kept=kept, vis_id=vis_id,
                       spans=None)

    def decode_rope(self, model, seq: Sequence, cached, given: Optional[Tensor]) -> Tensor:
        if given is not None and given.dim() == 3:
            return given[-3:]
        delta = cached.rope_delta if cached.rope_delta is not None else 0
        return (seq.pos + delta)[None].expand(3, -1, -1)
