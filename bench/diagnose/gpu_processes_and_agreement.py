"""Sixth-session diagnosis on the H200: (1) how many worker processes per GPU, with how many CPU
decode processes each and which GIL switch interval, label 640x480 JPEGs fastest end to end;
(2) where the GPU path's top-1 disagreements with the CPU path come from: the pixels, or the bf16
model's answers changing with the batch an image is run in.

    python3 bench/diagnose/gpu_processes_and_agreement.py $OUT/diag.json .whl
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from pathlib import Path

from common import ROOT, Results, resnet18_on_640x480

from bench.gpu import SMALL, _worker, e2e_rate, plan_line, warm

R = Results(sys.argv[1])
SITE = ROOT / "build" / "diag-site"


def switch_interval_hook(seconds: float) -> dict[str, str]:
    """Environment that makes a worker use `seconds` as its GIL switch interval, whatever the
    pipeline sets (a sitecustomize that pins sys.setswitchinterval)."""
    SITE.mkdir(parents=True, exist_ok=True)
    (SITE / "sitecustomize.py").write_text(
        "import os, sys\n"
        "_v = os.environ.get('DIAG_SWITCH_S')\n"
        "if _v:\n"
        "    _set = sys.setswitchinterval\n"
        "    sys.setswitchinterval = lambda _s: _set(float(_v))\n"
    )
    return {"DIAG_SWITCH_S": str(seconds), "PYTHONPATH": os.pathsep.join([str(SITE), os.environ["PYTHONPATH"]])}


def processes_matrix(package: str, folder: Path, workdir: Path) -> None:
    from producer.embedded import embedded_redis

    variants = {
        # name: (worker processes on GPU 0, decode processes each (None: the plan's), switch interval)
        "p1_default": (1, None, None),
        "p1_switch_0.1ms": (1, None, 0.0001),
        "p2_d6": (2, 6, None),
        "p3_d4": (3, 4, None),
        "p3_d4_switch_0.1ms": (3, 4, 0.0001),
        "p4_d3": (4, 3, None),
        "p4_d3_switch_0.1ms": (4, 3, 0.0001),
        "p4_d2": (4, 2, None),
        "p6_d2": (6, 2, None),
    }
    rows = R.setdefault("processes", {})
    with embedded_redis(workdir / "redis-matrix", persist=False) as url:
        for name, (processes, decode, switch) in variants.items():
            env: dict[str, str] = {}
            if decode is not None:
                env["KILN_DECODE_PROCESSES"] = str(decode)
            if switch is not None:
                env.update(switch_interval_hook(switch))
            logs = [workdir / f"diag-{name}-{i}.log" for i in range(processes)]
            workers = [_worker(package, url, [folder], log, env) for log in logs]
            try:
                started = time.perf_counter()
                warm(url, folder, workers)
                row = e2e_rate(url, folder, workers, repeat=4)
                row.update(ready_s=time.perf_counter() - started, plan=plan_line(logs[0]))
            except Exception as e:
                row = {"error": repr(e)[-2000:]}
            finally:
                for worker in workers:
                    worker.stop()
            rows[name] = row
            R.save()
            print(f"{name}: {row.get('images_per_s', 0):,.0f} img/s {row.get('plan', row.get('error'))}", flush=True)


def agreement(package: str, folder: Path) -> None:
    """Top-1 of the same model on CPU-path and GPU-path inputs, run in the same batches; and of the
    CPU-path inputs run in other batches (the model's own batch-to-batch noise)."""
    import numpy as np
    import torch

    from bench.pipeline import make_dataset
    from worker.gpu_decode import JpegBatchDecoder
    from worker.preprocess import decode_image
    from worker.probe import read_header
    from worker.runtime import load_runtime

    runtime = load_runtime(package, "cuda")
    prep = runtime.manifest.preprocess
    files = make_dataset(ROOT / "build" / "diag-agree", 1000, SMALL, seed=7) + sorted((ROOT / "samples").glob("*.jpg"))
    datas = [Path(f).read_bytes() for f in files]
    cpu = torch.from_numpy(np.stack([decode_image(d, prep) for d in datas])).permute(0, 3, 1, 2).contiguous()
    decoder = JpegBatchDecoder(runtime.device, prep)
    gpu = torch.empty_like(cpu)
    for start in range(0, len(datas), 128):
        part = datas[start : start + 128]
        result = decoder.decode([(d, read_header(d, 50_000_000)) for d in part])
        assert not result.refused
        gpu[[start + i for i in result.decoded]] = result.images.cpu()

    def top(inputs: torch.Tensor, batch: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
        labels, margins = np.zeros(len(inputs), int), np.zeros(len(inputs))
        bounds = [0, *range(offset or batch, len(inputs), batch), len(inputs)]
        for lo, hi in itertools.pairwise(bounds):
            if hi - lo < 2:  # the package's smallest batch is 2
                lo = hi - 2
            scores, indices = runtime.predict_top_k(inputs[lo:hi].to(runtime.device), 2)
            labels[lo:hi], margins[lo:hi] = indices[:, 0].cpu().numpy(), (scores[:, 0] - scores[:, 1]).cpu().numpy()
        return labels, margins

    cpu64, margin = top(cpu, 64)
    gpu64, _ = top(gpu, 64)
    cpu50, _ = top(cpu, 50, 17)
    cpu256, _ = top(cpu, 256)
    gpu256, _ = top(gpu, 256)
    diff = (gpu.int() - cpu.int()).abs()
    flips = np.flatnonzero(cpu64 != gpu64)
    R["agreement"] = {
        "images": len(files),
        "gpu_vs_cpu_same_batches_64": float((cpu64 == gpu64).mean()),
        "gpu_vs_cpu_same_batches_256": float((cpu256 == gpu256).mean()),
        "cpu_batches_64_vs_50_offset_17": float((cpu64 == cpu50).mean()),
        "cpu_batches_64_vs_256": float((cpu64 == cpu256).mean()),
        "gpu64_vs_cpu256": float((gpu64 == cpu256).mean()),
        "median_top1_margin": float(np.median(margin)),
        "margins_of_flipped": [float(margin[i]) for i in flips][:40],
        "mean_abs_pixel_diff_of_flipped": [float(diff[i].float().mean()) for i in flips][:40],
        "max_abs_pixel_diff_of_flipped": [int(diff[i].max()) for i in flips][:40],
        "share_of_margins_below_0.05": float((margin < 0.05).mean()),
    }
    R.save()
    print(R["agreement"], flush=True)


def main() -> None:
    package, small, workdir = resnet18_on_640x480(sys.argv[2:])
    R["host"] = {"cores": len(os.sched_getaffinity(0))}
    for step in (lambda: agreement(package, small), lambda: processes_matrix(package, small, workdir)):
        try:
            step()
        except Exception as e:
            R.setdefault("errors", []).append(repr(e)[-2000:])
            R.save()
            print("error:", e, flush=True)


if __name__ == "__main__":
    main()
