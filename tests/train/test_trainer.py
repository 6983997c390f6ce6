"""The trainer: a short run, exact resume, checkpoint layout, 2 processes vs 1."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from epic_ext.train.config import TrainConfig, parse_overrides
from epic_ext.train.trainer import checkpoints, train

BASE = dict(model="tiny", data={"synthetic": {"n": 16, "seed": 3}}, schedule="tcd",
            schedule_options={"preset": "official-code"}, steps=4, batch_size=4, lr=2e-3, vision_lr=1e-3,
            progress=False, tensorboard=False, log_every=0, seed=1)


def _reset_accelerate():
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(True)


def _run(tmp_path, name, **kw):
    _reset_accelerate()
    cfg = TrainConfig.from_dict({**BASE, "output_dir": str(tmp_path / name), **kw})
    return cfg


def test_resume_continues_exactly(tmp_path):
    full = train(_run(tmp_path, "full"))
    losses = [h["loss"] for h in full.history]
    assert len(losses) == 4 and all(l > 0 for l in losses)
    assert any(h["kl"] > 0 for h in full.history)            # the teacher term is live
    part = train(_run(tmp_path, "part", save_every=1), stop_after=2)
    assert [h["step"] for h in part.history] == [1, 2]
    assert [c.name for c in checkpoints(tmp_path / "part")] == ["checkpoint-1", "checkpoint-2"]
    assert not (tmp_path / "part" / "final").exists()
    resumed = train(_run(tmp_path, "part", save_every=1), resume=True)
    assert [h["loss"] for h in resumed.history] == losses   # bit-identical, not just close
    assert (tmp_path / "part" / "final" / "model.safetensors").exists()
    ckpt = checkpoints(tmp_path / "part")[-1]
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "trainer_state.json"} <= {
        p.name for p in ckpt.iterdir()}
    assert not list((tmp_path / "part").glob(".tmp-*"))      # no half-written checkpoint left


def test_resume_without_checkpoint_raises(tmp_path):
    with pytest.raises(ValueError, match="resume"):
        train(_run(tmp_path, "none"), resume=True)


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="steps"):
        TrainConfig.from_dict({**BASE, "steps": 0})
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.from_dict({**BASE, "stepz": 3})
    with pytest.raises(ValueError, match="data"):
        TrainConfig.from_dict({**BASE, "data": {"nothing": 1}})


@pytest.mark.parametrize("change,key", [
    ({"bf16": "yes"}, "bf16"), ({"save_every": -3}, "save_every"), ({"lr": "fast"}, "lr"),
    ({"warmup_ratio": 1.5}, "warmup_ratio"), ({"steps": None}, "steps"), ({"seed": 1.5}, "seed"),
    ({"schedule": "tcdd"}, "schedule"), ({"schedule_options": {"foo": 1}}, "schedule_options"),
    ({"schedule": "lcd", "schedule_options": {}}, "schedule_options"),
    ({"schedule_options": {"preset": "nope"}}, "schedule_options"),
    ({"method_options": {"keep": 64}}, "method_options"), ({"method_options": {"foo": 1}}, "method_options"),
    ({"method_options": {"pivot_image": 0}}, "method_options"), ({"method": "visionzip"}, "method"),
    ({"method": "nope"}, "method"), ({"model": "no/such/folder"}, "model"), ({"schedule_options": [1]}, "schedule_options"),
    ({"data": {"synthetic": {"n": 4, "bogus": 1}}}, "data.synthetic"),
])
def test_config_errors_name_the_key(change, key):
    with pytest.raises(ValueError) as err:
        TrainConfig.from_dict({**BASE, **change})
    msg = str(err.value)
    assert msg.startswith(f"{key}: ") and "\n" not in msg


def test_config_numbers_and_files(tmp_path):
    assert TrainConfig.from_dict({**BASE, "lr": "1e-3"}).lr == 1e-3       # YAML 1.1 reads 1e-3 as a string
    with pytest.raises(FileNotFoundError, match="data.json"):
        TrainConfig.from_dict({**BASE, "data": {"json": str(tmp_path / "none.json"), "images": str(tmp_path)}})
    missing = tmp_path / "missing.yaml"
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        TrainConfig.from_yaml(missing)
    truncated = tmp_path / "cut.json"
    truncated.write_text('{"model": "tiny", "steps": ')
    with pytest.raises(ValueError, match="cut.json"):
        TrainConfig.from_yaml(truncated)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="list.yaml"):
        TrainConfig.from_yaml(listing)
    assert parse_overrides({"steps": 1}, ["steps=5", "lr=2e-3"]) == {"steps": 5, "lr": "2e-3"}
    with pytest.raises(ValueError, match="--set"):
        parse_overrides({}, ["steps"])
    from epic_ext.train.data import LlavaConversationDataset
    from epic_ext.train.tokenizer import build_tokenizer
    with pytest.raises(ValueError, match="cut.json"):
        LlavaConversationDataset(truncated, tmp_path, build_tokenizer(1024))


def test_cli_config_errors_are_one_line_exit_2(tmp_path):
    good = tmp_path / "run.yaml"
    good.write_text(yaml.safe_dump({**BASE, "output_dir": str(tmp_path / "out")}))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**BASE, "bf16": "yes"}))
    cases = [(["--config", str(tmp_path / "none.yaml")], "none.yaml"), (["--config", str(good), "--set", "steps"], "--set"),
             (["--config", str(bad)], "bf16")]
    for args, needle in cases:
        proc = subprocess.run([sys.executable, "-m", "epic_ext.cli", "train", *args], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("epic-ext train: error: ") and needle in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_two_processes_match_one(tmp_path):
    """accelerate launch --num_processes 2 --cpu (gloo) gives the 1-process loss curve."""
    cfg = {**BASE, "steps": 3, "save_every": 0}
    curves = {}
    for procs in (1, 2):
        out = tmp_path / f"p{procs}"
        path = tmp_path / f"p{procs}.yaml"
        path.write_text(yaml.safe_dump({**cfg, "output_dir": str(out)}))
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(procs), "--cpu",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(29500 + os.getpid() % 1000 + procs),
               "-m", "epic_ext.cli", "train", "--config", str(path)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
        curves[procs] = [h["loss"] for h in json.loads((out / "history.json").read_text())]
    assert len(curves[1]) == 3
    for a, b in zip(curves[1], curves[2]):
        assert abs(a - b) <= 1e-5 * abs(a), curves


def test_dataset_images_follow_the_vision_tower_size():
    """Training images are prepared at the tower's own resolution, not a fixed 336 px."""
    from types import SimpleNamespace

    from epic_ext.train.tokenizer import build_tokenizer
    from epic_ext.train.trainer import load_dataset
    tok = build_tokenizer(512)
    config = SimpleNamespace(image_token_id=511, image_seq_length=16,
                             vision_config=SimpleNamespace(image_size=56))
    cfg = TrainConfig.from_dict({**BASE, "data": {"synthetic": {"n": 2, "seed": 0}}})
    ds = load_dataset(cfg, tok, SimpleNamespace(config=config))
    assert tuple(ds[0]["pixel_values"].shape) == (3, 56, 56)
