"""A per-process folder for what `aoti_load_package` unpacks (~50 MB a load).

AOTInductor unpacks each package under `$TMPDIR/aotinductor_*` and never removes it, so a
fleet of workers that get killed and restarted fills the disk. kiln points the unpacking at
`$TMPDIR/kiln-aoti/<pid>-<start time>/`, removes that folder when the process exits, and on every
load sweeps the folders of processes that no longer run (killed with SIGKILL, or worker processes
that leave through `os._exit`, where no exit handler runs).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

_own_dir: Path | None = None


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot: with the pid, it names one process,
    even after the pid is reused. None where the process does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _is_alive(name: str) -> bool:
    pid_text, _, start = name.partition("-")
    return pid_text.isdigit() and _start_time(int(pid_text)) == start


def scratch_root() -> Path:
    return Path(tempfile.gettempdir()) / "kiln-aoti"


def sweep_stale(root: Path | None = None) -> list[Path]:
    """Remove the scratch folders of processes that are gone; return what was removed."""
    root = root or scratch_root()
    removed = []
    for entry in root.glob("*") if root.is_dir() else ():
        if not _is_alive(entry.name):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    if removed:
        log.info("removed %d stale AOTInductor folder(s) of dead processes under %s", len(removed), root)
    return removed


def process_scratch_dir() -> Path:
    """This process's scratch folder, created (and its exit clean-up registered) on first use."""
    global _own_dir
    if _own_dir is None or not _own_dir.name.startswith(f"{os.getpid()}-") or not _own_dir.is_dir():
        root = scratch_root()
        sweep_stale(root)
        _own_dir = root / f"{os.getpid()}-{_start_time(os.getpid())}"
        _own_dir.mkdir(parents=True, exist_ok=True)
        atexit.register(remove_process_scratch_dir)
    return _own_dir


def remove_process_scratch_dir() -> None:
    if _own_dir is not None:
        shutil.rmtree(_own_dir, ignore_errors=True)


@contextlib.contextmanager
def unpacking_into_scratch() -> Iterator[Path]:
    """Point TMPDIR (read by AOTInductor's C++ loader) at this process's scratch folder."""
    folder = process_scratch_dir()
    previous = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(folder)
    try:
        yield folder
    finally:
        if previous is None:
            del os.environ["TMPDIR"]
        else:
            os.environ["TMPDIR"] = previous
