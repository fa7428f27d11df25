"""Riding out Redis faults: retry an operation with capped exponential backoff, logging each attempt.

A worker must not lose work because Redis paused, restarted, failed over or ran out of memory for
a while: every such error is transient from the worker's point of view, and the operations
retried here (upserts, delivery bookkeeping) are idempotent. The delays come from redis-py's own
backoff (`ExponentialWithJitterBackoff`); this module only adds the deadline and the log line.
Shard writes of sharded output (worker/sink.py) ride out a failing folder or object store the same way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis
from redis.backoff import ExponentialWithJitterBackoff

log = logging.getLogger(__name__)

T = TypeVar("T")

BACKOFF_BASE_S = 0.25
BACKOFF_CAP_S = 10.0


_TRANSIENT_REPLIES = (
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.ExecAbortError,  # a transaction refused whole, e.g. on OOM
    redis.exceptions.TryAgainError,
)
_TRANSIENT_TEXTS = ("OOM", "maxmemory", "READONLY", "LOADING", "MASTERDOWN", "TRYAGAIN", "EXECABORT")


class Unavailable(RuntimeError):
    """A service kept failing an operation for longer than the caller was willing to wait."""

    service = "a service"  # how log lines name it


class RedisUnavailable(Unavailable):
    """Redis kept failing an operation for longer than the caller was willing to wait."""

    service = "Redis"


def is_transient(error: BaseException) -> bool:
    """Whether a Redis error may go away by itself: connection loss, timeouts, a server that is
    loading its data, a replica that is read-only during a failover, or a full server (OOM)."""
    if isinstance(error, (redis.ConnectionError, redis.TimeoutError, *_TRANSIENT_REPLIES)):
        return True
    # Errors inside a pipeline or a script arrive as a plain ResponseError with the reply's text.
    return isinstance(error, redis.ResponseError) and any(mark in str(error) for mark in _TRANSIENT_TEXTS)


def shutting_down(warm: bool = False) -> bool:
    """Whether this Celery worker was told to stop: a cold shutdown (SIGQUIT, or a second
    SIGTERM), or with `warm`, any shutdown."""
    from celery.worker import state

    return state.should_terminate is not None or (warm and state.should_stop is not None)


def with_retries(
    operation: Callable[[], T],
    what: str,
    give_up_after_s: float | None,
    abandon: Callable[[], bool] = shutting_down,
    transient: Callable[[BaseException], bool] = is_transient,
    unavailable: type[Unavailable] = RedisUnavailable,
) -> T:
    """Run `operation`, retrying errors that `transient` accepts (by default: transient Redis
    errors) with backoff.

    `what` names the operation in the log. `give_up_after_s=None` retries forever (for a message
    that exists nowhere but in this process), unless `abandon()` says to stop (by default: on a
    cold shutdown of the worker). Raises `unavailable` (by default `RedisUnavailable`) once the
    deadline passes or on `abandon()`; any other error propagates at once."""
    backoff = ExponentialWithJitterBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S)
    deadline = None if give_up_after_s is None else time.monotonic() + give_up_after_s
    attempt = 0
    while True:
        try:
            result = operation()
        except Exception as error:
            if not transient(error):
                raise
            attempt += 1
            delay = max(backoff.compute(attempt), BACKOFF_BASE_S)
            if abandon():
                raise unavailable(f"abandoned retrying to {what}: the worker is shutting down") from error
            if deadline is not None and time.monotonic() + delay > deadline:
                raise unavailable(
                    f"gave up to {what} after {attempt} attempts in {give_up_after_s:.0f} s: "
                    f"{type(error).__name__}: {error}"
                ) from error
            log.warning(
                "%s failed to %s (attempt %d: %s: %s); retrying in %.1f s",
                unavailable.service, what, attempt, type(error).__name__, error, delay,
            )  # fmt: skip
            time.sleep(delay)
        else:
            if attempt:
                log.warning("%s is back: %s succeeded after %d failed attempts", unavailable.service, what, attempt)
            return result
