"""TRIM: Token Reduction using CLIP Metric (Song et al., 2024), a pre-projector method.

Every visual token f_i of LLaVA's feature layer (CLS removed) is mapped into CLIP's joint space,
p_i = visual_projection(post_layernorm(f_i)) in fp32, and compared with the CLIP text model's
projected [EOS] embedding t of the prompt: s = softmax(sign * (p . t)) over the N tokens.

``sign`` defaults to -1 because the published code negates the similarity before the softmax
(``similarities = -similarities``): it keeps the tokens *least* similar to the text, and its
released checkpoint was trained that way. ``sign=+1`` keeps the most text-similar tokens, as the
paper's prose describes.

Selection (``keep=None``, the published rule): IQR outliers of s (fence Q3 + 1.5 IQR, see
DESIGN.md 2.2), pooled over the batch by default like the reference's numpy code (every image
keeps floor(outliers / B) tokens, its own best ones); ``pooled=False`` gives each image its own
fence and count. Kept tokens stay in spatial (ascending index) order and one more token, the mean
of the unselected pre-projector features, follows them (zeros when nothing is unselected).
With ``keep`` set (an int count or a ratio of N), the top-``keep`` tokens are kept instead of the
IQR outliers: the output then has exactly ``keep + 1`` tokens (the mean token included).

No host sync: the adaptive output has a fixed ``max_k + 1`` slots (``max_k`` defaults to N) and
a validity mask; slot j of image b is valid for j <= counts[b] (the mean token sits at counts[b]).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from . import register_method
from .base import MethodConfig, VisionContext, VisionReduction

CLIP_MAX_TOKENS = 77  # CLIP's text context length (the reference truncates to it)


# --------------------------------------------------------------------------- text side

def compact_text_ids(input_ids: Tensor, attention_mask: Optional[Tensor], image_token_id: int,
                     max_len: int = CLIP_MAX_TOKENS) -> tuple[Tensor, Tensor]:
    """The text tokens of each LLaVA prompt (image placeholders and padding removed), moved to
    the front and truncated to ``max_len``: (ids [B, W], mask [B, W] int64), W = min(L, max_len).

    On-device, no host sync. A row without any text keeps one (padding) token so the text model
    never sees a fully masked row."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    keep = attention_mask.bool() & (input_ids != image_token_id)
    ids, mask = pack_front(input_ids, keep, max(1, min(input_ids.shape[1], max_len)))
    mask[:, 0] = 1
    return ids, mask


def pack_front(ids: Tensor, keep: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Move each row's kept ids to the front, in order, into ``width`` columns (later ones cut):
    (ids [B, width] zero-padded, mask [B, width] int64). On-device, no host sync."""
    b = ids.shape[0]
    pos = keep.long().cumsum(1) - 1
    # Dropped and truncated tokens all land in a sink column that is cut off afterwards.
    slot = torch.where(keep & (pos < width), pos, torch.full_like(pos, width))
    packed = ids.new_zeros(b, width + 1).scatter_(1, slot, ids)[:, :width]
    count = keep.sum(1).clamp(max=width)
    mask = (torch.arange(width, device=ids.device) < count[:, None]).long()
    return packed, mask


class ModVocabIds:
    """``to_clip_ids`` of :meth:`ClipTextScorer.tiny`: LLM ids taken modulo the tiny CLIP
    vocabulary, on-device."""

    def __init__(self, vocab_size: int, max_len: int = CLIP_MAX_TOKENS):
        self.vocab_size, self.max_len = int(vocab_size), int(max_len)

    def __call__(self, input_ids, attention_mask, image_token_id):
        ids, mask = compact_text_ids(input_ids, attention_mask, image_token_id, self.max_len)
        return ids % self.vocab_size, mask


class Retokenize:
    """``to_clip_ids`` of :meth:`ClipTextScorer.from_pretrained`: decode each prompt's text
    tokens with the LLM tokenizer and encode the text with CLIP's tokenizer (77 tokens,
    truncated). Tokenising is host work by nature: this is the one place that reads ids back."""

    def __init__(self, llm_tokenizer, clip_tokenizer, max_len: int = CLIP_MAX_TOKENS):
        self.llm_tokenizer, self.clip_tokenizer, self.max_len = llm_tokenizer, clip_tokenizer, max_len

    def __call__(self, input_ids, attention_mask, image_token_id):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        keep = (attention_mask.bool() & (input_ids != image_token_id)).cpu()
        rows = input_ids.cpu()
        texts = [self.llm_tokenizer.decode(r[k].tolist(), skip_special_tokens=True)
                 for r, k in zip(rows, keep)]
        enc = self.clip_tokenizer(texts, padding=True, truncation=True, max_length=self.max_len,
                                  return_tensors="pt")
        return enc["input_ids"].to(input_ids.device), enc["attention_mask"].to(input_ids.device)


class ClipTextScorer(nn.Module):
    """The CLIP side of TRIM: text model, the vision tower's ``visual_projection``, and the map
    from LLaVA prompt ids to CLIP text ids.

    text_model: a transformers ``CLIPTextModelWithProjection``. visual_projection: ``nn.Linear``
    (Dv -> projection dim), CLIP's image projection. to_clip_ids(input_ids, attention_mask,
    image_token_id) -> (clip_ids [B, <= 77], clip_mask): the prompt with image tokens and padding
    removed, in CLIP's vocabulary. The pooled text embedding is read at each row's last real
    token (CLIP's [EOS]), found from clip_mask on the device: config.eos_token_id is not used.

    Make one with :meth:`from_pretrained` (real CLIP checkpoint + the LLM's tokenizer) or
    :meth:`tiny` (random, offline, for tests and demos)."""

    def __init__(self, text_model: nn.Module, visual_projection: nn.Linear,
                 to_clip_ids: Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor]]):
        super().__init__()
        if not (hasattr(text_model, "text_model") and hasattr(text_model, "text_projection")):
            raise TypeError("text_model must be a transformers CLIPTextModelWithProjection, got "
                            f"{type(text_model).__name__}")
        if not isinstance(visual_projection, nn.Linear):
            raise TypeError(f"visual_projection must be an nn.Linear, got {type(visual_projection).__name__}")
        if not callable(to_clip_ids):
            raise TypeError("to_clip_ids must be callable (input_ids, attention_mask, image_token_id) "
                            "-> (clip_ids, clip_mask)")
        if visual_projection.out_features != text_model.text_projection.out_features:
            raise ValueError(f"visual_projection: output size {visual_projection.out_features} differs "
                             f"from the text projection's {text_model.text_projection.out_features}")
        self.text_model = text_model
        self.visual_projection = visual_projection
        self.to_clip_ids = to_clip_ids

    def text_embeds(self, input_ids: Tensor, attention_mask: Optional[Tensor],
                    image_token_id: int) -> Tensor:
        """[B, P] fp32 projected [EOS] embeddings of the prompts (not normalised, as TRIM)."""
        ids, mask = self.to_clip_ids(input_ids, attention_mask, image_token_id)
        dev = self.text_model.text_projection.weight.device
        ids, mask = ids.to(dev), mask.to(dev)
        # Real tokens first (a no-op for right padding): CLIP's causal attention alone then keeps
        # padding out of every real token's state, so no padding mask goes to transformers (its
        # mask helper reads a given mask back to the host), and positions start at 0 as in training.
        ids, mask = pack_front(ids, mask.bool(), ids.shape[1])
        hidden = self.text_model.text_model(input_ids=ids).last_hidden_state
        last = (mask.sum(1) - 1).clamp(min=0)  # each row's last real token: CLIP's [EOS]
        pooled = hidden.gather(1, last.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])).squeeze(1)
        return F.linear(pooled.float(), self.text_model.text_projection.weight.float())

    def image_embeds(self, features: Tensor, post_layernorm: nn.Module) -> Tensor:
        """[B, N, P] fp32 visual_projection(post_layernorm(features)), all in fp32 whatever the
        modules' dtype (the reference disables autocast for this step)."""
        x = _layer_norm_fp32(features, post_layernorm)
        vp = self.visual_projection
        return F.linear(x, vp.weight.float(), None if vp.bias is None else vp.bias.float())

    @classmethod
    def from_pretrained(cls, clip_path: str, llm_tokenizer, *, dtype: Optional[torch.dtype] = None,
                        device=None, **kwargs) -> "ClipTextScorer":
        """From a CLIP checkpoint holding both towers (LLaVA-1.5: openai/clip-vit-large-patch14-336)
        and the LLM's tokenizer (anything with ``decode(ids, skip_special_tokens=True)``).
        Extra kwargs go to every ``from_pretrained`` call."""
        from transformers import (CLIPTextModelWithProjection, CLIPTokenizer,
                                  CLIPVisionModelWithProjection)
        text_kw, vision_kw = dict(kwargs), dict(kwargs)
        cfg = clip_config(clip_path, **kwargs)
        if getattr(cfg, "model_type", None) == "clip":
            # A two-tower checkpoint keeps projection_dim at the top level; the sub-configs'
            # own default (512) would re-initialise the projections.
            for sub, kw in ((cfg.text_config, text_kw), (cfg.vision_config, vision_kw)):
                sub.projection_dim = cfg.projection_dim
                kw["config"] = sub
        text = CLIPTextModelWithProjection.from_pretrained(clip_path, **text_kw)
        # The projection sits in the vision half of the checkpoint; the tower itself is dropped.
        vision = CLIPVisionModelWithProjection.from_pretrained(clip_path, **vision_kw)
        proj = vision.visual_projection
        del vision
        tok = CLIPTokenizer.from_pretrained(clip_path, **kwargs)
        scorer = cls(text, proj, Retokenize(llm_tokenizer, tok)).eval().requires_grad_(False)
        return scorer.to(device=device, dtype=dtype)

    @classmethod
    def tiny(cls, vision_config, llm_vocab_size: int, proj_dim: int = 32, seed: int = 0, *,
             vocab_size: Optional[int] = None, hidden_size: int = 32, num_layers: int = 2,
             num_heads: int = 2) -> "ClipTextScorer":
        """A random tiny CLIP text model whose vocabulary takes LLM ids directly (id mod
        ``vocab_size``, default min(llm_vocab_size, 4096)), plus a random visual projection
        from ``vision_config.hidden_size``. Seeded; leaves the global RNG untouched."""
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection
        if vocab_size is None:
            vocab_size = min(int(llm_vocab_size), 4096)
        cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                             intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                             num_attention_heads=num_heads, max_position_embeddings=CLIP_MAX_TOKENS,
                             projection_dim=proj_dim, pad_token_id=0, bos_token_id=1, eos_token_id=3)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            text = CLIPTextModelWithProjection(cfg)
            proj = nn.Linear(vision_config.hidden_size, proj_dim, bias=False)
            nn.init.normal_(proj.weight, std=vision_config.hidden_size ** -0.5)
        return cls(text, proj, ModVocabIds(vocab_size)).eval().requires_grad_(False)


def clip_config(clip_path, **kwargs):
    """The config of a local two-tower CLIP checkpoint folder, after checking that the folder
    holds what :meth:`ClipTextScorer.from_pretrained` reads (config, weights, tokenizer files):
    FileNotFoundError / ValueError naming the folder otherwise (a missing folder would
    otherwise be taken for a hub repo id)."""
    import os

    from transformers import AutoConfig
    path = os.fspath(clip_path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"clip_path: {path}: no such folder (a local CLIP checkpoint folder "
                                "with both towers and its tokenizer is expected)")
    files = set(os.listdir(path))
    missing = []
    if "config.json" not in files:
        missing.append("config.json")
    if not any(f.endswith(".safetensors") for f in files) and "pytorch_model.bin" not in files:
        missing.append("weights (*.safetensors or pytorch_model.bin)")
    if "tokenizer.json" not in files and not {"vocab.json", "merges.txt"} <= files:
        missing.append("tokenizer (vocab.json + merges.txt, or tokenizer.json)")
    if missing:
        raise FileNotFoundError(f"clip_path: {path}: not a CLIP checkpoint folder, missing "
                                + "; ".join(missing))
    kwargs.setdefault("local_files_only", True)
    cfg = AutoConfig.from_pretrained(path, **kwargs)
    if getattr(cfg, "model_type", None) != "clip":
        raise ValueError(f"clip_path: {path} holds a {getattr(cfg, 'model_type', '?')!r} model, "
                         "not a CLIP checkpoint (text and vision towers)")
    return cfg


def _layer_norm_fp32(x: Tensor, ln: nn.Module) -> Tensor:
    w = getattr(ln, "weight", None)
    b = getattr(ln, "bias", None)
    return F.layer_norm(x.float(), ln.normalized_shape, None if w is None else w.float(),
                        None if b is None else b.float(), ln.eps)


# --------------------------------------------------------------------------- the method

_SCORER_HELP = ("scorer: TRIM needs a ClipTextScorer (CLIP text model + visual projection); make one "
                "with ClipTextScorer.from_pretrained(clip_path, llm_tokenizer) for a real checkpoint or "
                "ClipTextScorer.tiny(vision_config, llm_vocab_size, proj_dim, seed) offline, and pass "
                "scorer=... in the method's options")


def check_keep(keep) -> None:
    """keep: None, an int >= 0 or a float ratio in [0, 1] (N is checked when the method runs)."""
    if keep is None:
        return
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise ValueError(f"keep must be None, an int count or a float ratio, got {keep!r}")
    if isinstance(keep, numbers.Integral):
        if keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
    elif not (0.0 <= keep <= 1.0) or math.isnan(keep):
        raise ValueError(f"keep as a ratio must be in [0, 1], got {keep}")


def resolve_keep(keep, n: int) -> int:
    try:
        return ops.resolve_k(keep, n)
    except (TypeError, ValueError) as e:
        raise ValueError(f"keep: {e}") from None


def check_iqr_options(cfg) -> None:
    """whisker / pooled / max_k, shared by TRIM and PruMerge."""
    if isinstance(cfg.whisker, bool) or not isinstance(cfg.whisker, numbers.Real) \
            or not math.isfinite(cfg.whisker) or cfg.whisker < 0:
        raise ValueError(f"whisker must be a finite number >= 0, got {cfg.whisker!r}")
    if not isinstance(cfg.pooled, bool):
        raise ValueError(f"pooled must be a bool, got {cfg.pooled!r}")
    if cfg.max_k is not None:
        if isinstance(cfg.max_k, bool) or not isinstance(cfg.max_k, numbers.Integral) or cfg.max_k < 0:
            raise ValueError(f"max_k must be None or an int >= 0, got {cfg.max_k!r}")
        if cfg.keep is not None:
            raise ValueError("max_k caps the adaptive (IQR) budget only; it cannot be combined with keep")


def resolve_cap(max_k, n: int) -> int:
    if max_k is None:
        return n
    if max_k > n:
        raise ValueError(f"max_k must be <= N = {n}, got {max_k}")
    return int(max_k)


@dataclass
class TrimConfig(MethodConfig):
    """Options of TRIM.

    keep: None (default) = the adaptive IQR budget; an int count or a ratio of N = exactly that
        many top-scored tokens (plus the mean token).
    scorer: the :class:`ClipTextScorer` (required).
    sign: -1 (default, the published code: softmax of the negated similarity, keeps the least
        text-similar tokens) or +1 (keeps the most text-similar ones).
    pooled: True (default, reference parity) = one IQR fence over the whole batch and
        floor(outliers / B) tokens per image; False = a fence and a count per image.
    whisker: IQR whisker of the upper fence (1.5 in the paper).
    max_k: cap of the adaptive count and the slot count of the output (None = N); the output has
        max_k + 1 slots.
    """
    scorer: Optional[ClipTextScorer] = field(default=None, repr=False)
    sign: int = -1
    pooled: bool = True
    whisker: float = 1.5
    max_k: Optional[int] = None

    def validate(self) -> None:
        check_keep(self.keep)
        if self.scorer is None:
            raise ValueError(_SCORER_HELP)
        if not isinstance(self.scorer, ClipTextScorer):
            raise ValueError(f"scorer must be a ClipTextScorer, got {type(self.scorer).__name__}; " + _SCORER_HELP)
        if isinstance(self.sign, bool) or self.sign not in (-1, 1):
            raise ValueError(f"sign must be -1 (published: least text-similar) or +1, got {self.sign!r}")
        check_iqr_options(self)


class TrimResult(NamedTuple):
    features: Tensor            # [B, S, Dv]: kept tokens (spatial order), the mean token, padding
    valid: Optional[Tensor]     # [B, S] bool, None when every slot is valid (fixed keep)
    indices: Tensor             # [B, K] kept token indices, ascending; -1 past counts[b]
    counts: Tensor              # [B] int64 kept tokens per image (the mean token not counted)
    scores: Tensor              # [B, N] fp32 softmax scores


def trim_scores(ctx: VisionContext, cfg: TrimConfig) -> Tensor:
    """s = softmax(sign * (p . t)) over the N tokens, fp32 [B, N]."""
    scorer = cfg.scorer
    p = scorer.image_embeds(ctx.features, ctx.vision_model.post_layernorm)
    t = scorer.text_embeds(ctx.input_ids, ctx.attention_mask, ctx.image_token_id).to(p.device)
    sim = torch.bmm(p, t.unsqueeze(-1)).squeeze(-1)
    return (sim * float(cfg.sign)).softmax(dim=-1)


def trim_select(ctx: VisionContext, cfg: TrimConfig) -> TrimResult:
    """TRIM with the kept indices and counts exposed (the registered method drops them)."""
    if cfg.scorer is None:
        raise ValueError(_SCORER_HELP)
    feats = ctx.features
    b, n, _ = feats.shape
    scores = trim_scores(ctx, cfg)
    if cfg.keep is None:
        cap = resolve_cap(cfg.max_k, n)
        out = ops.compress(feats, scores, "iqr", merge="mean", whisker=float(cfg.whisker),
                           pooled=cfg.pooled, max_k=cap)
        valid = torch.arange(cap + 1, device=feats.device) <= out.counts[:, None]
        return TrimResult(out.tokens, valid, out.indices, out.counts, scores)
    k = resolve_keep(cfg.keep, n)
    out = ops.compress(feats, scores, k, merge="mean")
    counts = torch.full((b,), k, dtype=torch.int64, device=feats.device)
    return TrimResult(out.tokens, None, out.indices, counts, scores)


@register_method("trim", "vision", TrimConfig)
def trim(ctx: VisionContext, cfg: TrimConfig) -> VisionReduction:
    res = trim_select(ctx, cfg)
    return VisionReduction(res.features, res.valid)
