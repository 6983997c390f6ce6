"""The EPIC trainer: accelerate for devices and processes, a schedule per step, atomic resumable
checkpoints.

    epic-ext train --config run.yaml [--resume]
    accelerate launch --num_processes 2 --cpu -m epic_ext.cli train --config run.yaml

Determinism, so that ``--resume`` continues exactly and N processes match 1: the batch of step s
is a fixed slice of a permutation seeded by (seed, epoch); the schedule's plan for step s comes
from ``step_rng(seed, s)``; losses are sums over the global batch's answer tokens divided by
their global count (DDP averages gradients, so each process scales its loss by the world size).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import torch

from .config import TrainConfig
from .schedules import make_schedule, progress, step_rng
from .step import epic_forward

CHECKPOINT_PREFIX = "checkpoint-"


class EpicModule(torch.nn.Module):
    """Wraps the model so the whole EPIC step runs inside ``forward`` (what DDP/FSDP hook)."""

    def __init__(self, model, method: str, method_options: dict):
        super().__init__()
        self.model = model
        self.method, self.method_options = method, method_options
        # accelerate's FSDP transformer wrap policy, when its config names no layer classes, shards
        # the prepared module's _no_split_modules (each family's decoder layers and vision blocks);
        # only those this model has: accelerate rejects a name it cannot find (LLaVA's list
        # includes CLIP text-side classes).
        present = {type(m).__name__ for m in model.modules()}
        self._no_split_modules = sorted(n for n in getattr(model, "_no_split_modules", None) or () if n in present)

    def forward(self, batch: dict, plan, normalizer: float):
        out = epic_forward(self.model, batch, plan, method=self.method, method_options=self.method_options,
                           normalizer=normalizer)
        return out.loss, out.sft, out.kl


# --------------------------------------------------------------------------- model and data

def load_model(cfg: TrainConfig):
    from ..models import tiny
    from .config import QWEN_PRESETS, model_presets
    dtype = getattr(torch, cfg.dtype)
    source = cfg.init_from or cfg.model
    if cfg.init_from is None and cfg.model in tiny.PRESETS:
        return tiny.build_tiny_llava(cfg.model, seed=cfg.seed, dtype=dtype, attn_implementation=cfg.attn_implementation)
    if cfg.init_from is None and cfg.model in QWEN_PRESETS:
        from ..models.tiny_qwen import build_tiny_qwen
        return build_tiny_qwen(QWEN_PRESETS[cfg.model], seed=cfg.seed, attn=cfg.attn_implementation, dtype=dtype)
    if not Path(source).is_dir():
        raise ValueError(f"model: {source!r} is neither a preset ({model_presets()}) nor a local folder")
    # The family's ...ForConditionalGeneration (LLaVA, Qwen2-VL, Qwen2.5-VL, Qwen3-VL) by its model_type.
    from ..models.loading import load_model as load_checkpoint
    return load_checkpoint(source, dtype=dtype, attn_implementation=cfg.attn_implementation)


def load_tokenizer(cfg: TrainConfig, model):
    """The text side of training: LLaVA's tokenizer, or the processor of a Qwen-VL family (it
    encodes text, images and videos together)."""
    from ..models import tiny
    from ..models.loading import QWEN_VL_TYPES
    from .config import QWEN_PRESETS
    if model.config.model_type in QWEN_VL_TYPES:
        if cfg.model in QWEN_PRESETS:
            from ..models.tiny_qwen import tiny_qwen_processor
            return tiny_qwen_processor(QWEN_PRESETS[cfg.model])
        from ..models.loading import load_processor
        return load_processor(cfg.model)
    if cfg.model in tiny.PRESETS:
        from .tokenizer import build_tokenizer
        return build_tokenizer(model.config.text_config.vocab_size)
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(cfg.model, local_files_only=True)


def load_dataset(cfg: TrainConfig, tokenizer, model):
    from ..models.loading import QWEN_VL_TYPES
    from .data import ClipImageProcessor, LlavaConversationDataset
    from .onevision import ProcessorConversationDataset
    if getattr(model.config, "model_type", "llava") in QWEN_VL_TYPES:
        # tokenizer is the family's processor: it encodes text, images and videos together
        if "synthetic" in cfg.data:
            from . import synthetic
            opts = dict(cfg.data["synthetic"])
            records = synthetic.generate(int(opts.pop("n", 1024)), int(opts.pop("seed", 0)), **opts)
            media = {r["image"]: im for r, im in zip(records, synthetic.render_images(records))}
            return ProcessorConversationDataset(records, media, tokenizer, max_length=cfg.max_length)
        return ProcessorConversationDataset(cfg.data["json"], cfg.data["images"], tokenizer, max_length=cfg.max_length)
    image_token_id = model.config.image_token_id
    # Images at the vision tower's own resolution (336 px for LLaVA-1.5's CLIP), as save_final's
    # processor will prepare them at inference.
    common = dict(image_processor=ClipImageProcessor(size=model.config.vision_config.image_size),
                  image_token_id=image_token_id, image_tokens=model.config.image_seq_length,
                  max_length=cfg.max_length)
    if "synthetic" in cfg.data:
        from . import synthetic
        opts = dict(cfg.data["synthetic"])
        records = synthetic.generate(int(opts.pop("n", 1024)), int(opts.pop("seed", 0)), **opts)
        return LlavaConversationDataset(records, synthetic.render_images(records), tokenizer, **common)
    return LlavaConversationDataset(cfg.data["json"], cfg.data["images"], tokenizer, **common)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Sample indices of global batch ``step``: consecutive slices of a per-epoch permutation."""
    per_epoch = max(n // batch_size, 1)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
    return [perm[(k * batch_size + i) % n] for i in range(batch_size)]


# --------------------------------------------------------------------------- checkpoints

def checkpoints(output_dir) -> list[Path]:
    out = Path(output_dir)
    found = [p for p in out.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def save_checkpoint(accelerator, output_dir, step: int, state: dict, keep: int) -> Optional[Path]:
    """accelerate's full state (model safetensors, optimizer, scheduler, every process's RNG)
    plus our step state, written into a temporary folder and renamed into place: a crash leaves
    either the previous checkpoint or the new one, never half of one."""
    out = Path(output_dir)
    final = out / f"{CHECKPOINT_PREFIX}{step}"
    tmp = out / f".tmp-{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(out)
        for old in checkpoints(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


# --------------------------------------------------------------------------- the loop

@dataclass
class TrainResult:
    history: list                 # per step: {"step", "loss", "sft", "kl", "lr", "student", "teacher", "time"}
    output_dir: str
    final_dir: str
    step_time_s: float            # median wall time of a step (after the first)


def _param_groups(model, cfg: TrainConfig):
    vision, rest = [], []
    for name, p in model.named_parameters():
        (vision if ".vision_tower." in f".{name}" or ".visual." in f".{name}" else rest).append(p)
    if cfg.vision_lr == 0:
        for p in vision:
            p.requires_grad_(False)
        return [{"params": rest, "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    return [{"params": rest, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
            {"params": vision, "lr": cfg.vision_lr, "weight_decay": cfg.weight_decay}]


def train(cfg: TrainConfig, *, resume: bool = False, accelerator=None, log=print,
          stop_after: Optional[int] = None) -> TrainResult:
    """Run (or, with ``resume``, continue) the training ``cfg`` describes. ``stop_after`` ends
    this run after that global step with a checkpoint, as an interrupted job would (a time
    limited allocation); the next ``resume`` continues exactly."""
    from accelerate import Accelerator
    from transformers import get_cosine_schedule_with_warmup

    from .data import collate

    cfg.validate()
    if accelerator is None:
        # split_batches: our batches are global (each process takes its slice), so the LR
        # scheduler must step once per optimizer step whatever the process count.
        accelerator = Accelerator(mixed_precision="bf16" if cfg.bf16 else "no", split_batches=True,
                                  gradient_accumulation_steps=cfg.grad_accum)
    torch.manual_seed(cfg.seed)
    model = load_model(cfg)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    tokenizer = load_tokenizer(cfg, model)
    dataset = load_dataset(cfg, tokenizer, model)
    schedule = make_schedule(cfg.schedule, **cfg.schedule_options)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg), lr=cfg.lr)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * cfg.steps), cfg.steps)
    module = EpicModule(model, cfg.method, cfg.method_options)
    module, optimizer, scheduler = accelerator.prepare(module, optimizer, scheduler)
    world, rank = accelerator.num_processes, accelerator.process_index
    if (cfg.batch_size // cfg.grad_accum) % world:
        raise ValueError(f"batch_size: the micro-batch {cfg.batch_size // cfg.grad_accum} must divide evenly "
                         f"over {world} processes")
    pad = partial(collate, pad_id=getattr(tokenizer, "tokenizer", tokenizer).pad_token_id)
    out_dir = Path(cfg.output_dir)

    start, history = 0, []
    if resume:
        found = checkpoints(out_dir)
        if not found:
            raise ValueError(f"resume: no checkpoint in {str(out_dir)!r}")
        accelerator.load_state(str(found[-1]))
        state = json.loads((found[-1] / "trainer_state.json").read_text())
        start, history = state["step"], state["history"]
        log(f"resumed from {found[-1]} at step {start}")

    writer = None
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(cfg.as_dict(), indent=1))
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                writer = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                writer = None
    wandb_run = _maybe_wandb(cfg) if accelerator.is_main_process else None

    bar = None
    if cfg.progress and accelerator.is_main_process:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.schedule}", dynamic_ncols=True)
    micro = cfg.batch_size // cfg.grad_accum if cfg.batch_size % cfg.grad_accum == 0 else None
    if micro is None:
        raise ValueError(f"batch_size: {cfg.batch_size} must be a multiple of grad_accum {cfg.grad_accum}")
    times = []
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    for step in range(start, end):
        t0 = time.perf_counter()
        plan = schedule.plan(progress(step, cfg.steps), step_rng(cfg.seed, step))
        indices = batch_indices(len(dataset), cfg.batch_size, step, cfg.seed)
        sums = torch.zeros(3, dtype=torch.float64)
        for a in range(cfg.grad_accum):
            part = indices[a * micro:(a + 1) * micro]
            mine = part[rank * (micro // world):(rank + 1) * (micro // world)]
            batch = {k: v.to(accelerator.device) for k, v in pad([dataset[i] for i in mine]).items()}
            local = (batch["labels"][:, 1:] != -100).sum().to(torch.float32)
            total = float(accelerator.reduce(local.clone(), reduction="sum"))
            with accelerator.accumulate(module):
                loss, sft, kl = module(batch, plan, max(total, 1.0))
                accelerator.backward(loss * world)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(module.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step() if accelerator.sync_gradients else None
                optimizer.zero_grad()
            sums += torch.stack([loss.detach(), sft, kl]).double().cpu()
        sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu() / cfg.grad_accum
        times.append(time.perf_counter() - t0)
        rec = {"step": step + 1, "loss": float(sums[0]), "sft": float(sums[1]), "kl": float(sums[2]),
               "lr": scheduler.get_last_lr()[0], "student": [plan.student.ratio, plan.student.layer],
               "teacher": None if plan.teacher is None else [plan.teacher.ratio, plan.teacher.layer],
               "time": times[-1]}
        history.append(rec)
        if writer is not None:
            for key in ("loss", "sft", "kl", "lr"):
                writer.add_scalar(f"train/{key}", rec[key], step + 1)
            writer.add_scalar("train/student_ratio", plan.student.ratio, step + 1)
        if wandb_run is not None:
            wandb_run.log({k: rec[k] for k in ("loss", "sft", "kl", "lr")}, step=step + 1)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", kl=f"{rec['kl']:.3f}", r=f"{plan.student.ratio:.2f}")
        elif accelerator.is_main_process and cfg.log_every and (step + 1) % cfg.log_every == 0:
            log(f"step {step + 1}/{cfg.steps} loss {rec['loss']:.4f} sft {rec['sft']:.4f} kl {rec['kl']:.4f}")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            save_checkpoint(accelerator, out_dir, step + 1, {"step": step + 1, "history": history},
                            cfg.keep_checkpoints)
    if bar is not None:
        bar.close()
    save_checkpoint(accelerator, out_dir, end, {"step": end, "history": history}, cfg.keep_checkpoints)
    final = out_dir / "final"
    if accelerator.is_main_process and end == cfg.steps:
        _save_final(accelerator.unwrap_model(module).model, tokenizer, final)
        (out_dir / "history.json").write_text(json.dumps(history, indent=1))
    if writer is not None:
        writer.close()
    accelerator.wait_for_everyone()
    steady = sorted(times[1:]) or times
    return TrainResult(history=history, output_dir=str(out_dir), final_dir=str(final),
                       step_time_s=steady[len(steady) // 2] if steady else 0.0)


def _save_final(model, tokenizer, folder: Path) -> None:
    """The trained model as a complete Hugging Face checkpoint, written atomically: weights
    (safetensors) and the processor training used (image processor, tokenizer, chat template),
    so ``from_pretrained`` / ``AutoProcessor.from_pretrained`` / ``epic-ext infer`` load it.
    ``tokenizer``: LLaVA's tokenizer, or the processor itself (Qwen-VL)."""
    from ..models.loading import QWEN_VL_TYPES
    from .data import llava_processor
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    try:
        if model.config.model_type in QWEN_VL_TYPES:
            tokenizer.save_pretrained(tmp)
        else:
            llava_processor(model.config, tokenizer, model.config.vision_config.image_size).save_pretrained(tmp)
    except Exception as e:   # noqa: BLE001 - the weights must survive; say what is missing
        warnings.warn(f"final model: the processor could not be saved ({type(e).__name__}: {e}); {folder} holds "
                      f"the weights and the tokenizer only", RuntimeWarning, stacklevel=2)
        tokenizer.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def _maybe_wandb(cfg: TrainConfig):
    if not cfg.wandb:
        return None
    try:
        import wandb
    except ImportError:
        return None
    return wandb.init(project="epic-ext", config=cfg.as_dict(), dir=cfg.output_dir)
