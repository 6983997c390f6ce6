"""Independent fp64 oracles for the differential fuzz test (tests/test_fuzz.py).

Written from the README's semantics (and the decisions it records), deliberately not from
epic_ext/reference.py, so that the reference is held to the same oracle as the kernels. Everything
is computed in fp64 from the exact values the kernels receive (inputs already rounded to their
dtype), with Python loops where a loop is the obvious statement of the rule. Each oracle also
returns a "condition" S per output element (the sum of the magnitudes of the terms that form it),
which sizes the accumulation-error allowance of `close`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

F64 = torch.float64
# Relative error of one rounding to each output dtype (two half-ulps), as in conftest.TOLERANCES.
RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}


def acc_coeff(dtype: torch.dtype) -> float:
    """Accumulation-error allowance per unit of condition S: fp32 accumulation (fp64 for fp64
    inputs) with up to ~128 ulps of slack for summation order over the small shapes fuzzed."""
    return 2.0 ** -44 if dtype == F64 else 2.0 ** -17


def close(actual: torch.Tensor, exact: torch.Tensor, cond: torch.Tensor, dtype: torch.dtype,
          torch_err: float | None = None, acc_dtype: torch.dtype | None = None,
          extra: torch.Tensor | None = None) -> str | None:
    """None if `actual` matches the fp64 `exact`, else a description of the worst element.

    NaN must be NaN, +-inf the same inf. A finite element passes when
        |actual - exact| <= RTOL[dtype] |exact| + acc_coeff * S + 4 * tiny(dtype)
    (one rounding to the output dtype plus fp32 accumulation error scaled by the condition S;
    tiny: the larger of the dtype's smallest subnormal and the accumulation type's smallest normal),
    or, when `torch_err` is given (the max error of PyTorch's own computation in the same dtype),
    when the max error is at most 2 * torch_err (the flash-attention numerics contract).
    An exact value beyond the dtype's range may come out as the same-signed inf. `extra`: an
    absolute allowance added to the bound (first-order effect of inputs the op rounds to the
    dtype on the way, e.g. fused_linear_kl's logits)."""
    a = actual.detach().to("cpu", F64)
    e = exact.detach().to("cpu", F64)
    c = cond.detach().to("cpu", F64).expand_as(e) if cond is not None else torch.zeros_like(e)
    if a.shape != e.shape:
        return f"shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    if a.numel() == 0:
        return None
    nan_e, nan_a = torch.isnan(e), torch.isnan(a)
    if not torch.equal(nan_e, nan_a):
        where = (nan_e != nan_a).nonzero()[0].tolist()
        return (f"NaN mismatch at {where}: got {a[tuple(where)].item()!r}, "
                f"expected {e[tuple(where)].item()!r} ({int((nan_e != nan_a).sum())} elements)")
    fin = torch.finfo(dtype)
    ok = nan_e.clone()
    inf_e = torch.isinf(e)
    ok |= inf_e & (a == e)
    finite = ~nan_e & ~inf_e
    acc = acc_coeff(acc_dtype or dtype)
    # Absolute floor: the output dtype's smallest subnormal, or the accumulation type's smallest
    # normal (results below it may flush to zero, as GPU code with FTZ does).
    acc_fin = torch.finfo(F64 if (acc_dtype or dtype) == F64 else torch.float32)
    tiny = 4 * max(fin.smallest_normal * fin.eps, acc_fin.smallest_normal)
    err = (a - e).abs()
    bound = RTOL[dtype] * e.abs() + acc * c + tiny
    if extra is not None:
        bound = bound + extra.detach().to("cpu", F64).expand_as(e)
    ok |= finite & (err <= bound)
    # Beyond the output dtype's range: the rounded result may be inf.
    ok |= finite & (e.abs() > fin.max * (1 - RTOL[dtype])) & torch.isinf(a) & (a.sign() == e.sign())
    if bool(ok.all()):
        return None
    if torch_err is not None:
        ours = torch.where(finite, err, torch.zeros_like(err)).max().item()
        ok_inf = bool((ok | finite).all())
        if ok_inf and ours <= 2 * torch_err + tiny:
            return None
    bad = (~ok).nonzero()
    where = tuple(bad[0].tolist())
    excess = torch.where(ok, torch.zeros_like(err), err / bound.clamp(min=1e-300))
    excess = torch.nan_to_num(excess, nan=math.inf)  # inf expected, finite got: inf / inf
    worst = tuple((excess == excess.max()).nonzero()[0].tolist())
    extra = f", PyTorch's own {dtype} error {torch_err:.3g}" if torch_err is not None else ""
    return (f"{len(bad)} of {a.numel()} elements off; worst at {list(worst)}: "
            f"got {a[worst].item()!r}, expected {e[worst].item()!r} "
            f"(|err| {err[worst].item():.3g} > bound {bound[worst].item():.3g}{extra}); "
            f"first at {list(where)}")


# --------------------------------------------------------------------------- selection

def _rank_key(v: float, n: int):
    """Sort key: higher ranks first, ties to the lower index, NaN below every number;
    -0.0 == +0.0 holds in Python's comparison already."""
    return (1, 0.0, n) if math.isnan(v) else (0, -v, n)


def ranked(row: list[float]) -> list[int]:
    return sorted(range(len(row)), key=lambda n: _rank_key(row[n], n))


def score_rows(scores: torch.Tensor) -> list[list[float]]:
    """Scores as the kernels rank them: rounded to fp32 (fp64 scores included)."""
    return scores.detach().cpu().float().double().tolist()


def topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[B, k] int64: each row's k best, ascending."""
    rows = score_rows(scores)
    out = [sorted(ranked(r)[:k]) for r in rows]
    return torch.tensor(out, dtype=torch.int64).reshape(len(rows), k)


def kept_indices(scores: torch.Tensor, counts: list[int], width: int) -> torch.Tensor:
    """[B, width]: row b's counts[b] best, ascending, then -1."""
    rows = score_rows(scores)
    out = []
    for r, c in zip(rows, counts):
        sel = sorted(ranked(r)[:c])
        out.append((sel + [-1] * width)[:width])
    return torch.tensor(out, dtype=torch.int64).reshape(len(rows), width)


def resolve_k(k, n: int) -> int:
    """An int budget, or a ratio of n rounded half up (README)."""
    if isinstance(k, float):
        return min(n, int(math.floor(k * n + 0.5)))
    return k


def _fence_band(values: torch.Tensor, whisker: float, ftz: bool) -> tuple[float, float] | None:
    """(fence - eps, fence + eps) of Q3 + whisker (Q3 - Q1) with torch.quantile's linear
    quantiles over the non-NaN values, in fp64; eps covers the kernels' fp32 arithmetic (0 when
    Q1 == Q3, where it is exact), including subnormal steps (flushed to zero when ftz, as GPU
    code may). None when the fence is NaN (no number, or inf - inf)."""
    v = values.reshape(-1)
    v = v[~torch.isnan(v)]
    if v.numel() == 0:
        return None
    q1 = torch.quantile(v, 0.25).item()
    q3 = torch.quantile(v, 0.75).item()
    fence = q3 + whisker * (q3 - q1)
    if math.isnan(fence):
        return None
    if math.isinf(fence) or q1 == q3:
        return fence, fence
    eps = 2.0 ** -20 * (1 + whisker) * (abs(q1) + abs(q3)) + (2.0 ** -124 if ftz else 2.0 ** -146)
    return fence - eps, fence + eps


def iqr_count_bands(scores: torch.Tensor, whisker: float, pooled: bool,
                    max_k: int | None, ftz: bool = False) -> list[tuple[int, int]]:
    """Per image the [lowest, highest] count the IQR rule allows given the fence's rounding:
    #{scores > fence} per image, or floor(#{all scores > fence} / B) pooled; capped by max_k."""
    x = scores.detach().cpu().float().double()
    B = x.shape[0]
    if B == 0:
        return []

    def count_band(vals):
        band = _fence_band(vals, whisker, ftz)
        if band is None:
            return 0, 0
        lo_f, hi_f = band
        return int((vals > hi_f).sum()), int((vals > lo_f).sum())

    if pooled:
        lo, hi = count_band(x)
        bands = [(lo // B, hi // B)] * B
    else:
        bands = [count_band(x[b]) for b in range(B)]
    if max_k is not None:
        bands = [(min(lo, max_k), min(hi, max_k)) for lo, hi in bands]
    return bands


# --------------------------------------------------------------------------- gather / merge

def bad_images(idx: torch.Tensor, counts: torch.Tensor | None, n: int) -> list[bool]:
    """D1: an image is bad when a valid entry idx[b, :counts[b]] is outside [0, N) or
    counts[b] is outside [0, K]."""
    K = idx.shape[1]
    out = []
    for b, row in enumerate(idx.tolist()):
        c = K if counts is None else int(counts[b])
        out.append(not 0 <= c <= K or any(not 0 <= i < n for i in row[:c]))
    return out


def gather_merge(tokens: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor | None, merge: str,
                 weights: torch.Tensor | None):
    """(out [B, K (+1), D], condition) in fp64: rows j < counts[b] are tokens[b, idx[b, j]]; the
    merged row at counts[b] is the mean of the rows no valid entry references (zeros if none) or
    sum of weights * tokens over them; later rows are zeros; every row of a bad image is NaN."""
    x = tokens.detach().cpu().to(F64)
    w = None if weights is None else weights.detach().cpu().to(F64)
    B, N, D = x.shape
    K = idx.shape[1]
    width = K + (merge != "none")
    out = torch.zeros(B, width, D, dtype=F64)
    cond = torch.zeros(B, width, D, dtype=F64)
    bad = bad_images(idx, counts, N)
    for b in range(B):
        if bad[b]:
            out[b] = float("nan")
            continue
        c = K if counts is None else int(counts[b])
        valid = idx[b, :c].tolist()
        for j, n in enumerate(valid):
            out[b, j] = x[b, n]
            cond[b, j] = x[b, n].abs()
        dropped = [n for n in range(N) if n not in set(valid)]
        if merge == "none":
            continue
        if merge == "mean":
            if dropped:
                out[b, c] = x[b, dropped].sum(0) / len(dropped)
                cond[b, c] = x[b, dropped].abs().sum(0) / len(dropped)
        elif dropped:
            terms = w[b, dropped].unsqueeze(-1) * x[b, dropped]
            out[b, c] = terms.sum(0)
            cond[b, c] = terms.abs().sum(0)
    return out, cond


def gather_merge_grads(tokens: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor | None,
                       merge: str, weights: torch.Tensor | None, grad_out: torch.Tensor):
    """fp64 gradients (grad_tokens, cond, grad_weights or None, cond): a kept row gets the sum of
    its output rows' gradients (repeats add up); a dropped row gets the merged row's gradient / n
    (mean) or * weights (weighted); d/dweights[b, n] = <grad merged, tokens[b, n]> for dropped
    rows, 0 for kept ones. A bad image's token rows get NaN (D1); its weight gradient is not
    specified (None in the mask returned as the last item)."""
    x = tokens.detach().cpu().to(F64)
    g = grad_out.detach().cpu().to(F64)
    w = None if weights is None else weights.detach().cpu().to(F64)
    B, N, D = x.shape
    K = idx.shape[1]
    gx = torch.zeros(B, N, D, dtype=F64)
    cx = torch.zeros(B, N, D, dtype=F64)
    gw = torch.zeros(B, N, dtype=F64) if w is not None else None
    cw = torch.zeros(B, N, dtype=F64) if w is not None else None
    bad = bad_images(idx, counts, N)
    for b in range(B):
        if bad[b]:
            gx[b] = float("nan")
            continue
        c = K if counts is None else int(counts[b])
        valid = idx[b, :c].tolist()
        for j, n in enumerate(valid):
            gx[b, n] += g[b, j]
            cx[b, n] += g[b, j].abs()
        dropped = [n for n in range(N) if n not in set(valid)]
        if merge == "none" or not dropped:
            continue
        gm = g[b, c]
        for n in dropped:
            if merge == "mean":
                gx[b, n] = gm / len(dropped)
                cx[b, n] = gm.abs() / len(dropped)
            else:
                gx[b, n] = w[b, n] * gm
                cx[b, n] = (w[b, n] * gm).abs()
                gw[b, n] = (gm * x[b, n]).sum()
                cw[b, n] = (gm * x[b, n]).abs().sum()
    return gx, cx, gw, cw, bad


# --------------------------------------------------------------------------- KL divergence

def undefined_rows(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """D3: rows whose softmax is undefined (a NaN or +inf logit, or every logit -inf) on
    either side."""
    def bad(t):
        return (torch.isnan(t) | (t == float("inf"))).any(-1) | (t == float("-inf")).all(-1)
    return bad(student) | bad(teacher)


def kl_terms(student: torch.Tensor, teacher: torch.Tensor, tau: float, reverse: bool):
    """Per-row tau^2 KL(p_t || p_s) (reverse: KL(p_s || p_t)), p = softmax(logits / tau), in
    fp64; terms with target probability 0 contribute 0; undefined rows NaN. Also returns the
    per-row condition, the gradient w.r.t. the student logits of each row's loss (forward
    tau (p_s - p_t), reverse tau p_s (log p_s - log p_t - KL / tau^2)), its condition, and its
    sensitivity to the logits (sum over w of |d grad_v / d logit_w|, times tau)."""
    s = student.detach().cpu().to(F64)
    t = teacher.detach().cpu().to(F64)
    undefined = undefined_rows(s, t)
    # Undefined rows computed on zeros (their results are replaced by NaN).
    s0 = torch.where(undefined.unsqueeze(-1), torch.zeros_like(s), s)
    t0 = torch.where(undefined.unsqueeze(-1), torch.zeros_like(t), t)
    log_s = s0 / tau - torch.logsumexp(s0 / tau, -1, keepdim=True)
    log_t = t0 / tau - torch.logsumexp(t0 / tau, -1, keepdim=True)
    p_s, p_t = log_s.exp(), log_t.exp()
    log_p, log_q, p = (log_s, log_t, p_s) if reverse else (log_t, log_s, p_t)
    has = p > 0
    ratio = torch.where(has, log_p - log_q, torch.zeros_like(p))
    terms = torch.where(has, p * ratio, torch.zeros_like(p))
    kl_raw = terms.sum(-1)
    loss = kl_raw * tau * tau
    # fp32 log-softmax error grows with the size of the scaled logits.
    mag = torch.where(has, p * (log_p.abs() + log_q.abs() + 1), torch.zeros_like(p)).sum(-1)
    def max_finite(t):
        fin = torch.where(torch.isfinite(t), t.abs(), torch.zeros_like(t))
        return fin.amax(-1) if t.shape[-1] else torch.zeros(t.shape[:-1], dtype=F64)
    size = (1 + (max_finite(s0) + max_finite(t0)) / tau).unsqueeze(-1)
    cond = 4 * mag * tau * tau * size.squeeze(-1)
    if reverse:
        a = torch.where(p_s > 0, log_s - log_t - kl_raw.unsqueeze(-1), torch.zeros_like(p_s))
        grad = p_s * a
        gcond = torch.where(p_s > 0, p_s * (log_s.abs() + log_t.abs() + kl_raw.abs().unsqueeze(-1)
                                            + 1), torch.zeros_like(p_s))
        # sum_w |d grad_v / d logit_w| (student and teacher) per unit of logit change
        gsens = p_s * (2 * a.abs() + 6 + (p_s * a.abs()).sum(-1, keepdim=True))
    else:
        grad = p_s - p_t
        gcond = p_s + p_t
        gsens = 2 * (p_s + p_t)
    grad = grad * tau
    # + an absolute floor far below the row's scale: probabilities under ~1e-36 may underflow in
    # fp32 exp implementations.
    # x 4: exp / log of the scaled logits in fp32 cost a few ulps of their size each.
    gcond = 4 * gcond * tau * size + tau * 2.0 ** -90
    nan = torch.full_like(loss, float("nan"))
    loss = torch.where(undefined, nan, loss)
    grad = torch.where(undefined.unsqueeze(-1), torch.full_like(grad, float("nan")), grad)
    return loss, cond, grad, gcond, gsens


def kl_reduce(loss_rows, cond_rows, grad_rows, gcond_rows, row_mask, reduction: str, V: int,
              grad_loss):
    """Masked reduction of per-row KL and the matching gradient: batchmean = sum / selected
    rows, mean = sum / (rows * V), sum, none (per row); no selected row -> 0 loss and 0 grad;
    rows not selected contribute nothing whatever they hold. grad_loss: the incoming gradient
    (a scalar, or per-row for none)."""
    m = row_mask
    zero = torch.zeros_like(loss_rows)
    loss_sel = torch.where(m, loss_rows, zero)
    cond_sel = torch.where(m, cond_rows, zero)
    grad = torch.where(m.unsqueeze(-1), grad_rows, torch.zeros_like(grad_rows))
    gcond = torch.where(m.unsqueeze(-1), gcond_rows, torch.zeros_like(gcond_rows))
    if reduction == "none":
        gl = grad_loss.to(F64).reshape(-1, 1)
        return loss_sel, cond_sel, grad * gl, gcond * gl.abs()
    rows = int(m.sum())
    norm = {"batchmean": rows, "mean": rows * V, "sum": 1}[reduction]
    if norm == 0:
        z = torch.zeros((), dtype=F64)
        return z, z, torch.zeros_like(grad), torch.zeros_like(gcond)
    gl = float(grad_loss)
    return (loss_sel.sum() / norm, cond_sel.sum() / norm, grad * (gl / norm),
            gcond * (abs(gl) / norm))


def torch_kl_same_dtype(student, teacher, row_mask, tau, reduction, reverse):
    """PyTorch's own composition in the logits' dtype (for the 2x-error rule)."""
    log_s = F.log_softmax(student / tau, -1)
    log_t = F.log_softmax(teacher / tau, -1)
    inp, tgt = (log_t, log_s) if reverse else (log_s, log_t)
    rows = F.kl_div(inp, tgt, reduction="none", log_target=True).sum(-1) * (tau * tau)
    rows = torch.where(row_mask, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    n = int(row_mask.sum())
    norm = {"batchmean": n, "mean": n * student.shape[-1], "sum": 1}[reduction]
    return rows.sum() / norm if n else rows.sum() * 0


# --------------------------------------------------------------------------- attention

def attn_scores(q, k, key_start, key_len, lse, scale, reduce, causal, kv_start, q_pos):
    """(out [B, key_len], condition) in fp64: s = scale <q_i, k_j> (head h reads kv head
    h // (H / Hkv)); key j visible to row i of sample b when j >= kv_start[b] and, if causal,
    j <= q_pos[b, i] (default L - Q + i); p = exp(s - lse) over visible keys (lse the row's
    log-sum-exp of visible scores unless given), 0 elsewhere and for rows with no visible key;
    summed or averaged over (h, i); out[b, t] = that at j = key_start[b] + t, NaN outside [0, L)."""
    q64, k64 = q.detach().cpu().to(F64), k.detach().cpu().to(F64)
    B, H, Q, d = q64.shape
    Hkv, L = k64.shape[1], k64.shape[2]
    group = H // Hkv
    def per_sample(v):
        return v.tolist() if isinstance(v, torch.Tensor) else [int(v)] * B
    ks = per_sample(key_start)
    kv = per_sample(0 if kv_start is None else kv_start)
    out = torch.zeros(B, key_len, dtype=F64)
    cond = torch.zeros(B, key_len, dtype=F64)
    for b in range(B):
        red = torch.zeros(L, dtype=F64)
        rcond = torch.zeros(L, dtype=F64)
        for h in range(H):
            kk = k64[b, h // group]                      # [L, d]
            s = scale * (kk @ q64[b, h].T).T             # [Q, L]
            sabs = abs(scale) * (kk.abs() @ q64[b, h].abs().T).T
            for i in range(Q):
                pos = (L - Q + i) if q_pos is None else int(q_pos[b, i])
                j = torch.arange(L)
                vis = (j >= kv[b]) & ((j <= pos) if causal else torch.ones(L, dtype=torch.bool))
                if not vis.any():
                    continue
                row_lse = (torch.logsumexp(s[i][vis], 0).item() if lse is None
                           else float(lse[b, h, i]))
                p = torch.where(vis, torch.exp(s[i] - row_lse), torch.zeros(L, dtype=F64))
                red += p
                rcond += p * (1 + sabs[i] + abs(row_lse))
        if reduce == "mean":
            red, rcond = red / (H * Q), rcond / (H * Q)
        for t in range(key_len):
            j = ks[b] + t
            if 0 <= j < L:
                out[b, t], cond[b, t] = red[j], rcond[j]
            else:
                out[b, t] = float("nan")
    return out, cond
