"""Triton kernels of attn_scores: softmax probabilities of a few query rows over a key span,
summed or averaged over heads and rows, K read once, no [B, H, Q, L] score matrix.

Same contract as epic_ext._C.cpu.attn_scores (csrc/include/epic/ops.h) and
epic_ext.reference.attn_scores_fwd. Two launches, no atomics (deterministic):

  scan     grid (B * Hkv units, C = cdiv(L, BLOCK_K) key chunks). A unit is (sample, kv head)
           with its R = (H / Hkv) * Q query rows, taken BLOCK_R = 16 at a time: scores of a row
           tile against the chunk's keys are one tl.dot ([16, BLOCK_D] x [BLOCK_D, BLOCK_K],
           fp32 accumulation; fp32 inputs in IEEE precision, not TF32), so each key row is read
           once for all the heads that share it (GQA). Keys no row sees (left padding before
           kv_start, keys after the last query position) are never loaded.
             without lse: per row, the chunk's max and sum of exp over the visible keys go to
               stats [B * Hkv, C, R, 2], and the raw span scores to span [B, H * Q, key_len];
             with lse (one pass): p = exp(s - lse) summed over the unit's rows goes straight to
               partial [B * Hkv, key_len] (each span key belongs to exactly one chunk).
  combine  grid (B, cdiv(key_len, BLOCK_T)): out[b, t] = the kv heads' partials in order (lse
           given), or, row by row in (h, i) order, lse from the chunks' (max, sum) merged in
           chunk order and exp(span score - lse) over the row's visible keys; / (H * Q) for mean;
           NaN where key_start[b] + t is outside [0, L).
The large dimension (units, samples) is grid dimension 0 (up to 2^31 - 1 programs; dimensions 1
and 2 stop at 65535: B = 4096 [CLS] rows x 16 heads would not launch there), as in
csrc/cuda/attn_scores.cu; BLOCK_K and BLOCK_T grow until dimension 1 fits (see _launch_plan).
Index values are clamped before use (kv_start to [0, L], query positions to [-1, L - 1], span
starts to [-key_len, L]), so unchecked values never make an out-of-bounds access.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .select import on_tensor_device

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
REDUCE_SUM, REDUCE_MEAN = 1, 2
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK_R = 16  # rows per tl.dot tile (its smallest M)
MAX_GRID_DIM1 = 65535  # CUDA's limit on grid dimensions 1 and 2 (dimension 0: 2^31 - 1)


def _next_pow2(n: int) -> int:
    return max(1, triton.next_power_of_2(n))


def _configs():
    if INTERPRET:  # one config: nothing is benchmarked under the interpreter
        return [triton.Config({}, num_warps=1)]
    return [triton.Config({}, num_warps=w) for w in (2, 4, 8)]


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _clamped(ptr, idx, value, HAS: tl.constexpr, lo, hi):
    """ptr[idx] when the tensor is given, else value; clamped to [lo, hi]."""
    if HAS:
        v = tl.load(ptr + idx)
    else:
        v = value + tl.zeros([], tl.int64)
    return tl.minimum(tl.maximum(v.to(tl.int64), lo), hi)


@triton.jit
def _row_hi(qpos_ptr, b, i, Q, L, CAUSAL: tl.constexpr, HAS_QPOS: tl.constexpr):
    """Last visible key of query rows i of sample b, in [-1, L - 1]."""
    if CAUSAL:
        if HAS_QPOS:
            pos = tl.load(qpos_ptr + b * Q + i).to(tl.int64)
        else:
            pos = (L - Q + i).to(tl.int64)
        hi = tl.maximum(tl.minimum(pos, L - 1), -1)
    else:
        hi = (i * 0 + L - 1).to(tl.int64)
    return hi


# R = (H / Hkv) * Q changes with the query count: tuned per power-of-two bucket (R_KEY).
@triton.autotune(configs=_configs(), key=["d", "R_KEY", "HAS_LSE", "BLOCK_K"])
@triton.jit(do_not_specialize=["B", "L", "key_len"])
def _attn_scan_kernel(q_ptr, k_ptr, lse_ptr, ks_ptr, kv_ptr, qpos_ptr, stats_ptr, span_ptr,
                      part_ptr, B, H, Q, d, Hkv, L, G, R, key_len, C, ks_int, kv_int, scale,
                      sq0, sq1, sq2, sq3, sk0, sk1, sk2, R_KEY,
                      HAS_LSE: tl.constexpr, CAUSAL: tl.constexpr, HAS_KS: tl.constexpr,
                      HAS_KV: tl.constexpr, HAS_QPOS: tl.constexpr, PREC: tl.constexpr,
                      UPCAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    u = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    b = u // Hkv
    kvh = u % Hkv
    j = c.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    lo = _clamped(kv_ptr, b, kv_int, HAS_KV, 0, L)
    ks = _clamped(ks_ptr, b, ks_int, HAS_KS, -key_len, L)
    t = j - ks
    in_span = (t >= 0) & (t < key_len) & (j < L)
    k_base = k_ptr + b * sk0 + kvh * sk1
    dd = tl.arange(0, BLOCK_D)
    p_acc = tl.zeros([BLOCK_K], tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        rmask = r < R
        i = r % Q
        h = kvh * G + r // Q
        hi = _row_hi(qpos_ptr, b, i, Q, L, CAUSAL, HAS_QPOS)
        hi = tl.where(rmask, hi, -1)
        hi_max = tl.max(hi, axis=0)
        kload = (j >= lo) & (j <= hi_max)  # keys some row of the tile sees
        q_rows = q_ptr + b * sq0 + h * sq1 + i * sq2
        acc = tl.zeros([BLOCK_R, BLOCK_K], tl.float32)
        for d0 in range(0, d, BLOCK_D):
            e = d0 + dd
            em = e < d
            qt = tl.load(q_rows[:, None] + e[None, :] * sq3, mask=rmask[:, None] & em[None, :],
                         other=0.0)
            kt = tl.load(k_base + j[:, None] * sk2 + e[None, :], mask=kload[:, None] & em[None, :],
                         other=0.0)
            if UPCAST:  # the interpreter's bf16 dot is wrong; bf16 -> fp32 is exact
                qt = qt.to(tl.float32)
                kt = kt.to(tl.float32)
            acc = tl.dot(qt, tl.trans(kt), acc, input_precision=PREC)
        s = acc * scale
        vis = (j[None, :] >= lo) & (j[None, :] <= hi[:, None])
        if HAS_LSE:
            lse = tl.load(lse_ptr + (b * H + h) * Q + i, mask=rmask, other=0.0)
            p = tl.where(vis, tl.exp(s - lse[:, None]), 0.0)
            p_acc += tl.sum(p, axis=0)
        else:
            m = tl.max(tl.where(vis, s, float("-inf")), axis=1)
            m_safe = tl.where(m == float("-inf"), 0.0, m)
            z = tl.sum(tl.where(vis, tl.exp(s - m_safe[:, None]), 0.0), axis=1)
            st = stats_ptr + ((u * C + c) * R + r) * 2
            tl.store(st, m, mask=rmask)
            tl.store(st + 1, z, mask=rmask)
            row = (u * R + r) * key_len  # = (b * H * Q + h * Q + i) * key_len
            tl.store(span_ptr + row[:, None] + t[None, :], s,
                     mask=rmask[:, None] & in_span[None, :])
    if HAS_LSE:
        tl.store(part_ptr + u * key_len + t, p_acc, mask=in_span)


@triton.jit(do_not_specialize=["B", "L", "key_len"])
def _attn_combine_kernel(stats_ptr, span_ptr, part_ptr, ks_ptr, kv_ptr, qpos_ptr, out_ptr, B, H, Q,
                         Hkv, L, G, R, key_len, C, ks_int, kv_int, inv,
                         HAS_LSE: tl.constexpr, CAUSAL: tl.constexpr, HAS_KS: tl.constexpr,
                         HAS_KV: tl.constexpr, HAS_QPOS: tl.constexpr, MEAN: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < key_len
    ks = _clamped(ks_ptr, b, ks_int, HAS_KS, -key_len, L)
    j = ks + t
    inside = tm & (j >= 0) & (j < L)
    acc = tl.zeros([BLOCK_T], tl.float32)
    if HAS_LSE:
        for kvh in range(0, Hkv):
            acc += tl.load(part_ptr + (b * Hkv + kvh) * key_len + t, mask=inside, other=0.0)
    else:
        lo = _clamped(kv_ptr, b, kv_int, HAS_KV, 0, L)
        cc = tl.arange(0, BLOCK_C)
        cm = cc < C
        for row in range(0, H * Q):  # (h, i) order
            i = row % Q
            kvh = (row // Q) // G
            u = b * Hkv + kvh
            r = row - kvh * R
            st = stats_ptr + ((u * C + cc) * R + r) * 2
            ms = tl.load(st, mask=cm, other=float("-inf"))
            zs = tl.load(st + 1, mask=cm, other=0.0)
            M = tl.max(ms, axis=0)
            M_safe = tl.where(M == float("-inf"), 0.0, M)
            Z = tl.sum(tl.where(ms > float("-inf"), zs * tl.exp(ms - M_safe), 0.0), axis=0)
            lse = M + tl.log(Z)
            hi = _row_hi(qpos_ptr, b, i, Q, L, CAUSAL, HAS_QPOS)
            vis = inside & (j >= lo) & (j <= hi)
            s = tl.load(span_ptr + (b * H * Q + row) * key_len + t, mask=vis, other=0.0)
            acc += tl.where(vis, tl.exp(s - lse), 0.0)
    if MEAN:
        acc = acc * inv
    tl.store(out_ptr + b * key_len + t, tl.where(inside, acc, float("nan")), mask=tm)


# ---------------------------------------------------------------------------------------------
# Host entry point
# ---------------------------------------------------------------------------------------------

def _check_index(t, name, B, Q, per_row, device):
    if t is None:
        return
    if t.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {t.dtype}")
    want = (B, Q) if per_row else (B,)
    if tuple(t.shape) != want:
        raise ValueError(f"{name} must be [{'B, Q' if per_row else 'B'}] = {list(want)}, got "
                         f"{list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")


def _check_inputs(q, k, lse, key_start, key_start_int, key_len, kv_start, q_pos, scale,
                  reduction):
    """The checks of epic::check_attn_inputs (same exception types and words)."""
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D [B, H, Q, d], got shape {tuple(q.shape)}")
    if k.dim() != 4:
        raise ValueError(f"k must be 4-D [B, Hkv, L, d], got shape {tuple(k.shape)}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"q must be float32/float16/bfloat16, got {q.dtype}")
    if k.dtype != q.dtype:
        raise TypeError(f"k must have q's dtype {q.dtype}, got {k.dtype}")
    if k.device != q.device:
        raise ValueError(f"k must be on {q.device}, got {k.device}")
    B, H, Q, d = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    if H < 1 or Q < 1 or d < 1:
        raise ValueError(f"q must have H, Q, d >= 1, got {tuple(q.shape)}")
    if k.shape[0] != B or k.shape[3] != d:
        raise ValueError(f"k must be [B, Hkv, L, d] with B = {B} and d = {d}, got {tuple(k.shape)}")
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"k's head count Hkv = {Hkv} must divide q's H = {H}")
    if not 1 <= key_len <= L:
        raise ValueError(f"key_len must be in [1, L] = [1, {L}], got {key_len}")
    if key_start is None and not 0 <= key_start_int <= L - key_len:
        raise ValueError(f"key_start must be in [0, L - key_len] = [0, {L - key_len}], got "
                         f"{key_start_int}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if reduction not in (REDUCE_SUM, REDUCE_MEAN):
        raise ValueError(f"reduction code must be 1 (sum) or 2 (mean), got {reduction}")
    if lse is not None:
        if lse.dtype != torch.float32:
            raise TypeError(f"lse must be float32, got {lse.dtype}")
        if tuple(lse.shape) != (B, H, Q):
            raise ValueError(f"lse must be [B, H, Q] = [{B}, {H}, {Q}], got {tuple(lse.shape)}")
        if lse.device != q.device:
            raise ValueError(f"lse must be on {q.device}, got {lse.device}")
    _check_index(key_start, "key_start", B, Q, False, q.device)
    _check_index(kv_start, "kv_start", B, Q, False, q.device)
    _check_index(q_pos, "q_pos", B, Q, True, q.device)


def _launch_plan(B: int, Hkv: int, L: int, key_len: int) -> dict:
    """Block sizes and grids of the two launches: units / samples in grid dimension 0, key
    chunks / output tiles in dimension 1 (<= MAX_GRID_DIM1)."""
    units = B * Hkv
    if INTERPRET:
        block_k = min(256, max(16, _next_pow2(L)))
    else:  # enough programs to fill the GPU when B * Hkv is small
        block_k = 64 if triton.cdiv(L, 64) * units >= 512 else 32 if L >= 32 else 16
    while triton.cdiv(L, block_k) > MAX_GRID_DIM1:
        block_k *= 2
    block_t = min(256 if INTERPRET else 512, max(16, _next_pow2(key_len)))
    while triton.cdiv(key_len, block_t) > MAX_GRID_DIM1:
        block_t *= 2
    C = triton.cdiv(L, block_k)
    return dict(block_k=block_k, block_t=block_t, C=C, scan_grid=(units, C),
                combine_grid=(B, triton.cdiv(key_len, block_t)))


@on_tensor_device
def attn_scores(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor | None,
                key_start: torch.Tensor | None, key_start_int: int, key_len: int,
                kv_start: torch.Tensor | None, kv_start_int: int, q_pos: torch.Tensor | None,
                scale: float, causal: bool, reduction: int) -> torch.Tensor:
    """out [B, key_len] fp32; see the module docstring and csrc/include/epic/ops.h."""
    key_len, scale, reduction = int(key_len), float(scale), int(reduction)
    _check_inputs(q, k, lse, key_start, key_start_int, key_len, kv_start, q_pos, scale, reduction)
    B, H, Q, d = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    dev = q.device
    out = torch.empty((B, key_len), dtype=torch.float32, device=dev)
    if B == 0:
        return out
    if k.stride(3) != 1 and d > 1:
        k = k.contiguous()
    lse = lse.contiguous() if lse is not None else None
    key_start = key_start.contiguous() if key_start is not None else None
    kv_start = kv_start.contiguous() if kv_start is not None else None
    q_pos = q_pos.contiguous() if q_pos is not None else None
    G = H // Hkv
    R = G * Q
    units = B * Hkv
    plan = _launch_plan(B, Hkv, L, key_len)
    block_k, block_t, C = plan["block_k"], plan["block_t"], plan["C"]
    block_d = min(128, max(16, _next_pow2(d)))
    has_lse = lse is not None
    f32 = torch.float32
    upcast = INTERPRET and q.dtype == torch.bfloat16
    if has_lse:
        part = torch.empty((units, key_len), dtype=f32, device=dev)
        stats = span = part  # unused
    else:
        stats = torch.empty((units, C, R, 2), dtype=f32, device=dev)
        span = torch.empty((B, H * Q, key_len), dtype=f32, device=dev)
        part = stats  # unused
    dummy = out
    flags = dict(CAUSAL=bool(causal), HAS_KS=key_start is not None, HAS_KV=kv_start is not None,
                 HAS_QPOS=q_pos is not None)
    _attn_scan_kernel[plan["scan_grid"]](
        q, k, lse if has_lse else dummy, key_start if key_start is not None else dummy,
        kv_start if kv_start is not None else dummy, q_pos if q_pos is not None else dummy,
        stats, span, part, B, H, Q, d, Hkv, L, G, R, key_len, C, int(key_start_int),
        int(kv_start_int), scale, *q.stride(), k.stride(0), k.stride(1), k.stride(2),
        _next_pow2(R), HAS_LSE=has_lse, PREC="ieee" if q.dtype == f32 or upcast else None,
        UPCAST=upcast, BLOCK_R=BLOCK_R, BLOCK_K=block_k, BLOCK_D=block_d, **flags)
    _attn_combine_kernel[plan["combine_grid"]](
        stats, span, part, key_start if key_start is not None else dummy,
        kv_start if kv_start is not None else dummy, q_pos if q_pos is not None else dummy, out,
        B, H, Q, Hkv, L, G, R, key_len, C, int(key_start_int), int(kv_start_int), 1.0 / (H * Q),
        HAS_LSE=has_lse, MEAN=reduction == REDUCE_MEAN, BLOCK_T=block_t,
        BLOCK_C=max(2, _next_pow2(C)), num_warps=1 if INTERPRET else 4, **flags)
    return out
