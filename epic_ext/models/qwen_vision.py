"""What vision-side methods read from a Qwen-VL vision tower, which has no [CLS] token: the
attention each token receives in one full-attention vision block (every published Qwen port's
stand-in for [CLS] attention: VisionZip's Qwen2.5-VL code, FlashVID, VisPruner, EffiVLM-Bench),
and that block's keys, both averaged over the m x m patches the merger joins into one LLM token.

The block's post-RoPE q and k are captured where it calls its attention function (the same
registered-interface trick as the LLM capture in ``decoder.py``), one call per image / video
frame group; the received attention is computed from them in query chunks (no [H, T, T] matrix),
in fp32. Qwen2.5-VL's windowed blocks see the patches in window order; the result is put back in
raster order with the tower's own window index.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import Tensor
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from .decoder import _CaptureConfig

_VISION_CAPTURE = "epic_ext_vision_capture"
_QUERY_CHUNK = 512


def received_attention(q: Tensor, k: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """q, k [H, T, d] -> (attention each key receives: softmax rows averaged over heads, summed
    over the T queries [T] fp32; keys averaged over heads [T, d] fp32; keys with the heads side
    by side [T, H d] fp32, PruMerge+'s metric in EffiVLM-Bench's Qwen2-VL port)."""
    qf, kf = q.float(), k.float()
    got = torch.zeros(k.shape[1], dtype=torch.float32, device=k.device)
    for a in range(0, q.shape[1], _QUERY_CHUNK):
        p = (torch.matmul(qf[:, a:a + _QUERY_CHUNK], kf.transpose(1, 2)) * scale).softmax(dim=-1)
        got += p.mean(dim=0).sum(dim=0)
    return got, kf.mean(dim=0), kf.transpose(0, 1).reshape(k.shape[1], -1)


def _capturing_vision_attention(module, query, key, value, attention_mask=None, **kwargs):
    store = module._epic_capture
    scale = kwargs.get("scaling", getattr(module, "scaling", query.shape[-1] ** -0.5))
    cu = kwargs.get("cu_seq_lens_q")
    q, k = query.detach()[0], key.detach()[0]                  # [H, T, d]
    bounds = cu.tolist() if cu is not None else [0, q.shape[1]]
    for a, e in zip(bounds[:-1], bounds[1:]):
        store.append(received_attention(q[:, a:e], k[:, a:e], scale))
    inner = module.config._base._attn_implementation
    eager = sys.modules[type(module).__module__].eager_attention_forward
    fn = ALL_ATTENTION_FUNCTIONS.get_interface(inner, eager) if inner != "eager" else eager
    return fn(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(_VISION_CAPTURE, _capturing_vision_attention)


def ranking_block(model) -> int:
    """The vision block whose attention ranks tokens: Qwen2-VL's second-to-last (EffiVLM-Bench's
    port), Qwen2.5-VL's last full-attention block (the last block in the released models, as in
    VisionZip's code), Qwen3-VL's last (FlashVID)."""
    visual = model.model.visual
    depth = len(visual.blocks)
    full = getattr(visual, "fullatt_block_indexes", None)
    if full is not None:
        return max(i % depth for i in full)
    return depth - 2 if model.config.model_type == "qwen2_vl" else depth - 1


def _window_index(visual, grid: Tensor) -> Optional[Tensor]:
    if getattr(visual, "fullatt_block_indexes", None) is None:
        return None
    from transformers.vision_utils import get_vision_window_index
    index, _ = get_vision_window_index(grid, spatial_merge_size=visual.spatial_merge_size,
                                       window_size=visual.window_size, patch_size=visual.patch_size, kwargs={})
    return index


def features_with_ranking(model, pixels: Tensor, grid: Tensor, kind: str, head_keys: bool = False):
    """The tower's output for one media kind, plus per image / video the received attention
    [n] and keys [n, d] of every merged token in raster order (frame groups one after another);
    with ``head_keys`` also the keys with the heads side by side [n, H d] (a fourth list)."""
    visual = model.model.visual
    attn = visual.blocks[ranking_block(model)].attn
    store: list = []
    attn._epic_capture = store
    attn.config = _CaptureConfig(attn.config, _VISION_CAPTURE)
    try:
        fn = model.model.get_image_features if kind == "image" else model.model.get_video_features
        out = fn(pixels, grid, return_dict=True)
    finally:
        attn.config = attn.config._base
        del attn._epic_capture
    unit = visual.spatial_merge_size ** 2
    received = torch.cat([r for r, _, _ in store])
    keys = torch.cat([k for _, k, _ in store])
    received = received.view(-1, unit).mean(dim=1)
    keys = keys.view(-1, unit, keys.shape[-1]).mean(dim=1)
    wide = None
    if head_keys:
        wide = torch.cat([w for _, _, w in store])
        wide = wide.view(-1, unit, wide.shape[-1]).mean(dim=1)
    order = _window_index(visual, grid)
    if order is not None:                                       # window order -> raster order
        received = torch.empty_like(received).index_copy_(0, order.to(received.device), received)
        keys = torch.empty_like(keys).index_copy_(0, order.to(keys.device), keys)
        if wide is not None:
            wide = torch.empty_like(wide).index_copy_(0, order.to(wide.device), wide)
    sizes = (grid.prod(-1) // unit).tolist()
    if head_keys:
        return out, list(received.split(sizes)), list(keys.split(sizes)), list(wide.split(sizes))
    return out, list(received.split(sizes)), list(keys.split(sizes))
