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
  goals     the issue's GPU goals, each measured value against its target (gpu_workloads.GOALS);
            first after the build, so the numbers exist even when a later step runs out of time
  test-gpu  `make test-gpu`'s pytest: the kernel tests with the CUDA and compiled Triton kernels
            plus tests/gpu (GPU-sized shapes); parallel workers when pytest-xdist is there
  bench-*   benchmarks/bench_{compress,kl,attn_scores,iqr}.py at GPU sizes (PRESETS), writing
            benchmarks/results/<bench>_<gpu>.json; `report` merges them into the summary plot
  memcheck  compute-sanitizer --tool memcheck over a short subset of every CUDA / Triton kernel
            (benchmarks/gpu_workloads.py), when compute-sanitizer is installed and works

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
        Step("goals", py + ["-m", "benchmarks.gpu_workloads", "--goals",
                            str(LOG_DIR / "goals.json")], 120,
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
                    + py + ["-m", "benchmarks.gpu_workloads", "--memcheck-subset"], 150,
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
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
