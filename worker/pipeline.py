"""The classification pipeline inside one worker process, with no broker in sight:

    fetch -> route -> decode -> batch -> predict -> unbatch -> encode (records)
                      ├─ GPU: JPEGs in batches (nvJPEG) + batched resize/crop
                      ├─ CPU processes: other formats, CMYK, and large JPEGs while the GPU is busy
                      └─ fetch threads: where there are neither

With decode processes, they also fetch and route (worker/decode_pool.py), so that the worker
process's GIL spends its time on batches, not on files; without them, fetch threads do.

Each stage has its own workers and a bounded queue in front, so fetching, both decoders, the
model and the callers' result writes all run at once. Many callers (Celery task threads) may
`run` at the same time: their images share model batches, so a chunk boundary never drains the
GPU. Every image ends as exactly one record: top-k labels, or the error that stopped it.

Online requests (works with a `reply_to`) go first: they are loaded on threads of their own, never
behind a bulk job's fetches or decode processes, and they leave the decoders' queues before bulk
images. Queued behind a bulk job's slow fetches, one online image had waited past its caller's
30 s timeout.
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import logging
import os
import queue
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
import torch

from worker.budget import MemoryBudget
from worker.contract import InputError, Label, Record
from worker.decode_pool import DecodePool, Loaded
from worker.fetch import FetchPolicy, fetch
from worker.gpu_decode import JpegBatchDecoder, is_fatal_cuda_error
from worker.lease import process_id
from worker.preprocess import decode_image
from worker.probe import DEFAULT_MAX_PIXELS, ImageHeader, read_header
from worker.route import GPU_BUSY_PIXELS, GpuBusy, cpu_takes, gpu_decodable
from worker.runtime import ModelRuntime
from worker.settings import DEFAULT_FORMATS

log = logging.getLogger(__name__)

# How long a stage waits for more images before it runs a batch that is not full: long enough to
# gather what is already on its way, short enough to be invisible to an online request.
LINGER_S = 0.003
# A package's smallest batch is 2 (torch.export specialises a dimension of 1), so the runtime pads
# a single image to two and pays for both. While more of the callers' images are on their way,
# the model waits up to this long for a second one: on the 2-core VM, 240 640x480 JPEGs through
# Lite0 ran 32 of their 121 batches as padded singles.
FILL_S = 0.05
SWITCH_INTERVAL_S = 0.0005
# Online images loaded at once per worker process: a reference that is slow to fetch holds one
# thread (until KILN_FETCH_TIMEOUT_S at most), not the other callers' answers.
ONLINE_THREADS = 16


@dataclass(frozen=True)
class Work:
    """One image to classify: where its record goes, and where its bytes come from."""

    job: str
    key: str
    ref: str | None = None
    data_b64: str | None = None
    reply_to: str | None = None  # online requests: the caller's reply list


@dataclass(frozen=True)
class PipelineConfig:
    policy: FetchPolicy = field(default_factory=FetchPolicy)
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_inline_bytes: int = 8 * 1024 * 1024
    formats: frozenset[str] = DEFAULT_FORMATS
    decode_memory_bytes: int = 256 * 2**20  # decoded pixels held at once by all decode threads
    fetch_threads: int = 2  # fetching, and decoding where no other decoder takes the image
    decode_processes: int = 0  # CPU decoding processes; 0 decodes in the fetch threads
    gpu_decode: bool = False  # decode JPEGs on the model's GPU (needs a CUDA package)
    gpu_decoder: str = "torchvision"  # the library that does: worker.jpeg_codecs.LIBRARIES
    batch_size: int | None = None  # default: the package's largest batch


class PipelineClosed(RuntimeError):
    """`close()` was called while a caller still had images in flight: they have no record."""


class _Request:
    """One `run` call: its top-k and where its records go back to."""

    def __init__(self, topk: int) -> None:
        self.topk = topk
        self.out: queue.SimpleQueue[list[tuple[Work, Record]]] = queue.SimpleQueue()


@dataclass
class StageStats:
    batches: int = 0
    images: int = 0
    busy_s: float = 0.0

    def add(self, images: int, seconds: float) -> None:
        self.batches += 1
        self.images += images
        self.busy_s += seconds


@dataclass
class _Image:
    """One image on its way through the stages."""

    work: Work
    request: _Request
    timings_ms: dict[str, float] = field(default_factory=dict)
    data: bytes | np.ndarray | None = None  # encoded; an ndarray is a view of a decode pool slot
    header: ImageHeader | None = None
    pixels: np.ndarray | None = None  # decoded in a fetch thread: crop x crop x 3
    slot: int | None = None  # the decode pool's slot it holds: its pixels, or a place while it waits for the GPU


@dataclass
class _Rows:
    """Images decoded on the GPU: row i of `tensor` (N x 3 x crop x crop, on the device) is
    images[i]; `ready` is recorded on the decoding stream once the rows are written."""

    images: list[_Image]
    tensor: torch.Tensor
    ready: torch.cuda.Event | None = None

    def split(self, count: int) -> tuple[_Rows, _Rows]:
        head = _Rows(self.images[:count], self.tensor[:count], self.ready)
        return head, _Rows(self.images[count:], self.tensor[count:], self.ready)


class Pipeline:
    """Classifies `Work` items with one loaded model; one per process, thread-safe `run`."""

    def __init__(self, runtime: ModelRuntime, config: PipelineConfig) -> None:
        self.runtime = runtime
        self.config = config
        self.prep = runtime.manifest.preprocess
        self.batch_size = min(config.batch_size or runtime.batch_max, runtime.batch_max)
        # Half a batch at most: the pool's slots (two batches) hold the batch the GPU is decoding
        # too, so with camera photos a whole batch never waited, and no image took the CPU path
        # (bench/results/gpu-h200-camera.json: every decode time was the GPU's ~4 ms).
        self._gpu_busy = GpuBusy(GPU_BUSY_PIXELS, max(1, self.batch_size // 2))
        self._backlog_pixels = 0  # full-size pixels of the images in `_gpu_queue`
        # Taken here, in the process that serves: its id names the records it writes.
        self.worker_id = process_id()
        self._fetchers = ThreadPoolExecutor(config.fetch_threads, thread_name_prefix="kiln-fetch")
        self._decode_budget = MemoryBudget(config.decode_memory_bytes)
        self._pool = (
            DecodePool(
                config.decode_processes,
                self.prep,
                config.max_pixels,
                config.formats,
                slots=2 * self.batch_size + 4 * config.decode_processes,
                policy=config.policy,
                gpu_busy=self._gpu_busy,
            )
            if config.decode_processes
            else None
        )
        self._gpu = JpegBatchDecoder(runtime.device, self.prep, config.gpu_decoder) if config.gpu_decode else None
        cuda = runtime.device.type == "cuda"
        self._decode_stream = torch.cuda.Stream(runtime.device) if self._gpu is not None and cuda else None
        # Online requests' threads, an image each: never queued behind a bulk job's loads, nor
        # behind another online image that is slow to fetch (made only as many as are needed).
        self._online = ThreadPoolExecutor(ONLINE_THREADS, thread_name_prefix="kiln-online")
        # Unbounded: what waits for the GPU holds a pool slot, or is one of the callers' windows.
        self._gpu_queue: queue.Queue[_Image] = _OnlineFirst()
        self._ready: queue.Queue[_Image | _Rows] = _OnlineFirst()
        crop = self.prep.crop
        pin = runtime.device.type == "cuda"
        self._staging = torch.empty((self.batch_size, crop, crop, 3), dtype=torch.uint8, pin_memory=pin)
        self._stop = threading.Event()
        # Stages hand the GIL to each other thousands of times a second; with Python's default
        # 5 ms switch interval, a thread back from a CUDA call waits behind the fetch threads.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.decoded_by: Counter[str] = Counter()  # images per decoder: "gpu", "processes", "threads"
        # Per stage: batches, images and busy seconds (each stage updates its own, from one thread).
        self.stages = {name: StageStats() for name in ("gpu_decode", "infer")}
        self._count_lock = threading.Lock()
        self._in_flight = 0  # the callers' images without a record yet
        # Tests only: `KILN_TEST_CUDA_FAULT=STAGE:N`, a device-side assert in batch N + 1 of STAGE.
        stage, _, after = os.environ.get("KILN_TEST_CUDA_FAULT", "").partition(":")
        self._faults = {stage: int(after)} if after else {}
        self._threads = [threading.Thread(target=self._serve, args=(self._infer_loop,), name="kiln-infer", daemon=True)]
        if self._gpu is not None:
            self._threads.append(
                threading.Thread(target=self._serve, args=(self._gpu_loop,), name="kiln-gpu-decode", daemon=True)
            )
        for thread in self._threads:
            thread.start()

    def warm_up(self) -> bool:
        """Decode `batch_size` copies of a generated 640x480 JPEG on the GPU and run the model on
        them, once, before the first task; returns whether it did (False where JPEGs are not
        decoded on the GPU, or where it failed). A process's first full batches otherwise pay for
        CUDA's lazy kernel loading, nvJPEG's buffers and the caching allocator's growth: on the
        H200, a job of 65,536 images ran its first 2 s at 2-5k img/s and then 13-15k, with
        processes that had not run a full batch before (bench/results/gpu-h200-host-budget.json).
        Each stage runs on its own stream, as in `_decode_on_gpu` and `_infer_loop` (the
        allocator caches blocks per stream). It calls the GPU stages directly, so the worker's
        input limits and formats do not apply. Any failure but a fatal CUDA error is logged and
        the process starts cold: the first real batches then decide."""
        if self._gpu is None:
            return False
        import io

        from PIL import Image

        device = self.runtime.device
        try:
            noise = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(noise).save(buffer, "JPEG", quality=90)
            data = buffer.getvalue()
            # On the model's GPU, as the stage threads are (`_serve`), not this thread's current one.
            stream = self._decode_stream
            with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    result = self._gpu.decode([(data, read_header(data, DEFAULT_MAX_PIXELS))] * self.batch_size)
                if stream is not None:
                    torch.cuda.current_stream().wait_stream(stream)
                if result.refused:
                    raise RuntimeError(f"nvJPEG refused {len(result.refused)} of {self.batch_size} generated JPEGs")
                self.runtime.predict_top_k(result.images, 1)
        except Exception as e:
            if is_fatal_cuda_error(e):
                raise
            log.warning("warming up the GPU path failed, so the first batches run cold: %s: %s", type(e).__name__, e)
            return False  # nothing was warmed up: the caller must not say it was
        return True

    def close(self) -> None:
        self._stop.set()
        self._fetchers.shutdown(wait=False, cancel_futures=True)
        self._online.shutdown(wait=False, cancel_futures=True)
        if self._pool is not None:
            self._pool.close()

    # -- the callers' side ----------------------------------------------------------------------

    def run(self, works: Iterable[Work], topk: int) -> Iterator[list[tuple[Work, Record]]]:
        """Yield (work, record) pairs as images finish, a batch or more at a time, until every
        work has its record. At most two batches of this caller's images are in flight."""
        request = _Request(topk)
        source = iter(works)
        window = 2 * self.batch_size
        group = max(1, self.batch_size // (4 * self.config.fetch_threads))
        submitted = finished = 0

        def feed() -> None:
            nonlocal submitted
            while submitted - finished < window:
                if self._stop.is_set():
                    raise PipelineClosed("the pipeline was closed")
                images = [_Image(w, request) for w in islice(source, group)]
                if not images:
                    return
                self._add_in_flight(len(images))
                if images[0].work.reply_to is not None:
                    for image in images:
                        self._online.submit(self._load_online, image)
                else:
                    self._fetchers.submit(self._load_all, images)
                submitted += len(images)

        feed()
        while finished < submitted:
            pairs = self._next(request)
            with_more = [pairs]
            while True:  # whatever else is done already goes in the same write
                try:
                    with_more.append(request.out.get_nowait())
                except queue.Empty:
                    break
            pairs = [pair for part in with_more for pair in part]
            finished += len(pairs)
            feed()
            yield pairs

    def _add_in_flight(self, images: int) -> None:
        with self._count_lock:
            self._in_flight += images

    def _next(self, request: _Request) -> list[tuple[Work, Record]]:
        """The caller's next records; `PipelineClosed` once the pipeline stops with images in flight."""
        while True:
            try:
                return request.out.get(timeout=0.5)
            except queue.Empty:
                if self._stop.is_set():
                    raise PipelineClosed("the pipeline was closed with images in flight") from None

    # -- fetch and route (fetch threads) --------------------------------------------------------

    def _load_all(self, images: list[_Image]) -> None:
        pool = self._pool
        by_reference = [image for image in images if image.work.data_b64 is None] if pool is not None else []
        for image in images:
            if image.work.data_b64 is not None or pool is None:
                self._guarded(image, self._load, image)
        if by_reference:
            refs = [image.work.ref or "" for image in by_reference]
            future = pool.load(refs, self._gpu is not None)
            future.add_done_callback(lambda done: self._route_loaded(by_reference, done))

    def _route_loaded(self, images: list[_Image], done: Future[list[Loaded]]) -> None:
        """Images the decode pool fetched (on the pool's result thread): to the GPU, or decoded."""
        for image, loaded in zip(images, done.result(), strict=True):
            try:
                image.timings_ms["fetch"] = loaded.fetch_ms
                if loaded.error is not None:
                    self._fail(image, InputError(*loaded.error))
                    continue
                image.slot = loaded.slot
                if loaded.header is not None:  # a JPEG for the GPU, in its slot or (larger) in `data`
                    data = loaded.data
                    image.data = data if data is not None else self._pool.encoded(loaded.slot, loaded.encoded_bytes)
                    image.header = loaded.header
                    self._queue_for_gpu(image)
                else:
                    image.timings_ms["decode"] = loaded.decode_ms
                    self._count("processes")
                    self._ready.put(image)
            except Exception as e:  # a bug must fail one image, not the others
                log.exception("routing image %s failed", image.work.key)
                self._fail(image, InputError("internal", f"{type(e).__name__}: {e}"))

    def _guarded(self, image: _Image, step, *args) -> None:
        """Run one image's step; whatever it raises becomes that image's record, never a lost image."""
        try:
            step(*args)
        except InputError as e:
            self._fail(image, e)
        except Exception as e:  # a bug must fail one image, not the caller
            log.exception("image %s failed in %s", image.work.key, getattr(step, "__name__", step))
            self._fail(image, InputError("internal", f"{type(e).__name__}: {e}"))

    def _load_online(self, image: _Image) -> None:
        """An online request's image, on a thread of its own: fetched and decoded here (or queued
        for the GPU), never queued behind a bulk job's work in the decode processes."""
        self._guarded(image, self._load, image, True)

    def _load(self, image: _Image, here: bool = False) -> None:
        """Fetch and route one image; one for the CPU is decoded in this thread where `here`, else
        in the decode processes where there are some."""
        started = time.perf_counter()
        data = self._bytes(image.work)
        header = read_header(data, self.config.max_pixels, self.config.formats)
        image.timings_ms["fetch"] = (time.perf_counter() - started) * 1e3
        if self._gpu is not None and gpu_decodable(data, header) and not self._cpu_takes(header):
            image.data, image.header = data, header
            self._queue_for_gpu(image)
        else:
            self._decode_on_cpu(image, data, here)

    def _cpu_takes(self, header: ImageHeader) -> bool:
        """`worker.route.cpu_takes`, where there are CPU decode processes to take it."""
        if self._pool is None:
            return False
        return cpu_takes(header, self.prep.resize, self._gpu_busy(self._backlog_pixels, header))

    def _queue_for_gpu(self, image: _Image) -> None:
        self._add_backlog(_pixels(image))
        self._gpu_queue.put(image)

    def _add_backlog(self, pixels: int) -> None:
        """Count pixels into (or out of) what waits for the GPU, and tell the decode processes:
        they route each image by it."""
        with self._count_lock:
            self._backlog_pixels += pixels
            if self._pool is not None:
                self._pool.set_gpu_backlog(self._backlog_pixels)

    def _decode_on_cpu(self, image: _Image, data: bytes, here: bool = False) -> None:
        """Decode in the pool when there is one (the result comes back on its own thread), unless
        `here`; else in this thread."""
        started = time.perf_counter()
        if self._pool is None or here:
            image.pixels = decode_image(
                data, self.prep, self.config.max_pixels, formats=self.config.formats, budget=self._decode_budget
            )
            image.timings_ms["decode"] = (time.perf_counter() - started) * 1e3
            self._count("threads")
            self._ready.put(image)
            return

        def decoded(future: Future[int]) -> None:
            image.timings_ms["decode"] = (time.perf_counter() - started) * 1e3
            try:
                image.slot = future.result()
            except InputError as e:
                self._fail(image, e)
                return
            except Exception as e:  # the pool shutting down, or a bug: this image's record says so
                self._fail(image, InputError("internal", f"{type(e).__name__}: {e}"))
                return
            self._count("processes")
            self._ready.put(image)

        self._pool.submit(data).add_done_callback(decoded)

    def _bytes(self, work: Work) -> bytes:
        if work.data_b64 is None:
            return fetch(work.ref or "", self.config.policy)
        if len(work.data_b64) > self.config.max_inline_bytes * 4 // 3 + 4:
            raise InputError("too_large", f"inline image over the limit of {self.config.max_inline_bytes} bytes")
        try:
            return base64.b64decode(work.data_b64, validate=True)
        except (binascii.Error, ValueError):
            raise InputError("bad_message", "data_b64 is not valid base64") from None

    # -- GPU decoding (one thread) ----------------------------------------------------------------

    def _gpu_loop(self) -> None:
        images = self._gather(self._gpu_queue, self.batch_size)
        if not images:
            return
        self._add_backlog(-sum(_pixels(image) for image in images))
        # Pool slots hold these images' places, and most of their bytes (`data` is a view): free
        # once the decode call has returned, which is when nvJPEG is done with them (torchvision's
        # `decode_jpegs_cuda` synchronises its stream before it returns; on the CPU it is synchronous).
        held = [image.slot for image in images if image.slot is not None]
        for image in images:
            image.slot = None
        try:
            self._decode_on_gpu(images)
        except Exception as e:
            if is_fatal_cuda_error(e):
                raise
            # Out of GPU memory, or a bug: Pillow decides for each image of the batch.
            log.exception("GPU decoding of %d images failed: decoding them on the CPU", len(images))
            for image in images:
                if image.data is not None:
                    self._to_cpu(image)
        finally:
            if held:
                self._pool.release(held)

    def _to_cpu(self, image: _Image) -> None:
        """Decode with Pillow an image meant for the GPU, from a copy of its bytes (a slot's view
        is released when the GPU batch is done)."""
        data, image.data = bytes(image.data), None
        online = image.work.reply_to is not None
        threads = self._online if online else self._fetchers
        threads.submit(self._guarded, image, self._decode_on_cpu, image, data, online)

    def _decode_on_gpu(self, images: list[_Image]) -> None:
        started = time.perf_counter()
        ready = None
        if self._decode_stream is not None:  # its own stream: decoding never queues behind the model
            with torch.cuda.stream(self._decode_stream):
                self._inject_fault("decode")
                result = self._gpu.decode([(image.data, image.header) for image in images])
                ready = torch.cuda.Event()
                ready.record()
        else:
            result = self._gpu.decode([(image.data, image.header) for image in images])
        seconds = time.perf_counter() - started
        self.stages["gpu_decode"].add(len(images), seconds)
        per_image_ms = seconds * 1e3 / len(images)
        decoded = [images[i] for i in result.decoded]
        for image in decoded:
            image.data = None
            image.timings_ms["decode"] = per_image_ms
        if decoded:
            self._count("gpu", len(decoded))
            self._ready.put(_Rows(decoded, result.images, ready))
        for index in result.refused:  # nvJPEG said no: Pillow decides, for this image alone
            self._to_cpu(images[index])

    # -- batch, predict, unbatch, encode (one thread) -----------------------------------------------

    def _infer_loop(self) -> None:
        units = self._gather(self._ready, self.batch_size, size=_count, fill_to=self.runtime.manifest.batch_min)
        if not units:
            return
        loop_started = time.perf_counter()
        rows = [unit for unit in units if isinstance(unit, _Rows)]
        singles = sorted((unit for unit in units if isinstance(unit, _Image)), key=lambda image: image.slot is None)
        images = [image for part in rows for image in part.images] + singles
        try:
            batch = self._assemble(rows, singles)
            self._inject_fault("infer")
            started = time.perf_counter()
            k = max(image.request.topk for image in images)
            scores, indices = self.runtime.predict_top_k(batch, k)
            infer_ms = (time.perf_counter() - started) * 1e3
        except Exception as e:
            if is_fatal_cuda_error(e):
                raise
            log.exception("a model run failed")
            error = InputError("internal", f"model run failed: {type(e).__name__}: {e}")
            for image in images:
                self._fail(image, error)
            return
        finally:
            if self._pool is not None:
                self._pool.release([image.slot for image in singles if image.slot is not None])
        try:
            self._deliver_predictions(images, scores, indices, infer_ms)
        except Exception as e:  # a bug in encoding: these images fail, with the reason, and no caller waits
            log.exception("encoding the records of a batch failed")
            error = InputError("internal", f"encoding records failed: {type(e).__name__}: {e}")
            for image in images:
                self._fail(image, error)
        self.stages["infer"].add(len(images), time.perf_counter() - loop_started)

    def _assemble(self, rows: list[_Rows], singles: list[_Image]) -> torch.Tensor:
        """One uint8 N x 3 x crop x crop batch on the model's device: GPU rows as they are, CPU
        crops (`singles`, those in pool slots first) through one pinned staging buffer and one
        non-blocking copy. The buffer is reused at once: `predict` synchronises before returning."""
        parts = []
        for part in rows:
            if part.ready is not None:  # written on the decoding stream: wait for it, on the GPU
                torch.cuda.current_stream().wait_event(part.ready)
                part.tensor.record_stream(torch.cuda.current_stream())
            parts.append(part.tensor)
        if singles:
            staging = self._staging[: len(singles)]
            slots = [image.slot for image in singles if image.slot is not None]
            if slots:
                self._pool.gather(slots, staging.numpy())
            host_view = staging.numpy()
            for i in range(len(slots), len(singles)):
                host_view[i] = singles[i].pixels
            device = self.runtime.device
            host = staging.to(device, non_blocking=True) if device.type == "cuda" else staging
            parts.append(host.permute(0, 3, 1, 2))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _inject_fault(self, stage: str) -> None:
        """Tests only (`KILN_TEST_CUDA_FAULT=STAGE:N`): launch an out-of-bounds index on the
        current stream in batch N + 1 of `stage` ("decode" or "infer"). The device-side assert
        is asynchronous, as a real one is: the stage's next CUDA call that synchronises raises it."""
        left = self._faults.get(stage)
        if left is None or self.runtime.device.type != "cuda":
            return
        if left == 0:
            index = torch.tensor([1 << 20], device=self.runtime.device)
            torch.zeros(1, device=self.runtime.device)[index]
        self._faults[stage] = left - 1

    def _deliver_predictions(
        self, images: list[_Image], scores: torch.Tensor, indices: torch.Tensor, infer_ms: float
    ) -> None:
        labels = self.runtime.labels
        by_request: dict[int, list[tuple[Work, Record]]] = {}
        for image, row_scores, row_indices in zip(images, scores.tolist(), indices.tolist(), strict=True):
            topk = [
                Label(label=labels[i], index=i, score=s)
                for s, i in zip(row_scores[: image.request.topk], row_indices, strict=False)
            ]
            record = self._record(image, status="ok", topk=topk, timings_ms={**image.timings_ms, "infer": infer_ms})
            by_request.setdefault(id(image.request), []).append((image.work, record))
        requests = {id(image.request): image.request for image in images}
        for key, pairs in by_request.items():
            self._deliver(requests[key], pairs)

    # -- shared helpers -------------------------------------------------------------------------------

    def _record(self, image: _Image, **fields: object) -> Record:
        manifest = self.runtime.manifest
        # Validated, though kiln made every value: pydantic-core's validation (4.2 us a record of
        # five labels, 1.1 a label) is faster than `model_construct`, which is Python (7.1, 2.2).
        return Record(
            job=image.work.job,
            key=image.work.key,
            ref=image.work.ref,
            model=manifest.model,
            model_digest=manifest.weights_sha256,
            worker=self.worker_id,
            finished_at=time.time(),
            **fields,
        )

    def _count(self, decoder: str, images: int = 1) -> None:
        with self._count_lock:
            self.decoded_by[decoder] += images

    def _fail(self, image: _Image, error: InputError) -> None:
        record = Record.failure(
            image.work.job,
            image.work.key,
            error.kind,
            str(error),
            ref=image.work.ref,
            model=self.runtime.manifest.model,
            model_digest=self.runtime.manifest.weights_sha256,
            worker=self.worker_id,
            timings_ms=image.timings_ms,
            finished_at=time.time(),
        )
        self._deliver(image.request, [(image.work, record)])

    def _deliver(self, request: _Request, pairs: list[tuple[Work, Record]]) -> None:
        """Hand records to their caller: those images are no longer in flight."""
        self._add_in_flight(-len(pairs))
        request.out.put(pairs)

    def _gather(self, source: queue.Queue, limit: int, size=lambda _: 1, fill_to: int = 1) -> list:
        """Block for one item, then take what arrives within `LINGER_S`, up to `limit` in all
        (measured by `size`); under `fill_to`, wait up to `FILL_S` for more while the callers
        have other images on their way, unless the first item is online (its caller waits).
        Returns [] when the pipeline is closing."""
        while True:
            try:
                first = source.get(timeout=0.5)
                break
            except queue.Empty:
                if self._stop.is_set():
                    return []
        items, count = [first], size(first)
        fill_to = 1 if _is_online(first) else fill_to
        started = time.perf_counter()
        while count < limit:
            wait = LINGER_S if count >= fill_to or self._in_flight <= count else FILL_S
            try:
                item = source.get(timeout=max(0.0, started + wait - time.perf_counter()))
            except queue.Empty:
                break
            if isinstance(item, _Rows) and count + len(item.images) > limit:  # keep batches full-size
                item, rest = item.split(limit - count)
                source.put(rest)
            items.append(item)
            count += size(item)
        return items

    def _serve(self, loop) -> None:
        """Run a stage's loop for the life of the pipeline. A CUDA error that poisons the context
        ends the process without acknowledging its tasks: another worker gets them."""
        if self.runtime.device.type == "cuda":
            torch.cuda.set_device(self.runtime.device)  # each thread has its own current device
        while not self._stop.is_set():
            try:
                loop()
            except Exception as e:
                if is_fatal_cuda_error(e):
                    log.critical("CUDA error, this GPU context is unusable; exiting so another worker redoes it: %s", e)
                    logging.shutdown()
                    os._exit(70)  # EX_SOFTWARE; no acknowledgement, no cleanup that could touch CUDA
                log.exception("%s failed; it carries on", threading.current_thread().name)


def _pixels(image: _Image) -> int:
    header = image.header
    return header.width * header.height if header is not None else 0


def _count(unit: _Image | _Rows) -> int:
    return len(unit.images) if isinstance(unit, _Rows) else 1


def _is_online(unit: _Image | _Rows) -> bool:
    images = unit.images if isinstance(unit, _Rows) else [unit]
    return any(image.work.reply_to is not None for image in images)


class _OnlineFirst(queue.Queue):
    """A stage's queue: FIFO, but online units (an online request's image, or GPU rows holding
    one) leave before bulk ones, so an online request waits for the stage, not for the bulk
    windows queued in front of it. Through `queue.Queue`'s own extension points, as PriorityQueue."""

    def _init(self, maxsize: int) -> None:
        self._lanes = (collections.deque(), collections.deque())  # online, bulk

    def _qsize(self) -> int:
        return len(self._lanes[0]) + len(self._lanes[1])

    def _put(self, unit: _Image | _Rows) -> None:
        self._lanes[0 if _is_online(unit) else 1].append(unit)

    def _get(self) -> _Image | _Rows:
        return (self._lanes[0] or self._lanes[1]).popleft()
