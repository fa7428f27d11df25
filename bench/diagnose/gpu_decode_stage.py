"""Diagnosis of the GPU decode stage on the H200 (one device call): why the pipeline's GPU decode
runs at a third of its ceiling. Writes JSON to argv[1]."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import Results

from bench.gpu import SMALL, build_packages, dataset, install_wheels

R = Results(sys.argv[1])


def rate(fn, n_images: int, rounds: int = 3) -> float:
    import torch

    best = 0.0
    for _ in range(rounds):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = max(best, n_images / (time.perf_counter() - t))
    return best


def main() -> None:
    install_wheels([Path(p) for p in sys.argv[2:]])
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    from worker.cxx_runtime import ensure_cxx_runtime

    packages = build_packages(("resnet18",))
    pkg = packages["resnet18"]["path"]
    ensure_cxx_runtime(pkg)
    small = dataset("jpeg", 8192, SMALL)
    files = sorted(small.rglob("*.jpg"))
    datas = [f.read_bytes() for f in files[:4096]]
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    decode_jpeg(tensors[:8], mode=ImageReadMode.RGB, device="cuda")

    # 1. batch curve, torchvision
    curve = {}
    for b in (16, 32, 64, 128, 256, 512, 1024):

        def run(b=b):
            for s in range(0, len(tensors), b):
                decode_jpeg(tensors[s : s + b], mode=ImageReadMode.RGB, device="cuda")

        curve[b] = rate(run, len(tensors))
    R["tv_batch_curve"] = curve
    print("tv curve", curve, flush=True)
    R.save()

    # 2. contention: model inference in a thread; a Python busy thread; CPU hogs
    from worker.runtime import load_runtime

    runtime = load_runtime(pkg, "cuda")
    x = torch.randint(0, 256, (256, 3, 224, 224), dtype=torch.uint8, device="cuda")
    stop = threading.Event()
    infers = [0]

    def infer_loop():
        torch.cuda.set_device(0)
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            while not stop.is_set():
                runtime.predict_top_k(x, 5)
                infers[0] += 1

    def py_loop():
        while not stop.is_set():
            sum(range(1000))

    def tv256():
        for s in range(0, len(tensors), 256):
            decode_jpeg(tensors[s : s + 256], mode=ImageReadMode.RGB, device="cuda")

    cont = {"alone": rate(tv256, len(tensors))}
    for name, target in (("with_inference", infer_loop), ("with_python_thread", py_loop)):
        stop.clear()
        infers[0] = 0
        th = threading.Thread(target=target, daemon=True)
        th.start()
        time.sleep(0.5)
        t = time.perf_counter()
        cont[name] = rate(tv256, len(tensors))
        cont[name + "_other_per_s"] = infers[0] * 256 / (time.perf_counter() - t + 0.5)
        stop.set()
        th.join()
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(13)]
    time.sleep(0.5)
    cont["with_13_cpu_hogs"] = rate(tv256, len(tensors))
    for h in hogs:
        h.kill()
    R["tv_contention"] = cont
    print("contention", cont, flush=True)
    R.save()

    # 3. kiln decoder curve
    from worker.gpu_decode import JpegBatchDecoder
    from worker.manifest import IMAGENET_PREPROCESS
    from worker.probe import read_header

    headers = [read_header(d, 50_000_000) for d in datas]
    dec = JpegBatchDecoder(torch.device("cuda"), IMAGENET_PREPROCESS)
    kc = {}
    for b in (64, 128, 256, 512):

        def run(b=b):
            for s in range(0, len(datas), b):
                dec.decode(list(zip(datas[s : s + b], headers[s : s + b], strict=True)))

        kc[b] = rate(run, len(datas))
    R["kiln_decoder_curve"] = kc
    print("kiln curve", kc, flush=True)
    R.save()

    # 4. nvImageCodec
    try:
        from nvidia import nvimgcodec

        nv = {}
        for bname, backends in (
            ("default", None),
            ("hw_only", [nvimgcodec.Backend(nvimgcodec.BackendKind.HW_GPU_ONLY)]),
            ("gpu_only", [nvimgcodec.Backend(nvimgcodec.BackendKind.GPU_ONLY)]),
        ):
            try:
                d = nvimgcodec.Decoder(backends=backends) if backends else nvimgcodec.Decoder()
                for b in (64, 256):

                    def run(b=b, d=d):
                        for s in range(0, len(datas), b):
                            d.decode(datas[s : s + b])

                    nv[f"{bname}_{b}"] = rate(run, len(datas))

                def run_t(d=d):
                    for s in range(0, len(datas), 256):
                        out = d.decode(datas[s : s + 256])
                        [torch.as_tensor(o, device="cuda") for o in out]

                nv[f"{bname}_256_to_torch"] = rate(run_t, len(datas))
            except Exception as e:
                nv[bname + "_error"] = f"{type(e).__name__}: {e}"[:300]
        # two threads, own decoders
        try:
            ds = [nvimgcodec.Decoder() for _ in range(2)]

            def two():
                def part(i):
                    for s in range(i * 256, len(datas), 512):
                        ds[i].decode(datas[s : s + 256])

                ts = [threading.Thread(target=part, args=(i,)) for i in range(2)]
                [t.start() for t in ts]
                [t.join() for t in ts]

            nv["default_256_two_threads"] = rate(two, len(datas))
        except Exception as e:
            nv["two_error"] = f"{type(e).__name__}: {e}"[:300]
        R["nvimgcodec"] = nv
        print("nvimgcodec", nv, flush=True)
    except Exception as e:
        R["nvimgcodec_error"] = f"{type(e).__name__}: {e}"[:300]
    R.save()

    # 5. in-process pipeline, instrumented
    import torchvision.io

    import worker.pipeline as wp
    from worker.fetch import FetchPolicy
    from worker.pipeline import Pipeline, PipelineConfig, Work
    from worker.plan import plan_data_path
    from worker.settings import WorkerSettings

    calls: list = []
    orig_dj = torchvision.io.decode_jpeg

    def timed_dj(inp, *a, **k):
        t = time.perf_counter()
        out = orig_dj(inp, *a, **k)
        calls.append(("dj", len(inp) if isinstance(inp, list) else 1, time.perf_counter() - t))
        return out

    torchvision.io.decode_jpeg = timed_dj
    orig_decode = JpegBatchDecoder.decode

    def timed_decode(self, items):
        t = time.perf_counter()
        out = orig_decode(self, items)
        calls.append(("decode", len(items), time.perf_counter() - t))
        return out

    JpegBatchDecoder.decode = timed_decode
    orig_predict = runtime.predict_top_k

    def timed_predict(batch, k):
        t = time.perf_counter()
        out = orig_predict(batch, k)
        calls.append(("predict", batch.shape[0], time.perf_counter() - t))
        return out

    runtime.predict_top_k = timed_predict
    settings = WorkerSettings(_env_file=None)
    plan = plan_data_path(settings, runtime.device, runtime.batch_max, 1)
    torch.set_num_threads(plan.torch_threads)
    works = [Work("p", str(f), ref=str(f)) for f in files]
    pipe_r = {"plan": plan.describe()}
    variants = {
        "default": {},
        "linger_10ms": {"LINGER_S": 0.010},
        "procs_6": {"procs": 6},
        "torch_threads_1": {"torch_threads": 1},
    }
    for name, v in variants.items():
        wp.LINGER_S = v.get("LINGER_S", 0.003)
        torch.set_num_threads(v.get("torch_threads", plan.torch_threads))
        config = PipelineConfig(
            policy=FetchPolicy.create([str(small)], settings.max_image_bytes, settings.fetch_timeout_s),
            fetch_threads=plan.fetch_threads,
            decode_processes=v.get("procs", plan.decode_processes),
            gpu_decode=True,
        )
        pipeline = Pipeline(runtime, config)
        list(pipeline.run(works[:1024], 5))
        calls.clear()
        dumps: list[str] = []
        spy = None
        if name == "default":

            def dumper(dumps: list[str] = dumps) -> None:
                for _ in range(4):
                    time.sleep(0.4)
                    p = subprocess.run(
                        ["py-spy", "dump", "--native", "--pid", str(os.getpid())],
                        capture_output=True,
                        text=True,
                        timeout=20,
                    )
                    dumps.append(p.stdout[-20000:] + p.stderr[-2000:])

            spy = threading.Thread(target=dumper)
            spy.start()
        t = time.perf_counter()
        n = sum(len(p) for p in pipeline.run(works, 5))
        secs = time.perf_counter() - t
        if spy:
            spy.join()
        pipeline.close()
        summary = {}
        for kind in ("dj", "decode", "predict"):
            cs = [c for c in calls if c[0] == kind]
            if cs:
                summary[kind] = {
                    "calls": len(cs),
                    "mean_n": sum(c[1] for c in cs) / len(cs),
                    "total_s": sum(c[2] for c in cs),
                    "mean_ms": 1e3 * sum(c[2] for c in cs) / len(cs),
                    "per_image_us": 1e6 * sum(c[2] for c in cs) / sum(c[1] for c in cs),
                }
        pipe_r[name] = {
            "images_per_s": n / secs,
            "seconds": secs,
            "calls": summary,
            "stages": {k: vars(s) for k, s in pipeline.stages.items()},
        }
        print(name, pipe_r[name], flush=True)
        if dumps:
            (R.path.parent / "native-dumps.txt").write_text("\n=====\n".join(dumps))
        R["pipeline"] = pipe_r
        R.save()


if __name__ == "__main__":
    main()
