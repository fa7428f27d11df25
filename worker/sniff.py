"""Name an image format from its signature alone, running no decoder: every format Pillow (and
pillow-heif) can open, so a file outside the allowlist is refused by its real name.

Pillow's own signature checks (`Image.OPEN`'s accept functions) are used where they exist. Six
plugins have none (IM, IMT, IPTC, PCD, SPIDER, TGA: Pillow just tries to parse them), CUR's check
also matches an uncompressed TGA, and HEIC and AVIF share one container whose generic brands
(`mif1`, `msf1`) Pillow's AVIF plugin claims: those are judged here.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable

from PIL import Image, SpiderImagePlugin

PREFIX = 16  # what Image.open hands the accept functions
HEAD = 4096  # enough for PCD's header at 2048 and an ISO-BMFF `meta` box's item types

# ISO base media file brands of HEVC-coded HEIF images and sequences, and of AVIF.
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs"})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
# Item (or sample entry) types naming the codec inside a generic `mif1`/`msf1` file.
_HEIF_CODECS = (b"hvc1", b"hev1", b"hvcC")
_AVIF_CODECS = (b"av01", b"av1C")


def container_format(data: bytes) -> str | None:
    """ "HEIF" or "AVIF" for an ISO-BMFF image file (`ftyp` box), judged by the coded item type and
    then by the brands; None for any other file."""
    if data[4:8] != b"ftyp":
        return None
    size = max(16, min(struct.unpack(">I", data[:4])[0], 1024))
    brands = {data[8:12]} | {data[i : i + 4] for i in range(16, size - 3, 4)}
    head = data[:HEAD]
    if any(codec in head for codec in _AVIF_CODECS):
        return "AVIF"
    if any(codec in head for codec in _HEIF_CODECS) or brands & _HEIF_BRANDS:
        return "HEIF"
    return "AVIF" if brands & _AVIF_BRANDS else None


def signature_formats(data: bytes) -> list[str]:
    """Pillow format names whose signature `data` carries, in Pillow's order of trying them, then
    the formats Pillow has no signature check for. Empty when none matches."""
    container = container_format(data)
    if container is not None:
        return [container]
    Image.init()
    prefix = data[:PREFIX]
    names = [name for name, (_, accept) in Image.OPEN.items() if accept and _accepts(accept, prefix)]
    if "CUR" in names and not _is_cur(data):
        names.remove("CUR")
    return names + [name for name, check in _UNSIGNED.items() if check(data[:HEAD])]


def _accepts(accept: Callable[[bytes], bool | str], prefix: bytes) -> bool:
    try:
        result = accept(prefix)
    except Exception:  # a plugin's signature check that trips on odd bytes is no match
        return False
    return bool(result) and not isinstance(result, str)  # a string is a "cannot open" note


def _is_cur(data: bytes) -> bool:
    # A cursor directory lists at least one image; an uncompressed TGA starts with the same 4 bytes.
    return len(data) >= 6 and struct.unpack("<H", data[4:6])[0] > 0


# The header forms Pillow's parsers for these formats accept (see each plugin's `_open`).
_IM_LINE = re.compile(rb"[A-Za-z][^:\r\n]{0,99}:[ \t]*[^\r\n]*\r?\n")
_IMT_LINE = re.compile(rb"(?:width|height|pixel) [^ \r\n]+\r?\n")
_TGA_DEPTHS = {1: (8,), 2: (15, 16, 24, 32), 3: (1, 8, 16)}  # by image type; +8 is its RLE form
_TGA_DEPTHS.update({kind + 8: depths for kind, depths in list(_TGA_DEPTHS.items())})


def _is_im(head: bytes) -> bool:
    header = head.split(b"\x1a", 1)[0]
    return _IM_LINE.match(header) is not None and (b"Image type:" in header or b"Image size:" in header)


def _is_imt(head: bytes) -> bool:
    return _IMT_LINE.match(head) is not None


def _is_iptc(head: bytes) -> bool:
    return len(head) >= 5 and head[0] == 0x1C and head[1] in (1, 2, 3, 4, 5, 6, 7, 8, 9, 240)


def _is_pcd(head: bytes) -> bool:
    return head[2048:2055] == b"PCD_IPI"


def _is_spider(head: bytes) -> bool:
    if len(head) < 92:
        return False
    for order in "<>":
        try:
            if SpiderImagePlugin.isSpiderHeader(struct.unpack(f"{order}23f", head[:92])):
                return True
        except (ValueError, OverflowError):  # a NaN or infinite float: not this byte order
            continue
    return False


def _is_tga(head: bytes) -> bool:
    # TGA has no magic number: its header fields must agree with one another.
    if len(head) < 18:
        return False
    colormap, kind, depth, descriptor = head[1], head[2], head[16], head[17]
    width, height = struct.unpack("<HH", head[12:16])
    if colormap == 0:
        palette_ok = kind not in (1, 9) and not any(head[3:8])
    else:  # a palette: required by colour-mapped images, allowed (and unused) in true-colour ones
        palette_ok = colormap == 1 and kind in (1, 2, 9, 10) and head[7] in (0, 15, 16, 24, 32)
    return palette_ok and depth in _TGA_DEPTHS.get(kind, ()) and width > 0 and height > 0 and descriptor & 0xC0 == 0


_UNSIGNED: dict[str, Callable[[bytes], bool]] = {
    "IM": _is_im,
    "IMT": _is_imt,
    "IPTC": _is_iptc,
    "PCD": _is_pcd,
    "SPIDER": _is_spider,
    "TGA": _is_tga,
}
