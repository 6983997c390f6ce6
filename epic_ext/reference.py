"""Pure-PyTorch specification of every epic_ext kernel.

These functions are the spec: the tests hold every backend (C++, CUDA, Triton) to them, and the
dispatcher falls back to them where no compiled kernel exists. They favour obviousness over
speed, but they are exact: selection is bit-identical to the kernels (same ordering keys, same
quantile arithmetic), and all arithmetic runs in fp32 (fp64 for fp64 inputs), like the kernels.

Conventions shared with the kernels (see docs/ARCHITECTURE.md and csrc/include/epic/common.h):
- Ranking: a higher score ranks higher; ties go to the lower index; NaN ranks below every number;
  -0.0 ties with +0.0. Kept indices are returned in ascending (spatial) order.
- IQR quantiles: torch.quantile "linear" over the non-NaN scores (torch.nanquantile semantics).
- merge: 0 = none, 1 = mean of the dropped rows, 2 = sum of weights[b, n] * x over dropped rows.
"""
from __future__ import annotations

import torch

MERGE_NONE, MERGE_MEAN, MERGE_WEIGHTED = 0, 1, 2
MERGE_CODES = {"none": MERGE_NONE, "mean": MERGE_MEAN, "weighted": MERGE_WEIGHTED}


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def score_keys(scores: torch.Tensor) -> torch.Tensor:
    """int64 keys with the kernels' order: key(a) > key(b) iff a ranks above b.

    The fp32 bit pattern is mapped to an unsigned order (negative values flipped); NaN gets 0,
    below the key of -inf; -0.0 is folded onto +0.0.
    """
    x = scores.float()
    x = torch.where(x == 0, torch.zeros_like(x), x)
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    neg = bits >= 0x80000000
    key = torch.where(neg, bits ^ 0xFFFFFFFF, bits | 0x80000000)
    return torch.where(torch.isnan(x), torch.zeros_like(key), key)


def select_rows(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Row b keeps its counts[b] best scores: indices [B, N] ascending, padded with -1."""
    B, N = scores.shape
    keys = score_keys(scores)
    # Stable descending sort keeps the lower index first among equal keys.
    order = torch.sort(keys, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(N, device=scores.device).expand(B, N))
    selected = rank < counts.view(B, 1)
    pos = torch.arange(N, device=scores.device).expand(B, N)
    # Selected positions first (ascending), then -1 padding.
    sort_key = torch.where(selected, pos, pos + N)
    out = torch.sort(sort_key, dim=1).values
    return torch.where(out < N, out, torch.full_like(out, -1))


def select_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [B, k] (int64) of the k best scores of each row, ascending."""
    B, N = scores.shape
    counts = torch.full((B,), k, dtype=torch.int64, device=scores.device)
    return select_rows(scores, counts)[:, :k].contiguous()


def _nanquantile_linear(values: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(..., interpolation='linear') of each row's non-NaN values, fp32 arithmetic
    written out: rank = q * (n - 1); lerp as ATen's scalar lerp (exact match, tested)."""
    v = values.float()
    n = (~torch.isnan(v)).sum(dim=1)
    sorted_v = torch.sort(v, dim=1).values  # NaN sorts last
    rank = torch.tensor(q, dtype=torch.float32, device=v.device) * (n - 1).clamp(min=0).float()
    below = rank.long()
    weight = rank - below.float()
    above = torch.where(weight > 0, below + 1, below)
    lo = sorted_v.gather(1, below.view(-1, 1).clamp(max=v.shape[1] - 1)).squeeze(1)
    hi = sorted_v.gather(1, above.view(-1, 1).clamp(max=v.shape[1] - 1)).squeeze(1)
    diff = hi - lo
    out = torch.where(weight < 0.5, lo + weight * diff, hi - diff * (1.0 - weight))
    return torch.where(n > 0, out, torch.full_like(out, float("nan")))


def upper_fence(values: torch.Tensor, whisker: float) -> torch.Tensor:
    """Q3 + whisker * (Q3 - Q1) per row of `values` (fp32, NaN when a row has no number)."""
    q1 = _nanquantile_linear(values, 0.25)
    q3 = _nanquantile_linear(values, 0.75)
    return q3 + torch.tensor(whisker, dtype=torch.float32) * (q3 - q1)


def iqr_select(scores: torch.Tensor, whisker: float = 1.5, pooled: bool = False,
               max_k: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """IQR outlier selection: (counts [B] int64, indices [B, N] int64 padded with -1).

    Per image: counts[b] = #{scores[b] > fence_b}. Pooled (TRIM/PruMerge): one fence over all
    B*N scores and counts[b] = floor(total outliers / B) for every row, each row keeping its own
    best. max_k >= 0 caps the counts. Selected indices are the row's counts[b] best scores,
    ascending.
    """
    B, N = scores.shape
    x = scores.float()
    if B == 0 or N == 0:  # nothing to select: counts 0 (no fence to compute)
        return (torch.zeros(B, dtype=torch.int64, device=scores.device),
                torch.zeros(B, N, dtype=torch.int64, device=scores.device))
    if pooled:
        fence = upper_fence(x.reshape(1, -1), whisker)
        total = (x > fence).sum()
        counts = torch.div(total, B, rounding_mode="floor").expand(B).clone()
    else:
        fence = upper_fence(x, whisker)
        counts = (x > fence.view(B, 1)).sum(dim=1)
    if max_k >= 0:
        counts = counts.clamp(max=max_k)
    return counts.to(torch.int64), select_rows(x, counts)


def index_plan(idx: torch.Tensor, counts: torch.Tensor | None, n_tokens: int):
    """(n_valid [B], valid [B, K], bad [B]) of a gather: row b uses idx[b, :n_valid[b]] (counts
    clamped to [0, K]); bad[b] when counts[b] is outside [0, K] or a valid entry is outside
    [0, n_tokens). A bad image uses no entry (valid all False): its rows are NaN instead."""
    B, K = idx.shape
    dev = idx.device
    if counts is None:
        n_valid = torch.full((B,), K, dtype=torch.int64, device=dev)
        bad = torch.zeros(B, dtype=torch.bool, device=dev)
    else:
        n_valid = counts.clamp(0, K)
        bad = (counts < 0) | (counts > K)
    valid = torch.arange(K, device=dev).view(1, K) < n_valid.view(B, 1)
    bad = bad | (valid & ((idx < 0) | (idx >= n_tokens))).any(dim=1)
    return n_valid, valid & ~bad.view(B, 1), bad


def gather_merge(tokens: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor | None = None,
                 merge: int = MERGE_MEAN, weights: torch.Tensor | None = None) -> torch.Tensor:
    """[B, K + (merge != none), D]: kept rows, then the merged row, then zero padding.

    Rows j < counts[b] (all K without counts) are tokens[b, idx[b, j]]. The merged row sits at
    position counts[b]: the mean of the rows that no valid idx references (zeros if none, N = 0
    included), or sum of weights[b, n] * tokens[b, n] over them. An image with a valid idx entry
    outside [0, N) or counts[b] outside [0, K] (index_plan's bad) gets NaN in every output row,
    and NaN gradients for all its tokens (and weights). Differentiable (autograd) w.r.t. tokens
    and weights.
    """
    B, N, D = tokens.shape
    K = idx.shape[1]
    acc = _opmath(tokens.dtype)
    n_valid, valid, bad = index_plan(idx, counts, N)
    # x * NaN for a bad image: NaN through autograd too (x * 1 is exact for the others).
    scale = torch.where(bad, float("nan"), 1.0).to(acc).view(B, 1, 1)
    x = tokens.to(acc) * scale
    # Unused slots read an appended zero row (so N = 0 needs no special case).
    x_pad = torch.cat([x, torch.zeros(B, 1, D, dtype=acc, device=tokens.device)], dim=1)
    safe_idx = torch.where(valid, idx, torch.full_like(idx, N))
    kept = x_pad.gather(1, safe_idx.unsqueeze(-1).expand(B, K, D))
    referenced = torch.zeros(B, N + 1, dtype=torch.bool, device=tokens.device)
    referenced.scatter_(1, safe_idx, True)
    dropped = ~referenced[:, :N]
    nan_rows = bad.view(B, 1, 1)
    if merge == MERGE_NONE:
        return torch.where(nan_rows, float("nan"), kept).to(tokens.dtype)
    if merge == MERGE_MEAN:
        n_drop = dropped.sum(dim=1, keepdim=True).to(acc)
        total = torch.where(dropped.unsqueeze(-1), x, torch.zeros_like(x)).sum(dim=1)
        merged = torch.where(n_drop > 0, total / n_drop.clamp(min=1), torch.zeros_like(total))
    else:
        wx = weights.to(acc).unsqueeze(-1) * x
        merged = torch.where(dropped.unsqueeze(-1), wx, torch.zeros_like(wx)).sum(dim=1)
    out = torch.cat([kept, torch.zeros(B, 1, D, dtype=acc, device=tokens.device)], dim=1)
    slot = torch.nn.functional.one_hot(n_valid, K + 1).unsqueeze(-1)  # [B, K+1, 1]
    out = torch.where(slot.bool(), merged.unsqueeze(1).expand_as(out), out)
    return torch.where(nan_rows, float("nan"), out).to(tokens.dtype)


def gather_merge_backward(grad_out: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor | None,
                          merge: int, weights: torch.Tensor | None, n_tokens: int) -> torch.Tensor:
    """Gradient of gather_merge w.r.t. tokens: a kept row gets its output row's gradient (summed
    over repeated indices); a dropped row gets grad_merged / n_dropped (mean) or
    weights[b, n] * grad_merged (weighted); zero with merge none. A bad image (index_plan) gets
    NaN in every row."""
    B, _, D = grad_out.shape
    K = idx.shape[1]
    acc = _opmath(grad_out.dtype)
    g = grad_out.to(acc)
    n_valid, valid, bad = index_plan(idx, counts, n_tokens)
    sink = torch.where(valid, idx, torch.full_like(idx, n_tokens))  # invalid rows go to a sink row
    grad = torch.zeros(B, n_tokens + 1, D, dtype=acc, device=grad_out.device)
    grad.scatter_add_(1, sink.unsqueeze(-1).expand(B, K, D), g[:, :K])
    referenced = torch.zeros(B, n_tokens + 1, dtype=torch.bool, device=idx.device)
    referenced.scatter_(1, sink, True)
    dropped = ~referenced[:, :n_tokens]
    grad = grad[:, :n_tokens]
    if merge != MERGE_NONE:
        g_merged = g.gather(1, n_valid.view(B, 1, 1).expand(B, 1, D))  # [B, 1, D]
        if merge == MERGE_MEAN:
            n_drop = dropped.sum(dim=1).clamp(min=1).to(acc).view(B, 1, 1)
            spread = (g_merged / n_drop).expand(B, n_tokens, D)
        else:
            spread = weights.to(acc).unsqueeze(-1) * g_merged
        grad = torch.where(dropped.unsqueeze(-1), spread, grad)
    grad = torch.where(bad.view(B, 1, 1), float("nan"), grad)
    return grad.to(grad_out.dtype)


def compress_topk(tokens: torch.Tensor, scores: torch.Tensor, k: int, merge: int = MERGE_MEAN,
                  weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """select_topk + gather_merge: (compressed [B, k + (merge != none), D], idx [B, k])."""
    idx = select_topk(scores, k)
    return gather_merge(tokens, idx, None, merge, weights), idx


def trim_eager(tokens: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """TRIM's published composition (topk, boolean mask, masked gather, masked mean), the
    baseline the benchmarks compare against; equal to compress_topk(merge=mean) when scores have
    no ties or NaN."""
    B, N, D = tokens.shape
    top = scores.topk(k, dim=1).indices
    mask = torch.zeros(B, N, dtype=torch.bool, device=tokens.device).scatter_(1, top, True)
    kept = tokens[mask].view(B, k, D)
    unselected = (~mask).unsqueeze(-1)
    n_unsel = unselected.sum(dim=1).clamp(min=1)
    mean = (tokens * unselected).sum(dim=1) / n_unsel
    return torch.cat([kept, mean.unsqueeze(1).to(tokens.dtype)], dim=1)


# --------------------------------------------------------------------------- KL divergence

KL_REDUCTIONS = ("batchmean", "sum", "mean", "none")


def kl_undefined_rows(student: torch.Tensor, teacher: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """Rows [T] whose softmax is undefined on either side: a NaN or +inf logit / tau (in the
    accumulation type, as the kernels scale it), or every logit -inf (V > 0; an empty row is an
    empty sum, KL 0). Their loss is NaN and so is every entry of their gradient (IEEE
    propagation); a -inf logit in an otherwise finite row is legal (probability 0)."""
    acc = _opmath(student.dtype)

    def bad(x):
        x = x.to(acc) / temperature
        undefined = (x.isnan() | (x == float("inf"))).any(dim=-1)
        if x.shape[-1] > 0:
            undefined |= (x == float("-inf")).all(dim=-1)
        return undefined

    return bad(student) | bad(teacher)


def _kl_log_probs(student: torch.Tensor, teacher: torch.Tensor, temperature: float):
    """log softmax(logits / tau) of both sides in the accumulation type, every entry of an
    undefined row (kl_undefined_rows) made NaN first, so that its loss and every entry of its
    gradient are NaN (through autograd too)."""
    acc = _opmath(student.dtype)
    undefined = kl_undefined_rows(student, teacher, temperature)
    poison = torch.where(undefined, float("nan"), 0.0).to(acc).unsqueeze(-1)
    log_s = torch.log_softmax(student.to(acc) / temperature + poison, dim=-1)
    log_t = torch.log_softmax(teacher.to(acc) / temperature + poison, dim=-1)
    return log_s, log_t


def kl_div_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
                reverse: bool = False) -> torch.Tensor:
    """Per-row KL between softmax(teacher / tau) and softmax(student / tau), times tau^2.

    forward (reverse=False): KL(p_t || p_s) = sum_v p_t (log p_t - log p_s), the distillation
    direction; reverse: KL(p_s || p_t). Terms whose target probability is 0 (logit -inf)
    contribute 0. Rows whose softmax is undefined (kl_undefined_rows) give NaN. Rows [T, V] ->
    [T], fp32 (fp64 for fp64 logits).
    """
    log_s, log_t = _kl_log_probs(student, teacher, temperature)
    log_p, log_q = (log_s, log_t) if reverse else (log_t, log_s)
    p = log_p.exp()
    # Mask the log-ratio before the product too, so that autograd never forms 0 * inf. p != 0
    # rather than p > 0: a NaN (undefined) row keeps its NaN.
    has_mass = p != 0
    ratio = torch.where(has_mass, log_p - log_q, torch.zeros_like(p))
    terms = torch.where(has_mass, p * ratio, torch.zeros_like(p))
    return terms.sum(dim=-1) * (temperature ** 2)


def kl_normaliser(row_mask: torch.Tensor, vocab: int, reduction: str) -> torch.Tensor:
    """Divisor of the summed loss: masked-in rows (batchmean), rows * V (mean), 1 (sum)."""
    rows = row_mask.sum().to(torch.float32)
    if reduction == "batchmean":
        return rows
    if reduction == "mean":
        return rows * vocab
    return torch.ones((), dtype=torch.float32, device=row_mask.device)


def kl_div(student: torch.Tensor, teacher: torch.Tensor, row_mask: torch.Tensor | None = None,
           temperature: float = 1.0, reduction: str = "batchmean",
           reverse: bool = False) -> torch.Tensor:
    """Masked, reduced KL over rows [T, V]: the spec of epic_ext.kl_div. Rows with mask False
    contribute nothing, whatever they hold (their logits are replaced by zeros first, so even
    autograd gives them an exact 0); with no row selected every reduction gives 0. A selected
    row whose softmax is undefined (kl_undefined_rows) makes the loss NaN (that row's, for
    "none") and its gradient row NaN."""
    if row_mask is not None:
        keep = row_mask.unsqueeze(-1)
        student = torch.where(keep, student, torch.zeros((), dtype=student.dtype))
        teacher = torch.where(keep, teacher, torch.zeros((), dtype=teacher.dtype))
    per_row = kl_div_rows(student, teacher, temperature, reverse)
    if row_mask is None:
        row_mask = torch.ones(per_row.shape, dtype=torch.bool, device=per_row.device)
    per_row = torch.where(row_mask, per_row, torch.zeros_like(per_row))
    if reduction == "none":
        return per_row
    total = per_row.sum()
    norm = kl_normaliser(row_mask, student.shape[-1], reduction).to(total.dtype)
    return torch.where(norm > 0, total / norm.clamp(min=1), torch.zeros_like(total))


def kl_div_fwd(student: torch.Tensor, teacher: torch.Tensor, row_mask: torch.Tensor | None,
               temperature: float, reduction: int, reverse: bool, compute_grad: bool,
               inplace: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The KL kernel contract (see csrc/include/epic/ops.h): (loss, d loss / d student).

    reduction codes: 0 none ([T] per-row loss), 1 sum, 2 mean, 3 batchmean (0-d). The gradient
    already carries 1 / normaliser and is zero for masked-out rows; forward KL gives
    tau (p_s - p_t), reverse tau p_s (log p_s - log p_t - KL); a kept row whose softmax is
    undefined gets a NaN loss and an all-NaN gradient row. Written explicitly (this runs
    below autograd)."""
    T, V = student.shape
    name = KL_REDUCTIONS_BY_CODE[reduction]
    mask = row_mask if row_mask is not None else torch.ones(T, dtype=torch.bool, device=student.device)
    acc = _opmath(student.dtype)
    per_row = kl_div_rows(student, teacher, temperature, reverse).to(acc)
    per_row = torch.where(mask, per_row, torch.zeros_like(per_row))
    norm = kl_normaliser(mask, V, name).to(acc)
    if name == "none":
        loss = per_row.float()
    else:
        loss = torch.where(norm > 0, per_row.sum() / norm.clamp(min=1), torch.zeros_like(norm)).float()
    if not compute_grad:
        return loss, student.new_empty(0)
    log_s, log_t = _kl_log_probs(student, teacher, temperature)
    p_s = log_s.exp()
    if reverse:
        kl = (per_row / temperature ** 2).unsqueeze(-1)
        grad = torch.where(p_s != 0, p_s * (log_s - log_t - kl), torch.zeros_like(p_s))
    else:
        grad = p_s - log_t.exp()
    scale = torch.where(norm > 0, 1.0 / norm.clamp(min=1), torch.zeros_like(norm))
    if name == "none":
        scale = torch.ones_like(scale)
    grad = torch.where(mask.unsqueeze(-1), grad * (temperature * scale), torch.zeros_like(grad))
    grad = grad.to(student.dtype)
    if inplace:
        return loss, student.copy_(grad)
    return loss, grad


KL_REDUCTIONS_BY_CODE = {0: "none", 1: "sum", 2: "mean", 3: "batchmean"}


# --------------------------------------------------------------------------- attention scores

ATTN_REDUCTIONS = {"sum": 1, "mean": 2}  # the codes of epic::Reduction (csrc/include/epic/common.h)


def _per_sample(value, B: int, device) -> torch.Tensor:
    """An int or an int64 [B] tensor as an int64 [B] tensor."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.int64).reshape(B)
    return torch.full((B,), int(value), dtype=torch.int64, device=device)


def attn_visible(B: int, Q: int, L: int, kv_start=None, q_pos=None, causal: bool = True,
                 device=None) -> torch.Tensor:
    """[B, Q, L] bool: key j is visible to query row i of sample b when j >= kv_start[b] and, if
    causal, j <= q_pos[b, i] (q_pos None: the queries are the last Q rows, q_pos = L - Q + i)."""
    j = torch.arange(L, device=device)
    lo = _per_sample(0 if kv_start is None else kv_start, B, device)
    vis = j.view(1, 1, L) >= lo.view(B, 1, 1)
    if causal:
        if q_pos is None:
            pos = (L - Q + torch.arange(Q, device=device)).view(1, Q).expand(B, Q)
        else:
            pos = q_pos.to(device=device, dtype=torch.int64).reshape(B, Q)
        vis = vis & (j.view(1, 1, L) <= pos.unsqueeze(-1))
    return vis.expand(B, Q, L)


def attn_scores(q: torch.Tensor, k: torch.Tensor, key_start, key_len: int,
                lse: torch.Tensor | None = None, scale: float | None = None, reduce: str = "mean",
                causal: bool = True, kv_start=None, q_pos=None) -> torch.Tensor:
    """Softmax attention probabilities of a few query rows over a key span, reduced over heads
    and query rows: the spec of epic_ext.attn_scores. Returns [B, key_len] fp32.

    q [B, H, Q, d], k [B, Hkv, L, d] (head h reads kv head h // (H // Hkv)). Scores
    s_ij = scale * <q_i, k_j> in fp32 (scale defaults to d ** -0.5). Key j is visible to row i
    of sample b when j >= kv_start[b] and, if causal, j <= q_pos[b, i] (attn_visible). p_ij =
    exp(s_ij - lse_i) for visible keys, 0 otherwise, lse_i the log-sum-exp of the row's visible
    scores (or the given lse [B, H, Q]); a row without visible keys contributes 0. Output
    out[b, t] = sum or mean over (h, i) of p_ij at j = key_start[b] + t; a span entry outside
    [0, L) is NaN. Written as the explicit masked softmax over full rows ([B, H, Q, L] in fp32).
    """
    B, H, Q, d = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    dev = q.device
    scale = d ** -0.5 if scale is None else float(scale)
    kk = k.float().repeat_interleave(H // Hkv, dim=1)                  # [B, H, L, d]
    s = torch.matmul(q.float(), kk.transpose(-1, -2)) * scale          # [B, H, Q, L]
    vis = attn_visible(B, Q, L, kv_start, q_pos, causal, dev).unsqueeze(1)  # [B, 1, Q, L]
    masked = torch.where(vis, s, torch.full_like(s, float("-inf")))
    row_lse = torch.logsumexp(masked, dim=-1) if lse is None else lse.float()
    # Rows with no visible key: lse = -inf and every p is 0 (the where drops exp(nan)).
    p = torch.where(vis, torch.exp(s - row_lse.unsqueeze(-1)), torch.zeros_like(s))
    red = p.sum(dim=(1, 2)) if reduce == "sum" else p.mean(dim=(1, 2))  # [B, L]
    j = _per_sample(key_start, B, dev).view(B, 1) + torch.arange(key_len, device=dev).view(1, -1)
    inside = (j >= 0) & (j < L)
    out = red.gather(1, j.clamp(0, L - 1))
    return torch.where(inside, out, torch.full_like(out, float("nan")))


def attn_scores_fwd(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor | None,
                    key_start: torch.Tensor | None, key_start_int: int, key_len: int,
                    kv_start: torch.Tensor | None, kv_start_int: int, q_pos: torch.Tensor | None,
                    scale: float, causal: bool, reduction: int) -> torch.Tensor:
    """The attn_scores kernel contract (csrc/include/epic/ops.h): per-sample starts are the
    tensors when given, else the ints; reduction 1 = sum, 2 = mean."""
    reduce = "sum" if reduction == ATTN_REDUCTIONS["sum"] else "mean"
    return attn_scores(q, k, key_start if key_start is not None else key_start_int, key_len, lse,
                       scale, reduce, causal, kv_start if kv_start is not None else kv_start_int,
                       q_pos)
