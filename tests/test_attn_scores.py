"""epic_ext.attn_scores on every backend against the reference (epic_ext/reference.py).

The output is fp32 whatever the input dtype, and every backend reads the same rounded q and k as
the reference (which upcasts them), so the table below is the same for all dtypes: what is left
is fp32 summation order in the dot products and sums, and the last ulps of exp.
"""
import pytest
import torch

import epic_ext
from epic_ext import _backend
from epic_ext import reference as R
from conftest import is_interpreted, kernels_resolved

# The Triton interpreter's numpy ops warn on log(0) / inf - inf in lanes that a select drops.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

# (dtype) -> (atol, rtol) of the [B, key_len] fp32 output against the reference in fp32. Measured
# worst cases on the CPU kernel: 1.2e-7 absolute, 2.8e-6 relative.
ATTN_TOL = {torch.float32: (1e-6, 2e-5), torch.float16: (1e-6, 2e-5),
            torch.bfloat16: (1e-6, 2e-5)}
DTYPES = list(ATTN_TOL)
# (B, H, Hkv, Q, L, d): every L in {1, 7, 131, 613}, d in {8, 40, 64, 128}, Q in {1, 3} and
# H / Hkv in {(1, 1), (4, 4), (8, 2), (6, 1)}, mixed to keep the run short.
SHAPES = [(2, 1, 1, 1, 1, 8), (3, 4, 4, 3, 7, 40), (2, 8, 2, 1, 131, 64), (2, 6, 1, 3, 131, 128),
          (1, 4, 4, 1, 613, 8), (2, 8, 2, 3, 613, 40), (1, 1, 1, 1, 613, 128), (2, 6, 1, 1, 7, 64)]
INTERPRETED_SHAPES = {s for s in SHAPES if s[4] <= 131} | {(1, 1, 1, 1, 613, 128)}


@pytest.fixture
def attn_backend(backend):
    name, device = backend
    module = _backend._load(name)[0]
    if name != "reference" and not hasattr(module, "attn_scores"):
        pytest.skip(f"{name} has no attn_scores kernel")
    return name, device


def make_qk(B, H, Hkv, Q, L, d, dtype, seed, spread=2.0):
    """Random (never zero) q, k rounded to dtype; `spread` sharpens the softmax."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, Q, d, generator=g) * spread).to(dtype)
    k = (torch.randn(B, Hkv, L, d, generator=g) * spread).to(dtype)
    return q, k


def assert_attn_close(got, want, dtype=torch.float32, msg=""):
    atol, rtol = ATTN_TOL[dtype]
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.cpu(), want, atol=atol, rtol=rtol, equal_nan=True,
                               msg=msg or None)


def exact_lse(q, k, causal=True, kv_start=None, q_pos=None, scale=None):
    """The row log-sum-exp the reference computes (what flash attention would return)."""
    B, H, Q, d = q.shape
    L = k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    s = q.float() @ k.float().repeat_interleave(H // k.shape[1], 1).transpose(-1, -2) * scale
    vis = R.attn_visible(B, Q, L, kv_start, q_pos, causal).unsqueeze(1)
    return torch.logsumexp(torch.where(vis, s, float("-inf")), -1)


def skip_slow(backend, shape):
    if is_interpreted(*backend) and shape not in INTERPRETED_SHAPES:
        pytest.skip("Triton interpreter: small shapes only")


# ---------------------------------------------------------------------------------------------
# Against the reference
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(attn_backend, shape, dtype, poison):
    """Per-sample key_start / kv_start tensors (causal, mean), int starts (non-causal, sum), and
    q_pos with the exact lse given: the one-pass result equals the two-pass one."""
    skip_slow(attn_backend, shape)
    dev = attn_backend[1]
    B, H, Hkv, Q, L, d = shape
    q, k = make_qk(*shape, dtype, seed=L * 1000 + d * 10 + Q)
    g = torch.Generator().manual_seed(L + d)
    key_len = max(1, L // 2)
    ks = torch.randint(0, L - key_len + 1, (B,), generator=g)
    kv = torch.randint(0, max(1, L // 3), (B,), generator=g)
    qd, kd = q.to(dev), k.to(dev)

    got = epic_ext.attn_scores(qd, kd, ks.to(dev), key_len, kv_start=kv.to(dev))
    assert_attn_close(got, R.attn_scores(q, k, ks, key_len, kv_start=kv), dtype, "causal mean")

    got = epic_ext.attn_scores(qd, kd, L - key_len, key_len, causal=False, reduce="sum",
                               kv_start=min(2, L - 1))
    want = R.attn_scores(q, k, L - key_len, key_len, causal=False, reduce="sum",
                         kv_start=min(2, L - 1))
    assert_attn_close(got, want, dtype, "non-causal sum")

    q_pos = torch.randint(0, L, (B, Q), generator=g)
    lse = exact_lse(q, k, kv_start=kv, q_pos=q_pos)
    two_pass = epic_ext.attn_scores(qd, kd, ks.to(dev), key_len, kv_start=kv.to(dev),
                                    q_pos=q_pos.to(dev))
    one_pass = epic_ext.attn_scores(qd, kd, ks.to(dev), key_len, kv_start=kv.to(dev),
                                    q_pos=q_pos.to(dev), lse=lse.to(dev))
    want = R.attn_scores(q, k, ks, key_len, kv_start=kv, q_pos=q_pos)
    assert_attn_close(two_pass, want, dtype, "q_pos, two-pass")
    assert_attn_close(one_pass, want, dtype, "q_pos, lse given")
    assert_attn_close(one_pass, two_pass.cpu(), dtype, "one pass vs two")


@pytest.mark.parametrize("shape,dtype", [((1, 2, 1, 3, 4500, 256), torch.float32),
                                         ((4, 8, 4, 1, 1100, 256), torch.bfloat16)], ids=str)
def test_large_k_parallel_paths(attn_backend, shape, dtype, poison):
    """Several MiB of K with two threads: the C++ kernel splits one unit's keys into chunks and
    merges their (max, sum) (first shape), or hands out many units dynamically (second). Two
    calls agree bit for bit."""
    if is_interpreted(*attn_backend):
        pytest.skip("Triton interpreter: small shapes only")
    dev = attn_backend[1]
    B, H, Hkv, Q, L, d = shape
    q, k = make_qk(*shape, dtype, seed=L, spread=1.5)
    ks = torch.arange(B) * 7 + 3
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = epic_ext.attn_scores(q.to(dev), k.to(dev), ks.to(dev), L - 100)
        again = epic_ext.attn_scores(q.to(dev), k.to(dev), ks.to(dev), L - 100)
        lse = exact_lse(q, k)
        one = epic_ext.attn_scores(q.to(dev), k.to(dev), ks.to(dev), L - 100, lse=lse.to(dev))
    finally:
        torch.set_num_threads(threads)
    want = R.attn_scores(q, k, ks, L - 100)
    assert torch.equal(got, again)  # deterministic: fixed summation orders, no float atomics
    assert_attn_close(got, want, dtype)
    assert_attn_close(one, want, dtype)


def test_causal_span_past_q_pos_is_zero(attn_backend, poison):
    """Keys after a row's position get exactly 0; a row without visible keys contributes 0 (the
    mean still divides by H * Q)."""
    dev = attn_backend[1]
    q, k = make_qk(2, 4, 2, 2, 50, 16, torch.float32, seed=1)
    q_pos = torch.tensor([[30, 33], [40, 4]])  # sample 1, row 1: before kv_start, sees nothing
    kv = torch.tensor([0, 10])
    got = epic_ext.attn_scores(q.to(dev), k.to(dev), 20, 30, q_pos=q_pos.to(dev),
                               kv_start=kv.to(dev)).cpu()
    assert_attn_close(got, R.attn_scores(q, k, 20, 30, q_pos=q_pos, kv_start=kv))
    assert (got[0, 34 - 20:] == 0).all() and (got[0, :34 - 20] > 0).all()
    assert (got[1, 41 - 20:] == 0).all() and (got[1, :41 - 20] > 0).all()
    alone = epic_ext.attn_scores(q[1:, :, :1].to(dev), k[1:].to(dev), 20, 30,
                                 q_pos=q_pos[1:, :1].to(dev), kv_start=kv[1:].to(dev)).cpu()
    torch.testing.assert_close(got[1], alone[0] / 2, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_rows_sum_to_one_over_the_whole_visible_row(attn_backend, causal, poison):
    dev = attn_backend[1]
    B, H, Hkv, Q, L, d = 3, 8, 2, 3, 131, 40
    q, k = make_qk(B, H, Hkv, Q, L, d, torch.bfloat16, seed=2)
    kv = torch.tensor([0, 17, 60])
    mean = epic_ext.attn_scores(q.to(dev), k.to(dev), 0, L, kv_start=kv.to(dev),
                                causal=causal).cpu()
    total = epic_ext.attn_scores(q.to(dev), k.to(dev), 0, L, kv_start=kv.to(dev), causal=causal,
                                 reduce="sum").cpu()
    torch.testing.assert_close(mean.sum(1).double(), torch.ones(B, dtype=torch.float64),
                               atol=2e-6, rtol=0)
    torch.testing.assert_close(total.sum(1).double(), torch.full((B,), H * Q * 1.0,
                                                                 dtype=torch.float64),
                               atol=2e-4, rtol=0)
    torch.testing.assert_close(total, mean * (H * Q), atol=1e-6, rtol=1e-5)
    for b in range(B):
        assert (mean[b, :kv[b]] == 0).all()  # left padding is never attended


def test_strided_views(attn_backend, poison):
    """k as the transpose of [B, L, Hkv, d], as a slice of a longer KV cache, and with a strided
    last dimension (copied); q as a transposed view."""
    dev = attn_backend[1]
    B, H, Hkv, Q, L, d = 2, 8, 2, 3, 131, 40
    q, k = make_qk(B, H, Hkv, Q, L, d, torch.float16, seed=3)
    ks = torch.tensor([5, 70])
    want = R.attn_scores(q, k, ks, 60)
    ksd = ks.to(dev)
    views = {
        "transposed": k.transpose(1, 2).contiguous().transpose(1, 2),
        "cache slice": torch.cat([k, torch.randn(B, Hkv, 40, d).half()], 2)[:, :, :L],
        "strided last dim": torch.stack([k, k + 1], -1)[..., 0],
    }
    for name, kv in views.items():
        assert not kv.is_contiguous()
        got = epic_ext.attn_scores(q.to(dev), kv.to(dev), ksd, 60)
        assert_attn_close(got, want, torch.float16, name)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert_attn_close(epic_ext.attn_scores(qt.to(dev), k.to(dev), ksd, 60), want, torch.float16)


def test_scale_and_gqa_head_mapping(attn_backend):
    """Head h reads kv head h // (H // Hkv): equal to MHA with k repeated; explicit scale."""
    dev = attn_backend[1]
    q, k = make_qk(2, 6, 2, 1, 40, 8, torch.float32, seed=4)
    got = epic_ext.attn_scores(q.to(dev), k.to(dev), 3, 30, scale=0.7)
    rep = epic_ext.attn_scores(q.to(dev), k.repeat_interleave(3, 1).to(dev), 3, 30, scale=0.7)
    assert_attn_close(got, rep.cpu())
    assert_attn_close(got, R.attn_scores(q, k, 3, 30, scale=0.7))


def test_unchecked_indices_are_memory_safe(attn_backend):
    """check=False: out-of-range span entries are NaN, the rest as the reference; garbage
    kv_start / q_pos only change what is visible."""
    dev = attn_backend[1]
    B, H, Hkv, Q, L, d = 4, 2, 1, 2, 40, 8
    q, k = make_qk(B, H, Hkv, Q, L, d, torch.float32, seed=5)
    ks = torch.tensor([-3, 35, -1000000, 1000000])
    kv = torch.tensor([-7, 5, 10 ** 9, 0])
    q_pos = torch.tensor([[39, 10 ** 12], [-5, 20], [3, 30], [-(10 ** 12), 39]])
    got = epic_ext.attn_scores(q.to(dev), k.to(dev), ks.to(dev), 10, kv_start=kv.to(dev),
                               q_pos=q_pos.to(dev), check=False).cpu()
    want = R.attn_scores(q, k, ks, 10, kv_start=kv, q_pos=q_pos)
    assert_attn_close(got, want)
    assert got[0, :3].isnan().all() and not got[0, 3:].isnan().any()
    assert got[1, 5:].isnan().all() and not got[1, :5].isnan().any()
    assert got[2:].isnan().all()
    if attn_backend[0] != "reference":  # extremes (the reference's int64 index would wrap)
        big = torch.tensor([2 ** 63 - 1, -2 ** 63, 0, 30])
        out = epic_ext.attn_scores(q.to(dev), k.to(dev), big.to(dev), 10, kv_start=big.to(dev),
                                   q_pos=big.view(B, 1).expand(B, Q).contiguous().to(dev),
                                   check=False).cpu()
        assert out[:2].isnan().all() and not out[2:].isnan().any()


@pytest.mark.parametrize("name,value", [
    ("key_start", torch.tensor([0, 35])), ("key_start", torch.tensor([-1, 0])),
    ("kv_start", torch.tensor([0, 41])), ("kv_start", torch.tensor([-2, 0])),
    ("q_pos", torch.tensor([[0], [40]])), ("q_pos", torch.tensor([[-1], [3]]))])
def test_checked_indices_raise(attn_backend, name, value):
    dev = attn_backend[1]
    q, k = make_qk(2, 2, 2, 1, 40, 8, torch.float32, seed=6)
    kwargs = {"key_start": torch.tensor([0, 1], device=dev), name: value.to(dev)}
    ks = kwargs.pop("key_start")
    with pytest.raises(ValueError, match=name):
        epic_ext.attn_scores(q.to(dev), k.to(dev), ks, 10, **kwargs)


def test_not_differentiable_inputs_are_treated_as_detached(attn_backend):
    dev = attn_backend[1]
    q, k = make_qk(2, 4, 2, 1, 30, 16, torch.float32, seed=7)
    qg, kg = q.to(dev).requires_grad_(), k.to(dev).requires_grad_()
    lse = exact_lse(q, k).to(dev).requires_grad_()
    out = epic_ext.attn_scores(qg, kg, 2, 20)
    assert not out.requires_grad and out.grad_fn is None
    assert torch.equal(out, epic_ext.attn_scores(q.to(dev), k.to(dev), 2, 20))
    assert not epic_ext.attn_scores(qg, kg, 2, 20, lse=lse).requires_grad
    with torch.no_grad():
        assert torch.equal(out, epic_ext.attn_scores(qg, kg, 2, 20))


def test_empty_batch(attn_backend):
    dev = attn_backend[1]
    q, k = make_qk(0, 2, 1, 1, 9, 8, torch.float32, seed=8)
    out = epic_ext.attn_scores(q.to(dev), k.to(dev), torch.zeros(0, dtype=torch.long, device=dev),
                               4)
    assert out.shape == (0, 4) and out.dtype == torch.float32


def test_backend_argument_forces_the_reference():
    q, k = make_qk(2, 4, 4, 1, 20, 8, torch.float32, seed=9)
    with kernels_resolved() as calls:
        a = epic_ext.attn_scores(q, k, 1, 10, backend="reference")
        b = epic_ext.attn_scores(q, k, 1, 10)
    assert calls == [("attn_scores", "reference"), ("attn_scores", _backend.resolve(q.device))]
    assert_attn_close(b, a)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

def _qk():
    return make_qk(2, 4, 2, 3, 10, 8, torch.float32, seed=10)


@pytest.mark.parametrize("call,exc,words", [
    (lambda q, k: epic_ext.attn_scores(q[0], k, 0, 4), ValueError, "q must be 4-D"),
    (lambda q, k: epic_ext.attn_scores(q, k[0], 0, 4), ValueError, "k must be 4-D"),
    (lambda q, k: epic_ext.attn_scores(q.long(), k, 0, 4), TypeError, "q must be float32"),
    (lambda q, k: epic_ext.attn_scores(q.double(), k.double(), 0, 4), TypeError, "q must be"),
    (lambda q, k: epic_ext.attn_scores(q, k.half(), 0, 4), TypeError, "k must have q's dtype"),
    (lambda q, k: epic_ext.attn_scores(q, k.to("meta"), 0, 4), ValueError, "k must be on"),
    (lambda q, k: epic_ext.attn_scores(q, k[:1], 0, 4), ValueError, "k must be"),
    (lambda q, k: epic_ext.attn_scores(q, k[..., :4], 0, 4), ValueError, "k must be"),
    (lambda q, k: epic_ext.attn_scores(q[:, :3], k, 0, 4), ValueError, "must divide q's H"),
    (lambda q, k: epic_ext.attn_scores(q, k, 0, 0), ValueError, "key_len must be in"),
    (lambda q, k: epic_ext.attn_scores(q, k, 0, 11), ValueError, "key_len must be in"),
    (lambda q, k: epic_ext.attn_scores(q, k, 0, 4.0), TypeError, "key_len must be an int"),
    (lambda q, k: epic_ext.attn_scores(q, k, 7, 4), ValueError, "key_start must be in"),
    (lambda q, k: epic_ext.attn_scores(q, k, -1, 4), ValueError, "key_start must be in"),
    (lambda q, k: epic_ext.attn_scores(q, k, 1.5, 4), TypeError, "key_start must be"),
    (lambda q, k: epic_ext.attn_scores(q, k, True, 4), TypeError, "key_start must be"),
    (lambda q, k: epic_ext.attn_scores(q, k, torch.zeros(2), 4), TypeError, "key_start must be int64"),
    (lambda q, k: epic_ext.attn_scores(q, k, torch.zeros(3, dtype=torch.long), 4), ValueError,
     r"key_start must be \[B\]"),
    (lambda q, k: epic_ext.attn_scores(q, k, 0, 4, kv_start=11), ValueError, "kv_start must be in"),
    (lambda q, k: epic_ext.attn_scores(q, k, 0, 4, kv_start=torch.zeros(2, dtype=torch.int32)),
     TypeError, "kv_start must be int64"),
    (lambda q, k: epic_ext.attn_scores(q, k, 0, 4, q_pos=torch.zeros(2, 2, dtype=torch.long)),
     ValueError, r"q_pos must be \[B, Q\]"),
    (lambda q, k: epic_ext.attn_scores(q, k, 0, 4, q_pos=torch.zeros(2, 3)), TypeError,
     "q_pos must be int64"),
    (lambda q, k: epic_ext.attn_scores(q, k, 0, 4, q_pos=[[1, 2, 3]] * 2), TypeError, "q_pos must be"),
    (lambda q, k: epic_ext.attn_scores(q, k[:, :, :2], 0, 1), ValueError, "Q = 3 query rows"),
    (lambda q, k: epic_ext.attn_scores(q, k, 0, 4, reduce="max"), ValueError, "reduce must be"),
    (lambda q, k: epic_ext.attn_scores(q, k, 0, 4, scale=float("nan")), ValueError, "scale must be finite"),
    (lambda q, k: epic_ext.attn_scores(q, k, 0, 4, scale="1"), TypeError, "scale must be a real"),
    (lambda q, k: epic_ext.attn_scores(q, k, 0, 4, causal=1), TypeError, "causal must be a bool"),
    (lambda q, k: epic_ext.attn_scores(q, k, 0, 4, check="yes"), TypeError, "check must be a bool"),
    (lambda q, k: epic_ext.attn_scores(q, k, 0, 4, lse=torch.zeros(2, 4, 3).half()), TypeError,
     "lse must be float32"),
    (lambda q, k: epic_ext.attn_scores(q, k, 0, 4, lse=torch.zeros(2, 4)), ValueError,
     r"lse must be \[B, H, Q\]"),
    (lambda q, k: epic_ext.attn_scores(q, k, 0, 4, lse=torch.zeros(2, 4, 3, device="meta")),
     ValueError, "lse must be on"),
    (lambda q, k: epic_ext.attn_scores(q, k, 0, 4, backend="numpy"), ValueError, "backend must be"),
])
def test_bad_input_raises_naming_the_argument(call, exc, words):
    q, k = _qk()
    with pytest.raises(exc, match=words):
        call(q, k)


@pytest.mark.parametrize("call,exc,words", [
    (lambda f, q, k: f(q, k.half(), None, None, 0, 4, None, 0, None, 0.5, True, 2), TypeError,
     "k must have q's dtype"),
    (lambda f, q, k: f(q[:, :3], k, None, None, 0, 4, None, 0, None, 0.5, True, 2), ValueError,
     "must divide q's H"),
    (lambda f, q, k: f(q, k, None, None, 0, 11, None, 0, None, 0.5, True, 2), ValueError,
     "key_len must be in"),
    (lambda f, q, k: f(q, k, None, None, 8, 4, None, 0, None, 0.5, True, 2), ValueError,
     "key_start must be in"),
    (lambda f, q, k: f(q, k, None, None, 0, 4, None, 0, None, 0.5, True, 0), ValueError,
     "reduction code"),
    (lambda f, q, k: f(q, k, torch.zeros(2, 4, 2), None, 0, 4, None, 0, None, 0.5, True, 2),
     ValueError, "lse must be"),
    (lambda f, q, k: f(q, k, None, torch.zeros(2, dtype=torch.int32), 0, 4, None, 0, None, 0.5,
                       True, 2), TypeError, "key_start must be int64"),
    (lambda f, q, k: f(q, k, None, None, 0, 4, None, 0, torch.zeros(2, 1, dtype=torch.long), 0.5,
                       True, 2), ValueError, r"q_pos must be \[B, Q\]"),
])
def test_kernel_entries_check_their_arguments(attn_backend, call, exc, words):
    """A direct call of a compiled or Triton kernel entry raises the same errors (cannot crash)."""
    name, dev = attn_backend
    if name == "reference":
        pytest.skip("the reference entry does not validate (the public API does)")
    fn = getattr(_backend._load(name)[0], "attn_scores")
    q, k = _qk()
    with pytest.raises(exc, match=words):
        call(fn, q.to(dev), k.to(dev))


# ---------------------------------------------------------------------------------------------
# torch.library registration and torch.compile
# ---------------------------------------------------------------------------------------------

def test_opcheck(attn_backend):
    dev = attn_backend[1]
    q, k = make_qk(2, 4, 2, 3, 23, 8, torch.float32, seed=11)
    q, k = q.to(dev), k.to(dev)
    lse = exact_lse(q.cpu(), k.cpu()).to(dev)
    ks = torch.tensor([1, 9], device=dev)
    q_pos = torch.tensor([[5, 9, 22], [20, 21, 22]], device=dev)
    op = torch.ops.epic_ext.attn_scores.default
    for args in [(q, k, None, None, 3, 10, None, 0, None, 0.35, True, 2, True),
                 (q, k, lse, ks, 0, 12, torch.tensor([0, 4], device=dev), 0, None, 0.35, True, 1,
                  True),
                 (q, k.transpose(2, 3).contiguous().transpose(2, 3), None, ks, 0, 12, None, 2,
                  q_pos, 0.5, False, 2, False)]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration",
                                                    "test_faketensor"))


def test_torch_compile_fullgraph(attn_backend):
    if is_interpreted(*attn_backend):
        pytest.skip("compile + interpreter is slow; eager covers the kernel")
    dev = attn_backend[1]
    q, k = make_qk(2, 4, 2, 1, 40, 16, torch.bfloat16, seed=12)
    qg, kg = q.to(dev).requires_grad_(), k.to(dev)
    ks = torch.tensor([3, 8], device=dev)

    def rank(q, k, ks):  # FastV-style: top tokens of the span by head-averaged attention
        scores = epic_ext.attn_scores(q, k, ks, 30, kv_start=ks - 3)
        return scores.topk(5, dim=1).indices, scores

    torch._dynamo.reset()
    compiled = torch.compile(rank, fullgraph=True, backend="aot_eager")
    idx_c, got = compiled(qg, kg, ks)
    idx_e, want = rank(qg, kg, ks)
    assert torch.equal(idx_c, idx_e)
    torch.testing.assert_close(got, want)
    assert not got.requires_grad
