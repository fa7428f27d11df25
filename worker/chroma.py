"""libjpeg's "fancy" chroma upsampling, redone on the GPU decoder's output, so that the GPU path's
pixels are the CPU path's.

A JPEG in 4:2:0 (or 4:2:2) stores one chroma sample per 2x2 (2x1) luma pixels. libjpeg-turbo,
and so Pillow and the CPU path, interpolates them to full size, each output 3/4 of the nearer
sample and 1/4 of the next (`jdsample.c`, `h2v2_fancy_upsample`, `h2v1_fancy_upsample`); nvJPEG
replicates them. Measured on the H200 on 1,000 640x480 JPEGs (bench/results/gpu-h200-camera.json):
nvJPEG's chroma is constant over each 2x2 block (mean spread 0.012 against Pillow's 0.23), its
pixels differ from Pillow's by up to 34 levels at full size, and the two paths' ResNet-18 top-1
agreed on 974 of 1,000. Redone here: at most 11 levels, and 984.

    fixed = fancy_upsampled(frames, (2, 2))   # uint8 N x 3 x H x W -> float32, whole levels

Because the decoder's output is RGB, the chroma samples are recovered from it: its chroma planes
(JFIF's RGB -> YCbCr) averaged over each block, which undoes the replication up to the RGB
output's rounding. Only the chroma changes: RGB = Y + A @ (Cb, Cr), so the new pixels are the old
plus A applied to the difference between the interpolated and the replicated chroma.
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
    to_chroma = _TO_CHROMA.to(rgb.device)
    # The samples: each block's mean chroma (a mean of the same value, up to the RGB rounding).
    samples = torch.einsum("kc,nchw->nkhw", to_chroma, F.avg_pool2d(rgb, (down, across), ceil_mode=True))
    # 3/4 nearer + 1/4 next, edges repeated: bilinear at an integer scale with half-pixel centres.
    interpolated = F.interpolate(samples, scale_factor=(down, across), mode="bilinear", align_corners=False)
    replicated = samples.repeat_interleave(down, -2).repeat_interleave(across, -1)
    change = (interpolated - replicated)[..., :height, :width]
    rgb += torch.einsum("ck,nkhw->nchw", _FROM_CHROMA.to(rgb.device), change)
    return rgb.round_().clamp_(0, 255)
