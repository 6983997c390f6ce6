"""compress (top-k + gather + mean token) against TRIM's eager composition.

Providers (each returns the k kept rows in spatial order plus the mean of the dropped rows, as a
freshly allocated [B, k+1, D] tensor, exactly as a user calls it):
  eager       epic_ext.reference.trim_eager: topk, boolean mask, masked gather, masked mean
  compile     torch.compile(trim_eager, dynamic=False), compiled once per case
  ours-<b>    epic_ext.compress(tokens, scores, k, merge="mean", backend=<b>) for every compiled
              backend that runs the device's tensors (cpu on a CPU; cuda and triton on a GPU)

Per-call rows ("x1000" cases, B=1 N=8 D=4 k=4): the host cost of one call of a tiny op, where
the kernel is nothing and the Python-side checks and dispatch are everything. Each timed
repetition is 1000 back-to-back calls, so "median ms" reads as microseconds per call; the
baseline is torch.topk(scores, k), ours is select_topk or compress (with backend=<b>).

Minimum bytes (DESIGN.md 5): B*N*D*s read + B*(k+1)*D*s written + scores B*N*4 + indices B*k*8.

    python -m benchmarks.bench_compress --quick
    python -m benchmarks.bench_compress --shapes 16x576x4096x128 --dtypes bf16
"""
from __future__ import annotations

import sys

import torch

from benchmarks import common, harness
from benchmarks.harness import Case, Provider

BENCH = "compress"
KEYS = ("B", "N", "D", "k")
GRID = [dict(B=b, N=n, D=d, k=k) for b in (1, 16, 64) for n in (576, 2880) for d in (1024, 4096)
        for k in (64, 128, 192)]
# (shape, dtypes) of --quick; the first is the headline shape.
QUICK = [((16, 576, 4096, 128), ("fp32", "bf16")),
         ((1, 576, 1024, 64), ("fp32",)),
         ((64, 576, 1024, 192), ("bf16",)),
         ((1, 2880, 4096, 128), ("fp32",))]
DEFAULT_DTYPES = ("fp32", "bf16")
# Per-call rows: a tiny shape, and the ops timed on it.
PER_CALL_SHAPE = dict(B=1, N=8, D=4, k=4)
PER_CALL_OPS = ("select_topk", "compress")
PER_CALL_REPEAT = 1000


def per_call_loop(fn, device: torch.device):
    """PER_CALL_REPEAT calls of fn, back to back (one timed repetition). On CUDA it first waits
    for the queue to drain, so the events time the host's issue rate, not queued work."""
    def loop():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        for _ in range(PER_CALL_REPEAT - 1):
            fn()
        return fn()
    return loop


def is_per_call(case: Case) -> bool:
    return case.variant.endswith(f"x{PER_CALL_REPEAT}")


def bytes_moved(case: Case) -> int:
    if is_per_call(case):
        return 0  # a host-overhead row: no bandwidth figure
    B, N, D, k = (case.shape[x] for x in KEYS)
    s = common.DTYPES[case.dtype].itemsize
    return B * N * D * s + B * (k + 1) * D * s + B * N * 4 + B * k * 8


def mem_need(case: Case) -> int:
    B, N, D, k = (case.shape[x] for x in KEYS)
    s = common.DTYPES[case.dtype].itemsize
    # tokens + the eager (tokens * mask) temporary + the copy yardstick's two buffers + outputs
    return 3 * B * N * D * s + 3 * B * (k + 1) * D * s + B * N * 64


def make_inputs(case: Case, device: torch.device) -> dict:
    B, N, D, k = (case.shape[x] for x in KEYS)
    g = torch.Generator(device=device).manual_seed(1000 + B * 7 + N * 3 + D + k)
    tokens = torch.randn(B, N, D, generator=g, device=device, dtype=common.DTYPES[case.dtype])
    # attention-like scores: a softmax over the row (no ties in practice)
    scores = (torch.randn(B, N, generator=g, device=device) * 1.5).softmax(dim=-1)
    return {"tokens": tokens, "scores": scores, "k": k}


def _tensor_of(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "tokens"):
        return out.tokens
    return out[0]


def check(out, ref, case: Case) -> tuple[bool, str]:
    if is_per_call(case):
        got = out if isinstance(out, torch.Tensor) else out.indices
        ok = torch.equal(got.cpu(), ref.indices.sort(dim=1).values.cpu())
        return ok, "ms per 1000 calls = us per call" + ("" if ok else ", indices differ")
    got, ref = _tensor_of(out), _tensor_of(ref)
    if tuple(got.shape) != tuple(ref.shape):
        return False, f"shape {tuple(got.shape)} != {tuple(ref.shape)}"
    if got.dtype != ref.dtype:
        return False, f"dtype {got.dtype} != {ref.dtype}"
    rtol, atol = common.TOLERANCES[ref.dtype]
    ok = torch.allclose(got.float(), ref.float(), rtol=rtol, atol=atol)
    err = (got.float() - ref.float()).abs().max().item() if got.numel() else 0.0
    return ok, f"max|err| {err:.1e}"


def providers(device: torch.device, args) -> list[Provider]:
    from epic_ext.reference import trim_eager

    def eager(case, inp):
        tokens, scores, k = inp["tokens"], inp["scores"], inp["k"]
        if is_per_call(case):
            return per_call_loop(lambda: torch.topk(scores, k), device)
        return lambda: trim_eager(tokens, scores, k)

    def compile_(case, inp):
        if is_per_call(case):
            raise harness.Skip("per-call rows: eager torch.topk only")
        fn = harness.compiled(trim_eager)
        tokens, scores, k = inp["tokens"], inp["scores"], inp["k"]
        return lambda: fn(tokens, scores, k)

    def ours(backend):
        def make(case, inp):
            import epic_ext
            tokens, scores, k = inp["tokens"], inp["scores"], inp["k"]
            if case.variant == f"select_topk x{PER_CALL_REPEAT}":
                return per_call_loop(lambda: epic_ext.select_topk(scores, k, backend=backend),
                                     device)
            if is_per_call(case):
                return per_call_loop(lambda: epic_ext.compress(tokens, scores, k, backend=backend),
                                     device)
            return lambda: epic_ext.compress(tokens, scores, k, merge="mean", backend=backend)
        return make

    out = [Provider("eager", eager, "baseline")]
    if not args.no_compile:
        out.append(Provider("compile", compile_, "baseline", "compilation failed"))
    out += [Provider(f"ours-{b}", ours(b)) for b in harness.ours_backends(device)]
    return out


def build_cases(args) -> list[Case]:
    specs = harness.parse_shape_specs(args.shapes, KEYS)
    quick = {s: d for s, d in QUICK}
    quick_shapes = [dict(zip(KEYS, s)) for s, _ in QUICK]
    shapes = harness.select_shapes(GRID, quick_shapes, specs, args.quick, KEYS)
    wanted = harness.parse_dtypes(args.dtypes, DEFAULT_DTYPES)
    cases = []
    for shape in shapes:
        key = tuple(shape[x] for x in KEYS)
        dts = quick[key] if args.quick and key in quick and not args.dtypes else wanted
        for dt in dts:
            if dt in wanted:
                if shape["k"] > shape["N"]:
                    continue
                cases.append(Case(dict(shape), dt))
    if "fp32" in wanted and (not specs or any(all(PER_CALL_SHAPE[key] == v for key, v in c.items())
                                              for c in specs)):
        cases += [Case(dict(PER_CALL_SHAPE), "fp32", f"{op} x{PER_CALL_REPEAT}") for op in PER_CALL_OPS]
    return cases


def parser():
    p = harness.base_parser(__doc__, KEYS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    harness.apply_threads(args)
    device = common.pick_device(args.device)
    cases = build_cases(args)
    if not cases:
        print(f"{BENCH}: no case matches the filters")
        return 0
    rows = harness.run_bench(BENCH, cases, providers(device, args), make_inputs=make_inputs,
                            check=check, bytes_moved=bytes_moved, mem_need=mem_need,
                            copy_dtype=lambda c: common.DTYPES[c.dtype], args=args, device=device)
    return 1 if any(r.get("check", "").startswith("MISMATCH") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
