"""In-LLM reduction methods (FastV, DART, random, pooling) against the slow per-row references
of _slow_llm_refs.py, on batches with left padding, per-row image positions, short prompts,
tokens after the last prompt token and GQA."""
import functools
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # the slow references sit next to this file

from _slow_llm_refs import (dart_ref, fastv_ref, grid_ref, pooling_ref,  # noqa: E402
                            random_ref)

from epic_ext.methods import get_method  # noqa: E402
from epic_ext.methods.base import LLMContext  # noqa: E402
from epic_ext.methods.pooling import choose_grid, representative_positions  # noqa: E402

N, GRID, H, DHEAD, D = 576, (24, 24), 4, 16, 64
KEEPS = [1, 7, 64, 128, 575, 576]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Pooled hidden vs the reference (fp32 window mean, one rounding to the dtype): fp32 differs by
# summation order only; bf16 by at most one rounding step of the result.
POOL_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (8e-3, 8e-3)}

# Per row: (left padding, text before the image, prompt text after the image, tokens after the
# last prompt token, whether those are real tokens (answers) or right padding).
LAYOUTS = {
    1: [(0, 35, 40, 0, True)],
    3: [(30, 35, 39, 0, True),       # left padding
        (0, 12, 2, 90, True),        # short prompt (2 text tokens < 4 pivots) + 90 answer tokens
        (5, 50, 40, 9, False)],      # left and right padding
}


class Case:
    """A batch plus everything the references need (full per-token queries for the eager
    FastV matrix)."""

    def __init__(self, B, hkv, dtype, device, seed=0):
        g = torch.Generator().manual_seed(seed * 1000 + B * 10 + hkv)
        rows = LAYOUTS[B]
        L = sum(rows[0][:4]) + N
        assert all(sum(r[:4]) + N == L for r in rows)
        mask = torch.zeros(B, L, dtype=torch.bool)
        outside = torch.zeros(B, L, dtype=torch.bool)   # padding and post-query tokens
        starts, qidx = [], []
        for b, (pad, pre, post, tail, tail_real) in enumerate(rows):
            s = pad + pre
            q = s + N + post - 1
            starts.append(s)
            qidx.append(q)
            mask[b, pad:q + 1] = True
            mask[b, q + 1:] = tail_real
            outside[b, :pad] = True
            outside[b, q + 1:] = True
        # Tokens a method must ignore get large keys: any leak changes FastV's softmax and DART's
        # text pivots.
        big = 1 + 4 * outside.float()
        self.keys = (torch.randn(B, hkv, L, DHEAD, generator=g) * big[:, None, :, None]).to(dtype)
        self.q_all = torch.randn(B, H, L, DHEAD, generator=g).to(dtype)
        self.hidden = torch.randn(B, L, D, generator=g).to(dtype)
        self.norm_w = (1 + 0.1 * torch.randn(D, generator=g)).to(dtype)
        self.mask, self.L, self.B = mask, L, B
        self.image_start = torch.tensor(starts)
        self.query_index = torch.tensor(qidx)
        self.scale = DHEAD ** -0.5
        self.device = device

    def final_norm(self, x):
        # LLaMA's RMSNorm.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.norm_w.to(x.device) * xf.to(x.dtype)

    def ctx(self, **over):
        dev = self.device
        qi = self.query_index
        query = self.q_all[torch.arange(self.B), :, qi][:, :, None, :]           # [B, H, 1, d]
        kw = dict(hidden=self.hidden.to(dev), image_start=self.image_start.to(dev), num_image_tokens=N,
                  grid=GRID, attention_mask=self.mask.to(dev), query_index=qi.to(dev),
                  keys=self.keys.to(dev), query=query.to(dev), scale=self.scale,
                  final_norm=self.final_norm)
        kw.update(over)
        return LLMContext(**kw)


@functools.lru_cache(maxsize=None)
def case(B, hkv, dtype, device):
    return Case(B, hkv, dtype, device)


def run(name, ctx, **options):
    spec = get_method(name)
    return spec.fn(ctx, spec.make_config(**options))


def check_index(index, B, k, n=N):
    assert index.dtype == torch.int64
    assert tuple(index.shape) == (B, k)
    if k:
        assert bool((index[:, 1:] > index[:, :-1]).all()), "not strictly ascending"
        assert int(index.min()) >= 0 and int(index.max()) < n


# --------------------------------------------------------------------------- FastV

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("hkv", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("keep", KEEPS)
def test_fastv_matches_eager_reference(keep, B, hkv, dtype, device):
    c = case(B, hkv, dtype, device)
    sel = run("fastv", c.ctx(), keep=keep)
    check_index(sel.index, B, keep)
    assert sel.hidden is None
    ref = fastv_ref(c.q_all, c.keys, c.mask, c.image_start, N, c.query_index, c.scale, keep)
    assert sel.index.cpu().tolist() == ref


def test_fastv_default_budget_and_ratio():
    c = case(3, 2, torch.float32, "cpu")
    ref288 = fastv_ref(c.q_all, c.keys, c.mask, c.image_start, N, c.query_index, c.scale, 288)
    assert run("fastv", c.ctx()).index.tolist() == ref288             # R = 50%: round(576 * 0.5)
    assert get_method("fastv").make_config().layer == 2
    assert run("fastv", c.ctx(), ratio=0.778).index.shape == (3, 128)  # round(576 * 0.222) = 128
    assert run("fastv", c.ctx(), keep=0.25).index.shape == (3, 144)
    assert run("fastv", c.ctx(), keep=0).index.shape == (3, 0)


def test_fastv_rows_match_alone():
    # Left padding must not change a sample's selection: each row alone gives the same tokens.
    c = case(3, 2, torch.float32, "cpu")
    batched = run("fastv", c.ctx(), keep=64).index
    for b in range(3):
        pad = int(c.mask[b].int().argmax())
        end = int(c.query_index[b]) + 1
        sl = slice(pad, end)
        ctx = LLMContext(hidden=c.hidden[b:b + 1, sl], image_start=c.image_start[b:b + 1] - pad,
                         num_image_tokens=N, grid=GRID, attention_mask=c.mask[b:b + 1, sl],
                         query_index=c.query_index[b:b + 1] - pad, keys=c.keys[b:b + 1, :, sl],
                         query=c.q_all[b:b + 1, :, end - 1:end], scale=c.scale)
        assert run("fastv", ctx, keep=64).index.tolist() == batched[b:b + 1].tolist()


# --------------------------------------------------------------------------- DART

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("hkv", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("keep", KEEPS + [3])
def test_dart_matches_greedy_reference(keep, B, hkv, dtype, device):
    c = case(B, hkv, dtype, device)
    sel = run("dart", c.ctx(), keep=keep)
    check_index(sel.index, B, keep)         # exact budget: 128 -> 128, not 4 + 8 * 16 = 132
    ref = dart_ref(c.hidden, c.keys, c.mask, c.image_start, N, c.query_index, c.final_norm, keep)
    assert sel.index.cpu().tolist() == ref


@pytest.mark.parametrize("pivots", [(4, 0), (1, 4), (2, 7), (6, 3)])
def test_dart_pivot_options(pivots):
    pi, pt = pivots
    c = case(3, 2, torch.float32, "cpu")
    for keep in (5, 100):
        sel = run("dart", c.ctx(), keep=keep, pivot_image=pi, pivot_text=pt)
        check_index(sel.index, 3, keep)
        ref = dart_ref(c.hidden, c.keys, c.mask, c.image_start, N, c.query_index, c.final_norm, keep,
                       pivot_image=pi, pivot_text=pt)
        assert sel.index.tolist() == ref


def test_dart_short_prompt_masks_text_pivots():
    # Row 1 has 2 prompt tokens after the image and 90 answer tokens with large keys after them:
    # only the 2 prompt tokens may be text pivots, so the answers cannot change the selection.
    c = case(3, 2, torch.float32, "cpu")
    base = run("dart", c.ctx(), keep=64).index
    keys = c.keys.clone()
    hidden = c.hidden.clone()
    q = int(c.query_index[1])
    keys[1, :, q + 1:] *= 10
    hidden[1, q + 1:] = torch.randn_like(hidden[1, q + 1:])
    assert run("dart", c.ctx(keys=keys, hidden=hidden), keep=64).index.tolist() == base.tolist()


def test_dart_no_text_after_image():
    # The image ends the sequence: no text candidates at all, the image pivots take every pick.
    g = torch.Generator().manual_seed(3)
    L = N + 2
    hidden = torch.randn(2, L, D, generator=g)
    keys = torch.randn(2, 2, L, DHEAD, generator=g)
    mask = torch.ones(2, L, dtype=torch.bool)
    start = torch.tensor([2, 2])
    qi = torch.tensor([L - 1, L - 1])
    ctx = LLMContext(hidden=hidden, image_start=start, num_image_tokens=N, grid=GRID, attention_mask=mask,
                     query_index=qi, keys=keys, final_norm=lambda x: x)
    sel = run("dart", ctx, keep=50)
    check_index(sel.index, 2, 50)
    assert sel.index.tolist() == dart_ref(hidden, keys, mask, start, N, qi, lambda x: x, 50)


# --------------------------------------------------------------------------- random

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("keep", KEEPS + [0])
def test_random_seeded_matches_reference(keep, B, device):
    c = case(B, 2, torch.float32, device)
    sel = run("random", c.ctx(), keep=keep, seed=1234)
    check_index(sel.index, B, keep)
    gen = torch.Generator(device=device).manual_seed(1234)
    u = torch.rand(B, N, generator=gen, device=device, dtype=torch.float64).cpu()
    assert sel.index.cpu().tolist() == random_ref(u, keep)


def test_random_reproducibility():
    c = case(3, 2, torch.float32, "cpu")
    a = run("random", c.ctx(), keep=64, seed=7).index
    assert torch.equal(a, run("random", c.ctx(), keep=64, seed=7).index)       # same seed: same draw
    assert not torch.equal(a, run("random", c.ctx(), keep=64, seed=8).index)   # other seed: other draw
    assert not torch.equal(a[0], a[1])                                         # rows differ
    # Without a seed: the context's generator (reproducible once seeded), else the global RNG.
    g1 = torch.Generator().manual_seed(5)
    g2 = torch.Generator().manual_seed(5)
    x1 = run("random", c.ctx(generator=g1), keep=64).index
    assert torch.equal(x1, run("random", c.ctx(generator=g2), keep=64).index)
    assert not torch.equal(x1, run("random", c.ctx(generator=g1), keep=64).index)  # generator advanced
    assert not torch.equal(run("random", c.ctx(), keep=64).index, run("random", c.ctx(), keep=64).index)
    assert get_method("random").make_config(keep=1).layer == 0


def test_random_is_uniform():
    # Every position is kept with probability keep / n: counts over many rows stay within 5 sigma.
    rows, n, keep = 4000, 16, 4
    ctx = LLMContext(hidden=torch.zeros(rows, n, 1), image_start=torch.zeros(rows, dtype=torch.long),
                     num_image_tokens=n, grid=(4, 4), attention_mask=torch.ones(rows, n, dtype=torch.bool),
                     query_index=torch.full((rows,), n - 1))
    idx = run("random", ctx, keep=keep, seed=0).index
    counts = torch.bincount(idx.flatten(), minlength=n).double()
    p = keep / n
    sigma = (rows * p * (1 - p)) ** 0.5
    assert float((counts - rows * p).abs().max()) < 5 * sigma


# --------------------------------------------------------------------------- pooling

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("keep", KEEPS)
def test_pooling_matches_reference(keep, B, dtype, device):
    c = case(B, 2, dtype, device)
    ctx = c.ctx()
    out_grid = grid_ref(keep, *GRID)
    if out_grid is None:                     # 575 = 23 * 25 does not fit a 24 x 24 grid
        with pytest.raises(ValueError, match="keep"):
            run("pooling", ctx, keep=keep)
        return
    sel = run("pooling", ctx, keep=keep)
    check_index(sel.index, B, keep)
    index, pooled = pooling_ref(ctx.image_hidden().cpu(), GRID, out_grid)
    assert sel.index.cpu().tolist() == index
    assert sel.hidden.dtype == dtype and tuple(sel.hidden.shape) == (B, keep, D)
    atol, rtol = POOL_TOL[dtype]
    torch.testing.assert_close(sel.hidden.cpu().double(), pooled.double(), atol=atol, rtol=rtol)


def test_pooling_full_grid_is_identity():
    c = case(3, 2, torch.bfloat16, "cpu")
    sel = run("pooling", c.ctx(), keep=576)
    assert sel.index.tolist() == [list(range(N))] * 3
    assert torch.equal(sel.hidden, c.ctx().image_hidden())


def test_pooling_grid_rules():
    assert choose_grid(64, 24, 24) == (8, 8)
    assert choose_grid(128, 24, 24) == (8, 16)
    assert choose_grid(7, 24, 24) == (1, 7)
    assert choose_grid(1, 24, 24) == (1, 1)
    assert choose_grid(576, 24, 24) == (24, 24)
    assert choose_grid(144, 24, 24) == (12, 12)
    assert choose_grid(2, 12, 48) == (1, 2)          # tie on |h - w|: the grid's aspect decides
    assert choose_grid(2, 48, 12) == (2, 1)
    for bad in (29, 31, 575, 25 * 23):
        with pytest.raises(ValueError, match="keep"):
            choose_grid(bad, 24, 24)
    for keep in range(1, 577):                         # the chosen rule is the brute-force rule
        assert (choose_grid(keep, 24, 24) if grid_ref(keep, 24, 24) else None) == grid_ref(keep, 24, 24)
    # Representative positions are strictly ascending inside the span for every fitting grid.
    for h in range(1, 25):
        for w in range(1, 25):
            pos = representative_positions(24, 24, h, w).tolist()
            assert all(a < b for a, b in zip(pos, pos[1:])) and 0 <= pos[0] and pos[-1] < N
    assert representative_positions(24, 24, 1, 1).tolist() == [287]         # floor(mean(0..575))


def test_pooling_grid_option():
    c = case(1, 2, torch.float32, "cpu")
    sel = run("pooling", c.ctx(), grid=(4, 16))       # budget = h * w when keep is None
    index, pooled = pooling_ref(c.ctx().image_hidden(), GRID, (4, 16))
    assert sel.index.tolist() == index
    torch.testing.assert_close(sel.hidden, pooled, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="grid"):
        run("pooling", c.ctx(), keep=50, grid=(2, 25))      # wider than the 24-wide image grid
    with pytest.raises(ValueError, match="grid"):
        run("pooling", c.ctx(), keep=0.5, grid=(2, 3))      # budget 288 != 6
    sel = run("pooling", c.ctx(), keep=0)
    assert sel.index.shape == (1, 0) and sel.hidden.shape == (1, 0, D)
    with pytest.raises(ValueError, match="grid"):
        run("pooling", c.ctx(grid=(20, 20)), keep=4)       # the context's grid must hold N tokens


# --------------------------------------------------------------------------- options

@pytest.mark.parametrize("name,options,word", [
    ("fastv", dict(layer=0), "layer"),
    ("fastv", dict(layer=1.5), "layer"),
    ("fastv", dict(keep=-1), "keep"),
    ("fastv", dict(keep=1.5), "keep"),
    ("fastv", dict(keep=True), "keep"),
    ("fastv", dict(keep="half"), "keep"),
    ("fastv", dict(ratio=1.5), "ratio"),
    ("fastv", dict(keep=64, ratio=0.5), "ratio"),
    ("dart", dict(keep=64, layer=0), "layer"),
    ("dart", dict(keep=64, pivot_image=0), "pivot_image"),
    ("dart", dict(keep=64, pivot_text=-1), "pivot_text"),
    ("dart", dict(keep=64, pivot_text=2.0), "pivot_text"),
    ("random", dict(keep=64, layer=-1), "layer"),
    ("random", dict(keep=64, seed="x"), "seed"),
    ("random", dict(keep=-3), "keep"),
    ("pooling", dict(keep=64, grid=(0, 64)), "grid"),
    ("pooling", dict(keep=64, grid=(8,)), "grid"),
    ("pooling", dict(keep=64, grid=(4, 4)), "grid"),
    ("pooling", dict(keep=64, layer=-1), "layer"),
])
def test_bad_options_raise(name, options, word):
    with pytest.raises(ValueError, match=word):
        get_method(name).make_config(**options)


def test_registry_and_runtime_errors():
    for name in ("fastv", "dart", "random", "pooling"):
        assert get_method(name).stage == "llm"
    with pytest.raises(TypeError):
        get_method("dart").make_config(keep=64, pivots=3)
    c = case(1, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match="keep"):
        run("dart", c.ctx())                               # DART needs a budget
    with pytest.raises(ValueError, match="keep"):
        run("random", c.ctx())
    with pytest.raises(ValueError, match="keys"):
        run("dart", c.ctx(keys=None), keep=8)
    with pytest.raises(ValueError, match="final_norm"):
        run("dart", c.ctx(final_norm=None), keep=8)
    with pytest.raises(ValueError, match="query"):
        run("fastv", c.ctx(query=None), keep=8)
    with pytest.raises(ValueError, match="600"):
        run("fastv", c.ctx(), keep=600)                    # more than N


def test_autograd():
    # Selections are built without a graph; pooled tokens stay differentiable w.r.t. the hidden.
    c = case(3, 2, torch.float32, "cpu")
    hidden = c.hidden.clone().requires_grad_(True)
    keys = c.keys.clone().requires_grad_(True)
    for name in ("fastv", "dart", "random"):
        sel = run(name, c.ctx(hidden=hidden, keys=keys), keep=64)
        assert not sel.index.requires_grad
    sel = run("pooling", c.ctx(hidden=hidden), keep=1)
    sel.hidden.sum().backward()
    grad = hidden.grad
    for b in range(3):
        s = int(c.image_start[b])
        torch.testing.assert_close(grad[b, s:s + N], torch.full((N, D), 1.0 / N))
        assert float(grad[b, :s].abs().sum()) == 0 and float(grad[b, s + N:].abs().sum()) == 0
