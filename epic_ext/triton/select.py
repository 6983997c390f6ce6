"""Triton kernels of the selection family: top-k in spatial order and IQR outlier selection.

Same contracts as csrc/include/epic/ops.h and epic_ext/reference.py, bit for bit.

Ordering keys. Scores are read in their own dtype and rounded to fp32 (as `scores.float()` does).
The fp32 pattern is mapped to an int32 key whose *signed* order is the ranking order: it is
epic::float_key(x) - 2^31 (the unsigned key with its top bit flipped). NaN -> INT32_MIN (below
-inf), -0.0 -> +0.0, negatives -> bits ^ 0x7FFFFFFF. Keeping keys in int32 avoids 64-bit compares
on the GPU.

Row selection (one program per row, the row in registers, N <= 8192): the k-th largest key T is
found bit by bit, MSB first (32 masked counts over the row); rows with key > T are kept and ties
with T go to the lowest indices through a cumulative sum; the output slot is cumsum(kept) - 1, so
indices come out ascending. No sort, no host sync.

IQR: the two needed order statistics are found by the same bitwise search (both searches share
each pass: two 16-bit counts packed in one int32 sum). The interpolation neighbour at ceil(rank) is
min{key > lo} unless lo repeats. Quantile arithmetic is fp32, one rounding per operation
(launched with enable_fp_fusion=False so no FMA changes the fence). Pooled IQR: a radix select
with 8-bit digits over the B*N scores (4 histogram passes, both quartiles at once), one pass for
the interpolation neighbours, one for the outlier count; six launches of a grid of programs, each
over a contiguous span of scores, combined through int32 atomics in a small device scratch
(integer sums, mins: the same result in any order). Every program recomputes the quartiles'
prefixes from the histograms so far (a few 256-wide scans). The per-row kernel then reads the
outlier count and keeps floor(count / B) per image.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_N = 8192  # a row lives in one program's registers up to this size
_POOL_CHUNK = 1024 if INTERPRET else 2048  # scores per step of a pooled-IQR program
_POOL_PROGRAMS = 528  # at most this many programs per pooled pass (4 per SM on a 132-SM H100)


def next_pow2(n: int) -> int:
    return max(1, triton.next_power_of_2(n))


def on_tensor_device(entry):
    """Decorator of the host entries: launch on the device of the first tensor argument, not on
    the current CUDA device (Triton launches on the current one). No-op for CPU tensors."""
    @functools.wraps(entry)
    def guarded(*args, **kwargs):
        first = args[0] if args else None  # every entry's first argument is a tensor
        if not isinstance(first, torch.Tensor):
            first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)),
                         None)
        if first is None or not first.is_cuda:
            return entry(*args, **kwargs)
        with torch.cuda.device(first.device):
            return entry(*args, **kwargs)
    guarded.device_guarded = True  # tests check that every entry has the guard
    return guarded


def _row_configs():
    if INTERPRET:
        return [triton.Config({}, num_warps=1)]
    return [triton.Config({}, num_warps=w) for w in (2, 4, 8, 16)]


def _prune_row_configs(configs, nargs, **kwargs):
    """Between 1 and 64 keys per thread."""
    block = kwargs["BLOCK_N"]
    keep = [c for c in configs if c.num_warps * 32 <= max(block, 64) <= c.num_warps * 2048]
    return keep or configs[:1]


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------

@triton.jit
def score_keys(x):
    """fp32 scores -> int32 keys, signed order == ranking order (float_key - 2^31)."""
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 ties with +0.0
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return tl.where(x != x, -2147483648, key)  # NaN below every number


@triton.jit
def key_to_float(key):
    """Inverse of score_keys for every non-NaN key."""
    bits = tl.where(key >= 0, key, key ^ 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def kth_largest(key, valid, r):
    """Largest t with #{valid & key >= t} >= r: the r-th largest valid key for 1 <= r <= #valid
    (INT32_MAX for r <= 0). Built MSB first in the offset-binary domain: the sign bit first, then
    bits 30..0 added to the running prefix."""
    cnt = tl.sum((valid & (key >= 0)).to(tl.int32), axis=0)
    res = tl.where(cnt >= r, 0, -2147483648)
    for i in range(31):
        cand = res + (1 << (30 - i))
        cnt = tl.sum((valid & (key >= cand)).to(tl.int32), axis=0)
        res = tl.where(cnt >= r, cand, res)
    return res


@triton.jit
def kth_largest2(key, valid, r1, r2):
    """kth_largest for two ranks in one set of passes: the two counts share one int32 sum
    (16 bits each; rows hold at most 8192 keys)."""
    cnt = tl.sum((valid & (key >= 0)).to(tl.int32), axis=0)
    res1 = tl.where(cnt >= r1, 0, -2147483648)
    res2 = tl.where(cnt >= r2, 0, -2147483648)
    for i in range(31):
        step = 1 << (30 - i)
        c1 = res1 + step
        c2 = res2 + step
        packed = (valid & (key >= c1)).to(tl.int32) + ((valid & (key >= c2)).to(tl.int32) << 16)
        cnt = tl.sum(packed, axis=0)
        res1 = tl.where((cnt & 0xFFFF) >= r1, c1, res1)
        res2 = tl.where((cnt >> 16) >= r2, c2, res2)
    return res1, res2


@triton.jit
def top_threshold(key, valid, count):
    """(T, need): keep key > T, plus the first `need` keys equal to T (lowest indices)."""
    t = kth_largest(key, valid, count)
    need = count - tl.sum((valid & (key > t)).to(tl.int32), axis=0)
    return t, need


@triton.jit
def _next_key(key, valid, lo, r):
    """Key of the (r)-th largest when `lo` is the (r+1)-th: lo again if it repeats, else the
    smallest key above lo."""
    above = valid & (key > lo)
    c = tl.sum(above.to(tl.int32), axis=0)
    m = tl.min(tl.where(above, key, 2147483647), axis=0)
    return tl.where(c >= r, m, lo)


@triton.jit
def _quantile_rank(q, n):
    """torch.quantile's rank = q * (n - 1) in fp32 -> (floor, weight)."""
    rank = q * tl.maximum(n - 1, 0).to(tl.float32)
    below = rank.to(tl.int32)
    return below, rank - below.to(tl.float32)


@triton.jit
def _lerp(lo, hi, w):
    """ATen's scalar lerp (each operation rounded on its own)."""
    diff = hi - lo
    return tl.where(w < 0.5, lo + w * diff, hi - diff * (1.0 - w))


@triton.jit
def _fence(lo1, hi1, w1, lo3, hi3, w3, whisker):
    q1 = _lerp(key_to_float(lo1), key_to_float(tl.where(w1 > 0.0, hi1, lo1)), w1)
    q3 = _lerp(key_to_float(lo3), key_to_float(tl.where(w3 > 0.0, hi3, lo3)), w3)
    return q3 + whisker * (q3 - q1)


@triton.jit
def _row_outliers(x, key, valid, whisker):
    """#{x > Q3 + whisker (Q3 - Q1)} of one row in registers (0 when the row has no number)."""
    n = tl.sum((valid & (key != -2147483648)).to(tl.int32), axis=0)  # non-NaN count
    b1, w1 = _quantile_rank(0.25, n)
    b3, w3 = _quantile_rank(0.75, n)
    # j-th smallest number (0-based) == (n - j)-th largest key: NaN keys sit below all of them.
    lo1, lo3 = kth_largest2(key, valid, n - b1, n - b3)
    hi1 = _next_key(key, valid, lo1, n - b1 - 1)
    hi3 = _next_key(key, valid, lo3, n - b3 - 1)
    fence = _fence(lo1, hi1, w1, lo3, hi3, w3, whisker)
    count = tl.sum((valid & (x > fence)).to(tl.int32), axis=0)
    return tl.where(n > 0, count, 0)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

@triton.autotune(configs=_row_configs(), key=["BLOCK_N", "MODE"],
                 prune_configs_by={"early_config_prune": _prune_row_configs})
@triton.jit
def _select_rows_kernel(s_ptr, counts_ptr, out_ptr, slot_ptr, pool_ptr, N, k, cap, whisker, s_sb,
                        s_sn, out_sb, MODE: tl.constexpr, WRITE_SLOT: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    """One program per row. MODE 0: keep k (out [B, k]); 1: keep the row's IQR outlier count
    (written to counts, out [B, N] padded with -1); 2: pooled, keep floor(outliers / B) with the
    outliers counted by _pooled_pass_kernel at pool_ptr (written to counts, padded likewise).
    WRITE_SLOT: also slot[b, n] = output position of row n, -1 if not kept (the fused compress
    streams the tokens with it)."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    valid = offs < N
    x = tl.load(s_ptr + b * s_sb + offs * s_sn, mask=valid, other=0.0).to(tl.float32)
    key = score_keys(x)
    if MODE == 0:
        count = k
    elif MODE == 1:
        count = tl.minimum(_row_outliers(x, key, valid, whisker), cap)
        tl.store(counts_ptr + b, count.to(tl.int64))
    else:
        count = tl.minimum(tl.load(pool_ptr) // tl.num_programs(0), cap)
        tl.store(counts_ptr + b, count.to(tl.int64))
    t, need = top_threshold(key, valid, count)
    tie = valid & (key == t)
    sel = (valid & (key > t)) | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= need))
    pos = tl.cumsum(sel.to(tl.int32), axis=0) - 1
    out_row = out_ptr + b * out_sb
    tl.store(out_row + pos, offs.to(tl.int64), mask=sel)
    if WRITE_SLOT:
        tl.store(slot_ptr + b * N + offs, tl.where(sel, pos, -1), mask=valid)
    if MODE != 0:
        tl.store(out_row + offs, tl.full([BLOCK_N], -1, tl.int64), mask=valid & (offs >= count))


@triton.jit
def _digit(hist, t):
    """Radix step: the digit holding the t-th smallest (0-based) element, and t within it."""
    incl = tl.cumsum(hist, axis=0)
    d = tl.sum((incl <= t).to(tl.int32), axis=0)
    below = tl.sum(tl.where(tl.arange(0, 256) < d, hist, 0), axis=0)
    return d, t - below


@triton.jit
def _pooled_load(s_ptr, i, m, N, s_sb, s_sn, CONTIG: tl.constexpr):
    if CONTIG:
        off = i.to(tl.int64)
    else:
        row = i // N
        off = row.to(tl.int64) * s_sb + (i - row * N).to(tl.int64) * s_sn
    x = tl.load(s_ptr + off, mask=m, other=0.0).to(tl.float32)
    return x, score_keys(x)


# Pooled IQR scratch (int32): the digit histograms of the radix passes, then the counters that
# the programs of one pass combine with integer atomics (order-independent: deterministic).
# (tl.constexpr: the only globals a compiled kernel may read; .value on the host.)
_H0 = tl.constexpr(0)  # pass 0: top digit of every key
_H = tl.constexpr(256)  # pass r = 1..3: [_H + 512 (r - 1), + 256) for Q1's candidates, then Q3's
_NNAN = tl.constexpr(256 + 3 * 512)  # NaN count (pass 0)
_C1, _C3, _M1, _M3 = (tl.constexpr(_NNAN.value + i) for i in (1, 2, 3, 4))  # neighbours (pass 4)
_TOTAL = tl.constexpr(_NNAN.value + 5)  # outliers (pass 5)
_POOL_WORDS = _NNAN.value + 6


@triton.jit
def _pooled_prefix(work_ptr, n_nan, b1, b3, DIGITS: tl.constexpr):
    """The first DIGITS 8-bit digits of the two quartiles' lower order statistics, from the
    histograms of the earlier passes: (p1, t1, p3, t3), prefixes as signed keys and the ranks
    left within them. Every program recomputes this (a few 256-wide scans)."""
    bins = tl.arange(0, 256)
    hist = tl.load(work_ptr + _H0 + bins)
    # 0-based rank among all keys ascending: NaN keys are the n_nan smallest.
    d1, t1 = _digit(hist, n_nan + b1)
    d3, t3 = _digit(hist, n_nan + b3)
    p1 = (d1 ^ 0x80) << 24  # prefixes kept as signed keys (top digit flipped back)
    p3 = (d3 ^ 0x80) << 24
    for r in tl.static_range(1, DIGITS):
        SHIFT = 24 - 8 * r
        d1, t1 = _digit(tl.load(work_ptr + _H + 512 * (r - 1) + bins), t1)
        d3, t3 = _digit(tl.load(work_ptr + _H + 512 * (r - 1) + 256 + bins), t3)
        p1 = p1 | (d1 << SHIFT)
        p3 = p3 | (d3 << SHIFT)
    return p1, t1, p3, t3


@triton.jit
def _pooled_pass_kernel(s_ptr, work_ptr, B, N, whisker, s_sb, s_sn, SPAN,
                        PASS: tl.constexpr, CONTIG: tl.constexpr, CHUNK: tl.constexpr):
    """One pass of the pooled IQR over all M = B * N scores, program p on [p SPAN, (p+1) SPAN).
    PASS 0: NaN count and histogram of the top digit; 1-3: histograms of the next digit among the
    keys sharing each quartile's prefix; 4: interpolation neighbours (count and min of the keys
    above each quartile's lower order statistic); 5: outliers above the fence."""
    M = B * N
    bins = tl.arange(0, 256)
    offs = tl.arange(0, CHUNK)
    start = tl.program_id(0) * SPAN
    end = tl.minimum(start + SPAN, M)
    if PASS == 0:
        if tl.program_id(0) == 0:
            tl.store(work_ptr + _M1, 2147483647)
            tl.store(work_ptr + _M3, 2147483647)
        hist = tl.zeros([256], dtype=tl.int32)
        n_nan_part = 0
        for i0 in range(start, end, CHUNK):
            i = i0 + offs
            m = i < end
            x, key = _pooled_load(s_ptr, i, m, N, s_sb, s_sn, CONTIG)
            n_nan_part += tl.sum((m & (x != x)).to(tl.int32), axis=0)
            hist += tl.histogram(((key >> 24) & 0xFF) ^ 0x80, 256, mask=m)
        tl.atomic_add(work_ptr + _H0 + bins, hist)
        tl.atomic_add(work_ptr + _NNAN, n_nan_part)
    else:
        n_nan = tl.load(work_ptr + _NNAN)
        n = M - n_nan
        b1, w1 = _quantile_rank(0.25, n)
        b3, w3 = _quantile_rank(0.75, n)
        if PASS <= 3:
            p1, t1, p3, t3 = _pooled_prefix(work_ptr, n_nan, b1, b3, PASS)
            SHIFT = 24 - 8 * PASS
            h1 = tl.zeros([256], dtype=tl.int32)
            h3 = tl.zeros([256], dtype=tl.int32)
            for i0 in range(start, end, CHUNK):
                i = i0 + offs
                m = i < end
                x, key = _pooled_load(s_ptr, i, m, N, s_sb, s_sn, CONTIG)
                digit = (key >> SHIFT) & 0xFF
                hi = key >> (SHIFT + 8)
                h1 += tl.histogram(digit, 256, mask=m & (hi == (p1 >> (SHIFT + 8))))
                h3 += tl.histogram(digit, 256, mask=m & (hi == (p3 >> (SHIFT + 8))))
            tl.atomic_add(work_ptr + _H + 512 * (PASS - 1) + bins, h1)
            tl.atomic_add(work_ptr + _H + 512 * (PASS - 1) + 256 + bins, h3)
        else:
            p1, t1, p3, t3 = _pooled_prefix(work_ptr, n_nan, b1, b3, 4)
            if PASS == 4:
                c1 = 0
                c3 = 0
                m1 = 2147483647
                m3 = 2147483647
                for i0 in range(start, end, CHUNK):
                    i = i0 + offs
                    m = i < end
                    x, key = _pooled_load(s_ptr, i, m, N, s_sb, s_sn, CONTIG)
                    a1 = m & (key > p1)
                    a3 = m & (key > p3)
                    c1 += tl.sum(a1.to(tl.int32), axis=0)
                    c3 += tl.sum(a3.to(tl.int32), axis=0)
                    m1 = tl.minimum(m1, tl.min(tl.where(a1, key, 2147483647), axis=0))
                    m3 = tl.minimum(m3, tl.min(tl.where(a3, key, 2147483647), axis=0))
                tl.atomic_add(work_ptr + _C1, c1)
                tl.atomic_add(work_ptr + _C3, c3)
                tl.atomic_min(work_ptr + _M1, m1)
                tl.atomic_min(work_ptr + _M3, m3)
            else:
                c1 = tl.load(work_ptr + _C1)
                c3 = tl.load(work_ptr + _C3)
                hi1 = tl.where(c1 >= n - b1 - 1, tl.load(work_ptr + _M1), p1)
                hi3 = tl.where(c3 >= n - b3 - 1, tl.load(work_ptr + _M3), p3)
                fence = _fence(p1, hi1, w1, p3, hi3, w3, whisker)
                total = 0
                for i0 in range(start, end, CHUNK):
                    i = i0 + offs
                    m = i < end
                    x, key = _pooled_load(s_ptr, i, m, N, s_sb, s_sn, CONTIG)
                    total += tl.sum((m & (x > fence)).to(tl.int32), axis=0)
                tl.atomic_add(work_ptr + _TOTAL, total)


# ---------------------------------------------------------------------------------------------
# Host entry points
# ---------------------------------------------------------------------------------------------

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_scores(scores: torch.Tensor, name: str = "scores") -> None:
    if scores.dim() != 2:
        raise ValueError(f"{name} must be 2-D [B, N], got shape {tuple(scores.shape)}")
    if scores.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating tensor (float32/float16/bfloat16/float64), "
                        f"got {scores.dtype}")


def check_k(k: int, n: int) -> None:
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, N] = [0, {n}], got {k}")


@on_tensor_device
def select_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [B, k] (int64) of the k best scores of each row, ascending."""
    check_scores(scores)
    B, N = scores.shape
    k = int(k)
    check_k(k, N)
    idx = torch.empty(B, k, dtype=torch.int64, device=scores.device)
    if B == 0 or k == 0:
        return idx
    if N > MAX_N:  # beyond one program's registers: the exact reference (still no host sync)
        from epic_ext import reference
        return reference.select_topk(scores, k)
    select_rows_into(scores, k, idx)
    return idx


def select_rows_into(scores: torch.Tensor, k: int, idx: torch.Tensor,
                     slot: torch.Tensor | None = None) -> None:
    """Top-k of each row (N <= MAX_N, checked arguments) into idx [B, k] and, when given,
    slot [B, N] int32 (kept row -> its position in idx, others -1)."""
    B, N = scores.shape
    _select_rows_kernel[(B,)](scores, idx, idx, slot if slot is not None else idx, idx, N, k, N,
                              0.0, scores.stride(0), scores.stride(1), k, MODE=0,
                              WRITE_SLOT=slot is not None, BLOCK_N=next_pow2(N))


def _pooled_outliers(scores: torch.Tensor, whisker: float) -> torch.Tensor:
    """The pooled fence's outlier count over all B * N scores, at work[_TOTAL] on the device
    (int32 scratch, see _pooled_pass_kernel): six passes of a grid of programs."""
    B, N = scores.shape
    sb, sn = scores.stride(0), scores.stride(1)
    work = torch.zeros(_POOL_WORDS, dtype=torch.int32, device=scores.device)
    M = B * N
    chunk = _POOL_CHUNK
    # Contiguous spans of whole chunks, at most _POOL_PROGRAMS programs (about four per SM).
    span = chunk * triton.cdiv(triton.cdiv(M, chunk), _POOL_PROGRAMS)
    grid = (triton.cdiv(M, span),)
    for pass_ in range(6):
        _pooled_pass_kernel[grid](scores, work, B, N, whisker, sb, sn, span, PASS=pass_,
                                  CONTIG=sn == 1 and sb == N, CHUNK=chunk,
                                  num_warps=1 if INTERPRET else 8, enable_fp_fusion=False)
    return work


@on_tensor_device
def iqr_select(scores: torch.Tensor, whisker: float = 1.5, pooled: bool = False,
               max_k: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """IQR outlier selection: (counts [B] int64, indices [B, N] int64 padded with -1)."""
    check_scores(scores)
    B, N = scores.shape
    max_k = int(max_k)
    counts = torch.empty(B, dtype=torch.int64, device=scores.device)
    indices = torch.empty(B, N, dtype=torch.int64, device=scores.device)
    if B == 0:
        return counts, indices
    if N == 0:
        return counts.zero_(), indices
    if N > MAX_N:
        from epic_ext import reference
        return reference.iqr_select(scores, whisker, pooled, max_k)
    cap = min(max_k, N) if max_k >= 0 else N
    whisker = float(whisker)
    sb, sn = scores.stride(0), scores.stride(1)
    block = next_pow2(N)
    total = _pooled_outliers(scores, whisker)[_TOTAL.value:] if pooled else indices  # else unread
    _select_rows_kernel[(B,)](scores, counts, indices, indices, total, N, 0, cap, whisker, sb, sn,
                              N, MODE=2 if pooled else 1, WRITE_SLOT=False, BLOCK_N=block,
                              enable_fp_fusion=False)
    return counts, indices
