"""VisionZip on the tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL models against a slow reference of its
published semantics (tests/models/_qwen_vz_ref.py: the ranking block's attention recomputed from
its input, per image / video frame group, window order undone independently, the selection and
contextual merges in Python loops): kept positions and the reduced sequence's visual hidden
states on a mixed left-padded batch, the received-attention scores themselves (several
Qwen2.5-VL windows, several query chunks), original M-RoPE positions and Qwen3-VL DeepStack rows
against a hand-run of the stock decoder layers, cached generate == recompute, options and their
errors, and batch rows == rows alone."""
from __future__ import annotations

import contextlib
import functools
import os
import sys

import pytest
import torch

from epic_ext.models import apply, qwen_vision, revert
from epic_ext.models import tiny_qwen as tq

sys.path.insert(0, os.path.dirname(__file__))  # the slow references sit next to this file

import _qwen_refs as refs  # noqa: E402
import _qwen_vz_ref as vz  # noqa: E402
from test_qwen_integration import (ATOL, N_NEW, RTOL, assert_rows_match_rows_alone, batch_of,  # noqa: E402
                                   greedy_recompute, model_of, row_alone)

FAMILIES = tq.FAMILIES
N_ROWS = 6


pytestmark = pytest.mark.usefixtures("one_thread")


@contextlib.contextmanager
def applied(model, **opts):
    apply(model, "visionzip", **opts)
    try:
        yield model
    finally:
        revert(model)


@functools.lru_cache(maxsize=None)
def _ranking(family):
    return vz.batch_ranking(model_of(family), batch_of(family))


def reference(family, b=None, **opts):
    if b is None:
        return vz.visionzip_reference(model_of(family), batch_of(family), ranking=_ranking(family), **opts)
    return vz.visionzip_reference(model_of(family), b, **opts)


# --------------------------------------------------------------------------- 1. vs the slow reference

# defaults (ratios 0.45 / 0.05), a ratio and a count split 54:10, given counts, contextual cut to
# what remains (5 > 4 - 3), none, and every token of the smallest units dominant
OPTIONS = [dict(), dict(keep=0.5), dict(keep=3), dict(dominant=2, contextual=1), dict(dominant=3, contextual=5),
           dict(dominant=2, contextual=0), dict(dominant=4, contextual=1)]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda v: str(v))
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_slow_reference_on_mixed_batch(family, opts):
    # text-only row, one and two images of different sizes, a video, an image + a video, left padded
    model, b = model_of(family), batch_of(family)
    expected = reference(family, **opts)
    with applied(model, **opts), torch.no_grad(), refs.LayerInput(model) as seen:
        out = model(**b)
    refs.assert_matches_reference(model, out, seen.hidden, b, expected)
    if opts == dict(keep=0.5):
        # the contextual merge has something to merge here (a 12-token unit: 5 dominant, 1 target
        # taking the other 6), and the total per unit is the budget
        for units, row in zip(refs.unit_layout(b), expected):
            for (_, _, n), (kept, _) in zip(units, row):
                assert len(kept) == refs.budget_of(0.5, n)


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_slow_reference_with_eager_vision_attention(family):
    # the capture wraps whichever attention function the tower uses
    model, b = model_of(family, "eager"), batch_of(family)
    expected = vz.visionzip_reference(model, b, keep=0.5)
    with applied(model, keep=0.5), torch.no_grad(), refs.LayerInput(model) as seen:
        out = model(**b)
    refs.assert_matches_reference(model, out, seen.hidden, b, expected)


def test_ranking_blocks_are_the_published_ones():
    # Qwen2-VL: blocks[-2] (EffiVLM-Bench); Qwen2.5-VL: the last full-attention block (VisionZip's
    # code: the last block); Qwen3-VL: the last (FlashVID)
    depth = {f: model_of(f).config.vision_config.depth for f in FAMILIES}
    assert {f: qwen_vision.ranking_block(model_of(f)) for f in FAMILIES} == \
        {"qwen2_vl": depth["qwen2_vl"] - 2, "qwen2_5_vl": 3, "qwen3_vl": depth["qwen3_vl"] - 1}
    assert all(qwen_vision.ranking_block(model_of(f)) == vz.ranking_block_of(model_of(f)) for f in FAMILIES)


# --------------------------------------------------------------------------- 2. received attention

# A 7 x 6 image (168 patches: 4 x 3 Qwen2.5-VL windows of 2 x 2 tokens, the last row and column
# partial), a small one and a video of 2 frame groups; query chunks of 16 rows.
BIG_ROWS = [dict(images=[(7, 6)], video=None, text="what is this ?"),
            dict(images=[(2, 3)], video=(2, 3, 2), text="and this ?")]


@functools.lru_cache(maxsize=None)
def big_batch(family):
    return refs.synthetic_batch(family, BIG_ROWS, seed=3)


@pytest.mark.parametrize("family", FAMILIES)
def test_received_attention_matches_reference(family, monkeypatch):
    monkeypatch.setattr(qwen_vision, "_QUERY_CHUNK", 16)
    model, b = model_of(family), big_batch(family)
    expected = vz.batch_ranking(model, b)
    with torch.no_grad():
        for kind in ("image", "video"):
            px = b["pixel_values" if kind == "image" else "pixel_values_videos"]
            out, received, keys = qwen_vision.features_with_ranking(model, px, b[f"{kind}_grid_thw"], kind)
            assert len(received) == len(expected[kind])
            for j, ref in enumerate(expected[kind]):
                torch.testing.assert_close(out.pooler_output[j], ref["features"], atol=1e-6, rtol=1e-6)
                torch.testing.assert_close(received[j].double(), ref["received"], rtol=1e-5, atol=1e-7,
                                           msg=f"{kind} {j}")
                torch.testing.assert_close(keys[j].double(), ref["keys"], rtol=1e-5, atol=1e-6, msg=f"{kind} {j}")
        big = expected["image"][0]
        assert big["received"].numel() == 42 and 168 > 16 * 4        # several query chunks
        if family == "qwen2_5_vl":
            # the window order is really undone: the block order would rank other tokens
            assert not torch.allclose(big["block_received"], big["received"])
        # and the whole reduced forward (a unit of 42 tokens, chunked) selects as the reference
        expect = vz.visionzip_reference(model, b, keep=0.25, ranking=expected)
        with applied(model, keep=0.25), refs.LayerInput(model) as seen:
            res = model(**b)
        refs.assert_matches_reference(model, res, seen.hidden, b, expect)


# --------------------------------------------------------------------------- 3. positions, DeepStack

@contextlib.contextmanager
def rotary_calls(model):
    """The position ids of each call of the language model's rotary embedding."""
    calls = []
    handle = model.model.language_model.rotary_emb.register_forward_hook(
        lambda mod, args, out: calls.append(args[1].clone()))
    try:
        yield calls
    finally:
        handle.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_kept_and_decode_tokens_keep_their_mrope_positions(family):
    model, b = model_of(family), batch_of(family)
    stock = refs.stock_rope(model, b)                                   # [3, B, L]
    nxt = torch.full((N_ROWS, 1), tq.VOCAB.index("dog"), dtype=torch.long)
    mask2 = torch.cat([b["attention_mask"], torch.ones_like(nxt)], 1)
    with torch.no_grad():
        model(**b)
        rope_deltas = model.model.rope_deltas                           # the stock, unreduced prompt's
        with applied(model, keep=0.5):
            with rotary_calls(model) as calls:
                out = model(**b, use_cache=True)
            after = calls[-1][-3:]
            kept, valid = out.kept_index, out.kept_mask
            assert after.shape[-1] == kept.shape[1] < stock.shape[-1]
            for axis in range(3):
                assert torch.equal(after[axis][valid], stock[axis].gather(1, kept.clamp(min=0))[valid]), axis
            # decoding continues at the unreduced prompt's positions: text position + its rope delta
            expect = ((mask2.cumsum(-1)[:, -1:] - 1) + rope_deltas)[None].expand(3, -1, -1)
            with rotary_calls(model) as calls:
                model(input_ids=nxt, attention_mask=mask2, past_key_values=out.past_key_values, use_cache=True)
            assert torch.equal(calls[-1][-3:], expect)
            with rotary_calls(model) as calls:
                model.generate(**b, max_new_tokens=2, do_sample=False)
            assert torch.equal([c for c in calls if c.shape[-1] == 1][0][-3:], expect)


@pytest.mark.parametrize("family", FAMILIES)
def test_reduced_forward_equals_stock_layers_on_kept_tokens(family):
    # The stock decoder layers run by hand on the kept tokens (the reference's hidden states,
    # contextual tokens in their targets' slots), each at its stock 3-D position; Qwen3-VL:
    # DeepStack rows follow the kept tokens, a merged token getting its target's row.
    model, b = model_of(family), batch_of(family)
    with applied(model, keep=0.5), torch.no_grad():
        for i in (2, 4):                           # two images; an image and a video
            row = row_alone(b, i)
            out = model(**row)
            replace = {}
            for (_, start, _), (kept, hidden) in zip(refs.unit_layout(row)[0], reference(family, row, keep=0.5)[0]):
                replace.update({start + j: h for j, h in zip(kept, hidden)})
            kept = out.kept_index[0].tolist()
            assert set(replace) <= set(kept)
            ref = refs.manual_reduced_logits(model, row, 0, kept, replace=replace)
            torch.testing.assert_close(out.logits[0], ref, atol=ATOL, rtol=RTOL, msg=f"row {i}")
            if family == "qwen3_vl":
                # teeth: DeepStack tables not gathered with the tokens give other logits
                wrong = refs.manual_reduced_logits(model, row, 0, kept, replace=replace, deepstack="compact")
                assert (out.logits[0] - wrong).abs().max() > 1e-2, i


# --------------------------------------------------------------------------- 4. generate, options

@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_cache_equals_recompute(family):
    model, b = model_of(family), batch_of(family)
    with applied(model, keep=0.5), torch.no_grad():
        gen = model.generate(**b, max_new_tokens=N_NEW, do_sample=False)
        ref = greedy_recompute(model, b, N_NEW, prompt_last=b["input_ids"].shape[1] - 1)
    assert torch.equal(gen, ref[:, : gen.shape[1]])


@pytest.mark.parametrize("family", FAMILIES)
def test_options_and_their_errors(family):
    model, b = model_of(family), batch_of(family)
    smallest = min(n for units in refs.unit_layout(b) for _, _, n in units)
    largest = max(n for units in refs.unit_layout(b) for _, _, n in units)
    with torch.no_grad():
        with applied(model, keep=smallest):
            out = model(**b)                                  # the smallest unit's size fits
        for i, units in enumerate(refs.unit_layout(b)):
            assert [len(k) for k in refs.kept_per_unit(out, b, i)] == [smallest] * len(units)
        for opts, name in ((dict(dominant=smallest + 1), "dominant"), (dict(dominant=largest + 1), "dominant"),
                           (dict(keep=smallest + 1), "keep")):
            with applied(model, **opts), pytest.raises(ValueError, match=f"^{name}"):
                model(**b)
    for opts, name in ((dict(keep=4, dominant=2), "dominant"), (dict(contextual=-1), "contextual"),
                       (dict(dominant=2.5), "dominant"), (dict(keep=1.5), "keep"), (dict(layer=1), "layer")):
        with pytest.raises(ValueError, match=f"^{name}"):
            apply(model, "visionzip", **opts)
        assert "_epic" not in model.__dict__


# --------------------------------------------------------------------------- 5. rows alone

@pytest.mark.parametrize("opts", [dict(), dict(keep=0.5)], ids=lambda v: str(v))
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_rows_match_rows_alone(family, opts):
    model, b = model_of(family), batch_of(family)
    with applied(model, **opts), torch.no_grad():
        assert_rows_match_rows_alone(model, b)
