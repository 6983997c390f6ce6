"""One command for a GPU session (`make gpu-check`): build with the CUDA kernels, test, measure the
GPU goals, benchmark at GPU sizes, run compute-sanitizer, and print a short summary LAST.

    python -m benchmarks.gpu_check                # everything, ~9 minutes on an H100 / H200
    python -m benchmarks.gpu_check --list         # the steps, their commands and time limits
    python -m benchmarks.gpu_check --skip build,memcheck --budget 300

Steps run in order, each as a subprocess with its own time limit and the whole run inside
--budget seconds (default 540); a step that fails or times out is reported and the rest still run
(a failed build stops the steps that need it). On a machine without a CUDA device it says so,
lists what it would run, and exits 0. Exit status otherwise: 1 when a step failed or timed out.

  build     EPIC_EXT_CUDA=1 python setup.py build_ext --inplace: fails loudly when the CUDA kernels
            cannot be built (the python running this script; all cores)
  liger     Liger-Kernel, the KL baseline, from a wheel folder when it is not importable:
            build/wheels/liger_kernel-*.whl (fetch it where there is a network with
            `pip download liger-kernel --no-deps -d build/wheels`) installed into build/pysite
  goals     the issue's GPU goals, each measured value against its target (see GOALS below);
            first after the build, so the numbers exist even when a later step runs out of time
  test-gpu  `make test-gpu`'s pytest: the kernel tests with the CUDA and compiled Triton kernels
            plus tests/gpu (GPU-sized shapes); parallel workers when pytest-xdist is there
  bench-*   benchmarks/bench_{compress,kl,attn_scores,iqr}.py at GPU sizes (PRESETS), writing
            benchmarks/results/<bench>_<gpu>.json; `report` merges them into the summary plot
  memcheck  compute-sanitizer --tool memcheck over a short subset of every CUDA / Triton kernel
            (this file's --memcheck-subset), when compute-sanitizer is installed and works

Logs: build/gpu_check/<step>.log; with $OUT set (the device tool's output folder) also
$OUT/gpu_check.log (every step's output), $OUT/gpu_check_summary.json and $OUT/gpu_results.tar.gz
(the result files, the plot, the per-step logs).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOG_DIR = ROOT / "build" / "gpu_check"
WHEELS = ROOT / "build" / "wheels"
PYSITE = ROOT / "build" / "pysite"
DEFAULT_BUDGET_S = 540

# The kernel test files that run on CUDA tensors (tests/test_triton_*.py are interpreter-only;
# the model / training tests run on the CPU in `make test`). The Makefile's test-gpu reads these.
GPU_TEST_PATHS = ["tests/gpu", "tests/test_ops.py", "tests/test_kl.py",
                  "tests/test_attn_scores.py", "tests/test_backend.py", "tests/test_fuzz.py"]

# GPU-size presets of the benchmarks: capped repetitions, no torch.compile provider (a compile
# costs 10-30 s a case; run a bench by hand with the same options minus --no-compile for it).
BENCH_COMMON = ["--budget", "0.2", "--max-reps", "50", "--no-compile"]
PRESETS = {
    # 1x8x4x4 fp32: the per-call rows (host overhead: on CUDA the rate calls are issued at)
    "compress": ["--shapes", "64x576x4096x128;16x576x4096x128;64x2880x4096x192;1x8x4x4",
                 "--dtypes", "bf16,fp32"],
    "kl": ["--family", "all", "--quick", "--dtypes", "bf16", "--shapes", "T=8192,V=128256"],
    "attn_scores": ["--quick"],
    "iqr": ["--quick"],
}

# (goal, target) as the issue states them; measured by `--goals` (measure_goals).
GOALS = [
    ("compress bf16 B=64 N=576 D=4096 k=128: share of copy bandwidth", ">= 0.80"),
    ("kl_div bf16 T=8192 V=128256 fwd+bwd: time / (10 B per element at copy bandwidth)", "<= 1.25"),
    ("kl_div bf16 T=8192 V=128256 fwd+bwd: time / Liger LigerKLDIVLoss", "< 1.00"),
    ("fused_linear_kl bf16 BT=8192 H=4096 V=128256: time / Liger FusedLinearJSD(beta=0)", "< 1.00"),
    ("fused_linear_kl ...: peak memory / Liger FusedLinearJSD(beta=0)", "<= 1.00"),
    ("attn_scores FastV query (LLaVA-1.5-7B, B=16) bf16: share of copy bandwidth", ">= 0.70"),
]


# --------------------------------------------------------------------------------------------
# steps
# --------------------------------------------------------------------------------------------

class Step:
    def __init__(self, name, argv, limit_s, env=None, needs_build=True, why="", estimate_s=None):
        self.name, self.argv, self.limit_s = name, argv, limit_s
        self.estimate_s = estimate_s  # expected seconds on an H100 / H200 (a planning figure)
        self.env, self.needs_build, self.why = env or {}, needs_build, why
        self.status, self.seconds, self.note = "not run", 0.0, ""

    def command(self) -> str:
        env = " ".join(f"{k}={v}" for k, v in self.env.items())
        return (env + " " if env else "") + shlex.join(self.argv)


def steps(python: str) -> list[Step]:
    py = [python]
    cores = str(os.cpu_count() or 2)
    out = [
        Step("build", py + ["setup.py", "build_ext", "--inplace"], 450,
             {"EPIC_EXT_CUDA": "1", "MAX_JOBS": cores}, needs_build=False,
             why="the extension with its CUDA kernels (fails loudly without them); bound by the "
                 "slowest .cu file (up to ~9 min each on this project's 2-core CPU VM)",
             estimate_s=240),
        Step("liger", py + ["-m", "pip", "install", "-q", "--no-index", "--no-deps",
                            "--no-compile", "--target", str(PYSITE.relative_to(ROOT))]
             + [str(p.relative_to(ROOT)) for p in sorted(WHEELS.glob("liger_kernel-*.whl"))],
             60, needs_build=False, why="Liger-Kernel (the KL baseline) from build/wheels",
             estimate_s=5),
        Step("goals", py + ["-m", "benchmarks.gpu_check", "--goals",
                            "--goals-json", str(LOG_DIR / "goals.json")], 120,
             why="the GPU goals, measured", estimate_s=45),
        Step("test-gpu", py + ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                               "-rfE", "--durations=8"] + GPU_TEST_PATHS, 200,
             {"EPIC_EXT_TEST_GPU": "1"}, why="kernel tests, compiled Triton + CUDA, GPU sizes",
             estimate_s=90),
    ]
    for bench, args in PRESETS.items():
        out.append(Step(f"bench-{bench}", py + ["-m", f"benchmarks.bench_{bench}"] + BENCH_COMMON
                        + args, 120 if bench == "kl" else 60, why="benchmark at GPU sizes",
                        estimate_s={"kl": 35, "compress": 25, "attn_scores": 20}.get(bench, 10)))
    out.append(Step("report", py + ["-m", "benchmarks.report", "--device", "cuda"], 60,
                    why="merged table and summary plot", estimate_s=10))
    out.append(Step("memcheck", ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1",
                                 "--print-limit", "20"]
                    + py + ["-m", "benchmarks.gpu_check", "--memcheck-subset"], 150,
                    {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"},
                    why="compute-sanitizer memcheck, short subset (each tensor its own allocation)",
                    estimate_s=60))
    return out


def _xdist_args() -> list[str]:
    """Parallel test workers when pytest-xdist is there: Triton compiles and the CPU-side
    references dominate the run; the big tests share one worker (xdist_group "big")."""
    try:
        import xdist  # noqa: F401
    except ImportError:
        return []
    return ["-n", "6", "--dist", "loadgroup"]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_step(step: Step, time_left: float, env_extra: dict) -> None:
    limit = min(step.limit_s, time_left)
    if time_left < min(10, step.limit_s):
        step.status, step.note = "skipped", "out of time (--budget)"
        return
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = LOG_DIR / f"{step.name}.log"
    env = dict(os.environ, **env_extra, **step.env, PYTHONUNBUFFERED="1")
    print(f"[gpu-check] {step.name}: {step.command()}  (limit {limit:.0f} s)", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(f"$ {step.command()}\n")
        f.flush()
        try:
            proc = subprocess.Popen(step.argv, cwd=ROOT, env=env, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            step.status, step.note = "failed", f"could not start: {e}"
            return
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the step and every process it started
            proc.wait()
            rc = None
    step.seconds = time.perf_counter() - t0
    if rc is None:
        step.status, step.note = "TIMEOUT", f"killed after {limit:.0f} s"
    elif rc == 0:
        step.status = "ok"
    else:
        step.status, step.note = "FAILED", f"exit {rc}"
    print(f"[gpu-check] {step.name}: {step.status} in {step.seconds:.0f} s"
          + (f" ({step.note})" if step.note else ""), flush=True)
    if step.status != "ok":
        print(_tail(log), flush=True)


def _summarise_step(step: Step) -> None:
    """A one-line note from the step's log (pytest's counts, the sanitizer's error count)."""
    text = ""
    try:
        text = (LOG_DIR / f"{step.name}.log").read_text(errors="replace")
    except OSError:
        return
    if step.name == "test-gpu":
        for line in reversed(text.splitlines()):
            if " passed" in line or " failed" in line or " error" in line:
                step.note = (step.note + "; " if step.note else "") + line.strip("= ")[:90]
                break
    elif step.name == "memcheck":
        for line in reversed(text.splitlines()):
            if "ERROR SUMMARY" in line:
                step.note = (step.note + "; " if step.note else "") + line.strip("= ")[:90]
                break


def memcheck_status() -> tuple[bool, str]:
    """(usable, why not): compute-sanitizer installed, and able to see the device."""
    exe = shutil.which("compute-sanitizer")
    if exe is None:
        for cand in ("/usr/local/cuda/bin/compute-sanitizer",
                     "/usr/local/cuda/compute-sanitizer/compute-sanitizer"):
            if os.path.exists(cand):
                exe = cand
                break
    if exe is None:
        return False, "compute-sanitizer is not installed"
    return True, exe


# --------------------------------------------------------------------------------------------
# the goals
# --------------------------------------------------------------------------------------------

def measure_goals(budget_s: float = 0.3) -> list[dict]:
    """Each goal of GOALS, measured on the current CUDA device: value, target, pass/fail."""
    import torch
    import torch.nn.functional as F

    import epic_ext
    from benchmarks import common

    dev = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator(device=dev).manual_seed(2024)
    results: list[dict] = []
    backends = [b for b in ("cuda", "triton") if epic_ext.backends()[b]["available"]]

    def timed(fn):
        return common.measure(fn, dev, budget_s=budget_s, min_reps=3, max_reps=50).median_ms

    def add(index, backend, value, passed, note=""):
        goal, target = GOALS[index]
        results.append({"goal": goal, "backend": backend, "value": value, "target": target,
                        "pass": passed, "note": note})
        print(f"goal {index}: {backend}: {value} {target} -> "
              f"{'pass' if passed else 'FAIL' if passed is False else 'n/a'} {note}", flush=True)

    def liger_or_none(name):
        try:
            import liger_kernel.transformers as lt
            return getattr(lt, name)
        except Exception as e:  # noqa: BLE001  (not installed, or it fails to import here)
            return f"liger_kernel not importable ({type(e).__name__}: {e})"[:120]

    def guarded(index, fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001  (one goal failing must not hide the others)
            add(index, "-", None, False, f"error: {type(e).__name__}: {str(e)[:100]}")
        common.release(dev)

    # compress: bytes = tokens read + output written + scores read + indices written
    def compress_goal():
        B, N, D, k = 64, 576, 4096, 128
        tokens = torch.randn(B, N, D, generator=gen, device=dev).to(torch.bfloat16)
        scores = (torch.randn(B, N, generator=gen, device=dev) * 1.5).softmax(-1)
        nbytes = B * N * D * 2 + B * (k + 1) * D * 2 + B * N * 4 + B * k * 8
        copy_bps = common.copy_bandwidth(nbytes, dev, torch.bfloat16, budget_s=budget_s)
        for b in backends:
            ms = timed(lambda: epic_ext.compress(tokens, scores, k, backend=b))
            frac = nbytes / (ms * 1e-3) / copy_bps
            add(0, b, round(frac, 3), frac >= 0.80,
                f"{ms:.3f} ms, copy {copy_bps / 1e9:.0f} GB/s")

    # kl_div: 10 bytes per element (two reads of each bf16 input, one gradient write)
    def kl_goal():
        T, V = 8192, 128256
        s = torch.randn(T, V, generator=gen, device=dev).mul_(2.0)
        t = torch.randn(T, V, generator=gen, device=dev).add_(s).to(torch.bfloat16)
        s = s.to(torch.bfloat16).requires_grad_(True)
        copy_bps = common.copy_bandwidth(10 * T * V, dev, torch.bfloat16, budget_s=budget_s)
        floor_ms = 10 * T * V / copy_bps * 1e3

        def step(loss_fn):
            def fn():
                loss = loss_fn()
                return torch.autograd.grad(loss, s)[0]
            return fn
        ours = {}
        for b in backends:
            ours[b] = timed(step(lambda: epic_ext.kl_div(s, t, backend=b)))
            add(1, b, round(ours[b] / floor_ms, 3), ours[b] <= 1.25 * floor_ms,
                f"{ours[b]:.3f} ms, floor {floor_ms:.3f} ms at {copy_bps / 1e9:.0f} GB/s")
        liger = liger_or_none("LigerKLDIVLoss")
        if isinstance(liger, str):
            add(2, "-", None, None, liger)
            return
        crit = liger(reduction="batchmean", log_target=True)
        try:
            liger_ms = timed(step(lambda: crit(F.log_softmax(s, -1), F.log_softmax(t, -1))))
        except Exception as e:  # noqa: BLE001  (the baseline failing is not our failure)
            add(2, "-", None, None, f"Liger failed: {type(e).__name__}: {str(e)[:90]}")
            return
        for b, ms in ours.items():
            add(2, b, round(ms / liger_ms, 3), ms < liger_ms,
                f"{ms:.3f} ms vs Liger (log_softmax x2 + LigerKLDIVLoss) {liger_ms:.3f} ms")

    # fused_linear_kl against Liger's FusedLinearJSD at beta = 0 (forward KL)
    def linear_goal():
        T, H, V = 8192, 4096, 128256
        w = (torch.randn(V, H, generator=gen, device=dev) * (2.0 / H ** 0.5)).to(torch.bfloat16)
        h32 = torch.randn(T, H, generator=gen, device=dev)
        h_t = (h32 + 0.5 * torch.randn(T, H, generator=gen, device=dev)).to(torch.bfloat16)
        h_s = h32.to(torch.bfloat16).requires_grad_(True)
        del h32
        w.requires_grad_(True)

        def step(loss_fn):
            def fn():
                loss = loss_fn()
                gh, gw = torch.autograd.grad(loss, (h_s, w))
                return loss.detach(), gh, gw
            return fn
        ours = {}
        for b in backends:
            fn = step(lambda: epic_ext.fused_linear_kl(h_s, h_t, w, backend=b))
            ours[b] = (timed(fn), common.peak_memory(fn, dev), float(fn()[0]))
            common.release(dev)
        jsd = liger_or_none("LigerFusedLinearJSD")
        if isinstance(jsd, str):
            for b, (ms, mem, _) in ours.items():
                add(3, b, None, None, f"{ms:.2f} ms; {jsd}")
                add(4, b, None, None, f"{mem / 2**20:.0f} MiB; {jsd}")
            return
        crit = jsd(jsd_beta=0.0, temperature=1.0)
        fn = step(lambda: crit(h_s, w, h_t, w.detach(), None))  # no labels: every row
        try:
            liger_ms, liger_mem = timed(fn), common.peak_memory(fn, dev)
            liger_loss = float(fn()[0])
        except Exception as e:  # noqa: BLE001  (the baseline failing is not our failure)
            for index in (3, 4):
                add(index, "-", None, None, f"Liger failed: {type(e).__name__}: {str(e)[:90]}")
            return
        for b, (ms, mem, loss) in ours.items():
            agree = f"loss {loss:.5g} vs Liger {liger_loss:.5g}"
            add(3, b, round(ms / liger_ms, 3), ms < liger_ms,
                f"{ms:.2f} ms vs {liger_ms:.2f} ms; {agree}")
            add(4, b, round(mem / max(liger_mem, 1), 3), mem <= liger_mem,
                f"{mem / 2**20:.0f} MiB vs {liger_mem / 2**20:.0f} MiB")

    # attn_scores: K read once + query rows + output
    def attn_goal():
        B, H, L, d, N, start = 16, 32, 650, 128, 576, 35
        q = torch.randn(B, H, 1, d, generator=gen, device=dev).to(torch.bfloat16)
        k = torch.randn(B, H, L, d, generator=gen, device=dev).to(torch.bfloat16)
        nbytes = B * H * L * d * 2 + B * H * d * 2 + B * N * 4
        copy_bps = common.copy_bandwidth(nbytes, dev, torch.bfloat16, budget_s=budget_s)
        for b in backends:
            ms = timed(lambda: epic_ext.attn_scores(q, k, start, N, backend=b))
            frac = nbytes / (ms * 1e-3) / copy_bps
            add(5, b, round(frac, 3), frac >= 0.70, f"{ms * 1e3:.1f} us, copy "
                f"{copy_bps / 1e9:.0f} GB/s")

    for index, fn in ((0, compress_goal), (1, kl_goal), (3, linear_goal), (5, attn_goal)):
        guarded(index, fn)
    return results


# --------------------------------------------------------------------------------------------
# the memcheck subset
# --------------------------------------------------------------------------------------------

def memcheck_subset() -> int:
    """Every GPU kernel once on small odd shapes (and bad indices where a kernel must stay
    memory-safe), for compute-sanitizer; the results are not checked here (tests do that)."""
    import torch

    import epic_ext

    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(5)
    backends = [b for b in ("cuda", "triton") if epic_ext.backends()[b]["available"]]
    for b in backends:
        for dtype in (torch.float32, torch.bfloat16):
            tokens = torch.randn(3, 577, 70, generator=g, device=dev).to(dtype)
            scores = torch.randn(3, 577, generator=g, device=dev)
            epic_ext.select_topk(scores, 100, backend=b)
            epic_ext.iqr_select(scores, pooled=True, backend=b)
            epic_ext.iqr_select(scores, max_k=50, backend=b)
            t = tokens.clone().requires_grad_(True)
            out = epic_ext.compress(t, scores, 64, "weighted", weights=scores.softmax(-1),
                                    backend=b)
            out.tokens.float().sum().backward()
            epic_ext.compress(tokens, scores, "iqr", backend=b)
            idx = torch.randint(0, 577, (3, 40), generator=g, device=dev)
            bad = idx.clone()
            bad[0, 3], bad[1, 0] = 577, -5  # out of range: must stay memory-safe
            epic_ext.gather_merge(tokens, idx, backend=b)
            try:  # D1: check=False reaches the kernel with the bad entries (NaN rows)
                epic_ext.gather_merge(tokens, bad, check=False, backend=b)
            except (TypeError, ValueError):
                pass  # a version without the check keyword, or one that raises
            s = torch.randn(37, 3001, generator=g, device=dev).to(dtype).requires_grad_(True)
            tt = torch.randn(37, 3001, generator=g, device=dev).to(dtype)
            epic_ext.kl_div(s, tt, backend=b).backward()
            q = torch.randn(2, 8, 1, 64, generator=g, device=dev).to(dtype)
            k = torch.randn(2, 2, 131, 64, generator=g, device=dev).to(dtype)
            epic_ext.attn_scores(q, k, 5, 100, backend=b)
            try:  # a span past L: NaN, memory-safe
                epic_ext.attn_scores(q, k, torch.tensor([5, 400], device=dev), 100, check=False,
                                     backend=b)
            except ValueError:
                pass
        torch.cuda.synchronize()
        print(f"memcheck subset: {b} done", flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------

def _gpu_name() -> str | None:
    """The CUDA device's name, None without one (no torch import when there is plainly none)."""
    import glob
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return None
    if not glob.glob("/dev/nvidia*") and not shutil.which("nvidia-smi"):
        return None
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def list_steps(plan: list[Step], skip: set[str]) -> str:
    lines = [f"{'step':<18} {'limit':>6} {'est.':>5}  command"]
    for s in plan:
        mark = " (skipped: --skip)" if s.name in skip else ""
        est = f"{s.estimate_s}s" if s.estimate_s else "-"
        lines.append(f"{s.name:<18} {s.limit_s:>5}s {est:>5}  {s.command()}{mark}")
        lines.append(f"{'':<33} {s.why}")
    total = sum(s.estimate_s or 0 for s in plan if s.name not in skip)
    lines.append(f"estimated total {total} s on an H100 / H200 (the build is the uncertain part)")
    return "\n".join(lines)


def summary_table(plan: list[Step], goals: list[dict], gpu: str, total_s: float) -> str:
    lines = [f"== gpu-check on {gpu}: {total_s:.0f} s", f"{'step':<18} {'status':<8} {'s':>5}  note"]
    for s in plan:
        lines.append(f"{s.name:<18} {s.status:<8} {s.seconds:>5.0f}  {s.note[:100]}")
    if goals:
        lines.append(f"{'goal':<72} {'backend':<7} {'value':>7} {'target':>8}  result")
        for g in goals:
            value = "-" if g["value"] is None else f"{g['value']:.3f}"
            res = {True: "PASS", False: "FAIL", None: "n/a"}[g["pass"]]
            lines.append(f"{g['goal'][:72]:<72} {g['backend']:<7} {value:>7} {g['target']:>8}  "
                         f"{res}")
            if g.get("note"):
                lines.append(f"    {g['note'][:110]}")
    return "\n".join(lines)


def _collect_out(plan, summary: dict, out_dir: Path, slug: str | None) -> None:
    """$OUT: the concatenated log, the summary JSON and one archive of results and logs (the
    device tool brings back at most 8 files)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "gpu_check.log", "w") as f:
        for s in plan:
            log = LOG_DIR / f"{s.name}.log"
            if log.exists():
                f.write(f"\n===== {s.name} ({s.status}, {s.seconds:.0f} s) =====\n")
                f.write(log.read_text(errors="replace"))
    (out_dir / "gpu_check_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    results = ROOT / "benchmarks" / "results"
    with tarfile.open(out_dir / "gpu_results.tar.gz", "w:gz") as tar:
        if slug:
            for p in sorted(results.glob(f"*_{slug}.*")):
                tar.add(p, arcname=f"benchmarks/results/{p.name}")
        for p in sorted(LOG_DIR.glob("*")):
            tar.add(p, arcname=f"gpu_check/{p.name}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="list the steps and exit")
    p.add_argument("--dry-run", action="store_true", help="say what would run, run nothing")
    p.add_argument("--skip", default="", help="comma list of steps to leave out")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                   help=f"seconds for the whole run (default {DEFAULT_BUDGET_S})")
    p.add_argument("--goals", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--goals-json", default=None, help=argparse.SUPPRESS)
    p.add_argument("--memcheck-subset", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.memcheck_subset:
        return memcheck_subset()
    if args.goals:
        goals = measure_goals()
        if args.goals_json:
            Path(args.goals_json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.goals_json).write_text(json.dumps(goals, indent=1) + "\n")
        return 0
    plan = steps(sys.executable)
    known = {s.name for s in plan}
    skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    if skip - known:
        raise SystemExit(f"--skip: unknown step(s) {', '.join(sorted(skip - known))}; "
                         f"steps: {', '.join(s.name for s in plan)}")
    gpu = None if args.list else _gpu_name()
    if args.list or args.dry_run or gpu is None:
        if not args.list:
            print("gpu-check: " + ("dry run" if gpu else "no CUDA device is visible: nothing to "
                                   "check here (dry run)") + "; it would run:")
        print(list_steps(plan, skip))
        print(f"total budget {args.budget:.0f} s; logs under {LOG_DIR.relative_to(ROOT)}/")
        return 0

    t_start = time.perf_counter()
    env_extra = {}
    if PYSITE.exists() or WHEELS.exists():
        env_extra["PYTHONPATH"] = os.pathsep.join(
            [str(PYSITE)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    shutil.rmtree(LOG_DIR, ignore_errors=True)
    built = True
    for step in plan:
        if step.name in skip:
            step.status = "skipped"
            step.note = "--skip"
            continue
        if step.needs_build and not built:
            step.status, step.note = "skipped", "the build failed"
            continue
        if step.name == "liger":
            if _importable("liger_kernel", env_extra):
                step.status, step.note = "ok", "already importable"
                continue
            if not list(WHEELS.glob("liger_kernel-*.whl")):
                step.status = "skipped"
                step.note = ("no build/wheels/liger_kernel-*.whl: `pip download liger-kernel "
                             "--no-deps -d build/wheels` where there is a network")
                continue
        if step.name == "memcheck":
            usable, why = memcheck_status()
            if not usable:
                step.status, step.note = "skipped", why
                continue
            step.argv[0] = why
        if step.name == "test-gpu":
            step.argv[3:3] = _xdist_args()
        run_step(step, args.budget - (time.perf_counter() - t_start), env_extra)
        _summarise_step(step)
        if step.name == "build" and step.status != "ok":
            built = False
        if step.name == "memcheck" and step.status != "ok":
            text = _tail(LOG_DIR / "memcheck.log", 200)
            if "Device not supported" in text or "not supported" in text.lower():
                step.status, step.note = "n/a", "compute-sanitizer does not support this device/VM"
    goals = []
    try:
        goals = json.loads((LOG_DIR / "goals.json").read_text())
    except (OSError, ValueError):
        pass
    total = time.perf_counter() - t_start
    slug = None
    try:
        from benchmarks.common import machine_info
        slug = machine_info("cuda")["slug"]
    except (Exception, SystemExit):  # noqa: BLE001  (no usable device left: no slug)
        pass
    if slug and goals:
        results = ROOT / "benchmarks" / "results"
        results.mkdir(parents=True, exist_ok=True)
        (results / f"gpu-goals_{slug}.json").write_text(json.dumps(
            {"gpu": gpu, "goals": goals,
             "steps": [{"name": s.name, "status": s.status, "seconds": round(s.seconds, 1),
                        "note": s.note} for s in plan]}, indent=1) + "\n")
    summary = {"gpu": gpu, "seconds": round(total, 1), "goals": goals,
               "steps": [{"name": s.name, "status": s.status, "seconds": round(s.seconds, 1),
                          "note": s.note, "command": s.command()} for s in plan]}
    if os.environ.get("OUT"):
        try:
            _collect_out(plan, summary, Path(os.environ["OUT"]), slug)
        except OSError as e:
            print(f"[gpu-check] could not write $OUT: {e}")
    print()
    print(summary_table(plan, goals, gpu, total), flush=True)
    bad = [s for s in plan if s.status in ("FAILED", "TIMEOUT")]
    return 1 if bad else 0


def _importable(module: str, env_extra: dict) -> bool:
    code = f"import {module}"
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          cwd=ROOT).returncode == 0


if __name__ == "__main__":
    sys.exit(main())
