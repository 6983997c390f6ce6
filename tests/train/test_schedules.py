"""EPIC schedules: curve endpoints and monotonicity, sampled plans within bounds, uniformity,
reproducibility, ablations, argument checks. Pure Python; about a second in all."""
import itertools
import random

import numpy as np
import pytest

from epic_ext.train import schedules as S
from epic_ext.train.schedules import Setting, StepPlan

PRESETS = ["paper", "official-code"]
GRID = [i / 200 for i in range(201)]
# (preset, curve) -> (value at p=0, value at p=1)
ENDPOINTS = {
    ("paper", "r_max"): (0.05, 0.90), ("paper", "r_min"): (0.05, 0.2625),
    ("paper", "gap"): (0.05, 0.30),
    ("official-code", "r_max"): (0.10, 0.74), ("official-code", "r_min"): (0.10, 0.26),
    ("official-code", "gap"): (0.10, 0.30),
}
CURVES = {"r_max": S.r_max, "r_min": S.r_min, "gap": S.gap}


def rngs(seed=0):
    return [random.Random(seed), np.random.default_rng(seed)]


def draws(schedule, p, n=2000, seed=0):
    return [schedule.plan(p, rng) for rng in rngs(seed) for _ in range(n // 2)]


# --------------------------------------------------------------------------- curves

@pytest.mark.parametrize("preset,curve", sorted(ENDPOINTS))
def test_curve_endpoints(preset, curve):
    lo, hi = ENDPOINTS[preset, curve]
    assert CURVES[curve](0.0, preset) == pytest.approx(lo, abs=1e-12)
    assert CURVES[curve](1.0, preset) == pytest.approx(hi, abs=1e-12)


@pytest.mark.parametrize("preset,curve", sorted(ENDPOINTS))
def test_curves_monotone(preset, curve):
    vals = [CURVES[curve](p, preset) for p in GRID]
    assert all(b >= a for a, b in itertools.pairwise(vals))
    assert vals[-1] > vals[0]


def test_official_gap_is_capped():
    assert S.gap(0.4, "official-code") == pytest.approx(0.3)  # 0.1 + 0.5 * 0.4 = 0.3
    assert S.gap(0.7, "official-code") == pytest.approx(0.3)
    assert S.gap(0.2, "official-code") == pytest.approx(0.2)


@pytest.mark.parametrize("preset", PRESETS)
def test_window_ordered(preset):
    for p in GRID:
        assert 0 <= S.r_min(p, preset) <= S.r_max(p, preset) < 1


def test_preset_loss_weights():
    assert S.PRESETS["paper"].kl_weight == 0.7 and S.PRESETS["paper"].temperature == 1.0
    assert S.PRESETS["official-code"].kl_weight == 0.5
    assert S.PRESETS["official-code"].temperature == 1.0


@pytest.mark.parametrize("L,l_min", [(32, 2), (40, 2), (4, 2), (24, 0), (3, 2)])
def test_lcd_layer_endpoints_and_monotone(L, l_min):
    assert S.lcd_layer(0.0, L, l_min) == L - 1  # formula gives L; clamped to the deepest layer
    assert S.lcd_layer(1.0, L, l_min) == l_min
    layers = [S.lcd_layer(p, L, l_min) for p in GRID]
    assert all(b <= a for a, b in itertools.pairwise(layers))
    assert all(l_min <= x <= L - 1 for x in layers)


def test_lcd_layer_formula():
    # round(32 - 0.5 * 30) = 17; round half up: 32 - 30 * 0.25 = 24.5 -> 25
    assert S.lcd_layer(0.5, 32, 2) == 17
    assert S.lcd_layer(0.25, 32, 2) == 25
    assert S.lcd_layer(1 / 30, 32, 2) == 31


def test_default_layer_gap():
    assert S.default_layer_gap(32, 2) == 3
    assert S.default_layer_gap(40, 2) == 4
    assert S.default_layer_gap(4, 2) == 1


def test_kept_tokens():
    assert S.kept_tokens(0.0) == 576
    assert S.kept_tokens(0.75) == 144
    assert S.kept_tokens(2 / 3) == 192
    assert S.kept_tokens(0.9) == 58  # 57.6 rounds up
    assert S.kept_tokens(0.999) == 1  # never 0
    assert S.kept_tokens(0.5, n=10) == 5
    assert Setting(0.75, 2).kept() == 144


def test_progress():
    assert S.progress(0, 100) == 0.0 and S.progress(100, 100) == 1.0 and S.progress(25, 100) == 0.25


# --------------------------------------------------------------------------- sampled plans

def check_plan(plan, L=None):
    s, t = plan.student, plan.teacher
    assert 0 <= s.ratio < 1
    if t is not None:
        assert 0 <= t.ratio <= s.ratio
        assert t.layer >= s.layer
    if L is not None:
        for x in (s, t):
            assert x is None or 0 <= x.layer <= L - 1


@pytest.mark.parametrize("preset", PRESETS)
def test_tcd_bounds(preset):
    sch = S.tcd(preset)
    for p in (0.0, 0.1, 0.5, 0.9, 1.0):
        lo, hi, d = S.r_min(p, preset), S.r_max(p, preset), S.gap(p, preset)
        for plan in draws(sch, p, 400):
            check_plan(plan)
            assert lo - 1e-12 <= plan.student.ratio <= hi + 1e-12
            assert plan.teacher.ratio == pytest.approx(max(0.0, plan.student.ratio - d))
            assert plan.student.layer == plan.teacher.layer == 2
            assert plan.kl_weight == S.PRESETS[preset].kl_weight


@pytest.mark.parametrize("preset", PRESETS)
def test_tcd_endpoints(preset):
    sch = S.tcd(preset)
    lo0 = S.r_min(0.0, preset)
    for plan in draws(sch, 0.0, 50):  # degenerate window at p = 0
        assert plan.student.ratio == pytest.approx(lo0)
        assert plan.teacher.ratio == 0.0  # gap(0) == r(0) for both presets
    lo1, hi1 = S.r_min(1.0, preset), S.r_max(1.0, preset)
    rs = [pl.student.ratio for pl in draws(sch, 1.0, 2000)]
    assert min(rs) >= lo1 - 1e-12 and max(rs) < hi1
    assert max(rs) - min(rs) > 0.95 * (hi1 - lo1)  # the window is actually used


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("p", [0.3, 1.0])
def test_tcd_uniform(preset, p):
    rs = np.array([pl.student.ratio for pl in draws(S.tcd(preset), p, 8000)])
    lo, hi = S.r_min(p, preset), S.r_max(p, preset)
    w = hi - lo
    # mean of U(lo, hi) has sd w / sqrt(12 n); 5 sd of slack
    assert abs(rs.mean() - (lo + hi) / 2) < 5 * w / np.sqrt(12 * len(rs))
    # and each quarter of the window gets about a quarter of the draws
    counts = np.histogram(rs, bins=4, range=(lo, hi))[0] / len(rs)
    assert np.all(np.abs(counts - 0.25) < 0.03)


@pytest.mark.parametrize("L,l_min", [(32, 2), (4, 2), (40, 2)])
def test_lcd_bounds(L, l_min):
    sch = S.lcd(L, l_min)
    for p in GRID[::20]:
        for plan in draws(sch, p, 200):
            check_plan(plan, L)
            assert 0.2 <= plan.student.ratio < 0.9
            assert plan.teacher.ratio == plan.student.ratio
            assert plan.student.layer == S.lcd_layer(p, L, l_min)
            assert plan.teacher.layer == min(L - 1, plan.student.layer + S.default_layer_gap(L, l_min))
            assert plan.student.layer >= l_min


def test_lcd_endpoints():
    sch = S.lcd(32)
    p0 = sch.plan(0.0, random.Random(0))
    assert p0.student.layer == 31 and p0.teacher.layer == 31
    p1 = sch.plan(1.0, random.Random(0))
    assert p1.student.layer == 2 and p1.teacher.layer == 5
    assert S.lcd(32, layer_gap=10).plan(1.0, random.Random(0)).teacher.layer == 12


def test_lcd_uniform():
    rs = np.array([pl.student.ratio for pl in draws(S.lcd(32), 0.5, 8000)])
    assert abs(rs.mean() - 0.55) < 5 * 0.7 / np.sqrt(12 * len(rs))
    assert rs.min() >= 0.2 and rs.max() < 0.9


@pytest.mark.parametrize("preset", PRESETS)
def test_icd_bounds(preset):
    L = 32
    sch = S.icd(L, preset=preset)
    for p in GRID[::10]:
        lo, hi, d = S.r_min(p, preset), S.r_max(p, preset), S.gap(p, preset)
        for plan in draws(sch, p, 100):
            check_plan(plan, L)
            assert lo - 1e-12 <= plan.student.ratio <= hi + 1e-12
            assert plan.teacher.ratio == pytest.approx(max(0.0, plan.student.ratio - d))
            assert plan.student.layer == S.lcd_layer(p, L, 2)
            assert plan.teacher.layer == min(L - 1, plan.student.layer + 3)
    end = sch.plan(1.0, random.Random(1))
    assert end.student.layer == 2 and end.teacher.layer == 5
    assert sch.plan(0.0, random.Random(1)).student.layer == L - 1


@pytest.mark.parametrize("name,kwargs", [
    ("tcd", {}), ("tcd", {"preset": "official-code"}), ("lcd", {"num_layers": 32}),
    ("icd", {"num_layers": 32}), ("direct", {"target_ratio": 0.75}),
    ("no-progressive", {"target_ratio": 0.75})])
def test_reproducible(name, kwargs):
    sch = S.make_schedule(name, **kwargs)
    assert isinstance(sch, S.Schedule)
    for make in (random.Random, np.random.default_rng):
        a = [sch.plan(p, make(7)) for p in GRID]
        b = [sch.plan(p, make(7)) for p in GRID]
        assert a == b
    # per-step generators: same (seed, step) -> same plan; different step -> (almost surely) not
    a = [sch.plan(step / 100, S.step_rng(3, step)) for step in range(101)]
    b = [sch.plan(step / 100, S.step_rng(3, step)) for step in range(101)]
    assert a == b


def test_step_rng_differs_by_step_and_seed():
    sch = S.tcd()
    assert sch.plan(0.5, S.step_rng(0, 1)) != sch.plan(0.5, S.step_rng(0, 2))
    assert sch.plan(0.5, S.step_rng(0, 1)) != sch.plan(0.5, S.step_rng(1, 1))
    # fixed values: identical in every process / run (no hash randomisation involved)
    assert float(S.step_rng(0, 1).random()) == float(S.step_rng(0, 1).random())


def test_one_draw_per_plan():
    # The plan consumes exactly one uniform, so the caller's rng advances predictably.
    r1, r2 = random.Random(5), random.Random(5)
    S.icd(32).plan(0.5, r1)
    r2.random()
    assert r1.random() == r2.random()


# --------------------------------------------------------------------------- ablations

def test_direct():
    sch = S.direct(0.75)
    for p in (0.0, 0.5, 1.0):
        plan = sch.plan(p, random.Random(p))
        assert plan.teacher is None and plan.kl_weight == 0.0
        assert plan.student == Setting(0.75, 2)
    assert S.direct(0.9, layer=0).plan(0.0, random.Random()).student == Setting(0.9, 0)


@pytest.mark.parametrize("preset", PRESETS)
def test_no_progressive(preset):
    sch = S.no_progressive(0.75, preset=preset)
    plans = [sch.plan(p, random.Random(0)) for p in (0.0, 0.5, 1.0)]
    assert plans[0] == plans[1] == plans[2]
    plan = plans[0]
    assert plan.student == Setting(0.75, 2)
    assert plan.teacher.ratio == pytest.approx(0.45) and plan.teacher.layer == 2
    assert plan.kl_weight == S.PRESETS[preset].kl_weight
    assert S.no_progressive(0.2, gap=0.3).plan(0, random.Random()).teacher.ratio == 0.0
    assert S.no_progressive(0.75, gap=0.1).plan(0, random.Random()).teacher.ratio == pytest.approx(0.65)


def test_overrides_and_names():
    sch = S.make_schedule("tcd", preset="official-code", kl_weight=0.3, temperature=2.0)
    plan = sch.plan(0.5, random.Random(0))
    assert plan.kl_weight == 0.3 and plan.temperature == 2.0
    assert isinstance(S.make_schedule("no_progressive", target_ratio=0.5), S.NoProgressive)
    assert isinstance(S.make_schedule("LCD", num_layers=32, ratio_range=[0.3, 0.6]), S.LCD)


# --------------------------------------------------------------------------- bad arguments

@pytest.mark.parametrize("p", [-0.01, 1.01, float("nan"), float("inf"), "0.5", None, True])
def test_bad_progress(p):
    for sch in (S.tcd(), S.lcd(32), S.icd(32), S.direct(0.5), S.no_progressive(0.5)):
        with pytest.raises(ValueError, match="progress"):
            sch.plan(p, random.Random(0))
    with pytest.raises(ValueError, match="progress"):
        S.r_max(p)
    with pytest.raises(ValueError, match="progress"):
        S.lcd_layer(p, 32)


@pytest.mark.parametrize("call,arg", [
    (lambda: S.tcd(preset="nope"), "preset"),
    (lambda: S.make_schedule("nope"), "name"),
    (lambda: S.tcd(layer=-1), "layer"),
    (lambda: S.tcd(layer=32, num_layers=32), "layer"),
    (lambda: S.tcd(kl_weight=1.5), "kl_weight"),
    (lambda: S.tcd(temperature=0), "temperature"),
    (lambda: S.lcd(32, l_min=32), "l_min"),
    (lambda: S.lcd(32, l_min=-1), "l_min"),
    (lambda: S.lcd(0), "num_layers"),
    (lambda: S.lcd(32, ratio_range=(0.9, 0.2)), "ratio_range"),
    (lambda: S.lcd(32, ratio_range=(0.2, 1.0)), "ratio_range"),
    (lambda: S.lcd(32, ratio_range=0.5), "ratio_range"),
    (lambda: S.lcd(32, layer_gap=0), "layer_gap"),
    (lambda: S.icd(32, l_min=40), "l_min"),
    (lambda: S.icd(32, preset="nope"), "preset"),
    (lambda: S.direct(1.0), "target_ratio"),
    (lambda: S.direct(-0.1), "target_ratio"),
    (lambda: S.direct(0.5, layer=2.5), "layer"),
    (lambda: S.direct(0.5, layer=4, num_layers=4), "layer"),
    (lambda: S.no_progressive(1.2), "target_ratio"),
    (lambda: S.no_progressive(0.5, gap=1.0), "gap"),
    (lambda: S.kept_tokens(1.0), "ratio"),
    (lambda: S.kept_tokens(0.5, n=0), "n"),
    (lambda: S.progress(5, 4), "step"),
    (lambda: S.progress(0, 0), "total_steps"),
    (lambda: S.step_rng(-1, 0), "seed"),
    (lambda: Setting(1.0, 2), "ratio"),
    (lambda: Setting(0.5, -1), "layer"),
    (lambda: StepPlan(Setting(0.5, 2), Setting(0.6, 2), 0.5, 1.0), "teacher"),
    (lambda: StepPlan(Setting(0.5, 4), Setting(0.4, 2), 0.5, 1.0), "teacher"),
    (lambda: StepPlan(Setting(0.5, 2), None, 0.5, 1.0), "kl_weight"),
    (lambda: S.tcd().plan(0.5, object()), "rng"),
])
def test_bad_arguments(call, arg):
    with pytest.raises(ValueError, match=arg):
        call()
