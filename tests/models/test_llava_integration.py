"""epic_ext.apply on transformers LLaVA: identity, left padding, cache vs recompute, labels,
errors. The methods here are test-local (data-dependent but simple) so that this file checks
the integration; each real method has its own tests under tests/methods/."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import epic_ext.methods as methods_pkg
from epic_ext.methods import LLMMethodConfig, LLMSelection, MethodConfig, VisionReduction, register_method
from epic_ext.models import apply, applied_method, revert
from epic_ext.models.tiny import build_tiny_llava, random_pixels, random_prompts

N_NEW = 3


@dataclass
class _NormCfg(LLMMethodConfig):
    pass


def _norm_topk(ctx, cfg):
    # Keep the image tokens of largest hidden-state norm: depends on the data and the layer.
    k = cfg.resolved_keep(ctx.num_image_tokens)
    score = ctx.image_hidden().float().norm(dim=-1)
    if ctx.keys is not None:   # also exercise the captured keys / query of layer K-1
        start = ctx.image_start[:, None] + torch.arange(ctx.num_image_tokens)
        kk = ctx.keys.float().sum(1)
        score = score + kk.gather(1, start[..., None].expand(-1, -1, kk.shape[-1])).norm(dim=-1) * 1e-3
        score = score + ctx.query.float().sum() * 0
    idx = score.topk(k, dim=1).indices.sort(dim=1).values
    return LLMSelection(idx)


@dataclass
class _VisCfg(MethodConfig):
    pass


def _vision_topk_plus_mean(ctx, cfg):
    # k top-norm tokens + one mean token; the last kept slot is invalid for images whose first
    # feature is positive (a per-image rule), exercising validity masks (adaptive budgets).
    k = cfg.resolved_keep(ctx.features.shape[1])
    f = ctx.features
    idx = f.float().norm(dim=-1).topk(k, dim=1).indices.sort(dim=1).values
    kept = f.gather(1, idx[..., None].expand(-1, -1, f.shape[-1]))
    out = torch.cat([kept, f.mean(1, keepdim=True)], dim=1)
    valid = torch.ones(out.shape[:2], dtype=torch.bool)
    valid[:, -2] = f[:, 0, 0] <= 0
    return VisionReduction(out, valid)


@pytest.fixture(scope="module", autouse=True)
def _test_methods():
    methods_pkg._load_all()
    register_method("test_norm_topk", "llm", _NormCfg)(_norm_topk)
    register_method("test_vision_topk", "vision", _VisCfg)(_vision_topk_plus_mean)
    yield
    methods_pkg._REGISTRY.pop("test_norm_topk")
    methods_pkg._REGISTRY.pop("test_vision_topk")


@pytest.fixture(scope="module")
def model():
    return build_tiny_llava(seed=3)


def _inputs(model, batch, seed=0):
    ids, mask = random_prompts(model, batch, seed=seed)
    return ids, mask, random_pixels(model, batch, seed=seed)


def _positions(mask):
    return (mask.long().cumsum(1) - 1).clamp(min=0)


CASES = [("none", {}), ("none", {"layer": 2}), ("test_norm_topk", {"keep": 37, "layer": 0}),
         ("test_norm_topk", {"keep": 100, "layer": 2}), ("test_norm_topk", {"keep": 0.25, "layer": 3}),
         ("test_vision_topk", {"keep": 50}),
         ("fastv", {"keep": 64, "layer": 2}), ("dart", {"keep": 100, "layer": 2}), ("dart", {"keep": 36, "layer": 1}),
         ("random", {"keep": 64, "seed": 3}), ("random", {"keep": 64, "layer": 2, "seed": 3}),
         ("pooling", {"keep": 36}), ("pooling", {"keep": 144, "layer": 2}),
         ("trim", {"pooled": False}), ("trim", {"keep": 40}), ("prumerge", {"pooled": False}),
         ("prumerge_plus", {"pooled": False}), ("prumerge", {"pooled": False, "max_k": 100}),
         ("visionzip", {}), ("visionzip", {"keep": 32}),
         # keep = 0 is a legal budget: the image span vanishes, the text still runs
         ("dart", {"keep": 0, "layer": 2}), ("fastv", {"keep": 0, "layer": 1}), ("pooling", {"keep": 0}),
         ("random", {"keep": 0, "layer": 2, "seed": 1})]
# Batch-pooled IQR (the published default) ties a row's budget to its batch: cache/recompute only.
POOLED = [("trim", {}), ("prumerge", {}), ("prumerge_plus", {})]


def _resolve(model, method, opts):
    if method == "trim":
        from epic_ext.methods.trim import ClipTextScorer
        opts = {**opts, "scorer": _scorer(model)}
    return opts


_SCORERS = {}


def _scorer(model):
    from epic_ext.methods.trim import ClipTextScorer
    key = id(model)
    if key not in _SCORERS:
        _SCORERS[key] = ClipTextScorer.tiny(model.config.vision_config, model.config.text_config.vocab_size)
    return _SCORERS[key]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layer", [0, 2])
def test_keep_all_is_identity(attn, layer):
    model = build_tiny_llava(seed=1, attn_implementation=attn)
    ids, mask, px = _inputs(model, 3)
    kw = dict(input_ids=ids, pixel_values=px, attention_mask=mask, position_ids=_positions(mask))
    with torch.no_grad():
        ref = model(**kw).logits
        for method, opts in [("none", {"layer": layer}), ("test_norm_topk", {"keep": 576, "layer": layer})]:
            apply(model, method, **opts)
            out = model(**kw)
            revert(model)
            torch.testing.assert_close(out.logits, ref, atol=0, rtol=0)
            assert torch.equal(out.kept_index, torch.arange(ids.shape[1]).expand_as(ids))


# "random" draws one [B, N] block of uniforms, so a row's subset depends on its batch: it is
# checked for cache/recompute equality below, not for batch invariance.
@pytest.mark.parametrize("method,opts", [c for c in CASES if c[0] != "random"])
def test_left_padding_matches_each_sample_alone(model, method, opts):
    ids, mask, px = _inputs(model, 2, seed=5)
    apply(model, method, **_resolve(model, method, opts))
    try:
        with torch.no_grad():
            batch = model(input_ids=ids, pixel_values=px, attention_mask=mask, position_ids=_positions(mask))
            gen = model.generate(input_ids=ids, pixel_values=px, attention_mask=mask, max_new_tokens=N_NEW,
                                 do_sample=False)
            for b in range(ids.shape[0]):
                real = mask[b].bool()
                one_ids, one_px = ids[b:b + 1, real], px[b:b + 1]
                alone = model(input_ids=one_ids, pixel_values=one_px)
                pad = int((~real).sum())
                # the batch row's real rows (padding and unused adaptive slots are masked)
                rows = batch.kept_mask[b]
                rows_alone = alone.kept_mask[0]
                torch.testing.assert_close(batch.logits[b, rows], alone.logits[0, rows_alone], atol=2e-5, rtol=2e-5)
                k_batch = batch.kept_index[b, rows]
                assert torch.equal(torch.where(k_batch >= 0, k_batch - pad, -1), alone.kept_index[0, rows_alone])
                gen_alone = model.generate(input_ids=one_ids, pixel_values=one_px, max_new_tokens=N_NEW,
                                           do_sample=False)
                assert torch.equal(gen[b, -N_NEW:], gen_alone[0, -N_NEW:])
    finally:
        revert(model)


@pytest.mark.parametrize("method,opts", CASES + POOLED)
def test_generate_with_cache_equals_recompute(model, method, opts):
    ids, mask, px = _inputs(model, 2, seed=9)
    apply(model, method, **_resolve(model, method, opts))
    try:
        with torch.no_grad():
            gen = model.generate(input_ids=ids, pixel_values=px, attention_mask=mask, max_new_tokens=N_NEW,
                                 do_sample=False)
            seq, m = ids, mask
            prompt_last = ids.shape[1] - 1
            for _ in range(N_NEW):
                out = model(input_ids=seq, pixel_values=px, attention_mask=m, position_ids=_positions(m),
                            use_cache=False, query_index=prompt_last)
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
            assert torch.equal(gen, seq)
    finally:
        revert(model)


def test_sampling_generate_runs_and_is_seeded(model):
    ids, mask, px = _inputs(model, 2)
    apply(model, "test_norm_topk", keep=64, layer=2)
    try:
        outs = []
        for _ in range(2):
            torch.manual_seed(0)
            outs.append(model.generate(input_ids=ids, pixel_values=px, attention_mask=mask, max_new_tokens=3,
                                       do_sample=True, top_k=50))
        assert torch.equal(outs[0], outs[1])
    finally:
        revert(model)


@pytest.mark.parametrize("method,opts", [("test_norm_topk", {"keep": 64, "layer": 2}),
                                         ("test_vision_topk", {"keep": 40})])
def test_kv_cache_lengths_per_layer(model, method, opts):
    ids, mask, px = _inputs(model, 2)
    apply(model, method, **opts)
    try:
        with torch.no_grad():
            out = model(input_ids=ids, pixel_values=px, attention_mask=mask, use_cache=True)
        cache = out.past_key_values
        length = ids.shape[1]
        k = opts["keep"]
        reduced = length - 576 + (k + 1 if method == "test_vision_topk" else k)
        layer = opts.get("layer", 0)
        lens = [cache.layers[i].keys.shape[-2] for i in range(len(cache.layers))]
        assert lens == [length] * layer + [reduced] * (len(lens) - layer)
    finally:
        revert(model)


def test_labels_follow_the_kept_tokens(model):
    ids, mask, px = _inputs(model, 2)
    labels = torch.where(torch.rand(ids.shape) < 0.3, ids, -100)
    labels[ids == model.config.image_token_id] = -100
    apply(model, "test_norm_topk", keep=32, layer=0)
    try:
        with torch.no_grad():
            out = model(input_ids=ids, pixel_values=px, attention_mask=mask, labels=labels)
        kept = out.kept_index
        lab = labels.gather(1, kept.clamp(min=0)).masked_fill(kept < 0, -100)
        ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), lab[:, 1:].flatten(),
                                                ignore_index=-100)
        torch.testing.assert_close(out.loss, ref)
    finally:
        revert(model)


def test_apply_revert_and_errors(model):
    ids, mask, px = _inputs(model, 1)
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=px).logits
    apply(model, "test_norm_topk", keep=16, layer=1)
    assert applied_method(model)[0].name == "test_norm_topk"
    apply(model, "none")                      # re-applying replaces
    assert applied_method(model)[0].name == "none"
    revert(model)
    revert(model)                             # idempotent
    assert applied_method(model) is None
    assert "forward" not in model.__dict__
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, pixel_values=px).logits, ref, atol=0, rtol=0)
    with pytest.raises(ValueError, match="method"):
        apply(model, "no-such-method")
    with pytest.raises(TypeError, match="bogus"):
        apply(model, "none", bogus=1)
    with pytest.raises(ValueError, match="layer"):
        apply(model, "none", layer=99)
    with pytest.raises(ValueError, match="layer"):
        apply(model, "test_vision_topk", keep=4, layer=2)
    apply(model, "prumerge", layer=-2)        # a vision method whose own option is a CLIP layer
    assert applied_method(model)[1].layer == -2
    revert(model)
    with pytest.raises(ValueError, match="model"):
        apply(torch.nn.Linear(2, 2), "none")
    apply(model, "test_norm_topk", keep=16, layer=1)
    try:
        bad = ids.clone()
        bad[0, (bad[0] == model.config.image_token_id).nonzero()[0, 0]] = 5   # 575 image tokens
        with pytest.raises(ValueError, match="pixel_values: image 0 needs 576"):
            model(input_ids=bad, pixel_values=px)
    finally:
        revert(model)


@pytest.mark.parametrize("layer,keep", [(2, 64), (1, 200)])
def test_fastv_under_sdpa_keeps_what_eager_attention_ranks(layer, keep):
    # The published FastV reads layer K-1's materialised attention weights (eager); ours never
    # builds them. Same weights, same prompt: the kept tokens must agree.
    eager = build_tiny_llava(seed=4, attn_implementation="eager")
    sdpa = build_tiny_llava(seed=4, attn_implementation="sdpa")
    ids, mask, px = _inputs(eager, 2, seed=11)
    pos = _positions(mask)
    with torch.no_grad():
        att = eager(input_ids=ids, pixel_values=px, attention_mask=mask, position_ids=pos,
                    output_attentions=True).attentions[layer - 1]          # [B, H, L, L]
    start = (ids == eager.config.image_token_id).int().argmax(1)
    span = start[:, None] + torch.arange(576)
    score = att[:, :, -1, :].float().mean(1).gather(1, span)
    expect = score.topk(keep, dim=1).indices.sort(1).values
    apply(sdpa, "fastv", keep=keep, layer=layer)
    try:
        with torch.no_grad():
            out = sdpa(input_ids=ids, pixel_values=px, attention_mask=mask, position_ids=pos)
    finally:
        revert(sdpa)
    kept = out.kept_index
    got = torch.stack([kept[b][(kept[b] >= start[b]) & (kept[b] < start[b] + 576)] - start[b] for b in range(2)])
    assert torch.equal(got, expect)


# Every method whose selection is batch-independent (random draws one block per batch, pooled IQR
# ties a row's budget to its batch).
NO_POSITIONS = [("none", {"layer": 2}), ("dart", {"keep": 64, "layer": 2}), ("fastv", {"keep": 64, "layer": 2}),
                ("pooling", {"keep": 36, "layer": 1}), ("trim", {"pooled": False}), ("prumerge", {"pooled": False}),
                ("prumerge_plus", {"pooled": False}), ("visionzip", {})]


@pytest.mark.parametrize("method,opts", NO_POSITIONS)
def test_left_padding_without_position_ids(model, method, opts):
    # model(**batch) without position_ids: the reduced forward numbers positions from the
    # attention mask, as generate() does; DART's key norms (after RoPE) would otherwise depend
    # on the padding and select other tokens.
    ids, mask, px = _inputs(model, 2, seed=5)
    apply(model, method, **_resolve(model, method, opts))
    try:
        with torch.no_grad():
            batch = model(input_ids=ids, pixel_values=px, attention_mask=mask)
            for b in range(ids.shape[0]):
                real = mask[b].bool()
                alone = model(input_ids=ids[b:b + 1, real], pixel_values=px[b:b + 1])
                pad = int((~real).sum())
                rows = batch.kept_mask[b]
                k_batch = batch.kept_index[b, rows]
                assert torch.equal(torch.where(k_batch >= 0, k_batch - pad, -1), alone.kept_index[0, alone.kept_mask[0]])
                torch.testing.assert_close(batch.logits[b, rows], alone.logits[0, alone.kept_mask[0]],
                                           atol=2e-5, rtol=2e-5)
    finally:
        revert(model)


@pytest.mark.parametrize("method,opts", [("random", {"seed": 0}), ("pooling", {}), ("none", {})])
def test_keep_zero_before_the_llm_runs_the_text_alone(model, method, opts):
    # Dropping every image token before layer 0 (positions renumbered) is the LLM on the text.
    ids, mask, px = _inputs(model, 1, seed=2)
    text = ids[:, ids[0] != model.config.image_token_id]
    with torch.no_grad():
        ref = model(input_ids=text).logits
    if method == "none":
        return   # the reference above, from the unmodified model
    apply(model, method, keep=0, layer=0, **opts)
    try:
        with torch.no_grad():
            out = model(input_ids=ids, pixel_values=px, attention_mask=mask)
            gen = model.generate(input_ids=ids, pixel_values=px, attention_mask=mask, max_new_tokens=2,
                                 do_sample=False)
    finally:
        revert(model)
    with torch.no_grad():
        gen_text = model.generate(input_ids=text, max_new_tokens=2, do_sample=False)
    torch.testing.assert_close(out.logits, ref, atol=2e-5, rtol=2e-5)
    assert not (out.kept_index == -1).any() and out.kept_index.shape[1] == text.shape[1]
    assert torch.equal(gen[:, -2:], gen_text[:, -2:])


def test_keep_zero_rejected_where_a_method_cannot_honour_it(model):
    with pytest.raises(ValueError, match="keep"):
        apply(model, "visionzip", keep=0)
    assert applied_method(model) is None


def _siglip_llava(strategy="full"):
    from transformers import LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    from epic_ext.models.tiny import llava_config
    base = llava_config("tiny")
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=56, patch_size=14)
    cfg = LlavaConfig(vision_config=vision, text_config=base.text_config, image_token_id=base.image_token_id,
                      image_seq_length=16, projector_hidden_act="gelu", vision_feature_layer=-2,
                      vision_feature_select_strategy=strategy)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlavaForConditionalGeneration(cfg).eval()


def test_apply_rejects_what_the_forward_cannot_run(model):
    siglip = _siglip_llava()
    # Vision methods rank against the [CLS] token, which a SigLIP tower does not have.
    for method, opts in [("visionzip", {}), ("prumerge", {}), ("prumerge_plus", {}),
                         ("trim", {"scorer": _scorer(model)})]:
        with pytest.raises(ValueError, match="CLS"):
            apply(siglip, method, **opts)
        assert applied_method(siglip) is None
    # A CLIP tower whose [CLS] LLaVA keeps ("full") is rejected alike.
    model.config.vision_feature_select_strategy = "full"
    try:
        with pytest.raises(ValueError, match="vision_feature_select_strategy"):
            apply(model, "visionzip")
    finally:
        model.config.vision_feature_select_strategy = "default"
    # In-LLM methods work on such a model.
    apply(siglip, "dart", keep=4, layer=2)
    try:
        ids, mask = random_prompts(siglip, 2)
        with torch.no_grad():
            out = siglip(input_ids=ids, pixel_values=torch.randn(2, 3, 56, 56), attention_mask=mask)
        assert out.logits.shape[1] == ids.shape[1] - 16 + 4
    finally:
        revert(siglip)
    with pytest.raises(ValueError, match="LlavaModel"):
        apply(model.model, "dart", keep=4)
    model.config.vision_feature_layer = [-2, -1]
    try:
        with pytest.raises(ValueError, match="vision_feature_layer"):
            apply(model, "dart", keep=4)
    finally:
        model.config.vision_feature_layer = -2
    assert applied_method(model) is None


def test_decode_steps_without_position_ids_follow_generate(model):
    # A hand-written decode loop that passes only the growing attention mask numbers positions
    # as generate() does (the cache keeps the prompt's renumbering shift).
    ids, mask, px = _inputs(model, 2, seed=7)
    apply(model, "dart", keep=48, layer=2)
    try:
        with torch.no_grad():
            gen = model.generate(input_ids=ids, pixel_values=px, attention_mask=mask, max_new_tokens=3,
                                 do_sample=False)
            out = model(input_ids=ids, pixel_values=px, attention_mask=mask, use_cache=True)
            seq, m, cache = ids, mask, out.past_key_values
            for _ in range(3):
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
                out = model(input_ids=nxt, attention_mask=m, past_key_values=cache, use_cache=True)
        assert torch.equal(seq, gen)
    finally:
        revert(model)
