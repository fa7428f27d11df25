"""The worker's task pool: Celery's thread pool, with a cold shutdown that completes.

Celery's cold shutdown (SIGQUIT, or a second Ctrl-C) cancels each running task through the pool's
`terminate_job`, which the thread pool does not implement (celery/celery#10490): the
NotImplementedError came out of the signal handler wherever the main thread was (once in the
middle of acknowledging a message), stopped the consumer as an "Unrecoverable error", and
`python -m worker` exited saying so. A thread cannot be stopped from outside, so here a running
chunk task finishes its chunk (its records are written, at most once more by the worker the chunk
is given back to); the rest of the cold shutdown proceeds: no more chunks are taken and the
reserved ones go back to the queue at once.

A message the consumer reads in the moment between the pool's stop and its own is not run either:
the stopped pool leaves it unacknowledged (kiln's tasks acknowledge late), and the connection's
close puts it back on the queue. Celery's pool raised "cannot schedule new futures after shutdown"
there, which stopped the worker as an "Unrecoverable error" with a traceback (seen once in CI).
"""

from __future__ import annotations

import logging
from typing import Any

from celery.concurrency.thread import ApplyResult, TaskPool

log = logging.getLogger(__name__)


class ThreadPool(TaskPool):
    _stopped = False

    def terminate_job(self, pid: int, signal: int | None = None) -> None:
        log.warning("a running task cannot be interrupted in its thread: it finishes first")

    def on_stop(self) -> None:
        self._stopped = True
        super().on_stop()

    def on_apply(self, *args: Any, **kwargs: Any) -> ApplyResult | None:
        try:
            return super().on_apply(*args, **kwargs)
        except RuntimeError:  # the executor's "cannot schedule new futures after shutdown"
            if not self._stopped:
                raise
            log.info("a task arrived as the worker stopped: unacknowledged, it goes back to the queue")
            return None
