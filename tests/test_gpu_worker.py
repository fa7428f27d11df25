"""GPU workers end to end (KILN_TEST_DEVICE=cuda only; CI has no GPU): a worker decodes on its
GPU by default, and a CUDA error that poisons the context makes the worker exit unacknowledged,
so that another worker redoes its chunk and no healthy image gets an `internal` record."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
from conftest import SAMPLES, python_env
from packages import DEVICE

from producer import Kiln
from producer.embedded import LocalWorker
from producer.settings import ProducerSettings
from worker.jpeg_codecs import LIBRARIES
from worker.plan import host_cores

pytestmark = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device (KILN_TEST_DEVICE=cuda)")


@pytest.mark.parametrize("stage", ["decode", "infer"])
def test_a_poisoned_cuda_context_hands_the_chunk_to_another_worker(private_redis_url, lite0_package, tmp_path, stage):
    """A device-side assert in the second GPU-decode batch or the second model batch: the error
    is asynchronous, so the stage's next synchronising call raises it (inside nvJPEG's decode, for
    `decode`), and the worker must exit 70 whichever call that is, never fail images as `internal`."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(48):
        shutil.copy(SAMPLES / ("coffee.jpg" if i % 2 else "chelsea.jpg"), folder / f"{i:03d}.jpg")
    url = private_redis_url
    options = ["--queues", "kiln.bulk", "--loglevel", "INFO"]
    env = python_env(KILN_LEASE_S="10", KILN_BATCH_SIZE="8")
    # One process: its exit status is the worker's (a parent would start it again, test_worker.py).
    faulty = LocalWorker(
        lite0_package, url, tmp_path / "faulty.log", [folder], [*options, "--concurrency", "1"],
        env={**env, "KILN_TEST_CUDA_FAULT": f"{stage}:1"},
    )  # fmt: skip
    healthy = None
    try:
        with Kiln(settings=ProducerSettings(redis_url=url, chunk_size=48)) as kiln:
            kiln.submit([folder], job="poisoned")
            assert faulty.process.wait(180) == 70, faulty.log_path.read_text()[-3000:]
            assert "CUDA error" in faulty.log_path.read_text()
            assert kiln.counts("poisoned").finished < 48  # its chunk was not acknowledged as done
            healthy = LocalWorker(lite0_package, url, tmp_path / "healthy.log", [folder], options, env=env)
            counts = kiln.wait("poisoned", timeout_s=300, progress=False, check=healthy.check)
            records = list(kiln.results("poisoned"))
        assert (counts.total, counts.done, counts.failed) == (48, 48, 0)
        assert len({r.key for r in records}) == 48 and all(r.status == "ok" for r in records)
        log = healthy.log_path.read_text()
        # The default plan decodes on the GPU; with several processes per GPU (worker/plan.py),
        # with nvImageCodec where it is installed.
        several = host_cores() >= 8
        nvimgcodec = several and importlib.util.find_spec("nvidia.nvimgcodec") is not None
        assert f"GPU ({LIBRARIES['nvimgcodec' if nvimgcodec else 'torchvision']}) for JPEGs" in log
        if several:
            assert "worker processes started" in log
    finally:
        faulty.stop()
        if healthy is not None:
            healthy.stop()
