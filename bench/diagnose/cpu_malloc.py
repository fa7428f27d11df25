"""What a CPU package's model call costs in user and system time, with glibc's default malloc and
with the freed memory kept (worker/malloc.py), on this host (issue #11: the CPU seconds an image).

    python bench/diagnose/cpu_malloc.py [--batches 16,64] [--repeats 2] [--models lite0,resnet18]

Each (model, malloc) pair runs in a fresh process (mallopt is process-wide and one-way): the
package of bench/compare.py, one torch thread, uint8 batches of random pixels, two calls to warm
up and then about 512 images per batch size. Two such processes run at once, as kiln x2 and Ray
x2 do on the 2-core VM. Reports user and system CPU milliseconds an image and writes
bench/results/cpu-malloc.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

from common import ROOT, Results

from bench.compare import BATCH, MODELS

OUT = ROOT / "bench" / "results" / "cpu-malloc.json"

_CHILD = """
import json, os, sys
import torch
from worker.malloc import keep_freed_memory
from worker.runtime import load_runtime

package, kept, batches = sys.argv[1], sys.argv[2] == "kept", [int(b) for b in sys.argv[3].split(",")]
torch.set_num_threads(1)
runtime = load_runtime(package)
if kept and (why_not := keep_freed_memory()) is not None:
    raise SystemExit(why_not)
out = {}
for batch in batches:
    images = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8)
    for _ in range(2):
        runtime.predict(images)
    calls = max(3, 512 // batch)
    before = os.times()
    for _ in range(calls):
        runtime.predict(images)
    after = os.times()
    ms = 1e3 / (calls * batch)
    out[batch] = {"user_ms": ms * (after.user - before.user), "system_ms": ms * (after.system - before.system)}
print(json.dumps(out))
"""


def run_pair(package: str, kept: bool, batches: str) -> list[dict]:
    """Two processes at once, each measuring every batch size; their results."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-c", _CHILD, package, "kept" if kept else "default", batches]
    children = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [child.communicate()[0] for child in children]
    if any(child.returncode for child in children):
        raise RuntimeError(f"a measuring process failed: {[child.returncode for child in children]}")
    return [json.loads(out) for out in outs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="16,64")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--models", default="lite0,resnet18")
    args = parser.parse_args()

    from bench.packages import cached_package
    from compile.package import BuildOptions

    results = Results(OUT)
    results.update(host=platform.node(), cores=os.cpu_count(), python=platform.python_version(), rows=[])
    print(f"| model | malloc | batch | user ms/img | system ms/img | total |\n|{' --- |' * 6}")
    for model in args.models.split(","):
        package = str(cached_package(MODELS[model], BuildOptions("cpu", "float32", max_batch=BATCH))[0])
        for repeat in range(args.repeats):
            for kept in (False, True):
                for process, measured in enumerate(run_pair(package, kept, args.batches)):
                    for batch, cost in measured.items():
                        row = {"model": model, "malloc": "kept" if kept else "default", "batch": int(batch)}
                        row.update(repeat=repeat, process=process, **cost)
                        results["rows"].append(row)
                        total = cost["user_ms"] + cost["system_ms"]
                        print(
                            f"| {model} | {row['malloc']} | {batch} | {cost['user_ms']:.1f} | "
                            f"{cost['system_ms']:.1f} | {total:.1f} |",
                            flush=True,
                        )
                results.save()
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
