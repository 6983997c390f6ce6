"""A slow, obviously-correct reference of VisionZip on Qwen2-VL / Qwen2.5-VL / Qwen3-VL for
tests/models/test_qwen_visionzip.py, written from the published semantics (VisionZip's own
Qwen2.5-VL code; EffiVLM-Bench's Qwen2-VL port; FlashVID for Qwen3-VL), not from epic_ext:

* ranking block: Qwen2-VL's second-to-last vision block, Qwen2.5-VL's last full-attention block,
  Qwen3-VL's last block;
* its input is read with a forward pre-hook, its post-RoPE q and k recomputed with the block's own
  modules (norm1, attn.qkv, the cos / sin the tower hands the block), in the block's token order;
* per image / video frame group: the full [H, T, T] softmax (fp64), mean over heads, sum over
  queries = the attention each patch receives; mean over each 2x2 merge group (4 consecutive
  patches); keys: mean over heads, then over the merge group;
* back to raster order: Qwen2.5-VL's window order derived here with plain loops (windows of
  window_size / merge / patch merged tokens, raster order of windows, raster order inside) and
  checked against the merger's own output order;
* VisionZip per unit, in Python loops: the top ``dominant`` tokens (ties to the lower index); the
  rest in ascending order, every ``step``-th of them a contextual target (step = max(1, M // C)),
  every other one assigned to the target of most cosine-similar key (ties: the first target);
  contextual token = target + mean(assigned) on the merged embeddings (a target with nothing
  assigned unchanged). Kept: dominant and targets, ascending, each at its own position.

Every vision tower run here is one image / one video alone.
"""
from __future__ import annotations

import math

import torch

import _qwen_refs as refs


def ranking_block_of(model) -> int:
    vc = model.config.vision_config
    family = model.config.model_type
    if family == "qwen2_vl":
        return vc.depth - 2
    if family == "qwen2_5_vl":
        return max(vc.fullatt_block_indexes)
    return vc.depth - 1


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def window_order(model, t: int, h: int, w: int) -> list[int]:
    """For the merged tokens of one image / video (t frame groups of h x w), the raster index of
    each token in the order the vision blocks see them (identity without windowed attention)."""
    vc = model.config.vision_config
    if model.config.model_type != "qwen2_5_vl":
        return list(range(t * h * w))
    win = vc.window_size // vc.spatial_merge_size // vc.patch_size
    order = []
    for f in range(t):
        for wy in range(0, h, win):
            for wx in range(0, w, win):
                for y in range(wy, min(wy + win, h)):
                    for x in range(wx, min(wx + win, w)):
                        order.append(f * h * w + y * w + x)
    return order


@torch.no_grad()
def item_ranking(model, pixels: torch.Tensor, grid: torch.Tensor, kind: str) -> dict:
    """One image or one video (``grid`` [1, 3]) through the stock vision tower alone: merged
    features [t n, D] in raster order (the model's own output), and per merged token the
    attention received in the ranking block [t n] and its keys [t n, d] (fp64, raster order),
    with the block-order scores [t n] for the tests that check the reordering matters."""
    visual = model.model.visual
    block = visual.blocks[ranking_block_of(model)]
    seen = {}

    def pre(mod, args, kwargs):
        seen["x"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        seen["cos_sin"] = kwargs["position_embeddings"]

    def merged(mod, args, out):
        seen["merged"] = out.detach().clone()

    handles = [block.register_forward_pre_hook(pre, with_kwargs=True), visual.merger.register_forward_hook(merged)]
    try:
        fn = model.model.get_image_features if kind == "image" else model.model.get_video_features
        out = fn(pixels, grid, return_dict=True)
    finally:
        for h in handles:
            h.remove()
    feats = torch.cat(list(out.pooler_output))                          # [t n, D] raster order

    x = seen["x"]                                                       # [T, C] block order
    attn = block.attn
    n_heads = attn.num_heads
    qkv = attn.qkv(block.norm1(x)).reshape(x.shape[0], 3, n_heads, -1)
    cos, sin = (c.float()[:, None, :] for c in seen["cos_sin"])         # [T, 1, d]
    q = qkv[:, 0].float() * cos + _rotate_half(qkv[:, 0].float()) * sin  # [T, H, d]
    k = qkv[:, 1].float() * cos + _rotate_half(qkv[:, 1].float()) * sin
    d = q.shape[-1]

    t, gh, gw = (int(v) for v in grid[0])
    m = model.config.vision_config.spatial_merge_size
    h, w = gh // m, gw // m
    per_unit = gh * gw                                                  # patches of one frame group
    received, keys = [], []
    for f in range(t):
        qu = q[f * per_unit:(f + 1) * per_unit].double()
        ku = k[f * per_unit:(f + 1) * per_unit].double()
        probs = (torch.einsum("qhd,khd->hqk", qu, ku) * d ** -0.5).softmax(dim=-1)   # [H, T, T]
        got = probs.mean(dim=0).sum(dim=0)                              # [T] received per patch
        received.append(got.view(-1, m * m).mean(dim=1))                # [n] per merged token
        keys.append(ku.mean(dim=1).view(-1, m * m, d).mean(dim=1))      # [n, d]
    block_received = torch.cat(received)
    block_keys = torch.cat(keys)

    order = window_order(model, t, h, w)
    # The derived order is the tower's: the merger's rows (block order) are the output's rows
    # (raster order) permuted by it.
    assert torch.equal(seen["merged"], feats[order]), "window order"
    raster_received = torch.empty_like(block_received)
    raster_keys = torch.empty_like(block_keys)
    for j, r in enumerate(order):
        raster_received[r] = block_received[j]
        raster_keys[r] = block_keys[j]
    return dict(features=feats, received=raster_received, keys=raster_keys, block_received=block_received)


def items_of(batch: dict, kind: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(pixels, grid [1, 3]) of each image or video of ``batch``, in order."""
    grid_key = f"{kind}_grid_thw"
    px_key = "pixel_values" if kind == "image" else "pixel_values_videos"
    if grid_key not in batch:
        return []
    out, at = [], 0
    for g in batch[grid_key]:
        p = int(g.prod())
        out.append((batch[px_key][at:at + p], g[None]))
        at += p
    return out


def batch_ranking(model, batch: dict) -> dict:
    """{kind: [item_ranking of each image / video]}."""
    return {kind: [item_ranking(model, px, g, kind) for px, g in items_of(batch, kind)] for kind in ("image", "video")}


def split(n: int, keep=None, dominant=None, contextual=None) -> tuple[int, int]:
    """(dominant, contextual) of a unit of n merged tokens: the published ratios 0.45 / 0.05 by
    default; ``keep`` split 54:10 (contextual = round half up of keep * 10 / 64)."""
    if keep is None:
        dom = int(0.45 * n) if dominant is None else dominant
        ctx = max(int(0.05 * n), 1) if contextual is None else contextual
        return dom, ctx
    total = refs.budget_of(keep, n)
    ctx = math.floor(total * 10 / 64 + 0.5)
    return total - ctx, ctx


def visionzip_unit(features: torch.Tensor, received: torch.Tensor, keys: torch.Tensor, dom: int, ctx: int):
    """One unit: (kept local indices ascending, their hidden states [k, D] fp64)."""
    n = features.shape[0]
    scores = [float(v) for v in received]
    dominant = refs.topk_low_index(scores, dom)
    rest = [i for i in range(n) if i not in dominant]
    c = min(ctx, len(rest))
    targets, others = [], []
    if c > 0:
        step = max(1, len(rest) // c)
        slots = list(range(0, len(rest), step))[:c]
        targets = [rest[p] for p in slots]
        others = [rest[p] for p in range(len(rest)) if p not in slots]
    unit_keys = [keys[i] / keys[i].norm() for i in range(n)]
    assigned = {t: [] for t in targets}
    for o in others:
        best, best_sim = None, None
        for t in targets:
            sim = float(torch.dot(unit_keys[o], unit_keys[t]))
            if best_sim is None or sim > best_sim:
                best, best_sim = t, sim
        assigned[best].append(o)
    x = features.double()
    hidden = {i: x[i] for i in dominant}
    for t in targets:
        merged = x[t]
        if assigned[t]:
            merged = merged + torch.stack([x[o] for o in assigned[t]]).mean(dim=0)
        hidden[t] = merged
    kept = sorted(hidden)
    return kept, torch.stack([hidden[i] for i in kept])


def visionzip_reference(model, batch: dict, *, keep=None, dominant=None, contextual=None, ranking=None):
    """Per row, per unit in prompt order: (kept local indices, hidden states [k, D] fp64)."""
    ranking = ranking if ranking is not None else batch_ranking(model, batch)
    return refs.per_unit(batch, ranking, lambda item, part, n: visionzip_unit(
        item["features"][part], item["received"][part], item["keys"][part], *split(n, keep, dominant, contextual)))
