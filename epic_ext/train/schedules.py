"""EPIC compression schedules: what the student and the teacher do at each training step.

Everything here is a small pure function of the training progress ``p = step / total_steps`` in
[0, 1] plus, for the sampled schedules, one uniform draw from a caller-supplied RNG.

Conventions (used throughout, and by the trainer):

* A **ratio** is a *compression* ratio: the fraction of an image's visual tokens that are
  **dropped** (0 = keep all 576, 0.75 = keep 144). It lies in [0, 1). :func:`kept_tokens` turns
  it into the token budget a method gets (``1 - ratio`` of ``n``, rounded half up exactly like
  :func:`epic_ext.resolve_k`, at least 1).
* A **layer** is the decoder layer ``K`` just before which compression happens (0 = on the input
  embeddings, as in the in-LLM methods); layers below ``K`` see every token.
* The **teacher is milder** than the student: it drops at most as many tokens
  (``teacher.ratio <= student.ratio``) and compresses no earlier (``teacher.layer >=
  student.layer``). :class:`StepPlan` checks this.
* ``kl_weight`` is lambda in ``(1 - lambda) * SFT + lambda * KL(p_teacher || p_student)``;
  ``temperature`` is tau of the KL. A plan without a teacher has ``kl_weight == 0``.

Schedules (``make_schedule`` names in brackets, for YAML configs):

* :func:`tcd` ["tcd"]: student ratio ~ U(R_min(p), R_max(p)) at a fixed layer; teacher ratio
  ``max(0, r_s - Delta(p))`` at the same layer.
* :func:`lcd` ["lcd"]: one ratio ~ U(0.2, 0.9) for both; student layer
  ``round(L - p (L - l_min))`` clamped to ``L - 1``; teacher ``layer_gap`` layers deeper.
* :func:`icd` ["icd"]: both at once; the teacher is milder in ratio and in layer.
* :func:`direct` ["direct"]: ablation, fixed target ratio from step 0, no teacher.
* :func:`no_progressive` ["no-progressive"]: ablation, fixed target ratio from step 0 with a
  teacher at a fixed gap.

Presets (``PRESETS``) carry the TCD curves and the loss weights:

* ``"paper"``: R_max 5% -> 90%, Delta 5% -> 30%, lambda 0.7, tau 1. The paper gives no R_min;
  we use ``R_min = 0.05 + 0.2125 p``, i.e. R_min climbs a quarter of the way R_max climbs from
  the same start (0.05 -> 0.2625). That is the official code's proportion (0.16 / 0.64 = 1/4,
  both starting at 0.10), so the two presets differ only in the published numbers and the
  sampling window has the same shape: degenerate at p = 0, widening to 3/4 of R_max's rise.
* ``"official-code"``: R_max = 0.1 + 0.64 p, R_min = 0.1 + 0.16 p,
  Delta = min(0.1 + 0.5 p, 0.3), lambda 0.5, tau 1.

Reproducibility: randomness comes only from the ``rng`` passed to ``plan`` (``random.Random`` or
``numpy.random.Generator``), and every sampled plan draws exactly one uniform (fixed schedules
draw none). :func:`step_rng` derives a per-step generator from ``(seed, step)`` so that every
process computes the same plan for the same step without sharing RNG state.
"""
from __future__ import annotations

import math
import numbers
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["Line", "Preset", "PRESETS", "Setting", "StepPlan", "Schedule", "TCD", "LCD", "ICD",
           "Direct", "NoProgressive", "tcd", "lcd", "icd", "direct", "no_progressive",
           "make_schedule", "SCHEDULES", "kept_tokens", "progress", "step_rng", "r_max", "r_min",
           "gap", "lcd_layer", "default_layer_gap", "get_preset"]

Rng = random.Random | np.random.Generator
NUM_VISUAL_TOKENS = 576  # LLaVA-1.5: 24 x 24 CLIP patches


# --------------------------------------------------------------------------- argument checks

def _check_progress(p) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p <= 1.0:
        # `not 0 <= p <= 1` also rejects NaN
        raise ValueError(f"progress must be a real number in [0, 1], got {p!r}")
    return float(p)


def _check_ratio(name: str, r) -> float:
    if isinstance(r, bool) or not isinstance(r, numbers.Real) or not 0.0 <= r < 1.0:
        raise ValueError(f"{name} must be a compression ratio (fraction dropped) in [0, 1), got {r!r}")
    return float(r)


def _check_int(name: str, v, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be {bound}, got {v}")
    return int(v)


def _check_weight(name: str, w) -> float:
    if isinstance(w, bool) or not isinstance(w, numbers.Real) or not 0.0 <= w <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {w!r}")
    return float(w)


def _check_temperature(t) -> float:
    if isinstance(t, bool) or not isinstance(t, numbers.Real) or not (t > 0 and math.isfinite(t)):
        raise ValueError(f"temperature must be a finite number > 0, got {t!r}")
    return float(t)


def _check_range(name: str, rr) -> tuple[float, float]:
    if isinstance(rr, (str, bytes)) or not isinstance(rr, Sequence) or len(rr) != 2:
        raise ValueError(f"{name} must be a pair (low, high), got {rr!r}")
    lo, hi = _check_ratio(f"{name}[0]", rr[0]), _check_ratio(f"{name}[1]", rr[1])
    if lo > hi:
        raise ValueError(f"{name} must have low <= high, got {rr!r}")
    return lo, hi


def _check_num_layers(num_layers, layer: int, name: str = "layer") -> None:
    """``layer`` must be a decoder layer index (< num_layers) when the depth is known."""
    if num_layers is not None:
        n = _check_int("num_layers", num_layers, 1)
        if layer >= n:
            raise ValueError(f"{name} must be < num_layers = {n}, got {layer}")


def _uniform(rng: Rng, lo: float, hi: float) -> float:
    if isinstance(rng, random.Random):
        u = rng.random()
    elif isinstance(rng, np.random.Generator):
        u = float(rng.random())
    else:
        raise ValueError(f"rng must be a random.Random or numpy.random.Generator, got {type(rng).__name__}")
    # u in [0, 1) keeps the draw below `hi` (< 1), so it stays a valid ratio.
    return lo + (hi - lo) * u


# --------------------------------------------------------------------------- small helpers

def kept_tokens(ratio: float, n: int = NUM_VISUAL_TOKENS) -> int:
    """Visual tokens kept at compression ratio ``ratio`` (fraction dropped) out of ``n``:
    ``(1 - ratio) * n`` rounded half up (the rule of :func:`epic_ext.resolve_k`), at least 1 so a
    method always has a token to keep."""
    ratio = _check_ratio("ratio", ratio)
    n = _check_int("n", n, 1)
    return max(1, min(n, math.floor((1.0 - ratio) * n + 0.5)))


def progress(step: int, total_steps: int) -> float:
    """``p = step / total_steps`` (DESIGN.md), for ``step`` in [0, total_steps]."""
    total_steps = _check_int("total_steps", total_steps, 1)
    step = _check_int("step", step, 0, total_steps)
    return step / total_steps


def step_rng(seed: int, step: int) -> np.random.Generator:
    """A generator that depends only on ``(seed, step)``: every process (data-parallel rank,
    resumed run) that asks for the same step gets the same draws, without sharing RNG state."""
    seed = _check_int("seed", seed, 0)
    step = _check_int("step", step, 0)
    return np.random.default_rng(np.random.SeedSequence([seed, step]))


# --------------------------------------------------------------------------- curves

@dataclass(frozen=True)
class Line:
    """``min(start + slope * p, cap)``: every TCD curve is a (possibly capped) line in p."""
    start: float
    slope: float
    cap: float = math.inf

    def __call__(self, p: float) -> float:
        return min(self.start + self.slope * _check_progress(p), self.cap)


@dataclass(frozen=True)
class Preset:
    """TCD curves and loss weights of one published setting."""
    name: str
    r_max: Line
    r_min: Line
    gap: Line
    kl_weight: float
    temperature: float


PRESETS: dict[str, Preset] = {
    # Paper: R_max 5% -> 90%, Delta 5% -> 30%, lambda 0.7. R_min is our choice (module docstring):
    # a quarter of R_max's rise, the official code's proportion.
    "paper": Preset("paper", r_max=Line(0.05, 0.85), r_min=Line(0.05, 0.85 / 4),
                    gap=Line(0.05, 0.25), kl_weight=0.7, temperature=1.0),
    "official-code": Preset("official-code", r_max=Line(0.10, 0.64), r_min=Line(0.10, 0.16),
                            gap=Line(0.10, 0.50, cap=0.30), kl_weight=0.5, temperature=1.0),
}


def get_preset(preset: str | Preset) -> Preset:
    if isinstance(preset, Preset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    return PRESETS[preset]


def r_max(p: float, preset: str | Preset = "paper") -> float:
    """Upper end of the student's compression-ratio window at progress p."""
    return get_preset(preset).r_max(p)


def r_min(p: float, preset: str | Preset = "paper") -> float:
    """Lower end of the student's compression-ratio window at progress p."""
    return get_preset(preset).r_min(p)


def gap(p: float, preset: str | Preset = "paper") -> float:
    """Delta(p): how much less the teacher drops than the student."""
    return get_preset(preset).gap(p)


def lcd_layer(p: float, num_layers: int, l_min: int = 2) -> int:
    """Student compression layer ``round(L - p (L - l_min))`` (half up), clamped to ``L - 1``.

    At p = 0 the formula gives L, which is not a decoder layer; we clamp it to the deepest one
    (L - 1) rather than read it as "no compression", so every LCD step trains compression (and
    the schedule still starts at the deepest layer, as described). It reaches l_min at p = 1.
    """
    p = _check_progress(p)
    L, l_min = _check_layers(num_layers, l_min)
    return min(L - 1, math.floor(L - p * (L - l_min) + 0.5))


def default_layer_gap(num_layers: int, l_min: int = 2) -> int:
    """How many layers deeper the LCD/ICD teacher compresses by default: 10% of the schedule's
    span ``L - l_min``, at least 1 (3 for LLaVA-1.5-7B: L = 32, l_min = 2; 4 for 13B: L = 40).
    Scaling with depth keeps the gap meaningful on both real and tiny test models."""
    L, l_min = _check_layers(num_layers, l_min)
    return max(1, math.floor(0.1 * (L - l_min) + 0.5))


def _check_layers(num_layers, l_min) -> tuple[int, int]:
    L = _check_int("num_layers", num_layers, 1)
    # l_min must leave at least one decoder layer to compress at: l_min <= L - 1.
    return L, _check_int("l_min", l_min, 0, L - 1)


# --------------------------------------------------------------------------- plans

@dataclass(frozen=True)
class Setting:
    """One forward's compression: drop ``ratio`` of the visual tokens before decoder layer
    ``layer``."""
    ratio: float
    layer: int

    def __post_init__(self):
        object.__setattr__(self, "ratio", _check_ratio("ratio", self.ratio))
        object.__setattr__(self, "layer", _check_int("layer", self.layer, 0))

    def kept(self, n: int = NUM_VISUAL_TOKENS) -> int:
        """Token budget for ``n`` visual tokens (see :func:`kept_tokens`)."""
        return kept_tokens(self.ratio, n)


@dataclass(frozen=True)
class StepPlan:
    """What one training step does: the student's and (optionally) the teacher's compression,
    and the KL term's weight (lambda) and temperature (tau)."""
    student: Setting
    teacher: Setting | None
    kl_weight: float
    temperature: float

    def __post_init__(self):
        object.__setattr__(self, "kl_weight", _check_weight("kl_weight", self.kl_weight))
        object.__setattr__(self, "temperature", _check_temperature(self.temperature))
        t, s = self.teacher, self.student
        if t is None:
            if self.kl_weight != 0.0:
                raise ValueError(f"kl_weight must be 0 without a teacher, got {self.kl_weight}")
        elif t.ratio > s.ratio or t.layer < s.layer:
            raise ValueError(f"teacher must be milder than the student (ratio <= {s.ratio}, "
                             f"layer >= {s.layer}), got {t}")


@runtime_checkable
class Schedule(Protocol):
    def plan(self, progress: float, rng: Rng) -> StepPlan:
        """The step's plan at ``progress`` in [0, 1]; draws only from ``rng``."""
        ...


def _loss_weights(preset: Preset, kl_weight, temperature) -> tuple[float, float]:
    w = preset.kl_weight if kl_weight is None else _check_weight("kl_weight", kl_weight)
    t = preset.temperature if temperature is None else _check_temperature(temperature)
    return w, t


@dataclass(frozen=True)
class TCD:
    """Token-wise consistency distillation at a fixed layer."""
    preset: Preset
    layer: int
    kl_weight: float
    temperature: float

    def plan(self, progress: float, rng: Rng) -> StepPlan:
        p = _check_progress(progress)
        r_s = _uniform(rng, self.preset.r_min(p), self.preset.r_max(p))
        r_t = max(0.0, r_s - self.preset.gap(p))
        return StepPlan(Setting(r_s, self.layer), Setting(r_t, self.layer),
                        self.kl_weight, self.temperature)


def _lcd_layers(p: float, num_layers: int, l_min: int, layer_gap: int) -> tuple[int, int]:
    """(student, teacher) compression layers of LCD/ICD at progress p. The teacher is clamped to
    the last layer: near p = 0 it then equals the student (KL ~ 0) rather than stepping outside
    the decoder."""
    l_s = lcd_layer(p, num_layers, l_min)
    return l_s, min(num_layers - 1, l_s + layer_gap)


@dataclass(frozen=True)
class LCD:
    """Layer-wise consistency distillation: the compression layer moves from the deepest layer
    to l_min; student and teacher share one ratio, the teacher compresses deeper."""
    num_layers: int
    l_min: int
    ratio_range: tuple[float, float]
    layer_gap: int
    kl_weight: float
    temperature: float

    def plan(self, progress: float, rng: Rng) -> StepPlan:
        p = _check_progress(progress)
        r = _uniform(rng, *self.ratio_range)
        l_s, l_t = _lcd_layers(p, self.num_layers, self.l_min, self.layer_gap)
        return StepPlan(Setting(r, l_s), Setting(r, l_t), self.kl_weight, self.temperature)


@dataclass(frozen=True)
class ICD:
    """Both schedules: TCD's ratios at LCD's layers; the teacher is milder in both."""
    preset: Preset
    num_layers: int
    l_min: int
    layer_gap: int
    kl_weight: float
    temperature: float

    def plan(self, progress: float, rng: Rng) -> StepPlan:
        p = _check_progress(progress)
        r_s = _uniform(rng, self.preset.r_min(p), self.preset.r_max(p))
        r_t = max(0.0, r_s - self.preset.gap(p))
        l_s, l_t = _lcd_layers(p, self.num_layers, self.l_min, self.layer_gap)
        return StepPlan(Setting(r_s, l_s), Setting(r_t, l_t), self.kl_weight, self.temperature)


@dataclass(frozen=True)
class Direct:
    """Ablation: train at the target ratio from step 0, SFT only (no teacher)."""
    student: Setting

    def plan(self, progress: float, rng: Rng) -> StepPlan:
        _check_progress(progress)
        return StepPlan(self.student, None, 0.0, 1.0)


@dataclass(frozen=True)
class NoProgressive:
    """Ablation: the target ratio from step 0 with a teacher at a fixed gap (no schedule)."""
    student: Setting
    teacher: Setting
    kl_weight: float
    temperature: float

    def plan(self, progress: float, rng: Rng) -> StepPlan:
        _check_progress(progress)
        return StepPlan(self.student, self.teacher, self.kl_weight, self.temperature)


# --------------------------------------------------------------------------- factories

def tcd(preset: str | Preset = "paper", layer: int = 2, num_layers: int | None = None,
        kl_weight: float | None = None, temperature: float | None = None) -> TCD:
    """TCD at decoder layer ``layer`` (DART's K = 2). ``num_layers``, when given, only checks
    ``layer``. ``kl_weight`` / ``temperature`` override the preset's."""
    pr = get_preset(preset)
    layer = _check_int("layer", layer, 0)
    _check_num_layers(num_layers, layer)
    return TCD(pr, layer, *_loss_weights(pr, kl_weight, temperature))


def lcd(num_layers: int, l_min: int = 2, ratio_range: Sequence[float] = (0.2, 0.9),
        layer_gap: int | None = None, preset: str | Preset = "paper",
        kl_weight: float | None = None, temperature: float | None = None) -> LCD:
    """LCD over a ``num_layers``-layer LLM. ``layer_gap``: teacher layers deeper than the student
    (default :func:`default_layer_gap`). ``preset`` only supplies lambda and tau (LCD has no
    released values; the paper's lambda is the default)."""
    L, l_min = _check_layers(num_layers, l_min)
    rr = _check_range("ratio_range", ratio_range)
    # >= 1: with the same ratio, a teacher at the student's layer would be the student itself.
    lg = default_layer_gap(L, l_min) if layer_gap is None else _check_int("layer_gap", layer_gap, 1)
    pr = get_preset(preset)
    return LCD(L, l_min, rr, lg, *_loss_weights(pr, kl_weight, temperature))


def icd(num_layers: int, l_min: int = 2, preset: str | Preset = "paper",
        layer_gap: int | None = None, kl_weight: float | None = None,
        temperature: float | None = None) -> ICD:
    """ICD: the preset's TCD ratios with the LCD layer schedule. ``layer_gap`` may be 0 here (the
    teacher is then milder in ratio only)."""
    L, l_min = _check_layers(num_layers, l_min)
    lg = default_layer_gap(L, l_min) if layer_gap is None else _check_int("layer_gap", layer_gap, 0)
    pr = get_preset(preset)
    return ICD(pr, L, l_min, lg, *_loss_weights(pr, kl_weight, temperature))


def direct(target_ratio: float, layer: int = 2, num_layers: int | None = None) -> Direct:
    """Ablation "without teacher guidance": fixed ``target_ratio`` at ``layer``, SFT only."""
    s = Setting(_check_ratio("target_ratio", target_ratio), _check_int("layer", layer, 0))
    _check_num_layers(num_layers, s.layer)
    return Direct(s)


def no_progressive(target_ratio: float, layer: int = 2, preset: str | Preset = "paper",
                   gap: float | None = None, num_layers: int | None = None,
                   kl_weight: float | None = None,
                   temperature: float | None = None) -> NoProgressive:
    """Ablation "without the progressive schedule": student at ``target_ratio`` from step 0,
    teacher at ``max(0, target_ratio - gap)`` on the same layer. ``gap`` defaults to the preset's
    final Delta(1) (0.3 for both presets): the gap the progressive run ends with, held fixed."""
    pr = get_preset(preset)
    r = _check_ratio("target_ratio", target_ratio)
    d = pr.gap(1.0) if gap is None else _check_ratio("gap", gap)
    layer = _check_int("layer", layer, 0)
    _check_num_layers(num_layers, layer)
    return NoProgressive(Setting(r, layer), Setting(max(0.0, r - d), layer),
                         *_loss_weights(pr, kl_weight, temperature))


SCHEDULES = {"tcd": tcd, "lcd": lcd, "icd": icd, "direct": direct,
             "no-progressive": no_progressive}


def make_schedule(name: str, **kwargs) -> Schedule:
    """Build a schedule from a config: ``name`` is one of ``SCHEDULES`` ("no_progressive" is
    accepted for "no-progressive"), ``kwargs`` go to its factory."""
    key = name.lower().replace("_", "-") if isinstance(name, str) else name
    if key not in SCHEDULES:
        raise ValueError(f"name must be one of {sorted(SCHEDULES)}, got {name!r}")
    return SCHEDULES[key](**kwargs)
