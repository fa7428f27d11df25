"""Decode image bytes into the package's input on the CPU: Pillow, driven by the manifest.

The output is a `crop x crop x 3` uint8 RGB array; normalisation happens inside the compiled
package, so this module never touches floats and needs no torch.

Memory: the decoded image is the only full-size buffer. The centre region the crop needs is
reduced by an integer factor strip by strip (each strip converted to RGB, or premultiplied RGBA
for transparent images, on its own), then resampled and turned upright at the output size. So a
7000 x 7000 RGBA PNG costs its 196 MB of decoded pixels and a few MB more, not five copies.
"""

from __future__ import annotations

import contextlib
import math
import traceback
from collections.abc import Iterable

import numpy as np
from PIL import Image

from worker.budget import MemoryBudget
from worker.contract import InputError
from worker.malloc import LARGE_BLOCK, release_freed_memory, return_freed_images
from worker.manifest import Preprocess
from worker.metadata import without_metadata
from worker.probe import CORRUPT_ERRORS, DEFAULT_FORMATS, DEFAULT_MAX_PIXELS, open_image, orientation, pixel_cap

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
_SUPPORT = {"nearest": 0.5, "bilinear": 1.0, "bicubic": 2.0, "lanczos": 3.0}  # filter radius, output pixels

_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# The last resampling step shrinks by at least this much after the integer reduction: Pillow's
# `reducing_gap`, where 3 is "indistinguishable from fair resampling in most cases".
REDUCING_GAP = 3.0
STRIP_PIXELS = 1 << 20  # source pixels converted at a time: 4 MB of RGBA

return_freed_images()  # every process that decodes: see worker.malloc

_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "I;16": 2, "I;16B": 2, "I;16L": 2, "RGB": 3}


def decode_image(
    data: bytes,
    prep: Preprocess,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    formats: Iterable[str] = DEFAULT_FORMATS,
    budget: MemoryBudget | None = None,
) -> np.ndarray:
    """Encoded image bytes -> `crop x crop x 3` uint8 RGB array, per `prep`, upright per EXIF.

    Only `formats` (Pillow names) are decoded, and nothing of more than `max_pixels` pixels. With
    a `budget`, the decoded pixels and the decoder's own buffers are held against it while they
    exist. Broken metadata is dropped, not fatal. Raises InputError: `format_refused`, `too_large`,
    `not_an_image`, `unreadable`."""
    with pixel_cap(max_pixels):
        result = _attempt(data, prep, formats, budget)
        if isinstance(result, InputError):
            stripped = without_metadata(data)
            if stripped is not None and stripped != data:
                try:
                    retried = _attempt(stripped, prep, formats, budget)
                except InputError as e:  # refused another way: the first error says what is wrong
                    traceback.clear_frames(e.__traceback__)
                    retried = result
                result = retried if isinstance(retried, np.ndarray) else result
            del stripped
            release_freed_memory()  # what the failed decodes held is free now
    if isinstance(result, np.ndarray):
        return result
    try:
        raise result
    finally:
        del result  # its traceback holds this frame: the frame must not hold it too


def _attempt(
    data: bytes, prep: Preprocess, formats: Iterable[str], budget: MemoryBudget | None
) -> np.ndarray | InputError:
    """`_decode`, or the `unreadable` InputError it failed with (others are raised). A failure's
    frames are cleared first: they held the image's bytes and buffers, and Pillow's chained
    exceptions hold their frames, so until the garbage collector ran each refused image stayed
    in memory (+6.4 MB a truncated camera PNG, +190 MB a 97 MB PNG whose retry without its
    metadata succeeded: hostile testers' findings)."""
    try:
        return _decode(data, prep, formats, budget)
    except InputError as e:
        if e.kind != "unreadable":
            raise
        traceback.clear_frames(e.__traceback__)
        return e.with_traceback(None)
    except Image.DecompressionBombError as e:
        raise InputError("too_large", str(e)) from None
    except CORRUPT_ERRORS as e:
        traceback.clear_frames(e.__traceback__)
        return InputError("unreadable", f"corrupt or truncated image: {e}")


def _decode(data: bytes, prep: Preprocess, formats: Iterable[str], budget: MemoryBudget | None) -> np.ndarray:
    image, working = open_image(data, formats)  # working: a progressive JPEG's coefficients stay full size under draft
    with image:
        if image.format in ("JPEG", "MPO"):
            # Decode at 1/2, 1/4 or 1/8 scale when the short side stays >= the resize target.
            image.draft("RGB", (prep.resize, prep.resize))
        decoded_bytes = image.width * image.height * _BYTES_PER_PIXEL.get(image.mode, 4) + working
        with budget.hold(decoded_bytes) if budget else contextlib.nullcontext():
            image.load()
            small = _reduce_centre(image, prep)
            upright = orientation(image)
    del image  # its pixels go with it (leaving `with` closes the file only), before they are handed back
    if decoded_bytes > LARGE_BLOCK:  # where freed memory is kept for the model, not this image's
        release_freed_memory()
    method = _TRANSPOSE.get(upright)
    if method is not None:  # the centre square turns onto itself: turn the small result instead
        small = small.transpose(method)
    pixels = np.asarray(small)
    if small.mode == "RGBa":  # premultiplied: composite onto white, as viewers show transparency
        alpha = pixels[..., 3:].astype(np.int16)
        pixels = np.clip(pixels[..., :3] + (255 - alpha), 0, 255).astype(np.uint8)  # clip: bicubic overshoot
    return pixels


def _reduce_centre(image: Image.Image, prep: Preprocess) -> Image.Image:
    """The `crop x crop` centre of `image` resized so its short side is `prep.resize`: RGB, or
    premultiplied RGBa when the image has transparency."""
    width, height = image.size
    side = min(width, height) * prep.crop / prep.resize  # the source square the crop covers
    left, top = (width - side) / 2, (height - side) / 2
    scale = side / prep.crop  # source pixels per output pixel
    factor = max(1, int(scale / REDUCING_GAP))
    margin = _SUPPORT[prep.interpolation] * max(scale, 1.0) + 1  # pixels the filter reaches past the box
    x0, y0 = max(0, math.floor(left - margin)), max(0, math.floor(top - margin))
    x1, y1 = min(width, math.ceil(left + side + margin)), min(height, math.ceil(top + side + margin))
    mode = "RGBa" if _has_alpha(image) else "RGB"
    reduced = Image.new(mode, (-(-(x1 - x0) // factor), -(-(y1 - y0) // factor)))
    rows = factor * max(1, STRIP_PIXELS // ((x1 - x0) * factor))
    for y in range(y0, y1, rows):
        strip = _convert(image.crop((x0, y, x1, min(y + rows, y1))), mode)
        reduced.paste(strip.reduce(factor) if factor > 1 else strip, (0, (y - y0) // factor))
    box = ((left - x0) / factor, (top - y0) / factor, (left + side - x0) / factor, (top + side - y0) / factor)
    return reduced.resize((prep.crop, prep.crop), _RESAMPLE[prep.interpolation], box=box)


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info)


def _convert(strip: Image.Image, mode: str) -> Image.Image:
    """One strip of the decoded image in `mode` ("RGB" or "RGBa")."""
    if strip.mode in ("I", "F") or strip.mode.startswith("I;16"):
        # 16-bit (and 32-bit) greyscale: Pillow's own convert() would clip instead of scaling.
        pixels = np.asarray(strip, dtype=np.float32)
        if strip.mode != "F":
            pixels = pixels / 257.0
        strip = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "L")
    if mode == "RGBa":
        return strip.convert("RGBA").convert("RGBa")
    return strip if strip.mode == "RGB" else strip.convert("RGB")
