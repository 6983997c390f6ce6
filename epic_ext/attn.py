"""Attention-score ranking without the L x L matrix (DESIGN.md 2.5).

`attn_scores(q, k, key_start, key_len)` gives the softmax attention probabilities of a few query
rows (FastV's last prompt token, PruMerge's / VisionZip's [CLS]) over a span of keys (the visual
tokens), summed or averaged over heads and query rows: [B, key_len] fp32. The kernels read K once
and never form a [B, H, Q, L] score matrix, so the ranking layer can run under SDPA / flash
attention: with the row log-sum-exp that flash attention returns (`lse`), one pass over K gives
p = exp(s - lse); without it, an online max / sum over the row's visible keys.

The op `epic_ext::attn_scores` is registered with torch.library (fake kernel), so
torch.compile(fullgraph=True) traces through it. It ranks tokens and is not differentiable: the
inputs are treated as detached (the output never requires grad), so it can sit inside a training
forward without a `.detach()` at every call site.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from . import _backend
from .ops import _run
from .reference import ATTN_REDUCTIONS

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- custom op

def _check_ranges(L: int, key_len: int, key_start: Optional[Tensor], kv_start: Optional[Tensor],
                  q_pos: Optional[Tensor]) -> None:
    """Values of the per-sample index tensors: one host read (a device sync on a GPU)."""
    named = [(name, t, lo, hi) for name, t, lo, hi in (
        ("key_start", key_start, 0, L - key_len), ("kv_start", kv_start, 0, L),
        ("q_pos", q_pos, 0, L - 1)) if t is not None and t.numel()]
    if not named:
        return
    bad = torch.stack([((t < lo) | (t > hi)).any() for _, t, lo, hi in named]).tolist()
    for (name, _, lo, hi), b in zip(named, bad):
        if b:
            what = "key_start must be in [0, L - key_len]" if name == "key_start" else \
                f"{name} must be in [{lo}, {'L' if name == 'kv_start' else 'L - 1'}]"
            raise ValueError(f"{what} = [{lo}, {hi}] for every sample (check=True); got values "
                             "outside it")


def _attn_impl(q: Tensor, k: Tensor, lse: Optional[Tensor], key_start: Optional[Tensor],
               key_start_int: int, key_len: int, kv_start: Optional[Tensor], kv_start_int: int,
               q_pos: Optional[Tensor], scale: float, causal: bool, reduction: int,
               check: bool) -> Tensor:
    if check:
        _check_ranges(k.shape[2], key_len, key_start, kv_start, q_pos)
    fn, _ = _backend.kernel("attn_scores", q.device)
    return fn(q, k, lse, key_start, key_start_int, key_len, kv_start, kv_start_int, q_pos, scale,
              causal, reduction)


@torch.library.custom_op("epic_ext::attn_scores", mutates_args=())
def _attn_scores(q: Tensor, k: Tensor, lse: Optional[Tensor], key_start: Optional[Tensor],
                 key_start_int: int, key_len: int, kv_start: Optional[Tensor], kv_start_int: int,
                 q_pos: Optional[Tensor], scale: float, causal: bool, reduction: int,
                 check: bool) -> Tensor:
    return _attn_impl(q, k, lse, key_start, key_start_int, key_len, kv_start, kv_start_int, q_pos,
                      scale, causal, reduction, check)


@_attn_scores.register_fake
def _(q, k, lse, key_start, key_start_int, key_len, kv_start, kv_start_int, q_pos, scale, causal,
      reduction, check):
    return q.new_empty((q.shape[0], key_len), dtype=torch.float32)


# --------------------------------------------------------------------------- validation

def _check_qk(q, k) -> None:
    for name, t, shape in (("q", q, "[B, H, Q, d]"), ("k", k, "[B, Hkv, L, d]")):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float32/float16/bfloat16, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D {shape}, got shape {tuple(t.shape)}")
    if k.dtype != q.dtype:
        raise TypeError(f"k must have q's dtype {q.dtype}, got {k.dtype}")
    if k.device != q.device:
        raise ValueError(f"k must be on {q.device} like q, got {k.device}")
    B, H, Q, d = q.shape
    if H < 1 or Q < 1 or d < 1:
        raise ValueError(f"q must have H, Q, d >= 1, got shape {tuple(q.shape)}")
    if k.shape[0] != B or k.shape[3] != d:
        raise ValueError(f"k must be [B, Hkv, L, d] with B = {B} and d = {d} (from q), got "
                         f"{tuple(k.shape)}")
    if k.shape[1] < 1 or H % k.shape[1]:
        raise ValueError(f"k's head count Hkv = {k.shape[1]} must divide q's H = {H} (GQA)")


def _index(value, name: str, B: int, device, lo: int, hi: int, hi_text: str):
    """An int start -> (None, int) after its range check; an int64 [B] tensor -> (tensor, 0)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or an int64 [B] tensor, got bool")
    if isinstance(value, numbers.Integral):
        if not lo <= value <= hi:
            raise ValueError(f"{name} must be in [0, {hi_text}] = [{lo}, {hi}], got {value}")
        return None, int(value)
    if isinstance(value, Tensor):
        if value.dtype != torch.int64:
            raise TypeError(f"{name} must be int64, got {value.dtype}")
        if tuple(value.shape) != (B,):
            raise ValueError(f"{name} must be [B] = [{B}], got {list(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} must be on {device} like q, got {value.device}")
        return value, 0
    raise TypeError(f"{name} must be an int or an int64 [B] tensor, got {type(value).__name__}")


# --------------------------------------------------------------------------- public API

def attn_scores(q: Tensor, k: Tensor, key_start, key_len: int, *, lse: Tensor | None = None,
                scale: float | None = None, reduce: str = "mean", causal: bool = True,
                kv_start=None, q_pos: Tensor | None = None, check: bool = True,
                backend: str | None = None) -> Tensor:
    """Softmax attention of a few query rows over a span of keys, reduced over heads and rows.

    q [B, H, Q, d] and k [B, Hkv, L, d] in float32/float16/bfloat16 (one dtype, one device);
    head h reads kv head h // (H // Hkv) (GQA). k may be any strided view (a KV cache slice, the
    transpose of [B, L, Hkv, d]); a strided last dimension is copied. Scores s = scale <q_i, k_j>
    in fp32, scale defaulting to d ** -0.5. Key j is visible to query row i of sample b when
    j >= kv_start[b] (None = 0, an int, or an int64 [B] tensor: left padding is not attended) and,
    if causal, j <= q_pos[b, i] (q_pos None: the queries are the last Q positions, L - Q + i;
    else an int64 [B, Q] tensor). causal=False sees every key from kv_start on (a [CLS] query).
    p_ij = exp(s_ij - lse_i) over visible keys, 0 for the others, with lse_i the row's
    log-sum-exp of its visible scores, or the given `lse` [B, H, Q] fp32 (flash attention's
    softmax_lse: K is then read in one pass with no online max / sum). A row with no visible key
    contributes 0.

    Returns out [B, key_len] fp32: out[b, t] = reduce over the H*Q rows (reduce="mean": FastV's
    head average; "sum": VisionZip's head sum) of p at key j = key_start[b] + t. key_start is an
    int or an int64 [B] tensor (per-sample spans: left padding, different prompt lengths);
    key_len an int in [1, L].

    check=True validates the values of tensor key_start / kv_start / q_pos on the host (a device
    sync on a GPU); check=False skips that (for model forwards, where syncs are not allowed): the
    kernels stay memory-safe whatever the values, and a span entry outside [0, L) comes out NaN.
    Not differentiable: the inputs are treated as detached and the output never requires grad.
    """
    _check_qk(q, k)
    B, H, Q, d = q.shape
    L = k.shape[2]
    if isinstance(key_len, bool) or not isinstance(key_len, numbers.Integral):
        raise TypeError(f"key_len must be an int, got {type(key_len).__name__}")
    if not 1 <= key_len <= L:
        raise ValueError(f"key_len must be in [1, L] = [1, {L}], got {key_len}")
    key_len = int(key_len)
    ks_t, ks_i = _index(key_start, "key_start", B, q.device, 0, L - key_len, "L - key_len")
    kv_t, kv_i = _index(0 if kv_start is None else kv_start, "kv_start", B, q.device, 0, L, "L")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(check, bool):
        raise TypeError(f"check must be a bool, got {type(check).__name__}")
    if q_pos is not None:
        if not isinstance(q_pos, Tensor):
            raise TypeError(f"q_pos must be an int64 [B, Q] tensor or None, got {type(q_pos).__name__}")
        if q_pos.dtype != torch.int64:
            raise TypeError(f"q_pos must be int64, got {q_pos.dtype}")
        if tuple(q_pos.shape) != (B, Q):
            raise ValueError(f"q_pos must be [B, Q] = [{B}, {Q}], got {list(q_pos.shape)}")
        if q_pos.device != q.device:
            raise ValueError(f"q_pos must be on {q.device} like q, got {q_pos.device}")
    elif causal and Q > L:
        raise ValueError(f"q has Q = {Q} query rows but k only L = {L} keys: with causal=True and "
                         "q_pos=None the queries are the last Q positions")
    if lse is not None:
        if not isinstance(lse, Tensor):
            raise TypeError(f"lse must be a float32 tensor or None, got {type(lse).__name__}")
        if lse.dtype != torch.float32:
            raise TypeError(f"lse must be float32, got {lse.dtype}")
        if tuple(lse.shape) != (B, H, Q):
            raise ValueError(f"lse must be [B, H, Q] = [{B}, {H}, {Q}], got {list(lse.shape)}")
        if lse.device != q.device:
            raise ValueError(f"lse must be on {q.device} like q, got {lse.device}")
        lse = lse.detach()
    if scale is None:
        scale = d ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    elif not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if reduce not in ATTN_REDUCTIONS:
        raise ValueError(f"reduce must be one of {sorted(ATTN_REDUCTIONS)}, got {reduce!r}")
    return _run(backend, _attn_scores, _attn_impl, q.detach(), k.detach(), lse, ks_t, ks_i,
                key_len, kv_t, kv_i, q_pos, float(scale), causal, ATTN_REDUCTIONS[reduce], check)
