"""Teacher-student KL divergence, forward and backward in one pass, and its fused-linear variant.

`kl_div(student_logits, teacher_logits)` computes tau^2 KL(p_teacher || p_student) (or the
reverse direction) over rows of logits, p = softmax(logits / tau). The kernel computes the
gradient w.r.t. the student logits while it computes the loss and stores it in the logits'
dtype (optionally over the student logits themselves), so the backward is one scaling by
grad_output. No [T, V] fp32 tensor is materialised; the normaliser is counted on the device.

`fused_linear_kl(student_hidden, teacher_hidden, weight)` does the same from hidden states and a
shared LM head, a chunk of rows at a time, so only one chunk of logits ever exists.

The op `epic_ext::kl_div` is registered with torch.library (fake kernel + autograd), so
torch.compile traces through `kl_div` (not through the in-place variant).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from . import _backend
from .reference import KL_REDUCTIONS

REDUCTION_CODES = {"none": 0, "sum": 1, "mean": 2, "batchmean": 3}
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _kl_impl(student: Tensor, teacher: Tensor, row_mask: Optional[Tensor], temperature: float,
             reduction: int, reverse: bool, compute_grad: bool, inplace: bool = False):
    fn, _ = _backend.kernel("kl_div", student.device)
    return fn(student, teacher, row_mask, temperature, reduction, reverse, compute_grad, inplace)


@torch.library.custom_op("epic_ext::kl_div", mutates_args=())
def _kl_div(student: Tensor, teacher: Tensor, row_mask: Optional[Tensor], temperature: float,
            reduction: int, reverse: bool, compute_grad: bool) -> tuple[Tensor, Tensor]:
    return _kl_impl(student, teacher, row_mask, temperature, reduction, reverse, compute_grad)


@_kl_div.register_fake
def _(student, teacher, row_mask, temperature, reduction, reverse, compute_grad):
    T = student.shape[0]
    loss = student.new_empty((T,) if reduction == 0 else (), dtype=torch.float32)
    grad = student.new_empty(student.shape if compute_grad else (0,))
    return loss, grad


def _kl_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.per_row = inputs[4] == 0
    ctx.consumed = False
    ctx.set_materialize_grads(False)  # the gradient output is never differentiated: no zeros


def _scale_stored_grad(ctx, grad, grad_loss):
    """grad * grad_output, written over the stored gradient so that the backward allocates no
    second [T, V] buffer. That buffer is then spent: a second backward through the same loss
    (retain_graph=True) would be wrong, so it raises instead."""
    scale = (grad_loss.unsqueeze(-1) if ctx.per_row else grad_loss).to(grad.dtype)
    if torch.compiler.is_compiling():
        return grad * scale
    if ctx.consumed:
        raise RuntimeError("epic_ext.kl_div: a second backward through the same loss is not "
                           "supported (the gradient stored by the forward is scaled in place); "
                           "recompute the loss instead of using retain_graph=True")
    ctx.consumed = True
    return grad.mul_(scale)


def _kl_backward(ctx, grad_loss, _grad_of_grad):
    (grad,) = ctx.saved_tensors
    return _scale_stored_grad(ctx, grad, grad_loss), None, None, None, None, None, None


_kl_div.register_autograd(_kl_backward, setup_context=_kl_setup)


class _KLEager(torch.autograd.Function):
    """Eager autograd path: the only [T, V] buffer is the gradient the forward computed (or the
    student logits themselves with inplace=True); backward scales it in place and hands it over.
    (The registered op's autograd wrapper costs one more buffer; it serves torch.compile.)"""

    @staticmethod
    def forward(ctx, student, teacher, row_mask, temperature, reduction, reverse, inplace):
        loss, grad = _kl_impl(student.detach(), teacher, row_mask, temperature, reduction, reverse,
                              True, inplace)
        ctx.save_for_backward(grad)
        ctx.per_row = reduction == 0
        ctx.consumed = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return _scale_stored_grad(ctx, grad, grad_loss), None, None, None, None, None, None


# --------------------------------------------------------------------------- validation

def _rows_mask(mask, labels, ignore_index, lead_shape, device) -> Optional[Tensor]:
    if mask is not None and labels is not None:
        raise ValueError("give mask or labels, not both")
    if labels is not None:
        if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError("labels must be an integer tensor")
        if tuple(labels.shape) != tuple(lead_shape):
            raise ValueError(f"labels must have shape {list(lead_shape)} (the logits without V), "
                             f"got {list(labels.shape)}")
        mask = labels != ignore_index
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask))}")
    if tuple(mask.shape) != tuple(lead_shape):
        raise ValueError(f"mask must have shape {list(lead_shape)} (the logits without V), "
                         f"got {list(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"mask must be on {device}, got {mask.device}")
    return mask.reshape(-1)


def _check_logits(student, teacher) -> None:
    for name, t in (("student_logits", student), ("teacher_logits", teacher)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name} must be float32/float16/bfloat16/float64, got {t.dtype}")
        if t.dim() < 1:
            raise ValueError(f"{name} must have a vocabulary dimension, got a 0-d tensor")
    if teacher.shape != student.shape:
        raise ValueError(f"teacher_logits must match student_logits {list(student.shape)}, "
                         f"got {list(teacher.shape)}")
    if teacher.dtype != student.dtype:
        raise TypeError(f"teacher_logits must be {student.dtype} like student_logits, got {teacher.dtype}")
    if teacher.device != student.device:
        raise ValueError(f"teacher_logits must be on {student.device}, got {teacher.device}")


def _check_options(temperature, reduction, direction) -> tuple[float, int, bool]:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if reduction not in REDUCTION_CODES:
        raise ValueError(f"reduction must be one of {KL_REDUCTIONS}, got {reduction!r}")
    if direction not in ("forward", "reverse"):
        raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
    return float(temperature), REDUCTION_CODES[reduction], direction == "reverse"


# --------------------------------------------------------------------------- public API

def kl_div(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
           labels: Tensor | None = None, ignore_index: int = -100, temperature: float = 1.0,
           reduction: str = "batchmean", direction: str = "forward", inplace: bool = False,
           backend: str | None = None) -> Tensor:
    """tau^2 KL(p_teacher || p_student) over rows of logits (direction="reverse": KL(p_s || p_t)).

    Logits [..., V] in fp32/fp16/bf16 (fp32 math); rows are every leading index. Rows are
    selected by `mask` (bool, the leading shape) or by `labels != ignore_index`; other rows
    contribute nothing. reduction: "batchmean" (sum / selected rows, the distillation default),
    "sum", "mean" (sum / (rows * V)), "none" (per-row loss of the leading shape). With no row
    selected the loss is 0 and so is the gradient. The teacher receives no gradient.
    inplace=True writes the gradient over the student logits (saves one [T, V] buffer; eager
    only: use it when nothing else needs those logits afterwards)."""
    _check_logits(student_logits, teacher_logits)
    tau, code, reverse = _check_options(temperature, reduction, direction)
    lead = student_logits.shape[:-1]
    V = student_logits.shape[-1]
    row_mask = _rows_mask(mask, labels, ignore_index, lead, student_logits.device)
    rows = math.prod(lead)  # explicit: reshape(-1, 0) is ambiguous when V == 0
    student = student_logits.reshape(rows, V)
    teacher = teacher_logits.reshape(rows, V)
    wants_grad = torch.is_grad_enabled() and student_logits.requires_grad

    def run():
        compiling = torch.compiler.is_compiling()
        if inplace and compiling:
            raise ValueError("inplace=True is eager-only; use inplace=False under torch.compile")
        if compiling:
            return _kl_div(student, teacher, row_mask, tau, code, reverse, wants_grad)[0]
        if not wants_grad:
            return _kl_impl(student, teacher, row_mask, tau, code, reverse, False)[0]
        if inplace and (student.data_ptr() != student_logits.data_ptr() or not student.is_contiguous()):
            raise ValueError("inplace=True needs contiguous student_logits")
        return _KLEager.apply(student, teacher, row_mask, tau, code, reverse, inplace)

    if backend is None:
        loss = run()
    else:
        with _backend.use_backend(backend):
            loss = run()
    return loss.reshape(lead) if code == 0 else loss


class _FusedLinearKL(torch.autograd.Function):
    """Chunked LM head + KL: gradients w.r.t. the student hidden states, weight and bias are
    accumulated chunk by chunk during the forward; backward scales them by grad_output."""

    @staticmethod
    def forward(ctx, h_s, h_t, weight, bias, row_mask, tau, code, reverse, chunk):
        T = h_s.shape[0]
        need_w = weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        grad_h = torch.zeros_like(h_s) if h_s.requires_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        # The normaliser of the whole batch, on the device: chunks are reduced with "sum" and
        # their gradients scaled by 1 / normaliser.
        if row_mask is None:
            rows = torch.full((), float(T), device=h_s.device)
        else:
            rows = row_mask.sum().float()
        V = weight.shape[0]
        norm = rows * V if code == 2 else rows if code == 3 else torch.ones((), device=h_s.device)
        inv = torch.where(norm > 0, 1.0 / norm.clamp(min=1), torch.zeros_like(norm))
        if code == 0:
            inv = torch.ones_like(inv)
        losses = []
        compute = grad_h is not None or need_w or need_b
        for start in range(0, T, chunk):
            end = min(T, start + chunk)
            hs, ht = h_s[start:end], h_t[start:end]
            m = None if row_mask is None else row_mask[start:end]
            with torch.no_grad():
                logits_s = torch.nn.functional.linear(hs, weight, bias)
                logits_t = torch.nn.functional.linear(ht, weight, bias)
                loss, g = _kl_impl(logits_s, logits_t, m, tau, 0 if code == 0 else 1, reverse,
                                   compute, True)
                del logits_t
                losses.append(loss)
                if compute:
                    g = g.mul_(inv.to(g.dtype)) if code != 0 else g
                    if grad_h is not None:
                        grad_h[start:end] = g @ weight
                    if need_w:
                        grad_w.addmm_(g.t().float(), hs.float())
                    if need_b:
                        grad_b += g.float().sum(0)
        if code == 0:
            loss = torch.cat(losses) if losses else h_s.new_zeros(0, dtype=torch.float32)
        else:
            total = torch.stack(losses).sum() if losses else torch.zeros((), device=h_s.device)
            loss = total * inv
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
        g = grad_loss
        gh = grad_h.mul_(g.to(grad_h.dtype)) if grad_h is not None else None
        gw = grad_w.mul_(g).to(ctx.dtypes[0]) if grad_w is not None else None
        gb = grad_b.mul_(g).to(ctx.dtypes[1]) if grad_b is not None else None
        return gh, None, gw, gb, None, None, None, None, None


def fused_linear_kl(student_hidden: Tensor, teacher_hidden: Tensor, weight: Tensor,
                    bias: Tensor | None = None, mask: Tensor | None = None, *,
                    labels: Tensor | None = None, ignore_index: int = -100,
                    temperature: float = 1.0, reduction: str = "batchmean",
                    direction: str = "forward", chunk_size: int | None = None,
                    backend: str | None = None) -> Tensor:
    """kl_div(student_hidden @ weight.T + bias, teacher_hidden @ weight.T + bias) without ever
    holding more than `chunk_size` rows of logits (default: about 64 MiB of fp32 logits per
    chunk). Hidden states [..., H]; weight [V, H] (the shared LM head). Gradients flow to
    student_hidden, weight and bias; the teacher side gets none. reduction "none" is forward-only.
    """
    for name, t in (("student_hidden", student_hidden), ("teacher_hidden", teacher_hidden),
                    ("weight", weight)):
        if not isinstance(t, Tensor) or t.dtype not in _FLOATS:
            raise TypeError(f"{name} must be a floating torch.Tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H], got {list(weight.shape)}")
    H = weight.shape[1]
    if student_hidden.shape[-1] != H or teacher_hidden.shape != student_hidden.shape:
        raise ValueError(f"student_hidden and teacher_hidden must both be [..., {H}], got "
                         f"{list(student_hidden.shape)} and {list(teacher_hidden.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {list(bias.shape)}")
    tau, code, reverse = _check_options(temperature, reduction, direction)
    lead = student_hidden.shape[:-1]
    row_mask = _rows_mask(mask, labels, ignore_index, lead, student_hidden.device)
    rows = math.prod(lead)
    h_s, h_t = student_hidden.reshape(rows, H), teacher_hidden.detach().reshape(rows, H)
    V = weight.shape[0]
    if chunk_size is None:
        chunk_size = max(1, (64 << 20) // (4 * max(V, 1)))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if backend is None:
        loss = _FusedLinearKL.apply(h_s, h_t, weight, bias, row_mask, tau, code, reverse, chunk_size)
    else:
        with _backend.use_backend(backend):
            loss = _FusedLinearKL.apply(h_s, h_t, weight, bias, row_mask, tau, code, reverse,
                                        chunk_size)
    return loss.reshape(lead) if code == 0 else loss
