"""`kiln`: one command for every kiln step, beside the `python -m compile|worker|producer` forms.

Each subcommand hands its arguments to the module that owns it, unchanged, so options, help and
exit codes are theirs: `kiln build ...` is `python -m compile build ...`, `kiln worker ...` is
`python -m worker ...`, `kiln label ...` is `python -m producer label ...`.
"""

from __future__ import annotations

import importlib
import os
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


def usage() -> str:
    lines = ["usage: kiln COMMAND [ARGS...]   (kiln COMMAND --help explains each; kiln --version)", "", "commands:"]
    lines += [f"  {name:9s} {summary}" for name, (_, _, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    # What this module imports is imported in here, under the handlers: a Ctrl-C or a reader gone
    # while it loads is met the same way.
    try:
        try:
            return _run(sys.argv[1:] if argv is None else argv)
        finally:  # argparse's help exits: flushed here, not at exit, a reader gone early is caught below
            sys.stdout.flush()
    except KeyboardInterrupt:
        # Ctrl-C before the command's own handling starts (while torch imports, say): each module
        # says what an interrupt leaves once it runs; here nothing has started, and a traceback
        # through importlib says nothing to a user.
        print("kiln: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`kiln models | head -n 0`): not an error of kiln's. Python would
        # print a traceback flushing stdout at exit, so stdout is pointed at nothing first (the
        # recipe of Python's library/signal docs, "Note on SIGPIPE").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _run(argv: list[str]) -> int:
    from worker.argtypes import options_moved_after_command, trial_parse

    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version", "version"):
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"kiln {version('kiln')}")
        except PackageNotFoundError:
            print("kiln (not installed: run from a checkout)")
        return 0
    sys.argv[0] = "kiln"  # each module's usage lines then say `kiln label`, not `python -m producer label`
    moved = options_moved_after_command(argv, COMMANDS, _accepted)
    if moved is not None:  # `kiln --topk 3 label x`: nothing runs
        module, first, _ = COMMANDS[moved[0]]
        line = [*first, *moved[1:]]
        owner = importlib.import_module(module)
        if trial_parse(owner.parser(), line) == "parsed":
            print(f"kiln: options go after the command: kiln {shlex.join(moved)}", file=sys.stderr)
            return 2
        # Its parser prints the help asked for (as `python -m producer --no-progress label -h`
        # does), or says what is wrong with the line.
        return owner.main(line)
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"kiln: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, first, _ = command
    return importlib.import_module(module).main([*first, *argv[1:]])


def _accepted(line: list[str]) -> bool:
    """Whether the module owning the command `line` starts with takes that line."""
    from worker.argtypes import takes

    module, first, _ = COMMANDS[line[0]]
    return takes(importlib.import_module(module).parser(), [*first, *line[1:]])


if __name__ == "__main__":
    sys.exit(main())
