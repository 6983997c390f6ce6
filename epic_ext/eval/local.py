"""The ``local`` harness of ``epic-ext eval``: no evaluation package, the offline task folders that
:func:`epic_ext.eval.write_local_task` writes (the demo's evaluation).

A task is named in ``GridSpec.tasks`` as

* a folder written by ``write_local_task`` (its generation task),
* that folder's ``data.jsonl`` (the generation task over it) or one of its task YAMLs,
* a task name (``epic_vqa``, ``epic_vqa_mc``) with ``GridSpec.include_path`` = the folder, as
  lmms-eval takes ``--include_path FOLDER --tasks epic_vqa``.

The task YAMLs are read as lmms-eval reads them: ``include`` merged under the including file,
``!function module.name`` imported from the YAML's own folder (the shipped
``tasks/epic_vqa/utils.py``: the prompt and the image come from the same functions lmms-eval
calls), ``doc_to_target`` / ``doc_to_choice`` as document fields, ``generation_kwargs`` and
``metric_list`` as written. What lmms-eval 0.7.3 does and this harness repeats:

* ``generate_until``: the context is ``doc_to_text(doc)`` (zero-shot: no description, no
  examples); requests are sorted as its ``Collator`` sorts them (longest prompt in tokens first,
  then by text) and answered in batches of ``GridSpec.batch_size``, so each request has the same
  batch neighbours, padding and ``batch_size`` in its efficiency record as under lmms-eval;
  ``max_new_tokens`` from the task's ``generation_kwargs``, else ``GridSpec.max_new_tokens`` (the
  ``epic_ext`` model's default); answers cut at the first ``until`` string, then stripped
  (``Task.process_results``).
* ``exact_match`` (``api/metrics.py``, ``exact_match_hf_evaluate``): each of
  ``regexes_to_ignore`` removed (``re.sub``) from prediction and reference, then with
  ``ignore_case`` both lower-cased, with ``ignore_punctuation`` every character of
  ``string.punctuation`` deleted, with ``ignore_numbers`` every digit deleted; a hit is string
  equality (no whitespace normalisation: "top  left" != "top left"); the score is the mean.
* ``multiple_choice``: one log-likelihood request per choice, continuation ``" " + choice``
  (the default ``target_delimiter``); lmms-eval predicts the *argmin* of what the model returns
  (its built-in models, and ``epic_ext``, return the continuation's mean negative log-likelihood
  per token), the first on ties; ``acc`` = whether that choice is the label.
* ``limit``: an int keeps the first N documents, a float below 1 the first ceil(N * limit).
* seeds: every cell starts as ``simple_evaluate`` starts every run, ``random.seed(0)``,
  ``numpy.random.seed(1234)``, ``torch.manual_seed(1234)``; so a method drawing from the global
  RNG (``random`` without a ``seed``) gives a cell the same result whichever cells ran before it
  in the process (a reused grid equals a fresh one) and the lmms harness's result.

Scores: ``{task name: {metric: value}}`` (the YAML's ``task``), as the lmms harness reports them.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

LOCAL_HARNESS_VERSION = 1       # bump when what a cell computes changes
OUTPUT_TYPES = ("generate_until", "multiple_choice")


# ----------------------------------------------------------------------------- task YAMLs

@dataclass(frozen=True)
class _FunctionTag:
    """``!function module.name`` of a task YAML, with the folder its module is found in."""
    name: str
    folder: Optional[Path] = None


def _load_yaml(text: str):
    """A task YAML's object, ``!function`` tags (lmms-eval's) read as :class:`_FunctionTag`."""
    import yaml

    class TaskLoader(yaml.SafeLoader):
        pass

    TaskLoader.add_constructor("!function", lambda loader, node: _FunctionTag(loader.construct_scalar(node)))
    return yaml.load(text, Loader=TaskLoader)


def _resolve_tags(value, folder: Path):
    if isinstance(value, _FunctionTag):
        return _FunctionTag(value.name, folder)
    if isinstance(value, dict):
        return {k: _resolve_tags(v, folder) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_tags(v, folder) for v in value]
    return value


def read_task_config(path, _seen=()) -> dict:
    """A task YAML with its ``include`` chain merged (the including file's keys win, as in
    lmms-eval); ``!function`` tags resolved against the folder of the file they are written in."""
    path = Path(path).resolve()
    if path in _seen:
        raise ValueError(f"tasks: {path} includes itself")
    try:
        config = _load_yaml(path.read_text()) or {}
    except OSError as e:
        raise ValueError(f"tasks: cannot read {path}: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"tasks: {path} is not a task YAML (a mapping)")
    config = _resolve_tags(config, path.parent)
    include = config.pop("include", None)
    if include is not None:
        base = Path(include)
        base = base if base.is_absolute() else path.parent / base
        config = {**read_task_config(base, (*_seen, path)), **config}
    config.setdefault("_yaml", str(path))
    return config


_MODULES: dict = {}


def _function(tag: _FunctionTag) -> Callable:
    """The callable a ``!function`` tag names, its module imported by path (once)."""
    module_name, _, attr = tag.name.rpartition(".")
    file = tag.folder / f"{module_name.replace('.', '/')}.py"
    if file not in _MODULES:
        if not file.is_file():
            raise ValueError(f"tasks: !function {tag.name}: no {file}")
        spec = importlib.util.spec_from_file_location(f"_epic_local_task_{len(_MODULES)}_{module_name}", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MODULES[file] = module
    try:
        return getattr(_MODULES[file], attr)
    except AttributeError:
        raise ValueError(f"tasks: !function {tag.name}: {file} has no {attr!r}") from None


def _field(doc: dict, name, what: str):
    if isinstance(name, _FunctionTag):
        return _function(name)(doc)
    if not isinstance(name, str) or name not in doc:
        raise ValueError(f"tasks: {what} {name!r} is not a field of the task's documents ({', '.join(doc)})")
    return doc[name]


@dataclass
class LocalTask:
    """One task: its name, output type, documents and hooks (see the module docstring)."""
    name: str
    config: dict
    docs: list = field(repr=False)

    @property
    def output_type(self) -> str:
        return self.config["output_type"]

    def text(self, doc) -> str:
        hook = self.config.get("doc_to_text")
        return _function(hook)(doc) if isinstance(hook, _FunctionTag) else str(_field(doc, hook, "doc_to_text"))

    def visuals(self, doc) -> list:
        hook = self.config.get("doc_to_visual")
        if hook is None:
            return []
        return list(_function(hook)(doc) if isinstance(hook, _FunctionTag) else _field(doc, hook, "doc_to_visual"))

    def target(self, doc):
        return _field(doc, self.config.get("doc_to_target"), "doc_to_target")

    def choices(self, doc) -> list:
        return list(_field(doc, self.config.get("doc_to_choice"), "doc_to_choice"))


def _data_file(config: dict) -> Path:
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    split = config.get("test_split", "test")
    if isinstance(files, dict):
        files = files.get(split)
    if isinstance(files, list) and len(files) == 1:
        files = files[0]
    if config.get("dataset_path") != "json" or not isinstance(files, str):
        raise ValueError(f"tasks: {config['_yaml']}: the local harness reads local JSON data only "
                         "(dataset_path: json, dataset_kwargs.data_files.<test_split>: one file)")
    path = Path(files)
    return path if path.is_absolute() else Path(config["_yaml"]).parent / path


def _read_docs(path: Path) -> list:
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"tasks: cannot read the task's data {path}: {e}") from None
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _task_yamls(folder: Path) -> list:
    return sorted(p for p in folder.glob("*.yaml") if not p.name.startswith("_"))


def _pick_generation_yaml(candidates: list, data: Optional[Path], where: str) -> Path:
    found = []
    for path in candidates:
        config = read_task_config(path)
        if config.get("output_type") == "generate_until" and (
                data is None or _data_file(config).resolve() == data.resolve()):
            found.append(path)
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise ValueError(f"tasks: {where} must hold exactly one generation task YAML, found {names}")
    return found[0]


def resolve_task(task: str, include_path: Optional[str] = None) -> Path:
    """The YAML of ``task``: a task folder, its data file, a YAML, or a name in ``include_path``."""
    path = Path(task).expanduser()
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path.resolve()
    if path.is_dir():
        return _pick_generation_yaml(_task_yamls(path), None, f"task folder {path}")
    if path.is_file():
        return _pick_generation_yaml(_task_yamls(path.parent), path, f"the folder of {path}")
    if include_path is not None and str(task).isidentifier():
        folder = Path(include_path).expanduser()
        for yaml_path in sorted(folder.rglob("*.yaml")) if folder.is_dir() else []:
            if yaml_path.name.startswith("_"):
                continue
            try:
                config = _load_yaml(yaml_path.read_text())
            except Exception:           # not a task YAML: lmms-eval skips it as well
                continue
            if isinstance(config, dict) and config.get("task") == task:
                return yaml_path.resolve()
        raise ValueError(f"tasks: no task {task!r} in include_path {folder}")
    hint = "" if include_path is not None else " (a task name needs include_path: the folder of its YAML)"
    raise ValueError(f"tasks: {task!r} is not a task folder, data file or task YAML{hint}")


def load_task(task: str, include_path: Optional[str] = None) -> LocalTask:
    config = read_task_config(resolve_task(task, include_path))
    if config.get("output_type") not in OUTPUT_TYPES:
        raise ValueError(f"tasks: {task!r} has output_type {config.get('output_type')!r}; the local harness "
                         f"runs {', '.join(OUTPUT_TYPES)}")
    name = config.get("task") or Path(config["_yaml"]).stem
    return LocalTask(name=str(name), config=config, docs=_read_docs(_data_file(config)))


# ----------------------------------------------------------------------------- metrics

def exact_match(predictions, references, *, regexes_to_ignore=None, ignore_case: bool = False,
                ignore_punctuation: bool = False, ignore_numbers: bool = False) -> list:
    """lmms-eval 0.7.3's ``exact_match_hf_evaluate`` per pair (1.0 / 0.0), in pure Python: regexes
    removed, then case, punctuation (``string.punctuation``) and digits as asked; string equality."""
    def norm(text: str) -> str:
        for pattern in regexes_to_ignore or ():
            text = re.sub(pattern, "", text)
        if ignore_case:
            text = text.lower()
        if ignore_punctuation:
            text = text.translate(str.maketrans("", "", string.punctuation))
        if ignore_numbers:
            text = text.translate(str.maketrans("", "", string.digits))
        return text
    return [float(norm(str(p)) == norm(str(r))) for p, r in zip(predictions, references)]


def limited(docs: list, limit) -> list:
    """lmms-eval's ``limit``: a float in (0, 1) keeps ceil(N * limit) documents, else int(limit)."""
    if limit is None:
        return docs
    n = int(math.ceil(len(docs) * limit)) if 0 < limit < 1 else int(limit)
    return docs[:n]


# ----------------------------------------------------------------------------- harness

class LocalHarness:
    """The harness contract of :mod:`epic_ext.eval.grid` over local task folders: one
    :class:`~epic_ext.eval.runner.ReducedModel` (loaded here), the tasks read once."""

    def __init__(self, spec) -> None:
        from .runner import ReducedModel
        self.spec = spec
        self.tasks = [load_task(t, spec.include_path) for t in spec.tasks]
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"tasks: the same task given twice ({', '.join(names)})")
        self.runner = ReducedModel(spec.model, device=spec.device, dtype=spec.dtype, **spec.model_args)
        self.device = self.runner.device

    @staticmethod
    def version() -> dict:
        """The harness and the shipped task files (a changed prompt reruns the cells)."""
        from . import LOCAL_TASK, TASKS_DIR
        h = hashlib.sha256()
        for path in sorted((TASKS_DIR / LOCAL_TASK).iterdir()):
            if path.suffix in (".py", ".yaml"):
                h.update(path.name.encode() + b"\0" + path.read_bytes())
        return {"local": LOCAL_HARNESS_VERSION, "epic_vqa_files": h.hexdigest()[:16]}

    def evaluate(self, cell, method_kwargs: dict) -> dict:
        import random

        import numpy
        import torch
        self.runner.set_method(cell.method, cell.keep, **method_kwargs)
        random.seed(0)                  # lmms-eval's simple_evaluate defaults (module docstring)
        numpy.random.seed(1234)
        torch.manual_seed(1234)
        out = {"scores": {}, "samples": {}}
        for task in self.tasks:
            docs = limited(task.docs, self.spec.limit)
            run = self._generate if task.output_type == "generate_until" else self._multiple_choice
            out["scores"][task.name] = run(task, docs)
            out["samples"][task.name] = len(docs)
        out["efficiency"] = self.runner.efficiency_summary()
        return out

    def predictions(self, task: LocalTask, docs: list) -> list:
        """The generated answers of ``docs`` (document order), batched as lmms-eval batches them."""
        from .runner import generation_options
        options, until = generation_options(task.config.get("generation_kwargs"), self.spec.max_new_tokens)
        contexts = [task.text(doc) for doc in docs]
        encode = self.runner.tokenizer.encode
        order = sorted(range(len(docs)), key=lambda i: (-len(encode(contexts[i])), contexts[i]))
        answers = [None] * len(docs)
        size = self.spec.batch_size
        for start in range(0, len(order), size):
            batch = order[start:start + size]
            texts = self.runner.generate([contexts[i] for i in batch], [task.visuals(docs[i]) for i in batch],
                                         until=until, meta=[dict(task=task.name, doc_id=i) for i in batch], **options)
            for i, text in zip(batch, texts):
                answers[i] = text.strip()
        return answers

    def _generate(self, task: LocalTask, docs: list) -> dict:
        answers = self.predictions(task, docs)
        scores = {}
        for metric in task.config.get("metric_list") or [{"metric": "exact_match"}]:
            name = metric.get("metric")
            if name != "exact_match":
                raise ValueError(f"tasks: {task.name}: metric {name!r}; the local harness scores exact_match only")
            options = {k: metric[k] for k in ("regexes_to_ignore", "ignore_case", "ignore_punctuation",
                                              "ignore_numbers") if k in metric}
            hits = exact_match(answers, [task.target(doc) for doc in docs], **options)
            scores[name] = sum(hits) / len(hits) if hits else 0.0
        return scores

    def _multiple_choice(self, task: LocalTask, docs: list) -> dict:
        delimiter = task.config.get("target_delimiter", " ")
        hits = []
        for doc in docs:
            context, images, choices = task.text(doc), task.visuals(doc), task.choices(doc)
            gold = task.target(doc)
            gold = choices.index(gold) if isinstance(gold, str) and gold in choices else gold
            losses = []
            for choice in choices:
                total, _, _, n_tokens = self.runner.loglikelihood(context, f"{delimiter}{choice}", images)
                losses.append(-total / n_tokens)          # what the epic_ext lmms-eval model returns
            pred = min(range(len(losses)), key=losses.__getitem__)          # the first least loss
            hits.append(float(pred == gold))
        names = [m.get("metric") for m in task.config.get("metric_list") or [{"metric": "acc"}]]
        if any(n != "acc" for n in names):
            raise ValueError(f"tasks: {task.name}: metrics {names}; the local harness scores acc only "
                             "for multiple choice")
        return {"acc": sum(hits) / len(hits) if hits else 0.0}
