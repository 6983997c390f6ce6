"""attn_scores (DESIGN.md 2.5): the attention of one query row over the visual-token span, reduced
over heads, against the ways the reference repos (and a careful PyTorch user) compute it.

Variants (each case is one query row, Q = 1):
  fastv      FastV / DART in the LLM: the last prompt token (causal; it sees all L keys) over the
             N image keys starting at position 35 (LLaVA-1.5's image start), averaged over heads.
             LLaVA-1.5-7B (Vicuna-7B: H = Hkv = 32, d = 128, L = 650 with 576 image tokens) and
             an LLM-7B with GQA (Qwen2-7B-like: H = 28, Hkv = 4, d = 128) on a LLaVA-NeXT anyres
             prompt (2880 image tokens, L = 3000).
  prumerge   PruMerge in CLIP's last layer: the [CLS] query (row 0, non-causal) over keys 1..576
             of 577, as ONE head of width 1024 (scale 1024^-0.5).
Providers (each returns [B, N] fp32):
  eager        (a) what the reference repos do: full attention weights softmax(Q K^T * scale +
               causal mask) over all L query rows, [B, H, L, L] (HF eager attention: scores in the
               storage dtype, softmax in fp32, cast back), then the query's row of the span
               (FastV: mean over heads of the weights, then the last row)
  eager-row    (b) only the query row in PyTorch: q_row @ K^T (GQA by grouping the query heads of
               a kv head, no repeated K), fp32 softmax, span, mean over heads
  compile-row  (c) torch.compile(dynamic=False) of (b)
  ours-<b>     epic_ext.attn_scores(q_row, k, 35 | 1, N, causal=..., backend=<b>) for every
               compiled backend of the device: online max / sum over the row, K read once
  ours-<b>-lse the same given the row's log-sum-exp (flash attention's softmax_lse, computed
               outside the timed region): one pass, no online max / sum
The side-by-side table gives every provider's speed-up over (a); a second table ours over (b).

Minimum bytes (DESIGN.md 5): K read once, B*Hkv*L*d*s, plus the query rows B*H*d*s and the
output B*N*4. Achieved GB/s = that / median time; "of copy" = achieved over a plain copy of the same
byte count timed in the same run.

Check: every provider against epic_ext.reference.attn_scores (explicit fp32 softmax over the
masked rows) of the same rounded inputs, within (atol 1e-6, rtol 2e-5) for ours; the baselines'
own errors (bf16 scores for (a) and (b)) are reported, a baseline mismatch is only a note.

    python -m benchmarks.bench_attn_scores --quick
    python -m benchmarks.bench_attn_scores --shapes B=16,L=650 --dtypes bf16 --variants fastv
"""
from __future__ import annotations

import sys

import torch

from benchmarks import common, harness
from benchmarks.harness import Case, Provider

BENCH = "attn"
KEYS = ("B", "H", "Hkv", "L", "d", "N")
VARIANTS = ("fastv", "prumerge")
KEY_START = {"fastv": 35, "prumerge": 1}
TOL = (1e-6, 2e-5)  # (atol, rtol) of ours against the fp32 reference (tests/test_attn_scores.py)
FASTV_7B = (32, 32, 650, 128, 576)
GQA_7B = (28, 4, 3000, 128, 2880)
PRUMERGE = (1, 1, 577, 1024, 576)
# (variant, shape, dtypes)
GRID = ([("fastv", (b,) + FASTV_7B, ("fp32", "bf16")) for b in (1, 16)]
        + [("fastv", (b,) + GQA_7B, ("fp32", "bf16")) for b in (1, 4)]
        + [("prumerge", (b,) + PRUMERGE, ("fp32", "bf16")) for b in (1, 16)])
# --quick keeps a call of the eager (a) baseline under ~5 s on a 2-core CPU: bf16 GEMMs there run
# at a few GFLOP/s, so the big CPU cases are fp32.
QUICK = {"cpu": [("fastv", (1,) + FASTV_7B, ("fp32", "bf16")), ("fastv", (16,) + FASTV_7B, ("fp32",)),
                 ("fastv", (1,) + GQA_7B, ("fp32",)), ("prumerge", (1,) + PRUMERGE, ("fp32",)),
                 ("prumerge", (16,) + PRUMERGE, ("fp32",))],
         "cuda": [("fastv", (1,) + FASTV_7B, ("bf16",)), ("fastv", (16,) + FASTV_7B, ("bf16",)),
                  ("fastv", (4,) + GQA_7B, ("bf16",)), ("prumerge", (16,) + PRUMERGE, ("bf16",))]}
DEFAULT_DTYPES = ("fp32", "bf16")


# --------------------------------------------------------------------------------------------
# the eager compositions
# --------------------------------------------------------------------------------------------

def eager_full(q_all: torch.Tensor, k: torch.Tensor, key_start: int, n: int, causal: bool,
               row: int) -> torch.Tensor:
    """(a) Full [B, H, L, L] attention weights as HF eager attention builds them, then the
    query's row over the span, averaged over heads (FastV: mean over dim 1 of the weights)."""
    B, H, L, d = q_all.shape
    kk = k.repeat_interleave(H // k.shape[1], dim=1) if k.shape[1] != H else k  # HF repeat_kv
    scores = torch.matmul(q_all, kk.transpose(-1, -2)) * d ** -0.5
    if causal:
        mask = torch.full((L, L), torch.finfo(scores.dtype).min, dtype=scores.dtype,
                          device=scores.device).triu_(1)
        scores = scores + mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q_all.dtype)
    return weights.mean(dim=1)[:, row, key_start:key_start + n].float()


def eager_row(q: torch.Tensor, k: torch.Tensor, key_start: int, n: int) -> torch.Tensor:
    """(b) The query row only: [B, H, 1, L] scores (the row sees every key: the last position
    when causal, a non-causal [CLS] otherwise), fp32 softmax, the span, the head mean."""
    B, H, Q, d = q.shape
    Hkv = k.shape[1]
    qg = q.reshape(B, Hkv, (H // Hkv) * Q, d)  # the query heads that read kv head j, together
    scores = torch.matmul(qg, k.transpose(-1, -2)) * d ** -0.5
    p = torch.softmax(scores.float(), dim=-1)
    return p[..., key_start:key_start + n].mean(dim=(1, 2))


# --------------------------------------------------------------------------------------------
# cost model, inputs, check
# --------------------------------------------------------------------------------------------

def _dims(case: Case):
    return tuple(case.shape[x] for x in KEYS)


def bytes_moved(case: Case) -> int:
    B, H, Hkv, L, d, N = _dims(case)
    s = common.DTYPES[case.dtype].itemsize
    return B * Hkv * L * d * s + B * H * d * s + B * N * 4


def mem_need(case: Case) -> int:
    B, H, Hkv, L, d, N = _dims(case)
    s = common.DTYPES[case.dtype].itemsize
    # eager (a): scores, masked scores, fp32 softmax, its cast, the head mean; all queries + K
    # (+ K repeated for GQA); the fp32 reference's [B, H, 1, L] rows; the copy yardstick
    return B * H * L * L * (3 * s + 4) + B * H * L * d * s * 3 + B * H * L * 16 + bytes_moved(case) * 2


def make_inputs(case: Case, device: torch.device, state: dict) -> dict:
    from epic_ext import reference as R
    B, H, Hkv, L, d, N = _dims(case)
    dtype = common.DTYPES[case.dtype]
    g = torch.Generator(device=device).manual_seed(4000 + B * 7 + H + L + d)
    # Activations of a trained model put a few keys far above the rest (attention sinks); plain
    # N(0, 1) rows of width d give a softmax that is close to uniform. Either costs the same.
    q_all = torch.randn(B, H, L, d, generator=g, device=device).mul_(1.5).to(dtype)
    k = torch.randn(B, Hkv, L, d, generator=g, device=device).mul_(1.5).to(dtype)
    causal = case.variant == "fastv"
    row = L - 1 if causal else 0
    q = q_all[:, :, row:row + 1].contiguous()
    ks = KEY_START[case.variant]
    state.clear()
    state["ref"] = R.attn_scores(q, k, ks, N, causal=causal)
    B_, H_, Q_, _ = q.shape
    s = (q.float().reshape(B, Hkv, H // Hkv, d) @ k.float().transpose(-1, -2)) * d ** -0.5
    state["lse"] = torch.logsumexp(s, dim=-1).reshape(B_, H_, Q_)  # the row sees every key
    return {"q_all": q_all, "q": q, "k": k, "ks": ks, "n": N, "causal": causal, "row": row}


def _errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[bool, float, float]:
    out = out.float()
    err = (out - ref).abs()
    ok = bool((err <= TOL[0] + TOL[1] * ref.abs()).all()) and out.shape == ref.shape
    return ok, float(err.max()), float((err / ref.abs().clamp(min=1e-30)).max())


def check(out, eager_out, case: Case, state: dict) -> tuple[bool, str]:
    ref = state["ref"]
    ok, abs_e, rel_e = _errors(out, ref)
    if "eager_msg" not in state:
        _, ea, er = _errors(eager_out, ref)
        state["eager_msg"] = f"abs {ea:.0e} rel {er:.0e}"
    return ok, f"vs ref: abs {abs_e:.1e} rel {rel_e:.1e} (eager {state['eager_msg']})"


# --------------------------------------------------------------------------------------------
# providers
# --------------------------------------------------------------------------------------------

def _kernel_or_skip(backend: str) -> None:
    from epic_ext import _backend
    module = _backend._load(backend)[0]
    if module is None or not hasattr(module, "attn_scores"):
        raise harness.Skip(f"backend {backend!r} has no attn_scores kernel")


def providers(device: torch.device, args, state: dict) -> list[Provider]:
    def eager(case, inp):
        return lambda: eager_full(inp["q_all"], inp["k"], inp["ks"], inp["n"], inp["causal"],
                                  inp["row"])

    def row(case, inp):
        return lambda: eager_row(inp["q"], inp["k"], inp["ks"], inp["n"])

    def compile_row(case, inp):
        fn = harness.compiled(eager_row)
        return lambda: fn(inp["q"], inp["k"], inp["ks"], inp["n"])

    def ours(backend, with_lse):
        def make(case, inp):
            import epic_ext
            _kernel_or_skip(backend)
            q, k, ks, n, causal = inp["q"], inp["k"], inp["ks"], inp["n"], inp["causal"]
            lse = state["lse"] if with_lse else None
            return lambda: epic_ext.attn_scores(q, k, ks, n, lse=lse, causal=causal,
                                                backend=backend)
        return make

    out = [Provider("eager", eager, "baseline"), Provider("eager-row", row, "baseline")]
    if not args.no_compile:
        out.append(Provider("compile-row", compile_row, "baseline", "compilation failed"))
    for b in harness.ours_backends(device):
        out += [Provider(f"ours-{b}", ours(b, False)), Provider(f"ours-{b}-lse", ours(b, True))]
    return out


def build_cases(args, device: torch.device) -> list[Case]:
    variants = [v.strip() for v in (args.variants or ",".join(VARIANTS)).split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    specs = harness.parse_shape_specs(args.shapes, KEYS)
    listed = QUICK["cuda" if device.type == "cuda" else "cpu"] if args.quick else GRID
    wanted = harness.parse_dtypes(args.dtypes, DEFAULT_DTYPES)
    cases = []
    for variant, shape, dts in listed:
        s = dict(zip(KEYS, shape))
        if variant not in variants:
            continue
        if specs and not any(all(s[k] == v for k, v in c.items()) for c in specs):
            continue
        for dt in (wanted if args.dtypes else dts):
            if dt in wanted:
                cases.append(Case(s, dt, variant))
    for c in specs:  # a spec naming every key adds that shape (fastv unless --variants says)
        if set(c) == set(KEYS) and not any(x.shape == c for x in cases):
            cases += [Case(dict((k, c[k]) for k in KEYS), dt, variants[0]) for dt in wanted]
    return cases


def ratio_table(rows: list[dict]) -> str:
    """ours over (b) the PyTorch query-row composition, and over (c) its compiled form."""
    by: dict[str, dict[str, dict]] = {}
    for r in rows:
        if not r.get("skipped") and r["provider"] != "*":
            by.setdefault(r["case"], {})[r["provider"]] = r
    lines = [f"-- {BENCH}: ours vs the query-row baselines (speed-up = their median / ours)",
             f"{'case':<46} {'provider':<16} {'vs eager-row':>12} {'vs compile-row':>14}"]
    for case, provs in by.items():
        for name, r in provs.items():
            if not name.startswith("ours"):
                continue
            cells = []
            for base in ("eager-row", "compile-row"):
                b = provs.get(base)
                cells.append(f"{b['median_ms'] / r['median_ms']:.2f}x" if b else "-")
            lines.append(f"{case:<46} {name:<16} {cells[0]:>12} {cells[1]:>14}")
    return "\n".join(lines)


def parser():
    p = harness.base_parser(__doc__, KEYS)
    p.add_argument("--variants", default=None, help="comma list of fastv,prumerge (default both)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    harness.apply_threads(args)
    device = common.pick_device(args.device)
    cases = build_cases(args, device)
    if not cases:
        print(f"{BENCH}: no case matches the filters")
        return 0
    state: dict = {}
    rows = harness.run_bench(
        BENCH, cases, providers(device, args, state),
        make_inputs=lambda case, dev: make_inputs(case, dev, state),
        check=lambda out, ref, case: check(out, ref, case, state),
        bytes_moved=bytes_moved, mem_need=mem_need,
        copy_dtype=lambda c: common.DTYPES[c.dtype], args=args, device=device,
        min_reps=3 if device.type == "cpu" else 5)
    state.clear()
    print()
    print(ratio_table(rows))
    print()
    bad = [r for r in rows if r.get("check", "").startswith("MISMATCH")]
    for r in bad:
        if r.get("kind") != "ours":
            print(f"note: baseline {r['provider']} on {r['case']} is outside the tolerance of the "
                  f"fp32 reference: {r['check']}")
    return 1 if any(r.get("kind") == "ours" for r in bad) else 0


if __name__ == "__main__":
    sys.exit(main())
