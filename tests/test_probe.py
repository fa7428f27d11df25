"""Reading an image's header without decoding it: the contract the decode paths route on."""

from __future__ import annotations

import io
import os

import pytest
from hostile import gif_with_large_frame, icon_directory, png_bomb
from PIL import Image, PngImagePlugin

from worker.contract import InputError
from worker.probe import DEFAULT_FORMATS, DEFAULT_MAX_PIXELS, ImageHeader, read_header

CAP = 50_000_000


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def kind_of(data: bytes, formats: frozenset[str] = DEFAULT_FORMATS, max_pixels: int = CAP) -> str:
    with pytest.raises(InputError) as caught:
        read_header(data, max_pixels, formats)
    return caught.value.kind


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.linear_gradient("L").resize((640, 480)).convert("RGB")


@pytest.mark.parametrize(
    ("fmt", "mode"),
    [("JPEG", "RGB"), ("JPEG", "CMYK"), ("JPEG", "L"), ("PNG", "P"), ("PNG", "RGBA"), ("PNG", "I;16"),
     ("WEBP", "RGB"), ("GIF", "P"), ("BMP", "RGB"), ("TIFF", "RGB"), ("TIFF", "CMYK"),
     ("AVIF", "RGB")],
)  # fmt: skip
def test_header_of_each_default_format(photo, fmt, mode):
    header = read_header(encode(photo.convert(mode), fmt), CAP, DEFAULT_FORMATS)
    chroma = (2, 2) if (fmt, mode) == ("JPEG", "RGB") else (1, 1)  # Pillow's default subsampling: 4:2:0
    assert header == ImageHeader(fmt, 640, 480, mode, 1, False, chroma)


def test_orientation_and_progression_of_a_camera_jpeg(photo):
    exif = Image.Exif()
    exif[0x0112] = 6
    header = read_header(encode(photo, "JPEG", exif=exif.tobytes(), progressive=True), CAP, DEFAULT_FORMATS)
    assert (header.width, header.height, header.orientation, header.progressive) == (640, 480, 6, True)
    exif[0x0112] = 99  # out of range: upright
    assert read_header(encode(photo, "JPEG", exif=exif.tobytes()), CAP, DEFAULT_FORMATS).orientation == 1


def test_garbage_exif_reads_as_upright(photo):
    for fmt in ("PNG", "JPEG", "WEBP"):
        header = read_header(encode(photo, fmt, exif=bytes(range(256)) * 2), CAP, DEFAULT_FORMATS)
        assert (header.format, header.orientation) == (fmt, 1)


def test_metadata_over_pillows_limits_is_dropped(photo):
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", os.urandom(800_000).hex(), zip=True)  # 1.6 MB of text: over Pillow's 1 MB limit
    header = read_header(encode(photo, "PNG", pnginfo=info), CAP, DEFAULT_FORMATS)
    assert (header.format, header.width, header.height) == ("PNG", 640, 480)
    jpeg = encode(photo, "JPEG")
    truncated_app = jpeg[:2] + b"\xff\xe0\x00\x08JFIF\x00\x01" + jpeg[2:]
    assert read_header(truncated_app, CAP, DEFAULT_FORMATS).format == "JPEG"


def test_mpo_is_its_own_format(photo):
    data = encode(photo, "MPO", save_all=True, append_images=[photo.rotate(90)])
    assert read_header(data, CAP, DEFAULT_FORMATS).format == "MPO"
    assert kind_of(data, frozenset({"JPEG"})) == "format_refused"  # an MPO is not let in as a JPEG
    assert kind_of(encode(photo, "JPEG"), frozenset({"MPO"})) == "format_refused"  # nor a JPEG as an MPO


def test_formats_outside_the_list_are_refused(photo):
    for fmt in ("ICO", "PPM", "PCX", "QOI", "JPEG2000", "SGI", "DDS", "EPS"):
        assert kind_of(encode(photo, fmt)) == "format_refused", fmt
    assert kind_of(encode(photo, "PNG"), frozenset({"JPEG"})) == "format_refused"
    assert read_header(encode(photo, "PPM"), CAP, DEFAULT_FORMATS | {"PPM"}).format == "PPM"


def test_heic_says_what_it_is():
    heic = b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(200)
    with pytest.raises(InputError, match="HEIF") as caught:
        read_header(heic, CAP, DEFAULT_FORMATS)
    assert caught.value.kind == "format_refused"


@pytest.mark.parametrize(
    ("name", "make", "fmt"),
    [("png", lambda b: b, "PNG"), ("ico", lambda b: icon_directory(1, b), "ICO"),
     ("gif frame", lambda b: gif_with_large_frame(40_000, 40_000), "GIF")],
)  # fmt: skip
def test_pixel_bombs_are_refused_from_the_header(name, make, fmt):
    assert kind_of(make(png_bomb(40_000, 40_000)), frozenset({fmt})) == "too_large"


def test_pixel_cap_is_exact():
    data = png_bomb(1000, 1000)
    assert read_header(data, 1_000_000, DEFAULT_FORMATS).width == 1000
    assert kind_of(data, max_pixels=999_999) == "too_large"


@pytest.mark.parametrize(
    ("data", "kind"),
    [(b"", "not_an_image"), (b"hello, not an image", "not_an_image"), (bytes(range(256)) * 4, "not_an_image"),
     (b"\x89PNG\r\n\x1a\n" + bytes(100), "unreadable"), (b"\xff\xd8\xff\xe0" + bytes(100), "unreadable")],
)  # fmt: skip
def test_not_images_and_broken_headers(data, kind):
    assert kind_of(data) == kind


def test_an_empty_file_says_so():
    with pytest.raises(InputError, match=r"an empty file \(0 bytes\)"):
        read_header(b"", DEFAULT_MAX_PIXELS)
