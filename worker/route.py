"""Which decoder takes an image: the GPU (nvJPEG) or Pillow. Imports no torch, so that the
decoding processes (worker/decode_pool.py), which fetch and route images themselves, stay light.
"""

from __future__ import annotations

import re
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
    bench/results/gpu-h200-malformed.json), where Pillow refuses them: such files go to Pillow,
    which decides."""
    return (
        header.format in GPU_FORMATS
        and header.mode in GPU_MODES
        and data.endswith(b"\xff\xd9", 0, _data_end(data))
        and entropy_data_is_well_formed(data)
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


def entropy_data_is_well_formed(data: bytes) -> bool:
    """False when the first scan names a component the frame header does not declare (or none,
    or more than it has), or when a marker that cannot occur there sits between the first scan
    header and the end-of-image marker: the sign of noise or a splice. The marker segments before
    the first scan are walked by their lengths, so an EXIF thumbnail's own markers are skipped."""
    position = 2  # after SOI
    components: set[int] | None = None  # the frame's component ids, from its SOF segment
    while position + 4 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        segment = data[position + 4 : position + 2 + length]
        position += 2 + length
        if marker in _SOF_MARKERS and len(segment) >= 6:  # P, Y, X, Nf, then Nf x (id, sampling, Tq)
            components = {segment[6 + 3 * i] for i in range(segment[5]) if 6 + 3 * i < len(segment)}
        if marker == 0xDA:  # start of scan: Ns, Ns x (id, tables), ...; entropy-coded data follows
            if components is None or not segment or not 1 <= segment[0] <= len(components):
                return False
            if any(
                segment[1 + 2 * i : 2 + 2 * i] == b"" or segment[1 + 2 * i] not in components for i in range(segment[0])
            ):
                return False
            end = data.rfind(b"\xff\xd9", 0, _data_end(data))
            return end >= position and _BAD_MARKER.search(data, position, end) is None
    return False


def draft_factor(width: int, height: int, resize: int) -> int:
    """The scale Pillow's `draft("RGB", (resize, resize))` decodes a JPEG at: 8, 4, 2 or 1, the
    largest that keeps both sides at least `resize` (`PIL.JpegImagePlugin.JpegImageFile.draft`)."""
    scale = min(width // resize, height // resize)
    return next((factor for factor in (8, 4, 2) if scale >= factor), 1)


def cpu_takes(header: ImageHeader, resize: int, gpu_has_a_batch: bool) -> bool:
    """Whether a JPEG the GPU could decode goes to a CPU process instead: only one that `draft`
    decodes at 1/2..1/8 scale, where Pillow costs about what nvJPEG does (FACTS.md), and only
    while the GPU already has a batch waiting; at full scale the GPU is five times faster."""
    return gpu_has_a_batch and draft_factor(header.width, header.height, resize) > 1
