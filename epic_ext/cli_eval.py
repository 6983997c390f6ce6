"""`epic-ext eval`: score a model under a grid of methods x budgets on benchmark tasks.

    epic-ext eval --model PATH --methods dart,fastv --keep 576,192,128,64 --tasks mme,gqa
    epic-ext eval --model PATH --methods dart --keep 64,0.1 --tasks epic_vqa --include-path TASKS
    epic-ext eval --harness local --model PATH --methods dart --keep 64 --tasks TASK_FOLDER

Harnesses: lmms-eval (default; `pip install -e ".[eval]"`), VLMEvalKit (`--harness vlmeval`,
installed from its repository) or the built-in `local` one (the offline synthetic VQA task that
`epic_ext.eval.write_local_task` writes; no dependency). The model is loaded once; cells already
finished in --out with the same settings are reused (--rerun: evaluate them again). Writes
eval.json, eval.md (the table) and eval.png (score against visual tokens kept, per method) in --out;
see epic_ext/eval/grid.py. Registered by cli.py (this module must not import it).
"""
from __future__ import annotations

import argparse

from .cli_infer import _note, _parse_value, _split_list, parse_pairs


def _configure_eval(p: argparse.ArgumentParser) -> None:
    from .eval.grid import HARNESSES
    p.add_argument("--model", required=True, help="local checkpoint folder (model + processor)")
    p.add_argument("--methods", required=True, help="comma-separated methods, e.g. dart,fastv,visionzip")
    p.add_argument("--keep", required=True,
                   help="comma-separated budgets: visual tokens kept per image / video frame group, or ratios (0.25)")
    p.add_argument("--tasks", required=True,
                   help="comma-separated task names (lmms-eval / VLMEvalKit) or, with --harness local, task folders")
    p.add_argument("--harness", default="lmms", choices=sorted(HARNESSES), help="default: lmms (lmms-eval)")
    p.add_argument("--include-path", default=None, metavar="DIR",
                   help="a folder of extra task YAMLs (lmms-eval's --include_path) or local task folders")
    p.add_argument("--out", default="runs/eval", help="output folder (cells/, eval.json, eval.md, eval.png)")
    p.add_argument("--layer", type=int, default=None, help="drop layer of in-LLM methods (default: each method's)")
    p.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                   help="another option for every method that has it (repeatable)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", default=None, help="only the first N samples of each task (or a fraction < 1)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="when a task sets none")
    p.add_argument("--device", default=None, help="default: cuda when visible, else cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on a CPU, bfloat16 on a GPU")
    p.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, flash_attention_2)")
    p.add_argument("--min-pixels", type=int, default=None, help="Qwen-VL: smallest image area after resizing")
    p.add_argument("--max-pixels", type=int, default=None, help="Qwen-VL: largest image area after resizing")
    p.add_argument("--model-arg", action="append", default=[], metavar="NAME=VALUE",
                   help="another argument of the harness's model (repeatable): warmup, max_frames (lmms), "
                        "judge / judge_args (vlmeval), ...")
    p.add_argument("--no-baseline", action="store_true", help="leave out the unreduced model's cell")
    p.add_argument("--rerun", action="store_true", help="evaluate cells already finished in --out again")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--verbose", action="store_true", help="the harness's own log (lmms-eval's is cut to warnings)")


def parse_budgets(text: str) -> tuple:
    """'576,192,0.25' -> (576, 192, 0.25); ValueError naming --keep otherwise."""
    out = []
    for item in _split_list(text):
        value = _parse_value(item)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"--keep: {item!r} is neither a count nor a ratio")
        out.append(value)
    if not out:
        raise ValueError("--keep: give at least one budget")
    return tuple(out)


def _limit(text):
    if text is None:
        return None
    value = _parse_value(text)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"--limit: a positive count or a fraction, got {text!r}")
    return value


def spec_from_args(args: argparse.Namespace):
    """The GridSpec of the command line; every check (arguments, model folder, methods, harness
    installed) before a model loads."""
    import os

    from .eval.grid import GridSpec, harness_class
    from .models.loading import check_model_type

    if not os.path.isdir(args.model):
        raise ValueError(f"--model: {args.model} is not a folder (a local checkpoint: model + processor)")
    check_model_type(args.model)
    options = parse_pairs(args.option, "--option")
    model_args = {"attn_implementation": args.attn, **parse_pairs(args.model_arg, "--model-arg")}
    for name in ("min_pixels", "max_pixels"):
        if getattr(args, name) is not None:
            model_args[name] = getattr(args, name)
    if args.include_path is not None and not os.path.isdir(args.include_path):
        raise ValueError(f"--include-path: {args.include_path} is not a folder")
    try:
        spec = GridSpec(model=args.model, methods=tuple(_split_list(args.methods)), keeps=parse_budgets(args.keep),
                        tasks=tuple(_split_list(args.tasks)), harness=args.harness, layer=args.layer,
                        method_options=options, batch_size=args.batch_size, limit=_limit(args.limit),
                        include_path=args.include_path, device=args.device, dtype=args.dtype,
                        max_new_tokens=args.max_new_tokens, baseline=not args.no_baseline, model_args=model_args)
    except ValueError as e:
        # GridSpec names its fields; the command line's spelling is --name
        msg = str(e)
        msg = msg.replace("method_options:", "--option:")
        for field in ("methods", "keep", "tasks", "harness", "batch_size", "limit", "layer", "max_new_tokens"):
            if msg.startswith(f"{field}:"):
                msg = f"--{field.replace('_', '-')}:" + msg[len(field) + 1:]
                break
        raise ValueError(msg) from None
    harness_class(spec)              # the harness's package installed, or a clear error now
    return spec


def _quiet_lmms_eval() -> None:
    """lmms-eval logs every task file it indexes at DEBUG (loguru, to stderr): keep warnings."""
    try:
        import sys

        from loguru import logger
    except ImportError:
        return
    logger.remove()
    logger.add(sys.stderr, level="WARNING")


def _eval(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    from .eval.grid import run_grid
    if spec.harness == "lmms" and not args.verbose:
        _quiet_lmms_eval()
    _note("eval", f"{len(spec.cells())} cells ({'baseline + ' if spec.baseline else ''}"
                  f"{len(spec.methods)} methods x {len(spec.keeps)} budgets) on {', '.join(spec.tasks)} "
                  f"through {spec.harness}; results in {args.out}")
    try:
        run_grid(spec, args.out, rerun=args.rerun, progress=not args.quiet)
    finally:
        _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """Several processes: end the group the harness joined before the interpreter exits (a gloo
    group still up at exit can abort a rank: "terminate called without an active exception")."""
    import sys
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        if sys.exc_info()[0] is None:
            dist.barrier()            # rank 0 may still be writing the report
        dist.destroy_process_group()
