"""One CLI, `forcekit`, assembled from the subcommands each package registers.

Each package owns a `commands` module with `register(commands: Commands)`. Heavy imports
(torch, engines, aiortc) happen inside the command functions, so `--help` stays fast and a
machine without the optional extras can still run the commands it has the packages for.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

COMMAND_MODULES = (
    "runtime.commands", "training.commands", "training.longplay", "kernels.commands", "apps.commands",
    "forcekit.run", "training.lipsync.commands",
)

GROUPS = {
    "train": "train a stage of the recipe (codec, teacher, students, probe)",
    "eval": "evaluate a bundle (codec quality, world model against the engine)",
    "bench": "benchmarks that print JSON (runtime, kernels, latency)",
    "data": "inspect and verify recorded data",
}


class Commands:
    """Hands out sub-parsers: top-level commands and commands inside a group (`forcekit bench runtime`)."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self._top = parser.add_subparsers(dest="command", metavar="<command>")
        self._groups: dict[str, argparse._SubParsersAction] = {}

    def add(self, name: str, help: str, func: Callable[[argparse.Namespace], int | None],
            group: str | None = None) -> argparse.ArgumentParser:
        if group is None:
            parser = self._top.add_parser(name, help=help, description=help)
        else:
            parser = self._group(group).add_parser(name, help=help, description=help)
        parser.set_defaults(func=func)
        return parser

    def _group(self, group: str) -> argparse._SubParsersAction:
        if group not in self._groups:
            if group not in GROUPS:
                raise KeyError(f"unknown command group {group!r}; known: {sorted(GROUPS)}")
            gp = self._top.add_parser(group, help=GROUPS[group], description=GROUPS[group])
            gp.set_defaults(func=lambda _args, gp=gp: gp.print_help() or 2)
            self._groups[group] = gp.add_subparsers(dest=f"{group}_command", metavar="<what>")
        return self._groups[group]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forcekit",
        description="Real-time autoregressive video and world models: record, train, distill, play, serve.",
    )
    commands = Commands(parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)
