"""Open a file beneath a folder in one system call, with no way out of it: Linux's `openat2` with
`RESOLVE_BENEATH` (Linux 5.6+). The kernel resolves the path and its links, and refuses any that
would leave the folder (`..` above it, an absolute link), atomically, so no rename race can lead
outside. Python has no binding for it, so it is called through ctypes (which releases the GIL).

This is the fast path of `worker.fetch`: one call instead of `realpath` (Python code and an
`lstat` per component) and a descriptor walk, which cost a CPU worker's fetch threads about a fifth
of their time (py-spy). Anything it does not open, for whatever reason, takes the checked slow
path, which gives the error its record states.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import threading

# openat2's number is the same on x86-64 and arm64 (the unified syscall table since Linux 5.1).
_SYS_OPENAT2 = 437 if platform.machine() in ("x86_64", "aarch64") else None
_RESOLVE_NO_MAGICLINKS = 0x02  # no /proc/self/fd tricks
_RESOLVE_BENEATH = 0x08


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True) if _SYS_OPENAT2 is not None else None
_roots: dict[str, int] = {}  # root folder -> an O_PATH descriptor of it, per process
_lock = threading.Lock()
_available = _libc is not None


def open_beneath(root: str, relative: str) -> int | None:
    """A read-only descriptor of `root/relative`, opened without blocking (a FIFO) and without
    leaving `root`; None when this fast path cannot open it (no openat2, a link out of `root`, no
    such file, ...): the caller then opens it the checked way, which says why."""
    global _available
    if not _available or "\0" in relative:
        return None
    fd = _root_fd(root)
    if fd is None:
        return None
    how = _OpenHow(os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC, 0, _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)
    opened = _libc.syscall(_SYS_OPENAT2, fd, os.fsencode(relative), ctypes.byref(how), ctypes.sizeof(how))
    if opened >= 0:
        return opened
    if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):  # an old kernel, or a seccomp filter
        _available = False
    return None


def _root_fd(root: str) -> int | None:
    with _lock:
        fd = _roots.get(root)
        if fd is None:
            with contextlib.suppress(OSError):
                fd = _roots[root] = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        return fd
