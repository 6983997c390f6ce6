"""epic_ext.infer, the cost model and `epic-ext infer`."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from epic_ext.cli import main as cli_main
from epic_ext.cost import prefill_cost
from epic_ext.inference import format_reports, infer
from epic_ext.models import applied_method, apply, revert
from epic_ext.models.tiny import TinyProcessor, build_tiny_llava, random_pixels, random_prompts


@pytest.fixture(scope="module")
def model():
    return build_tiny_llava(seed=2)


@pytest.mark.parametrize("method,keep,layer", [("none", 576, 0), ("random", 64, 2), ("random", 100, 0),
                                               ("pooling", 36, 3)])
def test_prefill_flops_formula_matches_counted_matmuls(method, keep, layer):
    # Eager attention runs dense masked matmuls, which the formula counts with causal=False.
    m = build_tiny_llava(seed=0, attn_implementation="eager")
    ids, mask = random_prompts(m, 1)
    px = random_pixels(m, 1)
    apply(m, method, keep=keep, layer=layer)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        m(input_ids=ids, pixel_values=px, attention_mask=mask, logits_to_keep=1, use_cache=True)
    cost = prefill_cost(m.config, ids.shape[1], keep, layer, causal=False)
    # the only matmul the formula leaves out is the method's own selection work (none here)
    assert abs(cost.flops - counter.get_total_flops()) / cost.flops < 1e-3
    causal = prefill_cost(m.config, ids.shape[1], keep, layer)
    assert causal.flops < cost.flops


@pytest.mark.parametrize("method,keep,layer", [("none", 576, 0), ("dart", 64, 2), ("fastv", 100, 1),
                                               ("random", 50, 0)])
def test_kv_bytes_per_layer_match_the_cache(model, method, keep, layer):
    ids, mask = random_prompts(model, 1)
    px = random_pixels(model, 1)
    apply(model, method, keep=keep, layer=layer)
    try:
        with torch.no_grad():
            cache = model(input_ids=ids, pixel_values=px, attention_mask=mask, use_cache=True).past_key_values
    finally:
        revert(model)
    cost = prefill_cost(model.config, ids.shape[1], keep, layer, bytes_per_element=4)
    actual = [(lay.keys.numel() + lay.values.numel()) * lay.keys.element_size() for lay in cache.layers]
    assert actual == cost.kv_bytes_per_layer
    assert cost.visual_tokens_per_layer == [576] * layer + [keep] * (len(actual) - layer)


def test_cost_rejects_bad_arguments(model):
    with pytest.raises(ValueError, match="layer"):
        prefill_cost(model.config, 600, 64, 99)
    with pytest.raises(ValueError, match="kept_visual"):
        prefill_cost(model.config, 600, -1, 2)


def test_infer_answers_equal_generate_and_reports(model):
    ids, mask = random_prompts(model, 2)
    px = random_pixels(model, 2)
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": px}
    reports = infer(model, inputs, method="dart", keep=64, layer=2, max_new_tokens=5)
    assert applied_method(model) is None               # infer leaves the model as it found it
    apply(model, "dart", keep=64, layer=2)
    try:
        with torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    finally:
        revert(model)
    for b, r in enumerate(reports):
        expect = gen[b, ids.shape[1]:].tolist()
        eos = model.config.text_config.eos_token_id
        expect = expect[: expect.index(eos)] if eos in expect else expect
        assert r.answer_ids == expect
        assert r.visual_tokens_per_layer == [576, 576] + [64] * 2
        assert r.prompt_tokens == int(mask[b].sum())
        assert r.kv_bytes == sum(r.kv_bytes_per_layer)
        assert r.kv_bytes_per_layer[0] > r.kv_bytes_per_layer[-1]
        assert r.prefill_ms > 0 and r.decode_ms_per_token > 0 and r.prefill_flops > 0
        assert r.method == "dart" and r.batch_size == 2
    assert "KV cache" in format_reports(reports)


def test_infer_keeps_an_applied_method_and_samples_reproducibly(model):
    ids, mask = random_prompts(model, 1)
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": random_pixels(model, 1)}
    apply(model, "fastv", keep=32, layer=1)
    try:
        a = infer(model, inputs, max_new_tokens=4, do_sample=True, top_k=20, seed=7)
        b = infer(model, inputs, max_new_tokens=4, do_sample=True, top_k=20, seed=7)
        assert a[0].answer_ids == b[0].answer_ids and a[0].method == "fastv"
        assert a[0].visual_tokens_per_layer[-1] == 32
        infer(model, inputs, method="random", keep=16, max_new_tokens=2)
        assert applied_method(model)[0].name == "fastv"  # restored after a one-off method
    finally:
        revert(model)
    with pytest.raises(ValueError, match="pixel_values"):
        infer(model, {"input_ids": ids})
    with pytest.raises(ValueError, match="max_new_tokens"):
        infer(model, inputs, max_new_tokens=0)


def test_tiny_processor_layout(model):
    from PIL import Image
    proc = TinyProcessor(model)
    img = Image.fromarray((torch.rand(40, 30, 3) * 255).byte().numpy())
    out = proc([img, img], ["short?", "a longer question?"])
    ids, mask = out["input_ids"], out["attention_mask"]
    assert out["pixel_values"].shape == (2, 3, 336, 336)
    assert ((ids == model.config.image_token_id).sum(1) == 576).all()
    assert mask[0, 0] == 0 and mask[1, 0] == 1         # left padding
    assert proc.decode(proc.encode_text("Hi there") + [2, 7]) == "Hi there"


def test_cli_infer_json(capsys):
    rc = cli_main(["infer", "--method", "dart", "--keep", "64", "--layer", "2", "--prompt", "What?",
                   "--max-new-tokens", "2", "--warmup", "0", "--json"])
    assert rc == 0
    reports = json.loads(capsys.readouterr().out)
    assert len(reports) == 1 and reports[0]["method"] == "dart"
    assert reports[0]["visual_tokens_per_layer"][-1] == 64


@pytest.mark.parametrize("method,layer,tokens", [("dart", 2, [576, 576, 0, 0]), ("pooling", None, [0, 0, 0, 0])])
def test_cli_infer_keep_zero(capsys, method, layer, tokens):
    # Keeping no visual token is a legal budget: the text still runs and decodes.
    argv = ["infer", "--method", method, "--keep", "0", "--prompt", "What?", "--max-new-tokens", "2", "--json"]
    rc = cli_main(argv + (["--layer", str(layer)] if layer is not None else []))
    assert rc == 0
    report = json.loads(capsys.readouterr().out)[0]
    assert report["visual_tokens_per_layer"] == tokens and len(report["answer_ids"]) == 2


def test_train_then_infer_round_trip(tmp_path):
    # `epic-ext train` saves a complete checkpoint (weights + processor: image processor,
    # tokenizer, chat template) that `epic-ext infer --model <out>/final` and AutoProcessor load.
    import subprocess
    import sys

    import yaml
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from epic_ext.train import synthetic
    from epic_ext.train.data import ClipImageProcessor, encode_conversation, normalize_turns

    out = tmp_path / "run"
    cfg = dict(model="demo", data={"synthetic": {"n": 2, "seed": 0}}, schedule="direct",
               schedule_options={"target_ratio": 0.5}, method="dart", steps=1, batch_size=2, progress=False,
               tensorboard=False, log_every=0, output_dir=str(out))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    record = synthetic.generate(1, 5)[0]
    image = synthetic.render_images([record])[0]
    image.save(tmp_path / "a.png")
    cli = [sys.executable, "-m", "epic_ext.cli"]
    proc = subprocess.run(cli + ["train", "--config", str(tmp_path / "run.yaml")], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    final = out / "final"
    question = record["conversations"][0]["value"].replace("<image>", "").strip()
    proc = subprocess.run(cli + ["infer", "--model", str(final), "--image", str(tmp_path / "a.png"), "--prompt",
                                 question, "--max-new-tokens", "2", "--json"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)[0]
    # The processor expands <image> to the model's 576 tokens around the training prompt's text.
    processor = AutoProcessor.from_pretrained(final, local_files_only=True, backend="pil")
    model = LlavaForConditionalGeneration.from_pretrained(final, local_files_only=True)
    inputs = processor(images=[image], text=[f"USER: <image>\n{question} ASSISTANT:"], return_tensors="pt")
    ids, _, query, _ = encode_conversation(normalize_turns(record), processor.tokenizer, model.config.image_token_id,
                                           model.config.image_seq_length)
    assert inputs["input_ids"][0].tolist() == ids[:query + 1]
    assert report["prompt_tokens"] == query + 1
    torch.testing.assert_close(inputs["pixel_values"][0], ClipImageProcessor()(image), atol=0, rtol=0)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    assert processor.apply_chat_template(chat, add_generation_prompt=True) == \
        f"<s>USER: <image>\n{question} ASSISTANT:"
