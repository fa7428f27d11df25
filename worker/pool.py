"""The worker's task pool: Celery's thread pool, with a cold shutdown that completes.

Celery's cold shutdown (SIGQUIT, or a second Ctrl-C) cancels each running task through the pool's
`terminate_job`, which the thread pool does not implement (celery/celery#10490): the
NotImplementedError came out of the signal handler wherever the main thread was (once in the
middle of acknowledging a message), stopped the consumer as an "Unrecoverable error", and
`python -m worker` exited saying so. A thread cannot be stopped from outside, so here a running
chunk task finishes its chunk (its records are written, at most once more by the worker the chunk
is given back to); the rest of the cold shutdown proceeds: no more chunks are taken and the
reserved ones go back to the queue at once.
"""

from __future__ import annotations

import logging

from celery.concurrency.thread import TaskPool

log = logging.getLogger(__name__)


class ThreadPool(TaskPool):
    def terminate_job(self, pid: int, signal: int | None = None) -> None:
        log.warning("a running task cannot be interrupted in its thread: it finishes first")
