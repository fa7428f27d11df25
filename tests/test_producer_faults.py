"""The producer against a Redis that restarts, pauses, fills up or is gone, and jobs whose name
is used again: real redis-server processes, real workers, the real CLI."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import redis
from conftest import PYTHON, SAMPLES, python_env
from test_producer_cli import producer

from producer import Item, Kiln
from producer.client import SubmitIncomplete
from producer.embedded import LocalWorker, _free_port, find_redis_server
from producer.settings import ProducerSettings
from worker.contract import BULK_QUEUE


class RedisProcess:
    """A redis-server of the test's own, on a fixed port, that the test stops, starts and pauses.
    Its data is kept in an append-only file, so a restart keeps the queue and the jobs."""

    def __init__(self, folder: Path, *options: str, password: str | None = None) -> None:
        self.folder, self.options, self.port = folder, list(options), _free_port()
        folder.mkdir(parents=True, exist_ok=True)
        auth = f":{password}@" if password else ""
        self.url = f"redis://{auth}127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [find_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
                   "--appendonly", "yes", "--save", "", *self.options]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, start_new_session=True)
        client = redis.Redis.from_url(self.url)
        for _ in range(200):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        self.process.terminate()  # SIGTERM: Redis writes its append-only file and exits
        self.process.wait(30)

    def pause(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)


@pytest.fixture
def own_redis(tmp_path):
    servers: list[RedisProcess] = []

    def make(*options: str, password: str | None = None) -> RedisProcess:
        servers.append(RedisProcess(tmp_path / f"redis{len(servers)}", *options, password=password))
        servers[-1].start()
        return servers[-1]

    yield make
    for server in servers:
        if server.process.poll() is None:
            server.resume()
            server.stop()


class Background(threading.Thread):
    """A call in a thread, keeping its result or its exception for the test to check."""

    def __init__(self, call) -> None:
        super().__init__(daemon=True)
        self.call, self.result, self.error = call, None, None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.call()
        except BaseException as e:
            self.error = e

    def outcome(self, timeout_s: float = 300):
        self.join(timeout_s)
        assert not self.is_alive(), "still running"
        if self.error is not None:
            raise self.error
        return self.result


def test_wait_submit_status_and_export_ride_out_a_restart_and_a_pause(own_redis, lite0_package, tmp_path):
    server = own_redis()
    settings = ProducerSettings(redis_url=server.url, redis_timeout_s=1, poll_interval_s=0.1, chunk_size=2)
    worker = None
    with Kiln(settings=settings) as kiln:
        job = kiln.submit([SAMPLES], job="blip")
        waiting = Background(lambda: kiln.wait(job, timeout_s=600, progress=False))
        time.sleep(0.5)
        server.stop()  # a restart: down for 2 s
        time.sleep(2)
        server.start()
        server.pause()  # a pause longer than the socket timeout (1 s)
        time.sleep(3)
        server.resume()
        assert waiting.is_alive()  # no worker yet: still waiting, not failed
        # submit while Redis is down, back 2 s later
        server.stop()
        Timer = threading.Timer(2, server.start)
        Timer.start()
        more = kiln.submit([Item(key="again", ref=str(SAMPLES / "coffee.jpg"))], job="blip-2")
        Timer.join()
        assert more.enqueued == 1
        try:
            worker = LocalWorker(lite0_package, server.url, tmp_path / "worker.log", [SAMPLES], env=python_env())
            counts = waiting.outcome()
            assert (counts.total, counts.done, counts.failed) == (6, 6, 0)
            assert kiln.wait("blip-2", timeout_s=300, progress=False, check=worker.check).done == 1
        finally:
            if worker is not None:
                worker.stop()
        assert sorted(r.key for r in kiln.results("blip")) == sorted(str(p) for p in SAMPLES.glob("*.jpg"))
    # status and export, started while Redis is down
    server.stop()
    env = {"KILN_REDIS_URL": server.url, "KILN_REDIS_TIMEOUT_S": "1"}
    commands = [[PYTHON, "-m", "producer", "status", "blip"],
                [PYTHON, "-m", "producer", "export", "blip", "--out", str(tmp_path / "blip.jsonl")]]  # fmt: skip
    running = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=python_env(**env))
               for c in commands]  # fmt: skip
    time.sleep(3)
    server.start()
    (status_out, status_err), (_, export_err) = (p.communicate(timeout=120) for p in running)
    assert [p.returncode for p in running] == [0, 0], (status_err, export_err)
    assert "blip: complete, 6 done, 0 failed, 6 in all" in status_out
    assert len((tmp_path / "blip.jsonl").read_text().splitlines()) == 6


def one_error_line(done: subprocess.CompletedProcess, secret: str) -> str:
    """The CLI's answer to a Redis it cannot use: exit status 2, one `error:` line, no traceback
    and no password anywhere."""
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    assert "Traceback" not in done.stderr and secret not in done.stderr + done.stdout, done.stderr
    return errors[0]


@pytest.mark.parametrize(
    "args",
    [
        ["label", str(SAMPLES / "coffee.jpg"), "--out", "never.csv", "--no-progress"],
        ["status", "some-job"],
        ["export", "some-job", "--out", "never.csv"],
        ["classify", str(SAMPLES / "coffee.jpg")],
    ],
)
def test_a_redis_that_is_gone_gets_one_line_with_what_to_do(args):
    url = f"redis://:hunter2@127.0.0.1:{_free_port()}/0"
    done = producer(*args, KILN_REDIS_URL=url, KILN_REDIS_RETRY_S="1")
    line = one_error_line(done, "hunter2")
    assert f"cannot reach Redis at redis://:***@127.0.0.1:{url.rsplit(':', 1)[1]}" in line
    assert "check that it is running and that KILN_REDIS_URL points at it" in line


def test_a_wrong_password_and_urls_in_messages_are_masked(own_redis):
    server = own_redis("--requirepass", "s3cret-pw", password="s3cret-pw")
    wrong = server.url.replace("s3cret-pw", "hunter2")
    line = one_error_line(producer("status", "x", KILN_REDIS_URL=wrong), "hunter2")
    assert "refused the credentials" in line and "check the user and password in KILN_REDIS_URL" in line
    for args in (["status", "no-such-job"], ["export", "no-such-job", "--out", "x.csv"]):
        line = one_error_line(producer(*args, KILN_REDIS_URL=server.url), "s3cret-pw")
        assert f"no job named 'no-such-job' in redis://:***@127.0.0.1:{server.port}/0" in line


def test_classify_waits_longer_than_redis_socket_timeout(private_redis_url, lite0_package, tmp_path):
    """redis-py's socket timeout is 5 s: a longer --timeout used to die there with a traceback."""
    started = subprocess.Popen(
        [PYTHON, "-m", "producer", "classify", str(SAMPLES / "coffee.jpg"), "--topk", "1", "--timeout", "300"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=python_env(KILN_REDIS_URL=private_redis_url, KILN_REDIS_TIMEOUT_S="5"),
    )  # fmt: skip
    time.sleep(8)  # no worker for 8 s: the answer comes later than any socket timeout
    assert started.poll() is None, started.communicate()
    worker = LocalWorker(lite0_package, private_redis_url, tmp_path / "worker.log", [SAMPLES], env=python_env())
    try:
        out, err = started.communicate(timeout=300)
    finally:
        worker.stop()
    assert started.returncode == 0, err
    assert json.loads(out)["topk"][0]["label"] == "espresso"


def test_classify_without_a_worker_says_so_after_its_timeout(private_redis_url):
    done = producer("classify", str(SAMPLES / "coffee.jpg"), "--timeout", "7", KILN_REDIS_URL=private_redis_url)
    line = one_error_line(done, "no-secret-here")
    assert "no worker answered within 7.0 s" in line


def queued_images(client: redis.Redis, job: str) -> int:
    """A job's images in the chunk messages waiting in the bulk queue (kombu's envelope, base64 body)."""
    total = 0
    for raw in client.lrange(BULK_QUEUE, 0, -1):
        message = json.loads(base64.b64decode(json.loads(raw)["body"]))[0][0]
        total += len(message["items"]) if message["job"] == job else 0
    return total


def test_a_submit_that_fails_partway_leaves_a_true_total(own_redis, lite0_package, tmp_path):
    """Redis fills up (maxmemory, noeviction) while a job is being enqueued: the submission fails
    with what to do, the job's total counts exactly the images enqueued, and running it again
    (after memory was freed) completes the job, every image once."""
    server = own_redis("--maxmemory-policy", "noeviction")
    client = redis.Redis.from_url(server.url)
    items = [Item(key=f"{i:03d}-" + "k" * 1500, ref=str(SAMPLES / "coffee.jpg")) for i in range(150)]
    settings = ProducerSettings(redis_url=server.url, chunk_size=10, redis_retry_s=1)
    with Kiln(settings=settings) as kiln:
        kiln.submit(items[:1], job="warm-up")  # connections and queue bindings take memory too
        client.config_set("maxmemory", client.info("memory")["used_memory"] + 300_000)
        with pytest.raises(SubmitIncomplete, match="Run the same submission again") as failed:
            kiln.submit(items, job="full")
        assert "out of memory" in str(failed.value)
        enqueued = queued_images(client, "full")
        assert 0 < enqueued < len(items)
        assert kiln.counts("full").total == enqueued
        client.config_set("maxmemory", 0)
        again = kiln.submit(items, job="full")
        assert (again.total, again.job_total) == (150, 150)
        worker = LocalWorker(lite0_package, server.url, tmp_path / "worker.log", [SAMPLES], env=python_env())
        try:
            counts = kiln.wait("full", timeout_s=600, progress=False, check=worker.check)
        finally:
            worker.stop()
        records = kiln.results("full")
    assert (counts.total, counts.done, counts.failed) == (150, 150, 0)
    assert sorted(r.key for r in records) == sorted(i.key for i in items)


def test_a_job_name_used_again_with_other_images(lite0_worker, work_dir, tmp_path):
    """The second run adds its images to the job and waits for them; its results file holds its
    own images; the counters stay true (never "5 done, 5 failed, 4 in all")."""
    first, second = work_dir / "reuse-a", work_dir / "reuse-b"
    first.mkdir()
    second.mkdir()
    for name in ("coffee", "chelsea"):
        shutil.copy(SAMPLES / f"{name}.jpg", first)
    for name in ("broken1", "broken2"):
        (first / f"{name}.jpg").write_text("not an image")
    for name in ("rocket", "astronaut"):
        shutil.copy(SAMPLES / f"{name}.jpg", second)
    (second / "notes.txt").write_text("not a photo")
    env = {"KILN_REDIS_URL": lite0_worker.redis_url}
    out_a, out_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    done_a = producer("label", str(first), "--job", "reused", "--out", str(out_a), "--no-progress", **env)
    assert done_a.returncode == 1 and "2 labelled, 2 failed" in done_a.stderr, done_a.stderr
    done_b = producer("label", str(second), "--job", "reused", "--out", str(out_b), "--no-progress", **env)
    assert done_b.returncode == 0, done_b.stderr
    assert "job reused: 2 images; the job also holds 4 images of other submissions" in done_b.stderr
    assert "2 labelled, 0 failed" in done_b.stderr
    assert done_b.stderr.rstrip().endswith("skipped 1 file without an image extension: .txt 1")  # the summary
    assert done_b.stderr.count("without an image extension") == 1  # said once, not at submit and again
    keys = sorted(json.loads(line)["key"] for line in out_b.read_text().splitlines())
    assert keys == [str(second / "astronaut.jpg"), str(second / "rocket.jpg")]
    status = producer("status", "reused", **env)
    assert "reused: complete, 4 done, 2 failed, 6 in all" in status.stdout, status.stdout
    # the same key for another image is refused, before anything is enqueued
    (tmp_path / "one.csv").write_text(f"key,path\nk,{SAMPLES / 'coffee.jpg'}\n")
    (tmp_path / "two.csv").write_text(f"key,path\nk,{SAMPLES / 'chelsea.jpg'}\n")
    assert producer("label", str(tmp_path / "one.csv"), "--job", "keyed", "--out", str(out_a), **env).returncode == 0
    clash = producer("label", str(tmp_path / "two.csv"), "--job", "keyed", "--out", str(out_b), **env)
    assert clash.returncode == 2 and "job keyed already holds image key 'k'" in clash.stderr, clash.stderr


def test_two_producers_with_one_job_name_each_wait_for_their_own(private_redis_url, lite0_package, tmp_path):
    url = private_redis_url
    ours = [Item(key=f"a{i}", ref=str(SAMPLES / "coffee.jpg")) for i in range(8)]
    theirs = [Item(key=f"b{i}", ref=str(SAMPLES / "chelsea.jpg")) for i in range(2)]
    settings = ProducerSettings(redis_url=url, chunk_size=1)
    with Kiln(settings=settings) as a, Kiln(settings=settings) as b:
        mine = a.submit(ours, job="shared")
        other = b.submit(theirs, job="shared")
        assert (mine.job_total, other.job_total) == (8, 10)
        worker = LocalWorker(lite0_package, url, tmp_path / "worker.log", [SAMPLES], env=python_env())
        try:
            counts = a.wait(mine, timeout_s=300, progress=False, check=worker.check)
            # at the moment our wait returns, every one of our images has its record
            assert a.store.statuses("shared", [i.key for i in ours]) == ["ok"] * 8
            assert (counts.total, counts.done, counts.failed) == (8, 8, 0)
            assert sorted(r.key for r in a.results(mine)) == sorted(i.key for i in ours)
            assert b.wait(other, timeout_s=300, progress=False, check=worker.check).done == 2
        finally:
            worker.stop()
        job = a.counts("shared")
        assert (job.total, job.done, job.failed) == (10, 10, 0)


@pytest.mark.parametrize("url", ["localhost:6390", "unix:///run/redis.sock", "redis://:s3cret@localhost:0/0"])
def test_the_api_checks_a_redis_url_as_the_cli_does(url):
    """`Kiln(url)`: kiln's own one-line refusal, password masked; redis-py's named unix://, which
    kiln's workers cannot use (a new user's finding)."""
    with pytest.raises(ValueError, match=r"invalid setting KILN_REDIS_URL=.*\(from Kiln\(redis_url=\.\.\.\)\)") as e:
        Kiln(url)
    assert "s3cret" not in str(e.value) and ("rediss://" in str(e.value) or "port 0" in str(e.value))


@pytest.mark.parametrize("topk", [2.0, 0, -1, "3", True, 1001])
def test_a_top_k_that_is_not_a_whole_number_from_1_to_1000_is_refused_before_redis(private_redis_url, topk):
    """`Kiln.submit(topk=2.0)` stored "2.0" in the job, which the worker then failed to read: the
    chunk was lost and the job hung; topk=0 made a job of images with no chunk (a hostile
    tester's findings). Refused now, before any job is made."""
    with Kiln(private_redis_url) as kiln:
        with pytest.raises(ValueError, match="topk must be a whole number from 1 to 1000"):
            kiln.submit([Item(key="c", ref=str(SAMPLES / "coffee.jpg"))], job="tk", topk=topk)
        with pytest.raises(ValueError, match="topk must be a whole number from 1 to 1000"):
            kiln.classify(SAMPLES / "coffee.jpg", topk=topk, job="tk-online")
        assert not kiln.exists("tk") and not kiln.exists("tk-online")
