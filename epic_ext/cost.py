"""Efficiency accounting: prefill FLOPs and KV-cache bytes, per layer, for a LLaVA model whose
image tokens are reduced from decoder layer K on. Pure functions of the config and the token
counts, so the same numbers serve the inference report and the benchmarks.

FLOPs count multiply-adds as 2 and cover every matmul of the prefill (elementwise work, norms,
softmax and RoPE are left out; they are O(n d), not O(n d^2)):

* vision tower, per CLIP layer over T = N + 1 tokens of width Dv (MLP width Iv):
  2 T (4 Dv^2 + 2 Dv Iv) + 4 T^2 Dv  (q/k/v/o, MLP; QK^T and PV over all T keys), plus the patch
  embedding 2 N (3 p^2) Dv and the projector 2 N (Dv D + D D)  (mlp2x_gelu).
* LLM, per decoder layer over n tokens (width D, H query heads and Hkv KV heads of size d, MLP
  width I): 2 n (2 D H d + 2 D Hkv d + 3 D I) + 2 H d n (n + 1)  (causal: query i sees i + 1
  keys, QK^T and PV each 2 d per pair per head; a dense masked kernel such as eager attention
  does 4 H d n^2 instead: ``causal=False``). Layers < K see n = L tokens, layers >= K see the
  reduced n = L - N + kept.
* LM head: 2 D V for the one row the prefill needs (next-token logits).

KV bytes: layer l holds 2 (keys, values) x Hkv x d x bytes-per-element for each cached token;
layers below K hold every prompt token, layers from K on only the kept ones (the EPIC paper's
figure counts the reduced set in every layer; this does not).
"""
from __future__ import annotations

from dataclasses import dataclass, field


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


def prefill_cost(llava_cfg, prompt_tokens: int, kept_visual: int, layer: int,
                 bytes_per_element: int = 2, new_tokens: int = 0, causal: bool = True) -> PrefillCost:
    """Cost of one request of ``prompt_tokens`` tokens (including the N image tokens) whose image
    keeps ``kept_visual`` tokens from decoder layer ``layer`` on (layer 0: before the LLM, e.g.
    the pre-projector methods). ``new_tokens`` adds generated tokens to the KV count.
    ``causal=False`` counts the LLM's attention as a dense masked kernel does (all n^2 pairs)."""
    text = llava_cfg.text_config
    n_img = llava_cfg.image_seq_length
    _, _, kv_heads, head_dim, _, n_layers = _text_dims(text)
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer: must be in [0, {n_layers}), got {layer}")
    if kept_visual < 0:
        raise ValueError(f"kept_visual: must be >= 0, got {kept_visual}")
    reduced = prompt_tokens - n_img + kept_visual
    tokens = [prompt_tokens if i < layer else reduced for i in range(n_layers)]
    visual = [n_img if i < layer else kept_visual for i in range(n_layers)]
    per_token = 2 * kv_heads * head_dim * bytes_per_element
    return PrefillCost(
        tokens_per_layer=tokens, visual_tokens_per_layer=visual,
        flops_vision=vision_flops(llava_cfg),
        flops_llm_per_layer=[llm_layer_flops(text, t, causal) for t in tokens],
        flops_head=2.0 * text.hidden_size * text.vocab_size,
        kv_bytes_per_layer=[(t + new_tokens) * per_token for t in tokens])
