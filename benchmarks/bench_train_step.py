"""EPIC training step time against a plain SFT step at the same student ratio.

Providers (forward + backward of one step on the same batch, DART at layer 2):
  sft        the student alone (what direct training at the target ratio costs)
  separate   the published way: a full teacher forward (no grad) and a full student forward,
             each with full-vocabulary logits over every position, KL over the answer rows
  ours       epic_ext.train.step.epic_forward: vision tower + layers < K once, student with
             grad, teacher from a detached copy, LM head on answer rows only, fused KL
Reported: ms per step, ours / sft (the issue's bound: at most 1.5x), separate / sft.

    python -m benchmarks.bench_train_step --quick
"""
from __future__ import annotations

import argparse
import sys

import torch

from benchmarks import common, harness

BENCH = "train_step"


def parser() -> argparse.ArgumentParser:
    p = harness.base_parser(__doc__, ("B",))
    p.add_argument("--presets", default=None, help="comma list (default tiny)")
    p.add_argument("--student", type=float, default=0.889, help="student compression ratio (0.889: 64 of 576)")
    p.add_argument("--teacher", type=float, default=0.5, help="teacher compression ratio")
    return p


def _batch(model, b: int, device):
    from epic_ext.train import synthetic
    from epic_ext.train.data import LlavaConversationDataset, collate
    from epic_ext.train.tokenizer import build_tokenizer
    tok = build_tokenizer(model.config.text_config.vocab_size)
    recs = synthetic.generate(b, seed=0)
    ds = LlavaConversationDataset(recs, synthetic.render_images(recs), tok, image_token_id=model.config.image_token_id)
    return {k: v.to(device) for k, v in collate([ds[i] for i in range(b)], tok.pad_token_id).items()}


def _separate_step(model, batch, student, teacher, kl_weight=0.7):
    """Two full forwards through the one-call integration, full logits, KL on answer rows."""
    from epic_ext.kl import kl_div
    from epic_ext.models import apply, revert
    from epic_ext.train.schedules import kept_tokens
    kw = dict(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"],
              query_index=batch["query_index"], use_cache=False)
    apply(model, "dart", keep=kept_tokens(teacher.ratio, 576), layer=teacher.layer)
    with torch.no_grad():
        t = model(**kw)
    apply(model, "dart", keep=kept_tokens(student.ratio, 576), layer=student.layer)
    s = model(**kw, labels=batch["labels"])
    revert(model)
    lab = batch["labels"]
    rows_s = torch.where(s.kept_index >= 0, lab.gather(1, s.kept_index.clamp(min=0)), -100)[:, 1:] != -100
    rows_t = torch.where(t.kept_index >= 0, lab.gather(1, t.kept_index.clamp(min=0)), -100)[:, 1:] != -100
    kl = kl_div(s.logits[:, :-1][rows_s], t.logits[:, :-1][rows_t])
    loss = (1 - kl_weight) * s.loss + kl_weight * kl
    loss.backward()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    harness.apply_threads(args)
    device = common.pick_device(args.device)
    from epic_ext.models.tiny import build_tiny_llava
    from epic_ext.train.schedules import Setting, StepPlan
    from epic_ext.train.step import epic_forward

    presets = (args.presets or "tiny").split(",")
    sizes = [4] if args.quick else [4, 16]
    budget = args.budget or (0.5 if args.quick else 3.0)
    machine = common.machine_info(device)
    rows = []
    print(f"{'preset':<20}{'B':>4}{'sft ms':>10}{'separate ms':>13}{'ours ms':>10}{'ours/sft':>10}{'separate/sft':>14}")
    for preset in presets:
        model = build_tiny_llava(preset, device=device)
        model.train()
        for p in model.model.vision_tower.parameters():
            p.requires_grad_(False)
        student, teacher = Setting(args.student, 2), Setting(args.teacher, 2)
        for b in sizes:
            batch = _batch(model, b, device)

            def sft():
                epic_forward(model, batch, StepPlan(student, None, 0.0, 1.0)).loss.backward()

            def ours():
                epic_forward(model, batch, StepPlan(student, teacher, 0.7, 1.0)).loss.backward()

            def separate():
                _separate_step(model, batch, student, teacher)

            t = {name: common.measure(fn, device, budget_s=budget, min_reps=3).median_ms
                 for name, fn in (("sft", sft), ("separate", separate), ("ours", ours))}
            model.zero_grad(set_to_none=True)
            row = dict(preset=preset, B=b, student_ratio=args.student, teacher_ratio=args.teacher,
                       sft_ms=t["sft"], separate_ms=t["separate"], ours_ms=t["ours"],
                       ours_over_sft=t["ours"] / t["sft"], separate_over_sft=t["separate"] / t["sft"])
            rows.append(row)
            print(f"{preset:<20}{b:>4}{t['sft']:>10.1f}{t['separate']:>13.1f}{t['ours']:>10.1f}"
                  f"{row['ours_over_sft']:>10.2f}{row['separate_over_sft']:>14.2f}")
    if not args.no_json:
        print(f"wrote {common.write_results(BENCH, rows, machine, out_dir=args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
