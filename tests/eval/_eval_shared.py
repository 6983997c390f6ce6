"""Helpers of the tests in tests/eval (imported by name: pytest puts this folder on sys.path)."""
import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def task_hooks():
    """The shipped synthetic VQA task's document hooks (tasks/epic_vqa/utils.py), loaded by path
    as lmms-eval loads a task's !function file."""
    path = REPO / "epic_ext" / "eval" / "tasks" / "epic_vqa" / "utils.py"
    spec = importlib.util.spec_from_file_location("epic_vqa_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def task_docs(task_folder) -> list:
    """The documents of a task folder written by write_local_task."""
    with open(Path(task_folder) / "data.jsonl") as f:
        return [json.loads(line) for line in f]
