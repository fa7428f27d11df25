"""Identify an image from its headers before any pixel is decoded: its format (against an
allowlist), its size (against the pixel cap), its mode, EXIF orientation and JPEG progression.

Also the one place that enforces the pixel cap inside Pillow, for every frame Pillow allocates,
including the frames that container formats (ICO, ICNS, CUR, ...) decode while being opened.
"""

from __future__ import annotations

import contextvars
import io
import struct
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from PIL import ExifTags, Image, ImageFile, UnidentifiedImageError

from worker.contract import InputError
from worker.decode_cost import check_cost
from worker.metadata import without_metadata
from worker.settings import DEFAULT_FORMATS
from worker.sniff import container_format, signature_formats

try:
    from pillow_heif import register_heif_opener
except ImportError:  # the optional `heif` extra: without it, HEIC files are refused by name
    pass
else:
    register_heif_opener()

DEFAULT_MAX_PIXELS = 50_000_000  # ~7000 x 7000; a decoded RGBA image of that size is 200 MB


# Errors Pillow raises for a file it recognised but could not parse or decode.
CORRUPT_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, zlib.error)


@dataclass(frozen=True)
class ImageHeader:
    format: str  # Pillow's format name: "JPEG", "MPO", "PNG", "WEBP", ...
    width: int  # as stored, before EXIF orientation
    height: int
    mode: str  # Pillow mode as opened: "RGB", "L", "CMYK", "P", ...
    orientation: int  # EXIF orientation 1..8; 1 when absent or unreadable
    progressive: bool  # JPEG/MPO only
    # JPEG/MPO in YCbCr: luma pixels per chroma sample, (across, down): (2, 2) is 4:2:0, (2, 1) 4:2:2
    chroma: tuple[int, int] = (1, 1)


def read_header(data: bytes, max_pixels: int, formats: frozenset[str] = DEFAULT_FORMATS) -> ImageHeader:
    """Parses headers only (no pixel decoding) of an encoded image.

    `max_pixels` caps width x height of the image and of any frame a container holds; `formats`
    are Pillow format names. Raises InputError with kind `format_refused` (a known format outside
    `formats`, refused before its decoder runs), `too_large` (over `max_pixels`), `not_an_image`
    or `unreadable` (a corrupt header). Broken metadata is dropped, as `decode_image` drops it."""
    with pixel_cap(max_pixels):
        try:
            return _header(data, formats)
        except InputError as error:
            stripped = without_metadata(data) if error.kind == "unreadable" else None
            if stripped is None or stripped == data:
                raise
            try:
                return _header(stripped, formats)
            except InputError:
                raise error from None


def _header(data: bytes, formats: frozenset[str]) -> ImageHeader:
    image, _ = open_image(data, formats)
    with image:
        return header_of(image)


def header_of(image: ImageFile.ImageFile) -> ImageHeader:
    """The header of an image opened by `open_image`, from what has been parsed so far."""
    width, height = image.size
    jpeg = image.format in ("JPEG", "MPO")
    progressive = jpeg and bool(image.info.get("progressive"))
    chroma = chroma_subsampling(image) if jpeg else (1, 1)
    return ImageHeader(image.format or "", width, height, image.mode, orientation(image), progressive, chroma)


def chroma_subsampling(image: ImageFile.ImageFile) -> tuple[int, int]:
    """(across, down) luma pixels per chroma sample of an opened 3-component JPEG whose two
    chroma components share one sampling (Pillow's `layer`: id, h, v, table per component);
    (1, 1) for any other."""
    layer = getattr(image, "layer", None)
    if image.mode != "RGB" or not layer or len(layer) != 3:
        return (1, 1)
    (_, h, v, _), (_, ch, cv, _), rest = layer[0], layer[1], layer[2]
    if (ch, cv) != tuple(rest[1:3]) or h % ch or v % cv:
        return (1, 1)
    return (h // ch, v // cv)


def orientation(image: Image.Image) -> int:
    """EXIF orientation 1..8 of an opened image; 1 when absent, out of range or unreadable.

    Never raises: broken metadata must not cost the pixels. Reads only metadata parsed so far (the
    base class's getexif: PNG's own would decode the pixels to look for a trailing eXIf chunk)."""
    try:
        value = Image.Image.getexif(image).get(ExifTags.Base.Orientation, 1)
    except Exception:  # any parser error in any format's metadata: the image stays upright
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def open_image(data: bytes, formats: Iterable[str] = DEFAULT_FORMATS) -> tuple[ImageFile.ImageFile, int]:
    """Open (parse the headers of) an image whose format is in `formats`; call it inside
    `pixel_cap`, which also bounds the decoder's own buffers (`worker.decode_cost`). Returns the
    image and the bytes its decoder holds besides the decoded pixels (`check_cost`). Raises
    InputError as `read_header` does."""
    allowed = frozenset(formats)
    container = container_format(data)  # HEIC and AVIF share one container: judged before any plugin
    if container is not None and container not in allowed:
        raise _refused(container, allowed)
    buffer = io.BytesIO(data)
    try:
        image = Image.open(buffer, formats=[container] if container else _pillow_formats(allowed))
    except Image.DecompressionBombError as e:
        raise InputError("too_large", str(e)) from None
    except UnidentifiedImageError:
        raise _unidentified(data, allowed) from None
    except CORRUPT_ERRORS as e:
        raise InputError("unreadable", f"corrupt image header: {e}") from None
    if image.format not in allowed:  # JPEG's plugin opens MPO files too
        image.close()
        raise _refused(image.format or "unknown", allowed)
    try:
        working = check_cost(image, data, _cap.get())
    except InputError:
        image.close()
        raise
    return image, working


# -- the pixel cap inside Pillow ------------------------------------------------------------------

_cap: contextvars.ContextVar[int | None] = contextvars.ContextVar("kiln_pixel_cap", default=None)
_pillow_bomb_check = Image._decompression_bomb_check


@contextmanager
def pixel_cap(max_pixels: int) -> Iterator[None]:
    """Within this block (in this thread), Pillow refuses to open or allocate any image or frame
    of more than `max_pixels` pixels, raising `Image.DecompressionBombError`."""
    token = _cap.set(max_pixels)
    try:
        yield
    finally:
        _cap.reset(token)


def _bomb_check(size: tuple[int, int], *, error_only: bool = False) -> None:
    # Pillow calls this hook for every image and every inner frame it is about to allocate (an
    # ICO's embedded PNG, a GIF frame, a TIFF tile). Its own limit is one process-wide number, and
    # disabling it to apply kiln's per-call cap disabled the inner checks too; a per-thread cap
    # keeps every check and applies kiln's limit exactly, with no warnings band.
    cap = _cap.get()
    if cap is None:  # Pillow before 12 has no `error_only`, and calls the hook without it
        _pillow_bomb_check(size, error_only=True) if error_only else _pillow_bomb_check(size)
        return
    width, height = abs(size[0]), abs(size[1])
    if width * height > cap:
        raise Image.DecompressionBombError(f"image is {width}x{height} pixels, over the limit of {cap} pixels")


Image._decompression_bomb_check = _bomb_check


# -- formats --------------------------------------------------------------------------------------


def known_formats() -> frozenset[str]:
    """Format names this Pillow can open (with every plugin loaded), MPO included."""
    Image.init()
    return frozenset(Image.OPEN) | {"MPO"}


def _pillow_formats(allowed: frozenset[str]) -> list[str]:
    Image.init()
    names = allowed | ({"JPEG"} if "MPO" in allowed else set())  # MPO files open through JPEG's plugin
    return sorted(name for name in names if name in Image.OPEN)


def _unidentified(data: bytes, allowed: frozenset[str]) -> InputError:
    """Why no allowed plugin opened the file: judged from its signature alone."""
    matches = signature_formats(data)
    if any(name in allowed or (name == "JPEG" and "MPO" in allowed) for name in matches):
        return InputError("unreadable", f"corrupt {matches[0]} header")
    if matches:
        return _refused(matches[0], allowed)
    if not data:
        return InputError("not_an_image", "an empty file (0 bytes)")
    return InputError("not_an_image", "not an image in any format kiln reads")


def _refused(name: str, allowed: frozenset[str]) -> InputError:
    hint = " (install kiln[heif] for it)" if name == "HEIF" and "HEIF" not in known_formats() else ""
    return InputError(
        "format_refused",
        f"{name} image: not among the formats this worker decodes ({', '.join(sorted(allowed))}){hint}; "
        "see KILN_FORMATS",
    )
