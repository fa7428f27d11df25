"""Files from the wild that tried to break decoding: formats nobody asked for, bombs inside
containers, memory-hungry images, broken metadata, camera MPOs and HEICs (issue 8, items 1-6)."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import python_env
from hostile import (
    ASCII_PBM,
    fits,
    gif_with_large_frame,
    icns,
    icon_directory,
    jpeg_scan_bomb,
    png_bomb,
    psd,
    tiff_bomb,
    tiff_in_one_tile,
)
from PIL import Image, PngImagePlugin

from compile.models import LITE0_PREPROCESS
from worker.contract import InputError
from worker.decode_cost import MAX_JPEG_SCANS, jpeg_scans
from worker.preprocess import decode_image
from worker.probe import DEFAULT_FORMATS, read_header

PREP = LITE0_PREPROCESS


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def kind_of(data: bytes, **options) -> str:
    with pytest.raises(InputError) as caught:
        decode_image(data, PREP, **options)
    return caught.value.kind


@pytest.fixture(scope="module")
def photo(sample_photos) -> Image.Image:
    return Image.open(sample_photos["chelsea"]).convert("RGB")


# -- 1. formats -----------------------------------------------------------------------------------


def test_formats_outside_the_list_are_refused_by_name(photo):
    files = {"PSD": psd(64, 48), "FITS": fits(64, 48), "PPM": ASCII_PBM, "ICO": encode(photo, "ICO"),
             "EPS": encode(photo, "EPS"), "JPEG2000": encode(photo, "JPEG2000")}  # fmt: skip
    for name, data in files.items():
        with pytest.raises(InputError, match=rf"^{name} image") as caught:
            decode_image(data, PREP)
        assert caught.value.kind == "format_refused"
    assert decode_image(files["PSD"], PREP, formats=DEFAULT_FORMATS | {"PSD"}).shape == (224, 224, 3)


def _every_writable_format() -> list[tuple[str, str]]:
    Image.init()
    readable = set(Image.OPEN) | {"MPO"}  # Pillow writes PDF and PALM but cannot read them
    return [(fmt, mode) for fmt in sorted(set(Image.SAVE) & readable) for mode in ("RGB", "L", "1", "P", "RGBA")]


@pytest.mark.parametrize(("fmt", "mode"), _every_writable_format())
def test_every_format_pillow_reads_is_named_by_its_signature(fmt, mode):
    """Each format Pillow (and pillow-heif) writes and reads, in each mode it writes: decoded when
    allowed, else refused with its own name (not another format's, not `not_an_image`)."""
    try:
        data = encode(Image.new(mode, (64, 48), 90), fmt)
    except (OSError, ValueError, KeyError):
        pytest.skip(f"Pillow does not write {mode} as {fmt}")
    if fmt in DEFAULT_FORMATS:
        assert decode_image(data, PREP).shape == (224, 224, 3)
        return
    with pytest.raises(InputError, match=rf"^{fmt} image") as caught:
        decode_image(data, PREP)
    assert caught.value.kind == "format_refused"
    if fmt not in ("EPS", "HEIF"):  # Ghostscript, and the optional extra's plugin, may be absent
        assert decode_image(data, PREP, formats=DEFAULT_FORMATS | {fmt}).shape == (224, 224, 3)


def test_formats_without_a_writer_are_named_too():
    files = {
        "IMT": b"width 64\nheight 48\npixel n8\n\x0c" + bytes(64 * 48),
        "IPTC": b"\x1c\x02\x00\x00\x02\x00\x02" + bytes(100),
        "PCD": bytes(2048) + b"PCD_IPI" + bytes(4096),
    }
    for name, data in files.items():
        with pytest.raises(InputError, match=rf"^{name} image") as caught:
            decode_image(data, PREP)
        assert caught.value.kind == "format_refused", name
    for noise in (os.urandom(4096), bytes(range(256)) * 16, b"hello\n" * 100):
        assert kind_of(noise) == "not_an_image"


def test_heic_with_a_generic_brand_is_refused_as_heic_not_broken(photo):
    """`mif1`/`msf1` major brands (Android phones, libheif) name no codec: the coded item type does,
    so the allowed AVIF plugin never gets a HEVC file and an AVIF so branded still decodes."""
    pytest.importorskip("pillow_heif", reason="the `heif` extra is not installed")
    heic, avif = encode(photo, "HEIF"), encode(photo, "AVIF")
    for brand in (b"mif1", b"msf1"):
        with pytest.raises(InputError, match=r"^HEIF image") as caught:
            decode_image(heic[:8] + brand + heic[12:], PREP)
        assert caught.value.kind == "format_refused"
        assert decode_image(avif[:8] + brand + avif[12:], PREP).shape == (224, 224, 3)


def test_eps_never_reaches_ghostscript(photo, tmp_path, monkeypatch):
    """Pillow opens EPS through Ghostscript when `gs` is on the PATH: a stand-in `gs` that leaves a
    mark shows that no decoder ran."""
    mark = tmp_path / "gs-ran"
    gs = tmp_path / "bin" / "gs"
    gs.parent.mkdir()
    gs.write_text(f"#!/bin/sh\ntouch {mark}\nexit 1\n")
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{gs.parent}{os.pathsep}{os.environ['PATH']}")
    assert kind_of(encode(photo, "EPS")) == "format_refused"
    assert not mark.exists()


# -- 2. bombs behind another header ---------------------------------------------------------------


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return png_bomb(40_000, 40_000)  # 1.6 G pixels in 195 kB


@pytest.mark.parametrize(
    ("fmt", "wrap"),
    [("ICO", lambda b: icon_directory(1, b)), ("ICNS", icns), ("GIF", lambda b: gif_with_large_frame(40_000, 40_000)),
     ("TIFF", lambda b: tiff_bomb(40_000, 40_000)), ("PNG", lambda b: b)],
)  # fmt: skip
def test_no_container_decodes_past_the_pixel_cap(bomb, fmt, wrap):
    """An ICO whose directory says 16x16 but holds a 40000x40000 PNG, an Apple icon, a GIF frame
    larger than its screen, a TIFF page: refused before the pixels exist, even where the format
    itself is allowed."""
    with pytest.raises(InputError, match="40000x40000 pixels") as caught:
        decode_image(wrap(bomb), PREP, max_pixels=50_000_000, formats={fmt})
    assert caught.value.kind == "too_large"


# -- 3. memory per image --------------------------------------------------------------------------

PEAK = """
import contextlib
import sys
from worker.contract import InputError
from worker.preprocess import decode_image
from compile.models import LITE0_PREPROCESS
def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))
data = open(sys.argv[1], "rb").read()
decode_image(open(sys.argv[2], "rb").read(), LITE0_PREPROCESS)  # imports and first-use allocations
before = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak (VmHWM) to the current size
with contextlib.suppress(InputError):  # refused: what it cost up to then counts
    decode_image(data, LITE0_PREPROCESS, formats=sys.argv[3].split(","))
print(status("VmHWM:") - before)
"""


@pytest.fixture(scope="module")
def large_images(tmp_path_factory, photo) -> dict[str, object]:
    """7000 x 7000 images (49 M pixels, under the default cap) that compress to little."""
    folder = tmp_path_factory.mktemp("large")
    size = (7000, 7000)
    gradient = Image.linear_gradient("L").resize(size)
    exif = Image.Exif()
    exif[0x0112] = 6
    images = {
        "rgba.png": (Image.new("RGBA", size, (200, 30, 30, 128)), "PNG", {}),
        "rgb-rotated.png": (Image.merge("RGB", (gradient, gradient, gradient)), "PNG", {"exif": exif.tobytes()}),
        "palette-transparent.png": (gradient.convert("P"), "PNG", {"transparency": 0}),
        "grey16.png": (Image.fromarray(np.asarray(gradient, dtype=np.uint16) * 257), "PNG", {}),
        "cmyk.tif": (Image.new("CMYK", size, (10, 200, 30, 0)), "TIFF", {"compression": "tiff_deflate"}),
        # Decoder buffers the decoded size does not show (refused past the cap, budgeted under it):
        "progressive-cmyk.jpg": (Image.new("CMYK", size, (10, 200, 30, 0)), "JPEG", PROGRESSIVE_444),
        "progressive-cmyk-4500.jpg": (Image.new("CMYK", (4500, 4500), (10, 200, 30, 0)), "JPEG", PROGRESSIVE_444),
        "rgb.webp": (Image.merge("RGB", (gradient, gradient, gradient)), "WEBP", {}),
        "rgb-4000.webp": (Image.merge("RGB", (gradient, gradient, gradient)).resize((4000, 4000)), "WEBP", {}),
    }
    paths = {}
    for name, (image, fmt, options) in images.items():
        image.save(folder / name, fmt, **options)
        paths[name] = folder / name
    for name, tile in (("tile-bomb.tif", 16384), ("tile-7000.tif", 7000)):  # a 64x64 image in one large tile
        (folder / name).write_bytes(tiff_in_one_tile(64, tile))
        paths[name] = folder / name
    (folder / "small.jpg").write_bytes(encode(photo, "JPEG"))
    return {"paths": paths, "small": folder / "small.jpg"}


PROGRESSIVE_444 = {"progressive": True, "subsampling": 0, "quality": 90}
HEAVY = [
    "progressive-cmyk.jpg",
    "progressive-cmyk-4500.jpg",
    "rgb.webp",
    "rgb-4000.webp",
    "tile-bomb.tif",
    "tile-7000.tif",
]


@pytest.mark.parametrize(
    "name", ["rgba.png", "rgb-rotated.png", "palette-transparent.png", "grey16.png", "cmyk.tif", *HEAVY]
)
def test_one_decode_raises_the_peak_memory_by_less_than_300_mb(large_images, name):
    """The issue's 7000x7000 RGBA PNG took ~750 MB: full-size copies for the orientation, the
    alpha compositing and the conversions, before the resize."""
    path = large_images["paths"][name]
    done = subprocess.run(
        [sys.executable, "-c", PEAK, str(path), str(large_images["small"]), ",".join(DEFAULT_FORMATS)],
        capture_output=True, text=True, env=python_env(), timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    peak_mb = int(done.stdout) / 2**20
    print(f"{name}: peak +{peak_mb:.0f} MB")
    assert peak_mb < 300


def test_transparent_images_reduced_first_match_compositing_first(photo):
    """Reducing premultiplied pixels and then compositing onto white gives what compositing the
    full image first gives."""
    rgba = photo.resize((2000, 1500)).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    flat = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    got = decode_image(encode(rgba, "PNG"), PREP).astype(np.int16)
    expected = decode_image(encode(flat, "PNG"), PREP).astype(np.int16)
    assert np.abs(got - expected).max() <= 3


# -- 4. broken metadata ---------------------------------------------------------------------------


def _jpeg_with_segment(data: bytes, marker: int, payload: bytes) -> bytes:
    return data[:2] + bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]


def _png_with_text(image: Image.Image, *chunks: tuple[str, str, bool]) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value, international in chunks:
        (info.add_itxt if international else info.add_text)(key, value, zip=True)
    return encode(image, "PNG", pnginfo=info)


GARBAGE = bytes(range(256)) * 2


def _big_text() -> str:
    return os.urandom(800_000).hex()  # 1.6 MB: over Pillow's 1 MB text limit, compresses to ~0.9 MB


# name -> image -> (the file with broken metadata, the same pixels without metadata)
BROKEN_METADATA = {
    "png garbage exif": lambda im: (encode(im, "PNG", exif=GARBAGE), encode(im, "PNG")),
    "png big zTXt": lambda im: (_png_with_text(im, ("comment", _big_text(), False)), encode(im, "PNG")),
    "png big iTXt": lambda im: (_png_with_text(im, ("comment", _big_text(), True)), encode(im, "PNG")),
    "png big iCCP": lambda im: (encode(im, "PNG", icc_profile=os.urandom(8) + bytes(2_000_000)), encode(im, "PNG")),
    "png 70 MB of text": lambda im: (
        _png_with_text(im, *((f"k{i}", "x" * 1_000_000, False) for i in range(70))),
        encode(im, "PNG"),
    ),
    "jpeg garbage exif": lambda im: (encode(im, "JPEG", exif=GARBAGE), encode(im, "JPEG")),
    "jpeg truncated JFIF": lambda im: (_jpeg_with_segment(encode(im, "JPEG"), 0xE0, b"JFIF\0\x01"), encode(im, "JPEG")),
    "jpeg truncated Adobe": lambda im: (_jpeg_with_segment(encode(im, "JPEG"), 0xEE, b"Adobe\0"), encode(im, "JPEG")),
    "jpeg garbage MPF": lambda im: (
        _jpeg_with_segment(encode(im, "JPEG"), 0xE2, b"MPF\0MM\0*\0\0\0\x08" + GARBAGE),
        encode(im, "JPEG"),
    ),
    "webp garbage exif": lambda im: (
        encode(im, "WEBP", lossless=True, exif=GARBAGE),
        encode(im, "WEBP", lossless=True),
    ),
    "tiff garbage icc": lambda im: (encode(im, "TIFF", icc_profile=GARBAGE), encode(im, "TIFF")),
}


@pytest.mark.parametrize("name", list(BROKEN_METADATA))
def test_broken_metadata_does_not_cost_the_pixels(photo, name):
    broken, clean = BROKEN_METADATA[name](photo.resize((400, 300)))
    assert np.array_equal(decode_image(broken, PREP), decode_image(clean, PREP))


def test_truly_corrupt_files_stay_unreadable(photo):
    png = encode(photo, "PNG")
    idat = png.index(b"IDAT")
    assert kind_of(png[: idat + 100]) == "unreadable"  # pixel data cut short: stripping metadata cannot help
    assert kind_of(png[:idat] + b"IDAT" + bytes(1000) + png[idat + 1004 :]) == "unreadable"


# -- 5. MPO ---------------------------------------------------------------------------------------


def test_camera_mpo_is_drafted_like_a_jpeg(photo):
    """The MPO's first frame is the same JPEG stream: with `draft` it decodes to the same pixels."""
    large = photo.resize((3000, 2000))
    mpo = encode(large, "MPO", save_all=True, append_images=[large.rotate(5)], quality=90)
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    assert np.array_equal(decode_image(mpo, PREP), decode_image(encode(large, "JPEG", quality=90), PREP))


# -- 6. HEIC/HEIF ---------------------------------------------------------------------------------


def test_heic_is_named_and_decoded_where_allowed(photo):
    pytest.importorskip("pillow_heif", reason="the `heif` extra is not installed")
    heic = encode(photo, "HEIF", quality=95)
    with pytest.raises(InputError, match=r"^HEIF image") as caught:
        decode_image(heic, PREP)
    assert caught.value.kind == "format_refused"
    pixels = decode_image(heic, PREP, formats=DEFAULT_FORMATS | {"HEIF"}).astype(np.int16)
    assert np.abs(pixels - decode_image(encode(photo, "PNG"), PREP)).mean() < 4


@pytest.mark.parametrize(
    ("name", "refused"),
    [("progressive-cmyk.jpg", "multi-scan JPEG's coefficients"), ("rgb.webp", "WEBP's decoder copies"),
     ("tile-bomb.tif", "tiles of 16384x16384"), ("progressive-cmyk-4500.jpg", None), ("rgb-4000.webp", None),
     ("tile-7000.tif", None)],
)  # fmt: skip
def test_decoder_buffers_count_against_the_pixel_cap(large_images, name, refused):
    """A progressive JPEG's coefficients (2 bytes x 64 per block of every component, whatever the
    draft scale), a TIFF tile larger than its image, WebP's frame copies: past what an RGBA image
    at the pixel cap takes, refused from the headers; under it, decoded (and budgeted)."""
    data = large_images["paths"][name].read_bytes()
    if refused is None:
        assert decode_image(data, PREP).shape == (224, 224, 3)
        return
    for attempt in (lambda: read_header(data, 50_000_000), lambda: decode_image(data, PREP)):
        with pytest.raises(InputError, match=refused) as caught:
            attempt()
        assert caught.value.kind == "too_large"


def test_the_coefficient_limit_follows_the_pixel_cap(photo):
    square = photo.resize((1000, 1000))
    progressive = encode(square, "JPEG", **PROGRESSIVE_444)  # 6 MB of coefficients
    assert kind_of(progressive, max_pixels=1_000_000) == "too_large"  # 4 MB a cap of 1 M pixels allows
    assert decode_image(encode(square, "JPEG", subsampling=0), PREP, max_pixels=1_000_000).shape == (224, 224, 3)
    assert decode_image(progressive, PREP, max_pixels=2_000_000).shape == (224, 224, 3)


# -- CPU: scans ------------------------------------------------------------------------------------


def test_a_jpeg_scan_bomb_is_refused_before_decoding():
    """40,000 scans of end-of-band runs: 1.3 MB that libjpeg took minutes over (once per scan over
    every block). Refused from a byte search, for the CPU and the GPU paths alike (read_header)."""
    bomb = jpeg_scan_bomb(4000, 40_000)
    for attempt in (lambda: read_header(bomb, 50_000_000), lambda: decode_image(bomb, PREP)):
        with pytest.raises(InputError, match="JPEG with 40001 scans") as caught:
            attempt()
        assert caught.value.kind == "too_large"
    assert decode_image(jpeg_scan_bomb(400, MAX_JPEG_SCANS - 1), PREP).shape == (224, 224, 3)  # DC + AC scans


def test_scans_are_counted_in_the_image_not_in_its_metadata(photo):
    """An EXIF thumbnail is a JPEG with a scan of its own, inside an APP1 segment: not a scan of
    the image; nor are the scans of an MPO's second frame, which is never decoded."""
    thumbnail = encode(photo.resize((160, 120)), "JPEG", progressive=True)
    app1 = b"Exif\0\0" + thumbnail * 300  # 300 progressive thumbnails' scans in metadata
    baseline = encode(photo, "JPEG")
    with_thumbnails = (
        baseline[:2] + b"\xff\xe1" + (len(app1[:65000]) + 2).to_bytes(2, "big") + app1[:65000] + baseline[2:]
    )
    assert decode_image(with_thumbnails, PREP).shape == (224, 224, 3)
    assert jpeg_scans(with_thumbnails) == 1
    assert jpeg_scans(encode(photo, "JPEG", progressive=True)) > 1
