"""The Celery app: every setting in one place. Producers build the same app to send tasks by name;
nothing here imports torch.
"""

from __future__ import annotations

import warnings

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
        configure_worker(app, settings)
    return app


def configure_worker(app: Celery, settings: WorkerSettings) -> None:
    """Delivery settings of a worker; README.md "Delivery" gives the reasons for each number."""
    from worker.celery_worker import KilnWorker
    from worker.lease import LeaseRenewal

    lease = settings.lease_s
    timeout = settings.redis_timeout_s
    app.conf.update(
        # kombu's Redis transport with lossless unacked bookkeeping and a cap on reserved bulk
        # chunks (worker/broker.py); the consumer dead-letters refused messages (worker/consumer.py).
        broker_transport="worker.broker:Transport",
        worker_consumer="worker.consumer:KilnConsumer",
        # Connecting, and every Redis command, time out: an endpoint that accepts TCP and never
        # answers is retried with backoff, and each attempt is logged, instead of hanging.
        broker_connection_timeout=timeout,
        broker_connection_retry=True,
        broker_connection_max_retries=None,
        # A task that runs on through a broker reconnect keeps its records: they go to kiln's store,
        # and its message's lease to the unacked bookkeeping (worker/broker.py), not to the lost
        # connection. Pinned against Celery 6's default; its warning of that default is filtered
        # below, since a user read it in the log as an error.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_transport_options={
            # The visibility timeout is a lease that live workers renew (worker/lease.py).
            "visibility_timeout": lease,
            "unacked_restore_interval": max(1, min(5, lease // 12)),
            # The sweep that brings lapsed messages back holds a lock in Redis while it runs. A worker
            # killed during a sweep leaves the lock behind until it expires: kombu's 300 s would hold
            # every other worker's sweep, and a dead worker's chunks, that long, past the lease.
            "unacked_mutex_expire": max(5, lease // 6),
            "unacked_restore_throttle": 1,
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "health_check_interval": min(25, max(1, round(timeout))),
            # Bulk chunks reserved at most: what the worker process runs at once (its chunk tasks
            # in flight); online requests are prefetched so that celery-batches can batch them.
            "bulk_prefetch": settings.tasks_in_flight or 1,
            "max_message_bytes": settings.max_message_bytes,
        },
    )
    warnings.filterwarnings("ignore", message="(?s).*worker_cancel_long_running_tasks_on_connection_loss")
    online = ONLINE_QUEUE in settings.queues
    # Threads, not prefork: worker/pool.py says why this subclass of Celery's thread pool.
    app.conf.worker_pool = "worker.pool:ThreadPool"
    app.conf.worker_prefetch_multiplier = settings.online_batch_size if online else 1
    app.steps["consumer"].add(LeaseRenewal)
    app.Worker = app.subclass_with_self(KilnWorker)
