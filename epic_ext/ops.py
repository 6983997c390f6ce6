"""Public kernel API of epic_ext and its torch.library registration.

Each op is a `torch.library.custom_op` (schema inferred from the type hints) with a fake kernel
(so `torch.compile(fullgraph=True)` traces through it) and, where differentiable, an autograd
formula. The real kernel is chosen per call by `epic_ext._backend` (C++ CPU, CUDA, Triton or the
reference). The public functions at the bottom validate arguments once, up front, so every
backend raises the same ValueError / TypeError naming the bad argument.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _backend, reference
from .reference import MERGE_CODES, MERGE_NONE, MERGE_WEIGHTED

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Backends whose C++ entries check shapes, dtypes and devices against each other themselves
# (csrc/include/epic/checks.h, messages naming the same argument): for them those checks are not
# repeated in Python (each costs a few hundred ns a call); the other backends run them in the
# op's implementation, so every backend still raises the same ValueError / TypeError.
_CHECKED_NATIVELY = frozenset(("cpu", "cuda"))


# --------------------------------------------------------------------------- custom ops

def _select_topk_impl(scores: Tensor, k: int) -> Tensor:
    fn, _ = _backend.kernel("select_topk", scores.device)
    return fn(scores, k)


def _on(backend: Optional[str], impl, *args):
    """impl(*args) with `backend` forced (None: as the calling thread has it). The registered ops
    take the forcing as their last argument: under torch.compile a forcing inside the compiled
    function (backend=, use_backend) exists only while tracing, and the op runs later."""
    if backend is None:
        return impl(*args)
    with _backend.use_backend(backend):
        return impl(*args)


@torch.library.custom_op("epic_ext::select_topk", mutates_args=())
def _select_topk(scores: Tensor, k: int, backend: Optional[str] = None) -> Tensor:
    return _on(backend, _select_topk_impl, scores, k)


@_select_topk.register_fake
def _(scores, k, backend=None):
    return scores.new_empty((scores.shape[0], k), dtype=torch.int64)


def _iqr_select_impl(scores: Tensor, whisker: float, pooled: bool, max_k: int) -> tuple[Tensor, Tensor]:
    fn, _ = _backend.kernel("iqr_select", scores.device)
    return fn(scores, whisker, pooled, max_k)


@torch.library.custom_op("epic_ext::iqr_select", mutates_args=())
def _iqr_select(scores: Tensor, whisker: float, pooled: bool, max_k: int,
                backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    return _on(backend, _iqr_select_impl, scores, whisker, pooled, max_k)


@_iqr_select.register_fake
def _(scores, whisker, pooled, max_k, backend=None):
    B, N = scores.shape
    return scores.new_empty((B,), dtype=torch.int64), scores.new_empty((B, N), dtype=torch.int64)


def _check_index_range(idx: Tensor, counts: Optional[Tensor], n: int) -> None:
    """Range check of user-given indices for backends that do not raise from inside the kernel
    (one device-to-host read on a GPU, hence only with check=True there; free on a CPU). Only
    the valid entries idx[b, :counts[b]] are checked: later ones are padding."""
    K = idx.shape[1]
    if counts is not None:
        bad_counts = (counts < 0) | (counts > K)
        valid = torch.arange(K, device=idx.device) < counts.view(-1, 1)
    else:
        bad_counts = torch.zeros((), dtype=torch.bool, device=idx.device)
        valid = torch.ones((), dtype=torch.bool, device=idx.device)
    bad_idx = valid & ((idx < 0) | (idx >= n))
    bad = torch.stack([bad_idx.any(), bad_counts.any()]).tolist()
    if bad[1]:
        raise ValueError(f"counts must lie in [0, K] = [0, {K}]")
    if bad[0]:
        raise ValueError(f"idx holds values out of range for N = {n}")


def _gather_merge_impl(tokens: Tensor, idx: Tensor, counts: Optional[Tensor], merge: int,
                       weights: Optional[Tensor], check_index: bool) -> Tensor:
    fn, name = _backend.kernel("gather_merge", tokens.device)
    if name not in _CHECKED_NATIVELY:
        _check_idx_like(idx, tokens)
        _check_weights(weights, tokens)
    if check_index and name != "cpu":  # the C++ CPU kernel raises while it reads idx
        _check_index_range(idx, counts, tokens.shape[1])
    return fn(tokens, idx, counts, merge, weights)


@torch.library.custom_op("epic_ext::gather_merge", mutates_args=())
def _gather_merge(tokens: Tensor, idx: Tensor, counts: Optional[Tensor], merge: int,
                  weights: Optional[Tensor], check_index: bool, backend: Optional[str] = None) -> Tensor:
    return _on(backend, _gather_merge_impl, tokens, idx, counts, merge, weights, check_index)


@_gather_merge.register_fake
def _(tokens, idx, counts, merge, weights, check_index, backend=None):
    B, _, D = tokens.shape
    return tokens.new_empty((B, idx.shape[1] + (merge != MERGE_NONE), D))


@torch.library.custom_op("epic_ext::gather_merge_backward", mutates_args=())
def _gather_merge_backward(grad_out: Tensor, idx: Tensor, counts: Optional[Tensor], merge: int,
                           weights: Optional[Tensor], n_tokens: int,
                           backend: Optional[str] = None) -> Tensor:
    # `backend`: the one the forward ran on, passed as an argument, since a forcing by `backend=`
    # or `use_backend` is per thread and autograd may run the backward on another thread.
    with _backend.use_backend(backend):
        fn, _ = _backend.kernel("gather_merge_backward", grad_out.device)
    return fn(grad_out.contiguous(), idx, counts, merge, weights, n_tokens)


@_gather_merge_backward.register_fake
def _(grad_out, idx, counts, merge, weights, n_tokens, backend=None):
    B, _, D = grad_out.shape
    return grad_out.new_empty((B, n_tokens, D))


def _compress_topk_impl(tokens: Tensor, scores: Tensor, k: int, merge: int,
                        weights: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    fn, name = _backend.kernel("compress_topk", tokens.device)
    if name not in _CHECKED_NATIVELY:
        _check_scores_like(scores, tokens)
        _check_weights(weights, tokens)
    return fn(tokens, scores, k, merge, weights)


@torch.library.custom_op("epic_ext::compress_topk", mutates_args=())
def _compress_topk(tokens: Tensor, scores: Tensor, k: int, merge: int,
                   weights: Optional[Tensor], backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    return _on(backend, _compress_topk_impl, tokens, scores, k, merge, weights)


@_compress_topk.register_fake
def _(tokens, scores, k, merge, weights, backend=None):
    B, _, D = tokens.shape
    return (tokens.new_empty((B, k + (merge != MERGE_NONE), D)),
            tokens.new_empty((B, k), dtype=torch.int64))


# --------------------------------------------------------------------------- autograd

def _weights_grad(grad_out, tokens, idx, counts, merge, weights):
    """d loss / d weights[b, n] = <grad of the merged row, tokens[b, n]> for dropped rows; NaN for
    every weight of an image whose indices or count are out of range (the forward's NaN rows)."""
    B, N, _ = tokens.shape
    n_valid, valid, bad = reference.index_plan(idx, counts, N)
    grad_merged = grad_out.gather(1, n_valid.view(B, 1, 1).expand(B, 1, grad_out.shape[2]))
    referenced = torch.zeros(B, N + 1, dtype=torch.bool, device=idx.device)
    referenced.scatter_(1, torch.where(valid, idx, torch.full_like(idx, N)), True)
    acc = torch.float64 if tokens.dtype == torch.float64 else torch.float32
    dots = torch.bmm(tokens.to(acc), grad_merged.to(acc).transpose(1, 2)).squeeze(-1)
    dots = torch.where(referenced[:, :N], torch.zeros_like(dots), dots)
    return dots.masked_fill(bad.view(B, 1), float("nan")).to(weights.dtype)


def _setup_gather(ctx, inputs, output):
    tokens, idx, counts, merge, weights = inputs[:5]
    ctx.merge, ctx.n_tokens = merge, tokens.shape[1]
    # The forward's backend: the op's own argument, else the forcing of this thread (setup_context
    # runs right after the forward, on its thread), resolved now.
    ctx.backend = inputs[6] or _backend.resolve(tokens.device)
    need_w = weights is not None and merge == MERGE_WEIGHTED and ctx.needs_input_grad[4]
    ctx.save_for_backward(idx, counts, weights, tokens if need_w else None)


def _gather_backward(ctx, grad_out, *unused):
    idx, counts, weights, tokens = ctx.saved_tensors
    grad_tokens = None
    if ctx.needs_input_grad[0]:
        grad_tokens = _gather_merge_backward(grad_out, idx, counts, ctx.merge, weights, ctx.n_tokens,
                                             ctx.backend)
    grad_w = None
    if tokens is not None:
        grad_w = _weights_grad(grad_out, tokens, idx, counts, ctx.merge, weights)
    return grad_tokens, grad_w


def _gather_merge_autograd(ctx, grad_out):
    grad_tokens, grad_w = _gather_backward(ctx, grad_out)
    return grad_tokens, None, None, None, grad_w, None, None


def _setup_compress(ctx, inputs, output):
    tokens, scores, k, merge, weights, backend = inputs
    _, idx = output
    _setup_gather(ctx, (tokens, idx, None, merge, weights, False, backend), None)


def _compress_autograd(ctx, grad_out, grad_idx):
    grad_tokens, grad_w = _gather_backward(ctx, grad_out)
    return grad_tokens, None, None, None, grad_w, None


_gather_merge.register_autograd(_gather_merge_autograd, setup_context=_setup_gather)
_compress_topk.register_autograd(_compress_autograd, setup_context=_setup_compress)
# The registered ops that take the forcing as their last argument (attn_scores, which also runs
# through _run, does not).
_FORCING_AS_ARGUMENT = frozenset((_select_topk, _iqr_select, _gather_merge, _compress_topk))


# --------------------------------------------------------------------------- validation

def _check_tensor(t, name: str, dims: int, floating: bool = True) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
    if floating and t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32/float16/bfloat16/float64, got {t.dtype}")


def _check_same_device(ref: Tensor, t: Tensor, name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} must be on {ref.device} like tokens, got {t.device}")


def _check_scores_like(scores: Tensor, tokens: Tensor) -> None:
    if tuple(scores.shape) != tuple(tokens.shape[:2]):
        raise ValueError(f"scores must be [B, N] = {list(tokens.shape[:2])}, got {list(scores.shape)}")
    _check_same_device(tokens, scores, "scores")


def _check_idx_like(idx: Tensor, tokens: Tensor) -> None:
    if idx.shape[0] != tokens.shape[0]:
        raise ValueError(f"idx must be [B, K] with B = {tokens.shape[0]}, got {list(idx.shape)}")
    _check_same_device(tokens, idx, "idx")


def _check_nan(scores: Tensor, nan_policy: str) -> None:
    if nan_policy == "lowest":
        return
    if nan_policy != "raise":
        raise ValueError(f"nan_policy must be 'lowest' or 'raise', got {nan_policy!r}")
    if torch.isnan(scores).any():  # one host read, only on request
        raise ValueError("scores contain NaN (nan_policy='raise')")


def resolve_k(k, n: int) -> int:
    """Token budget: an int in [0, n], or a float ratio in [0, 1] of n (rounded half up)."""
    if type(k) is int and 0 <= k <= n:  # the common case, without the ABC checks (~0.3 us)
        return k
    if isinstance(k, bool):
        raise TypeError(f"k must be an int, a float ratio or 'iqr', got bool {k}")
    if isinstance(k, numbers.Integral):
        if not 0 <= k <= n:
            raise ValueError(f"k must be in [0, N] = [0, {n}], got {k}")
        return int(k)
    if isinstance(k, numbers.Real):
        if not (0.0 <= k <= 1.0) or math.isnan(k):
            raise ValueError(f"k as a ratio must be in [0, 1], got {k}")
        return min(n, int(math.floor(k * n + 0.5)))
    raise TypeError(f"k must be an int, a float ratio or 'iqr', got {type(k).__name__}")


def _merge_code(merge: str, weights) -> int:
    if merge not in MERGE_CODES:
        raise ValueError(f"merge must be one of {sorted(MERGE_CODES)}, got {merge!r}")
    code = MERGE_CODES[merge]
    if code == MERGE_WEIGHTED and weights is None:
        raise ValueError("weights are required when merge='weighted'")
    if code != MERGE_WEIGHTED and weights is not None:
        raise ValueError(f"weights are only used with merge='weighted', got merge={merge!r}")
    return code


def _check_weights(weights, tokens: Tensor) -> None:
    if weights is None:
        return
    _check_tensor(weights, "weights", 2)
    if tuple(weights.shape) != tuple(tokens.shape[:2]):
        raise ValueError(f"weights must be [B, N] = {list(tokens.shape[:2])}, got {list(weights.shape)}")
    _check_same_device(tokens, weights, "weights")


def _check_max_k(max_k, n: int) -> int:
    if max_k is None:
        return -1
    if type(max_k) is int and 0 <= max_k <= n:  # without the ABC checks
        return max_k
    if isinstance(max_k, bool) or not isinstance(max_k, numbers.Integral):
        raise TypeError(f"max_k must be an int or None, got {type(max_k).__name__}")
    if not 0 <= max_k <= n:
        raise ValueError(f"max_k must be in [0, N] = [0, {n}], got {max_k}")
    return int(max_k)


def _check_whisker(whisker) -> float:
    if type(whisker) is float and 0.0 <= whisker < math.inf:  # without the ABC checks
        return whisker
    if isinstance(whisker, bool) or not isinstance(whisker, numbers.Real):
        raise TypeError(f"whisker must be a real number, got {type(whisker).__name__}")
    if not math.isfinite(whisker) or whisker < 0:
        raise ValueError(f"whisker must be finite and >= 0, got {whisker}")
    return float(whisker)


def _run(backend, registered, direct, *args, differentiable=()):
    """Call an op. In eager mode, when autograd has nothing to record, the backend kernel is
    called directly: the registered op's dispatch costs tens of microseconds, as much as a
    small selection kernel. Under torch.compile or with autograd, the registered op runs."""
    fn = direct
    if torch.compiler.is_compiling():
        fn = registered
    elif differentiable and torch.is_grad_enabled():
        for t in differentiable:  # a loop, not any(<generator>): a generator costs ~0.2 us
            if t is not None and t.requires_grad:
                fn = registered
                break
    if fn is registered and registered in _FORCING_AS_ARGUMENT:  # see _on
        args = (*args, backend or _backend.thread_forced())
    if backend is None:
        return fn(*args)
    with _backend.use_backend(backend):
        return fn(*args)


# --------------------------------------------------------------------------- public API

class IQRSelection(NamedTuple):
    counts: Tensor   # [B] int64: tokens kept per image
    indices: Tensor  # [B, N] int64 ascending, -1 after counts[b]; or a [B, N] bool mask


class Compressed(NamedTuple):
    tokens: Tensor            # [B, k (+1 merged), D]
    indices: Tensor           # [B, k] int64 kept indices, ascending (-1 padded when ragged)
    counts: Optional[Tensor]  # [B] int64 kept per image when the budget is adaptive, else None


def select_topk(scores: Tensor, k, *, nan_policy: str = "lowest", backend: str | None = None) -> Tensor:
    """Indices [B, k] of each row's k highest scores, in ascending (spatial) order.

    Ties go to the lower index; NaN ranks below every number (nan_policy="raise" rejects NaN with
    one host read). k: an int in [0, N] or a float ratio of N. No host synchronisation."""
    _check_tensor(scores, "scores", 2)
    _check_nan(scores, nan_policy)
    return _run(backend, _select_topk, _select_topk_impl, scores, resolve_k(k, scores.shape[1]))


def iqr_select(scores: Tensor, whisker: float = 1.5, *, pooled: bool = False, max_k: int | None = None,
               output: str = "indices", nan_policy: str = "lowest",
               backend: str | None = None) -> IQRSelection:
    """IQR outlier selection (PruMerge / TRIM rule) without a host sync.

    The fence is Q3 + whisker * (Q3 - Q1) with torch.quantile's linear quantiles over each row's
    non-NaN scores; row b keeps the counts[b] scores strictly above it. pooled=True reproduces
    TRIM / PruMerge: one fence over all B*N scores and floor(outliers / B) tokens for every image.
    max_k caps every count (those rows keep their max_k best). output="indices" gives indices
    padded with -1 to width N; output="mask" a [B, N] bool mask."""
    _check_tensor(scores, "scores", 2)
    _check_nan(scores, nan_policy)
    if output not in ("indices", "mask"):
        raise ValueError(f"output must be 'indices' or 'mask', got {output!r}")
    cap = -1 if max_k is None else _check_max_k(max_k, scores.shape[1])
    counts, indices = _run(backend, _iqr_select, _iqr_select_impl, scores,
                           _check_whisker(whisker), bool(pooled), cap)
    if output == "mask":
        B, N = scores.shape
        mask = torch.zeros(B, N + 1, dtype=torch.bool, device=scores.device)
        mask.scatter_(1, torch.where(indices < 0, torch.full_like(indices, N), indices), True)
        return IQRSelection(counts, mask[:, :N])
    return IQRSelection(counts, indices)


def gather_merge(tokens: Tensor, idx: Tensor, merge: str = "mean", weights: Tensor | None = None, *,
                 counts: Tensor | None = None, check: bool | None = None,
                 backend: str | None = None) -> Tensor:
    """Kept rows tokens[b, idx[b, j]] plus one merged row of the rows idx does not reference.

    merge="mean": their mean (zeros if none, N = 0 included); "weighted": sum of
    weights[b, n] * tokens[b, n] (unnormalised, PruMerge); "none": no extra row. With counts [B],
    only idx[b, :counts[b]] is valid (later entries are ignored padding, e.g. -1), the merged row
    sits at position counts[b] and later rows are zero. Each input row is read once;
    differentiable w.r.t. tokens (and weights).

    check: range check of idx / counts (ValueError naming them). None (default): on CPU tensors
    only, where it costs no host sync; True: on every device (one host read on a GPU); False:
    none in Python (the C++ CPU kernel still raises). Unchecked bad input never reads out of
    bounds: an image with a valid entry outside [0, N) or counts[b] outside [0, K] gets NaN in
    every output row and NaN gradients for its tokens."""
    _check_tensor(tokens, "tokens", 3)
    _check_tensor(idx, "idx", 2, floating=False)
    if idx.dtype != torch.int64:
        raise TypeError(f"idx must be int64, got {idx.dtype}")
    if counts is not None:  # (idx's and weights' shape and device: see _gather_merge_impl)
        _check_tensor(counts, "counts", 1, floating=False)
        if counts.dtype != torch.int64 or counts.shape[0] != tokens.shape[0]:
            raise ValueError(f"counts must be int64 [B] with B = {tokens.shape[0]}, got "
                             f"{counts.dtype} {list(counts.shape)}")
        _check_same_device(tokens, counts, "counts")
    code = _merge_code(merge, weights)
    if weights is not None:
        _check_tensor(weights, "weights", 2)
    if check is not None and not isinstance(check, bool):
        raise TypeError(f"check must be a bool or None, got {type(check).__name__}")
    check_index = tokens.is_cpu if check is None else check
    return _run(backend, _gather_merge, _gather_merge_impl, tokens, idx, counts, code, weights,
                check_index, differentiable=(tokens, weights))


def compress(tokens: Tensor, scores: Tensor, k, merge: str = "mean", *, weights: Tensor | None = None,
             whisker: float = 1.5, pooled: bool = False, max_k: int | None = None,
             nan_policy: str = "lowest", backend: str | None = None) -> Compressed:
    """Keep the best-scored visual tokens of each image and merge the rest: the headline call.

    tokens [B, N, D] (or [N, D]), scores [B, N] (or [N]); k: an int budget, a float ratio of N,
    or "iqr" (adaptive, see `iqr_select`; pooled=True is TRIM's rule). Returns
    Compressed(tokens [B, k + 1, D] with merge="mean"/"weighted" or [B, k, D] with "none",
    indices [B, k] ascending, counts). Fixed budgets run one fused kernel with no host sync.
    With k="iqr" the output width is the largest count, read back once to size the output,
    unless max_k is given (width max_k, no sync; rows are then padded after their merged row).
    Differentiable w.r.t. tokens (and weights)."""
    unbatched = isinstance(tokens, Tensor) and tokens.dim() == 2
    if unbatched:
        if not isinstance(scores, Tensor) or scores.dim() != 1:
            raise ValueError("with 2-D tokens [N, D], scores must be 1-D [N]")
        tokens, scores = tokens.unsqueeze(0), scores.unsqueeze(0)
        weights = weights.unsqueeze(0) if isinstance(weights, Tensor) else weights
    _check_tensor(tokens, "tokens", 3)
    _check_tensor(scores, "scores", 2)
    adaptive = isinstance(k, str)
    if adaptive or nan_policy != "lowest":  # else _compress_topk_impl (or C++) checks them
        _check_scores_like(scores, tokens)
    code = _merge_code(merge, weights)
    if adaptive:
        _check_weights(weights, tokens)
    elif weights is not None:
        _check_tensor(weights, "weights", 2)
    _check_nan(scores, nan_policy)
    N = tokens.shape[1]
    if adaptive:
        if k != "iqr":
            raise ValueError(f"k as a string must be 'iqr', got {k!r}")
        cap = _check_max_k(max_k, N)
        counts, indices = _run(backend, _iqr_select, _iqr_select_impl, scores,
                               _check_whisker(whisker), bool(pooled), cap)
        width = cap if cap >= 0 else (int(counts.max()) if counts.numel() else 0)
        indices = indices[:, :width]
        out = _run(backend, _gather_merge, _gather_merge_impl, tokens, indices, counts, code, weights,
                   False, differentiable=(tokens, weights))
        result = Compressed(out, indices, counts)
    else:
        if max_k is not None:
            raise ValueError("max_k only applies to k='iqr'")
        out, indices = _run(backend, _compress_topk, _compress_topk_impl, tokens, scores,
                            resolve_k(k, N), code, weights, differentiable=(tokens, weights))
        result = Compressed(out, indices, None)
    if unbatched:
        result = Compressed(result.tokens[0], result.indices[0],
                            None if result.counts is None else result.counts[0])
    return result
