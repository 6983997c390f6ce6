"""VLMEvalKit shim (issue 13): ``EpicExtVLM`` answers as ``ReducedModel`` does, ``register_vlmeval``
puts a working constructor into ``supported_VLM``, the launcher runs ``run.main()`` on it, the
``vlmeval`` harness runs a grid through ``run_grid``, and bad arguments are ValueErrors naming them.

VLMEvalKit is not on PyPI and its repository is not reachable here: the tests run against
``vlmeval_standin/``, a minimal package with the names and signatures of VLMEvalKit's interface
(commit e8e78f05) that the shim uses, put on ``sys.path`` for this module only. The dataset is the
offline synthetic VQA task as a VLMEvalKit custom multiple-choice TSV (``write_vlmeval_task``)."""
import json
import sys
from pathlib import Path

import pytest

STANDIN = Path(__file__).resolve().parent / "vlmeval_standin"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shim():
    """epic_ext.eval.vlmeval imported against the stand-in; both are forgotten afterwards, so
    nothing else sees the stand-in."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(STANDIN))
        mp.setenv("PRED_FORMAT", "tsv")
        for name in [m for m in sys.modules if m == "vlmeval" or m.startswith("vlmeval.")]:
            mp.delitem(sys.modules, name)
        import vlmeval
        assert vlmeval.__version__.endswith("standin")
        import epic_ext.eval.vlmeval as shim
        yield shim
        for name in [m for m in sys.modules if m == "vlmeval" or m.startswith("vlmeval.")
                     or m in ("epic_ext.eval.vlmeval", "vlmevalkit_run")]:
            sys.modules.pop(name, None)
        import epic_ext.eval
        if hasattr(epic_ext.eval, "vlmeval"):
            delattr(epic_ext.eval, "vlmeval")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, shim):
    """Tiny LLaVA and Qwen2.5-VL checkpoints and the synthetic task as LMUData/epic_vqa.tsv."""
    from epic_ext.models import tiny
    from epic_ext.models.tiny_qwen import save_tiny_qwen

    root = tmp_path_factory.mktemp("vlmeval")
    tiny.save_tiny_llava(root / "llava")
    save_tiny_qwen("qwen2_5_vl", root / "qwen2_5_vl")
    shim.write_vlmeval_task(root / "LMUData", n=5)
    return root


@pytest.fixture
def data_root(saved, monkeypatch):
    monkeypatch.setenv("LMUData", str(saved / "LMUData"))
    return saved / "LMUData"


def _rows(root: Path) -> list:
    with open(root / "LMUData" / "epic_vqa_files" / "data.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("family,method,keep", [("llava", "fastv", 0.25), ("qwen2_5_vl", "dart", 8)])
def test_generate_inner_answers_as_the_runner(saved, shim, family, method, keep):
    """BaseModel.generate -> generate_inner gives ReducedModel.generate's answer to the same
    question and image; a batch gives each message's answer alone; one record per request."""
    from PIL import Image
    from epic_ext.eval.runner import ReducedModel

    rows = _rows(saved)[:3]
    vlm = shim.EpicExtVLM(str(saved / family), method=method, keep=keep, layer=2, device="cpu", max_new_tokens=4)
    runner = ReducedModel(str(saved / family), method=method, keep=keep, layer=2, device="cpu")
    for r in rows[:2]:
        alone = vlm.generate([dict(type="image", value=r["image"]), dict(type="text", value=r["question"])],
                             dataset="epic_vqa")
        with Image.open(r["image"]) as im:
            expected = runner.generate([r["question"]], [[im.convert("RGB")]], max_new_tokens=4)[0]
        assert alone == expected
    assert [rec["dataset"] for rec in vlm.runner.records] == ["epic_vqa"] * 2
    messages = [[r["image"], r["question"]] for r in rows]            # list-of-str messages: paths become images
    batch = vlm.generate_batch(messages, dataset="epic_vqa", meta=[{"index": i} for i in range(3)])
    assert batch == [vlm.generate([r["image"], r["question"]]) for r in rows]
    assert [rec.get("index") for rec in vlm.runner.records[2:5]] == [0, 1, 2]
    assert vlm.runner.records[2]["visual_tokens_per_layer"][-1] < vlm.runner.records[2]["visual_tokens_per_layer"][0]


def test_register_puts_a_working_constructor(saved, shim):
    import functools
    import vlmeval.config

    name = shim.register_vlmeval("epic_ext_fastv", model_path=saved / "llava", method="fastv", keep=0.25,
                                 layer=2, device="cpu", max_new_tokens=3)
    entry = vlmeval.config.supported_VLM[name]
    assert name == "epic_ext_fastv" and isinstance(entry, functools.partial) and entry.func is shim.EpicExtVLM
    model = entry()                                                  # what run.py / infer_data do
    assert (model.runner.method, model.runner.keep, model.max_new_tokens) == ("fastv", 0.25, 3)
    r = _rows(saved)[0]
    assert isinstance(model.generate([r["image"], r["question"]], dataset="epic_vqa"), str)
    shim.register_vlmeval("epic_ext_fastv", model_path=saved / "llava", method="dart", keep=8)   # re-register: ok
    assert vlmeval.config.supported_VLM["epic_ext_fastv"].keywords["method"] == "dart"
    vlmeval.config.supported_VLM["SomeOtherVLM"] = functools.partial(dict)
    with pytest.raises(ValueError, match="name: 'SomeOtherVLM' is already"):
        shim.register_vlmeval("SomeOtherVLM", model_path=saved / "llava")


def test_launcher_runs_run_main(saved, shim, data_root, tmp_path, monkeypatch, capsys):
    """python -m epic_ext.eval.vlmeval ... -- <run.py args>: registers epic_ext_dart8 and runs the
    checkout's run.main() (the stand-in's), which builds it by name and scores the dataset."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    shim.main(["--model-path", str(saved / "qwen2_5_vl"), "--method", "dart", "--keep", "8", "--layer", "2",
               "--option", "device=cpu", "--option", "max_new_tokens=3", "--vlmeval-root", str(STANDIN),
               "--", "--data", "epic_vqa", "--work-dir", str(tmp_path)])
    result = json.loads((tmp_path / "epic_ext_dart8" / "epic_ext_dart8_epic_vqa_acc.json").read_text())
    assert 0.0 <= result[0]["Overall"] <= 1.0 and result[0]["split"] == "none"
    predictions = (tmp_path / "epic_ext_dart8" / "epic_ext_dart8_epic_vqa.tsv").read_text().splitlines()
    assert len(predictions) == 1 + 5 and '"prediction"' in predictions[0]
    with pytest.raises(SystemExit):
        shim.main(["--model-path", str(saved / "llava"), "--vlmeval-root", str(STANDIN), "--",
                   "--data", "epic_vqa", "--model", "SomethingElse"])
    assert "--model: the run.py arguments name ['SomethingElse']" in capsys.readouterr().err


def test_harness_grid(saved, shim, tmp_path):
    """run_grid with the vlmeval harness: the baseline and FastV cells, the first 4 rows in batches
    of 3, scores from the dataset's evaluate, prediction files, efficiency per cell."""
    from epic_ext.eval.grid import GridSpec, run_grid

    spec = GridSpec(model=str(saved / "llava"), methods=("fastv",), keeps=(0.25,), tasks=("epic_vqa",),
                    harness="vlmeval", include_path=str(saved / "LMUData"), batch_size=3, limit=4, device="cpu",
                    max_new_tokens=3, layer=2)
    harness = shim.VLMEvalHarness(spec, work_dir=tmp_path / "work")
    assert harness.version() == {"vlmeval": "0.2rc1-standin"}
    report = run_grid(spec, tmp_path / "out", harness=harness, progress=False, log=lambda *a: None)
    cells = {c["cell"]["name"]: c for c in report["cells"]}
    assert set(cells) == {"full", "fastv@0.25"}
    for cell in cells.values():
        scores = cell["scores"]["epic_vqa"]
        assert 0.0 <= scores["Overall"] <= 1.0 and len(scores) > 1      # Overall + question types
        assert cell["samples"] == {"epic_vqa": 4} and cell["efficiency"]["requests"] == 4
        rows = Path(cell["predictions"]["epic_vqa"]).read_text().splitlines()
        assert len(rows) == 1 + 4
    assert cells["fastv@0.25"]["efficiency"]["mean_visual_tokens_kept"] == 144
    assert cells["full"]["efficiency"]["mean_visual_tokens_kept"] == 576
    assert (tmp_path / "out" / "eval.json").is_file()
    # The same harness scores a cell again from fresh files.
    again = harness.evaluate(spec.cells()[1], spec.method_kwargs(spec.cells()[1]))
    assert again["scores"] == cells["fastv@0.25"]["scores"]


def test_flatten_scores(shim):
    from vlmeval._frame import Frame
    assert shim.flatten_scores({"Overall": 0.5, "sub": {"a": 1, "b": "x", "c": float("nan")}, "n": [3]}) == {
        "Overall": 0.5, "sub/a": 1.0, "n": 3.0}
    one = Frame({"split": ["none"], "Overall": [0.25], "count": ["0.5"]})
    assert shim.flatten_scores(one) == {"Overall": 0.25, "count": 0.5}
    two = Frame({"split": ["dev", "test"], "Overall": [0.1, 0.2]})
    assert shim.flatten_scores(two) == {"dev/Overall": 0.1, "test/Overall": 0.2}
    assert shim.flatten_scores(None) == {} and shim.flatten_scores(0.75) == {"score": 0.75}


def test_bad_arguments(saved, shim, tmp_path):
    from epic_ext.eval.grid import GridSpec

    llava = saved / "llava"
    cases = [(dict(name="", model_path=llava), "name"), (dict(name="a b", model_path=llava), "name"),
             (dict(model_path=tmp_path), "model_path"), (dict(model_path=llava, method="nope"), "method"),
             (dict(model_path=llava, method="fastv", keep=[1]), "keep"),
             (dict(model_path=llava, method="fastv", keep=8, lyer=2), "options: lyer")]
    for kwargs, what in cases:
        with pytest.raises(ValueError, match=what):
            shim.register_vlmeval(**kwargs)
    with pytest.raises(ValueError, match="max_new_tokens"):
        shim.EpicExtVLM(str(llava), max_new_tokens=0)
    with pytest.raises(ValueError, match="use_vllm"):
        shim.EpicExtVLM(str(llava), use_vllm=True)
    vlm = shim.EpicExtVLM(str(llava), device="cpu", max_new_tokens=2)
    with pytest.raises(ValueError, match="message"):
        vlm.generate_batch([[dict(type="video", value="clip.mp4")]])
    with pytest.raises(ValueError, match="message"):
        vlm.generate_inner([dict(type="audio", value="x")])
    with pytest.raises(ValueError, match="meta"):
        vlm.generate_batch([["a question"]], meta=[{}, {}])

    def spec(**kw):
        return GridSpec(**{**dict(model=str(llava), methods=(), keeps=(), tasks=("epic_vqa",), harness="vlmeval",
                                  include_path=str(saved / "LMUData"), device="cpu"), **kw})
    with pytest.raises(ValueError, match="tasks: VLMEvalKit has no dataset 'nope'"):
        shim.VLMEvalHarness(spec(tasks=("nope",)))
    with pytest.raises(ValueError, match="tasks: 'Video-StandIn' is a VIDEO"):
        shim.VLMEvalHarness(spec(tasks=("Video-StandIn",)))
    with pytest.raises(ValueError, match="include_path"):
        shim.VLMEvalHarness(spec(include_path=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="judge_args"):
        shim.VLMEvalHarness(spec(model_args={"judge_args": "nproc=4"}))
    with pytest.raises(ValueError, match="--vlmeval-root"):
        shim.find_run_py(tmp_path)
