"""epic_ext.apply on the tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL models (issue 12): identity at
full budget, left-padded mixed batches (text-only, one and two images of different sizes, video
frame groups) against each row alone, cached generate against recomputation, every in-LLM method
against a slow reference of its published semantics (tests/models/_qwen_refs.py), M-RoPE
positions of kept tokens and of decode tokens, DeepStack injections that follow the kept
tokens, and bad input.

Inputs are built without the Qwen-VL processor, in its exact layout (see _qwen_refs.py; checked
against the processor where torchvision is installed), so the tests run without torchvision."""
from __future__ import annotations

import contextlib
import functools
import math
import os
import sys

import pytest
import torch

from epic_ext.methods import available_methods, get_method
from epic_ext.models import apply, revert
from epic_ext.models import tiny_qwen as tq

sys.path.insert(0, os.path.dirname(__file__))  # the slow references sit next to this file

import _qwen_refs as refs  # noqa: E402

FAMILIES = tq.FAMILIES
N_ROWS = 6
N_NEW = 3
# Batched vs one-row fp32 matmuls of different shapes round differently: the stock model's own
# batch rows differ from the rows alone by up to ~2e-5 on logits of std ~2 (test_tiny_qwen.py).
ATOL, RTOL = 4e-5, 1e-5
SUPPRESSED = torch.tensor(tq.SUPPRESSED_IDS)
EOS = (tq.IM_END_ID, tq.PAD_ID)


pytestmark = pytest.mark.usefixtures("one_thread")
model_of = refs.model_of


@functools.lru_cache(maxsize=None)
def _batch(family):
    return refs.synthetic_batch(family, refs.rows_with_text(N_ROWS), seed=1)


def batch_of(family):
    return dict(_batch(family))


@contextlib.contextmanager
def applied(model, method, **opts):
    apply(model, method, **opts)
    try:
        yield model
    finally:
        revert(model)


def row_alone(batch, i):
    return tq.row_inputs(batch, i)


def assert_rows_match_rows_alone(model, b):
    """Each row of the applied model's batch output (logits at the row's real positions, kept
    indices) equals the row run alone, unpadded."""
    mask = b["attention_mask"].bool()
    out = model(**b)
    assert out.logits.shape[1] < b["input_ids"].shape[1], "a reduction of every unit shortens the batch"
    for i in range(b["input_ids"].shape[0]):
        alone = model(**row_alone(b, i))
        rows = out.kept_mask[i]
        assert alone.kept_mask[0].all()
        torch.testing.assert_close(out.logits[i, rows], alone.logits[0], atol=ATOL, rtol=RTOL, msg=f"row {i}")
        kept = out.kept_index[i, rows]
        pad = int((~mask[i]).sum())
        assert torch.equal(torch.where(kept >= 0, kept - pad, -1), alone.kept_index[0]), i
        # the padding the rebuild adds goes on the left
        assert not out.kept_mask[i, : int((~rows).sum())].any()


@functools.lru_cache(maxsize=None)
def processor_batch(family):
    pytest.importorskip("torchvision", reason="transformers' Qwen-VL processors need torchvision")
    return tq.qwen_batch(tq.tiny_qwen_processor(family), tq.random_qwen_rows(5), seed=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_synthetic_inputs_are_the_processors(family):
    # The builder writes what the real processor writes (ids, masks, types, grids, video timing);
    # only the pixel values differ (random patches of the same shape).
    real = processor_batch(family)
    synthetic = refs.synthetic_batch(family, refs.rows_of_processor_batch(real, tq.random_qwen_rows(5)))
    assert sorted(real.keys()) == sorted(synthetic)
    for key in real:
        if key.startswith("pixel_values"):
            assert real[key].shape == synthetic[key].shape, key
        else:
            assert torch.equal(real[key], synthetic[key]), key


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_batch_rows_match_rows_alone(family):
    # Real processor pixels (normalised images rather than random patches) through DART.
    model, b = model_of(family), dict(processor_batch(family))
    with applied(model, "dart", keep=0.5, layer=2), torch.no_grad():
        assert_rows_match_rows_alone(model, b)


# --------------------------------------------------------------------------- 1. identity

IDENTITY = [("none", dict(layer=0)), ("none", dict(layer=2)), ("fastv", dict(keep=1.0, layer=2)),
            ("dart", dict(keep=1.0, layer=1)), ("pooling", dict(keep=1.0, layer=0))]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_full_budget_is_identity(family, attn):
    model, b = model_of(family, attn), batch_of(family)
    length = b["input_ids"].shape[1]
    with torch.no_grad():
        ref = model(**b).logits
        ref_gen = model.generate(**b, max_new_tokens=N_NEW, do_sample=False)
        for method, opts in IDENTITY:
            with applied(model, method, **opts):
                out = model(**b)
                torch.testing.assert_close(out.logits, ref, atol=0, rtol=0, msg=f"{method} {opts}")
                assert torch.equal(out.kept_index, torch.arange(length).expand(b["input_ids"].shape[0], -1))
                if method in ("none", "fastv"):     # generate: one per layer kind keeps the file fast
                    gen = model.generate(**b, max_new_tokens=N_NEW, do_sample=False)
                    assert torch.equal(gen, ref_gen), (method, opts)


@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_prompts_pass_through(family):
    # What the processor returns for text-only rows: mm_token_type_ids (all 0), no pixels.
    model = model_of(family)
    b = refs.synthetic_batch(family, [dict(images=[], video=None, text="what is the dog doing ?"),
                                      dict(images=[], video=None, text="a red car")])
    assert "mm_token_type_ids" in b and "pixel_values" not in b
    with torch.no_grad():
        ref = model(**b).logits
        ref_gen = model.generate(**b, max_new_tokens=N_NEW, do_sample=False)
        with applied(model, "dart", keep=0.5, layer=2):
            # not bitwise: without grids the stock forward numbers a left-padded row's positions
            # from the padding on (RoPE is relative: rounding only); generate() numbers them alike
            torch.testing.assert_close(model(**b).logits, ref, atol=ATOL, rtol=RTOL)
            assert torch.equal(model.generate(**b, max_new_tokens=N_NEW, do_sample=False), ref_gen)


# --------------------------------------------------------------------------- 2. batch rows == rows alone

DETERMINISTIC = [("dart", dict(keep=0.5, layer=2)), ("fastv", dict(keep=0.5, layer=2)),
                 ("fastv", dict(keep=3, layer=1)), ("pooling", dict(keep=0.25, layer=0)),
                 ("pooling", dict(keep=2, layer=2))]


@pytest.mark.parametrize("method,opts", DETERMINISTIC, ids=lambda v: str(v))
@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_rows_match_rows_alone(family, method, opts):
    # rows with 0, 1 and 2 images of different sizes, a video, an image and a video, and units of
    # one grid in two rows (one method call)
    model, b = model_of(family), batch_of(family)
    with applied(model, method, **opts), torch.no_grad():
        assert_rows_match_rows_alone(model, b)


# --------------------------------------------------------------------------- 3. cache == recompute

def greedy_recompute(model, b, n_new, prompt_last):
    """Greedy decoding without a cache: the whole reduced prompt + generated tokens recomputed
    at every step, with the prompt's query row pinned (the cached run selects once, on the
    prompt); suppressed ids and EOS handled as generate() does."""
    ids, mask, types = b["input_ids"], b["attention_mask"], b["mm_token_type_ids"]
    media = {k: v for k, v in b.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(n_new):
        out = model(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, use_cache=False,
                    query_index=prompt_last, **media)
        nxt = out.logits[:, -1].index_fill(-1, SUPPRESSED, -math.inf).argmax(-1)
        nxt = torch.where(done, tq.PAD_ID, nxt)
        done |= torch.isin(nxt, torch.tensor(EOS))
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(nxt[:, None])], 1)
        types = torch.cat([types, torch.zeros_like(nxt[:, None])], 1)
        if done.all():
            break
    return ids


CACHED = [("dart", dict(keep=0.5, layer=2)), ("fastv", dict(keep=0.25, layer=1)),
          ("pooling", dict(keep=0.25, layer=0)), ("random", dict(keep=0.5, layer=2, seed=4))]


@pytest.mark.parametrize("method,opts", CACHED, ids=lambda v: str(v))
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_cache_equals_recompute(family, method, opts):
    model, b = model_of(family), batch_of(family)
    with applied(model, method, **opts), torch.no_grad():
        gen = model.generate(**b, max_new_tokens=N_NEW, do_sample=False)
        ref = greedy_recompute(model, b, N_NEW, prompt_last=b["input_ids"].shape[1] - 1)
    assert torch.equal(gen, ref[:, : gen.shape[1]])


# --------------------------------------------------------------------------- 4. methods vs references

@pytest.mark.parametrize("layer,keep,attn_impl", [(2, 0.5, "sdpa"), (1, 3, "eager")])
@pytest.mark.parametrize("family", FAMILIES)
def test_fastv_matches_eager_attention_reference(family, layer, keep, attn_impl):
    b = batch_of(family)
    attn = refs.eager_attention_rows(model_of(family, "eager"), b, layer - 1)
    expected = refs.fastv_reference(attn, b, keep)
    model = model_of(family, attn_impl)                   # SDPA too: the capture must not need eager
    with applied(model, "fastv", keep=keep, layer=layer), torch.no_grad():
        out = model(**b)
    for i in range(N_ROWS):
        assert refs.kept_per_unit(out, b, i) == expected[i], i
    # the query row matters: EffiVLM's default (the mean over every query row) selects otherwise
    assert expected != refs.fastv_reference(attn.mean(2, keepdim=True).expand_as(attn), b, keep)


DART_CASES = [dict(keep=0.75, layer=2), dict(keep=0.5, layer=2, pivot_image=1, pivot_text=3),
              dict(keep=0.5, layer=1, pivot_image=2, pivot_text=2), dict(keep=7, layer=1)]


@pytest.mark.parametrize("opts", DART_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("family", FAMILIES)
def test_dart_matches_per_unit_reference(family, opts):
    model, b = model_of(family), batch_of(family)
    opts = dict(opts)
    keep, layer = opts.pop("keep"), opts.pop("layer")
    if keep == 7:     # an int budget must fit every unit: the batch's smallest holds 4 tokens
        b = refs.synthetic_batch(family, [r for r in refs.rows_with_text(N_ROWS) if
                                          all(h * w >= 7 for h, w in r["images"]) and not r["video"]], seed=2)
    hidden, keys = refs.stock_layer_inputs(model, b, layer)
    norm = model.model.language_model.norm
    expected = refs.dart_reference(hidden, keys, norm, b, keep, **opts)
    with applied(model, "dart", keep=keep, layer=layer, **opts), torch.no_grad():
        out = model(**b)
    for i in range(b["input_ids"].shape[0]):
        assert refs.kept_per_unit(out, b, i) == expected[i], i
    if opts.get("pivot_text") == 3:
        # this case tells the readings apart: text pivots matter, and so does excluding the other
        # units of a row from a unit's text candidates
        assert expected != refs.dart_reference(hidden, keys, norm, b, keep, pivot_image=1, pivot_text=0)
        assert expected != refs.dart_reference(hidden, keys, norm, b, keep, other_units_are_text=True, **opts)


@pytest.mark.parametrize("layer,keep", [(0, 0.25), (2, 4)])
@pytest.mark.parametrize("family", FAMILIES)
def test_pooling_matches_adaptive_pool_reference(family, layer, keep):
    model, b = model_of(family), batch_of(family)
    hidden, _ = refs.stock_layer_inputs(model, b, layer)
    expected = refs.pooling_reference(hidden, b, keep)
    with applied(model, "pooling", keep=keep, layer=layer), torch.no_grad():
        out = model(**b)
        for i in range(N_ROWS):
            assert refs.kept_per_unit(out, b, i) == [idx for idx, _ in expected[i]], i
        if layer == 0:
            # the pooled values too: the stock layers run by hand on the pooled prompt (row alone)
            for i in (2, 4):
                row = row_alone(b, i)
                alone = model(**row)
                pad = int((~b["attention_mask"][i].bool()).sum())
                replace = {}
                for (_, start, _), (idx, feats) in zip(refs.unit_layout(b)[i], expected[i]):
                    for j, f in zip(idx, feats):
                        replace[start - pad + j] = f
                ref_logits = refs.manual_reduced_logits(model, row, 0, alone.kept_index[0].tolist(), replace=replace)
                torch.testing.assert_close(alone.logits[0], ref_logits, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_random_is_a_seeded_subset_of_exactly_k_per_unit(family):
    model, b = model_of(family), batch_of(family)
    layout = refs.unit_layout(b)
    runs = {}
    with torch.no_grad():
        for seed in (4, 4, 5):
            with applied(model, "random", keep=0.5, layer=2, seed=seed):
                out = model(**b)
            kept = [refs.kept_per_unit(out, b, i) for i in range(N_ROWS)]
            for units, row in zip(layout, kept):
                for (_, _, n), idx in zip(units, row):
                    assert len(idx) == refs.budget_of(0.5, n) and idx == sorted(set(idx))
                    assert all(0 <= j < n for j in idx)
            runs.setdefault(seed, []).append(kept)
    assert runs[4][0] == runs[4][1]
    assert runs[4][0] != runs[5][0]


# --------------------------------------------------------------------------- 5. M-RoPE positions

class _RotarySpy:
    """Records the position ids each call of the language model's rotary embedding gets."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.model.language_model.rotary_emb.register_forward_hook(
            lambda mod, args, out: self.calls.append(args[1].clone()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("method,opts", [("dart", dict(keep=0.5, layer=2)), ("pooling", dict(keep=0.25, layer=0)),
                                         ("random", dict(keep=0.5, layer=0, seed=1))], ids=lambda v: str(v))
@pytest.mark.parametrize("family", FAMILIES)
def test_kept_tokens_keep_their_mrope_positions(family, method, opts):
    model, b = model_of(family), batch_of(family)
    stock = refs.stock_rope(model, b)                                   # [3, B, L]
    with applied(model, method, **opts), torch.no_grad(), _RotarySpy(model) as spy:
        out = model(**b)
    after = spy.calls[-1][-3:]                                          # positions from layer K on
    kept, valid = out.kept_index, out.kept_mask
    assert after.shape[-1] == kept.shape[1] < stock.shape[-1]
    for axis in range(3):
        expect = stock[axis].gather(1, kept.clamp(min=0))
        assert torch.equal(after[axis][valid], expect[valid]), axis


@pytest.mark.parametrize("method,opts", [("dart", dict(keep=0.5, layer=2)),
                                         ("random", dict(keep=0.5, layer=0, seed=1))], ids=lambda v: str(v))
@pytest.mark.parametrize("family", FAMILIES)
def test_reduced_forward_equals_stock_layers_on_kept_tokens(family, method, opts):
    # The stock decoder layers run by hand on the kept tokens with their stock 3-D positions
    # (and, for Qwen3-VL, each kept visual token's own DeepStack features) give the same logits.
    model, b = model_of(family), batch_of(family)
    with applied(model, method, **opts), torch.no_grad():
        for i in (2, 4):
            row = row_alone(b, i)
            out = model(**row)
            ref = refs.manual_reduced_logits(model, row, opts["layer"], out.kept_index[0].tolist())
            torch.testing.assert_close(out.logits[0], ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_tokens_get_the_unreduced_rope_positions(family):
    model, b = model_of(family), batch_of(family)
    mask = b["attention_mask"]
    nxt = torch.full((N_ROWS, 1), tq.VOCAB.index("dog"), dtype=torch.long)
    mask2 = torch.cat([mask, torch.ones_like(nxt)], 1)
    with torch.no_grad():
        stock = model(**b, use_cache=True)
        # the stock model's decode position: text position + its rope delta (test_tiny_qwen.py)
        text_pos = mask2.cumsum(-1)[:, -1:] - 1
        expect = (text_pos + model.model.rope_deltas)[None].expand(3, -1, -1)
        with _RotarySpy(model) as spy:
            ref_logits = model(input_ids=nxt, attention_mask=mask2, past_key_values=stock.past_key_values,
                               position_ids=expect, use_cache=True).logits
        assert torch.equal(spy.calls[-1][-3:], expect)
        with _RotarySpy(model) as spy:
            model.generate(**b, max_new_tokens=2, do_sample=False)
        stock_decode = [c for c in spy.calls if c.shape[-1] == 1][0][-3:]
        assert torch.equal(stock_decode, expect)
        for method, opts in [("none", dict(layer=2)), ("dart", dict(keep=0.25, layer=2)),
                             ("pooling", dict(keep=0.25, layer=0))]:
            with applied(model, method, **opts):
                prefill = model(**b, use_cache=True)
                with _RotarySpy(model) as spy:
                    # no position_ids: the reduced forward derives them (text position + rope delta)
                    step = model(input_ids=nxt, attention_mask=mask2, past_key_values=prefill.past_key_values,
                                 use_cache=True)
                assert torch.equal(spy.calls[-1][-3:], expect), method
                if method == "none":
                    torch.testing.assert_close(step.logits, ref_logits, atol=ATOL, rtol=RTOL)
                with _RotarySpy(model) as spy:
                    model.generate(**b, max_new_tokens=2, do_sample=False)     # generate's own positions
                assert torch.equal([c for c in spy.calls if c.shape[-1] == 1][0][-3:], expect), method


# --------------------------------------------------------------------------- 6. DeepStack

@pytest.mark.parametrize("method,opts", [("random", dict(keep=0.5, layer=0, seed=2)),
                                         ("pooling", dict(keep=0.25, layer=0)),
                                         ("random", dict(keep=0.5, layer=1, seed=2)),
                                         ("fastv", dict(keep=0.5, layer=1))], ids=lambda v: str(v))
def test_deepstack_follows_kept_tokens(method, opts):
    # Qwen3-VL adds DeepStack features after layers 0 and 1: dropping at K = 0 or 1 must give
    # later injections to the kept tokens only, each its own feature.
    model, b = model_of("qwen3_vl"), batch_of("qwen3_vl")
    assert list(model.config.vision_config.deepstack_visual_indexes) == [1, 2]
    layer = opts["layer"]
    with applied(model, method, **opts), torch.no_grad():
        for i in (1, 2, 4):
            row = row_alone(b, i)
            out = model(**row)
            kept = out.kept_index[0].tolist()
            replace = None
            if method == "pooling":
                hidden, _ = refs.stock_layer_inputs(model, row, 0)
                replace = {}
                for (_, start, _), (idx, feats) in zip(refs.unit_layout(row)[0],
                                                       refs.pooling_reference(hidden, row, opts["keep"])[0]):
                    replace.update({start + j: f for j, f in zip(idx, feats)})
            ref = refs.manual_reduced_logits(model, row, layer, kept, replace=replace)
            torch.testing.assert_close(out.logits[0], ref, atol=ATOL, rtol=RTOL, msg=f"row {i}")
            # the check has teeth: the features of the first visual tokens given to the kept
            # ones in order (a table not gathered with the tokens) gives other logits
            wrong = refs.manual_reduced_logits(model, row, layer, kept, replace=replace, deepstack="compact")
            assert (out.logits[0] - wrong).abs().max() > 1e-2, i


# --------------------------------------------------------------------------- 7. bad input

@pytest.mark.parametrize("family", FAMILIES)
def test_bad_input_raises_naming_the_argument(family):
    model, b = model_of(family), batch_of(family)
    smallest = min(n for units in refs.unit_layout(b) for _, _, n in units)
    with torch.no_grad():
        with applied(model, "dart", keep=smallest + 1, layer=2), pytest.raises(ValueError, match=r"^keep"):
            model(**b)
        with applied(model, "fastv", keep=smallest, layer=2):
            model(**b)                                           # the budget of the smallest unit fits
        with applied(model, "dart", keep=0.5, layer=2):
            grid = b["image_grid_thw"].clone()
            grid[0, 2] += 2                                      # one more column of merged tokens
            with pytest.raises(ValueError, match=r"^image_grid_thw"):
                model(**{**b, "image_grid_thw": grid})
            with pytest.raises(ValueError, match=r"^image_grid_thw"):
                model(**{**b, "image_grid_thw": b["image_grid_thw"][:-1]})
            grid = b["image_grid_thw"].clone()
            grid[0, 1] += 1                                      # not a multiple of the 2x2 merger
            with pytest.raises(ValueError, match=r"^image_grid_thw"):
                model(**{**b, "image_grid_thw": grid})
            for axis in (0, 2):             # a frame group without placeholders; a wider frame
                vgrid = b["video_grid_thw"].clone()
                vgrid[0, axis] += 2
                with pytest.raises(ValueError, match=r"^video_grid_thw"):
                    model(**{**b, "video_grid_thw": vgrid})
            # pixels that do not cover the grids: a clear error, not an IndexError in the tower
            for key in ("pixel_values", "pixel_values_videos"):
                with pytest.raises(ValueError, match=f"^{key}"):
                    model(**{**b, key: b[key][:-4]})
            if family == "qwen2_5_vl":
                with pytest.raises(ValueError, match=r"^second_per_grid_ts"):
                    model(**{**b, "second_per_grid_ts": b["second_per_grid_ts"][:1]})
    # a vision-side method without a rule for an encoder with no [CLS] token: rejected at apply
    rejected = [name for name in available_methods() if get_method(name).stage == "vision"
                and not getattr(get_method(name), "no_cls", False) and name != "trim"]   # trim: needs a scorer
    if not rejected:
        pytest.skip("every vision method has a Qwen-VL rule")
    for name in rejected:
        with pytest.raises(ValueError, match=r"^model"):
            apply(model, name)
        assert "_epic" not in model.__dict__


def test_video_pixels_to_llava_raise():
    from epic_ext.models.tiny import build_tiny_llava, random_pixels, random_prompts
    model = build_tiny_llava(seed=1)
    ids, mask = random_prompts(model, 1)
    px = random_pixels(model, 1)
    with applied(model, "none"), torch.no_grad():
        with pytest.raises(ValueError, match=r"^pixel_values_videos"):
            model(input_ids=ids, attention_mask=mask, pixel_values=px, pixel_values_videos=px[None])
        with pytest.raises(ValueError, match=r"^image_grid_thw"):
            model(input_ids=ids, attention_mask=mask, pixel_values=px, image_grid_thw=torch.tensor([[1, 2, 2]]))
