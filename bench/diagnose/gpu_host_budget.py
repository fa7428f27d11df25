"""Seventh-session diagnosis on the H200: where the host's cores go while the default worker runs
flat out, and whether more processes feeding the GPU would help.

For each variant: one job of 65,536 640x480 JPEGs through Redis, with
- the CPU seconds of every process on the host, by role (Redis, this benchmark as the producer,
  the worker's parent, its worker processes, their decode processes), from /proc;
- the steady rate (records finished between 20% and 80% of the job) next to the job's overall rate;
- py-spy of worker-0 (`--gil`: what holds the GIL) and worker-1 (every active thread) for 4 s in
  the middle of the default run.
Variants (HOST_BUDGET_VARIANTS=a,b picks some): the default (4 processes, 3 decode processes
each), also on a 32,768-image job; 4 chunk tasks in flight; GPU decoding only (no decode
processes); two decode processes each; under CUDA MPS, the default and 6 and 8 worker processes.

    python3 bench/diagnose/gpu_host_budget.py $OUT/host.json .whl
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from common import Results, mps_daemon, resnet18_on_640x480
from gpu_e2e_profile import summarise

from bench.gpu import _worker, plan_line, warm, worker_processes

R = Results(sys.argv[1])
WANTED = set(filter(None, os.environ.get("HOST_BUDGET_VARIANTS", "").split(",")))  # default: all


def processes() -> dict[int, tuple[int, str, float]]:
    """pid -> (ppid, command line, CPU seconds) of every process on the host."""
    from bench.pipeline import _proc_table, proc_cmdline  # after the wheels are installed: it imports redis

    return {pid: (ppid, proc_cmdline(pid), cpu) for pid, (ppid, cpu) in _proc_table().items()}


def role(pid: int, table: dict, parent: int) -> str:
    if pid == os.getpid():
        return "producer (bench)"
    ppid, cmd, _ = table[pid]
    if pid == parent:
        return "worker parent"
    if ppid == parent:
        return "worker processes"
    if ppid in table and table[ppid][0] == parent:
        return "decode processes"
    if "redis-server" in cmd:
        return "redis"
    return "other"


def cpu_by_role(before: dict, after: dict, parent: int) -> dict[str, float]:
    roles: dict[str, float] = {}
    for pid, (_, _, cpu) in after.items():
        name = role(pid, after, parent)
        roles[name] = roles.get(name, 0.0) + cpu - (before[pid][2] if pid in before else 0.0)
    return {k: round(v, 2) for k, v in sorted(roles.items())}


def job(url: str, folder: Path, worker, repeat: int, spy_dir: Path | None) -> dict:
    from bench.pipeline import _kiln
    from worker.contract import Item

    name = f"host-{uuid.uuid4().hex[:10]}"
    files = sorted(str(f) for f in folder.rglob("*") if f.is_file())
    items = [Item(key=f"{copy}:{f}", ref=f) for copy in range(repeat) for f in files]
    samples: list[tuple[float, int]] = []
    done = threading.Event()
    spies: list[subprocess.Popen] = []

    def sample() -> None:
        with _kiln(url, chunk_size=128) as reader:
            while not done.is_set():
                try:
                    finished = reader.counts(name).finished
                except Exception:
                    finished = 0
                samples.append((time.perf_counter(), finished))
                if spy_dir is not None and not spies and finished > len(items) * 0.25:
                    for i, pid in enumerate(worker_processes(worker.process.pid)[:2]):
                        flags = ["--gil"] if i == 0 else []
                        spies.append(subprocess.Popen(
                            ["py-spy", "record", "--pid", str(pid), "--format", "raw", "--rate", "100", "--duration",
                             "4", "--nonblocking", "--threads", *flags, "--output", str(spy_dir / f"spy-{i}.txt")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
                time.sleep(0.1)

    before = processes()
    with _kiln(url, chunk_size=128) as kiln:
        sampler = threading.Thread(target=sample, daemon=True)
        started, wall_started = time.perf_counter(), time.time()
        sampler.start()
        kiln.submit(items, job=name, topk=5)
        counts = kiln.wait(name, timeout_s=300, progress=False, check=worker.check)
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
        by_process: dict[str, list[int]] = {}  # records finished per worker process, per 0.25 s
        for record in kiln.results(name):
            bins = by_process.setdefault(record.worker or "?", [0] * (int(seconds / 0.25) + 2))
            bins[min(int((record.finished_at - wall_started) / 0.25), len(bins) - 1)] += 1
    after = processes()
    for spy in spies:
        spy.wait(30)
    total = len(items)
    lo = next(t for t, n in samples if n >= 0.2 * total)
    hi = next((t, n) for t, n in samples if n >= 0.8 * total)
    lo_n = next(n for t, n in samples if n >= 0.2 * total)
    first = next((t for t, n in samples if n > 0), started) - started
    cpu = cpu_by_role(before, after, worker.process.pid)
    row = {
        "images": total, "failed": counts.failed, "seconds": round(seconds, 2),
        "images_per_s": round(total / seconds), "steady_images_per_s": round((hi[1] - lo_n) / (hi[0] - lo)),
        "first_record_s": round(first, 2), "cpu_s": cpu,
        "cpu_ms_per_image": {k: round(v * 1e3 / total, 3) for k, v in cpu.items()},
        "cores_busy": round(sum(cpu.values()) / seconds, 1), "cores": os.cpu_count(),
        "timeline": [(round(t - started, 2), n) for t, n in samples],
        "per_process_per_quarter_second": by_process,
    }  # fmt: skip
    if spy_dir is not None:
        for i in range(len(spies)):
            raw = spy_dir / f"spy-{i}.txt"
            if raw.exists():
                (Path(R.path).parent / f"host-spy-{i}{'-gil' if i == 0 else ''}.txt").write_text(summarise(raw))
    return row


def variant(
    url: str, package: str, folder: Path, workdir: Path, name: str, env: dict, spy: bool = False, repeat: int = 8
) -> None:
    if WANTED and name not in WANTED:
        return
    log = workdir / f"worker-host-{name}.log"
    worker = _worker(package, url, [folder], log, env)
    try:
        warm(url, folder, [worker])
        row = job(url, folder, worker, repeat, workdir if spy else None)
        R[name] = {**row, "env": env, "plan": plan_line(log)}
    except Exception as e:
        R[name] = {"error": repr(e)[-1500:], "env": env}
    finally:
        worker.stop()
    R.save()
    print(name, {k: v for k, v in R[name].items() if k not in ("plan", "timeline")}, flush=True)


def main() -> None:
    package, small, workdir = resnet18_on_640x480(sys.argv[2:])
    from producer.embedded import embedded_redis

    with embedded_redis(workdir / "redis-host", persist=False) as url:
        variant(url, package, small, workdir, "default", {}, spy=True)
        variant(url, package, small, workdir, "default_32k", {}, repeat=4)
        variant(url, package, small, workdir, "four_in_flight", {"KILN_TASKS_IN_FLIGHT": "4"})
        variant(url, package, small, workdir, "gpu_decode_only", {"KILN_DECODE_PROCESSES": "0"})
        variant(url, package, small, workdir, "two_decode_processes", {"KILN_DECODE_PROCESSES": "2"})
        with mps_daemon() as pipes:
            if pipes is None:
                R["mps"] = {"skipped": "no nvidia-cuda-mps-control"}
                R.save()
                return
            variant(url, package, small, workdir, "mps_default", pipes)
            variant(url, package, small, workdir, "mps_6x1", {**pipes, "KILN_PROCESSES_PER_GPU": "6",
                                                              "KILN_DECODE_PROCESSES": "1"})  # fmt: skip
            variant(url, package, small, workdir, "mps_8x1", {**pipes, "KILN_PROCESSES_PER_GPU": "8",
                                                              "KILN_DECODE_PROCESSES": "1"})  # fmt: skip


if __name__ == "__main__":
    main()
