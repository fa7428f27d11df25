"""Fourteenth-session diagnosis on the H200: why the default worker (nvImageCodec, four
processes, three decode processes each) ran 640x480 JPEGs at 4.6-5.7k images/s, where the 13th
session had measured 12.1k and torchvision's nvJPEG ran 10.4-10.7k on the same hosts.

Each end-to-end variant runs one job of 65,536 JPEGs through Redis (`job` of gpu_host_budget.py:
rate, steady rate, CPU seconds by role, per-process timeline) and reports how often a process
stalls (a quarter second in the steady part with under a quarter of its median):
- default, torchvision; unshared_decoder: the worker as before commit 7deef1b, the start-up
  check and the pipeline each with a decoder of its own (a `sitecustomize` on PYTHONPATH);
- gc_off: Python's cyclic garbage collector off in every process;
- blocking_sync: every CUDA context blocks its waiting threads instead of spinning a core;
- 3, 5 and 6 worker processes; 16 chunk tasks in flight; batches of 128;
- under CUDA MPS: the default, and 6 processes.
`in_process` times nvImageCodec's batch decode alone, fresh and after the start-up check.
VARIANTS=a,b picks some. The answer (bench/results/gpu-h200-worker-variants.json): a decoder
whose first JPEG was the check's 16x16 one stays slow (`worker.jpeg_codecs.frame_decoder`).

    python3 bench/diagnose/gpu_worker_variants.py $OUT/variants.json .whl
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

from common import Results, mps_daemon, resnet18_on_640x480, worker_variant

R = Results(sys.argv[1])
WANTED = set(filter(None, os.environ.get("VARIANTS", "").split(",")))  # default: all


# Every CUDA context of the process blocks the threads that wait for the GPU, where by default
# (cudaDeviceScheduleAuto, with fewer contexts than cores) each waiting thread spins a core.
BLOCKING_SYNC = """
import ctypes
try:
    cuda = ctypes.CDLL("libcuda.so.1")
except OSError:
    cuda = None
if cuda is not None and cuda.cuInit(0) == 0:
    count = ctypes.c_int()
    cuda.cuDeviceGetCount(ctypes.byref(count))
    for ordinal in range(count.value):
        device = ctypes.c_int()
        cuda.cuDeviceGet(ctypes.byref(device), ordinal)
        cuda.cuDevicePrimaryCtxSetFlags_v2(device, 4)  # CU_CTX_SCHED_BLOCKING_SYNC
"""


def _site(folder: Path, code: str) -> dict[str, str]:
    """The environment that runs `code` at the start of every Python process (a sitecustomize)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(code)
    return {"PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])}


# The worker as it was before one frame decoder was shared by the start-up check and the pipeline
# (commit 7deef1b): each caller of `frame_decoder` gets a decoder of its own.
UNSHARED_DECODER = """
import worker.jpeg_codecs as codecs
codecs.frame_decoder = codecs._frame_decoder.__wrapped__
"""


def in_process(folder: Path) -> None:
    """nvImageCodec's batch decode alone, from a thread on a stream of its own as the worker's
    decode thread runs it: a fresh decoder, and the one the start-up check used first (a 16x16
    JPEG on the main thread's default stream). Rate, and CPU time of the whole process (the
    library's threads included) per image."""
    import threading

    import torch

    from worker.gpu_decode import decoder_available
    from worker.jpeg_codecs import NvImageCodecFrames, frame_decoder

    device = torch.device("cuda:0")
    datas = [p.read_bytes() for p in sorted(folder.rglob("*.jpg"))[:2048]]

    def measure(frames) -> dict:
        out: dict = {}

        def run() -> None:
            torch.cuda.set_device(device)
            with torch.cuda.stream(torch.cuda.Stream(device)):
                frames(datas[:256])
                started, cpu, images = time.perf_counter(), time.process_time(), 0
                for _ in range(3):
                    for i in range(0, len(datas), 256):
                        images += len(frames(datas[i : i + 256]))
                out["images_per_s"] = round(images / (time.perf_counter() - started))
                out["cpu_ms_per_image"] = round((time.process_time() - cpu) * 1e3 / images, 3)

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        return out

    rows = {"fresh": measure(NvImageCodecFrames(device))}
    rows["start_up_checked"] = {"check": decoder_available(device, "nvimgcodec")}
    rows["start_up_checked"].update(measure(frame_decoder(device, "nvimgcodec")))
    rows["fresh_again"] = measure(NvImageCodecFrames(device))
    R["in_process"] = rows
    R.save()
    print("in_process", rows, flush=True)


def stalls(per_process: dict[str, list[int]]) -> dict[str, float]:
    """Per process: the share of quarter seconds in the middle 60% of its run with under a quarter
    of its median count."""
    shares = {}
    for name, bins in per_process.items():
        busy = [i for i, n in enumerate(bins) if n]
        if len(busy) < 5:
            continue
        lo, hi = busy[0] + len(busy) // 5, busy[-1] - len(busy) // 5
        middle = bins[lo : hi + 1]
        median = statistics.median(middle)
        shares[name] = round(sum(1 for n in middle if n < median / 4) / len(middle), 3)
    return shares


def variant(url: str, package: str, folder: Path, workdir: Path, name: str, env: dict, spy: bool = False) -> None:
    if WANTED and name not in WANTED:
        return
    from gpu_host_budget import job  # after the wheels are installed: it imports redis

    def measure(worker) -> dict:
        row = job(url, folder, worker, 8, workdir if spy else None)
        return {**row, "stall_share": stalls(row["per_process_per_quarter_second"])}

    log = workdir / f"worker-variant-{name}.log"
    shown = ("images_per_s", "steady_images_per_s", "cores_busy", "cpu_ms_per_image", "stall_share")
    worker_variant(R, name, package, url, folder, log, env, measure, shown)


def main() -> None:
    started = time.perf_counter()
    package, small, workdir = resnet18_on_640x480(sys.argv[2:])
    R["setup_s"] = round(time.perf_counter() - started, 1)
    if not WANTED or "in_process" in WANTED:
        in_process(small)
    unshared = _site(workdir / "unshared", UNSHARED_DECODER)
    gc_off = _site(workdir / "no-gc", "import gc\ngc.disable()\n")
    blocking = _site(workdir / "blocking-sync", BLOCKING_SYNC)
    try:
        import cuda.bindings.driver  # noqa: F401

        R["cuda_bindings"] = "importable"
    except ImportError as e:
        R["cuda_bindings"] = repr(e)
    torchvision = {"KILN_GPU_DECODER": "torchvision"}
    from producer.embedded import embedded_redis

    with embedded_redis(workdir / "redis-variants", persist=False) as url:
        variant(url, package, small, workdir, "default", {})
        variant(url, package, small, workdir, "unshared_decoder", unshared)
        variant(url, package, small, workdir, "blocking_sync", blocking, spy=True)
        variant(url, package, small, workdir, "blocking_sync_processes_6", {**blocking, "KILN_PROCESSES_PER_GPU": "6"})
        variant(url, package, small, workdir, "torchvision", torchvision)
        variant(url, package, small, workdir, "blocking_sync_torchvision", {**blocking, **torchvision})
        variant(url, package, small, workdir, "gc_off", gc_off)
        variant(url, package, small, workdir, "processes_6", {"KILN_PROCESSES_PER_GPU": "6"})
        variant(url, package, small, workdir, "processes_5", {"KILN_PROCESSES_PER_GPU": "5"})
        variant(url, package, small, workdir, "in_flight_16", {"KILN_TASKS_IN_FLIGHT": "16"})
        variant(url, package, small, workdir, "batch_128", {"KILN_BATCH_SIZE": "128"})
        variant(url, package, small, workdir, "processes_3", {"KILN_PROCESSES_PER_GPU": "3"})
        with mps_daemon() as pipes:
            if pipes is None:
                R["mps"] = {"skipped": "no nvidia-cuda-mps-control"}
            else:
                variant(url, package, small, workdir, "mps_default", pipes)
                variant(url, package, small, workdir, "mps_processes_6", {**pipes, "KILN_PROCESSES_PER_GPU": "6"})
    R.save()


if __name__ == "__main__":
    main()
