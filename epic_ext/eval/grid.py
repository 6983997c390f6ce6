"""``epic-ext eval``: one model, a grid of token-reduction methods x visual-token budgets, scored on
benchmark tasks through a harness, with the efficiency of every cell beside its scores.

    run_grid(GridSpec(model="ckpt", methods=("dart", "fastv"), keeps=(576, 192, 64),
                      tasks=("epic_vqa",), include_path="tasks/"), out="runs/eval")

The grid is the unreduced baseline (``method="none"``; ``baseline=False`` leaves it out) plus every
method at every budget. The harness loads the model once; each cell applies its method to it
(:meth:`epic_ext.eval.runner.ReducedModel.set_method`) and evaluates every task.

Harnesses (``GridSpec.harness``; all hold one :class:`~epic_ext.eval.runner.ReducedModel`, so
prompts, batching and the efficiency record are the same code):

* ``lmms``: lmms-eval (``pip install -e ".[eval]"``), tasks by name (``include_path`` adds folders
  of task YAMLs), in-process through ``lmms_eval.evaluator.simple_evaluate``;
* ``vlmeval``: VLMEvalKit (installed from its repository), datasets by name;
* ``local``: no dependency; the offline synthetic VQA task folders that
  :func:`epic_ext.eval.write_local_task` writes (the demo's evaluation).

Output folder: ``cells/<method>_<keep>.json`` (one per finished cell, written when it finishes,
with the key of everything that determines its result), ``eval.json`` (the spec, the machine, every
cell), ``eval.md`` (the table) and ``eval.png`` (score against visual tokens kept, per method).
A cell whose file holds the same key is reused, so an interrupted grid continues where it stopped
and a grid extended by a method or a budget runs only the new cells.

Under several processes (``accelerate launch -m epic_ext.cli eval ...``; lmms harness) every rank
walks the same cells (decided from the files before any runs) and rank 0 writes.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

HARNESSES = {
    "lmms": "epic_ext.eval.lmms:LmmsHarness",
    "vlmeval": "epic_ext.eval.vlmeval:VLMEvalHarness",
    "local": "epic_ext.eval.local:LocalHarness",
}
FULL = "full"          # the baseline cell's budget label
GRID_VERSION = 1       # bump when a cell's result format changes (old cells are then rerun)


@dataclass(frozen=True)
class Cell:
    method: str                                   # "none": the unreduced baseline
    keep: Optional[Union[int, float]] = None      # a count per image / frame group, or a ratio

    @property
    def budget(self) -> str:
        return FULL if self.method == "none" else f"{self.keep:g}"

    @property
    def name(self) -> str:
        return FULL if self.method == "none" else f"{self.method}@{self.budget}"

    @property
    def slug(self) -> str:
        return "none_full" if self.method == "none" else f"{self.method}_{self.budget}".replace(".", "p")


@dataclass
class GridSpec:
    """Everything that determines a grid's results. ``keeps``: counts (int) or ratios (float in
    (0, 1)); ``layer``: the drop layer of in-LLM methods (None: each method's default; vision-side
    methods take none); ``method_options``: more options for every method that has them;
    ``model_args``: more :class:`~epic_ext.eval.runner.ReducedModel` arguments (``min_pixels``,
    ``max_pixels``, ``attn_implementation``, ``warmup``)."""
    model: str
    methods: tuple
    keeps: tuple
    tasks: tuple
    harness: str = "lmms"
    layer: Optional[int] = None
    method_options: dict = field(default_factory=dict)
    batch_size: int = 8
    limit: Optional[Union[int, float]] = None
    include_path: Optional[str] = None
    device: Optional[str] = None
    dtype: Optional[str] = None
    max_new_tokens: int = 32
    baseline: bool = True
    model_args: dict = field(default_factory=dict)

    def __post_init__(self):
        from ..methods import available_methods
        self.methods = tuple(m.lower() for m in self.methods)
        self.keeps, self.tasks = tuple(self.keeps), tuple(self.tasks)
        if self.harness not in HARNESSES:
            raise ValueError(f"harness: one of {', '.join(HARNESSES)}, got {self.harness!r}")
        if not self.methods and not self.baseline:
            raise ValueError("methods: none given (and no baseline)")
        known = sorted(set(available_methods()) - {"none"})     # the baseline cell is "none"
        for m in self.methods:
            if m not in known:
                raise ValueError(f"methods: unknown method {m!r}; choose from {', '.join(known)}")
        if self.methods and not self.keeps:
            raise ValueError("keep: give at least one budget")
        for k in self.keeps:
            if isinstance(k, bool) or not isinstance(k, (int, float)) or k <= 0 or isinstance(k, float) and k >= 1:
                raise ValueError(f"keep: a count (integer >= 1) or a ratio in (0, 1), got {k!r}")
        if len(set(self.keeps)) != len(self.keeps) or len(set(self.methods)) != len(self.methods):
            raise ValueError("methods / keep: repeated values")
        from ..methods import get_method
        for name in self.method_options:
            if not any(get_method(m).has_option(name) for m in self.methods):
                raise ValueError(f"method_options: {name!r} is an option of none of {', '.join(self.methods)}")
        if not self.tasks or not all(isinstance(t, str) and t for t in self.tasks):
            raise ValueError(f"tasks: give at least one task, got {self.tasks!r}")
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise ValueError(f"batch_size: an integer >= 1, got {self.batch_size!r}")
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, (int, float))
                                       or self.limit <= 0):
            raise ValueError(f"limit: a positive count or fraction, got {self.limit!r}")
        if self.layer is not None and (not isinstance(self.layer, int) or self.layer < 0):
            raise ValueError(f"layer: an integer >= 0, got {self.layer!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: an integer >= 1, got {self.max_new_tokens!r}")

    def cells(self) -> list:
        cells = [Cell("none")] if self.baseline else []
        return cells + [Cell(m, k) for m in self.methods for k in self.keeps]

    def method_kwargs(self, cell: Cell) -> dict:
        """apply()'s options of ``cell``: the layer and the common options that its method has."""
        from ..methods import get_method
        if cell.method == "none":
            return {}
        spec = get_method(cell.method)
        options = dict(self.method_options)
        if self.layer is not None:
            options["layer"] = self.layer
        return {k: v for k, v in options.items() if spec.has_option(k)}

    def as_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


def model_fingerprint(folder) -> str:
    """A digest of a checkpoint folder's config and of its weight files' names, sizes and
    modification times (a model retrained into the same folder gets new cells)."""
    folder = Path(folder)
    h = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.name.endswith((".json", ".jinja")):
            h.update(path.name.encode() + b"\0" + path.read_bytes())
        elif path.suffix in (".safetensors", ".bin", ".pt"):
            st = path.stat()
            h.update(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def files_fingerprint(paths) -> str:
    """A digest of the names, sizes and modification times of the files at or under ``paths``
    (those that exist): a task folder rewritten in place gets new cells."""
    h = hashlib.sha256()
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
        for path in files:
            st = path.stat()
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


def cell_key(spec: GridSpec, cell: Cell, harness_version: dict, fingerprints: dict) -> dict:
    """What determines ``cell``'s result: a finished cell with the same key is reused.
    ``fingerprints``: the model's and the task files' (:func:`grid_fingerprints`)."""
    import epic_ext
    return {"grid_version": GRID_VERSION, "epic_ext": getattr(epic_ext, "__version__", "?"),
            "harness": spec.harness, "harness_version": harness_version,
            "model": str(Path(spec.model).resolve()), **fingerprints,
            "tasks": list(spec.tasks), "limit": spec.limit, "include_path": spec.include_path,
            "batch_size": spec.batch_size, "device": spec.device, "dtype": spec.dtype,
            "max_new_tokens": spec.max_new_tokens, "model_args": spec.model_args,
            "method": cell.method, "keep": cell.keep, "options": spec.method_kwargs(cell)}


def grid_fingerprints(spec: GridSpec) -> dict:
    """The model folder's and the local task files' (``include_path``, tasks given as paths)."""
    local = [p for p in (spec.include_path, *spec.tasks) if p and os.path.exists(p)]
    return {"model_fingerprint": model_fingerprint(spec.model), "task_files_fingerprint": files_fingerprint(local)}


def harness_class(spec: GridSpec):
    """The harness class of ``spec`` (its module imported now: a missing package is a clear error
    before anything runs)."""
    module, name = HARNESSES[spec.harness].split(":")
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise ValueError(f"harness: {spec.harness!r} needs a package that is not installed ({e}); "
                         + {"lmms": "pip install -e '.[eval]'",
                            "vlmeval": "install VLMEvalKit from its repository (README: Evaluating)"}.get(
                             spec.harness, "")) from None


def load_harness(spec: GridSpec, out=None):
    """A harness object for ``spec`` (it loads the model). ``out``: the grid's folder (VLMEvalKit's
    prediction files go to ``out/vlmeval``)."""
    kwargs = {"work_dir": Path(out) / "vlmeval"} if spec.harness == "vlmeval" and out is not None else {}
    return harness_class(spec)(spec, **kwargs)


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def _agree(todo: list, cells: list) -> list:
    """Rank 0's list of cells to run, on every rank (a rank that read the folder after rank 0
    wrote a cell would otherwise skip it, and the ranks' collectives would no longer match)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return todo
    names = [[c.name for c in todo]]
    dist.broadcast_object_list(names, src=0)
    by_name = {c.name: c for c in cells}
    return [by_name[n] for n in names[0]]


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def run_grid(spec: GridSpec, out, *, rerun: bool = False, progress: bool = True, log=print,
             harness=None) -> dict:
    """Evaluate every cell of ``spec`` not already finished in ``out`` (all of them with
    ``rerun``), write ``eval.json`` / ``eval.md`` / ``eval.png`` and return the ``eval.json``
    object. ``harness``: an object to use instead of loading ``spec.harness`` (tests, the demo)."""
    from tqdm import tqdm

    out = Path(out)
    main = _rank() == 0
    cells_dir = out / "cells"
    if main:
        cells_dir.mkdir(parents=True, exist_ok=True)
    # The model is loaded only when a cell is left to run (version() is a static method).
    version = (harness if harness is not None else harness_class(spec)).version()
    fingerprints = grid_fingerprints(spec)
    keys = {c: cell_key(spec, c, version, fingerprints) for c in spec.cells()}
    done = {}
    for cell, key in keys.items():
        path = cells_dir / f"{cell.slug}.json"
        if not rerun and path.is_file():
            try:
                saved = json.loads(path.read_text())
            except ValueError:
                saved = {}
            if saved.get("key") == key:
                done[cell] = saved
    todo = [c for c in keys if c not in done]
    if _world_size() > 1:
        # Several processes: the harness joins their group (the model loads even with nothing left
        # to run), then every rank runs rank 0's list.
        harness = harness if harness is not None else load_harness(spec, out)
        todo = _agree(todo, list(keys))
    if main and done:
        log(f"[eval] reusing {len(done)} finished cell(s) in {cells_dir}: {', '.join(c.name for c in done)}")
    if todo and harness is None:
        harness = load_harness(spec, out)
    bar = tqdm(total=len(keys), initial=len(done), desc="eval grid", unit="cell", disable=not (progress and main))
    for cell in todo:
        bar.set_postfix_str(cell.name)
        t0 = time.perf_counter()
        result = harness.evaluate(cell, spec.method_kwargs(cell))
        saved = {"key": keys[cell], "cell": {"method": cell.method, "keep": cell.keep, "name": cell.name},
                 "seconds": time.perf_counter() - t0, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **result}
        if main:
            _write_json(cells_dir / f"{cell.slug}.json", saved)
        done[cell] = saved
        bar.update(1)
    bar.close()
    from ..machine import machine_info
    device = getattr(harness, "device", None) or spec.device      # None: pick_device's choice
    report = {"spec": spec.as_dict(), "machine": machine_info(None if device is None else str(device)),
              "harness_version": version, "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "cells": [{**{k: v for k, v in done[c].items() if k != "key"}, "reused": c not in todo}
                        for c in keys if c in done]}        # other ranks: what they ran or read
    if main:
        from .report import format_table, plot
        _write_json(out / "eval.json", report)
        table = format_table(report)
        (out / "eval.md").write_text(table + "\n")
        plot(report, out / "eval.png")
        log(table)
        log(f"[eval] {out / 'eval.json'}, {out / 'eval.md'}, {out / 'eval.png'}")
    return report
