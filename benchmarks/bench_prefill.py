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

Qwen2.5-VL-shaped rows (--presets qwen2.5-vl-depth; not in the default run: ~7 minutes with
--threads 1 on the 2-core VM, --quick ~1 minute): a 28-layer LLM of hidden 256 behind a small
vision tower with the real patching (patch 14, 2x2 merger, 112 px windows), one request (B=1)
each of a 448x448 image (256 visual tokens), a 1344x1344 image (2304) and a 16-frame 448x448
video (8 temporal groups = 8 units of 256), at 100% / 25% / 11% of every unit's tokens with DART
and FastV at layer 2. Per request and budget:
  prefill   model(...) as above (vision tower + LLM), "base ms" / "ours ms"
  LLM       the same call with the vision tower's output precomputed: the LLM part alone
  decode    per-token time of 8 cached decode steps after the prefill
  FLOPs     epic_ext.cost.request_cost over the request's units (each unit's kept count)
All prefills of a request are timed in interleaved rounds, on the wall clock and on the process's
CPU clock, and a time ratio is the median of the rounds' ratios to the 100% row: with --threads 1
the CPU clock's ratios ("cpu" t/F) hold on a shared machine whose load moves the wall clock.
Written to `prefill_qwen_<machine>.json`.

    python -m benchmarks.bench_prefill --quick
    python -m benchmarks.bench_prefill --presets llava-1.5-7b-depth --methods dart,fastv,random
    python -m benchmarks.bench_prefill --presets qwen2.5-vl-depth [--requests image-1344]
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

from benchmarks import common, harness

BENCH = "prefill"
BUDGETS = (576, 192, 128, 64)
DECODE_STEPS = 8


def parser() -> argparse.ArgumentParser:
    p = harness.base_parser(__doc__, ("keep",))
    p.add_argument("--presets", default=None, help="comma list (default: tiny,llava-1.5-7b-depth)")
    p.add_argument("--methods", default=None,
                   help="comma list of in-LLM methods (default dart; dart,fastv for qwen2.5-vl-depth)")
    p.add_argument("--requests", default=None,
                   help=f"qwen2.5-vl-depth: comma list of {','.join(QWEN_REQUESTS)} (default all; quick: image-448)")
    p.add_argument("--hidden", type=int, default=None,
                   help="qwen2.5-vl-depth: LLM hidden size, a multiple of 64 (default 256; heads of 64, MLP 5.25x)")
    p.add_argument("--min-reps", type=int, default=5,
                   help="qwen2.5-vl-depth: the fewest timed repetitions per measurement")
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
    qwen = QWEN_PRESET in presets
    presets = [p for p in presets if p != QWEN_PRESET]
    methods = (args.methods or "dart").split(",")
    budgets = (576, 64) if args.quick else BUDGETS
    budget_s = args.budget or (0.3 if args.quick else 1.5)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    machine = common.machine_info(device)
    rows = []
    if qwen:
        requests = (args.requests or ("image-448" if args.quick else ",".join(QWEN_REQUESTS))).split(",")
        unknown = [r for r in requests if r not in QWEN_REQUESTS]
        if unknown:
            raise SystemExit(f"--requests: unknown {', '.join(unknown)}; choose from {', '.join(QWEN_REQUESTS)}")
        qwen_methods = (args.methods or "dart,fastv").split(",")
        keeps = [1.0, 0.11] if args.quick else list(QWEN_KEEPS)
        # seconds of rounds per timed entry: enough rounds for the 448 px request's fast calls
        qwen_budget = args.budget or (1.0 if args.quick else 4.0)
        overrides = qwen_overrides(args.hidden)
        qwen_rows = run_qwen(args, device, dtype, qwen_methods, requests, keeps, qwen_budget, overrides)
        if not args.no_json:
            path = common.write_results(f"{BENCH}_qwen", qwen_rows, machine,
                                        config=dict(preset=QWEN_PRESET, overrides=overrides, methods=qwen_methods,
                                                    requests=requests, keeps=keeps, layer=args.layer,
                                                    batch=args.batch, quick=args.quick),
                                        out_dir=args.out_dir)
            print(f"wrote {path}")
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
    if presets and not args.no_json:
        path = common.write_results(BENCH, rows, machine, config=dict(presets=presets, methods=methods,
                                                                       layer=args.layer, batch=args.batch),
                                    out_dir=args.out_dir)
        print(f"wrote {path}")
    return 0


# --------------------------------------------------------------------------------------------
# Qwen2.5-VL-shaped rows (--presets qwen2.5-vl-depth)
# --------------------------------------------------------------------------------------------

QWEN_PRESET = "qwen2.5-vl-depth"
# Qwen2.5-VL-7B's depth and shapes at a width 2 CPU cores can run: 28 decoder layers, head_dim 64
# with H x d = hidden (as 28 x 128 = 3584), MLP 5.25x hidden (18944 / 3584 = 5.29), GQA, rope theta
# 1e6, M-RoPE sections in the real 1:1.5:1.5 ratio. The vision tower keeps the real patching
# (patch 14, temporal patch 2, 2x2 merger, 112 px windows) but only 4 blocks of width 128, one
# of them full-attention (the real one: 32 blocks of 1280, every 8th full).
QWEN_OVERRIDES = dict(num_hidden_layers=28, hidden_size=256, intermediate_size=1344, num_attention_heads=4,
                      num_key_value_heads=1, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                              "mrope_section": [8, 12, 12]},
                      depth=4, vision_hidden_size=128, vision_intermediate_size=344, num_heads=2,
                      out_hidden_size=256, window_size=112, fullatt_block_indexes=[3], tokens_per_second=2)


def qwen_overrides(hidden: int | None = None) -> dict:
    """QWEN_OVERRIDES at another LLM width (heads of 64, MLP 5.25x, the merger's output)."""
    if hidden is None:
        return dict(QWEN_OVERRIDES)
    if hidden < 64 or hidden % 64:
        raise SystemExit(f"--hidden: a positive multiple of 64, got {hidden}")
    return dict(QWEN_OVERRIDES, hidden_size=hidden, intermediate_size=hidden * 21 // 4,
                num_attention_heads=hidden // 64, out_hidden_size=hidden)


# name -> (kind, frames, height px, width px): 448 px -> 32x32 patches -> 256 tokens; 1344 px ->
# 2304 tokens; 16 frames of 448 px -> 8 temporal groups (units) of 256 tokens.
QWEN_REQUESTS = {"image-448": ("image", 1, 448, 448), "image-1344": ("image", 1, 1344, 1344),
                 "video-16x448": ("video", 16, 448, 448)}
QWEN_KEEPS = (1.0, 0.25, 0.11)
QWEN_TEXT = ("describe what the picture shows in detail : the color of the sky , the people and what they "
             "are doing , and where it is ? answer in one long sentence .")
QWEN_VIDEO_FPS = 2.0     # the Qwen2.5-VL processor's default sampling: second_per_grid_ts = 2 / fps


def qwen_request(model, name: str, batch: int, device, dtype) -> dict:
    """Forward inputs of request ``name`` (``batch`` copies): the chat layout of the Qwen processor
    with the placeholder run the grid implies, random normalised pixels of the real patch layout
    (no torchvision needed, unlike transformers' Qwen processors)."""
    from epic_ext.models.tiny_qwen import (IMAGE_ID, VIDEO_ID, VISION_END_ID, VISION_START_ID,
                                           tiny_tokenizer)
    kind, frames, h_px, w_px = QWEN_REQUESTS[name]
    v = model.config.vision_config
    t, h, w = max(frames // v.temporal_patch_size, 1), h_px // v.patch_size, w_px // v.patch_size
    n_visual = t * h * w // v.spatial_merge_size ** 2
    tok = tiny_tokenizer()
    before = tok("<|im_start|>user")["input_ids"]
    after = tok(QWEN_TEXT + " <|im_end|> <|im_start|>assistant")["input_ids"]
    ids = before + [VISION_START_ID] + [IMAGE_ID if kind == "image" else VIDEO_ID] * n_visual + [VISION_END_ID] + after
    ids = torch.tensor([ids] * batch, device=device)
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch * t * h * w, patch_dim, generator=g).to(device=device, dtype=dtype)
    grid = torch.tensor([[t, h, w]] * batch, device=device)
    out = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    if kind == "image":
        out.update(pixel_values=pixels, image_grid_thw=grid)
    else:
        out.update(pixel_values_videos=pixels, video_grid_thw=grid,
                   second_per_grid_ts=torch.full((batch,), v.temporal_patch_size / QWEN_VIDEO_FPS, device=device))
    return out


def _qwen_prefill_fn(model, req):
    def run():
        with torch.no_grad():
            return model(**req, use_cache=True, logits_to_keep=1)
    return run


def _qwen_vision_fn(model, req):
    kind = "image" if "pixel_values" in req else "video"
    fn = model.model.get_image_features if kind == "image" else model.model.get_video_features
    pixels, grid = req[f"pixel_values{'' if kind == 'image' else '_videos'}"], req[f"{kind}_grid_thw"]

    def run():
        with torch.no_grad():
            return fn(pixels, grid, return_dict=True)
    return run


class _VisionPrecomputed:
    """While on, the model's get_image_features / get_video_features return the stored output of
    the vision tower for this request's pixels, so a prefill times the LLM part alone (the
    embedding, M-RoPE indices, the method's selection, the decoder layers, the head)."""

    NAMES = ("get_image_features", "get_video_features")

    def __init__(self, model, req):
        self.inner, self.out = model.model, _qwen_vision_fn(model, req)()

    def on(self) -> None:
        for name in self.NAMES:
            setattr(self.inner, name, lambda *a, **k: self.out)

    def off(self) -> None:
        for name in self.NAMES:
            self.inner.__dict__.pop(name, None)


def _qwen_decode(model, req, steps: int) -> tuple[float, float, int]:
    """Median wall and CPU ms of ``steps`` cached greedy decode steps after one prefill (the
    first step not counted), and the length of the last layer's cache after the prefill."""
    import time
    with torch.no_grad():
        out = model(**req, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        n_layers = model.config.text_config.num_hidden_layers
        cached_last = cache.get_seq_length(n_layers - 1)
        mask = req["attention_mask"]
        nxt = out.logits[:, -1:].argmax(-1)
        wall, cpu = [], []
        for _ in range(steps + 1):
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            common.sync(mask.device)
            t0, c0 = time.perf_counter(), time.process_time()
            out = model(input_ids=nxt, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1:].argmax(-1)
            common.sync(mask.device)
            wall.append((time.perf_counter() - t0) * 1e3)
            cpu.append((time.process_time() - c0) * 1e3)
    return statistics.median(wall[1:]), statistics.median(cpu[1:]), cached_last


def _interleaved(runs: dict, device, budget_s: float, min_reps: int) -> dict:
    """Time every entry of ``runs`` ({key: (enter, fn, leave)}) in rounds, each round calling
    each fn once in order (enter / leave untimed), so a shared machine's changing load falls on
    the baseline and the reduced runs alike. One untimed round first; then as many rounds as
    ``budget_s`` per entry allows, at least ``min_reps``. Returns {key: (wall, cpu)}: the ms of
    each round on the wall clock and on the process's CPU clock (time.process_time). With one
    thread the CPU clock is the call's own work, which other processes' load on a shared machine
    changes much less than the wall clock (that grows with their share of the cores)."""
    import time
    wall: dict = {k: [] for k in runs}
    cpu: dict = {k: [] for k in runs}

    def one_round(record: bool) -> float:
        t_round = time.perf_counter()
        for key, (enter, fn, leave) in runs.items():
            enter()
            try:
                common.sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                common.sync(device)
                if record:
                    wall[key].append((time.perf_counter() - t0) * 1e3)
                    cpu[key].append((time.process_time() - c0) * 1e3)
            finally:
                leave()
        return time.perf_counter() - t_round

    round_s = one_round(False)
    rounds = max(min_reps, min(50, int(budget_s * len(runs) / max(round_s, 1e-6))))
    for _ in range(rounds):
        one_round(True)

    return {k: (wall[k], cpu[k]) for k in runs}


def _timing(ms: list[float]) -> common.Timing:
    return common.Timing(statistics.median(ms), min(ms), statistics.fmean(ms), len(ms))


def _paired_ratio(ms: list[float], base: list[float]) -> float:
    """Median over rounds of the round's time over the baseline's time in the same round."""
    return statistics.median(a / b for a, b in zip(ms, base))


def _ms(row: dict, what: str, tail: str = "") -> str:
    wall, cpu = row[f"{what}_ms{tail}"], row[f"{what}_cpu_ms{tail}"]
    digits = 0 if wall >= 100 else 1
    return f"{wall:.{digits}f}/{cpu:.{digits}f}"


def _nothing() -> None:
    pass


def _applier(model, config: tuple[str, float], layer: int, precomputed: _VisionPrecomputed | None):
    """(enter, leave) that apply ``config`` = (method, keep) to the model (method "none": the
    100% baseline through the same reduced forward), with the vision output precomputed or not."""
    from epic_ext.models import apply, revert
    method, keep = config

    def enter():
        if method == "none":
            apply(model, "none", layer=layer)
        else:
            apply(model, method, keep=keep, layer=layer)
        if precomputed is not None:
            precomputed.on()

    def leave():
        if precomputed is not None:
            precomputed.off()
        revert(model)
    return enter, leave


def run_qwen(args, device, dtype, methods: list[str], requests: list[str], keeps: list[float],
             budget_s: float, overrides: dict = QWEN_OVERRIDES) -> list[dict]:
    """The Qwen rows: per request, every (method, keep) and the 100% baseline (method none)."""
    from dataclasses import replace

    from epic_ext.cost import request_cost, units_from_grids
    from epic_ext.models.tiny_qwen import build_tiny_qwen
    from epic_ext.ops import resolve_k
    model = build_tiny_qwen("qwen2_5_vl", dtype=dtype, device=device, **overrides)
    cfg, bpe = model.config, torch.finfo(dtype).bits // 8
    text = cfg.text_config
    configs = [("none", 1.0)] + [(m, k) for m in methods for k in keeps if k < 1.0]
    rows = []
    for name in requests:
        req = qwen_request(model, name, args.batch, device, dtype)
        all_units = units_from_grids(cfg, req.get("image_grid_thw"), req.get("video_grid_thw"))
        units, prompt_tokens = [u.tokens for u in all_units], req["input_ids"].shape[1]
        precomputed = _VisionPrecomputed(model, req)
        runs = {"vision": (_nothing, _qwen_vision_fn(model, req), _nothing)}
        for c in configs:
            for what in ("full", "llm"):
                enter, leave = _applier(model, c, args.layer, precomputed if what == "llm" else None)
                runs[(c, what)] = (enter, _qwen_prefill_fn(model, req), leave)
        timed = _interleaved(runs, device, budget_s, args.min_reps)
        vision, vision_cpu = map(_timing, timed["vision"])
        print(f"\n{QWEN_PRESET} {name}: {text.num_hidden_layers}-layer LLM (hidden {text.hidden_size}), "
              f"prompt {prompt_tokens} tokens ({sum(units)} visual in {len(units)} unit(s) of {units[0]}), "
              f"B={args.batch}, {dtype}, {torch.get_num_threads()} thread(s), layer {args.layer}; vision tower "
              f"{vision.median_ms:.0f} ms wall / {vision_cpu.median_ms:.0f} ms CPU; {vision.reps} rounds")
        print("ms: wall/CPU medians; r: ratio to the 100% row (time: median of the rounds' ratios); "
              "t/F: time ratio / FLOPs ratio (wall, CPU)")
        print(f"{'method':<7}{'keep':>5}{'visual':>7}{'prefill base':>13}{'prefill ours':>13}{'LLM base':>12}"
              f"{'LLM ours':>12}{'FLOP r':>8}{'time r':>7}{'t/F':>6}{'cpu':>6}{'LLM F r':>8}{'LLM t r':>8}"
              f"{'t/F':>6}{'cpu':>6}{'dec ms':>11}{'KV MiB':>7}")
        base = None
        for c in configs:
            method, keep = c
            enter, leave = _applier(model, c, args.layer, precomputed)
            enter()
            try:
                dec, dec_cpu, cached_last = _qwen_decode(model, req, DECODE_STEPS)
            finally:
                leave()
            full, full_cpu = map(_timing, timed[(c, "full")])
            llm, llm_cpu = map(_timing, timed[(c, "llm")])
            kept = [resolve_k(keep, n) for n in units] if method != "none" else list(units)
            kept_units = [replace(u, kept=k) for u, k in zip(all_units, kept)]
            cost = request_cost(cfg, prompt_tokens - sum(units), kept_units, args.layer, bytes_per_element=bpe)
            if cached_last != cost.tokens_per_layer[-1]:
                raise RuntimeError(f"{name} {method} keep {keep}: the last layer caches {cached_last} tokens, "
                                   f"the cost model counts {cost.tokens_per_layer[-1]}")
            row = dict(preset=QWEN_PRESET, request=name, method=method, keep=keep, layer=args.layer,
                       batch=args.batch, dtype=str(dtype).removeprefix("torch."), threads=torch.get_num_threads(),
                       prompt_tokens=prompt_tokens, units=units, kept_per_unit=kept, visual_tokens=sum(units),
                       kept_visual=sum(kept), prefill=full.as_dict(), prefill_ms=full.median_ms,
                       prefill_cpu_ms=full_cpu.median_ms, vision_ms=vision.median_ms,
                       vision_cpu_ms=vision_cpu.median_ms,
                       llm=llm.as_dict(), llm_ms=llm.median_ms, llm_cpu_ms=llm_cpu.median_ms,
                       decode_ms_per_token=dec, decode_cpu_ms_per_token=dec_cpu, flops=cost.flops,
                       flops_vision=cost.flops_vision,
                       flops_llm=cost.flops_llm, kv_bytes=cost.kv_bytes, kv_bytes_per_layer=cost.kv_bytes_per_layer)
            if base is None:
                base = row
            row["flops_ratio"] = row["flops"] / base["flops"]
            row["llm_flops_ratio"] = row["flops_llm"] / base["flops_llm"]
            for prefix, what, flops_key in (("", "full", "flops_ratio"), ("llm_", "llm", "llm_flops_ratio")):
                for clock, series in (("", 0), ("cpu_", 1)):
                    ratio = _paired_ratio(timed[(c, what)][series], timed[(configs[0], what)][series])
                    row[f"{prefix}{clock}time_ratio"] = ratio
                    row[f"{prefix}{clock}time_over_flops"] = ratio / row[flops_key]
            rows.append(row)
            print(f"{method:<7}{keep:>5.0%}{sum(kept):>7}{_ms(base, 'prefill'):>13}{_ms(row, 'prefill'):>13}"
                  f"{_ms(base, 'llm'):>12}{_ms(row, 'llm'):>12}{row['flops_ratio']:>8.3f}{row['time_ratio']:>7.3f}"
                  f"{row['time_over_flops']:>6.2f}{row['cpu_time_over_flops']:>6.2f}{row['llm_flops_ratio']:>8.3f}"
                  f"{row['llm_time_ratio']:>8.3f}{row['llm_time_over_flops']:>6.2f}"
                  f"{row['llm_cpu_time_over_flops']:>6.2f}{_ms(row, 'decode', '_per_token'):>11}"
                  f"{cost.kv_bytes / 2**20:>7.1f}")
    return rows


if __name__ == "__main__":
    sys.exit(main())
