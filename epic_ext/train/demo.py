"""The EPIC experiment in miniature (``make demo`` / ``epic-ext demo``).

A tiny LLaVA is trained from scratch on a synthetic visual QA task (a coloured shape on a grid;
by default questions about its colour and position, whose answers sit in the object's patches)
at all 576 visual tokens ("vanilla"). From that checkpoint short continuations run at the same
step budget (``protocol="continue"``, the default):
  direct          the target compression from step 0, no teacher (the paper's "w/o progressive,
                  w/o teacher" ablation)
  no-progressive  the target compression from step 0 with a teacher at the final gap
  tcd             token-wise progressive consistency distillation (DART at layer 2), "paper" preset
  tcd-official    the same with the released code's preset (not in the default run)
  lcd             layer-wise (compression layer moves from deep to shallow)
  icd             both
``protocol="scratch"`` trains every variant from the random init for the vanilla budget instead:
the paper's setting, where EPIC replaces the SFT stage.
Each model is evaluated at 576 / 192 / 128 / 64 / 36 visual tokens with DART, FastV and random,
through the ``epic-ext eval`` grid (:func:`epic_ext.eval.grid.run_grid`, the ``local`` harness) on
one task folder of held-out questions (``eval/task-<digest>``, written by
:func:`epic_ext.eval.write_local_task`): per variant ``eval/<variant>/`` holds the grid's cells,
eval.json / eval.md / eval.png; 576 tokens is the grid's unreduced baseline. The accuracy table,
an efficiency table (KV bytes, FLOPs, measured prefill and decode) and a plot are written under
the output folder; ``benchmarks/demo_sweep.py`` repeats it over seeds.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

BUDGETS = (576, 192, 128, 64, 36)
METHODS = ("dart", "fastv", "random")
# Row order of the tables. "tcd-official" is TCD with the released code's preset.
VARIANTS = ("vanilla", "direct", "no-progressive", "tcd", "tcd-official", "lcd", "icd")
PROTOCOLS = ("continue", "scratch")


@dataclass
class DemoRecipe:
    model: str = "demo"
    n_train: int = 4096
    n_eval: int = 192
    vanilla_steps: int = 1200
    continue_steps: int = 150
    batch_size: int = 8
    lr: float = 3e-3
    continue_lr: float = 1e-3
    # The random CLIP trains at a third of the LLM's rate. At 3e-3 (900 steps) it merged red, blue
    # and purple in some seeds: 576-token accuracy 0.41 / 0.99 / 0.83 for seeds 0 / 1 / 2. Frozen,
    # every object patch keeps its own colour and position: seed 0 learned the task (1.00) and lost
    # at most 0.02 at 36 tokens with any method, leaving the variants nothing to differ on
    # (benchmarks/results/demo_sweep-frozen-clip_*).
    # At 1e-3: 1.00 / 0.77 / 0.99 / 0.83 for seeds 0 / 1 / 2 / 3, and compression costs accuracy.
    vision_lr: float = 1e-3
    target_keep: int = 64             # direct's budget; EPIC's schedules end near it
    layer: int = 2
    # One object on a 2x2 grid, colour and position questions: the answer sits in the object's
    # patches, and a model trained from scratch on 2 CPU cores learns to read them in minutes.
    # Shape and count questions need shape recognition, which this budget does not buy.
    synthetic: dict = field(default_factory=lambda: {"grid": 2, "min_objects": 1, "max_objects": 1,
                                                     "question_types": ("colour", "position")})
    variants: tuple = ("direct", "no-progressive", "tcd", "lcd", "icd")
    # "continue": every variant starts from the vanilla checkpoint and trains continue_steps at
    # continue_lr (the miniature). "scratch": every variant trains from the same random
    # init for vanilla_steps at lr, as in the paper, where EPIC replaces the SFT stage.
    protocol: str = "continue"
    kl_weight: float | None = None    # overrides the presets' lambda for the EPIC variants
    budgets: tuple = BUDGETS
    methods: tuple = METHODS
    eval_batch: int = 64
    # Model init, data order and training data (evaluation data is fixed). Seed 0's vanilla model
    # learns the task (1.00); seed 1's reaches 0.77 (benchmarks/results/demo-seed1_*), seeds 2 and
    # 3 0.99 and 0.83. benchmarks/demo_sweep.py repeats the experiment over seeds.
    seed: int = 0

    def __post_init__(self):
        unknown = [v for v in self.variants if v not in VARIANTS[1:]]
        if unknown:
            raise ValueError(f"variants: unknown {unknown}; choose from {VARIANTS[1:]}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol: {self.protocol!r} is not one of {PROTOCOLS}")


FULL = DemoRecipe()
QUICK = DemoRecipe(n_train=32, n_eval=8, vanilla_steps=4, continue_steps=2, batch_size=4, budgets=(576, 64),
                   methods=("dart",), eval_batch=8)


def _schedules(recipe: DemoRecipe, n_layers: int) -> dict:
    """(schedule name, options) of every variant; the ratio convention is schedules.kept_tokens."""
    target = 1 - recipe.target_keep / 576
    loss = {} if recipe.kl_weight is None else {"kl_weight": recipe.kl_weight}
    table = {
        "direct": ("direct", {"target_ratio": target, "layer": recipe.layer}),
        "no-progressive": ("no-progressive", {"target_ratio": target, "layer": recipe.layer, **loss}),
        "tcd": ("tcd", {"preset": "paper", "layer": recipe.layer, **loss}),
        "tcd-official": ("tcd", {"preset": "official-code", "layer": recipe.layer, **loss}),
        "lcd": ("lcd", {"num_layers": n_layers, "l_min": recipe.layer, **loss}),
        "icd": ("icd", {"num_layers": n_layers, "l_min": recipe.layer, **loss}),
    }
    return {name: table[name] for name in recipe.variants}


# Config keys that do not change the trained model (output_dir: the stamp sits in that folder).
_COSMETIC = ("progress", "log_every", "tensorboard", "wandb", "output_dir")


def _train_once(cfg, log, reuse: bool):
    """train(cfg); with ``reuse``, the finished run already in cfg.output_dir when it was made
    from the same config (so an interrupted sweep picks up where it stopped)."""
    from .trainer import TrainResult, train
    out = Path(cfg.output_dir)
    stamp = out / "demo_run.json"

    def key(d):
        return {k: v for k, v in json.loads(json.dumps(d)).items() if k not in _COSMETIC}
    if reuse and stamp.is_file() and (out / "final").is_dir():
        saved = json.loads(stamp.read_text())
        if key(saved["config"]) == key(cfg.as_dict()):
            log(f"[demo] reusing {out} (same config)")
            return TrainResult(history=[], output_dir=str(out), final_dir=str(out / "final"),
                               step_time_s=saved["step_time_s"])
    result = train(cfg)
    stamp.write_text(json.dumps({"config": cfg.as_dict(), "step_time_s": result.step_time_s}))
    return result


def run_demo(out_dir="runs/demo", quick: bool = False, recipe: DemoRecipe | None = None, log=print,
             seed: int | None = None, reuse: bool = False, progress: bool = True) -> dict:
    """Train the vanilla model and ``recipe.variants``, evaluate every one at every budget and
    method, write demo.json and demo.png under ``out_dir`` and return the result. ``reuse``
    keeps runs already trained in ``out_dir`` from the same configuration, and grid cells already
    evaluated on them."""
    from .config import TrainConfig
    from .synthetic import generate, majority_baseline

    recipe = recipe or (QUICK if quick else FULL)
    if seed is not None:
        from dataclasses import replace
        recipe = replace(recipe, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    base = dict(model=recipe.model, data={"synthetic": {"n": recipe.n_train, "seed": recipe.seed, **recipe.synthetic}},
                batch_size=recipe.batch_size, vision_lr=recipe.vision_lr, tensorboard=False, progress=progress,
                log_every=0, seed=recipe.seed, method="dart")

    def run(name, **overrides):
        from accelerate.state import AcceleratorState
        AcceleratorState._reset_state(True)       # one process-wide state per train() call
        cfg = TrainConfig.from_dict({**base, **overrides, "output_dir": str(out / name)})
        return _train_once(cfg, log, reuse)

    log(f"[demo] vanilla training at 576 tokens: {recipe.vanilla_steps} steps")
    vanilla = run("vanilla", schedule="direct", schedule_options={"target_ratio": 0.0},
                  steps=recipe.vanilla_steps, lr=recipe.lr)
    runs = {"vanilla": vanilla}
    n_layers = _text_config(vanilla.final_dir)["num_hidden_layers"]
    for name, (schedule, options) in _schedules(recipe, n_layers).items():
        if recipe.protocol == "continue":
            log(f"[demo] {name}: {recipe.continue_steps} steps from vanilla")
            runs[name] = run(name, schedule=schedule, schedule_options=options, init_from=vanilla.final_dir,
                             steps=recipe.continue_steps, lr=recipe.continue_lr, warmup_ratio=0.0)
        else:
            log(f"[demo] {name}: {recipe.vanilla_steps} steps from the random init")
            runs[name] = run(name, schedule=schedule, schedule_options=options, steps=recipe.vanilla_steps,
                             lr=recipe.lr)
    t_train = time.time() - t_start
    recipe_dict = json.loads(json.dumps(recipe.__dict__ | {"budgets": list(recipe.budgets), "methods": list(recipe.methods),
                                                           "variants": list(recipe.variants)}))
    if reuse and (out / "demo.json").is_file() and all(not r.history for r in runs.values()):
        saved = json.loads((out / "demo.json").read_text())
        if saved["recipe"] == recipe_dict:            # same models, same evaluation: nothing to redo
            log(format_tables(saved))
            return saved

    acc, summaries, grids = _evaluate(runs, recipe, out, reuse=reuse, progress=progress, log=log)
    eff = []
    for keep in recipe.budgets:        # measured on the vanilla model, evaluated with the first method
        e = summaries.get((recipe.methods[0], keep)) or {}
        eff.append({"keep": keep, "kv_bytes": e.get("mean_kv_bytes"),
                    "prefill_gflop": None if e.get("mean_prefill_flops") is None else e["mean_prefill_flops"] / 1e9,
                    "prefill_ms_per_batch": e.get("mean_prefill_ms"),
                    "decode_ms_per_token": e.get("mean_decode_ms_per_token")})
    result = {"recipe": recipe_dict,
              "question_only_baseline": majority_baseline(generate(2000, seed=777, **recipe.synthetic)),
              "accuracy": [{"variant": v, "method": m, "keep": k, "accuracy": a} for (v, m, k), a in acc.items()],
              "efficiency": eff, "train_seconds": t_train, "total_seconds": time.time() - t_start,
              "step_time_s": {name: res.step_time_s for name, res in runs.items()},
              "reused_runs": [name for name, res in runs.items() if not res.history], "eval": grids}
    (out / "demo.json").write_text(json.dumps(result, indent=1))
    log(format_tables(result))
    _plot(result, out / "demo.png")
    return result


EVAL_SEED = 12345      # the held-out questions (training data uses recipe.seed)


def eval_task(recipe: DemoRecipe, out: Path, image_size: int) -> Path:
    """The held-out questions as a local task folder (``generate(n_eval, seed=12345,
    **recipe.synthetic)`` rendered at the model's image size), named by what it holds: a grid
    cell's key names its tasks by path, so a changed recipe gets a new folder and new cells."""
    import hashlib
    from ..eval import write_local_task
    what = {"n": recipe.n_eval, "seed": EVAL_SEED, "image_size": image_size, **recipe.synthetic}
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]
    return write_local_task(out / "eval" / f"task-{digest}", n=recipe.n_eval, seed=EVAL_SEED,
                            image_size=image_size, **recipe.synthetic)


def _evaluate(runs: dict, recipe: DemoRecipe, out: Path, *, reuse: bool, progress: bool, log) -> tuple:
    """Every trained variant through the eval grid (local harness): the budgets below the
    model's visual tokens per method, the others as the unreduced baseline. Returns accuracy per
    (variant, method, budget), the vanilla model's efficiency summary per (method, budget) and
    each variant's grid folder."""
    from ..eval.grid import GridSpec, run_grid
    config = json.loads((Path(runs["vanilla"].final_dir) / "config.json").read_text())
    n_image = config.get("image_seq_length", 576)
    task = eval_task(recipe, out, config["vision_config"]["image_size"])
    keeps = tuple(k for k in recipe.budgets if k < n_image)
    full = [k for k in recipe.budgets if k >= n_image]
    acc, summaries, grids = {}, {}, {}
    for name, res in runs.items():
        spec = GridSpec(model=res.final_dir, methods=recipe.methods if keeps else (), keeps=keeps, tasks=(str(task),),
                        harness="local", layer=recipe.layer, batch_size=recipe.eval_batch, dtype="float32",
                        baseline=bool(full))
        grids[name] = str(out / "eval" / name)
        report = run_grid(spec, grids[name], rerun=not reuse, progress=progress, log=lambda m: None)
        cells = {(c["cell"]["method"], c["cell"]["keep"]): c for c in report["cells"]}
        for method in recipe.methods:
            for keep in recipe.budgets:
                cell = cells[("none", None) if keep in full else (method, keep)]
                (score,) = cell["scores"].values()
                acc[(name, method, keep)] = score["exact_match"]
                if name == "vanilla":
                    summaries[(method, keep)] = cell["efficiency"]
        log(f"[demo] evaluated {name} ({grids[name]})")
    return acc, summaries, grids


def _text_config(folder) -> dict:
    """The LLM's config of a saved LLaVA model, read without loading the weights."""
    return json.loads((Path(folder) / "config.json").read_text())["text_config"]


def model_vocab(folder) -> int:
    return _text_config(folder)["vocab_size"]


def split_names(text: str | None) -> tuple | None:
    """A comma-separated command-line list ("direct, tcd") as a tuple; None stays None."""
    return None if text is None else tuple(t.strip() for t in text.split(",") if t.strip())


def format_tables(result: dict) -> str:
    budgets = result["recipe"]["budgets"]
    methods = result["recipe"]["methods"]
    acc = {(r["variant"], r["method"], r["keep"]): r["accuracy"] for r in result["accuracy"]}
    variants = [v for v in VARIANTS if any(k[0] == v for k in acc)]
    lines = [f"accuracy (exact match, {result['recipe']['n_eval']} held-out questions; question-only baseline "
             f"{result['question_only_baseline']:.2f})"]
    for method in methods:
        lines.append(f"  {method:<14}" + "".join(f"{k:>8}" for k in budgets))
        for v in variants:
            lines.append(f"  {v:<14}" + "".join(f"{acc.get((v, method, k), float('nan')):>8.3f}" for k in budgets))
    lines.append(f"efficiency per request (vanilla, {methods[0]}; KV and FLOPs from the cost model, prefill "
                 "time of the request's eval batch)")
    lines.append(f"  {'tokens':>6} {'KV MiB':>8} {'GFLOP':>8} {'prefill ms':>11} {'decode ms/tok':>14}")
    for e in result["efficiency"]:
        pre = "-" if e["prefill_ms_per_batch"] is None else f"{e['prefill_ms_per_batch']:.1f}"
        dec = "-" if e["decode_ms_per_token"] is None else f"{e['decode_ms_per_token']:.2f}"
        lines.append(f"  {e['keep']:>6} {e['kv_bytes'] / 2**20:>8.2f} {e['prefill_gflop']:>8.2f} {pre:>11} {dec:>14}")
    lines.append(f"training {result['train_seconds']:.0f} s, total {result['total_seconds']:.0f} s; median step: "
                 + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in result["step_time_s"].items()))
    return "\n".join(lines)


def _plot(result: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    budgets = result["recipe"]["budgets"]
    methods = result["recipe"]["methods"]
    acc = {(r["variant"], r["method"], r["keep"]): r["accuracy"] for r in result["accuracy"]}
    fig, axes = plt.subplots(1, len(methods), figsize=(4.5 * len(methods), 3.6), squeeze=False)
    for ax, method in zip(axes[0], methods):
        for v in VARIANTS:
            ys = [acc.get((v, method, k)) for k in budgets]
            if any(y is not None for y in ys):
                ax.plot(budgets, ys, marker="o", label=v)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(list(budgets))
        ax.set_xticklabels([str(b) for b in budgets])
        ax.set_xlabel("visual tokens kept")
        ax.set_ylabel("accuracy")
        ax.set_title(f"evaluated with {method}")
        ax.axhline(result["question_only_baseline"], color="grey", lw=0.8, ls="--")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
