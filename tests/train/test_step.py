"""The EPIC step: shared-prefix equivalence with separate forwards, loss masking, KL term."""
from __future__ import annotations

import pytest
import torch

from epic_ext.kl import kl_div
from epic_ext.models import apply, revert
from epic_ext.models.tiny import build_tiny_llava
from epic_ext.train import synthetic
from epic_ext.train.data import LlavaConversationDataset, collate
from epic_ext.train.schedules import Setting, StepPlan, kept_tokens
from epic_ext.train.step import answer_rows, epic_forward, sft_forward
from epic_ext.train.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def setup():
    tok = build_tokenizer(1024)
    model = build_tiny_llava("tiny", seed=5)
    records = synthetic.generate(3, seed=1)
    ds = LlavaConversationDataset(records, synthetic.render_images(records), tok)
    batch = collate([ds[i] for i in range(3)], pad_id=tok.pad_token_id)
    return model, batch


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _separate_student_loss(model, batch, setting, method="dart"):
    """A full, separate forward of the student through the one-call integration."""
    if setting.ratio > 0:
        apply(model, method, keep=kept_tokens(setting.ratio, 576), layer=setting.layer)
    else:
        apply(model, "none")
    try:
        return model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                     attention_mask=batch["attention_mask"], labels=batch["labels"],
                     query_index=batch["query_index"], use_cache=False).loss
    finally:
        revert(model)


@pytest.mark.parametrize("student,teacher", [
    (Setting(0.75, 2), Setting(0.5, 2)),       # TCD: same layer, milder teacher
    (Setting(0.6, 1), Setting(0.6, 3)),        # LCD: teacher deeper
    (Setting(0.9, 2), Setting(0.0, 2)),        # teacher keeps every token
])
def test_shared_prefix_student_equals_a_separate_forward(setup, student, teacher):
    model, batch = setup
    model.zero_grad()
    plan = StepPlan(student=student, teacher=teacher, kl_weight=0.0, temperature=1.0)
    out = epic_forward(model, batch, plan)
    out.loss.backward()
    ours = _grads(model)
    model.zero_grad()
    ref = _separate_student_loss(model, batch, student)
    ref.backward()
    theirs = _grads(model)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6, msg=name)
    model.zero_grad()


def test_kl_term_matches_separate_teacher_and_student_logits(setup):
    model, batch = setup
    student, teacher = Setting(0.8, 2), Setting(0.4, 3)
    plan = StepPlan(student=student, teacher=teacher, kl_weight=0.7, temperature=2.0)
    out = epic_forward(model, batch, plan)
    logits = {}
    for name, s in (("s", student), ("t", teacher)):
        apply(model, "dart", keep=kept_tokens(s.ratio, 576), layer=s.layer)
        try:
            with torch.no_grad():
                res = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                            attention_mask=batch["attention_mask"], query_index=batch["query_index"],
                            use_cache=False)
        finally:
            revert(model)
        # map original answer positions to rows of the reduced output
        b, p, _ = answer_rows(batch["labels"])
        rows = torch.stack([(res.kept_index[bi] == pi).nonzero()[0, 0] for bi, pi in zip(b, p)])
        logits[name] = res.logits[b, rows]
    n = len(b)
    kl = kl_div(logits["s"], logits["t"], temperature=2.0, reduction="sum") / n
    sft = torch.nn.functional.cross_entropy(logits["s"], answer_rows(batch["labels"])[2])
    torch.testing.assert_close(out.kl, kl, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.sft, sft, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, 0.3 * sft + 0.7 * kl, rtol=1e-4, atol=1e-6)
    assert out.answer_tokens == n


def test_only_answer_tokens_are_scored(setup):
    model, batch = setup
    b, p, target = answer_rows(batch["labels"])
    assert len(target) > 0
    # every scored target is an answer token (labels != -100), never an image or prompt token
    assert (batch["labels"][b, p + 1] == target).all()
    assert (target != model.config.image_token_id).all()
    assert (p + 1 > batch["query_index"][b]).all()       # answers come after the prompt
    # changing a prompt label to -100 everywhere changes nothing; unsupervising the answers zeroes it
    plan = StepPlan(student=Setting(0.5, 2), teacher=None, kl_weight=0.0, temperature=1.0)
    with torch.no_grad():
        base = sft_forward(model, batch, plan.student).loss
        half = {**batch, "labels": batch["labels"].clone()}
        drop = half["labels"][0] != -100
        half["labels"][0, drop] = -100
        reduced = sft_forward(model, half, plan.student)
    assert reduced.answer_tokens < len(target)
    assert torch.isfinite(base) and not torch.equal(base, reduced.loss)


def test_normalizer_makes_sums_additive(setup):
    model, batch = setup
    plan = StepPlan(student=Setting(0.5, 2), teacher=Setting(0.25, 2), kl_weight=0.5, temperature=1.0)
    with torch.no_grad():
        whole = epic_forward(model, batch, plan)
        total = whole.answer_tokens
        parts = [epic_forward(model, {k: v[i:i + 1] for k, v in batch.items()}, plan, normalizer=total)
                 for i in range(3)]
    torch.testing.assert_close(sum(p.loss for p in parts), whole.loss, rtol=2e-5, atol=1e-6)


def test_bad_plans_raise(setup):
    model, batch = setup
    with pytest.raises(ValueError, match="plan"):
        epic_forward(model, batch, StepPlan(student=Setting(0.5, 9), teacher=None, kl_weight=0.0, temperature=1.0))
    with pytest.raises(ValueError, match="method"):
        epic_forward(model, batch, StepPlan(student=Setting(0.5, 2), teacher=None, kl_weight=0.0, temperature=1.0),
                     method="visionzip")
