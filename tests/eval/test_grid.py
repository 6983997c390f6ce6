"""`epic-ext eval`'s grid (epic_ext/eval/grid.py, report.py, cli_eval.py) with a stand-in harness:
the cells (baseline + methods x budgets), reuse of finished cells by key (an extended grid runs
only its new cells; a changed setting, a retrained model or a damaged file reruns), what a rank
other than 0 writes, the JSON / table / plot, and the command line's one-line errors.
The harnesses themselves: test_lmms_grid.py (lmms-eval), test_local_harness.py, test_vlmeval.py.
"""
import json
import os

import pytest

from epic_ext.eval import grid
from epic_ext.eval.grid import Cell, GridSpec, run_grid
from epic_ext.eval.report import format_table

N_VISUAL = 576


class StandInHarness:
    """Scores and efficiency that are a known function of the cell; counts its calls."""

    def __init__(self, spec=None):
        self.calls = []
        self.device = "cpu"

    @staticmethod
    def version():
        return {"stand_in": 1}

    def evaluate(self, cell, method_kwargs):
        self.calls.append((cell, dict(method_kwargs)))
        kept = N_VISUAL if cell.method == "none" else cell.keep
        score = kept / N_VISUAL if cell.method != "fastv" else kept / N_VISUAL / 2
        return {"scores": {"task_a": {"exact_match": score}, "task_b": {"acc": 1 - score}},
                "samples": {"task_a": 3, "task_b": 4},
                "efficiency": {"requests": 3, "mean_visual_tokens": N_VISUAL, "mean_visual_tokens_kept": kept,
                               "mean_kv_bytes": 2**20 * kept / 64, "mean_prefill_flops": 1e9 * kept / 64,
                               "mean_prefill_ms": kept / 10, "mean_decode_ms_per_token": 1.5,
                               "mean_visual_tokens_per_layer": [N_VISUAL, kept]}}


@pytest.fixture()
def model_dir(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llava"}))
    (folder / "model.safetensors").write_bytes(os.urandom(64))
    return folder


def _spec(model_dir, **changes):
    base = dict(model=str(model_dir), methods=("dart", "fastv"), keeps=(64, 16), tasks=("task_a", "task_b"),
                harness="local", layer=2)
    return GridSpec(**{**base, **changes})


def _names(calls):
    return [c.name for c, _ in calls]


def test_grid_runs_every_cell_once_and_writes_json_table_plot(model_dir, tmp_path):
    h = StandInHarness()
    report = run_grid(_spec(model_dir), tmp_path / "out", harness=h, progress=False, log=lambda *_: None)
    assert _names(h.calls) == ["full", "dart@64", "dart@16", "fastv@64", "fastv@16"]
    out = tmp_path / "out"
    saved = json.loads((out / "eval.json").read_text())
    assert saved == json.loads(json.dumps(report, default=str))
    by_name = {c["cell"]["name"]: c for c in saved["cells"]}
    assert by_name["dart@16"]["scores"]["task_a"]["exact_match"] == pytest.approx(16 / 576)
    assert by_name["fastv@64"]["efficiency"]["mean_visual_tokens_kept"] == 64
    assert not any(c["reused"] for c in saved["cells"])
    assert saved["machine"]["device_type"] == "cpu" and saved["spec"]["methods"] == ["dart", "fastv"]
    assert sorted(p.name for p in (out / "cells").iterdir()) == sorted(
        ["none_full.json", "dart_64.json", "dart_16.json", "fastv_64.json", "fastv_16.json"])
    table = (out / "eval.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].split("|")[1:4] == [" cell ", " task_a exact_match ", " task_b acc "]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["full", "dart@64", "dart@16", "fastv@64", "fastv@16"]
    dart16 = [c.strip() for c in rows[3].split("|")[1:-1]]
    assert dart16 == ["dart@16", f"{16 / 576:.4f}", f"{1 - 16 / 576:.4f}", "576.0", "16.0", "0.25", "0.25", "1.6",
                      "1.50"]
    assert (out / "eval.png").stat().st_size > 1000
    assert (out / "eval.png").read_bytes()[:4] == b"\x89PNG"


def test_method_options_reach_only_methods_that_have_them(model_dir, tmp_path):
    h = StandInHarness()
    spec = _spec(model_dir, methods=("dart", "visionzip"), keeps=(64,), method_options={"pivot_image": 4})
    run_grid(spec, tmp_path / "out", harness=h, progress=False, log=lambda *_: None)
    kwargs = {c.name: kw for c, kw in h.calls}
    assert kwargs["full"] == {}
    assert kwargs["dart@64"]["layer"] == 2 and kwargs["dart@64"]["pivot_image"] == 4
    assert "layer" not in kwargs["visionzip@64"] and "pivot_image" not in kwargs["visionzip@64"]


def test_finished_cells_are_reused_and_only_new_cells_run(model_dir, tmp_path):
    out = tmp_path / "out"
    quiet = dict(progress=False, log=lambda *_: None)
    run_grid(_spec(model_dir), out, harness=StandInHarness(), **quiet)
    again = StandInHarness()
    report = run_grid(_spec(model_dir), out, harness=again, **quiet)
    assert again.calls == [] and all(c["reused"] for c in report["cells"])
    # a budget and a method more: only their cells
    bigger = StandInHarness()
    report = run_grid(_spec(model_dir, methods=("dart", "fastv", "random"), keeps=(64, 16, 4)), out,
                      harness=bigger, **quiet)
    assert sorted(_names(bigger.calls)) == sorted(["dart@4", "fastv@4", "random@64", "random@16", "random@4"])
    assert len(report["cells"]) == 10
    # --rerun: everything again
    rerun = StandInHarness()
    run_grid(_spec(model_dir), out, harness=rerun, rerun=True, **quiet)
    assert len(rerun.calls) == 5


@pytest.mark.parametrize("change", ["limit", "layer", "tasks", "batch_size", "retrained", "damaged", "task_files"])
def test_a_changed_setting_reruns_the_cells_it_changes(model_dir, tmp_path, change):
    out = tmp_path / "out"
    quiet = dict(progress=False, log=lambda *_: None)
    tasks = tmp_path / "tasks"
    (tasks / "task_a").mkdir(parents=True)
    (tasks / "task_a" / "data.jsonl").write_text('{"q": 1}\n')
    run_grid(_spec(model_dir, include_path=str(tasks)), out, harness=StandInHarness(), **quiet)
    spec = _spec(model_dir, include_path=str(tasks))
    expected = 5
    if change == "limit":
        spec = _spec(model_dir, include_path=str(tasks), limit=2)
    elif change == "layer":
        spec = _spec(model_dir, include_path=str(tasks), layer=3)
        expected = 4                  # the baseline has no layer
    elif change == "tasks":
        spec = _spec(model_dir, include_path=str(tasks), tasks=("task_a",))
    elif change == "batch_size":
        spec = _spec(model_dir, include_path=str(tasks), batch_size=2)
    elif change == "task_files":      # the task's data rewritten in place
        (tasks / "task_a" / "data.jsonl").write_text('{"q": 2}\n{"q": 3}\n')
    elif change == "retrained":
        weights = model_dir / "model.safetensors"
        st = weights.stat()
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    else:
        (out / "cells" / "dart_16.json").write_text('{"key": ')      # an interrupted write
        expected = 1
    h = StandInHarness()
    run_grid(spec, out, harness=h, **quiet)
    assert len(h.calls) == expected


def test_only_rank_0_writes(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    h = StandInHarness()
    report = run_grid(_spec(model_dir), tmp_path / "out", harness=h, progress=False, log=lambda *_: None)
    assert len(h.calls) == 5 and len(report["cells"]) == 5
    assert not (tmp_path / "out").exists()


def test_ratio_budgets_and_cell_names(model_dir):
    spec = _spec(model_dir, methods=("dart",), keeps=(0.25, 64))
    assert [c.name for c in spec.cells()] == ["full", "dart@0.25", "dart@64"]
    assert [c.slug for c in spec.cells()] == ["none_full", "dart_0p25", "dart_64"]
    assert Cell("none").budget == "full"
    assert [c.name for c in _spec(model_dir, baseline=False).cells()][0] == "dart@64"


@pytest.mark.parametrize("changes, match", [
    (dict(methods=("dartx",)), "methods: unknown method 'dartx'"),
    (dict(methods=("none",)), "methods: unknown method 'none'"),
    (dict(methods=("dart", "dart")), "repeated"),
    (dict(keeps=()), "keep: give at least one"),
    (dict(keeps=(0,)), "keep: a count"),
    (dict(keeps=(1.5,)), "keep: a count"),
    (dict(keeps=(True,)), "keep: a count"),
    (dict(tasks=()), "tasks: give at least one"),
    (dict(harness="helm"), "harness: one of"),
    (dict(batch_size=0), "batch_size"),
    (dict(limit=0), "limit"),
    (dict(layer=-1), "layer"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(method_options={"pivots": 4}), "method_options: 'pivots' is an option of none of dart, fastv"),
    (dict(methods=(), baseline=False), "methods: none given"),
])
def test_bad_grid_specs_name_the_argument(model_dir, changes, match):
    with pytest.raises(ValueError, match=match):
        _spec(model_dir, **changes)


def test_table_orders_cells_and_marks_missing_values():
    report = {"spec": {"methods": ["fastv", "dart"], "model": "m", "harness": "local", "tasks": ["t"]},
              "cells": [{"cell": {"method": m, "keep": k, "name": n}, "scores": {"t": {"acc": s}}, "efficiency": {}}
                        for m, k, n, s in [("dart", 8, "dart@8", 0.1), ("fastv", 64, "fastv@64", 0.5),
                                           ("none", None, "full", 0.9), ("dart", 64, "dart@64", 0.4)]]}
    rows = [r for r in format_table(report).splitlines() if r.startswith("| ") and "---" not in r][1:]
    assert [r.split("|")[1].strip() for r in rows] == ["full", "fastv@64", "dart@64", "dart@8"]
    assert rows[0].split("|")[2].strip() == "0.9000" and rows[0].split("|")[3].strip() == "-"


# --------------------------------------------------------------------------- the command line

def _cli(capsys, *argv):
    from epic_ext.cli import main
    rc = main(["eval", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err[-1] if err else ""


@pytest.mark.parametrize("argv, message", [
    (["--methods", "dart", "--keep", "64", "--tasks", "t", "--model", "/nonexistent"], "--model: /nonexistent is not a folder"),
    (["--methods", "dartx", "--keep", "64", "--tasks", "t"], "--methods: unknown method 'dartx'"),
    (["--methods", "dart", "--keep", "abc", "--tasks", "t"], "--keep: 'abc' is neither a count nor a ratio"),
    (["--methods", "dart", "--keep", "2.5", "--tasks", "t"], "--keep: a count (integer >= 1) or a ratio in (0, 1), got 2.5"),
    (["--methods", "dart", "--keep", "64", "--tasks", ","], "--tasks: give at least one task"),
    (["--methods", "dart", "--keep", "64", "--tasks", "t", "--option", "pivots"], "--option: expected NAME=VALUE"),
    (["--methods", "dart", "--keep", "64", "--tasks", "t", "--option", "pivots=4"],
     "--option: 'pivots' is an option of none of dart"),
    (["--methods", "dart", "--keep", "64", "--tasks", "t", "--model-arg", "warmup"], "--model-arg: expected NAME=VALUE"),
    (["--methods", "dart", "--keep", "64", "--tasks", "t", "--limit", "0"], "--limit: a positive count"),
    (["--methods", "dart", "--keep", "64", "--tasks", "t", "--batch-size", "0"], "--batch-size: an integer >= 1"),
    (["--methods", "dart", "--keep", "64", "--tasks", "t", "--include-path", "/nonexistent"],
     "--include-path: /nonexistent is not a folder"),
])
def test_cli_errors_are_one_line_with_status_2(capsys, model_dir, argv, message):
    if "--model" not in argv:
        argv = [*argv, "--model", str(model_dir)]
    rc, line = _cli(capsys, *argv, "--harness", "local")
    assert rc == 2
    assert line.startswith("epic-ext eval: error: ") and message in line, line


def test_cli_builds_the_spec(model_dir, monkeypatch):
    from epic_ext.cli import build_parser
    from epic_ext.cli_eval import spec_from_args
    monkeypatch.setattr(grid, "harness_class", lambda spec: StandInHarness)
    args = build_parser().parse_args(
        ["eval", "--model", str(model_dir), "--methods", "dart,fastv", "--keep", "64, 0.25", "--tasks", "a,b",
         "--harness", "local", "--layer", "3", "--option", "pivot_image=2", "--limit", "0.5", "--max-pixels", "50176",
         "--model-arg", "warmup=0", "--model-arg", "judge_args={'nproc': 4}", "--no-baseline", "--batch-size", "3"])
    spec = spec_from_args(args)
    assert (spec.methods, spec.keeps, spec.tasks, spec.layer, spec.limit, spec.batch_size) == (
        ("dart", "fastv"), (64, 0.25), ("a", "b"), 3, 0.5, 3)
    assert spec.method_options == {"pivot_image": 2} and not spec.baseline
    assert spec.model_args == {"attn_implementation": "sdpa", "max_pixels": 50176, "warmup": 0,
                               "judge_args": {"nproc": 4}}


def test_cli_names_a_missing_harness_package(capsys, model_dir, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "lmms_eval", None)          # as if not installed
    monkeypatch.setitem(grid.HARNESSES, "lmms", "epic_ext.eval.lmms:LmmsHarness")
    for name in [m for m in sys.modules if m == "epic_ext.eval.lmms"]:
        monkeypatch.delitem(sys.modules, name)
    rc, line = _cli(capsys, "--model", str(model_dir), "--methods", "dart", "--keep", "64", "--tasks", "t")
    assert rc == 2 and "harness: 'lmms' needs a package that is not installed" in line
    assert "pip install -e '.[eval]'" in line


def test_cli_rejects_an_unsupported_model_family(capsys, tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    rc, line = _cli(capsys, "--model", str(folder), "--methods", "dart", "--keep", "64", "--tasks", "t",
                    "--harness", "local")
    assert rc == 2 and "model_type 'bert' has no token-reduction integration" in line
