"""`make gpu-check` (benchmarks/gpu_check.py) without a GPU: the dry run, and the driver's step
handling (time limits, failures, the summary printed last, the files left under $OUT)."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_without_a_gpu_lists_the_steps_and_exits_0():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "no CUDA device is visible" in r.stdout
    for name in ("build", "liger", "goals", "test-gpu", "bench-compress", "bench-kl", "report",
                 "memcheck"):
        assert f"\n{name} " in r.stdout, name
    assert "EPIC_EXT_CUDA=1" in r.stdout and "EPIC_EXT_TEST_GPU=1" in r.stdout
    assert "compute-sanitizer --tool memcheck" in r.stdout


def test_unknown_step_in_skip_is_an_error():
    with pytest.raises(SystemExit, match="unknown step"):
        gpu_check.main(["--skip", "nope", "--list"])


def test_step_time_limit_and_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "LOG_DIR", tmp_path)
    slow = gpu_check.Step("slow", [sys.executable, "-c", "import time; time.sleep(60)"], 1)
    gpu_check.run_step(slow, 100, {})
    assert slow.status == "TIMEOUT" and slow.seconds < 20
    bad = gpu_check.Step("bad", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], 30)
    gpu_check.run_step(bad, 100, {})
    assert bad.status == "FAILED" and bad.note == "exit 3"
    assert "boom" in (tmp_path / "bad.log").read_text()
    late = gpu_check.Step("late", [sys.executable, "-c", "pass"], 30)
    gpu_check.run_step(late, 2, {})  # the run's budget is spent
    assert late.status == "skipped" and "out of time" in late.note


def test_driver_runs_every_step_and_prints_the_summary_last(tmp_path, monkeypatch, capsys):
    """A fake GPU and three trivial steps: a failing step does not stop the next one, the
    summary table is the last thing printed, and $OUT gets the log, summary and archive."""
    monkeypatch.setattr(gpu_check, "LOG_DIR", tmp_path / "logs")
    monkeypatch.setattr(gpu_check, "_gpu_name", lambda: "Fake GPU")
    py = sys.executable
    goals = [{"goal": "g0", "backend": "cuda", "value": 0.9, "target": ">= 0.80", "pass": True,
              "note": ""}]
    write_goals = (f"import json, pathlib; p = pathlib.Path({str(tmp_path / 'logs')!r}); "
                   f"p.mkdir(exist_ok=True); (p / 'goals.json').write_text(json.dumps({goals!r}))")
    monkeypatch.setattr(gpu_check, "steps", lambda python: [
        gpu_check.Step("build", [py, "-c", "print('built')"], 30, needs_build=False),
        gpu_check.Step("test-gpu", [py, "-c", "import sys; sys.exit(1)"], 30),
        gpu_check.Step("goals", [py, "-c", write_goals], 30),
    ])
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    rc = gpu_check.main(["--budget", "100"])
    out = capsys.readouterr().out
    assert rc == 1  # a step failed
    tail = out[out.index("== gpu-check on Fake GPU"):]
    assert "test-gpu" in tail and "FAILED" in tail and "PASS" in tail
    assert tail.rstrip().splitlines()[-1].startswith("g0")  # the goal table ends the output
    summary = json.loads((tmp_path / "out" / "gpu_check_summary.json").read_text())
    assert [s["status"] for s in summary["steps"]] == ["ok", "FAILED", "ok"]
    assert "built" in (tmp_path / "out" / "gpu_check.log").read_text()
    with tarfile.open(tmp_path / "out" / "gpu_results.tar.gz") as tar:
        assert "gpu_check/build.log" in tar.getnames()


def test_benchmarks_gpu_preset_selects_the_preset_benchmarks(capsys):
    from benchmarks.__main__ import main
    assert main(["--gpu", "--list"]) == 0
    assert capsys.readouterr().out.split() == sorted(gpu_check.PRESETS)
