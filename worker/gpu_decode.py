"""JPEG decoding in batches on the worker's GPU (`worker.jpeg_codecs`: torchvision's nvJPEG, or
nvImageCodec with KILN_GPU_DECODER=nvimgcodec), then the batched resize + crop of
`worker.resample`: bytes in, the model's uint8 input out, never leaving the GPU.

    decoder = JpegBatchDecoder(torch.device("cuda:0"), manifest.preprocess, "nvimgcodec")
    result = decoder.decode([(data, header), ...])
    result.images        # uint8 N_ok x 3 x crop x crop on the device
    result.decoded       # which input each row is
    result.refused       # indices the library would not decode: the caller decodes them on the CPU

The same code runs on the CPU (torchvision's libjpeg-turbo), which is how CI tests the batching,
the fallbacks and the error isolation.
"""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from worker.chroma import FANCY, fancy_upsampled
from worker.jpeg_codecs import frame_decoder
from worker.manifest import Preprocess
from worker.resample import CropPlan, crop_plan, resample
from worker.route import draft_factor

if TYPE_CHECKING:
    import numpy as np

    from worker.probe import ImageHeader

log = logging.getLogger(__name__)

# torch warns that a tensor over immutable `bytes` must not be written to; nvJPEG only reads it,
# and a copy per image would cost more than the warning is worth.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

# Full-size pixels decoded at once: at most 1/64 of the GPU's memory (3 bytes a pixel), and
# 512 Mpx (1.5 GiB). On the H200, 4000x3000 JPEGs decoded at 923 img/s in parts of 512 Mpx, 793 in
# parts of 128 and 308 in parts of 32 (nvJPEG's hardware decoder wants many images per call;
# bench/results/gpu-h200-camera.json); a batch of camera photos never holds all its frames at once.
MAX_DECODED_PIXELS = 512 * 2**20
MIN_DECODED_PIXELS = 32 * 2**20
PLANS_KEPT = 64  # resample weights kept on the device, by image size (~0.5 MiB each)

# CUDA errors after which the context is unusable: the process exits at once, unacknowledged,
# so its tasks are delivered to another worker instead of failing healthy images.
FATAL_CUDA = ("device-side assert", "illegal memory access", "unspecified launch failure", "illegal instruction")


def is_fatal_cuda_error(error: BaseException) -> bool:
    """Whether `error` leaves this process's CUDA context unusable (torch raises CUDA errors as
    RuntimeError, named by their message): one of `FATAL_CUDA`, not an image nvJPEG refused."""
    text = str(error)
    return isinstance(error, RuntimeError) and any(s in text for s in FATAL_CUDA)


def decoder_available(device: torch.device, library: str = "torchvision") -> str | None:
    """None when `library` (see `worker.jpeg_codecs.frame_decoder`) decodes JPEGs on `device`,
    else why not (for the start-up log). It checks with a decoder of its own, dropped after: one
    whose first JPEG was this tiny one stayed slow (`frame_decoder`)."""
    if device.type == "cpu":
        return None
    try:
        frames = frame_decoder(device, library)
        if frames([_tiny_jpeg()])[0] is None:
            return f"{frames.name} refused a plain JPEG"
    except Exception as e:  # an old torchvision, one built without nvJPEG, nvImageCodec without its nvJPEG
        return f"{type(e).__name__}: {e}"
    return None


@dataclass
class DecodeResult:
    images: torch.Tensor  # uint8 N x 3 x crop x crop, on the decoder's device
    decoded: list[int]  # row i of `images` is item decoded[i]
    refused: list[int]  # items nvJPEG would not decode, in input order


class JpegBatchDecoder:
    """Decodes batches of JPEGs on one device. Stateless but for the device and preprocessing;
    call it from one thread (nvJPEG's handle in torchvision is shared by the process)."""

    def __init__(self, device: torch.device, prep: Preprocess, library: str = "torchvision") -> None:
        self.device = device
        self.prep = prep
        self._plans: OrderedDict[tuple[int, int], CropPlan] = OrderedDict()
        self.part_pixels = decode_part_pixels(device)
        self.frames = frame_decoder(device, library)

    def decode(self, items: Sequence[tuple[bytes | np.ndarray, ImageHeader]]) -> DecodeResult:
        """Decode, orient, resize and crop `items` (encoded bytes, or a uint8 array of them, and
        the header). An image nvJPEG refuses lands in `refused`
        alone: a failing batch is split in halves until the failures are single images. Rows come
        grouped by image size (`decoded` says which item each is), and nothing here waits for
        the GPU: a host-to-device copy from pageable memory would (CUDA's API sync rules).

        Items are decoded in parts of at most `part_pixels`, each part reduced (the CPU path's
        `draft` scale) before the next is decoded: a batch of camera photos never holds all its
        full-size frames at once. Frames at full scale whose chroma nvJPEG replicated get it
        interpolated as libjpeg does (`worker.chroma`)."""
        frames: dict[int, torch.Tensor] = {}
        refused: list[int] = []
        for part in _parts(items, self.part_pixels):
            decoded: dict[int, torch.Tensor] = {}
            self._decode_or_split(items, part, decoded, refused)
            for index, frame in decoded.items():
                frames[index] = self._upright_and_reduced(frame, items[index][1])
        # By size, and by the chroma to interpolate: upright frames get it in the resize, for the
        # region it reads; turned ones got it whole, before they were turned.
        groups: dict[tuple[int, int, tuple[int, int]], list[int]] = defaultdict(list)
        for index, frame in frames.items():
            header = items[index][1]
            chroma = self._chroma_to_interpolate(header) if header.orientation == 1 else (1, 1)
            groups[(frame.shape[1], frame.shape[2], chroma)].append(index)
        order: list[int] = []
        outputs: list[torch.Tensor] = []
        for (height, width, chroma), indices in groups.items():
            outputs.append(resample(torch.stack([frames[i] for i in indices]), self._plan(height, width), chroma))
            order += indices
        if not outputs:
            crop = self.prep.crop
            return DecodeResult(torch.empty((0, 3, crop, crop), dtype=torch.uint8, device=self.device), [], refused)
        images = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
        return DecodeResult(images, order, sorted(refused))

    def _chroma_to_interpolate(self, header: ImageHeader) -> tuple[int, int]:
        """The chroma blocks nvJPEG replicated in this frame and libjpeg would have interpolated;
        (1, 1) where there is nothing to redo (a frame `draft` reduces averages its blocks away)."""
        if not self.frames.replicates_chroma or header.chroma not in FANCY:
            return (1, 1)
        return header.chroma if draft_factor(header.width, header.height, self.prep.resize) == 1 else (1, 1)

    def _upright_and_reduced(self, frame: torch.Tensor, header: ImageHeader) -> torch.Tensor:
        resize = self.prep.resize
        if min(header.width, header.height) >= 2 * resize:  # per-image work only where it does something
            frame = reduce_like_draft(frame, resize)
        if header.orientation != 1:
            chroma = self._chroma_to_interpolate(header)
            if chroma != (1, 1):  # before it is turned: the blocks are the stored image's
                frame = fancy_upsampled(frame[None], chroma)[0].to(torch.uint8)
            frame = orient(frame, header.orientation)
        return frame

    def _plan(self, height: int, width: int) -> CropPlan:
        """`crop_plan` with its weights on this decoder's device, copied there once per size and
        kept for the `PLANS_KEPT` sizes used last (a folder of photos has few sizes; a crawl, many)."""
        key = (height, width)
        plan = self._plans.pop(key, None)
        if plan is None:
            plan = crop_plan(height, width, self.prep)
            plan = replace(plan, wy=plan.wy.to(self.device), wx=plan.wx.to(self.device))
            if len(self._plans) >= PLANS_KEPT:
                self._plans.popitem(last=False)
        self._plans[key] = plan
        return plan

    def _decode_or_split(
        self,
        items: Sequence[tuple[bytes | np.ndarray, ImageHeader]],
        indices: list[int],
        frames: dict[int, torch.Tensor],
        refused: list[int],
    ) -> None:
        if not indices:
            return
        try:
            decoded = self.frames([items[i][0] for i in indices])
        except RuntimeError as e:
            if is_fatal_cuda_error(e):  # the context is gone, not the image: no split, no CPU fallback
                raise
            if len(indices) == 1:
                log.debug("%s refused image %d (%s): decoding it on the CPU", self.frames.name, indices[0], e)
                refused.append(indices[0])
                return
            middle = len(indices) // 2
            self._decode_or_split(items, indices[:middle], frames, refused)
            self._decode_or_split(items, indices[middle:], frames, refused)
            return
        for index, frame in zip(indices, decoded, strict=True):
            if frame is None:
                refused.append(index)
            else:
                frames[index] = frame


def decode_part_pixels(device: torch.device) -> int:
    """Full-size pixels one decode call may hold on `device`: 1/64 of its memory at 3 bytes a
    pixel, between `MIN_DECODED_PIXELS` and `MAX_DECODED_PIXELS` (the CPU: the maximum)."""
    if device.type != "cuda":
        return MAX_DECODED_PIXELS
    total = torch.cuda.get_device_properties(device).total_memory
    return max(MIN_DECODED_PIXELS, min(MAX_DECODED_PIXELS, total // 64 // 3))


def _parts(items: Sequence[tuple[bytes | np.ndarray, ImageHeader]], limit: int) -> list[list[int]]:
    """Indices of `items` in consecutive parts of at most `limit` pixels (one image at least)."""
    parts: list[list[int]] = [[]]
    pixels = 0
    for index, (_, header) in enumerate(items):
        size = header.width * header.height
        if parts[-1] and pixels + size > limit:
            parts.append([])
            pixels = 0
        parts[-1].append(index)
        pixels += size
    return [part for part in parts if part]


def reduce_like_draft(frame: torch.Tensor, resize: int) -> torch.Tensor:
    """Shrink a decoded C x H x W uint8 image as the CPU path's `draft` does, by averaging blocks
    of 2, 4 or 8 pixels a side (libjpeg's DCT scaling keeps each block's mean, up to its IDCT's
    rounding): the GPU then resamples a camera photo as the CPU path does, and 64x fewer pixels."""
    factor = draft_factor(frame.shape[2], frame.shape[1], resize)
    if factor == 1:
        return frame
    pooled = torch.nn.functional.avg_pool2d(frame[None].float(), factor, ceil_mode=True)[0]
    return pooled.round_().to(torch.uint8)


def orient(frame: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation (1..8) to a C x H x W image, as `PIL.ImageOps.exif_transpose`."""
    if orientation == 2:
        return frame.flip(-1)
    if orientation == 3:
        return frame.flip(-2, -1)
    if orientation == 4:
        return frame.flip(-2)
    if orientation == 5:
        return frame.transpose(-2, -1)
    if orientation == 6:
        return frame.rot90(-1, dims=(-2, -1))
    if orientation == 7:
        return frame.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return frame.rot90(1, dims=(-2, -1))
    return frame


def _tiny_jpeg() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 100, 50)).save(buffer, "JPEG")
    return buffer.getvalue()
