"""Pure tensor steps of token reduction on a batched sequence, shared by every model family.

A prompt batch holds a ragged set of visual *units* (:class:`Spans`): each image, and each
temporal patch group of a video, is one unit of ``h x w`` tokens sitting contiguously at
``start`` of its row; a row holds zero, one or many units, of different sizes. A reduction maps
every unit to some *slots* (kept tokens, replacement tokens, or new tokens made before the LLM),
and :func:`rebuild` gathers the shorter sequence (hidden states, mask, 1-D and M-RoPE positions,
origins, visual ids) in one batched pass. The layout of the new sequence depends only on counts,
which the host knows, so it is planned on the host and applied on the device.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from ..methods.base import take_rows


@dataclass
class Spans:
    """The visual units of a batch, in prompt order (row by row, left to right).

    Host lists (the layout of the reduced sequence is planned from them without a device sync);
    ``row_t`` / ``start_t`` are the same on the device. ``media`` numbers the images and videos
    of the batch (the frame groups of one video share it), ``frame`` is the group within a
    video (0 for an image)."""
    row: list[int]
    start: list[int]
    grid: list[tuple[int, int]]          # (h, w) of each unit; its length is h * w
    kind: list[str]                      # "image" or "video"
    media: list[int]
    frame: list[int]
    device: torch.device = torch.device("cpu")
    real: Optional[Tensor] = None        # host [B, L] bool of the real tokens: the rebuild drops padding
    row_t: Tensor = field(init=False, repr=False)
    start_t: Tensor = field(init=False, repr=False)

    def __post_init__(self):
        self.row_t = torch.tensor(self.row, dtype=torch.long).to(self.device, non_blocking=True)
        self.start_t = torch.tensor(self.start, dtype=torch.long).to(self.device, non_blocking=True)

    def __len__(self) -> int:
        return len(self.row)

    @property
    def length(self) -> list[int]:
        return [h * w for h, w in self.grid]

    def of_units(self, units: list[int]) -> tuple[Tensor, Tensor]:
        """(row [S], start [S]) device tensors of ``units`` (one host-to-device copy per group,
        cached: the method's context and the slot gather both read them)."""
        key = tuple(units)
        cache = self.__dict__.setdefault("_of_units", {})
        if key not in cache:
            idx = torch.tensor(units, dtype=torch.long).to(self.device, non_blocking=True)
            cache[key] = (self.row_t.index_select(0, idx), self.start_t.index_select(0, idx))
        return cache[key]

    def buckets(self) -> list[list[int]]:
        """Unit numbers grouped by grid (then kind): one batched method call per group."""
        groups: dict[tuple, list[int]] = {}
        for i, (g, k) in enumerate(zip(self.grid, self.kind)):
            groups.setdefault((g, k), []).append(i)
        return list(groups.values())

    def visual_mask(self, batch: int, length: int) -> Tensor:
        """[B, L] bool, True on every visual token."""
        m = torch.zeros(batch, length, dtype=torch.bool)
        for r, s, n in zip(self.row, self.start, self.length):
            m[r, s:s + n] = True
        return m.to(self.device, non_blocking=True)

    def visual_ids(self, batch: int, length: int) -> Tensor:
        """[B, L] int64: the index of each visual token in the batch's flat visual features (the
        order of the units, row-major inside a unit), -1 on text."""
        ids = torch.full((batch, length), -1, dtype=torch.long)
        offset = 0
        for r, s, n in zip(self.row, self.start, self.length):
            ids[r, s:s + n] = torch.arange(offset, offset + n)
            offset += n
        return ids.to(self.device, non_blocking=True)


def locate_units(input_ids: Tensor, units: list[tuple[str, int, tuple[int, int]]], token_ids: dict[str, int],
                 argument: str | dict[str, str], attention_mask: Optional[Tensor] = None) -> Spans:
    """Find each unit of ``units`` (kind, media number, (h, w)), in prompt order, in
    ``input_ids``: units are matched to the runs of their kind's placeholder token, row by row;
    a run longer than a unit holds several consecutive units (LLaVA's adjacent images, a video's
    frame groups). Reads the placeholder layout (and ``attention_mask``, whose padding a rebuild then
    drops) back to the host once. Raises ValueError naming
    ``argument`` (or ``argument[kind]``, the input that describes that kind) when the placeholders
    and the units disagree."""
    ids = input_ids.detach().cpu()
    b = ids.shape[0]
    kinds = sorted(token_ids)
    pending = {k: [u for u in units if u[0] == k] for k in kinds}
    taken = {k: 0 for k in kinds}
    rows, starts, grids, kind_l, media, frames = [], [], [], [], [], []
    frame_of: dict[tuple[str, int], int] = {}
    found = []
    name = {k: argument[k] if isinstance(argument, dict) else argument for k in kinds}
    for r in range(b):
        for k in kinds:
            is_k = ids[r] == token_ids[k]
            if not bool(is_k.any()):
                continue
            pos = is_k.nonzero().flatten()
            breaks = (pos[1:] != pos[:-1] + 1).nonzero().flatten() + 1
            bounds = [0] + breaks.tolist() + [len(pos)]
            for a, e in zip(bounds[:-1], bounds[1:]):
                at, left = int(pos[a]), e - a
                while left > 0:
                    if taken[k] >= len(pending[k]):
                        raise ValueError(f"{name[k]}: input_ids hold more {k} placeholder tokens than the "
                                         f"{k}s given describe (row {r})")
                    _, m, (h, w) = pending[k][taken[k]]
                    n = h * w
                    if n > left:
                        raise ValueError(f"{name[k]}: {k} {m} needs {n} placeholder tokens ({h}x{w}) but row {r} "
                                         f"has a run of {left} at position {at}")
                    found.append((r, at, (h, w), k, m))
                    taken[k] += 1
                    at += n
                    left -= n
    for k in kinds:
        if taken[k] != len(pending[k]):
            raise ValueError(f"{name[k]}: {len(pending[k])} {k} units given but input_ids hold placeholders "
                             f"for {taken[k]}")
    found.sort(key=lambda u: (u[0], u[1]))
    for r, at, g, k, m in found:
        rows.append(r)
        starts.append(at)
        grids.append(g)
        kind_l.append(k)
        media.append(m)
        frames.append(frame_of.get((k, m), 0))
        frame_of[(k, m)] = frame_of.get((k, m), 0) + 1
    real = None if attention_mask is None else attention_mask[:, -ids.shape[1]:].detach().bool().cpu()
    return Spans(rows, starts, grids, kind_l, media, frames, device=input_ids.device, real=real)


@dataclass
class Slots:
    """What replaces each unit, for ``rebuild``: per unit (host) its slot count and the offset of
    its slots in the flat arrays; flat over all slots, the row position each slot comes from
    (a made token: its unit's first position, for the mask and positions), optional replacement
    hidden states, made flags and validity."""
    count: list[int]                     # slots of each unit
    offset: list[int]                    # first flat slot of each unit
    src: Tensor                          # [total] int64 source position in the unit's row
    hidden: Optional[Tensor] = None      # [total, D] replacement hidden states (None: gather the kept ones)
    made: Optional[Tensor] = None        # [total] bool, a token that no input position holds (None: none)
    valid: Optional[Tensor] = None       # [total] bool (None: all valid)


def plan_layout(spans: Spans, count: list[int], offset: list[int], batch: int, length: int):
    """Host plan of the rebuilt sequence. Per output position: the source position of a text
    token (or -1), the flat slot number of a unit's slot (or -1), and whether it is padding the
    rebuild adds. The input's own padding is dropped when ``spans.real`` is known and that
    shortens the batch (else the layout keeps it, so keeping every token is the identity);
    shorter rows are padded on the left, so each row's last token stays last."""
    per_row: list[list[tuple[int, int, int, int]]] = [[] for _ in range(batch)]
    for u, (r, s, n) in enumerate(zip(spans.row, spans.start, spans.length)):
        per_row[r].append((s, n, offset[u], count[u]))
    pieces_src, pieces_slot, lens = [], [], []
    drop = spans.real is not None
    if drop:
        kept_len = max(length - sum(n - c for _, n, _, c in per_row[r]) for r in range(batch))
        drop = max(int(spans.real[r].sum()) - sum(n - c for _, n, _, c in per_row[r])
                   for r in range(batch)) < kept_len

    def text(r, a, e):
        t = torch.arange(a, e)
        return t[spans.real[r, a:e]] if drop else t

    for r in range(batch):
        src, slot, at = [], [], 0
        for s, n, off, c in per_row[r]:
            src.append(text(r, at, s))
            slot.append(torch.full((len(src[-1]),), -1, dtype=torch.long))
            src.append(torch.full((c,), -1, dtype=torch.long))
            slot.append(torch.arange(off, off + c))
            at = s + n
        src.append(text(r, at, length))
        slot.append(torch.full((len(src[-1]),), -1, dtype=torch.long))
        src_r, slot_r = torch.cat(src), torch.cat(slot)
        pieces_src.append(src_r)
        pieces_slot.append(slot_r)
        lens.append(len(src_r))
    new_len = max(lens) if lens else length
    text_src = torch.full((batch, new_len), -1, dtype=torch.long)
    slot = torch.full((batch, new_len), -1, dtype=torch.long)
    for r in range(batch):
        text_src[r, new_len - lens[r]:] = pieces_src[r]
        slot[r, new_len - lens[r]:] = pieces_slot[r]
    pad = (text_src < 0) & (slot < 0)
    return text_src, slot, pad, new_len


def rebuild(hidden: Tensor, mask: Tensor, pos: Tensor, rope_pos: Optional[Tensor], kept: Tensor,
            vis_id: Optional[Tensor], spans: Spans, slots: Slots, renumber: bool):
    """The reduced sequence: (hidden [B, L', D], mask [B, L'] bool, pos [B, L'], rope_pos
    [3, B, L'] or None, kept [B, L'], vis_id [B, L'] or None, src [B, L'] source positions).
    ``kept`` / ``vis_id`` of a made or added-padding token are -1. ``renumber``: 1-D positions
    run on over the new sequence (LLaVA before the LLM); else every token keeps its own."""
    b, length, d = hidden.shape
    dev = hidden.device
    text_src, slot, pad, new_len = plan_layout(spans, slots.count, slots.offset, b, length)
    text_src, slot, pad = (t.to(dev, non_blocking=True) for t in (text_src, slot, pad))
    in_slot = slot >= 0
    slot_c = slot.clamp(min=0)
    any_slot = slots.src.numel() > 0
    src = torch.where(in_slot, slots.src[slot_c], text_src.clamp(min=0)) if any_slot else text_src.clamp(min=0)
    made = in_slot & slots.made[slot_c] if (any_slot and slots.made is not None) else torch.zeros_like(in_slot)
    new_hidden = take_rows(hidden, src)
    if slots.hidden is not None and any_slot:
        new_hidden = torch.where(in_slot[..., None], slots.hidden.to(hidden.dtype)[slot_c], new_hidden)
    new_mask = mask.gather(1, src) & ~pad
    if slots.valid is not None and any_slot:
        new_mask = new_mask & torch.where(in_slot, slots.valid[slot_c], True)
    gone = made | pad
    new_kept = torch.where(gone, -1, kept.gather(1, src))
    new_vis = None if vis_id is None else torch.where(gone, -1, vis_id.gather(1, src))
    if renumber:
        # Before the LLM the methods' own LLaVA code builds a shorter sequence: positions run on.
        first = pos.gather(1, mask.int().argmax(1, keepdim=True))
        new_pos = (new_mask.long().cumsum(1) - 1).clamp(min=0) + first
    else:
        new_pos = pos.gather(1, src)
    new_rope = None if rope_pos is None else rope_pos.gather(2, src[None].expand(rope_pos.shape[0], -1, -1))
    return new_hidden, new_mask, new_pos, new_rope, new_kept, new_vis, src


def image_span(input_ids: Tensor, image_token_id: int, n_image: int) -> Tensor:
    """[B] index of each row's first image token, for batches of exactly one image of
    ``n_image`` contiguous tokens per row (checked on the device without a host sync)."""
    is_img = input_ids == image_token_id
    start = is_img.int().argmax(dim=1)
    count = is_img.sum(dim=1)
    last = (start + n_image - 1).clamp(max=input_ids.shape[1] - 1)
    contiguous = is_img.gather(1, last[:, None]).squeeze(1)
    torch._assert_async(((count == n_image) & contiguous).all(),
                        "input_ids: every row needs exactly one image of image_seq_length contiguous image tokens")
    return start


def compact_slots(feats: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Move each row's valid slots to the front (order kept) and cut the slot axis to the
    largest valid count in the batch, so that an adaptive budget (TRIM, PruMerge) actually
    shortens the LLM's sequence. Sizing the output reads one scalar back to the host: the one
    sync of a reducing prefill, and only for adaptive budgets without a static ``max_k``."""
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
    n = int(valid.sum(1).max())
    order = order[:, :n]
    return take_rows(feats, order), valid.gather(1, order)
