"""Eighteenth-session check on the H200 of `worker.resample`'s float16 split products against the
float32 products it replaced: the pixels (GPU against the same arithmetic on the CPU, and against
the old float32 GEMMs), the resample's own rate at batch 256, and kiln's GPU decoder in 1 and 4
processes at once (as `gpu_decode_scaling.py` measured it before the change).

    python3 bench/diagnose/gpu_resample_split.py $OUT/split.json .whl
"""

from __future__ import annotations

import sys
import time

from common import Results, resnet18_on_640x480
from gpu_decode_scaling import together


def float32_resample(images, plan):
    """The resample as it was before the split (commit f45bf37): float32 GEMMs, TF32 off."""
    import torch

    rows, cols = plan.wy.shape[1], plan.wx.shape[1]
    region = images[:, :, plan.top : plan.top + rows, plan.left : plan.left + cols].float()
    horizontal = torch.matmul(region, plan.wx.T).add_(0.5).floor_().clamp_(0, 255)
    return torch.matmul(plan.wy, horizontal).add_(0.5).floor_().clamp_(0, 255).to(torch.uint8)


def main() -> None:
    _, small, _ = resnet18_on_640x480(sys.argv[2:])
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    from worker.manifest import IMAGENET_PREPROCESS
    from worker.resample import crop_plan, resample

    R = Results(sys.argv[1])
    files = sorted(small.rglob("*.jpg"))[:256]
    frames = torch.stack(decode_jpeg([torch.frombuffer(f.read_bytes(), dtype=torch.uint8) for f in files],
                                     mode=ImageReadMode.RGB, device="cuda"))  # fmt: skip
    plan = crop_plan(frames.shape[2], frames.shape[3], IMAGENET_PREPROCESS)
    on_gpu = plan.to(torch.device("cuda"))
    split_gpu = resample(frames, on_gpu)
    split_cpu = resample(frames.cpu(), plan)
    old_gpu = float32_resample(frames, on_gpu)

    def diff(a, b) -> dict:
        d = (a.int().cpu() - b.int().cpu()).abs()
        return {"max": d.max().item(), "share_differing": round((d > 0).float().mean().item(), 6)}

    R["pixels"] = {
        "split_gpu_vs_split_cpu": diff(split_gpu, split_cpu),
        "split_vs_float32_gpu": diff(split_gpu, old_gpu),
    }
    print(R["pixels"], flush=True)

    def rate(fn) -> float:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        return round(20 * len(files) / (time.perf_counter() - started))

    R["resample_images_per_s"] = {"split": rate(lambda: resample(frames, on_gpu)),
                                  "float32": rate(lambda: float32_resample(frames, on_gpu))}  # fmt: skip
    print(R["resample_images_per_s"], flush=True)
    R.save()
    for n in (1, 4):
        R[f"kiln_x{n}"] = together(small, "kiln", n)
        print(n, R[f"kiln_x{n}"], flush=True)
        R.save()


if __name__ == "__main__":
    main()
