"""Make AOTInductor packages loadable where the C++ runtime would crash them.

On some hosts every `aoti_load_package` ends in SIGSEGV: the compiled wrapper binds C++ runtime
symbols (std::regex, used while parsing the device string) to copies that torch's own libraries
export, built by another compiler. Preloading the system libstdc++ puts the real one first and
the load works (measured on the H200 machine with torch 2.11; see docs/FACTS.md). `LD_PRELOAD` only
takes effect when a process starts, so kiln's entry points re-execute themselves once with it.

Whether a host needs it is measured, not guessed: a child process loads the package with and
without the preload, and the verdict is cached per host configuration (python, torch, compiler,
libstdc++), so only the first start on a host pays for the probe.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from worker.process_signals import before_exec

log = logging.getLogger(__name__)

PRELOAD_ENV = "LD_PRELOAD"
# What ends a probe child that did not crash: a stop sent to the process group, or to it.
_NOT_A_CRASH = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGKILL})
# The probe loads through kiln's own runtime, that is AOTInductor's C++ loader: the Python wrapper
# `torch._inductor.aoti_load_package` imports Inductor, which compiles CPU-feature probes with g++
# whenever its cache is empty (every new container): 11-18 s instead of 2.5 s. The child must not
# probe in turn, hence KILN_CXX_PRELOAD=off there.
_PROBE = "import sys; from worker.runtime import load_runtime; load_runtime(sys.argv[1], warmup=False)"
_KILN_ROOT = str(Path(__file__).resolve().parent.parent)  # where the child imports kiln from


class CxxRuntimeError(RuntimeError):
    """This host cannot load AOTInductor packages, with or without the workaround."""


class PreloadRequired(CxxRuntimeError):
    """This process must be restarted with the C++ runtime preloaded before it loads packages."""


@functools.cache  # a compiler run; asked at every entry point and every load
def system_libstdcxx() -> str | None:
    """The libstdc++ that this process's C++ compiler links against (realpath), if any."""
    cxx = os.environ.get("CXX", "g++")
    try:
        out = subprocess.run([cxx, "-print-file-name=libstdc++.so.6"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    path = Path(out.stdout.strip())
    return str(path.resolve()) if path.is_absolute() and path.exists() else None


def _cache_file() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "kiln" / "cxx-runtime.json"


def _host_key(library: str | None) -> str:
    # torch's version from its metadata: importing torch to ask would cost every start ~1.5 s.
    parts = [sys.executable, importlib.metadata.version("torch"), os.environ.get("CXX", "g++"), str(library)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _start_load_in_child(package: Path, preload: str | None) -> subprocess.Popen:
    env = dict(os.environ, KILN_CXX_PRELOAD="off")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_KILN_ROOT, env.get("PYTHONPATH")]))
    if preload:
        env[PRELOAD_ENV] = preload
    else:
        env.pop(PRELOAD_ENV, None)
    return subprocess.Popen(
        [sys.executable, "-c", _PROBE, str(package)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def _load_in_child(package: Path, preload: str | None) -> int:
    return _start_load_in_child(package, preload).wait()


def _verdicts() -> dict[str, str | None]:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _relevant_library() -> str | None:
    """The library that a preload would use, or None where the question does not arise."""
    if not sys.platform.startswith("linux") or os.environ.get("KILN_CXX_PRELOAD") == "off":
        return None
    return system_libstdcxx()


def verdict_known() -> bool:
    """Whether `preload_needed` can answer without a package to probe with."""
    library = _relevant_library()
    return library is None or _host_key(library) in _verdicts()


def preload_needed(package: str | Path | None) -> str | None:
    """The library to preload for AOTInductor packages to load on this host, or None.

    Linux only. Measured once per host configuration by loading `package` in child processes,
    then cached; with no package, only the cached verdict counts."""
    library = _relevant_library()
    if library is None:
        return None
    key, verdicts = _host_key(library), _verdicts()
    if key not in verdicts:
        if package is None:
            return None
        child = _start_load_in_child(Path(package), None)
        try:
            # The caller loads the package next, so it needs torch: importing it while the child loads
            # overlaps the two, and a new host's first start costs little more than any other start.
            import torch  # noqa: F401

            plain = child.wait()
        except BaseException:  # told to stop meanwhile: not without the child
            child.kill()
            raise
        # An ordinary Python error (a wrong package), which the caller will see, or a child stopped
        # by a signal (a group's Ctrl-C or SIGTERM while it loaded; it was read as a crash, and a
        # wrong verdict was kept for good): no verdict.
        if plain > 0 or -plain in _NOT_A_CRASH:
            return None
        if plain == 0:
            verdicts[key] = None
        elif (preloaded := _load_in_child(Path(package), library)) == 0:
            log.warning(
                "AOTInductor loads crash on this host (%s) unless %s is preloaded: kiln will preload it",
                signal.Signals(-plain).name,
                library,
            )
            verdicts[key] = library
        elif -preloaded in _NOT_A_CRASH:
            return None
        else:
            raise CxxRuntimeError(
                f"loading {package} crashes this process ({signal.Signals(-plain).name}), "
                f"also with {library} preloaded; check that the package was built with this host's torch"
            )
        cache = _cache_file()
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(verdicts))
    return verdicts[key]


def is_preloaded(library: str) -> bool:
    return library in os.environ.get(PRELOAD_ENV, "").split(":")


def environ_with_preload(library: str) -> dict[str, str]:
    """This process's environment, with `library` first in the preload list."""
    env = dict(os.environ)
    env[PRELOAD_ENV] = ":".join(filter(None, [library, env.get(PRELOAD_ENV)]))
    return env


def ensure_cxx_runtime(package: str | Path | None = None) -> None:
    """Call from an entry point before loading `package` (or with none, to act on a verdict
    already cached): if this host needs the preload and the process lacks it, re-execute the
    process (same interpreter, same arguments) with it set."""
    library = preload_needed(package)
    if library is None or is_preloaded(library):
        return
    log.warning("re-executing with %s=%s so that AOTInductor packages load", PRELOAD_ENV, library)
    sys.stdout.flush()
    sys.stderr.flush()
    before_exec()
    os.execve(sys.executable, sys.orig_argv, environ_with_preload(library))


def check_cxx_runtime(package: str | Path) -> None:
    """Refuse, with what to do, to load a package that would crash this process."""
    library = preload_needed(package)
    if library is not None and not is_preloaded(library):
        raise PreloadRequired(
            f"AOTInductor packages crash on this host unless {library} is preloaded, and this process "
            "started without it: call worker.cxx_runtime.ensure_cxx_runtime(package) first thing in "
            "your program, or start it through `python -m worker` / `python -m compile`"
        )
