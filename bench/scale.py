"""Scale benchmark: tiny-model jobs of 1k to 1M images, in both output modes, through Redis.

    python bench/scale.py                              # 1k, 10k, 100k and 1M images
    python bench/scale.py --sizes 1000,10000,100000    # a subset
    python bench/scale.py --quick                      # smoke run: 1k and 5k

Does kiln's cost per image stay flat as a job grows, and does Redis and the producer's memory stay
bounded in sharded mode? Each job is the tiny model (`bench.pipeline:tiny_model`: the model costs
~nothing, so the rate measures kiln itself) over a JSONL manifest of distinct keys, streamed to
disk, that reference a few thousand 64x64 JPEGs (bench/gpu.py:dataset) round robin: a 1M-image job
needs no 1M files. Every size runs in both output modes:

- store:   records in the Redis result store (the default);
- sharded: `--out-dir` a local folder: Parquet shards, Redis keeps per-chunk counters only.

A real redis-server (loopback, no persistence) and one solo `python -m worker` (cores torch
threads, the worker's default) are started and warmed up with small jobs before any timing. The
producer is its own process, `python -m producer submit MANIFEST --job J [--out-dir DIR]` (streaming
with backpressure, the producer's default chunk size unless `--chunk-size`); this process polls
the job's counters and Redis `INFO memory` every POLL_S. Per job:

- images/s:  images / (the job complete - the producer started); `steady`: the images after the
             first record / (complete - the first record), without the producer's start-up;
- first record: seconds from starting the producer until the first image has a record;
- Redis peak: the highest `used_memory` sampled during the job, minus `used_memory` just before
             it; per 1,000 images = that / (images / 1,000);
- producer peak RSS: of the submit process, sampled with psutil (bench/compare.py's TreeMeter);
- export: wall seconds of `python -m producer export J --out FILE.parquet` (its peak RSS too), and
             the file's row count checked against the job's size.

Each job's Redis keys, shards and export file are deleted after it, so the next job starts from
the same baseline. Prints a table, writes JSON (bench/results/scale.json), and checks issue #11's
targets as ratios from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from bench.compare import TreeMeter  # noqa: E402
from bench.gpu import dataset  # noqa: E402
from bench.pipeline import TINY_SIZE, Workers, _kiln, ensure_package, warm_up_workers  # noqa: E402
from bench.soak import used_mb  # noqa: E402

SIZES = (1_000, 10_000, 100_000, 1_000_000)
QUICK_SIZES = (1_000, 5_000)
MODES = ("store", "sharded")
FILES = 4_000  # distinct JPEGs; the keys reference them round robin
TINY_BATCH = 256  # as bench/pipeline.py's tiny package
FETCH_THREADS = 2
POLL_S = 0.05
# Issue #11's targets.
THROUGHPUT_RATIO, PRODUCER_RSS_MB, REDIS_PEAK_MB, STORE_TO_SHARDED = 0.9, 200.0, 50.0, 20.0


def write_manifest(path: Path, files: list[Path], count: int) -> Path:
    """A JSONL manifest of `count` distinct keys over `files` (round robin), written line by line."""
    with path.open("w") as out:
        for i in range(count):
            out.write(json.dumps({"key": f"img-{i:08d}", "path": str(files[i % len(files)])}) + "\n")
    return path


def producer_env(url: str, chunk_size: int | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["KILN_REDIS_URL"] = url
    if chunk_size:
        env["KILN_CHUNK_SIZE"] = str(chunk_size)
    return env


def _producer(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("w") as stream:
        return subprocess.Popen(
            [sys.executable, "-m", "producer", *args], env=env, stdout=stream, stderr=subprocess.STDOUT, cwd=ROOT
        )


def _failed(process: subprocess.Popen, log: Path) -> RuntimeError:
    command = " ".join(map(str, process.args[1:]))
    return RuntimeError(f"{command} exited {process.returncode}: {log.read_text()[-2000:]}")


def run_job(url: str, manifest: Path, size: int, mode: str, workers: Workers, workdir: Path, args) -> dict:
    """One job through a producer process, measured; then its export; then its keys and files go."""
    from worker.store import _key

    client = redis.Redis.from_url(url)
    job = f"scale-{mode}-{size}-{uuid.uuid4().hex[:8]}"
    out_dir = workdir / "shards"
    env = producer_env(url, args.chunk_size)
    submit = [str(manifest), "--job", job, "--no-progress"] + (["--out-dir", str(out_dir)] if mode == "sharded" else [])
    baseline = used_mb(client)
    redis_peak, first_s, submit_s, first_finished = baseline, None, None, 0
    log = workdir / f"{job}-submit.log"
    load = os.getloadavg()[0]
    with _kiln(url, chunk_size=args.chunk_size or 128) as kiln:
        started = time.perf_counter()
        process = _producer(["submit", *submit], env, log)
        with TreeMeter([process.pid]) as producer:
            while True:
                now = time.perf_counter() - started
                redis_peak = max(redis_peak, used_mb(client))
                counts = kiln.counts(job)
                if first_s is None and counts.finished:
                    first_s, first_finished = now, counts.finished
                if submit_s is None and process.poll() is not None:
                    if process.returncode != 0:
                        raise _failed(process, log)
                    submit_s = now
                if submit_s is not None and counts.complete:
                    break
                if now > args.timeout:
                    process.kill()
                    raise TimeoutError(f"{job}: {counts.finished} of {size} images in {args.timeout} s")
                workers.check()
                time.sleep(POLL_S)
    seconds = time.perf_counter() - started
    if counts.total != size:
        raise RuntimeError(f"{job}: the job holds {counts.total} images, not {size}")
    export_file = workdir / f"{job}.parquet"
    export_log = workdir / f"{job}-export.log"
    export_started = time.perf_counter()
    exporter = _producer(["export", job, "--out", str(export_file)], env, export_log)
    with TreeMeter([exporter.pid]) as export_meter:
        exporter.wait()
    export_s = time.perf_counter() - export_started
    if exporter.returncode != 0:
        raise _failed(exporter, export_log)
    import pyarrow.parquet as pq

    exported = pq.read_metadata(export_file).num_rows
    if exported != size:
        raise RuntimeError(f"{job}: exported {exported} rows, not {size}")
    for key in client.scan_iter(match=_key(job, "*"), count=1000):
        client.unlink(key)
    shutil.rmtree(out_dir / job, ignore_errors=True)
    export_file.unlink()
    peak_mb = redis_peak - baseline
    return {
        "size": size,
        "mode": mode,
        "images": counts.total,
        "failed": counts.failed,
        "seconds": seconds,
        "images_per_s": size / seconds,
        "steady_images_per_s": (size - first_finished) / (seconds - first_s),
        "first_record_s": first_s,
        "submit_s": submit_s,
        "redis_baseline_mb": baseline,
        "redis_peak_mb": redis_peak,
        "redis_peak_over_baseline_mb": peak_mb,
        "redis_kb_per_1k": peak_mb * 1024 / (size / 1000),
        "producer_peak_rss_mb": producer.peak_rss / 2**20,
        "producer_cpu_s": producer.cpu_used_s,
        "export_s": export_s,
        "export_peak_rss_mb": export_meter.peak_rss / 2**20,
        "exported_rows": exported,
        "others_cpu_s": producer.others_cpu_s,
        "load_1m_before": load,
    }


def _target(what: str, value: float, met: bool, at_target_size: bool = True) -> dict:
    return {"what": what, "value": value, "met": met, "at_target_size": at_target_size}


def targets(rows: list[dict]) -> list[dict]:
    """Issue #11's targets, from this run's rows. The size targets are for 1M images: where a mode
    stopped short of it, they are checked on its largest size and say so (`at_target_size`)."""
    row = {(r["size"], r["mode"]): r for r in rows}
    largest = {mode: max((r["size"] for r in rows if r["mode"] == mode), default=0) for mode in MODES}
    out = []
    for mode in MODES:
        sizes = sorted(size for size, m in row if m == mode)
        base = 10_000 if 10_000 in sizes else sizes[0] if sizes else 0
        if largest[mode] > base:
            ratio = row[largest[mode], mode]["steady_images_per_s"] / row[base, mode]["steady_images_per_s"]
            what = f"{mode}: steady images/s of {largest[mode]:,} / of {base:,} >= {THROUGHPUT_RATIO}"
            out.append(_target(what, ratio, ratio >= THROUGHPUT_RATIO, largest[mode] == SIZES[-1]))
    if largest["sharded"]:
        sharded, at_target = row[largest["sharded"], "sharded"], largest["sharded"] == SIZES[-1]
        rss, peak = sharded["producer_peak_rss_mb"], sharded["redis_peak_mb"]
        what = f"sharded {largest['sharded']:,}: producer peak RSS <= {PRODUCER_RSS_MB:.0f} MB"
        out.append(_target(what, rss, rss <= PRODUCER_RSS_MB, at_target))
        what = f"sharded {largest['sharded']:,}: Redis peak used_memory <= {REDIS_PEAK_MB:.0f} MB"
        out.append(_target(what, peak, peak <= REDIS_PEAK_MB, at_target))
    for size in sorted({size for size, _ in row}):
        if (size, "store") in row and (size, "sharded") in row:
            ratio = row[size, "store"]["redis_kb_per_1k"] / max(row[size, "sharded"]["redis_kb_per_1k"], 1e-9)
            what = f"{size:,}: Redis per 1,000 images, store / sharded >= {STORE_TO_SHARDED:.0f}"
            out.append(_target(what, ratio, ratio >= STORE_TO_SHARDED))
    return out


def write(results: dict, out: Path, started: float) -> None:
    """Targets, load and time into `results`, then the JSON file: after every job, so that a run
    stopped partway keeps what it measured."""
    results["targets"] = targets(results["rows"])
    results["load_avg_at_end"] = os.getloadavg()
    results["total_s"] = time.perf_counter() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


def print_table(results: dict) -> None:
    line = "| {:>9s} | {:7s} | {:>8s} | {:>8s} | {:>8s} | {:>10s} | {:>11s} | {:>10s} | {:>8s} |"
    head = ("images", "mode", "images/s", "steady", "first s", "Redis MB", "Redis KB/1k", "producer MB", "export s")
    print(line.format(*head))
    print("| " + " | ".join("-" * width for width in (9, 7, 8, 8, 8, 10, 11, 10, 8)) + " |")
    for r in results["rows"]:
        cells = [f"{r['size']:,}", r["mode"], f"{r['images_per_s']:,.0f}", f"{r['steady_images_per_s']:,.0f}"]
        cells += [f"{r['first_record_s']:.2f}", f"{r['redis_peak_over_baseline_mb']:.1f}"]
        cells += [f"{r['redis_kb_per_1k']:.1f}"]
        print(line.format(*cells, f"{r['producer_peak_rss_mb']:.0f}", f"{r['export_s']:.1f}"))
    print()
    for t in results["targets"]:
        note = "" if t["at_target_size"] else " (not at 1M: the run's largest size)"
        print(f"target {t['what']}: {t['value']:.2f} {'met' if t['met'] else 'MISSED'}{note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="job sizes, in images (comma-separated)")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {' and '.join(map(str, QUICK_SIZES))} images")
    parser.add_argument("--modes", default=",".join(MODES), help="output modes, in this order: store, sharded")
    parser.add_argument("--chunk-size", type=int, help="KILN_CHUNK_SIZE for the producer [the producer's default]")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one job may take")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale.json")
    args = parser.parse_args()
    sizes = list(QUICK_SIZES) if args.quick else [int(s) for s in args.sizes.split(",")]
    modes = args.modes.split(",")

    import logging

    from producer.embedded import embedded_redis
    from worker.cxx_runtime import ensure_cxx_runtime

    logging.basicConfig(level=logging.WARNING)
    package, _ = ensure_package("tiny", TINY_BATCH)
    ensure_cxx_runtime(package)  # where this host needs the C++ runtime preloaded, restarts here
    folder = dataset("tiny", FILES, TINY_SIZE)
    files = sorted(folder.rglob("*.jpg"))
    cores = os.cpu_count() or 1
    results = {
        "python": platform.python_version(),
        "host": platform.node(),
        "cores": cores,
        "files": len(files),
        "chunk_size": args.chunk_size,
        "load_avg_at_start": os.getloadavg(),
        "method": __doc__.split("Does kiln")[1].strip(),
        "rows": [],
    }
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="kiln-bench-scale-"))
    workers = Workers("1 solo", 1, "solo", cores)
    try:
        with embedded_redis(workdir, persist=False) as url:
            workers.start(package, url, [folder], FETCH_THREADS, workdir)
            warm_up_workers(url, workers, files)
            for size in sizes:
                manifest = write_manifest(workdir / f"manifest-{size}.jsonl", files, size)
                for mode in modes:
                    row = run_job(url, manifest, size, mode, workers, workdir, args)
                    print(f"  {size:>9,} {mode:7s} {row['images_per_s']:7,.0f} img/s", flush=True)
                    results["rows"].append(row)
                    write(results, args.out, started)
                manifest.unlink()
    finally:
        workers.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    write(results, args.out, started)
    print()
    print_table(results)
    print(f"\nwrote {args.out} ({results['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
