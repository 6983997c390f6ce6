"""Small LLaVA models built from configs, offline (no hub): CLIP vision tower + Llama text model
with LLaVA-1.5's geometry (336 px, patch 14 -> 576 visual tokens, features from the penultimate
vision layer, mlp2x_gelu projector). Real checkpoints load with :func:`load_llava` and run
through the same code.

Presets:
* ``"tiny"``: 4-layer CLIP (hidden 64) + 4-layer Llama (hidden 128): unit tests, demos.
* ``"demo"``: 2-layer CLIP + 4-layer Llama of hidden 64: the EPIC demo (trains on a CPU).
* ``"llava-1.5-7b-depth"``: LLaVA-1.5-7B's depth (24-layer CLIP, 32-layer LLM) with small
  widths (CLIP hidden 64, LLM hidden 512): prefill/decode benchmarks on a CPU.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch

PRESETS = {}


@dataclass(frozen=True)
class TinyLlavaSpec:
    vocab_size: int = 1024
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 256
    vision_hidden: int = 64
    vision_layers: int = 4
    vision_heads: int = 4
    vision_intermediate: int = 128
    image_size: int = 336
    patch_size: int = 14
    max_positions: int = 2048

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def image_token_id(self) -> int:
        return self.vocab_size - 1      # the last id; 0 is padding, 1 BOS, 2 EOS


PRESETS["tiny"] = TinyLlavaSpec()
# The demo's model: narrow enough that a CPU trains it for hundreds of steps in minutes.
PRESETS["demo"] = TinyLlavaSpec(text_hidden=64, text_heads=2, text_kv_heads=1, text_intermediate=128,
                                vision_layers=2)
PRESETS["llava-1.5-7b-depth"] = TinyLlavaSpec(text_hidden=512, text_layers=32, text_heads=8, text_kv_heads=8,
                                              text_intermediate=1376, vision_layers=24)


def llava_config(spec: TinyLlavaSpec | str = "tiny", **overrides):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(f"spec: unknown preset {spec!r}; presets: {sorted(PRESETS)}")
        spec = PRESETS[spec]
    spec = replace(spec, **overrides)
    vision = CLIPVisionConfig(hidden_size=spec.vision_hidden, intermediate_size=spec.vision_intermediate,
                              num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                              image_size=spec.image_size, patch_size=spec.patch_size, projection_dim=spec.vision_hidden)
    text = LlamaConfig(vocab_size=spec.vocab_size, hidden_size=spec.text_hidden, num_hidden_layers=spec.text_layers,
                       num_attention_heads=spec.text_heads, num_key_value_heads=spec.text_kv_heads,
                       intermediate_size=spec.text_intermediate, max_position_embeddings=spec.max_positions,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=spec.image_token_id,
                      image_seq_length=spec.image_tokens, projector_hidden_act="gelu",
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = 0, 1, 2
    cfg.epic_spec = asdict(spec)
    return cfg


def build_tiny_llava(spec: TinyLlavaSpec | str = "tiny", *, seed: int = 0, dtype: torch.dtype = torch.float32,
                     attn_implementation: str = "sdpa", device="cpu", **overrides):
    """A randomly initialised LlavaForConditionalGeneration (eval mode) from a preset."""
    from transformers import LlavaForConditionalGeneration
    cfg = llava_config(spec, **overrides)
    cfg._attn_implementation = attn_implementation
    for sub in (cfg.vision_config, cfg.text_config):
        sub._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = 0
    return model.to(device=device, dtype=dtype).eval()


def check_checkpoint(path) -> str:
    """``path`` as a str when it is a local model folder with a config.json; FileNotFoundError
    otherwise (transformers would take a missing folder for a hub repo id and say so)."""
    import os
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such folder (a local checkpoint folder is expected; "
                                "nothing is downloaded)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: not a Hugging Face checkpoint folder (no config.json)")
    return path


def load_llava(path: str, *, dtype: torch.dtype | None = None, attn_implementation: str = "sdpa", device="cpu"):
    """A real LLaVA checkpoint (e.g. llava-hf/llava-1.5-7b-hf) from a local folder. dtype None:
    float32 on a CPU, bfloat16 on a GPU (see :func:`epic_ext.inference.default_dtype`)."""
    from transformers import LlavaForConditionalGeneration

    from ..inference import default_dtype
    path = check_checkpoint(path)
    if dtype is None:
        dtype = default_dtype(device, checkpoint=True)
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                                          local_files_only=True)
    return model.to(device).eval()


def load_processor(path: str, backend: Optional[str] = "pil"):
    """The processor (image processor + tokenizer) saved with a local checkpoint, left padding.
    ``backend="pil"`` (LLaVA): PIL's resampling, as LLaVA's own preprocessing and our training
    (with torchvision installed transformers would pick its bicubic, a few 1e-3 away); None:
    transformers' default (Qwen-VL's video processors have no PIL backend)."""
    from transformers import AutoProcessor
    path = check_checkpoint(path)
    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True,
                                                  **({} if backend is None else {"backend": backend}))
    except ImportError as e:
        raise OSError(f"{path}: cannot load the processor: {' '.join(str(e).split())[:200]} "
                      f"(transformers' Qwen-VL processors need torchvision)") from e
    except (OSError, ValueError) as e:
        first = (" ".join(str(e).split()).split(". ")[0] or type(e).__name__).rstrip(".")
        raise OSError(f"{path}: cannot load the processor saved with the model (image processor + "
                      f"tokenizer; transformers: {first}); save it next to the weights with "
                      "processor.save_pretrained(folder)") from e
    tok = getattr(processor, "tokenizer", None)
    if tok is None or not hasattr(processor, "image_processor"):
        raise OSError(f"{path}: the saved processor has no tokenizer and image processor")
    tok.padding_side = "left"
    return processor


def save_tiny_llava(folder, spec: TinyLlavaSpec | str = "tiny", *, seed: int = 0) -> str:
    """Write a tiny LLaVA and its processor (the trainer's tokenizer and CLIP image processor) to
    ``folder``, loadable offline by :func:`epic_ext.models.loading.load_model` / ``load_processor``."""
    import os

    from ..train.data import llava_processor
    from ..train.tokenizer import build_tokenizer
    folder = os.fspath(folder)
    model = build_tiny_llava(spec, seed=seed)
    model.save_pretrained(folder)
    llava_processor(model.config, build_tokenizer(model.config.text_config.vocab_size),
                    model.config.vision_config.image_size).save_pretrained(folder)
    return folder


def random_prompts(model, batch: int, *, text_before=5, text_after=12, pad_to: int | None = None, seed: int = 0,
                   device="cpu"):
    """Token ids [B, L] with one image span per row and left padding up to ``pad_to``; rows get
    different text lengths (so image positions differ per row). Returns (input_ids, attention_mask)."""
    cfg = model.config
    n = cfg.image_seq_length
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(batch):
        before = text_before + i % 3
        after = text_after + (2 * i) % 5
        ids = torch.randint(3, cfg.text_config.vocab_size - 1, (before + after,), generator=g)
        rows.append(torch.cat([torch.tensor([1]), ids[:before], torch.full((n,), cfg.image_token_id), ids[before:]]))
    length = max(max(len(r) for r in rows), pad_to or 0)
    input_ids = torch.zeros(batch, length, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, length - len(r):] = r
        mask[i, length - len(r):] = 1
    return input_ids.to(device), mask.to(device)


def random_pixels(model, batch: int, *, seed: int = 0, device="cpu", dtype=torch.float32):
    size = model.config.vision_config.image_size
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g).to(device=device, dtype=dtype)


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class TinyProcessor:
    """Prompt + image preprocessing for the tiny models, offline: a character-level tokenizer
    (ids 3.. are printable ASCII; 0 pad, 1 BOS, 2 EOS, the last id is <image>), LLaVA-1.5's
    conversation template, left padding, CLIP resize + normalisation. Real checkpoints use
    their own ``AutoProcessor`` instead."""
    template = "USER: <image>\n{prompt} ASSISTANT:"
    first_char = 32

    def __init__(self, model_or_config):
        cfg = getattr(model_or_config, "config", model_or_config)
        self.image_token_id = cfg.image_token_id
        self.image_tokens = cfg.image_seq_length
        self.image_size = cfg.vision_config.image_size
        self.vocab_size = cfg.text_config.vocab_size

    def encode_text(self, text: str) -> list[int]:
        return [3 + (ord(c) - self.first_char) % (self.vocab_size - 4) for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Printable characters up to the first EOS (special ids are never printed, so
        ``skip_special_tokens`` is accepted for tokenizer compatibility and has no effect)."""
        out = []
        for i in (ids.tolist() if hasattr(ids, "tolist") else ids):
            if i == 2:
                break
            if 3 <= i < 3 + 95:
                out.append(chr(i - 3 + self.first_char))
        return "".join(out)

    def batch_decode(self, ids) -> list[str]:
        return [self.decode(row) for row in ids]

    def pixels(self, image) -> torch.Tensor:
        import numpy as np
        from PIL import Image
        if not isinstance(image, Image.Image):
            image = Image.open(image)
        image = image.convert("RGB").resize((self.image_size, self.image_size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]

    def __call__(self, images, prompts: list[str]):
        rows = []
        for p in prompts:
            before, after = self.template.format(prompt=p).split("<image>")
            rows.append([1] + self.encode_text(before) + [self.image_token_id] * self.image_tokens
                        + self.encode_text(after))
        length = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, length - len(r):] = torch.tensor(r)
            mask[i, length - len(r):] = 1
        pixel_values = torch.stack([self.pixels(im) for im in images])
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values}
