"""Decoding real photos into the package's input: formats, modes, orientation, hostile files."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from compile.models import LITE0_PREPROCESS
from worker.contract import InputError
from worker.manifest import Preprocess
from worker.preprocess import decode_image

PREP = LITE0_PREPROCESS


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def chelsea(sample_photos) -> Image.Image:
    return Image.open(sample_photos["chelsea"]).convert("RGB")


def test_jpeg_photo_becomes_a_centre_crop(sample_photos):
    pixels = decode_image(sample_photos["chelsea"].read_bytes(), PREP)
    assert pixels.shape == (224, 224, 3) and pixels.dtype == np.uint8
    assert 40 < pixels.mean() < 220  # a real picture, not a blank


def test_same_pixels_as_resize_then_crop(chelsea):
    """The one-step resample of the crop region equals resizing the whole image, then cropping
    (on a size where the two-step path's crop offsets are whole pixels, so both sample alike)."""
    source = chelsea.resize((600, 512), Image.Resampling.BICUBIC)  # -> 300 x 256, crop offsets 38, 16
    resized = source.resize((300, 256), Image.Resampling.BICUBIC)
    reference = np.asarray(resized.crop((38, 16, 38 + 224, 16 + 224)), dtype=np.int16)
    difference = np.abs(decode_image(encode(source, "PNG"), PREP).astype(np.int16) - reference)
    assert difference.max() <= 2 and difference.mean() < 0.5


def test_large_jpeg_uses_draft_and_keeps_the_content(chelsea):
    big = chelsea.resize((chelsea.width * 6, chelsea.height * 6), Image.Resampling.BICUBIC)
    small = decode_image(encode(chelsea, "JPEG", quality=95), PREP).astype(np.int16)
    drafted = decode_image(encode(big, "JPEG", quality=95), PREP).astype(np.int16)
    assert np.abs(drafted - small).mean() < 8


def test_exif_orientation_is_applied(chelsea):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    stored = chelsea.transpose(Image.Transpose.ROTATE_90)  # what a camera would store for that tag
    rotated = decode_image(encode(stored, "JPEG", quality=95, exif=exif.tobytes()), PREP).astype(np.int16)
    upright = decode_image(encode(chelsea, "JPEG", quality=95), PREP).astype(np.int16)
    assert np.abs(rotated - upright).mean() < 6
    unrotated = decode_image(encode(stored, "JPEG", quality=95), PREP).astype(np.int16)
    assert np.abs(unrotated - upright).mean() > 20


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("L", "PNG"), ("P", "PNG"), ("RGBA", "PNG"), ("LA", "PNG"), ("CMYK", "JPEG"), ("1", "PNG"), ("RGB", "WEBP")],
)
def test_every_mode_becomes_rgb(chelsea, mode, fmt):
    pixels = decode_image(encode(chelsea.convert(mode), fmt), PREP)
    assert pixels.shape == (224, 224, 3)


def test_sixteen_bit_greyscale_is_scaled_not_clipped(chelsea):
    grey = np.asarray(chelsea.convert("L"), dtype=np.uint16) * 257  # full 16-bit range
    pixels = decode_image(encode(Image.fromarray(grey), "PNG"), PREP)
    eight_bit = decode_image(encode(chelsea.convert("L"), "PNG"), PREP)
    assert np.abs(pixels.astype(np.int16) - eight_bit.astype(np.int16)).max() <= 1
    assert pixels.min() < 100  # a clipping convert() would make it almost all 255


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (300, 300), (0, 0, 0, 0))
    pixels = decode_image(encode(image, "PNG"), PREP)
    assert (pixels == 255).all()


def test_decompression_bomb_is_refused_before_decoding():
    bomb = encode(Image.new("1", (20_000, 20_000)), "PNG")  # 400 M pixels in a few kB
    assert len(bomb) < 200_000
    with pytest.raises(InputError, match="20000x20000 pixels") as caught:
        decode_image(bomb, PREP, max_pixels=50_000_000)
    assert caught.value.kind == "too_large"


def test_truncated_jpeg_is_unreadable(sample_photos):
    data = sample_photos["coffee"].read_bytes()
    with pytest.raises(InputError) as caught:
        decode_image(data[: len(data) // 3], PREP)
    assert caught.value.kind == "unreadable"


@pytest.mark.parametrize("data", [b"", b"hello, not an image", b"%PDF-1.4 " + bytes(range(256)) * 20])
def test_non_images_are_refused(data):
    with pytest.raises(InputError) as caught:
        decode_image(data, PREP)
    assert caught.value.kind == "not_an_image"


def test_tiny_images_are_upscaled():
    pixels = decode_image(encode(Image.new("RGB", (3, 5), (10, 200, 30)), "PNG"), PREP)
    assert pixels.shape == (224, 224, 3) and tuple(pixels[100, 100]) == (10, 200, 30)


def test_crop_larger_than_resize_is_rejected_in_the_manifest():
    with pytest.raises(ValueError, match="must not exceed"):
        Preprocess(resize=100, crop=200, mean=(0, 0, 0), std=(1, 1, 1))


def test_refused_images_and_retried_ones_leave_no_reference_cycle():
    """The error held the frame that held the error (and the image's bytes), and Pillow's chained
    errors hold their frames: each refused image waited for the garbage collector, +6.4 MB a
    truncated camera PNG, and +190 MB a 97 MB PNG whose retry without its metadata succeeded
    (hostile testers' findings)."""
    import gc

    from PIL import PngImagePlugin

    buffer = io.BytesIO()
    Image.new("RGB", (640, 480), (10, 20, 30)).save(buffer, "PNG")
    truncated = buffer.getvalue()[:200]
    text = PngImagePlugin.PngInfo()
    text.add_text("comment", "x" * (PngImagePlugin.MAX_TEXT_CHUNK + 1), zip=True)  # Pillow refuses it
    buffer = io.BytesIO()
    Image.new("RGB", (640, 480), (10, 20, 30)).save(buffer, "PNG", pnginfo=text)
    too_much_text = buffer.getvalue()
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            try:
                decode_image(truncated, LITE0_PREPROCESS)
            except InputError as e:
                assert e.kind == "unreadable"
            assert decode_image(too_much_text, LITE0_PREPROCESS).shape == (224, 224, 3)  # without its text
        unreachable = gc.collect()
    finally:
        gc.enable()
    assert unreachable == 0
