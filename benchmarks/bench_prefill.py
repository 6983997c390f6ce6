"""Prefill and decode latency of LLaVA with fewer visual tokens, beside the FLOPs and KV bytes the
documented cost model (epic_ext/cost.py) predicts.

For each preset (tiny: 4-layer LLM; llava-1.5-7b-depth: 24-layer CLIP + 32-layer LLM of hidden
512) and each budget (576 / 192 / 128 / 64 visual tokens) one request (B=1) runs:
  prefill   model(...) on the prompt with use_cache (vision tower + projector + LLM + last logits)
  vision    the vision tower + projector alone (so the LLM part = prefill - vision)
  decode    per-token time of 8 cached decode steps after the prefill
The method reduces at decoder layer 2 (the EPIC / DART setting); 576 means no reduction. The
check of interest: measured time ratio vs 576 tokens against the FLOPs ratio (DESIGN.md 5):
`time/flops` near 1 means the saving is real, not eaten by overheads.

    python -m benchmarks.bench_prefill --quick
    python -m benchmarks.bench_prefill --presets llava-1.5-7b-depth --methods dart,fastv,random
"""
from __future__ import annotations

import argparse
import sys

import torch

from benchmarks import common, harness

BENCH = "prefill"
BUDGETS = (576, 192, 128, 64)
DECODE_STEPS = 8


def parser() -> argparse.ArgumentParser:
    p = harness.base_parser(__doc__, ("keep",))
    p.add_argument("--presets", default=None, help="comma list (default: tiny,llava-1.5-7b-depth)")
    p.add_argument("--methods", default=None, help="comma list of in-LLM methods (default dart)")
    p.add_argument("--layer", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    return p


def _prefill_fn(model, ids, mask, px):
    def run():
        with torch.no_grad():
            return model(input_ids=ids, pixel_values=px, attention_mask=mask, use_cache=True, logits_to_keep=1)
    return run


def _vision_fn(model, px):
    def run():
        with torch.no_grad():
            hs = model.model.vision_tower(px, output_hidden_states=True).hidden_states
            return model.model.multi_modal_projector(hs[-2][:, 1:])
    return run


def _decode_ms(model, ids, mask, px, device) -> float:
    from epic_ext.inference import generate_timed
    generate_timed(model, ids, px, mask, max_new_tokens=2)
    best = float("inf")
    for _ in range(3):
        _, _, _, decode_s, steps = generate_timed(model, ids, px, mask, max_new_tokens=DECODE_STEPS + 1,
                                                  eos_token_id=-1)
        best = min(best, decode_s * 1e3 / steps)
    return best


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    harness.apply_threads(args)
    device = common.pick_device(args.device)
    from epic_ext.cost import prefill_cost
    from epic_ext.models import apply, revert
    from epic_ext.models.tiny import build_tiny_llava, random_pixels, random_prompts

    presets = (args.presets or ("tiny" if args.quick else "tiny,llava-1.5-7b-depth")).split(",")
    methods = (args.methods or "dart").split(",")
    budgets = (576, 64) if args.quick else BUDGETS
    budget_s = args.budget or (0.3 if args.quick else 1.5)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    machine = common.machine_info(device)
    rows = []
    for preset in presets:
        model = build_tiny_llava(preset, dtype=dtype, device=device)
        ids, mask = random_prompts(model, args.batch, text_before=5, text_after=40, device=device)
        px = random_pixels(model, args.batch, device=device, dtype=dtype)
        vision_ms = common.measure(_vision_fn(model, px), device, budget_s=budget_s).median_ms
        real = int(mask[0].sum())
        print(f"\n{preset}: {model.config.text_config.num_hidden_layers}-layer LLM, prompt {real} tokens "
              f"(576 visual), B={args.batch}, {dtype}, layer {args.layer}; vision tower+projector {vision_ms:.1f} ms")
        print(f"{'method':<8}{'tokens':>7}{'prefill ms':>12}{'LLM ms':>9}{'decode ms/tok':>15}{'GFLOP':>9}"
              f"{'LLM GFLOP':>11}{'time ratio':>12}{'FLOP ratio':>12}{'LLM t/F':>9}{'KV MiB':>9}")
        for method in methods:
            base = None
            for keep in budgets:
                if keep == 576:
                    apply(model, "none", layer=args.layer)
                else:
                    apply(model, method, keep=keep, layer=args.layer)
                t = common.measure(_prefill_fn(model, ids, mask, px), device, budget_s=budget_s)
                dec = _decode_ms(model, ids, mask, px, device)
                revert(model)
                cost = prefill_cost(model.config, real, keep, args.layer, torch.finfo(dtype).bits // 8)
                llm_ms = t.median_ms - vision_ms
                row = dict(preset=preset, method=method if keep != 576 else "none", keep=keep, layer=args.layer,
                           batch=args.batch, dtype=str(dtype).removeprefix("torch."), prompt_tokens=real,
                           prefill=t.as_dict(), prefill_ms=t.median_ms, vision_ms=vision_ms, llm_ms=llm_ms,
                           decode_ms_per_token=dec, flops=cost.flops, flops_llm=cost.flops_llm,
                           kv_bytes=cost.kv_bytes, kv_bytes_per_layer=cost.kv_bytes_per_layer)
                if base is None:
                    base = row
                row["time_ratio"] = row["prefill_ms"] / base["prefill_ms"]
                row["flops_ratio"] = row["flops"] / base["flops"]
                row["llm_time_ratio"] = llm_ms / base["llm_ms"]
                row["llm_flops_ratio"] = row["flops_llm"] / base["flops_llm"]
                row["llm_time_over_flops"] = row["llm_time_ratio"] / row["llm_flops_ratio"]
                rows.append(row)
                print(f"{row['method']:<8}{keep:>7}{t.median_ms:>12.1f}{llm_ms:>9.1f}{dec:>15.2f}"
                      f"{cost.flops / 1e9:>9.2f}{cost.flops_llm / 1e9:>11.2f}{row['time_ratio']:>12.3f}"
                      f"{row['flops_ratio']:>12.3f}{row['llm_time_over_flops']:>9.3f}{cost.kv_bytes / 2**20:>9.2f}")
        del model
    if not args.no_json:
        path = common.write_results(BENCH, rows, machine, config=dict(presets=presets, methods=methods,
                                                                       layer=args.layer, batch=args.batch),
                                    out_dir=args.out_dir)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
