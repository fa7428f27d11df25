"""Celery's own tools see kiln workers: `celery inspect` always, Flower too; task events (what
Flower and `celery events` show per task) only when the worker is started with --task-events."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import redis
from conftest import SAMPLES, python_env

from producer import Kiln
from producer.embedded import LocalWorker, _free_port
from worker.celery_app import make_app
from worker.settings import CommonSettings


def task_events(url: str, seen: list[str], bound: threading.Event, stop: threading.Event) -> None:
    """Append to `seen` the task event types on the broker from when `bound` is set (the
    receiver's queue is bound to the events exchange: events sent before never reach it) until
    `stop` is."""
    app = make_app(CommonSettings(redis_url=url))

    def record(event: dict) -> None:
        if event["type"].startswith("task-"):
            seen.append(event["type"])

    with app.connection_for_read() as connection:
        receiver = app.events.Receiver(connection, handlers={"*": record})

        def watch() -> None:
            client = redis.Redis.from_url(url)
            name = receiver.queue.name.encode()
            while not any(name in binding for binding in client.smembers("_kombu.binding.celeryev")):
                time.sleep(0.1)
            bound.set()
            stop.wait()
            receiver.should_stop = True

        threading.Thread(target=watch, daemon=True).start()
        receiver.capture(limit=None, timeout=None, wakeup=False)


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
            assert ping.returncode == 0 and f"kiln-{worker.process.pid}-" in ping.stdout and "pong" in ping.stdout, (
                ping.stdout + ping.stderr
            )
            seen: list[str] = []
            bound, stop = threading.Event(), threading.Event()
            listener = threading.Thread(target=task_events, args=(url, seen, bound, stop))
            listener.start()
            assert bound.wait(60), "the event receiver did not bind its queue"
            kiln.submit([SAMPLES], job="watched")
            kiln.wait("watched", timeout_s=180, progress=False, check=worker.check)
            # A task's task-succeeded goes out after its records, which end the wait, and the
            # worker's event loop flushes task events in batches: on a loaded CI host, over 5 s
            # later. Without events, 10 s of nothing stands for none.
            deadline = time.monotonic() + (120 if events else 10)
            while "task-succeeded" not in seen and time.monotonic() < deadline:
                time.sleep(0.2)
            stop.set()
            listener.join(60)
        if events:
            # No task-started: Celery's threads pool (a worker process runs its chunks on threads)
            # does not report when a thread picks a task up.
            assert {"task-received", "task-succeeded"} <= set(seen), seen
        else:
            assert seen == []
    finally:
        worker.stop()


def test_flower_sees_the_worker_and_its_tasks(private_redis_url, lite0_package, tmp_path):
    pytest.importorskip("flower", reason="Flower is optional: pip install 'kiln[flower]'")
    url, port = private_redis_url, _free_port()
    options = ["--queues", "kiln.bulk", "--task-events"]
    worker = LocalWorker(lite0_package, url, tmp_path / "worker.log", [SAMPLES], options, env=python_env())
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "-b", url, "flower", f"--port={port}", "--address=127.0.0.1"],
        env=python_env(FLOWER_UNAUTHENTICATED_API="true"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip

    def api(path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/{path}", timeout=30) as answer:
            return json.loads(answer.read())

    try:
        with Kiln(url) as kiln:
            kiln.submit([SAMPLES], job="flowered")
            kiln.wait("flowered", timeout_s=180, progress=False, check=worker.check)
        deadline = time.monotonic() + 120
        workers, tasks = {}, {}
        while time.monotonic() < deadline and not (workers and tasks):
            time.sleep(2)
            with contextlib.suppress(OSError, ValueError):
                workers, tasks = api("workers?refresh=1"), api("tasks")
        assert any(name.startswith(f"kiln-{worker.process.pid}-") for name in workers), workers
        assert {task["name"] for task in tasks.values()} == {"kiln.classify_chunk"}, tasks
    finally:
        flower.terminate()
        flower.wait(30)
        worker.stop()
