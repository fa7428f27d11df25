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
import hashlib
import itertools
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import redis
from pydantic import TypeAdapter, ValidationError
from redis.backoff import NoBackoff
from redis.retry import Retry

from producer.enqueue import KEYS_KEPT, Submission
from producer.enqueue import SubmitIncomplete as SubmitIncomplete  # where callers have imported it from
from producer.export import write_results, write_shards
from producer.faults import retrying
from producer.progress import JobProgress
from producer.settings import ProducerSettings
from producer.sources import Expansion, SourceError, default_job_id, inputs_job_id, iter_items
from worker.celery_app import make_app
from worker.contract import (
    BULK_QUEUE,
    ONLINE_QUEUE,
    ONLINE_TASK,
    Item,
    JobId,
    OnlineMessage,
    Record,
    check_topk,
    reply_key,
)
from worker.eviction import check_eviction_policy
from worker.settings import mask_url, settings_error
from worker.store import LAPSE_GRACE_S, JobCounts, ResultStore

T = TypeVar("T")
_KEYS_PER_CALL = 10_000  # keys per HMGET: one reply of a few hundred KB
# `wait` says once that no worker seems to consume after this long without a record or a chunk
# taken: long enough for a worker to load its model, short enough to spare a user's patience.
STALL_NOTE_S = 30.0
ORPHAN_CHECK_S = 10.0  # a wait without a new record for this long looks for chunks of a worker that stopped


class JobTimeout(TimeoutError):
    """The job did not finish in the time given; `finished` of its `total` images had records."""

    def __init__(self, message: str, finished: int, total: int, total_is_final: bool = True) -> None:
        super().__init__(message)
        self.finished, self.total, self.total_is_final = finished, total, total_is_final

    @property
    def progress(self) -> str:
        return _progress(self.finished, self.total, self.total_is_final)


def local_out_dir(out_dir: str) -> str:
    """A local out_dir (a path, or a file:// URL) as an absolute, normal path: the workers write
    there from working folders of their own, so a relative one was a folder under each worker's
    (and `label` found no shards), and `../sd` beside `/tmp/sd` read as another out_dir. Other
    fsspec URLs as they are."""
    if out_dir.startswith("file://"):
        out_dir = out_dir.removeprefix("file://")
    elif "://" in out_dir:
        return out_dir
    return os.path.abspath(os.path.expanduser(out_dir))


def job_notes(job: str, counts: JobCounts) -> list[str]:
    """What holds a job back that the workers know and its counters do not say: shards that
    cannot be written, chunks given back by workers serving another model."""
    notes = []
    if counts.sink_error:
        notes.append(f"{job}: the workers cannot write its shards (they retry): {counts.sink_error}")
    if counts.other_model:
        notes.append(
            f"{job}: its records come from {counts.model}, and a worker serving another model gave a chunk back "
            f"({counts.other_model}); where no worker serving {counts.model} runs, start one, or submit to a new job"
        )
    return notes


def _progress(finished: int, total: int, total_is_final: bool) -> str:
    """How far a job got, for messages: `F of T images`, and whether T is not final yet."""
    return f"{finished} of {total} images" + ("" if total_is_final else " listed so far (the listing goes on)")


class JobNotFound(ValueError):
    """No job of that name in this Redis (never submitted, or its keys expired)."""


class ListingStopped(RuntimeError):
    """The submission listing the job stopped before its end (interrupted, killed, or it failed),
    and every image it enqueued has a record: no more will come until it is run again."""


@dataclass(frozen=True)
class SubmittedJob:
    """One submission. `keys` are its images (a job may hold more, from other submissions), kept
    for submissions of at most `KEYS_KEPT` images in the Redis result store; None otherwise, and
    then `wait` and `results` cover the whole job."""

    id: str
    total: int  # images in this submission
    enqueued: int  # images sent to workers now; the rest already had a record (resume)
    failed_before: int = 0  # of those, records of a failure, left as they are (no `retry_failed`)
    job_total: int = 0  # images the job holds, this submission's and any other's
    keys: tuple[str, ...] | None = field(default=(), repr=False)  # a wall of text in a log line
    skipped: Counter[str] = field(default_factory=Counter)  # files left out of folders, by extension
    out_dir: str | None = None  # sharded mode: where the workers write the job's shards


class Kiln:
    """A connection to one kiln deployment (its Redis). Thread-safe."""

    def __init__(self, redis_url: str | None = None, settings: ProducerSettings | None = None) -> None:
        settings = settings or ProducerSettings()
        if redis_url:  # checked as KILN_REDIS_URL is: redis-py's own message named schemes kiln refuses
            try:
                settings = type(settings).model_validate({**settings.model_dump(), "redis_url": redis_url})
            except ValidationError as e:
                raise ValueError(settings_error(e, "Kiln(redis_url=...)")) from None
        if not settings.redis_url:
            raise ValueError(
                "no Redis: set KILN_REDIS_URL (in Python, or Kiln(redis_url=...)); a job `kiln label` ran in the "
                "embedded mode lives in its own Redis: run that `kiln label` again to resume or export it"
            )
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
        self._redis_checked = False
        self._app = make_app(settings)
        # Without a socket timeout, a publish to a paused Redis would block forever.
        self._app.conf.broker_transport_options = {
            **(self._app.conf.broker_transport_options or {}),
            "socket_timeout": settings.redis_timeout_s,
            "socket_connect_timeout": settings.redis_timeout_s,
        }

    def _check_redis(self, deadline: float | None = None) -> None:
        """Refuse, once per Kiln, a Redis that may evict kiln's keys (raises EvictingRedis, a ValueError)."""
        if not self._redis_checked:
            allow = self.settings.allow_evicting_redis
            self._redis(lambda: check_eviction_policy(self.store.redis, allow), deadline)
            self._redis_checked = True

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
        sources: str | Path | Iterable[str | Path] | Iterable[Item] | Expansion,
        job: str | None = None,
        topk: int = 5,
        retry_failed: bool = False,
        out_dir: str | Path | None = None,
        progress: bool | JobProgress = False,
        timeout_s: float | None = None,
    ) -> SubmittedJob:
        """Enqueue every image of the sources (one or a list of folders, globs, files, URLs,
        CSV/JSONL manifests; `Item`s, a stream of Items, or an `expand` result) that has no record
        in the job yet.

        The sources are listed lazily and cut into chunks of KILN_CHUNK_SIZE as they are listed;
        each chunk is enqueued as soon as it is formed, and the call pauses while the bulk queue
        holds KILN_MAX_PENDING_CHUNKS chunks or more. So memory stays bounded whatever the job's
        size, and the call returns once the last chunk is enqueued.

        Redis result store (no `out_dir`): a chunk's images that already have a record are left
        out (with `retry_failed`, failed ones are sent again). A job name used again adds this
        submission's images to the job. `out_dir` (a folder, made absolute from the caller's
        working folder, or an fsspec URL such as s3://bucket/prefix): sharded mode, workers
        write each chunk's records as one Parquet shard there, and Redis keeps counters per
        chunk only; chunks already completed are skipped (resume: the same inputs give the same
        chunks).

        `progress`: draw a progress bar (or draw on the given one) while enqueuing. Raises
        JobConflict if the job holds one of the keys for another image (checked chunk by chunk:
        the chunks before it are enqueued) or exists in the other mode, SourceError for bad
        inputs, ValueError for a stream of Items without a job name, SubmitIncomplete if Redis
        fails partway, and SubmitTimeout if the bulk queue is still full `timeout_s` after the
        call (run it again to enqueue the rest)."""
        topk = check_topk(topk)
        self._check_redis()
        items, skipped, default, identity = _source_items(sources)
        job = checked_job_name(job or default())
        if out_dir is not None and retry_failed:
            raise ValueError(
                "retrying failed images (--retry-failed, retry_failed=True) applies to the Redis result store; "
                "in sharded mode (--out-dir) a chunk runs once: label the failed images as a new job"
            )
        if out_dir is not None:
            out_dir = local_out_dir(str(out_dir))
        bar = progress if isinstance(progress, JobProgress) else JobProgress(progress)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        run = Submission(self, job, topk, retry_failed, out_dir, bar, deadline, identity)
        try:
            run.enqueue(items)
        finally:
            if bar is not progress:
                bar.close()
        job_total = self._redis(lambda: self.store.counts(job)).total
        return SubmittedJob(job, run.listed, run.enqueued, run.failed_kept, job_total, run.keys, skipped, out_dir)

    def _send(self, task: str, message: dict, queue: str, expires_s: float | None = None) -> None:
        self._app.send_task(task, args=[message], queue=queue, retry=False, expires=expires_s)

    def counts(self, job: str) -> JobCounts:
        return self._redis(lambda: self.store.counts(job))

    def exists(self, job: str) -> bool:
        return self._redis(lambda: self.store.exists(job))

    def failure_kinds(self, job: str, limit: int = 1000) -> Counter[str]:
        """How many of a job's failed images failed of each error kind (`forbidden`,
        `unreadable`, ...), from the records of the first `limit` found; empty for a sharded job,
        whose records are in its shards."""
        return self._redis(lambda: self.store.failure_kinds(job, limit))

    def job_topk(self, job: str) -> int | None:
        """The labels per image a job was created with; None for no such job."""
        return self._redis(lambda: self.store.output(job))[1]

    def _require(self, job: str | SubmittedJob, deadline: float | None = None) -> None:
        """Raise JobNotFound for a job name that this Redis holds no job for (a SubmittedJob exists)."""
        if isinstance(job, str) and not self._redis(lambda: self.store.exists(job), deadline):
            raise JobNotFound(f"no job named {job!r} in {mask_url(self.settings.redis_url)}")

    def wait(
        self,
        job: str | SubmittedJob,
        timeout_s: float | None = None,
        progress: bool | JobProgress = True,
        check: Callable[[], None] | None = None,
    ) -> JobCounts:
        """Block until every image has a record: a submission's images (given a SubmittedJob) or
        the whole job's (given its name). Shows a progress bar (rate, ETA), or draws on the one
        given (`submit` may have started it). Returns the counters of those images. `check` runs
        at every poll and may raise to give up (the embedded mode checks its worker). While a
        submission lists the job, its total is not final and the wait goes on. Raises
        JobTimeout after `timeout_s`, RedisUnavailable if Redis stays away until then (or for
        KILN_REDIS_RETRY_S without a timeout), JobNotFound for a job name this Redis does not hold,
        ListingStopped where the job's submission stopped early and what it enqueued is done."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._require(job, deadline)
        follow = _Follow(self, job, deadline)
        bar = progress if isinstance(progress, JobProgress) else JobProgress(progress)
        stall, orphans = _Stall(self, follow), _Orphans(self, follow)
        said: list[str] = []  # the job's notes said last: each is said again only when it changes
        try:
            while True:
                stall.check(bar)
                orphans.check(bar)
                notes = job_notes(f"job {follow.name}", follow.job)
                for note in notes:
                    if note not in said:
                        bar.write(note)
                said = notes
                # a job's total is final only once its listing is done
                bar.show(follow.name, follow.finished, follow.total if follow.total_is_final else None)
                if follow.complete:
                    break
                if follow.stopped_early():
                    counts = follow.job
                    raise ListingStopped(
                        f"job {follow.name}: the submission listing it stopped before its end (interrupted, killed, "
                        f"or it failed) after {counts.total} images, and all have records ({counts.done} done, "
                        f"{counts.failed} failed); run that submission again to enqueue the rest"
                    )
                if deadline is not None and time.monotonic() > deadline:
                    final = follow.total_is_final
                    raise JobTimeout(
                        f"job {follow.name}: {_progress(follow.finished, follow.total, final)} after {timeout_s:g} s",
                        follow.finished,
                        follow.total,
                        final,
                    )
                if check is not None:
                    check()
                pause = self.settings.poll_interval_s
                time.sleep(pause if deadline is None else max(0.0, min(pause, deadline - time.monotonic())))
                follow.poll()
                gone = isinstance(job, str) and follow.total == 0
                if gone and not self._redis(lambda: self.store.exists(job), deadline):
                    raise JobNotFound(
                        f"job {job}: no longer in {mask_url(self.settings.redis_url)} (its keys expired or were "
                        "deleted, or Redis restarted without its data)"
                    )
        finally:
            if bar is not progress:
                bar.close()
        return follow.counts()

    def results(self, job: str | SubmittedJob) -> list[Record]:
        """The records of a job (given its name) or of one submission's images, in no order, from
        the Redis result store (a sharded job's records are in its shards: see `export`). Holds
        them all: for large jobs, use `export`. Raises JobNotFound for a job name this Redis does
        not hold."""
        self._require(job)
        keys = _kept_keys(job)
        records = list(self._records(job.id if isinstance(job, SubmittedJob) else job))
        return records if keys is None else [r for r in records if r.key in keys]

    def export(self, job: str | SubmittedJob, path: Path, topk: int = 5, out_dir: str | None = None) -> int:
        """Write the records of a job (or of one submission's images) to `path` (.jsonl, .csv or
        .parquet); return how many. Memory stays bounded: records stream in batches.

        Sharded jobs (`out_dir`, or the job's own, recorded in Redis): the shards are read with
        pyarrow.dataset and written in chunk order, each chunk's rows by key; `out_dir` also
        works once the job's Redis keys have expired. Redis result store: sorted by key when the
        job has at most KEYS_KEPT records, else in Redis's order (sorting needs every record).
        Raises JobNotFound for a job name this Redis does not hold, OSError naming `path` where
        it cannot be written."""
        name = job.id if isinstance(job, SubmittedJob) else job
        if out_dir is None:
            out_dir = job.out_dir if isinstance(job, SubmittedJob) else self._redis(lambda: self.store.sink(name))
        if out_dir is not None:
            return write_shards(f"{out_dir.rstrip('/')}/{name}", path)
        self._require(job)
        keys = _kept_keys(job)
        records = self._records(name)
        if keys is not None:
            records = (r for r in records if r.key in keys)
        small = self._redis(lambda: self.store.counts(name)).total <= KEYS_KEPT
        return write_results(records, path, topk, sort=small)

    def _records(self, job: str) -> Iterator[Record]:
        """A job's records from the Redis result store, one HSCAN page at a time (each page
        retried on its own: a cursor survives a reconnect)."""
        cursor = None
        while cursor != 0:
            cursor, page = self._redis(lambda cursor=cursor: self.store.records_page(job, cursor or 0))
            yield from page

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
        request id); the job is created for online use if new, and must have been created so. A
        relative path is sent made absolute (the workers do not share the caller's folder).

        Raises ValueError for an oversized image, JobConflict for a job that takes no online
        writes, TimeoutError if no worker answers within `timeout_s` (KILN_ONLINE_TIMEOUT_S)."""
        topk = check_topk(topk)
        inline = isinstance(image, bytes)
        if inline:
            self.check_inline(len(image))
        elif "://" not in str(image):
            # A worker cannot know the caller's working folder: send local paths absolute.
            image = str(Path(image).expanduser().absolute())
        timeout_s = timeout_s or self.settings.online_timeout_s
        deadline = time.monotonic() + timeout_s
        self._check_redis(deadline)
        request_id = uuid.uuid4().hex
        if job is not None:
            job = checked_job_name(job)
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
        # Nobody reads an answer after the caller's timeout: a request that writes into no job expires
        # then, and a worker started later drops it instead of classifying it for no one.
        expires_s = None if job is not None else max(0.0, deadline - time.monotonic())
        self._redis(lambda: self._send(ONLINE_TASK, message, ONLINE_QUEUE, expires_s), deadline)
        record = self._redis(
            lambda: self.store.wait_reply(reply_key(request_id), max(0.0, deadline - time.monotonic())), deadline
        )
        if record is None:
            raise TimeoutError(f"no worker answered within {timeout_s} s (are workers consuming {ONLINE_QUEUE}?)")
        return record


class _Stall:
    """Notices a wait that has seen no progress at all: no record and no chunk taken by a worker
    in STALL_NOTE_S since it began, and says once what to check (workers on another Redis, or
    none running). A worker slow on a chunk it took is progress: it is never reported."""

    def __init__(self, kiln: Kiln, follow: _Follow) -> None:
        self.kiln, self.follow = kiln, follow
        self.start = self._state()
        self.since = time.monotonic()
        self.done = False  # noted, or progress seen: nothing more to say

    def _state(self) -> tuple[int, int]:
        name = self.follow.name
        return self.follow.finished, self.kiln._redis(lambda: self.kiln.store.deliveries(name), self.follow.deadline)

    def check(self, bar: JobProgress) -> None:
        if self.done or time.monotonic() - self.since < STALL_NOTE_S:
            return
        self.done = True
        if self._state() != self.start:
            return
        bar.write(
            f"job {self.follow.name}: no worker has taken a chunk yet ({STALL_NOTE_S:.0f} s); check that workers run "
            f"against this Redis (KILN_REDIS_URL={mask_url(self.kiln.settings.redis_url)}) and consume "
            f"{BULK_QUEUE}. Still waiting"
        )


class _Orphans:
    """Notices, once per stall of ORPHAN_CHECK_S without a new record, chunks that a worker holds
    but no longer runs (killed, or its host lost: its heartbeat expired), and says when they run
    again; the wait otherwise sat silent for the lease's minute."""

    def __init__(self, kiln: Kiln, follow: _Follow) -> None:
        self.kiln, self.follow = kiln, follow
        self.finished, self.since, self.said = follow.finished, time.monotonic(), False

    def check(self, bar: JobProgress) -> None:
        if self.follow.finished != self.finished:
            self.finished, self.since, self.said = self.follow.finished, time.monotonic(), False
            return
        if self.said or time.monotonic() - self.since < ORPHAN_CHECK_S:
            return
        self.said = True
        name = self.follow.name
        orphans = self.kiln._redis(lambda: self.kiln.store.orphaned_chunks(name), self.follow.deadline)
        if orphans:
            bar.write(
                f"job {name}: {orphans} chunk{'s' if orphans != 1 else ''} held by a worker that stopped (its "
                "heartbeat expired: killed, or its host lost); they run again once their lease lapses, KILN_LEASE_S "
                "(60 s by default) after it stopped. Still waiting"
            )


class _Follow:
    """What `wait` follows: a whole job's counters, or one submission's images in it."""

    def __init__(self, kiln: Kiln, job: str | SubmittedJob, deadline: float | None) -> None:
        self.kiln, self.deadline = kiln, deadline
        # A submission's own listing has ended: other producers' listings of the job are theirs.
        self.submitted = isinstance(job, SubmittedJob)
        self.name = job.id if isinstance(job, SubmittedJob) else job
        self.keys = job.keys if isinstance(job, SubmittedJob) else None
        self.pending = list(self.keys or ())
        self._checked_at = -1
        self._lapsed_since: float | None = None
        self.poll()

    @property
    def total_is_final(self) -> bool:
        return self.submitted or self.job.listed

    def stopped_early(self) -> bool:
        """A job followed by name whose images enqueued so far all have records, while the
        submission listing it has stopped: said so (`stop_listing`), or its heartbeat lapsed and
        stayed so for LAPSE_GRACE_S of this wait's polls (a live submission renews it within a
        third of LISTER_TTL_S once Redis is back from an outage)."""
        if self.submitted or self.job.finished < self.job.total:
            return False
        if self.job.listing == "stopped":
            return True
        return self._lapsed_since is not None and time.monotonic() - self._lapsed_since >= LAPSE_GRACE_S

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
        if self.keys is not None and not self.alone:
            return not self.pending
        if self.submitted:
            return self.job.total > 0 and self.job.finished >= self.job.total
        return self.job.complete

    def poll(self) -> None:
        self.job = self.kiln._redis(lambda: self.kiln.store.counts(self.name), self.deadline)
        if self.job.listing != "lapsed":
            self._lapsed_since = None
        elif self._lapsed_since is None:
            self._lapsed_since = time.monotonic()
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


_NOTHING = object()  # an empty iterable's first element


def _source_items(
    sources: str | Path | Iterable[str | Path] | Iterable[Item] | Expansion,
) -> tuple[Iterator[Item], Counter[str], Callable[[], str], str | None]:
    """The items of `sources` (one input, or several) as a lazy iterator, the skipped-files
    counter the listing fills, how to make the default job id (from the keys of a list of Items,
    else from the inputs), and the submission's identity in the job's listing where the inputs
    give one (folders, globs, manifests: a grown folder is the same submission), else None (its
    first chunk names it). Raises SourceError where there is no input at all."""
    if isinstance(sources, str | os.PathLike):  # one input: iterated, a string was its characters
        sources = [sources]
    if isinstance(sources, Expansion):
        if not sources.items:
            raise SourceError("no images to submit: the expansion holds none")
        return iter(sources.items), sources.skipped, lambda: default_job_id(sources.items), None
    if isinstance(sources, Sequence) and sources and all(isinstance(s, Item) for s in sources):
        return iter(sources), Counter(), lambda: default_job_id(sources), None
    stream = iter(sources)
    first = next(stream, _NOTHING)
    if isinstance(first, Item):

        def unnamed() -> str:
            raise ValueError("a stream of Items has no default job id: name the job")

        return itertools.chain([first], stream), Counter(), unnamed, None
    if first is _NOTHING:
        raise SourceError("no inputs given: name folders, files, globs, URLs or manifests, or give Items")
    inputs = [first, *stream]  # the inputs themselves: a few names
    skipped: Counter[str] = Counter()
    identity = inputs_job_id(inputs)
    return iter_items(inputs, skipped), skipped, lambda: identity, identity


def _kept_keys(job: str | SubmittedJob) -> set[str] | None:
    """A submission's own keys, where it kept them; None: the whole job."""
    keys = job.keys if isinstance(job, SubmittedJob) else None
    return None if keys is None else set(keys)


_JOB_ID = TypeAdapter(JobId)


def checked_job_name(job: str) -> str:
    """`job` where it is a valid job name, else ValueError saying what one is."""
    try:
        return _JOB_ID.validate_python(job)
    except ValidationError:
        raise ValueError(
            f"job name {job!r}: use 1 to 200 letters, digits and . _ : @ -, not dots only (it becomes part of "
            "Redis keys and of its shards' folder)"
        ) from None
