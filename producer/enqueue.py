"""One streamed submission: cut the listing into chunks as it comes, enqueue each chunk as soon
as it is formed, and pause while the bulk queue is full (backpressure).

Two modes, chosen per job. The Redis result store (the default): each chunk's images are looked up
(one HMGET) and registered in the job just before the chunk is sent. Sharded mode (`out_dir`):
chunks get deterministic ids (`worker.contract.chunk_id`), completed ones are skipped on resume,
and Redis holds one counter per chunk, never a key per image.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import redis

from producer.faults import RedisUnavailable, retrying
from producer.progress import JobProgress
from producer.sources import SourceError
from worker.contract import BULK_QUEUE, CHUNK_TASK, ChunkMessage, Item, chunk_id
from worker.store import LISTER_TTL_S, listing_run

if TYPE_CHECKING:
    from producer.client import Kiln

# A submission keeps its keys up to this many (a few MB), so that `wait` and `results` can tell
# its images from other submissions' in a shared job; a larger one follows the whole job.
KEYS_KEPT = 100_000


class SubmitIncomplete(RedisUnavailable):
    """Redis failed while a job was being enqueued; the job holds only what was enqueued, and
    running the same submission again enqueues the rest."""


class SubmitTimeout(TimeoutError):
    """The bulk queue stayed full until the time given ran out (no worker taking chunks?); the
    job holds what was enqueued, and running the same submission again enqueues the rest."""


class Submission:
    """The state of one `Kiln.submit` call while it streams: what it listed and enqueued."""

    def __init__(
        self,
        kiln: Kiln,
        job: str,
        topk: int,
        retry_failed: bool,
        out_dir: str | None,
        bar: JobProgress,
        deadline: float | None = None,
        identity: str | None = None,
    ) -> None:
        self.kiln, self.job, self.topk, self.retry_failed, self.out_dir, self.bar, self.deadline = (
            kiln, job, topk, retry_failed, out_dir, bar, deadline,
        )  # fmt: skip
        # Its name in the job's listing: the same submission run again takes the place of one that
        # stopped. From its inputs (a grown folder stays the same submission), else its first chunk.
        self.identity = identity
        self.listed = 0  # images listed so far (duplicates within a chunk counted once)
        self.enqueued = 0  # images sent to workers
        self.failed_kept = 0  # images left out with an error record (no --retry-failed)
        self._keys: list[str] | None = [] if out_dir is None else None
        self._completed: set[str] | None = None  # sharded mode: chunk ids already written
        self._room = 0  # chunks that may be sent before the queue depth is read again
        self._shown = 0.0

    @property
    def keys(self) -> tuple[str, ...] | None:
        """This submission's keys, or None when not kept (sharded mode, or over KEYS_KEPT)."""
        return None if self._keys is None else tuple(self._keys)

    def enqueue(self, items: Iterator[Item]) -> None:
        """Send every chunk of `items`; on return the listing has ended and every chunk is queued.
        From the first chunk to the last, the job's listing is open (`wait` does not take the job
        for complete) and a heartbeat says that this submission is still at it; if it stops
        early, `wait` learns so (`worker.store.ResultStore.open_listing`)."""
        size = self.kiln.settings.chunk_size
        heartbeat: _Heartbeat | None = None
        try:
            for index in itertools.count():
                chunk = _unique(list(itertools.islice(items, size)))
                if not chunk:
                    break
                if heartbeat is None:  # a listing that names nothing makes no job
                    heartbeat = _Heartbeat(self.kiln, self.job, self.identity or chunk_id(0, chunk))
                self.listed += len(chunk)
                self._keep(chunk)
                if self.out_dir is None:
                    self._send_stored(chunk)
                else:
                    self._send_sharded(index, chunk)
                self._show()
            if heartbeat is not None:
                heartbeat.finish()
        except RedisUnavailable as e:
            raise SubmitIncomplete(
                f"job {self.job}: enqueued {self.enqueued} of the {self.listed} images listed so far, then: {e}. "
                "Run the same submission again to enqueue the rest"
            ) from e
        except SourceError as e:
            if not self.listed:
                raise
            raise SourceError(
                f"{e} (job {self.job}: the {self.listed} images listed before it are enqueued; fix the input and "
                "run the same submission again to resume)"
            ) from e
        finally:
            if heartbeat is not None:
                heartbeat.stop(self.enqueued)
        self._show(force=True)

    def _keep(self, chunk: list[Item]) -> None:
        if self._keys is not None:
            self._keys += [item.key for item in chunk]
            if len(self._keys) > KEYS_KEPT:
                self._keys = None

    def _send_stored(self, chunk: list[Item]) -> None:
        """Redis result store: leave out the images with a record, register the chunk in the job
        (refusing a key the job holds for another image), send the rest."""
        kiln, store, job = self.kiln, self.kiln.store, self.job
        statuses = kiln._redis(lambda: store.statuses(job, [item.key for item in chunk]))
        todo = [i for i, s in zip(chunk, statuses, strict=True) if s is None or (s == "error" and self.retry_failed)]
        failed = [i.key for i, s in zip(chunk, statuses, strict=True) if s == "error" and self.retry_failed]
        self.failed_kept += 0 if self.retry_failed else statuses.count("error")
        if todo:
            self._wait_for_room()
        # The chunk joins the job's total just before it is enqueued, and leaves it again if
        # enqueuing fails: the job never counts images that no worker will see.
        added: list[str] = []
        try:
            added = kiln._redis(lambda: store.register(job, chunk, self.topk))
            # Retried images lose their old error record first, so `wait` counts them only once a
            # worker has written a new one. Should enqueuing fail now, they are left without a
            # record: running the submission again enqueues them.
            kiln._redis(lambda: store.forget_failed(job, failed))
            if todo:
                self._send(ChunkMessage(job=job, items=todo, topk=self.topk))
        except RedisUnavailable:
            # Briefly: if Redis is gone, the images stay in the job without a record, and
            # running the submission again enqueues them.
            with contextlib.suppress(RedisUnavailable):
                retrying(lambda: store.unregister(job, added), kiln.settings.redis_url, 5.0)
            raise
        self.enqueued += len(todo)

    def _send_sharded(self, index: int, chunk: list[Item]) -> None:
        """Sharded mode: skip a completed chunk, else count it in the job and send it."""
        kiln, store, job = self.kiln, self.kiln.store, self.job
        if self._completed is None:  # at the first chunk: a listing that names nothing makes no job
            kiln._redis(lambda: store.begin_sharded(job, self.out_dir, self.topk))
            self._completed = kiln._redis(lambda: store.completed_chunks(job))
        chunk_name = chunk_id(index, chunk)
        if chunk_name in self._completed:
            return
        self._wait_for_room()
        kiln._redis(lambda: store.add_chunk(job, chunk_name, len(chunk)))
        self._send(ChunkMessage(job=job, items=chunk, topk=self.topk, chunk=chunk_name, out_dir=self.out_dir))
        self.enqueued += len(chunk)

    def _send(self, message: ChunkMessage) -> None:
        body = message.model_dump(mode="json", exclude_none=True)
        self.kiln._redis(lambda: self.kiln._send(CHUNK_TASK, body, BULK_QUEUE))

    def _wait_for_room(self) -> None:
        """Backpressure: return once the bulk queue holds fewer than KILN_MAX_PENDING_CHUNKS
        messages. The depth is read only when the room seen last is used up: one LLEN per
        bound's worth of chunks while the workers keep up. Raises SubmitTimeout past the deadline."""
        settings = self.kiln.settings
        while self._room <= 0:
            depth = self.kiln._redis(lambda: self.kiln.store.redis.llen(BULK_QUEUE))
            self._room = settings.max_pending_chunks - depth
            if self._room <= 0:
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    raise SubmitTimeout(
                        f"job {self.job}: the bulk queue still held {depth} chunks (KILN_MAX_PENDING_CHUNKS="
                        f"{settings.max_pending_chunks}) when the time ran out, with {self.enqueued} of the "
                        f"{self.listed} images listed so far enqueued. Are workers consuming {BULK_QUEUE}? Run "
                        "the same submission again to enqueue the rest"
                    )
                self._show()
                time.sleep(settings.poll_interval_s)
        self._room -= 1

    def _show(self, force: bool = False) -> None:
        """Draw the job's progress (one counters read per poll interval at most)."""
        if not self.bar.enabled:
            return
        now = time.monotonic()
        if force or now - self._shown >= self.kiln.settings.poll_interval_s:
            self._shown = now
            counts = self.kiln._redis(lambda: self.kiln.store.counts(self.job))
            self.bar.show(self.job, counts.finished, listed=self.listed)


class _Heartbeat:
    """One submission's part in the listing of `job`: opened at once, its heartbeat renewed from a
    thread until `finish` (every chunk is queued) or `stop` (the submission ends early:
    interrupted, or failed). A producer killed outright stops renewing it, and it lapses in
    LISTER_TTL_S. Other submissions of the same job keep their own."""

    def __init__(self, kiln: Kiln, job: str, identity: str) -> None:
        self.kiln, self.job, self.id = kiln, job, listing_run(identity)
        self.finished = False
        self._stopping = threading.Event()
        self._before = kiln._redis(lambda: kiln.store.open_listing(job, self.id))
        self._thread = threading.Thread(target=self._renew, name=f"kiln-listing-{job}", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stopping.wait(LISTER_TTL_S / 3):
            # A Redis away for a moment fails this renewal only; the submission's own calls
            # retry, and fail it if Redis stays away.
            with contextlib.suppress(redis.RedisError, OSError):
                self.kiln.store.keep_listing(self.job, self.id)

    def finish(self) -> None:
        self.kiln._redis(lambda: self.kiln.store.finish_listing(self.job, self.id))
        self.finished = True

    def stop(self, enqueued: int) -> None:
        """Stop the heartbeat; unless finished, mark this submission stopped, or where it
        `enqueued` nothing, take it back as if it had never run."""
        self._stopping.set()
        self._thread.join()
        if self.finished:
            return
        store = self.kiln.store
        if enqueued:
            end = functools.partial(store.stop_listing, self.job, self.id)
        else:
            end = functools.partial(store.reset_listing, self.job, self.id, self._before)
        with contextlib.suppress(redis.RedisError, OSError):  # best effort: without Redis, the heartbeat lapses
            retrying(end, self.kiln.settings.redis_url, 5.0)


def _unique(chunk: list[Item]) -> list[Item]:
    """The chunk without repeated (key, ref) pairs. Raises SourceError for a key that names two
    images: a chunk (and its shard) holds each key once. Across chunks, the Redis result store
    refuses such a key on registration; sharded mode cannot see it (README "Duplicates")."""
    seen: dict[str, Item] = {}
    for item in chunk:
        known = seen.setdefault(item.key, item)
        if known.ref != item.ref:
            raise SourceError(f"key {item.key!r} names two images: {known.ref} and {item.ref}")
    return list(seen.values()) if len(seen) < len(chunk) else chunk
