"""Celery tasks, kept thin: validate the message, cap deliveries, hand the images to the pipeline,
write the records. The model is loaded once per process by `init_process`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from celery import Celery, Task
from celery_batches import Batches
from pydantic import ValidationError

from worker.contract import CHUNK_TASK, ONLINE_TASK, ChunkMessage, OnlineMessage, Record
from worker.fetch import FetchPolicy
from worker.pipeline import Pipeline, PipelineConfig, Work
from worker.settings import WorkerSettings
from worker.store import ResultStore

log = logging.getLogger(__name__)

DEAD_LETTERS = "kiln:dead-letters"  # messages too broken to name a job or a caller
ONLINE_JOB = "online"


@dataclass
class ProcessState:
    settings: WorkerSettings
    pipeline: Pipeline
    store: ResultStore


_state: ProcessState | None = None


def init_process(settings: WorkerSettings, device: str | None, threads: int) -> ProcessState:
    """Load the model and connect the store, once per worker process."""
    global _state
    import torch

    from worker.runtime import load_runtime

    torch.set_num_threads(threads)
    runtime = load_runtime(settings.model, device)
    config = PipelineConfig(
        policy=FetchPolicy.create(
            settings.allowed_roots, settings.max_image_bytes, settings.fetch_timeout_s, settings.fetch_allowed_networks
        ),
        max_pixels=settings.max_image_pixels,
        formats=settings.formats,
        decode_memory_bytes=settings.decode_memory_mb * 2**20,
        max_inline_bytes=settings.max_image_bytes,
        decode_threads=settings.decode_threads,
        batch_size=settings.batch_size,
    )
    _state = ProcessState(
        settings, Pipeline(runtime, config), ResultStore.from_url(settings.redis_url, settings.result_ttl_s)
    )
    return _state


def state() -> ProcessState:
    if _state is None:
        raise RuntimeError("this process has no model loaded: start workers with `python -m worker`")
    return _state


def dead_letter(message: Any, reason: str) -> None:
    entry = json.dumps({"message": message, "reason": reason}, default=repr)[:65536]
    with state().store.redis.pipeline() as pipe:
        pipe.lpush(DEAD_LETTERS, entry).ltrim(DEAD_LETTERS, 0, 999).execute()
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
        state().store.write(records)
    except ValidationError:
        dead_letter(message, reason)


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
    current = state()
    deliveries = current.store.count_delivery(chunk.job, task.request.id)
    if deliveries > current.settings.max_deliveries:
        # Workers died on this chunk before: record what is missing as failed, and stop the loop.
        done = current.store.recorded_keys(chunk.job)
        reason = f"delivered {deliveries} times without finishing (a worker died on it each time)"
        current.store.write(
            [Record.failure(chunk.job, i.key, "poison", reason, ref=i.ref) for i in chunk.items if i.key not in done]
        )
        return {"job": chunk.job, "error": "poison"}
    works = (Work(chunk.job, item.key, ref=item.ref) for item in chunk.items)
    written = 0
    for pairs in current.pipeline.run(works, chunk.topk):
        current.store.write([record for _, record in pairs])
        written += len(pairs)
    return {"job": chunk.job, "records": written}


def classify_online(requests: list[Any]) -> None:
    """Online work, batched by celery-batches: answer each caller, and record jobs that asked."""
    current = state()
    accepted: list[tuple[Any, OnlineMessage]] = []
    for request in requests:
        raw = request.args[0] if len(request.args) == 1 and not request.kwargs else None
        try:
            accepted.append((request, OnlineMessage.model_validate(raw)))
        except ValidationError as e:
            reply_to = raw.get("reply_to") if isinstance(raw, dict) else None
            reason = f"invalid online message: {e.errors(include_url=False)[:3]}"
            if isinstance(reply_to, str):
                current.store.reply([(reply_to, Record.failure(ONLINE_JOB, str(raw.get("id")), "bad_message", reason))])
            else:
                dead_letter(raw, reason)
    if not accepted:
        return
    deliveries = current.store.count_deliveries(ONLINE_JOB, [request.id for request, _ in accepted])
    works, topks = [], {}
    for (_, message), delivered in zip(accepted, deliveries, strict=True):
        work = Work(
            message.job or ONLINE_JOB, message.key or message.id, message.ref, message.data_b64, message.reply_to
        )
        if delivered > current.settings.max_deliveries:
            poison = Record.failure(work.job, work.key, "poison", "delivered too many times without finishing")
            current.store.reply([(work.reply_to, poison)])
            continue
        works.append(work)
        topks[id(work)] = message.topk
    if not works:
        return
    for pairs in current.pipeline.run(works, max(topks.values())):
        answers = [(w, r.model_copy(update={"topk": r.topk[: topks[id(w)]]})) for w, r in pairs]
        current.store.reply([(w.reply_to, r) for w, r in answers])
        current.store.write([r for w, r in answers if w.job != ONLINE_JOB])


def register_tasks(app: Celery, settings: WorkerSettings) -> None:
    app.task(name=CHUNK_TASK, bind=True)(classify_chunk)
    app.task(
        name=ONLINE_TASK,
        base=Batches,
        flush_every=settings.online_batch_size,
        flush_interval=settings.online_flush_ms / 1000,
    )(classify_online)
