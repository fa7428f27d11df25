"""bench/gpu.py's warm(): the timed job must start only once every worker process of the
`python -m worker` under test has written records (a process still loading joins it late)."""

from __future__ import annotations

import re
import shutil

import pytest
from conftest import SAMPLES, python_env


def _warm_up_writers(url: str) -> set[str]:
    """The worker processes that wrote records of any of warm()'s jobs."""
    import redis

    from producer import Kiln

    with redis.Redis.from_url(url) as client:
        jobs = {
            m.group(1)
            for k in client.scan_iter("kiln:{gpu-warm-up-*")
            if (m := re.match(r"kiln:\{(.*?)\}", k.decode()))
        }
    with Kiln(url) as kiln:
        return {record.worker for job in jobs for record in kiln.results(job)}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("processes", [1, 2])
def test_warm_waits_for_every_worker_process(lite0_package, private_redis_url, tmp_path, processes):
    from bench.gpu import warm
    from producer.embedded import LocalWorker

    folder = tmp_path / "photos"
    folder.mkdir()
    photos = sorted(SAMPLES.glob("*.jpg"))
    for i in range(64):  # warm() submits chunks of 64: one chunk, one process, per warm-up job
        shutil.copy(photos[i % len(photos)], folder / f"{i:03d}.jpg")
    worker = LocalWorker(
        lite0_package,
        private_redis_url,
        tmp_path / "worker.log",
        [folder],
        ["--concurrency", str(processes)],
        env=python_env(),
    )
    try:
        warm(private_redis_url, folder, [worker], timeout_s=240)  # right after the start, as bench_e2e does
        writers = _warm_up_writers(private_redis_url)
        assert len(writers) == processes, f"warm() returned once {len(writers)} of {processes} processes had answered"
    finally:
        worker.stop()


def test_steady_rate_leaves_out_records_without_a_finishing_time():
    """A job with a poisoned chunk: the task writes its `poison` records with no finishing time
    (worker/tasks.py), and e2e_rate's sort of the finishing times raised TypeError, losing the run."""
    from bench.gpu import steady_rate
    from worker.contract import Record

    ok = [Record(job="j", key=f"k{i}", status="ok", topk=[], finished_at=1000.0 + i / 100) for i in range(100)]
    poison = [Record.failure("j", f"p{i}", "poison", "3 workers died on this chunk") for i in range(8)]
    assert steady_rate(ok + poison) == pytest.approx(100.0)
    assert steady_rate(poison) is None
