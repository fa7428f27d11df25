"""A real worker's memory around hostile images: the peak one image adds, and what stays after a
job (issue 8: no image may raise a worker's RSS by more than 300 MB, and the RSS returns within
10% of its idle size after a job)."""

from __future__ import annotations

import shutil
import time

import pytest
from conftest import SAMPLES, python_env
from hostile import tiff_in_one_tile
from PIL import Image

from producer import Kiln
from producer.embedded import LocalWorker
from producer.settings import ProducerSettings

MB = 2**20


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (the peak since the last reset) of a process, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {name: int(fields[name].split()[0]) * 1024 for name in ("VmRSS", "VmHWM")}


def reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def test_hostile_images_leave_a_workers_memory_as_it_was(private_redis_url, lite0_package, tmp_path):
    folder = tmp_path / "images"
    (folder / "warm-up").mkdir(parents=True)
    (folder / "one").mkdir()
    (folder / "many").mkdir()
    for name in ("coffee", "chelsea"):
        shutil.copy(SAMPLES / f"{name}.jpg", folder / "warm-up" / f"{name}.jpg")
        shutil.copy(SAMPLES / f"{name}.jpg", folder / "many" / f"{name}.jpg")
    # 7000 x 7000 RGBA (49 M pixels, under the default cap): 196 MB decoded, 190 kB on disk.
    Image.new("RGBA", (7000, 7000), (200, 30, 30, 128)).save(folder / "one" / "big.png")
    for i in range(3):
        shutil.copy(folder / "one" / "big.png", folder / "many" / f"big-{i}.png")
    worker = LocalWorker(
        lite0_package, private_redis_url, tmp_path / "worker.log", [folder], ["--queues", "kiln.bulk"], python_env()
    )
    try:
        with Kiln(settings=ProducerSettings(redis_url=private_redis_url, chunk_size=16)) as kiln:

            def run(job: str) -> None:
                kiln.submit([folder / job], job=job)
                counts = kiln.wait(job, timeout_s=300, progress=False, check=worker.check)
                assert counts.failed == 0, [r.error for r in kiln.results(job) if r.error]

            run("warm-up")
            pid = int(next(iter(kiln.results("warm-up"))).worker.split(":")[1])
            time.sleep(2)
            idle = memory(pid)["VmRSS"]
            reset_peak(pid)
            run("one")
            one = memory(pid)
            reset_peak(pid)
            run("many")
            many = memory(pid)
        print(f"idle {idle / MB:.0f} MB; one image: peak +{(one['VmHWM'] - idle) / MB:.0f} MB, after "
              f"{one['VmRSS'] / MB:.0f} MB; five images: peak +{(many['VmHWM'] - idle) / MB:.0f} MB, "
              f"after {many['VmRSS'] / MB:.0f} MB")  # fmt: skip
        assert one["VmHWM"] - idle < 300 * MB
        assert many["VmHWM"] - idle < 300 * MB  # two decode threads share one memory budget
        assert one["VmRSS"] < 1.1 * idle and many["VmRSS"] < 1.1 * idle
    finally:
        worker.stop()


@pytest.mark.parametrize("keep_freed_memory", ["false", "true"])
def test_decoder_buffers_share_the_decode_budget(private_redis_url, lite0_package, tmp_path, keep_freed_memory):
    """Images whose decoders hold more than their pixels, under the limit that refuses them: a
    64x64 TIFF in one 7000x7000 tile (libtiff decodes the whole tile, 147 MB) and a 4500x4500
    progressive CMYK JPEG (155 MB of coefficients at any draft scale). Two decode threads share
    KILN_DECODE_MEMORY_MB, which now counts those buffers: the worker peaks under 300 MB above
    idle with two of each in one job (it counted 12 KB and 2 MB: +1.5 GB for two tile bombs).
    Where freed memory is kept for the model (KILN_KEEP_FREED_MEMORY), too: each decode's buffers
    are handed back after it (+414 MB without)."""
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("CMYK", (4500, 4500), (10, 200, 30, 0)).save(
        folder / "progressive-1.jpg", "JPEG", progressive=True, subsampling=0, quality=90
    )
    shutil.copy(folder / "progressive-1.jpg", folder / "progressive-2.jpg")
    for i in (1, 2):
        (folder / f"tile-{i}.tif").write_bytes(tiff_in_one_tile(64, 7000))
    shutil.copy(SAMPLES / "coffee.jpg", tmp_path / "coffee.jpg")
    worker = LocalWorker(
        lite0_package, private_redis_url, tmp_path / "worker.log", [folder, tmp_path], ["--queues", "kiln.bulk"],
        python_env(KILN_KEEP_FREED_MEMORY=keep_freed_memory),
    )  # fmt: skip
    try:
        with Kiln(settings=ProducerSettings(redis_url=private_redis_url, chunk_size=16)) as kiln:
            kiln.submit([tmp_path / "coffee.jpg"], job="warm-up")
            kiln.wait("warm-up", timeout_s=300, progress=False, check=worker.check)
            pid = int(next(iter(kiln.results("warm-up"))).worker.split(":")[1])
            time.sleep(2)
            idle = memory(pid)["VmRSS"]
            reset_peak(pid)
            kiln.submit([folder], job="heavy")
            counts = kiln.wait("heavy", timeout_s=300, progress=False, check=worker.check)
            assert counts.failed == 0, [r.error for r in kiln.results("heavy") if r.error]
            after = memory(pid)
        print(f"idle {idle / MB:.0f} MB; four heavy decodes: peak +{(after['VmHWM'] - idle) / MB:.0f} MB")
        assert after["VmHWM"] - idle < 300 * MB
    finally:
        worker.stop()
