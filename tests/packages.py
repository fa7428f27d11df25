"""Compiled packages for the tests, built once and cached on disk (compiling takes tens of
seconds). Shared by conftest.py and preload_plugin.py."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_CACHE = Path(os.environ.get("KILN_TEST_CACHE", ROOT / "build" / "test-packages"))
DEVICE = os.environ.get("KILN_TEST_DEVICE", "cpu")


def _sources_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted([*(ROOT / "compile").glob("*.py"), ROOT / "worker" / "manifest.py"]):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def build_cached(name: str, cli_args: list[str]) -> Path:
    """Build a package with `python -m compile build` (in-process), cached by the compile step's
    sources, the torch version and the arguments."""
    import torch

    key = hashlib.sha256(f"{_sources_digest()}|{torch.__version__}|{cli_args}".encode()).hexdigest()[:12]
    path = PACKAGE_CACHE / f"{name}-{key}.pt2"
    if not path.exists():
        from compile.__main__ import main as compile_main

        assert compile_main(["build", *cli_args, "-o", str(path)]) == 0, f"building {name} failed"
    return path


def build_lite0() -> Path:
    """The shipped EfficientNet-Lite0 on the test device, small batch range so max+1 is cheap."""
    args = ["efficientnet_lite0", "--device", DEVICE, "--max-batch", "12"]
    if DEVICE == "cuda":
        args += ["--dtype", "bfloat16", "--channels-last"]
    return build_cached(f"lite0-{DEVICE}", args)


def build_lite0_float32() -> Path:
    """`build_lite0` in float32 on a GPU too, for comparisons where bfloat16's own noise would
    hide what is compared (on the CPU, the same package)."""
    if DEVICE != "cuda":
        return build_lite0()
    args = ["efficientnet_lite0", "--device", DEVICE, "--max-batch", "12", "--channels-last"]
    return build_cached(f"lite0-float32-{DEVICE}", args)
