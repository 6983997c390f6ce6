"""The demo experiment over several seeds: mean accuracies and paired differences against direct.

    python -m benchmarks.demo_sweep --seeds 1,2,3 [--protocol continue|scratch] [--variants ...]
        [--continue-lr 1e-3] [--continue-steps 150] [--kl-weight 0.7] [--tag NAME] [--threads 1]

One seed's demo (``epic_ext.train.demo.run_demo``) decides little: on 192 questions one answer
is 0.005 of accuracy and the variants differ by a few points. Here every seed trains its own
vanilla model and continuations (or, with ``--protocol scratch``, every variant from its own
random init), so the spread covers initialisation, data order and the schedules' draws. Runs
already trained under ``--out`` from the same configuration are reused, so a sweep can be
stopped and resumed, and extended by seeds or variants.

Reported per (variant, method, budget): the mean and standard deviation over the seeds whose
vanilla model learned the task (576-token accuracy at least ``--learned``; the others are listed
and left out, since a continuation has nothing to preserve there), and the mean paired difference
to ``direct`` with its standard error: the paper's claim is that at high compression the EPIC
variants beat training directly at the target (difference > 0).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import replace
from pathlib import Path


def aggregate(results: dict[int, dict], learned: float = 0.6, baseline: str = "direct") -> dict:
    """``results``: seed -> run_demo result. Returns the seeds used and left out, and rows of
    mean / std / paired difference to ``baseline`` per (variant, method, keep)."""
    def table(res):
        return {(r["variant"], r["method"], r["keep"]): r["accuracy"] for r in res["accuracy"]}
    tables = {s: table(r) for s, r in results.items()}
    vanilla = {s: tables[s].get(("vanilla", results[s]["recipe"]["methods"][0], 576)) for s in results}
    used = sorted(s for s, a in vanilla.items() if a is not None and a >= learned)
    rows = []
    keys = sorted({k for s in used for k in tables[s]}, key=lambda k: (k[1], k[0], -k[2]))
    for variant, method, keep in keys:
        vals = [tables[s][(variant, method, keep)] for s in used if (variant, method, keep) in tables[s]]
        row = {"variant": variant, "method": method, "keep": keep, "n": len(vals),
               "mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
        diffs = [tables[s][(variant, method, keep)] - tables[s][(baseline, method, keep)] for s in used
                 if (variant, method, keep) in tables[s] and (baseline, method, keep) in tables[s]]
        if diffs and variant != baseline:
            row[f"minus_{baseline}"] = statistics.fmean(diffs)
            row[f"minus_{baseline}_se"] = (statistics.stdev(diffs) / math.sqrt(len(diffs))) if len(diffs) > 1 else None
        rows.append(row)
    return {"seeds_used": used, "seeds_left_out": sorted(set(results) - set(used)),
            "vanilla_576": vanilla, "learned_threshold": learned, "baseline": baseline, "rows": rows}


def format_aggregate(agg: dict, variants, methods, budgets) -> str:
    cell = {(r["variant"], r["method"], r["keep"]): r for r in agg["rows"]}
    base = agg["baseline"]
    lines = [f"seeds used {agg['seeds_used']} (vanilla at 576 >= {agg['learned_threshold']}); left out "
             f"{agg['seeds_left_out']}; vanilla 576 accuracy per seed: "
             + ", ".join(f"{s}: {a:.2f}" for s, a in agg["vanilla_576"].items() if a is not None),
             f"mean accuracy +- std over seeds, and [mean paired difference to {base} +- s.e.]"]
    for method in methods:
        lines.append(f"  {method:<16}" + "".join(f"{k:>26}" for k in budgets))
        for v in variants:
            parts = []
            for k in budgets:
                r = cell.get((v, method, k))
                if r is None:
                    parts.append(f"{'-':>26}")
                    continue
                d = r.get(f"minus_{base}")
                se = r.get(f"minus_{base}_se")
                tail = "" if d is None else f" [{d:+.2f}" + ("" if se is None else f"+-{se:.2f}") + "]"
                parts.append(f"{r['mean']:.2f}+-{r['std']:.2f}{tail}".rjust(26))
            lines.append(f"  {v:<16}" + "".join(parts))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="1,2,3", help="comma-separated training seeds")
    p.add_argument("--protocol", choices=("continue", "scratch"), default="continue")
    p.add_argument("--variants", default=None, help="comma-separated (default: the demo's)")
    p.add_argument("--continue-lr", type=float, default=None)
    p.add_argument("--continue-steps", type=int, default=None)
    p.add_argument("--kl-weight", type=float, default=None, help="lambda of every EPIC variant")
    p.add_argument("--methods", default=None, help="evaluation methods (default dart,fastv,random)")
    p.add_argument("--learned", type=float, default=0.6, help="vanilla 576-token accuracy a seed needs to count")
    p.add_argument("--out", default="runs/sweep", help="runs go to OUT/<tag>/seed<N>; vanilla models are shared")
    p.add_argument("--tag", default=None, help="name of this configuration (default: from the options)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="the demo's seconds-long recipe (smoke test)")
    args = p.parse_args(argv)

    import torch

    from epic_ext.train.demo import FULL, QUICK, run_demo, split_names
    from benchmarks.common import RESULTS_DIR, machine_info

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = QUICK if args.quick else FULL
    changes = {"protocol": args.protocol}
    for key in ("variants", "methods"):
        if getattr(args, key):
            changes[key] = split_names(getattr(args, key))
    for key in ("continue_lr", "continue_steps", "kl_weight"):
        if getattr(args, key) is not None:
            changes[key] = getattr(args, key)
    try:
        recipe = replace(recipe, **changes)
    except ValueError as e:
        raise SystemExit(f"demo_sweep: {e}")
    tag = args.tag or "-".join([args.protocol] + [f"{k.replace('_', '')}{v}" for k, v in changes.items()
                                                   if k in ("continue_lr", "continue_steps", "kl_weight")])
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    results = {}
    for seed in seeds:
        out = Path(args.out) / tag / f"seed{seed}"
        _share_vanilla(Path(args.out), out, seed)
        print(f"[sweep] {tag} seed {seed}", flush=True)
        results[seed] = run_demo(out, recipe=replace(recipe, seed=seed), reuse=True, progress=False,
                                 log=lambda m: print(m, flush=True))
    agg = aggregate(results, learned=args.learned)
    variants = ("vanilla",) + tuple(recipe.variants)
    print(format_aggregate(agg, variants, recipe.methods, recipe.budgets))
    if not args.quick:
        machine = machine_info("cpu")
        path = Path(RESULTS_DIR) / f"demo_sweep-{tag}_{machine['slug']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        per_seed = {s: {"accuracy": r["accuracy"], "step_time_s": r["step_time_s"]} for s, r in results.items()}
        path.write_text(json.dumps({"machine": machine, "tag": tag, "recipe": next(iter(results.values()))["recipe"],
                                    "aggregate": agg, "per_seed": per_seed}, indent=1))
        print(f"[sweep] wrote {path}")
    return 0


def _share_vanilla(root: Path, out: Path, seed: int) -> None:
    """Every configuration of one seed starts from the same vanilla model: link OUT/<tag>/seedN/
    vanilla to ROOT/vanilla-seedN (trained there once; run_demo reuses it when the config matches)."""
    shared = root / f"vanilla-seed{seed}"
    shared.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    link = out / "vanilla"
    if not link.exists() and not link.is_symlink():
        link.symlink_to(shared.resolve(), target_is_directory=True)


if __name__ == "__main__":
    raise SystemExit(main())
