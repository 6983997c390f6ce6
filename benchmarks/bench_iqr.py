"""IQR outlier selection (PruMerge / TRIM rule) against the eager torch.quantile way.

Variants:
  pooled     quartiles over all B*N scores; keep = floor(outliers / B); every row keeps its own
             top-keep tokens (reference parity with TRIM and PruMerge)
  per-image  quartiles, fence and count per row; indices of the row's outliers, padded with -1
Providers:
  eager      pooled: torch.quantile of the flattened scores, outliers counted and brought to the
             host (`int(...)`, a sync, as the reference repos do), then topk per row (indices
             sorted into spatial order); per-image: torch.quantile over dim=1, `scores > fence`,
             counts, then the mask turned into ascending indices padded with -1 (one sort)
  compile    torch.compile of the same function, dynamic=False (a graph break at the host sync)
  ours-<b>   epic_ext.iqr_select(scores, whisker, pooled=..., output="indices", backend=<b>)

Variant per-call (B=1 N=8): the host cost of one call of a tiny op (see bench_compress): each timed
repetition is 1000 calls, so "median ms" reads as microseconds per call; baseline torch.topk(scores,
4), ours iqr_select(scores, backend=<b>).

Scores are fp32 (attention-like: a softmax of 1.5 * N(0, 1) per row, about 10% outliers).
Minimum bytes (DESIGN.md 5): B*N*4 read + B*N*8 indices written.

    python -m benchmarks.bench_iqr --quick
    python -m benchmarks.bench_iqr --shapes B=64,N=576 --variants pooled
"""
from __future__ import annotations

import sys

import torch

from benchmarks import common, harness
from benchmarks.bench_compress import per_call_loop
from benchmarks.harness import Case, Provider

BENCH = "iqr"
KEYS = ("B", "N")
GRID = [dict(B=b, N=n) for b in (1, 16, 64) for n in (576, 2880)]
QUICK = [(1, 576), (64, 576), (16, 2880)]
VARIANTS = ("pooled", "per-image", "per-call")
PER_CALL_SHAPE = dict(B=1, N=8)
WHISKER = 1.5


def iqr_eager_pooled(scores: torch.Tensor, whisker: float = WHISKER):
    """(counts [B], indices [B, keep]) the way TRIM / PruMerge compute it, with torch.quantile."""
    B, N = scores.shape
    flat = scores.reshape(-1).float()
    q = torch.quantile(flat, torch.tensor([0.25, 0.75], device=flat.device))
    fence = q[1] + whisker * (q[1] - q[0])
    keep = int((flat > fence).sum()) // B  # host sync
    idx = scores.topk(keep, dim=1).indices.sort(dim=1).values
    counts = torch.full((B,), keep, dtype=torch.int64, device=scores.device)
    return counts, idx


def iqr_eager_per_image(scores: torch.Tensor, whisker: float = WHISKER):
    """(counts [B], indices [B, N] ascending, padded with -1): per-row quartiles and fence."""
    B, N = scores.shape
    x = scores.float()
    q = torch.quantile(x, torch.tensor([0.25, 0.75], device=x.device), dim=1)  # [2, B]
    fence = q[1] + whisker * (q[1] - q[0])
    mask = x > fence.unsqueeze(1)
    counts = mask.sum(dim=1)
    pos = torch.arange(N, device=x.device).expand(B, N)
    idx = torch.where(mask, pos, N).sort(dim=1).values
    return counts, idx.masked_fill(idx == N, -1)


def bytes_moved(case: Case) -> int:
    if case.variant == "per-call":
        return 0  # a host-overhead row: no bandwidth figure
    B, N = case.shape["B"], case.shape["N"]
    return B * N * 4 + B * N * 8


def mem_need(case: Case) -> int:
    B, N = case.shape["B"], case.shape["N"]
    return B * N * 64


def make_inputs(case: Case, device: torch.device) -> dict:
    B, N = case.shape["B"], case.shape["N"]
    g = torch.Generator(device=device).manual_seed(2000 + B * 7 + N)
    scores = (torch.randn(B, N, generator=g, device=device) * 1.5).softmax(dim=-1)
    return {"scores": scores, "pooled": case.variant == "pooled"}


def _pair(out):
    if hasattr(out, "counts") and hasattr(out, "indices"):
        return out.counts, out.indices
    return out[0], out[1]


def check(out, ref, case: Case) -> tuple[bool, str]:
    if case.variant == "per-call":  # ref is torch.topk's: compare with the eager composition
        c = _pair(out)[0]
        rc = iqr_eager_per_image(make_inputs(case, c.device)["scores"])[0]
        ok = torch.equal(c.cpu(), rc.cpu())
        return ok, "ms per 1000 calls = us per call" + ("" if ok else ", counts differ")
    (c, i), (rc, ri) = _pair(out), _pair(ref)
    c, i, rc, ri = (t.detach().to("cpu", torch.int64) for t in (c, i, rc, ri))
    if c.shape != rc.shape or not torch.equal(c, rc):
        diff = (c - rc).abs().max().item() if c.shape == rc.shape else "shape"
        return False, f"counts differ (max |diff| {diff})"
    width = int(rc.max().item()) if rc.numel() else 0
    if width == 0:
        return True, "0 kept"
    if i.shape[0] != ri.shape[0] or i.shape[1] < width or ri.shape[1] < width:
        return False, f"indices shape {tuple(i.shape)} vs {tuple(ri.shape)}"
    valid = torch.arange(width).unsqueeze(0) < rc.unsqueeze(1)
    same = torch.equal(torch.where(valid, i[:, :width], -1), torch.where(valid, ri[:, :width], -1))
    return same, f"kept {rc.float().mean().item():.1f}/row" + ("" if same else ", indices differ")


def providers(device: torch.device, args) -> list[Provider]:
    def eager_fn(case):
        return iqr_eager_pooled if case.variant == "pooled" else iqr_eager_per_image

    def eager(case, inp):
        if case.variant == "per-call":
            scores = inp["scores"]
            return per_call_loop(lambda: torch.topk(scores, 4), device)
        fn, scores = eager_fn(case), inp["scores"]
        return lambda: fn(scores)

    def compile_(case, inp):
        if case.variant == "per-call":
            raise harness.Skip("per-call rows: eager torch.topk only")
        fn, scores = harness.compiled(eager_fn(case)), inp["scores"]
        return lambda: fn(scores)

    def ours(backend):
        def make(case, inp):
            import epic_ext
            scores, pooled = inp["scores"], inp["pooled"]
            if case.variant == "per-call":
                return per_call_loop(lambda: epic_ext.iqr_select(scores, WHISKER, backend=backend),
                                     device)
            return lambda: epic_ext.iqr_select(scores, WHISKER, pooled=pooled, output="indices",
                                               backend=backend)
        return make

    out = [Provider("eager", eager, "baseline")]
    if not args.no_compile:
        out.append(Provider("compile", compile_, "baseline", "compilation failed"))
    out += [Provider(f"ours-{b}", ours(b)) for b in harness.ours_backends(device)]
    return out


def build_cases(args) -> list[Case]:
    specs = harness.parse_shape_specs(args.shapes, KEYS)
    shapes = harness.select_shapes(GRID, [dict(B=b, N=n) for b, n in QUICK], specs, args.quick,
                                  KEYS)
    variants = [v.strip() for v in (args.variants or ",".join(VARIANTS)).split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    cases = [Case(dict(s), "fp32", v) for s in shapes for v in variants if v != "per-call"]
    if "per-call" in variants and (not specs or any(
            all(PER_CALL_SHAPE[key] == v for key, v in c.items()) for c in specs)):
        cases.append(Case(dict(PER_CALL_SHAPE), "fp32", "per-call"))
    return cases


def parser():
    p = harness.base_parser(__doc__, KEYS)
    p.add_argument("--variants", default=None,
                   help="comma list of pooled,per-image,per-call (default all)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.dtypes and "fp32" not in args.dtypes.split(","):
        print(f"{BENCH}: scores are fp32 only; --dtypes {args.dtypes} leaves nothing to run")
        return 0
    harness.apply_threads(args)
    device = common.pick_device(args.device)
    cases = build_cases(args)
    if not cases:
        print(f"{BENCH}: no case matches the filters")
        return 0
    rows = harness.run_bench(BENCH, cases, providers(device, args), make_inputs=make_inputs,
                            check=check, bytes_moved=bytes_moved, mem_need=mem_need,
                            copy_dtype=lambda c: torch.float32, args=args, device=device)
    return 1 if any(r.get("check", "").startswith("MISMATCH") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
