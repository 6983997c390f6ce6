"""Inference with a token-reduction method and an honest efficiency report.

    reports = epic_ext.infer(model, inputs, method="dart", keep=64, layer=2, max_new_tokens=16)
    for r in reports: print(r.answer_ids, r.kv_bytes, r.prefill_ms, r.decode_ms_per_token)

The decode loop is written out (no ``generate``) so prefill and per-token decode time are
measured separately; its tokens equal ``generate``'s (greedy, or sampled with the same seed).
Per request it reports visual tokens per layer, KV-cache bytes per layer (layers below K hold
every prompt token) and prefill FLOPs from :mod:`epic_ext.cost`.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from .cost import prefill_cost


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


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: Optional[int], gen) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / max(temperature, 1e-5)
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen)


@torch.no_grad()
def generate_timed(model, input_ids, pixel_values, attention_mask=None, *, max_new_tokens: int = 16,
                   do_sample: bool = False, temperature: float = 1.0, top_k: Optional[int] = None,
                   eos_token_id: Optional[int] = None, seed: int = 0):
    """Prefill + cached decode. Returns (new_ids [B, T], cache, prefill_s, decode_s, steps)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    mask = attention_mask.long()
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    gen = torch.Generator(device=device).manual_seed(seed) if do_sample else None
    eos = model.config.text_config.eos_token_id if eos_token_id is None else eos_token_id

    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=mask, position_ids=pos,
                use_cache=True, logits_to_keep=1)
    nxt = _pick(out.logits[:, -1], do_sample, temperature, top_k, gen)
    _sync(device)
    prefill_s = time.perf_counter() - t0

    cache, tokens = out.past_key_values, [nxt]
    done = nxt.squeeze(1) == eos
    t0 = time.perf_counter()
    for _ in range(max_new_tokens - 1):
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
        nxt = _pick(out.logits[:, -1], do_sample, temperature, top_k, gen)
        nxt = torch.where(done[:, None], torch.full_like(nxt, eos), nxt)
        tokens.append(nxt)
        done = done | (nxt.squeeze(1) == eos)
        if eos is not None and bool(done.all()):
            break
    _sync(device)
    decode_s = time.perf_counter() - t0
    return torch.cat(tokens, dim=1), cache, prefill_s, decode_s, len(tokens) - 1


def infer(model, inputs: dict, *, method: Optional[str] = None, keep=None, processor=None,
          max_new_tokens: int = 16, do_sample: bool = False, temperature: float = 1.0,
          top_k: Optional[int] = None, seed: int = 0, **method_options) -> list[RequestReport]:
    """Run ``model`` on a batch (``inputs``: input_ids, attention_mask, pixel_values, e.g. from a
    processor) with ``method`` applied for this call (None: the model as it is), and report per
    request. ``processor.batch_decode`` turns answers into text when given."""
    from .models import applied_method, apply, revert

    for key in ("input_ids", "pixel_values"):
        if key not in inputs:
            raise ValueError(f"inputs: missing {key!r}")
    device = next(model.parameters()).device
    input_ids = inputs["input_ids"].to(device)
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else mask.to(device)
    pixel_values = inputs["pixel_values"].to(device=device, dtype=model.dtype)

    previous = applied_method(model)
    if method is not None:
        apply(model, method, keep=keep, **method_options)
    elif previous is None:
        apply(model, "none")        # the same code path, so the report's accounting holds
    try:
        new_ids, cache, prefill_s, decode_s, steps = generate_timed(
            model, input_ids, pixel_values, mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
            temperature=temperature, top_k=top_k, seed=seed)
        spec, cfg = applied_method(model)
    finally:
        if previous is None:
            revert(model)
        elif method is not None:
            apply(model, previous[0].name, **vars(previous[1]))

    cfg_text = model.config.text_config
    n_img = model.config.image_seq_length
    real = mask.sum(1)
    cached = getattr(cache, "_epic", None)
    kept_real = cached.mask.sum(1) if cached is not None else real
    kept_visual = (kept_real - (real - n_img)).tolist()
    layer = cached.layer if cached is not None else cfg_text.num_hidden_layers - 1
    if cached is None:
        kept_visual = [n_img] * len(kept_visual)
    eos = cfg_text.eos_token_id
    bytes_per = torch.finfo(model.dtype).bits // 8
    reports = []
    for b in range(input_ids.shape[0]):
        ids = new_ids[b].tolist()
        if eos in ids:
            ids = ids[: ids.index(eos)]
        cost = prefill_cost(model.config, int(real[b]), int(kept_visual[b]), layer, bytes_per, new_tokens=len(ids))
        reports.append(RequestReport(
            answer_ids=ids, answer=processor.decode(ids) if processor is not None and hasattr(processor, "decode")
            else None,
            prompt_tokens=int(real[b]), visual_tokens_per_layer=cost.visual_tokens_per_layer,
            kv_bytes_per_layer=cost.kv_bytes_per_layer, kv_bytes=cost.kv_bytes, prefill_flops=cost.flops,
            prefill_ms=prefill_s * 1e3, decode_ms_per_token=decode_s * 1e3 / max(steps, 1),
            batch_size=int(input_ids.shape[0]), method=spec.name,
            extra={"layer": layer, "flops_vision": cost.flops_vision, "flops_llm": cost.flops_llm}))
    return reports


def format_reports(reports: list[RequestReport]) -> str:
    lines = []
    for i, r in enumerate(reports):
        vis = r.visual_tokens_per_layer
        k = r.extra.get("layer", 0)
        lines.append(f"[{i}] {r.method}: {r.answer!r}" if r.answer is not None else f"[{i}] {r.method}: {r.answer_ids}")
        lines.append(f"    visual tokens: {vis[0]} in layers < {k}, {vis[-1]} from layer {k}"
                     if vis[0] != vis[-1] else f"    visual tokens: {vis[0]} in every layer")
        lines.append(f"    KV cache {r.kv_bytes / 2**20:.2f} MiB ({r.kv_bytes_per_layer[0] / 2**10:.1f} KiB in layer 0, "
                     f"{r.kv_bytes_per_layer[-1] / 2**10:.1f} KiB in the last)  prefill {r.prefill_flops / 1e9:.2f} GFLOP")
        lines.append(f"    prefill {r.prefill_ms:.1f} ms, decode {r.decode_ms_per_token:.2f} ms/token (batch {r.batch_size})")
    return "\n".join(lines)
