"""glibc malloc's policy in kiln's processes: decoded images' memory handed back to the kernel when
freed (`return_freed_images`, the default of every process that decodes), or the memory a CPU
model frees kept for its next batch (`keep_freed_memory`, KILN_KEEP_FREED_MEMORY), with a large
decode's buffers still handed back after it (`release_freed_memory`).

An AOTInductor package allocates its activations afresh at each call: for EfficientNet-Lite0 at
batch 64, buffers of tens to hundreds of MB. glibc's malloc serves a block above its mmap threshold
(128 kB, rising to at most 32 MB as freed blocks teach it) with a fresh mmap and unmaps it on
free, and it trims the top of the heap once 128 kB are free there: so every batch faulted its
pages in again and the kernel zeroed each one. On the 2-core VM that was 13-16 ms of system time
per image beside 16 ms of user time; with both thresholds at their top, system time falls to
nothing and user time stays (bench/diagnose/cpu_malloc.py, bench/results/cpu-malloc.json).
PyTorch's CPU performance tuning guide gives the same cause, and jemalloc or tcmalloc as its cure;
glibc's own `mallopt` does it here with nothing to install or preload.

The cost: a worker's resident memory stays at its peak between batches, as memory kept for the
next batch is meant to, and after a job too: the model's working set at the largest batch it ran,
and other freed blocks, such as an online request's bytes. So it is off unless
`KILN_KEEP_FREED_MEMORY=true` (tests/test_worker_memory.py holds the default to its memory
returning to idle after a job). bench/compare.py turns it on. A decode's own buffers are handed
back after it either way (`release_freed_memory`): kept, two camera-size decodes took a worker to
300 MB above idle, past the decode budget's bound.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# From glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
LARGEST = 2**31 - 1  # mallopt takes an int


IMAGE_BLOCK = 4 * 2**20
_kept = False  # keep_freed_memory() has run: return_freed_images() must not undo it


def return_freed_images() -> None:
    """The default: have glibc serve every allocation of `IMAGE_BLOCK` or more (Pillow allocates
    decoded images in blocks of up to 16 MB) from its own mapping, unmapped when freed. By default
    glibc raises this threshold after the first large free, and later images then come from
    per-thread heaps that keep their pages: a worker's RSS grew by the size of its largest images
    and stayed there. Nothing after `keep_freed_memory`, whichever ran first (a hostile tester's
    finding: importing `worker.preprocess` undid it), nor where the C library is not glibc."""
    libc = _glibc()
    if not _kept and not isinstance(libc, str):
        libc.mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(IMAGE_BLOCK))


def keep_freed_memory() -> str | None:
    """Set glibc malloc's mmap and trim thresholds to their largest, for this process's allocations
    from now on. Returns None once done, else why not (not glibc, such as musl; or refused)."""
    global _kept
    libc = _glibc()
    if isinstance(libc, str):
        return libc
    for option, label in ((M_MMAP_THRESHOLD, "M_MMAP_THRESHOLD"), (M_TRIM_THRESHOLD, "M_TRIM_THRESHOLD")):
        if libc.mallopt(ctypes.c_int(option), ctypes.c_int(LARGEST)) != 1:
            return f"glibc refused mallopt({label}, {LARGEST})"
    _kept = True
    return None


def release_freed_memory() -> None:
    """After `keep_freed_memory`, hand every page malloc holds free, in every arena, back to the
    kernel (glibc's `malloc_trim(0)`); else nothing, as glibc then unmaps large blocks itself.
    Called after a decode of more than `LARGE_BLOCK` bytes, and after a failed one: kept, an
    image's buffers would stay in the worker for good."""
    libc = _glibc()
    if _kept and not isinstance(libc, str):
        libc.malloc_trim(ctypes.c_size_t(0))


LARGE_BLOCK = 32 * 2**20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit hosts


@functools.cache
def _glibc() -> ctypes.CDLL | str:
    """glibc, or why it is not this process's C library."""
    name = ctypes.util.find_library("c")
    if name is None:
        return "no C library found"
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "gnu_get_libc_version"):
        return f"{name} is not glibc, whose mallopt this sets"
    return libc
