"""Pipeline benchmark: images/s through Redis and Celery workers vs the in-process ceiling.

    python bench/pipeline.py                       # Lite0 on 512 photos, then a tiny model on 10,000 small JPEGs
    python bench/pipeline.py --only tiny --tiny-images 20000 --repeats 5

Two questions, each answered by a ratio or a rate measured in one run (the host is shared and
noisy, so absolute numbers from different runs do not compare):

1. lite0: does the queue cost throughput? EfficientNet-Lite0 (cpu float32, batch up to 64) on real
   JPEG photos (the samples/ photos, randomly cropped, flipped and resized to 640x480, re-encoded at
   quality 90). The *ceiling* is the worker's own decode + model loop run directly in this process:
   `worker.pipeline.Pipeline(load_runtime(pkg), PipelineConfig(...)).run(works, topk=5)` over every
   file as one stream, with the worker's torch threads (cores / processes) and fetch threads. The
   *queue path* is a real redis-server (loopback, no persistence) and a real `python -m worker`
   subprocess: `Kiln.submit([folder])` + `Kiln.wait()`, timed from the submit call until the job's
   counters say every image has a record (so it includes expanding the folder, the Celery
   messages, the result writes and chunk boundaries). Target: queue >= 0.9x ceiling.
2. tiny: is kiln's own overhead small? A trivial classifier (`bench.pipeline:tiny_model`: average
   pool + linear, 10 classes) on 64x64 JPEGs cropped to 32x32, so the model costs ~nothing and the
   rate measures fetch, decode, Celery messages and Redis writes. Variants: chunk sizes with one
   solo worker, one solo worker with 1 torch thread, and two processes (`--concurrency 2`: one
   parent's two worker processes, and two solo workers started apart; 1 torch thread each:
   cores / processes). The ceiling runs with 2 and 1 torch threads; ratios are to the first (the
   single worker's default). Target: >= 2,000 images/s.

Workers are started, then warmed up with small jobs until every worker process has written
records (they are loaded and warm). Ceiling and queue runs alternate, `--repeats` times; the best
run of each row counts (interference from other work only ever slows a run down), and the JSON
also has every run, medians and the ratio of medians. Each run records the 1-minute load average
before it, and CPU seconds from /proc: of the worker processes (a parent's worker processes included),
redis-server and this process (the producer); "cpu" in the table is worker CPU / (seconds x
cores), and "submit" the seconds `Kiln.submit` took, before which no worker has anything to do.
Packages are built once into build/bench-packages/ and reused. Prints a table and writes JSON
(bench/results/pipeline.json).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from bench.packages import cached_package  # noqa: E402
from producer.embedded import LocalWorker, embedded_redis  # noqa: E402
from worker.manifest import Preprocess  # noqa: E402

SAMPLES = ROOT / "samples"
TINY_FACTORY = "bench.pipeline:tiny_model"
TINY_PREPROCESS = Preprocess(resize=32, crop=32, interpolation="bilinear", mean=(127.0,) * 3, std=(128.0,) * 3)
LITE0_SIZE, TINY_SIZE = (640, 480), (64, 64)
TOPK = 5
LITE0_TARGET_RATIO, TINY_TARGET_RATE = 0.9, 2000.0


# Worker features whose cost `--compare` measures: the options that turn each on.
COMPARED_OPTIONS = {"metrics": ("--metrics-port", "0"), "events": ("--task-events",)}


def tiny_model():
    """A classifier that costs ~nothing: mean colour -> 10 logits. Seeded, so builds agree."""
    import torch

    from compile.models import ModelSpec

    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(3, 10)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(10, 3, generator=generator))
        linear.bias.copy_(torch.randn(10, generator=generator))
    module = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), linear)
    return ModelSpec("tiny", module, [f"tiny_{i}" for i in range(10)], TINY_PREPROCESS, "seeded")


# -- packages and data ----------------------------------------------------------------------------


def ensure_package(model: str, max_batch: int) -> tuple[Path, float | None]:
    """Lite0 or the tiny model, cpu float32; the tiny one's file is named by a digest of its spec."""
    from compile.models import resolve_model
    from compile.package import BuildOptions

    options = BuildOptions(device="cpu", dtype="float32", max_batch=max_batch)
    if model == "lite0":
        return cached_package("efficientnet_lite0", options)
    spec = resolve_model(TINY_FACTORY)
    digest = hashlib.sha256(f"{spec.module!r}|{spec.preprocess.model_dump_json()}|{spec.labels}".encode())
    return cached_package(TINY_FACTORY, options, name=f"bench.pipeline.tiny_model-{digest.hexdigest()[:8]}")


def make_dataset(folder: Path, count: int, size: tuple[int, int], seed: int) -> list[Path]:
    """`count` JPEGs (quality 90) of `size`: random crops (50..100% of the largest crop of that
    aspect) of the sample photos, half of them mirrored. Deterministic for a seed."""
    from PIL import Image, ImageOps

    rng = random.Random(seed)
    photos = [Image.open(p).convert("RGB") for p in sorted(SAMPLES.glob("*.jpg"))]
    if not photos:
        raise SystemExit(f"no sample photos in {SAMPLES}")
    if max(size) < 256:  # small outputs: resample from smaller sources, much faster
        for photo in photos:
            photo.thumbnail((192, 192), Image.Resampling.BILINEAR)
    folder.mkdir(parents=True, exist_ok=True)
    aspect = size[0] / size[1]
    files = []
    for i in range(count):
        photo = rng.choice(photos)
        width, height = photo.size
        crop_w = min(width, height * aspect) * rng.uniform(0.5, 1.0)
        crop_h = crop_w / aspect
        left, top = rng.uniform(0, width - crop_w), rng.uniform(0, height - crop_h)
        image = photo.resize(size, Image.Resampling.BICUBIC, box=(left, top, left + crop_w, top + crop_h))
        if rng.random() < 0.5:
            image = ImageOps.mirror(image)
        path = folder / f"{i:06d}.jpg"
        image.save(path, "JPEG", quality=90)
        files.append(path)
    return files


# -- processes ------------------------------------------------------------------------------------


def _worker_env(fetch_threads: int, batch_size: int | None = None, keep_freed_memory: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["KILN_FETCH_THREADS"] = str(fetch_threads)
    if batch_size is not None:
        env["KILN_BATCH_SIZE"] = str(batch_size)
    env["KILN_KEEP_FREED_MEMORY"] = str(keep_freed_memory).lower()
    return env


@dataclass
class Workers:
    """`python -m worker` subprocesses: one with `--concurrency processes` (a parent and its worker
    processes), or `processes` solo workers."""

    label: str
    processes: int
    pool: str  # "solo" | "parent"
    threads: int
    options: tuple[str, ...] = ()  # more `python -m worker` options
    batch_size: int | None = None  # KILN_BATCH_SIZE; None: the worker's default
    keep_freed_memory: bool = False  # KILN_KEEP_FREED_MEMORY
    instances: list[LocalWorker] = field(default_factory=list)

    @property
    def popens(self) -> list[subprocess.Popen]:
        return [worker.process for worker in self.instances]

    def start(self, package: Path, url: str, roots: list[Path], fetch_threads: int, logdir: Path) -> None:
        count, concurrency = (1, self.processes) if self.pool == "parent" else (self.processes, 1)
        options = ["--concurrency", str(concurrency), "--threads", str(self.threads), *self.options]
        env = _worker_env(fetch_threads, self.batch_size, self.keep_freed_memory)
        for i in range(count):
            log = logdir / f"worker-{self.label.replace(' ', '_')}-{i}.log"
            self.instances.append(LocalWorker(package, url, log, roots, options, env=env))

    def check(self) -> None:
        for worker in self.instances:
            worker.check()

    def stop(self) -> None:
        for worker in self.popens:
            with contextlib.suppress(Exception):
                worker.terminate()  # all at once, then wait for each
        for worker in self.instances:
            worker.stop()


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds used so far), for every live process."""
    ticks = os.sysconf("SC_CLK_TCK")
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rindex(")") + 2 :].split()
        table[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks)
    return table


def proc_cmdline(pid: int) -> str:
    """A live process's command line, its arguments joined by spaces ("" once it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def tree_cpu_s(roots: list[int]) -> float:
    """CPU seconds of processes and all their live descendants (a parent's worker processes included)."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, list(roots)
    while todo:
        pid = todo.pop()
        if pid in table:
            total += table[pid][1]
            todo += children.get(pid, [])
    return total


def self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- measurements ---------------------------------------------------------------------------------


class Ceiling:
    """The worker's decode + model loop, in this process, over the whole data set as one stream."""

    def __init__(
        self,
        package: Path,
        roots: list[Path],
        fetch_threads: int,
        runtime=None,
        batch_size: int | None = None,
        keep_freed_memory: bool = False,
    ) -> None:
        """`runtime`: a `worker.runtime.ModelRuntime` to run instead of the package (bench/compare.py
        passes one around the eager model); default: the package, loaded here. `batch_size`: the
        model's batch; default: the worker's. `keep_freed_memory`: as KILN_KEEP_FREED_MEMORY."""
        from worker.fetch import FetchPolicy
        from worker.malloc import keep_freed_memory as keep
        from worker.pipeline import Pipeline, PipelineConfig
        from worker.runtime import load_runtime
        from worker.settings import WorkerSettings

        defaults = WorkerSettings(_env_file=None)
        runtime = runtime or load_runtime(package)
        # As the worker does (worker/tasks.py); a setting not applied would be a ceiling mislabelled.
        if runtime.device.type == "cpu" and keep_freed_memory and (why_not := keep()) is not None:
            raise RuntimeError(f"cannot keep freed memory in the ceiling: {why_not}")
        policy = FetchPolicy.create([str(r) for r in roots], defaults.max_image_bytes, defaults.fetch_timeout_s)
        config = PipelineConfig(
            policy=policy,
            max_pixels=defaults.max_image_pixels,
            max_inline_bytes=defaults.max_image_bytes,
            fetch_threads=fetch_threads,
            batch_size=batch_size,
        )
        self.pipeline = Pipeline(runtime, config)

    def run(self, files: list[Path], threads: int) -> dict:
        import torch

        from worker.pipeline import Work

        torch.set_num_threads(threads)
        works = [Work("ceiling", str(f), ref=str(f)) for f in files]
        load, cpu, started = os.getloadavg()[0], self_cpu_s(), time.perf_counter()
        records = [record for pairs in self.pipeline.run(works, TOPK) for _, record in pairs]
        seconds = time.perf_counter() - started
        cpu = self_cpu_s() - cpu
        failed = sum(r.status != "ok" for r in records)
        if failed:
            print(f"  warning: {failed} images failed in the ceiling run", flush=True)
        return {
            "images": len(records),
            "seconds": seconds,
            "images_per_s": len(records) / seconds,
            "failed": failed,
            "cpu_s": {"process": cpu},
            "cpu_util": cpu / (seconds * (os.cpu_count() or 1)),
            "load_1m_before": load,
        }

    def close(self) -> None:
        self.pipeline.close()


def _kiln(url: str, chunk_size: int, poll_s: float = 0.01):
    """A producer whose `wait` reads the job's counters every `poll_s` (10 ms: the end of a job is
    seen within 10 ms, at the cost of a counters read per poll)."""
    from producer import Kiln
    from producer.settings import ProducerSettings

    settings = ProducerSettings(_env_file=None, redis_url=url, chunk_size=chunk_size, poll_interval_s=poll_s)
    return Kiln(url, settings)


def warm_up_workers(url: str, workers: Workers, files: list[Path], timeout_s: float = 300) -> float:
    """Small jobs until every worker process has written records: they are loaded and warm."""
    from worker.contract import Item

    started, seen = time.perf_counter(), set()
    items = [Item(key=str(f), ref=str(f)) for f in files[: 16 * max(workers.processes, 2)]]
    with _kiln(url, chunk_size=8) as kiln:
        while time.perf_counter() - started < timeout_s:
            job = f"warmup-{uuid.uuid4().hex[:8]}"
            kiln.submit(items, job=job, topk=TOPK)
            kiln.wait(job, timeout_s=timeout_s, progress=False, check=workers.check)
            seen |= {record.worker for record in kiln.results(job)}
            if len(seen) >= workers.processes:
                return time.perf_counter() - started
            time.sleep(0.5)  # a worker process may still be loading its model
    raise RuntimeError(
        f"only {len(seen)} of {workers.processes} worker processes answered warm-up jobs in {timeout_s} s"
    )


def queue_run(
    url: str, folder: Path, chunk_size: int, workers: Workers, redis_pid: int, timeout_s: float, poll_s: float = 0.01
) -> dict:
    """Submit the whole folder as one job and wait for it: N / (completion - submit). The producer
    is this process (its CPU is the "producer" share), polling every `poll_s`."""
    pids = [p.pid for p in workers.popens]
    job = f"bench-{uuid.uuid4().hex[:12]}"
    with _kiln(url, chunk_size, poll_s) as kiln:
        load = os.getloadavg()[0]
        before = (tree_cpu_s(pids), tree_cpu_s([redis_pid]), self_cpu_s())
        started = time.perf_counter()
        submitted = kiln.submit([folder], job=job, topk=TOPK)
        submit_s = time.perf_counter() - started
        counts = kiln.wait(job, timeout_s=timeout_s, progress=False, check=workers.check)
        seconds = time.perf_counter() - started
        after = (tree_cpu_s(pids), tree_cpu_s([redis_pid]), self_cpu_s())
        per_worker = None
        if workers.processes > 1:  # how evenly the chunks were spread
            per_worker = sorted(Counter(r.worker for r in kiln.results(job)).values(), reverse=True)
    cpu = {name: b - a for name, a, b in zip(("worker", "redis", "producer"), before, after, strict=True)}
    if counts.failed:
        print(f"  warning: {counts.failed} images failed in the queue run", flush=True)
    return {
        "images": submitted.total,
        "seconds": seconds,
        "images_per_s": submitted.total / seconds,
        "submit_s": submit_s,
        "failed": counts.failed,
        "cpu_s": cpu,
        "worker_cpu_util": cpu["worker"] / (seconds * (os.cpu_count() or 1)),
        "images_per_worker_process": per_worker,
        "load_1m_before": load,
    }


def _best(runs: list[dict]) -> dict:
    best = max(runs, key=lambda r: r["images_per_s"])
    return {**best, "median_images_per_s": statistics.median(r["images_per_s"] for r in runs), "runs": runs}


def _settle() -> None:
    time.sleep(1.0)  # let the previous run's threads go idle before the next one starts


def measure(args, package: Path, folder: Path, files: list[Path], setups, ceiling_threads: list[int], env) -> dict:
    """Start each setup's workers in turn and time its chunk sizes, `repeats` times; the ceiling
    runs alternate with the first setup's runs. `setups`: [(Workers, [chunk sizes])]."""
    url, redis_pid, workdir = env
    ceiling_runs: dict[int, list[dict]] = {t: [] for t in ceiling_threads}
    variants = []
    for index, (workers, chunks) in enumerate(setups):
        workers.start(package, url, [folder], args.fetch_threads, workdir)
        ceiling = None
        try:
            if index == 0:
                ceiling = Ceiling(package, [folder], args.fetch_threads)
                ceiling.run(files[: 2 * ceiling.pipeline.batch_size], ceiling_threads[0])  # warm-up
            ready_s = warm_up_workers(url, workers, files)
            runs: dict[int, list[dict]] = {c: [] for c in chunks}
            for rep in range(args.repeats):
                for threads in ceiling_threads if ceiling else []:
                    _settle()
                    ceiling_runs[threads].append(ceiling.run(files, threads))
                    rate = ceiling_runs[threads][-1]["images_per_s"]
                    print(f"  [{rep + 1}] in-process ceiling, {threads} thr: {rate:9.1f} img/s", flush=True)
                for chunk in chunks:
                    _settle()
                    runs[chunk].append(queue_run(url, folder, chunk, workers, redis_pid, args.timeout))
                    rate = runs[chunk][-1]["images_per_s"]
                    print(f"  [{rep + 1}] queue: {workers.label}, chunk {chunk}: {rate:9.1f} img/s", flush=True)
        finally:
            if ceiling is not None:
                ceiling.close()
            workers.stop()
        for chunk, chunk_runs in runs.items():
            variants.append(
                {
                    "name": f"queue: {workers.label}, chunk {chunk}",
                    "processes": workers.processes,
                    "pool": workers.pool,
                    "threads": workers.threads,
                    "fetch_threads": args.fetch_threads,
                    "chunk_size": chunk,
                    "worker_warmup_s": ready_s,
                    **_best(chunk_runs),
                }
            )
    ceilings = [
        {
            "name": f"in-process ceiling, {threads} thr",
            "processes": 1,
            "threads": threads,
            "fetch_threads": args.fetch_threads,
            **_best(ceiling_runs[threads]),
        }
        for threads in ceiling_threads
    ]
    base = ceilings[0]  # the ceiling with the worker's default threads
    for row in ceilings + variants:
        row["ratio_to_ceiling"] = row["images_per_s"] / base["images_per_s"]
        row["median_ratio_to_ceiling"] = row["median_images_per_s"] / base["median_images_per_s"]
    return {"ceilings": ceilings, "variants": variants}


# -- the two benchmarks ---------------------------------------------------------------------------


def bench_lite0(args, env, cores: int) -> dict:
    package, build_s = ensure_package("lite0", args.lite0_batch)
    folder = env[2] / "lite0"
    started = time.perf_counter()
    files = make_dataset(folder, args.images, LITE0_SIZE, args.seed)
    print(f"lite0: {len(files)} JPEGs {LITE0_SIZE[0]}x{LITE0_SIZE[1]} in {time.perf_counter() - started:.1f} s")
    threads = max(1, cores // 1)  # the worker's default for one process: cores / processes
    setups = [(Workers("1 solo", 1, "solo", threads), args.lite0_chunks)]
    measured = measure(args, package, folder, files, setups, [threads], env)
    default = next((v for v in measured["variants"] if v["chunk_size"] == 128), measured["variants"][0])
    return {
        "package": str(package.relative_to(ROOT)),
        "package_build_s": build_s,
        "images": len(files),
        "image_size": list(LITE0_SIZE),
        "batch_size": args.lite0_batch,
        **measured,
        "target": {
            "what": f"queue ({default['name']}) >= {LITE0_TARGET_RATIO}x the in-process ceiling",
            "ratio": default["ratio_to_ceiling"],
            "median_ratio": default["median_ratio_to_ceiling"],
            "met": default["ratio_to_ceiling"] >= LITE0_TARGET_RATIO,
        },
    }


def bench_tiny(args, env, cores: int) -> dict:
    package, build_s = ensure_package("tiny", args.tiny_batch)
    folder = env[2] / "tiny"
    started = time.perf_counter()
    files = make_dataset(folder, args.tiny_images, TINY_SIZE, args.seed + 1)
    print(f"tiny: {len(files)} JPEGs {TINY_SIZE[0]}x{TINY_SIZE[1]} in {time.perf_counter() - started:.1f} s")
    per_process = max(1, cores // 2)
    multi = [args.tiny_multi_chunk]
    setups = [  # the worker's defaults first: threads = cores / processes
        (Workers("1 solo", 1, "solo", cores), args.tiny_chunks),
        (Workers(f"1 solo, {per_process} thr", 1, "solo", per_process), multi),
        (Workers("--concurrency 2", 2, "parent", per_process), multi),
        (Workers("2 solo", 2, "solo", per_process), multi),
    ]
    if per_process == cores:  # one core: the 1-thread variant is the default one
        del setups[1]
    if args.compare:
        return compare_tiny(args, env, cores, package, folder, files)
    measured = measure(args, package, folder, files, setups, sorted({cores, per_process}, reverse=True), env)
    for variant in measured["variants"]:
        variant["meets_target"] = variant["images_per_s"] >= TINY_TARGET_RATE
    best = max(measured["variants"], key=lambda v: v["images_per_s"])
    return {
        "package": str(package.relative_to(ROOT)),
        "package_build_s": build_s,
        "images": len(files),
        "image_size": list(TINY_SIZE),
        "preprocess": TINY_PREPROCESS.model_dump(),
        "batch_size": args.tiny_batch,
        **measured,
        "target": {
            "what": f">= {TINY_TARGET_RATE:,.0f} images/s through the queue",
            "best": best["name"],
            "images_per_s": best["images_per_s"],
            "met": best["images_per_s"] >= TINY_TARGET_RATE,
            "met_by": [v["name"] for v in measured["variants"] if v["meets_target"]],
        },
    }


def compare_tiny(args, env, cores: int, package: Path, folder: Path, files: list[Path]) -> dict:
    """One feature off vs on, nothing else: the same solo worker started without and with it, one
    timed run each, `--repeats` pairs in the order off-on, on-off, off-on, ..., so that a change in
    the host's load hits both and neither state always runs second (after the other's job)."""
    chunk, option = args.tiny_chunks[:1], COMPARED_OPTIONS[args.compare]
    setups = [
        (Workers(f"1 solo, {args.compare} {state}", 1, "solo", cores, option if state == "on" else ()), chunk)
        for repeat in range(args.repeats)
        for state in (("off", "on") if repeat % 2 == 0 else ("on", "off"))
    ]
    measured = measure(argparse.Namespace(**{**vars(args), "repeats": 1}), package, folder, files, setups, [cores], env)
    rates = {
        state: [v["images_per_s"] for v in measured["variants"] if f"{args.compare} {state}," in v["name"]]
        for state in ("off", "on")
    }
    pairs = [on / off for off, on in zip(rates["off"], rates["on"], strict=True)]
    measured["comparison"] = {
        "feature": args.compare,
        "option": " ".join(option),
        "images_per_s": rates,
        "ratio_on_off_median": statistics.median(rates["on"]) / statistics.median(rates["off"]),
        "ratio_on_off_best": max(rates["on"]) / max(rates["off"]),
        "ratio_per_pair": pairs,
    }
    comparison = measured["comparison"]
    measured["target"] = {
        "what": f"{args.compare} on within 3% of off (images/s, median to median)",
        "ratio": comparison["ratio_on_off_best"],
        "median_ratio": comparison["ratio_on_off_median"],
        "met": comparison["ratio_on_off_median"] >= 0.97,
    }
    return {"package": str(package.relative_to(ROOT)), "images": len(files), **measured}


# -- report ---------------------------------------------------------------------------------------


def print_table(results: dict) -> None:
    print(
        f"\nkiln pipeline benchmark: {results['cores']} cores ({results['cpu'] or 'cpu'}), torch {results['torch']}, "
        f"fetch threads {results['fetch_threads']}, best of {results['repeats']}"
    )
    header = (
        "model",
        "variant",
        "proc",
        "thr",
        "chunk",
        "images",
        "seconds",
        "submit",
        "images/s",
        "vs ceiling",
        "cpu",
    )
    line = "{:6s} {:34s} {:>4s} {:>3s} {:>6s} {:>7s} {:>8s} {:>7s} {:>9s} {:>10s} {:>5s}"
    print(line.format(*header))
    for model, entry in results["models"].items():
        for row in entry["ceilings"] + entry["variants"]:
            chunk = str(row.get("chunk_size", "-"))
            cpu = row.get("worker_cpu_util", row.get("cpu_util", 0.0))
            cells = [model, row["name"], str(row["processes"]), str(row["threads"]), chunk, str(row["images"])]
            submit = f"{row['submit_s']:.2f}" if "submit_s" in row else "-"
            cells += [f"{row['seconds']:.2f}", submit, f"{row['images_per_s']:,.1f}", f"{row['ratio_to_ceiling']:.2f}"]
            print(line.format(*cells, f"{cpu:.0%}"))
    print()
    for model, entry in results["models"].items():
        target = entry["target"]
        verdict = "MET" if target["met"] else "MISSED"
        if "ratio" in target:
            detail = f"{target['ratio']:.2f}x best to best, {target['median_ratio']:.2f}x median to median"
        else:
            detail = f"best {target['images_per_s']:,.0f}/s: {target['best']}"
        print(f"target {model}: {target['what']}: {verdict} ({detail})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512, help="Lite0 data set: 640x480 photos")
    parser.add_argument("--tiny-images", type=int, default=10_000, help="tiny-model data set: 64x64 JPEGs")
    parser.add_argument("--only", choices=["lite0", "tiny"], help="run one of the two benchmarks")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each variant; the best counts")
    parser.add_argument("--fetch-threads", type=int, default=2, help="fetch threads per worker process")
    parser.add_argument("--lite0-batch", type=int, default=64, help="Lite0 package's max batch (kiln's cpu default)")
    parser.add_argument("--lite0-chunks", default="128", help="chunk sizes for Lite0 (128: the producer default)")
    parser.add_argument("--tiny-batch", type=int, default=256, help="tiny package's max batch (kiln's cuda default)")
    parser.add_argument("--tiny-chunks", default="128,1024", help="chunk sizes with one worker process")
    parser.add_argument("--tiny-multi-chunk", type=int, default=512, help="chunk size with two worker processes")
    parser.add_argument(
        "--compare", choices=sorted(COMPARED_OPTIONS), help="tiny: one solo worker with this feature off, then on"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300, help="seconds one queue run may take")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pipeline.json")
    args = parser.parse_args()
    args.lite0_chunks = [int(c) for c in args.lite0_chunks.split(",")]
    args.tiny_chunks = [int(c) for c in args.tiny_chunks.split(",")]
    models = [args.only] if args.only else ["lite0", "tiny"]

    import logging

    import torch

    from worker.cxx_runtime import ensure_cxx_runtime

    logging.basicConfig(level=logging.WARNING)
    # Build first: where this host needs the C++ runtime preloaded, the process restarts here.
    packages = {m: ensure_package(m, args.lite0_batch if m == "lite0" else args.tiny_batch)[0] for m in models}
    for package in packages.values():
        ensure_cxx_runtime(package)

    cores = os.cpu_count() or 1
    results = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "cpu": platform.processor(),
        "cores": cores,
        "load_avg_at_start": os.getloadavg(),
        "fetch_threads": args.fetch_threads,
        "repeats": args.repeats,
        "method": "best of `repeats` runs; queue: Kiln.submit([folder]) until every image has a record; "
        "ceiling: worker.pipeline.Pipeline.run in this process, same torch and fetch threads as the worker; "
        "cpu: worker CPU seconds / (seconds x cores), from /proc",
        "models": {},
    }
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="kiln-bench-pipeline-"))
    try:
        with embedded_redis(workdir, persist=False) as url:
            server_pid = redis.Redis.from_url(url).info("server")["process_id"]
            for model in models:
                bench = bench_lite0 if model == "lite0" else bench_tiny
                results["models"][model] = bench(args, (url, server_pid, workdir), cores)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results["total_s"] = time.perf_counter() - started
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out} ({results['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
