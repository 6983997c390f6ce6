"""EPIC training on a tiny Qwen2.5-VL: the shared-prefix step equals a separate reduced forward,
and the TCD trainer trains end to end on conversation JSON with several images, videos (a folder
of frames, a list of frame files) and text-only samples, resumes exactly, and saves a final/
folder that transformers' Auto classes load back."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision", reason="transformers' Qwen-VL processors need torchvision")

from epic_ext.models import apply, revert  # noqa: E402
from epic_ext.models import tiny_qwen as tq  # noqa: E402
from epic_ext.train.data import collate  # noqa: E402
from epic_ext.train.onevision import ProcessorConversationDataset  # noqa: E402
from epic_ext.train.schedules import Setting, StepPlan  # noqa: E402
from epic_ext.train.step import epic_forward  # noqa: E402

FAMILY = "qwen2_5_vl"


def _turns(*pairs):
    out = []
    for q, a in pairs:
        out += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return out


def qwen_records() -> list[dict]:
    """Every sample kind of the LLaVA-OneVision format, with words the tiny tokenizer knows."""
    return [
        {"id": "two-images", "image": ["a.png", "b.png"],
         "conversations": _turns(("<image> what is in the first picture ? <image>", "a red dog"),
                                 ("and in the second ?", "two blue cup"))},
        {"id": "video-folder", "video": "clip", "fps": 1,
         "conversations": _turns(("<image>\nwhat is the man holding ?", "a blue ball"))},
        {"id": "text-only", "conversations": _turns(("what color is the sky ?", "blue"))},
        {"id": "untagged", "image": "c.png", "video": ["clip/frame_1.png", "clip/frame_2.png"],
         "conversations": _turns(("how many bird are there ?", "three"))},
        {"id": "one-image", "image": "b.png",
         "conversations": _turns(("where is the cat ? <image>", "on the table"))},
    ]


def write_media(folder, seed: int = 0) -> None:
    from PIL import Image
    g = np.random.default_rng(seed)
    for name, (h, w) in {"a.png": (56, 84), "b.png": (112, 112), "c.png": (84, 56)}.items():
        Image.fromarray(tq.random_image(h, w, g)).save(folder / name)
    (folder / "clip").mkdir()
    for i in (1, 2, 10, 3):          # natural order: 1, 2, 3, 10
        Image.fromarray(tq.random_image(56, 84, g)).save(folder / "clip" / f"frame_{i}.png")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen_data")
    write_media(folder)
    (folder / "data.json").write_text(json.dumps(qwen_records()))
    return folder


@pytest.fixture(scope="module")
def setup(data_dir):
    processor = tq.tiny_qwen_processor(FAMILY)
    ds = ProcessorConversationDataset(str(data_dir / "data.json"), str(data_dir), processor)
    batch = collate([ds[i] for i in range(len(ds))], pad_id=processor.tokenizer.pad_token_id)
    return tq.build_tiny_qwen(FAMILY, seed=5), batch


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_batch_mixes_every_kind(setup):
    _, batch = setup
    assert batch["image_grid_thw"].shape[0] == 4 and batch["video_grid_thw"].shape[0] == 2
    kinds = [(row == tq.IMAGE_ID).any().item() + 2 * (row == tq.VIDEO_ID).any().item() for row in batch["input_ids"]]
    assert kinds == [1, 2, 0, 3, 1]
    assert "second_per_grid_ts" in batch and "mm_token_type_ids" in batch


@pytest.mark.parametrize("student,teacher", [
    (Setting(0.75, 2), Setting(0.5, 2)),       # TCD: same layer, milder teacher
    (Setting(0.6, 1), Setting(0.6, 3)),        # LCD: teacher deeper
    (Setting(0.9, 2), Setting(0.0, 2)),        # teacher keeps every token
])
def test_shared_prefix_student_equals_a_separate_forward(setup, student, teacher):
    """The step's student (shared prefix, then its own layers) equals a separate reduced forward
    of the applied model: loss and every gradient (Qwen's budget is the ratio 1 - r per image and
    per video frame group)."""
    model, batch = setup
    model.zero_grad()
    out = epic_forward(model, batch, StepPlan(student=student, teacher=teacher, kl_weight=0.0, temperature=1.0))
    out.loss.backward()
    ours = _grads(model)
    model.zero_grad()
    apply(model, "dart", keep=1.0 - student.ratio, layer=student.layer)
    try:
        ref = model(**batch, use_cache=False).loss
    finally:
        revert(model)
    ref.backward()
    theirs = _grads(model)
    model.zero_grad()
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    assert ours.keys() == theirs.keys() and any(".visual." in n for n in ours)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6, msg=name)


def test_text_only_batch_passes_through(setup):
    """A micro-batch of text-only rows: the reducing step is the plain model's loss."""
    model, batch = setup
    rows = [i for i, row in enumerate(batch["input_ids"]) if not (row == tq.IMAGE_ID).any()
            and not (row == tq.VIDEO_ID).any()]
    text = {k: batch[k][rows] for k in ("input_ids", "attention_mask", "labels", "mm_token_type_ids", "query_index")}
    plan = StepPlan(student=Setting(0.75, 1), teacher=Setting(0.5, 2), kl_weight=0.5, temperature=1.0)
    with torch.no_grad():
        out = epic_forward(model, text, plan)
        ref = model(**{k: v for k, v in text.items() if k != "query_index"}).loss
    torch.testing.assert_close(out.sft, ref, rtol=1e-5, atol=1e-6)
    assert out.kl.abs() < 1e-6                 # teacher and student see the same text


# --------------------------------------------------------------------------- the trainer

def _config(data_dir, out, **kw):
    from accelerate.state import AcceleratorState
    from epic_ext.train.config import TrainConfig
    AcceleratorState._reset_state(True)
    base = dict(model="tiny-qwen2.5-vl", data={"json": str(data_dir / "data.json"), "images": str(data_dir)},
                schedule="tcd", schedule_options={"preset": "official-code"}, steps=3, batch_size=4, lr=3e-3,
                progress=False, tensorboard=False, log_every=0, seed=1, output_dir=str(out))
    return TrainConfig.from_dict({**base, **kw})


def test_tcd_trains_tiny_qwen_end_to_end(data_dir, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from epic_ext.train.trainer import checkpoints, train
    full = train(_config(data_dir, tmp_path / "full"))
    losses = [h["loss"] for h in full.history]
    assert len(losses) == 3 and all(np.isfinite(losses)) and all(x > 0 for x in losses)
    assert any(h["kl"] > 0 for h in full.history)            # the teacher term is live
    # resume: 1 step, stop, continue: the same losses bit for bit
    part = train(_config(data_dir, tmp_path / "part", save_every=1), stop_after=1)
    assert [h["step"] for h in part.history] == [1] and len(checkpoints(tmp_path / "part")) == 1
    resumed = train(_config(data_dir, tmp_path / "part", save_every=1), resume=True)
    assert [h["loss"] for h in resumed.history] == losses

    # final/: weights + processor that the Auto classes load; the language model was trained,
    # the vision tower frozen (vision_lr 0)
    final = tmp_path / "full" / "final"
    trained = AutoModelForImageTextToText.from_pretrained(final, local_files_only=True)
    processor = AutoProcessor.from_pretrained(final, local_files_only=True)
    assert type(trained).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert len(processor.tokenizer) == tq.VOCAB_SIZE
    init = tq.build_tiny_qwen(FAMILY, seed=1).state_dict()
    after = trained.state_dict()
    changed = [n for n in init if not torch.equal(init[n], after[n])]
    assert any(n.startswith("lm_head") for n in changed) and any(".language_model." in n for n in changed)
    assert not any(".visual." in n for n in changed)
    # the saved processor encodes a sample exactly as training did
    ds_train = ProcessorConversationDataset(str(data_dir / "data.json"), str(data_dir),
                                            tq.tiny_qwen_processor(FAMILY))
    ds_saved = ProcessorConversationDataset(str(data_dir / "data.json"), str(data_dir), processor)
    for i in (0, 1, 3):
        a, b = ds_train[i], ds_saved[i]
        for key in ("input_ids", "labels", "pixel_values", "pixel_values_videos"):
            if key in a:
                assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_trains_a_local_checkpoint_folder(data_dir, tmp_path, family):
    """model: a local folder of another Qwen-VL family (weights + processor, as save_pretrained
    writes them): loaded by its model_type, one step on the mixed data, final/ written."""
    from epic_ext.train.trainer import train
    folder = tq.save_tiny_qwen(family, tmp_path / "ckpt", seed=3)
    result = train(_config(data_dir, tmp_path / "out", model=folder, steps=1, batch_size=5))
    assert np.isfinite(result.history[0]["loss"]) and result.history[0]["loss"] > 0
    saved = json.loads((tmp_path / "out" / "final" / "config.json").read_text())
    assert saved["model_type"] == family
    assert (tmp_path / "out" / "final" / "processor_config.json").exists() or \
        (tmp_path / "out" / "final" / "preprocessor_config.json").exists()


def test_presets_and_synthetic_data():
    """The Qwen presets validate (an unknown model's error lists them); the synthetic task's
    single-image records go through the processor path too."""
    from types import SimpleNamespace

    from epic_ext.train.config import TrainConfig
    from epic_ext.train.trainer import load_dataset
    with pytest.raises(ValueError, match=r"^model: .*tiny-qwen2\.5-vl"):
        TrainConfig.from_dict({"model": "tiny-qwen9"})
    cfg = TrainConfig.from_dict({"model": "tiny-qwen2.5-vl", "data": {"synthetic": {"n": 2, "seed": 0}}})
    # the tiny Qwen vocabulary lacks some of the task's words: said once, with the fraction
    with pytest.warns(UserWarning, match=r"tokenizer: \d+ of \d+ text tokens .* become \[UNK\]"):
        ds = load_dataset(cfg, tq.tiny_qwen_processor(FAMILY),
                          SimpleNamespace(config=SimpleNamespace(model_type=FAMILY)))
    s = ds[1]
    assert s["image_grid_thw"].shape == (1, 3) and (s["input_ids"] == tq.IMAGE_ID).sum() == \
        s["image_grid_thw"].prod() // 4
    assert (s["labels"] != -100).sum() >= 2
