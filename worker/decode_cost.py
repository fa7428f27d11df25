"""What decoding an opened image costs beyond its declared pixels, judged from its headers before
any decoder runs: the pixel cap alone misses decoder buffers that are not the size of the image,
and decode work that does not grow with it.

- A progressive (or any multi-scan) JPEG: libjpeg holds the whole image's DCT coefficients, 2 bytes
  for each of 64 per 8x8 block of every component, whatever scale `draft` decodes at (a 7000x7000
  4:4:4 CMYK one: 392 MB for a 767 KB file). And libjpeg walks every block once per scan: 40,000
  scans of end-of-band runs (23 bytes each) kept a worker busy for minutes.
- A tiled TIFF: libtiff decodes one whole tile at a time, and a tile may be declared far larger
  than the image (a 64x64 image in one 16384x16384 tile: 1 GB for a 783 KB file).
- WebP and AVIF: their decoders' frames are copied twice or more before Pillow has the pixels.
"""

from __future__ import annotations

import math
import struct

import numpy as np
from PIL import Image

from worker.contract import InputError

# Scans in one JPEG frame. libjpeg's default progression has 10 (6 for greyscale), and optimising
# encoders (mozjpeg, jpegtran -optimize) a few dozen; libjpeg-turbo's `djpeg -maxscans` exists for
# files past that. At the pixel cap 1,000 scans is some 20 s of one core, against ~30 min for
# a scan bomb at the byte cap.
MAX_JPEG_SCANS = 1000

# The most decoder memory an image may need besides its decoded pixels, per pixel of the pixel cap:
# what an RGBA image at the cap takes (200 MB at the default 50 M pixels).
BYTES_PER_CAP_PIXEL = 4

_SOS, _EOI = b"\xff\xda", b"\xff\xd9"
_STANDALONE = frozenset({0x01, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8})  # markers with no length


# Bytes of a JPEG searched at once for its markers: the search's temporary arrays are about this
# size whatever the file's, and it stops at the block holding the end-of-image marker.
_SEARCH_BLOCK = 1 << 20


def jpeg_scans(data: bytes) -> int:
    """Scans (SOS markers) in the first frame of a JPEG file; 0 when it has none. Entropy-coded
    data never holds 0xFFDA (an 0xFF byte in it is stuffed with 0x00), so after the first scan
    header the byte after each 0xFF counts exactly, up to the first end-of-image marker. Searched
    with numpy, a block at a time: `bytes.count` and `bytes.find` of the two-byte markers took
    1.7 ms of a 1 MB camera photo's 3.5 ms header read (0.2 ms so), and every camera photo is
    read so."""
    first = _first_scan(data)
    if first is None:
        return 0
    view = np.frombuffer(data, np.uint8)
    scans = 0
    for start in range(first, len(view) - 1, _SEARCH_BLOCK):
        block = view[start : start + _SEARCH_BLOCK + 1]  # one byte more: a marker across the blocks' edge
        markers = block[1:][block[:-1] == 0xFF]  # the byte after each 0xFF
        ends = np.flatnonzero(markers == _EOI[1])
        if ends.size:
            return scans + int(np.count_nonzero(markers[: ends[0]] == _SOS[1]))
        scans += int(np.count_nonzero(markers == _SOS[1]))
    return scans


def _first_scan(data: bytes) -> int | None:
    # Walk the marker segments before the first scan: an SOS inside an APP segment (an EXIF
    # thumbnail) is not one of this frame's scans.
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
        elif marker == 0xDA:
            return position
        elif marker in _STANDALONE:
            position += 2
        else:
            position += 2 + struct.unpack(">H", data[position + 2 : position + 4])[0]
    return None


def check_cost(image: Image.Image, data: bytes, max_pixels: int | None) -> int:
    """Refuse an opened image whose decode would cost more than its declared pixels allow; else
    return the bytes its decoder holds (before `draft`) besides the decoded pixels: a multi-scan
    JPEG's coefficients, a tiled TIFF's one tile, WebP's and AVIF's own frame copies; 0 for
    other images.

    Raises InputError `too_large`: a JPEG frame of more than MAX_JPEG_SCANS scans, or decoder
    buffers over BYTES_PER_CAP_PIXEL bytes per pixel of `max_pixels`."""
    scans = jpeg_scans(data) if image.format in ("JPEG", "MPO") else 0
    if scans > MAX_JPEG_SCANS:
        raise InputError(
            "too_large", f"JPEG with {scans} scans, over the limit of {MAX_JPEG_SCANS}: a scan bomb costs minutes"
        )
    needed, why = _decoder_buffers(image, data, scans)
    limit = max_pixels * BYTES_PER_CAP_PIXEL if max_pixels is not None else None
    if limit is not None and needed > limit:
        raise InputError(
            "too_large",
            f"{image.format} image of {image.width}x{image.height} pixels whose decoder needs {needed / 2**20:.0f} MB "
            f"({why}), over the limit of {limit / 2**20:.0f} MB",
        )
    return needed


# Bytes per pixel that Pillow's WebP and AVIF plugins hold besides the decoded image, measured on
# 7000x7000 RGB images (+747 and +428 MB at the peak): libwebp's animation decoder keeps two RGBA
# canvases and Pillow copies the frame out as bytes; libavif holds its YUV planes and an RGBA
# conversion, which Pillow copies too.
_FRAME_COPIES = {"WEBP": 12, "AVIF": 8}


def _decoder_buffers(image: Image.Image, data: bytes, scans: int) -> tuple[int, str]:
    if image.format in ("JPEG", "MPO") and (image.info.get("progressive") or scans > 1):
        return _coefficient_bytes(image), "a multi-scan JPEG's coefficients for every block"
    if image.format == "TIFF":
        tile = _tiff_tile(image)
        if tile is not None:  # libtiff's buffer of one tile, or Pillow's RGBA one
            return tile[0] * tile[1] * max(4, _tiff_bytes_per_pixel(image)), f"tiles of {tile[0]}x{tile[1]}"
    if image.format in _FRAME_COPIES:
        return image.width * image.height * _FRAME_COPIES[image.format], f"{image.format}'s decoder copies"
    return 0, ""


def _coefficient_bytes(image: Image.Image) -> int:
    # libjpeg's whole-image coefficient arrays: per component, its blocks padded to whole MCUs.
    layers = getattr(image, "layer", None) or [(0, 1, 1, 0)] * len(image.getbands())
    h_max, v_max = max(layer[1] for layer in layers), max(layer[2] for layer in layers)
    mcu_columns = math.ceil(image.width / (8 * h_max))
    mcu_rows = math.ceil(image.height / (8 * v_max))
    blocks = sum(mcu_columns * h * mcu_rows * v for _, h, v, _ in layers)
    return blocks * 64 * 2


def _tiff_tile(image: Image.Image) -> tuple[int, int] | None:
    tags = getattr(image, "tag_v2", {})
    width, length = tags.get(322), tags.get(323)  # TileWidth, TileLength
    return (int(width), int(length)) if width and length else None


def _tiff_bytes_per_pixel(image: Image.Image) -> int:
    bits = image.tag_v2.get(258, (8,))  # BitsPerSample, one value per sample
    bits = bits if isinstance(bits, tuple) else (bits,)
    samples = int(image.tag_v2.get(277, len(bits)))  # SamplesPerPixel
    return math.ceil(max(bits) * samples / 8)
