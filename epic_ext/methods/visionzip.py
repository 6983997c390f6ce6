"""VisionZip (Yang et al., 2024), a pre-projector method with a fixed budget.

Both steps use the encoder layer whose OUTPUT is LLaVA's feature layer, i.e. layer
``feature_layer - 1`` with input ``hidden_states[feature_layer - 1]`` (LLaVA-1.5: features =
hidden_states[-2], the output of layer 22; the published code reads ``attentions[-2]`` and the
keys it stored on ``layers[-2]``).

Dominant tokens: the [CLS] row of that layer's attention (per-head softmax over the 1 + N keys,
scale head_dim^-0.5, fp32), summed over heads, without the CLS column; the top ``dominant - 1``
patches plus CLS itself make ``dominant`` tokens. Output order as the reference's boolean-mask
gather: CLS (its hidden state hidden_states[feature_layer][:, 0]) first, then the kept patches
in ascending (spatial) order.

Contextual tokens: the M = N - (dominant - 1) remaining patches, in ascending index order.
Positions 0, step, 2 step, ... of that list (step = max(1, M // contextual), the first
``contextual`` of them) are the targets; every other remaining patch is assigned to the target
whose key is most cosine-similar (keys of the same layer averaged over heads, L2-normalised;
ties: the first target). Reading of the published formula (``counts = assign.sum().clamp(min=1)``,
``contextual = target_hidden + bmm(assign^T, hidden_to_merge) / counts``): each contextual token
is target + mean(assigned), i.e. the target's own features are NOT averaged in, and a target
with nothing assigned is output unchanged. Output order: the targets' order (ascending index).

Encoders without [CLS] (Qwen2-VL / 2.5-VL / 3-VL, a ``VisionUnitsContext`` per group of
images or video frame groups): as VisionZip's own Qwen2.5-VL code, tokens are the merged (LLM
input) tokens, ranked by the attention each receives in the ranking vision block (mean over
heads, summed over queries, averaged over the merged 2x2 patches); the contextual targets and
assignment (the same rule as above, with that block's keys averaged alike) merge embeddings
after the merger; every kept token, a merged one in its target's slot, keeps its original
M-RoPE position. Readings: the published code pools one budget over all visual tokens of a
prompt (and handles one image only); here each image and each video frame group is reduced on
its own budget. Its defaults are ratios, dominant = int(0.45 N) and contextual =
max(int(0.05 N), 1) per unit; ``keep`` is split 54:10 as on LLaVA (EffiVLM-Bench's Qwen2-VL
port does the same).

Budget: dominant=54, contextual=10 by default (64 tokens in all). ``keep`` (a count, or a ratio
of N) sets the total with the published 54:10 split scaled: contextual = floor(keep * 10 / 64 +
1/2), dominant = keep - contextual; this reproduces the paper's 54+10, 108+20 and 162+30 for
64, 128 and 192. The output always has exactly dominant + contextual tokens (contextual is cut to
M when fewer patches remain), so there is no validity mask.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from . import register_method
from .base import LLMSelection, MethodConfig, VisionContext, VisionReduction, VisionUnitsContext, take_rows
from .trim import check_keep, resolve_keep

DEFAULT_DOMINANT, DEFAULT_CONTEXTUAL = 54, 10


@dataclass
class VisionZipConfig(MethodConfig):
    """Options of VisionZip.

    keep: None (default: dominant + contextual) or the total token count (int, or a ratio of N),
        split 54:10 as in the paper (contextual = round(keep * 10 / 64), the rest dominant, CLS
        included); cannot be combined with dominant / contextual.
    dominant: dominant tokens including CLS (None = 54); at least 1.
    contextual: contextual (merged) tokens (None = 10).
    """
    dominant: Optional[int] = None
    contextual: Optional[int] = None

    def validate(self) -> None:
        check_keep(self.keep)
        if self.keep == 0:   # an int 0 fails here, at apply time; a ratio rounding to 0 in split()
            raise ValueError("keep: VisionZip keeps at least the CLS token, so keep must be >= 1, got 0")
        for name in ("dominant", "contextual"):
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise ValueError(f"{name} must be None or an int, got {v!r}")
            if self.keep is not None:
                raise ValueError(f"{name}: give either keep (total, split 54:10) or dominant/contextual, not both")
        if self.dominant is not None and self.dominant < 1:
            raise ValueError(f"dominant must be >= 1 (it counts the CLS token), got {self.dominant}")
        if self.contextual is not None and self.contextual < 0:
            raise ValueError(f"contextual must be >= 0, got {self.contextual}")

    def split(self, n: int) -> tuple[int, int]:
        """(dominant, contextual) for N = n patches."""
        if self.keep is None:
            dom = DEFAULT_DOMINANT if self.dominant is None else int(self.dominant)
            ctx = DEFAULT_CONTEXTUAL if self.contextual is None else int(self.contextual)
        else:
            total = resolve_keep(self.keep, n)
            if total < 1:
                raise ValueError(f"keep: VisionZip keeps at least the CLS token, got a budget of {total}")
            ctx = (total * DEFAULT_CONTEXTUAL * 2 + (DEFAULT_DOMINANT + DEFAULT_CONTEXTUAL)) // \
                (2 * (DEFAULT_DOMINANT + DEFAULT_CONTEXTUAL))  # floor(total * 10 / 64 + 1/2), exact
            dom = total - ctx
        if dom - 1 > n:
            raise ValueError(f"dominant must be <= N + 1 = {n + 1} (CLS + every patch), got {dom}")
        return dom, ctx


class VisionZipResult(NamedTuple):
    features: Tensor            # [B, dominant + contextual, Dv]
    dominant_index: Tensor      # [B, dominant - 1] kept patch indices, ascending
    target_index: Tensor        # [B, contextual] target patch indices, ascending
    assignment: Tensor          # [B, M - contextual] target slot of each merged patch
    scores: Tensor              # [B, N] fp32 [CLS] attention summed over heads


def cls_attention_heads_summed(ctx: VisionContext, layer: int) -> tuple[Tensor, Tensor]:
    """([CLS] attention summed over heads [B, N], keys averaged over heads [B, N, head_dim]) of
    encoder layer ``layer``, fp32."""
    q, k = ctx.layer_qk(layer)
    hd = q.shape[-1]
    q0 = q[:, :, :1].float()
    kf = k.float()
    probs = (torch.matmul(q0, kf.transpose(-1, -2)) * hd ** -0.5).softmax(dim=-1)  # [B, H, 1, T]
    return probs.sum(dim=1)[:, 0, 1:], kf.mean(dim=1)[:, 1:]


def visionzip_select(ctx: VisionContext, cfg: VisionZipConfig) -> VisionZipResult:
    x = ctx.features
    n = x.shape[1]
    dom, n_ctx = cfg.split(n)
    layer = ctx.feature_layer - 1
    if layer < 0:
        raise ValueError("feature_layer: VisionZip needs the features to be an encoder layer's output (>= 1)")
    scores, metric = cls_attention_heads_summed(ctx, layer)

    # Dominant patches: one fused top-k + gather, ascending (the reference's mask order).
    comp = ops.compress(x, scores, dom - 1, merge="none")
    dom_tokens, dom_idx = comp.tokens, comp.indices
    cls = ctx.hidden_states[ctx.feature_layer][:, :1].to(x.dtype)

    t_idx, assign, contextual = merge_contextual(x, metric, dom_idx, n_ctx)
    out = torch.cat([cls, dom_tokens, contextual], dim=1)
    return VisionZipResult(out, dom_idx, t_idx, assign, scores)


def merge_contextual(x: Tensor, metric: Tensor, dom_idx: Tensor, n_ctx: int) -> tuple[Tensor, Tensor, Tensor]:
    """The contextual tokens of the tokens ``x`` [B, N, D] outside ``dom_idx`` [B, K]: (target
    indices [B, C] ascending, each other token's target slot [B, M - C], target + mean of its
    assigned tokens [B, C, D]), assignment by cosine similarity of ``metric`` [B, N, dk]."""
    b, n, d = x.shape
    dev = x.device
    # Remaining tokens in ascending order: sort keys push the dominant ones past N.
    pos = torch.arange(n, device=dev)
    is_dom = torch.zeros(b, n + 1, dtype=torch.bool, device=dev)
    is_dom.scatter_(1, dom_idx, True)
    is_dom = is_dom[:, :n]
    m = n - dom_idx.shape[1]
    rest = torch.sort(torch.where(is_dom, pos + n, pos), dim=1).values[:, :m]

    n_ctx = min(n_ctx, m)
    if n_ctx == 0:
        empty = torch.zeros(b, 0, dtype=torch.int64, device=dev)
        return empty, empty, x.new_zeros(b, 0, d)
    step = max(1, m // n_ctx)
    tpos = torch.arange(0, m, step, device=dev)[:n_ctx]
    # The other positions, ascending, without a boolean index (that would sync): sort keys
    # push the targets past M.
    mpos = torch.arange(m, device=dev)
    is_t = (mpos % step == 0) & (mpos < step * n_ctx)
    opos = torch.sort(torch.where(is_t, mpos + m, mpos)).values[: m - n_ctx]
    t_idx, o_idx = rest[:, tpos], rest[:, opos]

    kn = F.normalize(metric, dim=-1)
    kt = kn.gather(1, t_idx[..., None].expand(-1, -1, kn.shape[-1]))
    ko = kn.gather(1, o_idx[..., None].expand(-1, -1, kn.shape[-1]))
    assign = torch.bmm(ko, kt.transpose(1, 2)).argmax(dim=-1)  # [B, M - C]

    xf = x.float()
    xt = take_rows(xf, t_idx)
    xo = take_rows(xf, o_idx)
    sums = torch.zeros_like(xt).scatter_add_(1, assign[..., None].expand(-1, -1, d), xo)
    cnt = torch.zeros(b, n_ctx, dtype=torch.float32, device=dev).scatter_add_(
        1, assign, torch.ones_like(assign, dtype=torch.float32))
    contextual = (xt + sums / cnt.clamp(min=1)[..., None]).to(x.dtype)
    return t_idx, assign, contextual


def split_units(cfg: VisionZipConfig, n: int) -> tuple[int, int]:
    """(dominant, contextual) per unit of n merged tokens on an encoder without [CLS]: the
    published Qwen2.5-VL defaults int(0.45 N) and max(int(0.05 N), 1) when nothing is given;
    ``keep`` split 54:10 as on LLaVA; or the given counts (no CLS among them)."""
    if cfg.keep is None and cfg.dominant is None and cfg.contextual is None:
        return int(0.45 * n), max(int(0.05 * n), 1)
    if cfg.keep is None:
        dom = int(0.45 * n) if cfg.dominant is None else int(cfg.dominant)
        ctx = max(int(0.05 * n), 1) if cfg.contextual is None else int(cfg.contextual)
    else:
        total = resolve_keep(cfg.keep, n)
        ctx = (total * DEFAULT_CONTEXTUAL * 2 + (DEFAULT_DOMINANT + DEFAULT_CONTEXTUAL)) // \
            (2 * (DEFAULT_DOMINANT + DEFAULT_CONTEXTUAL))
        dom = total - ctx
    if dom > n:
        raise ValueError(f"dominant: {dom} tokens is more than a visual unit of this batch holds ({n})")
    return dom, ctx


def visionzip_units(ctx: VisionUnitsContext, cfg: VisionZipConfig) -> LLMSelection:
    """VisionZip on merged tokens ranked by received attention (see the module notes): the
    dominant tokens and the contextual targets, in ascending order, the targets carrying their
    merged embedding."""
    x = ctx.features
    dom, n_ctx = split_units(cfg, x.shape[1])
    dom_idx = ops.select_topk(ctx.received, dom)
    t_idx, _, contextual = merge_contextual(x, ctx.keys, dom_idx, n_ctx)
    index = torch.cat([dom_idx, t_idx], dim=1)
    hidden = torch.cat([take_rows(x, dom_idx), contextual], dim=1)
    order = index.argsort(dim=1)
    return LLMSelection(index.gather(1, order), take_rows(hidden, order))


@register_method("visionzip", "vision", VisionZipConfig, no_cls=True)
def visionzip(ctx, cfg: VisionZipConfig):
    if isinstance(ctx, VisionUnitsContext):
        return visionzip_units(ctx, cfg)
    return VisionReduction(visionzip_select(ctx, cfg).features, None)
