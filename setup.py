"""Build epic_ext._C: the C++ CPU kernels, and the CUDA kernels when they can be built.

EPIC_EXT_CUDA=auto (default) builds csrc/cuda when torch is a CUDA build and nvcc's version
matches torch.version.cuda; 1 forces it (and fails with the reason when impossible); 0 skips it.
TORCH_CUDA_ARCH_LIST picks the GPU architectures (default here: "9.0+PTX" when no GPU is visible).
"""
import glob
import os
import re
import subprocess
import sys

from setuptools import find_packages, setup

# torch.utils.cpp_extension reads CUDA_HOME at import time and guesses wrong on machines whose
# nvcc is not on PATH, so pin it first.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("MAX_JOBS", "2")

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def nvcc_version(cuda_home):
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    if not nvcc or not os.path.exists(nvcc):
        return None
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def want_cuda():
    """Return (build_cuda, reason)."""
    mode = os.environ.get("EPIC_EXT_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"EPIC_EXT_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False, "EPIC_EXT_CUDA=0"
    problems = []
    if torch.version.cuda is None:
        problems.append("torch is not a CUDA build")
    have = nvcc_version(cpp_extension.CUDA_HOME)
    if have is None:
        problems.append(f"no nvcc under CUDA_HOME={cpp_extension.CUDA_HOME}")
    elif torch.version.cuda is not None:
        want = tuple(int(x) for x in torch.version.cuda.split(".")[:2])
        if have[0] != want[0]:
            problems.append(f"nvcc {have[0]}.{have[1]} does not match torch's CUDA {torch.version.cuda}")
    if problems:
        if mode == "1":
            sys.exit("EPIC_EXT_CUDA=1 but CUDA cannot be built: " + "; ".join(problems))
        return False, "; ".join(problems)
    return True, f"nvcc {have[0]}.{have[1]}, torch CUDA {torch.version.cuda}"


def nvidia_include_dirs():
    """Headers of the nvidia-* pip wheels (cuBLAS, cuRAND, ...) that torch's headers include."""
    dirs = []
    for base in sys.path:
        dirs += glob.glob(os.path.join(base, "nvidia", "*", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


build_cuda, reason = want_cuda()
print(f"epic_ext: CUDA kernels {'ON' if build_cuda else 'OFF'} ({reason})", flush=True)

sources = sorted(glob.glob("csrc/cpu/*.cpp")) + ["python/bindings.cpp"]
cxx_flags = ["-O3", "-g0", "-std=c++20", "-fopenmp", "-ffp-contract=off"]
define_macros = []
extension = cpp_extension.CppExtension
include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
extra = {"cxx": cxx_flags}
if build_cuda:
    if not torch.cuda.is_available() and "TORCH_CUDA_ARCH_LIST" not in os.environ:
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0+PTX"  # H100 / H200; PTX for newer GPUs
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    define_macros.append(("EPIC_WITH_CUDA", None))
    extension = cpp_extension.CUDAExtension
    include_dirs += nvidia_include_dirs()
    extra["nvcc"] = ["-O3", "-std=c++20", "--fmad=true", "-lineinfo",
                     "--expt-relaxed-constexpr", "-DEPIC_WITH_CUDA"]

setup(
    name="epic-ext",
    version="0.1.0",
    packages=find_packages(include=["epic_ext", "epic_ext.*"]),  # benchmarks/: source checkouts only
    ext_modules=[
        extension(
            name="epic_ext._C",
            sources=sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["epic-ext = epic_ext.cli:main"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4,<=2.14.1", "numpy"],
    extras_require={"test": ["pytest", "triton"], "bench": ["matplotlib"]},
)
