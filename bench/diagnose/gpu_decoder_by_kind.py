"""Thirteenth-session diagnosis on the H200: why a mixed folder ran at 1.1k img/s with
nvImageCodec against 2.6k with torchvision's nvJPEG (bench/results/gpu-h200-nvimgcodec-default-run.json).
For each kind of JPEG in bench/gpu.py's mixed folder (baseline 4:2:0, progressive, greyscale,
4:4:4, camera-size 4000x3000) and for each decoder (torchvision; nvImageCodec with 2, 4 and 8 CPU
threads), the decode-only rate of a batch, alone and with a busy Python thread beside it (what
the worker's fetch threads are to the decode thread), and kiln's `JpegBatchDecoder` on a batch
of the mixed folder's JPEGs.

    python3 bench/diagnose/gpu_decoder_by_kind.py $OUT/by-kind.json .whl
"""

from __future__ import annotations

import io
import sys
import threading
import time
from pathlib import Path

from common import ROOT, Results

R = Results(sys.argv[1])


def main() -> None:
    from bench.gpu import install_wheels

    install_wheels([Path(p) for p in sys.argv[2:]])
    import torch
    from PIL import Image

    from bench.pipeline import make_dataset
    from compile.models import LITE0_PREPROCESS
    from worker.gpu_decode import JpegBatchDecoder
    from worker.jpeg_codecs import import_nvimgcodec
    from worker.probe import DEFAULT_MAX_PIXELS, read_header

    device = torch.device("cuda")
    base = make_dataset(ROOT / "build" / "by-kind" / "small", 256, (640, 480), seed=3)
    large = make_dataset(ROOT / "build" / "by-kind" / "large", 48, (4000, 3000), seed=4)

    def resaved(path: Path, **options) -> bytes:
        image = Image.open(path)
        mode = options.pop("mode", None)
        if mode:
            image = image.convert(mode)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90, **options)
        return buffer.getvalue()

    kinds = {
        "baseline_420": [p.read_bytes() for p in base],
        "progressive_420": [resaved(p, progressive=True) for p in base],
        "grey": [resaved(p, mode="L") for p in base],
        "baseline_444": [resaved(p, subsampling=0) for p in base],
        "large_4000x3000": [p.read_bytes() for p in large],
    }
    nvimgcodec = import_nvimgcodec()
    params = nvimgcodec.DecodeParams(color_spec=nvimgcodec.ColorSpec.SRGB, apply_exif_orientation=False)

    def nvimgcodec_decoder(threads: int):
        decoder = nvimgcodec.Decoder(device_id=0, max_num_cpu_threads=threads, options=":fancy_upsampling=1")

        def run(encoded: list[bytes]) -> int:
            images = decoder.decode([nvimgcodec.CodeStream(d) for d in encoded], params=params,
                                    cuda_stream=torch.cuda.current_stream().cuda_stream)  # fmt: skip
            torch.cuda.current_stream().synchronize()
            return sum(image is not None for image in images)

        return run

    def torchvision_decoder(encoded: list[bytes]) -> int:
        from torchvision.io import ImageReadMode, decode_jpeg

        frames = decode_jpeg([torch.frombuffer(d, dtype=torch.uint8) for d in encoded], mode=ImageReadMode.RGB,
                             device=device)  # fmt: skip
        torch.cuda.synchronize()
        return len(frames)

    decoders = {
        "torchvision": torchvision_decoder,
        "nvimgcodec_2_threads": nvimgcodec_decoder(2),
        "nvimgcodec_4_threads": nvimgcodec_decoder(4),
        "nvimgcodec_8_threads": nvimgcodec_decoder(8),
    }

    def rate(run, encoded: list[bytes], rounds: int = 4) -> tuple[float, int]:
        run(encoded)  # warm-up: buffers sized for this kind
        started = time.perf_counter()
        done = sum(run(encoded) for _ in range(rounds))
        return len(encoded) * rounds / (time.perf_counter() - started), done // rounds

    def busy_python(stop: threading.Event) -> None:
        while not stop.is_set():
            sum(range(1000))

    for kind, encoded in kinds.items():
        for name, run in decoders.items():
            row = {}
            try:
                row["alone"], row["decoded"] = rate(run, encoded)
                stop = threading.Event()
                spinner = threading.Thread(target=busy_python, args=(stop,), daemon=True)
                spinner.start()
                try:
                    row["beside_a_busy_thread"], _ = rate(run, encoded)
                finally:
                    stop.set()
                    spinner.join()
            except Exception as e:  # a decoder that refuses a whole kind is an answer too
                row["error"] = f"{type(e).__name__}: {e}"[:500]
            R.setdefault(kind, {})[name] = row
            print(kind, name, row, flush=True)
            R.save()

    # kiln's own decoder on the mixed folder's JPEG share: 10 baseline, 2 progressive, 1 grey per 13.
    mixed = [(d, read_header(d, DEFAULT_MAX_PIXELS)) for i in range(256)
             for d in [(kinds["progressive_420"] if i % 13 < 2 else kinds["grey"] if i % 13 == 2
                        else kinds["baseline_420"])[i]]]  # fmt: skip
    for library in ("torchvision", "nvimgcodec"):
        decoder = JpegBatchDecoder(device, LITE0_PREPROCESS, library)

        def run(items, decoder=decoder) -> int:
            result = decoder.decode(items)
            torch.cuda.synchronize()
            return len(result.decoded)

        R.setdefault("kiln_mixed_jpegs", {})[library], _ = rate(run, mixed)
        R.setdefault("kiln_baseline", {})[library], _ = rate(
            run, [(d, read_header(d, DEFAULT_MAX_PIXELS)) for d in kinds["baseline_420"]]
        )
        print(library, R["kiln_mixed_jpegs"][library], R["kiln_baseline"][library], flush=True)
        R.save()


if __name__ == "__main__":
    main()
