"""The offline Qwen2-VL / Qwen2.5-VL / Qwen3-VL test bed (epic_ext/models/tiny_qwen.py): the
STOCK transformers models on left-padded batches mixing text-only, one-image, two-image, video
and image+video rows give each row's own logits and greedy tokens (the baseline the reduced
forward must reproduce), the save/load round trip, visual token counts, and the geometry
(windows, DeepStack, non-degenerate attention)."""
from __future__ import annotations

import functools
import math

import pytest
import torch

from epic_ext.models import tiny_qwen as tq

FAMILIES = tq.FAMILIES
# Batched vs single-row fp32 matmuls of different shapes round differently; the logits' std over
# the vocabulary is ~2, so 4e-5 absolute is ~2e-5 relative.
ATOL, RTOL = 4e-5, 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.lru_cache(maxsize=None)
def model_of(family, attn="sdpa"):
    return tq.build_tiny_qwen(family, attn=attn)


@functools.lru_cache(maxsize=None)
def processor_of(family):
    # transformers 5.23 cannot construct a Qwen-VL processor without torchvision (its video
    # processors import it); the model and the tokenizer do not need it.
    pytest.importorskip("torchvision", reason="transformers' Qwen-VL processors need torchvision")
    return tq.tiny_qwen_processor(family)


@functools.lru_cache(maxsize=None)
def batch_of(family):
    return tq.qwen_batch(processor_of(family), tq.random_qwen_rows(5), padding_side="left", seed=1)


def spans(ids_row, token):
    """Lengths of the runs of ``token`` in a 1-D id tensor."""
    out, run = [], 0
    for t in ids_row.tolist() + [None]:
        if t == token:
            run += 1
        elif run:
            out.append(run)
            run = 0
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_config_matches_tokenizer(family):
    cfg, tok = model_of(family).config, tq.tiny_tokenizer()
    for attr, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")):
        assert getattr(cfg, attr) == tok.convert_tokens_to_ids(token)
    assert tok.pad_token_id == cfg.text_config.pad_token_id and tok.eos_token_id == cfg.text_config.eos_token_id
    assert len(tok) == cfg.text_config.vocab_size                  # every id the model emits decodes
    text = cfg.text_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads,
            text.num_key_value_heads) == (4, 64, 4, 2)
    assert sum(text.rope_parameters["mrope_section"]) == 16 // 2
    ids = tok("what color is the dog ?")["input_ids"]
    assert tok.unk_token_id not in ids and tok.decode(ids) == "what color is the dog?"


def test_processor_padding_side_and_text_only():
    pytest.importorskip("torchvision", reason="transformers' Qwen-VL processors need torchvision")
    proc = tq.tiny_qwen_processor("qwen2_vl", padding_side="right")
    assert proc.tokenizer.padding_side == "right"
    rows = [dict(images=[], video=None, text="what is here ?"), dict(images=[], video=None, text="a dog")]
    right = tq.qwen_batch(proc, rows, padding_side="right")
    left = tq.qwen_batch(proc, rows, padding_side="left")
    assert right["attention_mask"][1, -1] == 0 and left["attention_mask"][1, 0] == 0
    assert "pixel_values" not in left and left["mm_token_type_ids"].sum() == 0
    with pytest.raises(ValueError, match="padding_side"):
        tq.qwen_batch(proc, rows, padding_side="middle")
    with pytest.raises(ValueError, match="rows"):
        tq.qwen_batch(proc, [dict(image=[(56, 56)], text="a")])
    with pytest.raises(ValueError, match="family"):
        tq.qwen_config("qwen4_vl")
    with pytest.raises(ValueError, match="overrides"):
        tq.qwen_config("qwen2_vl", hidden_sise=32)
    cfg = tq.qwen_config("qwen3_vl", num_hidden_layers=2, depth=3, vision_hidden_size=48, text_attention_bias=True)
    assert (cfg.text_config.num_hidden_layers, cfg.vision_config.depth, cfg.vision_config.hidden_size,
            cfg.text_config.hidden_size, cfg.text_config.attention_bias) == (2, 3, 48, 64, True)


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_inputs(family):
    b, proc, cfg = batch_of(family), processor_of(family), model_of(family).config
    assert proc.image_token_id == cfg.image_token_id and proc.video_token_id == cfg.video_token_id
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw",
                "pixel_values_videos", "video_grid_thw"):
        assert key in b, key
    if family == "qwen2_5_vl":
        assert "second_per_grid_ts" in b
    assert b["attention_mask"][:, -1].all() and not b["attention_mask"][:, 0].all()     # left padded
    # seeded, varied pixels: not constant, reproducible, different with another seed
    px = b["pixel_values"]
    assert px.std() > 0.3 and not torch.equal(px[0], px[1])
    again = tq.qwen_batch(processor_of(family), tq.random_qwen_rows(5), seed=1)
    other = tq.qwen_batch(processor_of(family), tq.random_qwen_rows(5), seed=2)
    assert torch.equal(again["pixel_values"], px) and not torch.equal(other["pixel_values"], px)


@pytest.mark.parametrize("family", FAMILIES)
def test_visual_token_counts(family):
    b = batch_of(family)
    ids = b["input_ids"]
    image_grids, video_grids = b["image_grid_thw"].tolist(), b["video_grid_thw"].tolist()
    image_spans = [n for row in ids for n in spans(row, tq.IMAGE_ID)]
    assert image_spans == [t * h * w // 4 for t, h, w in image_grids]
    assert len(image_grids) == 4 and len({tuple(g) for g in image_grids}) == 4      # sizes differ
    video_spans = [n for row in ids for n in spans(row, tq.VIDEO_ID)]
    if family == "qwen3_vl":
        # Qwen3-VL: one span per temporal group, each after its "<t seconds>" timestamp
        assert video_spans == [h * w // 4 for t, h, w in video_grids for _ in range(t)]
    else:
        assert video_spans == [t * h * w // 4 for t, h, w in video_grids]
    assert all(t == 2 for t, _, _ in video_grids)          # 4 frames / temporal_patch_size 2
    assert (b["pixel_values"].shape[0] == sum(t * h * w for t, h, w in image_grids))
    patch = tq.patch_size(family)
    assert b["pixel_values"].shape[1] == 3 * 2 * patch * patch
    assert torch.equal(b["mm_token_type_ids"].bool(), (ids == tq.IMAGE_ID) | (ids == tq.VIDEO_ID))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_stock_batch_rows_match_rows_alone(family, attn):
    model, b = model_of(family, attn), batch_of(family)
    with torch.no_grad():
        full = model(**b).logits
        for i in range(b["input_ids"].shape[0]):
            alone = model(**tq.row_inputs(b, i)).logits[0]
            keep = b["attention_mask"][i].bool()
            torch.testing.assert_close(full[i, keep], alone, atol=ATOL, rtol=RTOL, msg=f"row {i}")


@pytest.mark.parametrize("family", FAMILIES)
def test_stock_generate_batch_matches_rows(family):
    model, b = model_of(family), batch_of(family)
    n_new, length = 4, b["input_ids"].shape[1]
    with torch.no_grad():
        batched = model.generate(**b, max_new_tokens=n_new, do_sample=False)[:, length:]
        for i in range(batched.shape[0]):
            row = tq.row_inputs(b, i)
            alone = model.generate(**row, max_new_tokens=n_new, do_sample=False)[0, row["input_ids"].shape[1]:]
            # a row that emitted EOS is padded in the batch and stops alone
            assert torch.equal(batched[i, :len(alone)], alone), (i, batched[i], alone)
            assert (batched[i, len(alone):] == tq.PAD_ID).all()
    assert len({tuple(r) for r in batched.tolist()}) > 1          # rows do not all say the same thing
    assert not torch.isin(batched, torch.tensor(tq.SUPPRESSED_IDS)).any()


def manual_greedy(model, batch, n_new, *, positions=True):
    """Prefill, then one token at a time with the cache (what a timed decode loop does).
    positions: pass the decode tokens' 3-D M-RoPE positions (text position + the model's
    rope_deltas, the same on the three axes); False leaves them to the stock forward."""
    out = model(**batch, use_cache=True)
    mask, tokens = batch["attention_mask"], []
    for _ in range(n_new):
        # the generation config's suppressed ids, as generate() applies them
        logits = out.logits[:, -1].index_fill(-1, torch.tensor(tq.SUPPRESSED_IDS), -math.inf)
        tokens.append(logits.argmax(-1, keepdim=True))
        mask = torch.cat([mask, torch.ones_like(tokens[-1])], 1)
        kwargs = {}
        if positions:
            text_position = mask.cumsum(-1)[:, -1:] - 1
            kwargs["position_ids"] = (text_position + model.model.rope_deltas)[None].expand(3, -1, -1)
        out = model(input_ids=tokens[-1], attention_mask=mask, past_key_values=out.past_key_values, use_cache=True,
                    **kwargs)
    return torch.cat(tokens, 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_stock_manual_decode_matches_generate(family):
    # The baseline of a hand-written decode loop: explicit M-RoPE positions for the new tokens.
    model, b = model_of(family), batch_of(family)
    with torch.no_grad():
        ref = model.generate(**b, max_new_tokens=3, do_sample=False, eos_token_id=None)[:, b["input_ids"].shape[1]:]
        assert torch.equal(manual_greedy(model, b, 3), ref)


@pytest.mark.xfail(raises=RuntimeError, strict=True,
                   reason="transformers 5.23: a cached forward given attention_mask but no position_ids "
                          "builds M-RoPE positions for the whole mask (past + new), not the new tokens "
                          "(compute_3d_position_ids), and fails on the shape; pass position_ids")
def test_stock_manual_decode_without_positions():
    model, b = model_of("qwen2_5_vl"), batch_of("qwen2_5_vl")
    with torch.no_grad():
        manual_greedy(model, b, 2, positions=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(family, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    reference = processor_of(family)
    tq.save_tiny_qwen(family, tmp_path)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path, local_files_only=True).eval()
    proc = AutoProcessor.from_pretrained(tmp_path, local_files_only=True)
    assert type(model) is type(model_of(family)) and type(proc) is type(reference)
    b = tq.qwen_batch(proc, tq.random_qwen_rows(5), seed=1)
    for key, value in batch_of(family).items():
        assert torch.equal(b[key], value), key
    with torch.no_grad():
        assert torch.equal(model(**b).logits, model_of(family)(**b).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_geometry_is_exercised(family):
    model, b = model_of(family, "eager"), batch_of(family)
    vision = model.config.vision_config
    assert (vision.temporal_patch_size, vision.spatial_merge_size) == (2, 2)
    if family == "qwen2_5_vl":
        from transformers.vision_utils import get_vision_window_index
        assert set(vision.fullatt_block_indexes) < set(range(vision.depth))            # some blocks windowed
        window = vision.window_size // vision.patch_size // 2                        # in merged tokens
        large = [g for g in b["image_grid_thw"] if max(g[1:]) // 2 > window]
        assert len(large) >= 3                                                        # all but the 56 px one
        for grid in large:
            _, cu = get_vision_window_index(grid[None], spatial_merge_size=2, window_size=vision.window_size,
                                            patch_size=vision.patch_size)
            assert len(torch.unique_consecutive(torch.as_tensor(cu))) - 1 > 1, grid
    if family == "qwen3_vl":
        assert list(vision.deepstack_visual_indexes) == [1, 2]
        with torch.no_grad():
            feats = model.model.get_image_features(b["pixel_values"], b["image_grid_thw"])
        assert len(feats.deepstack_features) == 2
        assert all(torch.cat(f).abs().mean() > 0.1 for f in feats.deepstack_features)
    with torch.no_grad():
        out = model(**b, output_attentions=True)
    mask = b["attention_mask"].bool()
    for layer, attn in enumerate(out.attentions):
        for i in range(mask.shape[0]):
            p = attn[i, :, -1][:, mask[i]]                    # the last query over the row's keys
            entropy = -(p * p.clamp_min(1e-12).log()).sum(-1) / math.log(p.shape[-1])
            assert entropy.mean() < 0.8, (layer, i, entropy)  # uniform would be 1
    logits = out.logits[mask]
    assert logits.std(-1).mean() > 1.0 and logits.argmax(-1).unique().numel() > logits.shape[0] // 4
