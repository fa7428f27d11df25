"""Check a freshly compiled package against the eager model before it is kept.

The check loads the package with the worker's own loader. Where this host needs the C++ runtime
preloaded to load packages (worker/cxx_runtime.py) and this process started without it, the
check runs in a child process that has it, so the compile step never has to restart and compile
twice. The child is this module: `python -m compile.verify PACKAGE EAGER_MODULE.pt`.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from worker.cxx_runtime import PRELOAD_ENV, is_preloaded, preload_needed
from worker.manifest import Manifest, read_manifest
from worker.runtime import load_runtime, stack_images

log = logging.getLogger(__name__)

SAMPLES_DIR = Path(__file__).resolve().parent.parent / "samples"

# Bound on ||package - eager|| / ||eager|| over the class probabilities, per compute dtype. The
# eager reference runs in the same dtype; float32 kernels only reorder sums (~1e-6 seen), while
# bfloat16 kernels round differently from eager's (FACTS.md: 6.4e-3 for ResNet-18 logits).
ERROR_BOUND = {"float32": 1e-3, "bfloat16": 5e-2}
_CHECK_FAILED = 3  # the child's exit status when the package fails the check


class BuildError(RuntimeError):
    """The package could not be built, or failed its check against the eager model."""


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-12))


def sample_batch(manifest: Manifest, folder: Path = SAMPLES_DIR) -> torch.Tensor | None:
    """The bundled sample photos, preprocessed as a worker would: the real-input check."""
    from worker.preprocess import decode_image

    arrays = [decode_image(p.read_bytes(), manifest.preprocess) for p in sorted(folder.glob("*.jpg"))]
    return stack_images(arrays) if arrays else None


def verify_package(path: Path, eager: torch.nn.Module, manifest: Manifest) -> None:
    """Compare the package with the eager model on random batches of the extreme sizes and on
    the sample photos; raise `BuildError` past the dtype's bound."""
    library = preload_needed(path)
    if library is not None and not is_preloaded(library):
        _verify_in_child(path, eager, library)
        return
    runtime = load_runtime(path, warmup=False)
    c, h, w = manifest.input_shape
    generator = torch.Generator().manual_seed(0)
    inputs = {
        f"random batch {n}": torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=generator)
        for n in sorted({1, 2, manifest.batch_max})
    }
    photos = sample_batch(manifest)
    if photos is not None and photos.shape[1:] == (c, h, w):
        inputs["sample photos"] = photos
    bound = ERROR_BOUND[manifest.compute_dtype]
    for what, images in inputs.items():
        with torch.inference_mode():
            reference = torch.softmax(eager(images.to(runtime.device)).float(), dim=1).cpu()
        error = relative_error(runtime.predict(images), reference)
        log.info("check %-16s relative error %.2e (bound %.0e)", what, error, bound)
        if not error <= bound:
            raise BuildError(
                f"the compiled package disagrees with the eager model on {what}: relative error "
                f"{error:.3g} > {bound:g} for {manifest.compute_dtype}; no package was written"
            )


def _verify_in_child(path: Path, eager: torch.nn.Module, library: str) -> None:
    log.info("checking the package in a child process with %s preloaded", library)
    with tempfile.TemporaryDirectory(prefix="kiln-verify-") as folder:
        saved = Path(folder) / "eager.pt"
        torch.save(eager, saved)
        env = {**os.environ, PRELOAD_ENV: ":".join(filter(None, [library, os.environ.get(PRELOAD_ENV)]))}
        child = subprocess.run([sys.executable, "-m", "compile.verify", str(path), str(saved)], env=env)
    if child.returncode == _CHECK_FAILED:
        raise BuildError("the compiled package failed its check against the eager model; no package was written")
    if child.returncode != 0:
        raise BuildError(f"checking the package failed (exit status {child.returncode}); no package was written")


def _main(package: str, eager_path: str) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    eager = torch.load(eager_path, weights_only=False)  # our own file, written a moment ago
    try:
        verify_package(Path(package), eager, read_manifest(package))
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return _CHECK_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(_main(*sys.argv[1:3]))
