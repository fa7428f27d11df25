"""Riding out Redis faults: retry an operation with capped exponential backoff, logging each attempt.

A worker must not lose work because Redis paused, restarted, failed over or ran out of memory for
a while: every such error is transient from the worker's point of view, and the operations
retried here (upserts, delivery bookkeeping) are idempotent. The delays come from redis-py's own
backoff (`ExponentialWithJitterBackoff`); this module only adds the deadline and the log line.
Shard writes of sharded output (worker/sink.py) ride out a failing folder or object store the same way.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import TypeVar

import redis
from redis.backoff import ExponentialWithJitterBackoff

log = logging.getLogger(__name__)

T = TypeVar("T")

BACKOFF_BASE_S = 0.25
BACKOFF_CAP_S = 10.0


# Error replies that mean "not now": a script running elsewhere (BUSY), a server loading its data
# or demoted, promoted or cut off from its master in a failover (LOADING, READONLY, MASTERDOWN,
# UNBLOCKED, NOREPLICAS), a cluster resharding or down (TRYAGAIN, CLUSTERDOWN), a failing disk
# (MISCONF), a full server (OOM), or a transaction refused whole for one of those (EXECABORT).
# Any other error reply (a wrong type, a bad script) will not heal by waiting.
NOT_NOW_CODES = frozenset(
    [
        "BUSY",
        "LOADING",
        "READONLY",
        "MASTERDOWN",
        "UNBLOCKED",
        "NOREPLICAS",
        "TRYAGAIN",
        "CLUSTERDOWN",
        "MISCONF",
        "OOM",
        "EXECABORT",
    ]
)
# redis-py's classes for some of those codes (an error made by hand may carry no code)
_NOT_NOW_CLASSES = (
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.ExecAbortError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.MasterDownError,
)
# A code inside the text of another error reply: a script's failed call (`-OOM ...` after
# `@user_script`), as older servers report it.
_EMBEDDED_CODE = re.compile(r"-(" + "|".join(sorted(NOT_NOW_CODES)) + r")\b")


class Unavailable(RuntimeError):
    """A service kept failing an operation for longer than the caller was willing to wait."""

    service = "a service"  # how log lines name it


class RedisUnavailable(Unavailable):
    """Redis kept failing an operation for longer than the caller was willing to wait."""

    service = "Redis"


def _reply_text(error: redis.ResponseError) -> str:
    """The error reply as Redis sent it, less a pipeline's annotation (which quotes the command,
    whose arguments may hold any text)."""
    text = str(error.args[0]) if error.args else ""
    _, annotated, reply = text.partition(" of pipeline caused error: ")
    return reply if annotated else text


def reply_code(error: redis.ResponseError) -> str:
    """The code of a Redis error reply (`BUSY`, `OOM`, ...): redis-py strips the codes it knows
    from the text and keeps them as `status_code`; others stay the text's first word."""
    return getattr(error, "status_code", None) or _reply_text(error).split(" ", 1)[0]


def is_transient(error: BaseException) -> bool:
    """Whether a Redis error may go away by itself: connection loss, timeouts, or an error reply
    that means "not now" (`NOT_NOW_CODES`)."""
    if isinstance(error, (redis.ConnectionError, redis.TimeoutError, *_NOT_NOW_CLASSES)):
        return True
    if not isinstance(error, redis.ResponseError):
        return False
    return reply_code(error) in NOT_NOW_CODES or _EMBEDDED_CODE.search(_reply_text(error)) is not None


def shutting_down(warm: bool = False) -> bool:
    """Whether this Celery worker was told to stop: a cold shutdown (SIGQUIT, or a second
    SIGTERM), or with `warm`, any shutdown."""
    from celery.worker import state

    return state.should_terminate is not None or (warm and state.should_stop is not None)


def _sleep_unless(abandon: Callable[[], bool], seconds: float, step_s: float = 0.25) -> bool:
    """Sleep `seconds`, or until `abandon()` says to stop (checked every `step_s`); returns whether
    it did: a worker told to stop mid-backoff gave its chunk back only after the sleep, up to
    BACKOFF_CAP_S later, past `docker stop`'s grace."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        if abandon():
            return True
        time.sleep(min(step_s, left))
    return False


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
            if _sleep_unless(abandon, delay):
                raise unavailable(f"abandoned retrying to {what}: the worker is shutting down") from error
        else:
            if attempt:
                log.warning("%s is back: %s succeeded after %d failed attempts", unavailable.service, what, attempt)
            return result
