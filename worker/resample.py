"""Batched resize + centre crop as two matrix products, with Pillow's filters: the GPU-side twin
of `worker.preprocess`'s `Image.resize(..., box=...)`.

Pillow resamples separably: a horizontal pass into a uint8 image, then a vertical one, each
output pixel a normalised weighted sum of the input pixels under a filter stretched by the
downscale factor (Pillow's `src/libImaging/Resample.c`, `precompute_coeffs`). Written as weight
matrices, a whole group of same-size images is resampled by two batched matmuls, on any device:
no per-image kernel launches, and the same pixels as the CPU path up to rounding (each pass
rounds to uint8 as Pillow does; Pillow's 22-bit fixed-point weights against float32 here differ
by at most one level per pass).

    plan = crop_plan(height, width, prep)          # which input rows/columns, and the weights
    out = resample(images, plan)                   # uint8 N x C x H x W -> uint8 N x C x crop x crop
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch

from worker.chroma import FANCY, fancy_region
from worker.manifest import Preprocess


def _triangle(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


def _bicubic(x: float, a: float = -0.5) -> float:
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x *= math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    return _sinc(x) * _sinc(x / 3.0) if -3.0 <= x < 3.0 else 0.0


# name -> (filter, support), as Pillow defines them.
_FILTERS: dict[str, tuple[Callable[[float], float], float]] = {
    "bilinear": (_triangle, 1.0),
    "bicubic": (_bicubic, 2.0),
    "lanczos": (_lanczos, 3.0),
}


def axis_weights(in_size: int, start: float, end: float, out_size: int, interpolation: str) -> tuple[int, torch.Tensor]:
    """Weights of one resampling pass: input span [start, end) of an axis of `in_size` pixels ->
    `out_size` pixels. Returns the first input pixel used and an `out_size x used` float64
    matrix (rows sum to 1), following Pillow's `precompute_coeffs` (and, for "nearest", the
    pixel under each output centre, as Pillow's nearest-neighbour transform picks it)."""
    scale = (end - start) / out_size
    rows: list[tuple[int, list[float]]] = []
    if interpolation == "nearest":
        for x in range(out_size):
            rows.append((min(max(math.floor(start + (x + 0.5) * scale), 0), in_size - 1), [1.0]))
    else:
        kernel, support = _FILTERS[interpolation]
        filter_scale = max(scale, 1.0)
        support *= filter_scale
        for x in range(out_size):
            center = start + (x + 0.5) * scale
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), in_size)
            weights = [kernel((i + lo - center + 0.5) / filter_scale) for i in range(hi - lo)]
            total = sum(weights)
            rows.append((lo, [w / total for w in weights] if total else weights))
    first = min(lo for lo, _ in rows)
    last = max(lo + len(w) for lo, w in rows)
    matrix = torch.zeros((out_size, last - first), dtype=torch.float64)
    for x, (lo, weights) in enumerate(rows):
        matrix[x, lo - first : lo - first + len(weights)] = torch.tensor(weights, dtype=torch.float64)
    return first, matrix


@dataclass(frozen=True)
class CropPlan:
    """How one image size becomes the model's input: rows [top, top + Wy.shape[1]) and columns
    [left, left + Wx.shape[1]) of the source are resampled by `out = Wy @ src @ Wx.T`."""

    top: int
    left: int
    wy: torch.Tensor  # crop x rows, float32
    wx: torch.Tensor  # crop x columns, float32


@lru_cache(maxsize=256)
def crop_plan(height: int, width: int, prep: Preprocess) -> CropPlan:
    """The plan for a `height x width` image: resize the short side to `prep.resize`, then take
    the centre `prep.crop` square, as one resampling of the region the crop covers (exactly the
    box `worker.preprocess` gives Pillow). Cached: a data set has few distinct sizes."""
    scale = prep.resize / min(width, height)
    side = prep.crop / scale
    left, top = (width - side) / 2, (height - side) / 2
    x0, wx = axis_weights(width, left, left + side, prep.crop, prep.interpolation)
    y0, wy = axis_weights(height, top, top + side, prep.crop, prep.interpolation)
    return CropPlan(y0, x0, wy.float(), wx.float())


def resample(images: torch.Tensor, plan: CropPlan, chroma: tuple[int, int] = (1, 1)) -> torch.Tensor:
    """uint8 N x C x H x W (one size, any device) -> uint8 N x C x crop x crop, on that device.

    The horizontal pass runs first and is rounded to uint8, as in Pillow. Float32 throughout, as
    torch's default keeps CUDA matmuls (TF32 off): TF32 or bf16 would cost a few levels.
    `chroma` (across, down), one of `worker.chroma.FANCY`: RGB images whose decoder replicated
    their chroma over such blocks get it interpolated as libjpeg does, in the region read only."""
    rows, cols = plan.wy.shape[1], plan.wx.shape[1]
    row_span, col_span = slice(plan.top, plan.top + rows), slice(plan.left, plan.left + cols)
    if chroma in FANCY:
        region = fancy_region(images, chroma, row_span, col_span)
    else:
        region = images[:, :, row_span, col_span].float()
    wx, wy = plan.wx.to(images.device), plan.wy.to(images.device)  # no copy where the plan is there already
    horizontal = torch.matmul(region, wx.T).add_(0.5).floor_().clamp_(0, 255)
    vertical = torch.matmul(wy, horizontal).add_(0.5).floor_().clamp_(0, 255)
    return vertical.to(torch.uint8)
