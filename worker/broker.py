"""kiln's Redis transport: kombu's, with two changes that keep deliveries whole under faults.

kombu's Redis transport takes a message off its queue with BRPOP, then files it in the
`unacked` hash (with its delivery time in `unacked_index`) in a second round trip. Between the
two, the message exists only in this process. If that second write fails (Redis paused past the
socket timeout, restarting, or full with `noeviction`), kombu lets the error escape and the
message is gone. Here the write is retried with backoff until it succeeds, logging each attempt:
the worker holds back, and nothing is lost. Declaring queues at start-up is retried the same way.

A worker also reserves messages ahead of the ones it runs (the prefetch). Online requests need
that: celery-batches only batches what was prefetched. Bulk chunks must not be hoarded: a chunk
reserved by a busy worker waits while another worker idles. So once a worker holds
`bulk_prefetch` bulk chunks (what its processes run at once), it BRPOPs the other queues only,
with a short timeout, so that it takes the next chunk as soon as one is acknowledged.

Messages over `max_message_bytes` are dropped unread and dead-lettered (worker/message_cap.py).

An error reply that means "not now" (BUSY, READONLY, UNBLOCKED, MISCONF, OOM, LOADING, ...: see
`worker.retry.is_transient`) on the consuming connection is raised as a connection error, so that
Celery reconnects with backoff instead of stopping the worker; acknowledging and giving messages
back are retried like the unacked bookkeeping.

Select it with `broker_transport="worker.broker:Transport"` (worker/celery_app.py does).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.utils.scheduling import round_robin_cycle

from worker.contract import BULK_QUEUE
from worker.message_cap import CappedClient, capped_parser
from worker.retry import is_transient, reply_code, shutting_down, with_retries

log = logging.getLogger(__name__)


class QoS(kombu_redis.QoS):
    def append(self, message, delivery_tag) -> None:
        with_retries(
            lambda: super(QoS, self).append(message, delivery_tag),
            f"file delivered message {delivery_tag} as unacknowledged",
            give_up_after_s=None,  # it is in no queue now: only a cold shutdown gives it up (and loses it)
        )

    # Acknowledging (or giving back) a message that Redis cannot take now must not fail: a tag
    # whose ack failed stays held by this worker, whose lease renewal would keep it forever.
    # Both are idempotent (the give-back is one transaction that finds the message only once).
    # Then the message is let go at once: kombu drops an acknowledged message from `_delivered`
    # only at the next delivery, and its event loop keeps the last ack callback (and so the
    # message) until the next event: an idle worker kept its last online requests' inline images,
    # body and parsed envelope, ~4.5x the image each.
    def ack(self, delivery_tag) -> None:
        message = self._delivered.get(delivery_tag)
        ack = lambda: super(QoS, self).ack(delivery_tag)  # noqa: E731
        with_retries(ack, f"acknowledge message {delivery_tag}", give_up_after_s=None)
        self._let_go(message)

    def reject(self, delivery_tag, requeue=False) -> None:
        message = self._delivered.get(delivery_tag)
        reject = lambda: super(QoS, self).reject(delivery_tag, requeue=requeue)  # noqa: E731
        with_retries(reject, f"give back message {delivery_tag}", give_up_after_s=None)  # a requeue re-sends first
        self._let_go(message)

    def _let_go(self, message) -> None:
        self._flush()
        if message is not None:  # Celery's request holds what it parsed: nothing reads these again
            message.body = message._raw = message._decoded_cache = None

    def restore_visible(self, *args, **kwargs) -> None:
        # A periodic sweep (and the first one, at start-up): when Redis cannot take it now, the
        # next sweep will; kombu would let the error stop the worker.
        try:
            super().restore_visible(*args, **kwargs)
        except redis.RedisError as e:
            if not is_transient(e):
                raise
            log.warning("could not bring back lapsed messages (%s: %s); the next sweep will", type(e).__name__, e)

    def held(self) -> list[str]:
        """Delivery tags this channel holds unacknowledged: reserved or running."""
        dirty = set(self._dirty)  # acknowledged, not yet flushed from _delivered
        return [tag for tag in tuple(self._delivered) if tag not in dirty]

    def held_bulk(self) -> int:
        delivered = self._delivered
        return sum(
            1 for tag in self.held() if (m := delivered.get(tag)) and m.delivery_info.get("routing_key") == BULK_QUEUE
        )


def _any_shutdown() -> bool:
    return shutting_down(warm=True)


class _BulkCappedCycle(round_robin_cycle):
    """kombu's round robin over queues, leaving out the bulk queue while the channel holds its cap."""

    def __init__(self, channel: Channel) -> None:
        super().__init__()
        self.channel = channel

    def consume(self, n: int) -> list[str]:
        queues = super().consume(n)
        if self.channel.at_bulk_cap():
            return [q for q in queues if q != BULK_QUEUE]
        return queues


# While a worker holds its cap of bulk chunks, its BRPOP on the other queues returns after this
# long, so that a chunk slot freed by an acknowledgement is filled within it: kombu's 1 s BRPOP
# held each slot empty for up to a second, which capped a GPU worker at 8 chunks (1,000 images)
# a second (bench/results/gpu-h200.json, "e2e").
CAPPED_BRPOP_TIMEOUT_S = 0.02


class NotNow(redis.ConnectionError):
    """An error reply on the consuming connection that means "not now" (`is_transient`): Redis
    busy with a script, demoted in a failover (BRPOP answers `UNBLOCKED`, then `READONLY`), its
    disk failing (`MISCONF`), full, or loading. As a connection error, Celery reconnects with
    backoff and logs each attempt; as the error reply it is, Celery stopped the worker."""


class Client(CappedClient):
    """The client kombu consumes with (see `CappedClient`), raising `NotNow` for transient replies."""

    def parse_response(self, connection: Any, command_name: str | bytes, **options: Any) -> Any:
        try:
            return super().parse_response(connection, command_name, **options)
        except redis.ResponseError as e:
            if is_transient(e):
                code, text = reply_code(e), str(e)
                raise NotNow(f"{command_name!s}: {text if text.startswith(code) else f'{code} {text}'}") from e
            raise


class Channel(kombu_redis.Channel):
    QoS = QoS
    bulk_prefetch = 0  # bulk chunks reserved at most (0: no cap beyond the prefetch count)
    max_message_bytes = 64 * 1024 * 1024  # larger messages are dropped unread (worker/message_cap.py)
    from_transport_options = (*kombu_redis.Channel.from_transport_options, "bulk_prefetch", "max_message_bytes")

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        params = super()._connparams(asynchronous=asynchronous)
        params["parser_class"] = capped_parser(self.max_message_bytes)
        return params

    def _get_client(self) -> Any:
        if self.global_keyprefix:  # kiln sets none; kombu's prefixed client would lose the cap
            raise ValueError("kiln's transport does not support global_keyprefix")
        return functools.partial(Client, max_message_bytes=self.max_message_bytes)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._queue_cycle = _BulkCappedCycle(self)
        self._update_queue_cycle()

    def at_bulk_cap(self) -> bool:
        return bool(self.bulk_prefetch) and self.qos.held_bulk() >= self.bulk_prefetch

    def _brpop_start(self, timeout: float | None = None) -> None:
        if timeout is None and self.at_bulk_cap():
            timeout = CAPPED_BRPOP_TIMEOUT_S
        super()._brpop_start(timeout)

    # Declaring and binding queues write to Redis: a worker started while Redis is full (or
    # loading its data after a restart) waits here instead of exiting.
    # Nothing is lost by giving up here, so any shutdown (SIGTERM) ends the wait.
    def queue_declare(self, *args, **kwargs):
        declare = lambda: super(Channel, self).queue_declare(*args, **kwargs)  # noqa: E731
        return with_retries(declare, "declare a queue", None, abandon=_any_shutdown)

    def queue_bind(self, *args, **kwargs):
        bind = lambda: super(Channel, self).queue_bind(*args, **kwargs)  # noqa: E731
        return with_retries(bind, "bind a queue", None, abandon=_any_shutdown)


class Transport(kombu_redis.Transport):
    Channel = Channel
