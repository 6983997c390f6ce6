"""Seeded differential fuzz test: every op, option, dtype, layout and runnable backend against
independent fp64 expectations (tests/fuzz_oracle.py, written from the README, not from
epic_ext/reference.py, which is fuzzed like any other backend).

Each test draws random cases for one op on one backend (conftest's BACKENDS: cpu, reference and
Triton under its interpreter here; cuda and compiled Triton on a GPU): shapes including
B = 0, N = 0, k = 0 and k = N; fp32 / fp16 / bf16 / fp64 (where the op takes it); inputs
transposed, at a storage offset, expanded (stride 0), or strided slices with NaN between the
elements; adversarial values (ties, NaN / +-inf scores, -0.0, duplicate and out-of-range
indices, tiny and huge magnitudes, V not a multiple of 8); gradients w.r.t. tokens, weights,
student logits, hidden states and the LM head. Outputs are poisoned (NaN) before every call.

Tolerance rule. Selections (indices, counts, masks) and copied rows are exact. A float output
element passes when |ours - exact| <= RTOL[dtype] |exact| + c S + 4 tiny(dtype): one rounding to
the output dtype (conftest.TOLERANCES' rtol) plus fp32 accumulation (c = 2^-17; 2^-44 for fp64)
scaled by S, the sum of the magnitudes of the terms that form the element; the absolute floor
`tiny` lets results below fp32's smallest normal flush to zero. Where the op rounds inputs to the
dtype on the way (fused_linear_kl's logits and their gradient), the bound adds their first-order
effect (|d out / d logits| x 2 ulps of the logits, from fp64 autograd and the softmax Jacobian).
For kl_div and fused_linear_kl an output also passes when its max error is at most 2x the max
error of PyTorch's own composition in the same dtype (the flash-attention numerics contract).
IQR counts must lie in the band the fence's fp32 rounding allows (exact when no score is within
~8 ulps of the fence). NaN where the semantics say NaN (D1 bad indices, D3 undefined KL rows),
nowhere else.

Backends are chosen with the ops' `backend=` argument; the backward of gather_merge / compress
must run on the forward's backend (checked by recording the kernels it looks up).

Length: by default a fixed number of cases per (op, backend) (DEFAULT_ITERS), about a minute in
all on 2 CPU cores with the interpreter (whose cases use smaller shapes). Longer on demand:
--fuzz-iters N (or EPIC_EXT_FUZZ_ITERS=N) cases per test, or --fuzz-seconds S
(EPIC_EXT_FUZZ_SECONDS=S) to draw cases for S seconds per test; --fuzz-seed / EPIC_EXT_FUZZ_SEED
moves the base seed. A failure lists every failing case with its seed and parameters, and the
command that reruns one case.
"""
from __future__ import annotations

import inspect
import math
import os
import random
import time

import pytest
import torch

import epic_ext
import fuzz_oracle as O
from conftest import BACKEND_IDS, BACKENDS, is_interpreted, kernels_resolved, poisoned_outputs

# Every backend is chosen by the ops' `backend=` argument (not by a forcing around the whole
# test), as a user does; so a backward that ignores the forward's backend shows.
over_backends = pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
ALL_FLOATS = [F32, F16, BF16, F64]
# Cases per (op, backend) by default: compiled backends / the Triton interpreter (slow: ~0.1-1 s
# a launch).
DEFAULT_ITERS = {"select_topk": (200, 16), "iqr_select": (200, 12), "gather_merge": (120, 16),
                 "compress": (120, 12), "kl_div": (120, 16), "fused_linear_kl": (30, 8),
                 "attn_scores": (60, 10)}


# --------------------------------------------------------------------------- the driver

def _setting(request, option, env, cast):
    value = request.config.getoption(option, default=None)
    if value is None and os.environ.get(env):
        value = cast(os.environ[env])
    return value


def run_fuzz(request, op, backend, case_fn):
    """Run op's cases on one backend, collect every failure, fail once with all of them."""
    global INTERPRETED
    name, dev = backend
    interp = INTERPRETED = is_interpreted(name, dev)
    iters = _setting(request, "fuzz_iters", "EPIC_EXT_FUZZ_ITERS", int)
    seconds = _setting(request, "fuzz_seconds", "EPIC_EXT_FUZZ_SECONDS", float)
    base = _setting(request, "fuzz_seed", "EPIC_EXT_FUZZ_SEED", int) or 0
    if iters is None:
        iters = DEFAULT_ITERS[op][1 if interp else 0]
    start = time.monotonic()
    failures, i = [], 0
    while (time.monotonic() - start < seconds) if seconds else (i < iters):
        seed = base + i
        i += 1
        rng = random.Random(f"{op}:{seed}")
        gen = torch.Generator().manual_seed(rng.getrandbits(62))
        desc: dict = {}
        try:
            msg = case_fn(rng, gen, name, torch.device(dev), interp, desc)
        except Exception as e:  # noqa: BLE001 - any crash is a finding, reported with its case
            msg = f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if msg:
            failures.append(f"seed={seed} {desc}\n    -> {msg}")
    if failures:
        shown = "\n".join(failures[:25])
        more = f"\n... and {len(failures) - 25} more" if len(failures) > 25 else ""
        pytest.fail(f"{len(failures)} of {i} fuzz cases failed for {op} on {name}-{dev}. Rerun one "
                    f"with: EPIC_EXT_FUZZ_SEED=<seed> EPIC_EXT_FUZZ_ITERS=1 python -m pytest "
                    f"'{request.node.nodeid}'\n{shown}{more}", pytrace=False)


# --------------------------------------------------------------------------- inputs

def pick_dtype(rng, dtypes=ALL_FLOATS):
    return rng.choice(dtypes)


# Set per case by run_fuzz: the Triton interpreter converts bf16 subnormals to fp32 wrongly
# (5.5e-40 -> 5.9e-39, numpy emulation), so its cases keep bf16 values normal.
INTERPRETED = False


def scale_for(kind, dtype):
    """Magnitudes for the 'tiny' and 'huge' value kinds: subnormal-range and near-overflow for
    the dtype, yet sums over the fuzzed shapes stay finite."""
    if kind == "tiny":
        if dtype == BF16 and INTERPRETED:
            return 1e-30
        return 1e-6 if dtype == F16 else 1e-39
    if kind == "huge":
        return 1e2 if dtype == F16 else 1e30
    return 1.0


def float_values(gen, shape, dtype, kind="normal"):
    """Random values exactly representable in dtype (made in fp64, rounded once)."""
    x = torch.randn(shape, generator=gen, dtype=F64)
    if kind == "ties":
        x = torch.randint(-2, 2, shape, generator=gen).to(F64)
    elif kind == "offset":  # cancellation: large common offset
        x = x + 300.0
    elif kind in ("tiny", "huge"):
        x = x * scale_for(kind, dtype)
    return x.to(dtype)


def make_scores(rng, gen, B, N, dtype):
    """Scores with a randomly chosen pathology; fp64 scores hold fp32 values (kernels rank the
    scores rounded to fp32)."""
    kind = rng.choice(["normal", "ties", "adversarial", "all_nan", "constant", "tiny", "huge",
                       "signed_zero"])
    base_dtype = F32 if dtype == F64 else dtype
    s = float_values(gen, (B, N), base_dtype,
                     kind if kind in ("ties", "tiny", "huge") else "normal")
    if kind == "adversarial" and s.numel():
        r = torch.rand(B, N, generator=gen)
        s[r < 0.1] = float("nan")
        s[(r >= 0.1) & (r < 0.15)] = float("inf")
        s[(r >= 0.15) & (r < 0.2)] = float("-inf")
        s[(r >= 0.2) & (r < 0.25)] = -0.0
        s[(r >= 0.25) & (r < 0.3)] = 0.0
    elif kind == "all_nan" and s.numel():
        s[torch.rand(B, generator=gen) < 0.6] = float("nan")
    elif kind == "constant":
        s = torch.full((B, N), rng.choice([0.0, -1.5, 7.0]), dtype=base_dtype)
    elif kind == "signed_zero" and s.numel():
        s = torch.where(torch.rand(B, N, generator=gen) < 0.5, torch.tensor(-0.0, dtype=base_dtype),
                        torch.tensor(0.0, dtype=base_dtype))
        s[torch.rand(B, N, generator=gen) < 0.2] = 1.0
    return s.to(dtype), kind


def relayout(t: torch.Tensor, kind: str, filler=float("nan")) -> torch.Tensor:
    """The same values in another memory layout (differentiable, so gradients reach the leaf):
    transposed, at a storage offset, a strided slice with `filler` between the elements, or
    expanded along dim 0 (stride 0: every batch entry becomes a copy of the first)."""
    if kind == "transposed" and t.dim() >= 2:
        # the last two dims when both are > 1 (the inner stride is then not 1), else the first two
        a, b = (t.dim() - 2, t.dim() - 1) if min(t.shape[-2:]) > 1 else (0, 1)
        return t.transpose(a, b).contiguous().transpose(a, b)
    if kind == "offset":
        pad = torch.full((5,), filler, dtype=t.dtype, device=t.device)
        return torch.cat([pad, t.reshape(-1)])[5:].view(t.shape)
    if kind == "sliced":
        fill = torch.full_like(t, filler)
        return torch.stack([t, fill], dim=-1).flatten(-2)[..., ::2]
    if kind == "expanded" and t.dim() >= 1 and t.shape[0] > 1:
        return t[:1].expand(t.shape)
    return t.contiguous()


LAYOUTS = ["contiguous", "transposed", "offset", "sliced", "expanded"]


def to_input(values, dev, layout, grad=False, filler=float("nan")):
    """values -> the tensor passed to the op: on dev, in `layout`; with grad, a non-leaf whose
    .grad is retained (the gradient of exactly this tensor)."""
    x = values.to(dev)
    if grad:
        x = x.clone().requires_grad_()
    y = relayout(x, layout, filler)
    if grad and y is not x:
        y.retain_grad()
    return y


def shape_bn(rng, interp):
    B = rng.choice([0, 1, 2, 3] if interp else [0, 1, 2, 3, 5])
    N = rng.choice([0, 1, 5, 12] if interp else [0, 1, 2, 7, 33, 64, 100])
    if rng.random() < 0.75:  # B = 0 or N = 0 in about a quarter of the cases
        B, N = max(B, 1), max(N, 1)
    elif min(B, N) > 0:
        B, N = (0, N) if rng.random() < 0.4 else (B, 0)
    return B, N


def pick_k(rng, N):
    r = rng.random()
    if r < 0.15:
        return 0
    if r < 0.3:
        return N
    if r < 0.45:
        return rng.choice([0.0, 0.25, 0.5, 1.0, round(rng.random(), 3)])
    return rng.randint(0, N)


def call(fn):
    """Run fn with poisoned outputs."""
    with poisoned_outputs():
        return fn()


def first_diff(got, exp):
    bad = (got != exp).nonzero()
    w = tuple(bad[0].tolist())
    return (f"{len(bad)} entries differ; first at {list(w)}: got {got[w].item()}, "
            f"expected {exp[w].item()}")


# --------------------------------------------------------------------------- select_topk

def case_select_topk(rng, gen, name, dev, interp, desc):
    B, N = shape_bn(rng, interp)
    dtype = pick_dtype(rng)
    scores, kind = make_scores(rng, gen, B, N, dtype)
    layout = rng.choice(LAYOUTS)
    k = pick_k(rng, N)
    policy = rng.choice(["lowest"] * 4 + ["raise"])
    desc.update(B=B, N=N, dtype=str(dtype), scores=kind, layout=layout, k=k, nan_policy=policy)
    x = to_input(scores, dev, layout)
    if policy == "raise" and bool(torch.isnan(x).any()):
        try:
            call(lambda: epic_ext.select_topk(x, k, nan_policy=policy, backend=name))
        except ValueError as e:
            return None if "NaN" in str(e) else f"ValueError without 'NaN': {e}"
        return "NaN scores accepted with nan_policy='raise'"
    got = call(lambda: epic_ext.select_topk(x, k, nan_policy=policy, backend=name)).cpu()
    exp = O.topk(x, O.resolve_k(k, N))
    if got.shape != exp.shape:
        return f"shape {tuple(got.shape)} != {tuple(exp.shape)}"
    if not torch.equal(got, exp):
        return "indices: " + first_diff(got, exp)
    return None


@over_backends
def test_fuzz_select_topk(request, backend):
    run_fuzz(request, "select_topk", backend, case_select_topk)


# --------------------------------------------------------------------------- iqr_select

def check_iqr(x, counts, indices, whisker, pooled, max_k, width, output="indices"):
    """counts within the oracle's band (equal across images when pooled), indices exactly the
    row's counts[b] best, ascending, -1 padded to `width` (or the equivalent bool mask)."""
    B = x.shape[0]
    bands = O.iqr_count_bands(x, whisker, pooled, max_k, ftz=x.device.type == "cuda")
    counts = counts.cpu()
    if tuple(counts.shape) != (B,) or counts.dtype != torch.int64:
        return f"counts {counts.dtype} {tuple(counts.shape)}, expected int64 ({B},)"
    cl = counts.tolist()
    for b, (c, (lo, hi)) in enumerate(zip(cl, bands)):
        if not lo <= c <= hi:
            return f"counts[{b}] = {c}, expected in [{lo}, {hi}]"
    if pooled and len(set(cl)) > 1:
        return f"pooled counts differ between images: {cl}"
    exp = O.kept_indices(x, cl, width)
    got = indices.cpu()
    if output == "mask":
        N = x.shape[1]
        mask = torch.zeros(B, N + 1, dtype=torch.bool)
        mask.scatter_(1, torch.where(exp < 0, torch.full_like(exp, N), exp), True)
        exp = mask[:, :N]
    if got.shape != exp.shape:
        return f"indices shape {tuple(got.shape)} != {tuple(exp.shape)}"
    if not torch.equal(got, exp):
        return "indices: " + first_diff(got, exp)
    return None


def pick_iqr_options(rng, N):
    whisker = rng.choice([0.0, 0.5, 1.0, 1.5, 1.5, 3.0, round(rng.uniform(0, 4), 3)])
    pooled = rng.random() < 0.4
    max_k = rng.choice([None, None, 0, N, rng.randint(0, N)])
    return whisker, pooled, max_k


def case_iqr_select(rng, gen, name, dev, interp, desc):
    B, N = shape_bn(rng, interp)
    dtype = pick_dtype(rng)
    scores, kind = make_scores(rng, gen, B, N, dtype)
    layout = rng.choice(LAYOUTS)
    whisker, pooled, max_k = pick_iqr_options(rng, N)
    output = rng.choice(["indices", "indices", "mask"])
    desc.update(B=B, N=N, dtype=str(dtype), scores=kind, layout=layout, whisker=whisker,
                pooled=pooled, max_k=max_k, output=output)
    x = to_input(scores, dev, layout)
    sel = call(lambda: epic_ext.iqr_select(x, whisker, pooled=pooled, max_k=max_k, output=output,
                                           backend=name))
    return check_iqr(x, sel.counts, sel.indices, whisker, pooled, max_k, N, output)


@over_backends
def test_fuzz_iqr_select(request, backend):
    run_fuzz(request, "iqr_select", backend, case_iqr_select)


# --------------------------------------------------------------------------- gather_merge

def make_weights(rng, gen, B, N):
    wdtype = pick_dtype(rng)
    w = (torch.rand(B, N, generator=gen, dtype=F64) if rng.random() < 0.6
         else torch.randn(B, N, generator=gen, dtype=F64)).to(wdtype)
    return w, wdtype


def compare_merge_output(got, tokens, idx, counts, merge, weights, dtype):
    """got vs the oracle: copied and padding rows exact, merged rows within the tolerance."""
    exp, cond = O.gather_merge(tokens, idx, counts, merge, weights)
    got = got.detach().cpu()
    if got.shape != exp.shape:
        return f"output shape {tuple(got.shape)} != {tuple(exp.shape)}"
    if got.dtype != dtype:
        return f"output dtype {got.dtype} != {dtype}"
    B, _, D = exp.shape
    K = idx.shape[1]
    bad = O.bad_images(idx, counts, tokens.shape[1])
    copied = torch.zeros(exp.shape[:2], dtype=torch.bool)
    for b in range(B):
        if bad[b]:
            continue
        c = K if counts is None else int(counts[b])
        copied[b, :c] = True
        if merge != "none":
            copied[b, c + 1:] = True   # padding rows are exact zeros
        else:
            copied[b, c:] = True
    g, e = got.double()[copied], exp[copied]
    if not torch.equal(g, e):
        return "copied/padding rows are not exact: " + first_diff(g, e)
    return O.close(got, exp, cond, dtype)


def make_gather_case(rng, gen, interp, desc, N, B):
    """idx [B, K] with duplicates, optional counts with garbage padding past them, and
    (sometimes) one bad image (D1)."""
    K = rng.randint(0, N + 3) if not interp else rng.randint(0, N + 1)
    use_counts = rng.random() < 0.5
    if N > 0:
        if rng.random() < 0.4 and K <= N:
            idx = torch.stack([torch.randperm(N, generator=gen)[:K] for _ in range(B)]) if B else \
                torch.zeros(0, K, dtype=torch.int64)
            idx = idx.sort(dim=1).values if rng.random() < 0.5 else idx
        else:
            idx = torch.randint(0, N, (B, K), generator=gen)
    else:
        idx = torch.full((B, K), -1, dtype=torch.int64)
    counts = None
    if use_counts:
        counts = (torch.randint(0, K + 1, (B,), generator=gen) if N > 0
                  else torch.zeros(B, dtype=torch.int64))
        pad = torch.arange(K).view(1, K) >= counts.view(B, 1)
        garbage = torch.randint(-3, N + 4, (B, K), generator=gen)
        idx = torch.where(pad, garbage if rng.random() < 0.5 else torch.full_like(idx, -1), idx)
    bad_kind = None
    if B > 0 and rng.random() < 0.25:
        b = rng.randrange(B)
        if counts is not None and rng.random() < 0.4:
            counts[b] = rng.choice([K + 1, -1])
            bad_kind = f"counts[{b}]={int(counts[b])}"
        else:
            c = K if counts is None else int(counts[b])
            if c > 0:
                idx[b, rng.randrange(c)] = rng.choice([N, -1, 2 ** 40, -(2 ** 40)])
                bad_kind = f"idx in image {b}"
    if O.bad_images(idx, counts, N).count(True) and bad_kind is None:
        bad_kind = "N=0 without counts"
    desc.update(K=K, counts=use_counts, bad=bad_kind)
    return idx, counts


HAS_CHECK_KW = "check" in inspect.signature(epic_ext.gather_merge).parameters


def check_kw_options(rng):
    """D1's `check` keyword: omitted, None, True or False (omitted while it does not exist:
    test_gather_merge_has_check_keyword reports that once)."""
    return rng.choice(["omit", None, True, False]) if HAS_CHECK_KW else "omit"


def expect_raise_d1(check, dev, name):
    """Whether D1 requires a ValueError for a bad image: check=True everywhere; check=None on
    CPU tensors; check=False never (NaN rows), but the C++ CPU kernel may raise while it reads."""
    if check is True or (check in ("omit", None) and dev.type == "cpu"):
        return "must"
    if check is False and name == "cpu":
        return "may"
    return "no"


def grad_output(rng, gen, shape, dtype):
    """An output gradient; kind "cancel" mixes +-1 with values ~2^-8 so that sums over repeated
    indices cancel (rounding each addition to fp16/bf16 then loses the small terms)."""
    if rng.random() < 0.5:
        return float_values(gen, shape, dtype), "normal"
    sign = torch.randint(0, 2, shape, generator=gen).to(F64) * 2 - 1
    small = torch.rand(shape, generator=gen, dtype=F64) * 2.0 ** -7
    return torch.where(torch.rand(shape, generator=gen) < 0.3, small, sign).to(dtype), "cancel"


def run_gather_backward(rng, name, out, tok_in, w_in, tokens, idx, counts, merge, weights, gen,
                        dtype, desc):
    g, kind = grad_output(rng, gen, tuple(out.shape), dtype)
    desc["grad_out"] = kind
    g = g.to(out.device)
    with kernels_resolved() as seen:
        call(lambda: out.backward(g))
    used = {n for op, n in seen if op == "gather_merge_backward"}
    if used - {name}:
        return f"the backward ran on {sorted(used)}, the forward on the forced backend {name!r}"
    gx, cx, gw, cw, bad = O.gather_merge_grads(tokens, idx, counts, merge, weights, g)
    if tok_in.grad is None:
        return "tokens got no gradient"
    msg = O.close(tok_in.grad, gx, cx, dtype)
    if msg:
        return "grad tokens: " + msg
    if w_in is not None and w_in.requires_grad:
        if w_in.grad is None:
            return "weights got no gradient"
        keep = torch.tensor([not x for x in bad], dtype=torch.bool)
        msg = O.close(w_in.grad.cpu()[keep], gw[keep], cw[keep], w_in.dtype, acc_dtype=dtype)
        if msg:
            return "grad weights: " + msg
    return None


def case_gather_merge(rng, gen, name, dev, interp, desc):
    B, N = shape_bn(rng, interp)
    D = rng.choice([1, 3, 8] if interp else [1, 3, 8, 17, 64])
    dtype = pick_dtype(rng)
    kind = rng.choice(["normal", "normal", "offset", "tiny", "huge", "ties"])
    tokens = float_values(gen, (B, N, D), dtype, kind)
    merge = rng.choice(["none", "mean", "weighted"])
    weights = wdtype = None
    if merge == "weighted":
        weights, wdtype = make_weights(rng, gen, B, N)
    desc.update(B=B, N=N, D=D, dtype=str(dtype), tokens=kind, merge=merge,
                weights=str(wdtype) if wdtype else None)
    idx, counts = make_gather_case(rng, gen, interp, desc, N, B)
    check = check_kw_options(rng)
    grad = rng.random() < 0.5
    lt, li = rng.choice(LAYOUTS), rng.choice(LAYOUTS)
    lw = rng.choice(LAYOUTS)
    desc.update(check=check, grad=grad, layouts=(lt, li, lw))
    tok_in = to_input(tokens, dev, lt, grad)
    idx_in = to_input(idx, dev, li, filler=N + 7)
    w_in = None if weights is None else to_input(weights, dev, lw, grad and rng.random() < 0.7)
    cnt_in = None if counts is None else counts.to(dev)
    kw = {} if check == "omit" else {"check": check}
    is_bad = any(O.bad_images(idx_in.cpu(), counts, N))
    mode = expect_raise_d1(check, dev, name) if is_bad else "no"
    try:
        out = call(lambda: epic_ext.gather_merge(tok_in, idx_in, merge, w_in, counts=cnt_in,
                                                 backend=name, **kw))
    except ValueError as e:
        if mode in ("must", "may") and ("idx" in str(e) or "counts" in str(e)):
            return None
        return f"raised ValueError: {e}"
    if mode == "must":
        return "bad indices/counts were not rejected (D1: ValueError expected)"
    msg = compare_merge_output(out, tok_in.detach().cpu(), idx_in.cpu(), counts, merge,
                               None if w_in is None else w_in.detach().cpu(), dtype)
    if msg or not grad:
        return msg
    return run_gather_backward(rng, name, out, tok_in, w_in, tok_in.detach().cpu(), idx_in.cpu(),
                               counts, merge, None if w_in is None else w_in.detach().cpu(), gen,
                               dtype, desc)


@over_backends
def test_fuzz_gather_merge(request, backend):
    run_fuzz(request, "gather_merge", backend, case_gather_merge)


def test_gather_merge_has_check_keyword():
    """D1: gather_merge(..., check=None | True | False)."""
    assert HAS_CHECK_KW, "epic_ext.gather_merge has no `check` keyword (D1)"


def test_kl_div_has_nan_policy_keyword():
    """D3: kl_div(..., nan_policy="propagate" | "raise")."""
    assert "nan_policy" in inspect.signature(epic_ext.kl_div).parameters, \
        "epic_ext.kl_div has no `nan_policy` keyword (D3)"


# --------------------------------------------------------------------------- compress

def case_compress(rng, gen, name, dev, interp, desc):
    B, N = shape_bn(rng, interp)
    D = rng.choice([1, 3, 8] if interp else [1, 3, 8, 17, 64])
    dtype = pick_dtype(rng)
    sdtype = rng.choice([dtype, F32, pick_dtype(rng)])
    tkind = rng.choice(["normal", "normal", "offset", "tiny", "huge"])
    tokens = float_values(gen, (B, N, D), dtype, tkind)
    scores, skind = make_scores(rng, gen, B, N, sdtype)
    merge = rng.choice(["none", "mean", "weighted"])
    weights = wdtype = None
    if merge == "weighted":
        weights, wdtype = make_weights(rng, gen, B, N)
    k = "iqr" if rng.random() < 0.35 else pick_k(rng, N)
    whisker, pooled, max_k = pick_iqr_options(rng, N)
    if k != "iqr":
        max_k = None
    unbatched = B == 1 and rng.random() < 0.3
    grad = rng.random() < 0.5
    lt, ls, lw = rng.choice(LAYOUTS), rng.choice(LAYOUTS), rng.choice(LAYOUTS)
    desc.update(B=B, N=N, D=D, dtype=str(dtype), scores=f"{skind} {sdtype}", tokens=tkind,
                merge=merge, weights=str(wdtype) if wdtype else None, k=k, unbatched=unbatched,
                grad=grad, layouts=(lt, ls, lw))
    if k == "iqr":
        desc.update(whisker=whisker, pooled=pooled, max_k=max_k)
    tok_in = to_input(tokens, dev, lt, grad)
    s_in = to_input(scores, dev, ls)
    w_in = None if weights is None else to_input(weights, dev, lw, grad and rng.random() < 0.7)
    args = (tok_in, s_in, w_in)
    if unbatched:
        args = (tok_in[0], s_in[0], w_in[0] if w_in is not None else None)
    res = call(lambda: epic_ext.compress(args[0], args[1], k, merge, weights=args[2],
                                         whisker=whisker, pooled=pooled, max_k=max_k, backend=name))
    out, indices, counts = res
    if unbatched:
        out, indices = out.unsqueeze(0), indices.unsqueeze(0)
        counts = None if counts is None else counts.reshape(1)
    x_s = s_in
    if k == "iqr":
        if counts is None:
            return "k='iqr' returned no counts"
        cl = counts.cpu().tolist()
        width = max_k if max_k is not None else (max(cl) if cl else 0)
        msg = check_iqr(x_s, counts, indices, whisker, pooled, max_k, width)
        if msg:
            return msg
        idx_exp, cnt = indices.cpu(), counts.cpu()
    else:
        if counts is not None:
            return "fixed budget returned counts"
        idx_exp = O.topk(x_s, O.resolve_k(k, N))
        if indices.shape != idx_exp.shape or not torch.equal(indices.cpu(), idx_exp):
            if indices.shape != idx_exp.shape:
                return f"indices shape {tuple(indices.shape)} != {tuple(idx_exp.shape)}"
            return "indices: " + first_diff(indices.cpu(), idx_exp)
        cnt = None
    tokens_cpu = tok_in.detach().cpu()
    w_cpu = None if w_in is None else w_in.detach().cpu()
    msg = compare_merge_output(out, tokens_cpu, idx_exp, cnt, merge, w_cpu, dtype)
    if msg or not grad:
        return msg
    return run_gather_backward(rng, name, out, tok_in, w_in, tokens_cpu, idx_exp, cnt, merge, w_cpu,
                               gen, dtype, desc)


@over_backends
def test_fuzz_compress(request, backend):
    run_fuzz(request, "compress", backend, case_compress)


# --------------------------------------------------------------------------- kl_div

HAS_KL_NAN_POLICY = "nan_policy" in inspect.signature(epic_ext.kl_div).parameters
INVALID_TEMPERATURES = [0.0, -1.0, float("nan"), float("inf"), 1e-320, 1e-300, 1e-20, 2e19, 1e39,
                        1e300]


def pick_temperature(rng):
    return rng.choice([1.0, 1.0, 0.5, 2.0, 0.1, 4.0, round(math.exp(rng.uniform(-2.5, 2.5)), 4)])


def make_logits(rng, gen, shape, dtype, reverse=False):
    """(student, teacher, description): logits with a random scale and relation, and sometimes
    D3's adversarial rows (NaN, +inf, all -inf) and legal -inf entries."""
    scale = rng.choice([0.1, 1.0, 1.0, 5.0, 30.0] + ([1e3] if dtype != F16 else [])
                       + ([1e-30] if dtype not in (F16,) else [1e-5]))
    s = torch.randn(shape, generator=gen, dtype=F64) * scale
    rel = rng.choice(["independent", "close", "equal"])
    if rel == "independent":
        t = torch.randn(shape, generator=gen, dtype=F64) * scale
    elif rel == "close":
        t = s + torch.randn(shape, generator=gen, dtype=F64) * scale * 1e-2
    else:
        t = s.clone()
    s, t = s.to(dtype), t.to(dtype)
    adv = []
    V = shape[-1]
    rows_s, rows_t = s.view(-1, V), t.view(-1, V)
    T = rows_s.shape[0]
    all_neg_rows = set()
    if T and V and rng.random() < 0.35:
        for _ in range(rng.randint(1, 3)):
            r, v = rng.randrange(T), rng.randrange(V)
            what = rng.choice(["nan_s", "nan_t", "inf_s", "inf_t", "allneg_s", "allneg_t",
                               "neginf_both", "neginf_target", "negzero"])
            if what == "negzero" and r in all_neg_rows:
                # one finite logit in a row of -inf: a legal row with an infinite loss whose
                # gradient is not defined; not fuzzed
                continue
            if what.startswith("allneg"):
                all_neg_rows.add(r)
            adv.append(f"{what}@{r}")
            if what == "nan_s":
                rows_s[r, v] = float("nan")
            elif what == "nan_t":
                rows_t[r, v] = float("nan")
            elif what == "inf_s":
                rows_s[r, v] = float("inf")
            elif what == "inf_t":
                rows_t[r, v] = float("inf")
            elif what == "allneg_s":
                rows_s[r] = float("-inf")
            elif what == "allneg_t":
                rows_t[r] = float("-inf")
            elif what == "neginf_both":
                rows_s[r, v] = rows_t[r, v] = float("-inf")
            elif what == "neginf_target":  # the target distribution's prob 0: legal, finite loss
                (rows_s if reverse else rows_t)[r, v] = float("-inf")
            else:
                rows_s[r, v] = -0.0
                rows_t[r, v] = -0.0
    return s, t, f"scale={scale} {rel}" + (f" adv={adv}" if adv else "")


def pick_rows(rng, gen, lead, dev):
    """(mask kwargs for the op, bool row mask [rows] for the oracle, description)."""
    how = rng.choice(["all", "mask", "labels"])
    if how == "all":
        return {}, torch.ones(math.prod(lead), dtype=torch.bool), how
    p = rng.choice([0.0, 0.5, 0.9, 1.0])
    sel = torch.rand(lead, generator=gen) < p
    if how == "mask":
        return {"mask": sel.to(dev)}, sel.reshape(-1), f"mask p={p}"
    ignore = rng.choice([-100, -1, 7])
    labels = torch.randint(0, 50, lead, generator=gen)
    labels = torch.where(labels == ignore, labels + 1, labels)
    labels = torch.where(sel, labels, torch.full_like(labels, ignore))
    return ({"labels": labels.to(dev), "ignore_index": ignore}, sel.reshape(-1),
            f"labels ignore={ignore} p={p}")


def case_kl_div(rng, gen, name, dev, interp, desc):
    lead = rng.choice([(0,), (1,), (3,), (2, 3), (2, 1, 2)] if interp
                      else [(0,), (1,), (4,), (2, 5), (3, 1, 4), (9,)])
    V = rng.choice([1, 5, 13, 37] if interp else [1, 2, 7, 33, 100, 130, 257])
    dtype = pick_dtype(rng)
    direction = rng.choice(["forward", "reverse"])
    s, t, ldesc = make_logits(rng, gen, lead + (V,), dtype, direction == "reverse")
    reduction = rng.choice(["batchmean", "sum", "mean", "none"])
    tau = pick_temperature(rng)
    invalid_tau = rng.random() < 0.08
    if invalid_tau:
        tau = rng.choice(INVALID_TEMPERATURES)
    kw, row_mask, rdesc = pick_rows(rng, gen, lead, dev)
    grad = rng.random() < 0.7
    layout = rng.choice(LAYOUTS)
    inplace = grad and layout == "contiguous" and rng.random() < 0.3
    policy = rng.choice(["propagate"] * 3 + ["raise"]) if HAS_KL_NAN_POLICY else None
    if policy is not None:
        kw["nan_policy"] = policy
    desc.update(lead=lead, V=V, dtype=str(dtype), logits=ldesc, reduction=reduction,
                direction=direction, temperature=tau, rows=rdesc, grad=grad, layout=layout,
                inplace=inplace, nan_policy=policy)
    s_in = to_input(s, dev, layout, grad)
    if inplace:
        s_in = s.to(dev).clone().requires_grad_()
    # Teacher rows stay paired with their student rows: both expanded or neither (mixing rows
    # could pair a -inf logit with a target probability that underflows in fp32 but not in fp64:
    # inf in the oracle, finite in fp32, both right).
    t_layout = "expanded" if layout == "expanded" else rng.choice(LAYOUTS[:-1])
    t_in = to_input(t, dev, t_layout)
    s_vals = s_in.detach().cpu().clone()   # before an in-place run overwrites them
    t_vals = t_in.cpu()

    def run():
        # inplace writes over the logits of a leaf; autograd allows it on .data only via the op
        return epic_ext.kl_div(s_in, t_in, temperature=tau, reduction=reduction,
                               direction=direction, inplace=inplace, backend=name, **kw)
    if invalid_tau:
        try:
            call(run)
        except ValueError as e:
            return None if "temperature" in str(e) else f"ValueError without 'temperature': {e}"
        return f"temperature={tau} accepted (D3: ValueError naming temperature)"
    T = row_mask.numel()
    lrows, lcond, grows, gcond, _ = O.kl_terms(s_vals.reshape(T, V), t_vals.reshape(T, V), tau,
                                               direction == "reverse")
    if policy == "raise" and bool(torch.isnan(lrows[row_mask]).any()):
        try:
            call(run)
        except ValueError as e:   # D3: names the input
            return None if "logits" in str(e) else f"ValueError not naming the input: {e}"
        return "NaN loss with nan_policy='raise' did not raise"
    loss = call(run)
    if reduction == "none":
        grad_loss = torch.rand(lead, generator=gen, dtype=F64).to(F32) + 0.5
    else:
        grad_loss = torch.tensor(rng.choice([1.0, 0.5, 3.0]), dtype=F32)
    per_row = reduction == "none"
    eloss, econd, egrad, egcond = O.kl_reduce(lrows, lcond, grows, gcond, row_mask, reduction, V,
                                              grad_loss.reshape(-1) if per_row else grad_loss)
    if reduction == "none":
        eloss, econd = eloss.reshape(lead), econd.reshape(lead)
    torch_err = None
    with torch.no_grad():
        ref = O.torch_kl_same_dtype(s_vals.reshape(T, V), t_vals.reshape(T, V), row_mask, tau,
                                    reduction, direction == "reverse")
        diff = (ref.double().reshape(eloss.shape) - eloss).abs()
        diff = diff[torch.isfinite(eloss)]
        if diff.numel() and bool(torch.isfinite(diff).all()):
            torch_err = diff.max().item()
    msg = O.close(loss, eloss, econd, loss.dtype, torch_err=torch_err, acc_dtype=dtype)
    if msg:
        return f"loss ({loss.dtype}): {msg}"
    if not grad:
        return None
    call(lambda: loss.backward(grad_loss.to(loss.device)))
    if s_in.grad is None:
        return "student got no gradient"
    # + one ulp: the stored gradient is in the logits' dtype, and the backward's scaling by
    # grad_output rounds once more.
    msg = O.close(s_in.grad.reshape(T, V), egrad, egcond, dtype,
                  extra=torch.finfo(dtype).eps * egrad.abs())
    return msg and "grad student: " + msg


@over_backends
def test_fuzz_kl_div(request, backend):
    run_fuzz(request, "kl_div", backend, case_kl_div)


# --------------------------------------------------------------------------- fused_linear_kl

def case_fused_linear_kl(rng, gen, name, dev, interp, desc):
    lead = rng.choice([(1,), (3,), (2, 2)] if interp else [(1,), (5,), (2, 3), (12,)])
    H = rng.choice([1, 4, 8] if interp else [1, 5, 16, 33])
    V = rng.choice([1, 7, 13] if interp else [1, 7, 33, 100])
    dtype = pick_dtype(rng)
    hs = float_values(gen, lead + (H,), dtype)
    ht = (hs.to(F64) + 0.1 * torch.randn(lead + (H,), generator=gen, dtype=F64)).to(dtype) \
        if rng.random() < 0.5 else float_values(gen, lead + (H,), dtype)
    W = torch.randn(V, H, generator=gen, dtype=F64) * rng.choice([0.3, 1.0, 3.0]) / math.sqrt(H)
    W = W.to(dtype)
    bias = float_values(gen, (V,), dtype) if rng.random() < 0.4 else None
    reduction = rng.choice(["batchmean", "sum", "mean", "none"])
    direction = rng.choice(["forward", "reverse"])
    tau = pick_temperature(rng)
    kw, row_mask, rdesc = pick_rows(rng, gen, lead, dev)
    T = row_mask.numel()
    chunk = rng.choice([None, 1, 2, max(1, T - 1), T + 3])
    grad = reduction != "none"
    lh, lw = rng.choice(LAYOUTS), rng.choice(["contiguous", "transposed", "offset", "sliced"])
    desc.update(lead=lead, H=H, V=V, dtype=str(dtype), bias=bias is not None, reduction=reduction,
                direction=direction, temperature=tau, rows=rdesc, chunk=chunk, layouts=(lh, lw))
    hs_in = to_input(hs, dev, lh, grad)
    ht_in = to_input(ht, dev, rng.choice(LAYOUTS))
    W_in = to_input(W, dev, lw, grad)
    b_in = None if bias is None else to_input(bias, dev, "contiguous", grad)
    loss = call(lambda: epic_ext.fused_linear_kl(hs_in, ht_in, W_in, b_in, temperature=tau,
                                                 reduction=reduction, direction=direction,
                                                 chunk_size=chunk, backend=name, **kw))
    # fp64 truth from the same (dtype-rounded) inputs; gradients by the chain rule through the
    # logits: dL/dh = g W, dL/dW = g^T h, dL/db = sum g.
    h64 = hs_in.detach().cpu().to(F64).reshape(T, H)
    t64 = ht_in.detach().cpu().to(F64).reshape(T, H)
    W64 = W_in.detach().cpu().to(F64)
    b64 = None if b_in is None else b_in.detach().cpu().to(F64)
    ls = h64 @ W64.T + (0 if b64 is None else b64)
    lt = t64 @ W64.T + (0 if b64 is None else b64)
    lrows, lcond, grows, gcond, gsens = O.kl_terms(ls, lt, tau, direction == "reverse")
    grad_loss = torch.tensor(rng.choice([1.0, 2.0]), dtype=F32)
    gl = grad_loss if reduction != "none" else torch.ones(T)
    eloss, econd, eg, egc = O.kl_reduce(lrows, lcond, grows, gcond, row_mask, reduction, V, gl)
    esens = O.kl_reduce(lrows, lcond, grows, gsens, row_mask, reduction, V, gl)[3]
    # PyTorch's own composition in the dtype (logits rounded to the dtype, as ours are).
    with torch.enable_grad():
        h_d = hs_in.detach().cpu().reshape(T, H).clone().requires_grad_()
        W_d = W_in.detach().cpu().clone().requires_grad_()
        b_d = None if b_in is None else b_in.detach().cpu().clone().requires_grad_()
        lt_d = torch.nn.functional.linear(ht_in.detach().cpu().reshape(T, H), W_d.detach(),
                                          None if b_d is None else b_d.detach())
        ref = O.torch_kl_same_dtype(torch.nn.functional.linear(h_d, W_d, b_d), lt_d, row_mask, tau,
                                    reduction, direction == "reverse")
        if grad:
            (ref * grad_loss.to(ref.dtype)).backward()

    def err(a, e):
        d = (a.detach().double() - e).abs()
        return d.max().item() if d.numel() and bool(torch.isfinite(d).all()) else None

    if reduction == "none":
        eloss, econd = eloss.reshape(lead), econd.reshape(lead)
    # The op rounds the logits to the dtype (a GEMM in the dtype) and the logits' gradient too:
    # allowances to first order. dz: the logits' rounding (2 half-ulps + accumulation);
    # loss: sum |dL/dz| dz (fp64 autograd); gradient w.r.t. the logits: max(dz) times the row
    # sum of its Jacobian (oracle's gsens), plus its own rounding.
    eps = torch.finfo(dtype).eps
    bias_abs = 0 if b64 is None else b64.abs()
    dz_s = eps * ls.abs() + 2.0 ** -20 * (h64.abs() @ W64.abs().T + bias_abs)
    dz_t = eps * lt.abs() + 2.0 ** -20 * (t64.abs() @ W64.abs().T + bias_abs)
    with torch.enable_grad():
        zs, zt = ls.clone().requires_grad_(), lt.clone().requires_grad_()
        L = O.torch_kl_same_dtype(zs, zt, row_mask, tau, reduction, direction == "reverse")
        gs, gt = torch.autograd.grad(L.sum(), (zs, zt))
    loss_extra = 2 * (gs.abs() * dz_s + gt.abs() * dz_t).sum(-1)
    loss_extra = loss_extra.reshape(lead) if reduction == "none" else loss_extra.sum()
    msg = O.close(loss, eloss, econd, loss.dtype, torch_err=err(ref.reshape(eloss.shape), eloss),
                  acc_dtype=dtype, extra=loss_extra)
    if msg:
        return f"loss: {msg}"
    if not grad:
        return None
    call(lambda: loss.backward(grad_loss.to(loss.device)))
    dz = torch.maximum(dz_s, dz_t).amax(-1, keepdim=True) if V else torch.zeros(T, 1, dtype=F64)
    dg = dz * esens + eps * eg.abs()      # error of the logits' gradient
    gh, gW = eg @ W64, eg.T @ h64
    hshape = lead + (H,)
    checks = [("grad student_hidden", hs_in.grad, gh.reshape(hshape),
               (egc @ W64.abs()).reshape(hshape), (dg @ W64.abs()).reshape(hshape),
               err(h_d.grad.reshape(hshape), gh.reshape(hshape))),
              ("grad weight", W_in.grad, gW, egc.T @ h64.abs(), dg.T @ h64.abs(),
               err(W_d.grad, gW))]
    if b_in is not None:
        checks.append(("grad bias", b_in.grad, eg.sum(0), egc.sum(0), dg.sum(0),
                       err(b_d.grad, eg.sum(0))))
    for what, got, exp, cond, extra, terr in checks:
        if got is None:
            return f"{what}: none"
        msg = O.close(got, exp, cond, dtype, torch_err=terr, extra=extra)
        if msg:
            return f"{what}: {msg}"
    return None


@over_backends
def test_fuzz_fused_linear_kl(request, backend):
    run_fuzz(request, "fused_linear_kl", backend, case_fused_linear_kl)


# --------------------------------------------------------------------------- attn_scores

def case_attn_scores(rng, gen, name, dev, interp, desc):
    B = rng.choice([1, 2, 3])
    Hkv = rng.choice([1, 2])
    H = Hkv * rng.choice([1, 2, 3])
    Q = rng.choice([1, 1, 2, 3])
    d = rng.choice([1, 4, 8] if interp else [1, 4, 16, 33, 64])
    L = rng.choice([1, 3, 9, 20] if interp else [1, 2, 9, 40, 100])
    dtype = rng.choice([F32, F16, BF16])
    qkind = rng.choice(["normal", "normal", "ties", "huge", "tiny"])
    mag = {"normal": 1.0, "ties": 1.0, "huge": 30.0, "tiny": 1e-3}[qkind]
    q = (torch.randn(B, H, Q, d, generator=gen, dtype=F64) * mag).to(dtype)
    k = (torch.randn(B, Hkv, L, d, generator=gen, dtype=F64) * mag).to(dtype)
    if qkind == "ties":
        k = k[:, :, :1].expand(B, Hkv, L, d).clone()  # every key equal: uniform attention
    causal = rng.random() < 0.7
    q_pos = None
    if rng.random() < 0.3 or (causal and Q > L):
        q_pos = torch.randint(0, L, (B, Q), generator=gen)
    key_len = rng.randint(1, L)
    key_start = rng.randint(0, L - key_len)
    if rng.random() < 0.5:
        key_start = torch.randint(0, L - key_len + 1, (B,), generator=gen)
    kv_start = rng.choice([None, 0, rng.randint(0, L)])
    if rng.random() < 0.4:
        kv_start = torch.randint(0, L + 1, (B,), generator=gen)
    check = rng.choice([True, True, False])
    bad = None
    if rng.random() < 0.12 and isinstance(key_start, torch.Tensor):
        key_start = key_start.clone()
        key_start[rng.randrange(B)] = rng.choice([-2, L - key_len + 1, L + 5])
        bad = "key_start"
    reduce = rng.choice(["mean", "sum"])
    scale = rng.choice([None, None, 0.05, 1.0, -0.3])
    use_lse = rng.random() < 0.3
    lq, lk = rng.choice(LAYOUTS), rng.choice(LAYOUTS + ["bl_transposed"])
    desc.update(B=B, H=H, Hkv=Hkv, Q=Q, d=d, L=L, dtype=str(dtype), values=qkind, causal=causal,
                q_pos=q_pos is not None, key_len=key_len, key_start=key_start if isinstance(
                    key_start, int) else key_start.tolist(), kv_start=kv_start if not isinstance(
                    kv_start, torch.Tensor) else kv_start.tolist(), check=check, bad=bad,
                reduce=reduce, scale=scale, lse=use_lse, layouts=(lq, lk))
    q_in = to_input(q, dev, lq)
    if lk == "bl_transposed":  # [B, L, Hkv, d] storage, as a KV cache
        k_in = k.to(dev).transpose(1, 2).contiguous().transpose(1, 2)
    else:
        k_in = to_input(k, dev, lk)
    qc, kc = q_in.cpu(), k_in.cpu()
    sc = (d ** -0.5) if scale is None else scale
    lse = None
    if use_lse:  # the true row lse of the visible keys, fp32 (flash attention's softmax_lse)
        lse = torch.empty(B, H, Q, dtype=F32)
        kk = kc.double().repeat_interleave(H // Hkv, dim=1)
        s = sc * (qc.double() @ kk.transpose(-1, -2))
        j = torch.arange(L)
        lo = (kv_start if isinstance(kv_start, torch.Tensor) else torch.full((B,), kv_start or 0))
        vis = j.view(1, 1, L) >= lo.view(B, 1, 1)
        if causal:
            pos = q_pos if q_pos is not None else (L - Q + torch.arange(Q)).expand(B, Q)
            vis = vis & (j.view(1, 1, L) <= pos.unsqueeze(-1))
        s = torch.where(vis.unsqueeze(1), s, torch.full_like(s, -math.inf))
        lse = torch.logsumexp(s, -1).float()
    tensor = lambda v: v.to(dev) if isinstance(v, torch.Tensor) else v  # noqa: E731
    try:
        out = call(lambda: epic_ext.attn_scores(
            q_in, k_in, tensor(key_start), key_len, lse=tensor(lse), scale=scale, reduce=reduce,
            causal=causal, kv_start=tensor(kv_start), q_pos=tensor(q_pos), check=check,
            backend=name))
    except ValueError as e:
        if bad and check and "key_start" in str(e):
            return None
        return f"raised ValueError: {e}"
    if bad and check:
        return "bad key_start accepted with check=True"
    exp, cond = O.attn_scores(qc, kc, key_start, key_len, lse, sc, reduce, causal, kv_start, q_pos)
    if out.dtype != F32:
        return f"output dtype {out.dtype}, expected float32"
    return O.close(out, exp, cond, F32)


@over_backends
def test_fuzz_attn_scores(request, backend):
    run_fuzz(request, "attn_scores", backend, case_attn_scores)
