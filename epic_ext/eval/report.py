"""The table and the plot of an ``epic-ext eval`` grid (``eval.json``'s object, see
:func:`epic_ext.eval.grid.run_grid`).

Table: one row per cell (the baseline first, then per method by budget, largest first): the scores
of every task metric, the visual tokens a request holds before the drop and after it, and the
means per request of KV-cache bytes, prefill FLOPs, prefill time (the request's batch) and decode
time per token. Plot: one panel per task metric, score against the visual tokens kept (log axis),
one line per method, the baseline as a dashed line.
"""
from __future__ import annotations

from pathlib import Path


def metric_columns(report: dict) -> list:
    """(task, metric) of every score in the grid, in first-seen order."""
    cols = []
    for cell in report["cells"]:
        for task, metrics in cell.get("scores", {}).items():
            for metric in metrics:
                if (task, metric) not in cols:
                    cols.append((task, metric))
    return cols


def _ordered(report: dict) -> list:
    """Baseline first, then each method's cells by budget, largest first (ratios after counts)."""
    def order(cell):
        c = cell["cell"]
        if c["method"] == "none":
            return (0, "", 0.0)
        methods = report["spec"]["methods"]
        return (1, methods.index(c["method"]) if c["method"] in methods else len(methods), -float(c["keep"]))
    return sorted(report["cells"], key=order)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(report: dict) -> str:
    """A Markdown table of the grid."""
    cols = metric_columns(report)
    single_task = len({t for t, _ in cols}) == 1
    names = [m if single_task else f"{t} {m}" for t, m in cols]
    head = (["cell", *names, "visual tokens", "kept", "KV MiB", "prefill GFLOP", "prefill ms", "decode ms/tok"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell in _ordered(report):
        eff = cell.get("efficiency") or {}
        scores = [cell.get("scores", {}).get(t, {}).get(m) for t, m in cols]
        row = [cell["cell"]["name"], *(_fmt(s, ".4f") for s in scores),
               _fmt(eff.get("mean_visual_tokens"), ".1f"), _fmt(eff.get("mean_visual_tokens_kept"), ".1f"),
               _fmt(None if "mean_kv_bytes" not in eff else eff["mean_kv_bytes"] / 2**20, ".2f"),
               _fmt(None if "mean_prefill_flops" not in eff else eff["mean_prefill_flops"] / 1e9, ".2f"),
               _fmt(eff.get("mean_prefill_ms"), ".1f"), _fmt(eff.get("mean_decode_ms_per_token"), ".2f")]
        lines.append("| " + " | ".join(row) + " |")
    spec = report["spec"]
    lines.append("")
    lines.append(f"model {spec['model']}; harness {spec['harness']}; tasks {', '.join(spec['tasks'])}; "
                 f"means per request; visual tokens: before the drop / kept after it")
    return "\n".join(lines)


def plot(report: dict, path) -> bool:
    """Write the PNG (False, nothing written, where matplotlib is not installed)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cols = metric_columns(report)
    if not cols:
        return False
    cells = _ordered(report)
    fig, axes = plt.subplots(1, len(cols), figsize=(4.8 * len(cols), 3.8), squeeze=False)
    for ax, (task, metric) in zip(axes[0], cols):
        for method in report["spec"]["methods"]:
            pts = sorted((c["efficiency"].get("mean_visual_tokens_kept"), c["scores"][task][metric])
                         for c in cells if c["cell"]["method"] == method and c.get("efficiency")
                         and metric in c.get("scores", {}).get(task, {}))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        base = [c for c in cells if c["cell"]["method"] == "none" and metric in c.get("scores", {}).get(task, {})]
        if base:
            tokens = (base[0].get("efficiency") or {}).get("mean_visual_tokens_kept")
            label = "full" + ("" if tokens is None else f" ({tokens:.0f} tokens)")
            ax.axhline(base[0]["scores"][task][metric], color="grey", lw=0.9, ls="--", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("visual tokens kept (mean per request)")
        ax.set_ylabel(metric)
        ax.set_title(task, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(Path(path), dpi=110)
    plt.close(fig)
    return True
