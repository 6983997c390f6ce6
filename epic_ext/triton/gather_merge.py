"""Triton kernels of the gather + merge family and the fused compress (top-k + gather + merge).

Same contracts as csrc/include/epic/ops.h and epic_ext/reference.py.

Work split: a grid of (image, D-block) programs, so even B = 1 spreads over the GPU. Tokens are
read with their own batch/row/column strides (no copy). Accumulation is fp32 registers (fp64 for
fp64 tokens); outputs are rounded once to the tokens' dtype.

gather_merge (user idx, which may repeat): a small plan kernel per image marks the referenced rows
(first[b, n] = smallest valid j with idx[b, j] == n, by atomic_min) and counts the dropped rows.
The forward then gathers the kept rows in idx order (tiles of rows, one 2-D load each) and
streams the dropped rows into the merge accumulator; referenced rows are masked off there, so
each input row is read once.

gather_merge_backward: every grad_tokens row is written once: its first occurrence's gradient,
or its share of the merged row's gradient. Rows that idx repeats (only user idx; the plan kernel
counts occurrences with atomic_add and lists those rows) are instead summed over all their
occurrences in fp32 and stored once, so the result is rounded once, as in the reference.

Unlike the C++ CPU entry points, nothing here reads device values on the host (no sync), so values
are not validated by raising: every program checks its image (_bad_image: counts[b] outside
[0, K], or a valid idx entry outside [0, N)) and such an image gets NaN in every output row
(forward) or gradient row (backward), as in the reference; out-of-range entries are never
dereferenced. Shapes, dtypes and devices are checked as in C++.

compress_topk (two launches): select.py's row kernel selects each image's top-k once (one
program per image) and writes idx and the row -> output slot map slot[B, N] (int32, -1 for
dropped rows); then every (image, D-block) program reads its image's slot row and streams the N
token rows once in contiguous tiles: kept rows go to their slot, the others into the merge.
Selecting inside each D-block program instead (one launch) would repeat the image's selection
(32 block-wide reductions over N keys) cdiv(D, BLOCK_D) times, e.g. 32 times at D = 4096: about
as long as streaming the block's N x BLOCK_D tokens; the second launch costs a few microseconds
once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .select import (INTERPRET, MAX_N, check_k, check_scores, next_pow2, on_tensor_device,
                     select_rows_into)

_BIG = tl.constexpr(2147483647)  # first[] of a row that no valid idx references
_CASCADE = tl.constexpr(16)  # row groups per lane in the first level of the merge sum

MERGE_NONE, MERGE_MEAN, MERGE_WEIGHTED = 0, 1, 2


def _configs():
    if INTERPRET:  # the interpreter runs one config; few, wide programs are fastest there
        return [triton.Config({"BLOCK_R": 64, "BLOCK_D": 128, "STAGES": 1}, num_warps=1)]
    # STAGES > 1 software-pipelines the row loop (cp.async): it keeps loads in flight when the
    # grid is small (B = 1); plain loops rely on many resident programs instead.
    return [triton.Config({"BLOCK_R": r, "BLOCK_D": d, "STAGES": st}, num_warps=w)
            for r, d, w, st in ((16, 128, 4, 1), (32, 128, 4, 1), (16, 256, 4, 1),
                                (32, 256, 8, 1), (16, 512, 8, 1), (32, 64, 4, 3),
                                (16, 128, 4, 3), (16, 256, 8, 3), (32, 128, 8, 2))]


# Autotuning keys on power-of-two buckets of the sizes, never on the exact N, K or D:
# compress(k="iqr") changes K with every batch, and each new key re-benchmarks every config
# (host syncs, about a second).
# K is also left unspecialised (do_not_specialize): no recompile when K becomes 1 or a
# multiple of 16.
_KEY = ["B_KEY", "N_KEY", "K_KEY", "D_KEY", "MERGE"]


def _tune_keys(B: int, N: int, K: int, D: int) -> tuple[int, int, int, int]:
    """Autotuning buckets (B_KEY, N_KEY, K_KEY, D_KEY): the batch size (the grid size decides the
    best tile) up to 64, and N, K, D rounded up to powers of two."""
    return min(next_pow2(B), 64), next_pow2(N), next_pow2(K), next_pow2(D)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _valid_count(counts_ptr, b, K, HAS_COUNTS: tl.constexpr):
    if HAS_COUNTS:
        return tl.minimum(tl.maximum(tl.load(counts_ptr + b), 0), K).to(tl.int32)
    else:
        return tl.full([], K, tl.int32)  # a tensor even when K == 1 is specialised to a constant


@triton.jit
def _bad_image(idx_row, counts_ptr, b, N, K, valid, HAS_COUNTS: tl.constexpr, BLOCK: tl.constexpr):
    """True when counts[b] is outside [0, K] or a valid entry idx[b, :valid] is outside [0, N)."""
    if HAS_COUNTS:
        c = tl.load(counts_ptr + b)
        bad = ((c < 0) | (c > K)).to(tl.int32)
    else:
        bad = tl.full([], 0, tl.int32)
    for j0 in range(0, valid, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        r = tl.load(idx_row + j, mask=j < valid, other=0)
        bad = tl.maximum(bad, tl.max(((r < 0) | (r >= N)).to(tl.int32), axis=0))
    return bad != 0


@triton.jit
def _plan_kernel(idx_ptr, counts_ptr, first_ptr, mult_ptr, ndrop_ptr, ndup_ptr, duprow_ptr, N, K,
                 idx_sb, HAS_COUNTS: tl.constexpr, WITH_DUPS: tl.constexpr, BLOCK: tl.constexpr):
    """Per image: first[b, n] (smallest valid j referencing n, else BIG), n_dropped[b] and, for
    the backward, the multiplicity of every row and the list of rows referenced twice or more."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    valid = _valid_count(counts_ptr, b, K, HAS_COUNTS)
    first = first_ptr + b * N
    mult = mult_ptr + b * N
    idx_row = idx_ptr + b * idx_sb
    for n0 in range(0, N, BLOCK):
        n = n0 + offs
        tl.store(first + n, tl.full([BLOCK], _BIG, tl.int32), mask=n < N)
        if WITH_DUPS:
            tl.store(mult + n, tl.zeros([BLOCK], tl.int32), mask=n < N)
    tl.debug_barrier()  # the atomics below must see the initial values of the whole CTA
    for j0 in range(0, valid, BLOCK):
        j = j0 + offs
        r = tl.load(idx_row + j, mask=j < valid, other=-1)
        ok = (r >= 0) & (r < N)  # out-of-range idx references nothing (never dereferenced)
        tl.atomic_min(first + r, j, mask=ok)
        if WITH_DUPS:
            tl.atomic_add(mult + r, 1, mask=ok)
    tl.debug_barrier()
    n_ref = 0
    n_dup = 0
    for n0 in range(0, N, BLOCK):
        n = n0 + offs
        f = tl.load(first + n, mask=n < N, other=_BIG, cache_modifier=".cg")
        n_ref += tl.sum((f != _BIG).to(tl.int32), axis=0)
        if WITH_DUPS:
            dup = tl.load(mult + n, mask=n < N, other=0, cache_modifier=".cg") > 1
            pos = n_dup + tl.cumsum(dup.to(tl.int32), axis=0) - 1
            tl.store(duprow_ptr + b * N + pos, n, mask=dup)
            n_dup += tl.sum(dup.to(tl.int32), axis=0)
    tl.store(ndrop_ptr + b, N - n_ref)
    if WITH_DUPS:
        tl.store(ndup_ptr + b, n_dup)


@triton.autotune(configs=_configs(), key=_KEY)
@triton.jit(do_not_specialize=["K"])
def _gather_merge_kernel(x_ptr, idx_ptr, counts_ptr, w_ptr, first_ptr, ndrop_ptr, out_ptr,
                         N, K, D, x_sb, x_sn, x_sd, idx_sb, w_sb, w_sn, out_sb, out_sk,
                         B_KEY, N_KEY, K_KEY, D_KEY,
                         MERGE: tl.constexpr, HAS_COUNTS: tl.constexpr, ACC: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = (d < D)[None, :]
    col = d.to(tl.int64)[None, :] * x_sd
    valid = _valid_count(counts_ptr, b, K, HAS_COUNTS)
    bad = _bad_image(idx_ptr + b * idx_sb, counts_ptr, b, N, K, valid, HAS_COUNTS, BLOCK_R)
    x_b = x_ptr + b * x_sb
    out_b = out_ptr + b * out_sb + d[None, :]
    rows = tl.arange(0, BLOCK_R)
    # Output rows: kept rows (j < valid), zero after; the merged slot is written below.
    if MERGE != 0:
        n_out = K + 1
    else:
        n_out = K
    for j0 in tl.range(0, n_out, BLOCK_R, num_stages=STAGES):
        j = j0 + rows
        r = tl.load(idx_ptr + b * idx_sb + j, mask=j < valid, other=-1)
        ok = (r >= 0) & (r < N)
        v = tl.load(x_b + r[:, None] * x_sn + col, mask=ok[:, None] & dm, other=0.0)
        v = tl.where(bad, float("nan"), v.to(ACC)).to(out_ptr.dtype.element_ty)  # exact
        if MERGE == 0:
            keep = j < n_out
        else:
            keep = (j < n_out) & (j != valid)  # the merged slot is written below
        tl.store(out_b + j.to(tl.int64)[:, None] * out_sk, v, mask=keep[:, None] & dm)
    if MERGE != 0:
        # Two-level sum (each lane adds _CASCADE row groups, then the groups' sums are added):
        # the rounding error stays near torch's own reduction however large N is.
        acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
        for n1 in range(0, N, BLOCK_R * _CASCADE):
            part = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
            for n0 in tl.range(n1, n1 + BLOCK_R * _CASCADE, BLOCK_R, num_stages=STAGES):
                n = n0 + rows
                f = tl.load(first_ptr + b * N + n, mask=n < N, other=0)
                drop = (n < N) & (f == _BIG)
                v = tl.load(x_b + n.to(tl.int64)[:, None] * x_sn + col, mask=drop[:, None] & dm,
                            other=0.0).to(ACC)
                if MERGE == 2:
                    w = tl.load(w_ptr + b * w_sb + n * w_sn, mask=drop, other=0.0).to(ACC)
                    v = v * w[:, None]
                part += v
            acc += part
        merged = tl.sum(acc, axis=0)
        if MERGE == 1:
            merged = merged / tl.maximum(tl.load(ndrop_ptr + b), 1).to(ACC)
        merged = tl.where(bad, float("nan"), merged)
        tl.store(out_b + valid.to(tl.int64) * out_sk, merged[None, :].to(out_ptr.dtype.element_ty),
                 mask=dm)


@triton.autotune(configs=_configs(), key=_KEY)
@triton.jit(do_not_specialize=["K"])
def _gather_merge_bwd_kernel(g_ptr, idx_ptr, counts_ptr, w_ptr, first_ptr, mult_ptr, ndrop_ptr,
                             ndup_ptr, duprow_ptr, gx_ptr, N, K, D, g_sb, g_sk, g_sd, idx_sb,
                             w_sb, w_sn, gx_sb, gx_sn, B_KEY, N_KEY, K_KEY, D_KEY,
                             MERGE: tl.constexpr, HAS_COUNTS: tl.constexpr, ACC: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = (d < D)[None, :]
    gcol = d.to(tl.int64)[None, :] * g_sd
    valid = _valid_count(counts_ptr, b, K, HAS_COUNTS)
    bad = _bad_image(idx_ptr + b * idx_sb, counts_ptr, b, N, K, valid, HAS_COUNTS, BLOCK_R)
    g_b = g_ptr + b * g_sb
    gx_b = gx_ptr + b * gx_sb + d[None, :]
    dtype = gx_ptr.dtype.element_ty
    if MERGE != 0:
        gm = tl.load(g_b + valid.to(tl.int64) * g_sk + gcol, mask=dm, other=0.0).to(ACC)
        if MERGE == 1:
            gm = gm / tl.maximum(tl.load(ndrop_ptr + b), 1).to(ACC)
    rows = tl.arange(0, BLOCK_R)
    # Every row once: its first occurrence's gradient, or its share of the merged gradient.
    for n0 in tl.range(0, N, BLOCK_R, num_stages=STAGES):
        n = n0 + rows
        nm = n < N
        f = tl.load(first_ptr + b * N + n, mask=nm, other=_BIG)
        ref = f != _BIG
        v = tl.load(g_b + f.to(tl.int64)[:, None] * g_sk + gcol, mask=ref[:, None] & dm,
                    other=0.0).to(ACC)
        if MERGE == 1:
            v = tl.where(ref[:, None], v, gm)
        elif MERGE == 2:
            w = tl.load(w_ptr + b * w_sb + n * w_sn, mask=nm & ~ref, other=0.0).to(ACC)
            v = tl.where(ref[:, None], v, w[:, None] * gm)
        v = tl.where(bad, float("nan"), v)
        once = nm & (tl.load(mult_ptr + b * N + n, mask=nm, other=0) < 2)  # repeated: below
        tl.store(gx_b + n.to(tl.int64)[:, None] * gx_sn, v.to(dtype), mask=once[:, None] & dm)
    # Rows referenced several times (user idx only): sum all their occurrences in ACC, store once.
    for t in range(tl.load(ndup_ptr + b)):
        row = tl.load(duprow_ptr + b * N + t)
        acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
        for j0 in range(0, valid, BLOCK_R):
            j = j0 + rows
            hit = tl.load(idx_ptr + b * idx_sb + j, mask=j < valid, other=-1) == row
            acc += tl.load(g_b + j.to(tl.int64)[:, None] * g_sk + gcol, mask=hit[:, None] & dm,
                           other=0.0).to(ACC)
        total = tl.where(bad, float("nan"), tl.sum(acc, axis=0))
        tl.store(gx_b + row.to(tl.int64) * gx_sn, total[None, :].to(dtype), mask=dm)


@triton.autotune(configs=_configs(), key=_KEY)
@triton.jit(do_not_specialize=["K"])
def _compress_kernel(x_ptr, w_ptr, out_ptr, slot_ptr, N, K, D, x_sb, x_sn, x_sd, w_sb, w_sn,
                     out_sb, out_sk, B_KEY, N_KEY, K_KEY, D_KEY,
                     MERGE: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr):
    """slot[b, n]: output row of token row n (-1: dropped), from select.py's row kernel."""
    b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    slot = slot_ptr + b * N
    # Stream the N rows once: kept rows to their slot, dropped rows into the merge.
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = (d < D)[None, :]
    col = d.to(tl.int64)[None, :] * x_sd
    x_b = x_ptr + b * x_sb
    out_b = out_ptr + b * out_sb + d[None, :]
    rows = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    for n1 in range(0, N, BLOCK_R * _CASCADE):  # two-level merge sum, as in _gather_merge_kernel
        part = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
        for n0 in tl.range(n1, n1 + BLOCK_R * _CASCADE, BLOCK_R, num_stages=STAGES):
            n = n0 + rows
            nm = n < N
            p = tl.load(slot + n, mask=nm, other=-1)
            kept = p >= 0
            lm = nm if MERGE != 0 else kept
            v = tl.load(x_b + n.to(tl.int64)[:, None] * x_sn + col, mask=lm[:, None] & dm, other=0.0)
            tl.store(out_b + p.to(tl.int64)[:, None] * out_sk, v, mask=kept[:, None] & dm)
            if MERGE != 0:
                v = tl.where(kept[:, None], 0.0, v.to(ACC))
                if MERGE == 2:
                    w = tl.load(w_ptr + b * w_sb + n * w_sn, mask=nm & ~kept, other=0.0).to(ACC)
                    v = v * w[:, None]
                part += v
        acc += part
    if MERGE != 0:
        merged = tl.sum(acc, axis=0)
        if MERGE == 1:
            merged = merged / tl.maximum(tl.full([], N - K, tl.int32), 1).to(ACC)
        tl.store(out_b + K * out_sk, merged[None, :].to(out_ptr.dtype.element_ty), mask=dm)


# ---------------------------------------------------------------------------------------------
# Host entry points
# ---------------------------------------------------------------------------------------------

def _check_tokens(tokens: torch.Tensor, name: str = "tokens") -> None:
    if tokens.dim() != 3:
        raise ValueError(f"{name} must be 3-D [B, N, D], got shape {tuple(tokens.shape)}")
    if not tokens.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor (float32/float16/bfloat16/float64), "
                        f"got {tokens.dtype}")


def _check_merge(merge: int, weights, B: int, N: int, device) -> None:
    if merge not in (MERGE_NONE, MERGE_MEAN, MERGE_WEIGHTED):
        raise ValueError(f"merge must be 0 (none), 1 (mean) or 2 (weighted), got {merge}")
    if merge == MERGE_WEIGHTED:
        if weights is None:
            raise ValueError("weights are required when merge is weighted")
        if weights.dim() != 2 or tuple(weights.shape) != (B, N):
            raise ValueError(f"weights must be [B, N] = [{B}, {N}], got {tuple(weights.shape)}")
        if not weights.is_floating_point():
            raise TypeError(f"weights must be floating, got {weights.dtype}")
        if weights.device != device:
            raise ValueError(f"weights must be on {device}, got {weights.device}")


def _unit_stride(t):
    """idx / counts are read with a unit inner stride (they are small)."""
    return t if t is None or t.dim() == 0 or t.stride(-1) == 1 else t.contiguous()


def _check_idx(idx: torch.Tensor, B: int, counts, device) -> None:
    if idx.dim() != 2 or idx.shape[0] != B:
        raise ValueError(f"idx must be [B, K] with B = {B}, got {tuple(idx.shape)}")
    if idx.dtype != torch.int64:
        raise TypeError(f"idx must be int64, got {idx.dtype}")
    if idx.device != device:
        raise ValueError(f"idx must be on {device}, got {idx.device}")
    if counts is not None:
        if counts.dim() != 1 or counts.shape[0] != B:
            raise ValueError(f"counts must be [B] with B = {B}, got {tuple(counts.shape)}")
        if counts.dtype != torch.int64:
            raise TypeError(f"counts must be int64, got {counts.dtype}")
        if counts.device != device:
            raise ValueError(f"counts must be on {device}, got {counts.device}")


def _weights_args(weights, merge: int, like: torch.Tensor):
    if merge == MERGE_WEIGHTED:
        return weights, weights.stride(0), weights.stride(1)
    return like, 0, 0  # never read


def _plan(idx: torch.Tensor, counts, N: int, with_dups: bool):
    """Scratch of the plan kernel: first [B, N], mult [B, N], n_dropped [B], n_dup [B],
    dup_rows [B, N] (int32; mult, n_dup and dup_rows only filled with_dups)."""
    B, K = idx.shape
    dev = idx.device
    first = torch.empty(B, N, dtype=torch.int32, device=dev)
    ndrop = torch.empty(B, dtype=torch.int32, device=dev)
    if with_dups:
        mult = torch.empty(B, N, dtype=torch.int32, device=dev)
        ndup = torch.empty(B, dtype=torch.int32, device=dev)
        duprows = torch.empty(B, N, dtype=torch.int32, device=dev)
    else:
        mult = ndup = duprows = first  # never touched
    block = min(1024, next_pow2(max(N, K)))
    _plan_kernel[(B,)](idx, counts if counts is not None else idx, first, mult, ndrop, ndup,
                       duprows, N, K, idx.stride(0), HAS_COUNTS=counts is not None,
                       WITH_DUPS=with_dups, BLOCK=block, num_warps=1 if INTERPRET else 4)
    return first, mult, ndrop, ndup, duprows


@on_tensor_device
def gather_merge(tokens: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor | None = None,
                 merge: int = MERGE_MEAN, weights: torch.Tensor | None = None) -> torch.Tensor:
    """[B, K + (merge != none), D]: kept rows, then the merged row, then zero padding."""
    _check_tokens(tokens)
    B, N, D = tokens.shape
    merge = int(merge)
    _check_idx(idx, B, counts, tokens.device)
    _check_merge(merge, weights, B, N, tokens.device)
    K = idx.shape[1]
    out = torch.empty(B, K + (merge != MERGE_NONE), D, dtype=tokens.dtype, device=tokens.device)
    if out.numel() == 0:
        return out
    idx, counts = _unit_stride(idx), _unit_stride(counts)
    if merge != MERGE_NONE:
        first, _, ndrop, _, _ = _plan(idx, counts, N, with_dups=False)
    else:
        first = ndrop = idx  # never read
    w, w_sb, w_sn = _weights_args(weights, merge, tokens)
    grid = lambda meta: (B, triton.cdiv(D, meta["BLOCK_D"]))  # noqa: E731
    _gather_merge_kernel[grid](
        tokens, idx, counts if counts is not None else idx, w, first, ndrop, out, N, K, D,
        tokens.stride(0), tokens.stride(1), tokens.stride(2), idx.stride(0), w_sb, w_sn,
        out.stride(0), out.stride(1), *_tune_keys(B, N, K, D), MERGE=merge,
        HAS_COUNTS=counts is not None,
        ACC=_acc_dtype(tokens.dtype))
    return out


@on_tensor_device
def gather_merge_backward(grad_out: torch.Tensor, idx: torch.Tensor,
                          counts: torch.Tensor | None, merge: int,
                          weights: torch.Tensor | None, n_tokens: int) -> torch.Tensor:
    """Gradient of gather_merge w.r.t. tokens: grad_tokens [B, n_tokens, D]."""
    _check_tokens(grad_out, "grad_out")
    merge = int(merge)
    n_tokens = int(n_tokens)
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    B, rows, D = grad_out.shape
    _check_idx(idx, B, counts, grad_out.device)
    K = idx.shape[1]
    if rows != K + (merge != MERGE_NONE):
        raise ValueError(f"grad_out has {rows} rows, expected {K + (merge != MERGE_NONE)}")
    _check_merge(merge, weights, B, n_tokens, grad_out.device)
    gx = torch.empty(B, n_tokens, D, dtype=grad_out.dtype, device=grad_out.device)
    if gx.numel() == 0:
        return gx
    idx, counts = _unit_stride(idx), _unit_stride(counts)
    first, mult, ndrop, ndup, duprows = _plan(idx, counts, n_tokens, with_dups=True)
    w, w_sb, w_sn = _weights_args(weights, merge, grad_out)
    grid = lambda meta: (B, triton.cdiv(D, meta["BLOCK_D"]))  # noqa: E731
    _gather_merge_bwd_kernel[grid](
        grad_out, idx, counts if counts is not None else idx, w, first, mult, ndrop, ndup,
        duprows, gx, n_tokens, K, D, grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        idx.stride(0), w_sb, w_sn, gx.stride(0), gx.stride(1), *_tune_keys(B, n_tokens, K, D),
        MERGE=merge,
        HAS_COUNTS=counts is not None, ACC=_acc_dtype(grad_out.dtype))
    return gx


@on_tensor_device
def compress_topk(tokens: torch.Tensor, scores: torch.Tensor, k: int, merge: int = MERGE_MEAN,
                  weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """select_topk + gather_merge in one kernel: (out [B, k + (merge != none), D], idx [B, k])."""
    _check_tokens(tokens)
    check_scores(scores)
    B, N, D = tokens.shape
    if tuple(scores.shape) != (B, N):
        raise ValueError(f"scores must be [B, N] = [{B}, {N}], got {tuple(scores.shape)}")
    if scores.device != tokens.device:
        raise ValueError(f"scores must be on {tokens.device}, got {scores.device}")
    k = int(k)
    merge = int(merge)
    check_k(k, N)
    _check_merge(merge, weights, B, N, tokens.device)
    out = torch.empty(B, k + (merge != MERGE_NONE), D, dtype=tokens.dtype, device=tokens.device)
    idx = torch.empty(B, k, dtype=torch.int64, device=tokens.device)
    if B == 0:
        return out, idx
    if out.numel() == 0:  # D == 0, or k == 0 without merge: only idx (possibly empty) is due
        if idx.numel():
            from .select import select_topk
            idx = select_topk(scores, k)
        return out, idx
    if N > MAX_N:  # selection beyond one program's registers: the exact reference, no host sync
        from epic_ext import reference
        idx = reference.select_topk(scores, k)
        slot = torch.full((B, N), -1, dtype=torch.int32, device=tokens.device)
        slot.scatter_(1, idx, torch.arange(k, dtype=torch.int32, device=tokens.device).expand(B, k))
    else:
        slot = torch.empty(B, N, dtype=torch.int32, device=tokens.device)
        select_rows_into(scores, k, idx, slot)
    w, w_sb, w_sn = _weights_args(weights, merge, tokens)
    grid = lambda meta: (B, triton.cdiv(D, meta["BLOCK_D"]))  # noqa: E731
    _compress_kernel[grid](
        tokens, w, out, slot, N, k, D, tokens.stride(0), tokens.stride(1), tokens.stride(2),
        w_sb, w_sn, out.stride(0), out.stride(1), *_tune_keys(B, N, k, D), MERGE=merge,
        ACC=_acc_dtype(tokens.dtype))
    return out, idx
