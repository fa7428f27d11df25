"""Celery's own tools see kiln workers: `celery inspect` always; task events (Flower, `celery
events`) only when the worker is started with --task-events."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading

import pytest
from conftest import SAMPLES, python_env

from producer import Kiln
from producer.embedded import LocalWorker
from worker.celery_app import make_app
from worker.settings import CommonSettings


def task_events(url: str, seconds: float) -> list[str]:
    """Task event types seen on the broker during `seconds`."""
    app = make_app(CommonSettings(redis_url=url))
    seen: list[str] = []
    with app.connection_for_read() as connection:
        receiver = app.events.Receiver(connection, handlers={"*": lambda event: seen.append(event["type"])})
        stopper = threading.Timer(seconds, lambda: setattr(receiver, "should_stop", True))
        stopper.start()
        with contextlib.suppress(TimeoutError):
            receiver.capture(limit=None, timeout=seconds + 5, wakeup=False)
        stopper.cancel()
    return [kind for kind in seen if kind.startswith("task-")]


@pytest.mark.parametrize("events", [False, True])
def test_inspect_sees_the_worker_and_task_events_follow_the_flag(events, private_redis_url, lite0_package, tmp_path):
    url = private_redis_url
    options = ["--queues", "kiln.bulk", *(["--task-events"] if events else [])]
    worker = LocalWorker(lite0_package, url, tmp_path / "worker.log", [SAMPLES], options, env=python_env())
    try:
        with Kiln(url) as kiln:
            kiln.submit([SAMPLES / "coffee.jpg"], job="warm")
            kiln.wait("warm", timeout_s=180, progress=False, check=worker.check)
            ping = subprocess.run(
                [sys.executable, "-m", "celery", "-b", url, "inspect", "ping", "--timeout", "10"],
                capture_output=True, text=True, env=python_env(), timeout=120,
            )  # fmt: skip
            assert ping.returncode == 0 and f"kiln-{worker.process.pid}@" in ping.stdout and "pong" in ping.stdout, (
                ping.stdout + ping.stderr
            )
            listener = threading.Thread(target=lambda: seen.extend(task_events(url, 15)))
            seen: list[str] = []
            listener.start()
            kiln.submit([SAMPLES], job="watched")
            kiln.wait("watched", timeout_s=180, progress=False, check=worker.check)
            listener.join()
        if events:
            assert {"task-received", "task-started", "task-succeeded"} <= set(seen), seen
        else:
            assert seen == []
    finally:
        worker.stop()
