"""Whether epic_ext._C can be built with its CUDA kernels here, and why not.

One decision shared by setup.py (which loads this file by path, before the package can be
imported, so nothing here imports torch or epic_ext) and `epic-ext info` / `make build` (which
say loudly when a GPU is visible but the CUDA kernels were not built: CUDA tensors then run on
the Triton kernels, silently slower or failing where Triton lacks a path).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

MODES = ("auto", "0", "1")


def find_cuda_home() -> str | None:
    """$CUDA_HOME (or $CUDA_PATH), else /usr/local/cuda, else the folder above nvcc on PATH."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


def nvcc_version(cuda_home: str | None) -> tuple[int, int] | None:
    """(major, minor) of cuda_home/bin/nvcc, None when there is none or it does not run."""
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    if not nvcc or not os.path.exists(nvcc):
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def problems(torch_cuda: str | None, nvcc: tuple[int, int] | None,
             cuda_home: str | None) -> list[str]:
    """Why the CUDA kernels cannot be built (empty: they can). torch_cuda: torch.version.cuda."""
    found = []
    if torch_cuda is None:
        found.append("torch is not a CUDA build")
    if nvcc is None:
        found.append(f"no nvcc under CUDA_HOME={cuda_home}")
    elif torch_cuda is not None:
        want = int(torch_cuda.split(".")[0])
        if nvcc[0] != want:
            found.append(f"nvcc {nvcc[0]}.{nvcc[1]} (CUDA_HOME={cuda_home}) does not match "
                         f"torch's CUDA {torch_cuda}: the major versions must agree")
    return found


def decide(mode: str, torch_cuda: str | None, nvcc: tuple[int, int] | None,
           cuda_home: str | None) -> tuple[bool, str]:
    """(build the CUDA kernels?, reason) for EPIC_EXT_CUDA=mode. Raises ValueError for a bad mode
    and for mode "1" when they cannot be built (the build must then fail, saying why)."""
    mode = (mode or "auto").strip().lower()
    if mode not in MODES:
        raise ValueError(f"EPIC_EXT_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False, "EPIC_EXT_CUDA=0"
    found = problems(torch_cuda, nvcc, cuda_home)
    if found:
        if mode == "1":
            raise ValueError("EPIC_EXT_CUDA=1 but the CUDA kernels cannot be built: "
                             + "; ".join(found))
        return False, "; ".join(found)
    return True, f"nvcc {nvcc[0]}.{nvcc[1]}, torch CUDA {torch_cuda}"


def fix_hint(torch_cuda: str | None) -> str:
    if torch_cuda is None:
        return ("install a CUDA build of torch, then rebuild: EPIC_EXT_CUDA=1 pip install -e . "
                "--no-build-isolation")
    major = torch_cuda.split(".")[0]
    return (f"point CUDA_HOME at a CUDA {major}.x toolkit (its nvcc must be {major}.x, like "
            f"torch's CUDA {torch_cuda}) and rebuild with EPIC_EXT_CUDA=1 pip install -e . "
            "--no-build-isolation (EPIC_EXT_CUDA=1 fails with the reason instead of building "
            "CPU-only)")


def warning_block(reason: str, torch_cuda: str | None, gpu: str = "a GPU") -> str:
    """The loud message for a GPU machine whose epic_ext._C has no CUDA kernels."""
    bar = "!" * 78
    return "\n".join([
        bar,
        f"WARNING: {gpu} is visible but epic_ext._C has NO CUDA kernels.",
        "CUDA tensors will run on the Triton kernels (or the reference) instead.",
        f"why: {reason}",
        f"fix: {fix_hint(torch_cuda)}",
        bar,
    ])


def gpu_without_cuda_kernels() -> str | None:
    """The warning block when a GPU is visible and epic_ext._C lacks CUDA kernels, else None.
    Imports torch and epic_ext (for `epic-ext info` and the check after `make build`)."""
    import torch
    if not torch.cuda.is_available():
        return None
    try:
        from epic_ext import _C
    except ImportError as e:
        reason = f"epic_ext._C did not import ({e})"
    else:
        if _C.has_cuda:
            return None
        mode = os.environ.get("EPIC_EXT_CUDA", "auto").strip().lower()
        home = find_cuda_home()
        found = problems(torch.version.cuda, nvcc_version(home), home)
        reason = ("; ".join(found) if found else
                  "it was built without them (EPIC_EXT_CUDA=0, or another toolkit at build time)"
                  + (f"; EPIC_EXT_CUDA={mode} now" if mode != "auto" else ""))
    return warning_block(reason, torch.version.cuda, torch.cuda.get_device_name())


def main() -> int:
    """`python -m epic_ext.cuda_build`: print the warning block when it applies (exit 0)."""
    block = gpu_without_cuda_kernels()
    if block:
        print(block, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
