"""Evaluation-harness entry points.

lmms-eval (>= 0.7) finds out-of-tree models through the entry-point group ``lmms_eval.models``;
:func:`lmms_manifest` is the payload epic-ext registers there (model id ``epic_ext``, class
:class:`epic_ext.eval.lmms.EpicExt`). It imports nothing heavy: lmms-eval loads every entry point
while it builds its registry, before it knows which model a run asks for.

:func:`write_local_task` writes the offline synthetic VQA task (``tasks/epic_vqa``) with its data
into a folder for ``--include_path``.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

LMMS_MODEL_ID = "epic_ext"
LMMS_CLASS_PATH = "epic_ext.eval.lmms.EpicExt"
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
LOCAL_TASK = "epic_vqa"


def lmms_manifest():
    """The ``lmms_eval.models`` entry point's payload (a ``ModelManifest``)."""
    from lmms_eval.models.registry_v2 import ModelManifest
    return ModelManifest(model_id=LMMS_MODEL_ID, simple_class_path=LMMS_CLASS_PATH)


def write_local_task(folder, *, n: int = 6, seed: int = 0, image_size: int = 112, task: str = LOCAL_TASK,
                     **synthetic_options) -> Path:
    """Write ``n`` synthetic VQA samples (PNG images + ``data.jsonl``: image path, question,
    answer, choices (the question type's answer set), label (the answer's index)) under ``folder``
    and two task YAMLs that include the shipped ones in ``tasks/epic_vqa`` and name the data by
    absolute path (lmms-eval 0.7.3 resolves a relative ``data_files`` against the YAML's folder;
    older releases against the working directory): ``<task>`` (generation, exact match) and
    ``<task>_mc`` (multiple choice by log-likelihood, accuracy). Returns ``folder`` (pass it as
    ``--include_path``).

    ``synthetic_options``: :func:`epic_ext.train.synthetic.generate`'s scene options (``grid``,
    ``min_objects``, ``max_objects``, ``question_types``); the samples are ``generate(n, seed,
    **synthetic_options)`` rendered at ``image_size`` px (a model's vision input size: no resize at
    preprocessing). Writing the same task again leaves its files untouched."""
    from ..train import synthetic

    if n < 1:
        raise ValueError(f"n: must be >= 1, got {n}")
    unknown = set(synthetic_options) - {"grid", "min_objects", "max_objects", "question_types"}
    if unknown:
        raise TypeError(f"write_local_task: unknown option(s) {', '.join(sorted(unknown))}")
    if not str(task).isidentifier():
        raise ValueError(f"task: {task!r} is not a plain name")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size: a positive pixel count, got {image_size!r}")
    folder = Path(folder).resolve()
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = synthetic.generate(n, seed=seed, **synthetic_options)   # checks the options
    # Choices: the question type's answers on this board (a 2x2 grid has 4 positions).
    answer_sets = synthetic.answer_sets(synthetic_options.get("grid", 3), synthetic_options.get("max_objects", 4))
    rows = []
    for i, record in enumerate(records):
        question, answer = synthetic.first_qa(record)
        choices = answer_sets[record["question_types"][0]]
        path = images / f"{i:04d}.png"
        png = io.BytesIO()
        synthetic.render(record, image_size).save(png, format="PNG")
        _write_if_changed(path, png.getvalue())
        rows.append({"id": i, "image": str(path), "question": question, "answer": answer, "choices": choices,
                     "label": choices.index(answer)})
    data = folder / "data.jsonl"
    _write_if_changed(data, "".join(json.dumps(r) + "\n" for r in rows).encode())
    for name, base in ((task, "_epic_vqa_base.yaml"), (f"{task}_mc", "_epic_vqa_mc_base.yaml")):
        # json.dumps quotes the paths (YAML reads a JSON string as the same string).
        _write_if_changed(folder / f"{name}.yaml", (
            f"include: {json.dumps(os.fspath(TASKS_DIR / LOCAL_TASK / base))}\n"
            f"task: {name}\n"
            f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(os.fspath(data))}\n").encode())
    return folder


def _write_if_changed(path: Path, content: bytes) -> None:
    """Leave a file that already holds ``content`` untouched: an eval grid fingerprints task
    files by modification time, so writing the same task again keeps its finished cells."""
    if path.is_file() and path.stat().st_size == len(content) and path.read_bytes() == content:
        return
    path.write_bytes(content)
