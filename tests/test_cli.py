"""The `epic-ext` command line, run as a user runs it: the installed entry point in a subprocess
(exit status and message), plus a few in-process checks of what a subprocess cannot show."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENTRY = Path(sys.executable).with_name("epic-ext")


def run_cli(*args, cwd=None, env=None, timeout=300):
    if not ENTRY.exists():
        pytest.skip(f"{ENTRY} is not installed (pip install -e .)")
    full_env = {k: v for k, v in os.environ.items() if k not in ("EPIC_EXT_DEBUG", "EPIC_EXT_BENCH_DIR")}
    full_env.update(env or {})
    return subprocess.run([str(ENTRY), *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=full_env, timeout=timeout)


def assert_one_line_error(res, command: str, pattern: str):
    import re
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert "Traceback" not in res.stderr, res.stderr
    assert lines and lines[-1].startswith(f"epic-ext {command}: error: "), res.stderr
    assert re.search(pattern, lines[-1]), lines[-1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from PIL import Image
    import numpy as np
    d = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((40, 52, 3)) * 255).astype("uint8")).save(d / "a.png")
    (d / "bad.png").write_text("not an image")
    (d / "ckpt").mkdir()
    (d / "ckpt" / "config.json").write_text("{}")
    return d


# --------------------------------------------------------------------------- light and fast

def test_help_does_not_import_torch():
    code = ("import sys\nfrom epic_ext.cli import main\n"
            "for argv in (['--help'], ['infer', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules, file=sys.stderr)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip().splitlines()[-1] == "False"
    text = " ".join(res.stdout.split())
    assert "--clip" in text and "one per --prompt, or one for all prompts" in text


def test_lazy_package_attributes():
    code = ("import sys, epic_ext\nassert 'torch' not in sys.modules\n"
            "from epic_ext import compress, kl_div\nimport epic_ext.ops\n"
            "assert epic_ext.compress is epic_ext.ops.compress is compress\n"
            "assert epic_ext.reference.gather_merge and 'backends' in dir(epic_ext)\n"
            "assert epic_ext.backends()['reference']['available']")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("args, pattern", [
    (["--model", "/no/such/folder"], r"--model: '/no/such/folder' is neither a tiny preset"),
    (["--image", "{d}/missing.png"], r"--image: no such file: .*missing\.png"),
    (["--image", "{d}/bad.png"], r"--image: .*bad\.png: not a readable image"),
    (["--image", "{d}/a.png", "--image", "{d}/a.png", "--prompt", "x", "--prompt", "y", "--prompt", "z"],
     r"got 2 images and 3 prompts; give one image per prompt, or one image for all prompts"),
    (["--model", "{d}/ckpt", "--prompt", "x"], r"--image: a checkpoint needs an image file"),
    (["--keep", "lots"], r"--keep: a count"),
    (["--keep", "1.5"], r"--keep: a count >= 0 or a ratio in \[0, 1\], got 1\.5"),
    (["--option", "sign"], r"--option: expected NAME=VALUE, got 'sign'"),
    (["--method", "trim", "--option", "scorer=clip"], r"--option scorer: .*--clip PATH"),
    (["--method", "trim", "--model", "{d}/ckpt", "--image", "{d}/a.png"], r"--method trim: needs --clip PATH"),
    (["--method", "dart", "--clip", "{d}"], r"--clip: only --method trim"),
    (["--method", "trim", "--clip", "{d}/nowhere"], r"--clip: .*nowhere: no such folder"),
    (["--max-new-tokens", "0"], r"--max-new-tokens: must be >= 1"),
    (["--temperature", "nan"], r"--temperature: must be a finite number > 0"),
])
def test_infer_mistakes_are_one_line(files, args, pattern):
    """Checked before torch is imported: each takes a fraction of a second, and none prints a
    traceback or mentions the hub ("Repo id must be in the form ...")."""
    res = run_cli("infer", *[a.format(d=files) for a in args], timeout=60)
    assert_one_line_error(res, "infer", pattern)
    assert "Repo id" not in res.stderr


def test_debug_shows_the_traceback(files):
    for argv, env in ((["--debug", "infer"], None), (["infer", "--debug"], None),
                      (["infer"], {"EPIC_EXT_DEBUG": "1"})):
        res = run_cli(*argv, "--image", files / "missing.png", env=env, timeout=60)
        assert res.returncode == 2
        assert "Traceback" in res.stderr and "FileNotFoundError" in res.stderr
        assert res.stderr.strip().splitlines()[-1].startswith("epic-ext infer: error: --image")


def test_demo_quick_help_is_not_seconds():
    res = run_cli("demo", "--help", timeout=60)
    assert res.returncode == 0 and "--quick" in res.stdout
    assert "seconds-long" not in res.stdout and "under a minute" in res.stdout


# --------------------------------------------------------------------------- bench

def test_package_does_not_import_benchmarks():
    """The installed package holds epic_ext only; nothing in it imports the benchmarks folder."""
    for path in (ROOT / "epic_ext").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not any(n.split(".")[0] == "benchmarks" for n in names), path
    setup = (ROOT / "setup.py").read_text()
    line = next(ln for ln in setup.splitlines() if "packages=" in ln)
    assert "benchmarks" not in line.split("#")[0]


def test_results_dir(tmp_path, monkeypatch):
    from epic_ext.machine import results_dir
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EPIC_EXT_BENCH_DIR", raising=False)
    assert results_dir() == tmp_path / "benchmarks" / "results"
    monkeypatch.setenv("EPIC_EXT_BENCH_DIR", "elsewhere")
    assert results_dir() == tmp_path / "elsewhere"
    assert results_dir(tmp_path / "given") == tmp_path / "given"


def test_bench_runs_the_checkout_benchmarks_in_a_subprocess(tmp_path):
    res = run_cli("bench", "--list", cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    assert {"compress", "iqr", "kl"} <= set(res.stdout.split())
    assert not any(tmp_path.iterdir())          # --list writes nothing


def test_bench_out_and_missing_checkout(tmp_path, monkeypatch, capsys):
    from epic_ext import cli
    seen = {}

    def fake_call(cmd, env):
        seen.update(cmd=cmd, env=env)
        return 0

    monkeypatch.setattr(subprocess, "call", fake_call)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "--quick", "--out", "res", "--only", "iqr"]) == 0
    assert seen["cmd"][1:] == ["-m", "benchmarks", "--quick", "--only", "iqr"]
    assert seen["env"]["EPIC_EXT_BENCH_DIR"] == str(tmp_path / "res")
    assert seen["env"]["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)
    monkeypatch.setattr(cli, "find_benchmarks", lambda: None)
    assert cli.main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("epic-ext bench: error: the benchmarks are not part of the installed package")


def test_frac_copy_hidden_when_not_meaningful():
    from benchmarks import harness
    row = {"case": "iqr B=64", "provider": "epic-ext", "median_ms": 0.088, "min_ms": 0.08, "speedup": 11.2,
           "gbps": 5.0, "frac_copy": 51.79, "check": "ok"}
    assert harness.frac_copy(row) is None
    assert "5179%" not in harness.format_row(row) and "5179%" not in harness.side_by_side([row])
    assert harness.frac_copy(dict(row, frac_copy=0.45)) == 0.45


# --------------------------------------------------------------------------- runs (seconds each)

def test_infer_one_image_for_every_prompt(files):
    """The crash of issue 11: one image, two prompts -> two requests on the same image."""
    res = run_cli("infer", "--model", "tiny", "--image", files / "a.png", "--prompt", "a", "--prompt", "b",
                  "--max-new-tokens", "2", "--json")
    assert res.returncode == 0, res.stderr
    reports = json.loads(res.stdout)
    assert len(reports) == 2 and all(r["batch_size"] == 2 for r in reports)
    assert "no warm-up run on the CPU" in res.stderr
    assert "loaded tiny (float32, cpu)" in res.stderr and "prefill" in res.stderr


def _tiny_clip(folder: Path, vision_hidden: int = 64):
    """A two-tower CLIP checkpoint + its BPE tokenizer, built offline (letters only)."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    folder.mkdir()
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({c + "</w>": 26 + i for i, c in enumerate(letters)})
    vocab.update({"<|startoftext|>": 52, "<|endoftext|>": 53})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)
    cfg = CLIPConfig(text_config=dict(vocab_size=54, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=77, bos_token_id=52,
                                      eos_token_id=53, pad_token_id=53),
                     vision_config=dict(hidden_size=vision_hidden, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=28, patch_size=14),
                     projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPModel(cfg).save_pretrained(folder)
    return folder


def test_infer_trim_with_clip(tmp_path):
    clip = _tiny_clip(tmp_path / "clip")
    res = run_cli("infer", "--model", "tiny", "--method", "trim", "--clip", clip, "--prompt", "what is it",
                  "--max-new-tokens", "2", "--json")
    assert res.returncode == 0, res.stderr
    (r,) = json.loads(res.stdout)
    assert r["method"] == "trim" and r["visual_tokens_per_layer"][0] < 576


def test_infer_trim_default_tiny_scorer_and_clip_mismatch(tmp_path, capsys):
    from epic_ext.cli import main
    assert main(["infer", "--method", "trim", "--max-new-tokens", "2", "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)[0]["method"] == "trim" and "offline random tiny CLIP" in out.err
    clip = _tiny_clip(tmp_path / "clip32", vision_hidden=32)
    assert main(["infer", "--method", "trim", "--clip", str(clip)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("epic-ext infer: error: --clip: its vision width 32 differs")


def test_model_level_mistakes_are_one_line(capsys):
    """Checks that need the method registry or the model's config, still before any weights load."""
    from epic_ext.cli import main
    for argv, pattern in ((["--method", "nope"], "method: unknown method 'nope'"),
                          (["--method", "dart", "--layer", "9"], "--layer: a decoder layer in [0, 3]"),
                          (["--method", "fastv", "--layer", "-1"], "--layer: a decoder layer in [0, 3]"),
                          (["--method", "dart", "--option", "foo=1"], "has no option(s) ['foo']"),
                          (["--method", "visionzip", "--layer", "2"], "--layer: visionzip reduces before")):
        assert main(["infer", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("epic-ext infer: error: ") and pattern in err[0], err


def test_checkpoint_defaults_on_cpu(tmp_path):
    """A local checkpoint loads in float32 on a CPU (bf16 is several times slower there) and the
    default warm-up is none; a missing folder is named as such, not taken for a hub repo id."""
    import torch

    from epic_ext.inference import default_dtype, default_warmup
    from epic_ext.models import tiny
    assert default_dtype("cpu", checkpoint=True) == torch.float32 and default_warmup("cpu") == 0
    assert default_dtype("cuda", checkpoint=True) == torch.bfloat16 and default_warmup("cuda") == 1
    tiny.build_tiny_llava("tiny", text_layers=1, vision_layers=1).save_pretrained(tmp_path / "m")
    assert tiny.load_llava(tmp_path / "m").dtype == torch.float32
    with pytest.raises(FileNotFoundError, match="no such folder"):
        tiny.load_llava(tmp_path / "nothing")


def test_info_says_triton_needs_the_interpreter_on_cpu():
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    res = run_cli("info", env={"TRITON_INTERPRET": "0"})
    assert res.returncode == 0, res.stderr
    line = next(ln for ln in res.stdout.splitlines() if ln.strip().startswith("triton"))
    if " yes " in line:
        assert "CPU tensors need TRITON_INTERPRET=1" in line


def test_checkpoint_without_processor(files, tmp_path):
    """A checkpoint folder without its processor: one line naming the folder and the processor,
    before the weights load."""
    from epic_ext.models import tiny
    tiny.build_tiny_llava("tiny", text_layers=1, vision_layers=1).save_pretrained(tmp_path / "m")
    res = run_cli("infer", "--model", tmp_path / "m", "--image", files / "a.png")
    assert_one_line_error(res, "infer", r"m: cannot load the processor saved with the model")
    assert "running in float32 on the CPU" in res.stderr
