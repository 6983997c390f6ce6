"""Tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL models and processors built offline (no hub), from configs.

Real geometry at a small width: 4-layer text model (hidden 64, 4 heads, 2 kv heads, head_dim 16,
M-RoPE sections summing to head_dim / 2), a small vision tower with the real patching
(temporal_patch_size 2, spatial_merge_size 2; patch 14, patch 16 for Qwen3-VL as in the real
models), so a 56x56 image gives 4 visual tokens and 112x112 gives 16.
* Qwen2.5-VL: window_size 56 px = 2x2 merged tokens per window; blocks 0 and 2 are windowed
  (fullatt_block_indexes (1, 3)), so an image of 112 px or more spans several windows.
* Qwen3-VL: DeepStack from vision layers 1 and 2, added after LLM layers 0 and 1.

The processor is the family's real processor class around an offline word-level tokenizer (a
closed vocabulary of lowercase words, digits and punctuation, [UNK] otherwise) carrying Qwen's
special tokens, and a short chat template. :func:`save_tiny_qwen` writes a folder that
``AutoModelForImageTextToText`` / ``AutoProcessor.from_pretrained`` load back offline.
"""
from __future__ import annotations

import numpy as np
import torch

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>", "[UNK]"]
PAD_ID, IM_START_ID, IM_END_ID, VISION_START_ID, VISION_END_ID, IMAGE_ID, VIDEO_ID, UNK_ID = range(8)

WORDS = """a an the is are was be this that these those it its of in on at to from with and or not no yes
what where which who how many much color colour shape size left right top bottom middle center above below
image picture photo video frame frames scene here there describe answer question user assistant system you
helpful one two three four five six seven eight nine ten red green blue yellow black white gray orange
purple pink brown dog cat car bus tree house person man woman child bird fish ball box cup table chair
sky sun water road grass flower book phone light door window wall floor big small large tiny round square
long short tall happy sad open closed first second last next before after seconds time count number
between inside outside near far some all none both each other same different
can could do does did has have had will would should may might must see look show shows showing
holding sitting standing walking running playing eating drinking wearing riding lying flying
street city room kitchen bed window beach mountain river field park train plane boat bike horse cow
sheep elephant bear zebra giraffe umbrella bag hat shirt pizza cake apple banana bowl bottle clock
i we they he she his her their them my your our
zero eleven twelve hundred""".split()
PUNCT = list(".,!?;:'\"()[]<>-/")
VOCAB = list(dict.fromkeys(SPECIAL_TOKENS + [str(d) for d in range(10)] + PUNCT + WORDS))
VOCAB_SIZE = len(VOCAB)         # the model's vocabulary is exactly the tokenizer's: every id decodes
# Never generated: a vision token in generated text would be taken for a visual placeholder.
SUPPRESSED_IDS = [VISION_START_ID, VISION_END_ID, IMAGE_ID, VIDEO_ID, UNK_ID]

# The chat template: Qwen's layout (<|im_start|>role ... <|im_end|>, one vision span per image or
# video item), no system prompt. Newlines vanish in the word-level tokenizer, which is fine here.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' or 'video' in item %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")
    return family


def patch_size(family: str) -> int:
    return 16 if _check_family(family) == "qwen3_vl" else 14


def qwen_config(family: str, **overrides):
    """The tiny config of ``family``. ``overrides`` set a top-level attribute, else a preset
    text attribute, else a preset vision one (``num_hidden_layers=2``, ``depth=3``); ``text_X=`` /
    ``vision_X=`` set any attribute X of that sub-config (``vision_hidden_size=48``). Keep
    Qwen3-VL's ``deepstack_visual_indexes`` below ``depth`` when changing either."""
    from transformers import AutoConfig
    _check_family(family)
    text = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                initializer_range=0.1, rms_norm_eps=1e-6, pad_token_id=PAD_ID, bos_token_id=IM_START_ID,
                eos_token_id=IM_END_ID, tie_word_embeddings=False)
    vision = dict(depth=4, num_heads=2, patch_size=patch_size(family), temporal_patch_size=2,
                  spatial_merge_size=2, initializer_range=0.1)
    if family == "qwen2_vl":
        # Qwen2-VL's head_dim is hidden / heads = 16; sections in the real 2:3:3 ratio.
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        vision.update(embed_dim=32, hidden_size=64, mlp_ratio=2)
    elif family == "qwen2_5_vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=64, window_size=56,
                      fullatt_block_indexes=[1, 3], tokens_per_second=2)
    else:
        # Qwen3-VL interleaves the sections (T H W T H W ...): T gets 3, H 3, W 2 of the 8 frequencies.
        text.update(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "mrope_section": [3, 3, 2], "mrope_interleaved": True})
        vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=64, num_position_embeddings=64,
                      deepstack_visual_indexes=[1, 2])
    top = dict(image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=VISION_START_ID,
               vision_end_token_id=VISION_END_ID, tie_word_embeddings=False)
    for key, value in overrides.items():
        if key in top or key in ("text_config", "vision_config"):
            top[key] = value
        elif key in text:
            text[key] = value
        elif key in vision:
            vision[key] = value
        elif key.startswith("text_"):
            text[key[len("text_"):]] = value
        elif key.startswith("vision_"):
            vision[key[len("vision_"):]] = value
        else:
            raise ValueError(f"overrides: unknown key {key!r}")
    cfg = AutoConfig.for_model(family, text_config=text, vision_config=vision, **top)
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = PAD_ID, IM_START_ID, IM_END_ID
    return cfg


def build_tiny_qwen(family: str, *, seed: int = 0, attn: str = "sdpa", dtype: torch.dtype = torch.float32,
                    device="cpu", **overrides):
    """The family's ``...ForConditionalGeneration``, randomly initialised from ``seed``, eval mode."""
    from transformers import AutoModelForImageTextToText
    cfg = qwen_config(family, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(cfg, attn_implementation=attn)
        _spread_init(model)
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = [IM_END_ID, PAD_ID]     # as Qwen's own generation_config
    model.generation_config.bos_token_id = IM_START_ID
    model.generation_config.suppress_tokens = list(SUPPRESSED_IDS)
    return model.to(device=device, dtype=dtype).eval()


@torch.no_grad()
def _spread_init(model):
    """Make the random model less bland than transformers' init: with every weight at std 0.1
    the tiny model's attention is near uniform (normalised entropy ~0.95) and its next-token
    distribution flat (max p ~0.03), which would let selection and batching bugs hide. So:
    biases and norm weights are random (not 0 / 1), query/key projections (Qwen3-VL: the
    per-head q/k norm weights) are scaled so attention logits have std ~3, and the LM head so
    the logits' std over the vocabulary is ~2."""
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.normal_(0.0, 0.05)
        elif "norm" in name and p.dim() == 1:
            scale = 2.0 if name.endswith(("q_norm.weight", "k_norm.weight")) else 1.0
            p.copy_(scale * (1.0 + 0.1 * torch.randn_like(p)))
        elif name.endswith(("q_proj.weight", "k_proj.weight")):
            p.normal_(0.0, 0.25)
        elif name.endswith("attn.qkv.weight"):          # vision: the first 2/3 of the rows are q and k
            p[: 2 * p.shape[0] // 3].normal_(0.0, 0.3)
        elif name == "lm_head.weight":
            p.normal_(0.0, 0.3)


def tiny_tokenizer(*, padding_side: str = "left"):
    """A ``PreTrainedTokenizerFast``: word level over :data:`WORDS`, digits and punctuation, Qwen's
    special tokens at ids 0..7 (``<|endoftext|>`` is the pad token, ``<|im_end|>`` the EOS)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {tok: i for i, tok in enumerate(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    # Qwen3-VL writes "<1.5 seconds>" before each frame group: punctuation and digits split apart.
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(),
                                                     pre_tokenizers.Digits(individual_digits=True)])
    backend.decoder = decoders.WordPiece(prefix="##")     # joins words with spaces, tidies punctuation
    backend.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="<|endoftext|>",
                                  eos_token="<|im_end|>", bos_token=None, padding_side=padding_side,
                                  model_max_length=4096, chat_template=CHAT_TEMPLATE)
    return tok


def tiny_qwen_processor(family: str, *, padding_side: str = "left"):
    """The family's real processor (image + video processors, this tokenizer, chat template), with
    pixel bounds small enough that images of 56..224 px give a handful of tokens."""
    import transformers as tf
    from transformers.utils import is_torchvision_available
    ps = patch_size(family)
    if not is_torchvision_available():
        # transformers 5.23's Qwen-VL video processors import torchvision, and the processors
        # cannot be built without one (even for images only)
        raise ImportError("tiny_qwen_processor: transformers' Qwen-VL processors need torchvision "
                          "(the build matching torch, e.g. torchvision 0.29.1 for torch 2.14.1)")
    factor = ps * 2
    image_size = {"shortest_edge": factor * factor, "longest_edge": 16 * factor * factor}   # 1..16 tokens
    video_size = {"shortest_edge": factor * factor, "longest_edge": 4 * 16 * factor * factor}
    tok = tiny_tokenizer(padding_side=padding_side)
    common = dict(patch_size=ps, temporal_patch_size=2, merge_size=2)
    image_processor = tf.Qwen2VLImageProcessor(size=image_size, **common)
    if family == "qwen2_vl":
        video_processor = tf.Qwen2VLVideoProcessor(size=video_size, do_sample_frames=False,
                                                  cap_pixels_per_frame=False, **common)
        cls = tf.Qwen2VLProcessor
    elif family == "qwen2_5_vl":
        video_processor = tf.Qwen2VLVideoProcessor(size=video_size, do_sample_frames=False,
                                                  cap_pixels_per_frame=False, **common)
        cls = tf.Qwen2_5_VLProcessor
    else:
        video_processor = tf.Qwen3VLVideoProcessor(size=video_size, do_sample_frames=False,
                                                  cap_pixels_per_frame=False, **common)
        cls = tf.Qwen3VLProcessor
    return cls(image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
               chat_template=CHAT_TEMPLATE)


def random_image(h: int, w: int, generator: np.random.Generator) -> np.ndarray:
    """An [h, w, 3] uint8 image of smooth random content (a random low-resolution grid upsampled,
    plus noise), so patches differ from one another and from image to image."""
    coarse = generator.integers(0, 256, size=(max(h // 16, 1) + 1, max(w // 16, 1) + 1, 3)).astype(np.float32)
    ys = np.linspace(0, coarse.shape[0] - 1, h)
    xs = np.linspace(0, coarse.shape[1] - 1, w)
    smooth = coarse[np.round(ys).astype(int)][:, np.round(xs).astype(int)]
    noise = generator.normal(0, 24, size=(h, w, 3))
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


ROW_KINDS = (dict(images=[], video=None), dict(images=[(112, 84)], video=None),
             dict(images=[(56, 56), (112, 140)], video=None), dict(images=[], video=(4, 56, 84)),
             dict(images=[(84, 84)], video=(4, 56, 56)))


def random_qwen_rows(n: int = 5, *, seed: int = 0) -> list[dict]:
    """``n`` rows cycling through :data:`ROW_KINDS`: text only, one image, two images of different
    sizes, a video (4 frames = 2 temporal groups), an image and a video; texts of different
    lengths (seeded words)."""
    g = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        kind = ROW_KINDS[i % len(ROW_KINDS)]
        words = g.choice(WORDS, size=3 + (2 * i) % 5).tolist()
        rows.append(dict(images=list(kind["images"]), video=kind["video"], text=" ".join(words) + " ?"))
    return rows


def row_messages(row: dict, images: list, video) -> list[dict]:
    """One user turn: the row's images, then its video, then its text."""
    content = [{"type": "image", "image": im} for im in images]
    if video is not None:
        content.append({"type": "video", "video": video})
    content.append({"type": "text", "text": row.get("text", "")})
    return [{"role": "user", "content": content}]


def qwen_batch(processor, rows: list[dict], *, padding_side: str = "left", seed: int = 0, fps: float = 1.0):
    """Processor outputs (BatchFeature of tensors) for ``rows`` (``{"images": [(h, w), ...],
    "video": (frames, h, w) or None, "text": str}``): the chat template with a generation prompt,
    seeded random pixels, padded on ``padding_side``. Images and videos are listed in row order,
    as the model consumes them. Videos are given as decoded frames at ``fps`` (all kept)."""
    from transformers.video_utils import VideoMetadata
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side: expected 'left' or 'right', got {padding_side!r}")
    for row in rows:
        if not isinstance(row, dict) or set(row) - {"images", "video", "text"}:
            raise ValueError(f"rows: each row is a dict with keys images / video / text, got {row!r}")
    g = np.random.default_rng(seed)
    texts, images, videos, metadata = [], [], [], []
    for row in rows:
        row_images = [random_image(h, w, g) for h, w in row.get("images", [])]
        video = None
        if row.get("video") is not None:
            frames, h, w = row["video"]
            video = np.stack([random_image(h, w, g) for _ in range(frames)])
            videos.append(video)
            metadata.append(VideoMetadata(total_num_frames=frames, fps=fps, frames_indices=list(range(frames))))
        images.extend(row_images)
        texts.append(processor.apply_chat_template(row_messages(row, row_images, video), tokenize=False,
                                                   add_generation_prompt=True))
    kwargs = {}
    if videos:
        kwargs.update(videos=videos, video_metadata=metadata)
    old_side = processor.tokenizer.padding_side
    processor.tokenizer.padding_side = padding_side
    try:
        return processor(text=texts, images=images or None, padding=True, return_tensors="pt", **kwargs)
    finally:
        processor.tokenizer.padding_side = old_side


def row_inputs(batch, i: int) -> dict:
    """Row ``i`` of a :func:`qwen_batch` output as a batch of one, its padding removed: the
    row's own slices of pixel_values / pixel_values_videos and grid_thw (rows own their images
    and videos in order)."""
    keep = batch["attention_mask"][i].bool()
    out = {k: batch[k][i:i + 1, keep] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    ids = batch["input_ids"]
    for kind, token, grid_key, pixel_key in (("image", IMAGE_ID, "image_grid_thw", "pixel_values"),
                                             ("video", VIDEO_ID, "video_grid_thw", "pixel_values_videos")):
        if grid_key not in batch:
            continue
        grids = batch[grid_key]
        tokens = (grids.prod(-1) // 4).tolist()              # 2x2 patches merge into one token
        counts = (ids == token).sum(1).tolist()
        # items of earlier rows come first; each row's items sum to its token count
        first, consumed, before = 0, 0, sum(counts[:i])
        while consumed < before:
            consumed += tokens[first]
            first += 1
        last, mine = first, 0
        while mine < counts[i]:
            mine += tokens[last]
            last += 1
        if last == first:
            continue
        patches = grids.prod(-1)
        start = int(patches[:first].sum())
        out[grid_key] = grids[first:last]
        out[pixel_key] = batch[pixel_key][start:start + int(patches[first:last].sum())]
        if kind == "video" and "second_per_grid_ts" in batch:
            out["second_per_grid_ts"] = batch["second_per_grid_ts"][first:last]
    return out


def save_tiny_qwen(family: str, folder, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Write the tiny model and its processor to ``folder`` (save_pretrained), loadable offline
    with ``AutoModelForImageTextToText`` / ``AutoProcessor.from_pretrained(folder)``."""
    import os
    folder = os.fspath(folder)
    build_tiny_qwen(family, seed=seed, dtype=dtype).save_pretrained(folder)
    tiny_qwen_processor(family).save_pretrained(folder)
    return folder
