"""Where kiln's CPU goes beyond the plain loop, on this 2-core CPU host (issue #11: at 10,000
images kiln x2 spent 55.3 CPU s per 1,000 images, Ray Data x2 50.7 and the one-process loop 49.1;
bench/results/compare.json).

    python bench/diagnose/cpu_queue_overhead.py [--images 2000] [--repeats 2]

EfficientNet-Lite0 (bench/compare.py's package, batch 64) on 640x480 JPEGs (bench/gpu.py's
data set), each variant `--repeats` times, interleaved:

- loop x2:  two plain processes of one torch thread, each running bench/pipeline.py's `Ceiling`
            (the worker's own fetch/decode/batch/predict stages, no broker) over half the files:
            the work itself, shaped as kiln x2 and Ray x2 run it;
- kiln x2:  two solo `python -m worker` processes of one torch thread and a redis-server; this
            process submits the folder as one job and waits, its `wait` reading the job's counters
            every 10 ms (compare.py's setting) or every 0.25 s (the producer's default); and the
            same with one fetch thread per worker instead of two.

Reports images/s and CPU seconds per 1,000 images by role (workers, redis-server, producer),
and writes bench/results/cpu-queue-overhead.json.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import time
from pathlib import Path

from common import ROOT, Results

from bench.compare import BATCH, FETCH_THREADS, KILN_CHUNK, MODELS
from bench.pipeline import LITE0_SIZE, Ceiling, Workers, queue_run, warm_up_workers

OUT = ROOT / "bench" / "results" / "cpu-queue-overhead.json"


def _loop_child(package: str, files: list[str], barrier, results) -> None:
    ceiling = Ceiling(Path(package), [Path(files[0]).parent.parent], FETCH_THREADS)
    ceiling.run([Path(f) for f in files[: 2 * BATCH]], 1)  # warm-up
    barrier.wait()
    results.put(ceiling.run([Path(f) for f in files], 1))
    ceiling.close()


def loop_x2(package: Path, files: list[Path]) -> dict:
    """Two plain loop processes of one torch thread, each over half of `files`, started together."""
    spawn = multiprocessing.get_context("spawn")
    barrier, results = spawn.Barrier(2), spawn.Queue()
    halves = [[str(f) for f in files[i::2]] for i in range(2)]
    children = [spawn.Process(target=_loop_child, args=(str(package), h, barrier, results)) for h in halves]
    for child in children:
        child.start()
    runs = [results.get() for _ in children]
    for child in children:
        child.join()
    seconds = max(r["seconds"] for r in runs)
    cpu = sum(r["cpu_s"]["process"] for r in runs)
    return {"images": len(files), "seconds": seconds, "images_per_s": len(files) / seconds, "cpu_s": {"loop": cpu}}


def kiln_x2(package: Path, folder: Path, files: list[Path], url: str, redis_pid: int, fetch: int, poll_s: float):
    workdir = ROOT / "build" / "cpu-overhead-work"
    workdir.mkdir(parents=True, exist_ok=True)
    workers = Workers(f"kiln x2 fetch {fetch}", 2, "solo", 1)
    workers.start(package, url, [folder], fetch, workdir)
    try:
        warm_up_workers(url, workers, files)
        time.sleep(1.0)
        return queue_run(url, folder, KILN_CHUNK, workers, redis_pid, 3600, poll_s)
    finally:
        workers.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import redis

    from bench.gpu import dataset
    from bench.packages import cached_package
    from compile.package import BuildOptions
    from producer.embedded import embedded_redis
    from worker.cxx_runtime import ensure_cxx_runtime

    package = cached_package(MODELS["lite0"], BuildOptions("cpu", "float32", max_batch=BATCH))[0]
    ensure_cxx_runtime(package)
    folder = dataset("jpeg", args.images, LITE0_SIZE)
    files = sorted(folder.rglob("*.jpg"))
    results = Results(OUT)
    results.update(
        {"host": platform.node(), "cores": os.cpu_count(), "images": len(files), "method": __doc__, "runs": []}
    )
    variants = {
        "loop x2": None,
        "kiln x2, poll 10 ms": (FETCH_THREADS, 0.01),
        "kiln x2, poll 0.25 s": (FETCH_THREADS, 0.25),
        "kiln x2, poll 0.25 s, 1 fetch thread": (1, 0.25),
    }
    workdir = ROOT / "build" / "cpu-overhead-work"
    workdir.mkdir(parents=True, exist_ok=True)
    with embedded_redis(workdir.resolve(), persist=False) as url:
        redis_pid = redis.Redis.from_url(url).info("server")["process_id"]
        for repeat in range(args.repeats):
            for name, variant in variants.items():
                if variant is None:
                    run = loop_x2(package, files)
                else:
                    run = kiln_x2(package, folder, files, url, redis_pid, *variant)
                per_1k = {role: 1000 * s / run["images"] for role, s in run["cpu_s"].items()}
                row = {"variant": name, "repeat": repeat, **run, "cpu_s_per_1k": per_1k}
                row["cpu_s_per_1k_total"] = sum(per_1k.values())
                results["runs"].append(row)
                results.save()
                roles = "  ".join(f"{role} {v:5.1f}" for role, v in per_1k.items())
                print(
                    f"{name:38} {run['images_per_s']:6.1f} img/s  CPU s/1k {row['cpu_s_per_1k_total']:5.1f} ({roles})",
                    flush=True,
                )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
