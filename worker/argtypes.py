"""argparse types that the command lines share (`python -m compile`, `python -m producer`): each
refuses what the command could not use, in words argparse prefixes with the option's name
(`argument --topk: 0 is less than 1`, exit status 2); the name each command goes by; the
parsing of a command line of subcommands; and how a command ends when its reader goes away."""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from typing import TextIO


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


def run_main(main: Callable[[], int]) -> int:
    """`main()`'s exit status, its output flushed before it returns. A reader of stdout gone early
    (`kiln models | head -n 0`) is not an error of the command's: status 0, and no traceback or
    "Exception ignored" line with status 120 when Python flushes stdout at exit. A reader of
    stderr gone early costs the messages only: a failing command keeps its status (hostile
    testers' findings). A gone reader's stream is pointed at nothing, so that the flush at exit
    has nowhere to fail (Python's documented recipe: library/signal, "Note on SIGPIPE"). Once
    `main` has returned, a Ctrl-C has nothing left to stop: it is ignored while Python exits
    (unloading torch takes a second, and Python's own Ctrl-C handler is gone by then)."""
    sys.stderr = _LosesMessagesOnly(sys.stderr)
    try:
        try:
            return main()
        finally:  # argparse's help exits too: flushed here, where a reader gone is caught below
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # before the output can be seen whole
            sys.stdout.flush()
    except BrokenPipeError:
        point_at_nothing(sys.stdout)
        return 0


class _LosesMessagesOnly:
    """A text stream whose writes to a reader gone away go nowhere instead of raising."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            point_at_nothing(self._stream)
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            point_at_nothing(self._stream)

    def __getattr__(self, name: str) -> object:  # fileno, isatty, encoding, ...
        return getattr(self._stream, name)


def point_at_nothing(stream: TextIO) -> None:
    """Point `stream`'s file descriptor at /dev/null: after its reader went away, what is left to
    write (Python's flush at exit included) goes nowhere instead of failing."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`parser.parse_args(argv)` for a command line of subcommands, each with itself as its
    `command_parser` default: an argument the subcommand does not know is refused with that
    subcommand's usage, which lists its options (exit status 2). argparse refused it with the top
    level's, which lists only the subcommands (a new user's `kiln label --tpok 3`).

    Options given before the subcommand are refused with the command line they belong in
    (`--topk 3 label x` -> `label --topk 3 x`), once the subcommand has parsed that line: an
    option it does not take gets its own error instead (hostile testers' findings: argparse took
    `3` for a subcommand, and a hint named options the subcommand would refuse)."""
    argv = sys.argv[1:] if argv is None else argv
    commands = subcommands(parser)
    moved = options_moved_after_command(
        argv,
        commands,
        accepted=lambda line: takes(parser, line),
        takes_value=lambda command, option: option_takes_value(commands[command], option),
    )
    if moved is not None:
        command_parser = parse_command_line(parser, moved).command_parser  # exits on the line's own errors
        command_parser.error(f"options go after the command: {command_parser.prog} {shlex.join(moved[1:])}")
    if argv and argv[0].startswith("-") and not set(argv) & set(commands) and trial_parse(parser, argv) != "help":
        # argparse would name the option's value as an unknown command (`--topk 3 lable`: '3')
        parser.error(f"the command comes first, its options after it; the commands: {', '.join(commands)}")
    args, extra = parser.parse_known_args(argv)
    if extra:
        args.command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parser of each subcommand of `parser`, by name."""
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def options_moved_after_command(
    argv: list[str],
    commands: Iterable[str],
    accepted: Callable[[list[str]], bool],
    takes_value: Callable[[str, str], bool],
) -> list[str] | None:
    """`argv` with the options before its command moved after it (`--topk 3 label x` ->
    `label --topk 3 x`), or None where `argv` does not start with an option or names no command.

    An option's value may name a command too (`--job status label x`, `--out build label x`:
    hostile testers' findings), so the command is the first word in `commands` that is not the
    value of the option before it (`takes_value(command, option)`: a flag such as
    `--no-progress` takes none) and whose line `accepted` takes; else the first that is not such
    a value, whose parser then says what is wrong with its line (`--ou build label x`: `--ou` is
    ambiguous under `label`); else the first whose line is taken, else the first. `--` starts
    nothing: after it every word is an argument."""
    if not argv or not argv[0].startswith("-") or argv[0] == "--":
        return None
    words = argv[: argv.index("--")] if "--" in argv else argv
    found = [i for i, word in enumerate(words) if word in commands]
    if not found:
        return None
    lines = {i: [argv[i], *argv[:i], *argv[i + 1 :]] for i in found}
    taken = [i for i in found if accepted(lines[i])]
    not_a_value = [i for i in found if not (argv[i - 1].startswith("-") and takes_value(argv[i], argv[i - 1]))]
    return lines[([i for i in not_a_value if i in taken] or not_a_value or taken or found)[0]]


def option_takes_value(parser: argparse.ArgumentParser, option: str) -> bool:
    """Whether the word after `option` (as typed: `--out`, `-o`, an abbreviation argparse takes
    such as `--ou`, or `--out=x`) may be its value under `parser`: not after a flag, nor after
    `--option=value`; an option `parser` does not know may take one."""
    if "=" in option:
        return False
    actions = parser._option_string_actions
    action = actions.get(option)
    if action is None and option.startswith("--") and parser.allow_abbrev:
        matches = {a for name, a in actions.items() if name.startswith(option)}
        action = matches.pop() if len(matches) == 1 else None
    return action is None or action.nargs != 0


def takes(parser: argparse.ArgumentParser, argv: list[str]) -> bool:
    """Whether `parser` parses `argv` whole (help counts), printing nothing."""
    return trial_parse(parser, argv) in ("parsed", "help")


def trial_parse(parser: argparse.ArgumentParser, argv: list[str]) -> str:
    """How `parser` takes `argv`, its output thrown away: "parsed", "help" (`-h`, `--help`, or an
    abbreviation argparse takes for it) or "refused". argparse exits with status 0 only after
    printing help (kiln's parsers have no `version` action)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            _, extra = parser.parse_known_args(argv)
        except SystemExit as e:
            return "help" if e.code == 0 else "refused"
    return "refused" if extra else "parsed"
