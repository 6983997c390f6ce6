"""Accuracy of a model on held-out samples under a token-reduction method and budget."""
from __future__ import annotations

from typing import Optional

import torch

from ..inference import generate_timed
from ..models import applied_method, apply, revert
from .data import collate_prompts
from .synthetic import accuracy


@torch.no_grad()
def evaluate(model, samples, tokenizer, *, method: Optional[str] = None, keep: Optional[int] = None,
             layer: Optional[int] = None, batch_size: int = 32, max_new_tokens: int = 4, **options) -> dict:
    """Greedy answers to each sample's first question (prompt cut at its query_index) with
    ``method`` at ``keep`` visual tokens (None or keep = all: no reduction). Returns accuracy,
    the answers and the mean prefill / decode time per batch."""
    was_training = model.training
    model.eval()
    n_image = model.config.image_seq_length
    previous = applied_method(model)
    if method is None or keep is None or keep >= n_image:
        apply(model, "none")
    else:
        kw = dict(options)
        if layer is not None:
            kw["layer"] = layer
        apply(model, method, keep=keep, **kw)
    predictions, references, prefill, decode = [], [], [], []
    device = next(model.parameters()).device
    try:
        for i in range(0, len(samples), batch_size):
            batch, answers = collate_prompts([samples[j] for j in range(i, min(i + batch_size, len(samples)))],
                                             tokenizer.pad_token_id)
            new, _, t_pre, t_dec, steps = generate_timed(
                model, batch["input_ids"].to(device), batch["pixel_values"].to(device, model.dtype),
                batch["attention_mask"].to(device), max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id)
            predictions += tokenizer.batch_decode(new, skip_special_tokens=True)
            references += answers
            prefill.append(t_pre)
            decode.append(t_dec / max(steps, 1))
    finally:
        revert(model)
        if previous is not None:
            apply(model, previous[0].name, **vars(previous[1]))
        model.train(was_training)
    return {"accuracy": accuracy(predictions, references), "predictions": predictions, "references": references,
            "prefill_s": sum(prefill) / len(prefill), "decode_s_per_token": sum(decode) / len(decode)}
