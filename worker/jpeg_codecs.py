"""The libraries behind `worker.gpu_decode.JpegBatchDecoder`: a batch of encoded JPEGs in, each
one's full-size RGB frame out (uint8 3 x H x W on the decoder's device), or None where the
library refused that image alone.

    frames = frame_decoder(torch.device("cuda:0"), "nvimgcodec")  # KILN_GPU_DECODER
    frames([data, ...])                # -> [tensor or None, ...]; RuntimeError: the batch failed

Why two: nvImageCodec (`pip install 'kiln[gpu]'`) gives libjpeg's pixels (its hardware decoder's
IDCT matches libjpeg-turbo's, and it interpolates the chroma as libjpeg does): on the H200, frames
within 1 level of Pillow's, and EfficientNet-Lite0's top-1 equal to the CPU path's on 1,000 of the
agreement test's 1,000 JPEGs (bench/results/gpu-h200-decoders.json). torchvision's nvJPEG ships
with the worker but replicates the chroma and converts colour its own way: up to 37 levels off,
977 of 1,000, 975 with the chroma redone (`worker.chroma`). nvImageCodec's batch call takes the
GIL back about twice per image, so in one busy process it ran at 1.7-2.1k img/s against
torchvision's 5.7-5.9k, while four worker processes on the GPU ran faster with it (12.1k against
11.0k): KILN_GPU_DECODER=auto weighs that (`worker.plan.choose_gpu_decoder`).
On the CPU, torchvision's decoder is libjpeg-turbo itself, which is how CI tests the batch decoder
without a GPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    import numpy as np


class FrameDecoder(Protocol):
    name: str  # for the worker's plan line
    replicates_chroma: bool  # subsampled chroma comes back replicated, where libjpeg interpolates it

    def __call__(self, encoded: Sequence[bytes | np.ndarray]) -> list[torch.Tensor | None]: ...


# KILN_GPU_DECODER's values, and what the worker's plan line calls them.
LIBRARIES = {"torchvision": "nvJPEG via torchvision", "nvimgcodec": "nvImageCodec"}


def frame_decoder(device: torch.device, library: str = "torchvision") -> FrameDecoder:
    """A new decoder of `library` (one of `LIBRARIES`) on a GPU; on the CPU always torchvision's
    libjpeg-turbo (the CPU stands in for the GPU in CI). Use it from one thread at a time.

    Never share one between the worker's start-up check and its pipeline: an nvImageCodec decoder
    whose first call was the check's 16x16 JPEG on the default stream then decoded batches of 256
    640x480 JPEGs at 1,690 img/s for 1.16 ms of CPU an image, against 12,747-19,798 and
    0.06-0.09 ms for a fresh one, and the default worker ran at 4,641 img/s against 11,361 (H200,
    bench/results/gpu-h200-worker-variants.json). Raises ImportError where nvImageCodec is not
    installed, and RuntimeError or OSError from a library that cannot start on `device`."""
    if library not in LIBRARIES:
        raise ValueError(f"unknown GPU JPEG decoder {library!r}: one of {', '.join(LIBRARIES)}")
    if device.type == "cuda" and library == "nvimgcodec":
        return NvImageCodecFrames(device)
    return TorchvisionFrames(device)


class NvImageCodecFrames:
    """nvImageCodec's batch decode (hardware JPEG engine where the GPU has one, its CUDA decoder
    for what the engine refuses), on the current CUDA stream, into torch tensors without a copy."""

    name = LIBRARIES["nvimgcodec"]
    replicates_chroma = False

    def __init__(self, device: torch.device) -> None:
        nvimgcodec = import_nvimgcodec()
        index = device.index if device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        # Two CPU threads: the hardware engine needs little host work, and the host's cores
        # belong to the decode processes (the default is one thread per core, per process).
        self._decoder = nvimgcodec.Decoder(device_id=index, max_num_cpu_threads=2, options=":fancy_upsampling=1")
        self._params = nvimgcodec.DecodeParams(color_spec=nvimgcodec.ColorSpec.SRGB, apply_exif_orientation=False)
        self._code_stream = nvimgcodec.CodeStream

    def __call__(self, encoded: Sequence[bytes | np.ndarray]) -> list[torch.Tensor | None]:
        streams = [self._code_stream(data) for data in encoded]
        stream = torch.cuda.current_stream(self.device).cuda_stream
        images = self._decoder.decode(streams, params=self._params, cuda_stream=stream)
        # Done with the input when this returns, as torchvision's decoder is: the caller frees the
        # shared-memory slots that `encoded` views. One wait per batch, with the GIL released.
        torch.cuda.current_stream(self.device).synchronize()
        return [None if image is None else torch.as_tensor(image, device=self.device).permute(2, 0, 1)
                for image in images]  # fmt: skip


class TorchvisionFrames:
    """torchvision's `decode_jpeg`: nvJPEG on a GPU, libjpeg-turbo on the CPU. One bad image fails
    the whole call (RuntimeError), so the caller splits the batch to find it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        cuda = device.type == "cuda"
        self.name = LIBRARIES["torchvision"] if cuda else "libjpeg-turbo via torchvision"
        self.replicates_chroma = cuda

    def __call__(self, encoded: Sequence[bytes | np.ndarray]) -> list[torch.Tensor | None]:
        from torchvision.io import ImageReadMode, decode_jpeg

        tensors = [torch.frombuffer(data, dtype=torch.uint8) for data in encoded]  # read, never written
        return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device))


def import_nvimgcodec():
    """`nvidia.nvimgcodec`, or ImportError saying how to install it. Its import prints, on the C
    side, an error for each optional codec library not installed (JPEG 2000, TIFF), which kiln
    never uses: those lines are kept out of the worker's log."""
    # Its own log lines for each image it cannot parse (kiln reports every refused image itself)
    # stay out too, unless the user asks for them.
    os.environ.setdefault("PYNVIMGCODEC_VERBOSITY", "0")
    try:
        with _quiet_stderr():
            from nvidia import nvimgcodec
    except ImportError as e:
        raise ImportError(f"nvImageCodec is not installed ({e}): pip install 'kiln[gpu]'") from e
    return nvimgcodec


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
