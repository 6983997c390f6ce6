"""The Triton KL kernel (epic_ext.triton.kl.kl_div) against the fp64 reference
(epic_ext.reference.kl_div_fwd / kl_div_rows) and, where it is built, the C++ kernel
(epic_ext._C.cpu.kl_div), under Triton's CPU interpreter.

The reference reads the same rounded logits in fp64, so what is left is the kernel's fp32
arithmetic and one rounding of the stored gradient. Shapes are small: the interpreter runs one
program (row) at a time, about 10 ms each.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before any triton-jitted code is imported

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from epic_ext import reference as ref  # noqa: E402
from epic_ext.triton import kl as tkl  # noqa: E402

try:
    from epic_ext import _C
    CPP = _C.cpu.kl_div if hasattr(_C.cpu, "kl_div") else None
except ImportError:  # the extension is not built: the reference alone
    CPP = None

# The interpreter's numpy ops warn on inf - inf in lanes that a select then discards.
pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"), pytest.mark.usefixtures("one_thread")]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TAUS = [0.5, 1.0, 2.0]
REDUCTIONS = [0, 1, 2, 3]  # none, sum, mean, batchmean
# dtype -> (loss rtol, unit of the gradient's rounding to the dtype, absolute floor (fp16 also
# flushes tiny values to its subnormal grid, spacing 2^-24), unit of the arithmetic). The loss is
# fp32 arithmetic whatever the storage (fp64 for fp64 logits).
TOL = {torch.float32: (1e-5, 2.0 ** -24, 0.0, 2.0 ** -24),
       torch.float16: (1e-5, 2.0 ** -11, 2.0 ** -25, 2.0 ** -24),
       torch.bfloat16: (1e-5, 2.0 ** -8, 0.0, 2.0 ** -24),
       torch.float64: (1e-6, 2.0 ** -53, 0.0, 2.0 ** -53)}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Fresh tensors start as NaN, so an element the kernel leaves unwritten fails."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        if t.numel() and t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", empty)


def make_logits(T, V, dtype, seed, scale=3.0):
    """Random logits (never exactly zero) rounded to dtype."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, V, generator=g, dtype=torch.float64) * scale
    x = torch.where(x.abs() < 1e-3, torch.full_like(x, 0.5), x)
    return x.to(dtype)


def make_mask(T, kind, seed=0):
    if kind == "all":
        return None
    if kind == "none":
        return torch.zeros(T, dtype=torch.bool)
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(T, generator=g) < 0.5
    m[0] = True
    if T > 1:
        m[-1] = False
    return m


def expected(s, t, mask, tau, reduction, reverse):
    """fp64 reference: (loss, grad). The loss in fp64 (kl_div_rows), the gradient from
    kl_div_fwd."""
    s64, t64 = s.double(), t.double()
    _, grad = ref.kl_div_fwd(s64, t64, mask, tau, reduction, reverse, True, False)
    per_row = ref.kl_div_rows(s64, t64, tau, reverse)
    m = mask if mask is not None else torch.ones(s.shape[0], dtype=torch.bool)
    per_row = torch.where(m, per_row, torch.zeros_like(per_row))
    if reduction == 0:
        return per_row, grad
    rows = float(m.sum())
    norm = {1: 1.0, 2: rows * s.shape[1], 3: rows}[reduction]
    return (per_row.sum() / norm if norm > 0 else torch.zeros((), dtype=torch.float64)), grad


def grad_error_bound(s, t, mask, tau, reduction, reverse):
    """Per element, what the kernel's arithmetic may leave in the gradient before it is
    stored: a few units of the arithmetic times the magnitudes it combines (the shifted logits
    going into exp, and for reverse KL the terms of log p_s - log p_t - KL). The reverse
    gradient is a difference of O(|logits| / tau) numbers, so its error is not bounded by a
    fraction of max|grad|."""
    a, b = s.double() / tau, t.double() / tau
    ls, lt = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    ps, pt = ls.exp(), lt.exp()
    ma, mb = a.amax(-1, keepdim=True), b.amax(-1, keepdim=True)

    def on(p, x):  # |x| where p > 0 (x may be -inf where p = 0)
        return torch.where(p > 0, x.abs(), torch.zeros_like(x))

    if reverse:
        kl = torch.where(ps > 0, ps * (ls - lt), torch.zeros_like(ps)).sum(-1, keepdim=True)
        lr = on(ps, ls - lt - kl)
        terms = 1 + on(ps, a) + on(ps, b) + ma.abs() + mb.abs() + (ma - ls.amax(-1, keepdim=True)).abs() \
            + (mb - lt.amax(-1, keepdim=True)).abs() + kl.abs()
        mag = ps * (terms + lr * (1 + on(ps, a - ma)))
    else:
        mag = ps * (1 + on(ps, a - ma)) + pt * (1 + on(pt, b - mb))
    m = mask if mask is not None else torch.ones(s.shape[0], dtype=torch.bool)
    rows = float(m.sum())
    norm = {0: 1.0, 1: 1.0, 2: rows * s.shape[1], 3: rows}[reduction]
    c = tau / norm if norm > 0 else 0.0
    return torch.where(m[:, None], 8 * c * mag, torch.zeros_like(mag))


def assert_grad_close(grad, want, bound, dtype, factor=1.0):
    _, unit, floor, arith = TOL[dtype]
    grad, want = grad.double(), want.double()
    allowed = factor * (unit * want.abs() + (1 + unit) * bound * (arith / 2.0 ** -24) + floor)
    err = (grad - want).abs()
    same = (grad == want) | (grad.isnan() & want.isnan())
    bad = ~same & ~(err <= allowed)
    assert not bad.any(), (f"{int(bad.sum())} of {grad.numel()} gradient elements off, worst "
                           f"error {err[bad].max().item():.3e} (allowed there "
                           f"{allowed[bad][err[bad].argmax()].item():.3e})")


def check_close(loss, grad, s, t, mask, tau, reduction, reverse):
    loss_rtol = TOL[s.dtype][0]
    e_loss, e_grad = expected(s, t, mask, tau, reduction, reverse)
    assert loss.dtype == torch.float32
    assert loss.shape == ((s.shape[0],) if reduction == 0 else ())
    torch.testing.assert_close(loss.double(), e_loss, rtol=loss_rtol, atol=1e-7, equal_nan=True)
    assert grad.dtype == s.dtype and grad.shape == s.shape
    assert_grad_close(grad, e_grad, grad_error_bound(s, t, mask, tau, reduction, reverse), s.dtype)


def check_cpp(loss, grad, s, t, mask, tau, reduction, reverse):
    """Parity with the C++ kernel (same semantics, fp32 arithmetic in another order): within
    twice what each may differ from the exact values."""
    if CPP is None:
        return
    c_loss, c_grad = CPP(s, t, mask, tau, reduction, reverse, True, False)
    torch.testing.assert_close(loss, c_loss, rtol=2 * TOL[s.dtype][0], atol=1e-7, equal_nan=True)
    assert_grad_close(grad, c_grad, grad_error_bound(s, t, mask, tau, reduction, reverse),
                      s.dtype, factor=2.0)


def run(s, t, mask=None, tau=1.0, reduction=3, reverse=False, compute_grad=True, inplace=False):
    return tkl.kl_div(s, t, mask, tau, reduction, reverse, compute_grad, inplace)


# ---------------------------------------------------------------------------------------------
# Random logits: shapes x dtypes x directions, every reduction and temperature
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("V", [1, 7, 1000, 4099])
@pytest.mark.parametrize("T", [1, 3])
def test_random(T, V, dtype, reverse):
    s = make_logits(T, V, dtype, seed=T * 1000 + V)
    t = make_logits(T, V, dtype, seed=T * 1000 + V + 1)
    mask = make_mask(T, "some") if T > 1 else None
    for i, reduction in enumerate(REDUCTIONS):
        tau = TAUS[(i + V) % 3]
        loss, grad = run(s, t, mask, tau, reduction, reverse)
        check_close(loss, grad, s, t, mask, tau, reduction, reverse)
        if dtype != torch.float64:
            check_cpp(loss, grad, s, t, mask, tau, reduction, reverse)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("V", [1, 7, 1000, 4099])
def test_random_33_rows(V, reverse):
    """33 rows (one program each), half of them masked out; dtype and reduction vary with V."""
    i = [1, 7, 1000, 4099].index(V) + 2 * reverse
    dtype, reduction, tau = DTYPES[i % 3], REDUCTIONS[i % 4], TAUS[i % 3]
    s = make_logits(33, V, dtype, seed=V + 7)
    t = make_logits(33, V, dtype, seed=V + 8)
    mask = make_mask(33, "some", seed=V)
    loss, grad = run(s, t, mask, tau, reduction, reverse)
    check_close(loss, grad, s, t, mask, tau, reduction, reverse)
    check_cpp(loss, grad, s, t, mask, tau, reduction, reverse)
    assert (grad[~mask] == 0).all()


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_vocab_32000(dtype, reverse):
    """Eight chunks per row (4096 under the interpreter). Rows 1-3 ramp, so the running maxima
    grow chunk after chunk and the exp sums and S are rescaled: both maxima (row 1), only the
    teacher's (row 2), only the student's (row 3)."""
    s = make_logits(4, 32000, dtype, seed=11)
    t = make_logits(4, 32000, dtype, seed=12)
    ramp = torch.linspace(-20.0, 25.0, 32000, dtype=torch.float64)
    s[1] = (s[1].double() + ramp).to(dtype)
    t[1] = (t[1].double() + 1.2 * ramp).to(dtype)
    s[2] = (s[2].double() - ramp).to(dtype)
    t[2] = (t[2].double() + ramp).to(dtype)
    s[3] = (s[3].double() + 0.8 * ramp).to(dtype)
    for reduction, tau in ((3, 1.0), (0, 2.0)):
        loss, grad = run(s, t, None, tau, reduction, reverse)
        check_close(loss, grad, s, t, None, tau, reduction, reverse)
        check_cpp(loss, grad, s, t, None, tau, reduction, reverse)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_qwen_vocab_accuracy(reverse):
    """V = 151936 in fp32: per-lane accumulation, the loss within 1e-5 relative of fp64."""
    V = 151936
    s = make_logits(1, V, torch.float32, seed=21)
    t = make_logits(1, V, torch.float32, seed=22)
    loss, grad = run(s, t, None, 1.0, 0, reverse)
    exact = ref.kl_div_rows(s.double(), t.double(), 1.0, reverse)
    assert ((loss.double() - exact).abs() / exact).max().item() < 1e-5
    check_close(loss, grad, s, t, None, 1.0, 0, reverse)


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mask_some_rows(reduction, reverse):
    s = make_logits(6, 300, torch.float32, seed=31)
    t = make_logits(6, 300, torch.float32, seed=32)
    mask = torch.tensor([True, False, False, True, True, False])
    loss, grad = run(s, t, mask, 1.0, reduction, reverse)
    check_close(loss, grad, s, t, mask, 1.0, reduction, reverse)
    check_cpp(loss, grad, s, t, mask, 1.0, reduction, reverse)
    assert (grad[~mask] == 0).all() and (grad[mask] != 0).any()
    if reduction == 0:
        assert (loss[~mask] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mask_no_rows(reduction, reverse, dtype):
    """No row selected: loss 0 for every reduction (normaliser 0), gradient 0, never NaN."""
    T = 33
    s = make_logits(T, 1000, dtype, seed=41)
    t = make_logits(T, 1000, dtype, seed=42)
    loss, grad = run(s, t, torch.zeros(T, dtype=torch.bool), 2.0, reduction, reverse)
    assert loss.shape == ((T,) if reduction == 0 else ())
    assert (loss == 0).all() and (grad == 0).all()


def test_mask_all_rows_equals_no_mask():
    s = make_logits(3, 500, torch.float32, seed=43)
    t = make_logits(3, 500, torch.float32, seed=44)
    for reduction in REDUCTIONS:
        a = run(s, t, torch.ones(3, dtype=torch.bool), 1.0, reduction)
        b = run(s, t, None, 1.0, reduction)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---------------------------------------------------------------------------------------------
# Extreme logits and zero-probability entries
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_extreme_logits(dtype, reverse):
    """+-1e4 logits: everything is computed from logits shifted by the row maxima."""
    T, V = 3, 1000
    g = torch.Generator().manual_seed(51)
    s = make_logits(T, V, torch.float64, seed=52)
    t = make_logits(T, V, torch.float64, seed=53)
    for x in (s, t):
        r = torch.rand(T, V, generator=g)
        x[r < 0.01] = 1e4
        x[(r >= 0.01) & (r < 0.03)] = -1e4
    t[0, :5] = 1e4  # the teacher's peak where the student is low
    s[0, :5] = -1e4
    s[1] = s[1] + 5e3  # a large common offset
    s, t = s.to(dtype), t.to(dtype)
    for i, tau in enumerate(TAUS):
        reduction = REDUCTIONS[i + 1]
        loss, grad = run(s, t, None, tau, reduction, reverse)
        assert torch.isfinite(loss).all() and torch.isfinite(grad.float()).all()
        check_close(loss, grad, s, t, None, tau, reduction, reverse)
        check_cpp(loss, grad, s, t, None, tau, reduction, reverse)


def _with_neg_inf(T, V, dtype, seed, where):
    """Logits with -inf entries (never a whole row) in the student, the teacher or both."""
    s = make_logits(T, V, torch.float64, seed=seed)
    t = make_logits(T, V, torch.float64, seed=seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    hole = torch.rand(T, V, generator=g) < 0.2
    hole[:, 0] = False  # never a whole row
    if where in ("student", "both"):
        s[hole] = -math.inf
    if where in ("teacher", "both"):
        t[hole] = -math.inf
    return s.to(dtype), t.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", ["both-forward", "both-reverse", "teacher-forward",
                                  "student-reverse"])
def test_neg_inf_finite(case, dtype):
    """Zero-probability entries of the target contribute 0 (no NaN from 0 * inf); the KL stays
    finite when the other side has no mass where the target has none either."""
    where, direction = case.split("-")
    reverse = direction == "reverse"
    s, t = _with_neg_inf(3, 1000, dtype, 61, where)
    mask = torch.tensor([True, False, True])
    for reduction, tau in ((0, 1.0), (3, 0.5), (2, 2.0)):
        loss, grad = run(s, t, mask, tau, reduction, reverse)
        assert not torch.isnan(loss).any() and not torch.isnan(grad.float()).any()
        assert torch.isfinite(loss).all()
        check_close(loss, grad, s, t, mask, tau, reduction, reverse)
        check_cpp(loss, grad, s, t, mask, tau, reduction, reverse)


@pytest.mark.parametrize("case", ["student-forward", "teacher-reverse"])
def test_neg_inf_infinite(case):
    """The target has mass where the other side has none: KL = +inf, as in the reference."""
    where, direction = case.split("-")
    reverse = direction == "reverse"
    s, t = _with_neg_inf(2, 100, torch.float32, 71, where)
    loss, grad = run(s, t, None, 1.0, 0, reverse)
    exact = ref.kl_div_rows(s.double(), t.double(), 1.0, reverse)
    assert torch.isinf(exact).all() and torch.equal(loss.double(), exact)
    if not reverse:  # forward: tau (p_s - p_t) stays finite
        check_close(loss, grad, s, t, None, 1.0, 0, reverse)
    if CPP is not None:
        assert torch.equal(loss, CPP(s, t, None, 1.0, 0, reverse, False, False)[0])


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_neg_inf_whole_chunks(reverse):
    """Whole chunks of -inf (the first one included) on top of -inf holes: the running maxima
    leave their -FLT_MAX start only later, with sums that are still 0. Rows: both sides -inf
    on the first 4096 entries; the target side -inf on the first 5000 (so its first chunk has
    no mass at all); the non-target side -inf where the target is too."""
    V = 9000
    s = make_logits(3, V, torch.float32, seed=75).double()
    t = make_logits(3, V, torch.float32, seed=76).double()
    tgt, other = (s, t) if reverse else (t, s)
    s[0, :4096] = -math.inf
    t[0, :4096] = -math.inf
    tgt[1, :5000] = -math.inf
    tgt[2, 100:4500] = -math.inf
    other[2, 200:4400] = -math.inf
    s, t = s.float(), t.float()
    for reduction in (0, 3):
        loss, grad = run(s, t, None, 1.0, reduction, reverse)
        assert torch.isfinite(loss).all() and not torch.isnan(grad).any()
        check_close(loss, grad, s, t, None, 1.0, reduction, reverse)
        check_cpp(loss, grad, s, t, None, 1.0, reduction, reverse)
    # the target has mass in a chunk where the other side is all -inf: KL = +inf
    other = t if reverse else s
    other[1, 6000:8192] = -math.inf
    loss, _ = run(s, t, None, 1.0, 0, reverse, compute_grad=False)
    assert torch.isinf(loss[1]) and torch.isfinite(loss[[0, 2]]).all()


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64],
                         ids=lambda d: str(d)[6:])
def test_undefined_rows_are_nan(dtype, reverse):
    """D3: a kept row whose softmax is undefined on either side (a NaN or +inf logit, every
    logit -inf; in the first chunk or a later one) has loss NaN and an all-NaN gradient row, as
    the reference and the C++ kernel; masked-out rows stay 0 whatever they hold."""
    T, V = 8, 4099
    s = make_logits(T, V, torch.float64, seed=95)
    t = make_logits(T, V, torch.float64, seed=96)
    s[0, 7] = math.nan
    t[1, 4000] = math.nan
    s[2, 4098] = math.inf
    t[3, 0] = math.inf
    s[4] = -math.inf
    t[5] = -math.inf
    t[6, 3] = math.nan  # masked out
    s, t = s.to(dtype), t.to(dtype)
    mask = torch.tensor([True] * 6 + [False, True])
    for reduction in (0, 3):
        loss, grad = run(s, t, mask, 1.0, reduction, reverse)
        e_loss, e_grad = ref.kl_div_fwd(s, t, mask, 1.0, reduction, reverse, True, False)
        if reduction == 0:
            assert loss[:6].isnan().all() and loss[6] == 0 and torch.isfinite(loss[7])
        else:
            assert loss.isnan() and e_loss.isnan()
        assert grad[:6].isnan().all() and (grad[6] == 0).all()
        assert torch.isfinite(grad[7].double()).all()
        assert torch.equal(grad.isnan(), e_grad.isnan())
        torch.testing.assert_close(loss.double(), e_loss.double(), rtol=1e-4, atol=1e-7,
                                   equal_nan=True)
        if CPP is not None:
            c_loss, c_grad = CPP(s, t, mask, 1.0, reduction, reverse, True, False)
            assert torch.equal(c_grad.isnan(), grad.isnan())
            torch.testing.assert_close(c_loss, loss, rtol=1e-4, atol=1e-7, equal_nan=True)


def test_bf16_gradient_rounds_to_nearest():
    """The stored bf16 gradient is rounded to nearest (the interpreter's own fp32 -> bf16 cast
    truncates, which biased every gradient by about -0.2%)."""
    s = make_logits(4, 1000, torch.bfloat16, seed=97)
    t = make_logits(4, 1000, torch.bfloat16, seed=98)
    _, grad = run(s, t, None, 1.0, 1, False)
    _, want = ref.kl_div_fwd(s.double(), t.double(), None, 1.0, 1, False, True, False)
    want_bf16 = want.to(torch.bfloat16)
    assert (grad != want_bf16).float().mean() < 0.02  # a few ties / last-bit differences
    # least-squares gain against the exact gradient: truncation gives 0.9956 here, rounding 1.0006
    gain = (grad.double().flatten() @ want.flatten()) / (want.flatten() @ want.flatten())
    assert abs(gain.item() - 1) < 2e-3


# ---------------------------------------------------------------------------------------------
# Output modes: inplace, compute_grad False, layouts
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_inplace(dtype, reverse):
    s = make_logits(4, 700, dtype, seed=81)
    t = make_logits(4, 700, dtype, seed=82)
    mask = torch.tensor([True, False, True, True])
    loss, grad = run(s, t, mask, 2.0, 3, reverse)
    work = s.clone()
    loss2, grad2 = run(work, t, mask, 2.0, 3, reverse, inplace=True)
    assert grad2.data_ptr() == work.data_ptr()
    assert torch.equal(loss2, loss) and torch.equal(work, grad)
    check_close(loss2, work, s, t, mask, 2.0, 3, reverse)


def test_inplace_row_strided():
    """inplace on a row-strided view writes only the view."""
    base = make_logits(3, 600, torch.float32, seed=83)
    s = base[:, :500]
    t = make_logits(3, 500, torch.float32, seed=84)
    s_copy = s.clone()
    loss, grad = run(s, t, None, 1.0, 1, inplace=True)
    assert grad.data_ptr() == base.data_ptr()
    check_close(loss, base[:, :500], s_copy, t, None, 1.0, 1, False)
    assert torch.equal(base[:, 500:], make_logits(3, 600, torch.float32, seed=83)[:, 500:])


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_grad(reduction):
    s = make_logits(3, 1000, torch.bfloat16, seed=91)
    t = make_logits(3, 1000, torch.bfloat16, seed=92)
    mask = torch.tensor([True, True, False])
    loss, grad = run(s, t, mask, 1.0, reduction, True, compute_grad=False)
    assert grad.numel() == 0 and grad.dtype == s.dtype
    full_loss, _ = run(s, t, mask, 1.0, reduction, True)
    assert torch.equal(loss, full_loss)
    # inplace without a gradient leaves the student alone
    s_copy = s.clone()
    loss3, grad3 = run(s, t, mask, 1.0, reduction, True, compute_grad=False, inplace=True)
    assert torch.equal(s, s_copy) and grad3.numel() == 0 and torch.equal(loss3, loss)


def test_layouts():
    """Row-strided views are read in place; a non-unit last stride is made contiguous."""
    s = make_logits(3, 900, torch.float16, seed=101)
    t = make_logits(3, 900, torch.float16, seed=102)
    want_loss, want_grad = run(s, t, None, 2.0, 0, False)
    wide_s = torch.cat([s, make_logits(3, 100, torch.float16, seed=103)], dim=1)[:, :900]
    wide_t = torch.cat([t, make_logits(3, 37, torch.float16, seed=104)], dim=1)[:, :900]
    loss, grad = run(wide_s, wide_t, None, 2.0, 0, False)
    assert torch.equal(loss, want_loss) and torch.equal(grad, want_grad)
    assert grad.is_contiguous()
    loss, grad = run(s.t().contiguous().t(), t.t().contiguous().t(), None, 2.0, 0, False)
    assert torch.equal(loss, want_loss) and torch.equal(grad, want_grad)
    with pytest.raises(ValueError, match="unit last stride"):
        run(s.t().contiguous().t(), t, None, 2.0, 0, False, inplace=True)


def test_deterministic():
    s = make_logits(5, 1500, torch.float32, seed=111)
    t = make_logits(5, 1500, torch.float32, seed=112)
    a = run(s, t, None, 1.0, 3, True)
    b = run(s, t, None, 1.0, 3, True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_empty_shapes():
    for reduction in REDUCTIONS:
        loss, grad = run(torch.randn(0, 5), torch.randn(0, 5), None, 1.0, reduction)
        assert grad.shape == (0, 5)
        if reduction == 0:
            assert loss.shape == (0,)
        else:
            assert loss.shape == () and loss.item() == 0.0
    # V = 0: every row's KL is an empty sum (the reference's 0)
    loss, grad = run(torch.randn(2, 0), torch.randn(2, 0), None, 1.0, 0)
    assert torch.equal(loss, torch.zeros(2)) and grad.shape == (2, 0)


def test_invalid_arguments():
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    with pytest.raises(ValueError, match="2-D"):
        run(torch.randn(5), torch.randn(5))
    with pytest.raises(ValueError, match="teacher"):
        run(s, torch.randn(2, 6))
    with pytest.raises(TypeError, match="teacher"):
        run(s, t.half())
    with pytest.raises(TypeError, match="floating"):
        run(s.long(), t.long())
    with pytest.raises(ValueError, match="temperature"):
        run(s, t, None, 0.0)
    with pytest.raises(ValueError, match="temperature"):
        run(s, t, None, math.inf)
    for tau in (1e-320, 1e-20, 1e39, 1e300):  # tau, 1/tau, tau^2 must be normal fp32 numbers
        with pytest.raises(ValueError, match="temperature"):
            run(s, t, None, tau)
    with pytest.raises(ValueError, match="reduction"):
        run(s, t, None, 1.0, 4)
    with pytest.raises(ValueError, match="mask"):
        run(s, t, torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        run(s, t, torch.ones(2, dtype=torch.int64))


def test_exported():
    import epic_ext.triton as tb
    assert tb.kl_div is tkl.kl_div
