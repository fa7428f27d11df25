"""The producer's Python API: submit jobs, follow them, read their results, classify one image.

    from producer import Kiln
    kiln = Kiln("redis://queue:6379/0")
    job = kiln.submit(["/data/photos"], job="photos-2026-11")
    kiln.wait(job.id)                      # progress bar on stderr
    for record in kiln.results(job.id):
        print(record.key, record.topk[0].label if record.status == "ok" else record.error)
    kiln.classify(open("cat.jpg", "rb").read())   # online: one image, answered in milliseconds

No torch here: producers run anywhere Python and Redis do.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from producer.settings import ProducerSettings
from producer.sources import default_job_id, expand
from worker.celery_app import make_app
from worker.contract import BULK_QUEUE, CHUNK_TASK, ONLINE_QUEUE, ONLINE_TASK, ChunkMessage, Item, OnlineMessage, Record
from worker.store import JobCounts, ResultStore, reply_key


class JobTimeout(TimeoutError):
    """The job did not finish in the time given."""


@dataclass(frozen=True)
class SubmittedJob:
    id: str
    total: int
    enqueued: int  # images sent to workers now; the rest already had a record (resume)


class Kiln:
    """A connection to one kiln deployment (its Redis). Thread-safe."""

    def __init__(self, redis_url: str | None = None, settings: ProducerSettings | None = None) -> None:
        settings = settings or ProducerSettings()
        if redis_url:
            settings = settings.model_copy(update={"redis_url": redis_url})
        if not settings.redis_url:
            raise ValueError("no Redis: pass redis_url or set KILN_REDIS_URL")
        self.settings = settings
        self.store = ResultStore.from_url(settings.redis_url, settings.result_ttl_s)
        self._app = make_app(settings)

    def close(self) -> None:
        self.store.redis.close()
        self._app.close()

    def __enter__(self) -> Kiln:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def submit(
        self,
        sources: Iterable[str | Path] | list[Item],
        job: str | None = None,
        topk: int = 5,
        retry_failed: bool = False,
    ) -> SubmittedJob:
        """Enqueue every image of the sources (folders, globs, files, URLs, CSV/JSONL manifests, or
        `Item`s) that has no record in the job yet; with `retry_failed`, failed ones again too."""
        sources = list(sources)
        items = sources if sources and all(isinstance(s, Item) for s in sources) else expand(sources)
        job = job or default_job_id(items)
        self.store.begin_job(job, len(items), topk=topk)
        done = self.store.recorded_keys(job, include_failed=not retry_failed)
        todo = [item for item in items if item.key not in done]
        size = self.settings.chunk_size
        with self._app.producer_or_acquire() as producer:
            for start in range(0, len(todo), size):
                message = ChunkMessage(job=job, items=todo[start : start + size], topk=topk)
                self._app.send_task(
                    CHUNK_TASK, args=[message.model_dump(mode="json")], queue=BULK_QUEUE, producer=producer
                )
        return SubmittedJob(job, len(items), len(todo))

    def counts(self, job: str) -> JobCounts:
        return self.store.counts(job)

    def wait(
        self,
        job: str,
        timeout_s: float | None = None,
        progress: bool = True,
        check: Callable[[], None] | None = None,
    ) -> JobCounts:
        """Block until every image of the job has a record; show a progress bar (rate, ETA).
        `check` runs at every poll and may raise to give up (the embedded mode checks its worker)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        counts = self.counts(job)
        bar = _progress_bar(job, counts) if progress else None
        try:
            while not counts.complete:
                if deadline is not None and time.monotonic() > deadline:
                    raise JobTimeout(f"job {job}: {counts.finished} of {counts.total} images after {timeout_s} s")
                if check is not None:
                    check()
                time.sleep(self.settings.poll_interval_s)
                counts = self.counts(job)
                if bar is not None and counts.finished != bar.n:
                    bar.set_postfix(failed=counts.failed, refresh=False)
                    bar.update(counts.finished - bar.n)
        finally:
            if bar is not None:
                bar.close()
        return counts

    def results(self, job: str) -> Iterator[Record]:
        """Every record of the job, in no particular order."""
        return self.store.records(job)

    def classify(self, image: bytes | str | Path, topk: int = 5, timeout_s: float | None = None) -> Record:
        """Classify one image now, through the online queue: bytes (sent inline), or a reference
        (path, file:// or http(s):// URL) that the workers can read."""
        request_id = uuid.uuid4().hex
        message = OnlineMessage(
            id=request_id,
            reply_to=reply_key(request_id),
            topk=topk,
            data_b64=base64.b64encode(image).decode() if isinstance(image, bytes) else None,
            ref=None if isinstance(image, bytes) else str(image),
        )
        self._app.send_task(ONLINE_TASK, args=[message.model_dump(mode="json", exclude_none=True)], queue=ONLINE_QUEUE)
        timeout_s = timeout_s or self.settings.online_timeout_s
        record = self.store.wait_reply(message.reply_to, timeout_s)
        if record is None:
            raise TimeoutError(f"no worker answered within {timeout_s} s (are workers consuming {ONLINE_QUEUE}?)")
        return record


def _progress_bar(job: str, counts: JobCounts):
    from tqdm import tqdm

    return tqdm(total=counts.total, initial=counts.finished, desc=job, unit="img", dynamic_ncols=True, mininterval=0.5)
