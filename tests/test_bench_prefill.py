"""bench_prefill's Qwen2.5-VL rows: the requests have the stated geometry, and the row driver runs
end to end on a tiny model (its cache-length vs cost-model check included)."""
from __future__ import annotations

import argparse
import types

import pytest
import torch

from benchmarks import bench_prefill as bp
from epic_ext.cost import units_from_grids
from epic_ext.models.tiny_qwen import IMAGE_ID, VIDEO_ID, qwen_config


@pytest.mark.parametrize("name, kind, units", [("image-448", "image", [256]), ("image-1344", "image", [2304]),
                                               ("video-16x448", "video", [256] * 8)])
def test_qwen_requests_have_the_stated_visual_tokens(name, kind, units):
    cfg = qwen_config("qwen2_5_vl", **bp.QWEN_OVERRIDES)
    req = bp.qwen_request(types.SimpleNamespace(config=cfg), name, 2, "cpu", torch.float32)
    ids = req["input_ids"]
    placeholder = IMAGE_ID if kind == "image" else VIDEO_ID
    assert ids.shape[0] == 2 and (ids == placeholder).sum(1).tolist() == [sum(units)] * 2
    grid = req[f"{kind}_grid_thw"]
    per_row = [u.tokens for u in units_from_grids(cfg, **{f"{kind}_grid_thw": grid[:1]})]
    assert per_row == units
    pixels = req["pixel_values" if kind == "image" else "pixel_values_videos"]
    assert pixels.shape == (int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    if kind == "video":
        assert req["second_per_grid_ts"].tolist() == [1.0, 1.0]   # 16 frames at 2 fps, 2 per group


def test_qwen_overrides_at_another_width():
    wide = bp.qwen_overrides(512)
    assert (wide["hidden_size"], wide["num_attention_heads"], wide["intermediate_size"], wide["out_hidden_size"]) \
        == (512, 8, 2688, 512)
    assert bp.qwen_overrides() == bp.QWEN_OVERRIDES
    with pytest.raises(SystemExit, match="--hidden"):
        bp.qwen_overrides(100)


@pytest.mark.parametrize("kind", ["image", "video"])
def test_qwen_rows_run_on_a_tiny_model(monkeypatch, kind):
    # the same driver on a 3-layer model and a small request (112 px: 16 tokens per unit)
    monkeypatch.setitem(bp.QWEN_REQUESTS, "small", (kind, 4 if kind == "video" else 1, 112, 112))
    args = argparse.Namespace(layer=2, batch=1, min_reps=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny ops: a second thread only adds waits on a loaded machine
    try:
        rows = bp.run_qwen(args, torch.device("cpu"), torch.float32, ["dart", "fastv"], ["small"], [1.0, 0.25],
                           budget_s=0.0, overrides=dict(num_hidden_layers=3))
    finally:
        torch.set_num_threads(threads)
    assert [(r["method"], r["keep"]) for r in rows] == [("none", 1.0), ("dart", 0.25), ("fastv", 0.25)]
    base, *reduced = rows
    units = 2 if kind == "video" else 1
    assert base["kept_visual"] == 16 * units and base["flops_ratio"] == 1.0 and base["llm_time_ratio"] == 1.0
    for r in reduced:
        assert r["kept_visual"] == 4 * units and r["kept_per_unit"] == [4] * units
        assert 0 < r["llm_flops_ratio"] < r["flops_ratio"] < 1
        assert r["kv_bytes"] < base["kv_bytes"]
        assert r["llm_ms"] > 0 and r["llm_cpu_ms"] >= 0 and r["prefill_ms"] > 0 and r["decode_ms_per_token"] > 0
