"""worker.chroma: libjpeg's interpolated chroma, redone on pixels whose chroma was replicated (as
nvJPEG decodes), checked against what Pillow (libjpeg-turbo) itself decodes from the same JPEG."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from worker.chroma import fancy_upsampled
from worker.manifest import IMAGENET_PREPROCESS
from worker.probe import read_header
from worker.resample import crop_plan, resample


def _jpeg_and_replicated(across: int, down: int) -> tuple[bytes, torch.Tensor]:
    """A JPEG whose chroma is constant over `across x down` blocks with sharp edges between them
    (quality 100, so the samples survive), and its pixels as a decoder that replicates the samples
    gives them: JFIF's YCbCr -> RGB, rounded."""
    rng = np.random.default_rng(3)
    height, width = 96, 128
    y = np.clip(np.add.outer(np.linspace(70, 150, height), np.linspace(0, 30, width)), 0, 255).round()
    blocks = rng.integers(104, 153, (2, height // down, width // across)).astype(np.float64)
    cb, cr = (plane.repeat(down, 0).repeat(across, 1) for plane in blocks)
    planes = [Image.fromarray(p.astype(np.uint8)) for p in (y, cb, cr)]
    buffer = io.BytesIO()
    subsampling = {(2, 2): 2, (2, 1): 1}[(across, down)]
    Image.merge("YCbCr", planes).save(buffer, "JPEG", quality=100, subsampling=subsampling)
    rgb = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128), y + 1.772 * (cb - 128)])
    replicated = torch.from_numpy(np.clip(rgb.round(), 0, 255).astype(np.uint8))
    return buffer.getvalue(), replicated[None]


@pytest.mark.parametrize("chroma", [(2, 2), (2, 1)])
def test_replicated_chroma_becomes_what_libjpeg_decodes(chroma):
    data, replicated = _jpeg_and_replicated(*chroma)
    assert read_header(data, 10**8).chroma == chroma
    pillow = torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy()).permute(2, 0, 1)[None]
    before = (replicated.int() - pillow.int()).abs()
    after = fancy_upsampled(replicated, chroma)
    assert after.dtype == torch.float32 and torch.equal(after, after.round()) and 0 <= after.min() <= after.max() <= 255
    after = (after.int() - pillow.int()).abs()
    assert before.max() > 12  # the sharp chroma edges: replicated and interpolated differ there
    assert after.max() <= 4 and after.float().mean() < 0.6, (
        after.max(),
        after.float().mean(),
    )  # quality 100 is not lossless


def test_odd_sizes_keep_their_size():
    frames = torch.randint(0, 256, (3, 3, 7, 9), dtype=torch.uint8)
    assert fancy_upsampled(frames, (2, 2)).shape == frames.shape
    assert fancy_upsampled(frames, (2, 1)).shape == frames.shape


def test_flat_chroma_is_left_as_it_is():
    """Where the chroma does not change, interpolating it changes nothing."""
    flat = torch.full((1, 3, 16, 16), 77, dtype=torch.uint8)
    assert torch.equal(fancy_upsampled(flat, (2, 2)), flat.float())


@pytest.mark.parametrize("chroma", [(2, 2), (2, 1)])
@pytest.mark.parametrize("size", [(480, 640), (301, 257), (257, 400)])
def test_the_resize_interpolates_the_chroma_of_the_region_it_reads(chroma, size):
    """`resample(..., chroma)` redoes the chroma of the crop's region only: the same pixels as
    redoing the whole frame first (odd sizes, regions at odd offsets, and regions that reach the
    frame's edges), up to the rounding to whole levels that the region skips (noise: 2 at most)."""
    frames = torch.randint(0, 256, (2, 3, *size), dtype=torch.uint8)
    plan = crop_plan(*size, IMAGENET_PREPROCESS)
    whole = resample(fancy_upsampled(frames, chroma).to(torch.uint8), plan)
    region = resample(frames, plan, chroma)
    difference = (whole.int() - region.int()).abs()
    assert difference.max() <= 2 and difference.float().mean() < 0.3
    assert (resample(frames, plan).int() - region.int()).abs().max() > 5  # it did change the pixels
