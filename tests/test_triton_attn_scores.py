"""The Triton attn_scores kernels (epic_ext.triton.attn_scores.attn_scores) at the kernel contract,
against the reference (epic_ext.reference.attn_scores_fwd) and, where it is built, the C++ kernel
(epic_ext._C.cpu.attn_scores), under Triton's CPU interpreter.

Shapes are small (the interpreter runs one program at a time) but cross the kernels' internal
boundaries: two key chunks (L = 257 > BLOCK_K = 256 here), two row tiles (R = (H / Hkv) * Q = 18 >
16 rows per tl.dot), head sizes that are not a multiple of the d block, GQA.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before any triton-jitted code is imported

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from epic_ext import reference as ref  # noqa: E402
# the module (epic_ext.triton re-exports its function under the same name)
tat = importlib.import_module("epic_ext.triton.attn_scores")

try:
    from epic_ext import _C
    CPP = _C.cpu.attn_scores if hasattr(_C.cpu, "attn_scores") else None
except ImportError:  # the extension is not built: the reference alone
    CPP = None

pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"), pytest.mark.usefixtures("one_thread")]

# (atol, rtol) of the fp32 output, the same for every input dtype (the reference reads the same
# rounded inputs); the C++ parity check allows twice that.
TOL = (1e-6, 2e-5)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Fresh tensors (the output and the kernels' scratch) start as NaN: an element the kernels
    leave unwritten and then use, or never write, fails."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        if t.numel() and t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", empty)


def make(B, H, Hkv, Q, L, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, Q, d, generator=g, dtype=torch.float64) * 2).to(dtype)
    k = (torch.randn(B, Hkv, L, d, generator=g, dtype=torch.float64) * 2).to(dtype)
    return q, k, g


def contract_args(q, k, g, key_len, causal, lse, reduction):
    """Kernel-contract arguments with per-sample tensors (key_start, kv_start, q_pos)."""
    B, H, Q, d = q.shape
    L = k.shape[2]
    ks = torch.randint(0, L - key_len + 1, (B,), generator=g)
    kv = torch.randint(0, max(1, L // 4), (B,), generator=g)
    q_pos = torch.randint(L // 2, L, (B, Q), generator=g)
    lse_t = None
    if lse:
        s = q.float() @ k.float().repeat_interleave(H // k.shape[1], 1).transpose(-1, -2) * d ** -0.5
        vis = ref.attn_visible(B, Q, L, kv, q_pos, causal).unsqueeze(1)
        lse_t = torch.logsumexp(torch.where(vis, s, float("-inf")), -1)
    return (q, k, lse_t, ks, 0, key_len, kv, 0, q_pos, d ** -0.5, causal, reduction)


def check(args):
    got = tat.attn_scores(*args)
    want = ref.attn_scores_fwd(*args)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=TOL[0], rtol=TOL[1], equal_nan=True)
    if CPP is not None:
        torch.testing.assert_close(got, CPP(*args), atol=2 * TOL[0], rtol=2 * TOL[1],
                                   equal_nan=True)
    return got


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", [(2, 4, 4, 1, 257, 40), (1, 6, 1, 3, 50, 64), (3, 8, 2, 1, 9, 8)],
                         ids=str)
def test_random(shape, dtype):
    """Every (causal, lse given, reduction) combination spread over the shapes and dtypes."""
    q, k, g = make(*shape, dtype, seed=sum(shape))
    L = shape[4]
    i = DTYPES.index(dtype)
    for j, (causal, lse) in enumerate([(True, False), (False, True), (True, True)]):
        check(contract_args(q, k, g, max(1, L - 5 * j), causal, lse, 1 + (i + j) % 2))


def test_int_starts_equal_tensor_starts_bitwise():
    q, k, g = make(2, 4, 2, 2, 70, 16, torch.float32, seed=3)
    with_ints = (q, k, None, None, 5, 40, None, 3, None, 0.3, True, 2)
    with_tensors = (q, k, None, torch.tensor([5, 5]), 0, 40, torch.tensor([3, 3]), 0,
                    torch.tensor([[68, 69], [68, 69]]), 0.3, True, 2)
    a = check(with_ints)
    assert torch.equal(a, tat.attn_scores(*with_tensors))
    assert torch.equal(a, tat.attn_scores(*with_ints))  # deterministic


def test_unchecked_indices_are_memory_safe():
    """Values the Python layer would reject: span entries outside [0, L) are NaN, the rest follow
    the reference; extreme values are clamped before any address is formed."""
    q, k, g = make(4, 2, 1, 1, 30, 8, torch.bfloat16, seed=4)
    ks = torch.tensor([-4, 25, 2 ** 63 - 1, -2 ** 63])
    kv = torch.tensor([-9, 40, 2 ** 63 - 1, -2 ** 63])
    q_pos = torch.tensor([[2 ** 62], [-3], [-2 ** 63], [2 ** 63 - 1]])
    args = (q, k, None, ks, 0, 10, kv, 0, q_pos, 0.35, True, 2)
    got = tat.attn_scores(*args)
    assert got[0, :4].isnan().all() and not got[0, 4:].isnan().any()
    assert got[1, 5:].isnan().all() and (got[1, :5] == 0).all()  # kv_start past L: nothing seen
    assert got[2:].isnan().all()
    mild = (q, k, None, ks[:2].repeat(2), 0, 10, kv[:2].repeat(2), 0, q_pos.clamp(-5, 99), 0.35,
            True, 1)
    check(mild)


@pytest.mark.parametrize("interpret", [True, False], ids=["interpreter", "gpu"])
def test_launch_plan_fits_grid_limits(monkeypatch, interpret):
    """Units (B * Hkv) and samples go to grid dimension 0 (up to 2^31 - 1); dimension 1 stays
    <= 65535. B = 4096 CLIP [CLS] rows with 16 heads: 65536 units, which dimension 1 could not
    launch."""
    monkeypatch.setattr(tat, "INTERPRET", interpret)
    for B, Hkv, L, key_len in [(4096, 16, 577, 576), (1, 1, 1, 1), (70000, 1, 9, 9),
                               (1, 8, 2 ** 23, 2 ** 23 - 3), (3, 2, 257, 40)]:
        plan = tat._launch_plan(B, Hkv, L, key_len)
        assert plan["scan_grid"] == (B * Hkv, plan["C"])
        assert plan["combine_grid"][0] == B
        for grid in (plan["scan_grid"], plan["combine_grid"]):
            assert 1 <= grid[0] <= 2 ** 31 - 1
            assert all(1 <= g <= tat.MAX_GRID_DIM1 for g in grid[1:]), (B, Hkv, L, grid)
        assert plan["C"] * plan["block_k"] >= L > (plan["C"] - 1) * plan["block_k"]
        assert plan["combine_grid"][1] * plan["block_t"] >= key_len


def test_many_units_in_grid_dimension_0():
    """More samples than key chunks (B * Hkv = 40 units, one chunk) against the reference: the
    program ids of both launches are read in the order the grids are built."""
    q, k, g = make(20, 4, 1, 2, 12, 8, torch.float32, seed=7)
    check((q, k, None, None, 3, 9, None, 0, None, 0.5, True, 2))
    check(contract_args(q, k, g, 9, True, True, 1))  # lse given: the one-pass path
