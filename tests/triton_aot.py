"""Compile (never run) every Triton kernel of epic_ext for a Hopper GPU (sm_90) on a machine
without one: what the interpreter never checks (globals read by a compiled kernel, type and
layout errors, constexpr misuse) fails here. Run as a script with TRITON_INTERPRET unset
(tests/test_triton_compile.py does); prints one line per compiled variant, exits 1 on a failure.

Each kernel's signature names only the pointer, float and int64 arguments; every other
non-constexpr argument is an int32. A new kernel must be added to VARIANTS (the test checks that
every `*_kernel` of epic_ext.triton is covered)."""
from __future__ import annotations

import importlib
import os
import sys
import time
import traceback

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
MODULES = ("select", "gather_merge", "attn_scores", "kl")


def jit_function(kernel):
    while not isinstance(kernel, triton.runtime.jit.JITFunction):  # unwrap autotune/heuristics
        kernel = kernel.fn
    return kernel


def kernel_names(module) -> set:
    """Names of the module's kernels (``*_kernel``, plain or wrapped by autotune)."""
    return {name for name, obj in vars(module).items() if name.endswith("_kernel")
            and isinstance(obj, (triton.runtime.jit.JITFunction, triton.runtime.Autotuner))}


def _gm_ptrs(dt):
    return dict(x_ptr=f"*{dt}", g_ptr=f"*{dt}", out_ptr=f"*{dt}", gx_ptr=f"*{dt}", w_ptr="*fp32",
                idx_ptr="*i64", counts_ptr="*i64", slot_ptr="*i32", first_ptr="*i32", mult_ptr="*i32",
                ndrop_ptr="*i32", ndup_ptr="*i32", duprow_ptr="*i32")


_GM_TILE = dict(BLOCK_R=16, BLOCK_D=256, STAGES=3)
_ATTN = dict(q_ptr="*bf16", k_ptr="*bf16", lse_ptr="*fp32", ks_ptr="*i64", kv_ptr="*i64",
             qpos_ptr="*i64", stats_ptr="*fp32", span_ptr="*fp32", part_ptr="*fp32", out_ptr="*fp32")
_FLAGS = dict(CAUSAL=True, HAS_KS=True, HAS_KV=True, HAS_QPOS=True)

# (module, kernel, pointer types, float args, int64 args, constexprs, compile options)
VARIANTS = [
    *[("select", "_select_rows_kernel",
       dict(s_ptr=f"*{dt}", counts_ptr="*i64", out_ptr="*i64", slot_ptr="*i32", pool_ptr="*i32"),
       ("whisker",), (), dict(MODE=mode, WRITE_SLOT=mode == 0, BLOCK_N=1024),
       dict(num_warps=8, enable_fp_fusion=False))
      for mode in (0, 1, 2) for dt in ("bf16", "fp32")],
    *[("select", "_pooled_pass_kernel", dict(s_ptr="*fp32", work_ptr="*i32"), ("whisker",), (),
       dict(PASS=p, CONTIG=p % 2 == 0, CHUNK=2048), dict(num_warps=8, enable_fp_fusion=False))
      for p in range(6)],
    ("gather_merge", "_plan_kernel", _gm_ptrs("bf16"), (), (),
     dict(HAS_COUNTS=True, WITH_DUPS=True, BLOCK=1024), dict(num_warps=4)),
    *[("gather_merge", "_compress_kernel", _gm_ptrs(dt), (), (),
       dict(MERGE=merge, ACC=acc, **_GM_TILE), dict(num_warps=4))
      for dt, acc in (("bf16", tl.float32), ("fp64", tl.float64)) for merge in (0, 2)],
    *[("gather_merge", "_gather_merge_kernel", _gm_ptrs(dt), (), (),
       dict(MERGE=merge, HAS_COUNTS=True, ACC=acc, **_GM_TILE), dict(num_warps=4))
      for dt, acc in (("fp16", tl.float32), ("fp64", tl.float64)) for merge in (1, 2)],
    *[("gather_merge", "_gather_merge_bwd_kernel", _gm_ptrs(dt), (), (),
       dict(MERGE=merge, HAS_COUNTS=True, ACC=tl.float32, **_GM_TILE), dict(num_warps=4))
      for dt in ("bf16", "fp32") for merge in (1, 2)],
    *[("attn_scores", "_attn_scan_kernel", _ATTN, ("scale",), ("ks_int", "kv_int"),
       dict(HAS_LSE=lse, PREC=None, UPCAST=False, BLOCK_R=16, BLOCK_K=64, BLOCK_D=128, **_FLAGS),
       dict(num_warps=4)) for lse in (False, True)],
    *[("attn_scores", "_attn_combine_kernel", _ATTN, ("inv",), ("ks_int", "kv_int"),
       dict(HAS_LSE=lse, MEAN=True, BLOCK_T=512, BLOCK_C=16, **_FLAGS), dict(num_warps=4))
      for lse in (False, True)],
    *[("kl", "_kl_rows_kernel",
       dict(s_ptr=f"*{dt}", t_ptr=f"*{dt}", g_ptr=f"*{dt}", mask_ptr="*u8", cnt_ptr="*i64",
            loss_ptr="*fp64"), ("tau_hi", "tau_lo", "itau_hi", "itau_lo"), (),
       dict(REDUCTION=red, REVERSE=rev, HAS_MASK=True, HAS_GRAD=True, IS_F64=dt == "fp64",
            ACC=tl.float64 if dt == "fp64" else tl.float32, BLOCK_V=4096), dict(num_warps=8))
      for dt, red, rev in (("bf16", 3, False), ("fp32", 0, True), ("fp64", 1, False))],
    ("kl", "_kl_total_kernel", dict(loss_ptr="*fp64", out_ptr="*fp32", cnt_ptr="*i64"), (), (),
     dict(REDUCTION=3, HAS_MASK=True, BLOCK=1024), dict(num_warps=4)),
]


def compile_variant(module, name, ptrs, floats, i64, consts, options):
    fn = jit_function(getattr(importlib.import_module(f"epic_ext.triton.{module}"), name))
    signature = {}
    for arg in fn.arg_names:
        if arg in consts:
            signature[arg] = "constexpr"
        elif arg in ptrs:
            signature[arg] = ptrs[arg]
        elif arg in floats:
            signature[arg] = "fp32"
        elif arg in i64:
            signature[arg] = "i64"
        else:
            signature[arg] = "i32"
    triton.compile(ASTSource(fn, signature, consts), target=TARGET, options=options)


def main() -> int:
    covered = {(module, name) for module, name, *_ in VARIANTS}
    failed = 0
    for module in MODULES:
        names = kernel_names(importlib.import_module(f"epic_ext.triton.{module}"))
        for name in sorted({(module, n) for n in names} - covered):
            failed += 1
            print(f"FAIL {name[0]}.{name[1]}: no compile variant in tests/triton_aot.py", flush=True)
    for variant in VARIANTS:
        module, name, *_, consts, _ = variant
        start = time.perf_counter()
        try:
            compile_variant(*variant)
        except Exception:  # noqa: BLE001 - report every failing variant, then fail
            failed += 1
            print(f"FAIL {module}.{name} {consts}\n{traceback.format_exc()}", flush=True)
        else:
            print(f"ok   {module}.{name} {consts} {time.perf_counter() - start:.1f} s", flush=True)
    print(f"{len(VARIANTS)} variants, {failed} failed (sm_90, triton {triton.__version__})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
