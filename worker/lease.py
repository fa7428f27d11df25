"""Leases: a task stays with a worker while the worker lives, and comes back soon after it dies.

The Redis transport redelivers an unacknowledged message once its entry in `unacked_index` is
older than the visibility timeout. kiln turns that timeout into a short lease (`KILN_LEASE_S`,
60 s): a thread in each consuming process moves the entries of every message it holds to "now"
every lease/6 seconds. A live worker therefore keeps its chunks however long they run, and a dead
worker's chunks are delivered again about one lease after its death, instead of after a timeout
that had to exceed the slowest chunk.

Each process that runs chunks also keeps a heartbeat key, `kiln:worker:{id}`, holding the task
it is running and expiring after one lease. It is how a new delivery of a chunk tells a worker
that died on it (count it towards poison) from one that is still running it (wait; never run a
live worker's chunk twice); see `worker/tasks.py`.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable

import redis
from celery import bootsteps

log = logging.getLogger(__name__)

IDLE = "-"


def _new_boot() -> None:
    global _boot
    _boot = secrets.token_hex(4)


_boot = ""
_new_boot()
os.register_at_fork(after_in_child=_new_boot)


def process_id() -> str:
    """This process as records, heartbeats and delivery entries name it: `host:pid:boot`, where
    `boot` is random per process start. host:pid alone is not unique: a restarted container's
    worker is pid 1 on the same hostname each time, and would take its previous life's chunks
    for its own (never counting that death towards poison)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_boot}"


def node_name() -> str:
    """This worker's Celery node name, `kiln-pid-boot@host`: unique per start as well."""
    host, pid, boot = process_id().split(":")
    return f"kiln-{pid}-{boot}@{host}"


def heartbeat_key(worker: str) -> str:
    return f"kiln:worker:{worker}"


def process_alive(worker: str) -> bool:
    """False when `worker` (`host:pid:boot`) is a process of this host that no longer exists, or an
    earlier life of this very process's pid (a restarted container); True when it exists, or
    lives on another host (whose death only its heartbeat's expiry shows)."""
    host, pid = [*worker.split(":"), ""][:2]
    if host != socket.gethostname() or not pid.isdigit():
        return True
    if int(pid) == os.getpid():
        return worker == process_id()
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Every(threading.Thread):
    """A daemon thread that calls `action` every `interval_s` seconds until `stop()`; failures are
    logged and retried at the next tick (Redis may be away for a while)."""

    def __init__(self, interval_s: float, action: Callable[[], None], name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.interval_s = interval_s
        self.action = action
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(self.interval_s):
            try:
                self.action()
            except redis.RedisError as e:
                log.warning("%s: Redis error, will retry in %.0f s: %s", self.name, self.interval_s, e)
            except Exception:
                log.exception("%s failed; will retry in %.0f s", self.name, self.interval_s)

    def stop(self) -> None:
        self._stopped.set()


class Heartbeat:
    """The heartbeat of one process that runs chunks: `kiln:worker:{id}` holds the tasks it runs
    (space-separated, or `-`; a process runs several at once on its task threads) and expires
    after `lease_s` unless refreshed."""

    def __init__(self, client: redis.Redis, lease_s: float) -> None:
        self.client = client
        self.lease_s = lease_s
        self.worker = process_id()
        self._tasks: set[str] = set()
        self._lock = threading.Lock()
        self._thread = Every(lease_s / 4, self.beat, "kiln-heartbeat")
        self._thread.start()

    def beat(self) -> None:
        with self._lock:
            value = " ".join(sorted(self._tasks)) or IDLE
        self.client.set(heartbeat_key(self.worker), value, ex=max(1, round(self.lease_s)))

    def begin(self, task_id: str) -> None:
        """Say that this process runs `task_id` now. Best effort: a missed beat only makes
        another delivery wait one more tick."""
        with self._lock:
            self._tasks.add(task_id)
        self._beat_now()

    def end(self, task_id: str) -> None:
        with self._lock:
            self._tasks.discard(task_id)
        self._beat_now()

    def _beat_now(self) -> None:
        try:
            self.beat()
        except redis.RedisError as e:
            log.warning("heartbeat not written (%s); the next beat will retry", e)

    def stop(self) -> None:
        self._thread.stop()


def holder_running(client: redis.Redis, worker: str, task_id: str) -> bool:
    """Whether `worker` is alive and running `task_id` now."""
    if not process_alive(worker):
        return False
    value = client.get(heartbeat_key(worker))
    return value is not None and task_id.encode() in value.split()


class LeaseRenewal(bootsteps.StartStopStep):
    """Celery consumer step: renews the lease of every message this worker holds (reserved or
    running), from a thread, since a solo worker's event loop is blocked while a task runs."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c, **kwargs) -> None:
        super().__init__(c, **kwargs)
        self._channel = None
        self._thread: Every | None = None

    def start(self, c) -> None:
        # Called again after every reconnect, with a new channel: renew that one's messages.
        self._channel = c.task_consumer.channel
        if self._thread is None:
            lease_s = self._channel.visibility_timeout
            self._client = redis.Redis.from_url(
                c.app.conf.broker_url, socket_timeout=lease_s / 6, socket_connect_timeout=lease_s / 6
            )
            self._thread = Every(lease_s / 6, self.renew, "kiln-lease")
            self._thread.start()

    def renew(self) -> None:
        channel = self._channel
        if channel is None:
            return
        tags = channel.qos.held()
        if tags:
            # XX: renew only what is still unacknowledged; never bring back an acknowledged message.
            self._client.zadd(channel.unacked_index_key, dict.fromkeys(tags, time.time()), xx=True)

    def shutdown(self, c) -> None:
        if self._thread is not None:
            self._thread.stop()
            self._thread = None
