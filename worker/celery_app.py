"""The Celery app: every setting in one place. Producers build the same app to send tasks by name;
nothing here imports torch.
"""

from __future__ import annotations

from celery import Celery

from worker.contract import BULK_QUEUE, CHUNK_TASK, ONLINE_QUEUE, ONLINE_TASK
from worker.settings import CommonSettings, WorkerSettings


def make_app(settings: CommonSettings) -> Celery:
    if not settings.redis_url:
        raise ValueError("no Redis configured: set KILN_REDIS_URL (e.g. redis://localhost:6379/0)")
    app = Celery("kiln", broker=settings.redis_url, set_as_current=False)
    app.conf.update(
        # JSON only: a pickled message could run code in the worker.
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        # Results go to kiln's own store (worker/store.py), not Celery's backend.
        task_ignore_result=True,
        # A task is acknowledged only once its records are written; a worker that dies mid-task
        # leaves it to be delivered again (deliveries are capped in worker/tasks.py).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        broker_connection_retry_on_startup=True,
        task_default_queue=BULK_QUEUE,
        task_routes={CHUNK_TASK: {"queue": BULK_QUEUE}, ONLINE_TASK: {"queue": ONLINE_QUEUE}},
        task_create_missing_queues=True,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
    )
    if isinstance(settings, WorkerSettings):
        visibility = settings.visibility_timeout_s
        app.conf.broker_transport_options = {
            "visibility_timeout": visibility,
            # Sweep for the unacknowledged tasks of dead workers every few seconds (kombu's
            # default scans about every 100 s), so they come back soon after the timeout.
            "unacked_restore_interval": max(1, min(10, visibility // 6)),
            "unacked_restore_throttle": 1,
            "max_message_bytes": settings.max_message_bytes,
        }
        if settings.redis_url.startswith("redis://"):
            # Refuses an oversized message before parsing it (worker/transport.py).
            app.conf.broker_transport = "worker.transport:Transport"
        # celery-batches only sees as many online requests as the worker prefetches (FACTS.md);
        # bulk-only workers take one chunk at a time, leaving the rest to other workers.
        online = ONLINE_QUEUE in settings.queues
        app.conf.worker_prefetch_multiplier = settings.online_batch_size if online else 1
    return app
