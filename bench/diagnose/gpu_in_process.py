"""Twelfth-session diagnosis on the H200: is the in-process pipeline slow (bench/gpu.py's e2e
section measured 1.4-1.8k img/s in session 11, against 6.2k in session 8 and 5.2k for one worker
process through Redis) by itself, or only after the sections that run before it in the same
process? Runs bench/gpu.py's `bench_in_process` in a fresh process, right after the build.

    python3 bench/diagnose/gpu_in_process.py $OUT/in-process.json .whl
"""

from __future__ import annotations

import sys

from common import Results, resnet18_on_640x480

R = Results(sys.argv[1])


def main() -> None:
    package, folder, workdir = resnet18_on_640x480(sys.argv[2:])
    from bench.gpu import bench_in_process

    R["fresh_process"] = bench_in_process(package, folder, workdir)
    R.save()


if __name__ == "__main__":
    main()
