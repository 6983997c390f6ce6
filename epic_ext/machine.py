"""Machine identity and the results folder, shared by `epic-ext` and the benchmarks.

Kept in the package (the `benchmarks/` folder is not installed) and light: torch is imported
only inside `machine_info`, so `epic-ext --help` does not pay for it.
"""
from __future__ import annotations

import os
import platform
import re
import sys
from pathlib import Path

# Datasheet memory bandwidth (bytes/s) of the GPUs the project targets (DESIGN.md section 5).
DATASHEET_BW = (("H200", 4.8e12), ("H100 80GB HBM3", 3.35e12), ("H100 SXM", 3.35e12))

# Results go under the current directory (from a source checkout's root: the committed folder).
DEFAULT_RESULTS = Path("benchmarks") / "results"
RESULTS_ENV = "EPIC_EXT_BENCH_DIR"


def results_dir(out: str | os.PathLike | None = None) -> Path:
    """Where benchmark and demo results are written: `out` when given, else $EPIC_EXT_BENCH_DIR,
    else ./benchmarks/results under the current directory; returned absolute."""
    chosen = out or os.environ.get(RESULTS_ENV) or DEFAULT_RESULTS
    return Path(chosen).expanduser().resolve()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            import subprocess
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, timeout=5).stdout.strip() or platform.processor()
        except Exception:  # noqa: BLE001
            pass
    return platform.processor() or platform.machine() or "cpu"


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def datasheet_bandwidth(gpu_name: str) -> float | None:
    for pattern, bw in DATASHEET_BW:
        if pattern.lower() in gpu_name.lower():
            return bw
    return None


def pick_device(name=None):
    """'auto'/None: the current CUDA device when one is visible, else the CPU."""
    import torch
    if name in (None, "", "auto"):
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def machine_info(device=None) -> dict:
    """Identity of the machine a result belongs to; no host name, nothing personal."""
    import torch
    device = pick_device(device if isinstance(device, str) or device is None else str(device))
    cpu, cores = cpu_model(), cpu_cores()
    info = {
        "device_type": device.type,
        "cpu": cpu,
        "cpu_cores": cores,
        "torch_threads": torch.get_num_threads(),
        "os": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        # thread settings change CPU timings a lot (OpenMP wake-ups on small VMs): record them
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                                           "KMP_BLOCKTIME", "MKL_NUM_THREADS",
                                           "CUDA_VISIBLE_DEVICES", "EPIC_EXT_BACKEND")
                if k in os.environ},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = torch.cuda.get_device_name(device)
        info.update({
            "gpu": name,
            "gpu_memory_bytes": int(props.total_memory),
            "gpu_sm_count": int(props.multi_processor_count),
            "gpu_capability": f"{props.major}.{props.minor}",
            "gpu_l2_bytes": int(getattr(props, "L2_cache_size", 0) or 0),
            "cuda_runtime": torch.version.cuda or torch.version.hip,
            "gpu_count": torch.cuda.device_count(),
            "datasheet_bw": datasheet_bandwidth(name),
        })
        info["name"] = name
        info["slug"] = slug(name)
    else:
        info["name"] = f"{cpu} ({cores} cores)"
        info["slug"] = f"cpu-{slug(cpu)}-{cores}c"
    return info
