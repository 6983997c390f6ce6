"""PruMerge and PruMerge+ (Shang et al., 2024), pre-projector methods.

Scores: the [CLS] attention of CLIP's LAST encoder layer (``layer=None``; LLaVA-1.5: layer 23,
whose input is LLaVA's feature layer), computed as the published code does from that layer's
q/k projections taken as ONE Dv-wide head: softmax(q_cls . k_j * Dv^-0.5) over the 1 + N keys,
row 0 without the CLS column (fp32).

Selection (``keep=None``): IQR outliers of the scores (DESIGN.md 2.2), batch-pooled by default
(``pooled=False``: per image), and the kept tokens in SCORE order (descending, ties: lower index
first), as the reference's ``torch.topk(..., sorted=True)`` yields. With ``keep`` set (a count or
a ratio of N) the top-``keep`` tokens are kept instead (the published non-adaptive path).

Merge: for each kept token i, its ``neighbors`` (32) nearest tokens by cosine similarity of the
L2-normalised keys of the same layer (heads concatenated, CLS excluded), searched over ALL other
tokens (kept or not), are added with their scores as weights, unnormalised:
x_i + sum_j attn_j x_j (x: pre-projector features, not the updated ones). One more token follows
the kept ones: sum over the unkept tokens of attn_j x_j.

PruMerge+ adds spatially uniform tokens after the score-ordered ones: indices
arange(0, N - 1, int(int(1 / r) / 3)) that are not already kept, in ascending order, with
r = counts[b] / N, the image's kept ratio (float64, the reference's Python float arithmetic).
Guards (the reference divides by zero / calls arange with step 0): r = 0 gives step N, i.e.
index 0 only (the limit r -> 0+); a step of 0 (r > 1/3) becomes 1. These tokens are merged like
the others and the extra token sums the tokens that are still unkept. The reference filters the
grid against the kept tokens of the whole batch and only runs at B = 1; here each image filters
against its own, and with batch pooling r uses the per-image count floor(outliers / B) (the
reference's r is outliers / (B N): the same at B = 1).

Output layout, [B, S + 1, Dv] with a validity mask: kept tokens (score order), PruMerge+'s grid
tokens, the extra token at position total[b], zero padding after it. S is fixed from N and the
cap alone (``max_k``, default N) so nothing syncs with the host; PruMerge with ``keep`` set has
exactly keep + 1 tokens and no mask.

PruMerge+ on encoders without [CLS] (Qwen2-VL / 2.5-VL / 3-VL, a ``VisionUnitsContext`` per group
of images or video frame groups) follows its one published Qwen port, EffiVLM-Bench's
``qwen2vl_vision_tower_forward_prumerge_plus``, which differs from the LLaVA rule above:

* Score ("cls_attn"): the ranking block's softmax attention pooled 4x4 onto the merged tokens,
  averaged over heads and queries, i.e. the received attention / (m x m patches * N).
  Block: the port's ``blocks[-2]`` on Qwen2-VL (the same block VisionZip ranks with there, so no
  per-method choice); no port exists for Qwen2.5-VL / Qwen3-VL, whose blocks[-2] is a windowed
  block on Qwen2.5-VL: VisionZip's block is used (the last full-attention block; Qwen3-VL's last).
* Budget: exactly ``max(int(keep * N), 1)`` tokens per unit (the port's truncation, not the
  round-half-up of the other methods), or a count (at most N; 0 keeps 1, the port's floor).
  ``keep`` is required (the port always has one): None raises ``ValueError: keep``; so does
  ``layer`` (the block is fixed), and ``max_k`` (adaptive budgets only) cannot be given.
  IQR: outliers strictly above Q3 + whisker IQR of the unit's scores (the port's numpy linear
  percentiles = torch.quantile's), iqr = max(int(N * (outliers / N)), 1) in float64
  (e.g. N = 49 with 2 outliers gives 1). budget <= iqr: the top ``budget`` by score; else the top
  ``iqr`` plus ``arange(0, N, max(1, N // budget))`` without them, ascending, cut to the budget
  (that grid holds >= budget indices, so the budget is always met: the port's random top-up never
  runs). No extra token. Score ties (torch.topk's order is unspecified): the lower index first.
* Merge: each kept token += sum of score_j * x_j over its ``neighbors`` (32) most cosine-similar
  other tokens (all N - 1 others, kept or not, when fewer; none when N = 1, where the port's code
  fails), by that block's keys with the heads SIDE BY SIDE (the port's ``k.view(T, H d)``, unlike
  VisionZip's head mean), averaged over the merged patches; x: the merged (LLM-input) embeddings,
  not the updated ones; the sum in fp32, rounded to the model dtype once.
* Positions: every kept token at its own original M-RoPE position with its own DeepStack rows. The
  port writes the merged features in selection order (score, then grid) into the ascending
  positions, so a token lands on another's position whenever that order is not ascending: read as
  a defect, not reproduced.
* Readings where the port is silent or batch-1 only: the port pools one attention matrix and one
  fence over every image of a prompt (its scores divided by the prompt's patch count; it handles
  one image in practice); here each image and each video frame group is a unit with its own
  fence, score scale and budget (the same for a single image), and ``pooled`` applies to LLaVA
  only. The port does not reduce videos; frame groups are units as for the other methods.

Plain PruMerge has no Qwen rule: its adaptive count varies per unit (a fixed-width selection
cannot hold it without reading the counts back) and its extra token has no position; ``apply``
rejects it on Qwen-VL.
"""
from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..reference import MERGE_WEIGHTED
from . import register_method
from .base import LLMSelection, MethodConfig, VisionContext, VisionReduction, VisionUnitsContext, take_rows
from .trim import check_iqr_options, check_keep, resolve_cap, resolve_keep


@dataclass
class PruMergeConfig(MethodConfig):
    """Options of PruMerge / PruMerge+.

    keep: None (default) = the adaptive IQR budget; an int count or a ratio of N = the top-keep
        tokens by [CLS] attention (exact: keep + 1 output tokens for PruMerge). PruMerge+ on
        Qwen-VL: required, exactly max(int(keep * N), 1) tokens per unit (module notes).
    pooled: True (default, reference parity) = one IQR fence over the batch, floor(outliers / B)
        tokens per image; False = per image.
    whisker: IQR whisker of the upper fence (1.5).
    max_k: cap of the adaptive count (None = N); fixes the output's slot count, and with it the
        size of the neighbour search (every slot is searched, valid or not).
    neighbors: tokens merged into each kept token (32 in the published code; capped at N - 1).
    layer: CLIP encoder layer whose q/k give the [CLS] attention and the keys; None = the last
        layer (published: 23 of 24); negative values count from the end.
    """
    pooled: bool = True
    whisker: float = 1.5
    max_k: Optional[int] = None
    neighbors: int = 32
    layer: Optional[int] = None

    def validate(self) -> None:
        check_keep(self.keep)
        check_iqr_options(self)
        if isinstance(self.neighbors, bool) or not isinstance(self.neighbors, numbers.Integral) \
                or self.neighbors < 0:
            raise ValueError(f"neighbors must be an int >= 0, got {self.neighbors!r}")
        if self.layer is not None and (isinstance(self.layer, bool)
                                       or not isinstance(self.layer, numbers.Integral)):
            raise ValueError(f"layer must be None or an int encoder-layer index, got {self.layer!r}")


class PruMergeResult(NamedTuple):
    features: Tensor            # [B, S + 1, Dv]
    valid: Optional[Tensor]     # [B, S + 1] bool (None: all valid)
    indices: Tensor             # [B, S] kept token indices in output order; -1 past total[b]
    counts: Tensor              # [B] int64 tokens kept by score (IQR / keep)
    total: Tensor               # [B] int64 tokens kept in all (PruMerge+: with the grid ones)
    scores: Tensor              # [B, N] fp32 [CLS] attention


def cls_attention_one_head(ctx: VisionContext, layer: int) -> tuple[Tensor, Tensor]:
    """([CLS] attention [B, N], keys [B, N, Dv]) of encoder layer ``layer`` as one Dv-wide head,
    fp32. Only the [CLS] query row is computed."""
    q, k = ctx.layer_qk(layer)
    b, h, t, hd = q.shape
    dv = h * hd
    q0 = q[:, :, 0].reshape(b, dv).float()
    keys = k.transpose(1, 2).reshape(b, t, dv).float()
    logits = torch.bmm(keys, q0.unsqueeze(-1)).squeeze(-1) * dv ** -0.5
    return logits.softmax(dim=-1)[:, 1:], keys[:, 1:]


def grid_step(count: int, n: int) -> int:
    """PruMerge+'s grid step int(int(1 / r) / 3), r = count / n, with the r = 0 and step-0 guards."""
    if count == 0:
        return n
    return max(1, int(int(1.0 / (count / n)) / 3))


@functools.lru_cache(maxsize=256)
def plus_slots(n: int, lo: int, hi: int) -> int:
    """Largest possible kept-token total of PruMerge+ when the scored count lies in [lo, hi]."""
    return max(min(n, c + len(range(0, n - 1, grid_step(c, n)))) for c in range(lo, hi + 1))


def _grid_steps(counts: Tensor, n: int) -> Tensor:
    """Device version of grid_step; float64 so the truncations match the reference's Python."""
    safe = torch.where(counts > 0, counts, torch.ones_like(counts)).double()
    step = torch.floor(1.0 / (safe / n)).long() // 3
    return torch.where(counts > 0, step, torch.full_like(step, n)).clamp(min=1)


def _gather_weighted(tokens: Tensor, idx: Tensor, counts: Tensor, weights: Tensor) -> Tensor:
    # Indices built on the device, in range by construction: no range check (on CPU tensors the
    # public gather_merge would check them).
    return ops._run(None, ops._gather_merge, ops._gather_merge_impl, tokens, idx, counts,
                    MERGE_WEIGHTED, weights, False, differentiable=(tokens, weights))


def neighbour_sums(x: Tensor, keys: Tensor, weights: Tensor, idx: Tensor, valid: Optional[Tensor],
                   nb: int) -> Tensor:
    """PruMerge's merge term of each kept token idx[b, s] of x [B, N, D]: sum of weights[b, j] *
    x[b, j] over its ``nb`` nearest tokens j by cosine of ``keys`` [B, N, dk] (itself excluded,
    kept or not); [B, S, D] fp32, zeros where ``valid`` is False. The sum is a [S, N] sparse-weight
    matmul instead of a [S, nb, D] gather."""
    b, n = x.shape[:2]
    width = idx.shape[1]
    kn = F.normalize(keys, dim=-1)
    kq = kn.gather(1, idx[..., None].expand(-1, -1, kn.shape[-1]))
    sim = torch.bmm(kq, kn.transpose(1, 2))
    sim.scatter_(2, idx[..., None], float("-inf"))
    nbr = sim.topk(nb, dim=2).indices
    w = weights.gather(1, nbr.reshape(b, -1)).view(b, width, nb)
    if valid is not None:
        w = torch.where(valid[..., None], w, torch.zeros_like(w))
    wmat = torch.zeros(b, width, n, dtype=torch.float32, device=x.device).scatter_(2, nbr, w)
    return torch.bmm(wmat, x.float())


def prumerge_select(ctx: VisionContext, cfg: PruMergeConfig, plus: bool = False) -> PruMergeResult:
    """PruMerge (plus=False) or PruMerge+ with the kept indices exposed."""
    x = ctx.features
    b, n, _ = x.shape
    dev = x.device
    n_layers = len(ctx.vision_model.encoder.layers)
    layer = n_layers - 1 if cfg.layer is None else int(cfg.layer)
    if not -n_layers <= layer < n_layers:
        raise ValueError(f"layer must index one of the {n_layers} encoder layers, got {cfg.layer}")
    layer %= n_layers
    attn, keys = cls_attention_one_head(ctx, layer)

    if cfg.keep is None:
        cap = resolve_cap(cfg.max_k, n)
        counts, idx = ops.iqr_select(attn, float(cfg.whisker), pooled=cfg.pooled, max_k=cap)
        idx = idx[:, :cap]
        lo = 0
    else:
        cap = lo = resolve_keep(cfg.keep, n)
        idx = ops.select_topk(attn, cap)
        counts = torch.full((b,), cap, dtype=torch.int64, device=dev)

    # Ascending indices -> score order; the stable sort keeps the lower index first on ties.
    slot = torch.arange(cap, device=dev)
    kept = slot < counts[:, None]
    s = attn.gather(1, idx.clamp(min=0))
    s = torch.where(kept & ~torch.isnan(s), s, torch.full_like(s, float("-inf")))
    idx = idx.gather(1, torch.sort(s, dim=1, descending=True, stable=True).indices)

    if plus:
        width = plus_slots(n, lo, cap)
        pos = torch.arange(n, device=dev)
        in_kept = torch.zeros(b, n + 1, dtype=torch.bool, device=dev)
        in_kept.scatter_(1, torch.where(kept, idx, torch.full_like(idx, n)), True)
        step = _grid_steps(counts, n)
        extra = (pos % step[:, None] == 0) & (pos < n - 1) & ~in_kept[:, :n]
        # Extra indices first, ascending: sort keys push the others past N.
        extra_idx = torch.sort(torch.where(extra, pos, pos + n), dim=1).values
        slots = torch.arange(width, device=dev)
        from_extra = extra_idx.gather(1, (slots - counts[:, None]).clamp(0, n - 1))
        scored = F.pad(idx, (0, max(0, width - cap)), value=-1)[:, :width]
        idx = torch.where(slots < counts[:, None], scored, from_extra)
        total = counts + extra.sum(1)
    else:
        width, total = cap, counts
    slots = torch.arange(width, device=dev)
    valid = slots < total[:, None]
    safe = torch.where(valid, idx, torch.zeros_like(idx)).contiguous()

    # Kept rows plus the weighted extra token at position total[b], in one pass over x.
    merged = _gather_weighted(x, safe, total, attn)

    nb = min(int(cfg.neighbors), n - 1)
    if nb > 0 and width > 0:
        update = neighbour_sums(x, keys, attn, safe, valid, nb)
        head = (merged[:, :width].float() + update).to(x.dtype)
        merged = torch.cat([head, merged[:, width:]], dim=1)

    out_valid = None
    if plus or cfg.keep is None:
        out_valid = torch.arange(width + 1, device=dev) <= total[:, None]
    idx = torch.where(valid, idx, torch.full_like(idx, -1))
    return PruMergeResult(merged, out_valid, idx, counts, total, attn)


def unit_budget(keep, n: int) -> int:
    """EffiVLM-Bench's budget of a unit of n tokens: max(int(keep * n), 1) for a ratio (Python
    float product, truncated); a count as given (at least 1), at most n."""
    if isinstance(keep, numbers.Integral):
        if keep > n:
            raise ValueError(f"keep: {keep} tokens is more than a visual unit of this batch holds ({n}; the budget "
                             f"applies to each image and video frame group); give a ratio or a smaller count")
        return max(int(keep), 1)
    return max(int(float(keep) * n), 1)


def prumerge_plus_units(ctx: VisionUnitsContext, cfg: PruMergeConfig) -> LLMSelection:
    """PruMerge+ on merged tokens ranked by received attention (EffiVLM-Bench's Qwen2-VL rule, see
    the module notes): exactly ``unit_budget`` tokens per unit, ascending, each carrying its merged
    embedding."""
    if cfg.keep is None:
        raise ValueError("keep: PruMerge+ on an encoder without [CLS] (Qwen-VL) needs a budget (a ratio or a "
                         "count per image / video frame group), as its published Qwen port has; got None")
    if cfg.layer is not None:
        raise ValueError(f"layer: on Qwen-VL the ranking vision block is fixed per family (EffiVLM-Bench / "
                         f"VisionZip's), got layer={cfg.layer}")
    if ctx.head_keys is None or ctx.patches is None:
        raise ValueError("VisionUnitsContext: PruMerge+ needs head_keys and patches")
    x = ctx.features
    s, n, _ = x.shape
    dev = x.device
    budget = unit_budget(cfg.keep, n)
    # EffiVLM's "cls_attn": the 4x4-pooled attention averaged over heads and the unit's queries =
    # received (summed over the patch queries) / (patches per token * N).
    attn = ctx.received / float(ctx.patches * n)
    counts = ops.iqr_select(attn, float(cfg.whisker), pooled=False).counts
    # iqr_token = max(int(N * (outliers / N)), 1) in float64, as the published Python float
    # arithmetic (e.g. N = 49: int(49 * (2 / 49)) = 1).
    iqr_tokens = torch.floor(counts.double() / n * n).long().clamp(min=1)
    top = torch.clamp(iqr_tokens, max=budget)
    ranked = torch.where(torch.isnan(attn), torch.full_like(attn, float("-inf")), attn)
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices      # ties: lower index first
    pos = torch.arange(n, device=dev)
    rank = torch.empty_like(order).scatter_(1, order, pos.expand(s, -1).contiguous())
    in_top = rank < top[:, None]
    # Evenly spaced fill of what the budget leaves: arange(0, N, max(1, N // budget)) without the
    # top tokens, the first (budget - top) of them; the grid holds >= budget indices, so the fill
    # always completes the budget.
    grid = (pos % max(1, n // budget) == 0) & ~in_top
    fill = grid & (grid.long().cumsum(dim=1) <= (budget - top)[:, None])
    kept = in_top | fill
    index = torch.sort(torch.where(kept, pos, pos + n), dim=1).values[:, :budget]
    nb = min(int(cfg.neighbors), n - 1)
    hidden = take_rows(x, index)
    if nb > 0:
        hidden = (hidden.float() + neighbour_sums(x, ctx.head_keys, attn, index, None, nb)).to(x.dtype)
    return LLMSelection(index, hidden)


@register_method("prumerge", "vision", PruMergeConfig)
def prumerge(ctx: VisionContext, cfg: PruMergeConfig) -> VisionReduction:
    res = prumerge_select(ctx, cfg, plus=False)
    return VisionReduction(res.features, res.valid)


@register_method("prumerge_plus", "vision", PruMergeConfig, no_cls=True)
def prumerge_plus(ctx, cfg: PruMergeConfig):
    if isinstance(ctx, VisionUnitsContext):
        return prumerge_plus_units(ctx, cfg)
    res = prumerge_select(ctx, cfg, plus=True)
    return VisionReduction(res.features, res.valid)
