"""Which malformed JPEGs nvJPEG (torchvision decode_jpeg on CUDA) decodes, refuses or crashes on,
and which of them kiln's routing (`worker.route.gpu_decodable`) would send to the GPU at all.
Each case is decoded in a child process, so a crash ends only that case. Writes JSON to argv[1]."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

from common import ROOT

from worker.route import marker_segments


def without(data: bytes, marker: int) -> bytes:
    for m, start, end in reversed(list(marker_segments(data))):
        if m == marker:
            data = data[:start] + data[end:]
    return data


def cases(data: bytes) -> dict[str, bytes]:
    segs = list(marker_segments(data))
    sos_end = next(end for m, _, end in segs if m == 0xDA)
    sof = next((m, s, e) for m, s, e in segs if m in (0xC0, 0xC1, 0xC2))
    _, sof_start, _ = sof
    height = int.from_bytes(data[sof_start + 5 : sof_start + 7], "big")
    width = int.from_bytes(data[sof_start + 7 : sof_start + 9], "big")

    def with_size(h: int, w: int) -> bytes:
        return data[: sof_start + 5] + h.to_bytes(2, "big") + w.to_bytes(2, "big") + data[sof_start + 9 :]

    noise = random.Random(0).randbytes(3000).replace(b"\xff", b"\xfe")
    dht = [(s, e) for m, s, e in segs if m == 0xC4]
    bad_dht = data[: dht[0][0] + 5] + b"\xff" * 16 + data[dht[0][0] + 21 :] if dht else data
    sos_start = next(s for m, s, _ in segs if m == 0xDA)
    bad_component = data[: sos_start + 5] + b"\x09" + data[sos_start + 6 :]
    return {
        "good": data,
        "no_scan": data[:sos_start] + b"\xff\xd9",
        "empty_scan": data[:sos_end] + b"\xff\xd9",
        "short_scan": data[:sos_end] + data[sos_end : sos_end + 10] + b"\xff\xd9",
        "noise_scan": data[:sos_end] + noise + b"\xff\xd9",
        "truncated_half_with_eoi": data[: len(data) // 2] + b"\xff\xd9",
        "no_dht": without(data, 0xC4),
        "no_dqt": without(data, 0xDB),
        "sof_twice_the_size": with_size(height * 2, width * 2),
        "sof_half_the_size": with_size(height // 2, width // 2),
        "sof_1x1": with_size(1, 1),
        "sof_huge": with_size(60000, 60000),
        "bad_dht_counts": bad_dht,
        "sos_unknown_component": bad_component,
        "dri_without_rst": data[:sos_start] + b"\xff\xdd\x00\x04\x00\x01" + data[sos_start:],
        "two_eoi_inside": data[:sos_end] + data[sos_end : sos_end + 500] + b"\xff\xd9" + data[sos_end + 500 :],
    }


def child(path: str) -> None:
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    data = Path(path).read_bytes()
    try:
        out = decode_jpeg([torch.frombuffer(bytearray(data), dtype=torch.uint8)], mode=ImageReadMode.RGB, device="cuda")
        torch.cuda.synchronize()
        print(json.dumps({"outcome": "decoded", "shape": list(out[0].shape)}))
    except Exception as e:
        print(json.dumps({"outcome": "refused", "error": f"{type(e).__name__}: {e}"[:200]}))


def main() -> None:
    if sys.argv[1] == "--child":
        child(sys.argv[2])
        return
    from worker.probe import DEFAULT_MAX_PIXELS, read_header
    from worker.route import gpu_decodable

    out = Path(sys.argv[1])
    work = out.parent / "malformed"
    work.mkdir(exist_ok=True)
    results = {}
    for photo in ("coffee", "rocket"):
        source = (ROOT / "samples" / f"{photo}.jpg").read_bytes()
        for name, data in cases(source).items():
            row: dict = {}
            try:
                header = read_header(data, DEFAULT_MAX_PIXELS)
                row["routed_to_gpu"] = gpu_decodable(data, header)
            except Exception as e:
                row["routed_to_gpu"] = False
                row["header_error"] = f"{type(e).__name__}: {e}"[:200]
            path = work / f"{photo}-{name}.jpg"
            path.write_bytes(data)
            done = subprocess.run(
                [sys.executable, __file__, "--child", str(path)], capture_output=True, text=True, timeout=120
            )
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            row.update(json.loads(lines[-1]) if lines else {"outcome": f"crashed (status {done.returncode})"})
            results[f"{photo}/{name}"] = row
            print(photo, name, row, flush=True)
            out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
