"""A redis-server process that the fault tests and the soak benchmark pause, restart and fill.

Its data lives in an append-only file with `appendfsync always`, so a restart keeps the queue as
a production Redis with AOF does (SIGTERM: Redis writes the file and exits).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from producer.embedded import find_redis_server


class RedisServer:
    def __init__(self, folder: Path, *options: str) -> None:
        """`options`: more redis-server options, after (so overriding) the defaults here."""
        self.folder = folder
        self.options = options
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self, timeout_s: float = 60) -> None:
        self.process = subprocess.Popen(
            [find_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--logfile", "redis.log", *self.options],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start; see {self.folder / 'redis.log'}")
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            with redis.Redis.from_url(self.url, socket_timeout=1) as client:
                return bool(client.ping())
        except redis.RedisError:  # not listening yet, or loading its data
            return False

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=30)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
            self.process.terminate()
            self.process.wait(60)

    def restart(self, down_s: float = 1.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    @contextlib.contextmanager
    def paused(self, seconds: float) -> Iterator[None]:
        """Freeze Redis (kill -STOP) for `seconds`: connections stay open, nothing answers."""
        self.process.send_signal(signal.SIGSTOP)
        try:
            time.sleep(seconds)
            yield
        finally:
            self.process.send_signal(signal.SIGCONT)
