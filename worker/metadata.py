"""Strip an image file's metadata, so that broken metadata does not cost the pixels.

Pillow refuses a whole PNG over one text or ICC chunk past its limits (1 MB each, 64 MB in all)
and a whole JPEG over one truncated APP segment, although the pixels are intact. Decoding retries
such a file once without its metadata: the pixels and what shapes them (a PNG's palette and
transparency, a JPEG's Adobe colour transform) are kept; text, EXIF, XMP and ICC are dropped.
"""

from __future__ import annotations

import struct

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Critical chunks (upper-case first letter) are always kept; of the ancillary ones, only these
# change the decoded pixels.
_PNG_PIXEL_CHUNKS = frozenset({b"tRNS"})

_JPEG_SOS = 0xDA
_JPEG_ADOBE = 0xEE  # APP14: whether CMYK/YCCK data is inverted or colour-transformed
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})  # TEM, RSTn, SOI: no length field


def without_metadata(data: bytes) -> bytes | None:
    """The same PNG or JPEG without its metadata chunks or segments; None for other formats or
    a file whose structure is itself broken (nothing to retry)."""
    try:
        if data.startswith(PNG_SIGNATURE):
            return _png_without_metadata(data)
        if data.startswith(b"\xff\xd8"):
            return _jpeg_without_metadata(data)
    except (struct.error, IndexError):
        return None
    return None


def _png_without_metadata(data: bytes) -> bytes:
    kept, position = [PNG_SIGNATURE], len(PNG_SIGNATURE)
    while position + 8 <= len(data):
        (length,) = struct.unpack_from(">I", data, position)
        kind = data[position + 4 : position + 8]
        end = position + 12 + length  # length, type, data, CRC
        if kind[:1].isupper() or kind in _PNG_PIXEL_CHUNKS:
            kept.append(data[position:end])
        position = end
        if kind == b"IEND":
            break
    return b"".join(kept)


def _jpeg_without_metadata(data: bytes) -> bytes | None:
    kept, position = [b"\xff\xd8"], 2
    while position < len(data):
        if data[position] != 0xFF:
            return None  # not at a marker: a broken file, not broken metadata
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker in _JPEG_STANDALONE:
            kept.append(data[position : position + 2])
            position += 2
            continue
        if marker == _JPEG_SOS:  # the entropy-coded data and everything after it stays as it is
            kept.append(data[position:])
            break
        (length,) = struct.unpack_from(">H", data, position + 2)
        end = position + 2 + length
        is_metadata = 0xE0 <= marker <= 0xEF or marker == 0xFE  # APPn, COM
        if not is_metadata or (marker == _JPEG_ADOBE and length >= 14):  # a well-formed Adobe segment
            kept.append(data[position:end])
        position = end
    return b"".join(kept)
