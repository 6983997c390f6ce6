"""The benchmark harness: command-line options, case and provider selection, the per-case
driver that checks every provider against the baseline and times it, and the printed tables.
Measurement itself (timing, copy bandwidth, machine identity, JSON files) is in common.py."""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from benchmarks.common import (DTYPES, MEMORY_FRACTION, RESULTS_DIR, call, copy_bandwidth,
                               free_memory, machine_info, measure, peak_memory, release, sync,
                               write_results)

# --------------------------------------------------------------------------------------------
# command line, case selection
# --------------------------------------------------------------------------------------------

def base_parser(description: str, shape_keys: tuple[str, ...]) -> argparse.ArgumentParser:
    keys = "x".join(shape_keys)
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small subset of the shapes")
    p.add_argument("--shapes", action="append", default=None, metavar="SPEC",
                   help=f"keep only matching shapes; SPEC is '{keys}' with '*' wildcards, or "
                        f"'KEY=V[,KEY=V]' (keys {', '.join(shape_keys)}); several specs: repeat "
                        "the flag or separate them with ';'. A spec that names every key adds "
                        "that shape even when it is not in the grid. Keys a benchmark lacks are "
                        "ignored.")
    p.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,fp16")
    p.add_argument("--providers", default=None,
                   help="comma list of provider names or prefixes "
                        "(eager,compile,ours,ours-cpu,...)")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda[:i]")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed repetitions per measurement (default 0.3 quick, 1 full)")
    p.add_argument("--max-reps", type=int, default=None)
    flush = p.add_mutually_exclusive_group()
    flush.add_argument("--flush", dest="flush", action="store_true", default=None,
                       help="flush the last-level cache before every repetition (default on CUDA)")
    flush.add_argument("--no-flush", dest="flush", action="store_false")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile provider")
    p.add_argument("--no-json", action="store_true", help="do not write the results file")
    p.add_argument("--out-dir", default=None, help=f"results folder (default {RESULTS_DIR})")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for the CPU (default: torch's choice)")
    return p


def apply_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def parse_shape_specs(specs: list[str] | None, keys: tuple[str, ...]) -> list[dict[str, int]]:
    """'16x576x4096x128', '16x*x4096', 'B=16,k=128' -> [{key: value}] (wildcards omitted).
    Keys match case-insensitively; positional fields beyond `keys` and unknown keys are ignored."""
    out: list[dict[str, int]] = []
    lower = {k.lower(): k for k in keys}
    for chunk in specs or []:
        for spec in re.split(r"[;\s]+", chunk.strip()):
            if not spec:
                continue
            cond: dict[str, int] = {}
            if "=" in spec:
                for part in spec.split(","):
                    if not part:
                        continue
                    name, _, value = part.partition("=")
                    name = lower.get(name.strip().lower())
                    if name is not None and value.strip() not in ("*", "_", ""):
                        cond[name] = int(value)
            else:
                for name, value in zip(keys, spec.lower().split("x")):
                    if value.strip() not in ("*", "_", ""):
                        cond[name] = int(value)
            out.append(cond)
    return out


def select_shapes(grid: list[dict], quick: list[dict], specs: list[dict], use_quick: bool,
                  keys: tuple[str, ...]) -> list[dict]:
    base = list(quick if use_quick else grid)
    for cond in specs:
        if set(cond) == set(keys) and cond not in base:
            base.append(dict((k, cond[k]) for k in keys))
    if specs:
        base = [s for s in base if any(all(s[k] == v for k, v in c.items()) for c in specs)]
    return base


def parse_dtypes(text: str | None, default: tuple[str, ...]) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()] if text else list(default)
    for n in names:
        if n not in DTYPES:
            raise SystemExit(f"unknown dtype {n!r}; choose from {', '.join(DTYPES)}")
    return names


def provider_wanted(name: str, selection: str | None) -> bool:
    if not selection:
        return True
    return any(name == s or name.startswith(s.rstrip("-") + "-")
               for s in (t.strip() for t in selection.split(",")) if s)


def ours_backends(device: torch.device) -> list[str]:
    """Compiled backends of epic_ext that run tensors of `device` (the reference is left out)."""
    import epic_ext
    info = epic_ext.backends()
    order = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}.get(device.type, ())
    return [n for n in order if info.get(n, {}).get("available")]


# --------------------------------------------------------------------------------------------
# the per-case driver
# --------------------------------------------------------------------------------------------

class Skip(Exception):
    """Raised by a provider's factory when it cannot run a case; the reason is printed."""


@dataclass
class Provider:
    name: str
    # make(case, inputs) -> a zero-argument callable returning the provider's output; it may carry
    # an untimed per-call `setup` (common.with_setup)
    make: Callable[[dict, dict], Callable[[], Any]]
    kind: str = "ours"  # "baseline" or "ours"; eager must be the first provider
    error_note: str = "failed"  # how a provider that raises is reported (the run goes on)


@dataclass
class Case:
    shape: dict           # ordered {key: int}
    dtype: str            # storage dtype name of the big input
    variant: str = ""     # e.g. "pooled" / "per-image"
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        s = " ".join(f"{k}={v}" for k, v in self.shape.items())
        return f"{s} {self.dtype}" + (f" {self.variant}" if self.variant else "")


def compiled(fn: Callable) -> Callable:
    """torch.compile(fn, dynamic=False) with a clean dynamo cache (one compile per case, so the
    recompile limit is never hit). Raises Skip where torch.compile does not exist."""
    if not hasattr(torch, "compile"):
        raise Skip("torch.compile not available")
    # The graph-break warning at a host sync is expected (it is what the baseline does).
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def _short_error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    first = next((m for m in msg if m.strip()), "")
    return f"{type(e).__name__}: {first[:160]}"


# The copy yardstick is the ceiling of a bandwidth-bound op moving the same bytes; an op that
# beats it by more than timing noise is not bandwidth-bound at this size (its bytes sit in cache,
# or its time is latency or compute), so its fraction of copy means nothing and is not reported.
FRAC_COPY_MAX = 1.2


def frac_copy(r: dict) -> float | None:
    """The row's fraction of plain-copy bandwidth, None when absent or not meaningful."""
    f = r.get("frac_copy")
    return f if f is not None and 0 < f <= FRAC_COPY_MAX else None


def header(memory: bool = False) -> str:
    """memory=True adds the peak-memory columns (rows of a run_bench with memory_unit)."""
    mem = f" {'peak+MB':>9} {'x unit':>6}" if memory else ""
    return (f"{'case':<36} {'provider':<12} {'median ms':>10} {'min ms':>9} {'vs eager':>8} "
            f"{'GB/s':>8} {'of copy':>7}{mem}  check")


def format_row(r: dict) -> str:
    if r.get("skipped"):
        return f"{r['case']:<36} {r['provider']:<12} skipped: {r['skipped']}"
    sp = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
    frac = f"{frac_copy(r):.0%}" if frac_copy(r) is not None else "-"
    mem = ""
    if "peak_extra_bytes" in r:  # only rows of a run with memory_unit
        pb, pu = r.get("peak_extra_bytes"), r.get("peak_extra_units")
        mem = (f" {pb / 2**20:>9.1f}" if pb is not None else f" {'-':>9}") + \
              (f" {pu:>6.2f}" if pu is not None else f" {'-':>6}")
    return (f"{r['case']:<36} {r['provider']:<12} {r['median_ms']:>10.3f} {r['min_ms']:>9.3f} "
            f"{sp:>8} {r['gbps']:>8.1f} {frac:>7}{mem}  {r.get('check', '')}")


def side_by_side(rows: list[dict], title: str = "") -> str:
    """One line per case: every provider's median ms, speedup over eager and share of copy."""
    cases: dict[str, dict[str, dict]] = {}
    providers: list[str] = []
    for r in rows:
        cases.setdefault(r["case"], {})[r["provider"]] = r
        if r["provider"] not in providers and r["provider"] != "*":
            providers.append(r["provider"])
    width = 30
    lines = []
    if title:
        lines.append(title)
    lines.append(f"{'case':<36} " + " ".join(f"{p:<{width}}" for p in providers))
    for case, by in cases.items():
        cells = []
        for p in providers:
            r = by.get(p) or by.get("*")
            if r is None:
                cell = "-"
            elif r.get("skipped"):
                cell = "skipped"
            else:
                cell = f"{r['median_ms']:.3f} ms"
                if r.get("speedup") and p != "eager":
                    cell += f" {r['speedup']:.2f}x"
                if frac_copy(r) is not None:
                    cell += f" {frac_copy(r):.0%}cp"
                if r.get("check", "").startswith("MISMATCH"):
                    cell += " !"
            cells.append(f"{cell:<{width}}")
        lines.append(f"{case:<36} " + " ".join(cells))
    return "\n".join(lines)


def run_bench(bench: str, cases: list[Case], providers: list[Provider], *,
              make_inputs: Callable[[Case, torch.device], dict],
              check: Callable[[Any, Any, Case], tuple[bool, str]],
              bytes_moved: Callable[[Case], int],
              mem_need: Callable[[Case], int],
              copy_dtype: Callable[[Case], torch.dtype],
              args: argparse.Namespace, device: torch.device,
              memory_unit: Callable[[Case], int] | None = None,
              min_reps: int = 5) -> list[dict]:
    """Run every provider on every case; print rows as they come, then the side-by-side table;
    write the JSON file unless --no-json. Returns the rows.

    memory_unit: when given, every timed provider is also run once more for its peak memory above
    what existed before the call (common.peak_memory), stored as peak_extra_bytes and as
    peak_extra_units = bytes / memory_unit(case) (e.g. one [T, V] buffer).
    min_reps: the fewest timed repetitions per measurement (for cases of seconds a call)."""
    budget = args.budget if args.budget is not None else (0.3 if args.quick else 1.0)
    max_reps = args.max_reps or (100 if device.type == "cpu" else 500)
    machine = machine_info(device)
    peak = machine.get("datasheet_bw")
    print(f"== {bench}: {machine['name']}, torch {torch.__version__}, device {device}, "
          f"{len(cases)} cases, budget {budget:g} s per measurement"
          + (f", datasheet {peak / 1e12:.2f} TB/s" if peak else ""))
    baseline, rest = providers[0], providers[1:]
    active = [p for p in rest if provider_wanted(p.name, args.providers)]
    time_baseline = provider_wanted(baseline.name, args.providers)
    names = ([baseline.name] if time_baseline else []) + [p.name for p in active]
    print("providers:", ", ".join(names))
    print(header(memory_unit is not None))
    rows: list[dict] = []
    for case in cases:
        base = {"bench": bench, "case": case.label, "shape": dict(case.shape), "dtype": case.dtype,
                "variant": case.variant}
        release(device)
        need, free = mem_need(case), free_memory(device)
        if need > MEMORY_FRACTION * free:
            r = dict(base, provider="*", skipped=f"needs ~{need / 2**30:.1f} GiB, more than "
                     f"{MEMORY_FRACTION:.0%} of {free / 2**30:.1f} GiB free")
            rows.append(r)
            print(format_row(r))
            continue
        try:
            inputs = make_inputs(case, device)
            ref_fn = baseline.make(case, inputs)
            ref = call(ref_fn)
            sync(device)
        except Exception as e:  # noqa: BLE001  (out of memory, or the baseline cannot run)
            why = "out of memory" if isinstance(e, torch.OutOfMemoryError) else "baseline failed"
            r = dict(base, provider="*", skipped=f"{why}: {_short_error(e)}")
            rows.append(r)
            print(format_row(r))
            inputs = ref = ref_fn = None
            release(device)
            continue
        nbytes = bytes_moved(case)
        try:
            copy_bps = copy_bandwidth(nbytes, device, copy_dtype(case), budget_s=min(budget, 0.3),
                                      flush=args.flush)
        except torch.OutOfMemoryError:
            copy_bps = None
            release(device)
        eager_ms = None
        for prov in ([baseline] if time_baseline else []) + active:
            r = dict(base, provider=prov.name, kind=prov.kind, bytes=nbytes)
            try:
                fn = ref_fn if prov is baseline else prov.make(case, inputs)
                t0 = time.perf_counter()
                out = call(fn)
                sync(device)
                r["first_call_ms"] = (time.perf_counter() - t0) * 1e3
                if prov is baseline:
                    r["check"] = "baseline"
                else:
                    ok, msg = check(out, ref, case)
                    r["check"] = ("ok " if ok else "MISMATCH ") + msg
                del out
                t = measure(fn, device, budget_s=budget, min_reps=min_reps, max_reps=max_reps,
                            flush=args.flush)
            except Skip as e:
                r["skipped"] = str(e)
            except Exception as e:  # noqa: BLE001  (a failing provider must not stop the run)
                r["skipped"] = f"{prov.error_note}: {_short_error(e)}"
                if os.environ.get("EPIC_EXT_BENCH_DEBUG"):
                    traceback.print_exc()
            else:
                r.update(t.as_dict())
                r["gbps"] = nbytes / (t.median_ms * 1e-3) / 1e9
                r["copy_gbps"] = copy_bps / 1e9 if copy_bps else None
                r["frac_copy"] = frac_copy(
                    {"frac_copy": nbytes / (t.median_ms * 1e-3) / copy_bps if copy_bps else None})
                if peak:
                    r["frac_datasheet"] = nbytes / (t.median_ms * 1e-3) / peak
                if prov is baseline:
                    eager_ms = t.median_ms
                r["speedup"] = eager_ms / t.median_ms if eager_ms else None
                if memory_unit is not None:
                    r["peak_extra_bytes"] = r["peak_extra_units"] = None
                    try:
                        release(device)
                        r["peak_extra_bytes"] = peak_memory(fn, device)
                        r["mem_unit_bytes"] = unit = memory_unit(case)
                        r["peak_extra_units"] = r["peak_extra_bytes"] / unit if unit else None
                    except Exception as e:  # noqa: BLE001  (the timing stands without it)
                        r["memory_error"] = _short_error(e)
            rows.append(r)
            print(format_row(r), flush=True)
            release(device)
        del inputs, ref, ref_fn
        release(device)
    print()
    print(side_by_side(rows, f"-- {bench} side by side (median ms, speedup over eager, share of "
                             f"plain-copy bandwidth)"))
    if not args.no_json:
        config = {"quick": args.quick, "budget_s": budget, "device": str(device),
                  "flush": args.flush if args.flush is not None else device.type == "cuda",
                  "argv": sys.argv[1:], "shapes": args.shapes, "providers": args.providers,
                  "timing": "median and min over repetitions; GB/s from the median",
                  "copy_yardstick": "fastest repetition of dst.copy_(src), read+written = bytes"}
        if memory_unit is not None:
            config["peak_memory"] = ("peak bytes allocated during one call above those allocated "
                                     "before it (CUDA: max_memory_allocated; CPU: replay of the "
                                     "profiler's allocation events)")
        path = write_results(bench, rows, machine, config, args.out_dir)
        print(f"wrote {path}")
    return rows
