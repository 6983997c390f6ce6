"""Slow, obviously-correct references for tests/models/test_qwen_integration.py: a
processor-free batch builder for the tiny Qwen-VL models, per-unit loop versions of the in-LLM
methods' published semantics, and hand-written runs of the stock Hugging Face decoder layers.

Everything here works one row, one unit, one token at a time where that is clearer; speed does
not matter (tiny models, a few dozen visual tokens).

Why a processor-free builder: transformers 5.23 cannot construct a Qwen-VL processor without
torchvision, and sizes in merged tokens make the units' grids explicit. The builder writes what
the processor writes (Qwen's chat layout, ``<|vision_start|>`` / ``<|vision_end|>`` around each
image and video, Qwen3-VL's ``<t seconds>`` before each video frame group, ``mm_token_type_ids``,
Qwen2.5-VL's ``second_per_grid_ts``), with random pixel patches of the right shape;
``test_synthetic_inputs_are_the_processors`` checks that against the real processor where
torchvision is installed, and ``tiny_qwen.row_inputs`` slices its batches like the processor's.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from epic_ext.models import tiny_qwen as tq

# Rows in merged-token units: images as (h, w), a video as (temporal groups, h, w).
# Text only; one image; two images of different sizes; a video of 2 frame groups; an image and a
# video; an image of the same grid as another row's (one method call covers units of 2 rows).
ROWS = (dict(images=[], video=None), dict(images=[(4, 3)], video=None),
        dict(images=[(2, 2), (4, 5)], video=None), dict(images=[], video=(2, 2, 3)),
        dict(images=[(3, 3)], video=(2, 2, 2)), dict(images=[(4, 3)], video=None))


@functools.lru_cache(maxsize=None)
def model_of(family: str, attn: str = "sdpa"):
    """The tiny model of ``family`` (built once per attention implementation)."""
    return tq.build_tiny_qwen(family, attn=attn)


def rows_with_text(n: int, *, seed: int = 0) -> list[dict]:
    g = np.random.default_rng(seed)
    out = []
    for i in range(n):
        words = g.choice(tq.WORDS, size=3 + (2 * i) % 5).tolist()
        out.append(dict(ROWS[i % len(ROWS)], text=" ".join(words) + " ?"))
    return out


def _word_ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def synthetic_batch(family: str, rows: list[dict], *, seed: int = 0, fps: float = 1.0) -> dict:
    """What ``tq.qwen_batch`` returns for ``rows`` (left padded), built without the processor:
    token ids laid out as Qwen's chat template + processor lay them out, random normal pixel
    patches (``[patches, 3 * 2 * p * p]``, the vision tower's input layout)."""
    tok = tq.tiny_tokenizer()
    p = tq.patch_size(family)
    g = torch.Generator().manual_seed(seed)
    width = 3 * 2 * p * p
    seqs, image_grids, video_grids = [], [], []
    for row in rows:
        ids = [tq.IM_START_ID] + _word_ids(tok, "user")
        for h, w in row.get("images", []):
            ids += [tq.VISION_START_ID] + [tq.IMAGE_ID] * (h * w) + [tq.VISION_END_ID]
            image_grids.append((1, 2 * h, 2 * w))
        if row.get("video") is not None:
            t, h, w = row["video"]
            video_grids.append((t, 2 * h, 2 * w))
            ids.append(tq.VISION_START_ID)
            if family == "qwen3_vl":
                # Qwen3VLProcessor: "<t seconds><|vision_start|>pads<|vision_end|>" per frame group
                for group in range(t):
                    seconds = (2 * group + 0.5) / fps          # mean time of the group's 2 frames
                    ids += _word_ids(tok, f"<{seconds:.1f} seconds>")
                    ids += [tq.VISION_START_ID] + [tq.VIDEO_ID] * (h * w) + [tq.VISION_END_ID]
            else:
                ids += [tq.VIDEO_ID] * (t * h * w)
            ids.append(tq.VISION_END_ID)
        ids += _word_ids(tok, row.get("text", "")) + [tq.IM_END_ID, tq.IM_START_ID] + _word_ids(tok, "assistant")
        seqs.append(ids)
    length = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), length), tq.PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, length - len(s):] = torch.tensor(s)
        attention_mask[i, length - len(s):] = 1
    out = dict(input_ids=input_ids, attention_mask=attention_mask,
               mm_token_type_ids=((input_ids == tq.IMAGE_ID).long() + 2 * (input_ids == tq.VIDEO_ID).long()))
    if image_grids:
        grid = torch.tensor(image_grids)
        out["pixel_values"] = torch.randn(int(grid.prod(-1).sum()), width, generator=g)
        out["image_grid_thw"] = grid
    if video_grids:
        grid = torch.tensor(video_grids)
        out["pixel_values_videos"] = torch.randn(int(grid.prod(-1).sum()), width, generator=g)
        out["video_grid_thw"] = grid
        if family == "qwen2_5_vl":
            out["second_per_grid_ts"] = torch.full((len(video_grids),), 2.0 / fps)
    return out


def rows_of_processor_batch(batch, rows: list[dict]) -> list[dict]:
    """``rows`` (``tq.random_qwen_rows``: sizes in pixels) in this module's token units, read
    from the grids the processor chose, so that ``synthetic_batch`` can be compared with it."""
    images = iter((batch["image_grid_thw"][:, 1:] // 2).tolist()) if "image_grid_thw" in batch else iter(())
    videos = iter(batch["video_grid_thw"].tolist()) if "video_grid_thw" in batch else iter(())
    out = []
    for row in rows:
        ims = [tuple(next(images)) for _ in row.get("images", [])]
        video = None
        if row.get("video") is not None:
            t, h, w = next(videos)
            video = (t, h // 2, w // 2)
        out.append(dict(images=ims, video=video, text=row.get("text", "")))
    return out


# --------------------------------------------------------------------------- the stock model's view

def unit_layout(batch: dict) -> list[list[tuple[str, int, int]]]:
    """Per row, its visual units in prompt order as (kind, start, n): images one by one, a
    video's temporal groups one by one (runs of placeholders split by the grids)."""
    ids = batch["input_ids"]
    grids = {"image": iter(batch.get("image_grid_thw", torch.zeros(0, 3)).tolist()),
             "video": iter(batch.get("video_grid_thw", torch.zeros(0, 3)).tolist())}
    token = {"image": tq.IMAGE_ID, "video": tq.VIDEO_ID}
    pending = {"image": [], "video": []}
    out = []
    for r in range(ids.shape[0]):
        units, t = [], 0
        row = ids[r].tolist()
        while t < len(row):
            kind = next((k for k in token if row[t] == token[k]), None)
            if kind is None:
                t += 1
                continue
            if not pending[kind]:
                gt, gh, gw = next(grids[kind])
                pending[kind] = [(gh // 2) * (gw // 2)] * int(gt)
            n = pending[kind].pop(0)
            assert all(x == token[kind] for x in row[t:t + n])
            units.append((kind, t, n))
            t += n
        out.append(units)
    return out


def unit_grids(batch: dict) -> list[list[tuple[int, int]]]:
    """Per row, the (h, w) token grid of each unit, in prompt order."""
    grids = {"image": iter(batch.get("image_grid_thw", torch.zeros(0, 3)).tolist()),
             "video": iter(batch.get("video_grid_thw", torch.zeros(0, 3)).tolist())}
    pending = {"image": [], "video": []}
    out = []
    for units in unit_layout(batch):
        row = []
        for kind, _, _ in units:
            if not pending[kind]:
                gt, gh, gw = next(grids[kind])
                pending[kind] = [(gh // 2, gw // 2)] * int(gt)
            row.append(pending[kind].pop(0))
        out.append(row)
    return out


def stock_forward(model, **kwargs):
    """The model class's own forward, also while ``epic_ext.apply`` has replaced the instance's."""
    return type(model).forward(model, **kwargs)


def stock_rope(model, batch: dict) -> torch.Tensor:
    """[3, B, L] M-RoPE positions of the unreduced prompt, from the stock model's own forward
    (what its rotary embedding receives): read with a hook, not recomputed."""
    seen = []
    lm = model.model.language_model
    handle = lm.rotary_emb.register_forward_hook(lambda mod, args, out: seen.append(args[1].clone()))
    try:
        with torch.no_grad():
            stock_forward(model, **batch)
    finally:
        handle.remove()
    return seen[0][-3:]


def stock_layer_inputs(model, batch: dict, layer: int):
    """What decoder ``layer`` of the stock model sees: its input hidden states [B, L, D]
    (DeepStack injections of earlier layers included) and layer-1's post-RoPE keys from the
    stock KV cache [B, Hkv, L, d] (None at layer 0)."""
    lm = model.model.language_model
    seen = {}

    def pre(mod, args, kwargs):
        seen["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    handle = lm.layers[layer].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            out = stock_forward(model, **batch, use_cache=True)
    finally:
        handle.remove()
    keys = out.past_key_values.layers[layer - 1].keys if layer >= 1 else None
    return seen["hidden"], keys


def eager_attention_rows(model_eager, batch: dict, layer: int) -> torch.Tensor:
    """[B, H, L, L] softmax attention of decoder ``layer`` of the stock eager model."""
    with torch.no_grad():
        out = stock_forward(model_eager, **batch, output_attentions=True)
    return out.attentions[layer]


def last_real(mask_row: torch.Tensor) -> int:
    return int(mask_row.nonzero().max())


def topk_low_index(scores: list[float], k: int) -> list[int]:
    """Indices of the k largest scores, ties to the lower index, ascending."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:k])


def budget_of(keep, n: int) -> int:
    if isinstance(keep, float):
        from epic_ext.ops import resolve_k
        return resolve_k(keep, n)
    return keep


# --------------------------------------------------------------------------- method references

def fastv_reference(attn: torch.Tensor, batch: dict, keep) -> list[list[list[int]]]:
    """FastV: per row, per unit, the kept local indices: the last prompt token's attention row of
    layer K-1 (eager softmax), mean over heads, top-k within the unit, ties to the lower index."""
    out = []
    mask = batch["attention_mask"].bool()
    for r, units in enumerate(unit_layout(batch)):
        q = last_real(mask[r])
        row = attn[r, :, q].double().mean(0)          # [L]
        kept = []
        for _, start, n in units:
            scores = [float(row[start + i]) for i in range(n)]
            kept.append(topk_low_index(scores, budget_of(keep, n)))
        out.append(kept)
    return out


@torch.no_grad()
def dart_reference(hidden: torch.Tensor, keys: torch.Tensor, final_norm, batch: dict, keep, *,
                   pivot_image: int = 4, pivot_text: int = 4, other_units_are_text: bool = False
                   ) -> list[list[list[int]]]:
    """DART (Wen et al. 2025) as the epic_ext docstring reads it on Qwen: per unit, image pivots
    = the ``pivot_image`` unit tokens of largest key L1 norm (layer K-1's post-RoPE keys, heads
    concatenated); text pivots = the ``pivot_text`` largest-norm real non-visual prompt tokens
    after the unit up to the last prompt token; then each pivot in turn (image pivots by
    position, then text pivots by position) takes its quota of the not-yet-kept unit tokens least
    cosine-similar to it (final_norm(hidden), fp32), quotas = (budget - image pivots) split evenly,
    the first pivots taking the remainder. ``other_units_are_text``: the published single-image
    reading (every token after the unit is a candidate), for a test to tell the two apart."""
    mask = batch["attention_mask"].bool()
    layout = unit_layout(batch)
    out = []
    for r, units in enumerate(layout):
        knorm = keys[r].float().abs().sum(dim=(0, 2))            # [L]
        visual = set()
        for _, s, n in units:
            visual.update(range(s, s + n))
        q = last_real(mask[r])
        normed = F.normalize(final_norm(hidden[r]).float(), dim=-1, eps=1e-8)   # [L, D]
        kept_row = []
        for _, start, n in units:
            budget = budget_of(keep, n)
            if budget == 0:
                kept_row.append([])
                continue
            local_norm = [float(knorm[start + i]) for i in range(n)]
            p_img = min(pivot_image, budget)
            img_piv = topk_low_index(local_norm, p_img)
            if budget == p_img:
                kept_row.append(img_piv)
                continue
            cands = [t for t in range(start + n, q + 1)
                     if bool(mask[r, t]) and (other_units_are_text or t not in visual)]
            txt_piv = sorted(sorted(cands, key=lambda t: (-float(knorm[t]), t))[:pivot_text])
            pivots = [normed[start + i] for i in img_piv] + [normed[t] for t in txt_piv]
            picks = budget - p_img
            quota = [picks // len(pivots) + (1 if j < picks % len(pivots) else 0) for j in range(len(pivots))]
            taken = set(img_piv)
            for vec, qn in zip(pivots, quota):
                free = [i for i in range(n) if i not in taken]
                sims = {i: float(torch.dot(vec, normed[start + i])) for i in free}
                for i in sorted(free, key=lambda i: (sims[i], i))[:qn]:
                    taken.add(i)
            kept_row.append(sorted(taken))
        out.append(kept_row)
    return out


def pooling_windows(gh: int, gw: int, h: int, w: int) -> list[list[int]]:
    """adaptive_avg_pool2d's windows on a gh x gw grid pooled to h x w: per output cell (row
    major) the flat token indices it averages."""
    cells = []
    for i in range(h):
        r0, r1 = (i * gh) // h, -((-(i + 1) * gh) // h)
        for j in range(w):
            c0, c1 = (j * gw) // w, -((-(j + 1) * gw) // w)
            cells.append([rr * gw + cc for rr in range(r0, r1) for cc in range(c0, c1)])
    return cells


def pooling_reference(hidden: torch.Tensor, batch: dict, keep):
    """Pooling: per row, per unit, (representative indices, pooled hidden [k, D]): each unit's
    grid average-pooled to the factor pair of the budget closest to square (as the method's
    docstring chooses it), each cell at the floor of its window's mean index."""
    out = []
    for r, (units, grids) in enumerate(zip(unit_layout(batch), unit_grids(batch))):
        row = []
        for (_, start, n), (gh, gw) in zip(units, grids):
            k = budget_of(keep, n)
            pairs = [(h, k // h) for h in range(1, k + 1) if k % h == 0 and h <= gh and k // h <= gw]
            h, w = min(pairs, key=lambda p: (abs(p[0] - p[1]), abs(p[0] * gw - p[1] * gh), p[0]))
            index, feats = [], []
            for cell in pooling_windows(gh, gw, h, w):
                index.append(math.floor(sum(cell) / len(cell)))
                feats.append(hidden[r, [start + c for c in cell]].double().mean(0))
            row.append((index, torch.stack(feats)))
        out.append(row)
    return out


def kept_per_unit(out, batch: dict, row: int) -> list[list[int]]:
    """The reduced forward's kept local indices of each unit of ``row`` (kept_index where
    kept_mask, split by unit)."""
    kept = out.kept_index[row][out.kept_mask[row]].tolist()
    res = []
    for _, start, n in unit_layout(batch)[row]:
        res.append([k - start for k in kept if start <= k < start + n])
    return res


# --------------------------------------------------------------------------- hand-written decoder runs

def causal_mask(length: int, dtype=torch.float32) -> torch.Tensor:
    return torch.full((length, length), torch.finfo(dtype).min, dtype=dtype).triu(1)[None, None]


def visual_features(model, row: dict):
    """The stock vision tower's outputs for one row (batch of one, no padding), per visual
    token in prompt order: features [V, D] and DeepStack features per layer [V, D] (Qwen3-VL)."""
    ids = row["input_ids"][0]
    parts, deep_parts = {}, {}
    for kind, px_key, grid_key, fn in (("image", "pixel_values", "image_grid_thw", model.model.get_image_features),
                                       ("video", "pixel_values_videos", "video_grid_thw",
                                        model.model.get_video_features)):
        if grid_key not in row:
            continue
        res = fn(row[px_key], row[grid_key], return_dict=True)
        parts[kind] = torch.cat(list(res.pooler_output))
        deep_parts[kind] = [torch.cat(list(d)) for d in (getattr(res, "deepstack_features", None) or [])]
    # features in prompt order: the images' and the videos' tokens interleaved as in input_ids
    order, at = [], {"image": 0, "video": 0}
    for t in ids.tolist():
        kind = "image" if t == tq.IMAGE_ID else "video" if t == tq.VIDEO_ID else None
        if kind is not None:
            order.append((kind, at[kind]))
            at[kind] += 1
    feats = torch.stack([parts[k][i] for k, i in order]) if order else None
    n_deep = max((len(v) for v in deep_parts.values()), default=0)
    deep = [torch.stack([deep_parts[k][layer][i] for k, i in order]) for layer in range(n_deep)]
    return feats, deep


@torch.no_grad()
def manual_reduced_logits(model, row: dict, layer: int, kept: list[int], *, replace: dict | None = None,
                          deepstack: str = "own"):
    """Logits of a one-row prompt (no padding) run through the stock decoder layers by hand:
    layers < ``layer`` over every token, then only the tokens at ``kept`` (positions in the
    prompt, ascending) from ``layer`` on, each keeping its own 3-D M-RoPE position (the stock
    get_rope_index's); DeepStack (Qwen3-VL) features are added after layer i to the visual tokens
    present then, each its own feature. ``replace``: {position: hidden} substituted at ``layer``
    (pooling). ``deepstack="compact"``: the wrong reading a test must tell apart, the first
    rows of each DeepStack table go to the visual tokens still present, in order. Returns
    [len(kept), V]."""
    lm = model.model.language_model
    ids = row["input_ids"]
    hidden = model.model.get_input_embeddings()(ids)[0]
    feats, deep = visual_features(model, row)
    is_vis = (ids[0] == tq.IMAGE_ID) | (ids[0] == tq.VIDEO_ID)
    vis_pos = is_vis.nonzero().flatten().tolist()
    if feats is not None:
        hidden = hidden.clone()
        hidden[is_vis] = feats.to(hidden.dtype)
    rope = stock_rope(model, row)[:, 0]                         # [3, L]
    vis_id = {p: i for i, p in enumerate(vis_pos)}
    present = list(range(ids.shape[1]))
    for i, module in enumerate(lm.layers[: lm.config.num_hidden_layers]):
        if i == layer:
            if replace:
                hidden = hidden.clone()
                for p, h in replace.items():
                    hidden[present.index(p)] = h.to(hidden.dtype)
            hidden = hidden[[present.index(p) for p in kept]]
            present = list(kept)
        pos = rope[:, present][:, None]                          # [3, 1, T]
        text_pos = torch.tensor(present)[None]
        emb = lm.rotary_emb(hidden[None], pos)
        hidden = module(hidden[None], attention_mask=causal_mask(len(present), hidden.dtype),
                        position_embeddings=emb, position_ids=text_pos, past_key_values=None,
                        use_cache=False)[0]
        if i < len(deep):
            add = torch.zeros_like(hidden)
            present_vis = [p for p in present if p in vis_id]
            for j, p in enumerate(present):
                if p in vis_id:
                    row_of = vis_id[p] if deepstack == "own" else present_vis.index(p)
                    add[j] = deep[i][row_of].to(hidden.dtype)
            hidden = hidden + add
    if layer >= lm.config.num_hidden_layers:
        raise ValueError("layer: beyond the model")
    return model.lm_head(lm.norm(hidden))


class LayerInput:
    """The hidden states decoder layer 0 receives (the reduced sequence's embeddings)."""

    def __init__(self, model):
        self.hidden = None
        self.handle = model.model.language_model.layers[0].register_forward_pre_hook(self._keep, with_kwargs=True)

    def _keep(self, mod, args, kwargs):
        self.hidden = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def assert_matches_reference(model, out, hidden, b, expected, atol: float = 1e-5):
    """Kept local indices per unit exactly; every kept visual token's hidden state (the reduced
    sequence's layer-0 input) equal to the reference's; text tokens their own embeddings."""
    emb = model.model.get_input_embeddings()
    for i, (units, row) in enumerate(zip(unit_layout(b), expected)):
        assert kept_per_unit(out, b, i) == [kept for kept, _ in row], f"row {i}"
        slots = {int(p): s for s, p in enumerate(out.kept_index[i].tolist()) if out.kept_mask[i, s]}
        for (_, start, _), (kept, ref_hidden) in zip(units, row):
            got = hidden[i, [slots[start + j] for j in kept]]
            torch.testing.assert_close(got.double(), ref_hidden, atol=atol, rtol=0, msg=f"row {i}")
        text = [p for p in slots if b["input_ids"][i, p] not in (tq.IMAGE_ID, tq.VIDEO_ID)]
        assert torch.equal(hidden[i, [slots[p] for p in text]], emb(b["input_ids"][i, text]))


def per_unit(batch: dict, items: dict, fn) -> list[list]:
    """``fn(item, rows, n)`` for every visual unit of ``batch``, per row in prompt order: ``items``
    holds per kind the batch's images / videos in order (each a dict of per-token tensors); a
    video's frame groups take consecutive ``rows`` of its item."""
    next_item = {"image": 0, "video": 0}
    current = {"image": None, "video": None}          # (item, frame groups it has left, next frame)
    out = []
    for units in unit_layout(batch):
        row = []
        for kind, _, n in units:
            if current[kind] is None or current[kind][1] == 0:      # a new image / video
                item = items[kind][next_item[kind]]
                next_item[kind] += 1
                current[kind] = (item, item["features"].shape[0] // n, 0)
            item, left, at = current[kind]
            current[kind] = (item, left - 1, at + 1)
            row.append(fn(item, slice(at * n, (at + 1) * n), n))
        out.append(row)
    return out
