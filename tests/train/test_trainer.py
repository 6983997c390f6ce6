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


def _mixed_llava_json(folder: Path, n: int = 8) -> Path:
    """LLaVA conversation JSON mixing text-only samples (no "image" key), one-image samples and
    two-image samples (one <image> each), with the images written next to it."""
    from epic_ext.train import synthetic as S
    records = S.generate(n, seed=4)
    S.save_dataset(records, folder)
    mixed = []
    for i, r in enumerate(records):
        conv = [dict(t) for t in r["conversations"]]
        if i % 3 == 0:                                  # text-only
            conv[0]["value"] = conv[0]["value"].replace("<image>\n", "")
            mixed.append({"id": r["id"], "conversations": conv})
        elif i % 3 == 1:                                # two images, both tags in place
            conv[0]["value"] = "<image> <image> " + conv[0]["value"].replace("<image>\n", "")
            mixed.append({"id": r["id"], "image": [r["image"], records[(i + 1) % n]["image"]], "conversations": conv})
        else:
            mixed.append(r)
    path = folder / "mixed.json"
    path.write_text(json.dumps(mixed))
    return path


def test_trains_on_mixed_llava_json(tmp_path):
    """The demo model trains with TCD on LLaVA JSON whose batches mix text-only, one-image and
    two-image samples (LLaVA-1.5's mix665k has text-only conversations)."""
    import math

    from epic_ext.models.tiny import build_tiny_llava
    path = _mixed_llava_json(tmp_path / "data")
    # the demo model at 56 px (16 tokens an image) keeps the run to seconds; images are prepared
    # at the tower's size
    build_tiny_llava("demo", seed=1, image_size=56).save_pretrained(tmp_path / "init")
    result = train(_run(tmp_path, "mixed", model="demo", init_from=str(tmp_path / "init"), steps=3, batch_size=4,
                        data={"json": str(path), "images": str(tmp_path / "data")}, save_every=0))
    assert [h["step"] for h in result.history] == [1, 2, 3]
    assert all(math.isfinite(h["loss"]) and h["loss"] > 0 for h in result.history)
    from epic_ext.train.trainer import batch_indices
    batches = [{i % 3 for i in batch_indices(8, 4, step, BASE["seed"])} for step in range(3)]
    assert any(kinds == {0, 1, 2} for kinds in batches)       # a batch with all three kinds of sample
    assert (tmp_path / "mixed" / "final" / "model.safetensors").exists()


CONFIGS = Path(__file__).resolve().parents[2] / "epic_ext" / "train" / "configs"


@pytest.mark.parametrize("name,folder", [("tcd_llava15_7b.yaml", "llava-1.5-7b"),
                                         ("tcd_qwen25vl_7b.yaml", "Qwen2.5-VL-7B-Instruct")])
def test_7b_configs_pass_the_checker(tmp_path, name, folder):
    """The shipped 7B configs pass the config checker once their model and data paths exist, and
    set what a 7B run needs (bf16 weights and compute, gradient checkpointing, a frozen vision
    tower, an in-LLM method, a global batch of 128)."""
    from epic_ext.train.config import read_config_file
    raw = read_config_file(CONFIGS / name)
    assert set(raw) == set(read_config_file(CONFIGS / "tcd_llava15_7b.yaml"))
    assert folder in raw["model"]
    (tmp_path / "model").mkdir()
    (tmp_path / "images").mkdir()
    (tmp_path / "data.json").write_text("[]")
    cfg = TrainConfig.from_dict({**raw, "model": str(tmp_path / "model"),
                                 "data": {"json": str(tmp_path / "data.json"), "images": str(tmp_path / "images")}})
    assert (cfg.dtype, cfg.bf16, cfg.gradient_checkpointing, cfg.vision_lr) == ("bfloat16", True, True, 0.0)
    assert cfg.schedule == "tcd" and cfg.method in ("dart", "fastv") and cfg.batch_size == 128
    assert set(raw["data"]) == {"json", "images"}


def test_accelerate_configs_shard_every_family():
    """accelerate_fsdp.yaml names no layer classes, so accelerate's transformer wrap policy takes
    EpicModule._no_split_modules: every decoder layer and vision block of each family gets its own
    FSDP unit (a fixed class list fails on the other families: accelerate raises on a class the
    model lacks). accelerate_zero3.yaml: DeepSpeed ZeRO-3."""
    from collections import Counter

    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    from epic_ext.models.tiny import build_tiny_llava
    from epic_ext.models.tiny_qwen import build_tiny_qwen
    from epic_ext.train.trainer import EpicModule
    fsdp = yaml.safe_load((CONFIGS / "accelerate_fsdp.yaml").read_text())
    zero3 = yaml.safe_load((CONFIGS / "accelerate_zero3.yaml").read_text())
    assert (zero3["distributed_type"], zero3["deepspeed_config"]["zero_stage"]) == ("DEEPSPEED", 3)
    opts = fsdp["fsdp_config"]
    assert fsdp["distributed_type"] == "FSDP" and opts["fsdp_version"] == 2
    assert opts["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert "fsdp_transformer_layer_cls_to_wrap" not in opts
    for key in ("mixed_precision", "num_processes", "num_machines"):
        assert fsdp[key] == zero3[key]
    # what accelerate launch hands the plugin from this file (its fsdp_* keys as FSDP_* settings)
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=opts["fsdp_version"], auto_wrap_policy=opts["fsdp_auto_wrap_policy"],
        transformer_cls_names_to_wrap=opts.get("fsdp_transformer_layer_cls_to_wrap"))
    expected = {"llava": {"LlamaDecoderLayer": 4, "CLIPEncoderLayer": 4, "CLIPVisionEmbeddings": 1},
                "qwen2_vl": {"Qwen2VLDecoderLayer": 4, "Qwen2VLVisionBlock": 4},
                "qwen2_5_vl": {"Qwen2_5_VLDecoderLayer": 4, "Qwen2_5_VLVisionBlock": 4},
                "qwen3_vl": {"Qwen3VLTextDecoderLayer": 4, "Qwen3VLVisionBlock": 4}}
    for family, counts in expected.items():
        model = build_tiny_llava("tiny") if family == "llava" else build_tiny_qwen(family)
        module = EpicModule(model, "dart", {})
        policy = fsdp2_prepare_auto_wrap_policy(plugin, module)
        assert Counter(type(m).__name__ for m in module.modules() if policy(m)) == counts, family
    fixed = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="TRANSFORMER_BASED_WRAP",
                                           transformer_cls_names_to_wrap=["LlamaDecoderLayer", "CLIPEncoderLayer"])
    with pytest.raises(ValueError, match="LlamaDecoderLayer"):
        fsdp2_prepare_auto_wrap_policy(fixed, EpicModule(build_tiny_qwen("qwen2_5_vl"), "dart", {}))
