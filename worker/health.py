"""Worker health: liveness (still consuming) and readiness (model loaded, broker reached).

A monitor thread in the worker's main process pings the broker on a connection of its own and
reads the depth of the queues it consumes, every few seconds. From that and Celery's own
bookkeeping it decides (where a parent runs several worker processes, worker/supervisor.py, each
of them monitors itself and writes what it finds to the parent's folder every check; the parent's
endpoint adds their reports to its own):

- **ready**: a process has loaded the model (each writes a marker, `mark_loaded`) and the last
  ping reached the broker;
- **live**, unless one of these has lasted `KILN_LIVENESS_TIMEOUT_S`:
  - the broker is unreachable (a hung connection looks like this too: the ping times out);
  - messages wait in a consumed queue while this worker runs no task and receives none: it has
    stopped consuming, as Celery workers have been reported to do after a reconnect;
  - the monitor itself stopped checking (or a worker process stopped reporting).

`python -m worker.health` asks a running worker's endpoint (worker/endpoint.py) and exits 0 when
it is live and ready, 1 otherwise: the image's HEALTHCHECK.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import redis
from pydantic import ValidationError

from worker.metrics import MULTIPROC_ENV
from worker.settings import WorkerSettings, settings_error

_MARKER = "loaded-"
_REPORT = "live-"


def endpoint_folder() -> Path | None:
    """The endpoint's folder this process writes its metrics and health files to (inherited from
    the process that serves the endpoint), or None where there is no endpoint."""
    directory = os.environ.get(MULTIPROC_ENV)
    return Path(directory) if directory else None


def mark_loaded() -> None:
    """Record that this process has loaded its model (read by the main process's monitor)."""
    directory = endpoint_folder()
    if directory:
        (directory / f"{_MARKER}{os.getpid()}").touch()


def process_files(pid: int) -> list[Path]:
    """The health files process `pid` writes to the endpoint folder (none where there is no endpoint)."""
    directory = endpoint_folder()
    return [directory / f"{prefix}{pid}" for prefix in (_MARKER, _REPORT)] if directory else []


def expect_report(pid: int) -> None:
    """In a parent, for the worker process `pid` it just started: an empty report dated now, so
    that one that hangs before its first report goes stale like one that stops reporting."""
    directory = endpoint_folder()
    if directory:
        (directory / f"{_REPORT}{pid}").touch()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def loaded_processes(directory: Path) -> int:
    """Live processes that have loaded the model, by their markers in `directory`."""
    return sum(1 for p in directory.glob(f"{_MARKER}*") if _alive(int(p.name.removeprefix(_MARKER))))


def children_problems(directory: Path, now: float, stale_s: float) -> list[str]:
    """The liveness problems the running worker processes last reported to `directory`, and
    those that made no report for `stale_s` seconds (`now` and the reports' times: `time.time()`)."""
    problems = []
    for report in sorted(directory.glob(f"{_REPORT}*[0-9]")):
        pid = int(report.name.removeprefix(_REPORT))
        if not _alive(pid):
            continue
        try:
            age, lines = now - report.stat().st_mtime, report.read_text().splitlines()
        except FileNotFoundError:  # replaced just now
            continue
        if age > stale_s:
            problems.append(f"worker process {pid} made no health report for {age:.0f} s")
        problems += [f"worker process {pid}: {line}" for line in lines if line]
    return problems


@dataclass
class HealthState:
    """What the monitor last saw; times are `time.monotonic()` seconds."""

    started: float = field(default_factory=time.monotonic)
    checked: float | None = None  # the monitor's last completed check
    broker_ok: bool = False
    broker_error: str = "not checked yet"
    broker_seen: float | None = None  # last successful ping
    queue_depths: dict[str, int] = field(default_factory=dict)
    received: float | None = None  # last task message received
    waiting_since: float | None = None  # since when work waits while this worker is idle


def liveness_problems(state: HealthState, now: float, timeout_s: float, check_interval_s: float) -> list[str]:
    """Why the worker is not live (empty: live). Pure: `now` and `state` say everything."""
    problems = []
    last_check = state.checked if state.checked is not None else state.started
    if now - last_check > max(timeout_s, 4 * check_interval_s):
        problems.append(f"health monitor made no check for {now - last_check:.0f} s")
    seen = state.broker_seen if state.broker_seen is not None else state.started
    if not state.broker_ok and now - seen > timeout_s:
        problems.append(f"broker unreachable for {now - seen:.0f} s: {state.broker_error}")
    if state.waiting_since is not None and now - state.waiting_since > timeout_s:
        waiting = sum(state.queue_depths.values())
        problems.append(
            f"{waiting} messages waiting, and this idle worker has received none for {now - state.waiting_since:.0f} s"
        )
    return problems


class HealthMonitor:
    """Checks the broker and the queues every `interval_s` seconds in a daemon thread.

    `role`: "worker" (a worker of one process, serving its own endpoint), "child" (one of a
    parent's worker processes: also writes its liveness problems to `directory` each check) or
    "parent" (consumes nothing itself: its liveness adds the children's reports)."""

    def __init__(
        self, settings: WorkerSettings, directory: Path, role: Literal["worker", "child", "parent"] = "worker"
    ) -> None:
        self.role = role
        self.timeout_s = settings.liveness_timeout_s
        self.interval_s = max(0.5, min(5.0, self.timeout_s / 4))
        self.queues = list(settings.queues)
        self.directory = directory
        self.state = HealthState()
        # A connection of its own, with timeouts: a hung broker makes the ping fail, not hang.
        timeout = min(5.0, self.timeout_s / 2)
        self._redis = redis.Redis.from_url(settings.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._lock = threading.Lock()

    def start(self) -> None:
        from celery import signals

        signals.task_received.connect(self._on_received, weak=False)
        threading.Thread(target=self._run, name="kiln-health", daemon=True).start()

    def _on_received(self, **_: object) -> None:
        with self._lock:
            self.state.received = time.monotonic()
            self.state.waiting_since = None

    def _run(self) -> None:
        while True:
            self.check()
            time.sleep(self.interval_s)

    def check(self) -> None:
        """One round: ping, read the queue depths, update the state."""
        from celery.worker import state as worker_state

        try:
            with self._redis.pipeline(transaction=False) as pipe:
                for queue in self.queues:
                    pipe.llen(queue)
                depths = dict(zip(self.queues, pipe.execute(), strict=True))
            ok, error = True, ""
        except redis.RedisError as e:
            depths, ok, error = {}, False, f"{type(e).__name__}: {e}"
        now = time.monotonic()
        with self._lock:
            s = self.state
            s.broker_ok, s.broker_error, s.queue_depths, s.checked = ok, error, depths, now
            if ok:
                s.broker_seen = now
            consuming_here = self.role != "parent"
            idle_with_work = consuming_here and ok and sum(depths.values()) > 0 and not worker_state.active_requests
            if not idle_with_work:
                s.waiting_since = None
            elif s.waiting_since is None:
                s.waiting_since = now
        if self.role == "child":
            report = self.directory / f"{_REPORT}{os.getpid()}"
            partial = report.with_suffix(".partial")
            partial.write_text("\n".join(self.live()))
            partial.replace(report)  # the parent never reads half a report

    def live(self) -> list[str]:
        with self._lock:
            problems = liveness_problems(self.state, time.monotonic(), self.timeout_s, self.interval_s)
        if self.role == "parent":
            problems += children_problems(self.directory, time.time(), max(self.timeout_s, 4 * self.interval_s))
        return problems

    def ready(self) -> list[str]:
        problems = []
        if not loaded_processes(self.directory):
            problems.append("no worker process has loaded the model yet")
        with self._lock:
            if not self.state.broker_ok:
                problems.append(f"broker not reached: {self.state.broker_error}")
        return problems


def endpoint_port(settings: WorkerSettings) -> int:
    """The port of this host's worker endpoint: KILN_METRICS_PORT, else the one the worker wrote to
    KILN_METRICS_PORT_FILE (when it chose a free one). Raises ValueError saying what to set."""
    if settings.metrics_port:
        return settings.metrics_port
    if settings.metrics_port_file:  # the worker chose a free port (KILN_METRICS_PORT=0) and wrote it here
        try:
            return int(Path(settings.metrics_port_file).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read the endpoint's port from {settings.metrics_port_file}: {e}") from None
    if settings.metrics_port == 0:
        raise ValueError("KILN_METRICS_PORT=0 needs KILN_METRICS_PORT_FILE to find the port chosen")
    raise ValueError(
        "no endpoint port: pass --port N (the worker's --metrics-port), or set KILN_METRICS_PORT (or "
        "KILN_METRICS_PORT_FILE) here as on the worker"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.health",
        description="Exit 0 when the worker on this host is live (consuming) and ready (model loaded, broker "
        "reached), 1 otherwise, printing why. Asks the worker's endpoint, KILN_METRICS_PORT.",
    )
    parser.add_argument("--port", type=int, help="the worker's endpoint port [KILN_METRICS_PORT]")
    parser.add_argument("--live", action="store_true", help="only liveness")
    parser.add_argument("--ready", action="store_true", help="only readiness")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer")
    args = parser.parse_args(argv)
    # A settings error is the probe's own, said as one, but still exit status 1: Docker's
    # HEALTHCHECK reserves 2.
    try:
        port = args.port or endpoint_port(WorkerSettings())
    except ValidationError as e:
        print(f"error: {settings_error(e)}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    both = not (args.live or args.ready)
    paths = [path for path, asked in (("/livez", args.live), ("/readyz", args.ready)) if asked or both]
    healthy = True
    for path in paths:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=args.timeout) as answer:
                print(f"{path}: {answer.read().decode().strip()}")
        except urllib.error.HTTPError as e:
            print(f"{path}: {e.read().decode().strip()}", file=sys.stderr)
            healthy = False
        except OSError as e:
            print(f"{path}: no answer from the worker on port {port}: {e}", file=sys.stderr)
            healthy = False
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
