"""kiln vs Ray Data: the same images and the same AOTI packages, one run.

    python bench/compare.py                          # Lite0 + ResNet-18; 512- and 10,000-image jobs
    python bench/compare.py --sizes 512,2000 --models lite0
    python bench/compare.py --quick --no-ray         # smoke run: Lite0, one 48-image job, kiln only

Contenders, for each model (EfficientNet-Lite0 with its shipped weights, ResNet-18 with random
weights: no package ships torchvision's) and each job size, on 640x480 JPEGs from
bench/pipeline.py:make_dataset (cached under build/ by bench/gpu.py:dataset):

- ceiling:   the worker's decode + AOTI model loop in one plain process (bench/pipeline.py's
             `Ceiling`: `worker.pipeline.Pipeline.run` over every file, cores torch threads, 2 fetch
             threads);
- eager:     the same loop, with the eager `PackagedModel` in place of the compiled package;
- kiln xN:   a real redis-server and N solo `python -m worker` processes (cores / N torch threads
             each), started and warmed up first; a producer process submits the folder as one job
             and waits until every image has a record;
- ray xN:    Ray Data in its own venv (bench/.venv-ray, created here unless it exists):
             `read_binary_files` -> `map_batches(decode)` tasks running kiln's own
             `worker.preprocess.decode_image` (`read_images` resizes to a fixed size, not
             resize-short-side + centre crop, so it would be different work) -> `map_batches` with
             an actor pool of N actors (cores / N torch threads each) running the same .pt2 through
             `worker.runtime.load_runtime`, top-5 labels per image, streamed back to the driver. The
             Ray cluster (`ray.init`) is up and one small job has run before the timed job, as kiln's
             workers are running; the actor pool starts within each job, as Ray Data runs it.
             `ray xN kept`: the same, with each actor keeping the memory its model frees as kiln's
             CPU workers do (worker/malloc.py), so that the setting's gain is not counted as
             kiln's over Ray (`--ray-memory`).

`--batch` sets every contender's model batch (default 64, the packages' largest and kiln's default).

Each contender's client runs in a child process; this process only starts them and measures. For
each job it reports images/s (wall time seen by the client, from the submit to the last result),
CPU seconds per 1,000 images and peak RSS, each over every process involved: the client and all
its descendants (Ray's GCS, raylet and workers), kiln's worker processes and redis-server. CPU is
user + system time of every process seen in the window, sampled every 0.2 s with psutil; RSS is
the sum over the processes at each sample, its maximum kept (shared pages count once per process,
as RSS does). Ratios are to the ceiling of the same model and size.
Prints a table, writes JSON (bench/results/compare.json) and a chart (bench/results/compare.png).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.pipeline import LITE0_SIZE, TOPK  # noqa: E402

MODELS = {"lite0": "efficientnet_lite0", "resnet18": "resnet18"}
BATCH = 64  # the packages' largest batch (kiln's CPU default), the batch of every contender
FETCH_THREADS = 2
RAY_VENV = ROOT / "bench" / ".venv-ray"
RAY_REQUIREMENT = "ray[data]==2.60.0"
# Ray's model actors as Ray runs them (glibc's default malloc), with the memory kiln's CPU workers
# keep (worker/malloc.py, which the actor then calls too: "ray xN kept"), or both.
RAY_MEMORY = {"default": (False,), "kept": (True,), "both": (False, True)}
PREFIX = "compare:"  # lines of the child protocol on stdout; anything else there is the child's own
SAMPLE_S = 0.2
KILN_CHUNK = 128  # the producer's default chunk size


# -- measuring process trees ----------------------------------------------------------------------


class TreeMeter:
    """CPU seconds and peak RSS of process trees (each root and all its descendants) over a window,
    sampled every SAMPLE_S: a process's CPU counts up to its last sample, so one that lives less
    than a sample, or its last fraction of a sample before it exits, is missed. (Counting what
    parents reaped does not work here: Ray's raylet reaps its workers without collecting their
    times.)"""

    def __init__(self, roots: list[int]) -> None:
        self.roots = roots
        self.peak_rss = 0
        self.names: dict[tuple[int, float], str] = {}
        self._cpu_start: dict[tuple[int, float], float] = {}
        self._cpu_last: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)

    def _tree(self) -> list:
        import psutil

        procs = []
        for pid in self.roots:
            try:
                root = psutil.Process(pid)
                procs += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        return procs

    def _sample(self) -> None:
        import psutil

        rss = 0
        for proc in self._tree():
            try:
                with proc.oneshot():
                    key = (proc.pid, proc.create_time())
                    times = proc.cpu_times()
                    rss += proc.memory_info().rss
                    if key not in self.names:
                        self.names[key] = _role(proc)
            except psutil.NoSuchProcess:
                continue
            self._cpu_last[key] = times.user + times.system
        self.peak_rss = max(self.peak_rss, rss)

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self._sample()

    def __enter__(self) -> TreeMeter:
        self.host_start = _host_busy_s()
        self._sample()
        self._cpu_start = dict(self._cpu_last)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.host_end = _host_busy_s()

    @property
    def cpu_used_s(self) -> float:
        return sum(cpu - self._cpu_start.get(key, 0.0) for key, cpu in self._cpu_last.items())

    def cpu_s_by_role(self) -> dict[str, float]:
        """CPU seconds in the window by `_role`, for finding where a contender's CPU goes."""
        by_role: dict[str, float] = {}
        for key, cpu in self._cpu_last.items():
            by_role[self.names[key]] = by_role.get(self.names[key], 0.0) + cpu - self._cpu_start.get(key, 0.0)
        return by_role

    @property
    def others_cpu_s(self) -> float:
        """CPU seconds the whole host spent outside these trees meanwhile: other work's load."""
        return max(0.0, self.host_end - self.host_start - self.cpu_used_s)


def _role(proc) -> str:
    """A process's name, or for Python its module (`-m worker`), its script, or `spawned` for a
    multiprocessing child (kiln's decode processes, Ray's are named by Ray)."""
    name = proc.name()
    if not name.startswith("python"):
        return name
    args = proc.cmdline()[1:]
    if "-m" in args[:-1]:
        return args[args.index("-m") + 1]
    if "-c" in args and any("multiprocessing" in arg for arg in args):
        return "spawned"
    script = next((arg for arg in args if not arg.startswith("-")), name)
    return Path(script).name


def _host_busy_s() -> float:
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + t.steal


# -- children: one client per contender, driven over stdin/stdout ---------------------------------


class Child:
    """A client process that prepares, says `ready`, runs one job per `go` and reports it, and
    exits on `exit`. Its stderr goes to a log file."""

    def __init__(self, python: str, spec: dict, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        self.log = log
        self.process = subprocess.Popen(
            [python, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("w"), text=True, env=env,
        )  # fmt: skip

    def expect(self, word: str) -> dict:
        for line in self.process.stdout:
            if line.startswith(PREFIX):
                said, _, payload = line[len(PREFIX) :].strip().partition(" ")
                if said == "error":
                    raise RuntimeError(f"{payload}; see {self.log}")
                if said == word:
                    return json.loads(payload) if payload else {}
        raise RuntimeError(f"the child exited (rc {self.process.wait()}) before saying {word!r}; see {self.log}")

    def send(self, word: str) -> None:
        self.process.stdin.write(word + "\n")
        self.process.stdin.flush()

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.send("exit")
                self.process.wait(120)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()


def _say(word: str, payload: dict | None = None) -> None:
    print(PREFIX + word + (" " + json.dumps(payload) if payload is not None else ""), flush=True)


def _await_go() -> bool:
    return sys.stdin.readline().strip() == "go"


def _files(folder: str) -> list[Path]:
    return sorted(Path(folder).rglob("*.jpg"))


def child_in_process(spec: dict) -> None:
    """ceiling / eager: bench/pipeline.py's Ceiling, with the package or the eager model."""
    from bench.pipeline import Ceiling

    package = Path(spec["package"])
    runtime = eager_runtime(package, spec["model"]) if spec["kind"] == "eager" else None
    ceiling = Ceiling(package, [Path(f) for f in spec["folders"]], FETCH_THREADS, runtime, spec["batch"], True)
    ceiling.run(_files(spec["folders"][0])[: 2 * BATCH], spec["threads"])  # warm-up
    for folder in spec["folders"]:
        _say("ready")
        if not _await_go():
            return
        result = ceiling.run(_files(folder), spec["threads"])
        _say("result", {k: result[k] for k in ("images", "seconds", "failed")})
    ceiling.close()
    _await_go()


def eager_runtime(package: Path, model: str):
    """A `ModelRuntime` around the eager model the package was compiled from (same preprocessing
    and input handling; ResNet-18's random weights differ, which does not change the work)."""
    import torch

    from compile.models import resolve_model
    from compile.package import PackagedModel
    from worker.manifest import read_manifest
    from worker.runtime import ModelRuntime

    spec = resolve_model(MODELS[model])
    eager = PackagedModel(spec.module, spec.preprocess, torch.float32, False).eval()
    return ModelRuntime(package, read_manifest(package), eager, torch.device("cpu"))


def child_kiln(spec: dict) -> None:
    """The producer: submit the folder as one job, wait until every image has a record."""
    from bench.pipeline import _kiln

    with _kiln(spec["url"], KILN_CHUNK) as kiln:
        for folder in spec["folders"]:
            _say("ready")
            if not _await_go():
                return
            job = f"compare-{uuid.uuid4().hex[:12]}"
            started = time.perf_counter()
            submitted = kiln.submit([Path(folder)], job=job, topk=TOPK)
            counts = kiln.wait(job, timeout_s=spec["timeout"], progress=False)
            seconds = time.perf_counter() - started
            _say("result", {"images": submitted.total, "seconds": seconds, "failed": counts.failed})
    _await_go()


class RayClassifier:
    """The Ray actor: the package loaded once, uint8 N x 3 x H x W batches -> top-k labels."""

    def __init__(self, package: str, threads: int, keep_freed_memory: bool) -> None:
        import torch

        from worker.malloc import keep_freed_memory as keep
        from worker.runtime import load_runtime

        torch.set_num_threads(threads)
        self.runtime = load_runtime(package)
        if keep_freed_memory and (why_not := keep()) is not None:
            raise RuntimeError(f"cannot keep freed memory in the actor: {why_not}")

    def __call__(self, batch: dict) -> dict:
        import numpy as np
        import torch

        scores, indices = self.runtime.predict_top_k(torch.from_numpy(batch["image"]), TOPK)
        labels = np.asarray(self.runtime.labels, dtype=object)[indices.numpy()]
        return {"path": batch["path"], "label": labels, "score": scores.numpy()}


def ray_decode(batch: dict, prep) -> dict:
    """Encoded bytes -> uint8 N x 3 x H x W, with kiln's decoder (the same preprocessing)."""
    import numpy as np

    from worker.preprocess import decode_image

    images = np.stack([decode_image(data, prep).transpose(2, 0, 1) for data in batch["bytes"]])
    return {"path": batch["path"], "image": images}


def child_ray(spec: dict) -> None:
    import ray

    from worker.manifest import read_manifest

    prep = read_manifest(Path(spec["package"])).preprocess
    actors, threads = spec["actors"], spec["threads"]
    ray.init(num_cpus=spec["cores"], include_dashboard=False, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False

    def job(paths: list[Path]) -> dict:
        started = time.perf_counter()
        dataset = (
            ray.data.read_binary_files([str(p) for p in paths], include_paths=True)
            .map_batches(ray_decode, fn_kwargs={"prep": prep}, batch_size=spec["batch"], num_cpus=spec["decode_cpus"])
            .map_batches(
                RayClassifier,
                fn_constructor_kwargs={
                    "package": spec["package"],
                    "threads": threads,
                    "keep_freed_memory": spec["keep_freed_memory"],
                },
                concurrency=actors,
                batch_size=spec["batch"],
                num_cpus=spec["actor_cpus"],
            )
        )
        images = sum(len(batch["label"]) for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"))
        return {"images": images, "seconds": time.perf_counter() - started, "failed": len(paths) - images}

    warm = job(_files(spec["folders"][0])[: 2 * BATCH])
    for folder in spec["folders"]:
        _say("ready", {"warm_up_s": warm["seconds"]})
        if not _await_go():
            break
        _say("result", job(_files(folder)))
    else:
        _await_go()
    ray.shutdown()


def run_child(spec_json: str) -> None:
    spec = json.loads(spec_json)
    try:
        {"ceiling": child_in_process, "eager": child_in_process, "kiln": child_kiln, "ray": child_ray}[spec["kind"]](
            spec
        )
    except Exception as e:
        _say("error", {"error": f"{type(e).__name__}: {e}"})
        raise


# -- the orchestrator -----------------------------------------------------------------------------


def ray_python(install: bool) -> tuple[str | None, str]:
    """The Ray venv's python, creating the venv when `install`; or None and why not. The venv is
    separate so that Ray's pins never touch kiln's own; a .pth file puts kiln's venv after its own
    site-packages, so torch, Pillow and kiln's code come from there and Ray's packages win."""
    python = RAY_VENV / "bin" / "python"
    if not python.exists():
        if not install:
            return None, f"no Ray venv at {RAY_VENV} (run without --quick, or with --install-ray, to create it)"
        print(f"creating {RAY_VENV} with {RAY_REQUIREMENT} (once)...", flush=True)
        base = getattr(sys, "_base_executable", sys.executable)
        steps = [
            [base, "-m", "venv", str(RAY_VENV)],
            [str(python), "-m", "pip", "install", "--quiet", RAY_REQUIREMENT],
        ]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode != 0:
                return None, f"{' '.join(step)} failed: {(done.stderr or done.stdout)[-800:]}"
        import sysconfig

        purelib = Path(sysconfig.get_paths()["purelib"])
        ray_purelib = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        (Path(ray_purelib) / "kiln-venv.pth").write_text(f"{purelib}\n")
    done = subprocess.run(
        [str(python), "-c", "import ray, torch, worker.runtime; print(ray.__version__)"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    if done.returncode != 0:
        return None, f"the Ray venv cannot import ray, torch and kiln: {done.stderr[-800:]}"
    return str(python), done.stdout.strip()


def measure_jobs(child: Child, roots: list[int], folders: list[Path], label: str) -> list[dict]:
    """Drive one child through its jobs, measuring each over `roots` + the child's tree."""
    rows = []
    try:
        for _ in folders:
            ready = child.expect("ready")
            load = os.getloadavg()[0]
            with TreeMeter([*roots, child.process.pid]) as meter:
                child.send("go")
                result = child.expect("result")
            images = result["images"]
            row = {
                **result,
                **ready,
                "images_per_s": images / result["seconds"],
                "cpu_s": meter.cpu_used_s,
                "cpu_s_per_1k": 1000 * meter.cpu_used_s / images,
                "peak_rss_mb": meter.peak_rss / 2**20,
                "processes": len(meter.names),
                "process_names": sorted(set(meter.names.values())),
                "cpu_s_per_1k_by_role": {role: 1000 * cpu / images for role, cpu in meter.cpu_s_by_role().items()},
                "load_1m_before": load,
                "others_cpu_share": meter.others_cpu_s / (result["seconds"] * (os.cpu_count() or 1)),
            }
            print(
                f"  {label:10s} {images:6d} images: {row['images_per_s']:7.1f} img/s, {row['cpu_s_per_1k']:6.1f} "
                f"CPU s/1k, peak RSS {row['peak_rss_mb']:7.0f} MB ({row['processes']} processes)",
                flush=True,
            )
            rows.append(row)
    finally:
        child.close()
    return rows


def run_model(args, model: str, package: Path, folders: list[Path], url: str, redis_pid: int, ray_py, workdir):
    from bench.pipeline import Workers, warm_up_workers

    cores = os.cpu_count() or 1
    me = sys.executable
    base = {"model": model, "package": str(package), "folders": [str(f) for f in folders], "cores": cores}
    base["batch"] = args.batch
    rows: dict[str, list[dict]] = {}

    def logfile(name: str) -> Path:
        return workdir / f"{model}-{name.replace(' ', '_')}.log"

    for kind in ("ceiling", "eager"):
        child = Child(me, {**base, "kind": kind, "threads": cores}, logfile(kind))
        jobs = [f for f in folders if kind == "ceiling" or len(_files(str(f))) <= args.eager_up_to]
        rows[kind] = measure_jobs(child, [], jobs, kind)
    for processes in args.kiln_processes:
        name = f"kiln x{processes}"
        workers = Workers(
            name, processes, "solo", max(1, cores // processes), batch_size=args.batch, keep_freed_memory=True
        )
        workers.start(package, url, folders, FETCH_THREADS, workdir)
        try:
            warm_up_workers(url, workers, _files(str(folders[0])))
            child = Child(me, {**base, "kind": "kiln", "url": url, "timeout": args.timeout}, logfile(name))
            rows[name] = measure_jobs(child, [redis_pid, *(p.pid for p in workers.popens)], folders, name)
        finally:
            workers.stop()
    ray_runs = [(actors, kept) for actors in args.ray_actors for kept in RAY_MEMORY[args.ray_memory]]
    for actors, kept in ray_runs if ray_py else []:
        name = f"ray x{actors}" + (" kept" if kept else "")
        spec = {
            **base,
            "kind": "ray",
            "actors": actors,
            "threads": max(1, cores // actors),
            "actor_cpus": args.ray_actor_cpus,
            "decode_cpus": args.ray_decode_cpus,
            "keep_freed_memory": kept,
        }
        try:
            rows[name] = measure_jobs(Child(ray_py, spec, logfile(name)), [], folders, name)
        except RuntimeError as e:
            print(f"  {name}: failed: {e}", flush=True)
            rows[name] = [{"error": str(e)}]
    return rows


def with_ratios(rows: dict[str, list[dict]], sizes: list[int]) -> list[dict]:
    """Flatten to one row per (contender, size) with ratios to that size's ceiling."""
    flat = []
    for index, size in enumerate(sizes):
        ceiling = rows["ceiling"][index]
        for contender, runs in rows.items():
            row = next((r for r in runs if r.get("images") == size), None)
            if row is None:
                errors = [r for r in runs if "error" in r]
                if not errors:  # not run at this size (eager beyond --eager-up-to)
                    continue
                row = errors[-1]
            if "error" in row:
                flat.append({"contender": contender, "size": size, **row})
                continue
            flat.append(
                {
                    "contender": contender,
                    "size": size,
                    **row,
                    "ratio_images_per_s": row["images_per_s"] / ceiling["images_per_s"],
                    "ratio_cpu_s_per_1k": row["cpu_s_per_1k"] / ceiling["cpu_s_per_1k"],
                    "ratio_peak_rss": row["peak_rss_mb"] / ceiling["peak_rss_mb"],
                }
            )
    return flat


def targets(rows: list[dict]) -> list[dict]:
    """Issue #11's targets against Ray Data, per model and size: kiln's fastest row against Ray's
    fastest row (CPU and memory from those same rows), and kiln against the ceiling."""
    out = []
    for model, size in sorted({(r["model"], r["size"]) for r in rows}):
        group = [r for r in rows if (r["model"], r["size"]) == (model, size) and "error" not in r]
        kiln = [r for r in group if r["contender"].startswith("kiln")]
        ray = [r for r in group if r["contender"].startswith("ray")]
        if not kiln:
            continue
        best = max(kiln, key=lambda r: r["images_per_s"])
        entry = {"model": model, "size": size, "kiln": best["contender"], "kiln_vs_ceiling": best["ratio_images_per_s"]}
        entry["kiln_vs_ceiling_met"] = entry["kiln_vs_ceiling"] >= 0.9
        if ray:
            rival = max(ray, key=lambda r: r["images_per_s"])
            need = 1.5 if size <= 512 else 1.1
            entry.update(
                ray=rival["contender"],
                speed=best["images_per_s"] / rival["images_per_s"],
                speed_needed=need,
                cpu=best["cpu_s_per_1k"] / rival["cpu_s_per_1k"],
                memory=best["peak_rss_mb"] / rival["peak_rss_mb"],
            )
            entry["met"] = {
                "speed": entry["speed"] >= need,
                "cpu": entry["cpu"] <= 0.75,
                "memory": entry["memory"] <= 0.5,
            }
        out.append(entry)
    return out


def print_table(results: dict) -> None:
    line = "| {:8s} | {:6s} | {:10s} | {:>8s} | {:>5s} | {:>9s} | {:>5s} | {:>12s} | {:>5s} |"
    print(line.format("model", "images", "contender", "images/s", "×", "CPU s/1k", "×", "peak RSS MB", "×"))
    print("| " + " | ".join("-" * w for w in (8, 6, 10, 8, 5, 9, 5, 12, 5)) + " |")
    for r in results["rows"]:
        if "error" in r:
            print(line.format(r["model"], str(r["size"]), r["contender"], "failed", "", "", "", "", ""))
            continue
        cells = [r["model"], str(r["images"]), r["contender"], f"{r['images_per_s']:.1f}"]
        cells += [f"{r['ratio_images_per_s']:.2f}", f"{r['cpu_s_per_1k']:.1f}", f"{r['ratio_cpu_s_per_1k']:.2f}"]
        print(line.format(*cells, f"{r['peak_rss_mb']:,.0f}", f"{r['ratio_peak_rss']:.2f}"))
    if results.get("ray_unavailable"):
        print(f"\nRay Data not measured: {results['ray_unavailable']}")
    print("\n× = ratio to the ceiling of the same model and job size")
    for t in results["targets"]:
        text = f"{t['model']} {t['size']}: {t['kiln']} = {t['kiln_vs_ceiling']:.2f}x ceiling"
        if "ray" in t:
            met = t["met"]
            text += (
                f"; vs {t['ray']}: {t['speed']:.2f}x images/s (need {t['speed_needed']}: "
                f"{'met' if met['speed'] else 'MISSED'}), {t['cpu']:.2f}x CPU/image (need <= 0.75: "
                f"{'met' if met['cpu'] else 'MISSED'}), {t['memory']:.2f}x peak RSS (need <= 0.5: "
                f"{'met' if met['memory'] else 'MISSED'})"
            )
        print(text)


def chart(results: dict, path: Path) -> None:
    """Three panels (images/s, CPU s per 1,000 images, peak RSS): a group of bars per model and size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if "error" not in r]
    groups = sorted({(r["model"], r["size"]) for r in rows}, key=lambda g: (g[0], g[1]))
    contenders = list(dict.fromkeys(r["contender"] for r in rows))
    metrics = (("images_per_s", "images/s (higher is better)"), ("cpu_s_per_1k", "CPU s per 1,000 images"),
               ("peak_rss_mb", "peak RSS of all processes, MB"))  # fmt: skip
    figure, axes = plt.subplots(1, 3, figsize=(16, 5))
    width = 0.8 / len(contenders)
    for ax, (key, title) in zip(axes, metrics, strict=True):
        for i, contender in enumerate(contenders):
            values = [
                next((r[key] for r in rows if (r["model"], r["size"], r["contender"]) == (*g, contender)), 0)
                for g in groups
            ]
            ax.bar([x + i * width for x in range(len(groups))], values, width, label=contender)
        ax.set_xticks([x + width * (len(contenders) - 1) / 2 for x in range(len(groups))])
        ax.set_xticklabels([f"{m}\n{s:,} images" for m, s in groups])
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    load = " (measured under load from other work)" if results.get("under_load") else ""
    figure.suptitle(f"kiln vs Ray Data, {results['cores']} CPU cores, one run{load}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="512,10000", help="job sizes, in images (comma-separated)")
    parser.add_argument("--models", default="lite0,resnet18", help=f"of {', '.join(MODELS)}")
    parser.add_argument("--quick", action="store_true", help="smoke run: Lite0, one 48-image job")
    parser.add_argument("--no-ray", action="store_true", help="kiln, the ceiling and eager only")
    parser.add_argument("--install-ray", action="store_true", help=f"create {RAY_VENV} even with --quick")
    parser.add_argument("--kiln-processes", default="1,2", help="worker processes of each kiln run")
    parser.add_argument("--ray-actors", default="1,2", help="actors of each Ray Data run")
    parser.add_argument(
        "--ray-memory",
        choices=sorted(RAY_MEMORY),
        default="both",
        help="Ray's actors with glibc's default malloc, with the freed memory kept as kiln's CPU workers keep "
        "it (worker/malloc.py), or both",
    )
    parser.add_argument("--ray-actor-cpus", type=float, default=0.5, help="Ray logical CPUs per model actor")
    parser.add_argument("--ray-decode-cpus", type=float, default=0.5, help="Ray logical CPUs per decode task")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one kiln job may take")
    parser.add_argument(
        "--eager-up-to",
        type=int,
        default=10**9,
        metavar="IMAGES",
        help="run eager PyTorch only on jobs of at most this many images (it is 5-10x slower, and no target is on it)",
    )
    parser.add_argument(
        "--batch", type=int, default=BATCH, help=f"the model's batch in every contender, at most {BATCH}"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "compare.json")
    parser.add_argument(
        "--workdir", type=Path, default=ROOT / "build" / "compare-work", help="redis, worker and client logs (emptied)"
    )
    args = parser.parse_args()
    if args.child:
        run_child(args.child)
        return
    if args.quick:
        args.sizes, args.models = "48", "lite0"
    sizes = [int(s) for s in args.sizes.split(",")]
    models = args.models.split(",")
    args.kiln_processes = [int(p) for p in args.kiln_processes.split(",")]
    args.ray_actors = [int(a) for a in args.ray_actors.split(",")]

    import shutil

    import redis

    from bench.gpu import dataset
    from bench.packages import cached_package
    from compile.package import BuildOptions
    from producer.embedded import embedded_redis
    from worker.cxx_runtime import ensure_cxx_runtime

    packages = {m: cached_package(MODELS[m], BuildOptions("cpu", "float32", max_batch=BATCH))[0] for m in models}
    for package in packages.values():
        ensure_cxx_runtime(package)  # where this host needs the C++ runtime preloaded, restarts here
    ray_py, ray_note = (None, "--no-ray") if args.no_ray else ray_python(args.install_ray or not args.quick)
    print(f"Ray Data: {ray_note if ray_py is None else 'ray ' + ray_note}", flush=True)
    folders = [dataset("jpeg", size, LITE0_SIZE) for size in sizes]

    cores = os.cpu_count() or 1
    results = {
        "python": platform.python_version(),
        "host": platform.node(),
        "cores": cores,
        "sizes": sizes,
        "batch": args.batch,
        "ray": ray_note if ray_py else None,
        "ray_unavailable": None if ray_py else ray_note,
        "load_avg_at_start": os.getloadavg(),
        "method": __doc__.split("Contenders,")[1].strip(),
        "rows": [],
    }
    started = time.perf_counter()
    args.workdir = args.workdir.resolve()  # redis-server takes its log file's path from here
    shutil.rmtree(args.workdir, ignore_errors=True)  # the last run's logs
    args.workdir.mkdir(parents=True)
    with embedded_redis(args.workdir, persist=False) as url:
        redis_pid = redis.Redis.from_url(url).info("server")["process_id"]
        for model in models:
            print(f"{model}: {packages[model].name}", flush=True)
            rows = run_model(args, model, packages[model], folders, url, redis_pid, ray_py, args.workdir)
            results["rows"] += [{"model": model, **row} for row in with_ratios(rows, sizes)]
            write(results, args.out, started)  # each model's results as soon as it is done
    print()
    print_table(results)
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')} ({results['total_s']:.0f} s)")


def write(results: dict, out: Path, started: float) -> None:
    """Targets, load and time into `results`; then the JSON file and the chart next to it."""
    results["targets"] = targets(results["rows"])
    results["load_avg_at_end"] = os.getloadavg()
    # Under load: other work (this process's sampling included) took over 10% of the host in a job.
    results["under_load"] = max(r.get("others_cpu_share", 0) for r in results["rows"]) > 0.1
    results["total_s"] = time.perf_counter() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    chart(results, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
