"""Fetching, routing and CPU decoding in worker processes: Python's per-image work (reading the
file, parsing the header, checking a JPEG for the GPU) and Pillow (`worker.preprocess.decode_image`,
with `draft` for large JPEGs) scale with cores only outside the GIL, so they run in spawned
processes, and decoded crops come back through shared memory, not pickles.

    pool = DecodePool(processes=14, prep=manifest.preprocess, max_pixels=..., slots=1024, policy=...)
    future = pool.submit(data)          # blocks while every slot is taken (backpressure)
    slot = future.result()              # or raises InputError: that image's own failure
    pixels = pool.pixels(slot)          # uint8 crop x crop x 3, a view into shared memory
    pool.release([slot])

    loads = pool.load(refs, gpu=True).result()       # fetched and routed in the processes:
    loads[i].slot / loads[i].data / loads[i].error   # decoded here, a JPEG for the GPU, or a failure
    pool.encoded(slot, loads[i].encoded_bytes)       # a JPEG for the GPU that fits its slot: its bytes

Measured on the H200 (bench/results/gpu-h200.json): with fetching and routing in the worker
process's threads, its GIL bounded kiln at 1.5k 640x480 images/s against a GPU decode ceiling of 16k.
JPEGs for the GPU come back in their slot too, where they fit (a 640x480 photo is ~60 kB, a 224
crop's slot 150 kB): reading them from the result pipe was a fifth of the worker process's time
(py-spy of the end-to-end worker, bench/results/gpu-h200-diag.json). A larger one (a camera photo,
~1 MB) comes back in a shared-memory file, one a load, which the worker maps and unlinks at once:
through the pipe, the worker's thread that reads it takes the GIL back for every 64 kB, and behind
three busy threads a load of 16 camera photos took 2.6 s to come back on the H200 (42 ms idle;
bench/results/gpu-h200-camera-handover.json); in one file, 0.16 s on the 2-core VM
(vm-camera-handover.json). End to end, camera photos went from 1.2x to 1.36x the GPU decoder's
ceiling (gpu-h200.json).
A process routes each image when it has read it, not when the load was queued: the worker
publishes how many pixels wait for its GPU (`set_gpu_backlog`), and while the GPU is busy the
processes decode the JPEGs that `draft` shrinks themselves (`worker.route.cpu_takes`). Decided at
the queueing instead, a load queued while the GPU was busy went to the CPU after the GPU had gone
idle: on 4000x3000 JPEGs kiln reached 0.75x the GPU decoder's ceiling (bench/results/gpu-h200.json).

Processes are spawned, never forked: the worker process may hold a CUDA context, and a fork
after CUDA (or after torch's thread pools started) hangs the child (docs/FACTS.md). The children
import Pillow and numpy only, no torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import multiprocessing
import os
import queue
import secrets
import signal
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np

from worker.contract import InputError
from worker.fetch import FetchPolicy
from worker.manifest import PackageError, Preprocess
from worker.probe import ImageHeader
from worker.process_signals import GROUP_SIGNALS, blocked
from worker.route import GpuBusy
from worker.supervisor import when_parent_exits

log = logging.getLogger(__name__)

ANY_BACKLOG = GpuBusy(pixels=1, images=1)  # the GPU is busy while any image waits for it

# State of a pool process: set by `_attach`, read by `_decode_into`.
_child: dict[str, object] = {}


@dataclass(frozen=True)
class Loaded:
    """What a pool process made of one reference: pixels in `slot`, or a JPEG for the GPU (with its
    `header`: the first `encoded_bytes` bytes of `slot`, or `data` where it did not fit: a uint8
    array mapping the shared-memory file it came back in, or bytes where /dev/shm had no room), or
    `error` (kind, message). Times in milliseconds. Between the process and `DecodePool` only:
    `handed_over`, that file's name, with the JPEG's `offset` and length (`encoded_bytes`) in it."""

    slot: int | None = None
    data: bytes | np.ndarray | None = None
    header: ImageHeader | None = None
    error: tuple[str, str] | None = None
    fetch_ms: float = 0.0
    decode_ms: float = 0.0
    encoded_bytes: int = 0
    handed_over: str | None = None
    offset: int = 0


SHM_FOLDER = Path("/dev/shm")  # where Linux keeps POSIX shared memory (shm_overview(7))


def _hand_over(loads: list[Loaded], prefix: str) -> list[Loaded]:
    """In a pool process: the JPEGs of `loads` that came back in `data` (too large for their slot),
    written into one shared-memory file named `prefix` + a random part, for `_take_over` in the
    worker: each of them then holds the file's name, and its offset and length there. Unchanged
    where the file could not be written (no /dev/shm, or no room left in it: a write says ENOSPC
    where a mapping's write would have been SIGBUS). One file a load: each open, write, map and
    unlink gives up the GIL, and the worker's thread that takes it over waits for it again behind
    the pipeline's. A file that no one takes over is swept by its prefix (`_sweep`)."""
    large = [i for i, loaded in enumerate(loads) if loaded.data is not None]
    if not large:
        return loads
    name = prefix + secrets.token_hex(8)
    handed = list(loads)
    offset = 0
    try:
        with open(SHM_FOLDER / name, "xb") as file:
            for i in large:
                data = loads[i].data
                file.write(data)
                handed[i] = replace(loads[i], data=None, handed_over=name, offset=offset, encoded_bytes=len(data))
                offset += len(data)
    except OSError:
        _remove(name)
        return loads
    return handed


def _take_over(loads: list[Loaded]) -> list[Loaded]:
    """In the worker: `loads` with the JPEGs a pool process handed over in a shared-memory file
    (`_hand_over`) in `data`, as uint8 arrays mapping it. The file's name is unlinked at once; its
    memory goes with the last of those arrays. Raises OSError where the file is gone, ValueError
    where it is shorter than the JPEGs it should hold."""
    names = {loaded.handed_over for loaded in loads} - {None}
    if not names:
        return loads
    (name,) = names
    try:
        with open(SHM_FOLDER / name, "r+b") as file:
            mapped = mmap.mmap(file.fileno(), 0)  # writable: torch.frombuffer warns on read-only memory
    finally:
        _remove(name)
    memory = np.frombuffer(mapped, np.uint8)
    if max(loaded.offset + loaded.encoded_bytes for loaded in loads if loaded.handed_over) > len(memory):
        raise ValueError(f"{name} was cut short")
    return [
        loaded
        if loaded.handed_over is None
        else replace(
            loaded,
            data=memory[loaded.offset : loaded.offset + loaded.encoded_bytes],
            handed_over=None,
            offset=0,
            encoded_bytes=0,
        )
        for loaded in loads
    ]


def _remove(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        (SHM_FOLDER / name).unlink()


def _sweep(prefix: str) -> None:
    """Unlink the shared-memory files whose names start with `prefix`."""
    for path in SHM_FOLDER.glob(f"{prefix}*"):
        _remove(path.name)


def _retire(processes: list[multiprocessing.Process], prefix: str) -> None:
    """After a decode process died: end the broken pool's other processes, whose work has been
    failed already (they ignore SIGTERM, and would finish their loads for no one), then sweep
    the files they handed over that no one will take over."""
    for process in processes:
        with contextlib.suppress(Exception):  # gone already
            process.kill()
    for process in processes:
        process.join(timeout=30)
    _sweep(prefix)


def _attach(
    name: str,
    shape: tuple[int, ...],
    prep: Preprocess,
    max_pixels: int,
    formats: frozenset[str],
    policy: FetchPolicy | None,
    backlog: ctypes.c_longlong,
    gpu_busy: GpuBusy,
    handover_prefix: str,
) -> None:
    # A worker killed with SIGKILL (or ended by `os._exit` after a CUDA fault) cannot stop its pool:
    # each process leaves on its own once its parent is gone, so neither it nor the shared memory
    # it holds outlives the worker, nor the JPEGs the pool handed over that no one took over.
    def leave() -> None:
        _sweep(handover_prefix)
        os._exit(0)

    when_parent_exits(leave)
    # Ctrl-C or a service manager signals the whole process group: the worker's warm shutdown
    # finishes the images these processes hold, so they must not die of it first (each image they
    # held would be recorded as failed); after Ctrl-\ (SIGQUIT, a cold shutdown) the worker gives
    # its chunks back instead. SIGUSR1 to them all (`systemctl kill -s USR1`, for the worker's
    # stacks) must not end them either. The worker closes the pool when it is done.
    # They start with these signals blocked (`DecodePool._submit`): one sent while the process
    # started ended it, and the images queued for it with it.
    for stop in GROUP_SIGNALS:
        signal.signal(stop, signal.SIG_IGN)
    memory = shared_memory.SharedMemory(name=name)
    _child.update(memory=memory, pixels=np.ndarray(shape, np.uint8, memory.buf), prep=prep)
    _child.update(max_pixels=max_pixels, formats=formats, policy=policy, backlog=backlog, gpu_busy=gpu_busy)
    _child.update(handover_prefix=handover_prefix)


def _decode_into(slot: int, data: bytes) -> tuple[str, str] | None:
    """In a pool process: decode into `slot`; an image's failure comes back as (kind, message)."""
    from worker.preprocess import decode_image

    try:
        pixels = decode_image(data, _child["prep"], _child["max_pixels"], formats=_child["formats"])
    except InputError as e:
        return e.kind, str(e)
    except Exception as e:  # a decoder bug fails this image, not the process
        return "internal", f"{type(e).__name__}: {e}"
    _child["pixels"][slot] = pixels
    return None


def _load_into(slots: list[int], refs: list[str], gpu: bool) -> list[Loaded]:
    """In a pool process: fetch each reference and read its header; hand a JPEG that nvJPEG takes
    back for the GPU (unless `worker.route.cpu_takes` it, given the GPU's backlog now), decode the
    rest into its slot."""
    from worker.fetch import fetch
    from worker.probe import read_header
    from worker.route import cpu_takes, gpu_decodable

    prep = _child["prep"]
    loads = []
    for slot, ref in zip(slots, refs, strict=True):
        started = time.perf_counter()
        try:
            data = fetch(ref, _child["policy"])
            header = read_header(data, _child["max_pixels"], _child["formats"])
        except InputError as e:
            loads.append(Loaded(error=(e.kind, str(e)), fetch_ms=(time.perf_counter() - started) * 1e3))
            continue
        except Exception as e:  # a bug fails this image, not the others of the task
            loads.append(Loaded(error=("internal", f"{type(e).__name__}: {e}")))
            continue
        fetched = time.perf_counter()
        fetch_ms = (fetched - started) * 1e3
        gpu_busy = _child["gpu_busy"](_child["backlog"].value, header)
        if gpu and not cpu_takes(header, prep.resize, gpu_busy) and gpu_decodable(data, header):
            room = _child["pixels"][slot].reshape(-1)
            if len(data) <= len(room):  # through shared memory, not the result pipe
                room[: len(data)] = np.frombuffer(data, np.uint8)
                loads.append(Loaded(header=header, fetch_ms=fetch_ms, encoded_bytes=len(data)))
            else:
                loads.append(Loaded(data=data, header=header, fetch_ms=fetch_ms))
            continue
        failure = _decode_into(slot, data)
        decode_ms = (time.perf_counter() - fetched) * 1e3
        loads.append(Loaded(slot=slot, error=failure, fetch_ms=fetch_ms, decode_ms=decode_ms))
    return _hand_over(loads, _child["handover_prefix"])


def _start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker (it unlinks the shared memory of a worker that
    died), unless it runs, with the group's signals blocked: it ignores SIGINT and SIGTERM only,
    and Ctrl-\\, a hang-up or SIGUSR1 to the group ended it ("resource_tracker: process died
    unexpectedly ... Some resources might leak", then a KeyError traceback per segment)."""
    from multiprocessing import resource_tracker

    with blocked(GROUP_SIGNALS):
        resource_tracker.ensure_running()


def _reserved_shared_memory(size: int, slots: int) -> shared_memory.SharedMemory:
    """A shared-memory block of `size` bytes whose pages are reserved now. tmpfs hands pages out as
    they are first written, so a block larger than what is left of /dev/shm was created without
    an error, and the process died of SIGBUS when a decode process first wrote past the end
    (Docker's default /dev/shm is 64 MB; a GPU worker process's slots take 75 MB).
    Raises PackageError (the worker's "does not fit this host", exit status 2) saying what to do."""
    memory = shared_memory.SharedMemory(create=True, size=size)
    try:
        descriptor = os.open(SHM_FOLDER / memory.name.lstrip("/"), os.O_RDWR)
    except FileNotFoundError:  # shared memory kept elsewhere: nothing to reserve through
        return memory
    try:
        os.posix_fallocate(descriptor, 0, size)
    except OSError as e:
        memory.close()
        memory.unlink()
        stats = os.statvfs(SHM_FOLDER)
        raise PackageError(
            f"the decode processes need {size / 2**20:.0f} MB of shared memory for their {slots} image slots, "
            f"and {SHM_FOLDER} has {stats.f_bavail * stats.f_frsize / 2**20:.0f} MB free ({e.strerror}): give the "
            "worker more (docker run --shm-size=1g, compose's shm_size, a memory-backed emptyDir on /dev/shm "
            "in Kubernetes), or fewer slots (KILN_BATCH_SIZE, KILN_DECODE_PROCESSES)"
        ) from None
    finally:
        os.close(descriptor)
    return memory


class DecodePool:
    """`processes` decoding processes writing into `slots` shared-memory crops. Thread-safe.
    With a fetch `policy`, the processes also fetch and route images (`load`): they decode large
    JPEGs themselves while `gpu_busy` says the GPU's backlog (`set_gpu_backlog`) is long enough."""

    def __init__(
        self,
        processes: int,
        prep: Preprocess,
        max_pixels: int,
        formats: frozenset[str],
        slots: int,
        policy: FetchPolicy | None = None,
        gpu_busy: GpuBusy = ANY_BACKLOG,
    ) -> None:
        self.processes = processes
        self.shape = (slots, prep.crop, prep.crop, 3)
        _start_resource_tracker()
        self._memory = _reserved_shared_memory(int(np.prod(self.shape)), slots)
        self._pixels = np.ndarray(self.shape, np.uint8, self._memory.buf)
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(slots):
            self._free.put(slot)
        self._closed = False
        self._lock = threading.Lock()
        self._retiring: list[threading.Thread] = []
        self.fetches = policy is not None
        context = multiprocessing.get_context("spawn")
        # One word the worker writes and the processes read per image; a stale read only routes
        # one image to the other decoder, so it needs no lock.
        self._backlog = context.RawValue("q", 0)
        self._init_args = (
            self._memory.name,
            self.shape,
            prep,
            max_pixels,
            formats,
            policy,
            self._backlog,
            gpu_busy,
        )
        self._executor = self._start()

    def _start(self) -> ProcessPoolExecutor:
        # Each start's processes name the files they hand over apart, so that those of a broken
        # pool can be swept while the new one hands over its own.
        self._handover_prefix = f"kiln-{os.getpid()}-{secrets.token_hex(4)}-"
        return ProcessPoolExecutor(
            self.processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_attach,
            initargs=(*self._init_args, self._handover_prefix),
        )

    def submit(self, data: bytes) -> Future[int]:
        """Decode `data` into a free slot; the future gives the slot, or raises `InputError`."""
        slot = self._free.get()
        result: Future[int] = Future()
        future = self._submit(_decode_into, slot, data)
        future.add_done_callback(lambda done: self._finish(done, slot, result))
        return result

    def _submit(self, function, *args) -> Future:
        """`function(*args)` in a pool process. The executor starts its processes when work comes
        (and after a restart), in the submitting thread: started with the group's signals blocked,
        they cannot die of one before `_attach` ignores them. A pool that broke (a process died,
        with other work in flight) is started again first, so this work does not fail with that
        work; a closed pool gives a failed future."""
        for _ in range(3):  # a pool that breaks again at once each time: give up
            executor = self._executor
            try:
                with blocked(GROUP_SIGNALS):
                    return executor.submit(function, *args)
            except RuntimeError as e:  # BrokenProcessPool; or shut down by `close`, or by a `_restart` meanwhile
                error = e
                if self._closed:
                    break
                self._restart()  # a no-op unless it is broken: a replaced one is simply not used again
        future: Future = Future()
        future.set_exception(error)
        return future

    def set_gpu_backlog(self, pixels: int) -> None:
        """Full-size pixels of the images that wait for the GPU now: the processes route by it
        (`gpu_busy`, then `worker.route.cpu_takes`)."""
        self._backlog.value = pixels

    def load(self, refs: list[str], gpu: bool) -> Future[list[Loaded]]:
        """Fetch, route and (for the CPU) decode `refs` in one process; blocks while the slots are
        taken. Each `Loaded` holds its slot (pixels, or a JPEG not yet decoded: `release` it
        either way) or, with `error` set, none. Needs a pool created with a fetch policy."""
        if not self.fetches:
            raise RuntimeError("this decode pool was created without a fetch policy")
        slots = [self._free.get() for _ in refs]
        result: Future[list[Loaded]] = Future()
        future = self._submit(_load_into, slots, refs, gpu)
        future.add_done_callback(lambda done: self._loaded(done, slots, result))
        return result

    def _loaded(self, done: Future, slots: list[int], result: Future[list[Loaded]]) -> None:
        try:
            loads = done.result()
        except BaseException as e:
            if isinstance(e, BrokenProcessPool):
                self._restart()
                why = "the decoding process died while loading this image (see the worker log)"
            else:  # cancelled by close(), or anything else: each image still gets its answer
                why = f"not loaded: {type(e).__name__}: {e}"
            loads = [Loaded(error=("internal", why)) for _ in slots]
        try:
            loads = _take_over(loads)
        except Exception as e:  # gone from /dev/shm meanwhile, or no memory to map: those images fail alone
            lost = Loaded(error=("internal", f"its bytes were lost on their way from the decoding process: {e}"))
            loads = [lost if loaded.handed_over is not None else loaded for loaded in loads]
        kept = []
        for slot, loaded in zip(slots, loads, strict=True):
            if loaded.error is None:
                kept.append(replace(loaded, slot=slot))
            else:
                self._free.put(slot)
                kept.append(Loaded(error=loaded.error, fetch_ms=loaded.fetch_ms, decode_ms=loaded.decode_ms))
        result.set_result(kept)

    def _finish(self, done: Future, slot: int, result: Future[int]) -> None:
        try:
            failure = done.result()
        except BrokenProcessPool:
            # A decoder crashed its process (or the OOM killer took it): the images in flight
            # cannot be told apart, so each fails alone, and the pool starts afresh.
            self._restart()
            failure = ("internal", "the decoding process died while decoding this image (see the worker log)")
        except BaseException as e:  # cancelled by close(), or anything else: the image still gets its answer
            failure = ("internal", f"not decoded: {type(e).__name__}: {e}")
        if failure is None:
            result.set_result(slot)
        else:
            self._free.put(slot)
            result.set_exception(InputError(*failure))

    def _restart(self) -> None:
        with self._lock:
            if self._closed or not getattr(self._executor, "_broken", False):
                return
            log.error("a decoding process died: restarting the decode pool")
            broken, prefix = self._executor, self._handover_prefix
            processes = list((broken._processes or {}).values())
            broken.shutdown(wait=False, cancel_futures=True)
            self._executor = self._start()
            retiring = threading.Thread(target=_retire, args=(processes, prefix), name="kiln-retire", daemon=True)
            self._retiring = [thread for thread in self._retiring if thread.is_alive()] + [retiring]
        retiring.start()

    def pixels(self, slot: int) -> np.ndarray:
        """The decoded `crop x crop x 3` uint8 image in `slot` (a view: copy it before release)."""
        return self._pixels[slot]

    def encoded(self, slot: int, length: int) -> np.ndarray:
        """The JPEG a process left in `slot` for the GPU: its `length` bytes, as a uint8 view
        (valid until the slot is released)."""
        return self._pixels[slot].reshape(-1)[:length]

    def gather(self, slots: list[int], out: np.ndarray) -> np.ndarray:
        """Copy the images of `slots` into `out[:len(slots)]` (N x crop x crop x 3) in one call."""
        return np.take(self._pixels, slots, axis=0, out=out[: len(slots)])

    def release(self, slots: list[int]) -> None:
        for slot in slots:
            self._free.put(slot)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        # Waits for the loads under way: the interpreter's exit would wait for them anyway, and
        # on Python 3.11 an exit while the pool's manager thread closes its wake-up pipe races it
        # (an EBADF traceback from concurrent.futures' _python_exit; CPython gh-125451, not fixed in 3.11).
        self._executor.shutdown(wait=True, cancel_futures=True)
        for thread in self._retiring:  # a daemon thread: killed mid-sweep by an exit, it leaves files
            thread.join(timeout=60)
        with contextlib.suppress(FileNotFoundError):
            self._memory.unlink()  # the name goes now; the memory once the last view is gone
