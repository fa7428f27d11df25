"""Sixth-session diagnosis on the H200: with several worker processes per GPU (the default), is
the GPU the bound? `nvidia-smi dmon` samples SM, memory and JPEG-engine utilisation during an
end-to-end run; then the same run under CUDA MPS (kernels of several processes run at once,
instead of the GPU time-slicing between their contexts), where the host has it.

    python3 bench/diagnose/gpu_mps_and_utilisation.py $OUT/diag.json .whl
"""

from __future__ import annotations

import subprocess
import sys

from common import ROOT, Results, mps_daemon, resnet18_on_640x480

from bench.gpu import _default_worker_rate

R = Results(sys.argv[1])


def sampled(label: str, run) -> dict:
    """`run()`'s result, with `nvidia-smi dmon` samples (one a second) taken meanwhile."""
    log = ROOT / "build" / f"dmon-{label}.txt"
    with open(log, "w") as out:
        dmon = subprocess.Popen(["nvidia-smi", "dmon", "-s", "u", "-d", "1"], stdout=out, stderr=subprocess.STDOUT)
        try:
            row = run()
        finally:
            dmon.terminate()
            dmon.wait(10)
    row["dmon"] = log.read_text().splitlines()[-40:]
    return row


def main() -> None:
    package, small, workdir = resnet18_on_640x480(sys.argv[2:])
    from producer.embedded import embedded_redis

    with embedded_redis(workdir / "redis-mps", persist=False) as url:
        R["default"] = sampled("default", lambda: _default_worker_rate(url, package, small, workdir, "dmon", {}))
        R.save()
        print("default:", R["default"]["images_per_s"], flush=True)
        with mps_daemon() as pipes:
            if pipes is None:
                R["mps"] = {"skipped": "no nvidia-cuda-mps-control on this host"}
                R.save()
                return
            try:
                R["mps"] = sampled("mps", lambda: _default_worker_rate(url, package, small, workdir, "mps", pipes))
                print("mps:", R["mps"]["images_per_s"], flush=True)
            except Exception as e:
                R["mps"] = {"error": repr(e)[-1500:]}
            R.save()


if __name__ == "__main__":
    main()
