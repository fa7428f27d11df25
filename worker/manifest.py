"""The manifest: what a kiln `.pt2` package says about itself.

The compile step stores it in the package's AOTInductor metadata (`aot_inductor.metadata`), which
the package keeps as a small JSON file next to the compiled `.so`. That lets anyone read it with
`zipfile` alone: the producer and `python -m compile inspect` never load the model, and the worker
checks a package against its host *before* loading native code that could crash the process.

This module imports no torch.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MANIFEST_KEY = "kiln.manifest"
MANIFEST_VERSION = 1


class PackageError(Exception):
    """A `.pt2` file that kiln cannot use: unreadable, not a kiln package, or wrong for this host."""


class Preprocess(BaseModel):
    """How an image becomes the model's input. Resize and crop run on the host (Pillow); the
    normalisation `(pixel - mean) / std` is compiled into the package, whose input is uint8 RGB."""

    model_config = ConfigDict(frozen=True)

    resize: int = Field(gt=0, description="short side after resizing, in pixels")
    crop: int = Field(gt=0, description="side of the square centre crop, in pixels")
    interpolation: Literal["nearest", "bilinear", "bicubic", "lanczos"] = "bilinear"
    mean: tuple[float, float, float] = Field(description="per-channel mean, in 0..255 pixel units")
    std: tuple[float, float, float] = Field(description="per-channel std, in 0..255 pixel units")

    @model_validator(mode="after")
    def _crop_fits(self) -> Preprocess:
        if self.crop > self.resize:
            raise ValueError(f"crop ({self.crop}) must not exceed resize ({self.resize})")
        if any(s <= 0 for s in self.std):
            raise ValueError("std must be positive")
        if any(not 0 <= m <= 255 for m in self.mean):
            raise ValueError("mean is in pixel units, 0 to 255")
        return self


IMAGENET_PREPROCESS = Preprocess(
    resize=256,
    crop=224,
    interpolation="bilinear",
    mean=(0.485 * 255, 0.456 * 255, 0.406 * 255),
    std=(0.229 * 255, 0.224 * 255, 0.225 * 255),
)


class Manifest(BaseModel):
    """Everything a worker needs to know about a package, besides the compiled code itself."""

    model_config = ConfigDict(frozen=True)

    manifest_version: int = MANIFEST_VERSION
    model: str
    labels: list[str]
    preprocess: Preprocess
    input_shape: tuple[int, int, int] = Field(description="C, H, W of one image")
    input_dtype: Literal["uint8"] = "uint8"
    compute_dtype: Literal["float32", "bfloat16"]
    memory_format: Literal["contiguous", "channels_last"]
    batch_min: int = Field(ge=1)
    batch_max: int = Field(ge=1)
    tune_batch: int | None = Field(default=None, description="the batch size kernels were tuned for")
    device: Literal["cpu", "cuda"]
    gpu_arch: str | None = Field(default=None, description="e.g. sm_90, for CUDA packages")
    cpu_isa: str | None = Field(default=None, description="the CPU vector ISA the kernels were built for")
    torch_version: str
    weights_sha256: str
    weights_source: str = Field(default="", description="shipped, random, factory, or the weights file given")
    kiln_version: str
    created_at: str

    @property
    def model_key(self) -> str:
        """What makes two packages give a job the same answers, up to precision: the model, its
        weights, labels and preprocessing; not the device, dtype, batch sizes or torch version,
        so CPU and GPU builds of one model may share a job. "name@" and 12 hex digits."""
        same = json.dumps([self.weights_sha256, self.labels, self.preprocess.model_dump(mode="json")])
        return f"{self.model}@{hashlib.sha256(same.encode()).hexdigest()[:12]}"


def _metadata_member(path: Path, archive: zipfile.ZipFile) -> str:
    names = [n for n in archive.namelist() if n.endswith("wrapper_metadata.json")]
    if not names:
        raise PackageError(
            f"{path}: not an AOTInductor package: no compiled model inside (expected a .pt2 made "
            "by `python -m compile build`)"
        )
    return names[0]


def read_metadata(path: str | Path) -> dict[str, str]:
    """The AOTInductor metadata of a package (string keys and values), read without loading it."""
    path = Path(path)
    if not path.is_file():
        raise PackageError(f"{path}: no such file")
    try:
        with zipfile.ZipFile(path) as archive:
            bad_member = archive.testzip()
            if bad_member is not None:
                raise PackageError(f"{path}: corrupt package: {bad_member} fails its checksum")
            return json.loads(archive.read(_metadata_member(path, archive)))
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise PackageError(
            f"{path}: not a .pt2 package (unreadable zip archive: {e}); a partial copy or another kind of file: "
            "copy it again, or build one with `python -m compile build`"
        ) from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PackageError(f"{path}: corrupt package metadata ({e})") from e


def read_manifest(path: str | Path) -> Manifest:
    """The kiln manifest stored in a `.pt2` package; `PackageError` if there is none or it is bad."""
    metadata = read_metadata(path)
    raw = metadata.get(MANIFEST_KEY)
    if raw is None:
        raise PackageError(
            f"{path}: an AOTInductor package, but not a kiln one (no {MANIFEST_KEY!r} metadata); "
            "build it with `python -m compile build`"
        )
    try:
        manifest = Manifest.model_validate_json(raw)
    except ValidationError as e:
        raise PackageError(f"{path}: invalid kiln manifest: {e}") from e
    if manifest.manifest_version > MANIFEST_VERSION:
        raise PackageError(
            f"{path}: manifest version {manifest.manifest_version} is newer than this kiln "
            f"understands ({MANIFEST_VERSION}); upgrade kiln"
        )
    return manifest
