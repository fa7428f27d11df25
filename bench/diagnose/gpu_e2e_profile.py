"""Third diagnosis run: py-spy of the e2e worker process; e2e variants (fixed warm-up)."""

from __future__ import annotations

import collections
import subprocess
import sys
import time
from pathlib import Path

from common import Results, resnet18_on_640x480

from bench.gpu import _worker, e2e_rate, warm

R = Results(sys.argv[1])


def summarise(raw: Path) -> str:
    """Self and inclusive samples per thread and function, from py-spy's raw (collapsed) output."""
    per_thread: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    incl: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    totals: collections.Counter = collections.Counter()
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        thread = frames[0].split(":")[0] if frames else "?"
        thread = frames[0]
        n = int(count)
        totals[thread] += n
        per_thread[thread][frames[-1]] += n
        for f in set(frames[1:]):
            incl[thread][f] += n
    out = []
    for thread, total in totals.most_common(12):
        out.append(f"== {thread}: {total}")
        out += [f"  self {n:6d} {f}" for f, n in per_thread[thread].most_common(15)]
        out += [f"  incl {n:6d} {f}" for f, n in incl[thread].most_common(25)]
    return "\n".join(out)


def main() -> None:
    pkg, small, workdir = resnet18_on_640x480(sys.argv[2:])
    from producer.embedded import embedded_redis

    variants = {
        "default": {},
        "inflight16": {"KILN_TASKS_IN_FLIGHT": "16"},
        "procs8": {"KILN_DECODE_PROCESSES": "8"},
        "fetch1": {"KILN_FETCH_THREADS": "1"},
        "default_again": {},
    }
    with embedded_redis(workdir / "redis", persist=False) as url:
        for name, env in variants.items():
            worker = _worker(pkg, url, [small], workdir / f"w-{name}.log", env)
            try:
                warm(url, small, [worker])
                spy = None
                if name == "default":
                    raw = workdir / "e2e-spy.txt"
                    spy = subprocess.Popen(["py-spy", "record", "--pid", str(worker.process.pid), "--format", "raw",
                                            "--rate", "200", "--nonblocking", "--threads", "--output", str(raw)],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
                    time.sleep(1.0)
                row = e2e_rate(url, small, [worker], repeat=4)
                if spy is not None:
                    spy.send_signal(2)
                    spy.wait(60)
                    (R.path.parent / "e2e-spy-summary.txt").write_text(summarise(raw))
                R[name] = row
                print(name, round(row["images_per_s"]), row["median_ms"], flush=True)
                R.save()
            finally:
                worker.stop()


if __name__ == "__main__":
    main()
