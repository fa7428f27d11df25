"""The classification pipeline inside one worker process, with no broker in sight:

    load (fetch + decode, on a thread pool) -> batch -> predict -> unbatch -> encode (records)

Loading runs ahead of inference by a bounded number of images, so fetching and decoding the next
batch overlaps with the model running on this one (Pillow and torch release the GIL). Every image
ends as exactly one record: top-k labels, or the error that stopped it.
"""

from __future__ import annotations

import base64
import binascii
import os
import socket
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice

import numpy as np

from worker.budget import MemoryBudget
from worker.contract import InputError, Record
from worker.fetch import FetchPolicy, fetch
from worker.preprocess import decode_image
from worker.runtime import ModelRuntime, stack_images
from worker.settings import DEFAULT_FORMATS


@dataclass(frozen=True)
class Work:
    """One image to classify: where its record goes, and where its bytes come from."""

    job: str
    key: str
    ref: str | None = None
    data_b64: str | None = None
    reply_to: str | None = None  # online requests: the caller's reply list


@dataclass
class Loaded:
    work: Work
    pixels: np.ndarray | None = None
    error: InputError | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PipelineConfig:
    policy: FetchPolicy = field(default_factory=FetchPolicy)
    max_pixels: int = 50_000_000
    formats: frozenset[str] = DEFAULT_FORMATS
    decode_memory_bytes: int = 256 * 2**20  # decoded pixels held at once by all decode threads
    max_inline_bytes: int = 8 * 1024 * 1024
    decode_threads: int = 2
    batch_size: int | None = None  # default: the package's largest batch


class Pipeline:
    """Classifies `Work` items with one loaded model. One per process; not thread-safe."""

    def __init__(self, runtime: ModelRuntime, config: PipelineConfig) -> None:
        self.runtime = runtime
        self.config = config
        self.batch_size = min(config.batch_size or runtime.batch_max, runtime.batch_max)
        # Taken here, in the process that serves: prefork children import this module in the parent.
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self._pool = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="kiln-decode")
        self._decode_budget = MemoryBudget(config.decode_memory_bytes)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- stages ---------------------------------------------------------------------------------

    def load(self, work: Work) -> Loaded:
        """Fetch and decode one image; errors become part of the result, never exceptions."""
        loaded = Loaded(work)
        try:
            started = time.perf_counter()
            data = self._bytes(work)
            fetched = time.perf_counter()
            loaded.pixels = decode_image(
                data,
                self.runtime.manifest.preprocess,
                self.config.max_pixels,
                formats=self.config.formats,
                budget=self._decode_budget,
            )
            loaded.timings_ms = {"fetch": (fetched - started) * 1e3, "decode": (time.perf_counter() - fetched) * 1e3}
        except InputError as e:
            loaded.error = e
        except Exception as e:  # a decoder bug must fail one image, not the batch
            loaded.error = InputError("internal", f"{type(e).__name__}: {e}")
        return loaded

    def _bytes(self, work: Work) -> bytes:
        if work.data_b64 is None:
            return fetch(work.ref or "", self.config.policy)
        if len(work.data_b64) > self.config.max_inline_bytes * 4 // 3 + 4:
            raise InputError("too_large", f"inline image over the limit of {self.config.max_inline_bytes} bytes")
        try:
            return base64.b64decode(work.data_b64, validate=True)
        except (binascii.Error, ValueError):
            raise InputError("bad_message", "data_b64 is not valid base64") from None

    def predict(self, batch: Sequence[Loaded], topk: int) -> list[tuple[Work, Record]]:
        """Run the model on decoded images and encode one record per image."""
        started = time.perf_counter()
        try:
            labels = self.runtime.top_k(self.runtime.predict(stack_images([x.pixels for x in batch])), topk)
        except Exception as e:  # a failed model run fails these images, with the reason
            error = InputError("internal", f"model run failed: {type(e).__name__}: {e}")
            return [(item.work, self.encode(item, error=error)) for item in batch]
        infer_ms = (time.perf_counter() - started) * 1e3
        return [
            (item.work, self.encode(item, labels=top, infer_ms=infer_ms))
            for item, top in zip(batch, labels, strict=True)
        ]

    def encode(self, item: Loaded, labels=None, error: InputError | None = None, infer_ms: float = 0.0) -> Record:
        work, manifest = item.work, self.runtime.manifest
        common = {
            "ref": work.ref,
            "model": manifest.model,
            "model_digest": manifest.weights_sha256,
            "worker": self.worker_id,
            "finished_at": time.time(),
        }
        error = error or item.error
        if error is not None:
            return Record.failure(work.job, work.key, error.kind, str(error), timings_ms=item.timings_ms, **common)
        timings = {**item.timings_ms, "infer": infer_ms}
        return Record(job=work.job, key=work.key, status="ok", topk=labels, timings_ms=timings, **common)

    # -- the whole flow -------------------------------------------------------------------------

    def run(self, works: Iterable[Work], topk: int) -> Iterator[list[tuple[Work, Record]]]:
        """Yield (work, record) pairs batch by batch; failed images ride along with the next batch.

        Images are loaded in small groups, one group per thread-pool task: a task per image costs
        more than decoding a small image does."""
        threads = self.config.decode_threads
        group = max(1, self.batch_size // (4 * threads))
        lookahead = -(-2 * self.batch_size // group) + threads  # groups in flight: two batches ahead
        pending: deque[Future[list[Loaded]]] = deque()
        ready: list[Loaded] = []
        failed: list[tuple[Work, Record]] = []
        source = iter(works)

        def refill() -> None:
            while len(pending) < lookahead:
                chunk = list(islice(source, group))
                if not chunk:
                    return
                pending.append(self._pool.submit(lambda items: [self.load(w) for w in items], chunk))

        refill()
        while pending:
            loaded_group = pending.popleft().result()
            refill()
            for loaded in loaded_group:
                if loaded.error is not None:
                    failed.append((loaded.work, self.encode(loaded)))
                else:
                    ready.append(loaded)
                if len(ready) == self.batch_size:
                    yield failed + self.predict(ready, topk)
                    ready, failed = [], []
        if ready or failed:
            yield failed + (self.predict(ready, topk) if ready else [])
