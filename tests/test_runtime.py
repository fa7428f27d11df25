"""The model runtime against the real EfficientNet-Lite0 package: labels, agreement with eager,
batch edges, the stride trap, and every refusal."""

from __future__ import annotations

import json
import subprocess
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import PYTHON, python_env
from packages import DEVICE

from compile.models import resolve_model
from compile.package import DTYPES, PackagedModel
from compile.verify import error_bound, relative_error
from worker.manifest import MANIFEST_KEY, PackageError, read_manifest
from worker.preprocess import decode_image
from worker.runtime import load_runtime, stack_images
from worker.scratch import scratch_root, sweep_stale

CAT_CLASSES = {"tiger cat", "Egyptian cat", "tabby"}


def photo_batch(runtime, photos: dict[str, Path], names: list[str]) -> torch.Tensor:
    return stack_images([decode_image(photos[n].read_bytes(), runtime.manifest.preprocess) for n in names])


def test_real_photos_get_the_right_labels(lite0_runtime, sample_photos):
    top = lite0_runtime.classify(photo_batch(lite0_runtime, sample_photos, ["chelsea", "coffee"]), k=3)
    assert top[0][0].label in CAT_CLASSES, top[0]
    assert top[1][0].label == "espresso", top[1]
    assert top[1][0].score > 0.8
    assert [label.score for label in top[0]] == sorted((label.score for label in top[0]), reverse=True)


@pytest.fixture(scope="module")
def eager_lite0(lite0_runtime):
    manifest = lite0_runtime.manifest
    spec = resolve_model("efficientnet_lite0")
    dtype = DTYPES[manifest.compute_dtype]
    model = PackagedModel(spec.module.to(dtype), spec.preprocess, dtype, manifest.memory_format == "channels_last")
    return model.to(lite0_runtime.device).eval()


def eager_logits(model, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(images.to(next(model.parameters()).device)).float().cpu()


@pytest.mark.parametrize("count", [1, 2, 12, 13, 35])
def test_any_batch_size_agrees_with_eager(lite0_runtime, eager_lite0, count):
    """Batch 1 (padded to the exported minimum), the maximum (12) and past it (split)."""
    assert lite0_runtime.batch_max == 12
    images = torch.randint(
        0, 256, (count, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(count)
    )
    logits, probs = lite0_runtime.logits(images), lite0_runtime.predict(images)
    assert logits.shape == probs.shape == (count, 1000)
    bound = error_bound(lite0_runtime.manifest.compute_dtype, lite0_runtime.manifest.device)
    assert relative_error(logits, eager_logits(eager_lite0, images)) < bound
    assert torch.allclose(probs, torch.softmax(logits, dim=1))


def test_empty_batch(lite0_runtime):
    assert lite0_runtime.predict(torch.zeros((0, 3, 224, 224), dtype=torch.uint8)).shape == (0, 1000)


def test_non_contiguous_inputs_give_the_same_answer(lite0_runtime, sample_photos):
    """docs/FACTS.md: the compiled code assumes the exported strides; a channels_last, permuted or
    sliced tensor must not silently change the logits."""
    images = photo_batch(lite0_runtime, sample_photos, sorted(sample_photos))
    reference = lite0_runtime.predict(images.contiguous())
    channels_last = images.contiguous(memory_format=torch.channels_last)
    assert not channels_last.is_contiguous()
    doubled = torch.stack([images, images], dim=1).flatten(0, 1)[::2]  # every other image: a strided view
    assert not doubled.is_contiguous()
    hwc = images.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # NCHW view of NHWC memory
    for variant in (channels_last, doubled, hwc):
        assert torch.equal(variant, images)
        assert torch.allclose(lite0_runtime.predict(variant), reference, atol=1e-5)


def test_wrong_inputs_are_refused(lite0_runtime):
    with pytest.raises(TypeError, match="uint8"):
        lite0_runtime.predict(torch.zeros((2, 3, 224, 224)))
    with pytest.raises(ValueError, match="N x 3 x 224 x 224"):
        lite0_runtime.predict(torch.zeros((2, 3, 100, 100), dtype=torch.uint8))


def test_manifest_describes_the_package(lite0_package):
    manifest = read_manifest(lite0_package)
    assert manifest.model == "efficientnet_lite0"
    assert len(manifest.labels) == 1000 and manifest.labels[285] == "Egyptian cat"
    assert manifest.preprocess.interpolation == "bicubic" and manifest.preprocess.mean == (127.0,) * 3
    assert (manifest.batch_min, manifest.batch_max, manifest.tune_batch, manifest.device) == (2, 12, 12, DEVICE)
    assert manifest.torch_version == torch.__version__
    assert len(manifest.weights_sha256) == 64 and manifest.weights_source == "shipped"
    if DEVICE == "cuda":
        major, minor = torch.cuda.get_device_capability()
        assert manifest.gpu_arch == f"sm_{major}{minor}"


# --- refusals -------------------------------------------------------------------------------


def rewrite_manifest(source: Path, target: Path, **changes) -> Path:
    """Copy a package, changing fields of its manifest (or, with manifest=None, dropping it)."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("wrapper_metadata.json"):
                metadata = json.loads(data)
                if changes.get("manifest", ...) is None:
                    del metadata[MANIFEST_KEY]
                else:
                    manifest = json.loads(metadata[MANIFEST_KEY])
                    manifest.update(changes)
                    metadata[MANIFEST_KEY] = json.dumps(manifest)
                data = json.dumps(metadata).encode()
            dst.writestr(info, data)
    return target


def test_refuses_a_file_that_is_not_a_package(tmp_path, sample_photos):
    with pytest.raises(PackageError, match=r"not a \.pt2 package"):
        load_runtime(sample_photos["coffee"])
    with pytest.raises(PackageError, match="no such file"):
        load_runtime(tmp_path / "missing.pt2")


def test_refuses_a_zip_without_a_compiled_model(tmp_path):
    path = tmp_path / "other.pt2"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("model/data.pkl", b"not a model")
    with pytest.raises(PackageError, match="not an AOTInductor package"):
        load_runtime(path)


def test_refuses_a_corrupt_package(tmp_path, lite0_package):
    data = bytearray(lite0_package.read_bytes())
    with zipfile.ZipFile(lite0_package) as archive:
        so = next(i for i in archive.infolist() if i.filename.endswith(".so"))
    start = so.header_offset + 30 + len(so.filename) + len(so.extra) + so.compress_size // 2
    data[start : start + 64] = bytes(64)  # damage the middle of the compiled model
    corrupt = tmp_path / "corrupt.pt2"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(PackageError, match="corrupt package"):
        load_runtime(corrupt)
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(PackageError, match=r"not a \.pt2 package"):
        load_runtime(truncated)


def test_refuses_an_aoti_package_without_a_kiln_manifest(tmp_path, lite0_package):
    path = rewrite_manifest(lite0_package, tmp_path / "plain.pt2", manifest=None)
    with pytest.raises(PackageError, match="not a kiln one"):
        load_runtime(path)


def test_refuses_another_torch_version(tmp_path, lite0_package):
    path = rewrite_manifest(lite0_package, tmp_path / "old.pt2", torch_version="2.3.1+cu121")
    with pytest.raises(PackageError, match=r"built with torch 2\.3\.1"):
        load_runtime(path)


def test_refuses_a_cuda_package_without_cuda_or_on_another_gpu(tmp_path, lite0_package):
    path = rewrite_manifest(lite0_package, tmp_path / "gpu.pt2", device="cuda", gpu_arch="sm_50")
    if torch.cuda.is_available():
        with pytest.raises(PackageError, match="compiled for sm_50"):
            load_runtime(path)
    else:
        with pytest.raises(PackageError, match="no usable CUDA device"):
            load_runtime(path)


def test_refuses_a_device_other_than_the_packages(lite0_package):
    other = "cpu" if DEVICE == "cuda" else "cuda"
    with pytest.raises(PackageError, match=f"built for {DEVICE}, not {other}"):
        load_runtime(lite0_package, other)


def test_refuses_kernels_for_a_stronger_cpu(tmp_path, lite0_package):
    if DEVICE != "cpu" or torch.backends.cpu.get_cpu_capability() == "AVX512":
        pytest.skip("needs a CPU package on a CPU without AVX512")
    path = rewrite_manifest(lite0_package, tmp_path / "avx512.pt2", cpu_isa="AVX512")
    with pytest.raises(PackageError, match="kernels use AVX512"):
        load_runtime(path)


# --- what a load leaves on disk -------------------------------------------------------------

LOAD_AND_WAIT = """
import sys, time
from worker.runtime import load_runtime
from worker.scratch import process_scratch_dir
runtime = load_runtime(sys.argv[1], warmup=False)  # kept: the loader removes its files when freed
print(process_scratch_dir(), flush=True)
time.sleep(float(sys.argv[2]))
"""


def stray_unpack_folders() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("aotinductor_*"))


def test_unpacked_files_are_removed_at_exit_and_swept_after_a_kill(lite0_package):
    """Whatever the loader unpacks lands in kiln's per-process folder (torch 2.14 unpacks the .so
    there; torch 2.11 was seen leaving nothing), never loose in the temp folder; a normal exit
    removes the folder, and a killed process's folder is swept by the next load."""
    before = stray_unpack_folders()

    def start(linger: float) -> tuple[subprocess.Popen, Path]:
        child = subprocess.Popen(
            [PYTHON, "-c", LOAD_AND_WAIT, str(lite0_package), str(linger)],
            stdout=subprocess.PIPE,
            text=True,
            env=python_env(),
        )
        folder = Path(child.stdout.readline().strip())
        assert folder.parent == scratch_root(), folder
        assert stray_unpack_folders() == before
        return child, folder

    child, folder = start(0)
    assert child.wait(60) == 0
    assert not folder.exists(), "a normal exit must remove the process's folder"

    child, folder = start(60)
    assert folder.is_dir()
    if torch.__version__ >= "2.14":
        assert any(folder.rglob("*.so")), "torch 2.14 unpacks the compiled model into kiln's folder"
    child.kill()
    child.wait(10)
    assert folder.exists()  # SIGKILL: nothing ran at exit
    assert folder in sweep_stale()
    assert not folder.exists()
