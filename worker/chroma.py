"""libjpeg's "fancy" chroma upsampling, redone on the GPU decoder's output, so that the GPU path's
pixels are the CPU path's.

A JPEG in 4:2:0 (or 4:2:2) stores one chroma sample per 2x2 (2x1) luma pixels. libjpeg-turbo,
and so Pillow and the CPU path, interpolates them to full size, each output 3/4 of the nearer
sample and 1/4 of the next (`jdsample.c`, `h2v2_fancy_upsample`, `h2v1_fancy_upsample`); nvJPEG
replicates them. Measured on the H200 on 1,000 640x480 JPEGs (bench/results/gpu-h200-camera.json):
nvJPEG's chroma is constant over each 2x2 block (mean spread 0.012 against Pillow's 0.23), its
pixels differ from Pillow's by up to 34 levels at full size, and the two paths' ResNet-18 top-1
agreed on 974 of 1,000. Redone here: at most 11 levels, and 984.

    fixed = fancy_upsampled(frames, (2, 2))       # uint8 N x 3 x H x W -> float32 whole levels
    change = horizontal_change(frames, (2, 2), rows, cols, wx)   # what it adds to `region @ wx.T`

Because the decoder's output is RGB, the samples are recovered from it: its chroma (JFIF's
RGB -> YCbCr) averaged over each block, which undoes the replication up to the RGB output's
rounding. Only the chroma changes, and RGB = Y + A (Cb, Cr), so the new pixels are the old plus
A times the interpolated chroma's difference from the replicated one: a small convolution over
the samples, one 3x3 stencil per pixel's place in its block, with A folded in. The batched
resize (`worker.resample.resample`) takes that change through its horizontal pass at the samples'
resolution, never at full size: on the H200 the full-size form cost kiln's GPU decoder a quarter
to a half of its rate (bench/results/gpu-h200.json, gpu-h200-whole-frame-chroma.json).
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
    across, down = chroma
    height, width = frames.shape[-2:]
    rgb = frames.float()
    phases = _phase_changes(_samples(rgb, across, down), across, down)  # N x 3 x down x across x h x w
    n, _, _, _, h, w = phases.shape
    change = phases.permute(0, 1, 4, 2, 5, 3).reshape(n, 3, h * down, w * across)
    return rgb.add_(change[..., :height, :width]).round_().clamp_(0, 255)


def horizontal_change(
    frames: torch.Tensor, chroma: tuple[int, int], rows: slice, cols: slice, wx: torch.Tensor
) -> torch.Tensor:
    """What interpolating the chroma adds to `frames[:, :, rows, cols].float() @ wx.T` (the
    resize's horizontal pass): float32 N x 3 x len(rows) x wx.shape[0]. `rows` and `cols` are
    slices with explicit start and stop; `wx` is out x len(cols). Computed over the blocks around
    the region only, at the samples' resolution; the changed pixels are not clamped to 0..255
    (the pass that follows clamps)."""
    across, down = chroma
    height, width = frames.shape[-2:]
    # The whole blocks around the region, and one more each side: the interpolation's neighbours.
    top, left = max(0, (rows.start // down - 1) * down), max(0, (cols.start // across - 1) * across)
    bottom = min(height, (-(-rows.stop // down) + 1) * down)
    right = min(width, (-(-cols.stop // across) + 1) * across)
    phases = _phase_changes(_samples(frames[:, :, top:bottom, left:right].float(), across, down), across, down)
    n, _, _, _, h, w = phases.shape
    # wx over the window's columns, split by each column's place in its block: (across, w, out).
    columns = wx.new_zeros((w * across, wx.shape[0]))
    columns[cols.start - left : cols.stop - left] = wx.T
    by_place = columns.view(w, across, -1).transpose(0, 1)
    # In bfloat16: as many multiply-adds as the resize's own pass, on tensor cores; the changes
    # are tens of levels at most, so its 8-bit mantissa costs under a quarter of a level.
    passed = torch.einsum("ncabij,bjo->ncaio", phases.bfloat16(), by_place.bfloat16())  # N x 3 x down x h x out
    passed = passed.permute(0, 1, 3, 2, 4).reshape(n, 3, h * down, -1).float()
    return passed[:, :, rows.start - top : rows.stop - top]


def _samples(rgb: torch.Tensor, across: int, down: int) -> torch.Tensor:
    """float32 N x 3 x H x W -> N x 2 x ceil(H / down) x ceil(W / across): each block's mean chroma."""
    blocks = F.avg_pool2d(rgb, (down, across), ceil_mode=True)
    return torch.einsum("kc,nchw->nkhw", _TO_CHROMA.to(rgb.device), blocks)


def _phase_changes(samples: torch.Tensor, across: int, down: int) -> torch.Tensor:
    """N x 2 x h x w chroma samples -> N x 3 x down x across x h x w: for each pixel's place in
    its block, the RGB change from replicated to interpolated chroma. Each place is a 3x3
    stencil over the neighbouring samples (edges repeated) with the colour matrix folded in, so
    one convolution gives them all."""
    out = F.conv2d(F.pad(samples, (1, 1, 1, 1), mode="replicate"), _stencils(across, down, samples.device))
    n, _, h, w = out.shape
    return out.view(n, 3, down, across, h, w)


def _stencils(across: int, down: int, device: torch.device) -> torch.Tensor:
    def taps(factor: int) -> list[torch.Tensor]:
        # Weights on the samples before, at and after a pixel's own, per place: 3/4 its own,
        # 1/4 the nearer neighbour (libjpeg's triangle filter at 2x).
        if factor == 1:
            return [torch.tensor([0.0, 1.0, 0.0])]
        return [torch.tensor([0.25, 0.75, 0.0]), torch.tensor([0.0, 0.75, 0.25])]

    replicated = torch.zeros(3, 3)
    replicated[1, 1] = 1.0
    places = [torch.outer(v, h) - replicated for v in taps(down) for h in taps(across)]  # row-major (down, across)
    weights = torch.einsum("ck,pyx->cpkyx", _FROM_CHROMA, torch.stack(places))  # 3 x P x 2 x 3 x 3
    return weights.reshape(3 * len(places), 2, 3, 3).to(device)
