"""One CLI, `forcekit`, assembled from the subcommands each package registers.

Each package owns a `commands` module with `register(commands: Commands)`. Heavy imports
(torch, engines, aiortc) happen inside the command functions, so `--help` stays fast and a
machine without the optional extras can still run the commands it has the packages for.

Errors: a bad argument is refused while parsing (the validated types below) with one line and
exit status 2. A failure the user can fix (a missing or corrupt file, a bad config) ends with
one line naming the problem and exit status 1: commands signal it with `CommandError`, and the
library with `ValueError` (its validation error; `BundleError`, `ShardError` and the others
derive from it), `OSError`, or `ImportError` (an optional extra that is not installed).
Anything else is a bug: one line saying so, exit status 1.
`FORCEKIT_DEBUG=1` lets every exception through with its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

COMMAND_MODULES = (
    "runtime.commands", "training.commands", "training.longplay", "kernels.commands", "apps.commands",
    "forcekit.run", "training.lipsync.commands",
    "training.lipsync.model_commands", "apps.lipsync_commands",
)

GROUPS = {
    "train": "train a stage of the recipe (codec, teacher, students, probe)",
    "eval": "evaluate a bundle (codec quality, world model against the engine)",
    "bench": "benchmarks that print JSON (runtime, kernels, latency)",
    "data": "inspect and verify recorded data",
}

DEBUG_ENV = "FORCEKIT_DEBUG"
USAGE_EXIT, FAILURE_EXIT = 2, 1
MAX_SEED = 2**31 - 1  # engines and numpy's legacy seeding take 32-bit seeds; evals add episode offsets


class CommandError(Exception):
    """A failure the user can fix (a bad input file, missing data): reported as one line, exit status 1."""

    exit_code = FAILURE_EXIT


class UsageError(CommandError):
    """Arguments that parse but do not fit together: reported like argparse's own errors, exit status 2."""

    exit_code = USAGE_EXIT


USER_ERRORS = (CommandError, ValueError, OSError, ImportError)  # ImportError: an optional extra not installed


# -- validated argument types ------------------------------------------------------------------------
def _number(text: str, kind: type) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (counts, sizes, steps)."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def positive_int_list(text: str) -> list[int]:
    """A comma-separated list of integers >= 1 (widths per level: `16,32,64`)."""
    parts = [part.strip() for part in text.split(",")]
    if not all(parts):
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}")
    return [positive_int(part) for part in parts]


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (counts where 0 means none or 'all', as the option's help says)."""
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def seed_int(text: str) -> int:
    """A random seed: an integer in [0, 2**31 - 1]."""
    value = _number(text, int)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"a seed must lie in [0, {MAX_SEED}], got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (rates, scales, durations)."""
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    """A finite number >= 0."""
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def field_of_view(text: str) -> float:
    """A field of view in degrees, in [0, 180) (0: none, a flat view)."""
    value = _number(text, float)
    if not 0 <= value < 180:
        raise argparse.ArgumentTypeError(f"must be a field of view in [0, 180) degrees, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A finite number in [0, 1) (decay rates)."""
    value = _number(text, float)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {text!r}")
    return value


def training_device(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``; a CUDA device this machine lacks is refused when the flag is read,
    before any data is encoded."""
    if text != "cpu" and not (text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit())):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")
    if text != "cpu":
        import torch

        index = int(text[5:]) if ":" in text else 0
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: this machine has no such CUDA device "
                                             f"({torch.cuda.device_count()} visible)")
    return text


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=training_device, default="cpu",
                   help="where the models and the latent clips sit while training: cpu, cuda or cuda:N")


# -- parser -------------------------------------------------------------------------------------------
class ArgumentParser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (the full usage is one `--help` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_EXIT, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class HelpFormatter(argparse.HelpFormatter):
    """Appends each option's default to its help, unless the help already says what the default is.

    Flags (store_true) and options whose default is None (the help says what leaving them out
    does) get nothing appended; sequences are shown comma-separated, as they are typed.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or action.nargs == 0 or default is None or default is argparse.SUPPRESS
                or "default" in text.lower()):
            return text
        shown = ",".join(map(str, default)) if isinstance(default, tuple | list) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class Commands:
    """Hands out sub-parsers: top-level commands and commands inside a group (`forcekit bench runtime`)."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self._top = parser.add_subparsers(dest="command", metavar="<command>")
        self._groups: dict[str, argparse._SubParsersAction] = {}

    def add(self, name: str, help: str, func: Callable[[argparse.Namespace], int | None],
            group: str | None = None) -> argparse.ArgumentParser:
        subparsers = self._top if group is None else self._group(group)
        parser = subparsers.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
        parser.set_defaults(func=func, cli_prog=parser.prog)
        return parser

    def _group(self, group: str) -> argparse._SubParsersAction:
        if group not in self._groups:
            if group not in GROUPS:
                raise KeyError(f"unknown command group {group!r}; known: {sorted(GROUPS)}")
            gp = self._top.add_parser(group, help=GROUPS[group], description=GROUPS[group],
                                      formatter_class=HelpFormatter)
            gp.set_defaults(func=lambda _args, gp=gp: gp.print_help() or USAGE_EXIT)
            self._groups[group] = gp.add_subparsers(dest=f"{group}_command", metavar="<what>")
        return self._groups[group]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="forcekit", formatter_class=HelpFormatter,
        description="Real-time autoregressive video and world models: record, train, distill, play, serve. "
                    f"Errors are one line; set {DEBUG_ENV}=1 to see tracebacks.",
    )
    commands = Commands(parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(commands)
    return parser


# -- running a command ----------------------------------------------------------------------------
def debug_mode() -> bool:
    """True when FORCEKIT_DEBUG is set (to anything but '' or '0'): exceptions keep their tracebacks."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def report(prog: str, error: Exception) -> int:
    """Print ``error`` as one line on stderr and return the exit status it stands for."""
    if isinstance(error, USER_ERRORS):
        print(f"{prog}: error: {_one_line(error)}", file=sys.stderr)
        return getattr(error, "exit_code", FAILURE_EXIT)
    print(f"{prog}: internal error: {type(error).__name__}: {_one_line(error)} "
          f"(a bug: rerun with {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
    return FAILURE_EXIT


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed
        return e.code if isinstance(e.code, int) else USAGE_EXIT
    if getattr(args, "func", None) is None:
        parser.print_help()
        return USAGE_EXIT
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug_mode():
            raise
        return report(getattr(args, "cli_prog", parser.prog), e)
    return int(result or 0)
