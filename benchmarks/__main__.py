"""Run every benchmark module, then the report.

    python -m benchmarks [--quick] [--only compress,iqr] [--list] [--no-report] [bench options]
    python -m benchmarks --gpu     # the GPU-size presets of benchmarks/gpu_check.py (PRESETS)

Modules named `bench_<name>.py` in this package are discovered and run in name order, each with
the options this runner does not consume (--quick, --shapes, --providers, --device, --budget, ...;
see `python -m benchmarks.bench_compress --help`). An option a module does not know is dropped for
that module with a note, so options meant for one benchmark can be passed to all. A module that
fails does not stop the others; the exit status is non-zero when one failed or reported a mismatch.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time
import traceback

import benchmarks

PREFIX = "bench_"


def discover() -> list[str]:
    """Names (without the bench_ prefix) of the benchmark modules of this package."""
    return sorted(m.name[len(PREFIX):] for m in pkgutil.iter_modules(benchmarks.__path__)
                  if m.name.startswith(PREFIX) and not m.ispkg)


def _accepted(module, argv: list[str]) -> list[str]:
    """Drop options the module's parser does not know (with their values), with a note."""
    make = getattr(module, "parser", None)
    if make is None:
        return argv
    parser = make()
    known = {s for a in parser._actions for s in a.option_strings}
    out, dropped, i = [], [], 0
    while i < len(argv):
        tok = argv[i]
        name = tok.split("=", 1)[0]
        if tok.startswith("-") and name not in known:
            dropped.append(tok)
            if "=" not in tok and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                dropped.append(argv[i + 1])
                i += 1
        else:
            out.append(tok)
        i += 1
    if dropped:
        print(f"[benchmarks] {module.__name__} ignores {' '.join(dropped)}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="benchmarks: " + ", ".join(discover()))
    p.add_argument("--only", default=None, help="comma list of benchmark names (e.g. compress,iqr)")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("--no-report", action="store_true", help="skip the merged table and plot")
    p.add_argument("--gpu", action="store_true",
                   help="GPU sizes: only the benchmarks of gpu_check's PRESETS, each with its "
                        "preset options (capped repetitions, no torch.compile) before yours")
    args, rest = p.parse_known_args(argv)
    names = discover()
    presets = {}
    if args.gpu:
        from benchmarks.gpu_check import BENCH_COMMON, PRESETS
        presets = {n: BENCH_COMMON + PRESETS[n] for n in PRESETS}
        names = [n for n in names if n in presets]
    if args.list:
        print("\n".join(names))
        return 0
    if args.only:
        wanted = [w.strip().removeprefix(PREFIX) for w in args.only.split(",") if w.strip()]
        unknown = [w for w in wanted if w not in names]
        if unknown:
            p.error(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(names)}")
        names = [n for n in names if n in wanted]
    status, t_all = 0, time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        try:
            module = importlib.import_module(f"benchmarks.{PREFIX}{name}")
            rc = module.main(_accepted(module, presets.get(name, []) + rest)) or 0
        except SystemExit as e:  # argparse errors, deliberate exits
            rc = e.code if isinstance(e.code, int) else 1
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            rc = 1
        status = status or rc
        print(f"[benchmarks] {name}: {'ok' if rc == 0 else f'exit {rc}'} in "
              f"{time.perf_counter() - t0:.1f} s\n")
    if not args.no_report and "--no-json" not in rest:
        from benchmarks import report
        rp = argparse.ArgumentParser(add_help=False)
        rp.add_argument("--device", default="auto")
        rp.add_argument("--out-dir", default=None)
        known, _ = rp.parse_known_args(rest)
        rargv = ["--device", known.device] + (["--out-dir", known.out_dir] if known.out_dir else [])
        try:
            report.main(rargv)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            status = status or 1
    print(f"[benchmarks] done in {time.perf_counter() - t_all:.1f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
