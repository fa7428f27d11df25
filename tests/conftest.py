"""Shared fixtures: compiled packages (built once, cached on disk), sample photos, a real Redis.

Set KILN_TEST_DEVICE=cuda to run the runtime tests against CUDA packages on a GPU host.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
PACKAGE_CACHE = Path(os.environ.get("KILN_TEST_CACHE", ROOT / "build" / "test-packages"))
DEVICE = os.environ.get("KILN_TEST_DEVICE", "cpu")


def _sources_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted([*(ROOT / "compile").glob("*.py"), ROOT / "worker" / "manifest.py"]):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def build_cached(name: str, cli_args: list[str]) -> Path:
    """Build a package with `python -m compile build` (in-process), cached by the compile step's
    sources, the torch version and the arguments: compiling takes tens of seconds."""
    import torch

    key = hashlib.sha256(f"{_sources_digest()}|{torch.__version__}|{cli_args}".encode()).hexdigest()[:12]
    path = PACKAGE_CACHE / f"{name}-{key}.pt2"
    if not path.exists():
        from compile.__main__ import main as compile_main

        assert compile_main(["build", *cli_args, "-o", str(path)]) == 0, f"building {name} failed"
    return path


@pytest.fixture(scope="session")
def lite0_package() -> Path:
    """The shipped EfficientNet-Lite0 on the test device, small batch range so max+1 is cheap."""
    args = ["efficientnet_lite0", "--device", DEVICE, "--max-batch", "12"]
    if DEVICE == "cuda":
        args += ["--dtype", "bfloat16", "--channels-last"]
    return build_cached(f"lite0-{DEVICE}", args)


@pytest.fixture(scope="session")
def lite0_runtime(lite0_package: Path):
    from worker.runtime import load_runtime

    return load_runtime(lite0_package, DEVICE)


@pytest.fixture(scope="session")
def sample_photos() -> dict[str, Path]:
    return {p.stem: p for p in sorted(SAMPLES.glob("*.jpg"))}


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real redis-server on a free loopback port for the whole session (the embedded mode's own)."""
    from producer.embedded import embedded_redis

    with embedded_redis(tmp_path_factory.mktemp("redis")) as url:
        yield url


_databases = itertools.count(1)


@pytest.fixture
def private_redis_url(redis_url) -> str:
    """A Redis database of its own (the session's worker consumes database 0): for tests that
    start their own workers and must get every task themselves."""
    return f"{redis_url.rsplit('/', 1)[0]}/{next(_databases)}"


@pytest.fixture
def redis_client(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


def python_env(**extra: str) -> dict[str, str]:
    """Environment for child processes that import kiln from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


PYTHON = sys.executable


@pytest.fixture(scope="session")
def work_dir(tmp_path_factory) -> Path:
    """A folder the session's worker may read (an allowed root), for files the tests make."""
    return tmp_path_factory.mktemp("work")


@pytest.fixture(scope="session")
def lite0_worker(redis_url, lite0_package, work_dir, tmp_path_factory):
    """A real `python -m worker` process serving Lite0 from the session's Redis, warmed up."""
    from producer import Kiln
    from producer.embedded import LocalWorker

    worker = LocalWorker(
        lite0_package, redis_url, tmp_path_factory.mktemp("logs") / "worker.log", [SAMPLES, work_dir],
        options=["--loglevel", "INFO"], env=python_env(KILN_ONLINE_FLUSH_MS="50"),
    )  # fmt: skip
    try:
        with Kiln(redis_url) as kiln:
            kiln.submit([SAMPLES / "coffee.jpg"], job="warm-up")
            kiln.wait("warm-up", timeout_s=120, progress=False, check=worker.check)
        yield worker
    finally:
        worker.stop()


@pytest.fixture
def kiln(lite0_worker):
    from producer import Kiln

    with Kiln(lite0_worker.redis_url) as client:
        yield client
