"""How a worker process's threads wait for its GPU (KILN_GPU_WAIT): spinning on a core (CUDA's
default while a host has more cores than CUDA contexts), or blocked in the kernel.

nvImageCodec's hardware decoder waits for its engine inside each batch call, so a spinning GPU
decode thread keeps a core busy for as long as the engine works: on the H200, four processes
decoding 4000x3000 JPEGs at once used 3.9 ms of CPU an image each, one alone 1.05 ms, at the same
1,045 img/s in all (bench/results/gpu-h200-camera-cpu.json). End to end, blocking did not turn
those cores into throughput, and spinning was quicker on small images: in one run of
bench/gpu.py (bench/results/gpu-h200-camera-fix.json), 640x480 JPEGs 12,707 img/s spinning and
11,694 blocking, 4000x3000 1,260 and 1,253, a mixed folder 2,623 and 2,756. So spinning is the
default, and `block` is there for hosts whose cores are short (many CPU-only formats).

The flag is the primary context's (CUDA driver API, `cuDevicePrimaryCtxSetFlags`), set for every
GPU before torch creates a context, through ctypes: torch has no call for it, and libcuda.so.1 is
on every host with an NVIDIA driver.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

CU_CTX_SCHED_BLOCKING_SYNC = 0x04  # cuda.h: block on a synchronization primitive while waiting


def block_while_waiting() -> str | None:
    """Make every GPU's primary context block the threads that wait for it; call before the
    process first uses CUDA. Returns None where it did, or where there is no NVIDIA driver (a CPU
    host: nothing waits for a GPU); else why not, with the driver's error code (the process then
    waits the CUDA default way)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    if (error := cuda.cuInit(0)) != 0:
        return f"cuInit failed with CUDA error {error}"
    count = ctypes.c_int()
    if (error := cuda.cuDeviceGetCount(ctypes.byref(count))) != 0:
        return f"cuDeviceGetCount failed with CUDA error {error}"
    set_flags = getattr(cuda, "cuDevicePrimaryCtxSetFlags_v2", None)
    if set_flags is None:  # drivers before CUDA 11, older than any torch supports
        return "this NVIDIA driver has no cuDevicePrimaryCtxSetFlags_v2"
    for ordinal in range(count.value):
        device = ctypes.c_int()
        error = cuda.cuDeviceGet(ctypes.byref(device), ordinal)
        if error == 0:
            error = set_flags(device, CU_CTX_SCHED_BLOCKING_SYNC)
        if error != 0:
            return f"setting GPU {ordinal}'s context flags failed with CUDA error {error}"
    return None
