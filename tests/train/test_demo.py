"""The demo's plumbing (recipes, protocols, reuse) and the sweep's aggregation over seeds."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks.demo_sweep import aggregate, format_aggregate
from epic_ext.train.demo import QUICK, DemoRecipe, format_tables, run_demo


def test_recipe_rejects_unknown_variants_and_protocols():
    with pytest.raises(ValueError, match="variants"):
        DemoRecipe(variants=("direct", "distill"))
    with pytest.raises(ValueError, match="protocol"):
        DemoRecipe(protocol="finetune")


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    recipe = replace(QUICK, variants=("direct", "tcd"))
    first = run_demo(out, recipe=recipe, reuse=True, progress=False, log=lambda m: None)
    # evaluation-only change: the models are reused and evaluated again
    second = run_demo(out, recipe=replace(recipe, budgets=(576, 64, 36)), reuse=True, progress=False,
                      log=lambda m: None)
    return out, recipe, first, second


def test_quick_demo_trains_every_variant_from_vanilla_and_reuses_them(quick_runs):
    out, recipe, first, second = quick_runs
    assert first["reused_runs"] == []
    assert second["reused_runs"] == ["vanilla", "direct", "tcd"]
    old = {(r["variant"], r["method"], r["keep"]): r["accuracy"] for r in first["accuracy"]}
    new = {(r["variant"], r["method"], r["keep"]): r["accuracy"] for r in second["accuracy"]}
    assert {k: new[k] for k in old} == old                 # the same models were evaluated
    assert {k[2] for k in new} == {576, 64, 36}
    # nothing changed: the saved result comes back without evaluating
    again = run_demo(out, recipe=replace(recipe, budgets=(576, 64, 36)), reuse=True, progress=False,
                     log=lambda m: None)
    assert again["total_seconds"] == second["total_seconds"] and again["accuracy"] == second["accuracy"]
    for name in ("direct", "tcd"):
        cfg = json.loads((out / name / "demo_run.json").read_text())["config"]
        assert cfg["init_from"] == str(out / "vanilla" / "final")
        assert cfg["steps"] == recipe.continue_steps
    rows = {(r["variant"], r["method"], r["keep"]) for r in first["accuracy"]}
    assert rows == {(v, "dart", k) for v in ("vanilla", "direct", "tcd") for k in recipe.budgets}
    table = format_tables(first)
    assert "tcd" in table and "question-only baseline" in table


def test_quick_demo_evaluates_through_the_grid_and_reuses_its_cells(quick_runs):
    """Each variant is a grid of the local harness (576 = its baseline); the evaluation-only
    change ran only the new budget's cells; the efficiency rows are the vanilla grid's."""
    out, recipe, first, second = quick_runs
    assert set(second["eval"]) == {"vanilla", "direct", "tcd"}
    for name, folder in second["eval"].items():
        report = json.loads((Path(folder) / "eval.json").read_text())
        assert report["spec"]["harness"] == "local" and report["spec"]["keeps"] == [64, 36]
        assert {c["cell"]["name"]: c["reused"] for c in report["cells"]} == {"full": True, "dart@64": True,
                                                                             "dart@36": False}
        scores = {c["cell"]["name"]: c["scores"]["epic_vqa"]["exact_match"] for c in report["cells"]}
        acc = {r["keep"]: r["accuracy"] for r in second["accuracy"] if r["variant"] == name}
        assert acc == {576: scores["full"], 64: scores["dart@64"], 36: scores["dart@36"]}
        assert all(c["samples"] == {"epic_vqa": recipe.n_eval} for c in report["cells"])
    vanilla = {c["cell"]["name"]: c["efficiency"]
               for c in json.loads((out / "eval" / "vanilla" / "eval.json").read_text())["cells"]}
    eff = {e["keep"]: e for e in second["efficiency"]}
    assert eff[576]["kv_bytes"] == vanilla["full"]["mean_kv_bytes"]
    assert eff[36]["prefill_ms_per_batch"] == vanilla["dart@36"]["mean_prefill_ms"]
    assert eff[64]["kv_bytes"] < eff[576]["kv_bytes"]


def test_a_changed_recipe_retrains_instead_of_reusing(quick_runs):
    out, recipe, first, _ = quick_runs
    changed = run_demo(out, recipe=replace(recipe, variants=("direct",), continue_lr=5e-4), reuse=True,
                       progress=False, log=lambda m: None)
    assert changed["reused_runs"] == ["vanilla"]


def test_scratch_protocol_trains_variants_from_the_random_init(tmp_path):
    recipe = replace(QUICK, variants=("direct",), protocol="scratch")
    run_demo(tmp_path, recipe=recipe, progress=False, log=lambda m: None)
    cfg = json.loads((tmp_path / "direct" / "demo_run.json").read_text())["config"]
    assert cfg["init_from"] is None and cfg["steps"] == recipe.vanilla_steps and cfg["lr"] == recipe.lr


def _fake(seed_acc: dict) -> dict:
    """A run_demo result: {(variant, keep): accuracy} with one method."""
    return {"recipe": {"methods": ["dart"]},
            "accuracy": [{"variant": v, "method": "dart", "keep": k, "accuracy": a} for (v, k), a in seed_acc.items()]}


def test_aggregate_means_paired_differences_and_left_out_seeds():
    results = {
        1: _fake({("vanilla", 576): 0.9, ("direct", 64): 0.80, ("tcd", 64): 0.70}),
        2: _fake({("vanilla", 576): 0.8, ("direct", 64): 0.60, ("tcd", 64): 0.65}),
        3: _fake({("vanilla", 576): 0.3, ("direct", 64): 0.30, ("tcd", 64): 0.90}),   # did not learn
    }
    agg = aggregate(results, learned=0.6)
    assert agg["seeds_used"] == [1, 2] and agg["seeds_left_out"] == [3]
    rows = {(r["variant"], r["keep"]): r for r in agg["rows"]}
    assert rows[("tcd", 64)]["mean"] == pytest.approx(0.675)
    assert rows[("tcd", 64)]["std"] == pytest.approx(0.0353553, rel=1e-5)
    # paired: (0.70 - 0.80 + 0.65 - 0.60) / 2, s.e. = stdev([-0.1, 0.05]) / sqrt(2)
    assert rows[("tcd", 64)]["minus_direct"] == pytest.approx(-0.025)
    assert rows[("tcd", 64)]["minus_direct_se"] == pytest.approx(0.075)
    assert "minus_direct" not in rows[("direct", 64)]
    text = format_aggregate(agg, ("vanilla", "direct", "tcd"), ("dart",), (576, 64))
    assert "-0.03" in text or "-0.02" in text
