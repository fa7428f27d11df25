"""Twentieth-session diagnosis on the H200: where the GPU's time goes, per image, in kiln's GPU path.

bench/gpu.py's end-to-end run on 640x480 JPEGs (4 worker processes) kept the GPU's SMs busy 71-97%
of each second (`nvidia-smi dmon`, bench/results/gpu-h200-dmon.txt) and its JPEG engines 34-56%,
and 5 or 6 worker processes ran no faster than 4: the GPU, not each process's GIL, now bounds
640x480. This profiles (torch.profiler, CUDA kernels included) one process running
`JpegBatchDecoder.decode` and the ResNet-18 package on batches of 256, with each GPU decoder, and
writes the kernels' GPU time per image, largest first.

    python3 bench/diagnose/gpu_kernel_time.py $OUT/kernel-time.json .whl
"""

from __future__ import annotations

import sys

from common import Results, resnet18_on_640x480

R = Results(sys.argv[1])
BATCH = 256


def main() -> None:
    package, small, _ = resnet18_on_640x480(sys.argv[2:])
    import torch
    from torch.profiler import ProfilerActivity, profile

    from worker.gpu_decode import JpegBatchDecoder
    from worker.manifest import IMAGENET_PREPROCESS
    from worker.probe import read_header
    from worker.runtime import load_runtime

    runtime = load_runtime(package, "cuda")
    datas = [f.read_bytes() for f in sorted(small.rglob("*.jpg"))[:2048]]
    items = [(d, read_header(d, 50_000_000)) for d in datas]
    for library in ("nvimgcodec", "torchvision"):
        decoder = JpegBatchDecoder(torch.device("cuda"), IMAGENET_PREPROCESS, library)

        def one_pass() -> None:
            for s in range(0, len(items), BATCH):
                runtime.predict_top_k(decoder.decode(items[s : s + BATCH]).images, 5)  # noqa: B023
            torch.cuda.synchronize()

        one_pass()  # warm-up
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            one_pass()
        kernels = [e for e in prof.key_averages() if e.self_device_time_total > 0]
        kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
        total = sum(e.self_device_time_total for e in kernels)
        R[library] = {
            "images": len(items),
            "gpu_us_per_image": round(total / len(items), 2),
            "kernels_us_per_image": {
                e.key[:120]: round(e.self_device_time_total / len(items), 2) for e in kernels[:30]
            },
        }
        R.save()
        print(library, R[library]["gpu_us_per_image"], "us/image of GPU time", flush=True)
        for name, us in list(R[library]["kernels_us_per_image"].items())[:12]:
            print(f"  {us:8.2f}  {name}", flush=True)


if __name__ == "__main__":
    main()
