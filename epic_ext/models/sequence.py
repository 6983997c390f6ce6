"""Pure tensor steps of token reduction on a batched sequence: locate each row's image span,
rebuild the sequence around a selection (one row gather for hidden states, mask and positions
together), and compact the unused slots of adaptive budgets."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..methods.base import take_rows

def image_span(input_ids: Tensor, image_token_id: int, n_image: int) -> Tensor:
    """[B] index of each row's first image token. Each row must hold exactly one image of
    ``n_image`` contiguous tokens: checked on the device without a host sync."""
    is_img = input_ids == image_token_id
    start = is_img.int().argmax(dim=1)
    count = is_img.sum(dim=1)
    last = (start + n_image - 1).clamp(max=input_ids.shape[1] - 1)
    contiguous = is_img.gather(1, last[:, None]).squeeze(1)
    torch._assert_async(((count == n_image) & contiguous).all(),
                        "input_ids: every row needs exactly one image of image_seq_length contiguous image tokens")
    return start


def rebuild_index(start: Tensor, n_image: int, n_slots: int, length: int) -> tuple[Tensor, Tensor, Tensor]:
    """For a sequence of ``length`` whose image span [start, start + n_image) becomes ``n_slots``
    slots: the source position of every output position [B, L'], the slot number (or -1) of every
    output position, and L'. Text before and after the span keeps its order."""
    new_len = length - n_image + n_slots
    t = torch.arange(new_len, device=start.device)
    rel = t[None, :] - start[:, None]
    in_span = (rel >= 0) & (rel < n_slots)
    src = torch.where(rel >= n_slots, t + (n_image - n_slots), t).expand(start.shape[0], -1)
    slot = torch.where(in_span, rel, torch.full_like(rel, -1))
    return src, slot, new_len


def apply_selection(hidden: Tensor, mask: Tensor, position_ids: Tensor, start: Tensor, n_image: int,
                    sel_index: Tensor, sel_hidden: Optional[Tensor], sel_valid: Optional[Tensor],
                    renumber: bool):
    """Gather the reduced sequence: hidden [B, L', D], mask [B, L'] bool, position ids [B, L'],
    source index [B, L'] (-1 where a slot holds a new token) in one batched pass."""
    b, length, d = hidden.shape
    n_slots = sel_index.shape[1]
    src, slot, _ = rebuild_index(start, n_image, n_slots, length)
    new_hidden = None
    if n_slots > 0:
        # (With no slot, e.g. keep = 0, the image span simply vanishes: nothing to gather from.)
        slot_c = slot.clamp(min=0)
        in_span = slot >= 0
        src = torch.where(in_span, start[:, None] + sel_index.gather(1, slot_c), src)
        if sel_hidden is not None:
            repl = take_rows(sel_hidden.to(hidden.dtype), slot_c)
            new_hidden = torch.where(in_span[..., None], repl, take_rows(hidden, src))
    if new_hidden is None:
        new_hidden = take_rows(hidden, src)
    new_mask = mask.gather(1, src)
    if sel_valid is not None and n_slots > 0:
        new_mask = new_mask & torch.where(in_span, sel_valid.gather(1, slot_c), True)
    if renumber:
        # Before the LLM the methods' own code builds a shorter sequence: positions run on.
        first = position_ids.gather(1, mask.int().argmax(1, keepdim=True))
        new_pos = (new_mask.long().cumsum(1) - 1).clamp(min=0) + first
    else:
        new_pos = position_ids.gather(1, src)
    return new_hidden, new_mask, new_pos, src


def compact_slots(feats: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Move each row's valid slots to the front (order kept) and cut the slot axis to the
    largest valid count in the batch, so that an adaptive budget (TRIM, PruMerge) actually
    shortens the LLM's sequence. Sizing the output reads one scalar back to the host: the one
    sync of a reducing prefill, and only for adaptive budgets without a static ``max_k``."""
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
    n = int(valid.sum(1).max())
    order = order[:, :n]
    return take_rows(feats, order), valid.gather(1, order)


