"""The adapter contract: what differs between model families, and nothing else.

One adapter per family (``epic_ext/models/<family>.py``), registered for its
``config.model_type`` values. The shared code (``forward.py``, ``decoder.py``, ``sequence.py``)
does everything else: the method registry, the in-LLM gather of hidden states / positions /
rotary / mask at layer K, the per-layer KV cache and its decode masks, the cost model, ``infer``
and the EPIC step. An adapter provides:

* ``check(model, spec)``: reject at ``apply`` what its forward cannot run (the wrong class, a
  vision method without a rule for this encoder, ...).
* ``language_model(model)``: the decoder stack (``layers``, ``norm``, ``rotary_emb``) whose
  layers are called as ``layer(hidden, attention_mask=, position_embeddings=, position_ids=,
  past_key_values=, use_cache=)``; ``lm_head(model)``.
* ``embed(model, prompt, red)``: the prefill's (or a decode step's) :class:`Sequence`: token
  embeddings with every image's and video's features in place, the visual units
  (:class:`Spans`: where each image / video frame group sits, ragged per row), 1-D positions and,
  for M-RoPE models, the 3-D ``rope_pos``; per-layer visual injections (DeepStack) as
  ``inject`` + ``vis_id``; a vision-stage method already applied (its slots rebuilt in).
* ``placeholder_ids(model)``: the placeholder token of each visual kind; ``units(model, media)``:
  the units the visual inputs describe (``locate`` finds them in ``input_ids``).
* ``decode_rope(model, seq, cached, given)``: rope positions of decode tokens (M-RoPE: text position +
  the prompt's rope delta); None for 1-D RoPE.
* ``media_keys``: the forward's keyword arguments that carry visual inputs; ``renumber``: whether
  a reduction before the LLM renumbers the 1-D positions (LLaVA's published ports) or every
  token keeps its own (M-RoPE ports keep the original grid positions).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import Tensor


@dataclass
class Prompt:
    """One forward call's inputs, normalised by the shared forward."""
    input_ids: Optional[Tensor]          # [B, T] (None when inputs_embeds are given)
    inputs_embeds: Optional[Tensor]      # [B, T, D] or None
    attention_mask: Tensor               # [B, past + T] bool
    position_ids: Tensor                 # [B, T] 1-D (text) positions
    given_positions: Optional[Tensor]    # the caller's position_ids as passed (M-RoPE: [3 or 4, B, T])
    query_index: Tensor                  # [B] last prompt token of each row
    media: dict = field(default_factory=dict)   # the family's visual inputs (adapter.media_keys)
    rope_delta: Optional[Tensor] = None  # [B, 1] set by an M-RoPE adapter's embed, kept for decoding

    @property
    def has_media(self) -> bool:
        return any(v is not None for v in self.media.values())


class Adapter:
    """Base of the family adapters (see the module notes)."""
    model_types: tuple[str, ...] = ()
    media_keys: tuple[str, ...] = ("pixel_values",)
    renumber: bool = True
    output_cls = None

    def check(self, model, spec) -> None:
        raise NotImplementedError

    def unit_tokens(self, model) -> Optional[int]:
        """Tokens of every visual unit when the family fixes it (LLaVA-1.5: 576), else None."""
        return None

    def language_model(self, model):
        return model.model.language_model

    def lm_head(self, model):
        return model.lm_head

    def vocab_size(self, model) -> int:
        return model.config.text_config.vocab_size

    def embed(self, model, prompt: Prompt, red):
        raise NotImplementedError

    def text_sequence(self, model, prompt: Prompt):
        """The prompt's token embeddings as a :class:`Sequence` (every row its own origin), the
        start of every family's ``embed``."""
        import torch

        from .decoder import Sequence
        emb = prompt.inputs_embeds
        if emb is None:
            emb = model.model.get_input_embeddings()(prompt.input_ids)
        b, length = emb.shape[:2]
        kept = torch.arange(length, device=emb.device)[None].expand(b, -1)
        return Sequence(hidden=emb, mask=prompt.attention_mask, pos=prompt.position_ids, kept=kept,
                        query_index=prompt.query_index)

    # The argument a placeholder/unit mismatch is reported against, per visual kind.
    unit_arguments: dict = {"image": "pixel_values"}

    def units(self, model, media: dict) -> list:
        """The visual units the inputs describe, in prompt order per kind: (kind, media number,
        (h, w) token grid), a video contributing one per temporal patch group."""
        raise NotImplementedError

    def locate(self, model, input_ids: Tensor, attention_mask: Tensor, media: dict):
        """The :class:`Spans` of a prompt batch (ValueError naming the argument on a mismatch)."""
        from .sequence import locate_units
        return locate_units(input_ids, self.units(model, media), self.placeholder_ids(model), self.unit_arguments,
                            attention_mask)

    def placeholder_ids(self, model) -> dict[str, int]:
        """Token id of each visual kind's placeholder, e.g. {"image": id}."""
        raise NotImplementedError

    def has_placeholders(self, model, input_ids: Tensor) -> bool:
        return any(bool((input_ids == t).any()) for t in self.placeholder_ids(model).values())

    def decode_rope(self, model, seq, cached, given: Optional[Tensor]) -> Optional[Tensor]:
        return None
