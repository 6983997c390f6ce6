"""GPU-sized tests (`make test-gpu`): the CUDA kernels and the compiled Triton kernels at the shapes
the CPU interpreter cannot run, each against the reference (epic_ext/reference.py, fp64 where the
comparison is of floats), outputs poisoned first, on fresh random inputs (never zeros).

- selection at N = 1 and 8192 (the block-size extremes) and N >= 12000 (the select path whose
  keys need more than 48 KB of shared memory);
- compress at those N with gradients, and at LLaVA-1.5's batch: bf16 [64, 576, 4096];
- KL rows on the 128-thread path (bf16 V in 2049..16384, fp32 V in 1025..8192), rows whose start
  is not 16-byte aligned, and the distillation headline T = 8192, V = 128256 in bf16;
- attention rows of 4096 CLIP [CLS] queries with 16 heads (grid dimension limits).

Skipped without a CUDA device. Under `make test-gpu` (EPIC_EXT_TEST_GPU=1) a backend that did
not build or import is a failure, not a skip: that run exists to prove the GPU path.
"""
import os

import pytest
import torch

import epic_ext
from epic_ext import _backend
from epic_ext import reference as R
from conftest import TOLERANCES, assert_close, poisoned_outputs

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GPU_MODE = os.environ.get("EPIC_EXT_TEST_GPU") == "1"
# Tests of several GiB share one pytest-xdist worker (gpu_check runs `--dist loadgroup`), so
# parallel workers never hold more than one of them on the GPU at a time.
BIG = pytest.mark.xdist_group("big")
# (loss rtol, grad error relative to max|grad|), as tests/test_kl.py: fp32 math on the rounded
# logits, one rounding of the stored gradient.
KL_TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-4, 2e-3), torch.bfloat16: (2e-4, 1e-2)}


@pytest.fixture(params=["cuda", "triton"])
def gpu_backend(request):
    """A GPU backend, forced for the test."""
    name = request.param
    info = epic_ext.backends()[name]
    if not info["available"]:
        if GPU_MODE:
            pytest.fail(f"backend {name!r} is not available on this GPU machine: {info['reason']}")
        pytest.skip(f"backend {name!r}: {info['reason']}")
    if name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("GPU-sized shapes need compiled Triton (run `make test-gpu`)")
    with _backend.use_backend(name):
        yield name


def gen(seed):
    return torch.Generator().manual_seed(seed)


def scores_of(B, N, kind, seed, dtype=torch.float32):
    g = gen(seed)
    s = torch.randn(B, N, generator=g)
    if kind == "ties":  # long runs of equal keys
        s = torch.randint(-3, 4, (B, N), generator=g).float()
    elif kind == "special":  # NaN, +-inf and signed zeros mixed in
        r = torch.rand(B, N, generator=g)
        s[r < 0.1] = float("nan")
        s[(r >= 0.1) & (r < 0.15)] = float("inf")
        s[(r >= 0.15) & (r < 0.2)] = -float("inf")
        s[(r >= 0.2) & (r < 0.25)] = -0.0
        s[(r >= 0.25) & (r < 0.3)] = 0.0
    return s.to(dtype)


def check_selection(scores):
    """select_topk and iqr_select (per image and pooled) on the GPU == the reference on the CPU."""
    B, N = scores.shape
    dev = scores.to("cuda")
    for k in sorted({0, 1, N // 3, max(0, N - 1), N}):
        with poisoned_outputs():
            got = epic_ext.select_topk(dev, k)
        assert torch.equal(got.cpu(), R.select_topk(scores, k)), f"select_topk k={k}"
    # iqr_select's outliers of heavy-tailed scores; NaN stay NaN under the cube
    heavy = scores.float() ** 3
    heavy_dev = heavy.to("cuda")
    for pooled in (False, True):
        for max_k in (None, max(1, N // 50)):
            with poisoned_outputs():
                counts, idx = epic_ext.iqr_select(heavy_dev, pooled=pooled, max_k=max_k)
            want_counts, want_idx = R.iqr_select(heavy, 1.5, pooled, -1 if max_k is None else max_k)
            assert torch.equal(counts.cpu(), want_counts), f"pooled={pooled} max_k={max_k}"
            assert torch.equal(idx.cpu(), want_idx), f"pooled={pooled} max_k={max_k}"


@pytest.mark.parametrize("N", [1, 8192])
@pytest.mark.parametrize("kind", ["random", "ties", "special"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_selection_block_size_extremes(gpu_backend, N, kind, dtype):
    check_selection(scores_of(5, N, kind, seed=N + len(kind), dtype=dtype))


@pytest.mark.parametrize("N", [12000, 16384, 50001])
@pytest.mark.parametrize("kind", ["random", "ties", "special"])
def test_selection_past_48kb_shared_memory(gpu_backend, N, kind):
    check_selection(scores_of(3, N, kind, seed=7 * N + len(kind)))


def assert_merged_close(got, want, dtype, n_terms, msg=""):
    """The merged row against the reference in the same dtype: conftest's table holds for sums of
    up to ~3k terms; fp32 summation-order noise of a longer sum grows with its length."""
    atol, rtol = TOLERANCES[dtype]
    atol *= max(1.0, n_terms / 3000)
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), atol=atol, rtol=rtol,
                               equal_nan=True, msg=msg or None)


@pytest.mark.parametrize("N,D", [(1, 67), (8192, 33), (12000, 40)])
@pytest.mark.parametrize("merge", ["mean", "weighted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compress_and_grad_at_block_extremes(gpu_backend, N, D, merge, dtype):
    B = 3
    g = gen(N + D)
    tokens = torch.randn(B, N, D, generator=g).to(dtype)
    scores = scores_of(B, N, "random", seed=N)
    weights = torch.rand(B, N, generator=g) if merge == "weighted" else None
    for k in sorted({0, 1, N // 3, N}):
        t_dev = tokens.to("cuda", copy=True).requires_grad_()
        w_dev = None if weights is None else weights.to("cuda")
        with poisoned_outputs():
            out = epic_ext.compress(t_dev, scores.to("cuda"), k, merge, weights=w_dev)
        # forward against the reference in the same dtype (fp32 sums, one rounding) ...
        want, want_idx = R.compress_topk(tokens, scores, k, R.MERGE_CODES[merge], weights)
        assert torch.equal(out.indices.cpu(), want_idx), f"k={k}"
        assert torch.equal(out.tokens[:, :k].cpu(), want[:, :k]), f"kept rows, k={k}"  # copies
        assert_merged_close(out.tokens[:, k:], want[:, k:], dtype, N - k, msg=f"k={k}")
        # ... the gradient against fp64 autograd of the reference
        t64 = tokens.to(torch.float64, copy=True).requires_grad_()
        want64, _ = R.compress_topk(t64, scores, k, R.MERGE_CODES[merge],
                                    None if weights is None else weights.double())
        grad_out = torch.randn(want.shape, generator=g).to(dtype)
        with poisoned_outputs():
            out.tokens.backward(grad_out.to("cuda"))
        want64.backward(grad_out.double())
        assert_close(t_dev.grad, t64.grad, dtype, msg=f"grad k={k}")


@BIG
def test_compress_llava_batch_bf16(gpu_backend):
    """LLaVA-1.5's visual tokens for a batch of 64 images: bf16 [64, 576, 4096], k = 128 and the
    adaptive (iqr) budget, against the reference run on the same CUDA tensors (fp32 sums)."""
    B, N, D, k = 64, 576, 4096, 128
    g = torch.Generator(device="cuda").manual_seed(64)
    tokens = torch.randn(B, N, D, generator=g, device="cuda").to(torch.bfloat16)
    scores = (torch.randn(B, N, generator=g, device="cuda") * 1.5).softmax(-1)
    with poisoned_outputs():
        out = epic_ext.compress(tokens, scores, k)
    want, want_idx = R.compress_topk(tokens, scores, k)
    assert torch.equal(out.indices, want_idx)
    assert torch.equal(out.tokens[:, :k], want[:, :k])  # kept rows are copies
    assert_close(out.tokens, want, torch.bfloat16)
    with poisoned_outputs():
        adaptive = epic_ext.compress(tokens, scores, "iqr", pooled=True, max_k=N // 4)
    counts, idx = R.iqr_select(scores, 1.5, True, N // 4)
    idx = idx[:, :N // 4]  # compress sizes its output by max_k
    assert torch.equal(adaptive.counts, counts) and torch.equal(adaptive.indices, idx)
    assert_close(adaptive.tokens, R.gather_merge(tokens, idx, counts), torch.bfloat16)


def kl_rows_fp64(s, t, chunk=None):
    """(batchmean loss, d loss / d s) of forward KL in fp64, by row chunks on the device."""
    T, V = s.shape
    chunk = chunk or max(1, (1 << 26) // V)
    total = torch.zeros((), dtype=torch.float64, device=s.device)
    grad = torch.empty(T, V, dtype=torch.float32, device=s.device)
    for a in range(0, T, chunk):
        ls = torch.log_softmax(s[a:a + chunk].double(), -1)
        lt = torch.log_softmax(t[a:a + chunk].double(), -1)
        pt = lt.exp()
        total += (pt * (lt - ls)).sum()
        grad[a:a + chunk] = (ls.exp() - pt).div_(T).float()
    return total / T, grad


def check_kl(s, t, dtype):
    """kl_div(s, t) loss and gradient against fp64; s and t may be any row-strided views."""
    student = s.detach().requires_grad_()
    with poisoned_outputs():
        loss = epic_ext.kl_div(student, t)
        loss.backward()
    want_loss, want_grad = kl_rows_fp64(s.detach(), t)
    rtol, gtol = KL_TOL[dtype]
    torch.testing.assert_close(loss.double(), want_loss, rtol=rtol, atol=rtol * 1e-2)
    scale = float(want_grad.abs().max())
    err = float((student.grad.float() - want_grad).abs().max())
    assert err <= gtol * scale, f"grad err {err:.3e} vs max|grad| {scale:.3e}"
    assert not torch.isnan(student.grad).any()


@pytest.mark.parametrize("dtype,V", [(torch.bfloat16, v) for v in (2049, 4097, 8191, 16384)]
                         + [(torch.float32, v) for v in (1025, 4096, 8192)], ids=str)
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "misaligned"])
def test_kl_128_thread_rows(gpu_backend, dtype, V, aligned):
    """Rows long enough for the 128-thread path; misaligned: every row starts one element past a
    16-byte boundary (storage offset 1, row stride V + 1), so no 16-byte vector loads apply."""
    T = 37
    g = gen(V + aligned)
    if aligned:
        s = (torch.randn(T, V, generator=g) * 3).to(dtype).cuda()
        t = (torch.randn(T, V, generator=g) * 3).to(dtype).cuda()
    else:
        s_buf = (torch.randn(T * (V + 1) + 1, generator=g) * 3).to(dtype).cuda()
        t_buf = (torch.randn(T * (V + 1) + 1, generator=g) * 3).to(dtype).cuda()
        s = s_buf[1:].view(T, V + 1)[:, :V]
        t = t_buf[1:].view(T, V + 1)[:, :V]
        assert (s.data_ptr() % 16) and (t.data_ptr() % 16)
    check_kl(s, t, dtype)


@BIG
def test_kl_distillation_headline_bf16(gpu_backend):
    """T = 8192 rows of a 128256-word vocabulary (Llama 3) in bf16: 2 GiB per input."""
    T, V = 8192, 128256
    g = torch.Generator(device="cuda").manual_seed(8192)
    s = torch.randn(T, V, generator=g, device="cuda").mul_(2.0)
    t = torch.randn(T, V, generator=g, device="cuda").add_(s).to(torch.bfloat16)
    s = s.to(torch.bfloat16)
    check_kl(s, t, torch.bfloat16)


@BIG
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_attn_clip_cls_rows_4096(gpu_backend, dtype):
    """PruMerge's [CLS] row of 4096 CLIP images, 16 heads of 64: B * Hkv = 65536 units, past
    grid dimension 1's limit of 65535."""
    B, H, L, d = 4096, 16, 577, 64
    g = torch.Generator(device="cuda").manual_seed(4096)
    q = (torch.randn(B, H, 1, d, generator=g, device="cuda") * 1.5).to(dtype)
    k = (torch.randn(B, H, L, d, generator=g, device="cuda") * 1.5).to(dtype)
    with poisoned_outputs():
        got = epic_ext.attn_scores(q, k, 1, L - 1, causal=False)
    want = R.attn_scores(q, k, 1, L - 1, causal=False)
    assert got.shape == (B, L - 1) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=2e-5)
