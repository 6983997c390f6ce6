"""Token-reduction methods: the SELECTION step alone (the method function on a ready context), the
published repositories' way ("eager") against ours, in ms per batch, with the share of a
compressed prefill it costs.

ours   `get_method(name).fn(ctx, cfg)`, the registered function, on a context built once:
         llm methods (fastv, dart, random, pooling; keep=64, layer K=2): the LLMContext that
           epic_ext.models.llava builds just before decoder layer 2 in a real forward of the
           tiny LLaVA (captured by applying a method that records its context); FastV's eager
           baseline also needs every token's post-RoPE query of layer 1 (a hook on q_proj +
           the model's rotary embedding; checked against the context's query row)
         vision methods (trim, prumerge, prumerge_plus adaptive IQR; visionzip keep=64 = 54+10):
           the VisionContext built from the tiny LLaVA's vision tower run with
           output_hidden_states=True (TRIM with ClipTextScorer.tiny)
eager  written here from the published semantics (DESIGN.md 3), in the published code's style:
  fastv      an eager attention layer's full [B, H, L, L] weights (output_attentions: q k^T *
             scale + the 4D padding/causal mask, fp32 softmax), averaged over heads, the last
             row, the image span, topk, sort. Timed from layer K-1's post-RoPE q/k of every
             token: the work the published code needs beyond a fused (SDPA/flash) attention.
  dart       batch-size-1 loop over samples, keys' L1 norms, pivots via .tolist(), Python-set
             greedy loop over the 8 pivots (F.cosine_similarity on the final-norm hidden states
             of the remaining image tokens, topk, Python list bookkeeping); the published budget
             4 + 8 * ceil(budget / 8) (68 kept for "64"). Pivot order image-then-text ascending
             (the published code walks a Python set, whose order is arbitrary).
  random     torch.randperm per row in a Python loop.
  pooling    the image span (positions read back with .tolist()) -> F.avg_pool2d with a square
             kernel (3 x 3 for 64 tokens on 24 x 24).
  trim       CLIP text model forward (the same scorer modules as ours), visual_projection(
             post_layernorm(f)), softmax(-(p . t)), then the host: np.percentile IQR over the
             pooled batch, floor(outliers / B), topk + boolean mask + masked gather + masked mean
             of the unselected (epic_ext.reference.trim_eager's composition).
  prumerge   one 1024-wide-head [CLS] attention of the last CLIP layer, torch.quantile IQR with a
             host sync (int(...)), topk, then a Python loop per image and per kept token: cosine
             of the normalised keys against all other tokens (torch.cat of the before/after
             slices, as published), top-32, x_i + sum attn_j x_j; the extra token. prumerge_plus
             adds the grid tokens arange(0, N-1, int(int(1/r)/3)) filtered by a Python list
             comprehension (published: batch size 1; here per image).
  visionzip  the full [B, heads, T, T] attention of the layer before the feature layer
             (output_attentions), [CLS] row summed over heads, topk, boolean-mask gathers
             (masked_select: data-dependent shapes, host syncs), targets by arange/isin, one-hot
             assignment by scatter, bmm merge.
LLaVA-1.5-7B widths ("7b" rows; random tensors, nothing trained, nothing from a checkpoint):
  fastv  q, k [B, 32, L, 128] (MHA), L ~ 651-657 (the tiny prompts' layout), hidden [B, L, 4096]
  dart   keys [B, 32, L, 128], hidden [B, L, 4096], a Llama RMSNorm(4096) as the final norm
  random, pooling  hidden [B, L, 4096]
  vision CLIP ViT-L/14-336 widths: hidden 1024, 16 heads x 64, 577 tokens; a 2-layer tower with
         random weights and random hidden states (the methods read only the last two layers and
         the feature layer); TRIM's text side at CLIP-L's text width 768 with 0 transformer
         layers (embeddings + final norm + projection 768), so the text forward, identical on
         both sides, does not swamp the selection.

agree  does the baseline select the same tokens: the fraction of ours' kept indices that the
       baseline keeps too (mean over images), plus, for methods that output features, the largest
       |difference| of the outputs (same count only). DART: compared with ours at keep=68 against
       the published budget 64 (which keeps 4 + 8*8 = 68, the same split of 8 per pivot).
       random: different draws, n/a.
% pf   the selection's median time over the median time of one compressed prefill of the
       "llava-1.5-7b-depth" preset (24-layer CLIP and 32-layer LLM at small widths) with
       `epic_ext.models.apply(model, "random", keep=64, layer=2)`, model(input_ids, pixel_values,
       attention_mask) under torch.no_grad, at the same B. When B=1's prefill predicts more than
       ~20 s at B=16, B=4 is timed instead and scaled x4 (marked "est").

Timing: common.measure (median of repeated calls, CPU perf_counter / CUDA events), everything
under torch.no_grad. GB/s in the JSON rows = bytes of the context tensors the method reads over
the median time (not a roofline). --quick: B=1, tiny widths for every method plus FastV at 7B
widths, prefill at B=1 only. On a small shared CPU, --threads 1 keeps the timings stable (with
2 intra-op threads a busy core stalls every parallel region; the JSON records the thread count).
Exit status 1 when a method's agreement with its baseline is below 0.95.

    python -m benchmarks.bench_methods --quick
    python -m benchmarks.bench_methods --methods fastv,dart --widths 7b --shapes B=16
"""
from __future__ import annotations

import importlib
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import common, harness

BENCH = "methods"
KEYS = ("B",)
BATCHES = (1, 16)
LLM_METHODS = ("fastv", "dart", "random", "pooling")
VISION_METHODS = ("trim", "prumerge", "prumerge_plus", "visionzip")
METHODS = LLM_METHODS + VISION_METHODS
METHOD_FILES = {"prumerge_plus": "prumerge"}
WIDTHS = ("tiny", "7b")
QUICK_7B = ("fastv",)
LAYER = 2
PREFILL_PRESET = "llava-1.5-7b-depth"
PREFILL_LIMIT_S = 20.0
PREFILL_FALLBACK_B = 4
TEXT_BEFORE, TEXT_AFTER = 34, 40          # image at 35 (BOS + 34), L ~ 651: LLaVA-1.5's layout
# 7B widths
H7, D7, HID7 = 32, 128, 4096
CLIP7 = {"hidden": 1024, "heads": 16, "inter": 4096, "proj": 768, "text_hidden": 768,
         "text_heads": 12}


# ============================================================================================
# contexts
# ============================================================================================

@dataclass
class LLMBundle:
    ctx: Any                           # LLMContext
    q_all: torch.Tensor                # [B, H, L, d] post-RoPE queries of layer K-1, every token
    add_mask: torch.Tensor             # [B, 1, L, L] additive eager mask (0 / dtype min)
    note: str = ""


@dataclass
class VisionBundle:
    ctx: Any                           # VisionContext
    scorer: Any = None                 # ClipTextScorer for TRIM
    note: str = ""


def _prompts(model, B: int, device):
    from epic_ext.models.tiny import random_prompts
    return random_prompts(model, B, text_before=TEXT_BEFORE, text_after=TEXT_AFTER, seed=B,
                          device=device)


def _eager_mask(attention_mask: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """HF's eager 4D mask: causal and padding, masked logits at the dtype minimum."""
    L = attention_mask.shape[1]
    i = torch.arange(L, device=attention_mask.device)
    allowed = (i[None, :] <= i[:, None])[None] & attention_mask.bool()[:, None, :]
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]


def llm_context_tiny(model, B: int, device) -> LLMBundle:
    """The LLMContext of a real reduced forward of the tiny LLaVA just before decoder layer 2."""
    import sys

    from epic_ext.methods import register_method
    from epic_ext.methods.base import LLMMethodConfig, LLMSelection
    from epic_ext.models import apply, revert
    from epic_ext.models.tiny import random_pixels

    ids, mask = _prompts(model, B, device)
    pixels = random_pixels(model, B, device=device)
    got: dict = {}

    def capture(ctx, cfg):
        got["ctx"] = ctx
        b, n = ctx.num_units, ctx.num_image_tokens
        return LLMSelection(torch.arange(n, device=ctx.hidden.device).expand(b, n))

    register_method("bench_capture", "llm", LLMMethodConfig)(capture)
    from epic_ext.models.decoder import text_modules
    lm = model.model.language_model
    layers = text_modules(lm)
    prev = layers[LAYER - 1]
    hook = prev.self_attn.q_proj.register_forward_hook(
        lambda _m, _i, out: got.__setitem__("q", out.detach()))
    apply(model, "bench_capture", layer=LAYER)
    try:
        model(input_ids=ids, pixel_values=pixels, attention_mask=mask)
    finally:
        revert(model)
        hook.remove()
    ctx = got["ctx"]
    L = ids.shape[1]
    hd = prev.self_attn.head_dim
    q = got["q"].view(B, L, -1, hd).transpose(1, 2)
    # The reduced forward's positions without position_ids: each row counts its real tokens.
    pos = (mask.long().cumsum(1) - 1).clamp(min=0)
    cos, sin = lm.rotary_emb(ctx.hidden, pos)
    q_all, _ = sys.modules[type(prev.self_attn).__module__].apply_rotary_pos_emb(q, q, cos, sin)
    rows = q_all[torch.arange(B, device=device), :, ctx.query_index]          # [B, H, d]
    note = ""
    if not torch.allclose(rows, ctx.query[:, :, 0], rtol=1e-4, atol=1e-5):
        note = "q_all does not match the context's query row"
        print(f"  note: tiny B={B}: {note}")
    return LLMBundle(ctx, q_all.contiguous(), _eager_mask(mask), note)


def llm_context_7b(model, B: int, device) -> LLMBundle:
    """LLaVA-1.5-7B widths from random tensors, on the tiny prompts' layout."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from epic_ext.methods.base import LLMContext
    from epic_ext.models.sequence import image_span

    ids, mask = _prompts(model, B, device)
    n = model.config.image_seq_length
    L = ids.shape[1]
    g = torch.Generator(device="cpu").manual_seed(7000 + B)
    q_all = torch.randn(B, H7, L, D7, generator=g).to(device)
    keys = torch.randn(B, H7, L, D7, generator=g).to(device)
    hidden = torch.randn(B, L, HID7, generator=g).to(device)
    norm = LlamaRMSNorm(HID7, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(HID7, generator=g))
    norm = norm.to(device).eval()
    start = image_span(ids, model.config.image_token_id, n)
    qi = (L - 1) - mask.bool().flip(1).int().argmax(1)
    ctx = LLMContext(hidden=hidden, image_start=start, num_image_tokens=n, grid=(24, 24),
                     attention_mask=mask.bool(), query_index=qi,
                     keys=keys, query=q_all[torch.arange(B, device=device), :, qi][:, :, None],
                     scale=D7 ** -0.5, final_norm=norm)
    return LLMBundle(ctx, q_all, _eager_mask(mask))


def vision_context_tiny(model, B: int, device) -> VisionBundle:
    from epic_ext.methods.base import VisionContext
    from epic_ext.models.tiny import random_pixels

    ids, mask = _prompts(model, B, device)
    cfg = model.config
    tower = model.model.vision_tower
    out = tower(random_pixels(model, B, device=device), output_hidden_states=True, return_dict=True)
    hs = tuple(h.detach() for h in out.hidden_states)
    fi = cfg.vision_feature_layer % len(hs)
    feats = hs[fi][:, 1:]
    side = round(feats.shape[1] ** 0.5)
    ctx = VisionContext(features=feats, hidden_states=hs, feature_layer=fi, vision_tower=tower,
                        input_ids=ids, attention_mask=mask, image_token_id=cfg.image_token_id,
                        grid=(side, feats.shape[1] // side))
    return VisionBundle(ctx, _scorer_tiny(model, device))


_SCORERS: dict = {}
_TOWERS7: dict = {}


def _scorer_tiny(model, device):
    key = ("tiny", str(device))
    if key not in _SCORERS:
        from epic_ext.methods.trim import ClipTextScorer
        cfg = model.config
        _SCORERS[key] = ClipTextScorer.tiny(cfg.vision_config, cfg.text_config.vocab_size,
                                            proj_dim=32).to(device)
    return _SCORERS[key]


def _tower_7b(device):
    key = str(device)
    if key not in _TOWERS7:
        from transformers import CLIPVisionConfig, CLIPVisionModel

        from epic_ext.methods.trim import ClipTextScorer
        c = CLIP7
        vcfg = CLIPVisionConfig(hidden_size=c["hidden"], intermediate_size=c["inter"],
                                num_hidden_layers=2, num_attention_heads=c["heads"],
                                image_size=336, patch_size=14, projection_dim=c["proj"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(77)
            tower = CLIPVisionModel(vcfg).eval().to(device)
        scorer = ClipTextScorer.tiny(vcfg, 32000, proj_dim=c["proj"], hidden_size=c["text_hidden"],
                                     num_layers=0, num_heads=c["text_heads"],
                                     vocab_size=49408).to(device)
        _TOWERS7[key] = (tower, scorer)
    return _TOWERS7[key]


def vision_context_7b(model, B: int, device) -> VisionBundle:
    from epic_ext.methods.base import VisionContext

    tower, scorer = _tower_7b(device)
    ids, mask = _prompts(model, B, device)
    n_layers = len(getattr(tower, "vision_model", tower).encoder.layers)
    g = torch.Generator(device="cpu").manual_seed(9000 + B)
    hs = tuple(torch.randn(B, 577, CLIP7["hidden"], generator=g).to(device)
               for _ in range(n_layers + 1))
    fi = -2 % len(hs)
    ctx = VisionContext(features=hs[fi][:, 1:], hidden_states=hs, feature_layer=fi,
                        vision_tower=tower, input_ids=ids, attention_mask=mask,
                        image_token_id=model.config.image_token_id, grid=(24, 24))
    return VisionBundle(ctx, scorer)


# ============================================================================================
# the published way (written from the published semantics, DESIGN.md 3)
# ============================================================================================

def fastv_eager(q_all, keys, add_mask, image_start, n: int, keep: int, scale: float):
    """Eager attention weights [B, H, L, L] (output_attentions), mean over heads, last row."""
    H, Hkv = q_all.shape[1], keys.shape[1]
    if H != Hkv:  # HF's repeat_kv
        B, _, L, d = keys.shape
        keys = keys[:, :, None].expand(B, Hkv, H // Hkv, L, d).reshape(B, H, L, d)
    w = torch.matmul(q_all, keys.transpose(2, 3)) * scale + add_mask
    w = F.softmax(w, dim=-1, dtype=torch.float32).to(q_all.dtype)
    last = w.mean(dim=1)[:, -1]                                   # [B, L]
    span = image_start[:, None] + torch.arange(n, device=w.device)
    score = last.gather(1, span)
    return score.topk(keep, dim=1).indices.sort(dim=1).values


def dart_eager(hidden, keys, final_norm, image_start, n: int, budget: int,
               pivot_image: int = 4, pivot_text: int = 4):
    """Batch size 1 at a time, Python greedy loop, host syncs; keeps 4 + 8 * ceil(budget / 8)."""
    per_pivot = math.ceil(budget / (pivot_image + pivot_text))
    out = []
    for b in range(hidden.shape[0]):
        s = int(image_start[b].item())
        k = keys[b:b + 1].permute(0, 2, 1, 3).reshape(1, keys.shape[2], -1)[0]   # [L, H*d]
        img_norm = torch.norm(k[s:s + n], p=1, dim=-1)
        txt_norm = torch.norm(k[s + n:], p=1, dim=-1)
        img_piv = (img_norm.topk(pivot_image).indices + s).tolist()
        txt_piv = (txt_norm.topk(min(pivot_text, txt_norm.shape[0])).indices + s + n).tolist()
        state = final_norm(hidden[b:b + 1])[0]
        kept = set(img_piv)
        remaining = sorted(set(range(s, s + n)) - kept)
        for p in sorted(img_piv) + sorted(txt_piv):
            cand = state[remaining]
            neg = -F.cosine_similarity(state[p][None], cand, dim=-1)
            top = neg.topk(per_pivot).indices.tolist()
            chosen = [remaining[i] for i in top]
            kept.update(chosen)
            taken = set(chosen)
            remaining = [j for j in remaining if j not in taken]
        out.append(sorted(j - s for j in kept))
    return torch.tensor(out, device=hidden.device)


def random_eager(B: int, n: int, keep: int, device):
    return torch.stack([torch.randperm(n, device=device)[:keep].sort().values for _ in range(B)])


def pooling_eager(hidden, image_start, n: int, grid: tuple[int, int], keep: int):
    gh, gw = grid
    side = round(keep ** 0.5)
    kernel = gh // side
    starts = image_start.tolist()
    img = torch.stack([hidden[b, s:s + n] for b, s in enumerate(starts)])      # [B, N, D]
    x = img.view(-1, gh, gw, img.shape[-1]).permute(0, 3, 1, 2)
    return F.avg_pool2d(x, kernel_size=kernel, stride=kernel).flatten(2).transpose(1, 2)


def trim_eager(ctx, scorer, whisker: float = 1.5, sign: float = -1.0):
    """CLIP text embedding, projected image tokens, softmax(-sim); numpy IQR on the host."""
    feats = ctx.features
    B, N, D = feats.shape
    ids, m = scorer.to_clip_ids(ctx.input_ids, ctx.attention_mask, ctx.image_token_id)
    tm = scorer.text_model
    th = tm.text_model(input_ids=ids, attention_mask=m).last_hidden_state
    eos = th[torch.arange(B, device=th.device), m.sum(1) - 1]              # the last real token
    t = tm.text_projection(eos).float()
    p = scorer.visual_projection(ctx.vision_model.post_layernorm(feats)).float()
    sim = (p @ t[:, :, None]).squeeze(-1)
    scores = torch.softmax(sign * sim, dim=-1)
    s = scores.detach().cpu().numpy()                                        # host sync
    q1, q3 = np.percentile(s, 25), np.percentile(s, 75)
    fence = q3 + whisker * (q3 - q1)
    k = int((s > fence).sum()) // B
    top = scores.topk(k, dim=1).indices
    mask = torch.zeros(B, N, dtype=torch.bool, device=feats.device).scatter_(1, top, True)
    kept = feats[mask].view(B, k, D)
    unsel = (~mask).unsqueeze(-1)
    mean = (feats * unsel).sum(dim=1) / unsel.sum(dim=1).clamp(min=1)
    return torch.cat([kept, mean.unsqueeze(1).to(feats.dtype)], dim=1), mask


def prumerge_eager(ctx, whisker: float = 1.5, neighbors: int = 32, plus: bool = False):
    """[CLS] attention as one wide head, torch.quantile IQR + host sync, a Python loop per kept
    token for the neighbour merge. Returns per image (tokens [k_b + 1, D], kept indices)."""
    x = ctx.features
    B, N, C = x.shape
    layer = len(ctx.vision_model.encoder.layers) - 1
    q, k = ctx.layer_qk(layer)
    T = q.shape[2]
    qw = q.transpose(1, 2).reshape(B, T, C)
    kw = k.transpose(1, 2).reshape(B, T, C)
    attn = (qw[:, :1] @ kw.transpose(-2, -1)) * C ** -0.5
    cls_attn = attn.softmax(dim=-1)[:, 0, 1:]                                # [B, N]
    flat = cls_attn.flatten().float()
    qs = torch.quantile(flat, torch.tensor([0.25, 0.75], device=flat.device))
    fence = qs[1] + whisker * (qs[1] - qs[0])
    n_out = int((flat > fence).sum())                                        # host sync
    keep = n_out // B
    _, idx = torch.topk(cls_attn, keep, dim=1, largest=True)
    key_n = F.normalize(kw[:, 1:], p=2, dim=-1)
    outs = []
    for b in range(B):
        kept = idx[b].tolist()
        if plus:
            r = keep / N
            step = N if keep == 0 else max(1, int(int(1 / r) / 3))
            grid = torch.arange(0, N - 1, step).tolist()
            kept = kept + [v for v in grid if v not in kept]
        rows = []
        for j in kept:
            rest_k = torch.cat([key_n[b, :j], key_n[b, j + 1:]])
            rest_x = torch.cat([x[b, :j], x[b, j + 1:]])
            rest_a = torch.cat([cls_attn[b, :j], cls_attn[b, j + 1:]])
            sim = torch.bmm(key_n[b, j][None, None], rest_k[None].transpose(1, 2))
            _, cluster = torch.topk(sim, k=min(neighbors, N - 1), dim=2, largest=True)
            cluster = cluster.squeeze()
            w = rest_a[cluster].unsqueeze(-1)
            rows.append((rest_x[cluster] * w).sum(dim=0) + x[b, j])
        keepmask = torch.ones(N, dtype=torch.bool, device=x.device)
        keepmask[kept] = False
        extra = (x[b][keepmask] * cls_attn[b][keepmask].unsqueeze(-1)).sum(dim=0)
        outs.append((torch.stack(rows + [extra]), kept))
    return outs


def visionzip_eager(ctx, dominant: int, contextual: int):
    layer = ctx.feature_layer - 1
    q, k = ctx.layer_qk(layer)                                              # [B, h, T, hd]
    hd = q.shape[-1]
    attn = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * hd ** -0.5, dim=-1,
                         dtype=torch.float32)                               # [B, h, T, T]
    hs = ctx.hidden_states[ctx.feature_layer]
    B, T, C = hs.shape
    metric = k.mean(dim=1)                                                  # [B, T, hd]
    cls_attention_sum = attn[:, :, 0, 1:].sum(dim=1)
    topk = cls_attention_sum.topk(dominant - 1, dim=1).indices + 1
    all_idx = torch.cat([torch.zeros(B, 1, dtype=topk.dtype, device=hs.device), topk], dim=1)
    mask = torch.ones(B, T, dtype=torch.bool, device=hs.device).scatter_(1, all_idx, False)
    dom = hs.masked_select(~mask.unsqueeze(-1)).view(B, dominant, C)
    metric_f = metric.masked_select(mask.unsqueeze(-1)).view(B, T - dominant, hd)
    hs_f = hs.masked_select(mask.unsqueeze(-1)).view(B, T - dominant, C)
    metric_n = metric_f / metric_f.norm(dim=-1, keepdim=True)
    M = metric_n.shape[1]
    step = max(1, M // contextual)
    t_idx = torch.arange(0, M, step, device=hs.device)[:contextual]
    targets = metric_n[:, t_idx]
    others = ~torch.isin(torch.arange(M, device=hs.device), t_idx)
    to_merge = metric_n[:, others]
    sim = torch.bmm(to_merge, targets.transpose(1, 2))
    assign = torch.zeros(B, to_merge.shape[1], contextual, dtype=hs.dtype, device=hs.device)
    assign.scatter_(2, sim.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign.sum(dim=1).clamp(min=1).unsqueeze(-1)
    agg = torch.bmm(assign.transpose(1, 2), hs_f[:, others]) / counts
    ctx_tokens = hs_f[:, t_idx] + agg
    return torch.cat([dom, ctx_tokens], dim=1), (topk - 1).sort(dim=1).values


# ============================================================================================
# cases
# ============================================================================================

@dataclass
class Job:
    method: str
    width: str
    B: int
    eager: Callable[[], Any]
    ours: Callable[[], Any]
    agree: Callable[[Any, Any], tuple[float | None, str]]
    nbytes: int
    kept_ours: Callable[[Any], float]
    kept_eager: Callable[[Any], float]


def _nb(*ts) -> int:
    return int(sum(t.numel() * t.element_size() for t in ts if t is not None))


def overlap(ours_idx, ref_idx) -> float:
    """Mean over images of |ours & ref| / |ours|; rows given as tensors or lists."""
    fr = []
    for a, b in zip(ours_idx, ref_idx):
        a = set(a.tolist() if hasattr(a, "tolist") else a)
        b = set(b.tolist() if hasattr(b, "tolist") else b)
        fr.append(len(a & b) / len(a) if a else float(not b))
    return float(sum(fr) / max(1, len(fr)))


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def _run(spec, cfg, ctx):
    return lambda: spec.fn(ctx, cfg)


def make_llm_job(name: str, width: str, bundle: LLMBundle, keep: int) -> Job:
    from epic_ext.methods import get_method
    spec = get_method(name)
    ctx = bundle.ctx
    B, n = ctx.hidden.shape[0], ctx.num_image_tokens
    cfg = spec.make_config(keep=keep, layer=LAYER)
    ours = _run(spec, cfg, ctx)
    def kept_idx(out):
        return float(out.index.shape[1])

    img_bytes = B * n * ctx.hidden.shape[-1] * ctx.hidden.element_size()

    if name == "fastv":
        def eager():
            return fastv_eager(bundle.q_all, ctx.keys, bundle.add_mask, ctx.image_start, n, keep,
                               ctx.scale)

        def agree(ref, out):
            return overlap(out.index, ref), "kept index sets"
        return Job(name, width, B, eager, ours, agree, _nb(ctx.keys, ctx.query),
                   kept_idx, lambda r: float(r.shape[1]))

    if name == "dart":
        def eager():
            return dart_eager(ctx.hidden, ctx.keys, ctx.final_norm, ctx.image_start, n, keep)

        matched = 4 + 8 * math.ceil(keep / 8)
        cfg_m = spec.make_config(keep=matched, layer=LAYER)

        def agree(ref, out):
            ours_m = spec.fn(ctx, cfg_m).index
            return overlap(ours_m, ref), f"ours@{matched} vs published@{keep} (keeps {ref.shape[1]})"
        return Job(name, width, B, eager, ours, agree, _nb(ctx.keys) + img_bytes,
                   kept_idx, lambda r: float(r.shape[1]))

    if name == "random":
        def eager():
            return random_eager(B, n, keep, ctx.hidden.device)

        def agree(ref, out):
            ok = tuple(out.index.shape) == tuple(ref.shape) and \
                bool((out.index[:, 1:] > out.index[:, :-1]).all())
            return None, "n/a (independent draws); " + ("same count, ascending" if ok else "SHAPE")
        return Job(name, width, B, eager, ours, agree, B * n * 8, kept_idx,
                   lambda r: float(r.shape[1]))

    if name == "pooling":
        def eager():
            return pooling_eager(ctx.hidden, ctx.image_start, n, ctx.grid, keep)

        def agree(ref, out):
            if out.hidden is None or out.hidden.shape != ref.shape:
                got = None if out.hidden is None else tuple(out.hidden.shape)
                return 0.0, f"shape {got} vs {tuple(ref.shape)}"
            tok_ok = torch.isclose(out.hidden.float(), ref.float(), rtol=1e-5, atol=1e-5).all(-1)
            return float(tok_ok.float().mean()), f"pooled tokens, max|diff| {_maxdiff(out.hidden, ref):.1e}"
        return Job(name, width, B, eager, ours, agree, img_bytes, kept_idx,
                   lambda r: float(r.shape[1]))
    raise ValueError(name)


def make_vision_job(name: str, width: str, bundle: VisionBundle, keep: int) -> Job:
    from epic_ext.methods import get_method
    spec = get_method(name)
    ctx = bundle.ctx
    B, N, _ = ctx.features.shape
    feat_bytes = _nb(ctx.features)
    def layer_in(i):
        return _nb(ctx.hidden_states[i])

    if name == "trim":
        cfg = spec.make_config(keep=None, scorer=bundle.scorer)

        def eager():
            return trim_eager(ctx, bundle.scorer)

        def agree(ref, out):
            from epic_ext.methods.trim import trim_select
            res = trim_select(ctx, cfg)
            toks, mask = ref
            k = toks.shape[1] - 1
            counts = res.counts.tolist()
            ours_rows = [res.indices[b, :c] for b, c in enumerate(counts)]
            ref_rows = [mask[b].nonzero().flatten() for b in range(B)]
            msg = f"counts ours {sorted(set(counts))} vs {k}"
            if all(c == k for c in counts):
                msg += f", max|diff| {_maxdiff(out.features[:, :k + 1], toks):.1e}"
            return overlap(ours_rows, ref_rows), msg

        def kept_ours(out):
            return float(out.valid.sum(1).float().mean()) - 1 if out.valid is not None \
                else float(out.features.shape[1] - 1)
        return Job(name, width, B, eager, _run(spec, cfg, ctx), agree, feat_bytes, kept_ours,
                   lambda r: float(r[0].shape[1] - 1))

    if name in ("prumerge", "prumerge_plus"):
        plus = name == "prumerge_plus"
        cfg = spec.make_config(keep=None)

        def eager():
            return prumerge_eager(ctx, plus=plus)

        def agree(ref, out):
            from epic_ext.methods.prumerge import prumerge_select
            res = prumerge_select(ctx, cfg, plus=plus)
            totals = res.total.tolist()
            ours_rows = [res.indices[b, :t] for b, t in enumerate(totals)]
            ref_rows = [kept for _, kept in ref]
            same = [t == len(kept) for t, (_, kept) in zip(totals, ref)]
            msg = f"kept ours {sorted(set(totals))} vs {sorted({len(k) for _, k in ref})}"
            if all(same):
                d = max(_maxdiff(out.features[b, :t + 1], toks)
                        for b, (t, (toks, _)) in enumerate(zip(totals, ref)))
                scale = float(max(toks.abs().max() for toks, _ in ref))
                msg += f", max|diff| {d:.1e} (of {scale:.1e})"
            return overlap(ours_rows, ref_rows), msg

        def kept_ours(out):
            return float(out.valid.sum(1).float().mean()) - 1 if out.valid is not None \
                else float(out.features.shape[1] - 1)
        layer = len(ctx.vision_model.encoder.layers) - 1
        return Job(name, width, B, eager, _run(spec, cfg, ctx), agree,
                   feat_bytes + layer_in(layer), kept_ours,
                   lambda r: float(sum(len(k) for _, k in r) / len(r)))

    if name == "visionzip":
        cfg = spec.make_config(keep=keep)
        dom, n_ctx = cfg.split(N)

        def eager():
            return visionzip_eager(ctx, dom, n_ctx)

        def agree(ref, out):
            from epic_ext.methods.visionzip import visionzip_select
            res = visionzip_select(ctx, cfg)
            toks, dom_idx = ref
            msg = f"dominant index sets; max|diff| {_maxdiff(out.features, toks):.1e}" \
                if out.features.shape == toks.shape else f"shape {tuple(out.features.shape)} vs {tuple(toks.shape)}"
            return overlap(res.dominant_index, dom_idx), msg
        return Job(name, width, B, eager, _run(spec, cfg, ctx), agree,
                   feat_bytes + layer_in(ctx.feature_layer - 1) + layer_in(ctx.feature_layer),
                   lambda out: float(out.features.shape[1]),
                   lambda r: float(r[0].shape[1]))
    raise ValueError(name)


# ============================================================================================
# method availability, prefill
# ============================================================================================

def registered_methods(wanted: list[str]) -> tuple[list[str], dict[str, str]]:
    """The wanted methods that are registered, and why the others are not."""
    import epic_ext.methods as M
    try:
        have = set(M.available_methods())
    except Exception as e:  # noqa: BLE001  (a method file mid-edit must not stop the others)
        print(f"note: importing every method file failed ({type(e).__name__}: {e}); "
              "importing the wanted ones one by one")
        have = set()
        for name in wanted:
            try:
                importlib.import_module(f"epic_ext.methods.{METHOD_FILES.get(name, name)}")
            except Exception as e2:  # noqa: BLE001
                print(f"note: epic_ext/methods/{METHOD_FILES.get(name, name)}.py: "
                      f"{type(e2).__name__}: {e2}")
        have = set(getattr(M, "_REGISTRY", {}))
    missing = {}
    for name in wanted:
        if name not in have:
            f = f"epic_ext/methods/{METHOD_FILES.get(name, name)}.py"
            exists = os.path.exists(os.path.join(os.path.dirname(M.__file__), os.path.basename(f)))
            missing[name] = f"not registered ({f} {'does not register it' if exists else 'missing'})"
    return [m for m in wanted if m not in missing], missing


def time_prefill(batches: list[int], device, quick: bool) -> dict:
    """{B: {"ms": median ms, "measured_B": b, "est": bool}} for a compressed prefill of the
    7B-depth preset at keep=64, layer 2."""
    import epic_ext.models as em
    from epic_ext.models.tiny import build_tiny_llava, random_pixels

    t0 = time.perf_counter()
    model = build_tiny_llava(PREFILL_PRESET, device=device)
    em.apply(model, "random", keep=64, layer=LAYER)
    print(f"prefill model {PREFILL_PRESET} built in {time.perf_counter() - t0:.1f} s")
    reps = 1 if quick else 3

    def run(b: int) -> float:
        ids, mask = _prompts(model, b, device)
        px = random_pixels(model, b, device=device)
        times = []
        for i in range(reps + 1):                       # the first call is a warmup
            common.sync(device)
            t = time.perf_counter()
            model(input_ids=ids, pixel_values=px, attention_mask=mask)
            common.sync(device)
            if i:
                times.append((time.perf_counter() - t) * 1e3)
        return float(np.median(times))

    out: dict = {}
    cache: dict[int, float] = {}
    for B in sorted(batches):
        b = B
        if B > 1 and device.type == "cpu":
            base = cache.get(1) or run(1)
            cache[1] = base
            if base * B / 1e3 > PREFILL_LIMIT_S:
                b = min(B, PREFILL_FALLBACK_B)
        if b not in cache:
            cache[b] = run(b)
        ms = cache[b] * (B / b)
        out[B] = {"ms": ms, "measured_B": b, "measured_ms": cache[b], "est": b != B}
        print(f"prefill {PREFILL_PRESET} random keep=64 layer={LAYER}: B={B} "
              + (f"{ms:.0f} ms (est.: B={b} measured {cache[b]:.0f} ms, x{B // b}; "
                 f"B=1 predicted > {PREFILL_LIMIT_S:.0f} s at B={B})" if b != B else f"{ms:.0f} ms"))
    em.revert(model)
    common.release(device)
    return out


# ============================================================================================
# driver
# ============================================================================================

def parser():
    p = harness.base_parser(__doc__, KEYS)
    p.add_argument("--methods", default=None,
                   help=f"comma list of {','.join(METHODS)} (default all registered)")
    p.add_argument("--widths", default=None, help="comma list of tiny,7b (default both; --quick: "
                   "tiny for every method, 7b for fastv only)")
    p.add_argument("--keep", type=int, default=64, help="token budget of the fixed-budget methods")
    p.add_argument("--no-prefill", action="store_true", help="skip the prefill yardstick")
    return p


def _fmt(v, spec=".3f", none="-"):
    return none if v is None else format(v, spec)


def table(rows: list[dict], prefill: dict) -> str:
    by: dict = {}
    for r in rows:
        by.setdefault((r["method"], r["width"], r["B"]), {})[r["provider"]] = r
    head = (f"{'method':<14} {'width':<5} {'B':>3} {'kept':>11} {'eager ms (min)':>20} "
            f"{'ours ms (min)':>18} {'ratio (min)':>14} {'eager %pf':>9} {'ours %pf':>8}  agree")
    lines = [head]
    for (m, w, B), d in by.items():
        e, o = d.get("eager"), d.get("ours")
        if e is None or o is None:
            continue
        if (e and e.get("skipped")) or (o and o.get("skipped")):
            why = (e or {}).get("skipped") or (o or {}).get("skipped")
            lines.append(f"{m:<14} {w:<5} {B:>3} skipped: {why}")
            continue
        kept = f"{_fmt(e.get('kept'), '.0f')}/{_fmt(o.get('kept'), '.1f')}"
        ratio = f"{e['median_ms'] / o['median_ms']:.1f}x ({e['min_ms'] / o['min_ms']:.1f}x)"
        est = "*" if prefill.get(B, {}).get("est") else ""
        ag = o.get("agree")
        em = f"{e['median_ms']:.3f} ({e['min_ms']:.3f})"
        om = f"{o['median_ms']:.3f} ({o['min_ms']:.3f})"
        lines.append(f"{m:<14} {w:<5} {B:>3} {kept:>11} {em:>20} {om:>18} {ratio:>14} "
                     f"{_fmt(e.get('pct_prefill'), '.2f') + est:>9} "
                     f"{_fmt(o.get('pct_prefill'), '.3f') + est:>8}  "
                     f"{'n/a' if ag is None else f'{ag:.3f}'} ({o.get('check', '')})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.dtypes and "fp32" not in args.dtypes.split(","):
        print(f"{BENCH}: contexts are fp32 only; --dtypes {args.dtypes} leaves nothing to run")
        return 0
    harness.apply_threads(args)
    device = common.pick_device(args.device)
    budget = args.budget if args.budget is not None else (0.3 if args.quick else 1.0)
    max_reps = args.max_reps or (100 if device.type == "cpu" else 500)
    specs = harness.parse_shape_specs(args.shapes, KEYS)
    batches = [s["B"] for s in harness.select_shapes([{"B": b} for b in BATCHES], [{"B": 1}],
                                                     specs, args.quick, KEYS)]
    wanted = [m.strip().lower().replace("-", "_").replace("+", "_plus")
              for m in (args.methods or ",".join(METHODS)).split(",") if m.strip()]
    for m in wanted:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    widths = [w.strip() for w in (args.widths or ",".join(WIDTHS)).split(",") if w.strip()]
    for w in widths:
        if w not in WIDTHS:
            raise SystemExit(f"unknown width {w!r}; choose from {', '.join(WIDTHS)}")
    run_eager = harness.provider_wanted("eager", args.providers)
    run_ours = harness.provider_wanted("ours", args.providers)

    machine = common.machine_info(device)
    print(f"== {BENCH}: {machine['name']}, torch {torch.__version__}, device {device}, "
          f"B in {batches}, budget {budget:g} s per measurement, keep={args.keep}, layer={LAYER}")
    methods, missing = registered_methods(wanted)
    for m, why in missing.items():
        print(f"note: skipping {m}: {why}")

    from epic_ext.models.tiny import build_tiny_llava
    torch.manual_seed(0)
    rows: list[dict] = []
    with torch.no_grad():
        prefill = {} if args.no_prefill else time_prefill(batches, device, args.quick)
        tiny = build_tiny_llava("tiny", device=device)
        plan = []
        for width in widths:
            for name in methods:
                if args.quick and not args.widths and width == "7b" and name not in QUICK_7B:
                    continue
                plan.append((width, name))
        for B in batches:
            for width in WIDTHS:
                names = [n for w, n in plan if w == width]
                if not names:
                    continue
                bundles: dict = {}
                for name in names:
                    stage = "llm" if name in LLM_METHODS else "vision"
                    base = {"bench": BENCH, "case": f"{name} {width} B={B}", "method": name,
                            "stage": stage, "width": width, "B": B, "shape": {"B": B},
                            "dtype": "fp32", "variant": width}
                    try:
                        if stage not in bundles:
                            t0 = time.perf_counter()
                            make = {("llm", "tiny"): llm_context_tiny, ("llm", "7b"): llm_context_7b,
                                    ("vision", "tiny"): vision_context_tiny,
                                    ("vision", "7b"): vision_context_7b}[(stage, width)]
                            bundles[stage] = make(tiny, B, device)
                            print(f"-- {stage} context {width} B={B} built in "
                                  f"{time.perf_counter() - t0:.1f} s")
                        bundle = bundles[stage]
                        job = (make_llm_job if stage == "llm" else make_vision_job)(
                            name, width, bundle, args.keep)
                        t0 = time.perf_counter()
                        ref = job.eager()
                        common.sync(device)
                        first_s = time.perf_counter() - t0
                        out = job.ours()
                        common.sync(device)
                        agree, msg = job.agree(ref, out)
                        kept_e, kept_o = job.kept_eager(ref), job.kept_ours(out)
                        del ref, out
                    except Exception as e:  # noqa: BLE001  (a failing method must not stop the run)
                        why = harness._short_error(e)
                        print(f"{base['case']:<24} skipped: {why}")
                        if os.environ.get("EPIC_EXT_BENCH_DEBUG"):
                            import traceback
                            traceback.print_exc()
                        rows.append(dict(base, provider="*", skipped=why))
                        continue
                    eager_ms = None
                    for prov, fn, kept in (("eager", job.eager, kept_e), ("ours", job.ours, kept_o)):
                        if not (run_eager if prov == "eager" else run_ours):
                            continue
                        r = dict(base, provider=prov, kind="baseline" if prov == "eager" else "ours",
                                 bytes=job.nbytes, kept=kept)
                        try:
                            # at least 5 repetitions, 3 for calls of half a second and more
                            t = common.measure(fn, device, budget_s=budget,
                                               min_reps=3 if first_s > 0.5 else 5,
                                               max_reps=max_reps, flush=args.flush)
                        except Exception as e:  # noqa: BLE001
                            r["skipped"] = harness._short_error(e)
                        else:
                            r.update(t.as_dict())
                            r["gbps"] = job.nbytes / (t.median_ms * 1e-3) / 1e9
                            r["copy_gbps"] = r["frac_copy"] = None
                            if prov == "eager":
                                eager_ms = t.median_ms
                                r["check"] = "baseline"
                            else:
                                r["check"] = msg
                                r["agree"] = agree
                            r["speedup"] = eager_ms / t.median_ms if eager_ms else None
                            pf = prefill.get(B)
                            if pf:
                                r["prefill_ms"] = pf["ms"]
                                r["prefill_est"] = pf["est"]
                                r["pct_prefill"] = 100.0 * t.median_ms / pf["ms"]
                        rows.append(r)
                        sp = f"{r['speedup']:.1f}x" if r.get("speedup") and prov == "ours" else ""
                        print(f"{base['case']:<24} {prov:<6} "
                              + (f"skipped: {r['skipped']}" if r.get("skipped") else
                                 f"{r['median_ms']:>10.3f} ms (min {r['min_ms']:.3f}, {r['reps']} reps)"
                                 f" kept {kept:.1f} {sp}"
                                 + (f"  agree {'n/a' if agree is None else f'{agree:.3f}'}: {msg}"
                                    if prov == "ours" else "")), flush=True)
                    del job
                del bundles
                common.release(device)

    print()
    print(f"-- {BENCH}: selection step per batch, eager (published way) vs ours; ratio = eager / "
          f"ours (of the medians, and of the minima); kept = eager/ours tokens per image; %pf = share of one compressed "
          f"{PREFILL_PRESET} prefill (random keep=64 layer {LAYER}) at the same B"
          + (" (* = estimated from a smaller B)" if any(v["est"] for v in prefill.values()) else ""))
    print(table(rows, prefill))
    for m, why in missing.items():
        print(f"{m}: skipped, {why}")
    if not args.no_json:
        config = {"quick": args.quick, "budget_s": budget, "device": str(device), "keep": args.keep,
                  "layer": LAYER, "batches": batches, "widths": widths, "argv": sys.argv[1:],
                  "missing_methods": missing,
                  "prefill": {str(b): v for b, v in prefill.items()}, "prefill_preset": PREFILL_PRESET,
                  "contexts": {"tiny": "captured from a real forward of build_tiny_llava('tiny') "
                                       "(llm: just before decoder layer 2; vision: the vision tower "
                                       "with output_hidden_states)",
                               "7b": f"random tensors at LLaVA-1.5-7B widths: LLM H={H7}, d={D7}, "
                                     f"hidden {HID7}; CLIP ViT-L hidden {CLIP7['hidden']}, "
                                     f"{CLIP7['heads']} heads, a 2-layer random tower; TRIM text "
                                     f"width {CLIP7['text_hidden']} with 0 layers"},
                  "timing": "median over repetitions (common.measure), under torch.no_grad; "
                            "GB/s = context bytes read / median (not a roofline)",
                  "agree": "fraction of ours' kept indices the eager baseline keeps too; DART "
                           "compared at ours keep=68 vs published budget 64"}
        path = common.write_results(BENCH, rows, machine, config, args.out_dir)
        print(f"wrote {path}")
    bad = [r for r in rows if r.get("provider") == "ours" and r.get("agree") is not None
           and r["agree"] < 0.95]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
