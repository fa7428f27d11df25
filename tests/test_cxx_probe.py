"""The C++-runtime probe (worker/cxx_runtime.py) on a host with empty caches, as in a new container:
it must load the package the way workers do, without compiling anything, and must not cache a
verdict from a package that failed for an ordinary reason."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import python_env

PROBE = """
import json, sys
from worker import cxx_runtime
verdict = cxx_runtime.preload_needed(sys.argv[1])
print(json.dumps({"verdict": verdict, "cached": cxx_runtime._verdicts()}))
"""


def _probe(package: Path, home: Path, bin_dir: Path) -> dict:
    """Run the probe in a fresh process whose caches are all empty and whose g++ logs each call."""
    env = python_env(
        HOME=str(home),
        XDG_CACHE_HOME=str(home / "cache"),
        TORCHINDUCTOR_CACHE_DIR=str(home / "inductor"),
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    )
    for name in ("CXX", "KILN_CXX_PRELOAD", "LD_PRELOAD"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-c", PROBE, str(package)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def logging_gxx(tmp_path: Path) -> tuple[Path, Path]:
    """A `g++` first on PATH that records its arguments, then runs the real one."""
    real = subprocess.run(["which", "g++"], capture_output=True, text=True).stdout.strip()
    if not real:
        pytest.skip("no g++ on this host: the probe does not run without a compiler")
    bin_dir, log = tmp_path / "bin", tmp_path / "gxx.log"
    bin_dir.mkdir()
    wrapper = bin_dir / "g++"
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> {log}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    return bin_dir, log


def test_probe_with_empty_caches_compiles_nothing(lite0_package, tmp_path, logging_gxx):
    bin_dir, log = logging_gxx
    result = _probe(lite0_package, tmp_path / "home", bin_dir)
    assert len(result["cached"]) == 1, "the probe's verdict was not cached"
    calls = log.read_text().splitlines()
    # One call asks where libstdc++ is; Inductor's CPU-feature probes would add compiler runs.
    assert calls and all("-print-file-name" in call for call in calls), calls


def test_a_package_that_fails_to_load_leaves_no_verdict(tmp_path, logging_gxx):
    bin_dir, _ = logging_gxx
    corrupt = tmp_path / "corrupt.pt2"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    result = _probe(corrupt, tmp_path / "home", bin_dir)
    assert result == {"verdict": None, "cached": {}}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_probe_child_stopped_by_a_signal_leaves_no_verdict(lite0_package, tmp_path, logging_gxx, signum):
    """A group's Ctrl-C or SIGTERM while a new host's first worker probes also stops the probe's
    child: that is no crash. A hostile test saw it read as one and "preload needed" kept for good,
    so that every later start on the host re-executed itself for nothing."""
    bin_dir, _ = logging_gxx
    script = f"""
import json, subprocess, sys
from worker import cxx_runtime
# a child that a stop ends (by default: under `nohup` SIGHUP would be ignored, inherited)
stopped = "import os, signal; signal.signal({int(signum)}, signal.SIG_DFL); os.kill(os.getpid(), {int(signum)})"
cxx_runtime._start_load_in_child = lambda package, preload: subprocess.Popen([sys.executable, "-c", stopped])
verdict = cxx_runtime.preload_needed(sys.argv[1])
print(json.dumps({{"verdict": verdict, "cached": cxx_runtime._verdicts()}}))
"""
    home = tmp_path / "home"
    env = python_env(
        HOME=str(home), XDG_CACHE_HOME=str(home / "cache"), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    )
    env.pop("KILN_CXX_PRELOAD", None)
    done = subprocess.run([sys.executable, "-c", script, str(lite0_package)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"verdict": None, "cached": {}}
