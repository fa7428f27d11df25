"""The Celery consumer, with kiln's handling of messages that never reach a task.

Celery refuses a message whose content type is not accepted (pickle, YAML, ...), one it cannot
decode, or one naming an unknown task, before any kiln code runs: it logs the whole body (which
may be megabytes, or a pickle crafted to run code) and drops the message. kiln's consumer keeps
such a message in `kiln:dead-letters` instead, with the reason, its headers and the size and
digest of its body, logs one line without the body, and acknowledges it, so it is never retried.
The body itself is not kept: it was refused because it cannot be trusted.

An error that escapes the consumer (one that reconnecting does not heal) is kept in
`stopped_by`, for `python -m worker` to exit non-zero with it.

It also wakes its event loop every `CAPPED_BRPOP_TIMEOUT_S` while it holds its cap of bulk chunks:
a worker that consumes the bulk queue only has nothing to poll then, and would otherwise take the
next chunk only when the loop next woke for something else (up to a second after an
acknowledgement). Below the cap its BRPOP wakes it, and the tick slows to `UNCAPPED_TICK_S`:
waking 50 times a second cost an idle worker 2% of a core (measured here).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from celery.worker.consumer import Consumer

from worker.broker import CAPPED_BRPOP_TIMEOUT_S
from worker.store import ResultStore

log = logging.getLogger(__name__)

_HEADERS_KEPT = ("task", "id", "root_id", "origin")
UNCAPPED_TICK_S = 0.25  # how soon a worker that has just reached its cap starts ticking fast


def describe(message: Any, error: BaseException | None, reason: str) -> dict[str, Any]:
    """A dead-letter entry for a refused kombu message: reason, content type, task headers and
    the body's size and sha256, never the body."""
    body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
    headers = message.headers if isinstance(message.headers, dict) else {}
    return {
        "reason": f"{reason}: {type(error).__name__}: {error}" if error else reason,
        "content_type": message.content_type,
        "content_encoding": message.content_encoding,
        "headers": {k: str(headers[k])[:200] for k in _HEADERS_KEPT if k in headers},
        "queue": (message.delivery_info or {}).get("routing_key"),
        "body_bytes": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
    }


# Why the consumer stopped the worker, if it did: Celery logs "Unrecoverable error" and, run as
# kiln runs it, ends with status 0, so `python -m worker` reads this to exit non-zero with it.
stopped_by: list[str] = []


class KilnConsumer(Consumer):
    _store: ResultStore | None = None
    _tick: Any = None

    def start(self) -> None:
        # Celery's consumer reconnects on connection errors (and on Redis's "not now" replies:
        # worker/broker.py); what escapes here stops the worker.
        try:
            super().start()
        except Exception as e:
            stopped_by.append(f"{type(e).__name__}: {e}")
            raise

    def cancel_active_requests(self) -> None:
        """Celery's, run again when the task threads change the set it reads. Its cold shutdown
        (SIGQUIT) reads `active_requests` on the main thread while the thread pool's tasks finish
        and leave it: "RuntimeError: Set changed size during iteration", which stopped the worker
        as an unrecoverable error. It fails while it reads, before it cancels anything, so running
        it again is safe; the set only shrinks once the shutdown has begun."""
        while True:
            try:
                return super().cancel_active_requests()
            except RuntimeError as e:
                if "changed size during iteration" not in str(e):
                    raise

    def loop_args(self) -> tuple:
        # Called each time the event loop starts, also after a reconnect: one tick, on this hub.
        if self.hub is not None:
            if self._tick is not None:
                self._tick.cancel()
            self._schedule_tick()
        return super().loop_args()

    def _schedule_tick(self) -> None:
        """Wake the loop soon: every `CAPPED_BRPOP_TIMEOUT_S` at the cap of bulk chunks (waking is
        the point: the loop then polls for chunks again), every `UNCAPPED_TICK_S` below it."""
        channel = getattr(getattr(self, "task_consumer", None), "channel", None)
        at_cap = getattr(channel, "at_bulk_cap", None)
        capped = at_cap() if callable(at_cap) else True  # not kiln's channel: tick as at the cap
        self._tick = self.hub.call_later(CAPPED_BRPOP_TIMEOUT_S if capped else UNCAPPED_TICK_S, self._schedule_tick)

    def _dead_letter(self, message: Any, error: BaseException | None, reason: str) -> None:
        entry = describe(message, error, reason)
        try:
            if self._store is None:
                self._store = ResultStore.from_url(self.app.conf.broker_url)
            self._store.dead_letter(entry)
            log.error("dead-lettered a message (%s, %s)", entry["reason"], entry["content_type"])
        except Exception as e:
            log.error("could not dead-letter a message (%s): %s", entry["reason"], e)
        message.ack_log_error(log, self.connection_errors)

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        self._dead_letter(message, exc, "undecodable message")

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        self._dead_letter(message, exc, "refused message (only JSON is accepted)")

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        self._dead_letter(message, exc, "unknown task")

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._dead_letter(message, None, "not a task message")
