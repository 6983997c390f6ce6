"""Inference with a token-reduction method and an honest efficiency report.

    reports = epic_ext.infer(model, inputs, method="dart", keep=64, layer=2, max_new_tokens=16)
    for r in reports: print(r.answer_ids, r.kv_bytes, r.prefill_ms, r.decode_ms_per_token)

``inputs`` are a processor's outputs for any family ``apply`` supports (LLaVA: ``pixel_values``;
Qwen-VL: ``pixel_values`` / ``image_grid_thw`` and ``pixel_values_videos`` / ``video_grid_thw``,
several images and videos per row, text-only rows in the batch). The decode loop is written out
(no ``generate``) so prefill and per-token decode time are measured separately; its tokens equal
``generate``'s (greedy, or sampled with the same seed; the generation config's EOS ids and
suppressed tokens are honoured, its other logits processors, e.g. a repetition penalty, are not).
Per request it reports its visual units, visual tokens per layer, KV-cache bytes per layer
(layers below K hold every prompt token; the kept count is read from the cache) and prefill
FLOPs from :func:`epic_ext.cost.request_cost`.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

import torch

from .cost import VisualUnit, request_cost


@dataclass
class RequestReport:
    answer_ids: list[int]
    answer: Optional[str]
    prompt_tokens: int                      # real (unpadded) prompt tokens, image included
    visual_tokens_per_layer: list[int]
    kv_bytes_per_layer: list[int]
    kv_bytes: int
    prefill_flops: float
    prefill_ms: float                       # for the whole batch this request ran in
    decode_ms_per_token: float
    batch_size: int
    method: str
    extra: dict = field(default_factory=dict)
    # per visual unit (image / video frame group): kind, grid (h, w), tokens, kept (None when the
    # method's budget is adaptive: only the request's total is known, from the cache)
    units: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def default_dtype(device, *, checkpoint: bool) -> torch.dtype:
    """The dtype `epic-ext infer` loads a model in without --dtype: float32 on a CPU (bf16 matmuls
    are several times slower on CPUs without bf16 units: a LLaVA-1.5-7B prefill took 66.6 s in
    bf16 against 12-18 s in fp32), bfloat16 for a checkpoint on a GPU, float32 for the tiny presets."""
    if torch.device(device).type == "cpu" or not checkpoint:
        return torch.float32
    return torch.bfloat16


def default_warmup(device) -> int:
    """Untimed runs before the timed one: none on a CPU (a warm-up repeats the whole prefill and
    CPU timings need none), one on a GPU (CUDA context, library handles, allocator)."""
    return 0 if torch.device(device).type == "cpu" else 1


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: Optional[int], gen,
          suppress: Optional[torch.Tensor] = None) -> torch.Tensor:
    if suppress is not None:
        logits = logits.index_fill(-1, suppress, float("-inf"))
    if not do_sample:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / max(temperature, 1e-5)
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen)


def _eos_ids(model, eos_token_id) -> list[int]:
    """The ids that end an answer: ``eos_token_id`` (an int or a list) when given, else the
    generation config's (Qwen lists two), else the text config's."""
    if eos_token_id is None:
        gen_cfg = getattr(model, "generation_config", None)
        eos_token_id = getattr(gen_cfg, "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = model.config.text_config.eos_token_id
    if eos_token_id is None:
        return []
    return [int(e) for e in eos_token_id] if isinstance(eos_token_id, (list, tuple)) else [int(eos_token_id)]


def answer_ids(row: torch.Tensor, eos: list) -> list[int]:
    """A generated row's token ids up to (not including) its first end-of-sequence token."""
    ids = row.tolist()
    stop = next((i for i, t in enumerate(ids) if t in eos), len(ids))
    return ids[:stop]


@torch.no_grad()
def generate_timed(model, input_ids, pixel_values, attention_mask=None, *, media: Optional[dict] = None,
                   max_new_tokens: int = 16, do_sample: bool = False, temperature: float = 1.0,
                   top_k: Optional[int] = None, eos_token_id=None, seed: int = 0):
    """Prefill + cached decode. ``media``: the family's other visual inputs (Qwen-VL: grids,
    video pixels, ...); ``pixel_values`` may be None for a video-only batch. ``eos_token_id``:
    an id or a list (None: the model's generation config). Returns (new_ids [B, T], cache,
    prefill_s, decode_s, steps)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    mask = attention_mask.long()
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    gen = torch.Generator(device=device).manual_seed(seed) if do_sample else None
    eos = _eos_ids(model, eos_token_id)
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    suppressed = getattr(getattr(model, "generation_config", None), "suppress_tokens", None)
    suppress = torch.tensor(suppressed, dtype=torch.long, device=device) if suppressed else None
    media = {k: v for k, v in (media or {}).items() if v is not None}
    if pixel_values is not None:
        media["pixel_values"] = pixel_values

    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                **media)
    nxt = _pick(out.logits[:, -1], do_sample, temperature, top_k, gen, suppress)
    _sync(device)
    prefill_s = time.perf_counter() - t0

    cache, tokens = out.past_key_values, [nxt]
    done = torch.isin(nxt.squeeze(1), eos_t)
    t0 = time.perf_counter()
    for _ in range(max_new_tokens - 1):
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
        nxt = _pick(out.logits[:, -1], do_sample, temperature, top_k, gen, suppress)
        if eos:
            nxt = torch.where(done[:, None], torch.full_like(nxt, eos[0]), nxt)
        tokens.append(nxt)
        done = done | torch.isin(nxt.squeeze(1), eos_t)
        if eos and bool(done.all()):
            break
    _sync(device)
    decode_s = time.perf_counter() - t0
    return torch.cat(tokens, dim=1), cache, prefill_s, decode_s, len(tokens) - 1


def request_units(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, media: dict) -> list[list[VisualUnit]]:
    """Per row, its visual units in prompt order (nothing reduced yet), located in ``input_ids``
    as the adapter's forward locates them (so a mismatch raises the same ValueError, before the
    model runs)."""
    from .models import adapter_of
    spans = adapter_of(model).locate(model, input_ids, attention_mask, media)
    rows: list[list[VisualUnit]] = [[] for _ in range(input_ids.shape[0])]
    for r, (h, w), kind in zip(spans.row, spans.grid, spans.kind):
        rows[r].append(VisualUnit(tokens=h * w, grid=(h, w), kind=kind))
    return rows


def _budgeted(units: list[VisualUnit], spec, cfg, measured: int) -> list[VisualUnit]:
    """``units`` with each one's kept count where the method's budget fixes it per unit and
    the cache's total agrees; unchanged (kept None) otherwise (adaptive budgets)."""
    try:
        kept = [u.tokens if spec.name == "none" else cfg.resolved_keep(u.tokens) for u in units]
    except (ValueError, TypeError, AttributeError):
        return units
    if sum(kept) != measured:
        return units
    return [replace(u, kept=k) for u, k in zip(units, kept)]


def infer(model, inputs: dict, *, method: Optional[str] = None, keep=None, processor=None,
          max_new_tokens: int = 16, do_sample: bool = False, temperature: float = 1.0,
          top_k: Optional[int] = None, seed: int = 0, **method_options) -> list[RequestReport]:
    """Run ``model`` on a batch (``inputs``: input_ids, attention_mask and the family's visual
    inputs, e.g. a processor's output) with ``method`` applied for this call (None: the model as
    it is), and report per request. ``processor.decode`` turns answers into text when given."""
    from .models import adapter_of, applied_method, apply, revert

    adapter = adapter_of(model)
    if "input_ids" not in inputs:
        raise ValueError("inputs: missing 'input_ids'")
    pixel_keys = [k for k in adapter.media_keys if k.startswith("pixel_values")]
    if not any(inputs.get(k) is not None for k in pixel_keys):
        raise ValueError(f"inputs: missing {' or '.join(repr(k) for k in pixel_keys)} (no image or video)")
    device = next(model.parameters()).device
    input_ids = inputs["input_ids"].to(device)
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else mask.to(device)
    media = {}
    for key in adapter.media_keys:
        value = inputs.get(key)
        if isinstance(value, torch.Tensor):
            value = value.to(device=device, dtype=model.dtype if value.is_floating_point() else value.dtype)
        if value is not None:
            media[key] = value
    rows = request_units(model, input_ids, mask.bool(), media)

    previous = applied_method(model)
    if method is not None:
        apply(model, method, keep=keep, **method_options)
    elif previous is None:
        apply(model, "none")        # the same code path, so the report's accounting holds
    try:
        new_ids, cache, prefill_s, decode_s, steps = generate_timed(
            model, input_ids, media.pop("pixel_values", None), mask, media=media, max_new_tokens=max_new_tokens,
            do_sample=do_sample, temperature=temperature, top_k=top_k, seed=seed)
        spec, cfg = applied_method(model)
    finally:
        if previous is None:
            revert(model)
        elif method is not None:
            apply(model, previous[0].name, **vars(previous[1]))

    n_layers = len(cache.layers)
    real = mask.sum(1).tolist()
    cached = getattr(cache, "_epic", None)
    # What layers >= K hold of each row's prompt (its kept tokens), from the cache itself.
    kept_real = cached.mask.sum(1).tolist() if cached is not None else real
    layer = cached.layer if cached is not None else n_layers - 1
    eos = _eos_ids(model, None)
    bytes_per = torch.finfo(model.dtype).bits // 8
    reports = []
    for b, units in enumerate(rows):
        ids = answer_ids(new_ids[b], eos)
        visual = sum(u.tokens for u in units)
        text = int(real[b]) - visual
        kept_visual = int(kept_real[b]) - text if cached is not None else visual
        units = _budgeted(units, spec, cfg, kept_visual)
        cost = request_cost(model.config, text, units, layer, kept_visual=kept_visual, bytes_per_element=bytes_per,
                            new_tokens=len(ids))
        reports.append(RequestReport(
            answer_ids=ids, answer=processor.decode(ids) if processor is not None and hasattr(processor, "decode")
            else None,
            prompt_tokens=int(real[b]), visual_tokens_per_layer=cost.visual_tokens_per_layer,
            kv_bytes_per_layer=cost.kv_bytes_per_layer, kv_bytes=cost.kv_bytes, prefill_flops=cost.flops,
            prefill_ms=prefill_s * 1e3, decode_ms_per_token=decode_s * 1e3 / max(steps, 1),
            batch_size=int(input_ids.shape[0]), method=spec.name,
            extra={"layer": layer, "flops_vision": cost.flops_vision, "flops_llm": cost.flops_llm,
                   "text_tokens": text},
            units=[{"kind": u.kind, "grid": list(u.grid), "tokens": u.tokens, "kept": u.kept} for u in units]))
    return reports


def _units_line(units: list[dict]) -> str:
    """'2 images (4x4, 2x2), 1 video of 2 frame groups (2x3)': runs of equal units folded."""
    parts, i = [], 0
    while i < len(units):
        j = i
        while j + 1 < len(units) and units[j + 1]["kind"] == units[i]["kind"] and units[i]["kind"] == "video" \
                and units[j + 1]["grid"] == units[i]["grid"]:
            j += 1
        u = units[i]
        grid = "x".join(map(str, u["grid"]))
        kept = "" if u["kept"] is None else f" -> {u['kept'] * (j - i + 1)}"
        if u["kind"] == "video":
            parts.append(f"video {j - i + 1} x {grid}{kept}")
        else:
            parts.append(f"image {grid}{kept}")
        i = j + 1
    return ", ".join(parts) if parts else "none (text only)"


def format_reports(reports: list[RequestReport]) -> str:
    lines = []
    for i, r in enumerate(reports):
        vis = r.visual_tokens_per_layer
        k = r.extra.get("layer", 0)
        lines.append(f"[{i}] {r.method}: {r.answer!r}" if r.answer is not None else f"[{i}] {r.method}: {r.answer_ids}")
        lines.append(f"    visual units: {_units_line(r.units)}")
        lines.append(f"    visual tokens: {vis[0]} in layers < {k}, {vis[-1]} from layer {k}"
                     if vis[0] != vis[-1] else f"    visual tokens: {vis[0]} in every layer")
        lines.append(f"    KV cache {r.kv_bytes / 2**20:.2f} MiB ({r.kv_bytes_per_layer[0] / 2**10:.1f} KiB in layer 0, "
                     f"{r.kv_bytes_per_layer[-1] / 2**10:.1f} KiB in the last)  prefill {r.prefill_flops / 1e9:.2f} GFLOP")
        lines.append(f"    prefill {r.prefill_ms:.1f} ms, decode {r.decode_ms_per_token:.2f} ms/token (batch {r.batch_size})")
    return "\n".join(lines)
