"""LLaVA conversation data for EPIC training: tokenisation with answer-only labels, CLIP image
preprocessing, padding collate, and prompt-only batches for evaluation.

Text follows LLaVA-1.5's ``v1`` conversation format (optional system prompt, then)::

    USER: <image>\\n{question} ASSISTANT: {answer}</s>USER: {question 2} ASSISTANT: {answer 2}</s>

Tokenisation works for any fast tokenizer (the synthetic word-level one or a real checkpoint's):
like LLaVA's ``tokenizer_image_token`` the text is split at ``<image>``, both halves are
tokenised (BOS only in front, if the tokenizer uses one) and ``image_tokens`` copies of
``image_token_id`` go in between. Supervision comes from character offsets: a token is labelled
when it overlaps an answer (with the space before it) or the EOS that closes it. So the ids are
those of the text in context (no per-segment re-tokenisation artefacts) and the labels need no
tokenizer-specific length arithmetic (LLaVA's "-2" offsets).
"""
from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

IGNORE_INDEX = -100
IMAGE_TAG = "<image>"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                "helpful, detailed, and polite answers to the human's questions.")
_ROLES = {"human": "USER", "user": "USER", "gpt": "ASSISTANT", "assistant": "ASSISTANT"}


# --------------------------------------------------------------------------- text

def format_conversation(turns: Sequence[tuple[str, str]], eos: str, system: str | None = None
                        ) -> tuple[str, list[tuple[int, int]]]:
    """LLaVA-1.5 ``v1`` text of ``turns`` ([(role, text)], role "USER"/"ASSISTANT") and the
    character span of each answer: from the space after ``ASSISTANT:`` through the ``eos`` that
    closes it. The space belongs to the answer because subword tokenizers attach it to the next
    word ("▁red") or emit it alone ("▁"); either way the prompt then ends at ``ASSISTANT:``, the
    generation prompt LLaVA evaluates with."""
    parts, spans, pos = [], [], 0
    if system:
        parts.append(system + " ")
        pos += len(parts[-1])
    for role, text in turns:
        if role == "USER":
            parts.append(f"USER: {text} ")
        else:
            head = "ASSISTANT:"
            parts.append(head + " " + text + eos)
            spans.append((pos + len(head), pos + len(parts[-1])))
        pos += len(parts[-1])
    return "".join(parts), spans


def normalize_turns(record: dict, where: str = "json_path_or_records") -> list[tuple[str, str]]:
    """[(role, text)] of a LLaVA record, checked: roles alternate human/gpt starting with a human
    turn and ending with an answer, exactly one ``<image>`` tag in a human turn, moved to the front
    of that turn as ``<image>\\n`` (what LLaVA's ``preprocess_multimodal`` does)."""
    rid = record.get("id", "?") if isinstance(record, dict) else "?"
    conv = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(conv, list) or not conv:
        raise ValueError(f"{where}: sample {rid!r} has no 'conversations' list")
    turns = []
    for j, msg in enumerate(conv):
        role = _ROLES.get(str(msg.get("from", msg.get("role", ""))).lower()) if isinstance(msg, dict) else None
        if role is None:
            raise ValueError(f"{where}: sample {rid!r} turn {j} has no known 'from' (human/gpt)")
        if role != ("USER" if j % 2 == 0 else "ASSISTANT"):
            raise ValueError(f"{where}: sample {rid!r} turn {j}: turns must alternate human, gpt, ...")
        text = msg.get("value", msg.get("content"))
        if not isinstance(text, str):
            raise ValueError(f"{where}: sample {rid!r} turn {j} has no text 'value'")
        turns.append((role, text))
    if turns[-1][0] != "ASSISTANT":
        raise ValueError(f"{where}: sample {rid!r} ends with a question: nothing to supervise")
    tags = sum(t.count(IMAGE_TAG) for _, t in turns)
    if tags != 1 or any(IMAGE_TAG in t for r, t in turns if r == "ASSISTANT"):
        raise ValueError(f"{where}: sample {rid!r} has {tags} {IMAGE_TAG} tags; need exactly one, in a human turn")
    out = []
    for role, text in turns:
        if IMAGE_TAG in text:
            text = IMAGE_TAG + "\n" + text.replace(IMAGE_TAG, "").strip()
        out.append((role, text.strip()))
    return out


def _bos_prefix(tokenizer) -> list[int]:
    """[bos] when the tokenizer puts one in front of a text, else []: the BOS goes before the whole
    conversation only, never before the second half."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    return [bos] if tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [bos] else []


def encode_conversation(turns: Sequence[tuple[str, str]], tokenizer, image_token_id: int, image_tokens: int,
                        system: str | None = None, bos: list[int] | None = None
                        ) -> tuple[list[int], list[int], int, int]:
    """(input_ids, labels, query_index, image_start) of normalised ``turns``; labels are
    IGNORE_INDEX except on answer tokens and each answer's EOS; ``query_index`` is the last
    token before the first answer."""
    if tokenizer.eos_token is None:
        raise ValueError("tokenizer: needs an eos_token (it closes every answer)")
    text, spans = format_conversation(turns, tokenizer.eos_token, system)
    before, after = text.split(IMAGE_TAG)
    bos = _bos_prefix(tokenizer) if bos is None else bos
    ids, labels = list(bos), [IGNORE_INDEX] * len(bos)
    for chunk, shift in ((before, 0), (after, len(before) + len(IMAGE_TAG))):
        enc = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
        for tid, (s, e) in zip(enc["input_ids"], enc["offset_mapping"]):
            s, e = s + shift, e + shift
            hit = any(s < b and e > a for a, b in spans)
            ids.append(tid)
            labels.append(tid if hit else IGNORE_INDEX)
        if shift == 0:
            image_start = len(ids)
            ids += [image_token_id] * image_tokens
            labels += [IGNORE_INDEX] * image_tokens
    first = next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), None)
    if first is None:
        raise ValueError("tokenizer: no token overlaps an answer (empty answers?)")
    return ids, labels, first - 1, image_start


# --------------------------------------------------------------------------- images

class ClipImageProcessor:
    """LLaVA-1.5's image preprocessing with PIL + torch, offline: optional pad to a square with the
    mean colour (LLaVA-1.5's ``image_aspect_ratio="pad"``), bicubic resize of the short side to
    ``size``, centre crop, scale to [0, 1], CLIP mean/std normalisation. Returns [3, size, size]
    float32."""

    def __init__(self, size: int = 336, pad_to_square: bool = True, mean=CLIP_MEAN, std=CLIP_STD):
        self.size, self.pad_to_square = size, pad_to_square
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __call__(self, image) -> Tensor:
        import numpy as np
        from PIL import Image
        image = image.convert("RGB")
        w, h = image.size
        if self.pad_to_square and w != h:
            side = max(w, h)
            canvas = Image.new("RGB", (side, side), tuple(int(m * 255) for m in self.mean.flatten().tolist()))
            canvas.paste(image, ((side - w) // 2, (side - h) // 2))
            image, w, h = canvas, side, side
        if (w, h) != (self.size, self.size):
            # Short side -> size, long side truncated: the same output size as CLIPImageProcessor.
            nw, nh = (self.size, int(self.size * h / w)) if w <= h else (int(self.size * w / h), self.size)
            image = image.resize((nw, nh), Image.BICUBIC)
            left, top = (nw - self.size) // 2, (nh - self.size) // 2
            image = image.crop((left, top, left + self.size, top + self.size))
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - self.mean) / self.std


def llava_processor(model_config, tokenizer, image_size: int = 336):
    """A transformers ``LlavaProcessor`` that prepares inputs as training did: the
    :class:`ClipImageProcessor` steps (pad to square with the mean colour, bicubic resize, centre
    crop, CLIP normalisation) as a ``LlavaImageProcessor``, ``tokenizer`` with its chat template,
    and ``<image>`` expanded to the model's image-token count. Saved next to a trained model so
    that ``AutoProcessor.from_pretrained`` loads a complete checkpoint."""
    from transformers import LlavaImageProcessor, LlavaProcessor
    from transformers.image_utils import PILImageResampling

    image_processor = LlavaImageProcessor(
        do_pad=True, do_resize=True, size={"shortest_edge": image_size}, resample=PILImageResampling.BICUBIC,
        do_center_crop=True, crop_size={"height": image_size, "width": image_size}, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
        do_convert_rgb=True)
    vision = model_config.vision_config
    strategy = model_config.vision_feature_select_strategy
    # LlavaProcessor counts (size / patch)^2 + num_additional_image_tokens and drops one for
    # "default": a CLIP tower's [CLS] is the additional token, and LLaVA drops it.
    has_cls = getattr(vision, "model_type", "") == "clip_vision_model"
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision.patch_size,
                          vision_feature_select_strategy=strategy,
                          num_additional_image_tokens=1 if has_cls else 0,
                          image_token=tokenizer.convert_ids_to_tokens(model_config.image_token_id),
                          chat_template=getattr(tokenizer, "chat_template", None))


def _pixels(processor, image) -> Tensor:
    if isinstance(image, Tensor):            # already preprocessed (e.g. cached)
        return image
    # Duck-typed so the (slow) transformers image module is never imported for the built-in one.
    if hasattr(processor, "preprocess") and hasattr(processor, "image_mean"):
        out = processor(images=image, return_tensors="pt")["pixel_values"]
        return torch.as_tensor(out[0]).float()
    return processor(image)


# --------------------------------------------------------------------------- dataset

class LlavaConversationDataset(torch.utils.data.Dataset):
    """LLaVA conversation JSON (single- or multi-turn, exactly one ``<image>`` per sample) as
    training samples.

    ``json_path_or_records``: a JSON file path or the list of records. ``image_folder_or_images``:
    a folder holding each record's ``image`` file, a mapping file name -> PIL image (or
    preprocessed [3, H, W] tensor), or a sequence aligned with the records. ``image_processor``:
    None (:class:`ClipImageProcessor` at 336 px), a transformers image processor, or any callable
    PIL image -> [3, H, W] tensor. Structure and image presence are checked up front (ValueError
    naming the argument); tokenisation is lazy.

    A sample: ``{"id": str, "input_ids": int64 [L], "labels": int64 [L], "query_index": int,
    "image_start": int, "pixel_values": float32 [3, H, W], "questions": [str], "answers": [str]}``.
    """

    def __init__(self, json_path_or_records, image_folder_or_images, tokenizer, image_processor=None,
                 image_token_id: int | None = None, image_tokens: int = 576, max_length: int | None = 2048,
                 system: str | None = None):
        if isinstance(json_path_or_records, (str, os.PathLike)):
            path = Path(json_path_or_records)
            if not path.is_file():
                raise ValueError(f"json_path_or_records: no such file {str(path)!r}")
            try:
                with open(path) as f:
                    records = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"json_path_or_records: {str(path)!r} is not valid JSON ({e})") from None
        else:
            records = json_path_or_records
        if not isinstance(records, (list, tuple)):
            raise ValueError("json_path_or_records: expected a JSON list of records or a list of dicts")
        self.records = list(records)
        self.turns = [normalize_turns(r) for r in self.records]

        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("tokenizer: needs a fast tokenizer (labels come from its offset mapping)")
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer: needs an eos_token (it closes every answer)")
        if image_token_id is None:
            image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TAG)
            if image_token_id is None or image_token_id == tokenizer.unk_token_id:
                raise ValueError("image_token_id: not given and the tokenizer has no <image> token")
        if image_tokens < 1:
            raise ValueError(f"image_tokens: must be >= 1, got {image_tokens}")
        if max_length is not None and max_length <= image_tokens:
            raise ValueError(f"max_length: {max_length} leaves no room for text next to {image_tokens} image tokens")
        self.tokenizer, self.image_token_id, self.image_tokens = tokenizer, int(image_token_id), image_tokens
        self.max_length, self.system = max_length, system
        self.image_processor = ClipImageProcessor() if image_processor is None else image_processor
        self._bos = _bos_prefix(tokenizer)
        self._warn_unknown_words()

        # Kept as plain attributes (no closures) so the dataset pickles into spawned DataLoader workers.
        images = image_folder_or_images
        self._folder, self._images, self._by_name = None, None, False
        if isinstance(images, (str, os.PathLike)):
            folder = Path(images)
            if not folder.is_dir():
                raise ValueError(f"image_folder_or_images: no such folder {str(folder)!r}")
            for r in self.records:
                if not isinstance(r.get("image"), str) or not (folder / r["image"]).is_file():
                    raise ValueError(f"image_folder_or_images: sample {r.get('id', '?')!r}: image "
                                     f"{r.get('image')!r} not found in {str(folder)!r}")
            self._folder = folder
        elif isinstance(images, Mapping):
            for r in self.records:
                if r.get("image") not in images:
                    raise ValueError(f"image_folder_or_images: sample {r.get('id', '?')!r}: image "
                                     f"{r.get('image')!r} is not in the given mapping")
            self._images, self._by_name = images, True
        elif isinstance(images, Sequence):
            if len(images) != len(self.records):
                raise ValueError(f"image_folder_or_images: {len(images)} images for {len(self.records)} records")
            self._images = images
        else:
            raise ValueError("image_folder_or_images: expected a folder, a mapping file name -> image, or a list")

    def _warn_unknown_words(self) -> None:
        # The offline word-level tokenizer maps every word outside its closed vocabulary to
        # <unk>: a dataset written for another vocabulary would train on <unk>s without a word.
        from .tokenizer import is_closed_vocabulary, unknown_words
        if not is_closed_vocabulary(self.tokenizer):
            return
        texts = [text.replace(IMAGE_TAG, " ") for turns in self.turns for _, text in turns]
        n_unk, total, examples = unknown_words(self.tokenizer, texts)
        if n_unk:
            warnings.warn(f"tokenizer: {n_unk} of {total} text tokens ({n_unk / total:.1%}) of this dataset are not "
                          f"in the tokenizer's closed vocabulary and become {self.tokenizer.unk_token} "
                          f"(e.g. {', '.join(repr(w) for w in examples)}); use a tokenizer that covers the "
                          f"data's words", UserWarning, stacklevel=3)

    def __len__(self) -> int:
        return len(self.records)

    def load_image(self, i: int):
        if self._folder is not None:
            from PIL import Image
            with Image.open(self._folder / self.records[i]["image"]) as f:
                return f.convert("RGB")
        return self._images[self.records[i]["image"]] if self._by_name else self._images[i]

    def encode(self, i: int) -> dict:
        """The text side of sample ``i`` (no image loading)."""
        ids, labels, q, start = encode_conversation(self.turns[i], self.tokenizer, self.image_token_id,
                                                    self.image_tokens, self.system, self._bos)
        rid = self.records[i].get("id", str(i))
        if self.max_length is not None and len(ids) > self.max_length:
            # Right truncation like LLaVA (later turns lose supervision), but the image and the
            # first answer's first token must survive, or the sample would train nothing.
            if q + 2 > self.max_length:
                raise ValueError(f"max_length: sample {rid!r} needs {q + 2} tokens to reach its first answer, "
                                 f"max_length is {self.max_length}")
            ids, labels = ids[:self.max_length], labels[:self.max_length]
        return {"id": rid, "input_ids": torch.tensor(ids, dtype=torch.long),
                "labels": torch.tensor(labels, dtype=torch.long), "query_index": q, "image_start": start,
                "questions": [t.replace(IMAGE_TAG, "").strip() for r, t in self.turns[i] if r == "USER"],
                "answers": [t for r, t in self.turns[i] if r == "ASSISTANT"]}

    def __getitem__(self, i: int) -> dict:
        sample = self.encode(i)
        sample["pixel_values"] = _pixels(self.image_processor, self.load_image(i)).float()
        return sample

    def references(self) -> list[str]:
        """Each sample's first answer (what :func:`prompt_only` evaluation compares against)."""
        return [next(t for r, t in turns if r == "ASSISTANT") for turns in self.turns]


# --------------------------------------------------------------------------- batching

def collate(batch: Sequence[dict], pad_id: int, padding_side: str = "right",
            pad_to_multiple_of: int | None = None) -> dict:
    """Pad samples into tensors: ``input_ids`` int64 [B, L] (``pad_id``), ``attention_mask`` int64
    [B, L], ``labels`` int64 [B, L] (IGNORE_INDEX on padding; only when the samples have labels),
    ``pixel_values`` float32 [B, 3, H, W], ``query_index`` int64 [B] (shifted by each row's left
    padding). Use ``functools.partial(collate, pad_id=...)`` as a DataLoader ``collate_fn``."""
    if not batch:
        raise ValueError("batch: empty")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side: must be 'left' or 'right', got {padding_side!r}")
    length = max(len(s["input_ids"]) for s in batch)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    b = len(batch)
    has_labels = all("labels" in s for s in batch)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    mask = torch.zeros(b, length, dtype=torch.long)
    labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long) if has_labels else None
    query = torch.empty(b, dtype=torch.long)
    for i, s in enumerate(batch):
        n = len(s["input_ids"])
        off = length - n if padding_side == "left" else 0
        input_ids[i, off:off + n] = torch.as_tensor(s["input_ids"])
        mask[i, off:off + n] = 1
        if has_labels:
            labels[i, off:off + n] = torch.as_tensor(s["labels"])
        query[i] = int(s["query_index"]) + off
    out = {"input_ids": input_ids, "attention_mask": mask}
    if has_labels:
        out["labels"] = labels
    out["pixel_values"] = torch.stack([torch.as_tensor(s["pixel_values"]) for s in batch]).float()
    out["query_index"] = query
    return out


def prompt_only(sample: dict) -> dict:
    """A sample cut to its first prompt (everything up to and including ``query_index``: what the
    model sees before it generates the first answer) with ``answer``, the reference."""
    q = int(sample["query_index"])
    return {"id": sample.get("id"), "input_ids": torch.as_tensor(sample["input_ids"])[:q + 1],
            "pixel_values": sample["pixel_values"], "query_index": q, "answer": sample["answers"][0]}


def collate_prompts(batch: Sequence[dict], pad_id: int) -> tuple[dict, list[str]]:
    """Left-padded generation batch of prompts (training samples are cut with
    :func:`prompt_only` first) and the reference answers. The batch has ``input_ids``,
    ``attention_mask``, ``pixel_values`` and ``query_index`` (= L - 1 for every row)."""
    prompts = [s if "answer" in s else prompt_only(s) for s in batch]
    return collate(prompts, pad_id, padding_side="left"), [p["answer"] for p in prompts]
