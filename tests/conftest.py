"""Shared test setup: Triton's CPU interpreter, the backends to run, poisoned outputs."""
import os

# Must be set before any @triton.jit function is created: Triton kernels then run on CPU tensors.
# EPIC_EXT_TEST_GPU=1 (`make test-gpu`) keeps them compiled: the CUDA and compiled Triton kernels
# on CUDA tensors are tested, and the interpreter-only files are not collected.
GPU_MODE = os.environ.get("EPIC_EXT_TEST_GPU") == "1"
if GPU_MODE:
    os.environ.pop("TRITON_INTERPRET", None)
    collect_ignore_glob = ["test_triton_*.py"]  # they set TRITON_INTERPRET=1 on import
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")

import contextlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import epic_ext  # noqa: E402
from epic_ext import _backend  # noqa: E402

# (dtype, atol, rtol) for floating outputs compared with the reference in the same dtype: the
# kernels and the reference both accumulate in fp32 and round once, so they differ by at most
# one rounding of the result plus fp32 summation-order noise.
TOLERANCES = {
    torch.float32: (1e-4, 1e-5),  # atol: unnormalised weighted sums of ~3k terms
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (8e-3, 8e-3),
    torch.float64: (1e-12, 1e-12),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def runnable_backends():
    """(backend, device) pairs this machine can run: the compiled CPU kernels, Triton under the
    interpreter, the reference, and on a GPU the CUDA and Triton kernels on CUDA tensors."""
    pairs = []
    info = epic_ext.backends()
    if info["cpu"]["available"]:
        pairs.append(("cpu", "cpu"))
    if info["reference"]["available"]:
        pairs.append(("reference", "cpu"))
    if torch.cuda.is_available():
        for name in ("cuda", "triton"):
            if info[name]["available"]:
                pairs.append((name, "cuda"))
        if GPU_MODE:  # `make test` covers the CPU backends; keep the GPU run to the GPU kernels
            pairs = [p for p in pairs if p[1] == "cuda"]
    elif info["triton"]["available"] and os.environ.get("TRITON_INTERPRET") == "1":
        pairs.append(("triton", "cpu"))
    return pairs


BACKENDS = runnable_backends()
BACKEND_IDS = [f"{b}-{d}" for b, d in BACKENDS]


def is_interpreted(backend, device):
    return backend == "triton" and device == "cpu"


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors (tiny models, interpreted Triton): torch's intra-op threads only add wake-up
    latency on a busy 2-core machine (~1 ms a tiny matmul instead of ~10 us). Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=BACKENDS, ids=BACKEND_IDS)
def backend(request):
    """Yields (name, device) with the backend forced for the duration of the test."""
    name, device = request.param
    with _backend.use_backend(name):
        yield name, device


@contextlib.contextmanager
def kernels_resolved():
    """Records (op, backend name) of every kernel looked up inside the block."""
    seen = []
    real = _backend.kernel

    def spy(op, device):
        fn, name = real(op, device)
        seen.append((op, name))
        return fn, name
    _backend.kernel = spy
    try:
        yield seen
    finally:
        _backend.kernel = real


@contextlib.contextmanager
def poisoned_outputs():
    """Every fresh tensor a kernel allocates starts as NaN / INT64_MIN / True, so a kernel that
    leaves an element unwritten fails the comparison."""
    def poison(t):
        if t.numel():
            if t.is_floating_point():
                t.fill_(float("nan"))
            elif t.dtype == torch.bool:
                t.fill_(True)
            else:
                t.fill_(torch.iinfo(t.dtype).min)
        return t

    real_empty, real_like, real_new = torch.empty, torch.empty_like, torch.Tensor.new_empty
    torch.empty = lambda *a, **k: poison(real_empty(*a, **k))
    torch.empty_like = lambda *a, **k: poison(real_like(*a, **k))
    torch.Tensor.new_empty = lambda self, *a, **k: poison(real_new(self, *a, **k))
    try:
        from epic_ext import _C
    except ImportError:
        _C = None
    if _C is not None:
        _C.set_poison(True)
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.Tensor.new_empty = real_empty, real_like, real_new
        if _C is not None:
            _C.set_poison(False)


@pytest.fixture
def poison():
    with poisoned_outputs():
        yield


def assert_close(actual, expected, dtype=None, msg=""):
    dtype = dtype or expected.dtype
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol, rtol=rtol,
                               equal_nan=True, msg=msg or None)


def pytest_addoption(parser):
    """Length of the differential fuzz test (tests/test_fuzz.py); env: EPIC_EXT_FUZZ_ITERS,
    EPIC_EXT_FUZZ_SECONDS, EPIC_EXT_FUZZ_SEED."""
    group = parser.getgroup("epic-ext fuzz")
    group.addoption("--fuzz-iters", type=int, default=None, help="fuzz cases per op and backend")
    group.addoption("--fuzz-seconds", type=float, default=None,
                    help="draw fuzz cases for this many seconds per op and backend")
    group.addoption("--fuzz-seed", type=int, default=None, help="base seed of the fuzz cases")
