"""Eighth-session diagnosis on the H200: what interpolating nvJPEG's chroma costs kiln's GPU
decoder on 640x480 JPEGs (decode + chroma + resize + crop, batches of 256, images/s), and how
close each variant's model inputs come to the CPU path's (1,000 of the same JPEGs):

- none: chroma as nvJPEG gives it (replicated);
- region: the first in-resize form (commit 1856190): the change added to every pixel of the
  region the crop reads, clamped, then the resize;
- horizontal: `worker.chroma.horizontal_change`, the change taken through the resize's
  horizontal pass at the samples' resolution, in bfloat16 (the code at that commit).

    python3 bench/diagnose/gpu_chroma_cost.py $OUT/chroma-cost.json .whl

It ran at commit f1bd869, whose `worker/chroma.py` had the horizontal form (and the helpers
`_samples` and `_phase_changes` this script imports). The answer (best of two rounds): none 16.9k
img/s, region 14.4k, horizontal 15.5k and 13.0k; largest difference from the CPU path 12, 5 and
8 levels. The horizontal form was no faster and less exact, so the region form is the one kept:
run this script at that commit to repeat it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from common import Results

R = Results(sys.argv[1])


def region_resample(images, plan, chroma=(1, 1)):
    """The resize as commit 1856190 had it: the chroma change added at full size over the region."""
    import torch

    from worker.chroma import _phase_changes, _samples

    rows, cols = plan.wy.shape[1], plan.wx.shape[1]
    if chroma == (1, 1):
        region = images[:, :, plan.top : plan.top + rows, plan.left : plan.left + cols].float()
    else:
        across, down = chroma
        height, width = images.shape[-2:]
        top, left = max(0, (plan.top // down - 1) * down), max(0, (plan.left // across - 1) * across)
        bottom = min(height, (-(-(plan.top + rows) // down) + 1) * down)
        right = min(width, (-(-(plan.left + cols) // across) + 1) * across)
        window = images[:, :, top:bottom, left:right].float()
        phases = _phase_changes(_samples(window, across, down), across, down)
        n, _, _, _, h, w = phases.shape
        change = phases.permute(0, 1, 4, 2, 5, 3).reshape(n, 3, h * down, w * across)
        window += change[..., : bottom - top, : right - left]
        region = window[:, :, plan.top - top : plan.top - top + rows, plan.left - left : plan.left - left + cols]
        region = region.clamp_(0, 255)
    horizontal = torch.matmul(region, plan.wx.T).add_(0.5).floor_().clamp_(0, 255)
    return torch.matmul(plan.wy, horizontal).add_(0.5).floor_().clamp_(0, 255).to(torch.uint8)


def main() -> None:
    from bench.gpu import SMALL, dataset, install_wheels

    install_wheels([Path(p) for p in sys.argv[2:]])
    import numpy as np
    import torch

    import worker.gpu_decode as gpu_decode
    from worker.gpu_decode import JpegBatchDecoder
    from worker.manifest import IMAGENET_PREPROCESS
    from worker.preprocess import decode_image
    from worker.probe import read_header

    files = sorted(dataset("jpeg", 2048, SMALL).rglob("*.jpg"))
    datas = [f.read_bytes() for f in files]
    items = [(d, read_header(d, 50_000_000)) for d in datas]
    cpu = torch.from_numpy(np.stack([decode_image(d, IMAGENET_PREPROCESS) for d in datas[:1000]])).permute(0, 3, 1, 2)
    committed = gpu_decode.resample
    for name in ("none", "region", "horizontal", "none", "region", "horizontal"):
        decoder = JpegBatchDecoder(torch.device("cuda"), IMAGENET_PREPROCESS)
        decoder.replicates_chroma = name != "none"
        gpu_decode.resample = region_resample if name == "region" else committed
        decoder.decode(items[:256])
        best = 0.0
        for _ in range(3):
            torch.cuda.synchronize()
            started = time.perf_counter()
            for s in range(0, len(items), 256):
                decoder.decode(items[s : s + 256])
            torch.cuda.synchronize()
            best = max(best, len(items) / (time.perf_counter() - started))
        gpu = torch.empty_like(cpu)
        for s in range(0, 1000, 200):
            result = decoder.decode(items[s : s + 200])
            gpu[[s + i for i in result.decoded]] = result.images.cpu()
        diff = (gpu.int() - cpu.int()).abs().float()
        row = {"images_per_s": best, "max": int(diff.max()), "mean": round(float(diff.mean()), 4),
               "over_2": round(float((diff > 2).float().mean()), 6)}  # fmt: skip
        R.setdefault(name, []).append(row)
        print(name, row, flush=True)
        R.save()
    gpu_decode.resample = committed


if __name__ == "__main__":
    main()
