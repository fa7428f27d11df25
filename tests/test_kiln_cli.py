"""The `kiln` console script (kiln_cli.py): every subcommand reaches the module that owns it, with
its own help, options and exit codes."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import tomllib

import pytest
from conftest import ROOT, python_env


def kiln(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kiln_cli", *args], env=python_env(), capture_output=True, text=True, timeout=300
    )


def test_the_console_script_is_kiln_cli_main():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, function = scripts["kiln"].split(":")
    assert getattr(importlib.import_module(module), function) is importlib.import_module("kiln_cli").main


def test_help_lists_every_command():
    done = kiln("--help")
    assert done.returncode == 0
    for name in ["build", "inspect", "models", "worker", "label", "status", "export", "classify"]:
        assert f"  {name} " in done.stdout


@pytest.mark.parametrize(
    ("command", "says"),
    [
        ("build", "--max-batch"),
        ("inspect", "package"),
        ("models", "usage"),
        ("worker", "--concurrency"),
        ("label", "--out"),
        ("status", "job"),
        ("export", "--out"),
        ("classify", "image"),
    ],
)
def test_each_command_explains_itself(command, says):
    """And goes by the name it was run by: `usage: kiln label ...`, not `python -m producer label`."""
    done = kiln(command, "--help")
    assert done.returncode == 0, done.stderr
    assert says in done.stdout and done.stdout.startswith(f"usage: kiln {command} ")


def test_commands_run_the_owning_module(lite0_package):
    assert kiln("models").stdout.splitlines()[0] == "efficientnet_lite0"
    assert json.loads(kiln("inspect", str(lite0_package)).stdout)["model"] == "efficientnet_lite0"
    done = kiln("worker")  # no model, no Redis: the worker's own error and exit code
    assert done.returncode == 2 and "error: no model" in done.stderr


def test_an_unknown_command_is_refused():
    done = kiln("bulid")
    assert done.returncode == 2 and "unknown command 'bulid'" in done.stderr


KILN = [sys.executable, "-m", "kiln_cli"]


@pytest.mark.parametrize(
    ("command", "says"),
    [
        ([*KILN, "--no-progress", "label", "x", "--out", "r.csv"],
         "kiln: options go after the command: kiln label --no-progress x --out r.csv"),
        ([*KILN, "--topk", "3", "label", "x y", "--out", "r.csv"],
         "kiln: options go after the command: kiln label --topk 3 'x y' --out r.csv"),
        ([*KILN, "--job", "label", "label", "x", "--out", "r.csv"],  # a value that names a command
         "kiln: options go after the command: kiln label --job label x --out r.csv"),
        ([*KILN, "--job", "status", "label", "x", "--out", "r.csv"],  # one that names another command
         "kiln: options go after the command: kiln label --job status x --out r.csv"),
        ([*KILN, "--model", "worker", "label", "x", "--out", "r.csv"],  # of another module
         "kiln: options go after the command: kiln label --model worker x --out r.csv"),
        ([*KILN, "--out", "build", "label", "x"],  # `build --out label x` would parse too
         "kiln: options go after the command: kiln label --out build x"),
        ([*KILN, "--out", "label", "export", "build"],
         "kiln: options go after the command: kiln export --out label build"),
        ([*KILN, "--concurrency", "2", "worker", "--model", "m.pt2"],
         "kiln: options go after the command: kiln worker --concurrency 2 --model m.pt2"),
        ([*KILN, "--no-progress", "wait", "submit"],  # a flag has no value: `submit` is wait's job
         "kiln: options go after the command: kiln wait --no-progress submit"),
        ([*KILN, "--no-prog", "wait", "submit"],  # as argparse abbreviates it
         "kiln: options go after the command: kiln wait --no-prog submit"),
        ([*KILN, "--timeout=5", "wait", "submit"],  # the value is in the word
         "kiln: options go after the command: kiln wait --timeout=5 submit"),
        ([sys.executable, "-m", "producer", "--no-progress", "wait", "submit"],
         "error: options go after the command: python -m producer wait --no-progress submit"),
        ([sys.executable, "-m", "producer", "--no-progress", "--topk=3", "label", "x", "--out", "r.csv"],
         "error: options go after the command: python -m producer label --no-progress --topk=3 x --out r.csv"),
        ([sys.executable, "-m", "producer", "--out", "r.csv", "export", "job1"],
         "error: options go after the command: python -m producer export --out r.csv job1"),
        ([sys.executable, "-m", "producer", "--job", "status", "label", "x", "--out", "r.csv"],
         "error: options go after the command: python -m producer label --job status x --out r.csv"),
        ([sys.executable, "-m", "compile", "--device", "cuda", "build", "resnet18"],
         "error: options go after the command: python -m compile build --device cuda resnet18"),
    ],
)  # fmt: skip
def test_an_option_before_the_command_is_said_to_go_after_it(command, says):
    """With the whole line it belongs in. argparse blamed it on the command that takes it
    (`label: unrecognized arguments: --no-progress`), took an option's value for an unknown
    command (`invalid choice: '3'`), or an unknown command of the `kiln` launcher (hostile
    testers' findings). Nothing runs."""
    done = subprocess.run(command, env=python_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and says in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("command", "says"),
    [
        ([*KILN, "--no-progress", "status", "job1"], "status: error: unrecognized arguments: --no-progress"),
        ([sys.executable, "-m", "producer", "--no-progress", "status", "job1"],
         "status: error: unrecognized arguments: --no-progress"),
        ([*KILN, "--bogus", "worker", "--model", "m.pt2"], "worker: error: unrecognized arguments: --bogus"),
        # `build` is the value of the option before it, not the command (a hostile tester's finding)
        ([*KILN, "--ou", "build", "label", "x"], "label: error: ambiguous option: --ou could match"),
        ([sys.executable, "-m", "producer", "--ou", "build", "label", "x"], "ambiguous option: --ou could match"),
        ([*KILN, "-o", "build", "inspect", "x"], "inspect: error: unrecognized arguments: -o"),
        ([sys.executable, "-m", "compile", "-o", "build", "inspect", "x"], "unrecognized arguments: -o"),
    ],
)  # fmt: skip
def test_an_option_before_a_command_that_does_not_take_it_gets_that_commands_error(command, says):
    """Not a hint to put `--no-progress` after `status`, which would refuse it in turn; nor a line
    where an option's value has become the command (`kiln build --ou label x`)."""
    done = subprocess.run(command, env=python_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert says in done.stderr and "go after" not in done.stderr, done.stderr


@pytest.mark.parametrize(
    "command",
    [
        [*KILN, "--no-progress", "label", "-h"],
        [*KILN, "--topk", "3", "label", "--help"],
        [sys.executable, "-m", "producer", "--no-progress", "label", "-h"],
    ],
)
def test_help_asked_with_an_option_before_the_command_is_shown(command):
    """The user asked for help: both launchers show the command's (`kiln` refused the line with
    status 2 where `python -m producer` printed the help: a hostile tester's finding)."""
    done = subprocess.run(command, env=python_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "label [-h]" in done.stdout and "--out" in done.stdout, done


@pytest.mark.parametrize(
    ("command", "says"),
    [
        ([*KILN, "--topk", "3", "lable", "x", "--out", "r.csv"], "kiln: the command comes first, its options after it"),
        ([*KILN, "--topk"], "kiln: the command comes first, its options after it"),
        ([*KILN, "help", "lable"], "kiln: unknown command 'lable'"),
        ([sys.executable, "-m", "producer", "--topk", "3", "lable", "x", "--out", "r.csv"],
         "error: the command comes first, its options after it; the commands: label, submit"),
        ([sys.executable, "-m", "compile", "-o", "x.pt2", "biuld"],
         "error: the command comes first, its options after it; the commands: build, inspect, models"),
    ],
)  # fmt: skip
def test_options_and_no_command_are_refused_as_such(command, says):
    """argparse named the option's value as an unknown command (`invalid choice: '3'`), and
    `kiln` the option itself (`unknown command '--topk'`): hostile testers' findings."""
    done = subprocess.run(command, env=python_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and says in done.stderr, done.stderr


@pytest.mark.parametrize(
    "args", [["-h", "label"], ["help", "label"], ["--hel", "label"], ["--help", "label", "x", "--topk", "3"]]
)
def test_help_before_a_command_is_that_commands_help(args):
    """`kiln -h label` is `kiln label --help`, as `python -m producer -h label` is (it printed
    kiln's list of commands: a hostile tester's finding)."""
    done = kiln(*args)
    assert done.returncode == 0 and done.stdout.startswith("usage: kiln label [-h]"), done


@pytest.mark.parametrize(("args", "says"), [(["--hel"], "usage: kiln COMMAND"), (["--vers"], "kiln ")])
def test_the_launchers_own_options_abbreviate_as_argparse_options_do(args, says):
    done = kiln(*args)
    assert done.returncode == 0 and done.stdout.startswith(says), done


SWALLOWED_CTRL_C = """
import os, signal, sys, time

class SwallowsCtrlC:
    # As numpy's and torch's imports may: the Ctrl-C lands while torchvision loads, and is caught.
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)  # Python's handler runs here
            except KeyboardInterrupt:
                pass

sys.meta_path.insert(0, SwallowsCtrlC())
from {module} import main
sys.exit(main({argv!r}))
"""


@pytest.mark.parametrize(
    ("module", "argv", "says"),
    [
        ("kiln_cli", ["models"], "interrupted\n"),
        ("compile.__main__", ["models"], "interrupted\n"),
        ("kiln_cli", ["build", "resnet18", "-o", "/dev/null/r18.pt2"], "interrupted: no package written\n"),
    ],
)
def test_ctrl_c_while_torch_imports_is_not_lost(module, argv, says):
    """Held until the import ends, then the command stops (status 130): a Ctrl-C caught inside
    torch's or numpy's import was lost (the command ran on: here `build` would fail on its output
    path with status 2) or became numpy's `ImportError: cannot load module more than once`."""
    script = SWALLOWED_CTRL_C.format(module=module, argv=argv)
    done = subprocess.run([sys.executable, "-c", script], env=python_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 130 and done.stdout == "" and done.stderr.endswith(says), done
    assert "Traceback" not in done.stderr, done.stderr


def test_ctrl_c_before_the_command_starts_ends_quietly():
    """An interrupt while the command's module is still importing (torch takes seconds) ends with
    one line and status 130, not a traceback through importlib. The interrupt is raised where a
    Ctrl-C lands then: at the import of the producer's first dependency."""
    script = """
import sys

class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name == "redis":
            raise KeyboardInterrupt

sys.meta_path.insert(0, CtrlC())
import kiln_cli
sys.exit(kiln_cli.main(["label", "x", "--out", "r.csv"]))
"""
    done = subprocess.run([sys.executable, "-c", script], env=python_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 130 and done.stderr == "kiln: interrupted\n", done


def test_version():
    done = kiln("--version")
    assert done.returncode == 0 and done.stdout.startswith("kiln "), done


@pytest.mark.parametrize("unbuffered", ["1", ""])
@pytest.mark.parametrize(
    "args",
    [
        ["kiln_cli", "inspect", "PACKAGE"],
        ["kiln_cli", "--help"],
        ["kiln_cli", "--version"],
        ["kiln_cli", "label", "-h"],
        ["kiln_cli", "models"],
        ["compile", "models"],
        ["compile", "inspect", "PACKAGE"],
        ["producer", "--help"],
        ["worker", "--help"],
    ],
)
def test_output_piped_into_a_reader_that_stops_early_is_no_error(lite0_package, args, unbuffered):
    """`kiln inspect x.pt2 | head -n 0`: the reader has closed the pipe; no traceback and no
    "Exception ignored" line, status 0, whether stdout is unbuffered (as in the worker image) or
    written only at exit (small output: a hostile tester's finding, status 120), under `kiln`
    and `python -m` alike (`python -m compile models` ended with status 1)."""
    import os

    args = [str(lite0_package) if arg == "PACKAGE" else arg for arg in args]
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write: that write fails with EPIPE
    try:
        done = subprocess.run(
            [sys.executable, "-m", *args], env=python_env(PYTHONUNBUFFERED=unbuffered),
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=300,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["kiln_cli", "inspect", "/nonexistent.pt2"],
        ["kiln_cli", "--topk", "3", "label", "x", "--out", "r.csv"],
        ["kiln_cli", "nosuch"],
        ["compile", "inspect", "/nonexistent.pt2"],
        ["producer", "status", "somejob"],
    ],
)
def test_a_failing_command_keeps_its_status_when_its_messages_find_no_reader(args):
    """`kiln inspect x.pt2 2>&1 | true`: the error line cannot be written, and the command still
    fails (it ended with status 0: a hostile tester's finding)."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", *args], env=python_env(KILN_REDIS_URL="redis://127.0.0.1:1/0"),
            stdout=write_end, stderr=write_end, timeout=300,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert done.returncode == 2


@pytest.mark.parametrize("module", ["kiln_cli", "compile"])
def test_ctrl_c_once_the_output_is_written_changes_nothing(module):
    """A Ctrl-C while Python unloads torch after `kiln models` printed its list (about a second)
    killed it by the signal, status 130 in a shell and no message (a hostile tester's finding):
    the command is done, status 0."""
    import signal

    from compile.models import DEFAULT_MODEL, torchvision_classifiers

    expected = [DEFAULT_MODEL, *torchvision_classifiers()]
    listing = subprocess.Popen([sys.executable, "-m", module, "models"], env=python_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        lines = [listing.stdout.readline().strip() for _ in expected]  # all of it: the command is done
        listing.send_signal(signal.SIGINT)
        _, err = listing.communicate(timeout=120)
    finally:
        listing.kill()
    assert lines == expected
    assert listing.returncode == 0 and "Traceback" not in err, err


def test_kiln_alone_prints_its_usage_as_an_error():
    """Status 2 and the usage on stderr, as the modules' parsers print a usage error."""
    done = kiln()
    assert done.returncode == 2 and done.stdout == "" and done.stderr.startswith("usage: kiln COMMAND"), done


def test_build_help_shows_no_empty_defaults():
    done = kiln("build", "--help")
    assert "(default: None)" not in done.stdout and "(default: False)" not in done.stdout
