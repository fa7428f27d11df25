"""CPU decoding in worker processes: Pillow (`worker.preprocess.decode_image`, with `draft` for
large JPEGs) scales with cores only outside the GIL, so the images go to spawned processes and the
decoded crops come back through shared memory, not pickles.

    pool = DecodePool(processes=14, prep=manifest.preprocess, max_pixels=..., slots=1024)
    future = pool.submit(data)          # blocks while every slot is taken (backpressure)
    slot = future.result()              # or raises InputError: that image's own failure
    pixels = pool.pixels(slot)          # uint8 crop x crop x 3, a view into shared memory
    pool.release([slot])

Processes are spawned, never forked: the worker process may hold a CUDA context, and a fork
after CUDA (or after torch's thread pools started) hangs the child (FACTS.md). The children
import Pillow and numpy only, no torch.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import shared_memory

import numpy as np

from worker.contract import InputError
from worker.manifest import Preprocess

log = logging.getLogger(__name__)

# State of a pool process: set by `_attach`, read by `_decode_into`.
_child: dict[str, object] = {}


def _attach(name: str, shape: tuple[int, ...], prep: Preprocess, max_pixels: int, formats: frozenset[str]) -> None:
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    memory = shared_memory.SharedMemory(name=name)
    _child.update(memory=memory, pixels=np.ndarray(shape, np.uint8, memory.buf), prep=prep)
    _child.update(max_pixels=max_pixels, formats=formats)


def _exit_with_parent(parent: int) -> None:
    """A worker killed with SIGKILL (or ended by `os._exit` after a CUDA fault) cannot stop its pool:
    each process leaves on its own once its parent is gone, so neither it nor the shared memory
    it holds outlives the worker."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


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


class DecodePool:
    """`processes` decoding processes writing into `slots` shared-memory crops. Thread-safe."""

    def __init__(self, processes: int, prep: Preprocess, max_pixels: int, formats: frozenset[str], slots: int) -> None:
        self.processes = processes
        self.shape = (slots, prep.crop, prep.crop, 3)
        self._memory = shared_memory.SharedMemory(create=True, size=int(np.prod(self.shape)))
        self._pixels = np.ndarray(self.shape, np.uint8, self._memory.buf)
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(slots):
            self._free.put(slot)
        self._in_flight = 0
        self._closed = False
        self._lock = threading.Lock()
        self._init_args = (self._memory.name, self.shape, prep, max_pixels, formats)
        self._executor = self._start()

    def _start(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            self.processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_attach,
            initargs=self._init_args,
        )

    @property
    def idle(self) -> bool:
        """Whether a process is waiting for work (the router's cue to send it more)."""
        return self._in_flight < self.processes

    def submit(self, data: bytes) -> Future[int]:
        """Decode `data` into a free slot; the future gives the slot, or raises `InputError`."""
        slot = self._free.get()
        result: Future[int] = Future()
        with self._lock:
            self._in_flight += 1
        try:
            future = self._executor.submit(_decode_into, slot, data)
        except BrokenProcessPool:
            future = Future()
            future.set_exception(BrokenProcessPool("decode pool is being restarted"))
        future.add_done_callback(lambda done: self._finish(done, slot, result))
        return result

    def _finish(self, done: Future, slot: int, result: Future[int]) -> None:
        with self._lock:
            self._in_flight -= 1
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
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = self._start()

    def pixels(self, slot: int) -> np.ndarray:
        """The decoded `crop x crop x 3` uint8 image in `slot` (a view: copy it before release)."""
        return self._pixels[slot]

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
        self._executor.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(FileNotFoundError):
            self._memory.unlink()  # the name goes now; the memory once the last view is gone
