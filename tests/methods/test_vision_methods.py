"""Pre-projector reduction methods (TRIM, PruMerge, PruMerge+, VisionZip) against the slow
per-image references of _slow_refs.py, on a tiny random CLIP vision tower (576 patches).

The references read the q_proj / k_proj outputs hooked during the tower's own forward, so the
methods' recomputation of q / k (VisionContext.layer_qk) is checked too."""
import copy
import os
import sys

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

sys.path.insert(0, os.path.dirname(__file__))  # the slow references sit next to this file

import _slow_refs as ref  # noqa: E402

from epic_ext.methods import get_method  # noqa: E402
from epic_ext.methods.base import VisionContext  # noqa: E402
from epic_ext.methods.prumerge import grid_step, plus_slots, prumerge_select  # noqa: E402
from epic_ext.methods.trim import ClipTextScorer, compact_text_ids, trim_select  # noqa: E402
from epic_ext.methods.visionzip import VisionZipConfig, visionzip_select  # noqa: E402

N, D, HEADS = 576, 64, 4
LLM_VOCAB, IMAGE_TOKEN = 5000, 4999
DTYPES = [torch.float32, torch.bfloat16]
# Outputs vs the reference (both fp32 inside, one rounding to the dtype): fp32 differs by
# summation order only; bf16 by at most one rounding step of the result.
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (8e-3, 8e-3)}
SCORE_TOL = dict(atol=1e-8, rtol=1e-5)   # fp32 softmax scores (~1/576)

VISION_CFG = CLIPVisionConfig(hidden_size=D, intermediate_size=128, num_hidden_layers=4,
                              num_attention_heads=HEADS, image_size=336, patch_size=14,
                              attn_implementation="eager")


# --------------------------------------------------------------------------- fixtures

def _prompts():
    """Three LLaVA prompts of one length: left padding, right padding, a prompt longer than CLIP's
    77 tokens, and text ids equal to the tiny CLIP's eos_token_id (3) in the middle."""
    g = torch.Generator().manual_seed(7)
    layout = [(0, 60, 64, 0), (30, 14, 80, 0), (0, 5, 19, 100)]  # (left pad, before, after, right pad)
    length = sum(layout[0]) + N
    ids = torch.zeros(3, length, dtype=torch.long)
    mask = torch.zeros(3, length, dtype=torch.long)
    for b, (lp, pre, post, rp) in enumerate(layout):
        text = torch.randint(4, IMAGE_TOKEN, (pre + post,), generator=g)
        text[::9] = 3
        ids[b, lp:lp + pre] = text[:pre]
        ids[b, lp + pre:lp + pre + N] = IMAGE_TOKEN
        ids[b, lp + pre + N:lp + pre + N + post] = text[pre:]
        mask[b, lp:lp + pre + N + post] = 1
    return ids, mask


class Run:
    """One forward of the tiny tower (B = 3) with hooks on every q_proj / k_proj, as the published
    PruMerge code does; contexts for B = 1 or 3 are slices of it."""

    def __init__(self, dtype):
        torch.manual_seed(0)
        model = CLIPVisionModel(VISION_CFG).eval()
        self.model = model.to(dtype)
        g = torch.Generator().manual_seed(1)
        # Different contrast per image so that per-image IQR counts differ.
        pixels = torch.randn(3, 3, 336, 336, generator=g) * torch.tensor([1.0, 3.0, 0.3]).view(3, 1, 1, 1)
        self.q, self.k = {}, {}
        hooks = []
        for i, layer in enumerate(model.encoder.layers):
            hooks.append(layer.self_attn.q_proj.register_forward_hook(
                lambda m, a, o, i=i: self.q.__setitem__(i, o.detach())))
            hooks.append(layer.self_attn.k_proj.register_forward_hook(
                lambda m, a, o, i=i: self.k.__setitem__(i, o.detach())))
        with torch.no_grad():
            out = model(pixel_values=pixels.to(dtype), output_hidden_states=True, output_attentions=True)
        for h in hooks:
            h.remove()
        self.hidden_states = out.hidden_states
        self.attentions = out.attentions
        self.feature_layer = len(out.hidden_states) - 2
        self.ids, self.mask = _prompts()

    def ctx(self, b):
        hs = tuple(h[:b] for h in self.hidden_states)
        return VisionContext(features=hs[self.feature_layer][:, 1:], hidden_states=hs,
                             feature_layer=self.feature_layer, vision_tower=self.model,
                             input_ids=self.ids[:b], attention_mask=self.mask[:b],
                             image_token_id=IMAGE_TOKEN, grid=(24, 24))

    def feats(self, b):
        return self.hidden_states[self.feature_layer][b, 1:]


_RUNS = {}


def run_for(dtype):
    if dtype not in _RUNS:
        _RUNS[dtype] = Run(dtype)
    return _RUNS[dtype]


@pytest.fixture(scope="module")
def scorer():
    return ClipTextScorer.tiny(VISION_CFG, LLM_VOCAB, proj_dim=32, seed=0)


def call(name, ctx, **options):
    spec = get_method(name)
    with torch.no_grad():
        return spec.fn(ctx, spec.make_config(**options))


def assert_close(actual, expected, dtype, msg=""):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, msg=msg or None)


def check_slots(features, valid, total):
    """valid marks exactly the first total[b] + 1 slots; the rest are zero."""
    s = features.shape[1]
    expect = torch.arange(s)[None, :] <= torch.as_tensor(total)[:, None]
    assert torch.equal(valid, expect)
    assert (features[~valid] == 0).all()


# --------------------------------------------------------------------------- TRIM

_TRIM_SCORES = {}


def trim_reference(run, scorer, b, sign, pooled, count=None, cap=None):
    """Per-image TRIM outputs for the first b images: (tokens list, kept lists, counts, scores)."""
    post_ln = run.model.post_layernorm
    scores = []
    for i in range(b):
        key = (id(run), id(scorer), sign, i)   # the per-prompt text model runs are the slow part
        if key not in _TRIM_SCORES:
            with torch.no_grad():
                t = ref.text_embed(scorer, run.ids[i], run.mask[i], IMAGE_TOKEN, scorer.to_clip_ids.vocab_size)
                _TRIM_SCORES[key] = ref.trim_scores(run.feats(i), post_ln, scorer.visual_projection, t, sign)
        scores.append(_TRIM_SCORES[key])
    counts = [count] * b if count is not None else ref.iqr_counts(scores, pooled, cap=cap)
    outs = [ref.trim_image(run.feats(i), scores[i], counts[i]) for i in range(b)]
    return [o[0] for o in outs], [o[1] for o in outs], counts, torch.stack(scores)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("pooled", [True, False], ids=["pooled", "per_image"])
def test_trim_matches_reference(scorer, B, dtype, pooled):
    run = run_for(dtype)
    with torch.no_grad():
        res = trim_select(run.ctx(B), get_method("trim").make_config(scorer=scorer, pooled=pooled))
    tokens, kept, counts, scores = trim_reference(run, scorer, B, -1, pooled)
    torch.testing.assert_close(res.scores, scores, **SCORE_TOL)
    assert res.counts.tolist() == counts
    assert res.features.shape == (B, N + 1, D) and res.features.dtype == dtype
    check_slots(res.features, res.valid, res.counts)
    for b in range(B):
        assert res.indices[b, :counts[b]].tolist() == kept[b]          # spatial order
        assert (res.indices[b, counts[b]:] == -1).all()
        assert_close(res.features[b, :counts[b] + 1], tokens[b], dtype, f"image {b}")


def test_trim_sign_plus_keeps_most_similar(scorer):
    run = run_for(torch.float32)
    with torch.no_grad():
        plus = trim_select(run.ctx(3), get_method("trim").make_config(scorer=scorer, sign=1))
        minus = trim_select(run.ctx(3), get_method("trim").make_config(scorer=scorer))
    tokens, kept, counts, scores = trim_reference(run, scorer, 3, +1, True)
    torch.testing.assert_close(plus.scores, scores, **SCORE_TOL)
    assert plus.counts.tolist() == counts
    for b in range(3):
        assert plus.indices[b, :counts[b]].tolist() == kept[b]
        assert_close(plus.features[b, :counts[b] + 1], tokens[b], torch.float32)
    # The two signs rank in opposite directions: their best tokens differ.
    assert plus.scores.argmax(1).tolist() != minus.scores.argmax(1).tolist()
    assert torch.equal(plus.scores.argmax(1), minus.scores.argmin(1))


@pytest.mark.parametrize("keep", [0, 1, 64, 0.25, N])
def test_trim_keep_is_exact(scorer, keep):
    run = run_for(torch.float32)
    k = int(keep * N + 0.5) if isinstance(keep, float) else keep
    red = call("trim", run.ctx(3), scorer=scorer, keep=keep)
    assert red.features.shape == (3, k + 1, D) and red.valid is None
    tokens, _, _, _ = trim_reference(run, scorer, 3, -1, True, count=k)
    for b in range(3):
        assert_close(red.features[b], tokens[b], torch.float32)
    if k == N:
        assert (red.features[:, -1] == 0).all()      # nothing left to average


def test_trim_max_k_caps_slots(scorer):
    run = run_for(torch.float32)
    with torch.no_grad():
        res = trim_select(run.ctx(3), get_method("trim").make_config(scorer=scorer, pooled=False, max_k=20))
    tokens, _, counts, _ = trim_reference(run, scorer, 3, -1, False, cap=20)
    assert res.features.shape == (3, 21, D)
    assert res.counts.tolist() == counts and max(counts) == 20
    check_slots(res.features, res.valid, res.counts)
    for b in range(3):
        assert_close(res.features[b, :counts[b] + 1], tokens[b], torch.float32)


def test_text_embeds_batched_equal_per_prompt(scorer):
    """Left / right padding, > 77 text tokens, eos_token_id inside the text: the batched
    embeddings equal each prompt run alone, pooled at its last real token."""
    ids, mask = _prompts()
    with torch.no_grad():
        t = scorer.text_embeds(ids, mask, IMAGE_TOKEN)
        for b in range(3):
            alone = ref.text_embed(scorer, ids[b], mask[b], IMAGE_TOKEN, scorer.to_clip_ids.vocab_size)
            torch.testing.assert_close(t[b], alone, atol=1e-5, rtol=1e-5)
    clip_ids, clip_mask = compact_text_ids(ids, mask, IMAGE_TOKEN)
    assert clip_ids.shape == (3, 77)
    assert clip_mask.sum(1).tolist() == [77, 77, 24]
    assert torch.equal(clip_ids[2, :5], ids[2, :5]) and torch.equal(clip_ids[2, 5:24], ids[2, 5 + N:24 + N])


def test_text_embeds_left_padded_clip_ids(scorer):
    """A to_clip_ids that pads on the left gives the same embeddings (real tokens are moved to
    the front, positions from 0, as CLIP's own right-padded tokenizer output)."""
    def left_padded(ids, mask, image_token_id):
        cids, cmask = scorer.to_clip_ids(ids, mask, image_token_id)
        shift = cmask.shape[1] - cmask.sum(1)
        cols = (torch.arange(cmask.shape[1])[None, :] - shift[:, None]) % cmask.shape[1]
        return cids.gather(1, cols), cmask.gather(1, cols)

    ids, mask = _prompts()
    other = ClipTextScorer(scorer.text_model, scorer.visual_projection, left_padded)
    with torch.no_grad():
        torch.testing.assert_close(other.text_embeds(ids, mask, IMAGE_TOKEN),
                                   scorer.text_embeds(ids, mask, IMAGE_TOKEN))


def test_from_pretrained_matches_transformers(tmp_path):
    """A saved two-tower CLIP checkpoint + tokenizer: the prompt is decoded with the LLM
    tokenizer, re-encoded with CLIP's, and embedded exactly as transformers' own text_embeds
    (pooled at the [EOS] token); the visual projection is the checkpoint's."""
    import json

    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}
    vocab.update({c + "</w>": 26 + i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")})
    vocab.update({"<|startoftext|>": 52, "<|endoftext|>": 53})
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    cfg = CLIPConfig(text_config=dict(vocab_size=54, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=77, bos_token_id=52,
                                      eos_token_id=53, pad_token_id=53),
                     vision_config=VISION_CFG.to_dict(), projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        clip = CLIPModel(cfg).eval()
    clip.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    class LLMTokenizer:   # ids -> lower-case words
        def decode(self, ids, skip_special_tokens=False):
            return " ".join("".join(chr(97 + (i * 7 + j) % 26) for j in range(1 + i % 4)) for i in ids)

    sc = ClipTextScorer.from_pretrained(str(tmp_path), LLMTokenizer())
    assert torch.equal(sc.visual_projection.weight, clip.visual_projection.weight)
    ids, mask = _prompts()
    with torch.no_grad():
        got = sc.text_embeds(ids, mask, IMAGE_TOKEN)
        texts = [LLMTokenizer().decode([int(i) for i, m in zip(ids[b], mask[b]) if m and i != IMAGE_TOKEN])
                 for b in range(3)]
        enc = tok(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        want = clip.text_projection(clip.text_model(**enc).pooler_output)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        red = call("trim", run_for(torch.float32).ctx(3), scorer=sc)
    assert red.features.shape == (3, N + 1, D) and red.valid.any(1).all()


def test_trim_without_scorer_explains():
    with pytest.raises(ValueError, match=r"scorer.*ClipTextScorer\.from_pretrained.*ClipTextScorer\.tiny"):
        get_method("trim").make_config()


# --------------------------------------------------------------------------- PruMerge

def prumerge_reference(run, b, plus, pooled=True, count=None, cap=None, layer=None):
    layer = len(run.model.encoder.layers) - 1 if layer is None else layer
    scores = [ref.prumerge_scores(run.q[layer][i], run.k[layer][i]) for i in range(b)]
    counts = [count] * b if count is not None else ref.iqr_counts(scores, pooled, cap=cap)
    outs = [ref.prumerge_image(run.feats(i), run.k[layer][i], scores[i], counts[i], plus=plus)
            for i in range(b)]
    return [o[0] for o in outs], [o[1] for o in outs], counts, torch.stack(scores)


def check_prumerge(res, expected, dtype, valid_expected=True):
    tokens, kept, counts, scores = expected
    torch.testing.assert_close(res.scores, scores, **SCORE_TOL)
    assert res.counts.tolist() == counts
    assert res.total.tolist() == [len(k) for k in kept]
    if valid_expected:
        check_slots(res.features, res.valid, res.total)
    for b in range(len(kept)):
        t = len(kept[b])
        assert res.indices[b, :t].tolist() == kept[b]          # score order (+ grid, ascending)
        assert (res.indices[b, t:] == -1).all()
        assert_close(res.features[b, :t + 1], tokens[b], dtype, f"image {b}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("plus", [False, True], ids=["prumerge", "prumerge+"])
def test_prumerge_matches_reference(B, dtype, plus):
    run = run_for(dtype)
    with torch.no_grad():
        res = prumerge_select(run.ctx(B), get_method("prumerge").make_config(), plus=plus)
    expected = prumerge_reference(run, B, plus)
    check_prumerge(res, expected, dtype)
    assert res.features.dtype == dtype
    assert res.features.shape[1] == (plus_slots(N, 0, N) if plus else N) + 1
    for b in range(B):   # the scored part is in descending score order
        s = res.scores[b, res.indices[b, :res.counts[b]]]
        assert (s[:-1] >= s[1:]).all()


@pytest.mark.parametrize("plus", [False, True], ids=["prumerge", "prumerge+"])
def test_prumerge_per_image(plus):
    run = run_for(torch.float32)
    with torch.no_grad():
        res = prumerge_select(run.ctx(3), get_method("prumerge").make_config(pooled=False), plus=plus)
    check_prumerge(res, prumerge_reference(run, 3, plus, pooled=False), torch.float32)


@pytest.mark.parametrize("keep", [0, 5, 16, 0.1])
def test_prumerge_keep_is_exact(keep):
    run = run_for(torch.float32)
    k = int(keep * N + 0.5) if isinstance(keep, float) else keep
    with torch.no_grad():
        res = prumerge_select(run.ctx(3), get_method("prumerge").make_config(keep=keep))
    assert res.features.shape == (3, k + 1, D) and res.valid is None
    check_prumerge(res, prumerge_reference(run, 3, False, count=k), torch.float32, valid_expected=False)
    red = call("prumerge", run.ctx(3), keep=keep)
    assert red.valid is None and torch.equal(red.features, res.features)


@pytest.mark.parametrize("case", ["max_k=0", "keep=0", "keep=1", "keep=100", "keep=300"])
def test_prumerge_plus_small_and_large_ratio(case):
    """r = 0 (index 0 only, no division by zero), r -> 0 (a coarse grid), and r > 1/3 (step
    int(int(1/r)/3) = 0, guarded to 1: every grid point up to N - 2)."""
    run = run_for(torch.float32)
    opt, val = case.split("=")
    val = int(val)
    with torch.no_grad():
        res = prumerge_select(run.ctx(3), get_method("prumerge_plus").make_config(**{opt: val}), plus=True)
    count = 0 if opt == "max_k" else val
    expected = prumerge_reference(run, 3, True, count=count)
    check_prumerge(res, expected, torch.float32)
    grid = ref.plus_grid(count, N)
    for b in range(3):
        assert set(res.indices[b, :res.total[b]].tolist()) == set(expected[1][b][:count]) | set(grid)
    if count == 0:
        assert res.total.tolist() == [1, 1, 1] and res.indices[:, 0].tolist() == [0, 0, 0]


def test_grid_step_guards():
    assert grid_step(0, N) == N                       # r = 0
    assert grid_step(1, N) == 192                     # int(576) // 3
    assert grid_step(32, N) == 6                      # int(18) // 3
    assert grid_step(200, N) == 1 and grid_step(N, N) == 1   # int(1/r) < 3: step 0 -> 1
    assert plus_slots(N, 0, 0) == 1 and plus_slots(N, 1, 1) == 4
    assert plus_slots(N, 0, N) == N


def test_prumerge_one_head_attention_matches_hooks():
    """layer_qk's recomputed q / k, taken as one head, equal the forward's own projections."""
    run = run_for(torch.float32)
    ctx = run.ctx(3)
    last = len(run.model.encoder.layers) - 1
    q, k = ctx.layer_qk(last)
    torch.testing.assert_close(q.transpose(1, 2).reshape(3, N + 1, D), run.q[last])
    torch.testing.assert_close(k.transpose(1, 2).reshape(3, N + 1, D), run.k[last])


def test_prumerge_layer_option():
    run = run_for(torch.float32)
    with torch.no_grad():
        res = prumerge_select(run.ctx(3), get_method("prumerge").make_config(layer=-2))
    check_prumerge(res, prumerge_reference(run, 3, False, layer=2), torch.float32)


# --------------------------------------------------------------------------- VisionZip

def visionzip_reference(run, b, dominant, contextual):
    layer = run.feature_layer - 1
    hidden = run.hidden_states[run.feature_layer]
    return [ref.visionzip_image(hidden[i], run.q[layer][i], run.k[layer][i], HEADS, dominant, contextual)
            for i in range(b)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("opts", [{}, {"keep": 128}, {"dominant": 1, "contextual": 7},
                                  {"dominant": 570, "contextual": 20}, {"dominant": 300, "contextual": 0}],
                         ids=["default", "keep128", "cls_only", "few_left", "no_ctx"])
def test_visionzip_matches_reference(B, dtype, opts):
    run = run_for(dtype)
    cfg = get_method("visionzip").make_config(**opts)
    dom, ctxn = cfg.split(N)
    with torch.no_grad():
        res = visionzip_select(run.ctx(B), cfg)
    expected = visionzip_reference(run, B, dom, ctxn)
    m = N - (dom - 1)
    assert res.features.shape == (B, dom + min(ctxn, m), D) and res.features.dtype == dtype
    for b, (tokens, dom_idx, targets, assign) in enumerate(expected):
        assert res.dominant_index[b].tolist() == dom_idx                 # ascending
        assert res.target_index[b].tolist() == targets
        others = [j for j in range(N) if j not in set(dom_idx) | set(targets)] if targets else []
        assert [targets[a] for a in res.assignment[b].tolist()] == [assign[o] for o in others]
        assert_close(res.features[b], tokens, dtype, f"image {b}")
    red = call("visionzip", run.ctx(B), **opts)
    assert red.valid is None and torch.equal(red.features, res.features)


def test_visionzip_attention_matches_hf():
    """[CLS] attention summed over heads equals the tower's own (eager) attention weights of the
    layer whose output is the feature layer, as the published code reads them."""
    run = run_for(torch.float32)
    with torch.no_grad():
        res = visionzip_select(run.ctx(3), VisionZipConfig())
    hf = run.attentions[run.feature_layer - 1].sum(dim=1)[:, 0, 1:]
    torch.testing.assert_close(res.scores, hf, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("keep,split", [(64, (54, 10)), (128, (108, 20)), (192, (162, 30)),
                                        (1, (1, 0)), (4, (3, 1)), (0.25, (121, 23)), (N, (486, 90))])
def test_visionzip_keep_split(keep, split):
    cfg = get_method("visionzip").make_config(keep=keep)
    assert cfg.split(N) == split
    assert ref.visionzip_split(sum(split)) == split
    run = run_for(torch.float32)
    assert call("visionzip", run.ctx(1), keep=keep).features.shape == (1, sum(split), D)


# --------------------------------------------------------------------------- shared behaviour

def test_pooled_vs_per_image_counts(scorer):
    """Pooled: every image keeps floor(outliers / B) (the same count); per image: own counts,
    which differ on this batch; at B = 1 both agree."""
    run = run_for(torch.float32)
    for name, opts, fn in [("trim", {"scorer": scorer}, trim_select),
                           ("prumerge", {}, prumerge_select)]:
        spec = get_method(name)
        with torch.no_grad():
            pooled = fn(run.ctx(3), spec.make_config(**opts)).counts
            single = fn(run.ctx(3), spec.make_config(pooled=False, **opts)).counts
            one_p = fn(run.ctx(1), spec.make_config(**opts)).counts
            one_s = fn(run.ctx(1), spec.make_config(pooled=False, **opts)).counts
        assert len(set(pooled.tolist())) == 1, name
        assert len(set(single.tolist())) > 1, name
        assert torch.equal(one_p, one_s) and one_s[0] == single[0], name


def test_registry():
    assert get_method("prumerge+").name == "prumerge_plus"
    for name in ("trim", "prumerge", "prumerge+", "visionzip"):
        assert get_method(name).stage == "vision"


BAD = [
    ("trim", {"sign": 0}, "sign"), ("trim", {"sign": True}, "sign"),
    ("trim", {"whisker": -1.0}, "whisker"), ("trim", {"pooled": "yes"}, "pooled"),
    ("trim", {"max_k": -1}, "max_k"), ("trim", {"max_k": 5, "keep": 5}, "max_k"),
    ("trim", {"keep": -1}, "keep"), ("trim", {"keep": 1.5}, "keep"), ("trim", {"keep": True}, "keep"),
    ("trim", {"scorer": "clip"}, "scorer"),
    ("prumerge", {"neighbors": -1}, "neighbors"), ("prumerge", {"layer": "last"}, "layer"),
    ("prumerge", {"whisker": float("nan")}, "whisker"), ("prumerge_plus", {"keep": "iqr"}, "keep"),
    ("visionzip", {"dominant": 0}, "dominant"), ("visionzip", {"contextual": -1}, "contextual"),
    ("visionzip", {"keep": 64, "dominant": 54}, "dominant"), ("visionzip", {"dominant": 5.0}, "dominant"),
]


@pytest.mark.parametrize("name,opts,option", BAD, ids=[f"{n}-{o}" for n, _, o in BAD])
def test_bad_options_raise(scorer, name, opts, option):
    if name == "trim" and "scorer" not in opts:
        opts = dict(opts, scorer=scorer)
    with pytest.raises(ValueError, match=option):
        get_method(name).make_config(**opts)


@pytest.mark.parametrize("name,opts,option", [
    ("trim", {"max_k": N + 1}, "max_k"), ("trim", {"keep": N + 1}, "keep"),
    ("prumerge", {"max_k": N + 1}, "max_k"), ("prumerge_plus", {"keep": N + 1}, "keep"),
    ("prumerge", {"layer": 4}, "layer"), ("visionzip", {"dominant": N + 2}, "dominant"),
    ("visionzip", {"keep": 0}, "keep"), ("visionzip", {"keep": N + 1}, "keep")])
def test_bad_budgets_raise_when_run(scorer, name, opts, option):
    if name == "trim":
        opts = dict(opts, scorer=scorer)
    run = run_for(torch.float32)
    with pytest.raises(ValueError, match=option):
        call(name, run.ctx(1), **opts)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_no_host_sync_on_cuda(scorer):
    """Every method runs under CUDA's sync debug mode set to error (text tokenisation of the
    tiny scorer included, it stays on the device)."""
    run = run_for(torch.float32)
    ctx = run.ctx(3)
    model = copy.deepcopy(run.model).cuda()
    ctx = VisionContext(features=ctx.features.cuda(), hidden_states=tuple(h.cuda() for h in ctx.hidden_states),
                        feature_layer=ctx.feature_layer, vision_tower=model,
                        input_ids=ctx.input_ids.cuda(), attention_mask=ctx.attention_mask.cuda(),
                        image_token_id=IMAGE_TOKEN, grid=(24, 24))
    sc = copy.deepcopy(scorer).cuda()
    cases = [("trim", {"scorer": sc}), ("trim", {"scorer": sc, "keep": 64}), ("prumerge", {}),
             ("prumerge", {"keep": 16}), ("prumerge_plus", {}), ("prumerge_plus", {"keep": 0}),
             ("visionzip", {}), ("visionzip", {"keep": 128})]
    outs = {}
    for name, opts in cases:
        cfg = get_method(name).make_config(**opts)
        get_method(name).fn(ctx, cfg)        # warm-up (lazy inits may sync once)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.no_grad():
                outs[name, str(opts.get("keep"))] = get_method(name).fn(ctx, cfg)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    cpu_ctx = run.ctx(3)
    for name, opts in cases:
        if "scorer" in opts:
            opts = dict(opts, scorer=scorer)
        expect = call(name, cpu_ctx, **opts)
        got = outs[name, str(opts.get("keep"))]
        torch.testing.assert_close(got.features.cpu(), expect.features, atol=1e-4, rtol=1e-4)
