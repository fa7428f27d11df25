"""Redis faults as a producer sees them: ride out a restart or a pause with retries and backoff,
and turn what is left into one line that says what to do, with no password in it.

redis-py's own `Retry` counts attempts; a producer needs a deadline instead (the caller's
timeout, or `KILN_REDIS_RETRY_S`), so the loop is here and only the backoff is redis-py's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis
from kombu.exceptions import OperationalError
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import AuthorizationError, NoPermissionError

from worker.retry import is_transient
from worker.settings import mask_url

log = logging.getLogger(__name__)
T = TypeVar("T")

_BACKOFF = ExponentialWithJitterBackoff(base=0.1, cap=2.0)


class RedisUnavailable(ConnectionError):
    """Redis did not answer, or refused, within the time allowed; the message says what to do."""


def redis_error(error: BaseException) -> redis.RedisError | None:
    """The redis-py error behind `error` (kombu wraps them in its own), if there is one."""
    seen = error
    while seen is not None:
        if isinstance(seen, redis.RedisError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def transient(error: BaseException) -> bool:
    """A fault that may pass: Redis down, restarting, loading its data, paused, full, busy with a
    script, failing over or failing to save (`worker.retry.is_transient`), but not a credential refused."""
    cause = redis_error(error)
    if isinstance(cause, redis.AuthenticationError | AuthorizationError):
        return False
    if cause is None:
        return isinstance(error, OperationalError)  # kombu lost its connection
    return is_transient(cause)


def describe(error: BaseException, url: str) -> str:
    """One line: what went wrong with the Redis at `url` (masked) and what to do about it."""
    where = f"Redis at {mask_url(url)}"
    cause = redis_error(error) or error
    detail = mask_url(str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__)
    if isinstance(cause, redis.AuthenticationError | AuthorizationError | NoPermissionError):
        return f"{where} refused the credentials ({detail}): check the user and password in KILN_REDIS_URL"
    if isinstance(cause, redis.OutOfMemoryError):
        return (
            f"{where} is out of memory ({detail}): raise its maxmemory or delete old jobs, then run the same "
            "command again (what was written is kept)"
        )
    if isinstance(cause, redis.ReadOnlyError):
        return f"{where} is a read-only replica: point KILN_REDIS_URL at the primary"
    if isinstance(cause, redis.ConnectionError | redis.TimeoutError | OperationalError):
        return f"cannot reach {where} ({detail}): check that it is running and that KILN_REDIS_URL points at it"
    return f"{where} refused a command ({detail})"


def retrying(call: Callable[[], T], url: str, budget_s: float, deadline: float | None = None) -> T:
    """`call()`, retried with exponential backoff and jitter while Redis faults are transient,
    for at most `budget_s` seconds and never past `deadline` (time.monotonic()).

    Raises RedisUnavailable (a ConnectionError) with `describe`'s message when time runs out or
    the fault cannot pass (a wrong password)."""
    give_up = time.monotonic() + budget_s
    if deadline is not None:
        give_up = min(give_up, deadline)
    attempt = 0
    while True:
        try:
            return call()
        except (redis.RedisError, OperationalError) as error:
            attempt += 1
            delay = _BACKOFF.compute(attempt)
            if not transient(error) or time.monotonic() + delay > give_up:
                raise RedisUnavailable(describe(error, url)) from error
            if attempt == 1:  # once per outage: the retries themselves would flood the terminal
                left = (
                    "until the command's timeout"
                    if budget_s == float("inf")
                    else f"for up to {budget_s:g} s (KILN_REDIS_RETRY_S)"
                )
                log.warning("Redis at %s: %s; retrying %s", mask_url(url), mask_url(str(error)), left)
            time.sleep(delay)
