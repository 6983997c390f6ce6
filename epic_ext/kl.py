"""Teacher-student KL divergence, forward and backward in one pass.

`kl_div(student_logits, teacher_logits)` computes tau^2 KL(p_teacher || p_student) (or the
reverse direction) over rows of logits, p = softmax(logits / tau). The kernel computes the
gradient w.r.t. the student logits while it computes the loss and stores it in the logits'
dtype (optionally over the student logits themselves), so the backward is one scaling by
grad_output. No [T, V] fp32 tensor is materialised; the normaliser is counted on the device.

`fused_linear_kl` (epic_ext/kl_linear.py) does the same from hidden states and a shared LM
head, a chunk of rows at a time, so only one chunk of logits ever exists.

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
from . import reference as R
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


# The kernels compute in fp32 with tau, 1 / tau and tau^2: all three must be normal fp32 numbers,
# i.e. tau^2 in [FLT_MIN, FLT_MAX] (about 1.1e-19 <= tau <= 1.8e19).
_FLT_MIN = 2.0 ** -126
_FLT_MAX = (2.0 - 2.0 ** -23) * 2.0 ** 127
NAN_POLICIES = ("propagate", "raise")


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
    tau = float(temperature)
    if not (math.isfinite(tau) and tau > 0 and _FLT_MIN <= tau * tau <= _FLT_MAX):
        raise ValueError("temperature must be finite and > 0 with tau, 1/tau and tau^2 normal fp32 "
                         f"numbers (about 1.1e-19 <= tau <= 1.8e19), got {temperature}")
    return tau


def _check_options(temperature, reduction, direction,
                   nan_policy="propagate") -> tuple[float, int, bool]:
    tau = _check_temperature(temperature)
    if reduction not in REDUCTION_CODES:
        raise ValueError(f"reduction must be one of {KL_REDUCTIONS}, got {reduction!r}")
    if direction not in ("forward", "reverse"):
        raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be 'propagate' or 'raise', got {nan_policy!r}")
    return tau, REDUCTION_CODES[reduction], direction == "reverse"


def _first_row(rows: Tensor, lead) -> Optional[tuple]:
    """The leading index of the first True entry of a flat [T] bool tensor (None if none)."""
    hit = rows.nonzero()
    if hit.numel() == 0:
        return None
    flat = int(hit[0, 0])
    index = []
    for size in reversed(tuple(lead)):
        index.append(flat % size)
        flat //= size
    return tuple(reversed(index))


def _raise_nan_loss(op: str, culprits: list, row_mask: Optional[Tensor], lead) -> None:
    """nan_policy="raise" found a NaN loss: name the input (and its first selected row) at
    fault. culprits: (what is wrong, [T] bool rows where it is), the first match wins."""
    for what, bad in culprits:
        if row_mask is not None:
            bad = bad & row_mask
        where = _first_row(bad, lead)
        if where is not None:
            raise ValueError(f"{op}: the loss is NaN: {what}, first at row {list(where)} "
                             "(nan_policy='raise')")
    raise ValueError(f"{op}: the loss is NaN (nan_policy='raise')")


_UNDEFINED = ("has a selected row whose softmax is undefined (a NaN or +inf logit, or every "
              "logit -inf)")


def _undefined_rows_of(logits: Tensor, tau: float) -> Tensor:
    """[T] rows of one side whose softmax is undefined (error path of nan_policy="raise")."""
    return R.kl_undefined_rows(logits, logits, tau)


# --------------------------------------------------------------------------- public API

def kl_div(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
           labels: Tensor | None = None, ignore_index: int = -100, temperature: float = 1.0,
           reduction: str = "batchmean", direction: str = "forward", inplace: bool = False,
           nan_policy: str = "propagate", backend: str | None = None) -> Tensor:
    """tau^2 KL(p_teacher || p_student) over rows of logits (direction="reverse": KL(p_s || p_t)).

    Logits [..., V] in fp32/fp16/bf16 (fp32 math); rows are every leading index. Rows are
    selected by `mask` (bool, the leading shape) or by `labels != ignore_index`; other rows
    contribute nothing, whatever they hold. reduction: "batchmean" (sum / selected rows, the
    distillation default), "sum", "mean" (sum / (rows * V)), "none" (per-row loss of the leading
    shape). With no row selected the loss is 0 and so is the gradient. The teacher receives no
    gradient. inplace=True writes the gradient over the student logits (saves one [T, V] buffer;
    eager only: use it when nothing else needs those logits afterwards).
    temperature: tau, with tau, 1/tau and tau^2 normal fp32 numbers (about 1.1e-19..1.8e19).

    Non-finite logits: a -inf logit is legal (probability 0). A selected row whose softmax is
    undefined (a NaN or +inf logit in the student or the teacher row, or every logit -inf) gives
    a NaN loss for that row and a NaN gradient row (IEEE propagation, as torch's kl_div), on
    every backend. nan_policy="raise" instead raises a ValueError naming the input when the loss
    is NaN; it reads the loss back (one host synchronisation, only then)."""
    _check_logits(student_logits, teacher_logits)
    tau, code, reverse = _check_options(temperature, reduction, direction, nan_policy)
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
    if nan_policy == "raise" and bool(torch.isnan(loss).any()):
        _raise_nan_loss("kl_div",
                        [(f"student_logits {_UNDEFINED}", _undefined_rows_of(student, tau)),
                         (f"teacher_logits {_UNDEFINED}", _undefined_rows_of(teacher, tau))],
                        row_mask, lead)
    return loss.reshape(lead) if code == 0 else loss
