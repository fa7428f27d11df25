"""Decode image bytes into the package's input on the CPU: Pillow, driven by the manifest.

The output is a `crop x crop x 3` uint8 RGB array; normalisation happens inside the compiled
package, so this module never touches floats and needs no torch.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from worker.contract import InputError
from worker.manifest import Preprocess

DEFAULT_MAX_PIXELS = 50_000_000  # ~7000 x 7000; a decoded RGB image of that size is 150 MB

# kiln checks the pixel count itself (`max_pixels`, from the settings) right after reading the
# header; Pillow's own global limit would otherwise override that setting in both directions.
Image.MAX_IMAGE_PIXELS = None

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


DEFAULT_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF"})


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, read before any pixels are decoded."""

    format: str  # Pillow's format name: "JPEG", "MPO", "PNG", ...
    width: int  # as stored, before EXIF orientation
    height: int
    mode: str  # Pillow's mode as opened: "RGB", "L", "CMYK", ...
    orientation: int  # EXIF orientation 1..8; 1 when absent or unreadable
    progressive: bool  # JPEG and MPO only


def _openers(formats: frozenset[str]) -> list[str]:
    """Pillow's openers for `formats`: MPO has none of its own (the JPEG opener returns MPOs)."""
    Image.init()
    return [f for f in sorted(formats) if f in Image.OPEN]


def read_header(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, formats: frozenset[str] = DEFAULT_FORMATS
) -> ImageHeader:
    """Parse an image's header (no pixel decoding). Raises `InputError`: `not_an_image`,
    `unreadable`, or `too_large` past `max_pixels`."""
    try:
        image = Image.open(io.BytesIO(data), formats=_openers(formats))
        width, height = image.size
        if width * height > max_pixels:
            raise InputError("too_large", f"image is {width}x{height} pixels, over the limit of {max_pixels} pixels")
        try:
            orientation = int(image.getexif().get(0x0112, 1))
        except Exception:  # broken EXIF must not cost the pixels
            orientation = 1
        progressive = bool(image.info.get("progressive") or image.info.get("progression"))
        return ImageHeader(
            image.format, width, height, image.mode, orientation if 1 <= orientation <= 8 else 1, progressive
        )
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError("not_an_image", "not an image in any format Pillow can read") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InputError("unreadable", f"corrupt or truncated image: {e}") from None


def decode_image(
    data: bytes, prep: Preprocess, max_pixels: int = DEFAULT_MAX_PIXELS, formats: frozenset[str] = DEFAULT_FORMATS
) -> np.ndarray:
    """Bytes of an image in one of `formats` -> `crop x crop x 3` uint8 RGB, per `prep`."""
    try:
        image = Image.open(io.BytesIO(data), formats=_openers(formats))
        width, height = image.size
        if width * height > max_pixels:
            raise InputError("too_large", f"image is {width}x{height} pixels, over the limit of {max_pixels} pixels")
        if image.format == "JPEG":
            # Decode at 1/2, 1/4 or 1/8 scale when the short side stays >= the resize target.
            image.draft("RGB", (prep.resize, prep.resize))
        image.load()
        image = ImageOps.exif_transpose(image)
        image = _to_rgb(image)
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError("not_an_image", "not an image in any format Pillow can read") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InputError("unreadable", f"corrupt or truncated image: {e}") from None
    return np.asarray(_resize_and_crop(image, prep))


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        # 16-bit (and 32-bit) greyscale: Pillow's own convert() would clip instead of scaling.
        pixels = np.asarray(image, dtype=np.float32)
        if mode != "F":
            pixels = pixels / 257.0
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "L")
    elif mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        # Transparent pixels often hold arbitrary colour: show them on white, as viewers do.
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image if image.mode == "RGB" else image.convert("RGB")


def _resize_and_crop(image: Image.Image, prep: Preprocess) -> Image.Image:
    """Resize the short side to `prep.resize`, then take the centre `prep.crop` square, as one
    resampling of the source region that the crop covers: the same pixels, without resizing the
    parts the crop throws away."""
    width, height = image.size
    scale = prep.resize / min(width, height)
    side = prep.crop / scale
    left, top = (width - side) / 2, (height - side) / 2
    return image.resize((prep.crop, prep.crop), _RESAMPLE[prep.interpolation], box=(left, top, left + side, top + side))
