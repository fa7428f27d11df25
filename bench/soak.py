"""Soak: one large job through two workers while Redis and the workers are hurt on purpose.

    python bench/soak.py                       # 100,000 images (issue 9's soak)
    python bench/soak.py --images 5000         # a quick check

The job: `--images` small JPEGs (64x64; `--files` distinct files, referenced round robin under
distinct keys) through two solo workers serving a trivial model (`bench.pipeline:tiny_model`), so
that the run measures delivery, not the model. Default worker settings (60 s lease). While the job
runs, at random points of its progress:
- worker `b` is killed with SIGKILL `--kills` times, and started again each time; worker `a` is
  never killed, so its RSS at the start and the end measures growth over the whole soak;
- Redis is restarted twice (SIGTERM, AOF kept, 2 s down);
- Redis is paused (SIGSTOP) once for 10 s.

Reported (table, and JSON in bench/results/soak.json): images in, records out, lost (images without
a record), duplicated (counter increments beyond the records, and records of keys never
submitted), error records by kind, executions per chunk, the time from each kill to the killed
chunk running again, worker RSS at start and end, and Redis memory at start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from bench.pipeline import TINY_SIZE, ensure_package, make_dataset  # noqa: E402
from bench.redis_server import RedisServer  # noqa: E402
from producer.embedded import LocalWorker  # noqa: E402

JOB = "soak"


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def used_mb(client: redis.Redis) -> float:
    return client.info("memory")["used_memory"] / 2**20


def worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path, package: Path, data: Path) -> None:
        self.args, self.workdir, self.package, self.data = args, workdir, package, data
        (workdir / "redis").mkdir()
        (workdir / "logs").mkdir()
        self.server = RedisServer(workdir / "redis")
        self.workers: dict[str, LocalWorker] = {}
        self.starts = Counter()
        self.events: list[dict] = []
        self.pending: list[tuple[float, str]] = []  # (killed at, chunk task id) not yet running again
        self.recovery_s: list[float] = []  # kill -9 to the killed chunk running again
        self.t0 = time.monotonic()

    def start_worker(self, name: str) -> LocalWorker:
        self.starts[name] += 1
        log = self.workdir / "logs" / f"{name}-{self.starts[name]}.log"
        options = ["--queues", "kiln.bulk", "--threads", "1", "--loglevel", "WARNING"]
        self.workers[name] = LocalWorker(self.package, self.server.url, log, [self.data], options, env=worker_env())
        return self.workers[name]

    def client(self) -> redis.Redis:
        return self.server.client()

    def finished(self) -> int:
        try:
            meta = self.client().hmget(f"kiln:{{{JOB}}}:meta", "done", "failed")
            return sum(int(v or 0) for v in meta)
        except redis.RedisError:
            return -1

    def note(self, what: str, **extra: object) -> None:
        event = {"t_s": round(time.monotonic() - self.t0, 1), "event": what, **extra}
        self.events.append(event)
        print(f"  {event['t_s']:7.1f} s  {what} {extra or ''}", flush=True)

    def held_by(self, pid: int) -> list[str]:
        entries = self.client().hgetall(f"kiln:{{{JOB}}}:delivery")
        return [t.decode() for t, v in entries.items() if v.decode().split("|")[0].endswith(f":{pid}")]

    def kill_b(self) -> None:
        worker = self.workers["b"]
        try:
            held = self.held_by(worker.process.pid)
        except redis.RedisError:
            held = []
        os.killpg(worker.process.pid, signal.SIGKILL)
        worker.process.wait(30)
        self.note("SIGKILL worker b", chunks_held=held)
        self.pending += [(time.monotonic(), task) for task in held]
        self.start_worker("b")

    def check_recoveries(self) -> None:
        """Note when each killed chunk starts running again (its execution count reaches 2)."""
        for entry in list(self.pending):
            killed_at, task = entry
            try:
                runs = int(self.client().hget(f"kiln:{{{JOB}}}:executions", task) or 0)
            except redis.RedisError:
                return
            if runs >= 2:
                self.pending.remove(entry)
                self.recovery_s.append(round(time.monotonic() - killed_at, 1))
                self.note("killed chunk running again", task=task, after_s=self.recovery_s[-1])


def wait_ready(soak: Soak, timeout_s: float = 300) -> None:
    """A one-image warm-up job per worker, so that both are loaded before the clock starts."""
    from producer import Item, Kiln

    with Kiln(soak.server.url) as kiln:
        first = next(soak.data.iterdir())
        kiln.submit([Item(key=f"warm-{i}", ref=str(first)) for i in range(64)], job="warm-up")
        workers = list(soak.workers.values())
        kiln.wait("warm-up", timeout_s=timeout_s, progress=False, check=lambda: [w.check() for w in workers])


def run(args: argparse.Namespace) -> dict:
    from producer import Item, Kiln
    from producer.settings import ProducerSettings
    from worker.store import ResultStore

    rng = random.Random(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="kiln-soak-"))
    package, _ = ensure_package("tiny", args.batch)
    data = workdir / "data"
    started = time.perf_counter()
    files = make_dataset(data, min(args.files, args.images), TINY_SIZE, args.seed)
    print(f"{len(files)} distinct 64x64 JPEGs in {time.perf_counter() - started:.0f} s", flush=True)
    soak = Soak(args, workdir, package, data)
    try:
        soak.start_worker("a"), soak.start_worker("b")
        wait_ready(soak)
        client = soak.client()
        redis_start_mb = used_mb(client)
        rss_start = {name: rss_mb(w.process.pid) for name, w in soak.workers.items()}

        items = [Item(key=f"img-{i:06d}", ref=str(files[i % len(files)])) for i in range(args.images)]
        with Kiln(settings=ProducerSettings(_env_file=None, redis_url=soak.server.url, chunk_size=args.chunk)) as kiln:
            kiln.submit(items, job=JOB)
        soak.t0 = time.monotonic()
        soak.note("submitted", images=args.images, chunks=-(-args.images // args.chunk))

        # Faults at random points of the job's progress, in order.
        faults = [(rng.uniform(0.05, 0.9), "kill") for _ in range(args.kills)]
        faults += [(rng.uniform(0.1, 0.4), "restart"), (rng.uniform(0.5, 0.8), "restart")]
        faults += [(rng.uniform(0.3, 0.7), "pause")]
        faults.sort()
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            finished = soak.finished()
            if finished >= args.images:
                break
            while faults and finished >= faults[0][0] * args.images:
                _, kind = faults.pop(0)
                if kind == "kill":
                    soak.kill_b()
                elif kind == "restart":
                    soak.server.restart(down_s=2)
                    soak.note("Redis restarted (2 s down)", done=finished)
                else:
                    soak.note("Redis paused for 10 s", done=finished)
                    with soak.server.paused(10):
                        pass
            soak.check_recoveries()
            for name, worker in soak.workers.items():
                if worker.process.poll() is not None:
                    soak.note(f"worker {name} exited with {worker.process.returncode}: restarting it")
                    soak.start_worker(name)
            time.sleep(0.2)
        elapsed = time.monotonic() - soak.t0
        soak.note("job complete" if soak.finished() >= args.images else "timed out", done=soak.finished())

        store = ResultStore(soak.client())
        records = list(store.records(JOB))
        counts = store.counts(JOB)
        executions = store.executions(JOB)
        keys = {item.key for item in items}
        out_keys = Counter(r.key for r in records)
        rss_end = {"a": rss_mb(soak.workers["a"].process.pid), "b (last start)": rss_mb(soak.workers["b"].process.pid)}
        result = {
            "images_in": args.images,
            "distinct_files": len(files),
            "records_out": len(records),
            "lost": len(keys - set(out_keys)),
            "duplicated": {
                "counter_increments_beyond_records": counts.done + counts.failed - len(records),
                "records_of_keys_not_submitted": len(set(out_keys) - keys),
            },
            "counters": {"total": counts.total, "done": counts.done, "failed": counts.failed},
            "errors_by_kind": dict(Counter(r.error.kind for r in records if r.status == "error")),
            "chunks": len(executions),
            "executions_per_chunk": {
                "mean": statistics.fmean(executions.values()) if executions else None,
                "max": max(executions.values(), default=None),
                "histogram": dict(sorted(Counter(executions.values()).items())),
            },
            "kill_to_chunk_running_again_s": soak.recovery_s,
            "killed_chunks_never_run_again": [task for _, task in soak.pending],
            "job_seconds": round(elapsed, 1),
            "worker_rss_mb": {"start": rss_start, "end": rss_end},
            "worker_a_rss_growth": (rss_end["a"] / rss_start["a"] - 1) if rss_start.get("a") else None,
            "redis_used_memory_mb": {"start": redis_start_mb, "end": used_mb(soak.client())},
            "events": soak.events,
            "worker_starts": dict(soak.starts),
        }
        return result
    finally:
        for worker in soak.workers.values():
            worker.stop()
        soak.server.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir}")


def print_table(result: dict) -> None:
    e = result["executions_per_chunk"]
    rss = result["worker_rss_mb"]
    rows = [
        ("images in", f"{result['images_in']:,} ({result['distinct_files']:,} distinct files)"),
        ("records out", f"{result['records_out']:,}"),
        ("lost", result["lost"]),
        ("duplicated", result["duplicated"]),
        ("error records", result["errors_by_kind"] or "none"),
        ("chunks", result["chunks"]),
        ("executions per chunk", f"mean {e['mean']:.3f}, max {e['max']}, histogram {e['histogram']}"),
        ("worker a RSS start -> end", f"{rss['start']['a']:.0f} -> {rss['end']['a']:.0f} MB "
                                      f"({100 * result['worker_a_rss_growth']:+.1f}%)"),
        ("redis used_memory start -> end", "{start:.1f} -> {end:.1f} MB".format(**result["redis_used_memory_mb"])),
        ("kill -9 -> chunk running again", f"{result['kill_to_chunk_running_again_s']} s"),
        ("job time", f"{result['job_seconds']} s, worker starts {result['worker_starts']}"),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--files", type=int, default=5_000, help="distinct image files, referenced round robin")
    parser.add_argument("--chunk", type=int, default=512, help="images per chunk")
    parser.add_argument("--batch", type=int, default=256, help="the tiny package's max batch")
    parser.add_argument("--kills", type=int, default=4, help="SIGKILLs of worker b")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds the job may take")
    parser.add_argument("--keep", action="store_true", help="keep the data, Redis and worker logs")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    args = parser.parse_args()

    import logging

    from worker.cxx_runtime import ensure_cxx_runtime

    logging.basicConfig(level=logging.WARNING)
    ensure_cxx_runtime(ensure_package("tiny", args.batch)[0])  # may restart this process (GPU hosts)
    result = {
        "host": platform.node(),
        "cores": os.cpu_count(),
        "load_avg_at_start": os.getloadavg(),
        "settings": vars(args) | {"out": str(args.out)},
        **run(args),
    }
    print()
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
