"""The `epic-ext` command line.

    epic-ext info                     backends, torch version, device
    epic-ext bench [benchmark args]   the microbenchmarks (python -m benchmarks ...)

Subcommands live in a registry: a new one (train, infer, demo, ...) is a function decorated with
`@command(name, help)` that receives its parsed arguments and returns an exit status, plus an
optional `configure(parser)` that adds its arguments; no change to `main` is needed. Heavy imports
belong inside the command's function so that `epic-ext --help` stays fast. A command marked
`passthrough=True` receives the unparsed remainder of the command line as `args.rest` (its own
parser does the parsing; `-h` goes to it as well).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable, Optional


@dataclass
class Command:
    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    configure: Optional[Callable[[argparse.ArgumentParser], None]] = None
    passthrough: bool = False


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str,
            configure: Callable[[argparse.ArgumentParser], None] | None = None,
            *, passthrough: bool = False):
    """Register `fn(args) -> int` as the subcommand `name`."""
    def register(fn: Callable[[argparse.Namespace], int]):
        if name in COMMANDS:
            raise ValueError(f"epic-ext subcommand {name!r} is already registered")
        COMMANDS[name] = Command(name, help, fn, configure, passthrough)
        return fn
    return register


# --------------------------------------------------------------------------- info

def _configure_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object")


@command("info", "backends, torch version and device", _configure_info)
def _info(args: argparse.Namespace) -> int:
    import platform

    import torch

    import epic_ext

    cuda = torch.cuda.is_available()
    info = {
        "epic_ext": getattr(epic_ext, "__version__", "?"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda_build": torch.version.cuda,
        "cuda_available": cuda,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "cpu_threads": torch.get_num_threads(),
        "backends": epic_ext.backends(),
    }
    if cuda:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info["gpu_capability"] = f"{props.major}.{props.minor}"
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if args.json:
        import json
        print(json.dumps(info, indent=1))
        return 0
    print(f"epic-ext {info['epic_ext']}  torch {info['torch']}  python {info['python']}")
    dev = info["device"]
    if cuda:
        dev += f" (sm {info['gpu_capability']}, {info['gpu_memory_gib']} GiB)"
    print(f"device: {dev}; CUDA build {info['cuda_build']}; triton {info['triton']}; "
          f"CPU threads {info['cpu_threads']}")
    print("backends:")
    for name, b in info["backends"].items():
        print(f"  {name:<10} {'yes' if b['available'] else 'no ':<4} {b['reason']}")
    return 0


# --------------------------------------------------------------------------- bench

@command("bench", "run the microbenchmarks (arguments go to `python -m benchmarks`; "
                  "`epic-ext bench --help` for them)", passthrough=True)
def _bench(args: argparse.Namespace) -> int:
    try:
        from benchmarks.__main__ import main as bench_main
    except ImportError as e:
        print(f"epic-ext bench: the benchmarks package is not importable ({e}); run from a "
              "source checkout or install the package with its benchmarks", file=sys.stderr)
        return 2
    return bench_main(list(args.rest)) or 0


# --------------------------------------------------------------------------- infer

def _configure_infer(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny",
                   help="a tiny preset (tiny, llava-1.5-7b-depth) or a local LLaVA checkpoint folder")
    p.add_argument("--method", default=None, help="token-reduction method (default: none)")
    p.add_argument("--keep", default=None, help="visual tokens kept: a count, or a ratio like 0.25")
    p.add_argument("--layer", type=int, default=None, help="decoder layer K of in-LLM methods")
    p.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                   help="another method option (repeatable), e.g. --option sign=1")
    p.add_argument("--image", action="append", default=[], help="image file (repeat per request); "
                   "tiny presets use a random image when none is given")
    p.add_argument("--prompt", action="append", default=[], help="question (repeat per request)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (timings exclude warm-up)")
    p.add_argument("--json", action="store_true", help="print the reports as JSON")


def _parse_value(text: str):
    import ast
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


@command("infer", "answer prompts about images with a token-reduction method and report "
                  "tokens, KV bytes, FLOPs and latency", _configure_infer)
def _infer(args: argparse.Namespace) -> int:
    import json

    import torch

    from .inference import format_reports, infer
    from .models import tiny

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    prompts = args.prompt or ["What is in the image?"]
    if args.model in tiny.PRESETS:
        dtype = getattr(torch, args.dtype or "float32")
        model = tiny.build_tiny_llava(args.model, dtype=dtype, device=device)
        processor = tiny.TinyProcessor(model)
        if args.image:
            images = args.image
        else:
            from PIL import Image
            g = torch.Generator().manual_seed(args.seed)
            size = model.config.vision_config.image_size
            images = [Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).byte().numpy())
                      for _ in prompts]
        inputs = processor(images, prompts)
    else:
        from PIL import Image
        from transformers import AutoProcessor
        dtype = getattr(torch, args.dtype or "bfloat16")
        model = tiny.load_llava(args.model, dtype=dtype, device=device)
        processor = AutoProcessor.from_pretrained(args.model, local_files_only=True)
        processor.tokenizer.padding_side = "left"
        if len(args.image) != len(prompts):
            print("epic-ext infer: give one --image per --prompt", file=sys.stderr)
            return 2
        texts = [f"USER: <image>\n{p} ASSISTANT:" for p in prompts]
        inputs = processor(images=[Image.open(f).convert("RGB") for f in args.image], text=texts,
                           return_tensors="pt", padding=True)
        processor.decode = lambda ids: processor.tokenizer.decode(ids, skip_special_tokens=True)
    if len(inputs["input_ids"]) != len(prompts):
        print("epic-ext infer: give one --image per --prompt", file=sys.stderr)
        return 2
    options = dict(kv.split("=", 1) for kv in args.option)
    options = {k: _parse_value(v) for k, v in options.items()}
    if args.layer is not None:
        options["layer"] = args.layer
    keep = _parse_value(args.keep) if args.keep is not None else None
    kw = dict(method=args.method, keep=keep, processor=processor, max_new_tokens=args.max_new_tokens,
              do_sample=args.sample, temperature=args.temperature, top_k=args.top_k, seed=args.seed, **options)
    for _ in range(args.warmup):
        infer(model, inputs, **{**kw, "max_new_tokens": 2})
    reports = infer(model, inputs, **kw)
    if args.json:
        print(json.dumps([r.as_dict() for r in reports], indent=1))
    else:
        print(format_reports(reports))
    return 0


# --------------------------------------------------------------------------- train

def _configure_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML file (see epic_ext/train/config.py)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set steps=50")


@command("train", "train with EPIC (TCD / LCD / ICD) or an ablation from a YAML config", _configure_train)
def _train(args: argparse.Namespace) -> int:
    import yaml

    from .train.config import TrainConfig
    from .train.trainer import train

    data = yaml.safe_load(open(args.config)) or {}
    for kv in args.set:
        key, _, value = kv.partition("=")
        data[key] = yaml.safe_load(value)
    result = train(TrainConfig.from_dict(data), resume=args.resume)
    last = result.history[-1] if result.history else {}
    print(f"done: {len(result.history)} steps, last loss {last.get('loss', float('nan')):.4f}, "
          f"median step {result.step_time_s * 1e3:.0f} ms; model in {result.final_dir}")
    return 0


# --------------------------------------------------------------------------- demo

def _configure_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run (CI)")
    p.add_argument("--out", default="runs/demo", help="output folder (models, demo.json, demo.png)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=None, help="training seed (default: the recipe's, whose results are committed)")
    p.add_argument("--protocol", choices=("continue", "scratch"), default=None,
                   help="continue: variants start from the vanilla checkpoint (default); scratch: from the random init")
    p.add_argument("--variants", default=None,
                   help="comma-separated subset of direct,no-progressive,tcd,tcd-official,lcd,icd")
    p.add_argument("--reuse", action="store_true", help="keep runs already in --out that were trained from the same config")


@command("demo", "the EPIC experiment in miniature: train vanilla, then direct / TCD / LCD / ICD on a "
                 "synthetic visual QA task; accuracy and efficiency tables", _configure_demo)
def _demo(args: argparse.Namespace) -> int:
    import shutil
    from dataclasses import replace
    from pathlib import Path

    import torch

    from .train.demo import FULL, QUICK, run_demo, split_names

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = QUICK if args.quick else FULL
    changes = {}
    if args.protocol:
        changes["protocol"] = args.protocol
    if args.variants:
        changes["variants"] = split_names(args.variants)
    try:
        recipe = replace(recipe, **changes)
    except ValueError as e:
        raise SystemExit(f"epic-ext demo: {e}")
    result = run_demo(args.out, recipe=recipe, seed=args.seed, reuse=args.reuse)
    if not args.quick and args.seed is None and not changes:
        # Keep the tables and plot with the project's measured results, named by machine.
        from benchmarks.common import RESULTS_DIR, machine_info
        slug = machine_info("cpu")["slug"]
        Path(RESULTS_DIR).mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(args.out) / "demo.json", Path(RESULTS_DIR) / f"demo_{slug}.json")
        shutil.copy(Path(args.out) / "demo.png", Path(RESULTS_DIR) / f"demo_{slug}.png")
    return 0 if result else 1


# --------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="epic-ext", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        sp = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help,
                            add_help=not cmd.passthrough)
        if cmd.configure:
            cmd.configure(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    cmd = COMMANDS[args.command]
    if cmd.passthrough:
        # Everything after the subcommand's name, untouched (parse_known_args may reorder).
        args.rest = argv[argv.index(cmd.name) + 1:]
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return int(cmd.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
