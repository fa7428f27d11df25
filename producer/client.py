"""The producer's Python API: submit jobs, follow them, read their results, classify one image.

    from producer import Kiln
    kiln = Kiln("redis://queue:6379/0")
    job = kiln.submit(["/data/photos"], job="photos-2026-11")
    kiln.wait(job)                         # this submission's images; progress bar on stderr
    for record in kiln.results(job):
        print(record.key, record.topk[0].label if record.status == "ok" else record.error)
    kiln.classify(open("cat.jpg", "rb").read())   # online: one image, answered in milliseconds

Every call rides out a Redis restart or pause: it retries with backoff until the caller's timeout
(or `KILN_REDIS_RETRY_S`), then raises `RedisUnavailable` with what to do. No torch here:
producers run anywhere Python and Redis do.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import redis
from pydantic import TypeAdapter, ValidationError
from redis.backoff import NoBackoff
from redis.retry import Retry

from producer.faults import RedisUnavailable, retrying
from producer.settings import ProducerSettings
from producer.sources import Expansion, default_job_id, expand
from worker.celery_app import make_app
from worker.contract import (
    BULK_QUEUE,
    CHUNK_TASK,
    ONLINE_QUEUE,
    ONLINE_TASK,
    ChunkMessage,
    Item,
    JobId,
    OnlineMessage,
    Record,
    reply_key,
)
from worker.store import JobConflict, JobCounts, ResultStore

T = TypeVar("T")
_KEYS_PER_CALL = 10_000  # keys per HMGET: one reply of a few hundred KB


class JobTimeout(TimeoutError):
    """The job did not finish in the time given."""


class SubmitIncomplete(RedisUnavailable):
    """Redis failed while a job was being enqueued; the job holds only what was enqueued, and
    running the same submission again enqueues the rest."""


@dataclass(frozen=True)
class SubmittedJob:
    """One submission: `keys` are its images (a job may hold more, from other submissions)."""

    id: str
    total: int  # images in this submission
    enqueued: int  # images sent to workers now; the rest already had a record (resume)
    job_total: int = 0  # images the job holds, this submission's and any other's
    keys: tuple[str, ...] = ()
    skipped: Counter[str] = field(default_factory=Counter)  # files left out of folders, by extension


class Kiln:
    """A connection to one kiln deployment (its Redis). Thread-safe."""

    def __init__(self, redis_url: str | None = None, settings: ProducerSettings | None = None) -> None:
        settings = settings or ProducerSettings()
        if redis_url:
            settings = settings.model_copy(update={"redis_url": redis_url})
        if not settings.redis_url:
            raise ValueError("no Redis: pass redis_url or set KILN_REDIS_URL")
        self.settings = settings
        # No retries inside redis-py: `_redis` retries under the caller's deadline instead.
        client = redis.Redis.from_url(
            settings.redis_url,
            socket_timeout=settings.redis_timeout_s,
            socket_connect_timeout=settings.redis_timeout_s,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=30,
        )
        self.store = ResultStore(client, settings.result_ttl_s)
        self._app = make_app(settings)
        # Without a socket timeout, a publish to a paused Redis would block forever.
        self._app.conf.broker_transport_options = {
            **(self._app.conf.broker_transport_options or {}),
            "socket_timeout": settings.redis_timeout_s,
            "socket_connect_timeout": settings.redis_timeout_s,
        }

    def close(self) -> None:
        self.store.redis.close()
        self._app.close()

    def __enter__(self) -> Kiln:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _redis(self, call: Callable[[], T], deadline: float | None = None) -> T:
        """`call()` with retries: until `deadline` if given, else for KILN_REDIS_RETRY_S."""
        budget = float("inf") if deadline is not None else self.settings.redis_retry_s
        return retrying(call, self.settings.redis_url, budget, deadline)

    def submit(
        self,
        sources: Iterable[str | Path] | Sequence[Item] | Expansion,
        job: str | None = None,
        topk: int = 5,
        retry_failed: bool = False,
    ) -> SubmittedJob:
        """Enqueue every image of the sources (folders, globs, files, URLs, CSV/JSONL manifests,
        `Item`s, or an `expand` result) that has no record in the job yet; with `retry_failed`,
        failed ones again too.

        A job name used again adds this submission's images to the job (a grown folder, or
        another producer's images); `wait(submitted)` then waits for this submission's images.
        Raises JobConflict if the job holds one of the keys for another image, SourceError for
        inputs that name no images, and SubmitIncomplete if Redis fails partway (run it again)."""
        expansion = _expansion(sources)
        items = expansion.items
        job = _job_name(job or default_job_id(items))
        self._check_conflicts(job, items)
        done = self._redis(lambda: self.store.recorded_keys(job, include_failed=not retry_failed))
        todo = [item for item in items if item.key not in done]
        recorded = [item for item in items if item.key in done]
        for start in range(0, len(recorded), _KEYS_PER_CALL):
            batch = recorded[start : start + _KEYS_PER_CALL]
            self._redis(lambda batch=batch: self.store.register(job, batch, topk))
        # Each chunk joins the job's total just before it is enqueued, and leaves it again if
        # enqueuing fails: the job never counts images that no worker will see.
        size = self.settings.chunk_size
        for start in range(0, len(todo), size):
            chunk = todo[start : start + size]
            added: list[str] = []
            try:
                added = self._redis(lambda chunk=chunk: self.store.register(job, chunk, topk))
                message = ChunkMessage(job=job, items=chunk, topk=topk).model_dump(mode="json")
                self._redis(lambda message=message: self._send(CHUNK_TASK, message, BULK_QUEUE))
            except RedisUnavailable as e:
                # Briefly: if Redis is gone, the images stay in the job without a record, and
                # running the submission again enqueues them.
                with contextlib.suppress(RedisUnavailable):
                    retrying(lambda added=added: self.store.unregister(job, added), self.settings.redis_url, 5.0)
                raise SubmitIncomplete(
                    f"job {job}: enqueued {start} of {len(todo)} images, then: {e}. "
                    "Run the same submission again to enqueue the rest"
                ) from e
        total = self._redis(lambda: self.store.counts(job)).total
        keys = tuple(item.key for item in items)
        return SubmittedJob(job, len(items), len(todo), total, keys, expansion.skipped)

    def _check_conflicts(self, job: str, items: list[Item]) -> None:
        """Refuse, before enqueuing anything, a key the job already holds for another image."""
        for start in range(0, len(items), _KEYS_PER_CALL):
            batch = items[start : start + _KEYS_PER_CALL]
            refs = self._redis(lambda batch=batch: self.store.registered_refs(job, [i.key for i in batch]))
            for item, ref in zip(batch, refs, strict=True):
                if ref is not None and ref != item.ref:
                    raise JobConflict(
                        f"job {job} already holds image key {item.key!r} for {ref}, not {item.ref}: use a new "
                        "job name, or give the images other keys"
                    )

    def _send(self, task: str, message: dict, queue: str) -> None:
        self._app.send_task(task, args=[message], queue=queue, retry=False)

    def counts(self, job: str) -> JobCounts:
        return self._redis(lambda: self.store.counts(job))

    def exists(self, job: str) -> bool:
        return self._redis(lambda: self.store.exists(job))

    def wait(
        self,
        job: str | SubmittedJob,
        timeout_s: float | None = None,
        progress: bool = True,
        check: Callable[[], None] | None = None,
    ) -> JobCounts:
        """Block until every image has a record: a submission's images (given a SubmittedJob) or
        the whole job's (given its name). Shows a progress bar (rate, ETA). Returns the counters
        of those images. `check` runs at every poll and may raise to give up (the embedded mode
        checks its worker). Raises JobTimeout after `timeout_s`, RedisUnavailable if Redis stays
        away until then (or for KILN_REDIS_RETRY_S without a timeout)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        follow = _Follow(self, job, deadline)
        bar = _progress_bar(follow.name, follow.total, follow.finished) if progress else None
        try:
            while not follow.complete:
                if deadline is not None and time.monotonic() > deadline:
                    raise JobTimeout(
                        f"job {follow.name}: {follow.finished} of {follow.total} images after {timeout_s} s"
                    )
                if check is not None:
                    check()
                time.sleep(self.settings.poll_interval_s)
                follow.poll()
                if bar is not None and follow.finished != bar.n:
                    bar.update(follow.finished - bar.n)
        finally:
            if bar is not None:
                bar.close()
        return follow.counts()

    def results(self, job: str | SubmittedJob) -> list[Record]:
        """The records of a job (given its name) or of one submission's images, in no order."""
        name = job.id if isinstance(job, SubmittedJob) else job
        records = self._redis(lambda: list(self.store.records(name)))
        if isinstance(job, SubmittedJob):
            keys = set(job.keys)
            records = [r for r in records if r.key in keys]
        return records

    def check_inline(self, size: int) -> None:
        """Raise ValueError if an inline image of `size` bytes is over KILN_MAX_INLINE_BYTES."""
        limit = self.settings.max_inline_bytes
        if size > limit:
            raise ValueError(
                f"the image is {size:,} bytes, over the inline limit of {limit:,} (KILN_MAX_INLINE_BYTES): "
                "put it where the workers can read it and pass its path or URL"
            )

    def classify(
        self,
        image: bytes | str | Path,
        topk: int = 5,
        timeout_s: float | None = None,
        job: str | None = None,
        key: str | None = None,
    ) -> Record:
        """Classify one image now, through the online queue: bytes (sent inline, at most
        KILN_MAX_INLINE_BYTES), or a reference (path, file:// or http(s):// URL) that the workers
        can read. With `job`, the record is also kept in that job under `key` (default: the
        request id); the job is created for online use if new, and must have been created so.

        Raises ValueError for an oversized image, JobConflict for a job that takes no online
        writes, TimeoutError if no worker answers within `timeout_s` (KILN_ONLINE_TIMEOUT_S)."""
        inline = isinstance(image, bytes)
        if inline:
            self.check_inline(len(image))
        timeout_s = timeout_s or self.settings.online_timeout_s
        deadline = time.monotonic() + timeout_s
        request_id = uuid.uuid4().hex
        if job is not None:
            job = _job_name(job)
            key = key or request_id
            ref = f"inline:sha256:{hashlib.sha256(image).hexdigest()}" if inline else str(image)
            item = Item(key=key, ref=ref)
            self._redis(lambda: self.store.register(job, [item], topk, online=True), deadline)
        message = OnlineMessage(
            id=request_id,
            reply_to=reply_key(request_id),
            topk=topk,
            data_b64=base64.b64encode(image).decode() if inline else None,
            ref=None if inline else str(image),
            job=job,
            key=key,
        ).model_dump(mode="json", exclude_none=True)
        self._redis(lambda: self._send(ONLINE_TASK, message, ONLINE_QUEUE), deadline)
        record = self._redis(
            lambda: self.store.wait_reply(reply_key(request_id), max(0.0, deadline - time.monotonic())), deadline
        )
        if record is None:
            raise TimeoutError(f"no worker answered within {timeout_s} s (are workers consuming {ONLINE_QUEUE}?)")
        return record


class _Follow:
    """What `wait` follows: a whole job's counters, or one submission's images in it."""

    def __init__(self, kiln: Kiln, job: str | SubmittedJob, deadline: float | None) -> None:
        self.kiln, self.deadline = kiln, deadline
        self.name = job.id if isinstance(job, SubmittedJob) else job
        self.keys = job.keys if isinstance(job, SubmittedJob) else None
        self.pending = list(self.keys or ())
        self._checked_at = -1
        self.poll()

    @property
    def total(self) -> int:
        return self.job.total if self.keys is None else len(self.keys)

    @property
    def finished(self) -> int:
        if self.keys is None or self.alone:
            return self.job.finished
        return len(self.keys) - len(self.pending)

    @property
    def alone(self) -> bool:
        """The job holds this submission's images and no others (the usual case)."""
        return self.job.total == len(self.keys or ())

    @property
    def complete(self) -> bool:
        return self.job.complete if self.keys is None or self.alone else not self.pending

    def poll(self) -> None:
        self.job = self.kiln._redis(lambda: self.kiln.store.counts(self.name), self.deadline)
        # Another producer's images share the job: look up this submission's own, but only when
        # something new was recorded, since that costs a lookup per pending image.
        if self.keys is not None and not self.alone and self.job.finished != self._checked_at:
            self._checked_at = self.job.finished
            statuses = self._statuses(self.pending)
            self.pending = [key for key, status in zip(self.pending, statuses, strict=True) if status is None]

    def _statuses(self, keys: Sequence[str]) -> list[str | None]:
        found: list[str | None] = []
        for start in range(0, len(keys), _KEYS_PER_CALL):
            batch = keys[start : start + _KEYS_PER_CALL]
            found += self.kiln._redis(lambda batch=batch: self.kiln.store.statuses(self.name, batch), self.deadline)
        return found

    def counts(self) -> JobCounts:
        if self.keys is None or self.alone:
            return self.job
        statuses = Counter(self._statuses(self.keys))
        return JobCounts(len(self.keys), statuses["ok"], statuses["error"])


def _expansion(sources: Iterable[str | Path] | Sequence[Item] | Expansion) -> Expansion:
    if isinstance(sources, Expansion):
        return sources
    sources = list(sources)
    if sources and all(isinstance(s, Item) for s in sources):
        return Expansion(sources)
    return expand(sources)


_JOB_ID = TypeAdapter(JobId)


def _job_name(job: str) -> str:
    try:
        return _JOB_ID.validate_python(job)
    except ValidationError:
        raise ValueError(
            f"job name {job!r}: use 1 to 200 letters, digits and . _ : @ - (it becomes part of Redis keys)"
        ) from None


def _progress_bar(job: str, total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=job, unit="img", dynamic_ncols=True, mininterval=0.5)
