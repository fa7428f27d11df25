"""argparse types that the command lines share (`python -m compile`, `python -m producer`): each
refuses what the command could not use, in words argparse prefixes with the option's name
(`argument --topk: 0 is less than 1`, exit status 2); the name each command goes by; and the
parsing of a command line of subcommands."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable


def at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """A whole number of at least `low` (and at most `high`, where given)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is less than {low}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{value} is more than {high}")
        return value

    return parse


def finite(text: str) -> float:
    """A finite number: nan or inf as a mean or std would make every prediction nan."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def seconds(text: str) -> float:
    """A finite number of seconds above 0."""
    try:
        value = finite(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a number of seconds above 0")
    return value


def program(module: str, under_kiln: str = "kiln") -> str:
    """The command's name in its usage lines: `under_kiln` where the `kiln` launcher runs it (it
    names itself in sys.argv[0]: `kiln label --help` says `usage: kiln label ...`), else
    `python -m MODULE`."""
    return under_kiln if os.path.basename(sys.argv[0]) == "kiln" else f"python -m {module}"


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`parser.parse_args(argv)` for a command line of subcommands, each with itself as its
    `command_parser` default: an argument the subcommand does not know is refused with that
    subcommand's usage, which lists its options (exit status 2). argparse refused it with the top
    level's, which lists only the subcommands (a new user's `kiln label --tpok 3`). One given
    before the subcommand is said to go after it: it was refused as unknown to the subcommand
    that takes it (`python -m producer --no-progress label`, a hostile tester's finding)."""
    argv = sys.argv[1:] if argv is None else argv
    args, extra = parser.parse_known_args(argv)
    if extra:
        first = argv.index(args.command) if args.command in argv else len(argv)
        before = [arg for arg in argv[:first] if arg in extra]
        if before:  # `kiln --no-progress label`: the subcommand's own option, in the top level's place
            args.command_parser.error(
                f"options go after the command: {args.command_parser.prog} {' '.join(before)} ..."
            )
        args.command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args
