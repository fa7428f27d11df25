"""Seventh-session diagnosis on the H200: why the GPU path's top-1 agrees with the CPU path's on
97.3% of the agreement test's 1,000 JPEGs, not 99%. Splits the pixel difference into the decoder's
(nvJPEG against Pillow, full size) and the resize's (the GPU resample of Pillow's own pixels
against Pillow's resize), and splits the top-1 difference into the decoders' and the model's
precision: the same comparison with EfficientNet-Lite0 in float32 and in bfloat16, next to how
often bf16 and fp32 disagree with each other on the very same inputs.

    python3 bench/diagnose/gpu_agreement_by_dtype.py $OUT/agree.json .whl
"""

from __future__ import annotations

import sys
from pathlib import Path

from common import ROOT, Results

R = Results(sys.argv[1])


def main() -> None:
    from bench.gpu import install_wheels

    install_wheels([Path(p) for p in sys.argv[2:]])
    import numpy as np
    import torch
    from PIL import Image
    from torchvision.io import decode_jpeg

    from bench.pipeline import make_dataset
    from compile.__main__ import main as compile_main
    from worker.gpu_decode import JpegBatchDecoder
    from worker.preprocess import decode_image
    from worker.probe import DEFAULT_MAX_PIXELS, read_header
    from worker.resample import crop_plan, resample
    from worker.runtime import load_runtime

    work = ROOT / "build" / "agreement"
    files = make_dataset(work / "photos", 1000, (640, 480), seed=7)  # the agreement test's images
    datas = [f.read_bytes() for f in files]
    runtimes = {}
    for dtype in ("float32", "bfloat16"):
        path = work / f"lite0-cuda-{dtype}.pt2"
        if not path.exists():
            args = ["build", "efficientnet_lite0", "--device", "cuda", "--dtype", dtype, "--channels-last"]
            assert compile_main([*args, "--max-batch", "100", "-o", str(path)]) == 0
        runtimes[dtype] = load_runtime(path, "cuda")
    prep = runtimes["float32"].manifest.preprocess

    # Pixels: the whole path, then the decoder alone (full size), then the resize alone.
    cpu = torch.from_numpy(np.stack([decode_image(d, prep) for d in datas])).permute(0, 3, 1, 2)
    gpu = torch.empty_like(cpu)
    decoder = JpegBatchDecoder(torch.device("cuda"), prep)
    for start in range(0, len(datas), 100):
        result = decoder.decode([(d, read_header(d, DEFAULT_MAX_PIXELS)) for d in datas[start : start + 100]])
        gpu[[start + i for i in result.decoded]] = result.images.cpu()
    full_gpu = decode_jpeg([torch.frombuffer(d, dtype=torch.uint8) for d in datas[:100]], device="cuda")
    full_cpu = [torch.from_numpy(np.asarray(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files[:100]]
    pairs = zip(full_gpu, full_cpu, strict=True)
    decoder_diff = torch.cat([(g.cpu().int() - c.int()).abs().flatten() for g, c in pairs])
    plan = crop_plan(480, 640, prep)
    resized = resample(torch.stack(full_cpu).cuda(), plan).cpu()
    resize_diff = (resized.int() - cpu[:100].int()).abs()

    def stats(diff: torch.Tensor) -> dict:
        diff = diff.float().flatten()
        return {"mean": round(float(diff.mean()), 4), "max": int(diff.max()),
                "share_over_2": round(float((diff > 2).float().mean()), 5)}  # fmt: skip

    R["pixels"] = {
        "path_gpu_vs_cpu": stats((gpu.int() - cpu.int()).abs()),
        "decoder_full_size_nvjpeg_vs_pillow": stats(decoder_diff),
        "resize_gpu_resample_vs_pillow_on_pillow_pixels": stats(resize_diff),
    }
    R.save()
    print(R["pixels"], flush=True)

    def top1(dtype: str, inputs: torch.Tensor, batch: int = 100) -> torch.Tensor:
        runtime = runtimes[dtype]
        return torch.cat([runtime.predict_top_k(inputs[i : i + batch].cuda(), 1)[1][:, 0].cpu()
                          for i in range(0, len(inputs), batch)])  # fmt: skip

    answers = {(dtype, name): top1(dtype, x) for dtype in runtimes for name, x in (("cpu", cpu), ("gpu", gpu))}
    answers[("bfloat16", "cpu_batch_50")] = top1("bfloat16", cpu, 50)
    answers[("float32", "cpu_batch_50")] = top1("float32", cpu, 50)

    def agree(a, b) -> int:
        return int((answers[a] == answers[b]).sum())

    R["top1_agreement_of_1000"] = {
        "float32: gpu path vs cpu path": agree(("float32", "gpu"), ("float32", "cpu")),
        "bfloat16: gpu path vs cpu path": agree(("bfloat16", "gpu"), ("bfloat16", "cpu")),
        "cpu path: bfloat16 vs float32": agree(("bfloat16", "cpu"), ("float32", "cpu")),
        "gpu path: bfloat16 vs float32": agree(("bfloat16", "gpu"), ("float32", "gpu")),
        "bfloat16, cpu path: batch 100 vs 50": agree(("bfloat16", "cpu"), ("bfloat16", "cpu_batch_50")),
        "float32, cpu path: batch 100 vs 50": agree(("float32", "cpu"), ("float32", "cpu_batch_50")),
    }
    R.save()
    print(R["top1_agreement_of_1000"], flush=True)


if __name__ == "__main__":
    main()
