"""Efficiency accounting: prefill FLOPs and KV-cache bytes, per layer, for a request of a
vision-language model whose visual tokens are reduced from decoder layer K on. Pure functions of
the config and the token counts, so the same numbers serve the inference report and the
benchmarks. A request is its text tokens plus its visual *units* (:class:`VisualUnit`): each
image, and each temporal patch group of a video, with its LLM tokens and the tokens it keeps.

FLOPs count multiply-adds as 2 and cover every matmul of the prefill (elementwise work, norms,
softmax, RoPE and DeepStack's additions are left out; they are O(n d), not O(n d^2)):

* LLaVA vision tower, per image, per CLIP layer over T = N + 1 tokens of width Dv (MLP width Iv):
  2 T (4 Dv^2 + 2 Dv Iv) + 4 T^2 Dv  (q/k/v/o, MLP; QK^T and PV over all T keys), plus the patch
  embedding 2 N (3 p^2) Dv and the projector 2 N (Dv D + D D)  (mlp2x_gelu).
* Qwen-VL vision tower, per unit of h x w LLM tokens, i.e. P = h w m^2 patches (m: the spatial
  merge size): the patch embedding 2 P (C t p^2) Dv (a Conv3d over t x p x p x C pixels), per
  block 8 P Dv^2 (qkv, proj) + the MLP (2 linears: 4 P Dv Iv, Qwen2-VL (Iv = mlp_ratio Dv) and
  Qwen3-VL; gated, Qwen2.5-VL: 6 P Dv Iv) + attention 4 n^2 Dv per attended set of n patches:
  the whole unit (the encoder attends within each image and each video frame group), or, in
  Qwen2.5-VL's windowed blocks (all but ``fullatt_block_indexes``), each window of
  w_s x w_s LLM tokens (w_s = window_size / m / p; edge windows are cut), then the patch merger
  2 h w (4 Dv)^2 + 2 h w (4 Dv) D_out (4 Dv = m^2 Dv), and Qwen3-VL's DeepStack mergers (one more
  merger of the same shape per ``deepstack_visual_indexes`` entry).
* LLM, per decoder layer over n tokens (width D, H query heads and Hkv KV heads of size d, MLP
  width I): 2 n (2 D H d + 2 D Hkv d + 3 D I) + 2 H d n (n + 1)  (causal: query i sees i + 1
  keys, QK^T and PV each 2 d per pair per head; a dense masked kernel such as eager attention
  does 4 H d n^2 instead: ``causal=False``). Layers < K see n = text + every unit's tokens,
  layers >= K the reduced n = text + every unit's kept tokens.
* LM head: 2 D V for the one row the prefill needs (next-token logits).

KV bytes: layer l holds 2 (keys, values) x Hkv x d x bytes-per-element for each cached token;
layers below K hold every prompt token, layers from K on only the kept ones (the EPIC paper's
figure counts the reduced set in every layer; this does not).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

QWEN_VL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@dataclass(frozen=True)
class VisualUnit:
    """One image, or one temporal patch group of a video, as the LLM sees it."""
    tokens: int                              # LLM tokens of the unit (after Qwen's patch merger)
    kept: Optional[int] = None               # tokens kept from layer K on (None: all of them)
    grid: Optional[tuple[int, int]] = None   # (h, w) LLM-token grid; Qwen2.5-VL's windows need it
    kind: str = "image"                      # "image" or "video" (a frame group); the cost is the same

    @property
    def kept_tokens(self) -> int:
        return self.tokens if self.kept is None else self.kept


@dataclass
class PrefillCost:
    tokens_per_layer: list[int]          # sequence length each decoder layer processes
    visual_tokens_per_layer: list[int]   # image tokens among them
    flops_vision: float
    flops_llm_per_layer: list[float]
    flops_head: float
    kv_bytes_per_layer: list[int]
    notes: dict = field(default_factory=dict)

    @property
    def flops_llm(self) -> float:
        return sum(self.flops_llm_per_layer)

    @property
    def flops(self) -> float:
        return self.flops_vision + self.flops_llm + self.flops_head

    @property
    def kv_bytes(self) -> int:
        return sum(self.kv_bytes_per_layer)

    def as_dict(self) -> dict:
        return {"tokens_per_layer": self.tokens_per_layer, "visual_tokens_per_layer": self.visual_tokens_per_layer,
                "flops": self.flops, "flops_vision": self.flops_vision, "flops_llm": self.flops_llm,
                "flops_head": self.flops_head, "kv_bytes": self.kv_bytes,
                "kv_bytes_per_layer": self.kv_bytes_per_layer}


def _text_dims(text_cfg):
    d_model = text_cfg.hidden_size
    heads = text_cfg.num_attention_heads
    kv_heads = getattr(text_cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(text_cfg, "head_dim", None) or d_model // heads
    return d_model, heads, kv_heads, head_dim, text_cfg.intermediate_size, text_cfg.num_hidden_layers


def vision_flops(llava_cfg) -> float:
    v = llava_cfg.vision_config
    n = (v.image_size // v.patch_size) ** 2
    t = n + 1
    dv, iv = v.hidden_size, v.intermediate_size
    per_layer = 2 * t * (4 * dv * dv + 2 * dv * iv) + 4 * t * t * dv
    d = llava_cfg.text_config.hidden_size
    patch = 2 * n * 3 * v.patch_size ** 2 * dv
    projector = 2 * n * (dv * d + d * d)
    # LLaVA reads an inner layer (vision_feature_layer = -2): the layers after it still run in
    # transformers (hidden_states of all layers), so count all of them.
    return per_layer * v.num_hidden_layers + patch + projector


def llm_layer_flops(text_cfg, n: int, causal: bool = True) -> float:
    d_model, heads, kv_heads, head_dim, inter, _ = _text_dims(text_cfg)
    linear = 2 * n * (2 * d_model * heads * head_dim + 2 * d_model * kv_heads * head_dim + 3 * d_model * inter)
    # causal kernels compute the n (n + 1) / 2 visible pairs; a masked dense kernel (eager) all n^2
    pairs = n * (n + 1) // 2 if causal else n * n
    return float(linear + 4 * heads * head_dim * pairs)


def _check_units(units: Sequence[VisualUnit]) -> None:
    for i, u in enumerate(units):
        if not isinstance(u, VisualUnit):
            raise TypeError(f"units: expected VisualUnit items, got {type(u).__name__} at {i}")
        if u.tokens < 0 or not 0 <= u.kept_tokens <= u.tokens:
            raise ValueError(f"units: unit {i} keeps {u.kept} of {u.tokens} tokens (need 0 <= kept <= tokens)")
        if u.grid is not None and u.grid[0] * u.grid[1] != u.tokens:
            raise ValueError(f"units: unit {i} has a {u.grid[0]}x{u.grid[1]} grid but {u.tokens} tokens")


def _window_sizes(length: int, window: int) -> list[int]:
    """Sizes of the windows a length is cut into (Qwen2.5-VL tiles from the top-left corner)."""
    return [window] * (length // window) + ([length % window] if length % window else [])


def qwen_unit_vision_flops(config, unit: VisualUnit) -> float:
    """Vision-tower FLOPs of one Qwen-VL unit (module notes): patch embedding, every block
    (attention over the unit, or over its windows in Qwen2.5-VL's windowed blocks), the merger
    and Qwen3-VL's DeepStack mergers."""
    v = config.vision_config
    family = config.model_type
    m = v.spatial_merge_size
    tokens = unit.tokens
    patches = tokens * m * m
    dv = v.embed_dim if family == "qwen2_vl" else v.hidden_size
    d_out = v.hidden_size if family == "qwen2_vl" else v.out_hidden_size
    pixels = getattr(v, "in_channels", 3) * v.temporal_patch_size * v.patch_size ** 2
    embed = 2 * patches * pixels * dv
    if family == "qwen2_vl":
        mlp = 4 * patches * dv * int(dv * v.mlp_ratio)
    elif family == "qwen2_5_vl":
        mlp = 6 * patches * dv * v.intermediate_size          # gate, up, down
    else:
        mlp = 4 * patches * dv * v.intermediate_size
    linear = 8 * patches * dv * dv + mlp
    full_attn = 4 * patches * patches * dv
    blocks = 0.0
    windowed = family == "qwen2_5_vl"
    if windowed:
        if unit.grid is None:
            raise ValueError("units: Qwen2.5-VL's windowed vision attention needs each unit's grid (h, w)")
        side = v.window_size // m // v.patch_size
        rows, cols = _window_sizes(unit.grid[0], side), _window_sizes(unit.grid[1], side)
        # sum over windows of (r c m^2)^2 = m^4 (sum r^2)(sum c^2)
        window_attn = 4 * dv * m ** 4 * sum(r * r for r in rows) * sum(c * c for c in cols)
    for block in range(v.depth):
        attn = window_attn if windowed and block not in v.fullatt_block_indexes else full_attn
        blocks += linear + attn
    wide = m * m * dv
    merger = 2 * tokens * wide * wide + 2 * tokens * wide * d_out
    mergers = 1 + (len(getattr(v, "deepstack_visual_indexes", None) or ()) if family == "qwen3_vl" else 0)
    return float(embed + blocks + mergers * merger)


def unit_vision_flops(config, unit: VisualUnit) -> float:
    """Vision-tower (+ projector / merger) FLOPs of one unit of a request."""
    family = getattr(config, "model_type", None)
    if family in QWEN_VL_TYPES:
        return qwen_unit_vision_flops(config, unit)
    if family == "llava":
        return vision_flops(config)
    raise ValueError(f"config: no vision cost model for model_type {family!r}; supported: "
                     f"{sorted(('llava',) + QWEN_VL_TYPES)}")


def units_from_grids(config, image_grid_thw=None, video_grid_thw=None) -> list[VisualUnit]:
    """The units of Qwen-VL inputs, in the order the model consumes them (images, then videos; a
    video of grid (t, H, W) patches is t units of H/m x W/m tokens), nothing reduced yet."""
    m = config.vision_config.spatial_merge_size
    units = []
    for kind, grids in (("image", image_grid_thw), ("video", video_grid_thw)):
        for t, h, w in ([] if grids is None else (grids.tolist() if hasattr(grids, "tolist") else grids)):
            units += [VisualUnit(tokens=(h // m) * (w // m), grid=(h // m, w // m), kind=kind)] * int(t)
    return units


def request_cost(config, text_tokens: int, units: Sequence[VisualUnit], layer: int, *,
                 kept_visual: Optional[int] = None, bytes_per_element: int = 2, new_tokens: int = 0,
                 causal: bool = True) -> PrefillCost:
    """Cost of one request: ``text_tokens`` non-visual prompt tokens plus ``units`` (each keeping
    ``unit.kept`` tokens from decoder layer ``layer`` on; layer 0: before the LLM). ``kept_visual``:
    the visual tokens kept over all units when it is measured as a total (the cache's length)
    rather than known per unit; it replaces the units' kept counts. ``new_tokens`` adds
    generated tokens to the KV count; ``causal=False`` counts the LLM's attention as a dense
    masked kernel does (all n^2 pairs)."""
    text = config.text_config
    _, _, kv_heads, head_dim, _, n_layers = _text_dims(text)
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer: must be in [0, {n_layers}), got {layer}")
    if text_tokens < 0:
        raise ValueError(f"text_tokens: must be >= 0, got {text_tokens}")
    units = list(units)
    _check_units(units)
    visual = sum(u.tokens for u in units)
    kept = sum(u.kept_tokens for u in units) if kept_visual is None else kept_visual
    if not 0 <= kept <= visual:
        raise ValueError(f"kept_visual: must be in [0, {visual}] (the units' tokens), got {kept}")
    full, reduced = text_tokens + visual, text_tokens + kept
    tokens = [full if i < layer else reduced for i in range(n_layers)]
    per_token = 2 * kv_heads * head_dim * bytes_per_element
    return PrefillCost(
        tokens_per_layer=tokens, visual_tokens_per_layer=[visual if i < layer else kept for i in range(n_layers)],
        flops_vision=sum(unit_vision_flops(config, u) for u in units),
        flops_llm_per_layer=[llm_layer_flops(text, t, causal) for t in tokens],
        flops_head=2.0 * text.hidden_size * text.vocab_size,
        kv_bytes_per_layer=[(t + new_tokens) * per_token for t in tokens],
        notes={"text_tokens": text_tokens, "units": len(units)})


def prefill_cost(llava_cfg, prompt_tokens: int, kept_visual: int, layer: int,
                 bytes_per_element: int = 2, new_tokens: int = 0, causal: bool = True) -> PrefillCost:
    """Cost of one LLaVA request of ``prompt_tokens`` tokens (including the N image tokens of its
    one image) whose image keeps ``kept_visual`` tokens from decoder layer ``layer`` on (layer
    0: before the LLM, e.g. the pre-projector methods). ``new_tokens`` adds generated tokens to
    the KV count. ``causal=False`` counts the LLM's attention as a dense masked kernel does (all
    n^2 pairs). Several images, videos or Qwen-VL models: :func:`request_cost`."""
    n_img = getattr(llava_cfg, "image_seq_length", None)
    if n_img is None:
        raise ValueError(f"llava_cfg: prefill_cost takes a LLaVA config (one image of image_seq_length tokens); "
                         f"use request_cost for model_type {getattr(llava_cfg, 'model_type', None)!r}")
    if kept_visual < 0:
        raise ValueError(f"kept_visual: must be >= 0, got {kept_visual}")
    if kept_visual > n_img:
        raise ValueError(f"kept_visual: at most the image's {n_img} tokens, got {kept_visual}")
    return request_cost(llava_cfg, prompt_tokens - n_img, [VisualUnit(n_img, kept_visual)], layer,
                        bytes_per_element=bytes_per_element, new_tokens=new_tokens, causal=causal)
