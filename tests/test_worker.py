"""The whole path against a real redis-server and a real worker process: producer -> Redis ->
Celery worker -> result store, for bulk jobs, online requests and messages that are wrong."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import CATS, SAMPLES, python_env
from http_server import serve_folder
from packages import build_cached

from producer import Item, Kiln
from producer.embedded import LocalWorker
from producer.settings import ProducerSettings
from worker.celery_app import make_app
from worker.contract import BULK_QUEUE, CHUNK_TASK, ONLINE_QUEUE, ONLINE_TASK
from worker.settings import CommonSettings
from worker.tasks import DEAD_LETTERS


def top1(kiln, job: str) -> dict[str, str]:
    return {
        r.key.rsplit("/", 1)[-1]: (r.topk[0].label if r.status == "ok" else r.error.kind) for r in kiln.results(job)
    }


def test_sample_photos_are_labelled_through_the_queue(kiln):
    job = kiln.submit([SAMPLES], job="samples", topk=5)
    assert (job.total, job.enqueued) == (6, 6)
    counts = kiln.wait("samples", timeout_s=120, progress=False)
    assert (counts.done, counts.failed) == (6, 0)
    labels = top1(kiln, "samples")
    assert labels["chelsea.jpg"] in CATS and labels["coffee.jpg"] == "espresso"
    record = next(r for r in kiln.results("samples") if r.key.endswith("coffee.jpg"))
    assert len(record.topk) == 5 and record.worker and record.model_digest and record.timings_ms["infer"] > 0


def test_failures_are_records_with_their_reason(kiln, work_dir, tmp_path):
    (work_dir / "broken.jpg").write_bytes((SAMPLES / "coffee.jpg").read_bytes()[:5000])
    (work_dir / "text.png").write_text("hello")
    outside = tmp_path / "outside.jpg"
    shutil.copy(SAMPLES / "coffee.jpg", outside)
    refs = [work_dir / "broken.jpg", work_dir / "text.png", outside, SAMPLES / "chelsea.jpg"]
    items = [Item(key=p.name, ref=str(p)) for p in refs] + [Item(key="gone", ref=str(work_dir / "gone.jpg"))]
    kiln.submit(items, job="failures")
    counts = kiln.wait("failures", timeout_s=60, progress=False)
    assert (counts.done, counts.failed) == (1, 4)
    assert top1(kiln, "failures") == {
        "broken.jpg": "unreadable",
        "text.png": "not_an_image",
        "outside.jpg": "forbidden",
        "chelsea.jpg": "tiger cat",
        "gone": "not_found",
    }


def test_http_references(kiln):
    with serve_folder(SAMPLES) as base:
        kiln.submit([f"{base}/coffee.jpg", f"{base}/missing.jpg"], job="http")
        kiln.wait("http", timeout_s=60, progress=False)
    assert top1(kiln, "http") == {"coffee.jpg": "espresso", "missing.jpg": "not_found"}


def test_resume_enqueues_only_images_without_a_record(kiln, work_dir):
    folder = work_dir / "resume"
    folder.mkdir()
    for name in ("chelsea", "coffee"):
        shutil.copy(SAMPLES / f"{name}.jpg", folder)
    first = kiln.submit([folder], job="resume")
    kiln.wait("resume", timeout_s=60, progress=False)
    for name in ("rocket", "astronaut"):
        shutil.copy(SAMPLES / f"{name}.jpg", folder)
    second = kiln.submit([folder], job="resume")
    assert (first.enqueued, second.total, second.enqueued) == (2, 4, 2)
    counts = kiln.wait("resume", timeout_s=60, progress=False)
    assert (counts.total, counts.done) == (4, 4)
    assert len(list(kiln.results("resume"))) == 4


@pytest.fixture
def raw_app(lite0_worker):
    app = make_app(CommonSettings(redis_url=lite0_worker.redis_url))
    yield app
    app.close()


def wait_for(condition, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_invalid_messages_fail_with_the_reason_and_are_not_retried(kiln, raw_app):
    redis = kiln.store.redis
    redis.delete(DEAD_LETTERS)
    items = [{"key": "a", "ref": str(SAMPLES / "coffee.jpg")}, {"key": "b", "ref": "x"}]
    kiln.store.register("bad", [Item(**item) for item in items])
    raw_app.send_task(CHUNK_TASK, args=[{"v": 1, "job": "bad", "items": items, "topk": 0}], queue=BULK_QUEUE)
    raw_app.send_task(CHUNK_TASK, args=["just a string"], queue=BULK_QUEUE)
    raw_app.send_task(CHUNK_TASK, args=[{"v": 99, "items": []}], queue=BULK_QUEUE)
    raw_app.send_task(CHUNK_TASK, args=[{"v": 1}, "extra"], queue=BULK_QUEUE)
    counts = kiln.wait("bad", timeout_s=30, progress=False)
    assert counts.failed == 2
    record = kiln.store.get("bad", "a")
    assert record.error.kind == "bad_message" and "topk" in record.error.message
    wait_for(lambda: redis.llen(DEAD_LETTERS) == 3)
    reasons = [json.loads(entry)["reason"] for entry in redis.lrange(DEAD_LETTERS, 0, -1)]
    assert sum("invalid task message" in r for r in reasons) == 2 and "unexpected task arguments" in reasons
    wait_for(lambda: redis.llen(BULK_QUEUE) == 0)  # acknowledged, not redelivered
    # The worker is still serving.
    kiln.submit([SAMPLES / "coffee.jpg"], job="after-bad")
    assert kiln.wait("after-bad", timeout_s=30, progress=False).done == 1


def test_a_message_delivered_too_often_is_recorded_as_poison(kiln, raw_app):
    """Each delivery whose worker died is counted in Redis; at the cap (3) the images are recorded
    as failed instead of crashing another worker (the entry three killed workers leave)."""
    task_id = "poison-task-1"
    kiln.store.redis.hset("kiln:{poison}:delivery", task_id, "gone-host:1|2")  # two deaths, a third holder gone
    message = {"v": 1, "job": "poison", "items": [{"key": "k", "ref": str(SAMPLES / "coffee.jpg")}]}
    kiln.store.register("poison", [Item(**message["items"][0])])
    raw_app.send_task(CHUNK_TASK, args=[message], queue=BULK_QUEUE, task_id=task_id)
    assert kiln.wait("poison", timeout_s=30, progress=False).failed == 1
    record = kiln.store.get("poison", "k")
    assert record.error.kind == "poison" and "3 workers died" in record.error.message


def test_online_requests_from_concurrent_callers_get_their_own_answers(kiln):
    photos = {"chelsea": CATS, "coffee": {"espresso"}, "rocket": {"missile", "projectile"}}
    answers: dict[int, object] = {}

    def call(index: int) -> None:
        name = list(photos)[index % len(photos)]
        data = (SAMPLES / f"{name}.jpg").read_bytes()
        answers[index] = (name, kiln.classify(data, topk=2 + index % 3, timeout_s=60))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert len(answers) == 12
    for index, (name, record) in answers.items():
        assert record.status == "ok" and record.topk[0].label in photos[name], (name, record)
        assert len(record.topk) == 2 + index % 3
    assert len({record.key for _, record in answers.values()}) == 12  # one answer per request


def test_online_by_reference_and_errors(kiln, raw_app):
    assert kiln.classify(str(SAMPLES / "coffee.jpg"), timeout_s=60).topk[0].label == "espresso"
    assert kiln.classify(b"definitely not an image", timeout_s=60).error.kind == "not_an_image"
    reply = "kiln:reply:bad-online"
    raw_app.send_task(ONLINE_TASK, args=[{"v": 1, "id": "bad-online", "reply_to": reply}], queue=ONLINE_QUEUE)
    assert kiln.store.wait_reply(reply, 30).error.kind == "bad_message"  # neither ref nor data


def _children(pid: int) -> set[int]:
    """Child processes of `pid`, whichever of its threads started them (/proc lists them per thread)."""
    return {int(child) for task in Path(f"/proc/{pid}/task").glob("*") for child in _read(task / "children").split()}


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:  # a thread that ended meanwhile
        return ""


def _loaded(worker: LocalWorker, count: int) -> None:
    """Wait until `count` worker processes have logged their plan (their model is loaded)."""
    deadline = time.monotonic() + 180
    while worker.log_path.read_text().count("data path on") < count:
        worker.check()
        assert time.monotonic() < deadline, worker.log_path.read_text()[-3000:]
        time.sleep(0.2)


def test_worker_processes_each_load_the_model_and_share_the_work(private_redis_url, lite0_package, tmp_path):
    """--concurrency 2: the parent starts two worker processes and loads no model; each process
    does, and the records name both."""
    url = private_redis_url
    options = ["--concurrency", "2", "--threads", "1", "--queues", "kiln.bulk", "--loglevel", "INFO"]
    worker = LocalWorker(lite0_package, url, tmp_path / "two.log", [SAMPLES], options, env=python_env())
    try:
        _wait_until(lambda: worker.log_path.read_text().count(" ready.") >= 2, 180, "both processes to consume")
        photos = sorted(SAMPLES.glob("*.jpg"))
        with Kiln(settings=ProducerSettings(redis_url=url, chunk_size=1)) as kiln:
            kiln.submit([Item(key=f"{i}", ref=str(photos[i % len(photos)])) for i in range(24)], job="two")
            counts = kiln.wait("two", timeout_s=180, progress=False, check=worker.check)
            workers = {r.worker for r in kiln.results("two")}
        log = worker.log_path.read_text()[-2000:]
        assert counts.done == 24, log
        assert worker.log_path.read_text().count(f"reads images under: {os.path.realpath(SAMPLES)}") == 1
        pids = {int(w.split(":")[1]) for w in workers}
        assert worker.process.pid not in pids and pids == _children(worker.process.pid), (workers, log)
        worker.process.send_signal(signal.SIGTERM)  # a warm shutdown of both
        assert worker.process.wait(60) == 0, worker.log_path.read_text()[-2000:]
        assert not any(Path(f"/proc/{pid}").exists() for pid in pids)  # stopped, and reaped by the parent
    finally:
        worker.stop()


def test_a_worker_process_that_dies_is_started_again(private_redis_url, lite0_package, tmp_path):
    """kill -9 one of two worker processes (as a CUDA fault ends one): the parent starts another,
    and the host serves jobs with two processes again."""
    url = private_redis_url
    options = ["--concurrency", "2", "--threads", "1", "--queues", "kiln.bulk", "--loglevel", "INFO"]
    worker = LocalWorker(lite0_package, url, tmp_path / "restart.log", [SAMPLES], options, env=python_env())
    try:
        _loaded(worker, 2)
        first = _children(worker.process.pid)
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        _loaded(worker, 3)
        assert "was killed by SIGKILL (status 137): starting it again" in worker.log_path.read_text()
        now = _children(worker.process.pid)
        assert len(now) == 2 and victim not in now and (first - {victim}) < now
        with Kiln(settings=ProducerSettings(redis_url=url, chunk_size=1)) as kiln:
            kiln.submit([SAMPLES], job="after-restart")
            assert kiln.wait("after-restart", timeout_s=180, progress=False, check=worker.check).done == 6
    finally:
        worker.stop()


def _descendants(pid: int) -> set[int]:
    children = _children(pid)
    return children.union(*(_descendants(child) for child in children))


def _state(pid: int) -> str | None:
    """A process's state letter ("Z": a zombie), or None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def _wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_a_dead_worker_process_leaves_no_zombies(private_redis_url, lite0_package, tmp_path):
    """kill -9 a worker process that has decode processes: they leave on their own, and the
    parent (their subreaper once their own parent is gone) reaps them."""
    options = ["--concurrency", "2", "--decode-processes", "2", "--threads", "1", "--loglevel", "INFO"]
    worker = LocalWorker(lite0_package, private_redis_url, tmp_path / "w.log", [SAMPLES], options, env=python_env())
    try:
        photos = sorted(SAMPLES.glob("*.jpg"))
        items = [Item(key=f"{i}", ref=str(photos[i % len(photos)])) for i in range(48)]
        with Kiln(settings=ProducerSettings(redis_url=private_redis_url, chunk_size=4)) as kiln:
            kiln.submit(items, job="decoded-in-processes")  # the pools start their processes
            kiln.wait("decoded-in-processes", timeout_s=180, progress=False, check=worker.check)
        victim = max(_children(worker.process.pid), key=lambda pid: len(_descendants(pid)))
        orphans = _descendants(victim)
        assert len(orphans) >= 2  # its decode processes, and multiprocessing's resource tracker
        os.kill(victim, signal.SIGKILL)
        _wait_until(lambda: all(_state(pid) is None for pid in orphans), 30, "the orphans to be reaped")
        _loaded(worker, 3)
        assert all(_state(pid) != "Z" for pid in _children(worker.process.pid))
    finally:
        worker.stop()


@pytest.mark.parametrize("when", ["loaded", "starting"])
def test_worker_processes_stop_when_their_parent_is_killed(when, private_redis_url, lite0_package, tmp_path):
    """kill -9 the parent alone (the OOM killer does), once its worker processes serve or while
    they still start: they shut down by themselves rather than consume on, unsupervised."""
    options = ["--concurrency", "2", "--threads", "1", "--loglevel", "INFO"]
    worker = LocalWorker(lite0_package, private_redis_url, tmp_path / "w.log", [SAMPLES], options, env=python_env())
    try:
        if when == "loaded":
            _loaded(worker, 2)
        else:
            _wait_until(lambda: "worker process 1 started" in worker.log_path.read_text(), 60, "the processes to start")
        children = _children(worker.process.pid)
        assert len(children) == 2
        os.kill(worker.process.pid, signal.SIGKILL)
        worker.process.wait(10)
        _wait_until(lambda: all(_state(pid) in (None, "Z") for pid in children), 60, "the worker processes to stop")
        assert f"the parent process (pid {worker.process.pid}) is gone: shutting down" in worker.log_path.read_text()
    finally:
        worker.stop()


def test_ctrl_c_to_the_whole_group_loses_no_image(private_redis_url, lite0_package, tmp_path):
    """SIGINT to every process of the worker, decode processes included (Ctrl-C, a service
    manager's stop): a warm shutdown. Every image still ends as a success, here or, for the
    chunks the shutdown gave back, in the next worker. Before, the decode processes died of the
    signal first and the images they held were recorded as failed."""
    url = private_redis_url
    options = ["--concurrency", "2", "--decode-processes", "2", "--threads", "1", "--loglevel", "INFO"]
    with serve_folder(SAMPLES, delay_s=0.05) as base:
        env = python_env(KILN_FETCH_ALLOWED_NETWORKS="127.0.0.1/32")
        first = LocalWorker(lite0_package, url, tmp_path / "first.log", [], options, env=env)
        second = None
        try:
            photos = sorted(p.name for p in SAMPLES.glob("*.jpg"))
            items = [Item(key=f"{i}", ref=f"{base}/{photos[i % len(photos)]}") for i in range(240)]
            with Kiln(settings=ProducerSettings(redis_url=url, chunk_size=4)) as kiln:
                kiln.submit(items, job="interrupted")
                _wait_until(lambda: kiln.counts("interrupted").finished >= 24, 180, "the job to be under way")
                os.killpg(first.process.pid, signal.SIGINT)
                assert first.process.wait(120) == 0, first.log_path.read_text()[-3000:]
                second = LocalWorker(lite0_package, url, tmp_path / "second.log", [], ["--threads", "1"], env)
                counts = kiln.wait("interrupted", timeout_s=300, progress=False, check=second.check)
            assert (counts.done, counts.failed) == (240, 0), first.log_path.read_text()[-3000:]
        finally:
            first.stop()
            if second is not None:
                second.stop()


def test_a_hang_up_stops_every_worker_process(private_redis_url, lite0_package, tmp_path):
    """SIGHUP to the group (the terminal closed): Celery's own SIGHUP handler would restart each
    worker process in place and leave the parent waiting; each stops warm instead."""
    options = ["--concurrency", "2", "--threads", "1", "--loglevel", "INFO"]
    worker = LocalWorker(lite0_package, private_redis_url, tmp_path / "w.log", [SAMPLES], options, env=python_env())
    try:
        _loaded(worker, 2)
        children = _children(worker.process.pid)
        os.killpg(worker.process.pid, signal.SIGHUP)
        assert worker.process.wait(60) == 0, worker.log_path.read_text()[-3000:]
        assert not any(_state(pid) for pid in children)
    finally:
        worker.stop()


_DUMP_LINE = re.compile(r'(Thread 0x[0-9a-f]+ ".*" \(most recent call first\):|  File ".*", line \d+ in .+)?')


def _stack_dumps(log: str) -> list[str]:
    """The processes that logged a whole stack dump (kiln's SIGUSR1), one entry per dump: a
    header, then only stack lines, with one main thread. Dumps that two processes wrote at once
    came out interleaved mid-line before."""
    lines = log.splitlines()
    dumps = []
    for i, line in enumerate(lines):
        if header := re.fullmatch(r"stacks of (\S+) \(pid \d+\), on SIGUSR1:", line):
            body = list(itertools.takewhile(_DUMP_LINE.fullmatch, lines[i + 1 :]))
            if sum('"MainThread" (most recent' in line for line in body) == 1:
                dumps.append(header[1])
    return dumps


def test_sigusr1_logs_each_processs_stacks_and_sigquit_stops_them_cold(private_redis_url, lite0_package, tmp_path):
    """SIGUSR1 to the parent: it and each worker process log their threads' stacks, each dump
    whole, and serve on. SIGQUIT: a cold shutdown of them all, status
    131 as a shell reports it, and the endpoint's folder is removed. Before, Python's default
    action for either signal ended the parent at once and left its worker processes and that
    folder behind."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    options = ["--concurrency", "2", "--threads", "1", "--loglevel", "INFO"]
    env = python_env(KILN_METRICS_PORT="0", TMPDIR=str(temp))
    worker = LocalWorker(lite0_package, private_redis_url, tmp_path / "w.log", [SAMPLES], options, env=env)
    try:
        _loaded(worker, 2)
        children = _children(worker.process.pid)
        assert len(children) == 2 and list(temp.glob("kiln-metrics-*"))
        os.kill(worker.process.pid, signal.SIGUSR1)
        every = ["MainProcess", "worker-0", "worker-1"]  # the parent's own too
        _wait_until(lambda: sorted(_stack_dumps(worker.log_path.read_text())) == every, 60, "every process's stacks")
        assert worker.process.poll() is None and all(_state(pid) not in (None, "Z") for pid in children)
        os.kill(worker.process.pid, signal.SIGQUIT)
        assert worker.process.wait(60) == 131, worker.log_path.read_text()[-3000:]
        assert not any(_state(pid) for pid in children)
        assert not list(temp.glob("kiln-metrics-*"))
    finally:
        worker.stop()


_ASKS_AND_SLEEPS = {  # a child that tells its parent to stop at once, and then sleeps
    "dies of SIGTERM": ["sh", "-c", "kill -TERM $PPID; exec sleep 600"],
    "exits with 0": [  # through Python, as a worker process still loading its model does
        sys.executable,
        "-c",
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
        "os.kill(os.getppid(), signal.SIGTERM)\n"
        "time.sleep(600)",
    ],
}


@pytest.mark.parametrize("child", list(_ASKS_AND_SLEEPS))
def test_a_signal_while_the_processes_start_stops_them_all(child, tmp_path):
    """The parent is told to stop while it is still starting its processes (here: the first one
    asks, at once): none is left running, and the parent returns 0 instead of waiting for them,
    whether they die of the SIGTERM it sends on or exit through Python."""
    script = f"""
import logging, sys
sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
logging.basicConfig(level=logging.INFO)
from worker.supervisor import supervise
sys.exit(supervise([{_ASKS_AND_SLEEPS[child]!r}] + [["sleep", "600"]] * 5))
"""
    # A child the signal missed would sleep on, and the parent with it: the timeout is the failure.
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    pids = [int(line.rsplit("pid ", 1)[1].rstrip(")")) for line in done.stderr.splitlines() if "started (pid" in line]
    assert pids and not any(_state(pid) for pid in pids), done.stderr


def test_a_childs_exit_status_reads_as_a_shells():
    from worker.supervisor import exit_status

    assert [exit_status(s) for s in (0, 2, 70, -9, -15)] == [0, 2, 70, 137, 143]


def test_worker_processes_that_cannot_load_the_package_stop_the_parent(private_redis_url, lite0_package, tmp_path):
    """A package its processes cannot load (here: a CPU package on a device it was not built for)
    stops them all with status 2 and the reason, instead of starting them again for ever."""
    options = ["--concurrency", "2", "--device", "cuda", "--queues", "kiln.bulk", "--loglevel", "INFO"]
    worker = LocalWorker(lite0_package, private_redis_url, tmp_path / "bad.log", [SAMPLES], options, env=python_env())
    try:
        assert worker.process.wait(180) == 2
        log = worker.log_path.read_text()
        assert "error:" in log and "stopping them all" in log, log[-3000:]
        assert log.count("started (pid") == 2  # none started again
    finally:
        worker.stop()


def test_a_killed_workers_chunk_is_redelivered_and_recorded_once(private_redis_url, lite0_package, work_dir, tmp_path):
    """kill -9 a worker in the middle of a chunk: after the visibility timeout another worker gets
    the chunk again, and every image ends with exactly one record."""
    url = private_redis_url
    folder = work_dir / "redelivery"
    folder.mkdir()
    for i in range(60):
        shutil.copy(SAMPLES / ("coffee.jpg" if i % 2 else "chelsea.jpg"), folder / f"{i:03d}.jpg")
    env = python_env(KILN_LEASE_S="5", KILN_BATCH_SIZE="4")
    workers = []

    def start(name: str) -> LocalWorker:
        workers.append(
            LocalWorker(lite0_package, url, tmp_path / f"{name}.log", [folder], ["--queues", "kiln.bulk"], env)
        )
        return workers[-1]

    try:
        first = start("first")
        with Kiln(settings=ProducerSettings(redis_url=url, chunk_size=60)) as kiln:
            kiln.submit([folder], job="killed")
            wait_for(lambda: kiln.counts("killed").done >= 8, timeout_s=120)  # mid-chunk: 60 images, batches of 4
            os.kill(first.process.pid, signal.SIGKILL)
            first.process.wait(10)
            assert kiln.counts("killed").done < 60, "the chunk finished before the kill; nothing to redeliver"
            # `wait` meanwhile says why nothing moves, where it sat silent for the lease.
            waiting = subprocess.run([sys.executable, "-m", "producer", "wait", "killed", "--timeout", "15",
                                      "--no-progress"], capture_output=True, text=True,
                                     env=python_env(KILN_REDIS_URL=url), timeout=120)  # fmt: skip
            assert waiting.returncode == 2, waiting.stderr
            assert "job killed: 1 chunk held by a worker that stopped (its heartbeat expired" in waiting.stderr
            second = start("second")
            counts = kiln.wait("killed", timeout_s=180, progress=False, check=second.check)
            records = list(kiln.results("killed"))
            executions = list(kiln.store.executions("killed").values())
        assert (counts.total, counts.done, counts.failed) == (60, 60, 0)
        assert len(records) == 60 and len({r.key for r in records}) == 60
        assert executions == [2]
        # The chunk was done again in full: its upserts replaced the first worker's records.
        assert {r.worker.split(":")[1] for r in records} == {str(second.process.pid)}
    finally:
        for worker in workers:
            worker.stop()


def test_a_job_takes_records_of_one_model_only(private_redis_url, lite0_package, tmp_path):
    """Workers serving different packages on one Redis: a job's records come from the model of the
    first worker that took one of its chunks. A worker of another model gives its chunks back
    (before they count as deliveries) and `kiln status` says so; the job's own workers then label
    them. Before, one job held Lite0's ImageNet labels and another model's (a new user's finding)."""
    tiny = build_cached("tiny", ["factories:tiny", "--max-batch", "8", "--tune-batch", "4"])
    url, photos = private_redis_url, sorted(SAMPLES.glob("*.jpg"))
    settings = ProducerSettings(redis_url=url, chunk_size=1)

    def start(package: Path, name: str) -> LocalWorker:
        return LocalWorker(package, url, tmp_path / f"{name}.log", [SAMPLES], ["--threads", "1"], env=python_env())

    with Kiln(settings=settings) as kiln:
        lite0 = start(lite0_package, "lite0")
        try:
            kiln.submit([Item(key="first", ref=str(photos[0]))], job="one")
            kiln.wait("one", timeout_s=180, progress=False, check=lite0.check)
            assert kiln.classify(photos[0], job="live", key="first", timeout_s=120).status == "ok"
        finally:
            lite0.stop()
        other = start(tiny, "tiny")
        try:
            kiln.submit([Item(key=f"more-{i}", ref=str(p)) for i, p in enumerate(photos)], job="one")
            _wait_until(lambda: kiln.counts("one").other_model is not None, 180, "a chunk given back")
            status = subprocess.run([sys.executable, "-m", "producer", "status", "one"], capture_output=True,
                                    text=True, env=python_env(KILN_REDIS_URL=url), timeout=120)  # fmt: skip
            assert "one: its records come from efficientnet_lite0@" in status.stdout, status.stdout
            assert "serves tiny@" in status.stdout and kiln.counts("one").finished == 1
            # Online writes into a job are bound too: a hostile tester had 6 tiny records land in
            # a job of Lite0's.
            refused = kiln.classify(photos[1], job="live", key="second", timeout_s=120)
            assert refused.status == "error" and refused.error.kind == "forbidden", refused
            assert "job live takes records of efficientnet_lite0@" in refused.error.message
        finally:
            other.stop()
        lite0 = start(lite0_package, "lite0-again")
        try:
            counts = kiln.wait("one", timeout_s=180, progress=False, check=lite0.check)
        finally:
            lite0.stop()
        assert counts.done == len(photos) + 1 and counts.other_model is None
        assert {record.model for record in kiln.results("one")} == {"efficientnet_lite0"}
