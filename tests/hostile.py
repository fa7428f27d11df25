"""Hostile image files for the input tests, built in memory: pixel bombs in several containers."""

from __future__ import annotations

import struct
import zlib


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of `width` x `height` black pixels; a few hundred kB for 40000^2."""
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    rows_per_piece = max(1, (1 << 22) // len(row))
    pieces = []
    for start in range(0, height, rows_per_piece):
        pieces.append(compressor.compress(row * min(rows_per_piece, height - start)))
    pieces.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", b"".join(pieces)) + _chunk(b"IEND", b"")


def icon_directory(kind: int, inner: bytes, claimed: int = 16) -> bytes:
    """An ICO (kind 1) or CUR (kind 2) file with one entry that claims `claimed` px and holds `inner`."""
    entry = struct.pack("<BBBBHHII", claimed, claimed, 0, 0, 1, 32, len(inner), 6 + 16)
    return struct.pack("<HHH", 0, kind, 1) + entry + inner


def icns(inner: bytes) -> bytes:
    """An Apple icon file with one 1024px ('ic10') entry holding `inner` (a PNG)."""
    entry = b"ic10" + struct.pack(">I", 8 + len(inner)) + inner
    return b"icns" + struct.pack(">I", 8 + len(entry)) + entry


def gif_with_large_frame(width: int, height: int) -> bytes:
    """A GIF whose screen is 16x16 but whose first frame claims `width` x `height`."""
    screen = b"GIF89a" + struct.pack("<HHBBB", 16, 16, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    frame = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return screen + frame + b";"


def tiff_bomb(width: int, height: int) -> bytes:
    """A little-endian TIFF header and IFD for a `width` x `height` 1-bit image, without the pixels."""
    entries = [(256, 4, width), (257, 4, height), (258, 3, 1), (259, 3, 1), (262, 3, 1), (273, 4, 8 + 2 + 8 * 12 + 4),
               (278, 4, height), (279, 4, (width + 7) // 8 * height)]  # fmt: skip
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHII", tag, kind, 1, value) for tag, kind, value in entries
    )
    return b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0)


def psd(width: int, height: int) -> bytes:
    """An uncompressed 8-bit RGB Photoshop file."""
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, height, width, 8, 3)
    return header + struct.pack(">IIIH", 0, 0, 0, 0) + bytes(range(256)) * (3 * width * height // 256 + 1)


def fits(width: int, height: int) -> bytes:
    """An 8-bit FITS image (astronomy)."""
    cards = ["SIMPLE  =                    T", "BITPIX  =                    8", "NAXIS   =                    2",
             f"NAXIS1  = {width:20d}", f"NAXIS2  = {height:20d}", "END"]  # fmt: skip
    header = "".join(card.ljust(80) for card in cards).ljust(2880).encode()
    data = bytes(width * height)
    return header + data + bytes(-len(data) % 2880)


ASCII_PBM = b"P1\n4 4\n0 1 0 1\n1 0 1 0\n0 1 0 1\n1 0 1 0\n"


def tiff_in_one_tile(side: int, tile: int) -> bytes:
    """A `side` x `side` RGB TIFF stored as one deflate tile of `tile` x `tile` black pixels: libtiff
    decodes the whole tile, tile^2 x 3 bytes, whatever the image's size."""
    data = zlib.compress(bytes(tile * tile * 3), 9)
    bits_at = 8 + 2 + 11 * 12 + 4
    entries = [(256, 4, 1, side), (257, 4, 1, side), (258, 3, 3, bits_at), (259, 3, 1, 8), (262, 3, 1, 2),
               (277, 3, 1, 3), (284, 3, 1, 1), (322, 4, 1, tile), (323, 4, 1, tile), (324, 4, 1, bits_at + 6),
               (325, 4, 1, len(data))]  # fmt: skip
    ifd = struct.pack("<H", len(entries)) + b"".join(_ifd_entry(*entry) for entry in entries)
    return b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + struct.pack("<HHH", 8, 8, 8) + data


def _ifd_entry(tag: int, kind: int, count: int, value: int) -> bytes:
    if kind == 3 and count == 1:  # one SHORT: left-justified in the 4-byte value field
        return struct.pack("<HHIHH", tag, kind, count, value, 0)
    return struct.pack("<HHII", tag, kind, count, value)


def jpeg_scan_bomb(side: int, scans: int) -> bytes:
    """A `side` x `side` greyscale progressive JPEG with `scans` AC scans, each a few end-of-band
    runs over every block (~23 bytes a scan): libjpeg walks all blocks once per scan."""

    def segment(marker: int, payload: bytes) -> bytes:
        return b"\xff" + bytes([marker]) + struct.pack(">H", len(payload) + 2) + payload

    blocks = ((side + 7) // 8) ** 2
    out = bytearray(b"\xff\xd8")
    out += segment(0xDB, b"\x00" + bytes([1] * 64))
    out += segment(0xC2, struct.pack(">BHHB", 8, side, side, 1) + bytes([1, 0x11, 0]))
    out += segment(0xC4, b"\x00" + bytes([1] + [0] * 15) + b"\x00")  # DC table: one symbol, code '0'
    out += segment(0xC4, b"\x10" + bytes([0, 0, 0, 15] + [0] * 12) + bytes(r << 4 for r in range(15)))  # EOBn
    out += segment(0xDA, bytes([1, 1, 0x00, 0, 0, 0x00])) + bytes((blocks + 7) // 8)  # DC scan: a bit a block
    bits, left = [], blocks
    while left:  # end-of-band runs of up to 32767 blocks
        run = min(left, 32767)
        r = run.bit_length() - 1
        bits.append(format(r, "04b") + (format(run - (1 << r), f"0{r}b") if r else ""))
        left -= run
    text = "".join(bits)
    text += "1" * (-len(text) % 8)
    payload = bytes(int(text[i : i + 8], 2) for i in range(0, len(text), 8)).replace(b"\xff", b"\xff\x00")
    out += (segment(0xDA, bytes([1, 1, 0x00, 1, 63, 0x00])) + payload) * scans
    return bytes(out + b"\xff\xd9")
