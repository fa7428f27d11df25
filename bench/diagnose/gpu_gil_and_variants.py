"""Second diagnosis run: GIL dependence of the GPU decoders, pipeline variants, e2e variants."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from common import ROOT, Results

from bench.gpu import LARGE, SMALL, bench_e2e, build_packages, dataset, install_wheels, mixed_dataset

R = Results(sys.argv[1])


def main() -> None:
    install_wheels([Path(p) for p in sys.argv[2:]])
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    from worker.cxx_runtime import ensure_cxx_runtime

    pkg = build_packages(("resnet18",))["resnet18"]["path"]
    ensure_cxx_runtime(pkg)
    small = dataset("jpeg", 8192, SMALL)
    large = dataset("jpeg", 384, LARGE)
    mixed = mixed_dataset(small, large, 2048)
    files = sorted(small.rglob("*.jpg"))
    datas = [f.read_bytes() for f in files[:1024]]
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    decode_jpeg(tensors[:8], mode=ImageReadMode.RGB, device="cuda")
    stop = threading.Event()

    def py_loop():
        while not stop.is_set():
            sum(range(100))

    decoders = {"tv": lambda part: decode_jpeg([tensors[i] for i in part], mode=ImageReadMode.RGB, device="cuda")}
    try:
        from nvidia import nvimgcodec

        nv = nvimgcodec.Decoder(backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.HW_GPU_ONLY)])
        decoders["nv_hw"] = lambda part: nv.decode([datas[i] for i in part])
    except Exception as e:
        R["nv_error"] = repr(e)[:300]
    gil = {}
    for name, fn in decoders.items():
        for batch in (16, 256):
            for interval in (None, 0.005, 0.0005, 0.00005):
                th = None
                if interval is not None:
                    sys.setswitchinterval(interval)
                    stop.clear()
                    th = threading.Thread(target=py_loop, daemon=True)
                    th.start()
                n = 1024 if interval is None or interval < 0.001 else 256
                torch.cuda.synchronize()
                t = time.perf_counter()
                for s in range(0, n, batch):
                    fn(list(range(s, min(n, s + batch))))
                torch.cuda.synchronize()
                gil[f"{name} b{batch} {'alone' if interval is None else f'+py {interval * 1e3:g}ms'}"] = n / (
                    time.perf_counter() - t
                )
                if th:
                    stop.set()
                    th.join()
        print(gil, flush=True)
    sys.setswitchinterval(0.005)
    R["gil"] = gil
    R.save()

    import worker.pipeline as wp
    from worker.fetch import FetchPolicy
    from worker.pipeline import Pipeline, PipelineConfig, Work
    from worker.plan import plan_data_path
    from worker.runtime import load_runtime
    from worker.settings import WorkerSettings

    runtime = load_runtime(pkg, "cuda")
    settings = WorkerSettings(_env_file=None)
    plan = plan_data_path(settings, runtime.device, runtime.batch_max, 1)
    works = [Work("p", str(f), ref=str(f)) for f in files]
    pipe = {"plan": plan.describe()}
    variants = {
        "default": {},
        "procs_6": {"procs": 6},
        "procs_4": {"procs": 4},
        "switch_0.1ms": {"switch": 0.0001},
        "switch_0.05ms": {"switch": 0.00005},
        "fetch_threads_1": {"fetch": 1},
        "linger_10ms": {"linger": 0.010},
        "procs_6_switch_0.1ms": {"procs": 6, "switch": 0.0001},
        "procs_6_switch_0.1ms_linger_10ms": {"procs": 6, "switch": 0.0001, "linger": 0.010},
        "threads_16": {"threads": 16},
    }
    for name, v in variants.items():
        wp.SWITCH_INTERVAL_S = v.get("switch", 0.0005)
        wp.LINGER_S = v.get("linger", 0.003)
        torch.set_num_threads(v.get("threads", plan.torch_threads))
        config = PipelineConfig(
            policy=FetchPolicy.create([str(small)], settings.max_image_bytes, settings.fetch_timeout_s),
            fetch_threads=v.get("fetch", plan.fetch_threads),
            decode_processes=v.get("procs", plan.decode_processes),
            gpu_decode=True,
        )
        pipeline = Pipeline(runtime, config)
        list(pipeline.run(works[:1024], 5))
        best = 0.0
        for _ in range(2):
            t = time.perf_counter()
            n = sum(len(p) for p in pipeline.run(works, 5))
            best = max(best, n / (time.perf_counter() - t))
        pipeline.close()
        pipe[name] = {"images_per_s": best, "stages": {k: vars(s) for k, s in pipeline.stages.items()}}
        print(name, round(best), flush=True)
        R["pipeline"] = pipe
        R.save()
    wp.SWITCH_INTERVAL_S, wp.LINGER_S = 0.0005, 0.003
    del runtime
    torch.cuda.empty_cache()

    workdir = ROOT / "build" / "gpu-bench-work"
    workdir.mkdir(parents=True, exist_ok=True)
    variants_e2e = {"procs_6": {"KILN_DECODE_PROCESSES": "6"}, "threads_16": {"KILN_THREADS": "16"}}
    R["e2e"] = bench_e2e(
        pkg, {"640x480": small, "4000x3000": large, "mixed": mixed}, workdir, variants_e2e, {"640x480": 4}
    )
    R.save()


if __name__ == "__main__":
    main()
