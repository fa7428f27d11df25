"""Twelfth-session diagnosis on the H200: does another GPU JPEG decoder than torchvision's nvJPEG
(hardware backend) bring the GPU path's top-1 to the CPU path's on 99% of the agreement test's
1,000 JPEGs? Each decoder's full-size frames go through kiln's own decoder (`JpegBatchDecoder`:
draft reduction, orientation, chroma interpolation, batched resample), with and without the
chroma interpolation, and are compared with the CPU path (Pillow) in pixels and in the top-1 of
EfficientNet-Lite0 (eager, float32 without TF32, and bfloat16). Pillow's own full-size frames
through the same GPU steps are the reference: what the post-processing alone costs.

    python3 bench/diagnose/gpu_decoder_agreement.py $OUT/decoders.json .whl-diag
"""

from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from common import ROOT, Results

R = Results(sys.argv[1])


def main() -> None:
    from bench.gpu import install_wheels

    install_wheels([Path(p) for p in sys.argv[2:]])
    import numpy as np
    import torch
    from PIL import Image

    from bench.pipeline import make_dataset
    from compile.efficientnet_lite0 import build_efficientnet_lite0
    from compile.models import LITE0_PREPROCESS
    from worker.gpu_decode import JpegBatchDecoder
    from worker.preprocess import decode_image
    from worker.probe import DEFAULT_MAX_PIXELS, read_header

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the CPU: a smoke test
    prep = LITE0_PREPROCESS

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    count = int(os.environ.get("KILN_DIAG_COUNT", "1000"))
    files = make_dataset(ROOT / "build" / "agreement" / "photos", count, (640, 480), seed=7)[:count]
    datas = [f.read_bytes() for f in files]
    samples = {p.stem: p.read_bytes() for p in sorted((ROOT / "samples").glob("*.jpg"))}
    R["pillow"] = Image.__version__
    cpu = torch.from_numpy(np.stack([decode_image(d, prep) for d in datas])).permute(0, 3, 1, 2)
    cpu_samples = torch.from_numpy(np.stack([decode_image(d, prep) for d in samples.values()])).permute(0, 3, 1, 2)

    model = build_efficientnet_lite0().eval().to(device)
    models = {"float32": model, "bfloat16": build_efficientnet_lite0().eval().to(device, torch.bfloat16)}

    @torch.no_grad()
    def top1(dtype: str, inputs: torch.Tensor) -> torch.Tensor:
        net = models[dtype]
        out = []
        for i in range(0, len(inputs), 100):
            x = (inputs[i : i + 100].to(device).float() - 127.0) / 128.0
            out.append(net(x.to(getattr(torch, dtype))).argmax(1).cpu())
        return torch.cat(out)

    reference = {dtype: top1(dtype, cpu) for dtype in models}
    reference_samples = {dtype: top1(dtype, cpu_samples) for dtype in models}

    def nvimgcodec_frames(backend: str | None):
        from worker.jpeg_codecs import import_nvimgcodec

        nvimgcodec = import_nvimgcodec()
        kinds = {"hw": "HW_GPU_ONLY", "cuda": "GPU_ONLY", "hybrid": "HYBRID_CPU_GPU"}
        backends = [nvimgcodec.Backend(getattr(nvimgcodec.BackendKind, kinds[backend]))] if backend else None
        decoder = nvimgcodec.Decoder(backends=backends) if backends else nvimgcodec.Decoder()
        params = nvimgcodec.DecodeParams(color_spec=nvimgcodec.ColorSpec.SRGB, apply_exif_orientation=False)

        def frames(encoded: list[bytes]) -> list[torch.Tensor]:
            images = decoder.decode(encoded, params=params)
            return [torch.as_tensor(image, device=device).permute(2, 0, 1) for image in images]

        return frames

    def torchvision_frames(encoded: list[bytes]) -> list[torch.Tensor]:
        from torchvision.io import ImageReadMode, decode_jpeg

        return decode_jpeg([torch.frombuffer(d, dtype=torch.uint8) for d in encoded], mode=ImageReadMode.RGB,
                           device=device)  # fmt: skip

    def pillow_frames(encoded: list[bytes]) -> list[torch.Tensor]:
        return [torch.from_numpy(np.asarray(Image.open(io.BytesIO(d)).convert("RGB"))).permute(2, 0, 1).to(device)
                for d in encoded]  # fmt: skip

    class Decoder(JpegBatchDecoder):
        def __init__(self, frames, replicates: bool) -> None:
            super().__init__(device, prep)
            self.frames_of = frames
            self.frames = SimpleNamespace(name="diagnosis", replicates_chroma=replicates)

        def _decode_or_split(self, items, indices, frames, refused) -> None:
            frames.update(zip(indices, self.frames_of([items[i][0] for i in indices]), strict=True))

    def run(frames, replicates: bool, encoded: list[bytes]) -> torch.Tensor:
        decoder = Decoder(frames, replicates)
        out = torch.empty((len(encoded), 3, prep.crop, prep.crop), dtype=torch.uint8)
        for start in range(0, len(encoded), 100):
            part = encoded[start : start + 100]
            result = decoder.decode([(d, read_header(d, DEFAULT_MAX_PIXELS)) for d in part])
            out[[start + i for i in result.decoded]] = result.images.cpu()
        return out

    def stats(diff: torch.Tensor) -> dict:
        diff = diff.float().flatten()
        return {"mean": round(float(diff.mean()), 4), "max": int(diff.max()),
                "share_over_1": round(float((diff > 1).float().mean()), 5)}  # fmt: skip

    pillow_full = pillow_frames(datas[:100])
    sources = {
        "pillow": pillow_frames,
        "torchvision": torchvision_frames,
        "nvimgcodec_default": lambda: nvimgcodec_frames(None),
        "nvimgcodec_hw": lambda: nvimgcodec_frames("hw"),
        "nvimgcodec_hybrid": lambda: nvimgcodec_frames("hybrid"),
    }
    for name, source in sources.items():
        try:
            frames = source if name in ("pillow", "torchvision") else source()
            full = frames(datas[:100])
            sync()
            pairs = zip(full, pillow_full, strict=True)
            full_diff = torch.cat([(g.int() - c.int()).abs().flatten() for g, c in pairs])
            row: dict = {"full_size_vs_pillow": stats(full_diff)}
            started = time.perf_counter()
            for _ in range(3):
                for s in range(0, len(datas), 100):
                    frames(datas[s : s + 100])
            sync()
            row["decode_only_per_s_batch_100"] = round(3 * len(datas) / (time.perf_counter() - started))
            for replicates in (False, True):
                got = run(frames, replicates, datas)
                got_samples = run(frames, replicates, list(samples.values()))
                key = "chroma_interpolated_by_kiln" if replicates else "as_decoded"
                row[key] = {
                    "model_input_vs_cpu_path": stats((got.int() - cpu.int()).abs()),
                    **{f"top1_agree_{dtype}": int((top1(dtype, got) == reference[dtype]).sum()) for dtype in models},
                    **{f"samples_differ_{dtype}": [n for n, a, b in zip(samples, top1(dtype, got_samples),
                                                                         reference_samples[dtype], strict=True)
                                                   if a != b] for dtype in models},
                }  # fmt: skip
            R[name] = row
        except Exception as e:  # one decoder failing must not lose the others
            R[name] = {"error": f"{type(e).__name__}: {e}"[:400]}
        print(name, R[name], flush=True)
        R.save()


if __name__ == "__main__":
    main()
