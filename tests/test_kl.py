"""epic_ext.kl_div and fused_linear_kl on every backend against fp64 autograd of the reference."""
import pytest
import torch
import torch.nn.functional as F

import epic_ext
from epic_ext import _backend
from epic_ext import reference as R
from conftest import is_interpreted, poisoned_outputs

# (dtype) -> (loss rtol, grad atol relative to max|grad|): the kernel reads the logits in their
# dtype and computes in fp32; the fp64 reference reads the same rounded logits, so the only
# error left is fp32 arithmetic plus one rounding of the stored gradient.
KL_TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-4, 2e-3), torch.bfloat16: (2e-4, 1e-2)}


@pytest.fixture
def kl_backend(backend):
    name, device = backend
    module = _backend._load(name)[0]
    if name != "reference" and not hasattr(module, "kl_div"):
        pytest.skip(f"{name} has no kl_div kernel")
    return name, device


def logits(T, V, dtype, gen, scale=3.0):
    return (torch.randn(T, V, generator=gen) * scale).to(dtype)


def reference_loss_and_grad(s, t, mask, tau, reduction, reverse, grad_out):
    s64 = s.double().requires_grad_()
    loss = R.kl_div(s64, t.double(), mask, tau, reduction, reverse)
    loss.backward(grad_out.double() if reduction == "none" else torch.tensor(float(grad_out), dtype=torch.float64))
    return loss.detach(), s64.grad


def check(kl_backend, T, V, dtype, tau=1.0, reduction="batchmean", direction="forward", mask=None,
          seed=0, scale=3.0, s=None, t=None):
    dev = kl_backend[1]
    gen = torch.Generator().manual_seed(seed)
    s = logits(T, V, dtype, gen, scale) if s is None else s
    t = logits(T, V, dtype, gen, scale) if t is None else t
    grad_out = torch.rand(T, generator=gen) + 0.5 if reduction == "none" else torch.tensor(0.7)
    student = s.clone().to(dev).requires_grad_()
    with poisoned_outputs():
        loss = epic_ext.kl_div(student, t.to(dev), None if mask is None else mask.to(dev),
                               temperature=tau, reduction=reduction, direction=direction)
        loss.backward(grad_out.to(dev) if reduction == "none" else grad_out.to(dev))
    want_loss, want_grad = reference_loss_and_grad(s, t, mask, tau, reduction,
                                                   direction == "reverse", grad_out)
    rtol, gtol = KL_TOL[dtype]
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double().cpu(), want_loss, rtol=rtol, atol=rtol * 1e-2)
    scale_g = max(want_grad.abs().max().item(), 1e-30)
    err = (student.grad.double().cpu() - want_grad).abs().max().item()
    assert err <= gtol * scale_g, f"grad err {err:.3e} vs max|grad| {scale_g:.3e}"
    assert not torch.isnan(student.grad).any()
    return loss, student.grad


@pytest.mark.parametrize("T,V", [(1, 1), (3, 7), (5, 1000), (2, 32000)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_shapes_dtypes(kl_backend, T, V, dtype, direction):
    if is_interpreted(*kl_backend) and V > 1000:
        pytest.skip("Triton interpreter: small shapes only")
    check(kl_backend, T, V, dtype, direction=direction, seed=T * V)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_kl_reductions_temperatures_masks(kl_backend, reduction, tau):
    gen = torch.Generator().manual_seed(1)
    mask = torch.rand(9, generator=gen) > 0.4
    check(kl_backend, 9, 300, torch.float32, tau=tau, reduction=reduction, mask=mask, seed=2)


def test_kl_large_rows(kl_backend):
    """T = 1000 rows, and V = 151936 on a few rows (Qwen's vocabulary)."""
    if is_interpreted(*kl_backend):
        pytest.skip("Triton interpreter: small shapes only")
    check(kl_backend, 1000, 64, torch.float32, seed=3)
    check(kl_backend, 2, 151936, torch.float32, seed=4)
    check(kl_backend, 2, 151936, torch.bfloat16, seed=5, direction="reverse")


def test_kl_no_row_selected_gives_zero(kl_backend):
    dev = kl_backend[1]
    gen = torch.Generator().manual_seed(6)
    s = logits(4, 50, torch.float32, gen).to(dev).requires_grad_()
    t = logits(4, 50, torch.float32, gen).to(dev)
    for reduction in ("batchmean", "sum", "mean", "none"):
        s.grad = None
        loss = epic_ext.kl_div(s, t, torch.zeros(4, dtype=torch.bool, device=dev), reduction=reduction)
        loss.sum().backward()
        assert torch.all(loss == 0) and torch.all(s.grad == 0), reduction


def test_kl_labels_ignore_index(kl_backend):
    dev = kl_backend[1]
    gen = torch.Generator().manual_seed(7)
    s = logits(2 * 6, 40, torch.float32, gen).view(2, 6, 40)
    t = logits(2 * 6, 40, torch.float32, gen).view(2, 6, 40)
    labels = torch.randint(0, 40, (2, 6), generator=gen)
    labels[0, :3] = -100
    got = epic_ext.kl_div(s.to(dev), t.to(dev), labels=labels.to(dev))
    want = epic_ext.kl_div(s.to(dev), t.to(dev), labels.to(dev) != -100)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got.cpu().double(),
                               R.kl_div(s.reshape(12, 40).double(), t.reshape(12, 40).double(),
                                        (labels != -100).reshape(-1)), rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_extreme_and_infinite_logits(kl_backend, direction):
    gen = torch.Generator().manual_seed(8)
    T, V = 6, 257
    s = torch.randn(T, V, generator=gen) * 1e4
    t = torch.randn(T, V, generator=gen) * 1e4
    # -inf entries on either side where the other side is -inf too or the target has no mass.
    s[0, :5] = float("-inf")
    t[0, :5] = float("-inf")
    if direction == "forward":
        t[1, 10:20] = float("-inf")   # teacher has no mass there: those terms are 0
    else:
        s[1, 10:20] = float("-inf")   # student has no mass there
    s[2] = torch.linspace(-1e4, 1e4, V)
    t[2] = torch.linspace(1e4, -1e4, V)
    check(kl_backend, T, V, torch.float32, direction=direction, s=s, t=t, seed=9)


def test_kl_inplace_writes_gradient_over_logits(kl_backend):
    if kl_backend[0] == "reference":
        pytest.skip("the reference has no buffer of its own to reuse")
    dev = kl_backend[1]
    gen = torch.Generator().manual_seed(10)
    s = logits(5, 300, torch.bfloat16, gen).to(dev)
    t = logits(5, 300, torch.bfloat16, gen).to(dev)
    a = s.clone().requires_grad_()
    loss_a = epic_ext.kl_div(a, t)
    loss_a.backward(torch.tensor(1.5, device=dev))
    b_buf = s.clone()
    b = b_buf.requires_grad_()
    loss_b = epic_ext.kl_div(b, t, inplace=True)
    loss_b.backward(torch.tensor(1.5, device=dev))
    torch.testing.assert_close(loss_a, loss_b)
    torch.testing.assert_close(a.grad, b.grad)
    assert b.grad.data_ptr() == b_buf.data_ptr()  # the gradient lives in the logits' buffer


def test_kl_no_grad_and_teacher_gets_none(kl_backend):
    dev = kl_backend[1]
    gen = torch.Generator().manual_seed(11)
    s = logits(3, 64, torch.float32, gen).to(dev).requires_grad_()
    t = logits(3, 64, torch.float32, gen).to(dev).requires_grad_()
    epic_ext.kl_div(s, t).backward()
    assert t.grad is None and s.grad is not None
    with torch.no_grad():
        plain = epic_ext.kl_div(s, t)
    torch.testing.assert_close(plain, epic_ext.kl_div(s.detach(), t.detach()))


@pytest.mark.parametrize("call,exc,words", [
    (lambda s, t: epic_ext.kl_div(s, t[:, :5]), ValueError, "teacher_logits must match"),
    (lambda s, t: epic_ext.kl_div(s, t.double()), TypeError, "teacher_logits must be"),
    (lambda s, t: epic_ext.kl_div(s.long(), t), TypeError, "student_logits must be"),
    (lambda s, t: epic_ext.kl_div(s, t, temperature=0.0), ValueError, "temperature"),
    (lambda s, t: epic_ext.kl_div(s, t, temperature=float("inf")), ValueError, "temperature"),
    (lambda s, t: epic_ext.kl_div(s, t, reduction="avg"), ValueError, "reduction"),
    (lambda s, t: epic_ext.kl_div(s, t, direction="both"), ValueError, "direction"),
    (lambda s, t: epic_ext.kl_div(s, t, torch.ones(3)), TypeError, "mask must be a bool"),
    (lambda s, t: epic_ext.kl_div(s, t, torch.ones(2, dtype=torch.bool)), ValueError, "mask must have shape"),
    (lambda s, t: epic_ext.kl_div(s, t, torch.ones(3, dtype=torch.bool),
                                  labels=torch.zeros(3, dtype=torch.long)), ValueError, "not both"),
    (lambda s, t: epic_ext.kl_div(s, t.to("meta")), ValueError, "teacher_logits must be on"),
])
def test_kl_bad_input(call, exc, words):
    gen = torch.Generator().manual_seed(12)
    with pytest.raises(exc, match=words):
        call(torch.randn(3, 9, generator=gen), torch.randn(3, 9, generator=gen))


def test_kl_opcheck_and_compile(kl_backend):
    dev = kl_backend[1]
    gen = torch.Generator().manual_seed(13)
    s = logits(4, 33, torch.float32, gen).to(dev).requires_grad_()
    t = logits(4, 33, torch.float32, gen).to(dev)
    m = torch.tensor([True, False, True, True], device=dev)
    for args in [(s, t, None, 1.0, 3, False, True), (s, t, m, 2.0, 0, True, True),
                 (s, t, m, 0.5, 2, False, False)]:
        torch.library.opcheck(torch.ops.epic_ext.kl_div.default, args,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    if is_interpreted(*kl_backend):
        return
    torch._dynamo.reset()
    step = torch.compile(lambda a, b: epic_ext.kl_div(a, b, m, temperature=2.0) * 3,
                         fullgraph=True, backend="aot_eager")
    a = s.detach().clone().requires_grad_()
    step(a, t).backward()
    b = s.detach().clone().requires_grad_()
    (epic_ext.kl_div(b, t, m, temperature=2.0) * 3).backward()
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("chunk", [1, 5, 64])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
def test_fused_linear_kl(kl_backend, chunk, reduction):
    dev = kl_backend[1]
    gen = torch.Generator().manual_seed(14)
    B, L, H, V = 2, 9, 24, 70
    h_s = torch.randn(B, L, H, generator=gen)
    h_t = torch.randn(B, L, H, generator=gen)
    W = torch.randn(V, H, generator=gen) * 0.3
    b = torch.randn(V, generator=gen) * 0.1
    labels = torch.randint(0, V, (B, L), generator=gen)
    labels[:, :4] = -100  # prompt rows: no loss
    hs, w, bb = (x.clone().to(dev).requires_grad_() for x in (h_s, W, b))
    ht = h_t.to(dev).requires_grad_()
    loss = epic_ext.fused_linear_kl(hs, ht, w, bb, labels=labels.to(dev), temperature=2.0,
                                    reduction=reduction, chunk_size=chunk)
    loss.backward(torch.tensor(0.6, device=dev))
    hs64, w64, b64 = (x.double().requires_grad_() for x in (h_s, W, b))
    want = R.kl_div(F.linear(hs64, w64, b64).reshape(-1, V),
                    F.linear(h_t.double(), w64, b64).detach().reshape(-1, V),
                    (labels != -100).reshape(-1), 2.0, reduction)
    (want * 0.6).backward()
    torch.testing.assert_close(loss.double().cpu(), want.detach(), rtol=1e-5, atol=1e-7)
    for got, ref in ((hs.grad, hs64.grad), (w.grad, w64.grad), (bb.grad, b64.grad)):
        torch.testing.assert_close(got.double().cpu(), ref, rtol=1e-4, atol=1e-6)
    assert ht.grad is None


def test_kl_second_backward_raises_instead_of_a_wrong_gradient(kl_backend):
    dev = kl_backend[1]
    gen = torch.Generator().manual_seed(15)
    s = logits(3, 40, torch.float32, gen).to(dev).requires_grad_()
    t = logits(3, 40, torch.float32, gen).to(dev)
    loss = epic_ext.kl_div(s, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward|modified by an inplace operation"):
        loss.backward()


# --------------------------------------------------------------------------- non-finite logits

UNDEFINED_CASES = [(side, kind) for side in ("student", "teacher")
                   for kind in ("nan", "+inf", "all -inf")]


def _spoil(x, row, kind):
    if kind == "nan":
        x[row, 3] = float("nan")
    elif kind == "+inf":
        x[row, 3] = float("inf")
    else:
        x[row] = float("-inf")


def _assert_nan_pattern_close(got, want, rtol, what):
    """NaN exactly where the reference has NaN; elsewhere within rtol * max|want|."""
    got, want = got.double().cpu(), want.double().cpu()
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN pattern differs"
    ok = ~want.isnan()
    if ok.any():
        scale = max(want[ok].abs().max().item(), 1e-30)
        err = (got[ok] - want[ok]).abs().max().item()
        assert err <= rtol * scale, f"{what}: err {err:.3e} vs max {scale:.3e}"


@pytest.mark.parametrize("side,kind", UNDEFINED_CASES, ids=lambda v: str(v).replace(" ", ""))
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_undefined_softmax_rows_are_nan(kl_backend, side, kind, direction):
    """D3: a selected row whose softmax is undefined (NaN / +inf logit, or all -inf) gives a NaN
    loss and an all-NaN gradient row on every backend, the reference included; other rows are
    untouched, and an unselected undefined row contributes nothing."""
    dev = kl_backend[1]
    gen = torch.Generator().manual_seed(20)
    s = logits(5, 37, torch.float32, gen)
    t = logits(5, 37, torch.float32, gen)
    _spoil(s if side == "student" else t, 1, kind)   # selected
    _spoil(s if side == "student" else t, 3, kind)   # not selected
    mask = torch.tensor([True, True, True, False, True])
    for reduction in ("none", "batchmean", "sum", "mean"):
        student = s.clone().to(dev).requires_grad_()
        with poisoned_outputs():
            loss = epic_ext.kl_div(student, t.to(dev), mask.to(dev), reduction=reduction,
                                   direction=direction)
            loss.backward(torch.full_like(loss, 0.7))
        want_loss, want_grad = reference_loss_and_grad(s, t, mask, 1.0, reduction,
                                                       direction == "reverse",
                                                       torch.full(loss.shape, 0.7))
        if reduction == "none":
            assert loss[1].isnan() and torch.isfinite(loss[[0, 2, 4]]).all() and loss[3] == 0
        else:
            assert loss.isnan()
        _assert_nan_pattern_close(loss, want_loss, 2e-5, f"{reduction} loss")
        g = student.grad.cpu()
        assert g[1].isnan().all() and torch.isfinite(g[[0, 2, 4]]).all() and (g[3] == 0).all()
        _assert_nan_pattern_close(g, want_grad, 2e-5, f"{reduction} grad")


def test_kl_unselected_undefined_rows_never_contribute(kl_backend):
    dev = kl_backend[1]
    gen = torch.Generator().manual_seed(21)
    s = logits(4, 20, torch.float32, gen)
    t = logits(4, 20, torch.float32, gen)
    s[0, 2], t[2] = float("nan"), float("-inf")
    mask = torch.tensor([False, True, False, True])
    loss = epic_ext.kl_div(s.to(dev), t.to(dev), mask.to(dev), nan_policy="raise")
    want = epic_ext.kl_div(s[[1, 3]].to(dev), t[[1, 3]].to(dev))
    torch.testing.assert_close(loss, want)


@pytest.mark.parametrize("tau", [1e-320, 1e-20, 1e39, 1e300])
def test_kl_temperature_outside_fp32_is_rejected(tau):
    """D3: tau, 1/tau and tau^2 must be normal fp32 numbers, in the API and in every kernel."""
    s, t = torch.randn(3, 9), torch.randn(3, 9)
    with pytest.raises(ValueError, match="temperature"):
        epic_ext.kl_div(s, t, temperature=tau)
    with pytest.raises(ValueError, match="temperature"):
        epic_ext.fused_linear_kl(torch.randn(3, 4), torch.randn(3, 4), torch.randn(9, 4),
                                 temperature=tau)
    for name in ("cpu", "triton"):
        module = _backend._load(name)[0]
        if module is not None and hasattr(module, "kl_div"):
            with pytest.raises(ValueError, match="temperature"):
                module.kl_div(s, t, None, tau, 3, False, True, False)
    # the bounds themselves are accepted
    for ok in (1.1e-19, 1.8e19):
        assert torch.isfinite(epic_ext.kl_div(s, t, temperature=ok))


def test_kl_nan_policy(kl_backend):
    dev = kl_backend[1]
    gen = torch.Generator().manual_seed(22)
    s = logits(2 * 3, 16, torch.float32, gen).view(2, 3, 16)
    t = logits(2 * 3, 16, torch.float32, gen).view(2, 3, 16)
    t[1, 2, 5] = float("nan")
    assert epic_ext.kl_div(s.to(dev), t.to(dev)).isnan()  # default: propagate
    with pytest.raises(ValueError, match=r"teacher_logits .*undefined.*row \[1, 2\]"):
        epic_ext.kl_div(s.to(dev), t.to(dev), nan_policy="raise")
    s[0, 1] = float("-inf")
    with pytest.raises(ValueError, match=r"student_logits .*row \[0, 1\]"):
        epic_ext.kl_div(s.to(dev), t.to(dev), reduction="none", nan_policy="raise")
    with pytest.raises(ValueError, match="nan_policy"):
        epic_ext.kl_div(s.to(dev), t.to(dev), nan_policy="ignore")


def test_fused_linear_kl_nan_policy_and_weight_width():
    gen = torch.Generator().manual_seed(23)
    h_s, h_t = torch.randn(2, 5, 8, generator=gen), torch.randn(2, 5, 8, generator=gen)
    W = torch.randn(30, 8, generator=gen)
    with pytest.raises(ValueError, match=r"weight must be \[V, H\] with H = 8"):
        epic_ext.fused_linear_kl(h_s, h_t, torch.randn(30, 7))
    with pytest.raises(ValueError, match="teacher_hidden must match"):
        epic_ext.fused_linear_kl(h_s, h_t[:, :4], W)
    with pytest.raises(ValueError, match="nan_policy"):
        epic_ext.fused_linear_kl(h_s, h_t, W, nan_policy="omit")
    bad = h_s.clone()
    bad[1, 3, 2] = float("nan")
    assert epic_ext.fused_linear_kl(bad, h_t, W).isnan()
    with pytest.raises(ValueError, match=r"student_hidden .*row \[1, 3\]"):
        epic_ext.fused_linear_kl(bad, h_t, W, nan_policy="raise")
    labels = torch.zeros(2, 5, dtype=torch.long)
    labels[1, 3] = -100  # the bad row is not selected: a finite loss, no error
    assert torch.isfinite(epic_ext.fused_linear_kl(bad, h_t, W, labels=labels, nan_policy="raise"))
    W_bad = W.clone()
    W_bad[4, 0] = float("inf")
    with pytest.raises(ValueError, match="weight holds NaN or inf"):
        epic_ext.fused_linear_kl(h_s, h_t, W_bad, nan_policy="raise")


# --------------------------------------------------------------------------- fused_linear_kl bf16

def _linear_kl_reference_grads(h_s, h_t, W, b, mask, tau, reduction, grad_out):
    """fp64 gradients from the logits as the op rounds them (the LM head in the inputs' dtype):
    d loss / d logits by fp64 autograd of the spec, then the chain rule in fp64."""
    V = W.shape[0]
    with torch.no_grad():
        ls = F.linear(h_s, W, b).reshape(-1, V)
        lt = F.linear(h_t, W, b).reshape(-1, V)
    l64 = ls.double().requires_grad_()
    loss = R.kl_div(l64, lt.double(), mask, tau, reduction)
    (loss * grad_out).backward()
    g = l64.grad
    H = h_s.shape[-1]
    return (loss.detach(), (g @ W.double()).reshape(h_s.shape),
            g.t() @ h_s.reshape(-1, H).double(), g.sum(0))


def _gain(got, want):
    """Least-squares factor got ~ gain * want: a systematic scale error shows here even when the
    per-element rounding noise is larger."""
    got, want = got.double().flatten(), want.double().flatten()
    return (got @ want / (want @ want)).item()


@pytest.mark.parametrize("reduction", ["batchmean", "mean"])
def test_fused_linear_kl_bf16_gradients_unbiased(kl_backend, reduction):
    """bf16: 1 / normaliser is applied in fp32, never rounded to bf16, so the gradients carry no
    scale bias (the old code's inv.to(bf16) gave all of them a gain of about 1.002, over any
    per-element rounding noise: the gain is a least-squares fit over every element)."""
    dev = kl_backend[1]
    gen = torch.Generator().manual_seed(24)
    B, L, H, V = 2, 9, 128, 2048
    h_s = torch.randn(B, L, H, generator=gen).bfloat16()
    h_t = torch.randn(B, L, H, generator=gen).bfloat16()
    W = (torch.randn(V, H, generator=gen) * 0.1).bfloat16()
    b = (torch.randn(V, generator=gen) * 0.1).bfloat16()
    labels = torch.full((B, L), 7)
    labels[:, :3] = -100  # 12 selected rows: 1/12 is 0.2% from the nearest bf16 number
    grad_out = 0.75
    hs, w, bb = (x.clone().to(dev).requires_grad_() for x in (h_s, W, b))
    loss = epic_ext.fused_linear_kl(hs, h_t.to(dev), w, bb, labels=labels.to(dev),
                                    reduction=reduction, chunk_size=3)
    loss.backward(torch.tensor(grad_out, device=dev))
    want = _linear_kl_reference_grads(h_s, h_t, W, b, (labels != -100).reshape(-1), 1.0,
                                      reduction, grad_out)
    torch.testing.assert_close(loss.double().cpu(), want[0], rtol=1e-4, atol=0)
    for name, got, ref in (("h", hs.grad, want[1]), ("W", w.grad, want[2]),
                           ("b", bb.grad, want[3])):
        got = got.cpu()
        assert got.dtype == torch.bfloat16
        assert abs(_gain(got, ref) - 1) < 6e-4, f"grad {name}: gain {_gain(got, ref):.6f}"
        err = (got.double() - ref).abs()
        assert (err <= 2.0 ** -7 * ref.abs() + 1e-3 * ref.abs().max()).all(), name


def test_fused_linear_kl_keeps_no_fp32_copy_of_a_chunk(monkeypatch):
    """The bf16 forward + backward makes no fp32 tensor as large as a chunk of logits: GEMMs in
    bf16 with fp32 accumulation (an fp32 output on CUDA; on the CPU, fp32 slices of at most
    _F32_SLICE_ELEMS, 16 MiB by default, lowered here so that a small chunk shows the bound),
    the logits themselves in bf16."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from epic_ext import kl_linear as K
    monkeypatch.setattr(K, "_F32_SLICE_ELEMS", 1 << 20)

    T, H, V, chunk = 512, 32, 16384, 256
    gen = torch.Generator().manual_seed(25)
    h_s = torch.randn(T, H, generator=gen).bfloat16().requires_grad_()
    h_t = torch.randn(T, H, generator=gen).bfloat16()
    W = (torch.randn(V, H, generator=gen) * 0.2).bfloat16().requires_grad_()
    b = (torch.randn(V, generator=gen) * 0.1).bfloat16().requires_grad_()
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(o, torch.Tensor):
                    seen.append((str(func), o.dtype, o.numel()))
            return out

    with Record():
        loss = epic_ext.fused_linear_kl(h_s, h_t, W, b, chunk_size=chunk)
        loss.backward()
    chunk_elems = chunk * V
    assert ("aten.addmm.default", torch.bfloat16, chunk_elems) in seen  # the chunk's logits
    wide = [(f, n) for f, d, n in seen
            if d in (torch.float32, torch.float64) and n >= chunk_elems // 2]
    assert not wide, wide
    assert K._F32_SLICE_ELEMS < chunk_elems // 2
    for p in (h_s, W, b):
        assert p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad.float()).all()


def test_fused_linear_kl_default_chunk_fills_gemm_tiles():
    from epic_ext import kl_linear as K
    assert K._default_chunk(128256, torch.bfloat16) == 256   # 64 MiB of bf16 logits
    assert K._default_chunk(128256, torch.float32) == 128
    assert K._default_chunk(32000, torch.bfloat16) == 1024
    assert K._default_chunk(10 ** 8, torch.float32) == 1


def test_fused_linear_kl_fp32_output_gemm_calls_are_valid(monkeypatch):
    """The CUDA branch (bf16 GEMMs with an fp32 output) checked for arguments on meta tensors,
    which run torch's own shape / dtype rules for mm / addmm with out_dtype: it must not fall
    back (a fallback drops the device from _F32_OUT_GEMM)."""
    from epic_ext import kl_linear as K
    monkeypatch.setattr(K, "_F32_OUT_GEMM", {"meta"})
    meta = dict(device="meta", dtype=torch.bfloat16)
    g, w = torch.empty(256, 1000, **meta), torch.empty(1000, 64, **meta)
    h = torch.empty(256, 64, **meta)
    out = torch.empty(256, 64, **meta)
    acc = torch.zeros(1000, 64, device="meta")
    K._rows_grad_into(out, g, w, torch.ones((), device="meta"))
    K._accumulate_wgrad(acc, g.t(), h)
    assert K._F32_OUT_GEMM == {"meta"} and acc.dtype == torch.float32


def test_fused_linear_kl_scales_16bit_gradients_without_rounding_the_scale(monkeypatch):
    """_scale_ (grad_output applied to the stored bf16 hidden-state gradient): the blockwise fp32
    path used where a 0-d device tensor would be rounded to bf16 (CUDA) gives the exactly
    rounded product, as the CPU's scalar path does, over several row blocks."""
    from epic_ext import kl_linear as K
    gen = torch.Generator().manual_seed(26)
    x = torch.randn(300, 70, generator=gen).bfloat16()
    scale = torch.tensor(0.7123456)
    exact = (x.double() * 0.7123456).bfloat16()
    assert torch.equal(K._scale_(x.clone(), scale), exact)  # the CPU path
    monkeypatch.setattr(K, "_EXACT_SCALAR_MUL", set())
    monkeypatch.setattr(K, "_F32_SLICE_ELEMS", 1000)  # several row blocks
    assert torch.equal(K._scale_(x.clone(), scale), exact)
    assert not torch.equal(x * scale.bfloat16(), exact)  # what rounding the scale would give
