"""`fused_linear_kl`: the LM head and the teacher-student KL (epic_ext/kl.py) a chunk of rows at a
time, so only one chunk of logits ever exists; the gradients w.r.t. the student hidden states,
the weight and the bias are accumulated chunk by chunk during the forward."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _backend
from .kl import _FLOATS, _check_options, _kl_impl, _raise_nan_loss, _rows_mask

_HALF = (torch.float16, torch.bfloat16)
# Default chunk: about this many bytes per [chunk, V] logits tensor (student and teacher each),
# in the logits' own dtype, rounded down to whole GEMM tiles (see _default_chunk).
_CHUNK_LOGITS_BYTES = 64 << 20
# The CPU fallback of the weight-gradient GEMM converts column slices of the chunk's gradient
# of at most this many elements (16 MiB of fp32) to the accumulator's dtype, never a whole
# default-sized chunk (fewer, larger slices run faster: 1 << 20 was 20% slower at H = 512).
_F32_SLICE_ELEMS = 1 << 22
# Devices where torch's fp16/bf16 GEMM with an fp32 output (mm / addmm out_dtype=float32, tensor
# cores, fp32 accumulation, no rounding of the product) is known to work; torch 2.14 registers
# aten::mm.dtype / aten::addmm.dtype for CUDA only. A device leaves the set the first time the
# call is refused (an older torch), and the fallback below runs from then on.
_F32_OUT_GEMM = {"cuda"}


def _default_chunk(V: int, logits_dtype: torch.dtype) -> int:
    """Rows per chunk: _CHUNK_LOGITS_BYTES of logits in their own dtype, rounded down to a
    multiple of 256 rows (or 128) so that the chunk GEMMs run whole tiles; at least 1."""
    rows = _CHUNK_LOGITS_BYTES // (max(V, 1) * logits_dtype.itemsize)
    for tile in (256, 128):
        if rows >= tile:
            return rows - rows % tile
    return max(1, rows)


def _logits_dtype(h: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype F.linear gives the logits: autocast's when it is on, else the promoted one."""
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return torch.promote_types(h.dtype, weight.dtype)


def _f32_out_gemm(g: Tensor) -> bool:
    return g.dtype in _HALF and g.device.type in _F32_OUT_GEMM


def _rows_grad_into(out: Tensor, g: Tensor, w: Tensor, scale: Tensor) -> None:
    """out = (g @ w) * scale: the GEMM in g's dtype with fp32 accumulation, scale (a 0-d fp32 /
    fp64 device tensor, 1 / normaliser) applied before the one rounding to out's dtype, so it
    is never rounded to bf16 itself."""
    if _f32_out_gemm(g):
        try:
            torch.mul(torch.mm(g, w, out_dtype=torch.float32), scale, out=out)
            return
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, NotImplementedError, TypeError):
            _F32_OUT_GEMM.discard(g.device.type)
    # fp32 / fp64, or no fp32-output GEMM (the CPU): the product in g's dtype (fp32
    # accumulation inside the GEMM, one rounding), then scaled in fp32: torch's CPU kernels
    # read a 0-d fp32 tensor unrounded when they multiply a bf16 / fp16 tensor by it.
    torch.mul(torch.mm(g, w), scale, out=out)


def _accumulate_wgrad(acc: Tensor, g_t: Tensor, h: Tensor) -> None:
    """acc (fp32 / fp64, [V, H]) += g_t @ h with g_t = g^T [V, rows], h [rows, H] in the logits'
    dtype: the product is never rounded to that dtype and no wider copy of the chunk is made."""
    if g_t.dtype == acc.dtype:
        acc.addmm_(g_t, h)
        return
    if _f32_out_gemm(g_t) and acc.dtype == torch.float32:
        try:
            torch.addmm(acc, g_t, h, out_dtype=torch.float32, out=acc)
            return
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, NotImplementedError, TypeError):
            _F32_OUT_GEMM.discard(g_t.device.type)
    # Fallback (the CPU: aten::addmm.dtype is CUDA-only in torch 2.14, and bf16 GEMMs without
    # AVX512-BF16 / AMX are slower than fp32 ones anyway): widen [slice of V, rows] blocks of
    # the gradient, at most _F32_SLICE_ELEMS elements each, and the [rows, H] hidden states.
    h_acc = h.to(acc.dtype)
    step = max(1, _F32_SLICE_ELEMS // max(1, g_t.shape[1]))
    for v0 in range(0, g_t.shape[0], step):
        acc[v0:v0 + step].addmm_(g_t[v0:v0 + step].to(acc.dtype), h_acc)


def _accumulate_bgrad(acc: Tensor, g: Tensor) -> None:
    """acc [V] += column sums of g [rows, V], summed in acc's dtype. CUDA's reduction casts on
    the fly; the CPU one would widen the whole chunk first, so there it goes by column slices."""
    if g.dtype == acc.dtype or g.device.type != "cpu":
        acc += g.sum(0, dtype=acc.dtype)
        return
    step = max(1, _F32_SLICE_ELEMS // max(1, g.shape[0]))
    for v0 in range(0, g.shape[1], step):
        acc[v0:v0 + step] += g[:, v0:v0 + step].to(acc.dtype).sum(0)


# Devices whose elementwise kernels read a 0-d fp32 tensor unrounded when they multiply a 16-bit
# tensor by it (torch's CPU kernels take it as a scalar in fp32).
_EXACT_SCALAR_MUL = {"cpu"}


def _scale_(t: Tensor, scale: Tensor) -> Tensor:
    """t *= scale (a 0-d fp32 / fp64 tensor on t's device) without rounding scale to t's dtype.
    CUDA's elementwise kernels cast a 0-d device tensor to the common (fp16 / bf16) dtype, so
    there 16-bit tensors are scaled through fp32 in row blocks of at most _F32_SLICE_ELEMS."""
    if t.dtype not in _HALF or t.device.type in _EXACT_SCALAR_MUL or t.numel() == 0:
        return t.mul_(scale)
    flat = t.view(-1, t.shape[-1]) if t.dim() > 1 else t.view(1, -1)
    step = max(1, _F32_SLICE_ELEMS // max(1, flat.shape[1]))
    for r0 in range(0, flat.shape[0], step):
        block = flat[r0:r0 + step]
        block.copy_(block.float().mul_(scale))
    return t


class _FusedLinearKL(torch.autograd.Function):
    """Chunked LM head + KL: gradients w.r.t. the student hidden states, weight and bias are
    computed chunk by chunk during the forward; backward scales them by grad_output.

    Per chunk: logits = h W^T + b for both sides (in the logits' dtype), the KL kernel with
    reduction "sum" writes d(chunk sum) / d student logits over the student logits, then
    grad_h[chunk] = (g W) / normaliser (fp32 GEMM output scaled, rounded once), grad_W += g^T h
    and grad_b += sum g into fp32 accumulators (fp64 for fp64), scaled by 1 / normaliser once at
    the end. The normaliser is counted on the device: no host synchronisation."""

    @staticmethod
    def forward(ctx, h_s, h_t, weight, bias, row_mask, tau, code, reverse, chunk):
        T = h_s.shape[0]
        V = weight.shape[0]
        need_w = weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        cdt = _logits_dtype(h_s, weight)
        acc = torch.float64 if cdt == torch.float64 else torch.float32
        # contiguous whatever h_s is (_scale_ views it as rows); every row is written below
        grad_h = (torch.empty(h_s.shape, dtype=h_s.dtype, device=h_s.device)
                  if h_s.requires_grad else None)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        # The whole batch's normaliser, on the device: chunks are reduced with "sum", their
        # gradients scaled by 1 / normaliser in acc (never rounded to the logits' dtype).
        if row_mask is None:
            rows = torch.full((), float(T), dtype=acc, device=h_s.device)
        else:
            rows = row_mask.sum().to(acc)
        one = torch.ones((), dtype=acc, device=h_s.device)
        norm = rows * V if code == 2 else rows if code == 3 else one
        inv = torch.where(norm > 0, 1.0 / norm.clamp(min=1), torch.zeros_like(norm))
        if code == 0:
            inv = torch.ones_like(inv)
        # Explicit casts to the logits' dtype (what autocast would do), then no autocast inside:
        # every GEMM below sees one dtype.
        w_c = weight.detach().to(cdt)
        b_c = None if bias is None else bias.detach().to(cdt)
        losses = []
        compute = grad_h is not None or need_w or need_b
        with torch.no_grad(), torch.autocast(h_s.device.type, enabled=False):
            for start in range(0, T, chunk):
                end = min(T, start + chunk)
                hs = h_s[start:end].detach().to(cdt)
                ht = h_t[start:end].to(cdt)
                m = None if row_mask is None else row_mask[start:end]
                logits_s = torch.nn.functional.linear(hs, w_c, b_c)
                logits_t = torch.nn.functional.linear(ht, w_c, b_c)
                loss, g = _kl_impl(logits_s, logits_t, m, tau, 0 if code == 0 else 1, reverse,
                                   compute, True)
                del logits_t
                losses.append(loss)
                if compute:
                    if grad_h is not None:
                        _rows_grad_into(grad_h[start:end], g, w_c, inv)
                    if need_w:
                        _accumulate_wgrad(grad_w, g.t(), hs)
                    if need_b:
                        _accumulate_bgrad(grad_b, g)
                del g, logits_s
            if code != 0:
                if need_w:
                    grad_w.mul_(inv)
                if need_b:
                    grad_b.mul_(inv)
        if code == 0:
            loss = torch.cat(losses) if losses else h_s.new_zeros(0, dtype=torch.float32)
        else:
            total = torch.stack(losses).sum() if losses else torch.zeros((), device=h_s.device)
            loss = (total * inv).float()
        ctx.per_row = code == 0
        ctx.consumed = False
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        if ctx.per_row:
            raise NotImplementedError("fused_linear_kl with reduction='none' is forward-only")
        if ctx.consumed:
            raise RuntimeError("epic_ext.fused_linear_kl: a second backward through the same loss "
                               "is not supported (stored gradients are scaled in place)")
        ctx.consumed = True
        g = grad_loss.to(torch.float64 if grad_w is not None and grad_w.dtype == torch.float64
                         else torch.float32)
        gh = _scale_(grad_h, g) if grad_h is not None else None
        gw = grad_w.mul_(g).to(ctx.dtypes[0]) if grad_w is not None else None
        gb = grad_b.mul_(g).to(ctx.dtypes[1]) if grad_b is not None else None
        return gh, None, gw, gb, None, None, None, None, None


def fused_linear_kl(student_hidden: Tensor, teacher_hidden: Tensor, weight: Tensor,
                    bias: Tensor | None = None, mask: Tensor | None = None, *,
                    labels: Tensor | None = None, ignore_index: int = -100,
                    temperature: float = 1.0, reduction: str = "batchmean",
                    direction: str = "forward", chunk_size: int | None = None,
                    nan_policy: str = "propagate", backend: str | None = None) -> Tensor:
    """kl_div(student_hidden @ weight.T + bias, teacher_hidden @ weight.T + bias) without ever
    holding more than `chunk_size` rows of logits (default: about 64 MiB per [chunk, V] logits
    tensor in the logits' dtype, a multiple of 256 rows when that fits). Hidden states [..., H];
    weight [V, H] (the shared LM head). Gradients flow to student_hidden, weight and bias; the
    teacher side gets none. reduction "none" is forward-only. The GEMMs of the backward run in
    the logits' dtype with fp32 accumulation; 1 / normaliser and grad_output are applied in fp32.
    Non-finite values, temperature and nan_policy: as kl_div (a row whose logits' softmax is
    undefined makes the loss NaN; "raise" names the input holding non-finite values).
    """
    for name, t in (("student_hidden", student_hidden), ("teacher_hidden", teacher_hidden),
                    ("weight", weight)):
        if not isinstance(t, Tensor) or t.dtype not in _FLOATS:
            raise TypeError(f"{name} must be a floating torch.Tensor")
    if bias is not None and (not isinstance(bias, Tensor) or bias.dtype not in _FLOATS):
        raise TypeError("bias must be a floating torch.Tensor or None")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H], got {list(weight.shape)}")
    if student_hidden.dim() < 1:
        raise ValueError("student_hidden must be [..., H], got a 0-d tensor")
    if teacher_hidden.shape != student_hidden.shape:
        raise ValueError(f"teacher_hidden must match student_hidden {list(student_hidden.shape)}, "
                         f"got {list(teacher_hidden.shape)}")
    H = student_hidden.shape[-1]
    if weight.shape[1] != H:
        raise ValueError(f"weight must be [V, H] with H = {H} (the hidden states' last "
                         f"dimension), got {list(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {list(bias.shape)}")
    for name, t in (("teacher_hidden", teacher_hidden), ("weight", weight), ("bias", bias)):
        if t is not None and t.device != student_hidden.device:
            raise ValueError(f"{name} must be on {student_hidden.device}, got {t.device}")
    tau, code, reverse = _check_options(temperature, reduction, direction, nan_policy)
    lead = student_hidden.shape[:-1]
    row_mask = _rows_mask(mask, labels, ignore_index, lead, student_hidden.device)
    rows = math.prod(lead)
    h_s, h_t = student_hidden.reshape(rows, H), teacher_hidden.detach().reshape(rows, H)
    V = weight.shape[0]
    if chunk_size is None:
        chunk_size = _default_chunk(V, _logits_dtype(h_s, weight))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if backend is None:
        loss = _FusedLinearKL.apply(h_s, h_t, weight, bias, row_mask, tau, code, reverse, chunk_size)
    else:
        with _backend.use_backend(backend):
            loss = _FusedLinearKL.apply(h_s, h_t, weight, bias, row_mask, tau, code, reverse,
                                        chunk_size)
    if nan_policy == "raise" and bool(torch.isnan(loss).any()):
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and not bool(torch.isfinite(t).all()):
                raise ValueError(f"fused_linear_kl: the loss is NaN: {name} holds NaN or inf "
                                 "values (nan_policy='raise')")
        named = [(f"{name} has a selected row with NaN or inf values",
                  ~torch.isfinite(x).all(dim=-1)) for name, x in (("student_hidden", h_s),
                                                                   ("teacher_hidden", h_t))]
        named.append(("the logits h @ weight.T (+ bias) of a selected row are not finite",
                      torch.ones(rows, dtype=torch.bool, device=h_s.device)))
        _raise_nan_loss("fused_linear_kl", named, row_mask, lead)
    return loss.reshape(lead) if code == 0 else loss
