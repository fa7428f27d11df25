"""The model runtime: load a kiln `.pt2` once, check that it fits this host, classify batches.

The contract, smallest first:

    runtime = load_runtime("model.pt2")            # checks, loads, warms up
    probs = runtime.predict(batch)                 # uint8 N x C x H x W, any N, any strides
    labels = runtime.top_k(probs, k=5)             # per image: [Label(label, index, score), ...]

`predict` splits or pads any batch to the package's batch range and makes the input contiguous
on the package's device: a compiled model assumes the strides it was exported with, and a
channels_last or sliced input silently gives wrong logits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from worker.contract import Label
from worker.cxx_runtime import check_cxx_runtime
from worker.manifest import Manifest, PackageError, read_manifest
from worker.scratch import unpacking_into_scratch

log = logging.getLogger(__name__)

# x86 CPU vector ISAs, weakest first: a package built for a stronger one crashes on a weaker CPU.
_CPU_ISA_RANK = {"DEFAULT": 0, "AVX2": 1, "AVX512": 2}


def torch_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def gpu_arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def resolve_device(manifest: Manifest, requested: str | None = None) -> torch.device:
    """The device to run a package on: the package's own type, on the index asked for.
    Raises `PackageError` where this host cannot run the package."""
    device = torch.device(requested or manifest.device)
    if device.type != manifest.device:
        raise PackageError(
            f"package was built for {manifest.device}, not {device.type}: build one with "
            f"`python -m compile build ... --device {device.type}`"
        )
    if torch_minor(torch.__version__) != torch_minor(manifest.torch_version):
        raise PackageError(
            f"package was built with torch {manifest.torch_version}, this host has {torch.__version__}: "
            "AOTInductor packages only load on the torch major.minor they were built with; rebuild it here"
        )
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PackageError("package is for CUDA, but this host has no usable CUDA device")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise PackageError(f"no CUDA device {index}: this host has {torch.cuda.device_count()}")
        device = torch.device("cuda", index)
        if manifest.gpu_arch and gpu_arch(device) != manifest.gpu_arch:
            raise PackageError(
                f"package was compiled for {manifest.gpu_arch}, but {device} is "
                f"{torch.cuda.get_device_name(device)} ({gpu_arch(device)}); rebuild it on this GPU type"
            )
    else:
        host_isa = torch.backends.cpu.get_cpu_capability()
        wanted, have = _CPU_ISA_RANK.get(manifest.cpu_isa or ""), _CPU_ISA_RANK.get(host_isa)
        if wanted is not None and have is not None and wanted > have:
            raise PackageError(f"package kernels use {manifest.cpu_isa}, this CPU only has {host_isa}; rebuild it here")
    return device


class ModelRuntime:
    """A loaded package. Not thread-safe: one runtime per inference thread (kiln uses one)."""

    def __init__(
        self, path: Path, manifest: Manifest, model: Callable[[torch.Tensor], torch.Tensor], device: torch.device
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.device = device
        self._model = model
        self._input_shape = tuple(manifest.input_shape)

    @property
    def labels(self) -> list[str]:
        return self.manifest.labels

    @property
    def batch_max(self) -> int:
        return self.manifest.batch_max

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (N x C x H x W, any N >= 1, any strides, any device) -> class
        probabilities, N x K float32 on the CPU."""
        return self._probabilities(images).cpu()

    @torch.inference_mode()
    def predict_top_k(self, images: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The `k` best classes of each image: scores (N x k float32) and class indices (N x k
        int64), on the CPU. Ranked on the model's device, so only N x k values are copied back."""
        scores, indices = self._probabilities(images).topk(min(k, len(self.labels)), dim=1)
        return scores.cpu(), indices.cpu()

    @torch.inference_mode()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """The model's raw outputs for uint8 images (as `predict` takes them): N x K float32 on
        the CPU. The compile step's check compares these with the eager model's (compile/verify.py)."""
        return self._logits(images).cpu()

    def _probabilities(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self._logits(images), dim=1)

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"images must be uint8 RGB (0..255), got {images.dtype}")
        if images.dim() != 4 or tuple(images.shape[1:]) != self._input_shape:
            raise ValueError(f"images must be N x {' x '.join(map(str, self._input_shape))}, got {tuple(images.shape)}")
        count = images.shape[0]
        if count == 0:
            return torch.empty((0, len(self.labels)), device=self.device)
        lo, hi = self.manifest.batch_min, self.manifest.batch_max
        outputs = []
        for start in range(0, count, hi):
            part = images[start : start + hi]
            real = part.shape[0]
            if real < lo:  # below the exported range: pad with copies of the first image
                part = torch.cat([part, part[:1].expand(lo - real, *part.shape[1:])])
            # Contiguous NCHW on the device, whatever came in: the compiled code assumes it.
            x = part.to(self.device, non_blocking=True).contiguous()
            logits = self._model(x)
            if logits.shape[0] != x.shape[0]:
                raise PackageError(
                    f"the package returned {logits.shape[0]} rows for a batch of {x.shape[0]}: torch compiled it "
                    "for one batch size only; rebuild it with another --tune-batch"
                )
            outputs.append(logits[:real].float())
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    def top_k(self, probs: torch.Tensor, k: int = 5) -> list[list[Label]]:
        k = min(k, probs.shape[1])
        scores, indices = probs.topk(k, dim=1)
        labels = self.labels
        return [
            [Label(label=labels[i], index=i, score=s) for s, i in zip(row_s, row_i, strict=True)]
            for row_s, row_i in zip(scores.tolist(), indices.tolist(), strict=True)
        ]

    def classify(self, images: torch.Tensor | Sequence[np.ndarray], k: int = 5) -> list[list[Label]]:
        """Top-k labels for a batch: a uint8 tensor, or decoded H x W x C arrays."""
        if not isinstance(images, torch.Tensor):
            images = stack_images(images)
        return self.top_k(self.predict(images), k)


def stack_images(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """H x W x C uint8 arrays (as `decode_image` returns) -> one contiguous N x C x H x W tensor."""
    return torch.from_numpy(np.stack([a.transpose(2, 0, 1) for a in arrays]))


def _load_compiled(path: Path, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The package's compiled model as a function of one batch.

    It calls the C++ loader that `torch._inductor.aoti_load_package` wraps: importing that wrapper
    pulls in all of Inductor, about 2 s of every worker's cold start, for nothing a package needs.
    A torch whose loader takes other arguments gets the documented wrapper instead.

    On CUDA the package gets two model instances. The loader's `run` holds the GIL throughout
    (its pybind binding, torch/csrc/inductor/aoti_package/pybind.cpp, releases nothing), and a
    container with one instance makes each run wait, inside `run`, for the previous run to
    finish on the GPU: every other thread of the worker stalls meanwhile (seen in a py-spy profile
    on the H200). With two, a run only waits for the run before last, which the caller has
    already synchronised on."""
    index = device.index if device.type == "cuda" else -1
    instances = 2 if device.type == "cuda" else 1
    try:
        loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, instances, index)
    except TypeError:
        return torch._inductor.aoti_load_package(str(path), device_index=index)
    return lambda batch: loader.run([batch])[0]  # the closure keeps the loader (and its files) alive


def load_runtime(path: str | Path, device: str | None = None, warmup: bool = True) -> ModelRuntime:
    """Read and check a package's manifest, load its compiled model, and run it once.

    Raises `PackageError` with what to do when the file is not a kiln package or does not fit
    this host. The checks run before any native code is loaded, so a wrong package never crashes
    the process."""
    path = Path(path)
    manifest = read_manifest(path)
    device = resolve_device(manifest, device)
    check_cxx_runtime(path)
    started = time.perf_counter()
    try:
        with unpacking_into_scratch():
            model = _load_compiled(path, device)
    except RuntimeError as e:
        raise PackageError(f"{path}: AOTInductor could not load the package: {e}") from e
    runtime = ModelRuntime(path, manifest, model, device)
    if warmup:
        c, h, w = manifest.input_shape
        runtime.predict(torch.zeros((manifest.batch_min, c, h, w), dtype=torch.uint8))
    log.info(
        "loaded %s (%s, %d classes, batch %d..%d, %s) on %s in %.1f s",
        path.name,
        manifest.model,
        len(manifest.labels),
        manifest.batch_min,
        manifest.batch_max,
        manifest.compute_dtype,
        device,
        time.perf_counter() - started,
    )
    return runtime
