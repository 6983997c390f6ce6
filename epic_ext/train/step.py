"""One EPIC training step's forward: the shared prefix, the student and the teacher, the loss.

One model plays both roles. The vision tower, the projector and the decoder layers below the
earlier of the two compression layers are identical for teacher and student, so they run once;
the student continues from that prefix with gradient, the teacher from a detached copy without.
Only the answer rows (the positions whose next token is supervised, the SFT shift) go through
the LM head: the SFT loss on the student's rows, and the KL between teacher and student through
``fused_linear_kl``, so no full-vocabulary logits are formed for prompt tokens.

Losses are sums over answer tokens divided by ``normalizer`` (the global answer-token count when
several processes share a batch), so that a 2-process step equals a 1-process step on the
same global batch.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kl_linear import fused_linear_kl
from ..methods import get_method
from ..models import adapter_of
from ..models.adapter import Prompt
from ..models.decoder import LayerReduction, Sequence, run_layers, text_modules
from .schedules import Setting, StepPlan, kept_tokens

IGNORE_INDEX = -100


@dataclass
class StepOutput:
    loss: Tensor                 # what backward sees
    sft: Tensor                  # detached components, for logging (sums / normalizer)
    kl: Tensor
    answer_tokens: int           # this process's answer tokens


def answer_rows(labels: Tensor):
    """(batch index, position, target) of every supervised next-token prediction: row p predicts
    labels[p + 1] (the shift the SFT loss uses)."""
    nxt = labels[:, 1:]
    b, p = (nxt != IGNORE_INDEX).nonzero(as_tuple=True)
    return b, p, nxt[b, p]


def _rows_of(seq: Sequence, b: Tensor, p: Tensor, length: int) -> Tensor:
    """Hidden rows of original positions (b, p) in a (possibly reduced) sequence. Answer rows are
    text, which no method drops."""
    bsz, cur = seq.kept.shape
    # made tokens (kept == -1) land in a spare last column, so no write collides with a real row
    inv = torch.full((bsz, length + 1), -1, dtype=torch.long, device=seq.kept.device)
    src = torch.where(seq.kept >= 0, seq.kept, length)
    inv.scatter_(1, src, torch.arange(cur, device=seq.kept.device).expand(bsz, -1))
    return seq.hidden[b, inv[b, p]]


def _gathered(module):
    """The LM head's full weight for the fused KL, which reads it outside the module's forward:
    under DeepSpeed ZeRO-3 parameters are partitioned and only a module call gathers them."""
    weight = module.weight
    if hasattr(weight, "ds_id"):
        import deepspeed
        return deepspeed.zero.GatheredParameters([weight] + ([module.bias] if module.bias is not None else []))
    return contextlib.nullcontext()


def _reduction(adapter, setting: Setting, method: str, n_unit: Optional[int],
               options: dict) -> Optional[LayerReduction]:
    if setting.ratio <= 0:
        return None                                   # keep every token: no method needed
    spec = get_method(method)
    if spec.stage != "llm":
        raise ValueError(f"method: EPIC trains with in-LLM methods (dart, fastv, random, ...), got {method!r}")
    # A family with fixed-size images gets the count of the schedule's rule; dynamic resolution a
    # ratio, resolved per image / frame group by the same rounding.
    keep = kept_tokens(setting.ratio, n_unit) if n_unit else 1.0 - setting.ratio
    cfg = spec.make_config(keep=keep, layer=setting.layer, **options)
    return LayerReduction(spec, cfg, setting.layer, renumber=adapter.renumber)


def epic_forward(model, batch: dict, plan: StepPlan, *, method: str = "dart", method_options: Optional[dict] = None,
                 normalizer: Optional[float] = None) -> StepOutput:
    """Loss of one step under ``plan`` (student, optional teacher, kl weight, temperature).
    ``batch``: input_ids, attention_mask, labels, pixel_values, query_index (the collate output)."""
    options = method_options or {}
    adapter = adapter_of(model)
    lm = adapter.language_model(model)
    n_layers = len(text_modules(lm))
    n_unit = adapter.unit_tokens(model)
    ids, labels = batch["input_ids"], batch["labels"]
    mask = batch["attention_mask"].bool()
    pos = (mask.long().cumsum(1) - 1).clamp(min=0)
    length = ids.shape[1]
    for s in (plan.student, plan.teacher):
        if s is not None and not 0 <= s.layer < n_layers:
            raise ValueError(f"plan: compression layer {s.layer} is outside this model's {n_layers} layers")

    media = {key: batch.get(key) for key in adapter.media_keys}
    seq = adapter.embed(model, Prompt(input_ids=ids, inputs_embeds=None, attention_mask=mask, position_ids=pos,
                                      given_positions=None, query_index=batch["query_index"], media=media), None)
    red_s = _reduction(adapter, plan.student, method, n_unit, options)
    red_t = _reduction(adapter, plan.teacher, method, n_unit, options) if plan.teacher is not None else None
    layers = [r.layer for r in (red_s, red_t) if r is not None]
    # Shared prefix: everything below the earlier compression layer (all layers if none compresses).
    split = min(layers) if layers else n_layers
    capture = tuple(sorted({r.layer - 1 for r in (red_s, red_t) if r is not None and r.layer - 1 < split}))
    prefix = run_layers(lm, seq, 0, split, capture=capture)
    student = run_layers(lm, prefix, split, n_layers, reduction=red_s)

    b, p, target = answer_rows(labels)
    h_s = lm.norm(_rows_of(student, b, p, length))
    norm = float(normalizer) if normalizer is not None else float(max(len(target), 1))
    head = adapter.lm_head(model)
    logits = head(h_s)
    sft = F.cross_entropy(logits.float(), target, reduction="sum") / norm
    kl = torch.zeros((), device=sft.device)
    if plan.teacher is not None and plan.kl_weight > 0:
        with torch.no_grad():
            if red_t is None and plan.teacher == plan.student:
                teacher = student
            else:
                teacher = run_layers(lm, prefix.detach(), split, n_layers, reduction=red_t)
            h_t = lm.norm(_rows_of(teacher, b, p, length)).detach()
        with _gathered(head):
            kl = fused_linear_kl(h_s, h_t, head.weight, head.bias,
                                 temperature=plan.temperature, reduction="sum") / norm
    loss = (1 - plan.kl_weight) * sft + plan.kl_weight * kl
    return StepOutput(loss=loss, sft=sft.detach(), kl=kl.detach(), answer_tokens=int(len(target)))


def sft_forward(model, batch: dict, setting: Setting, *, method: str = "dart", method_options=None,
                normalizer=None) -> StepOutput:
    """A plain SFT step at ``setting`` (no teacher): the baseline EPIC's overhead is measured against."""
    plan = StepPlan(student=setting, teacher=None, kl_weight=0.0, temperature=1.0)
    return epic_forward(model, batch, plan, method=method, method_options=method_options, normalizer=normalizer)
