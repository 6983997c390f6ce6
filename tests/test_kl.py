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
