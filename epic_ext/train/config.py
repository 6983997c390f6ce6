"""The trainer's configuration: one dataclass, loaded from YAML (``epic-ext train --config``).

    model: tiny                  # a preset (tiny LLaVA of epic_ext.models.tiny, or tiny-qwen2.5-vl ...),
                                 # or a local LLaVA / Qwen2-VL / Qwen2.5-VL / Qwen3-VL folder
    init_from: runs/vanilla      # optional: start from a saved model (a run's final/ folder)
    data: {synthetic: {n: 2048, seed: 0}}        # or {json: data.json, images: img/}
    schedule: tcd                # tcd | lcd | icd | direct | no-progressive
    schedule_options: {preset: paper}            # e.g. target_ratio for direct
    method: dart
    steps: 300
    batch_size: 16               # global batch per optimizer step (split across processes)
    lr: 1.0e-3
    output_dir: runs/tcd
"""
from __future__ import annotations

import inspect
import math
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
        """Check every key's type and range (and the schedule's and method's options by building
        them), so a bad config fails before any model loads, with a message naming the key.
        Numbers written as strings that parse as numbers (YAML reads ``1e-3`` as a string) are
        converted."""
        for name in _STR_KEYS:
            v = getattr(self, name)
            if not (isinstance(v, str) and v.strip()) and not (v is None and name in _OPTIONAL_KEYS):
                raise ValueError(f"{name}: must be a non-empty string, got {v!r}")
        for name, low in _INT_KEYS.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                kind = "a positive int" if low == 1 else f"an int >= {low}"
                raise ValueError(f"{name}: must be {kind}, got {v!r}")
        for name, (low, high) in _FLOAT_KEYS.items():
            v = getattr(self, name)
            try:
                if isinstance(v, bool) or not isinstance(v, (int, float, str)):
                    raise TypeError
                x = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"{name}: must be a number, got {v!r}") from None
            if not (math.isfinite(x) and low <= x <= high):
                rng = f"in [{low}, {high}]" if high != math.inf else f">= {low}"
                raise ValueError(f"{name}: must be a finite number {rng}, got {v!r}")
            setattr(self, name, x)
        for name in _BOOL_KEYS:
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise ValueError(f"{name}: must be true or false, got {v!r}")
        for name in ("data", "schedule_options", "method_options"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name}: must be a mapping (key: value), got {getattr(self, name)!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype: float32, bfloat16 or float16, got {self.dtype!r}")
        self._check_model()
        self._check_data()
        self._check_schedule()
        self._check_method()
        return self

    def _check_model(self) -> None:
        if self.init_from is None and self.model not in model_presets() and not Path(self.model).is_dir():
            raise ValueError(f"model: {self.model!r} is neither a preset ({model_presets()}) nor a local folder")
        if self.init_from is not None and not Path(self.init_from).is_dir():
            raise ValueError(f"init_from: no such folder {self.init_from!r} (a saved model, e.g. a run's final/)")

    def _check_data(self) -> None:
        d = self.data
        usage = "give {synthetic: {n: INT, seed: INT}} or {json: FILE, images: FOLDER}"
        if "synthetic" in d:
            syn = d["synthetic"]
            if set(d) != {"synthetic"} or not isinstance(syn, dict):
                raise ValueError(f"data: {usage}, got {d!r}")
            from .synthetic import generate
            _check_options("data.synthetic", "the synthetic task", generate, {"n": 1, **syn})
            for key, low in (("n", 1), ("seed", 0)):
                v = syn.get(key, low)
                if isinstance(v, bool) or not isinstance(v, int) or v < low:
                    raise ValueError(f"data.synthetic.{key}: must be an int >= {low}, got {v!r}")
            return
        if set(d) != {"json", "images"}:
            raise ValueError(f"data: {usage}, got {d!r}")
        if not isinstance(d["json"], str) or not Path(d["json"]).is_file():
            raise FileNotFoundError(f"data.json: no such file {d['json']!r}")
        if not isinstance(d["images"], str) or not Path(d["images"]).is_dir():
            raise FileNotFoundError(f"data.images: no such folder {d['images']!r}")

    def _check_schedule(self) -> None:
        from .schedules import SCHEDULES, make_schedule
        key = self.schedule.lower().replace("_", "-")
        if key not in SCHEDULES:
            raise ValueError(f"schedule: unknown schedule {self.schedule!r}; one of {sorted(SCHEDULES)} "
                             f"(plain fine-tuning: direct with schedule_options {{target_ratio: 0}})")
        _check_options("schedule_options", f"schedule {key!r}", SCHEDULES[key], self.schedule_options)
        try:
            make_schedule(key, **self.schedule_options)
        except (TypeError, ValueError) as e:
            raise ValueError(f"schedule_options: {e}") from None

    def _check_method(self) -> None:
        from ..methods import get_method
        spec = get_method(self.method)          # ValueError "method: unknown method ..."
        if spec.stage != "llm":
            raise ValueError(f"method: EPIC trains with in-LLM methods (dart, fastv, random, pooling), got "
                             f"{self.method!r}, which reduces before the projector")
        fixed = sorted({"keep", "layer"} & set(self.method_options))
        if fixed:
            raise ValueError(f"method_options: {fixed} are set by the schedule at every step (the student's and "
                             f"teacher's ratio and layer); remove them (schedule_options sets the schedule)")
        try:
            # keep / layer stand in for what the schedule gives each step (layer 1 suits every
            # in-LLM method; the real layer is checked against the model when training starts).
            spec.make_config(keep=1, layer=1, **self.method_options)
        except (TypeError, ValueError) as e:
            raise ValueError(f"method_options: {e}") from None

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        if not isinstance(d, dict):
            raise ValueError(f"config: expected a mapping of keys (key: value), got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"config: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**d).validate()

    @classmethod
    def from_yaml(cls, path) -> "TrainConfig":
        return cls.from_dict(read_config_file(path))

    def as_dict(self) -> dict:
        return asdict(self)


# Tiny Qwen-VL presets (epic_ext.models.tiny_qwen) by family.
QWEN_PRESETS = {"tiny-qwen2-vl": "qwen2_vl", "tiny-qwen2.5-vl": "qwen2_5_vl", "tiny-qwen3-vl": "qwen3_vl"}


def model_presets() -> list[str]:
    """Every model preset name: the tiny LLaVA ones and the tiny Qwen-VL ones."""
    from ..models.tiny import PRESETS
    return sorted(PRESETS) + list(QWEN_PRESETS)


_STR_KEYS = ("model", "init_from", "dtype", "attn_implementation", "schedule", "method", "output_dir")
_OPTIONAL_KEYS = ("init_from",)
_INT_KEYS = {"steps": 1, "batch_size": 1, "grad_accum": 1, "max_length": 1, "seed": 0, "save_every": 0,
             "keep_checkpoints": 0, "log_every": 0}
_FLOAT_KEYS = {"lr": (0.0, math.inf), "vision_lr": (0.0, math.inf), "weight_decay": (0.0, math.inf),
               "warmup_ratio": (0.0, 1.0), "max_grad_norm": (0.0, math.inf)}
_BOOL_KEYS = ("bf16", "gradient_checkpointing", "tensorboard", "wandb", "progress")


def _check_options(key: str, what: str, fn, options: dict) -> None:
    """``options`` must be keyword arguments of ``fn``, its required ones included."""
    params = inspect.signature(fn).parameters
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ValueError(f"{key}: {what} has no option(s) {unknown}; its options are {sorted(params)}")
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in options]
    if missing:
        raise ValueError(f"{key}: {what} needs {missing}")


def read_config_file(path) -> dict:
    """The mapping in a YAML (or JSON) config file; errors name the file."""
    import yaml
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config: no such file {str(path)!r}")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"config: {str(path)!r} is not valid YAML/JSON{at}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config: {str(path)!r} must hold a mapping of keys (key: value), "
                         f"got {type(data).__name__}")
    return data


def parse_overrides(data: dict, overrides) -> dict:
    """``data`` updated with ``KEY=VALUE`` strings (``--set``); VALUE is read as YAML."""
    import yaml
    data = dict(data)
    for kv in overrides:
        key, sep, value = kv.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set: expected KEY=VALUE, got {kv!r}")
        try:
            data[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ValueError(f"--set {key}: cannot read the value {value!r}") from None
    return data
