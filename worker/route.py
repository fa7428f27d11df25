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
    in YCbCr or greyscale. nvJPEG's hardware decoder turns a truncated file or noise in the
    entropy-coded data into pixels without an error (seen on the H200), where Pillow refuses
    them: such files go to Pillow, which decides."""
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


def entropy_data_is_well_formed(data: bytes) -> bool:
    """False when a marker that cannot occur there sits between the first scan header and the
    end-of-image marker: the sign of noise or a splice. The marker segments before the first
    scan are walked by their lengths, so an EXIF thumbnail's own markers are skipped."""
    position = 2  # after SOI
    while position + 4 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        position += 2 + length
        if marker == 0xDA:  # start of scan: entropy-coded data follows its header
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
