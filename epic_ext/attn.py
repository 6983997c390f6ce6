"""TEMPORARY pure-PyTorch stand-in for `attn_scores` (DESIGN 2.5), written only so that the
in-LLM methods (FastV) can run and be tested. The real op (one pass over K, no L x L matrix,
backends) replaces this file with the same signature. It materialises [B, H, Q, L] logits.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor


def _per_row(x, b: int, device, name: str) -> Tensor:
    if isinstance(x, Tensor):
        if x.shape != (b,):
            raise ValueError(f"{name} must be an int or an int64 [B] tensor, got shape {tuple(x.shape)}")
        return x.to(device=device, dtype=torch.int64)
    if isinstance(x, numbers.Integral) and not isinstance(x, bool):
        return torch.full((b,), int(x), dtype=torch.int64, device=device)
    raise TypeError(f"{name} must be an int or an int64 [B] tensor, got {type(x).__name__}")


def attn_scores(q: Tensor, k: Tensor, key_start, key_len: int, lse: Optional[Tensor] = None,
                scale: Optional[float] = None, *, reduce: str = "mean", causal: bool = True,
                kv_start=None, q_pos: Optional[Tensor] = None, check: bool = True) -> Tensor:
    """Softmax attention probabilities of the query rows q [B, H, Q, d] over the keys
    k [B, Hkv, L, d] (GQA: query head h reads key head h // (H / Hkv)), restricted to the span
    [key_start, key_start + key_len) and reduced ("mean" / "sum") over the H * Q rows: [B, key_len]
    fp32. Keys j < kv_start are excluded (left padding); with causal, query row i sees keys
    j <= q_pos[b, i] (q_pos None: the queries are the last Q positions)."""
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    B, H, Q, d = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    if check and H % Hkv:
        raise ValueError(f"q heads ({H}) must be a multiple of k heads ({Hkv})")
    dev = q.device
    scale = d ** -0.5 if scale is None else float(scale)
    kf = k.float().repeat_interleave(H // Hkv, dim=1)                     # [B, H, L, d]
    logits = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale        # [B, H, Q, L]
    j = torch.arange(L, device=dev)
    visible = torch.ones(B, Q, L, dtype=torch.bool, device=dev)
    if kv_start is not None:
        visible &= (j >= _per_row(kv_start, B, dev, "kv_start")[:, None, None])
    if causal:
        pos = (torch.arange(L - Q, L, device=dev).expand(B, Q) if q_pos is None
               else q_pos.to(device=dev, dtype=torch.int64))
        visible &= j <= pos[:, :, None]
    if lse is not None:
        probs = torch.exp(logits - lse.float().reshape(B, H, Q, 1))
        probs = probs.masked_fill(~visible[:, None], 0.0)
    else:
        probs = torch.softmax(logits.masked_fill(~visible[:, None], float("-inf")), dim=-1)
    span = _per_row(key_start, B, dev, "key_start")[:, None] + torch.arange(key_len, device=dev)
    probs = probs.gather(-1, span[:, None, None, :].expand(B, H, Q, key_len))
    out = probs.sum(dim=(1, 2))
    return out / (H * Q) if reduce == "mean" else out
