"""The `epic-ext` command line.

    epic-ext info                     backends, torch version, device
    epic-ext bench [benchmark args]   the microbenchmarks of a source checkout (python -m benchmarks)
    epic-ext infer / train / demo     inference with a method, EPIC training, the demo
    epic-ext eval                     methods x budgets on benchmark tasks (lmms-eval, VLMEvalKit)

Mistakes (bad arguments, missing files, bad configs) print one line, `epic-ext <command>: error:
...`, and exit with status 2; `--debug` (or EPIC_EXT_DEBUG=1) shows the traceback too.

Subcommands live in a registry: a new one (train, infer, demo, ...) is a function decorated with
`@command(name, help)` that receives its parsed arguments and returns an exit status, plus an
optional `configure(parser)` that adds its arguments; no change to `main` is needed. Heavy imports
belong inside the command's function so that `epic-ext --help` stays fast. A command marked
`passthrough=True` receives the unparsed remainder of the command line as `args.rest` (its own
parser does the parsing; `-h` goes to it as well). A large command lives in its own module
(`cli_infer.py`), which must not import this one (under `python -m epic_ext.cli` that would be a
second copy with its own registry): it is registered here.
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
    import os
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
    # A GPU without the CUDA kernels in epic_ext._C: say so loudly, with why and how to fix it.
    from .cuda_build import gpu_without_cuda_kernels
    info["cuda_warning"] = gpu_without_cuda_kernels() if cuda else None
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
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    for name, b in info["backends"].items():
        reason = b["reason"]
        if name == "triton" and b["available"] and not interpret:
            # Compiled Triton runs CUDA tensors only; CPU tensors need the interpreter.
            reason += "; CUDA tensors only (CPU tensors need TRITON_INTERPRET=1)"
        elif name == "triton" and b["available"]:
            reason += "; TRITON_INTERPRET=1: interpreted (CPU tensors too, slowly)"
        print(f"  {name:<10} {'yes' if b['available'] else 'no ':<4} {reason}")
    if info["cuda_warning"]:
        print(info["cuda_warning"])
    return 0


# --------------------------------------------------------------------------- bench

def find_benchmarks() -> "str | None":
    """The source checkout whose benchmarks/ `epic-ext bench` runs: the one holding this package
    (an in-place or editable install), else the current directory; None when neither has them.
    The benchmarks are not part of the installed package and are never imported from it."""
    from pathlib import Path
    for root in (Path(__file__).resolve().parent.parent, Path.cwd()):
        if (root / "benchmarks" / "__main__.py").is_file():
            return str(root)
    return None


@command("bench", "run the microbenchmarks of a source checkout (`python -m benchmarks` in a "
                  "subprocess; its options pass through, `epic-ext bench --help` for them); results "
                  "in ./benchmarks/results unless --out DIR or EPIC_EXT_BENCH_DIR says otherwise",
         passthrough=True)
def _bench(args: argparse.Namespace) -> int:
    import os
    import subprocess

    from .machine import RESULTS_ENV, results_dir

    rest, out, i = [], None, 0
    while i < len(args.rest):                     # --out DIR / --out=DIR is ours, the rest theirs
        tok = args.rest[i]
        if tok == "--out":
            if i + 1 >= len(args.rest):
                raise ValueError("--out: expected a folder")
            out, i = args.rest[i + 1], i + 2
            continue
        if tok.startswith("--out="):
            out = tok.split("=", 1)[1]
        else:
            rest.append(tok)
        i += 1
    root = find_benchmarks()
    if root is None:
        raise FileNotFoundError("the benchmarks are not part of the installed package; run "
                                "`epic-ext bench` from a source checkout of epic-ext (its "
                                "benchmarks/ folder, or in it: python -m benchmarks)")
    env = dict(os.environ)
    env[RESULTS_ENV] = str(results_dir(out))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    if {"-h", "--help"} & set(rest):
        print("epic-ext bench [--out DIR] [options of python -m benchmarks, below]\n  --out DIR   "
              "results folder (default: $EPIC_EXT_BENCH_DIR, else ./benchmarks/results)\n", flush=True)
    elif "--list" not in rest:
        _note("bench", f"benchmarks of {root}; results in {env[RESULTS_ENV]}")
    return subprocess.call([sys.executable, "-m", "benchmarks", *rest], env=env)


# --------------------------------------------------------------------------- infer (cli_infer.py)

from .cli_infer import _configure_infer, _infer, _note  # noqa: E402

command("infer", "answer prompts about images with a token-reduction method and report tokens, KV bytes, "
                 "FLOPs and latency", _configure_infer)(_infer)


# --------------------------------------------------------------------------- eval (cli_eval.py)

from .cli_eval import _configure_eval, _eval  # noqa: E402

command("eval", "score a model under methods x budgets on benchmark tasks (lmms-eval, VLMEvalKit or the local "
                "task); JSON, table and plot of score against visual tokens", _configure_eval)(_eval)


# --------------------------------------------------------------------------- train

def _configure_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML file (see epic_ext/train/config.py)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set steps=50")


@command("train", "train with EPIC (TCD / LCD / ICD) or an ablation from a YAML config", _configure_train)
def _train(args: argparse.Namespace) -> int:
    from .train.config import TrainConfig, parse_overrides, read_config_file

    # Every key is checked (errors name the key or the file) before anything heavy is imported.
    cfg = TrainConfig.from_dict(parse_overrides(read_config_file(args.config), args.set))
    from .train.trainer import train
    result = train(cfg, resume=args.resume)
    last = result.history[-1] if result.history else {}
    print(f"done: {len(result.history)} steps, last loss {last.get('loss', float('nan')):.4f}, "
          f"median step {result.step_time_s * 1e3:.0f} ms; model in {result.final_dir}")
    return 0


# --------------------------------------------------------------------------- demo

def _configure_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="a smoke run of every stage on a few examples (CI; under a minute on a 2-core CPU, ~20 s measured)")
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
    recipe = replace(recipe, **changes)        # a bad variant: ValueError, one line from main
    result = run_demo(args.out, recipe=recipe, seed=args.seed, reuse=args.reuse)
    if not args.quick and args.seed is None and not changes:
        # Keep the tables and plot with the project's measured results, named by machine.
        from .machine import machine_info, results_dir
        slug = machine_info("cpu")["slug"]
        folder = results_dir()
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(args.out) / "demo.json", folder / f"demo_{slug}.json")
        shutil.copy(Path(args.out) / "demo.png", folder / f"demo_{slug}.png")
    return 0 if result else 1


# --------------------------------------------------------------------------- main

DEBUG_HELP = "show the Python traceback of an error (or set EPIC_EXT_DEBUG=1)"
# The package's own errors (bad arguments, files, configs) become one line and exit status 2;
# anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, TypeError, OSError)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="epic-ext", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        sp = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help,
                            add_help=not cmd.passthrough)
        if not cmd.passthrough:
            sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        if cmd.configure:
            cmd.configure(sp)
    return p


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    import os
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
    debug = args.debug or os.environ.get("EPIC_EXT_DEBUG", "") not in ("", "0")
    try:
        return int(cmd.run(args) or 0)
    except USER_ERRORS as e:
        if debug:
            import traceback
            traceback.print_exc()
        print(f"epic-ext {cmd.name}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"epic-ext {cmd.name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
