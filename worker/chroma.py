"""libjpeg's "fancy" chroma upsampling, redone on the GPU decoder's output, so that the GPU path's
pixels are the CPU path's.

A JPEG in 4:2:0 (or 4:2:2) stores one chroma sample per 2x2 (2x1) luma pixels. libjpeg-turbo,
and so Pillow and the CPU path, interpolates them to full size, each output 3/4 of the nearer
sample and 1/4 of the next (`jdsample.c`, `h2v2_fancy_upsample`, `h2v1_fancy_upsample`); nvJPEG
replicates them. Measured on the H200 on 1,000 640x480 JPEGs (bench/results/gpu-h200-camera.json):
nvJPEG's chroma is constant over each 2x2 block (mean spread 0.012 against Pillow's 0.23), its
pixels differ from Pillow's by up to 34 levels at full size, and the two paths' ResNet-18 top-1
agreed on 974 of 1,000. Redone here: at most 11 levels, and 984.

    fixed = fancy_upsampled(frames, (2, 2))            # uint8 N x 3 x H x W -> float32 whole levels
    region = fancy_region(frames, (2, 2), rows, cols)  # float32, only the rows and columns asked for

Because the decoder's output is RGB, the samples are recovered from it: its chroma (JFIF's
RGB -> YCbCr) averaged over each block, which undoes the replication up to the RGB output's
rounding. Only the chroma changes, and RGB = Y + A (Cb, Cr), so the new pixels are the old plus
A times the interpolated chroma's difference from the replicated one: one small convolution over
the samples per output phase, no full-size colour conversion. The batched resize asks for the
region its crop reads only (`worker.resample.resample`), which is what keeps this cheap.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# JFIF (ITU-T T.871): the chroma rows of RGB -> YCbCr, and YCbCr -> RGB's chroma columns.
_TO_CHROMA = torch.tensor([[-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
_FROM_CHROMA = torch.tensor([[0.0, 1.402], [-0.344136, -0.714136], [1.772, 0.0]])

FANCY = frozenset({(2, 2), (2, 1)})  # subsampling (across, down) that libjpeg interpolates; others it replicates


def fancy_upsampled(frames: torch.Tensor, chroma: tuple[int, int]) -> torch.Tensor:
    """uint8 N x 3 x H x W RGB, decoded with chroma replicated over `chroma` = (across, down)
    blocks (one of `FANCY`) -> float32 N x 3 x H x W of whole levels in 0..255: the same pixels
    with the chroma interpolated as libjpeg does. Any device; no per-image work."""
    height, width = frames.shape[-2:]
    return fancy_region(frames, chroma, slice(0, height), slice(0, width)).round_()


def fancy_region(frames: torch.Tensor, chroma: tuple[int, int], rows: slice, cols: slice) -> torch.Tensor:
    """`fancy_upsampled(frames, chroma)[..., rows, cols]`, computing little outside the region
    and not rounded (float32 in 0..255: the resize that follows rounds). `rows` and `cols` are
    slices with explicit start and stop."""
    across, down = chroma
    height, width = frames.shape[-2:]
    # The whole blocks around the region, and one more each side: the interpolation's neighbours.
    top, left = max(0, (rows.start // down - 1) * down), max(0, (cols.start // across - 1) * across)
    bottom = min(height, (-(-rows.stop // down) + 1) * down)
    right = min(width, (-(-cols.stop // across) + 1) * across)
    window = frames[:, :, top:bottom, left:right].float()
    samples = torch.einsum(
        "kc,nchw->nkhw", _TO_CHROMA.to(window.device), F.avg_pool2d(window, (down, across), ceil_mode=True)
    )
    change = _phase_convolution(samples, across, down)[..., : bottom - top, : right - left]
    window += change
    return window[:, :, rows.start - top : rows.stop - top, cols.start - left : cols.stop - left].clamp_(0, 255)


def _phase_convolution(samples: torch.Tensor, across: int, down: int) -> torch.Tensor:
    """N x 2 x h x w chroma samples -> N x 3 x h*down x w*across: the RGB change from replicated to
    interpolated chroma. Each output pixel's phase in its block (which of its `down x across`
    pixels it is) is a 3x3 stencil over the neighbouring samples (edges repeated); the colour
    matrix is folded into the stencils, so one convolution gives RGB directly."""
    weights = _stencils(across, down, samples.device)  # 3 * down * across x 2 x 3 x 3
    out = F.conv2d(F.pad(samples, (1, 1, 1, 1), mode="replicate"), weights)
    n, _, h, w = out.shape
    return out.view(n, 3, down, across, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, 3, h * down, w * across)


def _stencils(across: int, down: int, device: torch.device) -> torch.Tensor:
    def taps(factor: int) -> list[torch.Tensor]:
        # Weights on the samples before, at and after a pixel's own, per phase: 3/4 own, 1/4 the
        # nearer neighbour (libjpeg's triangle filter at 2x); minus the replicated value.
        if factor == 1:
            return [torch.tensor([0.0, 1.0, 0.0])]
        return [torch.tensor([0.25, 0.75, 0.0]), torch.tensor([0.0, 0.75, 0.25])]

    centre = torch.zeros(3, 3)
    centre[1, 1] = 1.0
    phases = [torch.outer(v, h) - centre for v in taps(down) for h in taps(across)]  # row-major over (down, across)
    stencil = torch.stack(phases)  # P x 3 x 3
    weights = torch.einsum("ck,pyx->cpkyx", _FROM_CHROMA, stencil)  # 3 x P x 2 x 3 x 3
    return weights.reshape(3 * len(phases), 2, 3, 3).to(device)
