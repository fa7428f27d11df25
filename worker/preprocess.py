"""Decode image bytes into the package's input on the CPU: Pillow, driven by the manifest.

The output is a `crop x crop x 3` uint8 RGB array; normalisation happens inside the compiled
package, so this module never touches floats and needs no torch.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from PIL import Image

from worker.contract import InputError
from worker.manifest import Preprocess
from worker.probe import CORRUPT_ERRORS, DEFAULT_FORMATS, DEFAULT_MAX_PIXELS, open_image, orientation, pixel_cap

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def decode_image(
    data: bytes,
    prep: Preprocess,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    formats: Iterable[str] = DEFAULT_FORMATS,
) -> np.ndarray:
    """Encoded image bytes -> `crop x crop x 3` uint8 RGB array, per `prep`, upright per EXIF.

    Only `formats` (Pillow names) are decoded; nothing of more than `max_pixels` pixels is.
    Raises InputError: `format_refused`, `too_large`, `not_an_image`, `unreadable`."""
    with pixel_cap(max_pixels):
        try:
            with open_image(data, formats) as image:
                if image.format in ("JPEG", "MPO"):
                    # Decode at 1/2, 1/4 or 1/8 scale when the short side stays >= the resize target.
                    image.draft("RGB", (prep.resize, prep.resize))
                image.load()
                method = _TRANSPOSE.get(orientation(image))
                upright = image.transpose(method) if method is not None else image
                return np.asarray(_resize_and_crop(_to_rgb(upright), prep))
        except Image.DecompressionBombError as e:
            raise InputError("too_large", str(e)) from None
        except CORRUPT_ERRORS as e:
            raise InputError("unreadable", f"corrupt or truncated image: {e}") from None


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
