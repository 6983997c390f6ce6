"""`epic-ext infer`: arguments checked before torch or a model loads (files, image / video /
prompt pairing, method options, layers), then ``epic_ext.infer`` on a preset or a local
checkpoint folder (LLaVA or Qwen-VL) and its report. Registered by ``epic_ext.cli``.
"""
from __future__ import annotations

import argparse
import sys

PRESET_NAMES = ("tiny", "demo", "llava-1.5-7b-depth")   # epic_ext.models.tiny.PRESETS (kept light here)
QWEN_VL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")  # epic_ext.models.loading (kept light here)
SUPPORTED_TYPES = ("llava",) + QWEN_VL_TYPES
DEFAULT_PROMPT = "What is in the image?"
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def _configure_infer(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny",
                   help=f"a tiny preset ({', '.join(PRESET_NAMES)}: random weights, offline) or a local "
                        "checkpoint folder with its processor: LLaVA, Qwen2-VL, Qwen2.5-VL or Qwen3-VL (the "
                        "family is read from its config.json)")
    p.add_argument("--method", default=None, help="token-reduction method (default: none)")
    p.add_argument("--keep", default=None, help="visual tokens kept: a count, or a ratio like 0.25")
    p.add_argument("--layer", type=int, default=None,
                   help="decoder layer K of in-LLM methods (PruMerge: its CLIP encoder layer)")
    p.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                   help="another method option (repeatable), e.g. --option sign=1")
    p.add_argument("--clip", default=None, metavar="PATH",
                   help="TRIM's CLIP: a local CLIP checkpoint folder with both towers and its tokenizer "
                        "(LLaVA-1.5: openai/clip-vit-large-patch14-336); the tiny presets default to "
                        "an offline random tiny scorer")
    p.add_argument("--image", action="append", default=[],
                   help="image file: one per --prompt, or one for all prompts; the tiny presets use a "
                        "random image per prompt when none is given. Qwen-VL: several images per prompt as "
                        "a comma list (a.png,b.png), or every --image for a single --prompt")
    p.add_argument("--video", action="append", default=[],
                   help="Qwen-VL: a video for a prompt, as a folder of frame images (taken in name order) "
                        "or a comma list of frame files; one per --prompt, or one for all prompts")
    p.add_argument("--video-fps", type=float, default=2.0,
                   help="frame rate the --video frames were sampled at (Qwen's temporal positions and "
                        "timestamps; default 2)")
    p.add_argument("--prompt", action="append", default=[],
                   help=f"question (repeatable; default {DEFAULT_PROMPT!r})")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on a CPU (bf16 is several times slower on CPUs without "
                        "bf16 units), bfloat16 for a checkpoint on a GPU")
    p.add_argument("--device", default=None, help="default: cuda when visible, else cpu")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed runs first (timings exclude them; default 0 on a CPU, 1 on a GPU)")
    p.add_argument("--json", action="store_true", help="print the reports as JSON")


def _parse_value(text: str):
    import ast
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_pairs(items: list, flag: str) -> dict:
    """Repeated ``NAME=VALUE`` arguments of ``flag`` as a dict (values read as Python literals
    where they are one, else kept as strings); ValueError naming ``flag`` otherwise."""
    out = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or not name.strip():
            raise ValueError(f"{flag}: expected NAME=VALUE, got {item!r}")
        out[name.strip()] = _parse_value(value.strip())
    return out


def _note(command: str, text: str) -> None:
    """Progress and defaults go to stderr, so --json output stays one JSON document."""
    print(f"epic-ext {command}: {text}", file=sys.stderr, flush=True)


def pair_requests(images: list, prompts: list, *, random_images: bool) -> tuple[list, list]:
    """(images, prompts) of equal length: one image per prompt, or one image for every prompt;
    no prompt: the default question for each image; no image: None per prompt where random
    images are allowed (tiny presets). ValueError naming the options otherwise."""
    prompts = list(prompts) or [DEFAULT_PROMPT] * max(1, len(images))
    if not images:
        if not random_images:
            raise ValueError("--image: a checkpoint needs an image file (one per --prompt, or one "
                             "for all prompts)")
        return [None] * len(prompts), prompts
    if len(images) == len(prompts):
        return list(images), prompts
    if len(images) == 1:
        return list(images) * len(prompts), prompts
    raise ValueError(f"--image / --prompt: got {len(images)} images and {len(prompts)} prompts; give "
                     "one image per prompt, or one image for all prompts")


def _model_type(path: str) -> "str | None":
    """model_type of a checkpoint folder's config.json, read without transformers (or torch)."""
    import json
    import os
    try:
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"--model: {path}/config.json is not a readable JSON config ({e})") from None
    return cfg.get("model_type") if isinstance(cfg, dict) else None


def _split_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def video_frames(value: str) -> list[str]:
    """The frame files of one --video: a folder's image files in natural name order
    (frame_2 before frame_10), or a comma list of files. ValueError / FileNotFoundError naming
    --video otherwise; every frame opened, and of one size."""
    import os
    import re

    from PIL import Image
    if os.path.isdir(value):
        def natural(name):
            return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]
        frames = [os.path.join(value, f) for f in sorted(os.listdir(value), key=natural)
                  if f.lower().endswith(FRAME_SUFFIXES) and os.path.isfile(os.path.join(value, f))]
        if not frames:
            raise ValueError(f"--video: {value}: no frame images in the folder ({', '.join(FRAME_SUFFIXES)})")
    else:
        frames = _split_list(value)
        if not frames:
            raise ValueError(f"--video: {value!r}: a folder of frames or a comma list of frame files")
        for f in frames:
            if not os.path.isfile(f):
                raise FileNotFoundError(f"--video: no such folder or frame file: {f}")
    if len(frames) < 2:
        # Qwen-VL patches 2 frames at a time (temporal_patch_size); its processors reject one frame
        raise ValueError(f"--video: {value}: {len(frames)} frame; a video needs at least 2 (give an image instead)")
    size = None
    for f in frames:
        try:
            with Image.open(f) as im:
                this = im.size
                im.verify()
        except OSError as e:
            raise OSError(f"--video: {f}: not a readable image ({e})") from None
        if size is None:
            size, first = this, f
        elif this != size:
            raise ValueError(f"--video: {value}: frames differ in size ({first} is {size[0]}x{size[1]}, {f} is "
                             f"{this[0]}x{this[1]}); a video's frames share one size")
    return frames


def group_requests(images: list, videos: list, prompts: list) -> list[tuple[str, list, "str | None"]]:
    """Qwen-VL requests (prompt, image files, video or None) from --image / --video / --prompt:
    each --image value is one prompt's images (a comma list for several), paired like LLaVA's
    (one per prompt, or one for all prompts), and a single --prompt takes every --image;
    each --video is one prompt's video, one per prompt or one for all. No --prompt: one request
    per image group / video with the default question."""
    groups = [_split_list(v) for v in images]
    for v, g in zip(images, groups):
        if not g:
            raise ValueError(f"--image: {v!r}: an image file or a comma list of image files")
    if not prompts:
        prompts = [DEFAULT_PROMPT] * max(1, len(groups), len(videos))
    elif len(prompts) == 1 and len(groups) > 1:
        groups = [[f for g in groups for f in g]]
    n = len(prompts)

    def spread(items: list, what: str, option: str) -> list:
        if not items:
            return [None] * n
        if len(items) == n:
            return list(items)
        if len(items) == 1:
            return list(items) * n
        hint = " (a comma list for several images of a prompt)" if what == "image groups" else ""
        raise ValueError(f"{option} / --prompt: got {len(items)} {what} and {n} prompts; give one per prompt, or "
                         f"one for all prompts{hint}")

    per_images = spread(groups, "image groups", "--image")
    per_video = spread(list(videos), "videos", "--video")
    if not groups and not videos:
        raise ValueError("--image / --video: a checkpoint needs an image file or a video per prompt")
    return [(p, g or [], v) for p, g, v in zip(prompts, per_images, per_video)]


def _check_infer_args(args: argparse.Namespace) -> tuple[dict, object]:
    """Everything that can be checked without torch or a model: (method options, keep)."""
    import math
    import os
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    if args.warmup is not None and args.warmup < 0:
        raise ValueError(f"--warmup: must be >= 0, got {args.warmup}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k: must be >= 1, got {args.top_k}")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise ValueError(f"--temperature: must be a finite number > 0, got {args.temperature}")
    if args.model not in PRESET_NAMES:
        if not os.path.isdir(args.model):
            raise FileNotFoundError(f"--model: {args.model!r} is neither a tiny preset "
                                    f"({', '.join(PRESET_NAMES)}) nor a local checkpoint folder")
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            raise FileNotFoundError(f"--model: {args.model} is not a checkpoint folder (no config.json)")
    qwen = args.model not in PRESET_NAMES and _model_type(args.model) in QWEN_VL_TYPES
    from PIL import Image
    image_files = [f for v in args.image for f in (_split_list(v) if qwen else [v])]
    for f in image_files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"--image: no such file: {f}")
        try:
            with Image.open(f) as im:
                im.verify()
        except OSError as e:
            raise OSError(f"--image: {f}: not a readable image ({e})") from None
    if qwen:
        for v in args.video:
            video_frames(v)
        group_requests(args.image, args.video, args.prompt)
        if not (math.isfinite(args.video_fps) and args.video_fps > 0):
            raise ValueError(f"--video-fps: must be a finite number > 0, got {args.video_fps}")
    else:
        if args.video:
            raise ValueError("--video: only Qwen-VL checkpoints (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) take a video")
        pair_requests(args.image, args.prompt, random_images=args.model in PRESET_NAMES)
    options = parse_pairs(args.option, "--option")
    if "scorer" in options:
        raise ValueError("--option scorer: TRIM's scorer is loaded from --clip PATH (a local CLIP "
                         "checkpoint folder)")
    if "keep" in options or "layer" in options:
        raise ValueError("--option: give keep and layer as --keep and --layer")
    if args.layer is not None:
        options["layer"] = args.layer
    keep = None
    if args.keep is not None:
        keep = _parse_value(args.keep)
        if isinstance(keep, bool) or not isinstance(keep, (int, float)):
            raise ValueError(f"--keep: a count (e.g. 64) or a ratio in [0, 1] (e.g. 0.25), got {args.keep!r}")
        if isinstance(keep, int) and keep < 0 or isinstance(keep, float) and not 0.0 <= keep <= 1.0:
            raise ValueError(f"--keep: a count >= 0 or a ratio in [0, 1], got {args.keep}")
    method = (args.method or "none").lower().replace("-", "_")
    if args.clip is not None:
        if method != "trim":
            raise ValueError("--clip: only --method trim uses a CLIP checkpoint")
        if not os.path.isdir(args.clip):
            raise FileNotFoundError(f"--clip: {args.clip}: no such folder (a local CLIP checkpoint "
                                    "folder with both towers and its tokenizer)")
    elif method == "trim" and args.model not in PRESET_NAMES and not qwen:
        raise ValueError("--method trim: needs --clip PATH, a local CLIP checkpoint folder with both "
                         "towers and its tokenizer (LLaVA-1.5: openai/clip-vit-large-patch14-336)")
    if args.model not in PRESET_NAMES and _model_type(args.model) not in SUPPORTED_TYPES:
        raise ValueError(f"--model: {args.model}: model_type {_model_type(args.model)!r} has no "
                         f"token-reduction integration; supported: {', '.join(SUPPORTED_TYPES)}")
    return options, keep


def _check_method(args: argparse.Namespace, options: dict, keep, llava_config, clip_cfg) -> None:
    """The method's name and options, --layer against the model's depth and TRIM's CLIP against
    the vision tower, from the configs alone (before any weights load)."""
    from dataclasses import fields

    from .methods import get_method
    from .methods.trim import check_keep
    spec = get_method(args.method or "none")
    depth = llava_config.text_config.num_hidden_layers
    if spec.stage == "vision" and "layer" in options and not spec.has_option("layer"):
        raise ValueError(f"--layer: {spec.name} reduces before the projector and has no layer")
    if spec.stage == "vision" and not spec.no_cls and getattr(llava_config, "model_type", None) in QWEN_VL_TYPES:
        raise ValueError(f"--method {spec.name}: ranks vision-encoder tokens against a [CLS] token, which the "
                         f"Qwen-VL encoder does not have; use visionzip, prumerge_plus or an in-LLM method (dart, "
                         f"fastv, random, pooling)")
    if spec.stage == "llm" and args.layer is not None and not 0 <= args.layer < depth:
        raise ValueError(f"--layer: a decoder layer in [0, {depth - 1}] (the model has {depth}), "
                         f"got {args.layer}")
    if spec.name != "trim":
        spec.make_config(keep=keep, **options)
        return
    known = {f.name for f in fields(spec.config_cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"--option: method 'trim' has no option(s) {unknown}; its options are {sorted(known)}")
    try:
        check_keep(keep)
    except ValueError as e:
        raise ValueError(f"--keep: {e}") from None
    if clip_cfg is not None:
        width, want = clip_cfg.vision_config.hidden_size, llava_config.vision_config.hidden_size
        if width != want:
            raise ValueError(f"--clip: its vision width {width} differs from the model's vision "
                             f"tower ({want}); TRIM needs the CLIP the model's vision tower came from")


def qwen_inputs(processor, requests: list, *, fps: float):
    """A Qwen-VL processor's batch for ``requests`` (prompt, image files, video or None): one
    user turn per request (its images, its video, its question) in the checkpoint's chat
    template with the generation prompt; every frame of a video is used (no resampling), at
    ``fps``."""
    import numpy as np
    from PIL import Image
    from transformers.video_utils import VideoMetadata

    texts, images, videos, metadata = [], [], [], []
    opened = {}

    def rgb(f):
        if f not in opened:
            with Image.open(f) as im:
                opened[f] = im.convert("RGB")
        return opened[f]

    for prompt, files, video in requests:
        content = [{"type": "image"} for _ in files]
        images += [rgb(f) for f in files]
        if video is not None:
            frames = np.stack([np.asarray(rgb(f)) for f in video_frames(video)])
            videos.append(frames)
            metadata.append(VideoMetadata(total_num_frames=len(frames), fps=fps,
                                          frames_indices=list(range(len(frames)))))
            content.append({"type": "video"})
        content.append({"type": "text", "text": prompt})
        texts.append(processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                   add_generation_prompt=True))
    kwargs = dict(videos=videos, video_metadata=metadata, do_sample_frames=False) if videos else {}
    return dict(processor(text=texts, images=images or None, padding=True, return_tensors="pt", **kwargs))


def _infer(args: argparse.Namespace) -> int:
    import json
    import time

    options, keep = _check_infer_args(args)       # before torch: mistakes cost no import time

    import torch

    from .inference import default_dtype, default_warmup, format_reports, infer
    from .models import tiny

    preset = args.model in tiny.PRESETS
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise ValueError(f"--device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device is visible")
    if preset:
        llava_config = tiny.llava_config(args.model)
    else:
        from transformers import AutoConfig
        llava_config = AutoConfig.from_pretrained(args.model, local_files_only=True)
    clip_cfg = None
    if args.clip is not None:
        from .methods.trim import clip_config
        clip_cfg = clip_config(args.clip)
    _check_method(args, options, keep, llava_config, clip_cfg)
    qwen = getattr(llava_config, "model_type", None) in QWEN_VL_TYPES
    if qwen:
        requests = group_requests(args.image, args.video, args.prompt)
    else:
        images, prompts = pair_requests(args.image, args.prompt, random_images=preset)
    from PIL import Image

    if args.dtype is None:
        dtype = default_dtype(device, checkpoint=not preset)
        if device.type == "cpu" and not preset:
            _note("infer", "running in float32 on the CPU (bfloat16 is several times slower on CPUs "
                           "without bf16 units; --dtype bfloat16 to override)")
    else:
        dtype = getattr(torch, args.dtype)
    warmup = default_warmup(device) if args.warmup is None else args.warmup
    if args.warmup is None and warmup == 0:
        _note("infer", "no warm-up run on the CPU (--warmup N adds untimed runs first)")

    t0 = time.perf_counter()
    if preset:
        model = tiny.build_tiny_llava(args.model, dtype=dtype, device=device)
        processor = tiny.TinyProcessor(model)
        if images[0] is None:
            g = torch.Generator().manual_seed(args.seed)
            size = model.config.vision_config.image_size
            images = [Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).byte().numpy())
                      for _ in prompts]
        inputs = processor(images, prompts)
        llm_tokenizer = processor
    elif qwen:
        from .models.loading import load_model, load_processor
        processor = load_processor(args.model)          # a missing processor fails before the weights load
        model = load_model(args.model, dtype=dtype, device=device)
        inputs = qwen_inputs(processor, requests, fps=args.video_fps)
        llm_tokenizer = processor.tokenizer
        processor.decode = lambda ids: llm_tokenizer.decode(ids, skip_special_tokens=True)
    else:
        processor = tiny.load_processor(args.model)     # a missing processor fails before the weights load
        model = tiny.load_llava(args.model, dtype=dtype, device=device)
        texts = [f"USER: <image>\n{p} ASSISTANT:" for p in prompts]
        opened = {f: Image.open(f).convert("RGB") for f in set(images)}
        inputs = processor(images=[opened[f] for f in images], text=texts, return_tensors="pt",
                           padding=True)
        llm_tokenizer = processor.tokenizer
        processor.decode = lambda ids: llm_tokenizer.decode(ids, skip_special_tokens=True)
    if (args.method or "").lower() == "trim":
        from .methods.trim import ClipTextScorer
        if args.clip is not None:
            options["scorer"] = ClipTextScorer.from_pretrained(args.clip, llm_tokenizer, device=device)
        else:
            options["scorer"] = ClipTextScorer.tiny(model.config.vision_config,
                                                    model.config.text_config.vocab_size)
            _note("infer", "TRIM scores with the offline random tiny CLIP (--clip PATH for a real one)")
    _note("infer", f"loaded {args.model} ({str(dtype).removeprefix('torch.')}, {device}) in "
                   f"{time.perf_counter() - t0:.1f} s")
    kw = dict(method=args.method, keep=keep, processor=processor, max_new_tokens=args.max_new_tokens,
              do_sample=args.sample, temperature=args.temperature, top_k=args.top_k, seed=args.seed, **options)
    for i in range(warmup):
        t0 = time.perf_counter()
        infer(model, inputs, **{**kw, "max_new_tokens": 2})
        _note("infer", f"warm-up {i + 1}/{warmup} in {time.perf_counter() - t0:.1f} s")
    reports = infer(model, inputs, **kw)
    r = reports[0]
    decode = (f", decode {1e3 / r.decode_ms_per_token:.1f} tok/s"
              if args.max_new_tokens > 1 and r.decode_ms_per_token > 0 else "")
    _note("infer", f"prefill {r.prefill_ms / 1e3:.2f} s{decode} (batch {r.batch_size})")
    if args.json:
        print(json.dumps([r.as_dict() for r in reports], indent=1))
    else:
        print(format_reports(reports))
    return 0


