"""`epic-ext eval` through lmms-eval (the default harness): every cell of a grid scores what the
reduced model gives alone (lmms-eval's own exact_match over answers made one request at a time;
multiple choice by the model's log-likelihoods), with the cell's budget in its efficiency; the
command end to end on a Qwen2.5-VL checkpoint with reuse of finished cells; and the installed
package's entry point as a stock lmms-eval sees it.

Skipped where lmms-eval is not installed (`make test-eval` installs it).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")
pytest.importorskip("lmms_eval.api.model")

from _eval_shared import task_docs, task_hooks  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
GEN = dict(max_new_tokens=8, until=["\n"])        # the shipped task YAML's generation_kwargs
N_DOCS = 6


_hooks, _docs = task_hooks, task_docs


def _ask(runner, docs, hooks) -> list:
    """Answers made one request at a time, as the task asks them."""
    return [runner.generate([hooks.doc_to_text(d)], [hooks.doc_to_visual(d)], **GEN)[0] for d in docs]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny LLaVA and Qwen2.5-VL checkpoints; the local task, whose even rows' answers are what the
    unreduced LLaVA answers (so its full-budget exact match is 1/2, not the 0 of a random model)."""
    from epic_ext.eval import write_local_task
    from epic_ext.eval.runner import ReducedModel
    from epic_ext.models import tiny
    from epic_ext.models.tiny_qwen import save_tiny_qwen

    root = tmp_path_factory.mktemp("lmms_grid")
    tiny.save_tiny_llava(root / "llava")
    save_tiny_qwen("qwen2_5_vl", root / "qwen2_5_vl")
    task = write_local_task(root / "task", n=N_DOCS)
    docs = _docs(task)
    full = _ask(ReducedModel(root / "llava", device="cpu"), docs, _hooks())
    for i, doc in enumerate(docs):
        if i % 2 == 0:
            doc["answer"] = full[i]
    assert len({d["answer"] for d in docs[::2]} & {d["answer"] for d in docs[1::2]}) == 0
    (task / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return root


def _env(root: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(root / "hf"),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def test_every_cell_scores_what_the_reduced_model_gives_alone(saved, one_thread, tmp_path, monkeypatch):
    from lmms_eval.api.metrics import exact_match_hf_evaluate

    from epic_ext.eval.grid import GridSpec, run_grid
    from epic_ext.eval.runner import ReducedModel

    for key, value in _env(saved).items():
        if key.startswith(("HF_", "TRANSFORMERS_")):
            monkeypatch.setenv(key, value)
    spec = GridSpec(model=str(saved / "llava"), methods=("dart", "fastv"), keeps=(16, 4), tasks=("epic_vqa", "epic_vqa_mc"),
                    include_path=str(saved / "task"), layer=1, batch_size=4, device="cpu")
    report = run_grid(spec, tmp_path / "out", progress=False, log=lambda *_: None)

    docs, hooks = _docs(saved / "task"), _hooks()
    runner = ReducedModel(saved / "llava", device="cpu")
    cells = {c["cell"]["name"]: c for c in report["cells"]}
    assert sorted(cells) == sorted(["full", "dart@16", "dart@4", "fastv@16", "fastv@4"])
    for cell in spec.cells():
        got = cells[cell.name]
        runner.set_method(cell.method, cell.keep, **spec.method_kwargs(cell))
        answers = _ask(runner, docs, hooks)
        expect = exact_match_hf_evaluate(answers, [d["answer"] for d in docs], ignore_case=True,
                                         ignore_punctuation=True)["exact_match"]
        assert got["scores"]["epic_vqa"]["exact_match"] == pytest.approx(expect), cell.name
        picks = []
        for d in docs:
            # lmms-eval picks the least mean loss per continuation token
            logps = [total / n for total, _, _, n in
                     (runner.loglikelihood(hooks.doc_to_text(d), f" {c}", hooks.doc_to_visual(d)) for c in d["choices"])]
            picks.append(max(range(len(logps)), key=logps.__getitem__) == d["label"])
        assert got["scores"]["epic_vqa_mc"]["acc"] == pytest.approx(sum(picks) / len(picks)), cell.name
        assert got["samples"] == {"epic_vqa": N_DOCS, "epic_vqa_mc": N_DOCS}
        eff = got["efficiency"]
        assert eff["requests"] == N_DOCS and eff["mean_visual_tokens"] == 576
        assert eff["mean_visual_tokens_kept"] == (576 if cell.method == "none" else cell.keep)
        assert eff["mean_kv_bytes"] > 0 and eff["mean_prefill_ms"] > 0
    assert cells["full"]["scores"]["epic_vqa"]["exact_match"] == pytest.approx(0.5)
    assert cells["dart@4"]["efficiency"]["mean_kv_bytes"] < cells["full"]["efficiency"]["mean_kv_bytes"]


def test_the_command_end_to_end_and_its_reuse(saved, tmp_path):
    """`epic-ext eval` on Qwen2.5-VL: JSON, table and plot; run again, nothing is evaluated."""
    out = tmp_path / "eval"
    argv = [sys.executable, "-m", "epic_ext.cli", "eval", "--model", str(saved / "qwen2_5_vl"), "--methods",
            "dart", "--keep", "8,4", "--tasks", "epic_vqa", "--include-path", str(saved / "task"), "--limit", "4",
            "--batch-size", "3", "--layer", "1", "--device", "cpu", "--out", str(out)]
    first = subprocess.run(argv, env=_env(saved), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads((out / "eval.json").read_text())
    assert [c["cell"]["name"] for c in report["cells"]] == ["full", "dart@8", "dart@4"]
    for cell in report["cells"]:
        assert 0 <= cell["scores"]["epic_vqa"]["exact_match"] <= 1 and cell["samples"] == {"epic_vqa": 4}
        per_layer = cell["efficiency"]["mean_visual_tokens_per_layer"]
        keep = cell["cell"]["keep"]
        assert per_layer[0] > 8 and per_layer[-1] == (per_layer[0] if keep is None else keep)
    table = (out / "eval.md").read_text()
    assert "| dart@4 |" in table and "epic_vqa exact_match" not in table and "exact_match" in table
    assert (out / "eval.png").read_bytes()[:4] == b"\x89PNG"
    assert "DEBUG" not in first.stderr           # lmms-eval's task-indexing log is cut to warnings
    again = subprocess.run(argv, env=_env(saved), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing 3 finished cell(s)" in again.stdout
    assert json.loads((out / "eval.json").read_text())["cells"][1]["scores"] == report["cells"][1]["scores"]


def test_an_unknown_task_is_one_line(saved, tmp_path):
    argv = [sys.executable, "-m", "epic_ext.cli", "eval", "--model", str(saved / "llava"), "--methods", "dart",
            "--keep", "8", "--tasks", "no_such_task", "--out", str(tmp_path / "o")]
    run = subprocess.run(argv, env=_env(saved), capture_output=True, text=True, timeout=600)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == "epic-ext eval: error: tasks: lmms-eval has no task 'no_such_task'"


def test_the_installed_package_registers_the_entry_point():
    """Where epic-ext is installed (`make build`: pip install -e .), a stock lmms-eval finds it."""
    from importlib.metadata import PackageNotFoundError, distribution, entry_points
    try:
        distribution("epic-ext")
    except PackageNotFoundError:
        pytest.skip("epic-ext is not installed in this environment (only on PYTHONPATH)")
    found = [e for e in entry_points(group="lmms_eval.models") if e.name == "epic_ext"]
    assert [e.value for e in found] == ["epic_ext.eval:lmms_manifest"]
    code = "from lmms_eval.models import get_model; print(get_model('epic_ext').__name__)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0 and run.stdout.strip().splitlines()[-1] == "EpicExt", run.stderr[-2000:]


@pytest.mark.slow
def test_two_processes_run_the_grid_once(saved, tmp_path):
    """torchrun, 2 CPU processes (gloo): both ranks walk rank 0's list of cells; the scores and
    efficiency cover every document once; a second launch reuses every cell."""
    out = tmp_path / "eval"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
              "--master_port", str(29900 + os.getpid() % 90)]
    argv = [*launch, "-m", "epic_ext.cli", "eval", "--model", str(saved / "llava"), "--methods", "dart",
            "--keep", "16", "--tasks", "epic_vqa", "--include-path", str(saved / "task"), "--batch-size", "2",
            "--layer", "1", "--device", "cpu", "--out", str(out), "--quiet"]
    first = subprocess.run(argv, env=_env(saved), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    report = json.loads((out / "eval.json").read_text())
    assert [c["cell"]["name"] for c in report["cells"]] == ["full", "dart@16"]
    for cell in report["cells"]:
        assert cell["samples"] == {"epic_vqa": N_DOCS} and cell["efficiency"]["requests"] == N_DOCS
    full = report["cells"][0]["scores"]["epic_vqa"]["exact_match"]
    assert full == pytest.approx(0.5)          # the same as in one process (the crafted answers)
    again = subprocess.run(argv, env=_env(saved), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "reusing 2 finished cell(s)" in again.stdout, again.stderr[-3000:]
