"""GPU benchmark: the whole data path on one GPU host, in one run.

    python bench/gpu.py --wheels .whl                 # everything, on a CUDA host
    python bench/gpu.py --sections e2e,cold           # some sections; packages and data are cached

Sections, each measured in this run (ratios only compare numbers from the same run):
- build:  ResNet-18, ResNet-50 and EfficientNet-Lite0 packages (bf16, channels_last, batch 2..256),
          built in parallel processes and cached under build/bench-packages/.
- model:  model-only images/s of the AOTI package, eager and torch.compile at batch 64 and 256,
          uint8 input already on the GPU (bench/runtime.py's interleaved rounds).
- agree:  pixel differences between the GPU path and the CPU path (the tests' bounds).
- decode: decode ceilings on 640x480 and 4000x3000 JPEGs: `worker.preprocess.decode_image` (Pillow,
          `draft`) in one process per core; torchvision's `decode_jpeg` on the GPU in batches of 256,
          alone and with kiln's batched resize + crop (`worker.gpu_decode`); nvImageCodec when it
          is installed.
- e2e:    kiln end to end: a real Redis (the embedded mode's), `python -m worker --model
          resnet18.pt2` with default settings, `Kiln.submit(folder)` until every record is
          written; on 640x480 JPEGs, 4000x3000 JPEGs and a mixed folder (JPEG sizes, progressive,
          greyscale, CMYK, PNG, WebP). The in-process pipeline (no broker) is timed too.
- cold:   fresh process to the first prediction of the ResNet-18 package.
- gpus:   with more than one GPU visible: every GPU against one, default settings, end to end.
- per_gpu: 1 to 4 worker processes sharing one GPU (KILN_PROCESSES_PER_GPU), end to end.

`--wheels DIR` installs the wheels the host lacks (celery, redis, pydantic-settings, ...) into a
private folder first and re-executes with it on the path. Prints a table and merges its sections
into the JSON file (default bench/results/gpu-h200.json).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DATA = ROOT / "build" / "gpu-bench-data"
MODELS = ("resnet18", "resnet50", "efficientnet_lite0")
SECTIONS = ("build", "model", "decode", "agree", "e2e", "cold", "gpus", "per_gpu")
SMALL, LARGE = (640, 480), (4000, 3000)


def install_wheels(folders: list[Path]) -> None:
    """pip install --target a private folder, once, then re-execute with it on PYTHONPATH."""
    if os.environ.get("KILN_BENCH_WHEELS_DONE"):
        return
    target = Path("/tmp/kiln-bench-site")
    wheels = sorted(str(p) for folder in folders for p in folder.glob("*.whl"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade",
         "--target", str(target), *wheels],
        check=True,
    )  # fmt: skip
    env = dict(os.environ, KILN_BENCH_WHEELS_DONE="1")
    env["PATH"] = os.pathsep.join([str(target / "bin"), env.get("PATH", "")])  # py-spy, when carried
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), str(ROOT), env.get("PYTHONPATH")]))
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


# -- data -------------------------------------------------------------------------------------------


def _make_part(args: tuple[str, int, tuple[int, int], int]) -> int:
    from bench.pipeline import make_dataset

    folder, count, size, seed = args
    return len(make_dataset(Path(folder), count, size, seed))


def dataset(name: str, count: int, size: tuple[int, int]) -> Path:
    """`count` JPEGs of `size` from bench/pipeline.py's make_dataset, made in parallel, cached."""
    folder = DATA / f"{name}-{size[0]}x{size[1]}-{count}"
    if folder.is_dir() and sum(1 for _ in folder.rglob("*.jpg")) == count:
        return folder
    parts = max(1, min(os.cpu_count() or 1, count // 16))
    jobs = [(str(folder / f"p{i:02d}"), count // parts + (i < count % parts), size, 1000 + i) for i in range(parts)]
    with multiprocessing.get_context("spawn").Pool(parts) as pool:
        pool.map(_make_part, jobs)
    return folder


def mixed_dataset(small: Path, large: Path, count: int) -> Path:
    """A folder like a user's: mostly 640x480 JPEGs, some camera-size ones, progressive,
    greyscale and CMYK JPEGs, PNGs and WebPs."""
    from PIL import Image

    folder = DATA / f"mixed-{count}"
    if folder.is_dir() and sum(1 for _ in folder.iterdir()) == count:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    smalls, larges = sorted(small.rglob("*.jpg")), sorted(large.rglob("*.jpg"))
    for i in range(count):
        kind = i % 20
        if kind < 2:
            (folder / f"{i:05d}-large.jpg").write_bytes(larges[i % len(larges)].read_bytes())
            continue
        source = smalls[i % len(smalls)]
        if kind < 12:
            (folder / f"{i:05d}.jpg").write_bytes(source.read_bytes())
            continue
        image = Image.open(source)
        if kind < 14:
            image.save(folder / f"{i:05d}-progressive.jpg", "JPEG", quality=90, progressive=True)
        elif kind < 15:
            image.convert("L").save(folder / f"{i:05d}-grey.jpg", "JPEG", quality=90)
        elif kind < 16:
            image.convert("CMYK").save(folder / f"{i:05d}-cmyk.jpg", "JPEG", quality=90)
        elif kind < 18:
            image.save(folder / f"{i:05d}.png")
        else:
            image.save(folder / f"{i:05d}.webp", quality=90)
    return folder


# -- sections ---------------------------------------------------------------------------------------


def _build_one(model: str) -> tuple[str, str, float | None]:
    from bench.packages import cached_package
    from compile.package import BuildOptions

    path, seconds = cached_package(model, BuildOptions("cuda", "bfloat16", True, 256))
    return model, str(path), seconds


def build_packages(models: tuple[str, ...]) -> dict[str, dict]:
    """All packages at once, one process each: compiling is CPU-bound and single-threaded for long spells."""
    with multiprocessing.get_context("spawn").Pool(len(models)) as pool:
        built = pool.map(_build_one, models)
    return {model: {"path": path, "build_s": seconds} for model, path, seconds in built}


def bench_models(packages: dict[str, dict], seconds: float) -> dict:
    import torch

    from bench.runtime import images_per_second
    from compile.models import resolve_model
    from compile.package import DTYPES, PackagedModel
    from worker.runtime import load_runtime

    torch.backends.cudnn.benchmark = True
    results = {}
    for model, info in packages.items():
        runtime = load_runtime(info["path"], "cuda")
        spec = resolve_model(model)
        eager = PackagedModel(spec.module.to(DTYPES["bfloat16"]), spec.preprocess, DTYPES["bfloat16"], True)
        eager = eager.to("cuda").eval()
        compiled = torch.compile(eager)
        results[model] = {}
        for batch in (64, 256):
            x = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8, device="cuda")
            with torch.inference_mode():
                runners = {"eager": eager, "compile": compiled, "aoti": runtime._model}
                row = images_per_second(runners, x, "cuda", seconds)
            results[model][str(batch)] = row
            print(f"  model {model} batch {batch}: " + ", ".join(f"{k} {v:,.0f}" for k, v in row.items()), flush=True)
        del runtime, eager, compiled
        torch.cuda.empty_cache()
    return results


def _decode_files(args: tuple[list[str], object]) -> int:
    from worker.preprocess import decode_image

    paths, prep = args
    for path in paths:
        decode_image(Path(path).read_bytes(), prep)
    return len(paths)


def cpu_decode_rate(files: list[Path], processes: int) -> float:
    """images/s of `decode_image` (Pillow + draft + resize/crop) in `processes` processes."""
    from worker.manifest import IMAGENET_PREPROCESS

    groups = [([str(f) for f in files[i::processes]], IMAGENET_PREPROCESS) for i in range(processes)]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pool.map(_decode_files, [([str(files[0])], IMAGENET_PREPROCESS)] * processes)  # start-up out of the timing
        started = time.perf_counter()
        done = sum(pool.map(_decode_files, groups))
    return done / (time.perf_counter() - started)


def gpu_decode_rates(files: list[Path], batch: int = 256) -> dict[str, float]:
    """images/s on the GPU: torchvision decode only; nvImageCodec decode only, where installed;
    kiln's decoder (decode + draft-like reduce + orient + resize/crop) on each of the two. Bytes
    are in memory; each is timed twice, best kept."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    from worker.gpu_decode import JpegBatchDecoder
    from worker.jpeg_codecs import import_nvimgcodec
    from worker.manifest import IMAGENET_PREPROCESS
    from worker.probe import read_header

    datas = [f.read_bytes() for f in files]
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    headers = [read_header(d, 50_000_000) for d in datas]
    decoder = JpegBatchDecoder(torch.device("cuda"), IMAGENET_PREPROCESS)

    def timed(step) -> float:
        best = 0.0
        for _ in range(2):
            torch.cuda.synchronize()
            started = time.perf_counter()
            for start in range(0, len(datas), batch):
                step(start)
            torch.cuda.synchronize()
            best = max(best, len(datas) / (time.perf_counter() - started))
        return best

    def kiln(start: int, decoder=decoder) -> None:
        decoder.decode(list(zip(datas[start : start + batch], headers[start : start + batch], strict=True)))

    rates = {
        "torchvision_decode_only": timed(
            lambda s: decode_jpeg(tensors[s : s + batch], mode=ImageReadMode.RGB, device="cuda")
        ),
        "kiln_gpu_decoder": timed(kiln),
    }
    try:
        nv = import_nvimgcodec().Decoder()
        rates["nvimagecodec_decode_only"] = timed(lambda s: nv.decode(datas[s : s + batch]))
        on_nvimgcodec = JpegBatchDecoder(torch.device("cuda"), IMAGENET_PREPROCESS, "nvimgcodec")
        rates["kiln_gpu_decoder_nvimgcodec"] = timed(lambda s: kiln(s, on_nvimgcodec))
    except Exception as e:  # not carried, or no usable backend
        rates["nvimagecodec_error"] = f"{type(e).__name__}: {e}"[:300]
    return rates


def bench_agreement(small: Path, large: Path) -> dict:
    """|GPU path - CPU path| in uint8 levels, per image: kiln's GPU decoder against
    `decode_image`, on 1,000 640x480 and 100 4000x3000 JPEGs (the bound the tests state)."""
    import numpy as np
    import torch

    from worker.gpu_decode import JpegBatchDecoder
    from worker.manifest import IMAGENET_PREPROCESS
    from worker.preprocess import decode_image
    from worker.probe import read_header

    decoder = JpegBatchDecoder(torch.device("cuda"), IMAGENET_PREPROCESS)
    results = {}
    for name, folder, count in (("640x480", small, 1000), ("4000x3000", large, 100)):
        datas = [f.read_bytes() for f in sorted(folder.rglob("*.jpg"))[:count]]
        maxima, means, p99 = [], [], []
        for start in range(0, len(datas), 128):
            part = datas[start : start + 128]
            result = decoder.decode([(d, read_header(d, 50_000_000)) for d in part])
            for index, row in zip(result.decoded, result.images.cpu(), strict=True):
                expected = decode_image(part[index], IMAGENET_PREPROCESS).astype(np.int16)
                diff = np.abs(row.permute(1, 2, 0).numpy().astype(np.int16) - expected)
                maxima.append(int(diff.max()))
                means.append(float(diff.mean()))
                p99.append(float(np.percentile(diff, 99)))
        results[name] = {
            "images": len(means),
            "max_of_max": max(maxima),
            "median_of_max": float(np.median(maxima)),
            "max_of_mean": max(means),
            "median_of_mean": float(np.median(means)),
            "max_of_p99": max(p99),
        }
        print(f"  agreement {name}: {results[name]}", flush=True)
    return results


def bench_decode(small: Path, large: Path) -> dict:
    cores = len(os.sched_getaffinity(0))
    results = {"cpu_processes": cores}
    for name, folder, limit in (("640x480", small, 4096), ("4000x3000", large, 384)):
        files = sorted(folder.rglob("*.jpg"))[:limit]
        row = {"cpu_processes": cpu_decode_rate(files, cores), **gpu_decode_rates(files)}
        results[name] = row
        print(f"  decode {name}: " + ", ".join(f"{k} {v:,.0f}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in row.items()), flush=True)  # fmt: skip
    return results


def _worker(package: str, url: str, roots: list[Path], log: Path, env_extra: dict | None = None):
    from producer.embedded import LocalWorker

    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    env.update(env_extra or {})
    return LocalWorker(Path(package), url, log, roots, ["--loglevel", "INFO"], env=env)


def e2e_rate(url: str, folder: Path, workers: list, timeout_s: float = 300, repeat: int = 1) -> dict:
    """One job of every image in `folder`, `repeat` times under distinct keys (a job long enough
    that submitting it and its last batch do not dominate), through Redis and the workers. Returns
    the overall rate and the steady one (`steady_rate`)."""
    import uuid

    from bench.pipeline import _kiln
    from worker.contract import Item

    job = f"gpu-{uuid.uuid4().hex[:10]}"
    files = sorted(str(f) for f in folder.rglob("*") if f.is_file())
    items = [Item(key=f"{copy}:{f}", ref=f) for copy in range(repeat) for f in files]
    with _kiln(url, chunk_size=128) as kiln:
        started = time.perf_counter()
        submitted = kiln.submit(items, job=job, topk=5)
        counts = kiln.wait(job, timeout_s=timeout_s, progress=False, check=lambda: [w.check() for w in workers])
        seconds = time.perf_counter() - started
        kinds: dict[str, int] = {}
        timings: dict[str, list[float]] = {}
        records = kiln.results(job)
        for record in records:
            if record.status != "ok":
                kinds[record.error.kind] = kinds.get(record.error.kind, 0) + 1
            for stage, ms in record.timings_ms.items():
                timings.setdefault(stage, []).append(ms)
    medians = {stage: statistics.median(values) for stage, values in timings.items()}
    deciles = {stage: [round(q, 2) for q in statistics.quantiles(values, n=10)]
               for stage, values in timings.items() if len(values) > 1}  # fmt: skip
    steady = steady_rate(records)
    return {"images": submitted.total, "seconds": seconds, "images_per_s": submitted.total / seconds,
            "steady_images_per_s": steady, "failed": counts.failed, "failed_kinds": kinds,
            "median_ms": medians, "deciles_ms": deciles}  # fmt: skip


def steady_rate(records: list) -> float | None:
    """Records per second between the 20th and the 80th percentile of their finishing times: the
    job without its first and last moments (submitting the first chunks, the last batches
    draining). Records without a finishing time (a chunk's `poison` or `internal` records, written
    by the task, not the pipeline) are left out; None where too few have one."""
    finished = sorted(record.finished_at for record in records if record.finished_at is not None)
    if not finished:
        return None
    low, high = finished[len(finished) // 5], finished[len(finished) * 4 // 5]
    return (len(finished) * 4 // 5 - len(finished) // 5) / (high - low) if high > low else None


def warm(url: str, folder: Path, workers: list, timeout_s: float = 300) -> None:
    """Jobs of up to 4,096 of `folder`'s JPEGs until every worker process has written records:
    each has then loaded, warmed up and taken chunks before the timed job ("workers already running").
    A process still loading takes no chunk, and would join the timed job late. The processes are
    counted after each job, not before the first: called right after the worker's start, its
    parent has not started them yet (and one that restarted must answer under its new pid)."""
    import uuid

    from bench.pipeline import _kiln
    from worker.contract import Item

    files = sorted(folder.rglob("*.jpg"))[:4096]
    started, answered = time.perf_counter(), set()
    with _kiln(url, chunk_size=64) as kiln:
        while True:
            job = f"gpu-warm-up-{uuid.uuid4().hex[:10]}"  # a new job each time: a finished one would not wait
            kiln.submit([Item(key=f"w{i}", ref=str(f)) for i, f in enumerate(files)], job=job)
            kiln.wait(job, timeout_s=timeout_s, progress=False, check=lambda: [w.check() for w in workers])
            answered |= {int(record.worker.split(":")[1]) for record in kiln.results(job) if record.worker}
            expected = {
                pid for worker in workers for pid in worker_processes(worker.process.pid) or [worker.process.pid]
            }
            if expected <= answered:
                return
            if time.perf_counter() - started > timeout_s:
                raise RuntimeError(
                    f"only {len(expected & answered)} of {len(expected)} worker processes answered in {timeout_s} s"
                )


def worker_processes(parent: int) -> list[int]:
    """The pids of the worker processes that `python -m worker` (pid `parent`) runs, from /proc;
    none where it serves in its own process."""
    from bench.pipeline import _proc_table, proc_cmdline

    children = (pid for pid, (ppid, _) in _proc_table().items() if ppid == parent)
    return sorted(pid for pid in children if "--worker-index" in proc_cmdline(pid))


def plan_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if "data path on" in line]
    return lines[-1].split("] ", 1)[-1] if lines else "(no plan logged)"


def bench_e2e(
    package: str, folders: dict[str, Path], workdir: Path, variants: dict[str, dict[str, str]], repeats: dict[str, int]
) -> dict:
    """Default settings, then each variant (worker environment), on every folder; each folder's
    images `repeats[name]` times (1 where absent), under distinct keys."""
    from producer.embedded import embedded_redis

    results: dict = {}
    with embedded_redis(workdir / "redis", persist=False) as url:
        for variant, env in {"default": {}, **variants}.items():
            log = workdir / f"worker-e2e-{variant}.log"
            worker = _worker(package, url, list(folders.values()), log, env)
            try:
                started = time.perf_counter()
                warm(url, next(iter(folders.values())), [worker])
                row: dict = {"env": env, "ready_and_warm_s": time.perf_counter() - started, "plan": plan_line(log)}
                print(f"  {variant}: {row['plan']}", flush=True)
                for name, folder in folders.items():
                    row[name] = e2e_rate(url, folder, [worker], repeat=repeats.get(name, 1))
                    print(f"  e2e {variant} {name}: {row[name]['images_per_s']:,.0f} img/s (steady "
                          f"{row[name]['steady_images_per_s'] or 0:,.0f}; {row[name]['images']} "
                          f"images, {row[name]['failed']} failed {row[name]['failed_kinds']}), median ms "
                          f"{row[name]['median_ms']}", flush=True)  # fmt: skip
            finally:
                worker.stop()
            if variant == "default":
                results.update(row)
            else:
                results.setdefault("variants", {})[variant] = row
    return results


def bench_in_process(package: str, folder: Path, workdir: Path) -> dict:
    """The pipeline alone (no Redis, no Celery), planned as the worker plans it: what the queue
    costs. Also two variants, for the record: no CPU decode processes, and Python's default GIL
    switch interval. With py-spy on the PATH the first run is profiled (raw stacks, to workdir)."""
    import shutil
    from dataclasses import asdict

    import torch

    from worker.fetch import FetchPolicy
    from worker.pipeline import SWITCH_INTERVAL_S, Pipeline, PipelineConfig, Work
    from worker.plan import plan_data_path
    from worker.runtime import load_runtime
    from worker.settings import WorkerSettings

    settings = WorkerSettings(_env_file=None)
    runtime = load_runtime(package, "cuda")
    plan = plan_data_path(settings, runtime.device, runtime.batch_max, 1)
    torch.set_num_threads(plan.torch_threads)
    files = sorted(folder.rglob("*.jpg"))
    works = [Work("p", str(f), ref=str(f)) for f in files]
    # What else holds the GPU or the cores (a worker left from another section would slow this).
    results = {
        "plan": plan.describe(),
        "gpu_processes_before": torch.cuda.list_gpu_processes(runtime.device),
        "load_average_before": os.getloadavg(),
    }
    variants = {
        "default": (plan.decode_processes, SWITCH_INTERVAL_S),
        "nvimgcodec_decoder": (plan.decode_processes, SWITCH_INTERVAL_S),
        "no_decode_processes": (0, SWITCH_INTERVAL_S),
        "switch_interval_5ms": (plan.decode_processes, 0.005),
    }
    for name, (processes, interval) in variants.items():
        config = PipelineConfig(
            policy=FetchPolicy.create([str(folder)], settings.max_image_bytes, settings.fetch_timeout_s),
            fetch_threads=plan.fetch_threads,
            decode_processes=processes,
            gpu_decode=plan.gpu_decode,
            gpu_decoder="nvimgcodec" if name == "nvimgcodec_decoder" else "torchvision",
        )
        pipeline = Pipeline(runtime, config)
        sys.setswitchinterval(interval)
        list(pipeline.run(works[:1024], 5))  # warm-up: decode processes started, kernels loaded
        profiler = None
        if name == "default" and shutil.which("py-spy"):
            profiler = subprocess.Popen(
                ["py-spy", "record", "--pid", str(os.getpid()), "--format", "raw", "--rate", "250",
                 "--output", str(workdir / "inproc-profile.txt"), "--nonblocking", "--threads"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(1.0)
        started = time.perf_counter()
        done = sum(len(pairs) for pairs in pipeline.run(works, 5))
        seconds = time.perf_counter() - started
        if profiler is not None:
            profiler.send_signal(2)  # SIGINT: py-spy writes what it has
            profiler.wait(30)
        pipeline.close()
        row = {
            "images_per_s": done / seconds,
            "decoded_by": dict(pipeline.decoded_by),
            "stages": {stage: asdict(stats) for stage, stats in pipeline.stages.items()},
        }
        results[name] = row
        print(f"  in-process {name}: {row['images_per_s']:,.0f} img/s, {row['decoded_by']}, {row['stages']}")
    return results


def _default_worker_rate(url: str, package: str, folder: Path, workdir: Path, name: str, env: dict[str, str]) -> dict:
    """End to end with one `python -m worker` (default settings but `env`: it starts its worker
    processes itself), on a fresh warm-up job."""
    log = workdir / f"worker-{name}.log"
    worker = _worker(package, url, [folder], log, env)
    try:
        warm(url, folder, [worker])
        return {**e2e_rate(url, folder, [worker], repeat=8), "env": env, "plan": plan_line(log)}
    finally:
        worker.stop()


def bench_gpus(package: str, folder: Path, workdir: Path) -> dict:
    """Every GPU against one (CUDA_VISIBLE_DEVICES=0), each with default settings: the worker
    starts its processes per GPU, sized to the host's cores per GPU."""
    import torch

    from producer.embedded import embedded_redis

    count = torch.cuda.device_count()
    if count < 2:
        return {"skipped": f"{count} GPU visible"}
    results = {}
    with embedded_redis(workdir / "redis-gpus", persist=False) as url:
        for gpus in (1, count):
            env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, range(gpus)))}
            row = _default_worker_rate(url, package, folder, workdir, f"gpus{gpus}", env)
            results[f"{gpus}_gpu"] = row
            print(f"  {gpus} GPU(s): {row['images_per_s']:,.0f} img/s", flush=True)
    results["ratio"] = results[f"{count}_gpu"]["images_per_s"] / results["1_gpu"]["images_per_s"]
    return results


def bench_per_gpu(package: str, folder: Path, workdir: Path) -> dict:
    """1 to 4 worker processes on GPU 0 (KILN_PROCESSES_PER_GPU; CPU decode processes sized by the
    plan): the measurement behind the default (worker/plan.py)."""
    from producer.embedded import embedded_redis

    results = {}
    with embedded_redis(workdir / "redis-per-gpu", persist=False) as url:
        for processes in (1, 2, 3, 4):
            env = {"KILN_PROCESSES_PER_GPU": str(processes), "CUDA_VISIBLE_DEVICES": "0"}
            row = _default_worker_rate(url, package, folder, workdir, f"per-gpu{processes}", env)
            results[f"{processes}_processes"] = row
            print(f"  {processes} worker process(es) on one GPU: {row['images_per_s']:,.0f} img/s", flush=True)
    for processes in (2, 3, 4):
        results[f"ratio_{processes}"] = (
            results[f"{processes}_processes"]["images_per_s"] / results["1_processes"]["images_per_s"]
        )
    return results


def cold_start_s(package: str) -> float:
    from bench.runtime import cold_start

    return cold_start("aoti", "resnet18", Path(package), "cuda", "bfloat16", True)


# -- main -------------------------------------------------------------------------------------------


def summarise(results: dict) -> list[str]:
    lines = []
    decode, e2e = results.get("decode", {}), results.get("e2e", {})
    for name in ("640x480", "4000x3000"):
        if name in decode and name in e2e:
            d = decode[name]
            gpu = max(v for k, v in d.items() if k.endswith(("decode_only", "_decoder")) and isinstance(v, float))
            cpu = d["cpu_processes"]
            rate, steady = e2e[name]["images_per_s"], e2e[name].get("steady_images_per_s") or 0.0
            lines.append(
                f"{name}: kiln {rate:,.0f} img/s (steady {steady:,.0f}); ceilings: GPU decode {gpu:,.0f}, CPU "
                f"{cpu:,.0f} -> {rate / max(gpu, cpu):.2f}x the better one, {rate / (gpu + cpu):.2f}x their sum"
            )
    for variant, row in e2e.get("variants", {}).items():
        rates = ", ".join(
            f"{name} {row[name]['images_per_s']:,.0f}" for name in ("640x480", "4000x3000", "mixed") if name in row
        )
        lines.append(f"{variant} ({row['env']}): kiln {rates} img/s")
    if "mixed" in e2e:
        lines.append(f"mixed folder: kiln {e2e['mixed']['images_per_s']:,.0f} img/s")
    if "gpus" in results and "ratio" in results["gpus"]:
        lines.append(f"GPUs: {results['gpus']['ratio']:.2f}x one GPU")
    for processes in (2, 3, 4):
        if f"ratio_{processes}" in results.get("per_gpu", {}):
            row = results["per_gpu"][f"{processes}_processes"]
            ratio = results["per_gpu"][f"ratio_{processes}"]
            lines.append(f"{processes} worker processes on one GPU: {row['images_per_s']:,.0f} img/s, {ratio:.2f}x one")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument(
        "--wheels", type=Path, action="append", help="folder of wheels to install first (packages the host lacks)"
    )
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--small-images", type=int, default=8192)
    parser.add_argument("--large-images", type=int, default=1536)
    parser.add_argument("--mixed-images", type=int, default=2048)
    parser.add_argument(
        "--repeat", type=int, default=8, help="end to end: each 640x480 image this many times, under distinct keys"
    )
    parser.add_argument(
        "--large-repeat", type=int, default=4, help="end to end: each 4000x3000 image this many times (seconds of work)"
    )
    parser.add_argument(
        "--mixed-repeat", type=int, default=8, help="end to end: each mixed-folder image this many times"
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds per model measurement")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu-h200.json")
    parser.add_argument(
        "--e2e-variant",
        action="append",
        default=[],
        metavar="NAME:VAR=VALUE,...",
        help="also run the worker with these environment settings on every folder (repeatable)",
    )
    args = parser.parse_args()
    variants = {
        name: dict(pair.split("=", 1) for pair in assignments.split(",") if pair)
        for name, _, assignments in (v.partition(":") for v in args.e2e_variant)
    }
    if args.wheels:
        install_wheels(args.wheels)
    from worker.cxx_runtime import ensure_cxx_runtime

    sections = args.sections.split(",")
    models = tuple(args.models.split(","))
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    import torch

    results["host"] = {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "gpus": torch.cuda.device_count(),
        "cores": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    workdir = ROOT / "build" / "gpu-bench-work"
    workdir.mkdir(parents=True, exist_ok=True)

    def section(name: str, fn) -> None:
        if name not in sections:
            return
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        try:
            results[name] = fn()
        except Exception:
            results[name] = {"error": traceback.format_exc()[-3000:]}
            print(results[name]["error"], flush=True)
        results.setdefault("seconds", {})[name] = time.perf_counter() - started
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))

    started = time.perf_counter()
    packages = build_packages(models if "build" in sections else ("resnet18",))  # cached: fast when built
    if "build" in sections:
        results["build"] = {**packages, "wall_s": time.perf_counter() - started}
    ensure_cxx_runtime(packages["resnet18"]["path"])  # may re-execute this benchmark with the preload
    small = dataset("jpeg", args.small_images, SMALL)
    large = dataset("jpeg", args.large_images, LARGE)
    mixed = mixed_dataset(small, large, args.mixed_images)
    resnet18 = packages["resnet18"]["path"]
    section("model", lambda: bench_models(packages, args.seconds))
    section("decode", lambda: bench_decode(small, large))
    section("agree", lambda: bench_agreement(small, large))
    section(
        "e2e",
        lambda: {
            # First: no worker process of the end-to-end runs is left to share the GPU with it.
            "in_process_640x480": bench_in_process(resnet18, small, workdir),
            **bench_e2e(
                resnet18,
                {"640x480": small, "4000x3000": large, "mixed": mixed},
                workdir,
                variants,
                {"640x480": args.repeat, "4000x3000": args.large_repeat, "mixed": args.mixed_repeat},
            ),
        },
    )
    section("cold", lambda: {"aoti_first_prediction_s": cold_start_s(resnet18)})
    section("gpus", lambda: bench_gpus(resnet18, small, workdir))
    section("per_gpu", lambda: bench_per_gpu(resnet18, small, workdir))
    results["summary"] = summarise(results)
    args.out.write_text(json.dumps(results, indent=2))
    print("\n".join(["", "kiln GPU benchmark", *results["summary"], f"wrote {args.out}"]), flush=True)


if __name__ == "__main__":
    main()
