"""Loading a local checkpoint folder of any family ``apply`` supports, picked by the
``model_type`` of its config.json (nothing is downloaded): LLaVA through
:func:`epic_ext.models.tiny.load_llava` (unchanged), Qwen2-VL / Qwen2.5-VL / Qwen3-VL through
``AutoModelForImageTextToText``. :func:`model_type_of` reads the config with ``json`` alone, so the
CLI checks its arguments against the family before torch is imported.
"""
from __future__ import annotations

import json
import os

LLAVA_TYPES = ("llava",)
QWEN_VL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
SUPPORTED_TYPES = LLAVA_TYPES + QWEN_VL_TYPES


def model_type_of(path) -> str | None:
    """``model_type`` of the config.json in the folder ``path`` (None when it names none)."""
    file = os.path.join(os.fspath(path), "config.json")
    try:
        with open(file) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not a Hugging Face checkpoint folder (no config.json)") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{file}: not a readable JSON config ({e})") from None
    return cfg.get("model_type") if isinstance(cfg, dict) else None


def check_model_type(path) -> str:
    """The folder's model_type, or a ValueError naming the supported ones."""
    model_type = model_type_of(path)
    if model_type not in SUPPORTED_TYPES:
        raise ValueError(f"{path}: model_type {model_type!r} has no token-reduction integration; supported: "
                         f"{', '.join(SUPPORTED_TYPES)}")
    return model_type


def load_model(path, *, dtype=None, attn_implementation: str = "sdpa", device="cpu"):
    """The model of a local checkpoint folder, in eval mode on ``device``. dtype None: float32
    on a CPU, bfloat16 on a GPU (see :func:`epic_ext.inference.default_dtype`)."""
    from . import tiny
    path = tiny.check_checkpoint(path)
    model_type = check_model_type(path)
    if model_type in LLAVA_TYPES:
        return tiny.load_llava(path, dtype=dtype, attn_implementation=attn_implementation, device=device)
    from transformers import AutoModelForImageTextToText

    from ..inference import default_dtype
    if dtype is None:
        dtype = default_dtype(device, checkpoint=True)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                                        local_files_only=True)
    return model.to(device).eval()


def load_processor(path):
    """The processor saved with a local checkpoint (tokenizer left-padded): LLaVA's through
    :func:`epic_ext.models.tiny.load_processor` (PIL backend), Qwen-VL's on transformers' default
    backend (its video processor has no PIL one; it needs torchvision). OSError naming the folder
    when it cannot be loaded."""
    from . import tiny
    path = tiny.check_checkpoint(path)
    if check_model_type(path) in LLAVA_TYPES:
        return tiny.load_processor(path)
    return tiny.load_processor(path, backend=None)
