"""Eighteenth-session diagnosis on the H200: why four worker processes label 640x480 JPEGs at
~12.8k img/s when one process's nvImageCodec decodes 26k. Each worker process's GPU decode
thread was busy all the time (bench/results/gpu-h200-small-processes.json), at ~3.2k img/s each.

1. `standalone`: kiln's GPU decoder (`JpegBatchDecoder`, nvImageCodec: decode + resize + crop) and
   nvImageCodec's decode alone, batches of 256 from memory, in 1, 2 and 4 processes at once
   (summed rate), alone and beside a thread running Python (the worker's other stages), and the
   4 processes under CUDA MPS: is the bound the GPU shared by several processes, or each
   process's GIL (nvImageCodec takes it back for every image it sets up: python/decoder.cpp)?
2. `e2e`: the default worker through Redis with py-spy of two worker processes (one `--gil`),
   under MPS, and with the GIL switch interval at 0.1 ms.

    python3 bench/diagnose/gpu_decode_scaling.py $OUT/scaling.json .whl
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import Results, mps_daemon, resnet18_on_640x480

SECONDS = 3.0


def child(mode: str, busy: str, go: str) -> None:
    """One decoding process: report {"images", "seconds"} on stdout for SECONDS after `go` exists."""
    import torch

    from worker.gpu_decode import JpegBatchDecoder
    from worker.jpeg_codecs import import_nvimgcodec
    from worker.manifest import IMAGENET_PREPROCESS
    from worker.probe import read_header

    folder = Path(os.environ["SCALING_FOLDER"])
    datas = [f.read_bytes() for f in sorted(folder.rglob("*.jpg"))[:1024]]
    headers = [read_header(d, 50_000_000) for d in datas]
    batch = 256
    if mode == "kiln":
        decoder = JpegBatchDecoder(torch.device("cuda"), IMAGENET_PREPROCESS, "nvimgcodec")

        def step(s: int) -> None:
            decoder.decode(list(zip(datas[s : s + batch], headers[s : s + batch], strict=True)))
    else:
        nv = import_nvimgcodec()
        decoder = nv.Decoder(max_num_cpu_threads=2)

        def step(s: int) -> None:
            decoder.decode([nv.CodeStream(d) for d in datas[s : s + batch]])

    for s in range(0, len(datas), batch):  # warm-up
        step(s)
    torch.cuda.synchronize()
    stop = threading.Event()
    if busy != "none":
        sys.setswitchinterval(float(busy))

        def spin() -> None:
            x = 0
            while not stop.is_set():
                x += 1

        threading.Thread(target=spin, daemon=True).start()
    Path(f"{go}.ready.{os.getpid()}").touch()
    while not os.path.exists(go):
        time.sleep(0.001)
    images, started = 0, time.perf_counter()
    while time.perf_counter() - started < SECONDS:
        for s in range(0, len(datas), batch):
            step(s)
            images += len(datas[s : s + batch])
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    stop.set()
    print(json.dumps({"images": images, "seconds": seconds}), flush=True)


def together(folder: Path, mode: str, processes: int, busy: str = "none", env: dict | None = None) -> dict:
    go = f"/tmp/scaling-go-{os.getpid()}-{time.monotonic_ns()}"
    full_env = dict(os.environ, SCALING_FOLDER=str(folder), **(env or {}))
    children = [
        subprocess.Popen([sys.executable, __file__, "--child", mode, busy, go], env=full_env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(processes)
    ]  # fmt: skip
    deadline = time.monotonic() + 90  # CUDA start, data read, warm-up
    while len(glob.glob(f"{go}.ready.*")) < processes and time.monotonic() < deadline:
        time.sleep(0.05)
    Path(go).touch()
    rows = []
    for c in children:
        out, err = c.communicate(timeout=120)
        try:
            rows.append(json.loads(out.strip().splitlines()[-1]))
        except Exception:
            rows.append({"error": (out + err)[-800:]})
    for path in [go, *glob.glob(f"{go}.ready.*")]:
        os.unlink(path)
    ok = [r for r in rows if "images" in r]
    per = [r["images"] / r["seconds"] for r in ok]
    return {"images_per_s": round(sum(per)), "per_process": [round(p) for p in per], "errors": len(rows) - len(ok)}


def main() -> None:
    package, small, workdir = resnet18_on_640x480(sys.argv[2:])
    R = Results(sys.argv[1])
    started = time.perf_counter()
    st = R.setdefault("standalone", {})
    for mode in ("frames", "kiln"):
        for n in (1, 2, 4):
            st[f"{mode}_x{n}"] = together(small, mode, n)
            print(mode, n, st[f"{mode}_x{n}"], flush=True)
            R.save()
        for interval in ("0.0005", "0.0001"):
            st[f"{mode}_x1_busy_{interval}"] = together(small, mode, 1, interval)
            st[f"{mode}_x4_busy_{interval}"] = together(small, mode, 4, interval)
            print(mode, "busy", interval, st[f"{mode}_x1_busy_{interval}"], flush=True)
            print(mode, "busy x4", interval, st[f"{mode}_x4_busy_{interval}"], flush=True)
            R.save()
    with mps_daemon() as pipes:
        if pipes is not None:
            for mode in ("frames", "kiln"):
                st[f"{mode}_x4_mps"] = together(small, mode, 4, env=pipes)
                st[f"{mode}_x4_mps_busy_0.0005"] = together(small, mode, 4, "0.0005", env=pipes)
                print(mode, "mps", st[f"{mode}_x4_mps"], st[f"{mode}_x4_mps_busy_0.0005"], flush=True)
                R.save()
    R["standalone_s"] = round(time.perf_counter() - started, 1)
    R.save()

    import gpu_host_budget as hb
    from gpu_processes_and_agreement import switch_interval_hook

    from producer.embedded import embedded_redis

    hb.R = R
    with embedded_redis(workdir / "redis-scaling", persist=False) as url:
        hb.variant(url, package, small, workdir, "e2e_default", {}, spy=True)
        hb.variant(url, package, small, workdir, "e2e_switch_0.1ms", switch_interval_hook(0.0001))
        with mps_daemon() as pipes:
            if pipes is not None:
                hb.variant(url, package, small, workdir, "e2e_mps", pipes)
                hb.variant(url, package, small, workdir, "e2e_mps_6", {**pipes, "KILN_PROCESSES_PER_GPU": "6"})
    R["total_s"] = round(time.perf_counter() - started, 1)
    R.save()


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        child(*sys.argv[2:5])
    else:
        main()
