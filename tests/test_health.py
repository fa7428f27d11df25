"""Worker health (worker/health.py, worker/endpoint.py) against real workers and a real Redis:
ready once loaded, live while consuming; a Redis that goes away, or a connection that hangs,
makes the worker unready at once and not live after KILN_LIVENESS_TIMEOUT_S."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SAMPLES, python_env

from producer.embedded import LocalWorker, embedded_redis
from worker.health import HealthState, children_problems, liveness_problems

TIMEOUT_S = 6  # KILN_LIVENESS_TIMEOUT_S of the workers here


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@contextlib.contextmanager
def monitored_worker(package: Path, redis_url: str, tmp_path: Path, *options: str) -> Iterator[int]:
    """A real worker with its endpoint on a free port; yields the port."""
    with monitored(package, redis_url, tmp_path, *options) as (_, port):
        yield port


@contextlib.contextmanager
def monitored(package: Path, redis_url: str, tmp_path: Path, *options: str) -> Iterator[tuple[LocalWorker, int]]:
    """`monitored_worker`, yielding the worker too."""
    port_file = tmp_path / "port"
    env = python_env(KILN_METRICS_PORT_FILE=str(port_file), KILN_LIVENESS_TIMEOUT_S=str(TIMEOUT_S))
    worker = LocalWorker(package, redis_url, tmp_path / "worker.log", [SAMPLES], ["--metrics-port", "0", *options], env)
    try:

        def port() -> int | None:
            worker.check()
            return int(port_file.read_text()) if port_file.exists() and port_file.read_text() else None

        yield worker, wait_for(port, 120, "the endpoint's port")
    finally:
        worker.stop()


def wait_status(port: int, path: str, status: int, timeout_s: float) -> str:
    """Wait until `path` answers `status`; its body."""
    return wait_for(lambda: (answer := get(port, path))[0] == status and answer[1], timeout_s, f"{path} {status}")


def health_cli(port: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "worker.health", "--port", str(port)], env=python_env(), capture_output=True, text=True
    )


class FreezableProxy:
    """A TCP proxy to Redis that can freeze: connections stay open and nothing gets through,
    as with a hung broker connection (a dead NAT entry, a half-open socket)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.frozen = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                while self.frozen.is_set():
                    time.sleep(0.1)
                sink.sendall(data)

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("processes", [1, 2])
def test_a_loaded_worker_is_ready_and_live(processes, lite0_package, tmp_path):
    with (
        embedded_redis(tmp_path / "redis", persist=False) as url,
        monitored_worker(lite0_package, url, tmp_path, "--concurrency", str(processes)) as port,
    ):
        wait_status(port, "/readyz", 200, 180)
        assert get(port, "/livez") == (200, "ok\n")
        done = health_cli(port)
        assert done.returncode == 0, done.stderr


def test_a_worker_process_that_stops_reporting_fails_the_parents_liveness(lite0_package, tmp_path):
    """Two worker processes report to their parent's endpoint; one frozen (SIGSTOP: hung, as a
    process stuck in a driver call) makes the host not live, naming it, until it runs again."""
    with (
        embedded_redis(tmp_path / "redis", persist=False) as url,
        monitored(lite0_package, url, tmp_path, "--concurrency", "2") as (worker, port),
    ):
        wait_status(port, "/readyz", 200, 180)
        wait_status(port, "/livez", 200, 60)
        parent = worker.process.pid
        children = [int(pid) for pid in Path(f"/proc/{parent}/task/{parent}/children").read_text().split()]
        assert len(children) == 2
        os.kill(children[0], signal.SIGSTOP)
        try:
            reason = wait_status(port, "/livez", 503, 4 * TIMEOUT_S + 30)
            assert f"worker process {children[0]} made no health report" in reason, reason
        finally:
            os.kill(children[0], signal.SIGCONT)
        wait_status(port, "/livez", 200, 60)


def test_a_worker_process_that_hangs_before_its_first_report_fails_the_parents_liveness(lite0_package, tmp_path):
    """A worker process frozen from its start (SIGSTOP before it could report once) is as stale as
    one that stopped reporting: the parent expects a report from each process it starts."""
    with (
        embedded_redis(tmp_path / "redis", persist=False) as url,
        monitored(lite0_package, url, tmp_path, "--concurrency", "2") as (worker, port),
    ):
        parent = worker.process.pid

        def a_child() -> int | None:
            children = [int(pid) for task in Path(f"/proc/{parent}/task").glob("*")
                        for pid in (task / "children").read_text().split()]  # fmt: skip
            return children[0] if children else None

        frozen = wait_for(a_child, 60, "a worker process")
        os.kill(frozen, signal.SIGSTOP)
        try:
            reason = wait_status(port, "/livez", 503, 4 * TIMEOUT_S + 30)
            assert f"worker process {frozen} made no health report" in reason, reason
        finally:
            os.kill(frozen, signal.SIGCONT)
        wait_status(port, "/livez", 200, 120)


def test_the_parent_reads_the_reports_of_running_worker_processes_only(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / f"live-{gone.pid}").write_text("from a process that is gone")
    (tmp_path / f"live-{os.getpid()}").write_text("12 messages waiting, and this idle worker has received none")
    assert children_problems(tmp_path, time.time(), 60) == [
        f"worker process {os.getpid()}: 12 messages waiting, and this idle worker has received none"
    ]
    (tmp_path / f"live-{os.getpid()}").write_text("")
    assert children_problems(tmp_path, time.time(), 60) == []
    assert children_problems(tmp_path, time.time() + 100, 60) == [
        f"worker process {os.getpid()} made no health report for 100 s"
    ]


def test_redis_going_away_fails_readiness_then_liveness(lite0_package, tmp_path):
    redis_dir = tmp_path / "redis"
    with contextlib.ExitStack() as stack:
        redis_stack = stack.enter_context(contextlib.ExitStack())
        url = redis_stack.enter_context(embedded_redis(redis_dir, persist=False))
        port = stack.enter_context(monitored_worker(lite0_package, url, tmp_path))
        wait_status(port, "/readyz", 200, 180)
        redis_stack.close()  # Redis stops; the worker stays
        assert "broker not reached" in wait_status(port, "/readyz", 503, 30)
        assert "broker unreachable" in wait_status(port, "/livez", 503, 60)
        done = health_cli(port)
        assert done.returncode == 1 and "broker unreachable" in done.stderr


def test_a_hung_broker_connection_fails_liveness_and_recovers(lite0_package, tmp_path):
    with embedded_redis(tmp_path / "redis", persist=False) as url:
        proxy = FreezableProxy(int(url.rsplit(":", 1)[1].split("/")[0]))
        try:
            proxied = f"redis://127.0.0.1:{proxy.port}/0"
            with monitored_worker(lite0_package, proxied, tmp_path) as port:
                wait_status(port, "/readyz", 200, 180)
                proxy.frozen.set()
                reason = wait_status(port, "/livez", 503, 60)
                assert "broker unreachable" in reason and "Timeout" in reason, reason
                proxy.frozen.clear()
                wait_status(port, "/livez", 200, 60)
        finally:
            proxy.close()


@pytest.mark.parametrize(
    ("queued", "idle_for", "expected"),
    [
        (5, TIMEOUT_S + 1, "5 messages waiting"),  # work waits, the worker idles: stopped consuming
        (5, TIMEOUT_S - 1, None),  # not for long enough yet
        (0, None, None),  # nothing to do
    ],
)
def test_an_idle_worker_with_work_waiting_is_not_live(queued, idle_for, expected):
    now = 1000.0
    state = HealthState(
        started=now - 100,
        checked=now - 1,
        broker_ok=True,
        broker_seen=now - 1,
        queue_depths={"kiln.bulk": queued},
        waiting_since=None if idle_for is None else now - idle_for,
    )
    problems = liveness_problems(state, now, TIMEOUT_S, 1.0)
    if expected:
        assert len(problems) == 1 and expected in problems[0], problems
    else:
        assert problems == []


def test_a_taken_port_stops_the_worker_with_the_reason(lite0_package, redis_url, tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        worker = LocalWorker(
            lite0_package, redis_url, tmp_path / "worker.log", [SAMPLES], ["--metrics-port", str(port)]
        )
        try:
            assert worker.process.wait(180) == 2
        finally:
            worker.stop()
    assert f"error: cannot serve metrics and health on port {port}" in worker.log_path.read_text()


def test_the_health_check_finds_the_port_in_the_port_file_alone(tmp_path):
    """KILN_METRICS_PORT_FILE without KILN_METRICS_PORT (what a worker with a free port wrote)."""
    from worker.health import endpoint_port
    from worker.settings import WorkerSettings

    port_file = tmp_path / "port"
    port_file.write_text("12345")
    assert endpoint_port(WorkerSettings(_env_file=None, metrics_port_file=str(port_file))) == 12345
    with pytest.raises(ValueError, match="KILN_METRICS_PORT"):
        endpoint_port(WorkerSettings(_env_file=None))
