"""Slow, obviously correct references of the in-LLM reduction methods: one row at a time, Python
loops, the published algorithms written out (FastV from an explicit eager attention matrix, DART's
greedy loop over Python lists) plus this package's exact-budget rule. Ties go to the lower
position everywhere (sorting by (key, position)).

Each function returns, per row, the sorted list of kept positions inside the image span.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def topk_positions(values, k):
    """Positions of the k largest values (ties: lower position first), in rank order."""
    return sorted(range(len(values)), key=lambda j: (-values[j], j))[:k]


# --------------------------------------------------------------------------- FastV

def eager_attention_probs(q_all, k_all, attention_mask, scale):
    """One row: the full [H, L, L] attention matrix of an eager causal layer with HF's padding
    mask (masked logits set to the dtype minimum, softmax in fp32). GQA: head h reads key head
    h // (H // Hkv)."""
    H, L, _ = q_all.shape
    k = k_all.float().repeat_interleave(H // k_all.shape[0], dim=0)
    logits = (q_all.float() @ k.transpose(-1, -2)) * scale
    i = torch.arange(L)[:, None]
    j = torch.arange(L)[None, :]
    allowed = (j <= i) & attention_mask.bool()[None, :]
    logits = logits.masked_fill(~allowed, torch.finfo(torch.float32).min)
    return torch.softmax(logits, dim=-1)


def fastv_ref(q_all, keys, attention_mask, image_start, n, query_index, scale, keep):
    """q_all [B, H, L, d]: every token's post-RoPE query of layer K-1; keys [B, Hkv, L, d]."""
    out = []
    for b in range(q_all.shape[0]):
        probs = eager_attention_probs(q_all[b], keys[b], attention_mask[b], scale)   # [H, L, L]
        row = probs.mean(dim=0)[int(query_index[b])]             # the last prompt token's row
        s = int(image_start[b])
        image_scores = row[s:s + n].tolist()
        out.append(sorted(topk_positions(image_scores, keep)))
    return out


# --------------------------------------------------------------------------- DART

def dart_ref(hidden, keys, attention_mask, image_start, n, query_index, final_norm, budget,
             pivot_image=4, pivot_text=4):
    out = []
    for b in range(hidden.shape[0]):
        L = hidden.shape[1]
        s = int(image_start[b])
        e = s + n
        # Keys with the heads concatenated, L1 norm per token.
        kc = keys[b].float().permute(1, 0, 2).reshape(L, -1)
        norms = [float(kc[j].abs().sum()) for j in range(L)]
        if budget == 0:
            out.append([])
            continue
        img_piv = [s + j for j in topk_positions(norms[s:e], min(pivot_image, budget))]
        if budget <= pivot_image:
            out.append(sorted(p - s for p in img_piv))
            continue
        # Text candidates: real tokens after the image up to the last prompt token.
        cand = [j for j in range(e, int(query_index[b]) + 1) if bool(attention_mask[b, j])]
        txt_piv = [cand[i] for i in topk_positions([norms[j] for j in cand], pivot_text)]
        pivots = sorted(img_piv) + sorted(txt_piv)
        # Exact budget: the picks split as evenly as possible, first pivots take the remainder.
        picks = budget - len(img_piv)
        base, extra = divmod(picks, len(pivots))
        quotas = [base + (i < extra) for i in range(len(pivots))]

        h = final_norm(hidden[b]).float()
        kept = set(img_piv)
        remaining = [j for j in range(s, e) if j not in kept]
        for pivot, quota in zip(pivots, quotas):
            sims = F.cosine_similarity(h[pivot][None, :], h[remaining], dim=-1).tolist()
            order = sorted(range(len(remaining)), key=lambda i: (sims[i], remaining[i]))  # least similar first
            take = [remaining[i] for i in order[:quota]]
            kept.update(take)
            taken = set(take)
            remaining = [j for j in remaining if j not in taken]
        out.append(sorted(j - s for j in kept))
    return out


# --------------------------------------------------------------------------- random

def random_ref(u, keep):
    """u [B, N] the uniform draws: each row keeps the positions of its keep smallest."""
    return [sorted(sorted(range(u.shape[1]), key=lambda j: (float(u[b, j]), j))[:keep])
            for b in range(u.shape[0])]


# --------------------------------------------------------------------------- pooling

def grid_ref(keep, gh, gw):
    """Brute force over every (h, w) that fits: h*w == keep, closest to square, then the aspect
    closest to the grid's, then the smaller h. None if no pair fits."""
    best = None
    for h in range(1, gh + 1):
        for w in range(1, gw + 1):
            if h * w == keep:
                key = (abs(h - w), abs(h * gw - w * gh), h)
                if best is None or key < best[0]:
                    best = (key, (h, w))
    return None if best is None else best[1]


def _adaptive_window(i, out, size):
    start = (i * size) // out
    end = -(-((i + 1) * size) // out)        # ceil
    return list(range(start, end))


def pooling_ref(image_hidden, grid, out_grid):
    """image_hidden [B, N, D] row-major on grid = (gh, gw); out_grid = (h, w). Returns (index
    lists, pooled [B, h*w, D]) with each window's fp32 mean cast back to the input dtype."""
    gh, gw = grid
    h, w = out_grid
    B, _, D = image_hidden.shape
    index, pooled = [], torch.empty(B, h * w, D, dtype=image_hidden.dtype)
    for b in range(B):
        row_index = []
        for i in range(h):
            for j in range(w):
                tokens = [r * gw + c for r in _adaptive_window(i, h, gh) for c in _adaptive_window(j, w, gw)]
                row_index.append(sum(tokens) // len(tokens))
                acc = torch.zeros(D, dtype=torch.float32)
                for t in tokens:
                    acc += image_hidden[b, t].float()
                pooled[b, i * w + j] = (acc / len(tokens)).to(image_hidden.dtype)
        index.append(row_index)
    return index, pooled
