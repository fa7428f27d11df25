"""Signals to real worker processes at awkward times: while they start, with chunks and decode
processes running, to the whole process group, and to a worker of one process."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import types

import pytest
from conftest import PYTHON, ROOT, SAMPLES, python_env
from http_server import serve_folder
from test_worker import _children, _descendants, _loaded, _stack_dumps, _state, _wait_until

from producer import Item, Kiln
from producer.embedded import LocalWorker
from producer.settings import ProducerSettings
from worker.decode_pool import DecodePool
from worker.manifest import IMAGENET_PREPROCESS
from worker.process_signals import interrupts_held
from worker.settings import DEFAULT_FORMATS

TWO = ["--concurrency", "2", "--threads", "1", "--loglevel", "INFO"]


def _served(base: str, count: int) -> list[Item]:
    photos = sorted(p.name for p in SAMPLES.glob("*.jpg"))
    return [Item(key=f"{i}", ref=f"{base}/{photos[i % len(photos)]}") for i in range(count)]


def _signal_the_group_mid_job(
    kiln: Kiln, worker: LocalWorker, base: str, job: str, count: int, signum: int
) -> set[int]:
    """Submit `count` served photos as `job`, wait until 24 have records, then send `signum` to
    the worker's whole process group (decode processes included); returns its processes then."""
    kiln.submit(_served(base, count), job=job)
    _wait_until(lambda: kiln.counts(job).finished >= 24, 180, "the job to be under way")
    everyone = _descendants(worker.process.pid)
    os.killpg(worker.process.pid, signum)
    return everyone


def test_ctrl_backslash_to_the_whole_group_loses_no_image(private_redis_url, lite0_package, tmp_path):
    """SIGQUIT to every process of the worker, decode processes included (Ctrl-\\): a cold
    shutdown, status 131, nothing left running and no endpoint folder; each image ends as one
    success, here or in the next worker. Before, Celery's cold shutdown raised NotImplementedError
    (the thread pool has no terminate_job) wherever the main thread was, logged as an
    "Unrecoverable error", and multiprocessing's resource tracker died of the signal ("Some
    resources might leak", a KeyError traceback per shared-memory segment)."""
    url = private_redis_url
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = python_env(KILN_FETCH_ALLOWED_NETWORKS="127.0.0.1/32", KILN_METRICS_PORT="0", TMPDIR=str(temp))
    with serve_folder(SAMPLES, delay_s=0.05) as base:
        first = LocalWorker(lite0_package, url, tmp_path / "first.log", [], [*TWO, "--decode-processes", "2"], env)
        second = None
        try:
            with Kiln(settings=ProducerSettings(redis_url=url, chunk_size=4)) as kiln:
                everyone = _signal_the_group_mid_job(kiln, first, base, "quit", 240, signal.SIGQUIT)
                assert first.process.wait(120) == 131, first.log_path.read_text()[-3000:]
                _wait_until(lambda: not any(_state(pid) for pid in everyone), 10, "every process to be gone")
                assert not list(temp.glob("kiln-metrics-*"))
                env = {**env, "TMPDIR": str(tmp_path)}
                second = LocalWorker(lite0_package, url, tmp_path / "second.log", [], ["--threads", "1"], env)
                counts = kiln.wait("quit", timeout_s=300, progress=False, check=second.check)
                records = list(kiln.results("quit"))
            after = first.log_path.read_text().split("SIGQUIT: cold shutdown")[1]
            assert (counts.done, counts.failed) == (240, 0), after[-3000:]
            assert len(records) == 240 and len({r.key for r in records}) == 240
            assert "Traceback" not in after and "error" not in after.lower(), after[-3000:]
        finally:
            first.stop()
            if second is not None:
                second.stop()


def test_sigusr1_while_the_worker_processes_start_ends_none(private_redis_url, lite0_package, tmp_path):
    """SIGUSR1 to the parent at once and many times, while its worker processes start, import and
    load: each logs its stacks, and none dies of it (CI once caught one killed by SIGSEGV, when
    faulthandler read the threads' stacks without the GIL as they started). Before, a
    process that had not yet reached its own signal handling died of it ("killed by SIGUSR1");
    three such starts in a row would stop the whole worker."""
    worker = LocalWorker(lite0_package, private_redis_url, tmp_path / "w.log", [SAMPLES], TWO, env=python_env())
    try:
        _wait_until(lambda: "worker process 1 started" in worker.log_path.read_text(), 60, "the processes to start")
        children = _children(worker.process.pid)
        for _ in range(40):
            os.kill(worker.process.pid, signal.SIGUSR1)
            time.sleep(0.02)
        _loaded(worker, 2)
        _wait_until(lambda: worker.log_path.read_text().count(" ready.") >= 2, 60, "both processes to consume")
        time.sleep(1)
        log = worker.log_path.read_text()
        assert "killed by" not in log and _children(worker.process.pid) == children, log[-3000:]
        with Kiln(settings=ProducerSettings(redis_url=private_redis_url, chunk_size=1)) as kiln:
            kiln.submit([SAMPLES], job="after-usr1")
            assert kiln.wait("after-usr1", timeout_s=120, progress=False, check=worker.check).done == 6
        os.kill(worker.process.pid, signal.SIGTERM)
        assert worker.process.wait(60) == 0, worker.log_path.read_text()[-3000:]
    finally:
        worker.stop()


def test_sigusr1_to_the_whole_group_fails_no_image(private_redis_url, lite0_package, tmp_path):
    """SIGUSR1 to every process of the worker (`systemctl kill -s USR1`, `kill -USR1 -PGID`)
    while a job runs on decode processes: stacks are logged, nothing dies, no image fails. Before,
    the decode processes and the resource tracker died of it and the images they held were recorded
    as failed."""
    url = private_redis_url
    env = python_env(KILN_FETCH_ALLOWED_NETWORKS="127.0.0.1/32")
    with serve_folder(SAMPLES, delay_s=0.05) as base:
        worker = LocalWorker(lite0_package, url, tmp_path / "w.log", [], [*TWO, "--decode-processes", "2"], env)
        try:
            with Kiln(settings=ProducerSettings(redis_url=url, chunk_size=4)) as kiln:
                everyone = _signal_the_group_mid_job(kiln, worker, base, "usr1", 160, signal.SIGUSR1)
                counts = kiln.wait("usr1", timeout_s=300, progress=False, check=worker.check)
            log = worker.log_path.read_text()
            assert (counts.done, counts.failed) == (160, 0), log[-3000:]
            assert all(_state(pid) not in (None, "Z") for pid in everyone), log[-3000:]
            assert "died" not in log, log[-3000:]
        finally:
            worker.stop()


def test_sigquit_then_sigterm_kills_them(private_redis_url, lite0_package, tmp_path):
    """SIGQUIT, then SIGTERM before they are down: killed, status 143 (the last signal's)."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = python_env(KILN_METRICS_PORT="0", TMPDIR=str(temp))
    worker = LocalWorker(lite0_package, private_redis_url, tmp_path / "w.log", [SAMPLES], TWO, env=env)
    try:
        _loaded(worker, 2)
        children = _children(worker.process.pid)
        os.kill(worker.process.pid, signal.SIGQUIT)
        os.kill(worker.process.pid, signal.SIGTERM)
        assert worker.process.wait(60) == 143, worker.log_path.read_text()[-3000:]
        assert not any(_state(pid) for pid in children) and not list(temp.glob("kiln-metrics-*"))
    finally:
        worker.stop()


def test_a_single_worker_stops_cold_with_chunks_running(private_redis_url, lite0_package, tmp_path):
    """A worker of one process (no --concurrency) gets SIGQUIT while it runs chunks: Celery's cold
    shutdown, status 131 as a supervisor's (`stop_status`; Celery itself ended it 0); the running
    chunks finish in their threads and the reserved one goes back at once; no error is logged.
    Before: "Unrecoverable error: NotImplementedError" and status 1."""
    url = private_redis_url
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = python_env(KILN_FETCH_ALLOWED_NETWORKS="127.0.0.1/32", KILN_METRICS_PORT="0", TMPDIR=str(temp))
    with serve_folder(SAMPLES, delay_s=0.1) as base:
        first = LocalWorker(
            lite0_package, url, tmp_path / "first.log", [], ["--threads", "1", "--loglevel", "INFO"], env
        )
        second = None
        try:
            with Kiln(settings=ProducerSettings(redis_url=url, chunk_size=40)) as kiln:
                kiln.submit(_served(base, 120), job="quit")
                _wait_until(lambda: kiln.counts("quit").finished >= 4, 180, "the job to be under way")
                os.kill(first.process.pid, signal.SIGQUIT)
                status = first.process.wait(120)
                assert not list(temp.glob("kiln-metrics-*"))
                env = {**env, "TMPDIR": str(tmp_path)}
                second = LocalWorker(lite0_package, url, tmp_path / "second.log", [], ["--threads", "1"], env)
                counts = kiln.wait("quit", timeout_s=300, progress=False, check=second.check)
                records = list(kiln.results("quit"))
            after = first.log_path.read_text().split("Hitting Ctrl+C")[-1]
            assert status == 131 and "error" not in after.lower(), after[-3000:]
            assert (counts.done, counts.failed, len(records)) == (120, 0, 120)
        finally:
            first.stop()
            if second is not None:
                second.stop()


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM, signal.SIGINT])
def test_a_single_worker_signalled_while_it_loads(signum, private_redis_url, lite0_package, tmp_path):
    """A worker of one process gets a signal once its endpoint is up, before Celery's handlers
    are: SIGUSR1 logs every thread's stack at once and it starts on (and again once it is up);
    SIGHUP waits until it is up, then stops it warm; SIGTERM or SIGINT stops it, status 0, and
    SIGQUIT 131, with no traceback: the statuses it has once up, so the same whichever handlers
    the signal meets (CI's run caught one just after Celery's were in). Each time its endpoint
    folder is removed. Before, the signal's default action ended it and left the folder in
    $TMPDIR, and SIGUSR1 was held until Celery was up, so a worker stuck in its start logged nothing."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = python_env(KILN_METRICS_PORT="0", TMPDIR=str(temp))
    options = ["--threads", "1", "--loglevel", "INFO"]
    worker = LocalWorker(lite0_package, private_redis_url, tmp_path / "w.log", [SAMPLES], options, env=env)
    try:
        _wait_until(lambda: list(temp.glob("kiln-metrics-*")), 60, "the endpoint")
        os.kill(worker.process.pid, signum)
        expected = 131 if signum == signal.SIGQUIT else 0
        if signum == signal.SIGUSR1:
            _wait_until(lambda: _stack_dumps(worker.log_path.read_text()), 60, "the stacks")
            _wait_until(lambda: " ready." in worker.log_path.read_text(), 60, "the worker to be up")
            os.kill(worker.process.pid, signum)  # kiln's handler again, not Celery's, once it is up
            _wait_until(lambda: len(_stack_dumps(worker.log_path.read_text())) == 2, 60, "the stacks again")
            os.kill(worker.process.pid, signal.SIGTERM)
        assert worker.process.wait(60) == expected, worker.log_path.read_text()[-3000:]
        assert not list(temp.glob("kiln-metrics-*")) and "Traceback" not in worker.log_path.read_text()
    finally:
        worker.stop()


def test_sighup_stops_a_single_worker_warm(private_redis_url, lite0_package, tmp_path):
    """SIGHUP to a serving worker of one process (a closed terminal, `systemctl kill -s HUP`): a
    warm shutdown, as the supervisor's, status 0, nothing left behind. Before, it was Celery's
    restart in place (`execv`), which leaked the endpoint folder and a zombie resource tracker per
    restart, or, on a terminal, the default action's death (129)."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = python_env(KILN_METRICS_PORT="0", TMPDIR=str(temp))
    options = ["--threads", "1", "--loglevel", "INFO", "--decode-processes", "1"]
    worker = LocalWorker(lite0_package, private_redis_url, tmp_path / "w.log", [SAMPLES], options, env=env)
    try:
        _loaded(worker, 1)
        with Kiln(settings=ProducerSettings(redis_url=private_redis_url, chunk_size=2)) as kiln:
            kiln.submit([SAMPLES], job="before-hup")
            assert kiln.wait("before-hup", timeout_s=120, progress=False, check=worker.check).done == 6
        everyone = _descendants(worker.process.pid)
        os.kill(worker.process.pid, signal.SIGHUP)
        assert worker.process.wait(60) == 0, worker.log_path.read_text()[-3000:]
        log = worker.log_path.read_text()
        assert "Restarting" not in log and not list(temp.glob("kiln-metrics-*")), log[-3000:]
        _wait_until(lambda: not any(_state(pid) for pid in everyone), 20, "its decode processes to be gone")
    finally:
        worker.stop()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP, signal.SIGUSR1])
def test_decode_processes_signalled_while_they_start(signum):
    """Ctrl-C, a hang-up or SIGUSR1 to the group reaches decode processes that are still starting
    (the pool starts them when the first images come, and again after a restart): they decode on,
    and no image fails. Before, they ignored these signals only once started: one died of it in
    its imports, and the images queued for it were recorded as failed."""
    photos = [p.read_bytes() for p in sorted(SAMPLES.glob("*.jpg"))]
    pool = DecodePool(2, IMAGENET_PREPROCESS, 50_000_000, DEFAULT_FORMATS, slots=8)
    try:
        before = _children(os.getpid())  # the resource tracker, a fixture's redis-server
        futures = [pool.submit(data) for data in photos]
        starting = _children(os.getpid()) - before
        assert starting, "the pool started no process"
        for pid in starting:
            os.kill(pid, signum)
        slots = [future.result(timeout=120) for future in futures]
        assert len(set(slots)) == len(photos)
        assert all(_state(pid) not in (None, "Z") for pid in starting)
    finally:
        pool.close()


def test_a_task_read_after_the_pool_stopped_is_left_for_the_queue():
    """Celery's thread pool raised "cannot schedule new futures after shutdown" for a message the
    consumer read between the pool's stop and its own (once in CI): the worker stopped with a
    traceback as an unrecoverable error. Stopped, kiln's pool runs nothing and raises nothing (the
    message stays unacknowledged and goes back to the queue); a pool not stopped still raises."""
    from worker.pool import ThreadPool

    ran: list[int] = []
    done: list[object] = []  # Celery's pool hands each task's return value to a callback
    pool = ThreadPool(limit=1)
    pool.start()
    pool.apply_async(ran.append, args=(1,), callback=done.append).get()
    pool.stop()
    assert pool.apply_async(ran.append, args=(2,), callback=done.append) is None
    assert ran == [1] and done == [None]
    broken = ThreadPool(limit=1)
    broken.start()
    broken.executor.shutdown()
    with pytest.raises(RuntimeError):
        broken.apply_async(ran.append, args=(3,), callback=done.append)


def test_a_cold_shutdown_reads_the_running_tasks_while_their_threads_finish():
    """Celery's cold shutdown reads its set of running tasks on the main thread while the thread
    pool's tasks finish and leave it: "Set changed size during iteration" stopped a worker
    (caught by test_ctrl_backslash_to_the_whole_group_loses_no_image). Here one task's thread
    finishes while the shutdown reads the set: the consumer reads it again and cancels the task
    still running, where Celery's own method raised."""
    from celery.worker.consumer import Consumer
    from celery.worker.state import active_requests

    from worker.consumer import KilnConsumer

    cancelled = []

    class Running:  # a task request, as Celery's shutdown reads it
        def __init__(self, name: str, finishing: Running | None = None) -> None:
            self.name, self.finishing = name, finishing

        @property
        def task(self) -> types.SimpleNamespace:
            if self.finishing is not None:  # meanwhile another thread finishes that task
                active_requests.discard(self.finishing)
                self.finishing = None
            return types.SimpleNamespace(acks_late=False)

        def cancel(self, pool: object, emit_retry: bool) -> None:
            cancelled.append(self.name)

    for consumer_class in (Consumer, KilnConsumer):
        done = Running("done")
        running = Running("running", finishing=done)
        active_requests.update((done, running))
        consumer = object.__new__(consumer_class)
        consumer.pool = None
        try:
            if consumer_class is Consumer:
                with pytest.raises(RuntimeError, match="changed size during iteration"):
                    consumer.cancel_active_requests()
            else:
                consumer.cancel_active_requests()
        finally:
            active_requests.difference_update((done, running))
    assert cancelled == ["running"]


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 0), (signal.SIGINT, 0), (signal.SIGQUIT, 131)])
def test_a_stop_whose_exit_python_swallowed_is_not_lost(signum, status):
    """A stop while a worker starts raises SystemExit from its handler; where the signal lands in
    a finalizer, Python swallows it ("Exception ignored in ..."). A hostile test caught a worker
    process carrying on so, loading its model and serving, while its parent waited for it forever.
    The first stop is kept, the later ones are ignored, and the start's next step exits with it;
    Python's "Exception ignored ... SystemExit" traceback is left out, as the stop is not lost."""
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
from worker.process_signals import exit_if_stopped, exit_on_stop_until_ready
exit_on_stop_until_ready()
class Finalized:
    def __del__(self):
        os.kill(os.getpid(), {int(signum)})
        for _ in range(10_000):  # the handler runs in here: its SystemExit goes nowhere
            pass
Finalized()
os.kill(os.getpid(), signal.SIGTERM)  # a second stop: ignored, the first decides
print("carried on", flush=True)
exit_if_stopped()
print("never stopped", flush=True)
"""
    done = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, timeout=60)
    # "carried on": Python swallowed the SystemExit; quietly, since the stop is kept
    assert done.stdout.split() == ["carried", "on"] and done.returncode == status, (done.stdout, done.stderr)
    assert "Exception ignored" not in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_stops_stay_blocked_across_the_worker_exec():
    """A worker that re-executes itself (with the C++ runtime preloaded, worker/cxx_runtime.py)
    keeps the stops blocked across the exec until the new image takes them: in the new
    interpreter's first ~30 ms their default action ended it (143, or a KeyboardInterrupt
    traceback). A stop sent meanwhile is taken then, and exits as any other."""
    new_image = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
from worker.process_signals import exit_on_stop_until_ready
held = signal.pthread_sigmask(signal.SIG_BLOCK, [])
print(sorted(s.name for s in held & {{signal.SIGTERM, signal.SIGINT, signal.SIGQUIT}}), flush=True)
os.kill(os.getpid(), signal.SIGTERM)  # as if sent in those first moments
exit_on_stop_until_ready()
print("carried on", flush=True)
"""
    script = f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
from worker.process_signals import before_exec, exit_on_stop_until_ready
exit_on_stop_until_ready()
before_exec()
os.execv(sys.executable, [sys.executable, "-c", {new_image!r}])
"""
    done = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.splitlines() == ["['SIGINT', 'SIGQUIT', 'SIGTERM']"], (done.stdout, done.stderr)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr


def test_a_ctrl_c_inside_a_held_block_is_raised_where_it_ends():
    """What the `kiln` launcher and `python -m compile` import torch under (tests/test_kiln_cli.py
    runs the commands)."""
    went_on = False
    with pytest.raises(KeyboardInterrupt), interrupts_held():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs here, and holds it
        went_on = True
    assert went_on
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_ctrl_c_inside_a_held_block_is_not_held():
    with pytest.raises(KeyboardInterrupt), interrupts_held():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # interrupted here
        pytest.fail("the second Ctrl-C was held too")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
