"""A bulk run end to end: the Fashion-MNIST test set (10,000 PNG files) classified by a small CNN,
trained here with a fixed seed, through two worker processes. Exactly 10,000 records, no
duplicates, and every prediction equal to the in-process eager prediction.

Needs the Debian package `dataset-fashion-mnist` (skipped without it).
"""

from __future__ import annotations

import gzip
import signal
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import python_env
from fashion_cnn import CLASSES, make_model, train
from packages import PACKAGE_CACHE, build_cached
from PIL import Image

from compile.models import load_state_dict
from compile.package import PackagedModel, weights_digest
from producer import Kiln
from producer.embedded import LocalWorker
from producer.settings import ProducerSettings
from worker.celery_app import make_app
from worker.contract import BULK_QUEUE
from worker.manifest import read_manifest
from worker.preprocess import decode_image
from worker.runtime import stack_images

pytestmark = pytest.mark.slow

DATA = Path("/usr/share/datasets/fashion-mnist")
TEST_IMAGES = 10_000
TRAIN_IMAGES = 20_000  # a third of the training set, one epoch: ~20 s on 2 cores, ~0.8 accuracy
JOB = "fashion"
WORKERS = 2
CHUNK = 200  # 50 chunks: both workers get work
TIE = 1e-5  # eager top-2 probabilities closer than this: float reordering may pick either
SCORE_TOLERANCE = 1e-4

timings: dict[str, float] = {}


class timed:
    def __init__(self, phase: str) -> None:
        self.phase = phase

    def __enter__(self) -> None:
        self.started = time.perf_counter()

    def __exit__(self, *_: object) -> None:
        timings[self.phase] = time.perf_counter() - self.started


def read_idx(name: str, header: int) -> np.ndarray:
    with gzip.open(DATA / name) as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=header)


@pytest.fixture(scope="module")
def fashion() -> dict[str, np.ndarray]:
    if not DATA.is_dir():
        pytest.skip(f"Fashion-MNIST not found at {DATA}: apt-get install dataset-fashion-mnist")
    data = {
        "train_images": read_idx("train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28),
        "train_labels": read_idx("train-labels-idx1-ubyte.gz", 8).astype(np.int64),
        "test_images": read_idx("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28),
        "test_labels": read_idx("t10k-labels-idx1-ubyte.gz", 8).astype(np.int64),
    }
    assert data["test_images"].shape == (TEST_IMAGES, 28, 28)
    assert len(data["test_labels"]) == TEST_IMAGES
    return data


@pytest.fixture(scope="module")
def fashion_package(fashion) -> tuple[Path, Path]:
    """Train the CNN (seed 0) and compile it. The weights file is named by the weights' digest, so
    `build_cached` reuses a package only for exactly these weights."""
    torch.set_num_threads(2)
    with timed("train"):
        model = train(
            torch.from_numpy(fashion["train_images"][:TRAIN_IMAGES].copy()),
            torch.from_numpy(fashion["train_labels"][:TRAIN_IMAGES]),
            epochs=1,
        )
    digest = weights_digest(model)
    PACKAGE_CACHE.mkdir(parents=True, exist_ok=True)
    weights = PACKAGE_CACHE / f"fashion-cnn-{digest[:12]}.pth"
    labels = PACKAGE_CACHE / "fashion-mnist-labels.txt"
    torch.save(model.state_dict(), weights)
    labels.write_text("\n".join(CLASSES) + "\n")
    args = ["fashion_cnn:make_model", "--weights", str(weights), "--labels", str(labels)]
    args += ["--resize", "28", "--crop", "28", "--mean", "0", "0", "0", "--std", "255", "255", "255"]
    args += ["--max-batch", "256"]
    with timed("compile"):
        package = build_cached("fashion-cnn-cpu", args)
    assert read_manifest(package).weights_sha256 == digest
    return package, weights


@pytest.fixture(scope="module")
def png_folder(fashion, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fashion-t10k").resolve()
    with timed("write PNGs"):
        for i, pixels in enumerate(fashion["test_images"]):
            Image.fromarray(pixels, "L").save(folder / f"{i:05d}.png")
    return folder


def eager_probabilities(package: Path, weights: Path, folder: Path) -> dict[str, torch.Tensor]:
    """Class probabilities of the eager model (the package's own wrapper around the trained CNN, in
    float32), on kiln's own decoding of each PNG."""
    manifest = read_manifest(package)
    module = make_model()
    load_state_dict(module, weights)
    eager = PackagedModel(module, manifest.preprocess, torch.float32, channels_last=False).eval()
    paths = sorted(folder.glob("*.png"))
    images = stack_images([decode_image(p.read_bytes(), manifest.preprocess) for p in paths])
    assert images.shape == (TEST_IMAGES, 3, 28, 28)
    with torch.inference_mode():
        probs = torch.cat([torch.softmax(eager(part), dim=1) for part in images.split(500)])
    return {str(p): row for p, row in zip(paths, probs, strict=True)}


def start_workers(package: Path, redis_url: str, folder: Path, logs: Path) -> list[LocalWorker]:
    # Bulk only: one chunk prefetched at a time, so the work spreads over both workers.
    options = ["--threads", "1", "--queues", BULK_QUEUE]
    return [
        LocalWorker(package, redis_url, logs / f"worker-{n}.log", [folder], options, env=python_env())
        for n in range(WORKERS)
    ]


def check_alive(workers: list[LocalWorker]) -> None:
    for worker in workers:
        worker.check()


def stop(workers: list[LocalWorker]) -> None:
    """SIGTERM (Celery's warm shutdown) to all at once, then wait for each."""
    for worker in workers:
        if worker.process.poll() is None:
            worker.process.send_signal(signal.SIGTERM)
    for worker in workers:
        worker.stop()


def wait_until_ready(redis_url: str, workers: list[LocalWorker], timeout_s: float = 180) -> None:
    """Until every worker answers a Celery ping: each has loaded the model and consumes."""
    app = make_app(ProducerSettings(redis_url=redis_url))
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            check_alive(workers)
            if len(app.control.ping(timeout=1.0)) >= len(workers):
                return
        raise TimeoutError(f"fewer than {len(workers)} workers answered a ping within {timeout_s} s")
    finally:
        app.close()


def test_fashion_mnist_bulk_run_matches_eager(fashion, fashion_package, png_folder, private_redis_url):
    redis_url = private_redis_url  # no other worker of the session takes these chunks
    package, weights = fashion_package
    with timed("eager reference"):
        eager = eager_probabilities(package, weights, png_folder)
    manifest = read_manifest(package)

    logs = png_folder.parent / "logs"
    logs.mkdir(exist_ok=True)
    workers: list[LocalWorker] = []
    try:
        with timed("workers start"):
            workers = start_workers(package, redis_url, png_folder, logs)
            wait_until_ready(redis_url, workers)
        with timed("bulk run"), Kiln(settings=ProducerSettings(redis_url=redis_url, chunk_size=CHUNK)) as kiln:
            submitted = kiln.submit([png_folder], job=JOB, topk=1)
            assert (submitted.total, submitted.enqueued) == (TEST_IMAGES, TEST_IMAGES)
            counts = kiln.wait(JOB, timeout_s=600, progress=False, check=lambda: check_alive(workers))
            records = list(kiln.results(JOB))
    except BaseException:
        for worker in workers:
            print(f"----- {worker.log_path.name} -----\n{worker.log_path.read_text(errors='replace')[-20000:]}")
        raise
    finally:
        with timed("workers stop"):
            stop(workers)

    # Exactly one record per PNG, all successful, from both workers, from this model.
    assert (counts.total, counts.done, counts.failed) == (TEST_IMAGES, TEST_IMAGES, 0)
    assert len(records) == TEST_IMAGES
    keys = [r.key for r in records]
    assert len(set(keys)) == TEST_IMAGES, "duplicate records"
    assert set(keys) == set(eager)
    assert Counter(r.status for r in records) == {"ok": TEST_IMAGES}
    assert {r.model_digest for r in records} == {manifest.weights_sha256}
    per_worker = Counter(r.worker for r in records)
    assert len(per_worker) == WORKERS, per_worker

    # Every prediction is the eager one (up to exact ties), with the same score.
    ties, mismatches, score_errors = [], [], []
    for record in records:
        probs = eager[record.key]
        assert len(record.topk) == 1
        top = record.topk[0]
        best = int(probs.argmax())
        if top.index != best:
            first, second = probs.topk(2).values.tolist()
            (ties if first - second < TIE and top.index in probs.topk(2).indices.tolist() else mismatches).append(
                record.key
            )
        else:
            assert top.label == CLASSES[best]
        if abs(top.score - float(probs[top.index])) > SCORE_TOLERANCE:
            score_errors.append((record.key, top.score, float(probs[top.index])))
    assert not mismatches, f"{len(mismatches)} predictions differ from eager, e.g. {mismatches[:5]}"
    assert not score_errors, f"{len(score_errors)} top-1 scores differ from eager, e.g. {score_errors[:5]}"

    # The model learned something.
    truth = {str(png_folder / f"{i:05d}.png"): int(label) for i, label in enumerate(fashion["test_labels"])}
    accuracy = sum(r.topk[0].index == truth[r.key] for r in records) / TEST_IMAGES
    assert accuracy > 0.75, accuracy

    print(
        f"\nfashion-mnist bulk run: accuracy {accuracy:.4f}, {len(ties)} ties, records per worker "
        f"{dict(per_worker)}\n  " + ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in timings.items())
    )
