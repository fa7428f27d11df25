"""Check a freshly compiled package against the eager model before it is kept.

The build process computes the eager model's answers; a fresh child process (this module,
`python -m compile.verify PACKAGE CASES.pt`) loads the package with the worker's own loader and
compares. A fresh process is what a worker is: a package can pass inside the process that built
it and still crash in a new one (an out-of-bounds read that happens to land in mapped memory).
The child also gets the C++ runtime preloaded where this host needs it (worker/cxx_runtime.py),
so the compile step never has to restart and compile twice.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from worker.cxx_runtime import environ_with_preload, preload_needed
from worker.manifest import Manifest, PackageError, read_manifest
from worker.runtime import load_runtime, stack_images

log = logging.getLogger(__name__)

SAMPLES_DIR = Path(__file__).resolve().parent.parent / "samples"

# Bound on ||package - eager|| / ||eager|| over the logits, per compute dtype. Logits, not class
# probabilities: softmax multiplies a logit's error by its scale, so a model with large logits
# (random weights, or an over-confident one) failed a probability bound on rounding alone
# (random-weight ResNet-50, bfloat16, on the H200: 5.0e-2 on the sample photos). The eager
# reference runs in the same dtype; float32 kernels on the CPU only reorder sums (~1e-6 seen),
# while bfloat16 kernels round differently from eager's (docs/FACTS.md: 6.4e-3 for ResNet-18).
ERROR_BOUND = {"float32": 1e-3, "bfloat16": 5e-2}
# On CUDA, cuDNN runs float32 convolutions in TF32 (PyTorch's default,
# `torch.backends.cudnn.allow_tf32`): inputs rounded to 10-bit mantissas, in whichever algorithm
# each side picks. EfficientNet-Lite0 on the H200: 5.4e-4 to 1.01e-3, so a build failed its check
# at 1e-3 (bench/results/gpu-h200-agreement.json); a miscompile shows as 1e-1 or more.
CUDA_FLOAT32_BOUND = 1e-2


def error_bound(dtype: str, device: str) -> float:
    """The largest relative error a package of `dtype` on `device` ("cpu", "cuda") may show."""
    return CUDA_FLOAT32_BOUND if (dtype, device) == ("float32", "cuda") else ERROR_BOUND[dtype]


# The child's exit statuses, besides 0.
_DISAGREES, _BATCH_RANGE = 3, 4


class BuildError(RuntimeError):
    """The package could not be built, or failed its check against the eager model."""


class BatchRangeError(BuildError):
    """The package does not run every batch size of its range: torch fixed the batch dimension
    while compiling (seen on CPU when the tune batch sat on a threshold of ATen's convolution)."""


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-12))


def sample_batch(manifest: Manifest, folder: Path = SAMPLES_DIR) -> torch.Tensor | None:
    """The bundled sample photos, preprocessed as a worker would: the real-input check."""
    from worker.preprocess import decode_image

    arrays = [decode_image(p.read_bytes(), manifest.preprocess) for p in sorted(folder.glob("*.jpg"))]
    return stack_images(arrays) if arrays else None


def reference_cases(eager: torch.nn.Module, manifest: Manifest) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Inputs and the eager model's logits (float32): random batches of the extreme sizes, an
    odd one and the tune batch, and the sample photos."""
    c, h, w = manifest.input_shape
    generator = torch.Generator().manual_seed(0)
    top = manifest.batch_max
    sizes = sorted({1, 2, min(3, top), manifest.tune_batch or top, top})
    inputs = {
        f"random batch {n}": torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=generator) for n in sizes
    }
    photos = sample_batch(manifest)
    if photos is not None and photos.shape[1:] == (c, h, w):
        inputs["sample photos"] = photos
    device = torch.device(manifest.device)
    cases = {}
    with torch.inference_mode():
        for what, images in inputs.items():
            cases[what] = (images, eager(images.to(device)).float().cpu())
    return cases


def check_package(path: Path, cases: dict[str, tuple[torch.Tensor, torch.Tensor]], manifest: Manifest) -> None:
    """Run the package on each case and compare; raise `BuildError` past the dtype's bound."""
    runtime = load_runtime(path, warmup=False)
    bound = error_bound(manifest.compute_dtype, manifest.device)
    for what, (images, reference) in cases.items():
        try:
            logits = runtime.logits(images)
        except PackageError as e:
            raise BatchRangeError(f"{what}: {e}") from e
        error = relative_error(logits, reference)
        log.info("check %-16s relative error %.2e (bound %.0e)", what, error, bound)
        if not error <= bound:
            raise BuildError(
                f"the compiled package disagrees with the eager model on {what}: relative error "
                f"{error:.3g} > {bound:g} for {manifest.compute_dtype}"
            )


def verify_package(path: Path, eager: torch.nn.Module, manifest: Manifest) -> None:
    """Check the package in a fresh child process against the eager model's answers."""
    cases = reference_cases(eager, manifest)
    env, library = None, preload_needed(path)
    if library is not None:
        log.info("checking the package with %s preloaded", library)
        env = environ_with_preload(library)
    with tempfile.TemporaryDirectory(prefix="kiln-verify-") as folder:
        saved = Path(folder) / "cases.pt"
        torch.save(cases, saved)
        child = subprocess.run(
            [sys.executable, "-m", "compile.verify", str(path), str(saved)], env=env, stderr=subprocess.PIPE, text=True
        )
    sys.stderr.write(child.stderr)  # its log: one line per check
    errors = [line.removeprefix("error: ") for line in child.stderr.splitlines() if line.startswith("error: ")]
    if child.returncode == _DISAGREES:
        raise BuildError(errors[-1] if errors else "the compiled package failed its check against the eager model")
    if child.returncode == _BATCH_RANGE:
        raise BatchRangeError(errors[-1] if errors else "the compiled package does not take every batch size")
    if child.returncode < 0:
        raise BatchRangeError(
            f"the compiled package crashed ({signal.Signals(-child.returncode).name}) on the check after the "
            "last one above: torch may have compiled it for one batch size only; try another --tune-batch"
        )
    if child.returncode != 0:
        raise BuildError(f"checking the package failed (exit status {child.returncode}, see above)")


def _main(package: str, cases_path: str) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cases = torch.load(cases_path, weights_only=True)
    try:
        check_package(Path(package), cases, read_manifest(package))
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return _BATCH_RANGE if isinstance(e, BatchRangeError) else _DISAGREES
    return 0


if __name__ == "__main__":
    sys.exit(_main(*sys.argv[1:3]))
