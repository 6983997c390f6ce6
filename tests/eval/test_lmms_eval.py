"""lmms-eval entry point (issue 13): the ``epic_ext`` model found through the ``lmms_eval.models``
entry-point group, batched generation equal to one request at a time, loglikelihood against the
stock model, argument errors, and ``python -m lmms_eval`` end to end on the offline synthetic VQA
task with tiny LLaVA / Qwen2.5-VL checkpoints (score + efficiency in the results JSON).

Skipped where lmms-eval is not installed (the project's .venv). The entry point is registered by a
throw-away ``*.dist-info`` folder on PYTHONPATH (what ``pip install`` of epic-ext with the entry
point would write), so nothing is installed into the environment.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")
pytest.importorskip("lmms_eval.api.model")

import torch  # noqa: E402
from _eval_shared import task_docs, task_hooks  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny LLaVA and Qwen2.5-VL checkpoints (model + processor), the local task, and a
    dist-info folder declaring the entry point."""
    from epic_ext.eval import write_local_task
    from epic_ext.models import tiny
    from epic_ext.models.tiny_qwen import save_tiny_qwen

    root = tmp_path_factory.mktemp("lmms")
    tiny.save_tiny_llava(root / "llava")
    for family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        save_tiny_qwen(family, root / family)
    write_local_task(root / "task", n=6)
    dist = root / "entry" / "epic_ext_lmms_entry-0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: epic-ext-lmms-entry\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text("[lmms_eval.models]\nepic_ext = epic_ext.eval:lmms_manifest\n")
    return root


def _env(root: Path, *, entry: bool = True) -> dict:
    env = dict(os.environ)
    paths = ([str(root / "entry")] if entry else []) + [str(REPO)]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(root / "hf"), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def _docs(root: Path) -> list:
    return task_docs(root / "task")


def _requests(root: Path, kind: str, **gen_kwargs):
    from lmms_eval.api.instance import Instance
    hooks, docs = task_hooks(), _docs(root)
    out = []
    for i, doc in enumerate(docs):
        text = hooks.doc_to_text(doc)
        second = dict(gen_kwargs) if kind == "generate_until" else f" {doc['answer']}"
        out.append(Instance(request_type=kind, arguments=(text, second, hooks.doc_to_visual, i, "epic_vqa", "test"),
                            idx=0, metadata={"task": "epic_vqa", "doc_id": i, "repeats": 1}))
    return out, {"epic_vqa": {"test": docs}}


def _model(root: Path, family: str, **kwargs):
    from epic_ext.eval.lmms import EpicExt
    model = EpicExt(pretrained=str(root / family), device="cpu", **kwargs)
    return model


def test_entry_point_registers_the_model(saved):
    """A stock lmms-eval finds ``epic_ext`` through the entry-point group, and only through it."""
    code = "from lmms_eval.models import get_model; print(get_model('epic_ext').__module__)"
    found = subprocess.run([sys.executable, "-c", code], env=_env(saved), capture_output=True, text=True,
                           timeout=120)
    assert found.returncode == 0 and found.stdout.strip().splitlines()[-1] == "epic_ext.eval.lmms", found.stderr
    from importlib.metadata import PackageNotFoundError, distribution
    try:
        distribution("epic-ext")
        return                  # installed (make test-eval): its own entry point registers it too
    except PackageNotFoundError:
        pass
    missing = subprocess.run([sys.executable, "-c", code], env=_env(saved, entry=False), capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode != 0 and "epic_ext" in missing.stdout + missing.stderr


@pytest.mark.parametrize("family,method,keep,kept", [("qwen2_5_vl", "dart", 8, 8), ("llava", "fastv", 0.25, 144),
                                                     ("qwen3_vl", "fastv", 6, 6), ("qwen2_vl", "dart", 0.5, 8)])
def test_batches_equal_requests_alone(saved, one_thread, family, method, keep, kept):
    """generate_until in left-padded batches of 4 (prompts of different lengths) answers each
    request as a batch of 1 does, in request order; every record keeps the budget's tokens from
    the reduction layer on."""
    requests, task_dict = _requests(saved, "generate_until", max_new_tokens=4, until=["\n"])
    answers = {}
    for batch in (4, 1):
        model = _model(saved, family, method=method, keep=keep, layer=2, batch_size=batch)
        model.task_dict = task_dict
        results = model.generate_until(requests)
        answers[batch] = [r.text for r in results]
        assert all(r.token_counts.output_tokens <= 4 for r in results)
        assert sorted(r["doc_id"] for r in model.records) == list(range(len(requests)))
        assert len({r["prompt_tokens"] for r in model.records}) > 1       # the batches are padded
        assert {r["batch_size"] for r in model.records} == ({4, 2} if batch == 4 else {1})
        for r in model.records:
            vis = r["visual_tokens_per_layer"]
            assert vis[:2] == [vis[0]] * 2 and vis[2:] == [kept] * (len(vis) - 2) and vis[0] > kept
            assert r["kv_bytes"] > 0 and r["prefill_flops"] > 0 and r["prefill_ms"] > 0
        summary = model.efficiency_summary()
        assert summary["requests"] == len(requests) and summary["mean_visual_tokens_per_layer"][-1] == kept
    assert answers[4] == answers[1]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_text_only_requests(saved, one_thread, family):
    """Requests without an image (a text-only batch, and text-only rows beside image rows) are
    answered as alone, with no visual tokens in their records."""
    requests, task_dict = _requests(saved, "generate_until", max_new_tokens=3)
    with_image = requests[0].args[2]
    for i, req in enumerate(requests):
        if i % 3:
            req.arguments = (*req.arguments[:2], lambda doc: [], *req.arguments[3:])
    answers = {}
    for batch in (3, 1):
        model = _model(saved, family, method="dart", keep=4, layer=2, batch_size=batch)
        model.task_dict = task_dict
        answers[batch] = [r.text for r in model.generate_until(requests)]
        for r in model.records:
            has_image = r["doc_id"] % 3 == 0
            assert (r["visual_tokens_per_layer"][0] > 0) == has_image and (r["units"] != []) == has_image
    assert answers[3] == answers[1] and with_image is not None
    model = _model(saved, family, method="dart", keep=4, layer=2, batch_size=2)
    model.task_dict = task_dict
    text_only = model.generate_until([requests[1], requests[2]])       # one batch, no image at all
    assert [r.text for r in text_only] == answers[1][1:3] and {r["batch_size"] for r in model.records} == {2}


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_loglikelihood_matches_the_stock_model(saved, one_thread, family):
    """method none: the mean loss per answer token (lmms-eval's loglikelihood convention) equals the
    stock model's; with DART it is a finite positive loss of the reduced model."""
    from epic_ext.models.loading import load_model
    requests, task_dict = _requests(saved, "loglikelihood")
    requests = requests[:3]
    model = _model(saved, family, method="none")
    model.task_dict = task_dict
    got = [r.text for r in model.loglikelihood(requests)]

    stock = load_model(saved / family)
    for (loss, greedy), req in zip(got, requests):
        context, continuation, to_visual, doc_id, _, _ = req.args
        images = model._visuals(to_visual, "epic_vqa", "test", doc_id)
        inputs = model.runner.inputs([model.runner.prompt(context, len(images))], [images])
        cont = model.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
        ids = torch.cat([inputs["input_ids"], cont], 1)
        media = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        if "mm_token_type_ids" in media:
            media["mm_token_type_ids"] = torch.cat([media["mm_token_type_ids"], torch.zeros_like(cont)], 1)
        with torch.no_grad():
            logits = stock(input_ids=ids, attention_mask=torch.ones_like(ids), **media).logits[0].double()
        n = cont.shape[1]
        expect = torch.log_softmax(logits[-n - 1:-1], -1).gather(-1, cont[0][:, None]).sum().item()
        assert loss == pytest.approx(-expect / n, abs=1e-4)      # lmms-eval's convention: the mean loss
        assert greedy == bool((logits[-n - 1:-1].argmax(-1) == cont[0]).all())

    dart = _model(saved, family, method="dart", keep=4, layer=2)
    dart.task_dict = task_dict
    for loss, _ in (r.text for r in dart.loglikelihood(requests)):
        assert loss > 0 and loss == loss


def test_bad_model_args(saved, tmp_path):
    from epic_ext.eval.lmms import EpicExt
    qwen = str(saved / "qwen2_5_vl")
    with pytest.raises(ValueError, match="batch_size"):
        EpicExt(pretrained=qwen, batch_size="auto", device="cpu")
    with pytest.raises(ValueError, match="dtype"):
        EpicExt(pretrained=qwen, dtype="float8", device="cpu")
    with pytest.raises(ValueError, match="pretrained"):
        EpicExt(pretrained="", device="cpu")
    with pytest.raises(FileNotFoundError):
        EpicExt(pretrained=str(tmp_path / "nothing"), device="cpu")
    with pytest.raises(TypeError, match="keep"):
        EpicExt(pretrained=qwen, method="dart", keep=[1, 2], device="cpu")
    with pytest.raises(ValueError, match="no_such_method|method"):
        EpicExt(pretrained=qwen, method="no_such_method", device="cpu")
    with pytest.raises(ValueError, match="max_pixels"):
        EpicExt(pretrained=str(saved / "llava"), max_pixels=3136, device="cpu")
    with pytest.raises(ValueError, match="min_pixels"):
        EpicExt(pretrained=qwen, min_pixels=10_000, max_pixels=3136, device="cpu")
    with pytest.raises(ValueError, match="max_pixels"):
        EpicExt(pretrained=qwen, max_pixels=0, device="cpu")
    with pytest.raises(ValueError, match="warmup"):
        EpicExt(pretrained=qwen, warmup=-1, device="cpu")


def test_qwen_pixel_bounds(saved, one_thread):
    """max_pixels bounds the resized image: a 112 px image (8 x 8 patches, 16 merged tokens)
    capped at 56 x 56 pixels gives 4."""
    requests, task_dict = _requests(saved, "generate_until", max_new_tokens=2)
    for max_pixels, tokens in ((None, 16), (56 * 56, 4)):
        model = _model(saved, "qwen2_5_vl", max_pixels=max_pixels, batch_size=2, warmup=1)
        model.task_dict = task_dict
        model.generate_until(requests[:2])
        assert {r["visual_tokens_per_layer"][0] for r in model.records} == {tokens}
        assert len(model.records) == 2 and model.warmup == 0        # the warm-up batch is not recorded


def _run_lmms_eval(root: Path, family: str, args: str, out: Path, processes: int = 1,
                   tasks: str = "epic_vqa") -> dict:
    eff = out / "efficiency.json"
    # Several CPU processes: torchrun (Accelerator() then joins its gloo group).
    launch = [] if processes == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                                        "--master_port", str(29400 + os.getpid() % 500)]
    cmd = [sys.executable, *launch, "-m", "lmms_eval", "--model", "epic_ext",
           "--model_args", f"pretrained={root / family},{args},efficiency_json={eff}",
           "--tasks", tasks, "--include_path", str(root / "task"), "--batch_size", "2",
           "--device", "cpu", "--output_path", str(out), "--log_samples"]
    res = subprocess.run(cmd, env=_env(root), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (results,) = out.glob("*/*_results.json")
    (samples,) = out.glob("*/*_samples_epic_vqa.jsonl")
    with open(eff) as f:
        sidecar = json.load(f)
    with open(samples) as f:
        lines = [json.loads(line) for line in f]
    return json.loads(results.read_text()), lines, sidecar


@pytest.mark.slow
@pytest.mark.parametrize("family,args,kept,tasks", [
    ("qwen2_5_vl", "method=dart,keep=8,layer=2", 8, "epic_vqa,epic_vqa_mc"),
    ("llava", "method=fastv,keep=0.25,layer=2", 144, "epic_vqa"),
])
def test_lmms_eval_end_to_end(saved, tmp_path, family, args, kept, tasks):
    """python -m lmms_eval --model epic_ext ... --batch_size 2 on the local task: the exact-match
    score (equal to the samples' mean) and the efficiency beside it in the results JSON, the full
    per-request records in the sidecar; the multiple-choice variant (loglikelihood) scores too."""
    results, samples, sidecar = _run_lmms_eval(saved, family, args, tmp_path, tasks=tasks)
    if "epic_vqa_mc" in tasks:
        assert 0 <= results["results"]["epic_vqa_mc"]["acc,none"] <= 1
        (mc,) = tmp_path.glob("*/*_samples_epic_vqa_mc.jsonl")
        assert len(mc.read_text().splitlines()) == 6
    score = results["results"]["epic_vqa"]["exact_match,none"]
    assert len(samples) == 6 and score == pytest.approx(sum(s["exact_match"] for s in samples) / 6)
    thr = results["throughput"]
    assert thr["avg_visual_tokens_kept"] == kept and thr["avg_visual_tokens"] > kept
    assert thr["avg_reduction_layer"] == 2
    assert thr["avg_visual_tokens_layer_1"] == thr["avg_visual_tokens"]
    assert thr["avg_visual_tokens_layer_2"] == kept
    for key in ("avg_kv_bytes", "avg_prefill_flops", "avg_prefill_ms", "avg_decode_ms_per_token"):
        assert thr[key] > 0, key
    assert results["efficiency"]["by_task"]["epic_vqa"]["docs_with_token_counts"] == 6
    summary = sidecar["summary"]
    assert summary["requests"] == 6 and summary["options"] == {"layer": 2}
    assert summary["mean_visual_tokens_per_layer"][2:] == [kept] * (len(summary["mean_visual_tokens_per_layer"]) - 2)
    assert {r["batch_size"] for r in sidecar["requests"]} == {2}
    assert summary["mean_kv_bytes"] == pytest.approx(thr["avg_kv_bytes"])


@pytest.mark.slow
def test_lmms_eval_two_processes(saved, tmp_path):
    """Two processes (torchrun on gloo): each answers its share; the throughput block and the
    sidecar cover all six requests, each once."""
    results, samples, sidecar = _run_lmms_eval(saved, "qwen2_5_vl", "method=dart,keep=8,layer=2", tmp_path,
                                               processes=2)
    assert len(samples) == 6
    assert sorted(r["doc_id"] for r in sidecar["requests"]) == list(range(6))
    thr = results["throughput"]
    assert thr["total_gen_tokens"] == sum(r["new_tokens"] for r in sidecar["requests"])
    assert thr["avg_visual_tokens_kept"] == 8
