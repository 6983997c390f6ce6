"""Which implementation runs an op: the compiled C++ CPU kernels, the CUDA kernels, the Triton
kernels, or the pure-PyTorch reference.

Every backend module exposes the same functions with the same signatures (see
csrc/include/epic/ops.h): select_topk, iqr_select, gather_merge, gather_merge_backward,
compress_topk, kl_div, attn_scores (the reference names these two kl_div_fwd and attn_scores_fwd:
its kl_div / attn_scores are the user-level specs). Importing epic_ext never fails because one
is missing; `backends()` says why.

Selection order for a tensor's device, unless forced:
  cpu tensors  -> "cpu" (epic_ext._C.cpu) else "reference"
  cuda tensors -> "cuda" (epic_ext._C.cuda) else "triton" else "reference"
Force one with the environment variable EPIC_EXT_BACKEND=<name>, with `use_backend(name)` (a
context manager, also usable as a plain call), or with the `backend=` argument of the public ops.
"""
from __future__ import annotations

import importlib
import os
import threading
from types import ModuleType

import torch

NAMES = ("cpu", "cuda", "triton", "reference")

# Reference functions of the kernel contracts whose names differ from the op's.
_REFERENCE_ENTRY = {"kl_div": "kl_div_fwd", "attn_scores": "attn_scores_fwd"}



class _ThreadState(threading.local):
    # Set in every thread's own dict (threading.local runs __init__ once per thread): reading it
    # then never raises and catches an AttributeError inside (getattr with a default on a missing
    # attribute costs about a microsecond), and torch.compile guards on a plain attribute.
    def __init__(self) -> None:
        self.forced: str | None = None


_state = _ThreadState()
_cache: dict[str, tuple[ModuleType | None, str]] = {}
# (device, forced name or None) -> (backend name, module): what `resolve` chose, so that a call
# pays a dict lookup instead of the search (a small kernel costs about a microsecond). Keyed by
# the device itself: torch.device.type builds a new string each time (~0.2 us).
_resolved: dict[tuple[torch.device, str | None], tuple[str, ModuleType]] = {}

# os.environ.get costs about a microsecond when the variable is unset (a KeyError raised and
# caught inside). CPython's os.environ keeps its values in a plain dict, `_data`, updated on every
# assignment: reading it keeps EPIC_EXT_BACKEND live at a tenth of the cost.
_ENV_KEY = "EPIC_EXT_BACKEND"
_ENV_KEY_ENCODED = getattr(os.environ, "encodekey", lambda key: key)(_ENV_KEY)


def _env_backend() -> str | None:
    env = os.environ
    data = getattr(env, "_data", None)
    if data is None:  # os.environ replaced by a plain mapping
        return env.get(_ENV_KEY) or None
    value = data.get(_ENV_KEY_ENCODED)
    return None if value is None else env.decodevalue(value) or None


def _load(name: str) -> tuple[ModuleType | None, str]:
    """(module or None, reason) for one backend; cached."""
    if name in _cache:
        return _cache[name]
    module, reason = None, ""
    if name == "reference":
        module, reason = importlib.import_module("epic_ext.reference"), "pure PyTorch"
    elif name in ("cpu", "cuda"):
        try:
            from epic_ext import _C
        except ImportError as e:  # not built, or built against another torch
            reason = f"epic_ext._C did not import ({e}); run `pip install -e . --no-build-isolation`"
        else:
            if name == "cpu":
                module = _C.cpu
                reason = "C++ kernels" + (" (OpenMP)" if _C.has_openmp else " (no OpenMP)")
            elif _C.has_cuda:
                module, reason = _C.cuda, "CUDA kernels"
                if not torch.cuda.is_available():
                    reason += " (compiled; no GPU visible)"
            else:
                reason = "epic_ext._C was built without CUDA (EPIC_EXT_CUDA=0, or no matching nvcc)"
    elif name == "triton":
        try:
            module = importlib.import_module("epic_ext.triton")
        except ImportError as e:
            reason = f"triton kernels unavailable ({e})"
        else:
            interp = os.environ.get("TRITON_INTERPRET") == "1"
            reason = "Triton kernels" + (" (interpreter: CPU tensors)" if interp else "")
    else:
        raise ValueError(f"backend must be one of {NAMES}, got {name!r}")
    _cache[name] = (module, reason)
    return module, reason


def _runs_on(name: str, device: torch.device) -> bool:
    if name == "reference":
        return True
    if name == "cpu":
        return device.type == "cpu"
    if name == "cuda":
        return device.type == "cuda"
    # Triton runs CUDA tensors, and CPU tensors only under its interpreter.
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def backends() -> dict[str, dict]:
    """Availability of every backend: {name: {"available": bool, "reason": str}}."""
    out = {}
    for name in NAMES:
        module, reason = _load(name)
        out[name] = {"available": module is not None, "reason": reason}
    return out


def _forced_name() -> str | None:
    return forced()


def forced() -> str | None:
    name = _state.forced or _env_backend()
    if name is not None and name not in NAMES:
        raise ValueError(f"EPIC_EXT_BACKEND / backend must be one of {NAMES}, got {name!r}")
    return name


class _forcing:
    """The forcing of one `with` block (a class, not @contextmanager: a generator-based context
    manager costs about a microsecond per op call with `backend=`)."""
    __slots__ = ("name", "previous")

    def __init__(self, name: str | None):
        self.name = name

    def __enter__(self) -> None:
        self.previous = _state.forced
        _state.forced = self.name

    def __exit__(self, *exc) -> None:
        _state.forced = self.previous


def thread_forced() -> str | None:
    """The backend forced on this thread by `use_backend` / `backend=` (not the environment)."""
    return _state.forced


def use_backend(name: str | None):
    """Force a backend for the ops run inside `with use_backend(name):` (None: automatic)."""
    if name is not None and name not in NAMES:
        raise ValueError(f"backend must be one of {NAMES} or None, got {name!r}")
    return _forcing(name)


def resolve(device: torch.device) -> str:
    """Name of the backend that runs an op whose tensors live on `device`."""
    name = forced()
    if name is not None:
        module, reason = _load(name)
        if module is None:
            raise RuntimeError(f"backend {name!r} is not available: {reason}")
        if not _runs_on(name, device):
            raise RuntimeError(f"backend {name!r} cannot run {device.type} tensors")
        return name
    order = ("cpu",) if device.type == "cpu" else ("cuda", "triton") if device.type == "cuda" else ()
    for candidate in order:
        if _load(candidate)[0] is not None and _runs_on(candidate, device):
            return candidate
    return "reference"


def kernel(op: str, device: torch.device):
    """The function implementing `op` for tensors on `device`, and the backend's name."""
    key = (device, _state.forced or _env_backend())
    hit = _resolved.get(key)
    if hit is None:
        name = resolve(device)  # raises for a bad or impossible choice (never cached)
        # Triton runs CPU tensors only under its interpreter, decided when it is imported.
        hit = _resolved[key] = (name, _load(name)[0])
    name, module = hit
    ref_op = _REFERENCE_ENTRY.get(op, op)  # the reference's user-level spec has another contract
    fn = getattr(module, ref_op if name == "reference" else op, None)
    if fn is None:  # a backend that lacks this op (e.g. a kernel not yet written for it)
        if _forced_name() == name:
            raise RuntimeError(f"backend {name!r} has no {op} kernel")
        return getattr(_load("reference")[0], ref_op), "reference"
    return fn, name
