"""The ``local`` harness of ``epic-ext eval`` (epic_ext.eval.local): grid cells on tiny LLaVA and
Qwen2-VL checkpoints scored as a slow one-document-at-a-time computation with the stock
``generate`` scores them, reuse of finished cells, task naming, lmms-eval's exact-match reading,
``write_local_task``'s scene options; and, where lmms-eval is installed, the same scores and
per-request efficiency records as the lmms harness on the same cells."""
from __future__ import annotations

import json
import string
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from epic_ext.eval import write_local_task
from epic_ext.eval.grid import Cell, GridSpec, run_grid
from epic_ext.eval.local import LocalHarness, exact_match, limited, load_task

N_DOCS = 5        # odd: the last batch of 2 is short


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny LLaVA and Qwen2-VL checkpoints (model + processor) and a local task of 5 documents
    whose answers are made to match some of the LLaVA model's own answers (case and punctuation
    changed), so that exact match scores more than 0."""
    from epic_ext.models import tiny
    from epic_ext.models.tiny_qwen import save_tiny_qwen

    root = tmp_path_factory.mktemp("local")
    tiny.save_tiny_llava(root / "llava")
    save_tiny_qwen("qwen2_vl", root / "qwen2_vl")
    write_local_task(root / "task", n=N_DOCS, seed=3)
    docs = _docs(root)
    answers = _direct_answers(root / "llava", docs, "dart", 64, {"layer": 2})
    for i in (0, 3):
        docs[i]["answer"] = answers[i].upper() + "."
    (root / "task" / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return root


def _docs(root: Path) -> list:
    return [json.loads(line) for line in (root / "task" / "data.jsonl").read_text().splitlines()]


def _spec(root: Path, family: str = "llava", **kw) -> GridSpec:
    args = dict(model=str(root / family), methods=("dart",), keeps=(64,), tasks=(str(root / "task"),),
                harness="local", layer=2, batch_size=2, device="cpu")
    return GridSpec(**{**args, **kw})


@torch.no_grad()
def _direct_answers(folder: Path, docs: list, method: str, keep, options: dict) -> list:
    """Each document alone through the stock generate of the reduced model (the prompt built
    here, the task's generation settings: greedy, 8 new tokens, cut at a newline, stripped)."""
    from PIL import Image

    from epic_ext.models import apply
    from epic_ext.models.loading import QWEN_VL_TYPES, load_model, load_processor
    processor = load_processor(str(folder))
    model = load_model(str(folder), device=torch.device("cpu"))
    apply(model, method, keep=keep, **options)
    qwen = model.config.model_type in QWEN_VL_TYPES
    out = []
    for doc in docs:
        if qwen:
            prompt = processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": doc["question"]}]}],
                tokenize=False, add_generation_prompt=True)
        else:
            prompt = f"USER: <image>\n{doc['question']} ASSISTANT:"
        with Image.open(doc["image"]) as im:
            inputs = processor(text=[prompt], images=[im.convert("RGB")], return_tensors="pt")
        ids = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        out.append(processor.tokenizer.decode(ids, skip_special_tokens=True).split("\n")[0].strip())
    return out


def _score(answers: list, docs: list) -> float:
    """exact_match with ignore_case + ignore_punctuation, written out."""
    def norm(s):
        return "".join(ch for ch in s.lower() if ch not in string.punctuation)
    return sum(norm(a) == norm(d["answer"]) for a, d in zip(answers, docs)) / len(docs)


@pytest.fixture
def counted(monkeypatch):
    """The cells LocalHarness.evaluate is called with."""
    calls = []
    evaluate = LocalHarness.evaluate

    def counting(self, cell, method_kwargs):
        calls.append(cell)
        return evaluate(self, cell, method_kwargs)
    monkeypatch.setattr(LocalHarness, "evaluate", counting)
    return calls


def test_grid_scores_equal_a_direct_computation_and_cells_are_reused(saved, tmp_path, counted, one_thread):
    spec = _spec(saved, methods=("dart", "fastv"), keeps=(64,))
    report = run_grid(spec, tmp_path, progress=False, log=lambda m: None)
    assert [c.name for c in counted] == ["full", "dart@64", "fastv@64"]
    docs = _docs(saved)
    cells = {c["cell"]["name"]: c for c in report["cells"]}
    for name, method, keep in (("full", "none", None), ("dart@64", "dart", 64), ("fastv@64", "fastv", 64)):
        direct = _direct_answers(saved / "llava", docs, method, keep, {"layer": 2} if keep else {})
        cell = cells[name]
        assert cell["scores"] == {"epic_vqa": {"exact_match": pytest.approx(_score(direct, docs))}}, name
        assert cell["samples"] == {"epic_vqa": N_DOCS}
        eff = cell["efficiency"]
        assert eff["requests"] == N_DOCS and eff["method"] == method
        assert eff["mean_visual_tokens_kept"] == (576 if keep is None else keep)
    assert cells["dart@64"]["scores"]["epic_vqa"]["exact_match"] >= 2 / N_DOCS     # the planted answers
    # the same grid again: nothing evaluated; a budget added: only its cells
    counted.clear()
    again = run_grid(spec, tmp_path, progress=False, log=lambda m: None)
    assert counted == [] and all(c["reused"] for c in again["cells"])
    assert [c["scores"] for c in again["cells"]] == [c["scores"] for c in report["cells"]]
    run_grid(replace(spec, keeps=(64, 32)), tmp_path, progress=False, log=lambda m: None)
    assert [c.name for c in counted] == ["dart@32", "fastv@32"]
    assert (tmp_path / "eval.json").is_file() and (tmp_path / "eval.md").is_file()


def test_qwen_cell_equals_a_direct_computation(saved, tmp_path, one_thread):
    spec = _spec(saved, "qwen2_vl", keeps=(8,), batch_size=3)
    report = run_grid(spec, tmp_path, progress=False, log=lambda m: None)
    docs = _docs(saved)
    for cell in report["cells"]:
        method, keep = cell["cell"]["method"], cell["cell"]["keep"]
        direct = _direct_answers(saved / "qwen2_vl", docs, method, keep, {"layer": 2} if keep else {})
        assert cell["scores"]["epic_vqa"]["exact_match"] == pytest.approx(_score(direct, docs))
    harness = LocalHarness(spec)
    harness.runner.set_method("dart", 8, layer=2)
    task = harness.tasks[0]
    assert harness.predictions(task, task.docs) == _direct_answers(saved / "qwen2_vl", docs, "dart", 8, {"layer": 2})
    assert {r["batch_size"] for r in harness.runner.records} == {3, 2}


def test_multiple_choice_is_the_choice_of_least_loss_per_token(saved, one_thread):
    spec = _spec(saved, tasks=("epic_vqa_mc",), include_path=str(saved / "task"), limit=3)
    harness = LocalHarness(spec)
    result = harness.evaluate(Cell("dart", 64), {"layer": 2})
    docs = _docs(saved)[:3]
    hits = []
    for doc in docs:
        from PIL import Image
        with Image.open(doc["image"]) as im:
            lls = [harness.runner.loglikelihood(doc["question"], f" {c}", [im.convert("RGB")])
                   for c in doc["choices"]]
        per_token = [total / n for total, _, _, n in lls]
        hits.append(float(per_token.index(max(per_token)) == doc["label"]))
    assert result["scores"] == {"epic_vqa_mc": {"acc": pytest.approx(sum(hits) / 3)}}
    assert result["samples"] == {"epic_vqa_mc": 3}


def test_each_cell_starts_from_the_same_rng_state(saved, one_thread):
    """A cell of the random method draws the same subsets whatever ran before it in the process:
    the global RNG ends each cell in the same state (it is seeded at the cell's start)."""
    harness = LocalHarness(_spec(saved, methods=("random",), keeps=(16,), limit=2))
    cell = Cell("random", 16)
    first = harness.evaluate(cell, {"layer": 2})
    after_first = torch.rand(3)
    torch.rand(100)
    harness.evaluate(Cell("none"), {})
    again = harness.evaluate(cell, {"layer": 2})
    assert torch.equal(torch.rand(3), after_first) and again["scores"] == first["scores"]


def test_tasks_by_folder_data_file_yaml_or_name(saved):
    folder = saved / "task"
    named = (str(folder), str(folder / "data.jsonl"), str(folder / "epic_vqa.yaml"))
    for task, include in [(t, None) for t in named] + [("epic_vqa", str(folder))]:
        t = load_task(task, include)
        assert t.name == "epic_vqa" and t.output_type == "generate_until" and len(t.docs) == N_DOCS
        assert t.text(t.docs[0]) == t.docs[0]["question"]           # the question alone
        assert t.config["generation_kwargs"]["max_new_tokens"] == 8
    mc = load_task("epic_vqa_mc", str(folder))
    assert mc.output_type == "multiple_choice" and mc.choices(mc.docs[0]) == mc.docs[0]["choices"]
    with pytest.raises(ValueError, match="no task 'nope'"):
        load_task("nope", str(folder))
    with pytest.raises(ValueError, match="include_path"):
        load_task("epic_vqa")
    with pytest.raises(ValueError, match="tasks"):
        load_task(str(folder / "missing"))
    docs = list(range(10))
    assert limited(docs, None) == docs and limited(docs, 3) == [0, 1, 2] and limited(docs, 0.25) == [0, 1, 2]
    assert limited(docs, 3.0) == [0, 1, 2]


def test_exact_match_reads_as_lmms_eval():
    preds = ["Top left.", "top  left", "RED", "3 crosses!", "blue", ""]
    refs = ["top left", "top left", "red", "crosses", "Blue", ""]
    assert exact_match(preds, refs, ignore_case=True, ignore_punctuation=True) == [1, 0, 1, 0, 1, 1]
    assert exact_match(preds, refs) == [0, 0, 0, 0, 0, 1]
    assert exact_match(preds, refs, ignore_case=True, ignore_punctuation=True, ignore_numbers=True)[3] == 0
    assert exact_match(["3 crosses"], [" crosses"], ignore_numbers=True) == [1]
    assert exact_match(["the red"], ["red"], regexes_to_ignore=["the "]) == [1]
    try:
        from lmms_eval.api.metrics import exact_match_hf_evaluate
    except ImportError:
        return
    import random
    rng = random.Random(0)
    alphabet = "aAbB .,!?-1 2"
    for _ in range(200):
        p, r = ("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6))) for _ in range(2))
        for opts in ({}, {"ignore_case": True, "ignore_punctuation": True}, {"ignore_numbers": True}):
            assert exact_match([p], [r], **opts) == [exact_match_hf_evaluate([p], [r], **opts)["exact_match"]]


def test_write_local_task_scene_options(tmp_path):
    from epic_ext.train import synthetic
    folder = write_local_task(tmp_path, n=4, seed=12345, image_size=56, grid=2, min_objects=1, max_objects=1,
                              question_types=("colour", "position"))
    docs = [json.loads(line) for line in (folder / "data.jsonl").read_text().splitlines()]
    records = synthetic.generate(4, seed=12345, grid=2, min_objects=1, max_objects=1,
                                 question_types=("colour", "position"))
    from PIL import Image
    for doc, record in zip(docs, records):
        assert (doc["question"], doc["answer"]) == synthetic.first_qa(record)
        assert doc["choices"][doc["label"]] == doc["answer"]
        if record["question_types"][0] == "position":
            assert doc["choices"] == synthetic.positions(2)
        with Image.open(doc["image"]) as im:
            assert im.size == (56, 56) and im.tobytes() == synthetic.render(record, 56).tobytes()
    with pytest.raises(TypeError, match="turns"):
        write_local_task(tmp_path, n=2, turns=2)
    with pytest.raises(ValueError, match="image_size"):
        write_local_task(tmp_path, n=2, image_size=0)


def test_local_and_lmms_harnesses_agree(saved, one_thread):
    """The same cells through lmms-eval (simple_evaluate in process) and the local harness: the
    same scores, and per request the same efficiency record apart from the measured times (random
    too: both seed the global RNG as simple_evaluate does)."""
    pytest.importorskip("lmms_eval")
    pytest.importorskip("lmms_eval.api.model")
    from epic_ext.eval.lmms import LmmsHarness
    spec = _spec(saved, methods=("dart", "random"), tasks=("epic_vqa", "epic_vqa_mc"),
                 include_path=str(saved / "task"), batch_size=2, limit=4)
    lmms, local = LmmsHarness(spec), LocalHarness(spec)
    timed = ("prefill_ms", "decode_ms_per_token")
    for cell in spec.cells():
        kwargs = spec.method_kwargs(cell)
        a, b = lmms.evaluate(cell, kwargs), local.evaluate(cell, kwargs)
        assert a["scores"] == b["scores"] and a["samples"] == b["samples"], cell
        ra = sorted(lmms.lm.records, key=lambda r: r["doc_id"])
        rb = sorted(local.runner.records, key=lambda r: r["doc_id"])
        assert [{k: v for k, v in r.items() if k not in timed} for r in ra] == \
               [{k: v for k, v in r.items() if k not in timed} for r in rb]
        assert {k: v for k, v in a["efficiency"].items() if k.removeprefix("mean_") not in timed} == \
               {k: v for k, v in b["efficiency"].items() if k.removeprefix("mean_") not in timed}
