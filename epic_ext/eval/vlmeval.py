"""VLMEvalKit shim: an epic-ext model with a token-reduction method as a VLMEvalKit ``BaseModel``.

Written against VLMEvalKit's interface as of commit ``e8e78f05`` (2026-08-18; ``vlmeval.__version__``
``0.2rc1``): ``vlmeval.vlm.base.BaseModel`` (``generate`` checks and normalises a message, then
calls ``generate_inner(message, dataset)``), ``vlmeval.config.supported_VLM`` (name -> constructor,
what ``run.py`` looks models up in), ``vlmeval.dataset.build_dataset`` (a dataset by name; an
unknown name is read from ``<LMUData>/<name>.tsv``, with option columns A, B, ... as a custom
multiple-choice dataset), ``dataset.build_prompt(line)`` -> ``[{"type": "image", "value": path},
..., {"type": "text", "value": str}]`` and ``dataset.evaluate(prediction_file, **judge_kwargs)`` ->
a dict or a pandas DataFrame. VLMEvalKit is not on PyPI: install it from its repository.

* :class:`EpicExtVLM` holds one :class:`~epic_ext.eval.runner.ReducedModel` (any family epic-ext
  supports, from a local folder, with a method); VLMEvalKit calls ``generate`` one message at a
  time (``vlmeval.inference.infer_data`` has no batched path), :meth:`EpicExtVLM.generate_batch`
  answers several (the harness below uses it).
* :func:`register_vlmeval` puts a constructor into ``supported_VLM`` so that ``run.py --model
  NAME`` builds it; ``python -m epic_ext.eval.vlmeval ... -- <run.py arguments>`` registers and
  then runs the checkout's ``run.py`` (:func:`main`).
* :class:`VLMEvalHarness`: the ``vlmeval`` harness of ``epic-ext eval`` (see :mod:`.grid`).
* :func:`write_vlmeval_task`: the offline synthetic VQA task as a VLMEvalKit custom
  multiple-choice TSV (scored by exact matching, no judge).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import importlib.util
import json
import math
import numbers
import os
import shutil
import string
import sys
import tempfile
from pathlib import Path
from typing import Optional

try:
    import vlmeval
    import vlmeval.config
    from vlmeval.dataset import build_dataset
    from vlmeval.smp import LMUDataRoot, dump, get_pred_file_path
    from vlmeval.vlm.base import BaseModel
except ImportError as e:                               # grid.load_harness turns this into a ValueError
    raise ImportError(f"epic_ext.eval.vlmeval needs VLMEvalKit ({e}); it is not on PyPI: git clone "
                      "https://github.com/open-compass/VLMEvalKit && pip install -e VLMEvalKit") from e

from .runner import ReducedModel, keep_value

DEFAULT_NAME = "epic_ext"
DEFAULT_MAX_NEW_TOKENS = 512
# ReducedModel's own arguments (everything else given to EpicExtVLM / register_vlmeval is a method option).
RUNNER_ARGS = ("device", "dtype", "attn_implementation", "min_pixels", "max_pixels", "warmup")
# Dataset types whose evaluate() falls back to exact matching without a judge (run.py gives them an
# API judge by default; the harness uses exact matching unless model_args names a judge).
EXACT_MATCH_TYPES = ("MCQ", "Y/N", "MCQ_MMMU_Pro")


def _open_image(value):
    from PIL import Image
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    with Image.open(value) as im:
        return im.convert("RGB")


class EpicExtVLM(BaseModel):
    """A local checkpoint (``model_path``) with ``method`` / ``keep`` (+ method options such as
    ``layer``, and ReducedModel's ``device``, ``dtype``, ``attn_implementation``, ``min_pixels``,
    ``max_pixels``, ``warmup``) as a VLMEvalKit model. Answers greedily, at most
    ``max_new_tokens`` tokens. Every answered request appends its efficiency record to
    ``self.runner.records``."""

    INTERLEAVE = False            # a message's images go before its text (ReducedModel.prompt), never between
    VIDEO_LLM = False             # video datasets then send sampled frames as images
    allowed_types = ["text", "image"]

    def __init__(self, model_path, method: str = "none", keep=None, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 use_vllm: bool = False, **kwargs) -> None:
        super().__init__()
        # vlmeval.inference passes use_vllm=... to models whose name mentions Qwen2-VL / Qwen2.5-VL.
        if use_vllm:
            raise ValueError("use_vllm: epic-ext runs its reduced forward through transformers, not vLLM")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: an integer >= 1, got {max_new_tokens!r}")
        self.max_new_tokens = max_new_tokens
        self.runner = ReducedModel(model_path, method=method, keep=keep, **kwargs)

    def set_method(self, method: str = "none", keep=None, **options) -> None:
        """Swap the method on the loaded model (clears the efficiency records)."""
        self.runner.set_method(method, keep, **options)

    def use_custom_prompt(self, dataset):
        # The dataset's own prompts: the same text for every method and family, so scores compare.
        return False

    def _normalised(self, message) -> list:
        """``message`` as BaseModel.generate checks and normalises it, as a ValueError when bad."""
        if self.check_content(message) not in ("str", "dict", "liststr", "listdict"):
            raise ValueError(f"message: a str, a dict or a list of them, got {message!r}")
        try:
            message = self.preproc_content(message)
        except AssertionError:      # an item without type / value, or whose file is not of its type
            message = None
        if message is None or self.check_content(message) != "listdict":
            raise ValueError(f"message: could not be read as [{{'type': ..., 'value': ...}}], got {message!r}")
        for item in message:
            if item.get("type") not in self.allowed_types:
                raise ValueError(f"message: content of type {item.get('type')!r} is not supported "
                                 f"(allowed: {', '.join(self.allowed_types)})")
        return message

    def split_message(self, message) -> tuple:
        """(the texts joined by newlines, the images in order as RGB PIL images)."""
        for item in message:
            if not isinstance(item, dict) or item.get("type") not in self.allowed_types or "value" not in item:
                raise ValueError(f"message: items are {{'type': 'text' | 'image', 'value': ...}}, got {item!r}")
        text = "\n".join(x["value"] for x in message if x["type"] == "text")
        return text, [_open_image(x["value"]) for x in message if x["type"] == "image"]

    def _answer(self, messages: list, dataset, meta) -> list:
        parts = [self.split_message(m) for m in messages]
        if meta is None:
            meta = [{} for _ in messages]
        meta = [{**({"dataset": dataset} if dataset is not None else {}), **m} for m in meta]
        return self.runner.generate([p[0] for p in parts], [p[1] for p in parts],
                                    max_new_tokens=self.max_new_tokens, meta=meta)

    def generate_inner(self, message, dataset=None) -> str:
        return self._answer([message], dataset, None)[0]

    def generate_batch(self, messages: list, dataset=None, meta: Optional[list] = None) -> list:
        """Answer several messages in one batch (left-padded; each answered as alone). ``meta[i]``
        (a dict) is merged into request i's efficiency record."""
        if meta is not None and len(meta) != len(messages):
            raise ValueError(f"meta: {len(meta)} entries for {len(messages)} messages")
        return self._answer([self._normalised(m) for m in messages], dataset, meta)


def _check_registration(name, model_path, method, keep, options) -> None:
    from ..methods import get_method
    from ..models.loading import check_model_type
    if not isinstance(name, str) or not name or any(c.isspace() or c in "/\\" for c in name):
        raise ValueError(f"name: a model name without spaces or slashes (run.py puts it in file names), got {name!r}")
    if not isinstance(model_path, (str, os.PathLike)) or not os.path.isfile(os.path.join(model_path, "config.json")):
        raise ValueError(f"model_path: a local checkpoint folder (with config.json), got {model_path!r}")
    check_model_type(os.fspath(model_path))
    if not isinstance(method, str):
        raise ValueError(f"method: a method name, got {method!r}")
    spec = get_method(method)              # ValueError naming the method
    try:
        keep_value(keep)
    except TypeError as e:
        raise ValueError(str(e)) from None
    unknown = [k for k in options if k not in RUNNER_ARGS + ("max_new_tokens",) and not spec.has_option(k)]
    if unknown:
        raise ValueError(f"options: {', '.join(unknown)} neither a model argument ({', '.join(RUNNER_ARGS)}, "
                         f"max_new_tokens) nor an option of method {method!r}")


def register_vlmeval(name: str = DEFAULT_NAME, *, model_path, method: str = "none", keep=None, **options) -> str:
    """Make ``name`` a VLMEvalKit model: ``vlmeval.config.supported_VLM[name]`` becomes a
    ``functools.partial`` of :class:`EpicExtVLM` (what ``run.py --model name`` and
    ``vlmeval.inference`` build). Arguments are checked now, the model is loaded when VLMEvalKit
    builds it. A name VLMEvalKit already uses for another model is refused. Returns ``name``."""
    _check_registration(name, model_path, method, keep, options)
    registry = vlmeval.config.supported_VLM
    existing = registry.get(name)
    if existing is not None and getattr(existing, "func", None) is not EpicExtVLM:
        raise ValueError(f"name: {name!r} is already a VLMEvalKit model; choose another name")
    registry[name] = functools.partial(EpicExtVLM, model_path=os.fspath(model_path), method=method, keep=keep,
                                       **options)
    return name


# ---------------------------------------------------------------------------------------- scores
def _number(value):
    """A float for a finite number (or a numeric string, as tables written to files hold), else None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, numbers.Real):
        value = float(value)
    elif isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    else:
        return None
    return value if math.isfinite(value) else None


def _put(out: dict, key: str, value: float) -> None:
    k, i = key, 2
    while k in out:
        k, i = f"{key}#{i}", i + 1
    out[k] = value


def _flatten(obj, prefix: str, out: dict) -> None:
    join = (lambda *p: "/".join(x for x in p if x))
    if hasattr(obj, "to_dict") and hasattr(obj, "columns"):          # a pandas DataFrame
        for row in obj.to_dict(orient="records"):
            # Text columns (a split, a category) label the row; 'none' is report_acc's "no split".
            label = join(*(str(v).strip() for v in row.values()
                           if isinstance(v, str) and _number(v) is None and str(v).strip().lower() != "none"))
            for col, value in row.items():
                if _number(value) is not None:
                    _put(out, join(prefix, label, str(col)), _number(value))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, join(prefix, str(k)), out)
    elif isinstance(obj, (list, tuple)) and len(obj) == 1:
        _flatten(obj[0], prefix, out)
    elif _number(obj) is not None:
        _put(out, prefix or "score", _number(obj))


def flatten_scores(result) -> dict:
    """``dataset.evaluate``'s result as {metric: float}: a dict's numbers by their key path
    (``a/b``); a DataFrame's numeric cells by column, prefixed by the row's text cells when it has
    several rows (``dev/Overall``). Non-numeric and non-finite values are left out."""
    out: dict = {}
    if result is not None:
        _flatten(result, "", out)
    return out


# ---------------------------------------------------------------------------------------- harness
class VLMEvalHarness:
    """The ``vlmeval`` harness of ``epic-ext eval``: ``spec.tasks`` are VLMEvalKit dataset names
    (``build_dataset``; ``spec.include_path``, when given, is the data root ``LMUData`` for them).
    Per cell and dataset: the first ``spec.limit`` rows (a count, or a fraction < 1) with the
    dataset's prompts, answered ``spec.batch_size`` at a time, written as VLMEvalKit's prediction
    file (the rows + ``prediction``) under ``work_dir/<cell>/``, scored by ``dataset.evaluate``.

    ``spec.model_args`` may hold ``judge`` (VLMEvalKit's judge model name, e.g. ``gpt-4o-mini``;
    API keys as VLMEvalKit reads them, its ``.env``) and ``judge_args`` (a dict of more
    ``evaluate`` keywords, e.g. ``{"nproc": 8}``); both are part of the cell key. Without a judge,
    multiple-choice and yes/no datasets are scored by exact matching, other datasets get their
    ``evaluate``'s own default (many need a judge API). Image datasets only (no video, no
    multi-turn). One process: the rows are not split across ranks."""

    def __init__(self, spec, *, work_dir=None) -> None:
        args = dict(spec.model_args)
        self.judge = args.pop("judge", None)
        self.judge_args = args.pop("judge_args", None) or {}
        if self.judge is not None and (not isinstance(self.judge, str) or not self.judge):
            raise ValueError(f"judge: a VLMEvalKit judge model name, got {self.judge!r}")
        if not isinstance(self.judge_args, dict):
            raise ValueError(f"judge_args: a dict of evaluate() keywords, got {self.judge_args!r}")
        if spec.include_path is not None and not os.path.isdir(spec.include_path):
            raise ValueError(f"include_path: {spec.include_path!r} is not a folder (VLMEvalKit's data root)")
        self.spec = spec
        self.data_root = None if spec.include_path is None else os.path.abspath(spec.include_path)
        self.work_dir = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="epic_ext_vlmeval_"))
        self.datasets = {}
        with self._root():
            for task in spec.tasks:
                dataset = build_dataset(task)
                if dataset is None:
                    raise ValueError(f"tasks: VLMEvalKit has no dataset {task!r} (nor a {task}.tsv under its data "
                                     f"root {LMUDataRoot()})")
                if getattr(dataset, "MODALITY", "IMAGE") != "IMAGE" or getattr(dataset, "TYPE", None) == "MT":
                    raise ValueError(f"tasks: {task!r} is a {getattr(dataset, 'MODALITY', '?')} / "
                                     f"{getattr(dataset, 'TYPE', '?')} dataset; the vlmeval harness runs "
                                     "single-turn image datasets")
                self.datasets[task] = dataset
        self.model = EpicExtVLM(spec.model, device=spec.device, dtype=spec.dtype,
                                max_new_tokens=spec.max_new_tokens, **args)
        self.device = self.model.runner.device

    @contextlib.contextmanager
    def _root(self):
        """LMUData pointed at include_path while VLMEvalKit builds, prompts and scores (it reads
        the variable at each use)."""
        if self.data_root is None:
            yield
            return
        old = os.environ.get("LMUData")
        os.environ["LMUData"] = self.data_root
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("LMUData", None)
            else:
                os.environ["LMUData"] = old

    def version(self) -> dict:
        """VLMEvalKit's version, and its checkout's commit when it is one (the version string
        changes rarely; datasets and scoring change with commits)."""
        import subprocess
        out = {"vlmeval": str(getattr(vlmeval, "__version__", "?"))}
        checkout = Path(vlmeval.__file__).resolve().parent.parent
        if not (checkout / ".git").exists():          # an installed copy (or one inside another repository)
            return out
        try:
            commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True,
                                    text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return out
        if commit.returncode == 0 and commit.stdout.strip():
            out["vlmeval_commit"] = commit.stdout.strip()
        return out

    def _rows(self, n: int) -> int:
        limit = self.spec.limit
        if limit is None:
            return n
        if isinstance(limit, float) and limit < 1:
            return int(math.ceil(n * limit))           # a fraction, as lmms-eval reads --limit
        return min(int(limit), n)

    def _prompt(self, dataset, line, task):
        # As vlmeval.inference.infer_data chooses.
        if getattr(dataset, "force_use_dataset_prompt", False):
            return dataset.build_prompt(line)
        if self.model.use_custom_prompt(task):
            return self.model.build_prompt(line, dataset=task)
        return dataset.build_prompt(line)

    def _judge_kwargs(self, dataset) -> dict:
        kwargs = {"nproc": 4, **self.judge_args}      # a fresh dict: evaluate() pops from it
        if self.judge is not None:
            kwargs["model"] = self.judge
        elif getattr(dataset, "TYPE", None) in EXACT_MATCH_TYPES:
            kwargs["model"] = "exact_matching"
        return kwargs

    def evaluate(self, cell, method_kwargs: dict) -> dict:
        self.model.set_method(cell.method, cell.keep, **method_kwargs)
        model_name = f"{DEFAULT_NAME}_{cell.slug}"
        cell_dir = self.work_dir / cell.slug
        # evaluate() reuses intermediate files it finds beside the prediction file (judge
        # answers, extracted options): a rerun of the cell must not score old predictions.
        shutil.rmtree(cell_dir, ignore_errors=True)
        cell_dir.mkdir(parents=True)
        out = {"scores": {}, "samples": {}, "predictions": {}}
        for task, dataset in self.datasets.items():
            with self._root():
                rows = dataset.data.iloc[: self._rows(len(dataset.data))].copy()
                self.model.set_dump_image(dataset.dump_image)
                lines = [rows.iloc[i] for i in range(len(rows))]
                messages = [self._prompt(dataset, line, task) for line in lines]
                answers = []
                step = self.spec.batch_size
                for start in range(0, len(messages), step):
                    meta = [{"index": str(line["index"])} for line in lines[start:start + step]]
                    answers += self.model.generate_batch(messages[start:start + step], dataset=task, meta=meta)
                rows["prediction"] = answers
                if "image" in rows:                    # as infer_data_job: the base64 images stay out
                    rows.pop("image")
                result_file = get_pred_file_path(str(cell_dir), model_name, task, use_env_format=True)
                dump(rows, result_file)
                result = dataset.evaluate(result_file, **self._judge_kwargs(dataset))
            out["scores"][task] = flatten_scores(result)
            out["samples"][task] = len(rows)
            out["predictions"][task] = result_file
        out["efficiency"] = self.model.runner.efficiency_summary()
        return out


# ---------------------------------------------------------------------------------------- task
def write_vlmeval_task(folder=None, *, n: int = 6, seed: int = 0, image_size: int = 112,
                       name: str = "epic_vqa") -> Path:
    """The offline synthetic VQA task (:func:`epic_ext.eval.write_local_task`'s samples) as
    ``<folder>/<name>.tsv`` in VLMEvalKit's custom multiple-choice layout: ``index``,
    ``image_path`` (absolute), ``question``, the choices as ``A``, ``B``, ..., ``answer`` (the
    letter), ``category`` (the question type). ``build_dataset(name)`` with ``LMUData=folder``
    reads it as a custom MCQ dataset, scored by exact matching. ``folder`` defaults to
    VLMEvalKit's data root. Returns the TSV's path."""
    from ..train import synthetic
    from . import write_local_task
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name: a plain dataset name, got {name!r}")
    folder = Path(LMUDataRoot() if folder is None else folder).resolve()
    files = write_local_task(folder / f"{name}_files", n=n, seed=seed, image_size=image_size, task=name)
    with open(files / "data.jsonl") as f:
        rows = [json.loads(line) for line in f]
    # write_local_task's rows follow synthetic.generate's records in order.
    kinds = [record["question_types"][0] for record in synthetic.generate(n, seed=seed)]
    width = max(len(r["choices"]) for r in rows)
    letters = string.ascii_uppercase[:width]
    path = folder / f"{name}.tsv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_ALL)
        writer.writerow(["index", "image_path", "question", *letters, "answer", "category"])
        for r, kind in zip(rows, kinds):
            choices = list(r["choices"]) + [""] * (width - len(r["choices"]))
            writer.writerow([r["id"], r["image"], r["question"], *choices, letters[r["label"]], kind])
    return path


# ---------------------------------------------------------------------------------------- launcher
def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"none": None, "true": True, "false": False}.get(text.lower(), text)


def find_run_py(root=None) -> Path:
    """VLMEvalKit's ``run.py``: in ``root`` (or ``$VLMEVALKIT_ROOT``) when given, else beside the imported
    ``vlmeval`` package (a source checkout installed with ``pip install -e``). It is not part of
    the installed package."""
    root = root or os.environ.get("VLMEVALKIT_ROOT")
    candidates = [Path(root) / "run.py"] if root else [Path(vlmeval.__file__).resolve().parent.parent / "run.py"]
    for path in candidates:
        if path.is_file():
            return path
    raise ValueError(f"--vlmeval-root: no VLMEvalKit run.py at {', '.join(map(str, candidates))} (run.py is in "
                     "the repository, not the installed package: pass the checkout's folder)")


def main(argv=None) -> None:
    """``python -m epic_ext.eval.vlmeval --model-path P --method dart --keep 64 [--layer 2]
    [--option k=v ...] -- <run.py arguments>``: registers the model (name ``epic_ext_<method><keep>``
    unless ``--name``) and runs VLMEvalKit's ``run.main()`` with the arguments after ``--``
    (``--model NAME`` added when they name no model)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(prog="python -m epic_ext.eval.vlmeval",
                                     description="Register an epic-ext model in VLMEvalKit and run its run.py "
                                                 "with the arguments after '--'.")
    parser.add_argument("--model-path", required=True, help="local checkpoint folder (model + processor)")
    parser.add_argument("--method", default="none", help="token-reduction method (default: none)")
    parser.add_argument("--keep", type=_parse_value, default=None, help="budget: a count or a ratio")
    parser.add_argument("--layer", type=int, default=None, help="drop layer of in-LLM methods")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="another method option or model argument (device, dtype, max_new_tokens, ...)")
    parser.add_argument("--name", default=None, help="model name in supported_VLM (default epic_ext_<method><keep>)")
    parser.add_argument("--vlmeval-root", default=None, help="VLMEvalKit checkout holding run.py")
    args = parser.parse_args(ours)
    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--option: KEY=VALUE, got {item!r}")
        options[key] = _parse_value(value)
    if args.layer is not None:
        options["layer"] = args.layer
    name = args.name
    if name is None:
        budget = f"{args.keep:g}" if isinstance(args.keep, (int, float)) else str(args.keep or "")
        name = DEFAULT_NAME if args.method == "none" else f"{DEFAULT_NAME}_{args.method}{budget}"
    try:
        register_vlmeval(name, model_path=args.model_path, method=args.method, keep=args.keep, **options)
        run_py = find_run_py(args.vlmeval_root)
    except ValueError as e:
        parser.error(str(e))
    if "--model" in rest:
        i = rest.index("--model") + 1
        named = []
        while i < len(rest) and not rest[i].startswith("--"):
            named.append(rest[i])
            i += 1
        if name not in named:
            parser.error(f"--model: the run.py arguments name {named} but the registered model is {name!r}")
    elif "--config" not in rest:
        rest += ["--model", name]
    spec = importlib.util.spec_from_file_location("vlmevalkit_run", run_py)
    run = importlib.util.module_from_spec(spec)
    sys.argv = [str(run_py), *rest]
    spec.loader.exec_module(run)
    if hasattr(run, "load_env"):      # what run.py's own __main__ block does before main()
        run.load_env()
    run.main()


if __name__ == "__main__":
    main()
