"""The `drgn` command: one subcommand per workflow stage.

Each subcommand lives in `drgn_core/commands/<name>.py` and defines

    HELP: str                          one line for `drgn --help`
    DESCRIPTION: str                   what it does, with an example (shown by `drgn <name> --help`)
    add_arguments(parser) -> None
    run(args) -> int                   exit status

Command modules import only argparse-level things at top level and import heavy modules (torch, sklearn)
inside `run`, so `drgn --help` stays instant. A `DrgnError` raised anywhere becomes a one-line message
`drgn <name>: error: ...` and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from drgn_core import __version__
from drgn_core.errors import DrgnError

# (subcommand, module under drgn_core.commands), in workflow order.
COMMANDS: list[tuple[str, str]] = [
    ("fetch", "fetch"),
    ("simulate", "simulate"),
    ("import", "import_"),
    ("downsample", "downsample"),
    ("train", "train"),
    ("convergence", "convergence"),
    ("abinit", "abinit"),
    ("encode", "encode"),
    ("volumes", "volumes"),
    ("analyze", "analyze"),
    ("landscape", "landscape"),
    ("filter", "filter"),
    ("traverse", "traverse"),
    ("backproject", "backproject"),
    ("fsc", "fsc"),
    ("evaluate", "evaluate"),
    ("export", "export"),
    ("explore", "explore"),
    ("summarize", "summarize"),
    ("check-config", "check_config"),
]


def _load(module: str):
    try:
        return importlib.import_module(f"drgn_core.commands.{module}")
    except ModuleNotFoundError as e:
        if e.name == f"drgn_core.commands.{module}":
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drgn",
        description="drgnflow: cryoDRGN-style heterogeneous reconstruction, one stage per subcommand.",
        epilog="Example: drgn simulate -o demo && drgn train demo/table.star demo/particles.mrcs "
        "--zdim 1 -o demo/run1\nRun `drgn <command> --help` for each command's options and an example.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"drgnflow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, module in COMMANDS:
        mod = _load(module)
        if mod is None:
            continue
        p = sub.add_parser(name, help=mod.HELP, description=mod.DESCRIPTION,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 1
    try:
        return int(args._run(args) or 0)
    except DrgnError as e:
        print(f"drgn {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"drgn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
