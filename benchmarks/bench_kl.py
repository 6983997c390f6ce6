"""Teacher-student KL (DESIGN.md 2.6): forward + backward timed together, as a training step uses
them, against the eager composition; with the peak memory each provider needs above its inputs.

Two case families (--family, default both; each writes its own results file):

kl         logits [T, V] of student and teacher (student requires grad, teacher does not);
           every provider returns (loss, d loss / d student logits), the gradient from
           torch.autograd.grad (no .grad accumulation, so no extra pass over an old gradient).
  eager             F.kl_div(F.log_softmax(s / tau), F.log_softmax(t / tau), log_target=True,
                    reduction="batchmean") * tau^2, backward w.r.t. s (the division is left out
                    at tau == 1, as a user would write it); math in the logits' dtype
  compile           torch.compile of that function (dynamic=False), one compile per case
  liger             F.log_softmax x2 (eager) + Liger-Kernel's LigerKLDIVLoss(reduction="batchmean",
                    log_target=True) * tau^2; only on CUDA with liger_kernel installed, else skipped
  ours-<b>          epic_ext.kl_div(s, t, temperature=tau, backend=<b>) for every compiled backend
                    of the device (harness.ours_backends) that has a kl_div kernel
  ours-<b>-inplace  the same with inplace=True: the gradient is written over the student logits, so
                    every call gets a fresh clone of them, made by the untimed per-call setup
                    (common.with_setup), outside the timed region and outside the memory peak
kl-linear  hidden states [T, H] of student and teacher and a shared LM head W [V, H]; providers
           return (loss, d loss / d h_student, d loss / d W):
  eager             F.linear(h_s, W), F.linear(h_t, W.detach()), then the eager KL above
  compile           torch.compile of that function
  ours-<b>          epic_ext.fused_linear_kl(h_s, h_t, W, temperature=tau, chunk_size=--chunk-size,
                    backend=<b>) (default chunk: about 64 MiB per [chunk, V] logits tensor in
                    the logits' dtype, a multiple of 256 rows: 256 rows at V=128256 bf16)
           On the CPU this family takes seconds a call: at least 3 timed repetitions instead of 5,
           and --quick leaves compile out unless --providers names it.

Bytes model (DESIGN.md 5), the minimum a fused kernel moves:
  kl         per element of [T, V]: two reads of each input row (max/sum-exp pass, then the
             gradient pass) + one write of the gradient = 5 * s bytes (s = element size), plus the
             per-row loss T * 4. Achieved GB/s = that / median time; "of copy" = achieved over the
             bandwidth of a plain copy of the same byte count measured in the same run.
  kl-linear  h_s, h_t, W read once, d h_s and d W written once: (3*T*H + 2*V*H) * s. This family is
             compute-bound (four GEMMs, 8*T*V*H flop), so its GB/s and "of copy" are not a
             roofline; a TFLOP/s table is printed after it instead.

Peak memory above the inputs ("peak+MB", and "x unit" = that over one [T, V] buffer in the logits'
dtype, the release criterion being at most one such buffer): one extra untimed call per provider,
common.peak_memory. On CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus
memory_allocated before the call. On the CPU torch keeps no allocator counters, so the call runs
under torch.profiler(profile_memory=True) and the allocation/free events it records for every
tensor storage are replayed in time order; the running total's maximum is the peak. Both count what
the call returns (the gradient) and every temporary; neither counts memory a kernel takes outside
the PyTorch allocator (the CPU kernel's per-thread row scratch, 2 * V * 4 bytes per thread).

For kl-linear the peak also holds the weight gradients ([V, H]: eager's, or ours' fp32 accumulator
and its cast), about one [T, V] unit per fp32 copy when H is close to T; the logits are the point:
eager holds all of them, ours one chunk (--chunk-size) at a time (in the logits' dtype; its GEMMs
take no fp32 copy of the chunk: fp32-output GEMMs on CUDA, bounded fp32 slices on the CPU).

Check: before timing, every provider's loss and gradient(s) are compared with a reference computed
in row chunks from the same (rounded) inputs: the KL and its gradient w.r.t. the logits in fp64
from the closed form (DESIGN.md 2.6; eager autograd agrees with it, see the bracket below); for
kl-linear the GEMMs in fp32 (full precision, not TF32) and the logits rounded to the inputs' dtype,
as every provider's LM head rounds them. The loss must be within a relative tolerance, the
gradients element-wise within |err| <= atol * max|ref| + rtol * |ref|, (rtol, atol) =
common.TOLERANCES of the dtype. The message gives the loss error relative to |loss| and the largest
gradient error relative to max|grad|, and in brackets the eager baseline's own errors against the
same reference (in bf16 the eager composition is itself far off: DESIGN.md 2.6). Only a mismatch of
an "ours" provider makes the exit status non-zero; a baseline's is printed as a note.

    python -m benchmarks.bench_kl --quick
    python -m benchmarks.bench_kl --shapes T=8192,V=128256 --dtypes bf16 --family kl
    python -m benchmarks.bench_kl --family linear --shapes 8192x128256x4096 --chunk-size 1024
"""
from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F

from benchmarks import common, harness
from benchmarks.harness import Case, Provider

BENCH = "kl"
BENCH_LINEAR = "kl-linear"
KEYS = ("T", "V")
LINEAR_KEYS = ("T", "V", "H")
GRID = [{"T": t, "V": v} for t in (512, 2048, 8192) for v in (32000, 128256, 151936)]
DEFAULT_DTYPES = ("fp32", "bf16")
# (shape, dtypes) of --quick: the release-criterion shapes on the CPU; a GPU adds the headline.
QUICK = [((1024, 32000), ("fp32", "bf16")), ((256, 151936), ("fp32",))]
QUICK_GPU_EXTRA = [((8192, 128256), ("bf16",))]
# fused-linear family: (shape T, V, H; dtypes) per device type, full grid and --quick. The CPU
# runs fp32 only unless --dtypes asks for bf16: bf16 GEMMs without AMX / AVX512-BF16 run at a few
# GFLOP/s, minutes a call at this shape.
LINEAR_GRID = {"cpu": [((1024, 32000, 1024), ("fp32",))],
               "cuda": [((2048, 128256, 4096), ("bf16",)), ((8192, 128256, 4096), ("bf16",))]}
LINEAR_QUICK = {"cpu": [((1024, 32000, 1024), ("fp32",))],
                "cuda": [((8192, 128256, 4096), ("bf16",))]}
FAMILIES = ("kl", "linear")
REF_CHUNK_ELEMS = 1 << 23  # rows of the fp64 reference per chunk: about 8M elements


# --------------------------------------------------------------------------------------------
# the eager composition and the fp64 reference
# --------------------------------------------------------------------------------------------

def eager_kl(student: torch.Tensor, teacher: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """tau^2 KL(p_teacher || p_student), batchmean, the way distillation code writes it."""
    if tau != 1.0:
        student, teacher = student / tau, teacher / tau
    log_p_s = F.log_softmax(student, dim=-1)
    log_p_t = F.log_softmax(teacher, dim=-1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * (tau * tau)


def eager_linear_kl(h_s: torch.Tensor, h_t: torch.Tensor, weight: torch.Tensor,
                    tau: float = 1.0) -> torch.Tensor:
    """LM head on both sides (the teacher's without gradient), then the eager KL."""
    return eager_kl(F.linear(h_s, weight), F.linear(h_t, weight.detach()), tau)


def _ref_rows(V: int) -> int:
    return max(1, REF_CHUNK_ELEMS // max(V, 1))


def _kl_rows_fp64(s: torch.Tensor, t: torch.Tensor, tau: float, T: int):
    """(loss summed over these rows / T, d loss / d s) in fp64, from the closed form:
    tau^2 / T * sum p_t (log p_t - log p_s) and tau / T * (p_s - p_t), p = softmax(x / tau)."""
    log_p_s = F.log_softmax(s.double() / tau, dim=-1)
    log_p_t = F.log_softmax(t.double() / tau, dim=-1)
    p_t = log_p_t.exp()
    loss = float((p_t * (log_p_t - log_p_s)).sum()) * (tau * tau / T)
    return loss, log_p_s.exp_().sub_(p_t).mul_(tau / T)


def reference_kl(student: torch.Tensor, teacher: torch.Tensor, tau: float):
    """(loss as a float, d loss / d student in fp32), in fp64 by row chunks."""
    T, V = student.shape
    grad = torch.empty(T, V, dtype=torch.float32, device=student.device)
    total = 0.0
    with torch.no_grad():
        for a in range(0, T, _ref_rows(V)):
            b = min(T, a + _ref_rows(V))
            part, g = _kl_rows_fp64(student[a:b], teacher[a:b], tau, T)
            grad[a:b] = g
            total += part
            del g
    return total, grad


def reference_linear_kl(h_s: torch.Tensor, h_t: torch.Tensor, weight: torch.Tensor, tau: float):
    """(loss, d/d h_s, d/d W), both fp32, by row chunks: the LM head in fp32 (full-precision
    matmuls of the upcast inputs; fp64 GEMMs take minutes on a small CPU), its logits rounded to
    the inputs' dtype (the logits every provider works from: a bf16 LM head rounds them), the KL
    and its gradient w.r.t. the logits in fp64, the two gradient GEMMs in fp32."""
    w = weight.detach().float()
    grad_h = torch.empty(h_s.shape, dtype=torch.float32, device=h_s.device)
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    totals: list[float] = []
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32 in the reference
    try:
        _linear_chunks(h_s, h_t, w, tau, grad_h, grad_w, totals)
    finally:
        torch.set_float32_matmul_precision(precision)
    return sum(totals), grad_h, grad_w


def _linear_chunks(h_s, h_t, w, tau, grad_h, grad_w, totals: list) -> None:
    T, V = h_s.shape[0], w.shape[0]
    with torch.no_grad():
        for a in range(0, T, _ref_rows(V)):
            b = min(T, a + _ref_rows(V))
            hs = h_s[a:b].detach().float()
            # logits rounded to the storage dtype, as every provider materialises them
            ls = F.linear(hs, w).to(h_s.dtype)
            lt = F.linear(h_t[a:b].float(), w).to(h_s.dtype)
            part, g = _kl_rows_fp64(ls, lt, tau, T)
            del ls, lt
            g = g.float()
            grad_h[a:b] = g @ w
            grad_w.addmm_(g.t(), hs)
            totals.append(part)
            del hs, g


# --------------------------------------------------------------------------------------------
# cost models, inputs, check
# --------------------------------------------------------------------------------------------

def _elem(case: Case) -> int:
    return common.DTYPES[case.dtype].itemsize


def tv_buffer(case: Case) -> int:
    """Bytes of one [T, V] buffer in the logits' dtype (the unit of the memory criterion)."""
    return case.shape["T"] * case.shape["V"] * _elem(case)


def bytes_moved(case: Case) -> int:
    T, V = case.shape["T"], case.shape["V"]
    s = _elem(case)
    if case.variant == "linear":
        H = case.shape["H"]
        return (3 * T * H + 2 * V * H) * s
    return 5 * T * V * s + 4 * T


def flops(case: Case) -> int:
    T, V, H = (case.shape[k] for k in LINEAR_KEYS)
    return 8 * T * V * H


def mem_need(case: Case) -> int:
    T, V = case.shape["T"], case.shape["V"]
    s = _elem(case)
    ref_chunk = 8 * 8 * _ref_rows(V) * V  # the fp64 reference's temporaries for one chunk
    if case.variant == "linear":
        H = case.shape["H"]
        # eager: two logits + log_softmax x2 + gradients (~7 [T, V]); the weight, its gradients
        # (eager's, ours in fp32 and cast) and the reference's fp32 copy and gradient; hidden
        # states and their gradients
        return T * V * s * 8 + V * H * (3 * s + 12) + T * H * (6 * s + 16) + ref_chunk
    # inputs 2s, eager's reference output s, fp64-reference gradient kept in fp32 (4), the
    # in-place clone s and eager's temporaries (~5s); the copy yardstick (5s) runs beside the first
    # four
    return T * V * (10 * s + 4) + ref_chunk


def make_inputs(case: Case, device: torch.device, state: dict, tau: float) -> dict:
    T, V = case.shape["T"], case.shape["V"]
    dtype = common.DTYPES[case.dtype]
    g = torch.Generator(device=device).manual_seed(3000 + T * 7 + V + (11 if case.variant else 0))
    state.clear()
    if case.variant == "linear":
        H = case.shape["H"]
        # a shared LM head giving logits of standard deviation about 2; the teacher's hidden
        # states close to the student's (same model, milder compression)
        weight = (torch.randn(V, H, generator=g, device=device) * (2.0 / math.sqrt(H))).to(dtype)
        h32 = torch.randn(T, H, generator=g, device=device)
        h_t = (h32 + 0.5 * torch.randn(T, H, generator=g, device=device)).to(dtype)
        h_s = h32.to(dtype)
        del h32
        state["ref"] = reference_linear_kl(h_s, h_t, weight, tau)
        return {"h_s": h_s.requires_grad_(True), "h_t": h_t,
                "weight": weight.requires_grad_(True)}
    # logits of standard deviation 2, teacher = student + N(0, 1): related distributions
    student = torch.randn(T, V, generator=g, device=device).mul_(2.0)
    teacher = torch.randn(T, V, generator=g, device=device).add_(student).to(dtype)
    student = student.to(dtype)
    state["ref"] = reference_kl(student, teacher, tau)
    return {"student": student.requires_grad_(True), "teacher": teacher}


def _errors(out, ref, tol: tuple[float, float]) -> tuple[bool, float, list[float]]:
    """(within tolerance, loss error / |loss|, [max grad error / max|grad| per gradient])."""
    rtol, atol = tol
    loss, grads = out[0], out[1:]
    want_loss, want_grads = ref[0], ref[1:]
    lerr = abs(float(loss) - want_loss) / max(abs(want_loss), 1e-30)
    ok = lerr <= max(rtol, atol)
    gerrs = []
    for got, want in zip(grads, want_grads):
        if got is None or tuple(got.shape) != tuple(want.shape):
            return False, lerr, gerrs + [math.inf]
        scale = max(float(want.abs().max()), 1e-30)
        worst = 0.0
        rows = _ref_rows(want.shape[-1])
        for a in range(0, want.shape[0], rows):  # in row chunks: no [T, V] fp32 temporary
            w = want[a:a + rows]
            d = (got[a:a + rows].float() - w).abs()
            worst = max(worst, float(d.max()))
            ok = ok and bool((d <= atol * scale + rtol * w.abs()).all())
        gerrs.append(worst / scale)
    return ok, lerr, gerrs


def check(out, eager_out, case: Case, state: dict) -> tuple[bool, str]:
    tol = common.TOLERANCES[common.DTYPES[case.dtype]]
    ref = state["ref"]
    ok, lerr, gerrs = _errors(out, ref, tol)
    if "eager_msg" not in state:  # the eager baseline against the same reference, once per case
        _, el, eg = _errors(eager_out, ref, tol)
        state["eager_msg"] = f"loss {el:.0e} grad {'/'.join(f'{e:.0e}' for e in eg)}"
    msg = (f"vs ref: loss {lerr:.1e} grad {'/'.join(f'{e:.1e}' for e in gerrs)} "
           f"(eager {state['eager_msg']})")
    return ok, msg


# --------------------------------------------------------------------------------------------
# providers
# --------------------------------------------------------------------------------------------

def _kl_kernel_or_skip(backend: str) -> None:
    from epic_ext import _backend
    module = _backend._load(backend)[0]
    if module is None or not hasattr(module, "kl_div"):
        raise harness.Skip(f"backend {backend!r} has no kl_div kernel")


def kl_providers(device: torch.device, args) -> list[Provider]:
    tau = args.temperature

    def step(loss_fn, student, *rest):
        def fn():
            loss = loss_fn(student, *rest)
            (g,) = torch.autograd.grad(loss, student)
            return loss.detach(), g
        return fn

    def eager(case, inp):
        return step(lambda s, t: eager_kl(s, t, tau), inp["student"], inp["teacher"])

    def compile_(case, inp):
        fn = harness.compiled(lambda s, t: eager_kl(s, t, tau))
        return step(fn, inp["student"], inp["teacher"])

    def liger(case, inp):
        if device.type != "cuda":
            raise harness.Skip("Liger-Kernel runs CUDA tensors only")
        try:
            from liger_kernel.transformers import LigerKLDIVLoss
        except ImportError as e:
            raise harness.Skip(f"liger_kernel is not importable ({e})") from None
        crit = LigerKLDIVLoss(reduction="batchmean", log_target=True)

        def loss_fn(s, t):
            if tau != 1.0:
                s, t = s / tau, t / tau
            return crit(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)) * (tau * tau)
        return step(loss_fn, inp["student"], inp["teacher"])

    def ours(backend):
        def make(case, inp):
            import epic_ext
            _kl_kernel_or_skip(backend)
            return step(lambda s, t: epic_ext.kl_div(s, t, temperature=tau, backend=backend),
                        inp["student"], inp["teacher"])
        return make

    def ours_inplace(backend):
        def make(case, inp):
            import epic_ext
            _kl_kernel_or_skip(backend)
            student, teacher, held = inp["student"], inp["teacher"], {}

            def setup():  # untimed: the call overwrites its student logits with the gradient
                held.pop("s", None)
                held["s"] = student.detach().clone().requires_grad_(True)

            def fn():
                s = held["s"]
                loss = epic_ext.kl_div(s, teacher, temperature=tau, inplace=True, backend=backend)
                (g,) = torch.autograd.grad(loss, s)
                return loss.detach(), g
            return common.with_setup(fn, setup)
        return make

    out = [Provider("eager", eager, "baseline")]
    if not args.no_compile:
        out.append(Provider("compile", compile_, "baseline", "compilation failed"))
    out.append(Provider("liger", liger, "baseline"))
    for b in harness.ours_backends(device):
        out += [Provider(f"ours-{b}", ours(b)), Provider(f"ours-{b}-inplace", ours_inplace(b))]
    return out


def linear_providers(device: torch.device, args) -> list[Provider]:
    tau, chunk = args.temperature, args.chunk_size

    def step(loss_fn, inp):
        h_s, h_t, w = inp["h_s"], inp["h_t"], inp["weight"]

        def fn():
            loss = loss_fn(h_s, h_t, w)
            gh, gw = torch.autograd.grad(loss, (h_s, w))
            return loss.detach(), gh, gw
        return fn

    def eager(case, inp):
        return step(lambda hs, ht, w: eager_linear_kl(hs, ht, w, tau), inp)

    def compile_(case, inp):
        return step(harness.compiled(lambda hs, ht, w: eager_linear_kl(hs, ht, w, tau)), inp)

    def ours(backend):
        def make(case, inp):
            import epic_ext
            _kl_kernel_or_skip(backend)
            return step(lambda hs, ht, w: epic_ext.fused_linear_kl(
                hs, ht, w, temperature=tau, chunk_size=chunk, backend=backend), inp)
        return make

    out = [Provider("eager", eager, "baseline")]
    named = any(n.strip() == "compile" for n in (args.providers or "").split(","))
    if args.quick and device.type == "cpu" and not named and not args.no_compile:
        # four fp32 GEMMs take seconds a call on a small CPU: keep --quick short
        print("note: kl-linear leaves out the compile provider under --quick on the CPU "
              "(add --providers eager,compile,ours to run it)")
    elif not args.no_compile:
        out.append(Provider("compile", compile_, "baseline", "compilation failed"))
    out += [Provider(f"ours-{b}", ours(b)) for b in harness.ours_backends(device)]
    return out


# --------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------

def _cases(grid, quick, keys, variant, args) -> list[Case]:
    """grid / quick: [(shape tuple, dtypes)]; --dtypes overrides the listed dtypes."""
    specs = harness.parse_shape_specs(args.shapes, keys)
    listed = {}
    for s, d in (quick if args.quick else grid):
        listed[s] = tuple(dict.fromkeys(listed.get(s, ()) + tuple(d)))
    shapes = harness.select_shapes([dict(zip(keys, s)) for s, _ in grid],
                                   [dict(zip(keys, s)) for s, _ in quick], specs, args.quick, keys)
    wanted = harness.parse_dtypes(args.dtypes, DEFAULT_DTYPES)
    cases = []
    for shape in shapes:
        key = tuple(shape[k] for k in keys)
        dts = listed[key] if key in listed and not args.dtypes else wanted
        cases += [Case(dict(shape), dt, variant) for dt in dts if dt in wanted]
    return cases


def build_cases(args, device: torch.device, family: str) -> list[Case]:
    kind = "cuda" if device.type == "cuda" else "cpu"
    if family == "linear":
        return _cases(LINEAR_GRID[kind], LINEAR_QUICK[kind], LINEAR_KEYS, "linear", args)
    grid = [(tuple(s[k] for k in KEYS), DEFAULT_DTYPES) for s in GRID]
    quick = QUICK + (QUICK_GPU_EXTRA if kind == "cuda" else [])
    return _cases(grid, quick, KEYS, "", args)


# --------------------------------------------------------------------------------------------
# extra tables
# --------------------------------------------------------------------------------------------

def memory_table(rows: list[dict], title: str) -> str:
    cases: dict[str, dict[str, dict]] = {}
    provs: list[str] = []
    for r in rows:
        if r["provider"] == "*":
            continue
        cases.setdefault(r["case"], {})[r["provider"]] = r
        if r["provider"] not in provs:
            provs.append(r["provider"])
    width = 20
    lines = [title, f"{'case':<36} " + " ".join(f"{p:<{width}}" for p in provs)]
    for case, by in cases.items():
        cells = []
        for p in provs:
            r = by.get(p)
            if r is None or r.get("skipped") or r.get("peak_extra_bytes") is None:
                cell = "-"
            else:
                cell = f"{r['peak_extra_bytes'] / 2**20:.1f} MB {r['peak_extra_units']:.2f}x"
            cells.append(f"{cell:<{width}}")
        lines.append(f"{case:<36} " + " ".join(cells))
    return "\n".join(lines)


def flops_table(rows: list[dict], cases: list[Case]) -> str:
    by_label = {c.label: c for c in cases}
    lines = ["-- kl-linear compute rate (TFLOP/s from the median: 8*T*V*H flop, four GEMMs)"]
    for r in rows:
        if r.get("skipped") or r["provider"] == "*" or r["case"] not in by_label:
            continue
        tf = flops(by_label[r["case"]]) / (r["median_ms"] * 1e-3) / 1e12
        lines.append(f"{r['case']:<36} {r['provider']:<12} {tf:>8.3f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------

def parser():
    p = harness.base_parser(__doc__, LINEAR_KEYS)
    p.add_argument("--family", default="all",
                   help="kl (logits), linear (fused LM head + KL) or all (default)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="tau (default 1, as in EPIC's official code)")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="rows per chunk of fused_linear_kl (default: the library's, ~64 MiB "
                        "per logits tensor in its dtype, a multiple of 256 rows)")
    return p


def _run_family(family: str, args, device: torch.device) -> tuple[int, list[dict]]:
    bench = BENCH if family == "kl" else BENCH_LINEAR
    cases = build_cases(args, device, family)
    if not cases:
        print(f"{bench}: no case matches the filters")
        return 0, []
    state: dict = {}
    provs = (kl_providers if family == "kl" else linear_providers)(device, args)
    rows = harness.run_bench(
        bench, cases, provs,
        make_inputs=lambda case, dev: make_inputs(case, dev, state, args.temperature),
        check=lambda out, ref, case: check(out, ref, case, state),
        bytes_moved=bytes_moved, mem_need=mem_need,
        copy_dtype=lambda c: common.DTYPES[c.dtype], args=args, device=device,
        memory_unit=tv_buffer, min_reps=3 if family == "linear" and device.type == "cpu" else 5)
    state.clear()
    print()
    print(memory_table(rows, f"-- {bench} peak memory above the inputs (MB, and x one [T, V] "
                             "buffer in the logits' dtype)"))
    if family == "linear":
        print()
        print(flops_table(rows, cases))
    print()
    bad = [r for r in rows if r.get("check", "").startswith("MISMATCH")]
    for r in bad:
        if r.get("kind") != "ours":
            print(f"note: baseline {r['provider']} on {r['case']} is outside the tolerance of the "
                  f"fp64 reference: {r['check']}")
    return (1 if any(r.get("kind") == "ours" for r in bad) else 0), rows


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    fam = args.family.strip().lower()
    families = {"all": FAMILIES, "both": FAMILIES, "kl": ("kl",), "logits": ("kl",),
                "linear": ("linear",), "kl-linear": ("linear",)}.get(fam)
    if families is None:
        raise SystemExit(f"unknown --family {args.family!r}; choose kl, linear or all")
    if args.chunk_size is not None and args.chunk_size < 1:
        raise SystemExit("--chunk-size must be a positive integer")
    harness.apply_threads(args)
    device = common.pick_device(args.device)
    status = 0
    for family in families:
        rc, _ = _run_family(family, args, device)
        status = status or rc
    return status


if __name__ == "__main__":
    sys.exit(main())
