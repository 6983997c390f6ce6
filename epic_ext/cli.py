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
