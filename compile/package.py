"""Bake a model into a kiln `.pt2`: export with a dynamic batch, compile with AOTInductor, store the
manifest inside, and check the package against the eager model before keeping it.

What goes into the graph besides the model: the uint8 -> float conversion, the normalisation, the
cast to the compute dtype and the memory format. Workers then feed plain uint8 RGB batches (4x
fewer bytes to copy to a GPU) and cannot get the normalisation wrong.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import tomllib
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from compile.models import ModelSpec
from compile.verify import BatchRangeError, BuildError, verify_package
from worker.atomic_file import replacing
from worker.manifest import MANIFEST_KEY, Manifest, Preprocess
from worker.runtime import gpu_arch

log = logging.getLogger(__name__)


def kiln_version() -> str:
    try:
        return version("kiln")
    except PackageNotFoundError:  # run from a source checkout that was never installed
        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        try:
            return tomllib.loads(pyproject.read_text())["project"]["version"] + "+source"
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class PackagedModel(torch.nn.Module):
    """uint8 RGB N x 3 x H x W -> float32 logits: the model with its input handling in front."""

    def __init__(self, model: torch.nn.Module, prep: Preprocess, dtype: torch.dtype, channels_last: bool):
        super().__init__()
        self.model = model
        # (x - mean) / std as one multiply-add, folded into the first kernel by the compiler.
        std = torch.tensor(prep.std).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / std)
        self.register_buffer("shift", -torch.tensor(prep.mean).view(1, 3, 1, 1) / std)
        self.dtype = dtype
        self.channels_last = channels_last

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.to(torch.float32) * self.scale + self.shift).to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x).float()


@dataclass(frozen=True)
class BuildOptions:
    device: str = "cpu"
    dtype: str = "float32"
    channels_last: bool = False
    max_batch: int = 64
    max_autotune: bool = False
    # Inductor picks kernel configurations for the example's batch size (the hint of the dynamic
    # dimension): default to the largest, the batch a worker runs by default.
    tune_batch: int | None = None

    @property
    def example_batch(self) -> int:
        return self.tune_batch or self.max_batch


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the state_dict, in key order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def build_package(spec: ModelSpec, out: Path, options: BuildOptions) -> Manifest:
    """Compile `spec` into `out`. Nothing is left at `out` unless the package passed its check."""
    if options.max_batch < 3:  # torch.export refuses a range of one value (min=2, max=2)
        raise BuildError("--max-batch must be at least 3: the batch dimension is exported as a range from 2")
    if not 2 <= options.example_batch <= options.max_batch:
        raise BuildError(f"--tune-batch must be between 2 and --max-batch ({options.max_batch})")
    if options.device == "cuda" and not torch.cuda.is_available():
        raise BuildError("--device cuda, but this host has no usable CUDA device")
    try:
        return _build_once(spec, out, options)
    except BatchRangeError as e:
        if options.tune_batch is not None or options.max_batch < 4:
            raise
        # Tuning on the range's edge can make torch fix the batch there (a guard of ATen's
        # convolution refines the range to one value). Half the range keeps it open.
        retry = replace(options, tune_batch=options.max_batch // 2)
        log.warning("%s. Compiling again with --tune-batch %d.", e, retry.tune_batch)
        return _build_once(spec, out, retry)


def _build_once(spec: ModelSpec, out: Path, options: BuildOptions) -> Manifest:
    device = torch.device(options.device)
    dtype = DTYPES[options.dtype]
    side = spec.preprocess.crop
    digest = weights_digest(spec.module)  # of the weights as given, before any dtype cast
    wrapped = PackagedModel(spec.module.to(dtype), spec.preprocess, dtype, options.channels_last).to(device).eval()
    example = torch.randint(0, 256, (options.example_batch, 3, side, side), dtype=torch.uint8, device=device)
    with torch.inference_mode():
        classes = wrapped(example[:2]).shape[1]
    labels = spec.labels or [f"class_{i}" for i in range(classes)]
    if not spec.labels:
        log.warning(
            "no labels given: naming the %d classes class_0..class_%d (use --labels FILE)", classes, classes - 1
        )
    if len(labels) != classes:
        raise BuildError(f"the model has {classes} outputs but {len(labels)} labels were given")

    manifest = Manifest(
        model=spec.name,
        labels=labels,
        preprocess=spec.preprocess,
        input_shape=(3, side, side),
        compute_dtype=options.dtype,
        memory_format="channels_last" if options.channels_last else "contiguous",
        batch_min=2,  # the export recipe's minimum; the runtime pads a single image to 2
        batch_max=options.max_batch,
        tune_batch=options.example_batch,
        device=options.device,
        gpu_arch=gpu_arch(device) if device.type == "cuda" else None,
        cpu_isa=torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else None,
        torch_version=torch.__version__,
        weights_sha256=digest,
        weights_source=spec.weights_source,
        kiln_version=kiln_version(),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    batch = torch.export.Dim("batch", min=2, max=options.max_batch)
    started = time.perf_counter()
    try:
        exported = torch.export.export(wrapped, (example,), dynamic_shapes=({0: batch},))
    except Exception as e:  # export raises many types; all mean the model cannot be compiled
        raise BuildError(f"torch.export failed for {spec.name}: {e}") from e
    log.info("exported %s in %.1f s", spec.name, time.perf_counter() - started)

    out.parent.mkdir(parents=True, exist_ok=True)
    # Built next to the target and renamed at the end: a failed build never leaves a package behind.
    with replacing(out, suffix=".pt2") as tmp:
        configs = {"aot_inductor.metadata": {MANIFEST_KEY: manifest.model_dump_json()}}
        if options.max_autotune:
            configs["max_autotune"] = True
        log.info("compiling with AOTInductor (silent for a minute or more: it generates and builds C++)")
        started = time.perf_counter()
        try:
            torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp), inductor_configs=configs)
        except Exception as e:  # torch's InductorError wraps the cause, named in its message
            if "InvalidCxxCompiler" not in str(e):
                raise
            raise BuildError(
                f"AOTInductor compiles the package with a C++ compiler, and found none that works ($CXX, "
                f"else g++: {os.environ.get('CXX') or 'unset'}): install one (Debian: apt-get install g++) or "
                "point CXX at it"
            ) from None
        log.info("compiled with AOTInductor in %.1f s", time.perf_counter() - started)
        verify_package(tmp, wrapped, manifest)
    return manifest
