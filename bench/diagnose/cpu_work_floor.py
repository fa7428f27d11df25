"""What the work itself costs an image on this host, beside what kiln and Ray Data spent on it
(issue #11's CPU target: CPU seconds an image at most 0.75x Ray's, with the same package).

    python bench/diagnose/cpu_work_floor.py [--models resnet18,lite0] [--images 512] [--repeats 2]

Two steps that every contender runs, each in two processes at once (as kiln x2 and Ray x2 run on
the 2-core VM), one torch thread each:

- model:  the package of bench/compare.py at batch 64, uint8 batches, with the freed memory kept
          (worker/malloc.py, as compare.py's kiln rows and its workers run): cpu_malloc.py's
          measurement;
- decode: `worker.preprocess.decode_image` (Pillow with `draft`, kiln's and compare.py's Ray
          decode) over `--images` of compare.py's 640x480 JPEGs, half to each process.

Their sum is a floor under any contender that runs this package on these files: no scheduling
makes it cheaper. CPU speed differs between hosts (this VM's cores are not always the same kind),
so the floor is compared as a ratio to compare.py's ceiling measured here in the same run (the
worker's own loop in one process, `bench.pipeline.Ceiling`, as compare.py runs it, over the same
files) and set beside compare.py's own ratios to its ceiling for Ray x2 and kiln x2
(`bench/results/compare*.json`): kiln's CPU target, 0.75x Ray's, is out of reach of any contender
where the floor's ratio is above 0.75x Ray's ratio. Writes bench/results/cpu-work-floor.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

from common import ROOT, Results
from cpu_malloc import run_pair

from bench.compare import BATCH, MODELS

OUT = ROOT / "bench" / "results" / "cpu-work-floor.json"
COMPARE_RUNS = ["compare.json", "compare-resnet18.json", "compare-resnet18-10k.json"]

_DECODE_CHILD = """
import json, os, sys
from pathlib import Path
from worker.manifest import read_manifest
from worker.preprocess import decode_image

package, files = sys.argv[1], sys.argv[2:]
prep = read_manifest(package).preprocess
blobs = [Path(f).read_bytes() for f in files]
for blob in blobs[:4]:
    decode_image(blob, prep)
before = os.times()
for blob in blobs:
    decode_image(blob, prep)
after = os.times()
ms = 1e3 / len(blobs)
print(json.dumps({"user_ms": ms * (after.user - before.user), "system_ms": ms * (after.system - before.system)}))
"""


_CEILING_CHILD = """
import json, os, sys
from pathlib import Path
from bench.compare import BATCH, FETCH_THREADS
from bench.pipeline import Ceiling

package, folder = Path(sys.argv[1]), Path(sys.argv[2])
files = sorted(folder.rglob("*.jpg"))
ceiling = Ceiling(package, [folder], FETCH_THREADS, None, BATCH, True)
ceiling.run(files[: 2 * BATCH], os.cpu_count())  # warm-up, as compare.py's
before = os.times()
result = ceiling.run(files, os.cpu_count())
after = os.times()
ceiling.close()
ms = 1e3 / result["images"]
print(json.dumps({"user_ms": ms * (after.user - before.user), "system_ms": ms * (after.system - before.system)}))
"""


def ceiling_cost(package: str, folder: str) -> dict:
    """compare.py's ceiling over `folder`, in a fresh process: its CPU ms an image."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", _CEILING_CHILD, package, folder], stdout=subprocess.PIPE, text=True, env=env, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def decode_pair(package: str, files: list[str]) -> list[dict]:
    """`decode_image` over `files`, half in each of two processes at once; their costs."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    halves = [files[0::2], files[1::2]]
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _DECODE_CHILD, package, *half], stdout=subprocess.PIPE, text=True, env=env
        )
        for half in halves
    ]
    outs = [child.communicate()[0] for child in children]
    if any(child.returncode for child in children):
        raise RuntimeError(f"a decoding process failed: {[child.returncode for child in children]}")
    return [json.loads(out) for out in outs]


def measured_by_compare(model: str) -> list[dict]:
    """compare.py's kiln x2 and ray x2 rows of `model`: CPU ms an image, by job size and run."""
    rows = []
    for name in COMPARE_RUNS:
        path = ROOT / "bench" / "results" / name
        if not path.exists():
            continue
        for row in json.loads(path.read_text())["rows"]:
            if row["model"] == model and row["contender"] in ("kiln x2", "ray x2"):
                rows.append({
                    "file": name, "contender": row["contender"], "size": row["size"],
                    "ms": row["cpu_s_per_1k"], "ratio_to_ceiling": row["ratio_cpu_s_per_1k"],
                })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet18,lite0")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from bench.gpu import dataset
    from bench.packages import cached_package
    from bench.pipeline import LITE0_SIZE
    from compile.package import BuildOptions

    folder = dataset("jpeg", args.images, LITE0_SIZE)
    files = sorted(str(p) for p in folder.rglob("*.jpg"))
    results = Results(OUT)
    results.update(host=platform.node(), cores=os.cpu_count(), python=platform.python_version(), models={})
    for model in args.models.split(","):
        package = str(cached_package(MODELS[model], BuildOptions("cpu", "float32", max_batch=BATCH))[0])
        runs = []
        for _ in range(args.repeats):
            model_ms = [m[str(BATCH)] for m in run_pair(package, True, str(BATCH))]
            decode_ms = decode_pair(package, files)
            ceiling_ms = ceiling_cost(package, str(folder))
            runs.append({"model": model_ms, "decode": decode_ms, "ceiling": [ceiling_ms]})
        step = {  # each the cheapest of the runs: the floor is what the work can cost, not what it did once
            name: min(sum(p["user_ms"] + p["system_ms"] for p in run[name]) / len(run[name]) for run in runs)
            for name in ("model", "decode", "ceiling")
        }
        floor = step["model"] + step["decode"]
        floor_ratio = floor / step["ceiling"]
        compared = measured_by_compare(model)
        results["models"][model] = {
            "runs": runs,
            **{f"{name}_ms": ms for name, ms in step.items()},
            "floor_ms": floor,
            "floor_to_ceiling": floor_ratio,
            "compare_rows": compared,
        }
        results.save()
        print(f"\n{model}: model {step['model']:.1f} + decode {step['decode']:.1f} = {floor:.1f} CPU ms an image, "
              f"ceiling {step['ceiling']:.1f}: floor {floor_ratio:.2f}x the ceiling (the cheapest of {args.repeats} "
              "runs each)")  # fmt: skip
        print("| run | contender | job | CPU ms/img there | x ceiling | kiln's target (0.75x Ray's) |")
        print("| --- | --- | --- | --- | --- | --- |")
        for row in compared:
            target = f"{0.75 * row['ratio_to_ceiling']:.2f}x" if row["contender"] == "ray x2" else ""
            print(f"| {row['file']} | {row['contender']} | {row['size']} | {row['ms']:.1f} | "
                  f"{row['ratio_to_ceiling']:.2f}x | {target} |")  # fmt: skip
    print(f"\nwrote {OUT}")


if __name__ == "__main__":
    main()
