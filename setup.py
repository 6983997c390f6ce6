"""Build epic_ext._C: the C++ CPU kernels, and the CUDA kernels when they can be built.

EPIC_EXT_CUDA=auto (default) builds csrc/cuda when torch is a CUDA build and nvcc's version
matches torch.version.cuda; 1 forces it (and fails with the reason when impossible); 0 skips it.
The decision is epic_ext/cuda_build.py's. With a GPU visible, an auto build that skips the CUDA
kernels ends with a warning block saying why and how to fix it.
TORCH_CUDA_ARCH_LIST picks the GPU architectures (default here: "9.0+PTX" when no GPU is visible).
"""
import glob
import os
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


def _load_cuda_build():
    """epic_ext/cuda_build.py by path: the package itself cannot be imported before it is built."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "epic_ext_cuda_build", os.path.join(ROOT, "epic_ext", "cuda_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cuda_build = _load_cuda_build()


def want_cuda():
    """Return (build_cuda, reason); exit with the reason when EPIC_EXT_CUDA=1 cannot be honoured."""
    home = cpp_extension.CUDA_HOME
    try:
        return cuda_build.decide(os.environ.get("EPIC_EXT_CUDA", "auto"), torch.version.cuda,
                                 cuda_build.nvcc_version(home), home)
    except ValueError as e:
        sys.exit(str(e))


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
    # nvcc's own headers first: the pip wheels' CUDA headers may be of another CUDA release
    include_dirs += [os.path.join(cpp_extension.CUDA_HOME, "include")] + nvidia_include_dirs()
    extra["nvcc"] = ["-O3", "-std=c++20", "--fmad=true", "-lineinfo",
                     "--expt-relaxed-constexpr", "-DEPIC_WITH_CUDA"]

def requirement_lines(name: str) -> list:
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), name)) as f:
        return [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]


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
    # lmms-eval finds the `epic_ext` model through this group (its model manifest).
    entry_points={"console_scripts": ["epic-ext = epic_ext.cli:main"],
                  "lmms_eval.models": ["epic_ext = epic_ext.eval:lmms_manifest"]},
    package_data={"epic_ext.eval": ["tasks/epic_vqa/*.yaml", "tasks/epic_vqa/*.py"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4,<=2.14.1", "numpy"],
    # eval: lmms-eval and what it needs pinned, from requirements-eval.txt (make test-eval's list).
    extras_require={"test": ["pytest", "triton"], "bench": ["matplotlib"], "eval": requirement_lines("requirements-eval.txt")},
)

# Loud, last in the build output: with a GPU visible, a CPU-only build sends CUDA tensors to the
# Triton kernels (`make build` and `epic-ext info` repeat this after the install).
if not build_cuda and os.environ.get("EPIC_EXT_CUDA", "auto").lower() != "0" \
        and torch.cuda.is_available():
    print("\n" + cuda_build.warning_block(reason, torch.version.cuda, torch.cuda.get_device_name())
          + "\n", file=sys.stderr, flush=True)
