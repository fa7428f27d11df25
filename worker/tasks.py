"""Celery tasks, kept thin: validate the message, claim the chunk, hand the images to the pipeline,
write the records. The model is loaded once per process by `init_process`.

Records go to the Redis store batch by batch, or, for a chunk that names an out_dir (sharded
output), into one Parquet shard written once the whole chunk is classified, then the chunk is
counted complete in Redis; nothing per image goes to Redis then.

A chunk is acknowledged only after all its records are written: writes that Redis refuses
(stalled, restarting, full) are retried with backoff for `KILN_REDIS_RETRY_S`, shard writes that
fail for `KILN_SINK_RETRY_S`, and past that the chunk goes back to the queue
(`Reject(requeue=True)`), never acknowledged half done.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import count
from queue import Empty
from typing import Any, TypeVar

import redis
from celery import Celery, Task
from celery.exceptions import Reject
from celery_batches import Batches, SimpleRequest
from celery_batches.trace import apply_batches_task
from pydantic import ValidationError

from worker import health, metrics
from worker.contract import (
    CHUNK_TASK,
    ONLINE_TASK,
    ChunkMessage,
    Item,
    OnlineMessage,
    Record,
    chunk_id,
    is_reply_key,
    reply_key,
)
from worker.fetch import FetchPolicy
from worker.gpu_wait import block_while_waiting
from worker.lease import Heartbeat, holder_running
from worker.malloc import keep_freed_memory
from worker.pipeline import Pipeline, PipelineConfig, Work
from worker.plan import DataPathPlan, plan_data_path
from worker.retry import RedisUnavailable, Unavailable, is_transient, shutting_down, with_retries
from worker.settings import WorkerSettings
from worker.sink import SinkUnavailable, shard_url, write_shard
from worker.store import DEAD_LETTERS, Delivery, ResultStore

log = logging.getLogger(__name__)

__all__ = ["DEAD_LETTERS", "classify_chunk", "classify_online", "init_process", "register_tasks"]

ONLINE_JOB = "online"
HOLDER_POLL_S = 1.0  # how often a delivery of a chunk that a live worker runs checks on it

T = TypeVar("T")


@dataclass
class ProcessState:
    settings: WorkerSettings
    plan: DataPathPlan
    pipeline: Pipeline
    store: ResultStore
    heartbeat: Heartbeat

    def retrying(self, operation: Callable[[], T], what: str) -> T:
        return with_retries(operation, what, self.settings.redis_retry_s)


_state: ProcessState | None = None
OTHER_MODEL_PAUSE_S = 2.0  # before a worker gives back a chunk of a job bound to another model


def init_process(settings: WorkerSettings, device: str | None, processes: int) -> ProcessState:
    """Load the model, plan the data path and connect the store, once per worker process
    (`processes`: how many worker processes share this host)."""
    global _state
    import torch

    from worker.manifest import read_manifest
    from worker.runtime import load_runtime

    # Before torch creates a CUDA context; a package for the CPU waits for no GPU. The manifest is
    # read only where no device was given and blocking was asked for (the default spins).
    if (
        settings.gpu_wait == "block"
        and torch.device(device or read_manifest(settings.model).device).type == "cuda"
        and (why_not := block_while_waiting()) is not None
    ):
        log.warning("KILN_GPU_WAIT=block not applied, so threads spin while they wait for the GPU: %s", why_not)
    runtime = load_runtime(settings.model, device)
    if runtime.device.type == "cpu" and settings.keep_freed_memory and (why_not := keep_freed_memory()) is not None:
        log.warning("KILN_KEEP_FREED_MEMORY not applied, so each batch faults its memory in afresh: %s", why_not)
    plan = plan_data_path(settings, runtime.device, runtime.batch_max, processes)
    torch.set_num_threads(plan.torch_threads)
    log.info("%s", plan.describe())
    config = PipelineConfig(
        policy=FetchPolicy.create(
            settings.allowed_roots, settings.max_image_bytes, settings.fetch_timeout_s, settings.fetch_allowed_networks
        ),
        max_pixels=settings.max_image_pixels,
        formats=settings.formats,
        decode_memory_bytes=settings.decode_memory_mb * 2**20,
        max_inline_bytes=settings.max_image_bytes,
        fetch_threads=plan.fetch_threads,
        decode_processes=plan.decode_processes,
        gpu_decode=plan.gpu_decode,
        gpu_decoder=plan.gpu_decoder,
        batch_size=plan.batch_size,
    )
    store = ResultStore.from_url(settings.redis_url, settings.result_ttl_s, timeout_s=settings.redis_timeout_s)
    pipeline = Pipeline(runtime, config)
    started = time.perf_counter()
    if pipeline.warm_up():
        log.info("warmed up the GPU path with %d images in %.1f s", pipeline.batch_size, time.perf_counter() - started)
    _state = ProcessState(settings, plan, pipeline, store, Heartbeat(store.redis, settings.lease_s))
    metrics.observe_model(runtime.manifest)
    health.mark_loaded()
    return _state


def state() -> ProcessState:
    if _state is None:
        raise RuntimeError("this process has no model loaded: start workers with `python -m worker`")
    return _state


def write_records(records: list[Record], what: str, batch_size: int | None = None) -> None:
    """Upsert records, retried while Redis cannot take them, and count them in the metrics
    (`batch_size`: they came from one model call)."""
    current = state()
    started = time.perf_counter()
    refused = current.retrying(lambda: current.store.write(records), f"write {len(records)} records of {what}")
    if refused:  # checked before the chunk ran: its job was deleted or expired meanwhile
        log.error("%d records of %s not written: their job holds no such images (%s)", len(refused), what, refused[:3])
    metrics.observe_records(records, time.perf_counter() - started, batch_size)


def dead_letter(message: Any, reason: str) -> None:
    """Keep a refused message with its reason, retried while Redis cannot take it."""
    current = state()
    current.retrying(lambda: current.store.dead_letter({"message": message, "reason": reason}), "dead-letter a message")
    log.error("dead-lettered a message: %s", reason)


def fail_unparseable_chunk(message: Any, error: ValidationError) -> None:
    """Record a chunk that fails validation as failed, for every image it still names."""
    reason = f"invalid task message: {error.errors(include_url=False)[:3]}"
    job = message.get("job") if isinstance(message, dict) else None
    items = message.get("items") if isinstance(message, dict) else None
    keys = (
        [i["key"] for i in items if isinstance(i, dict) and isinstance(i.get("key"), str)]
        if isinstance(items, list)
        else []
    )
    if not isinstance(job, str) or not keys:
        dead_letter(message, reason)
        return
    try:
        records = [Record.failure(job, key, "bad_message", reason) for key in keys]
        write_records(records, f"job {job}")
    except ValidationError:
        dead_letter(message, reason)


def claim_chunk(current: ProcessState, job: str, task_id: str) -> Delivery:
    """Become the holder of a delivered chunk. A previous holder that is gone counts as a death
    (towards poison); one that is alive and running it is waited for, so that no chunk runs twice
    at once. Returns the entry: `done` if the chunk's records were written meanwhile."""
    current.heartbeat.begin(task_id)  # before the claim: whoever sees us as holder sees us running it
    waited = False
    while True:
        outcome = current.retrying(lambda: _try_claim(current, job, task_id), "claim a chunk")
        if isinstance(outcome, Delivery):
            return outcome
        if outcome is not None:
            if not waited:
                log.warning("chunk %s of job %s is running on live worker %s: waiting for it", task_id, job, outcome)
                waited = True
            time.sleep(HOLDER_POLL_S)


def _try_claim(current: ProcessState, job: str, task_id: str) -> Delivery | str | None:
    """One attempt of `claim_chunk`: the new entry, or the live holder that runs the chunk, or
    None when the entry changed under us."""
    store, me = current.store, current.heartbeat.worker
    seen = store.delivery(job, task_id)
    if seen is not None and seen.done:
        return seen
    other = seen is not None and seen.holder not in ("", me)
    if other and holder_running(store.redis, seen.holder, task_id):
        return seen.holder
    claimed = store.claim(job, task_id, me, seen, died=other)
    if claimed is not None and other:
        log.warning("worker %s died on chunk %s of job %s (deaths: %d)", seen.holder, task_id, job, claimed.deaths)
    return claimed


def classify_chunk(task: Task, message: Any = None, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Bulk work: classify every image of a chunk and upsert its records, batch by batch."""
    if args or kwargs:
        dead_letter({"message": message, "args": args, "kwargs": kwargs}, "unexpected task arguments")
        return {"error": "bad_message"}
    try:
        chunk = ChunkMessage.model_validate(message)
    except ValidationError as e:
        fail_unparseable_chunk(message, e)
        return {"error": "bad_message"}
    current, task_id = state(), task.request.id
    delivery: Delivery | None = None
    try:
        refusal = current.retrying(
            lambda: _output_refusal(current.store, chunk) or _registration_refusal(current.store, chunk),
            "read a job's output and images",
        )
        if refusal:
            dead_letter(message, refusal)
            return {"error": "bad_message"}
        if not _take_only_own_models(current, chunk.job):
            dead_letter(message, f"job {chunk.job} is not in Redis (its keys expired or were deleted): submit it again")
            return {"error": "bad_message"}
        delivery = claim_chunk(current, chunk.job, task_id)
        metrics.observe_deliveries("chunk", [delivery.deaths + 1], current.settings.max_deliveries)
        if delivery.done:  # finished by an earlier delivery whose acknowledgement was lost
            return {"job": chunk.job, "records": 0}
        run = _run_to_redis if chunk.out_dir is None else _run_to_shard
        written = run(current, chunk, delivery)
        current.retrying(lambda: current.store.finish(chunk.job, task_id), "mark a chunk done")
    except (Unavailable, redis.RedisError) as e:
        # Redis or the shard's store failed for too long, or Redis with an error that waiting does
        # not heal: either way the chunk's records are not all written, so it is not acknowledged
        # (Celery acknowledges any task that raises). It goes back to the queue, or, if Redis
        # cannot even take it back, stays unacknowledged until its lease lapses.
        log.error("giving chunk %s of job %s back to the queue: %s: %s", task_id, chunk.job, type(e).__name__, e)
        if delivery is not None:
            try:
                current.store.release(chunk.job, task_id, delivery.deaths)
            except Exception as release_error:  # Redis is failing; the chunk's lease still brings it back
                log.warning("could not release chunk %s: %s", task_id, release_error)
        raise Reject(str(e), requeue=True) from e
    finally:
        current.heartbeat.end(task_id)
    return {"job": chunk.job, "records": written}


def _take_only_own_models(current: ProcessState, job: str) -> bool:
    """Bind the job to this worker's model if no worker has taken one of its chunks yet; raise
    Reject (the chunk goes back to the queue, before it counts as a delivery) where the job's
    records come from another model: workers serving different packages on one Redis wrote a
    job's records with two models' labels (a new user's finding). The pause lets the job's own
    workers take the chunk, not this one again at once. False where the job is not in Redis: its
    chunk would make a job of its records alone, bound to no model (a hostile tester's finding)."""
    mine = current.pipeline.runtime.manifest.model_key
    bound = current.retrying(lambda: current.store.bind_model(job, mine), "bind a job to its model")
    if bound is None:
        return False
    if bound == mine:
        return True
    log.warning("giving a chunk of job %s back to the queue: its records come from %s, this worker serves %s",
                job, bound, mine)  # fmt: skip
    note = f"{current.heartbeat.worker} serves {mine}"
    current.retrying(lambda: current.store.note_other_model(job, note), "note a worker of another model")
    time.sleep(OTHER_MODEL_PAUSE_S)
    raise Reject(f"job {job} takes records of {bound} only", requeue=True)


def _output_refusal(store: ResultStore, chunk: ChunkMessage) -> str | None:
    """Why a chunk may not write where it says (None if it may): a shard goes only to the out_dir
    its job was begun with, in the job's columns (top-k), and a sharded job takes no records into
    Redis, so a message can neither scatter a job's rows nor make a worker write elsewhere."""
    out_dir, topk = store.output(chunk.job)
    if chunk.out_dir is None:
        return None if out_dir is None else f"job {chunk.job} is sharded (out_dir {out_dir}); this chunk names none"
    if chunk.out_dir != out_dir:
        return f"job {chunk.job} was not begun with out_dir {chunk.out_dir} (its out_dir: {out_dir or 'none'})"
    if chunk.topk != topk:
        return f"job {chunk.job} writes top-{topk} shards; this chunk asks for top-{chunk.topk}"
    return None


def _registration_refusal(store: ResultStore, chunk: ChunkMessage) -> str | None:
    """Why a chunk may not write its records (None if it may): each of its images must be one its
    job holds, with the reference its producer registered, so that a message can neither rewrite
    another job's records nor add images to a job. A sharded job holds no images in Redis, only
    its chunks: the chunk must be one its producer counted in (`add_chunk`), with the images its
    id was made of (the id holds a digest of them)."""
    if chunk.out_dir is not None and chunk.chunk is not None:
        listed = store.listed_images(chunk.job, chunk.chunk)
        if listed != len(chunk.items) or chunk_id(int(chunk.chunk[:9]), chunk.items) != chunk.chunk:
            return (
                f"refused: job {chunk.job} holds no chunk {chunk.chunk} of these {len(chunk.items)} images; "
                "a chunk writes only images its producer registered"
            )
        return None
    refs = store.registered_refs(chunk.job, [item.key for item in chunk.items])
    for item, ref in zip(chunk.items, refs, strict=True):
        if ref != item.ref:
            holds = "no such image" if ref is None else f"it for {ref[:300]}"
            return (
                f"refused: job {chunk.job} holds {holds}, not image key {item.key[:300]!r} for {item.ref[:300]}; "
                "a chunk writes only images its producer registered"
            )
    return None


def _run_to_redis(current: ProcessState, chunk: ChunkMessage, delivery: Delivery) -> int:
    """Upsert the chunk's records into the Redis store, batch by batch; returns how many."""

    def write(records: list[Record], batch_size: int | None = None) -> None:
        write_records(records, f"job {chunk.job}", batch_size)

    def missing() -> list[Item]:
        done = current.retrying(lambda: current.store.recorded_keys(chunk.job), "read a job's recorded keys")
        return [item for item in chunk.items if item.key not in done]

    return _run_chunk(current, chunk, delivery, write, missing)


def _run_to_shard(current: ProcessState, chunk: ChunkMessage, delivery: Delivery) -> int:
    """Collect the chunk's records, write them as its shard, then count the chunk complete (once,
    whichever delivery gets there first); returns how many records the shard holds (0 for a
    chunk complete already, whose shard stays as it was counted)."""
    assert chunk.out_dir is not None and chunk.chunk is not None  # the message's validator ensures both
    out_dir, chunk_id = chunk.out_dir, chunk.chunk
    if current.retrying(lambda: current.store.chunk_complete(chunk.job, chunk_id), "read a chunk's state"):
        # Another message of this chunk wrote and counted its shard: rewriting it could change rows
        # (a transient fetch error this time) that the counters already hold.
        log.info("chunk %s of job %s: its shard is written already", chunk_id, chunk.job)
        return 0
    records: dict[str, Record] = {}

    def collect(batch: list[Record], batch_size: int | None = None) -> None:
        for record in batch:  # one row per key; a success is never replaced by a failure
            if record.status == "ok" or record.key not in records:
                records[record.key] = record
        metrics.observe_records(batch, None, batch_size)

    def missing() -> list[Item]:
        return [item for item in chunk.items if item.key not in records]

    _run_chunk(current, chunk, delivery, collect, missing)
    rows = list(records.values())
    started = time.perf_counter()

    def write() -> None:
        try:
            write_shard(out_dir, chunk.job, chunk_id, rows, chunk.topk)
        except Exception as e:
            # At once, for `kiln status` and `wait` to show: the worker's log is not at hand, and
            # the retries may run for KILN_SINK_RETRY_S. The next shard written clears it.
            with contextlib.suppress(redis.RedisError):
                current.store.note_sink_error(chunk.job, f"{current.heartbeat.worker}: {type(e).__name__}: {e}")
            raise

    with_retries(
        write,
        f"write shard {shard_url(out_dir, chunk.job, chunk_id)}",
        current.settings.sink_retry_s,
        # Any shutdown gives the chunk back unwritten (it is not acknowledged): a warm one would
        # otherwise wait out KILN_SINK_RETRY_S on a store that is down.
        abandon=lambda: shutting_down(warm=True),
        transient=lambda _: True,  # a folder or store that fails may be mended: the chunk waits for it
        unavailable=SinkUnavailable,
    )
    ok = sum(record.status == "ok" for record in rows)
    current.retrying(
        lambda: current.store.complete_chunk(chunk.job, chunk_id, ok, len(rows) - ok), "count a chunk complete"
    )
    metrics.observe_write(time.perf_counter() - started)
    return len(rows)


def _run_chunk(
    current: ProcessState,
    chunk: ChunkMessage,
    delivery: Delivery,
    write: Callable[[list[Record], int | None], None],
    missing: Callable[[], list[Item]],
) -> int:
    """Give `write` one record per image of the chunk, batch by batch (with the batch's model
    size); `missing()` names the images without a record yet. Returns how many were written."""
    limit = current.settings.max_deliveries
    if delivery.deaths >= limit:
        # Workers died on this chunk each time: record what is missing as failed, and stop the loop.
        reason = f"{delivery.deaths} workers died on this chunk (KILN_MAX_DELIVERIES={limit})"
        records = [Record.failure(chunk.job, i.key, "poison", reason, ref=i.ref) for i in missing()]
        write(records, None)
        return len(records)
    written = 0
    works = (Work(chunk.job, item.key, ref=item.ref) for item in chunk.items)
    try:
        for pairs in current.pipeline.run(works, chunk.topk):
            write([record for _, record in pairs], current.pipeline.batch_size)
            written += len(pairs)
    except (Unavailable, redis.RedisError):
        raise  # a Redis (or store) failure is never recorded as the images' fault: the chunk is given back
    except Exception as e:
        # A bug, not a fault of the images or of Redis: every image still ends with a record.
        log.exception("chunk of job %s failed; recording its remaining images as internal errors", chunk.job)
        reason = f"the chunk failed: {type(e).__name__}: {e}"
        records = [Record.failure(chunk.job, i.key, "internal", reason, ref=i.ref) for i in missing()]
        write(records, None)
        written += len(records)
    return written


def classify_online(requests: list[Any]) -> list[str]:
    """Online work, batched by celery-batches: answer each caller, and record jobs that allow it.

    Every request stands alone: a bad one is answered (on its own kiln reply key) or
    dead-lettered, and never costs the other requests of the batch their answers or records.
    Redis writes are retried like the bulk path's; past `KILN_REDIS_RETRY_S` (or on an error reply
    that waiting does not heal) the requests not yet answered are given back. Returns their ids:
    `OnlineBatches.flush` puts them back on the queue instead of acknowledging them."""
    unanswered = {request.id for request in requests}
    try:
        _classify_online(requests, unanswered)
    except (RedisUnavailable, redis.RedisError) as e:
        log.error("giving %d online requests back to the queue: %s: %s", len(unanswered), type(e).__name__, e)
        return sorted(unanswered)
    return []


def _classify_online(requests: list[Any], unanswered: set[str]) -> None:
    """`classify_online`'s work; takes each request's id out of `unanswered` once it is answered."""
    current = state()
    accepted: list[tuple[Any, OnlineMessage]] = []
    for request in requests:
        raw = request.args[0] if len(request.args) == 1 and not request.kwargs else None
        try:
            accepted.append((request, OnlineMessage.model_validate(raw)))
        except ValidationError as e:
            reason = f"invalid online message: {e.errors(include_url=False)[:3]}"
            # Answered only on the message's own reply key: a bad message must not reach another caller.
            own = reply_key(str(raw.get("id"))) if isinstance(raw, dict) else None
            if is_reply_key(own) and raw.get("reply_to") == own:
                _answer([(own, Record.failure(ONLINE_JOB, str(raw.get("id")), "bad_message", reason))])
            else:
                dead_letter(raw, reason)
            unanswered.discard(request.id)
    accepted = _refuse_foreign_jobs(_drop_expired(accepted, unanswered), unanswered)
    if not accepted:
        return
    ids = [request.id for request, _ in accepted]
    deliveries = current.retrying(lambda: current.store.count_deliveries(ONLINE_JOB, ids), "count online deliveries")
    metrics.observe_deliveries("online", deliveries, current.settings.max_deliveries)
    works, topks, request_ids = [], {}, {}
    for (request, message), delivered in zip(accepted, deliveries, strict=True):
        work = Work(
            message.job or ONLINE_JOB, message.key or message.id, message.ref, message.data_b64, message.reply_to
        )
        if delivered > current.settings.max_deliveries:
            poison = Record.failure(work.job, work.key, "poison", "delivered too many times without finishing")
            _answer([(work.reply_to, poison)])
            unanswered.discard(request.id)
            continue
        works.append(work)
        topks[id(work)], request_ids[id(work)] = message.topk, request.id
    if not works:
        return
    for pairs in current.pipeline.run(works, max(topks.values())):
        answers = [(w, r.model_copy(update={"topk": r.topk[: topks[id(w)]]})) for w, r in pairs]
        started = time.perf_counter()
        # The job's record first: a caller that has its answer finds the record in the job too.
        kept = [r for w, r in answers if w.job != ONLINE_JOB]
        if kept:
            current.retrying(lambda kept=kept: current.store.write(kept), f"write {len(kept)} online records")
        _answer([(w.reply_to, r) for w, r in answers])
        unanswered.difference_update(request_ids[id(w)] for w, _ in answers)
        metrics.observe_records([r for _, r in answers], time.perf_counter() - started, current.pipeline.batch_size)


def _drop_expired(accepted: list[tuple[Any, OnlineMessage]], unanswered: set[str]) -> list[tuple[Any, OnlineMessage]]:
    """Drop (acknowledged, unanswered) the requests past their message's expiry that write into
    no job: `Kiln.classify` sets it to its caller's timeout, after which no one reads the answer.
    A request kept in a job runs whatever its age: the job counts on its record."""
    now, kept = datetime.now(UTC), []
    for request, message in accepted:
        expires = (request.request_dict or {}).get("expires")
        try:
            expired = message.job is None and expires is not None and datetime.fromisoformat(expires) < now
        except (TypeError, ValueError):  # not Celery's ISO form: not an expiry kiln set
            expired = False
        if expired:
            log.info("dropped online request %s: its caller stopped waiting at %s", message.id, expires)
            unanswered.discard(request.id)
        else:
            kept.append((request, message))
    return kept


def _refuse_foreign_jobs(
    accepted: list[tuple[Any, OnlineMessage]], unanswered: set[str]
) -> list[tuple[Any, OnlineMessage]]:
    """Answer `forbidden` to requests that name a job which does not take online writes, or whose
    records come from another model than this worker's; keep the rest."""
    current = state()
    targets = [(message.job, message.key or message.id) for _, message in accepted if message.job]
    found = current.retrying(lambda: current.store.online_refusals(targets), "check online jobs") if targets else []
    refusals = iter(found)
    # One model per job, online writes too (`_take_only_own_models`): bound by the first writer,
    # among the requests that may write into it.
    mine, bound = current.pipeline.runtime.manifest.model_key, {}
    kept = []
    for request, message in accepted:
        refusal = next(refusals) if message.job else None
        if refusal is None and message.job:
            if message.job not in bound:
                bound[message.job] = current.retrying(
                    lambda job=message.job: current.store.bind_model(job, mine), "bind a job to its model"
                )
            if bound[message.job] not in (None, mine):
                refusal = f"job {message.job} takes records of {bound[message.job]} only; this worker serves {mine}"
        if refusal is None:
            kept.append((request, message))
        else:
            _answer([(message.reply_to, Record.failure(ONLINE_JOB, message.id, "forbidden", refusal))])
            unanswered.discard(request.id)
    return kept


def _answer(answers: list[tuple[str, Record]]) -> None:
    """Push answers to their callers, retrying those that Redis cannot take now (RedisUnavailable
    past KILN_REDIS_RETRY_S); an answer refused for good (not a kiln reply key, a key of another
    type) is logged and dropped."""
    current, pending = state(), answers

    def push() -> None:
        nonlocal pending
        failed = current.store.reply(pending)
        again = {to for to, error in failed if is_transient(error)}
        for reply_to, error in failed:
            if reply_to not in again:
                log.error("could not answer an online request on %r: %s", reply_to[:300], error)
        pending = [(to, record) for to, record in pending if to in again]
        if pending:
            raise next(error for to, error in failed if to in again)

    current.retrying(push, f"answer {len(answers)} online requests")


class OnlineBatches(Batches):
    """celery-batches 0.11 with its reconnect wedge fixed (upstream issues #99 and #107; fixed
    after 0.11, which is the newest release on PyPI).

    Batches arms its flush timer once, on the first request, and keeps the handle on the task,
    which outlives the consumer. After a broker reconnect, Celery rebuilds the consumer and calls
    `Strategy` again, but the stale handle stops the timer from being armed anew: requests then
    wait until `flush_every` more arrive. Here each new consumer starts with no timer, and with
    empty buffers: the requests buffered before the reconnect belong to the closed channel, which
    gave them back to the queue (or their lease lapses), so they are delivered again."""

    def Strategy(self, task: Batches, app: Celery, consumer: Any) -> Callable:
        if self._tref is not None:
            self._tref.cancel()
            self._tref = None
        for buffer in (self._buffer, self._pending):
            try:
                while True:
                    buffer.get_nowait()
            except Empty:
                pass
        self._count = count(1)
        return super().Strategy(task, app, consumer)

    def flush(self, requests: Collection[Any]) -> Any:
        """celery-batches' flush (every kiln task is acknowledged late), except that the requests
        the batch returns as given back (`classify_online`) go back to the queue: celery-batches
        acknowledges every request of a batch, answered or not."""
        batch = ([SimpleRequest.from_request(request) for request in requests],)

        def on_return(given_back: list[str] | None) -> None:
            back = set(given_back or ())
            for request in requests:
                if request.id in back:
                    request.reject(requeue=True)
                else:
                    request.acknowledge()

        return self._pool.apply_async(apply_batches_task, (self, batch, 0, None), callback=on_return)


def register_tasks(app: Celery, settings: WorkerSettings) -> None:
    app.task(name=CHUNK_TASK, bind=True)(classify_chunk)
    app.task(
        name=ONLINE_TASK,
        base=OnlineBatches,
        flush_every=settings.online_batch_size,
        flush_interval=settings.online_flush_ms / 1000,
    )(classify_online)
