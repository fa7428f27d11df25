"""Celery tasks, kept thin: validate the message, cap deliveries, hand the images to the pipeline,
write the records. The model is loaded once per process by `init_process`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from celery import Celery, Task
from celery_batches import Batches
from pydantic import ValidationError

from worker import health, metrics
from worker.contract import CHUNK_TASK, ONLINE_TASK, ChunkMessage, OnlineMessage, Record, is_reply_key, reply_key
from worker.fetch import FetchPolicy
from worker.pipeline import Pipeline, PipelineConfig, Work
from worker.plan import DataPathPlan, plan_data_path
from worker.settings import WorkerSettings
from worker.store import ResultStore

log = logging.getLogger(__name__)

DEAD_LETTERS = "kiln:dead-letters"  # messages too broken to name a job or a caller
ONLINE_JOB = "online"


@dataclass
class ProcessState:
    settings: WorkerSettings
    plan: DataPathPlan
    pipeline: Pipeline
    store: ResultStore


_state: ProcessState | None = None


def init_process(settings: WorkerSettings, device: str | None, processes: int) -> ProcessState:
    """Load the model, plan the data path and connect the store, once per worker process
    (`processes`: how many worker processes share this host)."""
    global _state
    import torch

    from worker.runtime import load_runtime

    runtime = load_runtime(settings.model, device)
    plan = plan_data_path(settings, runtime.device, runtime.batch_max, processes)
    torch.set_num_threads(plan.torch_threads)
    log.info("%s", plan.describe())
    config = PipelineConfig(
        policy=FetchPolicy.create(settings.allowed_roots, settings.max_image_bytes, settings.fetch_timeout_s),
        max_pixels=settings.max_image_pixels,
        max_inline_bytes=settings.max_image_bytes,
        fetch_threads=plan.fetch_threads,
        decode_processes=plan.decode_processes,
        gpu_decode=plan.gpu_decode,
        batch_size=plan.batch_size,
    )
    _state = ProcessState(
        settings, plan, Pipeline(runtime, config), ResultStore.from_url(settings.redis_url, settings.result_ttl_s)
    )
    metrics.observe_model(runtime.manifest)
    health.mark_loaded()
    return _state


def state() -> ProcessState:
    if _state is None:
        raise RuntimeError("this process has no model loaded: start workers with `python -m worker`")
    return _state


def write_records(records: list[Record], batch_size: int | None = None) -> None:
    """Upsert records, and count them in the metrics (`batch_size`: they came from one model call)."""
    started = time.perf_counter()
    state().store.write(records)
    metrics.observe_records(records, time.perf_counter() - started, batch_size)


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
        write_records(records)
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
    metrics.observe_deliveries("chunk", [deliveries], current.settings.max_deliveries)
    if deliveries > current.settings.max_deliveries:
        # Workers died on this chunk before: record what is missing as failed, and stop the loop.
        done = current.store.recorded_keys(chunk.job)
        reason = f"delivered {deliveries} times without finishing (a worker died on it each time)"
        write_records(
            [Record.failure(chunk.job, i.key, "poison", reason, ref=i.ref) for i in chunk.items if i.key not in done]
        )
        return {"job": chunk.job, "error": "poison"}
    works = (Work(chunk.job, item.key, ref=item.ref) for item in chunk.items)
    written = 0
    for pairs in current.pipeline.run(works, chunk.topk):
        write_records([record for _, record in pairs], current.pipeline.batch_size)
        written += len(pairs)
    return {"job": chunk.job, "records": written}


def classify_online(requests: list[Any]) -> None:
    """Online work, batched by celery-batches: answer each caller, and record jobs that allow it.

    Every request stands alone: a bad one is answered (on its own kiln reply key) or
    dead-lettered, and never costs the other requests of the batch their answers or records."""
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
    accepted = _refuse_foreign_jobs(accepted)
    if not accepted:
        return
    deliveries = current.store.count_deliveries(ONLINE_JOB, [request.id for request, _ in accepted])
    metrics.observe_deliveries("online", deliveries, current.settings.max_deliveries)
    works, topks = [], {}
    for (_, message), delivered in zip(accepted, deliveries, strict=True):
        work = Work(
            message.job or ONLINE_JOB, message.key or message.id, message.ref, message.data_b64, message.reply_to
        )
        if delivered > current.settings.max_deliveries:
            poison = Record.failure(work.job, work.key, "poison", "delivered too many times without finishing")
            _answer([(work.reply_to, poison)])
            continue
        works.append(work)
        topks[id(work)] = message.topk
    if not works:
        return
    for pairs in current.pipeline.run(works, max(topks.values())):
        answers = [(w, r.model_copy(update={"topk": r.topk[: topks[id(w)]]})) for w, r in pairs]
        started = time.perf_counter()
        _answer([(w.reply_to, r) for w, r in answers])
        current.store.write([r for w, r in answers if w.job != ONLINE_JOB])
        metrics.observe_records([r for _, r in answers], time.perf_counter() - started, current.pipeline.batch_size)


def _refuse_foreign_jobs(accepted: list[tuple[Any, OnlineMessage]]) -> list[tuple[Any, OnlineMessage]]:
    """Answer `forbidden` to requests that name a job which does not take online writes; keep the rest."""
    targets = [(message.job, message.key or message.id) for _, message in accepted if message.job]
    refusals = iter(state().store.online_refusals(targets) if targets else [])
    kept = []
    for request, message in accepted:
        refusal = next(refusals) if message.job else None
        if refusal is None:
            kept.append((request, message))
        else:
            _answer([(message.reply_to, Record.failure(ONLINE_JOB, message.id, "forbidden", refusal))])
    return kept


def _answer(answers: list[tuple[str, Record]]) -> None:
    for reply_to, reason in state().store.reply(answers):
        log.error("could not answer an online request on %r: %s", reply_to[:300], reason)


def register_tasks(app: Celery, settings: WorkerSettings) -> None:
    app.task(name=CHUNK_TASK, bind=True)(classify_chunk)
    app.task(
        name=ONLINE_TASK,
        base=Batches,
        flush_every=settings.online_batch_size,
        flush_interval=settings.online_flush_ms / 1000,
    )(classify_online)
