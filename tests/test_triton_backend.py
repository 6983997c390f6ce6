"""The Triton backend (epic_ext.triton) against the pure-PyTorch reference, under Triton's CPU
interpreter: selection bit-identical, float outputs within one rounding of the dtype.

Shapes are small so that the interpreted kernels run in about a minute on two cores.
"""
import importlib
import os

os.environ["TRITON_INTERPRET"] = "1"  # before any triton-jitted code is imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from epic_ext import reference as ref  # noqa: E402
import epic_ext.triton as tb  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3),
       torch.float64: (1e-12, 1e-12)}
NS = [1, 7, 64, 577]
KINDS = ["random", "ties", "special"]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Fresh tensors start as NaN / INT_MIN, so an element a kernel leaves unwritten fails."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        if t.numel():
            t.fill_(float("nan") if t.is_floating_point() else torch.iinfo(t.dtype).min)
        return t

    monkeypatch.setattr(torch, "empty", empty)


def make_scores(B, N, kind, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        s = torch.randn(B, N, generator=g)
    elif kind == "ties":  # few distinct values: long runs of equal keys
        s = torch.randint(-2, 3, (B, N), generator=g).float() * 0.5
    else:  # NaN, +-inf, -0.0 / +0.0 mixed into random values, one all-NaN row
        s = torch.randn(B, N, generator=g)
        r = torch.rand(B, N, generator=g)
        s[r < 0.15] = float("nan")
        s[(r >= 0.15) & (r < 0.22)] = float("inf")
        s[(r >= 0.22) & (r < 0.29)] = -float("inf")
        s[(r >= 0.29) & (r < 0.36)] = -0.0
        s[(r >= 0.36) & (r < 0.43)] = 0.0
        if B > 1:
            s[1] = float("nan")
    return s.to(dtype)


def strided(t, how):
    """The same values as t [B, N, ...] in a non-contiguous layout."""
    if how == "contiguous":
        return t
    if how == "transposed":  # batch stride < row stride, padded rows
        base = torch.full((t.shape[1], t.shape[0]) + (t.shape[2] + 5,), float("nan"),
                          dtype=t.dtype)
        base[..., 2:2 + t.shape[2]] = t.transpose(0, 1)
        out = base.transpose(0, 1)[..., 2:2 + t.shape[2]]
    else:  # "columns": non-unit last stride
        out = t.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(out, t) or t.isnan().any()
    return out


def assert_close(actual, expected):
    atol, rtol = TOL[expected.dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, equal_nan=True)


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("N", NS)
def test_select_topk(N, kind):
    s = make_scores(3, N, kind, seed=N)
    for k in sorted({0, 1, N // 3, N}):
        got = tb.select_topk(s, k)
        assert got.dtype == torch.int64
        assert torch.equal(got, ref.select_topk(s, k)), k
    assert tb.select_topk(s[:0], 1 if N else 0).shape == (0, 1 if N else 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_select_topk_score_dtypes(kind, dtype):
    """16-bit scores (rounding creates extra ties) and fp64 scores (ranked as fp32); B = 1."""
    s = make_scores(1, 577, kind, dtype, seed=2)
    for k in (1, 200):
        assert torch.equal(tb.select_topk(s, k), ref.select_topk(s, k))


def test_select_topk_strided_scores():
    s = make_scores(3, 577, "ties", seed=1)
    view = s.t().contiguous().t()
    assert torch.equal(tb.select_topk(view, 100), ref.select_topk(s, 100))


@pytest.mark.parametrize("pooled", [False, True])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("N", NS)
def test_iqr_select(N, kind, pooled):
    cases = [(3, torch.float32, -1), (1, torch.float16, 2), (0, torch.float32, -1)]
    if N == 64:
        cases.append((3, torch.bfloat16, 0))
    for B, dtype, max_k in cases:
        s = make_scores(B, N, kind, dtype, seed=N + 7)
        if kind == "random" and N > 1:  # make sure there are outliers
            s[:, ::5] = s[:, ::5] * 8
        counts, idx = tb.iqr_select(s, 1.5, pooled, max_k)
        rc, ri = ref.iqr_select(s, 1.5, pooled, max_k)
        assert torch.equal(counts, rc), (B, dtype, max_k, counts, rc)
        assert torch.equal(idx, ri), (B, dtype, max_k)


@pytest.mark.parametrize("pooled", [False, True])
def test_iqr_select_whisker_and_strides(pooled):
    s = make_scores(4, 577, "random", seed=3) ** 3
    view = s.t().contiguous().t()
    for whisker in (0.0, 0.37, 3.0):
        got = tb.iqr_select(view, whisker, pooled, -1)
        want = ref.iqr_select(s, whisker, pooled, -1)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("kind", KINDS + ["all_nan"])
def test_iqr_pooled_many_programs(monkeypatch, kind):
    """The pooled fence with many programs per pass, each over several chunks and the last one
    partial (tiny chunks: M = 185 scores over 4 programs of 3 chunks of 16); strided scores."""
    sel = importlib.import_module("epic_ext.triton.select")
    monkeypatch.setattr(sel, "_POOL_CHUNK", 16)
    monkeypatch.setattr(sel, "_POOL_PROGRAMS", 5)
    s = make_scores(5, 37, "special" if kind == "all_nan" else kind, seed=11)
    if kind == "all_nan":
        s[:] = float("nan")
    elif kind == "random":
        s[:, ::4] *= 6
    view = s.t().contiguous().t()
    for whisker, max_k in ((1.5, -1), (0.0, 3)):
        got = tb.iqr_select(view, whisker, True, max_k)
        want = ref.iqr_select(s, whisker, True, max_k)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (whisker, got[0])
    if kind == "random":
        assert want[0].sum() > 0  # the fence has outliers to find


# --------------------------------------------------------------------------------------------
# gather + merge, forward and backward
# --------------------------------------------------------------------------------------------

def ref_backward(grad_out, tokens, idx, counts, merge, weights):
    """Oracle: autograd through the reference forward."""
    x = tokens.detach().clone().requires_grad_(True)
    ref.gather_merge(x, idx, counts, merge, weights).backward(grad_out)
    return x.grad


SHAPES = [(1, 1), (7, 3), (64, 130), (577, 33)]  # (N, D); D = 130 spans two D-blocks


LAYOUTS = [(torch.float32, "contiguous"), (torch.float16, "transposed"),
           (torch.bfloat16, "columns"), (torch.float32, "columns")]


@pytest.mark.parametrize("dtype,layout", LAYOUTS, ids=lambda p: str(p).replace("torch.", ""))
@pytest.mark.parametrize("merge", [0, 1, 2])
@pytest.mark.parametrize("N,D", SHAPES)
def test_gather_merge(N, D, merge, dtype, layout):
    B = 3
    g = torch.Generator().manual_seed(N * 31 + D)
    tokens = strided(torch.randn(B, N, D, generator=g).to(dtype), layout)
    weights = torch.rand(B, N, generator=g) if merge == 2 else None
    K = max(1, N // 4)
    idx = ref.select_topk(make_scores(B, N, "ties", seed=N), K)
    for counts in (None, torch.tensor([K, 0, K // 2])):
        out = tb.gather_merge(tokens, idx, counts, merge, weights)
        assert_close(out, ref.gather_merge(tokens, idx, counts, merge, weights))
        grad = torch.randn(out.shape, generator=g).to(dtype)
        gx = tb.gather_merge_backward(strided(grad, layout), idx, counts, merge, weights, N)
        assert_close(gx, ref_backward(grad, tokens, idx, counts, merge, weights))


@pytest.mark.parametrize("merge", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gather_merge_repeated_idx(merge, dtype):
    """Repeated and unsorted indices: forward copies each occurrence, backward sums them."""
    B, N, D = 3, 40, 17
    g = torch.Generator().manual_seed(5)
    tokens = torch.randn(B, N, D, generator=g).to(dtype)
    weights = torch.rand(B, N, generator=g).to(torch.float16) if merge == 2 else None
    idx = torch.randint(0, 12, (B, 30), generator=g)  # K = 30 > distinct rows: many repeats
    idx[2] = 3  # one row repeated K times
    for counts in (None, torch.tensor([30, 5, 0])):
        out = tb.gather_merge(tokens, idx, counts, merge, weights)
        assert_close(out, ref.gather_merge(tokens, idx, counts, merge, weights))
        grad = torch.randn(out.shape, generator=g).to(dtype)
        gx = tb.gather_merge_backward(grad, idx, counts, merge, weights, N)
        assert_close(gx, ref_backward(grad, tokens, idx, counts, merge, weights))


def test_gather_merge_fp64_and_empty():
    g = torch.Generator().manual_seed(9)
    tokens = torch.randn(2, 9, 5, generator=g, dtype=torch.float64)
    w = torch.rand(2, 9, generator=g, dtype=torch.float64)
    idx = torch.tensor([[1, 4], [8, 0]])
    for merge in (0, 1, 2):
        assert_close(tb.gather_merge(tokens, idx, None, merge, w),
                     ref.gather_merge(tokens, idx, None, merge, w))
    # K = 0: the merged row is the merge of every row.
    empty_idx = torch.zeros(2, 0, dtype=torch.int64)
    assert_close(tb.gather_merge(tokens, empty_idx, None, 1, None),
                 ref.gather_merge(tokens, empty_idx, None, 1, None))
    # B = 0 / D = 0 launch nothing and return the right shapes.
    assert tb.gather_merge(tokens[:0], idx[:0], None, 1, None).shape == (0, 3, 5)
    assert tb.gather_merge(tokens[..., :0], idx, None, 1, None).shape == (2, 3, 0)
    assert tb.gather_merge_backward(torch.zeros(0, 3, 5), idx[:0], None, 1, None, 9).shape == \
        (0, 9, 5)


# --------------------------------------------------------------------------------------------
# Fused compress
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("merge", [0, 1, 2])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("N,D", SHAPES)
def test_compress_topk(N, D, kind, merge):
    # (dtype, layout) in a Latin square over (kind, merge): each meets every kind and merge.
    dtype, layout = LAYOUTS[(KINDS.index(kind) + merge) % 3]
    B = 3
    g = torch.Generator().manual_seed(N + D)
    tokens = strided(torch.randn(B, N, D, generator=g).to(dtype), layout)
    scores = make_scores(B, N, kind, dtype, seed=D)
    weights = torch.rand(B, N, generator=g) if merge == 2 else None
    for k in sorted({0, 1, N // 3, N}):
        out, idx = tb.compress_topk(tokens, scores, k, merge, weights)
        want_out, want_idx = ref.compress_topk(tokens, scores, k, merge, weights)
        assert torch.equal(idx, want_idx), k
        assert_close(out, want_out)


@pytest.mark.parametrize("merge", [0, 1, 2])
def test_compress_topk_beyond_register_rows(monkeypatch, merge):
    """N > MAX_N (here lowered to 16): the reference selects, the slot map is scattered on the
    device, the same streaming kernel gathers and merges."""
    gm = importlib.import_module("epic_ext.triton.gather_merge")
    monkeypatch.setattr(gm, "MAX_N", 16)
    g = torch.Generator().manual_seed(merge)
    tokens = torch.randn(3, 37, 9, generator=g)
    scores = make_scores(3, 37, "special", seed=merge)
    weights = torch.rand(3, 37, generator=g) if merge == 2 else None
    for k in (0, 5, 37):
        out, idx = tb.compress_topk(tokens, scores, k, merge, weights)
        want_out, want_idx = ref.compress_topk(tokens, scores, k, merge, weights)
        assert torch.equal(idx, want_idx), k
        assert_close(out, want_out)


def test_compress_topk_empty():
    tokens = torch.randn(0, 5, 4)
    out, idx = tb.compress_topk(tokens, torch.randn(0, 5), 2, 1, None)
    assert out.shape == (0, 3, 4) and idx.shape == (0, 2)
    out, idx = tb.compress_topk(torch.randn(2, 5, 4), torch.randn(2, 5), 0, 0, None)
    assert out.shape == (2, 0, 4) and idx.shape == (2, 0)
    # N = 0: the merged row of nothing is zeros; IQR keeps nothing (D2: every backend agrees).
    for merge, w in ((1, None), (2, torch.rand(2, 0))):
        out, idx = tb.compress_topk(torch.randn(2, 0, 4), torch.randn(2, 0), 0, merge, w)
        assert torch.equal(out, torch.zeros(2, 1, 4)) and idx.shape == (2, 0)
    for pooled in (False, True):
        counts, idx = tb.iqr_select(torch.randn(3, 0), 1.5, pooled, -1)
        assert torch.equal(counts, torch.zeros(3, dtype=torch.int64)) and idx.shape == (3, 0)


def test_argument_errors():
    s = torch.randn(2, 5)
    with pytest.raises(ValueError):
        tb.select_topk(s, 6)
    with pytest.raises(ValueError):
        tb.select_topk(s[0], 1)
    with pytest.raises(TypeError):
        tb.select_topk(s.long(), 1)
    tokens = torch.randn(2, 5, 3)
    with pytest.raises(ValueError):
        tb.gather_merge(tokens, torch.zeros(2, 2, dtype=torch.int64), None, 2, None)
    with pytest.raises(TypeError):
        tb.gather_merge(tokens, torch.zeros(2, 2, dtype=torch.int32), None, 1, None)
    with pytest.raises(ValueError):
        tb.gather_merge(tokens, torch.zeros(2, 2, dtype=torch.int64), None, 3, None)
    with pytest.raises(ValueError):
        tb.compress_topk(tokens, torch.randn(2, 4), 1, 1, None)


# --------------------------------------------------------------------------------------------
# Launch plumbing: autotuning keys, device guard
# --------------------------------------------------------------------------------------------

def test_tune_keys_bucket_sizes():
    """Neighbouring N, K, D share one autotuning key: compress(k="iqr") gives a new K per batch,
    and a new key re-benchmarks every config (about a second of host syncs on a GPU)."""
    gm = importlib.import_module("epic_ext.triton.gather_merge")  # not the re-exported function
    assert gm._tune_keys(64, 576, 33, 4096) == gm._tune_keys(64, 576, 64, 4096)
    assert gm._tune_keys(3, 513, 40, 3000) == gm._tune_keys(3, 1024, 50, 4096)
    assert gm._tune_keys(64, 576, 64, 4096) != gm._tune_keys(64, 576, 65, 4096)
    assert gm._tune_keys(100, 1, 0, 1) == (64, 1, 1, 1)
    for kernel in (gm._gather_merge_kernel, gm._gather_merge_bwd_kernel, gm._compress_kernel):
        assert set(kernel.keys) == {"B_KEY", "N_KEY", "K_KEY", "D_KEY", "MERGE"}


def test_autotuner_runs_once_per_bucket(monkeypatch):
    """With two configs the tuner benchmarks both for a new key only: a sequence of K (and N) in
    one bucket tunes once."""
    import triton
    gm = importlib.import_module("epic_ext.triton.gather_merge")  # not the re-exported function
    kernel = gm._gather_merge_kernel
    base = kernel.configs[0]
    benched = []
    monkeypatch.setattr(kernel, "configs",
                        [base, triton.Config(dict(base.kwargs), num_warps=base.num_warps)])
    monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setattr(kernel, "_bench",
                        lambda *args, config, **kwargs: benched.append(config) or [1.0, 1.0, 1.0])
    g = torch.Generator().manual_seed(3)
    for N, K in ((100, 33), (128, 47), (120, 64), (97, 40)):
        tokens = torch.randn(2, N, 5, generator=g)
        idx = torch.randint(0, N, (2, K), generator=g)
        out = tb.gather_merge(tokens, idx, None, 1, None)
        assert_close(out, ref.gather_merge(tokens, idx, None, 1, None))
    assert len(benched) == 2  # one key, two configs
    tb.gather_merge(torch.randn(2, 100, 5), torch.zeros(2, 65, dtype=torch.int64), None, 1, None)
    assert len(benched) == 4  # K = 65: the next bucket


def test_entries_launch_on_the_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: every entry enters the device of its first
    tensor argument (a CUDA tensor faked on the CPU), and does nothing for CPU tensors."""
    import contextlib
    from epic_ext.triton.select import on_tensor_device

    for name in tb.__all__:
        assert getattr(getattr(tb, name), "device_guarded", False), name

    events = []

    @contextlib.contextmanager
    def device(dev):
        events.append(("enter", torch.device(dev)))
        yield
        events.append("exit")

    class FakeCuda(torch.Tensor):
        is_cuda = property(lambda self: True)
        device = property(lambda self: torch.device("cuda", 1))

    monkeypatch.setattr(torch.cuda, "device", device)
    entry = on_tensor_device(lambda *args, **kwargs: events.append("run") or 7)
    fake = torch.Tensor._make_subclass(FakeCuda, torch.ones(2))
    assert entry(fake, 3) == 7
    assert events == [("enter", torch.device("cuda", 1)), "run", "exit"]
    events.clear()
    assert entry(2, scores=fake) == 7 and events[0] == ("enter", torch.device("cuda", 1))
    events.clear()
    assert entry(torch.ones(2), 3) == 7 and events == ["run"]
