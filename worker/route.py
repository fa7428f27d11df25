"""Which decoder takes an image: the GPU (nvJPEG) or Pillow. Imports no torch, so that the
decoding processes (worker/decode_pool.py), which fetch and route images themselves, stay light.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.probe import ImageHeader

GPU_FORMATS = frozenset({"JPEG", "MPO"})  # MPO: camera JPEGs with extra frames; the first is a JPEG
GPU_MODES = frozenset({"RGB", "L"})  # CMYK and YCCK JPEGs go to Pillow, which knows Adobe's inversion


def gpu_decodable(data: bytes, header: ImageHeader) -> bool:
    """Whether nvJPEG should get this image: a complete, well-formed baseline or progressive JPEG
    in YCbCr or greyscale. nvJPEG's hardware decoder turns a truncated file, noise in the
    entropy-coded data or a scan of components the frame does not have into pixels without an
    error, and crashes the process on a JPEG without a scan (seen on the H200:
    bench/results/gpu-h200-malformed.json); in a batch it also decoded JPEGs without their
    quantization tables (tests/test_decoders.py on the H200). Pillow refuses those, or (missing
    Huffman tables, as in motion-JPEG frames) decodes them with the standard tables: such files go
    to Pillow, which decides."""
    return (
        header.format in GPU_FORMATS
        and header.mode in GPU_MODES
        and data.endswith(b"\xff\xd9", 0, _data_end(data))
        and structure_is_well_formed(data)
    )


def _data_end(data: bytes) -> int:
    """Where the data ends before any trailing NUL padding (without copying a large image)."""
    end = len(data)
    while end and data[end - 1] == 0:
        end -= 1
    return end


# In entropy-coded data a 0xFF byte is followed by 0x00 (stuffing), a restart marker (D0-D7),
# more 0xFF fill, or, between the scans of a progressive JPEG, a table or scan header.
_BAD_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff\xc4\xda\xdb\xdd\xfe\xe0-\xef]")


_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def marker_segments(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(marker, start, end) of each marker segment of a JPEG after its SOI, up to and including
    the first scan header (SOS): `data[start:end]` is the whole segment, marker and length
    included, and the first scan's entropy-coded data begins at that SOS's `end`. Fill bytes
    before a marker are skipped; segments are walked by their lengths, so an EXIF thumbnail's own
    markers are never seen."""
    position = 2
    while position + 4 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        end = position + 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        yield marker, position, end
        if marker == 0xDA:
            return
        position = end


def structure_is_well_formed(data: bytes) -> bool:
    """False when the first scan names a component the frame header does not declare (or none,
    or more than it has), when a table the frame or that scan uses is not defined before it, or
    when a marker that cannot occur there sits between the first scan header and the end-of-image
    marker: the sign of noise or a splice."""
    frame: dict[int, int] | None = None  # the frame's component id -> its quantization table
    progressive = False
    quantization: set[int] = set()  # tables defined so far: DQT ids, DHT (class, id)
    huffman: set[tuple[int, int]] = set()
    for marker, start, end in marker_segments(data):
        segment = data[start + 4 : end]
        if marker == 0xDB:  # Pq/Tq, then 64 or 128 bytes, per table
            at = 0
            while at < len(segment):
                quantization.add(segment[at] & 0x0F)
                at += 1 + 64 * (1 + (segment[at] >> 4))
        elif marker == 0xC4:  # Tc/Th, 16 counts, then the values, per table
            at = 0
            while at + 17 <= len(segment):
                huffman.add((segment[at] >> 4, segment[at] & 0x0F))
                at += 17 + sum(segment[at + 1 : at + 17])
        elif marker in _SOF_MARKERS and len(segment) >= 6:  # P, Y, X, Nf, then Nf x (id, sampling, Tq)
            count = min(segment[5], (len(segment) - 6) // 3)
            frame = {segment[6 + 3 * i]: segment[8 + 3 * i] for i in range(count)}
            progressive = marker == 0xC2
        elif marker == 0xDA:  # start of scan: Ns, Ns x (id, Td/Ta), Ss, Se, Ah/Al; entropy-coded data follows
            if frame is None or not segment or not 1 <= segment[0] <= len(frame) or len(segment) < 2 * segment[0] + 2:
                return False
            scan = [(segment[1 + 2 * i], segment[2 + 2 * i]) for i in range(segment[0])]
            dc_only = progressive and segment[1 + 2 * segment[0]] == 0  # Ss = 0: a DC scan
            needed = {(0, tables >> 4) for _, tables in scan if dc_only or not progressive}
            needed |= {(1, tables & 0x0F) for _, tables in scan if not dc_only}
            if any(id_ not in frame for id_, _ in scan) or not set(frame.values()) <= quantization:
                return False
            if not needed <= huffman:
                return False
            eoi = data.rfind(b"\xff\xd9", 0, _data_end(data))
            return eoi >= end and _BAD_MARKER.search(data, end, eoi) is None
    return False


def draft_factor(width: int, height: int, resize: int) -> int:
    """The scale Pillow's `draft("RGB", (resize, resize))` decodes a JPEG at: 8, 4, 2 or 1, the
    largest that keeps both sides at least `resize` (`PIL.JpegImagePlugin.JpegImageFile.draft`)."""
    scale = min(width // resize, height // resize)
    return next((factor for factor in (8, 4, 2) if scale >= factor), 1)


# Full-size pixels waiting for one worker process's GPU decoder from which CPU processes decode
# the JPEGs that `draft` shrinks themselves: one decode call's worth (worker.gpu_decode's
# MAX_DECODED_PIXELS). On the H200 with 4000x3000 JPEGs, 256 Mpx to 1.5 Gpx ran within 5% of each
# other; 64 Mpx ran 8-13% slower, the GPU getting batches of 14 photos and idling a fifth of the
# time (bench/results/gpu-h200-camera-routing.json, gpu-h200-camera-cpu.json).
GPU_BUSY_PIXELS = 512 * 2**20


@dataclass(frozen=True)
class GpuBusy:
    """When the GPU counts as busy for a JPEG that `draft` would shrink: when what waits for it is
    `pixels` full-size pixels or more, or `images` images of this one's size (where the batch is
    too small for `pixels` of them to wait: the decode pool's slots hold about two batches).

    Pixels, not images: the GPU's decode time grows with them, and a count of images mixes a
    hundred 640x480 JPEGs (a few ms of the GPU) with a hundred camera photos (a second).
    """

    pixels: int
    images: int

    def __call__(self, backlog_pixels: int, header: ImageHeader) -> bool:
        return backlog_pixels >= min(self.pixels, self.images * header.width * header.height)


def cpu_takes(header: ImageHeader, resize: int, gpu_busy: bool) -> bool:
    """Whether a JPEG the GPU could decode goes to a CPU process instead:
    - a progressive JPEG, always: both GPU decoders Huffman-decode it on the host, in the one GPU
      decode thread, holding up the batch. On the H200, batches of 256 progressive 640x480 JPEGs
      decoded at 469 img/s (torchvision) and 842 (nvImageCodec), against 23.5k baseline ones
      (bench/results/gpu-h200-decoder-by-kind.json), where Pillow decodes them at 0.7x its
      baseline rate on each core (222 against 318 img/s on the 2-core VM);
    - one that `draft` decodes at 1/2..1/8 scale, where Pillow costs about what nvJPEG does
      (docs/FACTS.md), only while the GPU is busy (enough images wait for it); at full scale the
      GPU is about eight times faster (bench/results/gpu-h200.json). On the H200, four processes
      decoding 4000x3000 JPEGs on the GPU and twelve with Pillow at once gave 908 + 631 img/s
      (gpu-h200-camera.json)."""
    return header.progressive or (gpu_busy and draft_factor(header.width, header.height, resize) > 1)
