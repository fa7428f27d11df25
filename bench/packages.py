"""Packages for the benchmarks, built once into build/bench-packages/ and reused: compiling takes
a minute or more, and a benchmark may restart itself (worker/cxx_runtime.py) after building."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from compile.package import BuildOptions

PACKAGES = Path(__file__).resolve().parent.parent / "build" / "bench-packages"


def cached_package(model: str, options: BuildOptions, name: str | None = None) -> tuple[Path, float | None]:
    """The package of `model` (any name `python -m compile build` takes) built with `options`:
    its path, and the seconds the build took (None when it was already built). The file is named
    by `name` (default: the model), the options and the torch version."""
    import torch

    from compile.models import resolve_model
    from compile.package import build_package

    variant = (
        f"{options.device}-{options.dtype}{'-cl' * options.channels_last}-{options.max_batch}"
        f"-tune{options.example_batch}{'-autotune' * options.max_autotune}"
    )
    path = PACKAGES / f"{name or model}-{variant}-{torch.__version__}.pt2"
    if path.exists():
        return path, None
    print(f"building {path.name} (once)...", flush=True)
    started = time.perf_counter()
    build_package(resolve_model(model), path, options)
    return path, time.perf_counter() - started
