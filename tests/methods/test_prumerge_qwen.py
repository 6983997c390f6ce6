"""PruMerge+ on the tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL models against a slow, per-unit loop
reference of its published Qwen port (EffiVLM-Bench, ``qwen2vl_vision_tower_forward_prumerge_plus``),
written here from that code, not from epic_ext:

* ranking block: Qwen2-VL's ``blocks[-2]`` (the port's), Qwen2.5-VL's last full-attention block,
  Qwen3-VL's last block (no published port on those: VisionZip's / FlashVID's block); its input
  read with a forward pre-hook, post-RoPE q and k recomputed with the block's own modules;
* per image / video frame group: the full [H, T, T] softmax (fp64), pooled 4x4
  (``view(H, T/4, 4, T/4, 4).mean(2, 4)``), mean over heads and queries = "cls_attn"; the metric:
  keys with the heads side by side, mean over each group of 4 patches; back to raster order;
* numpy's percentiles for the IQR fence, ratio = outliers / N, iqr_token = max(int(N ratio), 1),
  budget = max(int(b N), 1); budget > iqr_token: the top iqr_token plus ``arange(0, N,
  max(1, int(N / budget)))`` without them, cut to the budget; else the top budget;
* each kept token += sum of cls_attn_j x_j over its 32 most key-cosine-similar other tokens
  (``max(min(32, rest), 1)``) of the merged embeddings; every kept token at its own position.

Checks: kept positions exactly and the reduced sequence's visual hidden states (atol 1e-5) on the
mixed left-padded batch of test_qwen_integration (text-only, 1 and 2 images, videos), both
selection branches exercised; a 42-token image (the 32-neighbour cut, several query chunks); the
errors; rows == rows alone; LLaVA's PruMerge+ is untouched (tests/methods/test_vision_methods.py).
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys

import numpy as np
import pytest
import torch

from epic_ext.methods import VisionUnitsContext, get_method
from epic_ext.methods.prumerge import prumerge_plus_units
from epic_ext.models import apply, qwen_vision, revert
from epic_ext.models import tiny_qwen as tq

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "models"))

import _qwen_refs as refs  # noqa: E402
import _qwen_vz_ref as vz  # noqa: E402
from test_qwen_integration import assert_rows_match_rows_alone, batch_of, model_of  # noqa: E402

FAMILIES = tq.FAMILIES

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- the slow reference

@torch.no_grad()
def item_scores(model, pixels: torch.Tensor, grid: torch.Tensor, kind: str) -> dict:
    """One image / video alone through the stock tower: merged features [t n, D] (raster order),
    cls_attn [t n] and the metric [t n, H d] per merged token (fp64, raster order)."""
    visual = model.model.visual
    block = visual.blocks[vz.ranking_block_of(model)]
    seen = {}

    def pre(mod, args, kwargs):
        seen["x"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        seen["cos_sin"] = kwargs["position_embeddings"]

    handle = block.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        fn = model.model.get_image_features if kind == "image" else model.model.get_video_features
        out = fn(pixels, grid, return_dict=True)
    finally:
        handle.remove()
    feats = torch.cat(list(out.pooler_output))
    x = seen["x"]
    qkv = block.attn.qkv(block.norm1(x)).reshape(x.shape[0], 3, block.attn.num_heads, -1)
    cos, sin = (c.double()[:, None, :] for c in seen["cos_sin"])
    q = qkv[:, 0].double() * cos + vz._rotate_half(qkv[:, 0].double()) * sin       # [T, H, d]
    k = qkv[:, 1].double() * cos + vz._rotate_half(qkv[:, 1].double()) * sin
    heads, d = q.shape[1], q.shape[2]
    t, gh, gw = (int(v) for v in grid[0])
    m = model.config.vision_config.spatial_merge_size
    per_unit = gh * gw
    cls_attn, metric = [], []
    for f in range(t):
        qu, ku = q[f * per_unit:(f + 1) * per_unit], k[f * per_unit:(f + 1) * per_unit]
        tt = qu.shape[0]
        attn = (torch.einsum("qhd,khd->hqk", qu, ku) / d ** 0.5).softmax(dim=-1)       # [H, T, T]
        pooled = attn.view(heads, tt // (m * m), m * m, tt // (m * m), m * m).mean(dim=(2, 4))
        cls_attn.append(pooled.mean(dim=(0, 1)))
        metric.append(ku.reshape(tt, -1).view(tt // (m * m), m * m, -1).mean(dim=1))
    block_cls, block_metric = torch.cat(cls_attn), torch.cat(metric)
    order = vz.window_order(model, t, gh // m, gw // m)
    raster_cls, raster_metric = torch.empty_like(block_cls), torch.empty_like(block_metric)
    for j, r in enumerate(order):
        raster_cls[r], raster_metric[r] = block_cls[j], block_metric[j]
    return dict(features=feats, cls_attn=raster_cls, metric=raster_metric)


def budget_of(keep, n: int) -> int:
    return max(int(keep * n), 1) if isinstance(keep, float) else max(keep, 1)


def prumerge_plus_unit(features, cls_attn, metric, keep, neighbors=32, whisker=1.5, branches=None):
    """One unit in Python loops: (kept local indices ascending, their hidden states [k, D] fp64)."""
    n = features.shape[0]
    scores = [float(v) for v in cls_attn]
    flat = np.asarray(scores, dtype=np.float64)
    q1, q3 = np.percentile(flat, 25), np.percentile(flat, 75)
    ratio = int((flat > q3 + whisker * (q3 - q1)).sum()) / n
    iqr_token = max(int(n * ratio), 1)
    budget = budget_of(keep, n)
    by_score = sorted(range(n), key=lambda i: (-scores[i], i))
    if budget > iqr_token:
        idx = by_score[:iqr_token]
        step = max(1, int(n / budget))
        idx = idx + [v for v in range(0, n, step) if v not in idx][:budget - iqr_token]
        branch = "fill"
    else:
        idx = by_score[:budget]
        branch = "top"
    if branches is not None:
        branches.add(branch)
    assert len(idx) == len(set(idx)) == budget
    x = features.double()
    unit = [metric[i] / metric[i].norm() for i in range(n)]
    hidden = {}
    for i in idx:
        rest = [j for j in range(n) if j != i]
        sims = {j: float(torch.dot(unit[i], unit[j])) for j in rest}
        near = sorted(rest, key=lambda j: (-sims[j], j))[:max(min(neighbors, len(rest)), 1)]
        hidden[i] = x[i] + sum(scores[j] * x[j] for j in near) if near else x[i]
    kept = sorted(hidden)
    return kept, torch.stack([hidden[i] for i in kept])


def batch_scores(model, b: dict) -> dict:
    return {kind: [item_scores(model, px, g, kind) for px, g in vz.items_of(b, kind)] for kind in ("image", "video")}


def reference(model, b: dict, keep, *, scores=None, branches=None, **opts):
    """Per row, per unit in prompt order: (kept local indices, hidden states [k, D] fp64)."""
    scores = scores if scores is not None else batch_scores(model, b)
    return refs.per_unit(b, scores, lambda item, part, n: prumerge_plus_unit(
        item["features"][part], item["cls_attn"][part], item["metric"][part], keep, branches=branches, **opts))


# --------------------------------------------------------------------------- helpers

@contextlib.contextmanager
def applied(model, **opts):
    apply(model, "prumerge_plus", **opts)
    try:
        yield model
    finally:
        revert(model)


@functools.lru_cache(maxsize=None)
def _scores(family):
    return batch_scores(model_of(family), batch_of(family))


# --------------------------------------------------------------------------- 1. vs the slow reference

# a ratio filled with grid tokens, a ratio at the 1-token floor (the top only), a count, a small
# neighbour count (the cosine cut inside the small units), and whisker 0 (more outliers than the
# budget: the top-budget branch on bigger units)
OPTIONS = [dict(keep=0.5), dict(keep=0.1), dict(keep=3), dict(keep=0.75, neighbors=2), dict(keep=0.3, whisker=0.0)]


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_slow_reference_on_mixed_batch(family):
    # text-only row, one and two images of different sizes, a video, an image + a video, left padded
    model, b = model_of(family), batch_of(family)
    branches = set()
    for opts in OPTIONS:
        expected = reference(model, b, scores=_scores(family), branches=branches, **opts)
        with applied(model, **opts), torch.no_grad(), refs.LayerInput(model) as seen:
            out = model(**b)
        refs.assert_matches_reference(model, out, seen.hidden, b, expected)
        for units, row in zip(refs.unit_layout(b), expected):
            assert [len(kept) for kept, _ in row] == [budget_of(opts["keep"], n) for _, _, n in units]
    assert branches == {"fill", "top"}


@pytest.mark.parametrize("family", FAMILIES)
def test_received_attention_scaled_to_the_published_cls_attn(family, monkeypatch):
    # the adapter's received attention / (4 N) is the port's 4x4-pooled head and query mean, and
    # its head-concatenated keys its metric (a 42-token image: several query chunks)
    model = model_of(family)
    b = refs.synthetic_batch(family, [dict(images=[(7, 6)], video=None, text="what is this ?")], seed=3)
    (ref,) = batch_scores(model, b)["image"]
    monkeypatch.setattr(qwen_vision, "_QUERY_CHUNK", 16)
    with torch.no_grad():
        _, received, _, wide = qwen_vision.features_with_ranking(model, b["pixel_values"], b["image_grid_thw"],
                                                                 "image", head_keys=True)
    patches = model.config.vision_config.spatial_merge_size ** 2
    torch.testing.assert_close(received[0].double() / (patches * 42), ref["cls_attn"], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(wide[0].double(), ref["metric"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_slow_reference_past_32_neighbours(family):
    # a 42-token image: each kept token merges its 32 nearest of 41 others (the cut matters), and
    # a 6-token one next to it
    model = model_of(family)
    b = refs.synthetic_batch(family, [dict(images=[(7, 6)], video=None, text="what is this ?"),
                                      dict(images=[(2, 3)], video=None, text="and this ?")], seed=3)
    for keep in (0.25, 0.6):
        expected = reference(model, b, keep)
        with applied(model, keep=keep), torch.no_grad(), refs.LayerInput(model) as seen:
            out = model(**b)
        refs.assert_matches_reference(model, out, seen.hidden, b, expected)


def _context(received: torch.Tensor, d: int = 8, dk: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s, n = received.shape
    return VisionUnitsContext(features=torch.randn(s, n, d, generator=g), received=received.float(),
                              keys=torch.randn(s, n, dk, generator=g), grid=(1, n),
                              head_keys=torch.randn(s, n, dk, generator=g), patches=4)


@pytest.mark.parametrize("n", [1, 2, 5, 40, 49])
@pytest.mark.parametrize("keep", [0.5, 0.1, 1.0, 2])
def test_units_function_matches_reference_on_random_units(n, keep):
    if isinstance(keep, int) and keep > n:
        return
    g = torch.Generator().manual_seed(n)
    received = torch.rand(3, n, generator=g) + 0.5
    received[0, : max(1, n // 7)] *= 20                         # a few outliers in one unit
    ctx = _context(received, seed=n)
    sel = prumerge_plus_units(ctx, get_method("prumerge_plus").make_config(keep=keep))
    for u in range(3):
        cls_attn = ctx.received[u].double() / (4 * n)
        kept, hidden = prumerge_plus_unit(ctx.features[u], cls_attn, ctx.head_keys[u].double(), keep)
        assert sel.index[u].tolist() == kept, u
        torch.testing.assert_close(sel.hidden[u].double(), hidden, atol=1e-6, rtol=1e-6)


def test_iqr_count_truncated_as_published():
    # N = 49 with exactly 2 outliers: the port's int(49 * (2 / 49)) = 1 keeps one by score and
    # fills the rest from the grid (step 49 // 24 = 2: even indices), so the odd-indexed second
    # outlier is not kept
    received = torch.ones(1, 49)
    received[0, 10], received[0, 13] = 9.0, 8.0
    received[0, ::3] += 0.01                                    # some spread below the fence
    ctx = _context(received)
    sel = prumerge_plus_units(ctx, get_method("prumerge_plus").make_config(keep=0.5))
    kept, _ = prumerge_plus_unit(ctx.features[0], ctx.received[0].double() / (4 * 49), ctx.head_keys[0].double(),
                                 0.5)
    assert 10 in kept and 13 not in kept and len(kept) == 24
    assert sel.index[0].tolist() == kept


# --------------------------------------------------------------------------- 2. errors, rows alone

def test_options_and_their_errors():
    family = "qwen2_vl"
    model, b = model_of(family), batch_of(family)
    smallest = min(n for units in refs.unit_layout(b) for _, _, n in units)
    with torch.no_grad():
        for opts, name in ((dict(), "keep"), (dict(keep=smallest + 1), "keep"), (dict(keep=0.5, layer=1), "layer")):
            with applied(model, **opts), pytest.raises(ValueError, match=f"^{name}"):
                model(**b)
        with applied(model, keep=smallest):
            out = model(**b)
        assert all(len(k) == smallest for i in range(len(refs.unit_layout(b))) for k in refs.kept_per_unit(out, b, i))
    for opts, name in ((dict(keep=1.5), "keep"), (dict(neighbors=-1), "neighbors"), (dict(whisker=-1.0), "whisker")):
        with pytest.raises(ValueError, match=f"^{name}"):
            apply(model, "prumerge_plus", **opts)
    # plain PruMerge (an adaptive count per unit, no slot for its extra token) stays rejected
    assert get_method("prumerge_plus").no_cls and not get_method("prumerge").no_cls
    with pytest.raises(ValueError, match="^model: prumerge ranks"):
        apply(model, "prumerge", keep=0.5)


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_rows_match_rows_alone(family):
    model, b = model_of(family), batch_of(family)
    with applied(model, keep=0.5), torch.no_grad():
        assert_rows_match_rows_alone(model, b)
