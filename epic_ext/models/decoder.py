"""Running a Hugging Face decoder stack (``layers``, ``norm``, ``rotary_emb``: Llama, Qwen2,
Qwen2.5-VL / Qwen3-VL text models) over a batched :class:`Sequence`, a range of layers at a time,
dropping visual tokens at one layer. Shared by every model family.

Running ranges lets a caller compute a shared prefix once and continue it twice (the EPIC
trainer: teacher and student differ only from their compression layer on). Layer K-1's post-RoPE
query and keys, which FastV and DART rank with, are captured where the layer hands them to its
attention function (whatever it is: eager, SDPA, flash), so no projection is recomputed, no
family-specific RoPE or q/k norm is re-implemented, and no L x L attention is formed.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch
from torch import Tensor
from transformers.masking_utils import create_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from ..methods.base import LLMContext, LLMSelection
from .sequence import Slots, Spans, rebuild


@dataclass
class Sequence:
    """A batch on its way through the decoder."""
    hidden: Tensor                   # [B, T, D] current tokens
    mask: Tensor                     # [B, past + T] bool: keys this call's layers attend to (padding False)
    pos: Tensor                      # [B, T] int64 1-D position ids (the text positions of M-RoPE models)
    kept: Tensor                     # [B, T] original index of each row (-1: a token a vision method made, or padding)
    query_index: Tensor              # [B] last prompt token (the methods' ranking query)
    spans: Optional[Spans] = None    # visual units of the current tokens (None: no visual token in this call)
    rope_pos: Optional[Tensor] = None    # [3, B, T] M-RoPE (temporal, height, width) positions; None: 1-D RoPE on pos
    vis_id: Optional[Tensor] = None      # [B, T] flat index of a visual token in the vision output, else -1
    inject: Optional[list] = None        # per layer i: [V, D] features added to visual tokens after layer i (DeepStack)
    captured: dict = field(default_factory=dict)   # layer -> {"q": [B, H, 1, d], "k": [B, Hkv, T, d]} post-RoPE

    def detach(self) -> "Sequence":
        return replace(self, hidden=self.hidden.detach(), captured=dict(self.captured))


@dataclass(frozen=True)
class LayerReduction:
    """An in-LLM method applied just before decoder layer ``layer``."""
    spec: object
    cfg: object
    layer: int
    renumber: bool = True            # at layer 0, positions run on over the reduced sequence (LLaVA)


def text_modules(lm):
    return lm.layers[: lm.config.num_hidden_layers]


def _causal(lm, seq: Sequence, cache, layer_idx: int, mask: Optional[Tensor] = None):
    return create_causal_mask(config=lm.config, inputs_embeds=seq.hidden,
                              attention_mask=seq.mask if mask is None else mask,
                              past_key_values=cache, position_ids=seq.pos, layer_idx=layer_idx)


# --------------------------------------------------------------------------- q/k capture

_CAPTURE = "epic_ext_capture"


class _CaptureConfig:
    """Stands in for an attention module's config while it runs once: reports the capturing
    attention function ``name`` and forwards everything else to the real config."""

    def __init__(self, base, name: str = _CAPTURE):
        self.__dict__["_base"] = base
        self.__dict__["_attn_implementation"] = name

    def __getattr__(self, name):
        return getattr(self._base, name)


def _capturing_attention(module, query, key, value, attention_mask, **kwargs):
    store = module._epic_capture
    qi = store.pop("query_index")
    t = query.shape[2]
    store["q"] = query.detach().gather(2, qi.view(-1, 1, 1, 1).expand(-1, query.shape[1], 1, query.shape[3]))
    store["k"] = key.detach()[:, :, key.shape[2] - t:]
    store["scale"] = kwargs.get("scaling", getattr(module, "scaling", None))
    inner = module.config._base._attn_implementation
    eager = sys.modules[type(module).__module__].eager_attention_forward
    fn = ALL_ATTENTION_FUNCTIONS.get_interface(inner, eager) if inner != "eager" else eager
    return fn(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(_CAPTURE, _capturing_attention)


class _capture:
    """Context manager: layer ``layer`` hands its post-RoPE query row ``query_index`` and its
    keys to ``store`` while it runs."""

    def __init__(self, layer, store: dict, query_index: Tensor):
        self.attn, self.store, self.qi = layer.self_attn, store, query_index

    def __enter__(self):
        self.store["query_index"] = self.qi
        self.attn._epic_capture = self.store
        self.attn.config = _CaptureConfig(self.attn.config)

    def __exit__(self, *exc):
        self.attn.config = self.attn.config._base
        del self.attn._epic_capture
        self.store.pop("query_index", None)


# --------------------------------------------------------------------------- reduction

def llm_context(lm, seq: Sequence, layer: int, units: list[int], visual_mask: Optional[Tensor]) -> LLMContext:
    """The context an in-LLM method sees before decoder ``layer`` for the units ``units`` (one
    grid): layer-1's post-RoPE keys and the query row of the last prompt token."""
    spans = seq.spans
    length = seq.hidden.shape[1]
    cap = seq.captured.get(layer - 1) if layer >= 1 else None
    keys = query = scale = None
    if cap is not None and "k" in cap:
        keys, query, scale = cap["k"], cap["q"], cap["scale"]
    row_t, start_t = spans.of_units(units)
    identity = [spans.row[u] for u in units] == list(range(seq.hidden.shape[0]))
    h, w = spans.grid[units[0]]
    return LLMContext(hidden=seq.hidden, image_start=start_t, num_image_tokens=h * w,
                      grid=(h, w), attention_mask=seq.mask[:, -length:], query_index=seq.query_index, keys=keys,
                      query=query, scale=scale, final_norm=lm.norm,
                      span_row=None if identity else row_t,
                      visual_mask=visual_mask, kind=spans.kind[units[0]])


def select_units(seq: Sequence, select: Callable[[list[int], Optional[Tensor]], LLMSelection]) -> Slots:
    """Call ``select(units, visual_mask)`` once per group of same-grid units of ``seq.spans``
    (``visual_mask``: [B, L] of every visual token, given when a row holds several units); the
    slots of every unit (flat in group order, each unit's offset recorded)."""
    spans = seq.spans
    b, length = seq.hidden.shape[:2]
    dev = seq.hidden.device
    several = len(set(spans.row)) < len(spans)
    visual_mask = spans.visual_mask(b, length) if several else None
    count, offset = [0] * len(spans), [0] * len(spans)
    srcs, hiddens, at = [], [], 0
    for units in spans.buckets():
        sel = select(units, visual_mask)
        k = int(sel.index.shape[1])
        for j, u in enumerate(units):
            count[u], offset[u] = k, at + j * k
        at += len(units) * k
        row_t, start_t = spans.of_units(units)
        src = start_t[:, None] + sel.index                                                # [S, k] in the row
        srcs.append(src.reshape(-1))
        hiddens.append((sel.hidden, row_t[:, None] * length + src))
    hidden = None
    if any(h is not None for h, _ in hiddens):
        # Groups whose method keeps tokens as they are take their own rows.
        flat_hidden = seq.hidden.reshape(b * length, -1)
        hidden = torch.cat([h.reshape(-1, h.shape[-1]) if h is not None else flat_hidden.index_select(0, f.reshape(-1))
                            for h, f in hiddens])
    return Slots(count=count, offset=offset, src=torch.cat(srcs) if srcs else torch.zeros(0, dtype=torch.long,
                                                                                            device=dev),
                 hidden=hidden)


def reduce_sequence(lm, seq: Sequence, red: LayerReduction) -> Sequence:
    """Apply an in-LLM method to ``seq`` (the input of decoder layer ``red.layer``)."""
    length = seq.hidden.shape[1]
    if seq.spans is None or len(seq.spans) == 0:
        return replace(seq, captured={})
    slots = select_units(seq, lambda units, vm: red.spec.fn(llm_context(lm, seq, red.layer, units, vm), red.cfg))
    cur_mask = seq.mask[:, -length:]
    hidden, mask, pos, rope_pos, kept, vis_id, _ = rebuild(
        seq.hidden, cur_mask, seq.pos, seq.rope_pos, seq.kept, seq.vis_id, seq.spans, slots,
        renumber=(red.layer == 0 and red.renumber))
    past = seq.mask[:, :-length] if seq.mask.shape[1] > length else seq.mask[:, :0]
    return replace(seq, hidden=hidden, mask=torch.cat([past, mask], 1), pos=pos, rope_pos=rope_pos, kept=kept,
                   vis_id=vis_id, spans=None, captured={})


def _inject(seq: Sequence, features: Tensor) -> Tensor:
    """hidden + features[vis_id] on visual tokens (DeepStack), out of place."""
    vis = seq.vis_id
    b, t, d = seq.hidden.shape
    add = features.to(seq.hidden.dtype).index_select(0, vis.clamp(min=0).reshape(-1)).view(b, t, d)
    return seq.hidden + add * (vis >= 0)[..., None].to(seq.hidden.dtype)


def run_layers(lm, seq: Sequence, lo: int, hi: int, *, reduction: Optional[LayerReduction] = None,
               cache=None, use_cache: bool = False, capture: tuple[int, ...] = (),
               mask_switch: Optional[tuple[int, Tensor]] = None, **layer_kwargs) -> Sequence:
    """Decoder layers [lo, hi) over ``seq``. ``reduction`` drops tokens before its layer (when in
    range); layer reduction.layer-1 and the layers in ``capture`` keep their post-RoPE query row
    and keys in ``seq.captured``. ``mask_switch=(i, mask)``: from layer i on, attend with ``mask``
    (decoding after a reduced prefill: the layers from K on cache only the kept tokens). Visual
    features of ``seq.inject`` are added after their layer, following the tokens still present."""
    layers = text_modules(lm)
    red_at = reduction.layer if reduction is not None and lo <= reduction.layer < hi else None
    want = set(capture) | ({reduction.layer - 1} if reduction is not None else set())

    def mask_at(i):
        return mask_switch[1] if mask_switch is not None and i >= mask_switch[0] else None

    def rotary(s: Sequence):
        return lm.rotary_emb(s.hidden, s.rope_pos if s.rope_pos is not None else s.pos)

    pos_emb = rotary(seq)
    causal = _causal(lm, seq, cache, lo, mask_at(lo))
    seq = replace(seq, captured=dict(seq.captured))
    for i in range(lo, hi):
        if i == red_at:
            seq = reduce_sequence(lm, seq, reduction)
            pos_emb = rotary(seq)
            causal = _causal(lm, seq, cache, i)
        elif mask_switch is not None and i == mask_switch[0] and i > lo:
            causal = _causal(lm, seq, cache, i, mask_switch[1])
        kwargs = dict(attention_mask=causal, position_embeddings=pos_emb, position_ids=seq.pos,
                      past_key_values=cache, use_cache=use_cache, **layer_kwargs)
        if i in want:
            seq.captured[i] = {}
            with _capture(layers[i], seq.captured[i], seq.query_index):
                hidden = layers[i](seq.hidden, **kwargs)
        else:
            hidden = layers[i](seq.hidden, **kwargs)
        seq = replace(seq, hidden=hidden)
        if seq.inject is not None and i < len(seq.inject) and seq.vis_id is not None:
            seq = replace(seq, hidden=_inject(seq, seq.inject[i]))
    return seq
