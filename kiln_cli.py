"""`kiln`: one command for every kiln step, beside the `python -m compile|worker|producer` forms.

Each subcommand hands its arguments to the module that owns it, unchanged, so options, help and
exit codes are theirs: `kiln build ...` is `python -m compile build ...`, `kiln worker ...` is
`python -m worker ...`, `kiln label ...` is `python -m producer label ...`.
"""

from __future__ import annotations

import importlib
import shlex
import sys

# subcommand -> (module whose main() runs it, arguments put first, one-line summary)
COMMANDS: dict[str, tuple[str, list[str], str]] = {
    "build": ("compile.__main__", ["build"], "compile a model into a .pt2 package (python -m compile build)"),
    "inspect": ("compile.__main__", ["inspect"], "print a package's manifest as JSON (python -m compile inspect)"),
    "models": ("compile.__main__", ["models"], "list the model names `build` accepts (python -m compile models)"),
    "worker": ("worker.__main__", [], "serve a package from Redis: a Celery worker (python -m worker)"),
    "label": ("producer.__main__", ["label"], "classify images, write the results (python -m producer label)"),
    "submit": ("producer.__main__", ["submit"], "enqueue images and return (python -m producer submit)"),
    "wait": ("producer.__main__", ["wait"], "wait for a job to finish, with progress (python -m producer wait)"),
    "status": ("producer.__main__", ["status"], "counters of a job (python -m producer status)"),
    "export": ("producer.__main__", ["export"], "write a job's results to a file (python -m producer export)"),
    "classify": ("producer.__main__", ["classify"], "classify one image now, online (python -m producer classify)"),
}

# The launcher's own options: short, long, and as a word (`kiln help`).
HELP = ("-h", "--help", "help")
VERSION = ("-V", "--version", "version")


def usage() -> str:
    lines = ["usage: kiln COMMAND [ARGS...]   (kiln COMMAND --help explains each; kiln --version)", "", "commands:"]
    lines += [f"  {name:9s} {summary}" for name, (_, _, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    # What this module imports is imported in here, under the handler: a Ctrl-C while it loads is
    # met the same way.
    try:
        from worker.argtypes import run_main

        return run_main(lambda: _run(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        # Ctrl-C before the command's own handling starts (while torch imports, say): each module
        # says what an interrupt leaves once it runs; here nothing has started, and a traceback
        # through importlib says nothing to a user.
        print("kiln: interrupted", file=sys.stderr)
        return 130


def _asks(word: str, names: tuple[str, str, str]) -> bool:
    """Whether `word` is one of `names` (short, long, word), or an abbreviation argparse would
    take for the long one (`--hel`), as the modules' own parsers do."""
    return word in names or (len(word) > 2 and word.startswith("--") and names[1].startswith(word))


def _run(argv: list[str]) -> int:
    from worker.argtypes import options_moved_after_command, trial_parse

    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    if _asks(argv[0], HELP):
        if len(argv) < 2 or argv[1].startswith("-"):
            print(usage())
            return 0
        argv = [argv[1], "--help"]  # `kiln help label` is `kiln label --help`, as `python -m producer -h label`
    if _asks(argv[0], VERSION):
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"kiln {version('kiln')}")
        except PackageNotFoundError:
            print("kiln (not installed: run from a checkout)")
        return 0
    sys.argv[0] = "kiln"  # each module's usage lines then say `kiln label`, not `python -m producer label`
    moved = options_moved_after_command(argv, COMMANDS, _accepted, _takes_value)
    if moved is not None:  # `kiln --topk 3 label x`: nothing runs
        module, first, _ = COMMANDS[moved[0]]
        line = [*first, *moved[1:]]
        owner = _module(module)
        if trial_parse(owner.parser(), line) == "parsed":
            print(f"kiln: options go after the command: kiln {shlex.join(moved)}", file=sys.stderr)
            return 2
        # Its parser prints the help asked for (as `python -m producer --no-progress label -h`
        # does), or says what is wrong with the line.
        return owner.main(line)
    command = COMMANDS.get(argv[0])
    if command is None:
        # `kiln --topk 3 lable x`: no command named at all, rather than an unknown command '--topk'
        problem = "the command comes first, its options after it" if argv[0].startswith("-") else None
        print(f"kiln: {problem or f'unknown command {argv[0]!r}'}\n\n{usage()}", file=sys.stderr)
        return 2
    module, first, _ = command
    return _module(module).main([*first, *argv[1:]])


def _module(name: str):
    """The module that runs a command, imported with a Ctrl-C held until the import ends (torch's
    and numpy's imports lose one, or turn it into an ImportError)."""
    from worker.process_signals import interrupts_held

    with interrupts_held():
        return importlib.import_module(name)


def _accepted(line: list[str]) -> bool:
    """Whether the module owning the command `line` starts with takes that line."""
    from worker.argtypes import takes

    module, first, _ = COMMANDS[line[0]]
    return takes(_module(module).parser(), [*first, *line[1:]])


def _takes_value(command: str, option: str) -> bool:
    """Whether `option` takes a value in `command`'s parser (the module's, or its subcommand's)."""
    from worker.argtypes import option_takes_value, subcommands

    module, first, _ = COMMANDS[command]
    owner = _module(module).parser()
    return option_takes_value(subcommands(owner)[first[0]] if first else owner, option)


if __name__ == "__main__":
    sys.exit(main())
