"""Eighth-session diagnosis on the H200: what bounds kiln on 4000x3000 JPEGs (0.75x the better
decode ceiling in the last run, target 1.2x), and whether nvJPEG's chroma upsampling is what keeps
the two paths' top-1 agreement under 99%.

1. decoder: one process, in-memory bytes: torchvision's `decode_jpeg` alone in batches of 10, 40
   and 256; kiln's GPU decoder with decode parts of 32, 128 and 512 Mpx (`MAX_DECODED_PIXELS`).
2. together: N processes running kiln's GPU decoder and M running Pillow with `draft`, all at once
   for a fixed time: what the GPU and the CPU decoders give side by side (aggregate images/s).
3. e2e: kiln end to end through Redis on 6,144 4000x3000 JPEGs (the benchmark's 1,536, four
   times), default settings (routing decided per image in the decode processes), with the host's
   CPU use and the share of images decoded on the CPU (decode time over 12 ms: Pillow's).
4. chroma: are nvJPEG's chroma samples constant over 2x2 blocks (upsampled by replication, where
   libjpeg interpolates, "fancy upsampling")? Pixels and ResNet-18 bf16 top-1 of the CPU path,
   the GPU path, and the GPU path with libjpeg's interpolation redone on nvJPEG's output.

    python3 bench/diagnose/gpu_camera_photos.py $OUT/camera.json .whl
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, Results

if sys.argv[1] == "--child":  # section 2's processes: python3 THIS --child gpu|cpu START SECONDS OUT FOLDER
    kind, start, seconds, out, folder = sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), sys.argv[5], sys.argv[6]
    from worker.manifest import IMAGENET_PREPROCESS
    from worker.probe import read_header

    datas = [f.read_bytes() for f in sorted(Path(folder).rglob("*.jpg"))[:256]]
    if kind == "gpu":
        import torch

        from worker.gpu_decode import JpegBatchDecoder

        decoder = JpegBatchDecoder(torch.device("cuda"), IMAGENET_PREPROCESS)
        items = [(d, read_header(d, 50_000_000)) for d in datas]
        decoder.decode(items[:16])
        torch.cuda.synchronize()

        def step() -> int:
            decoder.decode(items[:64])
            torch.cuda.synchronize()
            return 64
    else:
        from worker.preprocess import decode_image

        position = [0]

        def step() -> int:
            decode_image(datas[position[0] % len(datas)], IMAGENET_PREPROCESS)
            position[0] += 1
            return 1

    time.sleep(max(0.0, start - time.time()))
    done, began = 0, time.perf_counter()
    while time.time() < start + seconds:
        done += step()
    Path(out).write_text(f"{done} {time.perf_counter() - began}")
    sys.exit(0)

R = Results(sys.argv[1])


def cpu_busy() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields) - fields[3] - fields[4], sum(fields)


def section_decoder(large: Path) -> dict:
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    import worker.gpu_decode as gpu_decode
    from worker.gpu_decode import JpegBatchDecoder
    from worker.manifest import IMAGENET_PREPROCESS
    from worker.probe import read_header

    datas = [f.read_bytes() for f in sorted(large.rglob("*.jpg"))[:384]]
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    items = [(d, read_header(d, 50_000_000)) for d in datas]

    def rate(step, batch: int) -> float:
        best = 0.0
        for _ in range(2):
            torch.cuda.synchronize()
            started = time.perf_counter()
            for s in range(0, len(datas) - batch + 1, batch):
                step(s, batch)
            torch.cuda.synchronize()
            best = max(best, (len(datas) // batch * batch) / (time.perf_counter() - started))
        return best

    out = {}
    for batch in (10, 40, 128):
        out[f"torchvision_batch_{batch}"] = rate(
            lambda s, b: decode_jpeg(tensors[s : s + b], mode=ImageReadMode.RGB, device="cuda"), batch
        )
        print(out, flush=True)
    decoder = JpegBatchDecoder(torch.device("cuda"), IMAGENET_PREPROCESS)
    for mpx in (32, 128, 512):
        gpu_decode.MAX_DECODED_PIXELS = mpx * 2**20
        out[f"kiln_parts_{mpx}mpx_batch_128"] = rate(lambda s, b: decoder.decode(items[s : s + b]), 128)
        print(out, flush=True)
    gpu_decode.MAX_DECODED_PIXELS = 128 * 2**20
    return out


def section_together(large: Path) -> dict:
    out = {}
    for gpu, cpu in ((1, 0), (4, 0), (0, 12), (0, 16), (4, 12), (2, 14)):
        start, seconds = time.time() + 15, 8.0
        files = [Path(f"/tmp/together-{i}") for i in range(gpu + cpu)]
        children = [
            subprocess.Popen([sys.executable, __file__, "--child", "gpu" if i < gpu else "cpu", str(start),
                              str(seconds), str(files[i]), str(large)])
            for i in range(gpu + cpu)
        ]  # fmt: skip
        time.sleep(max(0.0, start - time.time()))
        busy0, total0 = cpu_busy()
        for child in children:
            child.wait(120)
        busy1, total1 = cpu_busy()
        counts = [tuple(map(float, f.read_text().split())) for f in files]
        row = {
            "gpu_images_per_s": sum(n / s for n, s in counts[:gpu]),
            "cpu_images_per_s": sum(n / s for n, s in counts[gpu:]),
            "host_cpu_busy": (busy1 - busy0) / max(1, total1 - total0),
        }
        out[f"{gpu}_gpu_{cpu}_cpu"] = row
        print("together", gpu, cpu, row, flush=True)
        R["together"] = out
        R.save()
    return out


def section_e2e(package: str, small: Path, large: Path, workdir: Path) -> dict:
    from bench.gpu import _worker, e2e_rate, plan_line, warm
    from producer.embedded import embedded_redis

    out = {}
    variants = {
        "default": {},
        "3_per_gpu": {"KILN_PROCESSES_PER_GPU": "3"},
        "2_per_gpu": {"KILN_PROCESSES_PER_GPU": "2"},
    }
    with embedded_redis(workdir / "redis-camera", persist=False) as url:
        for name, env in variants.items():
            log = workdir / f"worker-camera-{name}.log"
            worker = _worker(package, url, [small, large], log, env)
            try:
                warm(url, small, [worker])
                busy0, total0 = cpu_busy()
                row = e2e_rate(url, large, [worker], repeat=4)
                busy1, total1 = cpu_busy()
                row.update(env=env, plan=plan_line(log), host_cpu_busy=(busy1 - busy0) / max(1, total1 - total0))
            finally:
                worker.stop()
            out[name] = row
            print("e2e", name, row, flush=True)
            R["e2e"] = out
            R.save()
    return out


def fancy_chroma(frames: torch.Tensor) -> torch.Tensor:
    """N x 3 x H x W uint8 RGB from a decoder that replicated 4:2:0 chroma: back to YCbCr (JFIF),
    chroma averaged over its 2x2 blocks (the decoded samples), upsampled as libjpeg's h2v2 fancy
    upsampling (3/4, 1/4 triangle = bilinear at scale 2, half-pixel centres), back to RGB."""
    import torch
    import torch.nn.functional as F

    x = frames.float()
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b
    h, w = frames.shape[2:]
    chroma = F.avg_pool2d(torch.stack([cb, cr], 1), 2, ceil_mode=True)
    chroma = F.interpolate(chroma, scale_factor=2, mode="bilinear", align_corners=False)[..., :h, :w]
    cb, cr = chroma[:, 0], chroma[:, 1]
    rgb = torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], 1)
    return rgb.round_().clamp_(0, 255).to(torch.uint8)


def section_chroma(package: str, work: Path) -> dict:
    import numpy as np
    import torch
    import torchvision.io
    from PIL import Image

    from bench.pipeline import make_dataset
    from worker.gpu_decode import JpegBatchDecoder
    from worker.preprocess import decode_image
    from worker.probe import DEFAULT_MAX_PIXELS, read_header
    from worker.runtime import load_runtime

    files = make_dataset(work / "agreement-photos", 1000, (640, 480), seed=7)
    datas = [f.read_bytes() for f in files]
    runtime = load_runtime(package, "cuda")
    prep = runtime.manifest.preprocess
    original = torchvision.io.decode_jpeg
    out = {}

    # Are nvJPEG's chroma samples constant over 2x2 blocks? Mean |chroma - its block's mean|.
    full_gpu = original([torch.frombuffer(d, dtype=torch.uint8) for d in datas[:50]], device="cuda")
    full_cpu = [torch.from_numpy(np.asarray(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files[:50]]

    def block_spread(frames: list) -> float:
        x = torch.stack([f.cuda() for f in frames]).float()
        cb = -0.168736 * x[:, 0] - 0.331264 * x[:, 1] + 0.5 * x[:, 2]
        mean = torch.nn.functional.avg_pool2d(cb[:, None], 2)
        up = mean.repeat_interleave(2, -1).repeat_interleave(2, -2)[:, 0]
        return float((cb - up).abs().mean())

    out["cb_spread_in_2x2_blocks"] = {"nvjpeg": block_spread(full_gpu), "pillow": block_spread(full_cpu)}

    def stats(diff: torch.Tensor) -> dict:
        diff = diff.float().flatten()
        return {
            "mean": round(float(diff.mean()), 4),
            "max": int(diff.max()),
            "over_2": round(float((diff > 2).float().mean()), 5),
        }

    gpu_frames = torch.stack(full_gpu).cpu().int()
    cpu_frames = torch.stack(full_cpu).int()
    fixed = fancy_chroma(torch.stack(full_gpu)).cpu().int()
    out["full_size_vs_pillow"] = {"nvjpeg": stats(gpu_frames - cpu_frames), "nvjpeg_fancy": stats(fixed - cpu_frames)}
    y = lambda t: 0.299 * t[:, 0] + 0.587 * t[:, 1] + 0.114 * t[:, 2]  # noqa: E731
    out["full_size_luma_vs_pillow"] = stats(y(gpu_frames.float()) - y(cpu_frames.float()))
    print(out, flush=True)

    cpu = torch.from_numpy(np.stack([decode_image(d, prep) for d in datas])).permute(0, 3, 1, 2)
    inputs = {"cpu": cpu}
    for name, patched in (("gpu", original), ("gpu_fancy", lambda *a, **k: list(fancy_chroma_each(original(*a, **k))))):
        torchvision.io.decode_jpeg = patched
        try:
            decoder = JpegBatchDecoder(torch.device("cuda"), prep)
            x = torch.empty_like(cpu)
            for start in range(0, len(datas), 100):
                result = decoder.decode([(d, read_header(d, DEFAULT_MAX_PIXELS)) for d in datas[start : start + 100]])
                x[[start + i for i in result.decoded]] = result.images.cpu()
            inputs[name] = x
        finally:
            torchvision.io.decode_jpeg = original
    out["model_input_vs_cpu"] = {name: stats(inputs[name].int() - cpu.int()) for name in ("gpu", "gpu_fancy")}
    batch = min(100, runtime.batch_max)
    top1 = {
        name: torch.cat([runtime.predict_top_k(x[i : i + batch].cuda(), 1)[1][:, 0].cpu()
                         for i in range(0, len(x), batch)])
        for name, x in inputs.items()
    }  # fmt: skip
    out["resnet18_bf16_top1_agreement_of_1000"] = {
        name: int((top1[name] == top1["cpu"]).sum()) for name in ("gpu", "gpu_fancy")
    }
    print(out, flush=True)
    return out


def fancy_chroma_each(frames: list) -> list:
    return [fancy_chroma(f[None])[0] for f in frames]


def main() -> None:
    from bench.gpu import LARGE, dataset, install_wheels

    install_wheels([Path(p) for p in sys.argv[2:]])
    from common import resnet18_on_640x480

    package, small, workdir = resnet18_on_640x480(sys.argv[2:])
    large = dataset("jpeg", 1536, LARGE)
    R["host_cores"] = len(os.sched_getaffinity(0))
    for name, run in (
        ("chroma", lambda: section_chroma(package, ROOT / "build" / "agreement")),
        ("decoder", lambda: section_decoder(large)),
        ("together", lambda: section_together(large)),
        ("e2e", lambda: section_e2e(package, small, large, workdir)),
    ):
        started = time.perf_counter()
        try:
            R[name] = run()
        except Exception:
            import traceback

            R[name] = {"error": traceback.format_exc()[-3000:]}
            print(R[name]["error"], flush=True)
        R.setdefault("seconds", {})[name] = time.perf_counter() - started
        R.save()


if __name__ == "__main__":
    main()
