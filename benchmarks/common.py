"""Measurement for the benchmarks: timing, the copy-bandwidth yardstick and the JSON result files
(the harness that drives cases and prints tables is harness.py; machine identity and the results
folder live in the package, epic_ext/machine.py, shared with `epic-ext demo`).

Timing: on CUDA every repetition is bracketed by a pair of `torch.cuda.Event`s (the L2 cache is
flushed before each one by zeroing a buffer twice its size, outside the events); on the CPU by
`time.perf_counter`, after the call returned. A measurement warms up first, then repeats the call
until a time budget is spent (within [min_reps, max_reps]) and reports the median and the minimum.

A callable may carry a `setup` attribute (a zero-argument function, see `with_setup`): it is run
before every call, untimed (e.g. a fresh clone of an input that the call overwrites).

Peak memory (`peak_memory`): bytes allocated during one call beyond what existed before it; on CUDA
from the caching allocator's peak counter, on the CPU from the allocation events of the PyTorch
profiler (profile_memory=True), replayed in time order.

Achieved bandwidth = (minimum bytes the op must move, per DESIGN.md section 5) / median time. It is
reported next to the bandwidth of a plain `dst.copy_(src)` whose read + written bytes equal the
same number, timed the same way in the same run (its fastest repetition: the ceiling), as
"fraction of copy" = achieved / copy.
"""
from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from epic_ext.machine import (DATASHEET_BW, cpu_cores, cpu_model, datasheet_bandwidth,  # noqa: F401
                              machine_info, pick_device, results_dir, slug)

# $EPIC_EXT_BENCH_DIR, else ./benchmarks/results under the current directory (epic_ext.machine).
RESULTS_DIR = results_dir()
SCHEMA = 1
MEMORY_FRACTION = 0.4  # skip a case whose estimated footprint exceeds this share of free memory

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# (rtol, atol) when comparing an output with the eager baseline. The low-precision atol is about one
# ulp near 1: the eager mean token is summed and divided in the storage dtype, the kernels in fp32.
TOLERANCES = {torch.float32: (1.3e-6, 1e-5), torch.bfloat16: (1.6e-2, 1e-2),
              torch.float16: (1e-3, 1e-3), torch.float64: (1e-7, 1e-7)}


# --------------------------------------------------------------------------------------------
# devices, synchronisation, memory
# --------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> int:
    """Bytes a new allocation could still get on `device`."""
    gc.collect()
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # Memory the caching allocator holds but does not use is ours to reuse.
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 34


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------

@dataclass
class Timing:
    median_ms: float
    min_ms: float
    mean_ms: float
    reps: int

    def as_dict(self) -> dict:
        return {"median_ms": self.median_ms, "min_ms": self.min_ms, "mean_ms": self.mean_ms,
                "reps": self.reps}


def with_setup(fn: Callable[[], Any], setup: Callable[[], Any]) -> Callable[[], Any]:
    """Attach an untimed per-call `setup` to `fn` (honoured by `call`, `measure`, `peak_memory`)."""
    fn.setup = setup
    return fn


def call(fn: Callable[[], Any]) -> Any:
    """fn(), after its `setup` (if any)."""
    setup = getattr(fn, "setup", None)
    if setup is not None:
        setup()
    return fn()


_flush_buffers: dict[str, torch.Tensor] = {}


def _flush_buffer(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _flush_buffers:
        size = 64 << 20
        if device.type == "cuda":
            size = 256 << 20
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0
            if l2:
                size = max(2 * l2, 32 << 20)
        _flush_buffers[key] = torch.empty(size, dtype=torch.uint8, device=device)
    return _flush_buffers[key]


def measure(fn: Callable[[], Any], device: torch.device, *, budget_s: float = 0.5,
            min_reps: int = 5, max_reps: int = 200, flush: bool | None = None) -> Timing:
    """Median and minimum of `fn()` over repeated runs.

    One untimed call, one timed call to estimate the cost, about 10% of the budget of warmup, then
    as many repetitions as fit the budget, clamped to [min_reps, max_reps]. `flush` (default: on
    CUDA only) zeroes a buffer larger than the last-level cache before each repetition, untimed.
    """
    if flush is None:
        flush = device.type == "cuda"
    setup = getattr(fn, "setup", None)
    call(fn)
    sync(device)
    if setup is not None:
        setup()
        sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    est = max(time.perf_counter() - t0, 1e-6)
    for _ in range(min(25, int(0.1 * budget_s / est))):
        call(fn)
    sync(device)
    reps = max(min_reps, min(max_reps, int(budget_s / est)))
    buf = _flush_buffer(device) if flush else None
    times: list[float] = []
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            if setup is not None:
                setup()
            if buf is not None:
                buf.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for _ in range(reps):
            if setup is not None:
                setup()
            if buf is not None:
                buf.zero_()
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(times), min(times), statistics.fmean(times), reps)


# The CPU profiler (Kineto) prints a start/stop trace line, and on a CUDA build without a GPU an
# error about the device count, straight to file descriptor 2 each time it runs; only these lines
# are held back, everything else written meanwhile is passed on.
_PROFILER_NOISE = re.compile(r"^(USDT|ERROR|WARNING|INFO):\S* .*(profiler_start|profiler_stop|"
                             r"gpuGetDeviceCount)")


class _QuietProfilerNoise:
    def __enter__(self):
        sys.stderr.flush()
        self._tmp = tempfile.TemporaryFile(mode="w+b")
        self._saved = os.dup(2)
        os.dup2(self._tmp.fileno(), 2)
        return self

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._tmp.seek(0)
        text = self._tmp.read().decode(errors="replace")
        self._tmp.close()
        kept = [ln for ln in text.splitlines(keepends=True) if not _PROFILER_NOISE.match(ln)]
        if kept:
            sys.stderr.write("".join(kept))
            sys.stderr.flush()
        return False


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated on `device` during one `fn()` call (its `setup` runs first, outside
    the measurement) beyond what was allocated before the call; what the call returns counts.

    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated
    before. CPU: torch has no allocator counters for the CPU, so the call runs once under
    torch.profiler (profile_memory=True); its allocation and free events (every tensor storage
    the CPU allocator hands out or takes back while the profiler is on; a CPU backward runs on the
    calling thread) are replayed in time order and the running total's maximum is the peak.
    Memory taken outside the PyTorch allocator (a kernel's std::vector scratch, say) is not seen."""
    setup = getattr(fn, "setup", None)
    if setup is not None:
        setup()
    sync(device)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del out
        return int(peak)
    from torch.profiler import ProfilerActivity, profile
    with _QuietProfilerNoise(), \
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        sync(device)
        del out
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and str(e.device_type()).rsplit(".", 1)[-1] == "CPU"]
    events.sort(key=lambda e: e.start_ns())
    total = peak = 0
    for e in events:
        total += e.nbytes()
        peak = max(peak, total)
    return int(peak)


def copy_bandwidth(nbytes: int, device: torch.device | str, dtype: torch.dtype = torch.float32,
                   *, budget_s: float = 0.5, flush: bool | None = None, stat: str = "min") -> float:
    """Bytes/s of `dst.copy_(src)` into a preallocated buffer, read + written bytes = nbytes.

    stat="min" (default) uses the fastest repetition: the copy is the ceiling the kernels are held
    to, and on a shared or small CPU machine its median picks up scheduler stalls (on a GPU the
    two agree within a few percent); stat="median" uses the median."""
    device = torch.device(device)
    elem = torch.empty((), dtype=dtype).element_size()
    n = max(1, int(nbytes) // (2 * elem))
    src = torch.ones(n, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device, budget_s=budget_s, flush=flush)
    return 2 * n * elem / ((t.min_ms if stat == "min" else t.median_ms) * 1e-3)


# --------------------------------------------------------------------------------------------
# results files
# --------------------------------------------------------------------------------------------

def result_path(bench: str, slug: str, out_dir: Path | str | None = None) -> Path:
    return Path(out_dir or RESULTS_DIR) / f"{bench}_{slug}.json"


def write_results(bench: str, rows: list[dict], machine: dict, config: dict | None = None,
                  out_dir: Path | str | None = None) -> Path:
    """<results folder>/<bench>_<machine-slug>.json, written atomically (temp file + rename)."""
    path = result_path(bench, machine["slug"], out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import epic_ext
        backends = epic_ext.backends() if hasattr(epic_ext, "backends") else None
    except Exception:  # noqa: BLE001
        backends = None
    doc = {
        "schema": SCHEMA,
        "bench": bench,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "machine": machine,
        "backends": backends,
        "config": config or {},
        "rows": rows,
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1, default=str)
            f.write("\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def load_results(slug: str | None = None, out_dir: Path | str | None = None) -> list[dict]:
    """Every result document in the results folder (of one machine when `slug` is given)."""
    docs = []
    for p in sorted(Path(out_dir or RESULTS_DIR).glob("*.json")):
        try:
            doc = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(doc, dict) or "rows" not in doc:
            continue
        if slug is not None and doc.get("machine", {}).get("slug") != slug:
            continue
        doc["_path"] = str(p)
        docs.append(doc)
    return docs
