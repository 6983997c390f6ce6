"""Synthetic VQA task, word-level tokenizer and LLaVA conversation dataset: token layout, answer-only
labels, query_index under both paddings, balance and answerability of the generator, pixel content
of the images, disk vs memory, input errors, and one forward of the tiny LLaVA on a real batch."""
from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest
import torch

from epic_ext.train import synthetic as S
from epic_ext.train.data import (IGNORE_INDEX, ClipImageProcessor, LlavaConversationDataset, collate,
                                 collate_prompts, format_conversation, normalize_turns, prompt_only)
from epic_ext.train.tokenizer import CHAT_TEMPLATE, build_tokenizer

N_IMG = 576


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(1024)


@pytest.fixture(scope="module")
def records():
    return S.generate(24, seed=3)


@pytest.fixture(scope="module")
def images(records):
    return S.render_images(records)


@pytest.fixture(scope="module")
def ds(records, images, tok):
    return LlavaConversationDataset(records, images, tok, None, tok.convert_tokens_to_ids("<image>"))


def _answer_ids(tok, answer):
    return tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


# --------------------------------------------------------------------------- tokenizer

def test_tokenizer_ids_and_round_trip(tok):
    from epic_ext.models.tiny import llava_config
    assert len(tok) == 1024
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id] == [0, 1, 2]
    assert tok.convert_tokens_to_ids("<image>") == 1023 == llava_config("tiny").image_token_id
    assert build_tokenizer(2048).convert_tokens_to_ids("<image>") == 2047
    recs = S.generate(300, seed=1, turns=3) + S.generate(40, seed=2, grid=4) + S.generate(20, seed=2, grid=2)
    texts = sorted({t["value"].replace("<image>\n", "") for r in recs for t in r["conversations"]})
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    assert not any(tok.unk_token_id in row for row in ids)
    assert tok.batch_decode(ids) == texts
    assert tok("red")["input_ids"] == [1, tok.convert_tokens_to_ids("red")]     # BOS in front


def test_tokenizer_too_small_vocab_raises():
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(50)


def test_chat_template_matches_dataset_format(tok, tmp_path):
    msgs = [{"role": "user", "content": "<image>\nWhat colour is the square?"}, {"role": "assistant", "content": "red"},
            {"role": "user", "content": "How many circles are there?"}, {"role": "assistant", "content": "2"}]
    text, _ = format_conversation([("USER", m["content"]) if m["role"] == "user" else ("ASSISTANT", m["content"])
                                   for m in msgs], "</s>")
    assert text == ("USER: <image>\nWhat colour is the square? ASSISTANT: red</s>"
                    "USER: How many circles are there? ASSISTANT: 2</s>")
    assert tok.apply_chat_template(msgs, tokenize=False) == "<s>" + text
    gen = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert gen == "<s>USER: <image>\nWhat colour is the square? ASSISTANT:"
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]}]
    assert tok.apply_chat_template(parts, tokenize=False, add_generation_prompt=True) == gen
    # Saved and reloaded like a checkpoint's tokenizer: same ids, same template.
    from transformers import AutoTokenizer
    tok.save_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    assert tok2.chat_template == CHAT_TEMPLATE and len(tok2) == 1024
    assert tok2(text)["input_ids"] == tok(text)["input_ids"]


# --------------------------------------------------------------------------- samples

def test_sample_layout_and_labels(ds, tok, records):
    colon, assistant = tok.convert_tokens_to_ids(":"), tok.convert_tokens_to_ids("ASSISTANT")
    for i in range(len(ds)):
        s = ds[i]
        ids, labels, q = s["input_ids"], s["labels"], s["query_index"]
        assert ids.dtype == labels.dtype == torch.long and ids.shape == labels.shape
        img = (ids == 1023).nonzero().flatten()
        assert len(img) == N_IMG and (img == torch.arange(s["image_start"], s["image_start"] + N_IMG)).all()
        assert ids[0] == tok.bos_token_id
        answer = records[i]["conversations"][1]["value"]
        sup = labels != IGNORE_INDEX
        assert (labels[sup] == ids[sup]).all()
        assert labels[sup].tolist() == _answer_ids(tok, answer)
        assert tok.decode(labels[sup], skip_special_tokens=True) == answer
        assert sup.nonzero()[-1].item() == len(ids) - 1            # nothing after the closing EOS
        # query_index: the ":" of "ASSISTANT:", the last prompt token before the first answer token.
        assert q == sup.nonzero()[0].item() - 1
        assert ids[q] == colon and ids[q - 1] == assistant
        assert s["pixel_values"].shape == (3, 336, 336) and s["pixel_values"].dtype == torch.float32


def test_prompt_only_matches_generation_template(ds, tok, records):
    s = ds[5]
    p = prompt_only(s)
    text = tok.apply_chat_template([{"role": "user", "content": records[5]["conversations"][0]["value"]}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    k = ids.index(1023)
    expected = ids[:k] + [1023] * N_IMG + ids[k + 1:]
    assert p["input_ids"].tolist() == expected
    assert p["query_index"] == len(expected) - 1 and p["answer"] == records[5]["conversations"][1]["value"]


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_padding_and_query_index(ds, tok, side):
    samples = [ds[i] for i in range(6)]
    b = collate(samples, pad_id=tok.pad_token_id, padding_side=side)
    assert list(b) == ["input_ids", "attention_mask", "labels", "pixel_values", "query_index"]
    L = max(len(s["input_ids"]) for s in samples)
    assert b["input_ids"].shape == b["attention_mask"].shape == b["labels"].shape == (6, L)
    assert b["pixel_values"].shape == (6, 3, 336, 336) and b["pixel_values"].dtype == torch.float32
    assert b["query_index"].shape == (6,)
    assert all(b[k].dtype == torch.long for k in ("input_ids", "attention_mask", "labels", "query_index"))
    assert len({len(s["input_ids"]) for s in samples}) > 1                  # padding really happens
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        row = b["attention_mask"][i]
        real = slice(L - n, L) if side == "left" else slice(0, n)
        assert row.sum() == n and row[real].all()
        assert (b["input_ids"][i][row == 0] == tok.pad_token_id).all()
        assert (b["labels"][i][row == 0] == IGNORE_INDEX).all()
        assert b["input_ids"][i, real].tolist() == s["input_ids"].tolist()
        q = b["query_index"][i].item()
        assert b["input_ids"][i, q] == tok.convert_tokens_to_ids(":")
        lab = b["labels"][i]
        assert (lab[: q + 1] == IGNORE_INDEX).all() and lab[q + 1] != IGNORE_INDEX
        assert (b["input_ids"][i, :q + 1] == 1023).sum() == N_IMG


def test_collate_prompts_left_padded(ds, tok):
    samples = [ds[i] for i in range(5)]
    batch, answers = collate_prompts(samples, pad_id=tok.pad_token_id)
    assert answers == [s["answers"][0] for s in samples] == ds.references()[:5]
    assert "labels" not in batch
    L = batch["input_ids"].shape[1]
    assert (batch["query_index"] == L - 1).all() and batch["attention_mask"][:, -1].all()
    assert (batch["input_ids"][:, -1] == tok.convert_tokens_to_ids(":")).all()
    assert ((batch["input_ids"] == 1023).sum(1) == N_IMG).all()
    with pytest.raises(ValueError, match="padding_side"):
        collate(samples, 0, padding_side="middle")


def test_multi_turn_labels(tok):
    recs = S.generate(6, seed=9, turns=3)
    assert all(len(r["conversations"]) == 6 for r in recs)
    ds = LlavaConversationDataset(recs, S.render_images(recs), tok, None, 1023)
    for i, r in enumerate(recs):
        s = ds.encode(i)
        answers = [t["value"] for t in r["conversations"][1::2]]
        assert s["answers"] == answers
        ids, labels = s["input_ids"], s["labels"]
        sup = (labels != IGNORE_INDEX).int()
        starts = ((sup[1:] - sup[:-1]) == 1).nonzero().flatten() + 1     # one labelled run per answer
        assert len(starts) == len(answers)
        runs, cur = [], []
        for t, lab in zip(ids.tolist(), labels.tolist()):
            if lab != IGNORE_INDEX:
                cur.append(lab)
            elif cur:
                runs.append(cur)
                cur = []
        runs += [cur] if cur else []
        assert runs == [_answer_ids(tok, a) for a in answers]
        assert s["query_index"] == starts[0].item() - 1
        # The later questions are prompt, not supervised.
        q2 = tok(r["conversations"][2]["value"], add_special_tokens=False)["input_ids"]
        assert q2[0] in ids[starts[0]:starts[1]].tolist()
        assert (ids == 1023).sum() == N_IMG


def test_subword_tokenizer_labels():
    # A Llama-like BPE with a metaspace ("▁red"): offsets, not word counts, decide the labels.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    recs = S.generate(40, seed=4, turns=2)
    texts = [t["value"] for r in recs for t in r["conversations"]] + ["USER: ASSISTANT:"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>", "<image>"])
    bpe.train_from_iterator(texts, trainer)
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    t = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    image_id = 777                  # a model's id need not be the tokenizer's <image> id
    ds = LlavaConversationDataset(recs, S.render_images(recs), t, None, image_id, max_length=None)
    for i, r in enumerate(recs):
        s = ds.encode(i)
        ids, labels = s["input_ids"], s["labels"]
        assert (ids == image_id).sum() == N_IMG and ids[0] == 1
        sup = labels[labels != IGNORE_INDEX]
        assert (sup == t.eos_token_id).sum() == 2 and sup[-1] == t.eos_token_id
        split = (sup == t.eos_token_id).nonzero()[0].item()
        answers = [c["value"] for c in r["conversations"][1::2]]
        assert t.decode(sup[:split]).strip() == answers[0]
        assert t.decode(sup[split + 1:-1]).strip() == answers[1]
        # The prompt is exactly the generation prompt's tokens (ends at "ASSISTANT:").
        question = r["conversations"][0]["value"].replace("<image>", "")
        assert ids[s["image_start"] + N_IMG:s["query_index"] + 1].tolist() == \
            t(question + " ASSISTANT:", add_special_tokens=False)["input_ids"]


def test_hf_image_processor_accepted(records, images, tok):
    from transformers import CLIPImageProcessorPil   # PIL's bicubic, as ours (torchvision's differs)
    hf = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    a = LlavaConversationDataset(records[:2], images[:2], tok, hf, 1023)[1]["pixel_values"]
    b = ClipImageProcessor()(images[1])
    assert a.shape == b.shape == (3, 336, 336)
    torch.testing.assert_close(a, b)
    from PIL import Image
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 400, 3), dtype=np.uint8))
    torch.testing.assert_close(ClipImageProcessor(pad_to_square=False)(wide),
                               hf(images=wide, return_tensors="pt")["pixel_values"][0])
    padded = ClipImageProcessor()(wide)                       # LLaVA-1.5 pads with the mean colour
    assert padded.shape == (3, 336, 336) and padded[:, :10].abs().max() < 0.02


# --------------------------------------------------------------------------- generator

def test_generator_deterministic():
    a, b = S.generate(50, seed=7), S.generate(50, seed=7)
    assert a == b and S.generate(20, seed=7) == a[:20]
    assert S.generate(50, seed=8) != a
    assert json.loads(json.dumps(a)) == a
    assert np.array_equal(np.asarray(S.render(a[3])), np.asarray(S.render(b[3])))
    r = a[0]
    assert set(r) >= {"id", "image", "conversations"} and r["image"] == r["id"] + ".png"
    assert r["conversations"][0]["from"] == "human" and r["conversations"][0]["value"].startswith("<image>\n")
    assert r["conversations"][1]["from"] == "gpt"


_POS3 = ["top left", "top center", "top right", "middle left", "center", "middle right",
         "bottom left", "bottom center", "bottom right"]
_PLUR = {"circles": "circle", "squares": "square", "triangles": "triangle", "crosses": "cross"}


def _oracle(question, objs):
    """Answer a question from the object list, independently of the generator."""
    cell = {_POS3[o["row"] * 3 + o["col"]]: o for o in objs}
    if m := re.fullmatch(r"(?:What|Which) colour is the (\w+)\?", question):
        hits = [o for o in objs if o["shape"] == m[1]]
        assert len(hits) == 1, question
        return hits[0]["colour"]
    if m := re.fullmatch(r"(?:What shape is at|Which shape is in) the (.+)\?", question):
        return cell[m[1]]["shape"]
    if m := re.fullmatch(r"(?:Where is|In which cell is) the (\w+) (\w+)\?", question):
        hits = [o for o in objs if (o["colour"], o["shape"]) == (m[1], m[2])]
        assert len(hits) == 1, question
        return _POS3[hits[0]["row"] * 3 + hits[0]["col"]]
    if m := re.fullmatch(r"How many (\w+) are (?:there|in the image)\?", question):
        return str(sum(o["shape"] == _PLUR[m[1]] for o in objs))
    raise AssertionError(f"unparsed question {question!r}")


def test_questions_balanced_and_answerable():
    recs = S.generate(2000, seed=11)
    types = Counter(r["question_types"][0] for r in recs)
    assert set(types.values()) == {500}
    sets = S.answer_sets(3)
    for t in S.QUESTION_TYPES:
        counts = Counter(r["conversations"][1]["value"] for r in recs if r["question_types"][0] == t)
        assert set(counts) == set(sets[t])                                  # every answer occurs
        assert max(counts.values()) - min(counts.values()) <= 1             # dealt from decks
    # A question-only model is near chance (4-9 answers per type): the image is needed.
    assert S.majority_baseline(recs) < 0.4
    for r in recs[:400] + S.generate(30, seed=12, turns=4):
        objs = r["scene"]["objects"]
        assert 2 <= len(objs) <= 4 and len({(o["row"], o["col"]) for o in objs}) == len(objs)
        for h, g in zip(r["conversations"][::2], r["conversations"][1::2]):
            q = h["value"].replace("<image>\n", "")
            assert _oracle(q, objs) == g["value"]
            assert 1 <= len(g["value"].split()) <= 3
    with pytest.raises(ValueError, match="grid"):
        S.generate(3, grid=7)
    with pytest.raises(ValueError, match="question_types"):
        S.generate(3, question_types=["size"])


def test_images_contain_objects_at_stated_cells(records, images):
    colours = {tuple(v): k for k, v in S.COLOURS.items()}
    for r, img in zip(records, images):
        px = np.asarray(img)
        assert px.shape == (336, 336, 3)
        bg = tuple(r["scene"]["background"])
        occupied = {(o["row"], o["col"]): o for o in r["scene"]["objects"]}
        for row in range(3):
            for col in range(3):
                region = px[row * 112:(row + 1) * 112, col * 112:(col + 1) * 112].reshape(-1, 3)
                packed = np.unique(region.astype(np.int64) @ np.array([65536, 256, 1]))
                present = {(v >> 16, (v >> 8) & 255, v & 255) for v in packed.tolist()} - {bg}
                if (row, col) in occupied:
                    o = occupied[(row, col)]
                    assert present == {S.COLOURS[o["colour"]]}                  # one object, its colour
                    x, y = S.object_centre(o)
                    assert colours[tuple(px[y, x])] == o["colour"]
                    # Shape sanity: a square fills its box, a circle misses its corners.
                    fill = (region != np.array(bg)).any(1).mean() * 112 * 112 / (o["size"] * 112) ** 2
                    lo, hi = {"square": (0.9, 1.15), "circle": (0.7, 0.85), "triangle": (0.4, 0.6),
                              "cross": (0.45, 0.65)}[o["shape"]]
                    assert lo < fill < hi, (o, fill)
                else:
                    assert not present                                          # empty cell: background only


def test_saved_json_and_images_equal_in_memory(tmp_path, records, images, tok):
    path = S.save_dataset(records, tmp_path)
    assert json.loads(path.read_text()) == records
    for r, img in zip(records[:5], images[:5]):
        from PIL import Image
        with Image.open(tmp_path / r["image"]) as f:
            assert np.array_equal(np.asarray(f.convert("RGB")), np.asarray(img))
    disk = LlavaConversationDataset(str(path), tmp_path, tok, None, 1023)
    mem = LlavaConversationDataset(records, images, tok, None, 1023)
    mapping = LlavaConversationDataset(records, {r["image"]: im for r, im in zip(records, images)}, tok, None, 1023)
    import pickle
    disk = pickle.loads(pickle.dumps(disk))           # DataLoader workers (spawn) get a pickled copy
    for i in (0, 7, 23):
        a, b, c = disk[i], mem[i], mapping[i]
        for k in ("input_ids", "labels", "pixel_values"):
            assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k])
        assert a["query_index"] == b["query_index"] and a["answers"] == b["answers"]


# --------------------------------------------------------------------------- bad inputs

def test_bad_inputs_raise(tmp_path, records, images, tok):
    def with_turns(conv):
        return [dict(records[0], conversations=conv)]
    zero = with_turns([{"from": "human", "value": "What colour is the square?"}, {"from": "gpt", "value": "red"}])
    two = with_turns([{"from": "human", "value": "<image>\nWhat colour is the square?"},
                      {"from": "gpt", "value": "red"},
                      {"from": "human", "value": "<image>\nAnd now?"}, {"from": "gpt", "value": "blue"}])
    in_answer = with_turns([{"from": "human", "value": "What?"}, {"from": "gpt", "value": "<image> red"}])
    swapped = with_turns([{"from": "gpt", "value": "red"}, {"from": "human", "value": "<image>\nWhat?"}])
    open_end = with_turns([{"from": "human", "value": "<image>\nWhat?"}])
    for bad in (zero, two, in_answer, swapped, open_end):
        with pytest.raises(ValueError, match="json_path_or_records"):
            LlavaConversationDataset(bad, images[:1], tok, None, 1023)
    with pytest.raises(ValueError, match=r"json_path_or_records.*2 <image>"):
        LlavaConversationDataset(two, images[:1], tok, None, 1023)
    with pytest.raises(ValueError, match="json_path_or_records"):
        LlavaConversationDataset(str(tmp_path / "missing.json"), tmp_path, tok, None, 1023)
    S.save_dataset(records[:2], tmp_path)
    unknown = [dict(records[0], image="nope.png")]
    with pytest.raises(ValueError, match=r"image_folder_or_images.*nope\.png"):
        LlavaConversationDataset(unknown, tmp_path, tok, None, 1023)
    with pytest.raises(ValueError, match="image_folder_or_images"):
        LlavaConversationDataset(unknown, {records[0]["image"]: images[0]}, tok, None, 1023)
    with pytest.raises(ValueError, match="image_folder_or_images"):
        LlavaConversationDataset(records[:3], images[:2], tok, None, 1023)
    with pytest.raises(ValueError, match="image_folder_or_images"):
        LlavaConversationDataset(records[:1], tmp_path / "no_such_dir", tok, None, 1023)
    with pytest.raises(ValueError, match="max_length"):
        LlavaConversationDataset(records[:1], images[:1], tok, None, 1023, max_length=500)
    short = LlavaConversationDataset(records[:1], images[:1], tok, None, 1023, max_length=N_IMG + 5)
    with pytest.raises(ValueError, match="max_length"):
        short[0]
    # Normalisation: a trailing tag moves to the front, like LLaVA's preprocess_multimodal.
    conv = [{"from": "human", "value": "What? <image>"}, {"from": "gpt", "value": " red "}]
    assert normalize_turns({"conversations": conv}) == [("USER", "<image>\nWhat?"), ("ASSISTANT", "red")]


def test_truncation_keeps_first_answer(tok):
    recs = S.generate(2, seed=5, turns=3)
    full = LlavaConversationDataset(recs, S.render_images(recs), tok, None, 1023, max_length=None).encode(0)
    q = full["query_index"]
    cut = LlavaConversationDataset(recs, S.render_images(recs), tok, None, 1023, max_length=q + 3).encode(0)
    assert len(cut["input_ids"]) == q + 3 and cut["query_index"] == q
    assert torch.equal(cut["labels"], full["labels"][:q + 3])


def test_accuracy():
    assert S.accuracy(["Red", " top  left ", "2.", "blue"], ["red", "top left", "2", "green"]) == 0.75
    with pytest.raises(ValueError, match="predictions"):
        S.accuracy(["a"], ["a", "b"])


# --------------------------------------------------------------------------- with the model

def test_tiny_llava_forward_on_batch(ds, tok):
    """The labels follow Hugging Face's convention (the loss shifts them), and query_index means
    the same token in a right-padded training batch and a left-padded prompt batch."""
    import epic_ext
    from epic_ext.models.tiny import build_tiny_llava
    model = build_tiny_llava("tiny")
    samples = [ds[i] for i in range(3)]
    train = collate(samples, tok.pad_token_id, "right")
    prompts, _ = collate_prompts(samples, tok.pad_token_id)
    with torch.no_grad():
        out = model(**{k: v for k, v in train.items() if k != "query_index"})
        logits, labels = out.logits[:, :-1].float(), train["labels"][:, 1:]
        manual = torch.nn.functional.cross_entropy(logits.reshape(-1, 1024), labels.reshape(-1),
                                                   ignore_index=IGNORE_INDEX)
        torch.testing.assert_close(out.loss, manual)
        epic_ext.apply(model, "fastv", keep=64, layer=2)
        a = model(**train)
        b = model(**prompts)

    def at_query(out, q):       # the output row that came from input position q (FastV shortens rows)
        row = (out["kept_index"] == q[:, None]).int().argmax(1)
        assert (out["kept_index"].gather(1, row[:, None])[:, 0] == q).all()
        return out.logits[torch.arange(len(q)), row]
    assert a.logits.shape[1] < train["input_ids"].shape[1]
    torch.testing.assert_close(at_query(a, train["query_index"]), at_query(b, prompts["query_index"]),
                               atol=1e-4, rtol=1e-4)


def test_unknown_words_warn_with_their_fraction(tok, records, images):
    import warnings
    # The synthetic task is inside the closed vocabulary: no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LlavaConversationDataset(records, images, tok, None, tok.convert_tokens_to_ids("<image>"))
    other = [{"id": "x", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nIs it on the left?"}, {"from": "gpt", "value": "left"}]}]
    with pytest.warns(UserWarning, match=r"3 of 7 text tokens \(42.9%\).*<unk>.*'Is', 'it', 'on'"):
        LlavaConversationDataset(other, [images[0]], tok, None, tok.convert_tokens_to_ids("<image>"))
    # A tokenizer reloaded from a saved model is still recognised.
    from transformers import AutoTokenizer
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        again = AutoTokenizer.from_pretrained(d)
    with pytest.warns(UserWarning, match="closed vocabulary"):
        LlavaConversationDataset(other, [images[0]], again, None, again.convert_tokens_to_ids("<image>"))


# --------------------------------------------------------------------------- LLaVA: text-only and multi-image samples

def _conv(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def _question(record, turn=0):
    return record["conversations"][2 * turn]["value"].replace("<image>\n", "")


def _answer(record, turn=0):
    return record["conversations"][2 * turn + 1]["value"]


def _mixed_llava(records):
    """A text-only sample (no "image" key, no tag), a one-image sample, two images in one turn
    (kept in place), and two images in different turns (the second after the first answer)."""
    a, b, c = records[0], records[1], records[2]
    return [
        {"id": "text", "conversations": _conv(_question(a), _answer(a))},
        b,
        {"id": "pair", "image": [a["image"], c["image"]],
         "conversations": _conv(f"<image> {_question(a)} <image>", _answer(a))},
        {"id": "later", "image": [c["image"], b["image"]],
         "conversations": _conv(f"{_question(c)} <image>", _answer(c), f"<image>\n{_question(b)}", _answer(b))},
    ]


@pytest.fixture(scope="module")
def mixed_ds(records, images, tok):
    by_name = {r["image"]: im for r, im in zip(records, images)}
    return LlavaConversationDataset(_mixed_llava(records), by_name, tok, None, 1023)


def _words(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_llava_text_only_and_multi_image_samples(mixed_ds, ds, records, images, tok, tmp_path):
    clip = ClipImageProcessor()
    text, one, pair, later = (mixed_ds[i] for i in range(4))
    colon = tok.convert_tokens_to_ids(":")
    # text-only: no placeholder, no pixels; the LLaVA-1.5 text and answer-only labels as always
    assert "pixel_values" not in text and text["image_start"] is None and text["image_starts"] == []
    assert text["input_ids"].tolist() == tok(f"USER: {_question(records[0])} ASSISTANT: {_answer(records[0])}</s>"
                                             )["input_ids"]
    assert text["labels"][text["labels"] != IGNORE_INDEX].tolist() == _answer_ids(tok, _answer(records[0]))
    assert text["input_ids"][text["query_index"]] == colon
    # a one-image sample among them is the sample it is alone (byte for byte)
    for key in ("input_ids", "labels", "pixel_values"):
        assert torch.equal(one[key], ds[1][key]) and one[key].dtype == ds[1][key].dtype
    assert (one["query_index"], one["image_start"], one["image_starts"]) == \
        (ds[1]["query_index"], ds[1]["image_start"], [ds[1]["image_start"]])
    # two images in one turn stay where they are written, each N_IMG placeholders
    ids, (s0, s1) = pair["input_ids"], pair["image_starts"]
    assert (ids == 1023).sum() == 2 * N_IMG and pair["image_start"] == s0
    assert (ids[s0:s0 + N_IMG] == 1023).all() and (ids[s1:s1 + N_IMG] == 1023).all()
    assert ids[:s0].tolist() == [tok.bos_token_id] + _words(tok, "USER:")
    assert ids[s0 + N_IMG:s1].tolist() == _words(tok, _question(records[0]))
    assert ids[s1 + N_IMG:pair["query_index"] + 1].tolist() == _words(tok, "ASSISTANT:")
    assert pair["pixel_values"].shape == (2, 3, 336, 336) and pair["pixel_values"].dtype == torch.float32
    assert torch.equal(pair["pixel_values"][0], clip(images[0]))
    assert torch.equal(pair["pixel_values"][1], clip(images[2]))
    # one tag per turn moves to the turn's front (LLaVA's rule); the second image after the first answer
    ids, (s0, s1) = later["input_ids"], later["image_starts"]
    assert s0 < later["query_index"] < s1 and (ids == 1023).sum() == 2 * N_IMG
    assert ids[s0 + N_IMG:s0 + N_IMG + 3].tolist() == _words(tok, _question(records[2]))[:3]
    runs = later["labels"][later["labels"] != IGNORE_INDEX].tolist()
    assert runs == _answer_ids(tok, _answer(records[2])) + _answer_ids(tok, _answer(records[1]))
    assert torch.equal(later["pixel_values"][1], clip(images[1]))
    assert later["questions"] == [_question(records[2]), _question(records[1])]
    # the same records from an image folder
    S.save_dataset(records[:3], tmp_path)
    disk = LlavaConversationDataset(_mixed_llava(records), tmp_path, tok, None, 1023)
    for i in range(4):
        for key in ("input_ids", "labels", "pixel_values"):
            assert (key in disk[i]) == (key in mixed_ds[i]) and (key not in disk[i] or torch.equal(disk[i][key],
                                                                                                 mixed_ds[i][key]))
    # an aligned sequence: an image, a list of images, or None per record
    seq = LlavaConversationDataset(_mixed_llava(records), [None, images[1], [images[0], images[2]],
                                                           (images[2], images[1])], tok, None, 1023)
    assert "pixel_values" not in seq[0] and torch.equal(seq[2]["pixel_values"], pair["pixel_values"])


@pytest.mark.parametrize("side", ["right", "left"])
def test_llava_mixed_collate_and_prompts(mixed_ds, tok, side):
    samples = [mixed_ds[i] for i in range(4)]
    b = collate(samples, pad_id=tok.pad_token_id, padding_side=side)
    assert list(b) == ["input_ids", "attention_mask", "labels", "pixel_values", "query_index"]
    # every row's images, in row order: what the LLaVA forward consumes placeholder block by block
    expected = torch.cat([samples[1]["pixel_values"][None], samples[2]["pixel_values"], samples[3]["pixel_values"]])
    assert torch.equal(b["pixel_values"], expected)
    assert ((b["input_ids"] == 1023).sum(1) == torch.tensor([0, 1, 2, 2]) * N_IMG).all()
    L = b["input_ids"].shape[1]
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        real = slice(L - n, L) if side == "left" else slice(0, n)
        assert b["input_ids"][i, real].tolist() == s["input_ids"].tolist()
        assert b["labels"][i, real].tolist() == s["labels"].tolist()
        assert b["input_ids"][i, b["query_index"][i]] == tok.convert_tokens_to_ids(":")
    # prompts: the first prompt of "later" keeps only its first image
    p = prompt_only(samples[3])
    assert (p["input_ids"] == 1023).sum() == N_IMG and torch.equal(p["pixel_values"], samples[3]["pixel_values"][:1])
    assert prompt_only(samples[2])["pixel_values"] is samples[2]["pixel_values"]
    assert "pixel_values" not in prompt_only(samples[0])
    prompts, answers = collate_prompts(samples, pad_id=tok.pad_token_id)
    assert answers == mixed_ds.references()
    assert prompts["pixel_values"].shape[0] == (prompts["input_ids"] == 1023).sum() // N_IMG == 4
    only_text = collate([samples[0]], pad_id=tok.pad_token_id)
    assert "pixel_values" not in only_text


def test_llava_multi_image_bad_inputs_raise(records, images, tok, tmp_path):
    a, b = records[0], records[1]
    by_name = {r["image"]: im for r, im in zip(records, images)}
    cases = [
        ({"id": "t", "conversations": _conv("<image>\nWhat?", "red")}, "'t' has 1 <image> tags for 0 image"),
        ({"id": "p", "image": [a["image"], b["image"]], "conversations": _conv("<image>\nWhat?", "red")},
         "'p' has 1 <image> tags for 2 image"),
        ({"id": "q", "image": a["image"], "conversations": _conv("<image> What?", "<image> red")}, "in an answer"),
        ({"id": "v", "video": "clip", "conversations": _conv("What?", "red")}, "images only"),
        ({"id": "e", "image": [], "conversations": _conv("What?", "red")}, "'image' must be"),
    ]
    for record, needle in cases:
        with pytest.raises(ValueError, match="json_path_or_records") as err:
            LlavaConversationDataset([record], by_name, tok, None, 1023)
        assert needle in str(err.value)
    S.save_dataset(records[:1], tmp_path)
    missing = {"id": "m", "image": [a["image"], "nope.png"], "conversations": _conv("<image> <image> What?", "red")}
    with pytest.raises(ValueError, match=r"image_folder_or_images: sample 'm': image 'nope\.png' not found"):
        LlavaConversationDataset([missing], tmp_path, tok, None, 1023)
    with pytest.raises(ValueError, match=r"image_folder_or_images: sample 'm': image 'nope\.png' is not in"):
        LlavaConversationDataset([missing], by_name, tok, None, 1023)
    with pytest.raises(ValueError, match=r"json_path_or_records: sample 'p' has 1 <image> tags for 2 image"):
        LlavaConversationDataset([dict(a, id="p")], [[images[0], images[1]]], tok, None, 1023)
    # truncation may not cut through an image, even one after the first answer
    later = _mixed_llava(records)[3]
    full = LlavaConversationDataset([later], by_name, tok, None, 1023, max_length=None).encode(0)
    need = full["image_starts"][1] + N_IMG
    ok = LlavaConversationDataset([later], by_name, tok, None, 1023, max_length=need).encode(0)
    assert torch.equal(ok["input_ids"], full["input_ids"][:need])
    with pytest.raises(ValueError, match=f"max_length: sample 'later' needs {need} tokens to keep its images"):
        LlavaConversationDataset([later], by_name, tok, None, 1023, max_length=need - 1).encode(0)
    with pytest.raises(ValueError, match="sample 0 has 2 images, not one"):
        LlavaConversationDataset(_mixed_llava(records)[2:], by_name, tok, None, 1023).load_image(0)


def test_llava_turns_trimmed_as_llava_trains(records, images, tok):
    """As LLaVA's preprocess: a conversation's leading answer turns are skipped (some ShareGPT
    samples of mix665k start with one), and a last question without an answer, which supervises
    nothing, goes too; a conversation left without an answer still raises."""
    a = records[0]
    clean = [dict(a, conversations=_conv(f"<image>\n{_question(a)}", _answer(a))), _mixed_llava(records)[0]]
    messy = [dict(r, conversations=[{"from": "gpt", "value": "red"}] + r["conversations"] +
                  [{"from": "human", "value": "How many circles are there?"}]) for r in clean]
    want = LlavaConversationDataset(clean, [images[0], None], tok, None, 1023)
    got = LlavaConversationDataset(messy, [images[0], None], tok, None, 1023)
    for i in range(2):
        assert torch.equal(got.encode(i)["input_ids"], want.encode(i)["input_ids"])
        assert torch.equal(got.encode(i)["labels"], want.encode(i)["labels"])
    for conv in (_conv("What?"), [{"from": "gpt", "value": "red"}, {"from": "human", "value": "What?"}]):
        with pytest.raises(ValueError, match="json_path_or_records"):
            LlavaConversationDataset([{"id": "x", "conversations": conv}], [None], tok, None, 1023)


def test_epic_step_mixed_llava_batch_rows_equal_rows_alone(records, tok):
    """The EPIC step (shared prefix, DART student and teacher, SFT + KL) on a batch of a text-only
    row, a one-image row and two two-image rows: each row's loss terms in the batch (the other
    rows' labels ignored, the batch's normaliser) equal the row's terms alone."""
    from epic_ext.models.tiny import build_tiny_llava
    from epic_ext.train.schedules import Setting, StepPlan
    from epic_ext.train.step import epic_forward
    model = build_tiny_llava("tiny", seed=5, image_size=56)           # 16 tokens an image keeps it fast
    by_name = {r["image"]: im for r, im in zip(records[:3], S.render_images(records[:3], 56))}
    mixed = LlavaConversationDataset(_mixed_llava(records), by_name, tok, ClipImageProcessor(56), 1023,
                                     image_tokens=16)
    samples = [mixed[i] for i in range(4)]
    batch = collate(samples, pad_id=tok.pad_token_id)
    assert batch["pixel_values"].shape == (5, 3, 56, 56)
    plan = StepPlan(student=Setting(0.75, 2), teacher=Setting(0.25, 3), kl_weight=0.5, temperature=2.0)
    with torch.no_grad():
        whole = epic_forward(model, batch, plan)
        total = whole.answer_tokens
        parts = []
        for i, s in enumerate(samples):
            labels = torch.full_like(batch["labels"], IGNORE_INDEX)
            labels[i] = batch["labels"][i]
            in_batch = epic_forward(model, {**batch, "labels": labels}, plan, normalizer=total)
            alone = epic_forward(model, collate([s], pad_id=tok.pad_token_id), plan, normalizer=total)
            assert in_batch.answer_tokens == alone.answer_tokens > 0
            for key in ("sft", "kl"):
                torch.testing.assert_close(getattr(in_batch, key), getattr(alone, key), rtol=1e-4, atol=1e-6,
                                           msg=f"row {i} {key}")
            parts.append(alone)
    assert all(p.kl > 0 for p in parts[1:])                       # the teacher differs on image rows
    torch.testing.assert_close(sum(p.loss for p in parts), whole.loss, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- LLaVA-OneVision format

def _ov(conv, **keys):
    return {"id": "s", **keys, "conversations": [{"from": "human" if i % 2 == 0 else "gpt", "value": v}
                                                 for i, v in enumerate(conv)]}


def test_onevision_turns_place_every_image_and_video():
    from epic_ext.train.onevision import media_turns
    # one tag per image, in place (interleaved with the text), in any human turn
    assert media_turns(_ov(["<image> left or <image> ?", "left", "and <image>?", "no"],
                           image=["a.png", "b.png", "c.png"])) == [
        ("USER", [("image", 0), ("text", "left or"), ("image", 1), ("text", "?")]), ("ASSISTANT", [("text", "left")]),
        ("USER", [("text", "and"), ("image", 2), ("text", "?")]), ("ASSISTANT", [("text", "no")])]
    # no tag: images, then the video, before the first human turn's text
    assert media_turns(_ov(["what ?", "red", "sure ?", "yes"], image="a.png", video="clip"))[0] == \
        ("USER", [("image", 0), ("video", 0), ("text", "what ?")])
    # a video-only sample may mark its video with <image> (LLaVA-Video's data), or with <video>
    for tag in ("<image>", "<video>"):
        assert media_turns(_ov([f"{tag}\nwhat happens ?", "a dog runs"], video=["f1.png", "f2.png"]))[0] == \
            ("USER", [("video", 0), ("text", "what happens ?")])
    assert media_turns(_ov(["why ?", "because"])) == [("USER", [("text", "why ?")]),
                                                      ("ASSISTANT", [("text", "because")])]


@pytest.mark.parametrize("record,needle", [
    (_ov(["<image> and <image> ?", "x"], image="a.png"), "2 <image> and 0 <video> tags for 1 image"),
    (_ov(["<image> what ?", "x"]), "1 <image> and 0 <video> tags for 0 image"),
    (_ov(["<image> what ?", "x"], image=["a.png", "b.png"]), "for 2 image"),
    (_ov(["<video> what ?", "x"], image="a.png"), "<video>"),
    (_ov(["what ?", "<image> x"], image="a.png"), "in an answer"),
    (_ov(["what ?", "a"], image=[]), "'image' must be"),
    (_ov(["what ?", "a"], image=3), "'image' must be"),
    (_ov(["what ?", "a"], video=[1, 2]), "'video' must be"),
    (_ov(["what ?"], image="a.png"), "nothing to supervise"),
])
def test_onevision_bad_records_raise(record, needle):
    from epic_ext.train.onevision import media_turns
    with pytest.raises(ValueError, match="json_path_or_records") as err:
        media_turns(record)
    assert needle in str(err.value)


# --------------------------------------------------------------------------- Qwen-VL: the processor's encoding

def _qwen_media():
    from epic_ext.models import tiny_qwen as tq
    g = np.random.default_rng(4)
    frames = np.stack([tq.random_image(56, 56, g) for _ in range(3)])
    return {"a.png": tq.random_image(56, 84, g), "b.png": tq.random_image(112, 84, g), "clip": frames,
            "f1.png": frames[0], "f2.png": frames[1]}


QWEN_RECORDS = [
    _ov(["<image> what is this ? <image>", "a red dog", "and the sky ?", "blue"], image=["a.png", "b.png"]),
    _ov(["<image>\nwhat is the man holding ?", "he is running"], video="clip", fps=1),
    _ov(["what color is the sky ?", "blue"]),
    _ov(["how many bird ?", "three"], image="b.png", video=["f1.png", "f2.png"]),
]


@pytest.fixture(scope="module")
def qwen_ds():
    pytest.importorskip("torchvision", reason="transformers' Qwen-VL processors need torchvision")
    from epic_ext.models import tiny_qwen as tq
    from epic_ext.train.onevision import ProcessorConversationDataset
    return ProcessorConversationDataset(QWEN_RECORDS, _qwen_media(), tq.tiny_qwen_processor("qwen2_5_vl"))


def test_qwen_samples_answer_only_labels(qwen_ds):
    from epic_ext.models import tiny_qwen as tq
    tok = qwen_ds.processor.tokenizer
    for i, record in enumerate(QWEN_RECORDS):
        s = qwen_ds[i]
        ids, labels, q = s["input_ids"], s["labels"], s["query_index"]
        sup = labels != IGNORE_INDEX
        assert (labels[sup] == ids[sup]).all()
        answers = [t["value"] for t in record["conversations"][1::2]]
        # each answer and the <|im_end|> that closes it, nothing else (not the header, not the "\n")
        expected = sum((tok(a, add_special_tokens=False)["input_ids"] + [tq.IM_END_ID] for a in answers), [])
        assert labels[sup].tolist() == expected and s["answers"] == answers
        # query_index: the generation prompt's last token ("<|im_start|>assistant"), before the first answer
        assert q == sup.nonzero()[0].item() - 1 and ids[q - 1:q + 1].tolist() == qwen_ds.header_ids
        # the prompt is what the chat template's generation prompt gives
        assert (s["mm_token_type_ids"] > 0).sum() == (ids == tq.IMAGE_ID).sum() + (ids == tq.VIDEO_ID).sum()
    assert "pixel_values" not in qwen_ds[2] and "pixel_values_videos" not in qwen_ds[0]
    assert qwen_ds[3]["image_grid_thw"].shape == (1, 3) and qwen_ds[3]["video_grid_thw"].tolist() == [[1, 4, 4]]
    assert qwen_ds[1]["second_per_grid_ts"].tolist() == [2.0]         # 2 frames a group at 1 fps


@pytest.mark.parametrize("side", ["right", "left"])
def test_qwen_collate_rows_match_each_row_alone(qwen_ds, side):
    """A mixed batch (two images, a video, text only, image + video) through the tiny
    Qwen2.5-VL gives every row the logits it has alone: pixels, grids and mm_token_type_ids are
    concatenated in row order, as the model consumes them."""
    from epic_ext.models import tiny_qwen as tq
    samples = [qwen_ds[i] for i in range(len(QWEN_RECORDS))]
    batch = collate(samples, pad_id=tq.PAD_ID, padding_side=side)
    assert batch["pixel_values"].shape[0] == sum(len(s["pixel_values"]) for s in samples if "pixel_values" in s)
    assert batch["image_grid_thw"].shape == (3, 3) and batch["video_grid_thw"].shape == (2, 3)
    assert batch["second_per_grid_ts"].shape == (2,)
    model = tq.build_tiny_qwen("qwen2_5_vl", seed=2)
    with torch.no_grad():
        whole = model(**{k: v for k, v in batch.items() if k not in ("labels", "query_index")}).logits
        for i, s in enumerate(samples):
            alone = collate([s], pad_id=tq.PAD_ID)
            ref = model(**{k: v for k, v in alone.items() if k not in ("labels", "query_index")}).logits[0]
            real = batch["attention_mask"][i].bool()
            torch.testing.assert_close(whole[i, real], ref, rtol=1e-4, atol=1e-4)
            assert batch["input_ids"][i, batch["query_index"][i]] == s["input_ids"][s["query_index"]]
            assert (batch["labels"][i][~real] == IGNORE_INDEX).all()
            assert (batch["mm_token_type_ids"][i][~real] == 0).all()


def test_qwen_media_from_a_folder(tmp_path, qwen_ds):
    from PIL import Image

    from epic_ext.train.onevision import ProcessorConversationDataset
    media = _qwen_media()
    for name in ("a.png", "b.png"):
        Image.fromarray(media[name]).save(tmp_path / name)
    (tmp_path / "clip").mkdir()
    for i, frame in zip((2, 10, 9), media["clip"]):           # natural order: 2, 9, 10
        Image.fromarray(frame).save(tmp_path / "clip" / f"f{i}.png")
    for i in (1, 2):
        Image.fromarray(media["clip"][i - 1]).save(tmp_path / f"f{i}.png")
    path = tmp_path / "data.json"
    path.write_text(json.dumps(QWEN_RECORDS))
    disk = ProcessorConversationDataset(str(path), str(tmp_path), qwen_ds.processor)
    frames = disk.load_video("clip")
    assert np.array_equal(frames, media["clip"][[0, 2, 1]])
    for i in (0, 3):
        a, b = disk[i], qwen_ds[i]
        for key in ("input_ids", "labels", "pixel_values", "image_grid_thw", "pixel_values_videos"):
            if key in b:
                assert torch.equal(a[key], b[key]), key


def test_qwen_bad_media_and_lengths_raise(tmp_path, qwen_ds):
    from epic_ext.train.onevision import ProcessorConversationDataset
    proc, media = qwen_ds.processor, _qwen_media()
    missing = [_ov(["what ?", "a"], image="nope.png")]
    with pytest.raises(ValueError, match=r"media: sample 's': 'nope.png' not found"):
        ProcessorConversationDataset(missing, media, proc)
    with pytest.raises(ValueError, match=r"media: sample 's': 'nope.png' not found"):
        ProcessorConversationDataset(missing, str(tmp_path), proc)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="'empty' not found"):              # a video folder without frames
        ProcessorConversationDataset([_ov(["what ?", "a"], video="empty")], str(tmp_path), proc)
    with pytest.raises(ValueError, match="media: no such folder"):
        ProcessorConversationDataset(QWEN_RECORDS, str(tmp_path / "none"), proc)
    with pytest.raises(ValueError, match="media: expected"):
        ProcessorConversationDataset(QWEN_RECORDS, [1, 2], proc)
    with pytest.raises(ValueError, match="'fps' must be"):
        ProcessorConversationDataset([_ov(["what ?", "a"], video="clip", fps=0)], media, proc)
    with pytest.raises(ValueError, match="processor"):
        ProcessorConversationDataset(QWEN_RECORDS, media, proc.tokenizer.backend_tokenizer)
    # text-only data needs no media at all
    assert len(ProcessorConversationDataset([QWEN_RECORDS[2]], None, proc)[0]["input_ids"]) > 0
    with pytest.raises(ValueError, match="not found in the given media"):
        ProcessorConversationDataset(QWEN_RECORDS, None, proc)
    # truncation: text after the first answer may go; an image or the first answer may not
    full = qwen_ds[0]
    cut = ProcessorConversationDataset(QWEN_RECORDS[:1], media, proc, max_length=full["query_index"] + 3)[0]
    assert torch.equal(cut["labels"], full["labels"][:full["query_index"] + 3])
    assert len(cut["mm_token_type_ids"]) == len(cut["input_ids"]) == full["query_index"] + 3
    with pytest.raises(ValueError, match="max_length: sample 's' needs"):
        ProcessorConversationDataset(QWEN_RECORDS[:1], media, proc, max_length=full["query_index"])[0]


def test_qwen_prompt_only(qwen_ds):
    p = prompt_only(qwen_ds[3])
    s = qwen_ds[3]
    assert p["input_ids"].tolist() == s["input_ids"][:s["query_index"] + 1].tolist()
    assert torch.equal(p["pixel_values"], s["pixel_values"]) and p["answer"] == "three"
    later = {**qwen_ds[0], "mm_token_type_ids": torch.ones_like(qwen_ds[0]["mm_token_type_ids"])}
    with pytest.raises(ValueError, match="after its first answer"):
        prompt_only(later)


def test_qwen_unknown_words_warn(qwen_ds):
    import warnings

    from epic_ext.train.onevision import ProcessorConversationDataset
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # every word of QWEN_RECORDS is in the tiny vocabulary
        ProcessorConversationDataset(QWEN_RECORDS, _qwen_media(), qwen_ds.processor)
    with pytest.warns(UserWarning, match=r"2 of 4 text tokens \(50.0%\).*\[UNK\].*'triangle', 'circles'"):
        ProcessorConversationDataset([_ov(["triangle circles ?", "red"])], None, qwen_ds.processor)
