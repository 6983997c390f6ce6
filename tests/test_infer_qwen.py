"""The cost model, epic_ext.infer and `epic-ext infer` on the tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL
models: several images, videos and text-only rows per batch."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from epic_ext.cli import main as cli_main
from epic_ext.cost import VisualUnit, prefill_cost, request_cost, units_from_grids
from epic_ext.inference import format_reports, infer
from epic_ext.models import applied_method, apply, revert
from epic_ext.models.tiny_qwen import (IM_START_ID, IMAGE_ID, PAD_ID, VIDEO_ID, VISION_END_ID, VISION_START_ID,
                                       build_tiny_qwen, row_inputs)

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


def handmade_inputs(model, images, video=None, text_words=7, seed=0):
    """One unpadded row without a processor: a few words, each image (h, w LLM tokens) and the
    video (t frame groups of h x w) in their vision spans, more words; random pixels of the
    matching patch counts. Returns (inputs, text token count)."""
    cfg = model.config
    v = cfg.vision_config
    m = v.spatial_merge_size
    g = torch.Generator().manual_seed(seed)

    def words(n):
        return torch.randint(20, cfg.text_config.vocab_size, (n,), generator=g).tolist()

    ids, types, grids, vgrids = [IM_START_ID] + words(2), [0] * 3, [], []
    for h, w in images:
        ids += [VISION_START_ID] + [IMAGE_ID] * (h * w) + [VISION_END_ID]
        types += [0] + [1] * (h * w) + [0]
        grids.append([1, h * m, w * m])
    if video is not None:
        t, h, w = video
        ids += [VISION_START_ID] + [VIDEO_ID] * (t * h * w) + [VISION_END_ID]
        types += [0] + [2] * (t * h * w) + [0]
        vgrids.append([t, h * m, w * m])
    ids += words(text_words)
    types += [0] * text_words
    dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    out = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
           "mm_token_type_ids": torch.tensor([types])}
    for key, px_key, gr in (("image_grid_thw", "pixel_values", grids),
                            ("video_grid_thw", "pixel_values_videos", vgrids)):
        if gr:
            out[key] = torch.tensor(gr)
            out[px_key] = torch.randn(int(out[key].prod(-1).sum()), dim, generator=g)
    visual = sum(h * w for h, w in images) + (0 if video is None else video[0] * video[1] * video[2])
    return out, len(ids) - visual


@pytest.mark.parametrize("method,keep,layer", [("none", None, 0), ("random", 2, 2), ("pooling", 4, 1)])
def test_request_flops_formula_matches_counted_matmuls(family, method, keep, layer):
    # Eager attention everywhere: the vision tower attends per unit (per window in Qwen2.5-VL's
    # windowed blocks: the 3x5 and 6x4 grids span several 2x2 windows, cut at the edges), the LLM
    # with dense masked matmuls, which the formula counts with causal=False.
    model = build_tiny_qwen(family, attn="eager")
    # Qwen3-VL's get_rope_index wants each video frame group in its own span (timestamps); images only there
    video = None if family == "qwen3_vl" else (2, 2, 3)
    inputs, text = handmade_inputs(model, [(3, 5), (6, 4)], video)
    apply(model, method, keep=keep, **({} if method == "none" else {"layer": layer}))
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model(**inputs, logits_to_keep=1, use_cache=True)
    finally:
        revert(model)
    units = units_from_grids(model.config, inputs.get("image_grid_thw"), inputs.get("video_grid_thw"))
    assert [u.tokens for u in units] == [15, 24] + ([6, 6] if video else [])
    units = [VisualUnit(u.tokens, keep, u.grid, u.kind) for u in units]
    cost = request_cost(model.config, text, units, layer, causal=False)
    # every matmul of the forward (vision tower, mergers, DeepStack mergers, LLM, head) and none
    # the formula does not know of
    assert cost.flops == counter.get_total_flops()
    assert cost.flops_vision > 0 and request_cost(model.config, text, units, layer).flops < cost.flops


def test_cost_units_are_checked_and_llava_is_unchanged():
    from epic_ext.models.tiny import llava_config
    from epic_ext.models.tiny_qwen import qwen_config
    q25 = qwen_config("qwen2_5_vl")
    with pytest.raises(ValueError, match="units: unit 0 keeps 5 of 4"):
        request_cost(q25, 10, [VisualUnit(4, 5, (2, 2))], 1)
    with pytest.raises(ValueError, match="units: unit 0 has a 2x3 grid"):
        request_cost(q25, 10, [VisualUnit(4, 2, (2, 3))], 1)
    with pytest.raises(ValueError, match="grid"):
        request_cost(q25, 10, [VisualUnit(4, 2)], 1)       # windows need the grid
    with pytest.raises(ValueError, match="kept_visual"):
        request_cost(q25, 10, [VisualUnit(4, 2, (2, 2))], 1, kept_visual=5)
    with pytest.raises(ValueError, match="layer"):
        request_cost(q25, 10, [], 4)
    with pytest.raises(ValueError, match="llava_cfg"):
        prefill_cost(q25, 20, 2, 1)
    with pytest.raises(ValueError, match="config: no vision cost model"):
        request_cost(_fake_config(q25), 10, [VisualUnit(4)], 1)
    # LLaVA: one image through request_cost == prefill_cost; two images cost two vision towers
    cfg = llava_config("tiny")
    n = cfg.image_seq_length
    one = prefill_cost(cfg, n + 30, 64, 2)
    same = request_cost(cfg, 30, [VisualUnit(n, 64)], 2)
    assert one.as_dict() == same.as_dict()
    two = request_cost(cfg, 30, [VisualUnit(n, 64), VisualUnit(n, 32)], 2)
    assert two.flops_vision == 2 * one.flops_vision
    assert two.visual_tokens_per_layer[:2] == [2 * n] * 2 and two.visual_tokens_per_layer[2:] == [96] * 2
    # A video of 3 frame groups costs 3 of its groups' vision towers, and text-only costs none.
    q2 = qwen_config("qwen2_vl")
    video = units_from_grids(q2, video_grid_thw=[[3, 4, 6]])
    assert [(u.tokens, u.grid, u.kind) for u in video] == [(6, (2, 3), "video")] * 3
    assert request_cost(q2, 5, video, 1).flops_vision == 3 * request_cost(q2, 5, video[:1], 1).flops_vision
    assert request_cost(q2, 5, [], 1).flops_vision == 0


def _fake_config(base):
    class Fake:
        model_type = "mystery"
        text_config = base.text_config
    return Fake()


def _strip(ids: list[int]) -> list[int]:
    stop = [i for i, t in enumerate(ids) if t in (PAD_ID, 2)]   # <|endoftext|>, <|im_end|>
    return ids[: stop[0]] if stop else ids


@pytest.fixture(scope="module")
def processors():
    pytest.importorskip("torchvision", reason="transformers' Qwen-VL processors need torchvision")
    from epic_ext.models.tiny_qwen import tiny_qwen_processor
    return {f: tiny_qwen_processor(f) for f in FAMILIES}


SETTINGS = {"qwen2_vl": ("fastv", 0.5, 1), "qwen2_5_vl": ("dart", 0.5, 2), "qwen3_vl": ("dart", 0.5, 1)}


def test_infer_equals_generate_and_counts_units(family, processors):
    from epic_ext.models.tiny_qwen import qwen_batch, random_qwen_rows
    model = build_tiny_qwen(family)
    rows = random_qwen_rows(5)           # text only, 1 image, 2 images, a video, an image + a video
    batch = dict(qwen_batch(processors[family], rows))
    method, keep, layer = SETTINGS[family]
    reports = infer(model, batch, method=method, keep=keep, layer=layer, max_new_tokens=4,
                    processor=processors[family])
    assert applied_method(model) is None
    apply(model, method, keep=keep, layer=layer)
    try:
        with torch.no_grad():
            gen = model.generate(**batch, max_new_tokens=4, do_sample=False)
    finally:
        revert(model)
    length = batch["input_ids"].shape[1]
    for b, (row, r) in enumerate(zip(rows, reports)):
        assert r.answer_ids == _strip(gen[b, length:].tolist()), b
        kinds = [u["kind"] for u in r.units]
        assert kinds.count("image") == len(row["images"])
        assert kinds.count("video") == (0 if row["video"] is None else row["video"][0] // 2)
        tokens = sum(u["tokens"] for u in r.units)
        kept = sum(u["kept"] for u in r.units)
        # every unit keeps its own budget: half its tokens (rounded as resolve_k does)
        assert all(0 < u["kept"] < u["tokens"] for u in r.units)
        assert r.visual_tokens_per_layer == [tokens] * layer + [kept] * (4 - layer)
        assert r.prompt_tokens == int(batch["attention_mask"][b].sum())
        assert r.method == method and r.batch_size == 5 and r.kv_bytes == sum(r.kv_bytes_per_layer)
    assert reports[0].units == [] and reports[0].visual_tokens_per_layer == [0] * 4
    text = format_reports(reports)
    assert "none (text only)" in text and "video 2 x" in text


@pytest.mark.parametrize("method,keep,layer", [("dart", 0.5, 2), ("none", None, 0), ("pooling", 0.25, 0)])
def test_report_kv_bytes_equal_the_cache(processors, method, keep, layer):
    from epic_ext.models.tiny_qwen import qwen_batch, random_qwen_rows
    model = build_tiny_qwen("qwen2_5_vl")
    batch = dict(qwen_batch(processors["qwen2_5_vl"], random_qwen_rows(5)))
    opts = {} if method == "none" else {"layer": layer}
    reports = infer(model, batch, method=method, keep=keep, max_new_tokens=1, **opts)
    apply(model, method, keep=keep, **opts)
    try:
        with torch.no_grad():
            cache = model(**batch, use_cache=True).past_key_values
            alone = [model(**row_inputs(batch, b), use_cache=True).past_key_values for b in (2, 4)]
    finally:
        revert(model)
    per_token = 2 * 2 * 16 * 4                       # keys + values, 2 kv heads x 16, fp32
    real = batch["attention_mask"].sum(1)
    kept = cache._epic.mask.sum(1)
    for b, r in enumerate(reports):
        new = len(r.answer_ids)
        expect = [(int(real[b]) if lay < layer else int(kept[b])) + new for lay in range(4)]
        assert r.kv_bytes_per_layer == [n * per_token for n in expect], b
        text = r.extra["text_tokens"]
        assert r.visual_tokens_per_layer[-1] == int(kept[b]) - text
    for b, c in zip((2, 4), alone):
        # a row alone holds exactly its real tokens: the cache's tensors are the report's bytes
        actual = [(lay.keys.numel() + lay.values.numel()) * lay.keys.element_size() for lay in c.layers]
        new = len(reports[b].answer_ids)
        assert [a + new * per_token for a in actual] == reports[b].kv_bytes_per_layer


def test_generate_timed_takes_media_and_builds_no_graph():
    from epic_ext.inference import generate_timed
    model = build_tiny_qwen("qwen2_vl")
    inputs, _ = handmade_inputs(model, [(2, 2)], (2, 2, 2))
    media = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "pixel_values")}
    apply(model, "dart", keep=2, layer=1)
    try:
        new, cache, _, _, steps = generate_timed(model, inputs["input_ids"], inputs["pixel_values"],
                                                 inputs["attention_mask"], media=media, max_new_tokens=3,
                                                 eos_token_id=-1)
    finally:
        revert(model)
    assert new.shape == (1, 3) and steps == 2
    # a timed loop under no_grad: no autograd graph held by the cache (memory, speed)
    assert not cache.layers[0].keys.requires_grad and not cache.layers[-1].keys.requires_grad
    assert cache.layers[-1].keys.shape[2] == inputs["input_ids"].shape[1] - 12 + 6 + 2


def test_infer_rejects_inputs_without_visual_inputs():
    model = build_tiny_qwen("qwen2_vl")
    inputs, _ = handmade_inputs(model, [(2, 2)])
    with pytest.raises(ValueError, match="pixel_values"):
        infer(model, {"input_ids": inputs["input_ids"]})
    bad = dict(inputs, image_grid_thw=torch.tensor([[1, 4, 6]]))
    with pytest.raises(ValueError, match="image_grid_thw"):
        infer(model, bad, max_new_tokens=1)


# --------------------------------------------------------------------------- the CLI

@pytest.fixture(scope="module")
def saved(tmp_path_factory, processors):
    from PIL import Image

    from epic_ext.models.tiny_qwen import random_image, save_tiny_qwen
    root = tmp_path_factory.mktemp("qwen_cli")
    save_tiny_qwen("qwen2_5_vl", root / "model")
    g = np.random.default_rng(3)
    Image.fromarray(random_image(112, 84, g)).save(root / "a.png")
    Image.fromarray(random_image(56, 56, g)).save(root / "b.png")
    (root / "frames").mkdir()
    for i in (1, 2, 10, 11):        # natural order: 1, 2, 10, 11
        Image.fromarray(random_image(56, 84, g)).save(root / "frames" / f"frame_{i}.png")
    (root / "empty").mkdir()
    return root


def _cli_json(capsys, argv):
    rc = cli_main(["infer", *map(str, argv), "--max-new-tokens", "3", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return json.loads(captured.out)


def test_cli_round_trip_two_images_and_a_video(saved, capsys):
    from epic_ext.cli_infer import group_requests, qwen_inputs
    from epic_ext.models.loading import load_model, load_processor
    model_dir = saved / "model"
    argv = ["--model", model_dir, "--image", saved / "a.png", "--image", saved / "b.png", "--prompt",
            "what color is the dog ?", "--method", "dart", "--keep", "0.5", "--layer", "2"]
    two = _cli_json(capsys, argv)
    assert len(two) == 1
    assert [(u["kind"], u["grid"]) for u in two[0]["units"]] == [("image", [4, 3]), ("image", [2, 2])]
    assert two[0]["visual_tokens_per_layer"] == [16, 16, 8, 8]

    video = _cli_json(capsys, ["--model", model_dir, "--video", saved / "frames", "--prompt", "how many cats ?",
                               "--prompt", "what is left ?", "--method", "fastv", "--keep", "2", "--layer", "1"])
    assert len(video) == 2
    for r in video:
        assert [(u["kind"], u["grid"], u["kept"]) for u in r["units"]] == [("video", [2, 3], 2)] * 2
        assert r["visual_tokens_per_layer"] == [12, 4, 4, 4]
    # The same answers as infer() on the folder's model and processor with the same requests.
    model, processor = load_model(model_dir), load_processor(model_dir)
    for argv_reqs, method, opts, got in (
            ((["a.png", "b.png"], [], ["what color is the dog ?"]), "dart", dict(keep=0.5, layer=2), two),
            (([], ["frames"], ["how many cats ?", "what is left ?"]), "fastv", dict(keep=2, layer=1), video)):
        images, videos, prompts = argv_reqs
        requests = group_requests([str(saved / f) for f in images], [str(saved / v) for v in videos], prompts)
        inputs = qwen_inputs(processor, requests, fps=2.0)
        reports = infer(model, inputs, method=method, max_new_tokens=3, **opts)
        assert [r.answer_ids for r in reports] == [r["answer_ids"] for r in got]
        assert [r.kv_bytes for r in reports] == [r["kv_bytes"] for r in got]


@pytest.mark.parametrize("args, pattern", [
    (["--video", "{d}/empty"], r"--video: .*empty: no frame images in the folder"),
    (["--video", "{d}/nowhere"], r"--video: no such folder or frame file: .*nowhere"),
    (["--video", "{d}/a.png,{d}/b.png"], r"--video: .*frames differ in size"),
    (["--video", "{d}/a.png"], r"--video: .*1 frame; a video needs at least 2"),
    (["--image", "{d}/a.png", "--image", "{d}/b.png", "--prompt", "x", "--prompt", "y", "--prompt", "z"],
     r"--image / --prompt: got 2 image groups and 3 prompts"),
    (["--video", "{d}/frames", "--video", "{d}/frames", "--prompt", "x", "--prompt", "y", "--prompt", "z"],
     r"--video / --prompt: got 2 videos and 3 prompts"),
    (["--prompt", "x"], r"a checkpoint needs an image file or a video"),
    (["--image", "{d}/a.png", "--method", "prumerge"], r"--method prumerge: .*Qwen-VL encoder"),
])
def test_cli_mistakes_are_one_line(saved, capsys, args, pattern):
    import re
    rc = cli_main(["infer", "--model", str(saved / "model"), *[a.format(d=saved) for a in args]])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("epic-ext infer: error: ")
    assert re.search(pattern, err[-1]), err[-1]


def test_cli_llava_takes_no_video(saved, capsys):
    rc = cli_main(["infer", "--model", "tiny", "--video", str(saved / "frames")])
    assert rc == 2 and "only Qwen-VL checkpoints" in capsys.readouterr().err
