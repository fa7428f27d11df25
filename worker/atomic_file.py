"""Files that appear whole: written under a temporary name beside their target, then renamed over
it (atomic within one file system), so that a reader never sees half a file and a failed write
leaves none behind. Result files (producer/export.py), shards (worker/sink.py) and packages
(compile/package.py) are written this way.

    with replacing(Path("out/results.csv")) as tmp:
        tmp.write_text(...)          # `out/results.csv` is replaced only if this block succeeds
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replacing(
    path: str | os.PathLike[str], keep: bool = True, durable: bool = False, suffix: str = ".tmp"
) -> Iterator[Path]:
    """A new empty file beside `path`, for the block to write, that replaces `path` when the
    block ends without an exception (and `keep`); removed in every other case. Its name is
    hidden and ends in `suffix`: never `.parquet` beside shards, which readers glob, but `.pt2`
    for AOTInductor, which wants it. `durable`: the file and its rename are flushed to
    disk (fsync of the file and of its folder) before this returns, so they survive a crash of
    the host. The folder must exist.

    The file is made with `os.open(..., 0o666)`, so it gets the umask's permissions as any file
    the user makes; `tempfile.mkstemp` would make it 0600, which left a package or a shard written
    by one user unreadable to a worker running as another, or to a container's other user.
    Raises OSError naming `path` (not the temporary name) where the file cannot be made."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}{suffix}"
    try:  # made inside it: a Ctrl-C just after the file appeared had left it behind
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except OSError as e:
            raise OSError(f"cannot write {path}: {e.strerror}") from e
        yield tmp
        if keep:
            if durable:
                _fsync(tmp)
            os.replace(tmp, path)
            if durable:
                _fsync(path.parent)  # the rename itself
    finally:
        tmp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
