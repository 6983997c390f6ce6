"""Merge the result files of one machine into one table and one plot.

    python -m benchmarks.report [--machine SLUG] [--device auto|cpu|cuda] [--out-dir DIR]
                                [--only compress,iqr] [--no-plot]

Reads benchmarks/results/<bench>_<slug>.json for this machine (the slug of the device the
benchmarks would run on, or --machine), prints every row in one table, and draws
benchmarks/results/summary_<slug>.png: per benchmark, the speedup over eager of every provider per
case (log scale) and the share of the plain-copy bandwidth each provider reaches. Without
matplotlib the plot is skipped with a note.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from benchmarks import common, harness


def table(docs: list[dict]) -> str:
    lines = [f"{'bench':<9} " + harness.header()]
    for doc in docs:
        for r in doc["rows"]:
            lines.append(f"{doc['bench']:<9} " + harness.format_row(r))
    return "\n".join(lines)


def _cases_and_providers(rows: list[dict]) -> tuple[list[str], list[str]]:
    cases, provs = [], []
    for r in rows:
        if r["case"] not in cases:
            cases.append(r["case"])
        if r["provider"] != "*" and r["provider"] not in provs:
            provs.append(r["provider"])
    return cases, provs


def plot(docs: list[dict], path: Path, title: str) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        print("note: matplotlib is not installed; no plot (pip install matplotlib)")
        return None
    n = len(docs)
    widest = max(len(_cases_and_providers(d["rows"])[0]) for d in docs)
    fig, axes = plt.subplots(n, 2, figsize=(max(10.0, 0.55 * widest * 2 + 4), 4.2 * n + 0.6),
                             squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, doc in enumerate(docs):
        cases, provs = _cases_and_providers(doc["rows"])
        by = {(r["case"], r["provider"]): r for r in doc["rows"] if not r.get("skipped")}
        for col, (key, label, provs_here) in enumerate((
                ("speedup", "speedup over eager (x)", [p for p in provs if p != "eager"]),
                ("frac_copy", "fraction of plain-copy bandwidth", provs))):
            ax = axes[row][col]
            width = 0.8 / max(1, len(provs_here))
            for j, prov in enumerate(provs_here):
                xs, ys = [], []
                for i, case in enumerate(cases):
                    r = by.get((case, prov))
                    v = (harness.frac_copy(r) if key == "frac_copy" else r.get(key)) if r else None
                    if v is not None and v > 0 and math.isfinite(v):
                        xs.append(i - 0.4 + width * (j + 0.5))
                        ys.append(v)
                color = colors[provs.index(prov) % len(colors)]
                ax.bar(xs, ys, width=width, label=prov, color=color)
            ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
            if key == "speedup":
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
                ax.yaxis.set_minor_formatter(FuncFormatter(
                    lambda v, _: f"{v:g}x" if f"{v:e}"[0] in "25" else ""))
                ax.tick_params(axis="y", which="minor", labelsize=7)
            else:
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0%}"))
            ax.set_xticks(range(len(cases)))
            ax.set_xticklabels(cases, rotation=55, ha="right", fontsize=7)
            ax.set_xlim(-0.6, len(cases) - 0.4)
            ax.set_title(f"{doc['bench']}: {label}", fontsize=10)
            ax.grid(axis="y", alpha=0.3)
            if provs_here:
                ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--machine", default=None, help="machine slug (default: this machine's)")
    p.add_argument("--device", default="auto", help="device whose machine slug to use")
    p.add_argument("--out-dir", default=None, help=f"results folder (default {common.RESULTS_DIR})")
    p.add_argument("--only", default=None, help="comma list of benchmark names")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    out_dir = Path(args.out_dir or common.RESULTS_DIR)
    slug = args.machine or common.machine_info(common.pick_device(args.device))["slug"]
    docs = common.load_results(slug, out_dir)
    if args.only:
        wanted = {w.strip().removeprefix("bench_") for w in args.only.split(",")}
        docs = [d for d in docs if d["bench"] in wanted]
    if not docs:
        others = sorted({d.get("machine", {}).get("slug", "?")
                         for d in common.load_results(None, out_dir)})
        print(f"no results for machine {slug!r} in {out_dir}"
              + (f" (machines there: {', '.join(others)})" if others else ""))
        return 0
    machine = docs[0]["machine"]
    print(f"== report: {machine.get('name')} [{slug}], torch {docs[0].get('torch')}")
    # Model-level benchmarks (prefill, train step) have rows of their own shape and print their
    # own tables; this table and plot hold the per-op rows (case x provider).
    model_level = [d for d in docs if not all("case" in r and "provider" in r for r in d["rows"])]
    for d in model_level:
        print(f"   {d['bench']}: model-level rows, see its own output ({Path(d['_path']).name})")
    docs = [d for d in docs if d not in model_level]
    if not docs:
        return 0
    for d in docs:
        mode = "quick" if d.get("config", {}).get("quick") else "full"
        print(f"   {d['bench']}: {len(d['rows'])} rows, {d.get('date')}, {mode} "
              f"({Path(d['_path']).name})")
    if machine.get("datasheet_bw"):
        print(f"   datasheet bandwidth {machine['datasheet_bw'] / 1e12:.2f} TB/s")
    print(table(docs))
    if not args.no_plot:
        title = f"epic-ext benchmarks on {machine.get('name')} (torch {docs[0].get('torch')})"
        path = plot(docs, out_dir / f"summary_{slug}.png", title)
        if path:
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
