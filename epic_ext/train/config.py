"""The trainer's configuration: one dataclass, loaded from YAML (``epic-ext train --config``).

    model: tiny                  # a preset of epic_ext.models.tiny, or a local LLaVA folder
    init_from: runs/vanilla      # optional: start from a saved model (a run's final/ folder)
    data: {synthetic: {n: 2048, seed: 0}}        # or {json: data.json, images: img/}
    schedule: tcd                # tcd | lcd | icd | direct | no-progressive | sft
    schedule_options: {preset: paper}            # e.g. target_ratio for direct
    method: dart
    steps: 300
    batch_size: 16               # global batch per optimizer step (split across processes)
    lr: 1.0e-3
    output_dir: runs/tcd
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional


@dataclass
class TrainConfig:
    model: str = "tiny"
    init_from: Optional[str] = None
    dtype: str = "float32"                 # parameter dtype; bf16 compute goes through `bf16`
    attn_implementation: str = "sdpa"
    data: dict = field(default_factory=lambda: {"synthetic": {"n": 1024, "seed": 0}})
    max_length: int = 2048
    schedule: str = "tcd"
    schedule_options: dict = field(default_factory=dict)
    method: str = "dart"
    method_options: dict = field(default_factory=dict)
    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    vision_lr: float = 0.0                 # 0 freezes the vision tower (LLaVA-1.5 fine-tuning does)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    bf16: bool = False                     # autocast the forward in bf16 (accelerate mixed precision)
    gradient_checkpointing: bool = False
    seed: int = 0
    output_dir: str = "runs/epic"
    save_every: int = 0                    # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2
    log_every: int = 10
    tensorboard: bool = True
    wandb: bool = False                    # used when installed and True
    progress: bool = True

    def validate(self) -> "TrainConfig":
        for name in ("steps", "batch_size", "grad_accum"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: must be a positive int, got {getattr(self, name)!r}")
        for name in ("lr", "vision_lr", "weight_decay", "warmup_ratio", "max_grad_norm"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype: float32, bfloat16 or float16, got {self.dtype!r}")
        if not isinstance(self.data, dict) or not ({"synthetic"} & set(self.data) or {"json", "images"} <= set(self.data)):
            raise ValueError("data: give {synthetic: {n, seed}} or {json: FILE, images: FOLDER}")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"config: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**d).validate()

    @classmethod
    def from_yaml(cls, path) -> "TrainConfig":
        import yaml
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config: no such file {str(path)!r}")
        return cls.from_dict(yaml.safe_load(path.read_text()) or {})

    def as_dict(self) -> dict:
        return asdict(self)
