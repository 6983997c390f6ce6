"""Triton kernel of the fused teacher-student KL divergence: loss and student gradient in one call.

Same contract as epic_ext._C.cpu.kl_div (csrc/include/epic/ops.h, csrc/cpu/kl_div.cpp) and
epic_ext.reference.kl_div_fwd: per row a = student / tau, b = teacher / tau, p = softmax;
forward KL(p_t || p_s) (reverse: KL(p_s || p_t)) times tau^2, the gradient
tau (p_s - p_t) * scale (reverse: tau p_s (log p_s - log p_t - KL) * scale) with scale =
1 / normaliser, stored in the logits' dtype (over the student when inplace).

One program per row, two passes over it (10 bytes per element in bf16: the row is read twice and
the gradient written once; 4 bytes per element without the gradient):

  pass 1 (online): the row is streamed in BLOCK_V chunks. Running maxima ma, mb (scalars, the
    maxima of everything seen so far) and per-lane fp32 accumulators za = sum exp(a - ma),
    zb = sum exp(b - mb) and S = sum w ((x - mx) - (y - my)), where x is the side that carries
    the weight w = exp(x - mx) (the teacher b for forward KL, the student a for reverse) and y
    the other side. When a chunk raises a maximum (da = ma_old - ma_new <= 0, db likewise), the
    accumulators are brought to the new maxima before the chunk is added:
        forward:  S <- e^db (S + zb (db - da)),   reverse: S <- e^da (S + za (da - db)),
        za <- za e^da,  zb <- zb e^db
    (each old term's weight scales by e^dx, and its log-ratio shifts by dx - dy). At the end the
    lanes are summed in fp64 and KL = S / zx + log zy - log zx, formed in fp64 (the row's
    log-sum-exps are differences of O(log V) numbers: fp32 there would cost ~1e-6 absolute).
  pass 2: the row is read again and the gradient written from the final maxima and sums, with
    the arithmetic of the C++ kernel: forward tau scale (e^(a-ma) / za - e^(b-mb) / zb);
    reverse tau scale p_s ((a - b) + shift) with shift = (mb - ma) + log zb - log za - KL.

The maxima start at -FLT_MAX, not -inf, so that -inf logits (zero probability) never produce
inf - inf; every term whose weight is 0 is dropped by a select (never 0 * inf), as in C++.
A row whose softmax is undefined on either side (a NaN or +inf logit: its sum z is NaN; every
logit -inf: z = 0) stores loss NaN and an all-NaN gradient row, as the C++ kernels.
Masked-out rows store loss 0 and a zero gradient row. The normaliser (rows for batchmean, rows * V
for mean) is counted on the device (row_mask.sum()) and read by every program: no host sync.
Per-row losses go to a [T] buffer (fp32 for reduction none, else fp64) that one small program
sums in fixed order (deterministic, no atomics) and divides by the normaliser.

fp64 logits run the same kernel with fp64 arithmetic (gradcheck); the temperature then travels
as two fp32 halves (Triton passes Python floats as fp32).
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
import triton
import triton.language as tl

from .select import on_tensor_device

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

REDUCE_NONE, REDUCE_SUM, REDUCE_MEAN, REDUCE_BATCHMEAN = 0, 1, 2, 3
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_NEG_BIG = tl.constexpr(-3.4028234663852886e38)  # -FLT_MAX: the maxima before any entry
_FLT_MIN, _FLT_MAX = 2.0 ** -126, 3.4028234663852886e38  # tau^2 must be a normal fp32 number


def _next_pow2(n: int) -> int:
    return max(1, triton.next_power_of_2(n))


# ---------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------

def _configs():
    if INTERPRET:
        # One config runs (the pruner below keeps exactly one, so nothing is benchmarked): the
        # interpreter's cost is per chunk, so chunks are as wide as the row allows.
        return [triton.Config({"BLOCK_V": b}, num_warps=1) for b in (16, 64, 256, 1024, 4096)]
    # BLOCK_V / (32 num_warps) = fp32 elements per thread and per tensor: 4 to 16 (three lane
    # accumulators and two loaded chunks stay in registers).
    return [triton.Config({"BLOCK_V": b}, num_warps=w)
            for b, w in ((1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16))]


def _prune_configs(configs, nargs, **kwargs):
    V = int(nargs["V"])
    pv = _next_pow2(V)
    if INTERPRET:
        block = min(4096, max(16, pv))
        pick = [c for c in configs if c.kwargs["BLOCK_V"] >= block]
        return pick[:1] or configs[-1:]
    if pv <= 512:  # tiny rows: one chunk, one to four warps
        return [triton.Config({"BLOCK_V": max(32, pv)}, num_warps=max(1, min(4, pv // 128)))]
    keep = [c for c in configs if c.kwargs["BLOCK_V"] <= pv]
    return keep or configs[:1]


_KEY = ["V", "T_KEY", "REDUCTION", "REVERSE", "HAS_MASK", "HAS_GRAD"]


def _t_key(T: int) -> int:
    """Autotuning bucket of the row count (the grid size): 1..64, ..256, ..1024, more."""
    return 0 if T <= 64 else 1 if T <= 256 else 2 if T <= 1024 else 3


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _max2(a1, b1, a2, b2):
    return tl.maximum(a1, a2), tl.maximum(b1, b2)


if INTERPRET:  # the interpreter runs a combine function element by element: use its numpy max
    @triton.jit
    def _chunk_max(a, b):
        return tl.max(a, axis=0), tl.max(b, axis=0)
else:  # one reduction (one shared-memory round trip) for both maxima
    @triton.jit
    def _chunk_max(a, b):
        return tl.reduce((a, b), 0, _max2)


if INTERPRET:  # the interpreter truncates fp32 -> bf16; the GPU rounds to nearest even: do that
    @triton.jit
    def _to_out(x, dtype: tl.constexpr):
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # NaN stays NaN
        return x.to(dtype)
else:
    @triton.jit
    def _to_out(x, dtype: tl.constexpr):
        return x.to(dtype)


@triton.jit
def _row_scale(cnt_ptr, T, V, REDUCTION: tl.constexpr, HAS_MASK: tl.constexpr):
    """1 / normaliser in fp64 (0 when the normaliser is 0); 1 for reductions none and sum."""
    if REDUCTION == 2 or REDUCTION == 3:
        if HAS_MASK:
            rows = tl.load(cnt_ptr).to(tl.float64)
        else:
            rows = tl.cast(T, tl.float64)
        if REDUCTION == 2:
            norm = rows * V
        else:
            norm = rows
        scale = tl.where(norm > 0, 1.0 / tl.maximum(norm, 1.0), 0.0)
    else:
        scale = tl.full([], 1.0, tl.float64)
    return scale


@triton.jit(do_not_specialize=["T"])
def _kl_rows_kernel(s_ptr, t_ptr, g_ptr, mask_ptr, cnt_ptr, loss_ptr, T, V, s_st, t_st, g_st,
                    tau_hi, tau_lo, itau_hi, itau_lo, T_KEY,
                    REDUCTION: tl.constexpr, REVERSE: tl.constexpr, HAS_MASK: tl.constexpr,
                    HAS_GRAD: tl.constexpr, IS_F64: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    r64 = row.to(tl.int64)
    offs = tl.arange(0, BLOCK_V)
    if IS_F64:
        tau = tl.cast(tau_hi, tl.float64) + tl.cast(tau_lo, tl.float64)
        inv_tau = tl.cast(itau_hi, tl.float64) + tl.cast(itau_lo, tl.float64)
    else:
        tau = tl.cast(tau_hi, tl.float32)
        inv_tau = tl.cast(itau_hi, tl.float32)
    if HAS_MASK:
        keep = tl.load(mask_ptr + row) != 0
    else:
        keep = True
    s_row = s_ptr + r64 * s_st
    t_row = t_ptr + r64 * t_st
    g_row = g_ptr + r64 * g_st
    if keep:
        # ---- pass 1: online maxima, exp sums and the weighted log-ratio sum, per lane ----
        ma = tl.full([], _NEG_BIG, ACC)
        mb = tl.full([], _NEG_BIG, ACC)
        za = tl.zeros([BLOCK_V], ACC)
        zb = tl.zeros([BLOCK_V], ACC)
        acc_s = tl.zeros([BLOCK_V], ACC)
        for v0 in range(0, V, BLOCK_V):
            idx = v0 + offs
            m = idx < V
            a = tl.load(s_row + idx, mask=m, other=float("-inf")).to(ACC) * inv_tau
            b = tl.load(t_row + idx, mask=m, other=float("-inf")).to(ACC) * inv_tau
            ca, cb = _chunk_max(a, b)
            na = tl.maximum(ma, ca)
            nb = tl.maximum(mb, cb)
            if (na > ma) | (nb > mb):  # uniform branch: taken a few times per row
                da = ma - na  # <= 0, finite (the maxima start at -FLT_MAX)
                db = mb - nb
                fa = tl.exp(da)
                fb = tl.exp(db)
                if REVERSE:
                    acc_s = tl.where(fa > 0, fa * (acc_s + za * (da - db)), 0.0)
                else:
                    acc_s = tl.where(fb > 0, fb * (acc_s + zb * (db - da)), 0.0)
                za = za * fa
                zb = zb * fb
                ma = na
                mb = nb
            xa = a - ma  # <= 0, -inf for a -inf logit or a lane past V
            xb = b - mb
            ea = tl.exp(xa)
            eb = tl.exp(xb)
            za += ea
            zb += eb
            if REVERSE:
                acc_s = tl.where(ea > 0, acc_s + ea * (xa - xb), acc_s)  # no mass, no term
            else:
                acc_s = tl.where(eb > 0, acc_s + eb * (xb - xa), acc_s)
        za_t = tl.sum(za.to(tl.float64), axis=0)
        zb_t = tl.sum(zb.to(tl.float64), axis=0)
        s_t = tl.sum(acc_s.to(tl.float64), axis=0)
        # Both sums finite and > 0 (>= 1: the maximum's own term), else a side's softmax is
        # undefined (NaN from a NaN / +inf logit, 0 for a row of -inf): NaN loss and gradient.
        defined = (za_t > 0) & (zb_t > 0) & (za_t < float("inf")) & (zb_t < float("inf"))
        lza = tl.log(za_t)
        lzb = tl.log(zb_t)
        if REVERSE:
            kl = s_t / za_t + lzb - lza
        else:
            kl = s_t / zb_t + lza - lzb
        kl = tl.where(defined, kl, float("nan"))
        tau64 = tl.cast(tau, tl.float64)
        tl.store(loss_ptr + row, (kl * tau64 * tau64).to(loss_ptr.dtype.element_ty))
        # ---- pass 2: the gradient, from the final maxima and sums ----
        if HAS_GRAD:
            scale = _row_scale(cnt_ptr, T, V, REDUCTION, HAS_MASK).to(ACC)
            c = tl.where(defined, tau * scale, float("nan"))
            massless = tl.where(defined, 0.0, float("nan")).to(ACC)  # reverse: p_s == 0
            ra = (1.0 / za_t).to(ACC)
            rb = (1.0 / zb_t).to(ACC)
            shift = ((mb - ma).to(tl.float64) + lzb - lza - kl).to(ACC)
            for v0 in range(0, V, BLOCK_V):
                idx = v0 + offs
                m = idx < V
                a = tl.load(s_row + idx, mask=m, other=0.0).to(ACC) * inv_tau
                b = tl.load(t_row + idx, mask=m, other=0.0).to(ACC) * inv_tau
                if REVERSE:
                    p = tl.exp(a - ma) * ra
                    g = tl.where(p > 0, c * p * ((a - b) + shift), massless)
                else:
                    g = c * (tl.exp(a - ma) * ra - tl.exp(b - mb) * rb)
                tl.store(g_row + idx, _to_out(g, g_ptr.dtype.element_ty), mask=m)
    else:
        tl.store(loss_ptr + row, tl.zeros([], loss_ptr.dtype.element_ty))
        if HAS_GRAD:
            zero = tl.zeros([BLOCK_V], g_ptr.dtype.element_ty)
            for v0 in range(0, V, BLOCK_V):
                idx = v0 + offs
                tl.store(g_row + idx, zero, mask=idx < V)


@triton.jit(do_not_specialize=["T"])
def _kl_total_kernel(loss_ptr, out_ptr, cnt_ptr, T, V, REDUCTION: tl.constexpr,
                     HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    """One program: sum of the fp64 per-row losses in a fixed order, / normaliser (0 if none)."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float64)
    for i0 in range(0, T, BLOCK):
        i = i0 + offs
        acc += tl.load(loss_ptr + i, mask=i < T, other=0.0).to(tl.float64)
    total = tl.sum(acc, axis=0)
    scale = _row_scale(cnt_ptr, T, V, REDUCTION, HAS_MASK)
    tl.store(out_ptr, (total * scale).to(tl.float32))


_kl_rows = triton.autotune(configs=_configs(), key=_KEY,
                           prune_configs_by={"early_config_prune": _prune_configs})(_kl_rows_kernel)
# inplace: the gradient overwrites the student, which every benchmarked config reads again.
_kl_rows_inplace = triton.autotune(configs=_configs(), key=_KEY, restore_value=["g_ptr"],
                                   prune_configs_by={"early_config_prune": _prune_configs})(
                                       _kl_rows_kernel)


# ---------------------------------------------------------------------------------------------
# Host entry point
# ---------------------------------------------------------------------------------------------

def _check_inputs(student, teacher, row_mask, temperature, reduction, inplace) -> None:
    """The checks of epic::check_kl_inputs (same exception types)."""
    if student.dim() != 2:
        raise ValueError(f"student logits must be 2-D [T, V], got {tuple(student.shape)}")
    if teacher.shape != student.shape:
        raise ValueError(f"teacher logits must match student {tuple(student.shape)}, got "
                         f"{tuple(teacher.shape)}")
    if student.dtype not in _FLOATS:
        raise TypeError(f"student logits must be floating, got {student.dtype}")
    if teacher.dtype != student.dtype:
        raise TypeError(f"teacher logits must have the student's dtype {student.dtype}, got "
                        f"{teacher.dtype}")
    if teacher.device != student.device:
        raise ValueError(f"teacher logits must be on {student.device}, got {teacher.device}")
    if not (temperature > 0 and math.isfinite(temperature)
            and _FLT_MIN <= temperature * temperature <= _FLT_MAX):
        raise ValueError("temperature must be finite and > 0 with tau, 1/tau and tau^2 normal fp32 "
                         f"numbers (about 1.1e-19 <= tau <= 1.8e19), got {temperature}")
    if not REDUCE_NONE <= reduction <= REDUCE_BATCHMEAN:
        raise ValueError(f"reduction code must be 0..3, got {reduction}")
    if inplace and not (student.stride(1) == 1 or student.size(1) <= 1):
        raise ValueError("inplace needs student logits with a unit last stride")
    if row_mask is not None:
        if row_mask.dim() != 1 or row_mask.size(0) != student.size(0):
            raise ValueError(f"mask must be [T] = [{student.size(0)}], got {tuple(row_mask.shape)}")
        if row_mask.dtype != torch.bool:
            raise TypeError(f"mask must be bool, got {row_mask.dtype}")
        if row_mask.device != student.device:
            raise ValueError(f"mask must be on {student.device}, got {row_mask.device}")


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.size(1) <= 1 or t.stride(1) == 1 else t.contiguous()


def _f32_pair(x: float) -> tuple[float, float]:
    """x as hi + lo, both exact fp32 values (an fp64 value to ~48 bits through fp32 args)."""
    hi = float(np.float32(x))
    return hi, float(np.float32(x - hi))


@on_tensor_device
def kl_div(student: torch.Tensor, teacher: torch.Tensor, row_mask: torch.Tensor | None = None,
           temperature: float = 1.0, reduction: int = REDUCE_BATCHMEAN, reverse: bool = False,
           compute_grad: bool = True, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, grad): loss [T] fp32 (reduction 0) or 0-d fp32; grad = d loss / d student
    (already / normaliser, zero rows where row_mask is False) in the logits' dtype, written
    over `student` when inplace, or an empty tensor when compute_grad is False."""
    temperature = float(temperature)
    reduction = int(reduction)
    _check_inputs(student, teacher, row_mask, temperature, reduction, inplace)
    T, V = student.shape
    dev, dtype = student.device, student.dtype
    s = _unit_last_stride(student)
    t = _unit_last_stride(teacher)
    is_f64 = dtype == torch.float64
    if is_f64:
        tau_hi, tau_lo = _f32_pair(temperature)
        itau_hi, itau_lo = _f32_pair(1.0 / temperature)
    else:  # the C++ kernel's fp32 tau and 1 / tau
        tau32 = np.float32(temperature)
        tau_hi, tau_lo = float(tau32), 0.0
        itau_hi, itau_lo = float(np.float32(1.0) / tau32), 0.0

    grad = (student if inplace else torch.empty((T, V), dtype=dtype, device=dev)) \
        if compute_grad else None
    loss_rows = torch.empty(T, dtype=torch.float32 if reduction == REDUCE_NONE else torch.float64,
                            device=dev)
    has_mask = row_mask is not None
    cnt = row_mask.sum() if has_mask else None  # int64 on the device: no sync
    if T > 0 and V > 0:
        mask_arg = row_mask.contiguous().view(torch.uint8) if has_mask else loss_rows
        g = grad if compute_grad else s  # never written when HAS_GRAD is False
        kernel = _kl_rows_inplace if (compute_grad and inplace) else _kl_rows
        kernel[(T,)](s, t, g, mask_arg, cnt if has_mask else loss_rows, loss_rows, T, V,
                     s.stride(0), t.stride(0), g.stride(0), tau_hi, tau_lo, itau_hi, itau_lo,
                     _t_key(T), REDUCTION=reduction, REVERSE=bool(reverse), HAS_MASK=has_mask,
                     HAS_GRAD=bool(compute_grad), IS_F64=is_f64,
                     ACC=tl.float64 if is_f64 else tl.float32)
    elif T > 0:  # V == 0: every row's KL is an empty sum
        loss_rows.zero_()
    if reduction == REDUCE_NONE:
        loss = loss_rows
    else:
        loss = torch.empty((), dtype=torch.float32, device=dev)
        _kl_total_kernel[(1,)](loss_rows, loss, cnt if has_mask else loss_rows, T, V,
                               REDUCTION=reduction, HAS_MASK=has_mask,
                               BLOCK=256 if INTERPRET else 1024, num_warps=1 if INTERPRET else 4)
    if grad is None:
        grad = torch.empty(0, dtype=dtype, device=dev)
    return loss, grad
