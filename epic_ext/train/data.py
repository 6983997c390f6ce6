"""LLaVA conversation data for EPIC training: tokenisation with answer-only labels, CLIP image
preprocessing, padding collate (shared by every family), and prompt-only batches for evaluation.
The LLaVA-OneVision format through a family's own processor (Qwen-VL) is ``onevision.py``.

Text follows LLaVA-1.5's ``v1`` conversation format (optional system prompt, then)::

    USER: <image>\\n{question} ASSISTANT: {answer}</s>USER: {question 2} ASSISTANT: {answer 2}</s>

Tokenisation works for any fast tokenizer (the synthetic word-level one or a real checkpoint's):
like LLaVA's ``tokenizer_image_token`` the text is split at each ``<image>``, the pieces are
tokenised (BOS only in front, if the tokenizer uses one) and ``image_tokens`` copies of
``image_token_id`` go in each tag's place (none in a text-only sample). Supervision comes from
character offsets: a token is labelled when it overlaps an answer (with the space before it) or
the EOS that closes it. So the ids are those of the text in context (no per-segment
re-tokenisation artefacts) and the labels need no tokenizer-specific length arithmetic (LLaVA's
"-2" offsets).
"""
from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

IGNORE_INDEX = -100
IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                "helpful, detailed, and polite answers to the human's questions.")
# The visual inputs of the processor-encoded families, concatenated along dim 0 by collate (rows
# own their items in order, as the processors batch them).
MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
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


def normalize_turns(record: dict, where: str = "json_path_or_records", num_images: Optional[int] = None
                    ) -> list[tuple[str, str]]:
    """[(role, text)] of a LLaVA record, checked: roles alternate human/gpt starting with a human
    turn and ending with an answer, one ``<image>`` tag per image, in human turns (none for a
    text-only sample). As LLaVA-NeXT's ``preprocess_multimodal`` (LLaVA-1.5's for one image): a
    turn with one tag has it moved to its front as ``<image>\\n``; a turn with several keeps them
    in place (interleaved text refers to them in order). As LLaVA's training code, leading answer
    turns are skipped, and so is a last question without an answer (it supervises nothing).
    ``num_images``: the sample's image count; None: the record's ``"image"`` key (a path or a list
    of paths), or its tags when it has none."""
    rid = record.get("id", "?") if isinstance(record, dict) else "?"
    turns = _checked_turns(_answered_turns(record), where)
    tags = sum(t.count(IMAGE_TAG) for _, t in turns)
    if num_images is None:
        num_images = len(sample_media(record, where)[0]) if record.get("image") is not None else tags
    if any(IMAGE_TAG in t for r, t in turns if r == "ASSISTANT"):
        raise ValueError(f"{where}: sample {rid!r} has an {IMAGE_TAG} tag in an answer; tags go in human turns")
    if tags != num_images:
        raise ValueError(f"{where}: sample {rid!r} has {tags} {IMAGE_TAG} tags for {num_images} image(s); need "
                         f"one per image, in human turns (none for a text-only sample)")
    out = []
    for role, text in turns:
        if text.count(IMAGE_TAG) == 1:
            text = IMAGE_TAG + "\n" + text.replace(IMAGE_TAG, "").strip()
        out.append((role, text.strip()))
    return out


def _answered_turns(record):
    """``record`` without leading answer turns (LLaVA's ``preprocess`` skips them; some ShareGPT
    conversations of mix665k start with one) and without a last question that has no answer; a
    conversation that would be left without an answer is returned as is (its check then says
    why)."""
    conv = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(conv, list):
        return record

    def role(msg):
        return _ROLES.get(str(msg.get("from", msg.get("role", ""))).lower()) if isinstance(msg, dict) else None
    start, end = 0, len(conv)
    while start < end and role(conv[start]) == "ASSISTANT":
        start += 1
    if end - start > 1 and role(conv[end - 1]) == "USER":
        end -= 1
    if end - start < 2 or (start, end) == (0, len(conv)):
        return record
    return {**record, "conversations": conv[start:end]}


def _checked_turns(record: dict, where: str) -> list[tuple[str, str]]:
    """[(role, text)] of a record's ``conversations``: roles alternate human/gpt, starting with a
    human turn and ending with an answer (texts as given)."""
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
    return turns


def sample_media(record: dict, where: str = "json_path_or_records") -> tuple[list[str], Optional[object]]:
    """(image names, video) of a LLaVA-OneVision record: ``"image"`` a path or a list of paths
    (absent: no image), ``"video"`` a folder of frames or a list of frame files (absent: none)."""
    rid = record.get("id", "?")
    image, video = record.get("image"), record.get("video")
    if image is None:
        images = []
    elif isinstance(image, str):
        images = [image]
    elif isinstance(image, list) and image and all(isinstance(x, str) for x in image):
        images = list(image)
    else:
        raise ValueError(f"{where}: sample {rid!r}: 'image' must be a path or a non-empty list of paths, "
                         f"got {image!r}")
    if video is not None and not (isinstance(video, str) or (
            isinstance(video, list) and video and all(isinstance(x, str) for x in video))):
        raise ValueError(f"{where}: sample {rid!r}: 'video' must be a folder of frames or a non-empty list of "
                         f"frame files, got {video!r}")
    return images, video


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
    """(input_ids, labels, query_index, image_starts) of normalised ``turns``; labels are
    IGNORE_INDEX except on answer tokens and each answer's EOS; ``query_index`` is the last
    token before the first answer; ``image_starts``: the first placeholder of each ``<image>``,
    in order ([] for a text-only conversation). As LLaVA's ``tokenizer_image_token``, the text
    between tags is tokenised piece by piece and each tag becomes ``image_tokens`` placeholders."""
    if tokenizer.eos_token is None:
        raise ValueError("tokenizer: needs an eos_token (it closes every answer)")
    text, spans = format_conversation(turns, tokenizer.eos_token, system)
    bos = _bos_prefix(tokenizer) if bos is None else bos
    ids, labels, image_starts = list(bos), [IGNORE_INDEX] * len(bos), []
    chunks, shift = text.split(IMAGE_TAG), 0
    for j, chunk in enumerate(chunks):
        enc = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
        for tid, (s, e) in zip(enc["input_ids"], enc["offset_mapping"]):
            s, e = s + shift, e + shift
            hit = any(s < b and e > a for a, b in spans)
            ids.append(tid)
            labels.append(tid if hit else IGNORE_INDEX)
        if j + 1 < len(chunks):
            image_starts.append(len(ids))
            ids += [image_token_id] * image_tokens
            labels += [IGNORE_INDEX] * image_tokens
        shift += len(chunk) + len(IMAGE_TAG)
    first = next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), None)
    if first is None:
        raise ValueError("tokenizer: no token overlaps an answer (empty answers?)")
    return ids, labels, first - 1, image_starts


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
    from transformers import LlavaImageProcessorPil, LlavaProcessor
    from transformers.image_utils import PILImageResampling

    # The PIL backend, as training's ClipImageProcessor: with torchvision installed the default
    # class resizes with torchvision's bicubic, up to 0.015 away from what the model trained on.
    image_processor = LlavaImageProcessorPil(
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

def read_records(json_path_or_records) -> list:
    """The records of a conversation JSON file (a list), or the given list."""
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
    return list(records)


class LlavaConversationDataset(torch.utils.data.Dataset):
    """LLaVA conversation JSON (single- or multi-turn) as training samples: one image per sample
    (LLaVA-1.5), several (``"image": [paths]``, one ``<image>`` each), or none (no ``"image"``
    key, no tag: the text-only conversations of LLaVA-1.5's mix665k); see :func:`normalize_turns`.

    ``json_path_or_records``: a JSON file path or the list of records. ``image_folder_or_images``:
    a folder holding the records' image files, a mapping file name -> PIL image (or
    preprocessed [3, H, W] tensor), or a sequence aligned with the records (per record: an image,
    a list of its images, or None for a text-only record). ``image_processor``: None
    (:class:`ClipImageProcessor` at 336 px), a transformers image processor, or any callable PIL
    image -> [3, H, W] tensor. Structure, tag counts and image presence are checked up front
    (ValueError naming the argument); tokenisation is lazy.

    A sample: ``{"id": str, "input_ids": int64 [L], "labels": int64 [L], "query_index": int,
    "image_start": int, "image_starts": [int], "pixel_values": float32 [3, H, W], "questions":
    [str], "answers": [str]}``; with several images ``pixel_values`` is [n, 3, H, W] (prompt
    order); a text-only sample has no ``pixel_values`` and ``image_start`` None.
    """

    def __init__(self, json_path_or_records, image_folder_or_images, tokenizer, image_processor=None,
                 image_token_id: int | None = None, image_tokens: int = 576, max_length: int | None = 2048,
                 system: str | None = None):
        self.records = read_records(json_path_or_records)

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

        # Kept as plain attributes (no closures) so the dataset pickles into spawned DataLoader workers.
        images = image_folder_or_images
        self._folder, self._images, self._by_name = None, None, False
        if isinstance(images, (str, os.PathLike)):
            folder = Path(images)
            if not folder.is_dir():
                raise ValueError(f"image_folder_or_images: no such folder {str(folder)!r}")
            self._folder = folder
        elif isinstance(images, Mapping):
            self._images, self._by_name = images, True
        elif isinstance(images, Sequence):
            if len(images) != len(self.records):
                raise ValueError(f"image_folder_or_images: {len(images)} images for {len(self.records)} records")
            self._images = images
        else:
            raise ValueError("image_folder_or_images: expected a folder, a mapping file name -> image, or a list")
        self.image_names, counts = [], []
        for i, r in enumerate(self.records):
            if not isinstance(r, dict):
                raise ValueError(f"json_path_or_records: record {i} is not a mapping")
            if r.get("video") is not None:
                raise ValueError(f"json_path_or_records: sample {r.get('id', '?')!r} has a 'video'; LLaVA-1.5 "
                                 f"takes images only")
            # From a folder or a mapping the record's "image" names its files; an aligned sequence
            # holds the images themselves (a record's "image" key is then not needed).
            names = sample_media(r)[0]
            if self._folder is not None or self._by_name:
                for name in names:
                    found = (self._folder / name).is_file() if self._folder is not None else name in self._images
                    if not found:
                        where = f"not found in {str(self._folder)!r}" if self._folder is not None \
                            else "is not in the given mapping"
                        raise ValueError(f"image_folder_or_images: sample {r.get('id', '?')!r}: image {name!r} {where}")
                counts.append(len(names))
            else:
                item = self._images[i]
                counts.append(0 if item is None else len(item) if isinstance(item, (list, tuple)) else 1)
            self.image_names.append(names)
        self.turns = [normalize_turns(r, num_images=n) for r, n in zip(self.records, counts)]
        self._warn_unknown_words()

    def _warn_unknown_words(self) -> None:
        # The offline word-level tokenizer maps every word outside its closed vocabulary to
        # <unk>: a dataset written for another vocabulary would train on <unk>s without a word.
        from .tokenizer import is_closed_vocabulary
        if not is_closed_vocabulary(self.tokenizer):
            return
        warn_unknown_words(self.tokenizer, [text.replace(IMAGE_TAG, " ") for turns in self.turns for _, text in turns],
                           stacklevel=4)

    def __len__(self) -> int:
        return len(self.records)

    def load_images(self, i: int) -> list:
        """Sample ``i``'s images in prompt order ([] for a text-only sample)."""
        if self._folder is not None:
            from PIL import Image
            out = []
            for name in self.image_names[i]:
                with Image.open(self._folder / name) as f:
                    out.append(f.convert("RGB"))
            return out
        if self._by_name:
            return [self._images[name] for name in self.image_names[i]]
        item = self._images[i]
        return [] if item is None else list(item) if isinstance(item, (list, tuple)) else [item]

    def load_image(self, i: int):
        """The image of one-image sample ``i``."""
        images = self.load_images(i)
        if len(images) != 1:
            raise ValueError(f"i: sample {i} has {len(images)} images, not one (use load_images)")
        return images[0]

    def encode(self, i: int) -> dict:
        """The text side of sample ``i`` (no image loading)."""
        ids, labels, q, starts = encode_conversation(self.turns[i], self.tokenizer, self.image_token_id,
                                                     self.image_tokens, self.system, self._bos)
        rid = self.records[i].get("id", str(i))
        if self.max_length is not None and len(ids) > self.max_length:
            # Right truncation like LLaVA (later turns lose supervision), but every image (a cut
            # one would no longer match its pixels) and the first answer's first token must
            # survive, or the sample would train nothing.
            need = max([q + 2] + [s + self.image_tokens for s in starts])
            if need > self.max_length:
                raise ValueError(f"max_length: sample {rid!r} needs {need} tokens to keep its images and reach its "
                                 f"first answer, max_length is {self.max_length}")
            ids, labels = ids[:self.max_length], labels[:self.max_length]
        return {"id": rid, "input_ids": torch.tensor(ids, dtype=torch.long),
                "labels": torch.tensor(labels, dtype=torch.long), "query_index": q,
                "image_start": starts[0] if starts else None, "image_starts": starts,
                "questions": [t.replace(IMAGE_TAG, "").strip() for r, t in self.turns[i] if r == "USER"],
                "answers": [t for r, t in self.turns[i] if r == "ASSISTANT"]}

    def __getitem__(self, i: int) -> dict:
        sample = self.encode(i)
        pixels = [_pixels(self.image_processor, image).float() for image in self.load_images(i)]
        if len(pixels) == 1:
            sample["pixel_values"] = pixels[0]
        elif pixels:
            sample["pixel_values"] = torch.stack(pixels)
        return sample

    def references(self) -> list[str]:
        """Each sample's first answer (what :func:`prompt_only` evaluation compares against)."""
        return [next(t for r, t in turns if r == "ASSISTANT") for turns in self.turns]


def warn_unknown_words(tokenizer, texts, stacklevel: int = 3) -> None:
    """A UserWarning giving the fraction of ``texts``' tokens that ``tokenizer`` maps to its
    unknown token, and a few of the words (a closed vocabulary would train on unknown tokens
    without a word)."""
    from .tokenizer import unknown_words
    n_unk, total, examples = unknown_words(tokenizer, texts)
    if n_unk:
        warnings.warn(f"tokenizer: {n_unk} of {total} text tokens ({n_unk / total:.1%}) of this dataset are not "
                      f"in the tokenizer's closed vocabulary and become {tokenizer.unk_token} "
                      f"(e.g. {', '.join(repr(w) for w in examples)}); use a tokenizer that covers the "
                      f"data's words", UserWarning, stacklevel=stacklevel)


# --------------------------------------------------------------------------- batching

def collate(batch: Sequence[dict], pad_id: int, padding_side: str = "right",
            pad_to_multiple_of: int | None = None) -> dict:
    """Pad samples into tensors: ``input_ids`` int64 [B, L] (``pad_id``), ``attention_mask`` int64
    [B, L], ``labels`` int64 [B, L] (IGNORE_INDEX on padding; only when the samples have labels),
    ``mm_token_type_ids`` int64 [B, L] (0 on padding; when the samples have them), the visual
    inputs, ``query_index`` int64 [B] (shifted by each row's left padding). Visual inputs
    (:data:`MEDIA_KEYS`) are concatenated in row order over the samples that have them, as the
    processors batch them: LLaVA's ``pixel_values`` [3, H, W] (one image) or [n, 3, H, W] (several)
    per sample give float32 [sum n, 3, H, W], the images in prompt order; a Qwen-VL sample's
    patches [P, C] and ``image_grid_thw`` [n, 3] give [sum P, C] and [sum n, 3]; text-only samples
    add nothing (a batch without images has no ``pixel_values``). Use
    ``functools.partial(collate, pad_id=...)`` as a DataLoader ``collate_fn``."""
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
    has_types = any("mm_token_type_ids" in s for s in batch)
    types = torch.zeros(b, length, dtype=torch.long) if has_types else None
    query = torch.empty(b, dtype=torch.long)
    for i, s in enumerate(batch):
        n = len(s["input_ids"])
        off = length - n if padding_side == "left" else 0
        input_ids[i, off:off + n] = torch.as_tensor(s["input_ids"])
        mask[i, off:off + n] = 1
        if has_labels:
            labels[i, off:off + n] = torch.as_tensor(s["labels"])
        if has_types and "mm_token_type_ids" in s:
            types[i, off:off + n] = torch.as_tensor(s["mm_token_type_ids"])
        query[i] = int(s["query_index"]) + off
    out = {"input_ids": input_ids, "attention_mask": mask}
    if has_labels:
        out["labels"] = labels
    if has_types:
        out["mm_token_type_ids"] = types
    for key in MEDIA_KEYS:
        items = [torch.as_tensor(s[key]) for s in batch if s.get(key) is not None]
        if key == "pixel_values":
            # one LLaVA image [3, H, W] is a list of one
            items = [x[None] if x.dim() == 3 else x for x in items]
        if items:
            out[key] = torch.cat(items)
            if key == "pixel_values":
                out[key] = out[key].float()
    out["query_index"] = query
    return out


def prompt_only(sample: dict) -> dict:
    """A sample cut to its first prompt (everything up to and including ``query_index``: what the
    model sees before it generates the first answer) with ``answer``, the reference."""
    q = int(sample["query_index"])
    out = {"id": sample.get("id"), "input_ids": torch.as_tensor(sample["input_ids"])[:q + 1]}
    if "mm_token_type_ids" in sample:
        types = torch.as_tensor(sample["mm_token_type_ids"])
        if (types[q + 1:] > 0).any():
            raise ValueError(f"sample: {sample.get('id')!r} has an image or video after its first answer; its "
                             f"first prompt alone does not hold every visual input")
        out["mm_token_type_ids"] = types[:q + 1]
    out.update({key: sample[key] for key in MEDIA_KEYS if sample.get(key) is not None})
    starts = sample.get("image_starts")
    if starts is not None and sum(s <= q for s in starts) < len(starts):
        # A LLaVA sample whose later turns show more images: the first prompt keeps its own.
        n = sum(s <= q for s in starts)
        pixels = torch.as_tensor(sample["pixel_values"])
        pixels = pixels[None] if pixels.dim() == 3 else pixels
        del out["pixel_values"]
        if n:
            out["pixel_values"] = pixels[:n]
    return {**out, "query_index": q, "answer": sample["answers"][0]}


def collate_prompts(batch: Sequence[dict], pad_id: int) -> tuple[dict, list[str]]:
    """Left-padded generation batch of prompts (training samples are cut with
    :func:`prompt_only` first) and the reference answers. The batch has ``input_ids``,
    ``attention_mask``, ``pixel_values`` and ``query_index`` (= L - 1 for every row)."""
    prompts = [s if "answer" in s else prompt_only(s) for s in batch]
    return collate(prompts, pad_id, padding_side="left"), [p["answer"] for p in prompts]
