"""Slow, obviously correct references of the pre-projector methods (TRIM, PruMerge, PruMerge+,
VisionZip): one image at a time, Python loops and lists, the published algorithms written out.

They read what the published code reads: the q_proj / k_proj outputs captured by forward hooks
during the vision tower's own forward (PruMerge's hooks; VisionZip's stored keys), numpy
percentiles for the IQR fence, the CLIP text model run on each prompt alone. Arithmetic in fp32;
outputs rounded once to the features' dtype. Ties go to the lower token index (sorting by
(-score, index)).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def rank_order(values, k):
    """Indices of the k largest values, best first, ties to the lower index."""
    values = [float(v) for v in values]
    return sorted(range(len(values)), key=lambda j: (-values[j], j))[:k]


# --------------------------------------------------------------------------- IQR

def iqr_counts(scores, pooled, whisker=1.5, cap=None):
    """Tokens kept per image by the published outlier rule (numpy percentiles, upper fence,
    strict >). Pooled: one fence over every score of the batch, floor(outliers / B) each."""
    rows = [np.asarray(s, dtype=np.float32) for s in scores]
    if pooled:
        flat = np.concatenate(rows)
        q1, q3 = np.percentile(flat, 25), np.percentile(flat, 75)
        outliers = int((flat > q3 + whisker * (q3 - q1)).sum())
        counts = [outliers // len(rows)] * len(rows)
    else:
        counts = []
        for r in rows:
            q1, q3 = np.percentile(r, 25), np.percentile(r, 75)
            counts.append(int((r > q3 + whisker * (q3 - q1)).sum()))
    if cap is not None:
        counts = [min(c, cap) for c in counts]
    return counts


# --------------------------------------------------------------------------- TRIM

def text_embed(scorer, ids_row, mask_row, image_token_id, vocab_size, max_len=77):
    """One prompt: its text tokens (no image tokens, no padding) truncated to 77, run alone
    through the CLIP text model; the pooled state is the last token's."""
    ids = [int(i) % vocab_size for i, m in zip(ids_row.tolist(), mask_row.tolist())
           if m and int(i) != image_token_id][:max_len] or [0]
    tm = scorer.text_model
    h = tm.text_model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
    return h.float() @ tm.text_projection.weight.float().t()


def trim_scores(feat, post_layernorm, visual_projection, t, sign):
    """One image: softmax(sign * (visual_projection(post_layernorm(f)) . t)) in fp32."""
    ln = post_layernorm
    p = F.layer_norm(feat.float(), ln.normalized_shape, ln.weight.float(), ln.bias.float(), ln.eps)
    p = p @ visual_projection.weight.float().t()
    return torch.softmax(sign * (p @ t.float()), dim=0)


def trim_image(feat, scores, count):
    """Kept tokens in spatial order, then the mean of the others (zeros if none):
    (tokens [count + 1, D] in feat's dtype, kept indices)."""
    kept = sorted(rank_order(scores, count))
    kept_set = set(kept)
    rest = [j for j in range(feat.shape[0]) if j not in kept_set]
    rows = [feat[j].float() for j in kept]
    if rest:
        mean = feat[rest].float().sum(dim=0) / len(rest)
    else:
        mean = torch.zeros(feat.shape[1])
    return torch.stack(rows + [mean]).to(feat.dtype), kept


# --------------------------------------------------------------------------- PruMerge

def prumerge_scores(q, k):
    """One image, q / k: the hooked q_proj / k_proj outputs [1 + N, Dv] of the last layer, as ONE
    head: softmax over the 1 + N keys of the CLS query, scale Dv^-0.5, CLS column dropped."""
    dv = q.shape[-1]
    logits = torch.stack([q[0].float() @ k[j].float() for j in range(k.shape[0])]) * dv ** -0.5
    return torch.softmax(logits, dim=0)[1:]


def plus_grid(count, n):
    """PruMerge+'s spatial tokens arange(0, N - 1, int(int(1 / r) / 3)), r = count / N,
    with the documented guards (r = 0: index 0 only; step 0 -> 1)."""
    if count == 0:
        return [0] if n > 1 else []
    r = count / n
    step = int(int(1 / r) / 3)
    return list(range(0, n - 1, max(step, 1)))


def prumerge_image(feat, k, scores, count, plus=False, neighbors=32):
    """One image: (tokens [kept + 1, D], kept indices in output order)."""
    n = feat.shape[0]
    kept = rank_order(scores, count)
    if plus:
        kept = kept + [j for j in plus_grid(count, n) if j not in set(kept)]
    kn = F.normalize(k[1:].float(), dim=-1)
    x = feat.float()
    rows = []
    for i in kept:
        sims = kn @ kn[i]
        sims[i] = float("-inf")                   # every other token is a candidate
        # Stable sort of -sim: best first, ties to the lower index.
        nbrs = torch.sort(-sims, stable=True).indices[:min(neighbors, n - 1)]
        rows.append(x[i] + (x[nbrs] * scores[nbrs, None]).sum(dim=0))
    kept_set = set(kept)
    pruned = [j for j in range(n) if j not in kept_set]
    extra = (x[pruned] * scores[pruned, None]).sum(dim=0) if pruned else torch.zeros(feat.shape[1])
    return torch.stack(rows + [extra]).to(feat.dtype), kept


# --------------------------------------------------------------------------- VisionZip

def visionzip_image(hidden, q, k, heads, dominant, contextual):
    """One image. hidden: the feature layer's states [1 + N, D] (CLS first); q / k: the hooked
    q_proj / k_proj outputs [1 + N, Dv] of the layer whose output is that feature layer.
    Returns (tokens [dominant + contextual', D], dominant patch indices, target indices,
    assignment {other index: target index})."""
    t, dv = q.shape
    n, hd = t - 1, dv // heads
    qh, kh = q.float().view(t, heads, hd), k.float().view(t, heads, hd)
    attn = sum(torch.softmax((kh[:, h] @ qh[0, h]) * hd ** -0.5, dim=0) for h in range(heads))[1:]
    dom = sorted(rank_order(attn, dominant - 1))
    x = hidden.float()
    rows = [x[0]] + [x[1 + j] for j in dom]
    dom_set = set(dom)
    rest = [j for j in range(n) if j not in dom_set]
    m = len(rest)
    c = min(contextual, m)
    if c == 0:
        return torch.stack(rows).to(hidden.dtype), dom, [], {}
    step = max(1, m // c)
    tpos = list(range(0, m, step))[:c]
    targets = [rest[p] for p in tpos]
    tpos_set = set(tpos)
    others = [rest[p] for p in range(m) if p not in tpos_set]
    metric = F.normalize(kh.mean(dim=1)[1:], dim=-1)
    groups = {tg: [] for tg in targets}
    assign = {}
    for o in others:
        sims = [float(metric[o] @ metric[tg]) for tg in targets]
        best = max(range(c), key=lambda a: (sims[a], -a))   # first maximum
        groups[targets[best]].append(o)
        assign[o] = targets[best]
    for tg in targets:
        members = groups[tg]
        mean = sum(x[1 + o] for o in members) / len(members) if members else torch.zeros(x.shape[1])
        rows.append(x[1 + tg] + mean)
    return torch.stack(rows).to(hidden.dtype), dom, targets, assign


def visionzip_split(total):
    """The documented keep rule: contextual = round-half-up(total * 10 / 64)."""
    c = int(np.floor(total * 10 / 64 + 0.5))
    return total - c, c
