"""LLaVA-OneVision conversation data (several images, a video, text-only samples) encoded by a
model family's own processor (Qwen2-VL / 2.5-VL / 3-VL): chat template, image and video
preprocessing, placeholder expansion; answer-only labels after each assistant header through the
turn's end token; ``query_index`` the header's last token. Batched by ``data.collate``.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .data import (IGNORE_INDEX, IMAGE_TAG, MEDIA_KEYS, VIDEO_TAG, _checked_turns, read_records, sample_media,
                   warn_unknown_words)


def media_turns(record: dict, where: str = "json_path_or_records") -> list[tuple[str, list]]:
    """[(role, parts)] of a LLaVA-OneVision record, each part ``("text", str)``, ``("image", i)``
    (the record's i-th image) or ``("video", 0)``, in reading order. Placeholders: one ``<image>``
    per image and one ``<video>`` for the video, in human turns; a video-only record may mark its
    video with one ``<image>`` (LLaVA-Video's data does). A record without any placeholder gets
    its images, then its video, at the start of the first human turn. A text-only record has
    neither key nor placeholder."""
    rid = record.get("id", "?") if isinstance(record, dict) else "?"
    turns = _checked_turns(record, where)
    images, video = sample_media(record, where)
    n_video = int(video is not None)

    def count(tag):
        return sum(t.count(tag) for _, t in turns)
    if any(IMAGE_TAG in t or VIDEO_TAG in t for r, t in turns if r == "ASSISTANT"):
        raise ValueError(f"{where}: sample {rid!r} has a {IMAGE_TAG} or {VIDEO_TAG} tag in an answer")
    if n_video and not images and count(VIDEO_TAG) == 0 and count(IMAGE_TAG) == 1:
        turns = [(r, t.replace(IMAGE_TAG, VIDEO_TAG)) for r, t in turns]
    if count(IMAGE_TAG) == 0 and count(VIDEO_TAG) == 0:
        head = IMAGE_TAG * len(images) + VIDEO_TAG * n_video
        turns = [(turns[0][0], head + turns[0][1])] + turns[1:]
    elif count(IMAGE_TAG) != len(images) or count(VIDEO_TAG) != n_video:
        raise ValueError(f"{where}: sample {rid!r} has {count(IMAGE_TAG)} {IMAGE_TAG} and {count(VIDEO_TAG)} "
                         f"{VIDEO_TAG} tags for {len(images)} image(s) and {n_video} video(s); give one tag per "
                         f"image and video, in human turns, or none (then they go first)")
    out, next_image = [], 0
    for role, text in turns:
        parts = []
        for piece in re.split(f"({re.escape(IMAGE_TAG)}|{re.escape(VIDEO_TAG)})", text):
            if piece == IMAGE_TAG:
                parts.append(("image", next_image))
                next_image += 1
            elif piece == VIDEO_TAG:
                parts.append(("video", 0))
            elif piece.strip():
                parts.append(("text", piece.strip()))
        out.append((role, parts))
    return out


class ProcessorConversationDataset(torch.utils.data.Dataset):
    """Conversation JSON in the LLaVA-OneVision format (several images, a video, text-only
    samples; see :func:`media_turns`) encoded by a model's own processor: its chat template, its
    image and video preprocessing and its placeholder expansion (the Qwen-VL families).

    ``media``: a folder holding the records' image files and videos (a folder of frames, or the
    frame files a record lists), a mapping name -> image (PIL / uint8 array) or name -> video
    frames ([T, H, W, 3] uint8 or a list of images), or None when every record is text-only.
    A record may give ``"fps"``, the frame rate of its video's frames (Qwen2.5-VL's temporal
    positions follow it; else the processor's default). Structure and media presence are checked
    up front (ValueError naming the argument); images load and encode lazily.

    Labels: every token after an assistant header of the chat template (the text its generation
    prompt adds) through the end-of-turn token that closes the answer; ``query_index`` is the
    first answer's header's last token (where generation starts). A sample: ``input_ids`` /
    ``labels`` / ``mm_token_type_ids`` int64 [L], ``query_index``, the processor's media tensors
    of this sample (``pixel_values`` [patches, C], ``image_grid_thw`` [n, 3], ...), ``questions``,
    ``answers``."""

    def __init__(self, json_path_or_records, media, processor, max_length: Optional[int] = 2048):
        self.records = read_records(json_path_or_records)
        self.turns = [media_turns(r) for r in self.records]
        self.media_names = [sample_media(r) for r in self.records]
        if getattr(processor, "tokenizer", None) is None or getattr(processor, "chat_template", None) is None:
            raise ValueError("processor: needs a processor with a tokenizer and a chat template")
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length: must be >= 2, got {max_length}")
        self.processor, self.max_length = processor, max_length
        self.header_ids, self.end_id = _answer_marks(processor)
        self._folder, self._items = None, None
        if isinstance(media, (str, os.PathLike)):
            folder = Path(media)
            if not folder.is_dir():
                raise ValueError(f"media: no such folder {str(folder)!r}")
            self._folder = folder
        elif isinstance(media, Mapping):
            self._items = media
        elif media is not None:
            raise ValueError("media: expected a folder, a mapping name -> image / video frames, or None")
        for r, (images, video) in zip(self.records, self.media_names):
            for name in images + ([] if video is None else [video] if isinstance(video, str) else video):
                if not self._has(name, as_folder=isinstance(video, str) and name is video):
                    raise ValueError(f"media: sample {r.get('id', '?')!r}: {name!r} not found in "
                                     f"{str(self._folder) if self._folder is not None else 'the given media'}")
            fps = r.get("fps")
            if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0):
                raise ValueError(f"json_path_or_records: sample {r.get('id', '?')!r}: 'fps' must be a positive "
                                 f"number, got {fps!r}")
        # The real Qwen tokenizers (byte-level BPE) have no unknown token: nothing to count there.
        if processor.tokenizer.unk_token_id is not None:
            warn_unknown_words(processor.tokenizer, [v for turns in self.turns for _, parts in turns
                                                     for kind, v in parts if kind == "text"])

    def _has(self, name: str, as_folder: bool) -> bool:
        if self._folder is not None:
            path = self._folder / name
            return path.is_dir() and bool(_frame_files(path)) if as_folder else path.is_file()
        return self._items is not None and name in self._items

    def __len__(self) -> int:
        return len(self.records)

    def load_image(self, name: str):
        if self._folder is None:
            return self._items[name]
        from PIL import Image
        with Image.open(self._folder / name) as f:
            return f.convert("RGB")

    def load_video(self, video):
        """[T, H, W, 3] uint8 frames of a record's ``video`` (a folder, or a list of frames)."""
        import numpy as np
        if isinstance(video, str) and self._folder is not None:
            frames = [self.load_image(str(f.relative_to(self._folder))) for f in _frame_files(self._folder / video)]
        elif isinstance(video, str):
            frames = self._items[video]
        else:
            frames = [self.load_image(name) for name in video]
        frames = [np.asarray(f.convert("RGB") if hasattr(f, "convert") else f, dtype=np.uint8) for f in frames]
        if len({f.shape for f in frames}) != 1 or frames[0].ndim != 3:
            raise ValueError(f"media: video {video!r}: frames must be [H, W, 3] images of one size")
        return np.stack(frames)

    def __getitem__(self, i: int) -> dict:
        record, turns = self.records[i], self.turns[i]
        names, video_name = self.media_names[i]
        messages = [{"role": "user" if role == "USER" else "assistant",
                     "content": [{"type": kind, "text": value} if kind == "text" else {"type": kind}
                                 for kind, value in parts]} for role, parts in turns]
        text = self.processor.apply_chat_template(messages, tokenize=False)
        kwargs = {}
        if names:
            kwargs["images"] = [self.load_image(n) for n in names]
        if video_name is not None:
            video = self.load_video(video_name)
            kwargs["videos"] = [video]
            if record.get("fps") is not None:
                from transformers.video_utils import VideoMetadata
                kwargs["video_metadata"] = [VideoMetadata(total_num_frames=len(video), fps=float(record["fps"]),
                                                          frames_indices=list(range(len(video))))]
        out = self.processor(text=[text], return_tensors="pt", **kwargs)
        rid = record.get("id", str(i))
        ids = out["input_ids"][0].long()
        n_answers = sum(role == "ASSISTANT" for role, _ in turns)
        labels, q = answer_labels(ids, self.header_ids, self.end_id, n_answers, f"sample {rid!r}")
        sample = {"id": rid, "input_ids": ids, "labels": labels, "query_index": q}
        if "mm_token_type_ids" in out:
            sample["mm_token_type_ids"] = out["mm_token_type_ids"][0].long()
        if self.max_length is not None and len(ids) > self.max_length:
            # Right truncation like the LLaVA path, but never through an image or video (its grid
            # would no longer match its tokens) nor before the first answer's first token.
            visual = (sample["mm_token_type_ids"] > 0).nonzero() if "mm_token_type_ids" in sample else ids[:0]
            need = max(q + 2, int(visual.max()) + 1 if len(visual) else 0)
            if need > self.max_length:
                raise ValueError(f"max_length: sample {rid!r} needs {need} tokens to keep its images / video and "
                                 f"reach its first answer, max_length is {self.max_length}")
            for key in ("input_ids", "labels", "mm_token_type_ids"):
                if key in sample:
                    sample[key] = sample[key][:self.max_length]
        for key in MEDIA_KEYS:
            if key in out:
                sample[key] = out[key]
        sample["questions"] = [" ".join(v for k, v in parts if k == "text") for r, parts in turns if r == "USER"]
        sample["answers"] = [" ".join(v for k, v in parts if k == "text") for r, parts in turns if r == "ASSISTANT"]
        return sample

    def references(self) -> list[str]:
        """Each sample's first answer."""
        return [" ".join(v for k, v in turns[1][1] if k == "text") for turns in self.turns]


def _frame_files(folder: Path) -> list[Path]:
    """The image files of a video folder in natural name order (frame_2 before frame_10)."""
    exts = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
    key = lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]   # noqa: E731
    return sorted((f for f in folder.iterdir() if f.suffix.lower() in exts and f.is_file()), key=key)


def _answer_marks(processor) -> tuple[list[int], int]:
    """(header ids, end id) of the processor's chat template: the tokens its generation prompt
    adds (Qwen: ``<|im_start|>assistant\\n``) and the first token after an answer
    (``<|im_end|>``)."""
    tok = processor.tokenizer
    user = [{"role": "user", "content": [{"type": "text", "text": "x"}]}]
    base = processor.apply_chat_template(user, tokenize=False)
    prompt = processor.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = processor.apply_chat_template(user + [{"role": "assistant", "content": [{"type": "text", "text": "y"}]}],
                                         tokenize=False)
    if not prompt.startswith(base) or not full.startswith(prompt + "y") or len(prompt) == len(base):
        raise ValueError("processor: its chat template does not put an answer right after the generation prompt; "
                         "answer-only labels need that layout")
    header = tok(prompt[len(base):], add_special_tokens=False)["input_ids"]
    end = tok(full[len(prompt) + 1:], add_special_tokens=False)["input_ids"][:1]
    if not header or not end:
        raise ValueError("processor: its chat template has no assistant header or no end-of-turn token")
    return header, end[0]


def answer_labels(ids: Tensor, header: list[int], end: int, n_answers: int, what: str = "sample"
                  ) -> tuple[Tensor, int]:
    """(labels, query_index) of ``ids``: each answer's tokens after an assistant ``header``
    through its ``end`` token; ``query_index``: the first header's last token."""
    labels = torch.full_like(ids, IGNORE_INDEX)
    n, found, first = len(header), 0, None
    seq = ids.tolist()
    pos = 0
    for start in (ids == header[0]).nonzero().flatten().tolist():
        if start < pos or seq[start:start + n] != header:
            continue
        a = start + n
        try:
            b = seq.index(end, a)
        except ValueError:
            raise ValueError(f"{what}: an answer has no end-of-turn token (truncated?)") from None
        labels[a:b + 1] = ids[a:b + 1]
        first = a if first is None else first
        found, pos = found + 1, b + 1
    if found != n_answers:
        raise ValueError(f"{what}: the encoded text has {found} assistant headers for {n_answers} answers (does a "
                         f"question contain the chat template's special tokens?)")
    return labels, first - 1
