"""What `make gpu-check` runs ON the GPU besides the tests and benchmarks (benchmarks/gpu_check.py
drives it, one subprocess per step):

    python -m benchmarks.gpu_workloads --goals goals.json   # the issue's GPU goals, measured
    python -m benchmarks.gpu_workloads --memcheck-subset    # a short run of every CUDA / Triton
                                                            # kernel, under compute-sanitizer
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

# (goal, target) as the issue states them; measured by measure_goals.
GOALS = [
    ("compress bf16 B=64 N=576 D=4096 k=128: share of copy bandwidth", ">= 0.80"),
    ("kl_div bf16 T=8192 V=128256 fwd+bwd: time / (10 B per element at copy bandwidth)", "<= 1.25"),
    ("kl_div bf16 T=8192 V=128256 fwd+bwd: time / Liger LigerKLDIVLoss", "< 1.00"),
    ("fused_linear_kl bf16 BT=8192 H=4096 V=128256: time / Liger FusedLinearJSD(beta=0)", "< 1.00"),
    ("fused_linear_kl ...: peak memory / Liger FusedLinearJSD(beta=0)", "<= 1.00"),
    ("attn_scores FastV query (LLaVA-1.5-7B, B=16) bf16: share of copy bandwidth", ">= 0.70"),
]



# --------------------------------------------------------------------------------------------
# the goals
# --------------------------------------------------------------------------------------------

def measure_goals(budget_s: float = 0.3) -> list[dict]:
    """Each goal of GOALS, measured on the current CUDA device: value, target, pass/fail."""
    import torch
    import torch.nn.functional as F

    import epic_ext
    from benchmarks import common

    dev = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator(device=dev).manual_seed(2024)
    results: list[dict] = []
    backends = [b for b in ("cuda", "triton") if epic_ext.backends()[b]["available"]]

    def timed(fn):
        return common.measure(fn, dev, budget_s=budget_s, min_reps=3, max_reps=50).median_ms

    def add(index, backend, value, passed, note=""):
        goal, target = GOALS[index]
        results.append({"goal": goal, "backend": backend, "value": value, "target": target,
                        "pass": passed, "note": note})
        print(f"goal {index}: {backend}: {value} {target} -> "
              f"{'pass' if passed else 'FAIL' if passed is False else 'n/a'} {note}", flush=True)

    def liger_or_none(name):
        try:
            import liger_kernel.transformers as lt
            return getattr(lt, name)
        except Exception as e:  # noqa: BLE001  (not installed, or it fails to import here)
            return f"liger_kernel not importable ({type(e).__name__}: {e})"[:120]

    def guarded(index, fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001  (one goal failing must not hide the others)
            add(index, "-", None, False, f"error: {type(e).__name__}: {str(e)[:100]}")
        common.release(dev)

    # compress: bytes = tokens read + output written + scores read + indices written
    def compress_goal():
        B, N, D, k = 64, 576, 4096, 128
        tokens = torch.randn(B, N, D, generator=gen, device=dev).to(torch.bfloat16)
        scores = (torch.randn(B, N, generator=gen, device=dev) * 1.5).softmax(-1)
        nbytes = B * N * D * 2 + B * (k + 1) * D * 2 + B * N * 4 + B * k * 8
        copy_bps = common.copy_bandwidth(nbytes, dev, torch.bfloat16, budget_s=budget_s)
        for b in backends:
            ms = timed(lambda: epic_ext.compress(tokens, scores, k, backend=b))
            frac = nbytes / (ms * 1e-3) / copy_bps
            add(0, b, round(frac, 3), frac >= 0.80,
                f"{ms:.3f} ms, copy {copy_bps / 1e9:.0f} GB/s")

    # kl_div: 10 bytes per element (two reads of each bf16 input, one gradient write)
    def kl_goal():
        T, V = 8192, 128256
        s = torch.randn(T, V, generator=gen, device=dev).mul_(2.0)
        t = torch.randn(T, V, generator=gen, device=dev).add_(s).to(torch.bfloat16)
        s = s.to(torch.bfloat16).requires_grad_(True)
        copy_bps = common.copy_bandwidth(10 * T * V, dev, torch.bfloat16, budget_s=budget_s)
        floor_ms = 10 * T * V / copy_bps * 1e3

        def step(loss_fn):
            def fn():
                loss = loss_fn()
                return torch.autograd.grad(loss, s)[0]
            return fn
        ours = {}
        for b in backends:
            ours[b] = timed(step(lambda: epic_ext.kl_div(s, t, backend=b)))
            add(1, b, round(ours[b] / floor_ms, 3), ours[b] <= 1.25 * floor_ms,
                f"{ours[b]:.3f} ms, floor {floor_ms:.3f} ms at {copy_bps / 1e9:.0f} GB/s")
        liger = liger_or_none("LigerKLDIVLoss")
        if isinstance(liger, str):
            add(2, "-", None, None, liger)
            return
        crit = liger(reduction="batchmean", log_target=True)
        try:
            liger_ms = timed(step(lambda: crit(F.log_softmax(s, -1), F.log_softmax(t, -1))))
        except Exception as e:  # noqa: BLE001  (the baseline failing is not our failure)
            add(2, "-", None, None, f"Liger failed: {type(e).__name__}: {str(e)[:90]}")
            return
        for b, ms in ours.items():
            add(2, b, round(ms / liger_ms, 3), ms < liger_ms,
                f"{ms:.3f} ms vs Liger (log_softmax x2 + LigerKLDIVLoss) {liger_ms:.3f} ms")

    # fused_linear_kl against Liger's FusedLinearJSD at beta = 0 (forward KL)
    def linear_goal():
        T, H, V = 8192, 4096, 128256
        w = (torch.randn(V, H, generator=gen, device=dev) * (2.0 / H ** 0.5)).to(torch.bfloat16)
        h32 = torch.randn(T, H, generator=gen, device=dev)
        h_t = (h32 + 0.5 * torch.randn(T, H, generator=gen, device=dev)).to(torch.bfloat16)
        h_s = h32.to(torch.bfloat16).requires_grad_(True)
        del h32
        w.requires_grad_(True)

        def step(loss_fn):
            def fn():
                loss = loss_fn()
                gh, gw = torch.autograd.grad(loss, (h_s, w))
                return loss.detach(), gh, gw
            return fn
        ours = {}
        for b in backends:
            fn = step(lambda: epic_ext.fused_linear_kl(h_s, h_t, w, backend=b))
            ours[b] = (timed(fn), common.peak_memory(fn, dev), float(fn()[0]))
            common.release(dev)
        jsd = liger_or_none("LigerFusedLinearJSD")
        if isinstance(jsd, str):
            for b, (ms, mem, _) in ours.items():
                add(3, b, None, None, f"{ms:.2f} ms; {jsd}")
                add(4, b, None, None, f"{mem / 2**20:.0f} MiB; {jsd}")
            return
        crit = jsd(jsd_beta=0.0, temperature=1.0)
        fn = step(lambda: crit(h_s, w, h_t, w.detach(), None))  # no labels: every row
        try:
            liger_ms, liger_mem = timed(fn), common.peak_memory(fn, dev)
            liger_loss = float(fn()[0])
        except Exception as e:  # noqa: BLE001  (the baseline failing is not our failure)
            for index in (3, 4):
                add(index, "-", None, None, f"Liger failed: {type(e).__name__}: {str(e)[:90]}")
            return
        for b, (ms, mem, loss) in ours.items():
            agree = f"loss {loss:.5g} vs Liger {liger_loss:.5g}"
            add(3, b, round(ms / liger_ms, 3), ms < liger_ms,
                f"{ms:.2f} ms vs {liger_ms:.2f} ms; {agree}")
            add(4, b, round(mem / max(liger_mem, 1), 3), mem <= liger_mem,
                f"{mem / 2**20:.0f} MiB vs {liger_mem / 2**20:.0f} MiB")

    # attn_scores: K read once + query rows + output
    def attn_goal():
        B, H, L, d, N, start = 16, 32, 650, 128, 576, 35
        q = torch.randn(B, H, 1, d, generator=gen, device=dev).to(torch.bfloat16)
        k = torch.randn(B, H, L, d, generator=gen, device=dev).to(torch.bfloat16)
        nbytes = B * H * L * d * 2 + B * H * d * 2 + B * N * 4
        copy_bps = common.copy_bandwidth(nbytes, dev, torch.bfloat16, budget_s=budget_s)
        for b in backends:
            ms = timed(lambda: epic_ext.attn_scores(q, k, start, N, backend=b))
            frac = nbytes / (ms * 1e-3) / copy_bps
            add(5, b, round(frac, 3), frac >= 0.70, f"{ms * 1e3:.1f} us, copy "
                f"{copy_bps / 1e9:.0f} GB/s")

    for index, fn in ((0, compress_goal), (1, kl_goal), (3, linear_goal), (5, attn_goal)):
        guarded(index, fn)
    return results


# --------------------------------------------------------------------------------------------
# the memcheck subset
# --------------------------------------------------------------------------------------------

def memcheck_subset() -> int:
    """Every GPU kernel once on small odd shapes (and bad indices where a kernel must stay
    memory-safe), for compute-sanitizer; the results are not checked here (tests do that)."""
    import torch

    import epic_ext

    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(5)
    backends = [b for b in ("cuda", "triton") if epic_ext.backends()[b]["available"]]
    for b in backends:
        for dtype in (torch.float32, torch.bfloat16):
            tokens = torch.randn(3, 577, 70, generator=g, device=dev).to(dtype)
            scores = torch.randn(3, 577, generator=g, device=dev)
            epic_ext.select_topk(scores, 100, backend=b)
            epic_ext.iqr_select(scores, pooled=True, backend=b)
            epic_ext.iqr_select(scores, max_k=50, backend=b)
            t = tokens.clone().requires_grad_(True)
            out = epic_ext.compress(t, scores, 64, "weighted", weights=scores.softmax(-1),
                                    backend=b)
            out.tokens.float().sum().backward()
            epic_ext.compress(tokens, scores, "iqr", backend=b)
            idx = torch.randint(0, 577, (3, 40), generator=g, device=dev)
            bad = idx.clone()
            bad[0, 3], bad[1, 0] = 577, -5  # out of range: must stay memory-safe
            epic_ext.gather_merge(tokens, idx, backend=b)
            try:  # D1: check=False reaches the kernel with the bad entries (NaN rows)
                epic_ext.gather_merge(tokens, bad, check=False, backend=b)
            except (TypeError, ValueError):
                pass  # a version without the check keyword, or one that raises
            s = torch.randn(37, 3001, generator=g, device=dev).to(dtype).requires_grad_(True)
            tt = torch.randn(37, 3001, generator=g, device=dev).to(dtype)
            epic_ext.kl_div(s, tt, backend=b).backward()
            q = torch.randn(2, 8, 1, 64, generator=g, device=dev).to(dtype)
            k = torch.randn(2, 2, 131, 64, generator=g, device=dev).to(dtype)
            epic_ext.attn_scores(q, k, 5, 100, backend=b)
            try:  # a span past L: NaN, memory-safe
                epic_ext.attn_scores(q, k, torch.tensor([5, 400], device=dev), 100, check=False,
                                     backend=b)
            except ValueError:
                pass
        torch.cuda.synchronize()
        print(f"memcheck subset: {b} done", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_workloads", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--goals", metavar="JSON", default=None, help="measure the goals, write them here")
    p.add_argument("--memcheck-subset", action="store_true", help="the short compute-sanitizer run")
    args = p.parse_args(argv)
    if args.memcheck_subset:
        return memcheck_subset()
    if args.goals:
        goals = measure_goals()
        Path(args.goals).parent.mkdir(parents=True, exist_ok=True)
        Path(args.goals).write_text(json.dumps(goals, indent=1) + "\n")
        return 0
    p.error("give --goals JSON or --memcheck-subset")


if __name__ == "__main__":
    raise SystemExit(main())
