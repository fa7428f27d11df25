"""Fifteenth-session diagnosis on the H200: where camera photos' host work goes, and how much of
it the CPU decode processes should take from the GPU. The worker routes a JPEG that `draft`
shrinks to its own process while the GPU is busy (`worker.route.GpuBusy`): from
`worker.route.GPU_BUSY_PIXELS` full-size pixels waiting for it. Until session 14 the rule was half
a batch of images waiting (128 camera photos, 1.5 Gpx), and 4000x3000 JPEGs ran at 1.09x the GPU
decoder's ceiling.

Each end-to-end variant runs one job through Redis (`job` of gpu_host_budget.py: rate, steady
rate, CPU seconds by role), with the images each decoder took and the GPU decode thread's busy
share, dumped by each worker process. A `sitecustomize` on the worker's PYTHONPATH sets
GPU_BUSY_PIXELS (KILN_DIAG_GPU_BUSY_PIXELS) and nvImageCodec's backends
(KILN_DIAG_NVIMGCODEC_BACKENDS, BackendKind names) in its processes.
`backends` times nvImageCodec's batch decode of camera photos in one process and in four at once,
by backend: images/s and the process's CPU ms per image.
The decode ceilings are measured in the same run (`bench.gpu.bench_decode`). VARIANTS=a,b picks
some.

First run (bench/results/gpu-h200-camera-routing.json): the threshold hardly mattered, the CPU
processes took 12-17% of the photos, and the host's cores were busy (14 of 16): 4.8 ms of CPU an
image in the worker processes, 7.1 in the decode processes, 3.5 of them reading each photo's
headers (since 0.3). Second run, with that fixed (gpu-h200-camera-cpu.json): 1,219 img/s, 1.13x
the ceiling of that host; nvImageCodec's default backends decode camera photos as `HW_GPU_ONLY`
does, and a process waiting for the engine spins a core (3.9 ms of CPU an image, four at once).
`handover` (no GPU needed: VARIANTS=handover runs it alone) times how camera photos for the GPU
come back from the decode processes, in a shared-memory file a load (kiln's, since session 16) or
through the result pipe, with the worker's other threads busy or not; `camera_no_handover` is the
pipe end to end.

    python3 bench/diagnose/gpu_camera_routing.py $OUT/routing.json .whl
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from common import ROOT, Results, resnet18_on_640x480, worker_variant

R = Results(sys.argv[1])
WANTED = set(filter(None, os.environ.get("VARIANTS", "").split(",")))  # default: all
DUMPS = Path("/tmp/kiln-routing-dumps")
MPX = 2**20

# Runs at the start of every Python process of the worker: sets GPU_BUSY_PIXELS once
# worker.route is imported, and makes each Pipeline dump its decoder counts and stage times.
SITE = """
import importlib.abc, importlib.machinery, json, os, sys, time

_PIXELS = os.environ.get("KILN_DIAG_GPU_BUSY_PIXELS")
_BACKENDS = os.environ.get("KILN_DIAG_NVIMGCODEC_BACKENDS")
_DUMPS = os.environ["KILN_DIAG_DUMPS"]


def _after_route(module):
    if _PIXELS:
        module.GPU_BUSY_PIXELS = int(_PIXELS)


def _after_pipeline(module):
    counted = module.Pipeline._count

    def _count(self, decoder, images=1):
        counted(self, decoder, images)
        total = sum(self.decoded_by.values())
        if total // 256 != (total - images) // 256:
            stages = {k: vars(v) for k, v in self.stages.items()}
            row = {"decoded_by": dict(self.decoded_by), "stages": stages, "at": time.time()}
            with open(os.path.join(_DUMPS, f"{os.getpid()}.json"), "w") as f:
                json.dump(row, f)

    module.Pipeline._count = _count


def _after_codecs(module):
    if not _BACKENDS:
        return
    made = module.NvImageCodecFrames.__init__

    def __init__(self, device):
        made(self, device)
        nvimgcodec = module.import_nvimgcodec()
        kinds = [nvimgcodec.Backend(getattr(nvimgcodec.BackendKind, k)) for k in _BACKENDS.split(",")]
        self._decoder = nvimgcodec.Decoder(
            device_id=self.device.index, backends=kinds, max_num_cpu_threads=2, options=":fancy_upsampling=1"
        )

    module.NvImageCodecFrames.__init__ = __init__


def _after_decode_pool(module):
    if os.environ.get("KILN_DIAG_NO_HANDOVER"):
        module._hand_over = lambda loads, prefix: loads


_AFTER = {
    "worker.route": _after_route,
    "worker.pipeline": _after_pipeline,
    "worker.jpeg_codecs": _after_codecs,
    "worker.decode_pool": _after_decode_pool,
}


class _Patch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _AFTER:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module, run=run, name=name):
            run(module)
            _AFTER[name](module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Patch())
"""


def dumps() -> dict:
    decoded: dict[str, int] = {}
    gpu_busy_s = gpu_images = gpu_batches = 0.0
    for path in DUMPS.glob("*.json"):
        row = json.loads(path.read_text())
        for name, count in row["decoded_by"].items():
            decoded[name] = decoded.get(name, 0) + count
        stage = row["stages"]["gpu_decode"]
        gpu_busy_s += stage["busy_s"]
        gpu_images += stage["images"]
        gpu_batches += stage["batches"]
    return {
        "decoded_by": decoded,
        "gpu_decode_busy_s": round(gpu_busy_s, 2),
        "gpu_images_per_batch": round(gpu_images / gpu_batches, 1) if gpu_batches else None,
        "processes_dumped": len(list(DUMPS.glob("*.json"))),
    }


def variant(url: str, package: str, folder: Path, workdir: Path, name: str, env: dict, repeat: int) -> None:
    if WANTED and name not in WANTED:
        return
    from gpu_host_budget import job

    shutil.rmtree(DUMPS, ignore_errors=True)
    DUMPS.mkdir(parents=True)
    site_path = os.pathsep.join([str(site_folder(workdir)), os.environ.get("PYTHONPATH", "")])

    def measure(worker) -> dict:
        shutil.rmtree(DUMPS)  # the warm-up's counts
        DUMPS.mkdir()
        row = job(url, folder, worker, repeat, None)
        row.pop("per_process_per_quarter_second", None)
        row.pop("timeline", None)
        time.sleep(0.5)
        row.update(dumps())
        decoded = row["decoded_by"]
        row["cpu_share"] = round(decoded.get("processes", 0) / max(1, sum(decoded.values())), 3)
        busy = row["gpu_decode_busy_s"] / row["seconds"] / max(1, row["processes_dumped"])
        return {**row, "gpu_decode_busy_share": round(busy, 3)}

    log = workdir / f"worker-routing-{name}.log"
    full_env = {**env, "KILN_DIAG_DUMPS": str(DUMPS), "PYTHONPATH": site_path}
    shown = ("images_per_s", "steady_images_per_s", "cores_busy", "cpu_share", "decoded_by", "gpu_images_per_batch",
             "gpu_decode_busy_share")  # fmt: skip
    worker_variant(R, name, package, url, folder, log, full_env, measure, shown)


# nvImageCodec's backend choices (BackendKind names; None: its default, every backend it has).
BACKENDS = {
    "default": None,
    "hw_only": ["HW_GPU_ONLY"],
    "hw_then_cuda": ["HW_GPU_ONLY", "GPU_ONLY"],
    "cuda_only": ["GPU_ONLY"],
    "hybrid_only": ["HYBRID_CPU_GPU"],
}
PART = 43  # camera photos per decode call: kiln's parts of 512 Mpx (worker.gpu_decode.MAX_DECODED_PIXELS)


def decode_rate(args: tuple[list[str], list[str] | None, float | None]) -> dict:
    """nvImageCodec's batch decode of `files` in parts of PART, as the worker calls it (two CPU
    threads, libjpeg's chroma upsampling): images/s, and this process's CPU ms per image (all its
    threads). Waits until `start_at` (time.time()) after warming up, so that processes run at once."""
    import torch

    from worker.jpeg_codecs import import_nvimgcodec

    files, kinds, start_at = args
    nv = import_nvimgcodec()
    extra = {"backends": [nv.Backend(getattr(nv.BackendKind, k)) for k in kinds]} if kinds else {}
    decoder = nv.Decoder(device_id=0, max_num_cpu_threads=2, options=":fancy_upsampling=1", **extra)
    params = nv.DecodeParams(color_spec=nv.ColorSpec.SRGB, apply_exif_orientation=False)
    datas = [Path(f).read_bytes() for f in files]
    stream = torch.cuda.current_stream().cuda_stream

    def once() -> int:
        refused = 0
        for i in range(0, len(datas), PART):
            out = decoder.decode([nv.CodeStream(d) for d in datas[i : i + PART]], params=params, cuda_stream=stream)
            refused += sum(1 for image in out if image is None)
        torch.cuda.synchronize()
        return refused

    once()
    if start_at is not None:
        time.sleep(max(0.0, start_at - time.time()))
    wall, cpu = time.perf_counter(), time.process_time()
    refused = once() + once()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    streams = time.process_time()
    for data in datas:
        nv.CodeStream(data)
    streams = time.process_time() - streams
    n = 2 * len(datas)
    return {
        "images_per_s": round(n / wall, 1),
        "cpu_ms_per_image": round(cpu * 1e3 / n, 3),
        "refused_per_round": refused / 2,
        "code_stream_cpu_ms": round(streams * 1e3 / len(datas), 3),
    }


def backends(large: Path) -> None:
    import multiprocessing

    files = [str(f) for f in sorted(large.rglob("*.jpg"))[: 8 * PART]]
    rows: dict = {}
    for name, kinds in BACKENDS.items():
        try:
            rows[f"{name}_one_process"] = decode_rate((files, kinds, None))
        except Exception as e:
            rows[f"{name}_one_process"] = {"error": repr(e)[-500:]}
        print("backends", name, rows[f"{name}_one_process"], flush=True)
        R["backends"] = rows
        R.save()
    for name in ("default", "hw_only", "hw_then_cuda"):
        start_at = time.time() + 25
        try:
            with multiprocessing.get_context("spawn").Pool(4) as pool:
                parts = pool.map(decode_rate, [(files, BACKENDS[name], start_at)] * 4)
            rows[f"{name}_four_processes"] = {
                "images_per_s": round(sum(p["images_per_s"] for p in parts), 1),
                "cpu_ms_per_image": round(sum(p["cpu_ms_per_image"] for p in parts) / 4, 3),
                "each": parts,
            }
        except Exception as e:
            rows[f"{name}_four_processes"] = {"error": repr(e)[-500:]}
        print("backends", name, "x4", rows[f"{name}_four_processes"], flush=True)
        R["backends"] = rows
        R.save()


def site_folder(workdir: Path) -> Path:
    site = workdir / "routing-site"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(SITE)
    return site


def handover(large: Path, workdir: Path, rounds: int = 12) -> None:
    """How camera photos for the GPU come back from the decode processes, in this process as the
    worker's pool gives them: in a shared-memory file a load (kiln's) or through the result pipe
    (KILN_DIAG_NO_HANDOVER), with 0 or 3 threads running Python here meanwhile, as the worker's
    pipeline threads do. Per load of 16 photos: wall ms from submit to result, and this process's
    CPU ms."""
    import threading

    from worker.decode_pool import DecodePool
    from worker.fetch import FetchPolicy
    from worker.manifest import IMAGENET_PREPROCESS
    from worker.settings import DEFAULT_FORMATS

    files = [str(f) for f in sorted(large.rglob("*.jpg"))[:16]]
    os.environ["KILN_DIAG_DUMPS"] = "/tmp"
    os.environ["PYTHONPATH"] = os.pathsep.join([str(site_folder(workdir)), os.environ.get("PYTHONPATH", "")])
    rows: dict = {}
    for way in ("shared_memory_file", "result_pipe"):
        if way == "result_pipe":
            os.environ["KILN_DIAG_NO_HANDOVER"] = "1"
        policy = FetchPolicy.create([str(large)], 10**8, 10)
        pool = DecodePool(4, IMAGENET_PREPROCESS, 10**9, DEFAULT_FORMATS, slots=64, policy=policy)
        try:
            for busy in (0, 3):
                stop = threading.Event()

                def spin(stop: threading.Event = stop) -> None:
                    while not stop.is_set():
                        sum(range(1000))

                spinners = [threading.Thread(target=spin, daemon=True) for _ in range(busy)]
                for thread in spinners:
                    thread.start()
                walls, cpus = [], []
                for _ in range(rounds + 1):
                    wall, cpu = time.perf_counter(), time.thread_time()
                    loads = pool.load(files, gpu=True).result()
                    walls.append((time.perf_counter() - wall) * 1e3)
                    cpus.append((time.thread_time() - cpu) * 1e3)
                    assert all(load.header is not None and load.data is not None for load in loads), loads
                    pool.release([load.slot for load in loads])
                stop.set()
                for thread in spinners:
                    thread.join()
                walls, cpus = sorted(walls[1:]), sorted(cpus[1:])
                rows[f"{way}_{busy}_busy_threads"] = {
                    "median_wall_ms": round(walls[len(walls) // 2], 1),
                    "min_wall_ms": round(walls[0], 1),
                    "median_calling_thread_cpu_ms": round(cpus[len(cpus) // 2], 2),
                }
                print("handover", way, busy, rows[f"{way}_{busy}_busy_threads"], flush=True)
        finally:
            pool.close()
            os.environ.pop("KILN_DIAG_NO_HANDOVER", None)
    R["handover"] = {"photos_per_load": len(files), "bytes_per_load": sum(map(os.path.getsize, files)), **rows}
    R.save()


def main() -> None:
    started = time.perf_counter()
    if {"handover"} == WANTED:  # needs no GPU: runs on the VM too
        from bench.gpu import LARGE, dataset

        workdir = ROOT / "build" / "gpu-bench-work"
        handover(dataset("jpeg", 64, LARGE), workdir)
        return
    package, small, workdir = resnet18_on_640x480(sys.argv[2:])
    from bench.gpu import LARGE, bench_decode, dataset, mixed_dataset

    large = dataset("jpeg", 768, LARGE)
    mixed = mixed_dataset(small, large, 2048)
    R["setup_s"] = round(time.perf_counter() - started, 1)
    if not WANTED or "ceilings" in WANTED:
        R["ceilings"] = bench_decode(small, large)
        R.save()
    from producer.embedded import embedded_redis

    def pixels(mpx: int) -> dict:
        return {"KILN_DIAG_GPU_BUSY_PIXELS": str(mpx * MPX)}

    if not WANTED or "backends" in WANTED:
        backends(large)
    if not WANTED or "handover" in WANTED:
        handover(large, workdir)
    hw_only = {"KILN_DIAG_NVIMGCODEC_BACKENDS": "HW_GPU_ONLY"}
    hw_then_cuda = {"KILN_DIAG_NVIMGCODEC_BACKENDS": "HW_GPU_ONLY,GPU_ONLY"}
    with embedded_redis(workdir / "redis-routing", persist=False) as url:
        variant(url, package, large, workdir, "camera_512mpx", pixels(512), 24)
        variant(url, package, large, workdir, "camera_no_handover", {**pixels(512), "KILN_DIAG_NO_HANDOVER": "1"}, 24)
        variant(url, package, large, workdir, "camera_hw_only", {**pixels(512), **hw_only}, 24)
        variant(url, package, large, workdir, "camera_hw_then_cuda", {**pixels(512), **hw_then_cuda}, 24)
        variant(url, package, large, workdir, "camera_1536mpx", pixels(1536), 24)  # the rule until session 14
        variant(url, package, mixed, workdir, "mixed_512mpx", pixels(512), 8)
        variant(url, package, mixed, workdir, "mixed_hw_only", {**pixels(512), **hw_only}, 8)
        variant(url, package, large, workdir, "camera_64mpx", pixels(64), 24)
        variant(url, package, large, workdir, "camera_256mpx", pixels(256), 24)
        variant(url, package, large, workdir, "camera_1024mpx", pixels(1024), 24)
        variant(
            url, package, large, workdir, "camera_512mpx_4_decode", {**pixels(512), "KILN_DECODE_PROCESSES": "4"}, 24
        )
        variant(url, package, mixed, workdir, "mixed_1536mpx", pixels(1536), 8)
        variant(
            url,
            package,
            large,
            workdir,
            "camera_512mpx_2_processes",
            {**pixels(512), "KILN_PROCESSES_PER_GPU": "2"},
            24,
        )
        variant(url, package, small, workdir, "small_512mpx", pixels(512), 8)
        for processes in (5, 6):  # the plan's default is 4 on 16 cores (worker.plan.MAX_PROCESSES_PER_GPU)
            setting = {**pixels(512), "KILN_PROCESSES_PER_GPU": str(processes)}
            variant(url, package, small, workdir, f"small_{processes}_processes", setting, 8)
    R["total_s"] = round(time.perf_counter() - started, 1)
    R.save()


if __name__ == "__main__":
    main()
