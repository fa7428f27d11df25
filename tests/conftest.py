"""Shared fixtures: compiled packages (built once, cached on disk), sample photos, a real Redis.

Set KILN_TEST_DEVICE=cuda to run the runtime tests against CUDA packages on a GPU host.
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
from pathlib import Path

import pytest
from packages import DEVICE, ROOT, build_lite0, build_lite0_float32

SAMPLES = ROOT / "samples"
CATS = {"tiger cat", "Egyptian cat", "tabby"}  # ImageNet labels that are right for chelsea.jpg


def pytest_configure(config: pytest.Config) -> None:
    """Run as from a terminal, whatever started pytest: a shell's background job (`cmd &` without
    job control) or `nohup` starts it with SIGINT and SIGQUIT, or SIGHUP, ignored, and every
    process the tests start would inherit that (an ignored signal survives exec), so the tests
    that send those signals failed. Handled, they are back to the default in each child."""
    for signum in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
        if signal.getsignal(signum) == signal.SIG_IGN:
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else _default_in_children)


def _default_in_children(signum: int, frame: object) -> None:
    """A handler only so that processes started from here get the default action (exec resets a
    handled signal, not an ignored one); pytest itself then ignores the signal, as it was asked."""


@pytest.fixture(scope="session")
def lite0_package() -> Path:
    return build_lite0()


@pytest.fixture(scope="session")
def lite0_runtime(lite0_package: Path):
    from worker.runtime import load_runtime

    return load_runtime(lite0_package, DEVICE)


@pytest.fixture(scope="session")
def lite0_float32_runtime(request):
    from worker.runtime import load_runtime

    if DEVICE != "cuda":
        return request.getfixturevalue("lite0_runtime")  # float32 already
    return load_runtime(build_lite0_float32(), DEVICE)


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
    """A Redis database of its own (the session's worker consumes database 0), emptied first: for
    tests that start their own workers and must get every task themselves. Redis has 16 databases:
    they are reused in turn, each test's workers being gone by then."""
    import redis

    url = f"{redis_url.rsplit('/', 1)[0]}/{next(_databases) % 15 + 1}"
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    return url


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
def s3(tmp_path_factory):
    """A real S3-compatible server (moto, a child process) on loopback with the bucket `kiln-test`,
    for the whole session. Its credentials and endpoint are set in this process's standard AWS
    environment (so s3fs here reaches it) and given to the session's worker; `s3.put(key, data)`
    writes an object and returns its s3:// URL."""
    from s3_server import serve_s3

    with serve_s3(tmp_path_factory.mktemp("s3") / "moto.log") as server, pytest.MonkeyPatch.context() as patch:
        for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            patch.delenv(name, raising=False)
        for name, value in server.env.items():
            patch.setenv(name, value)
        yield server


@pytest.fixture(scope="session")
def lite0_worker(redis_url, lite0_package, work_dir, s3, tmp_path_factory):
    """A real `python -m worker` process serving Lite0 from the session's Redis, warmed up. It may
    read the samples, `work_dir` and objects under s3://kiln-test/allowed/ on the `s3` server."""
    from s3_server import ALLOWED_PREFIX

    from producer import Kiln
    from producer.embedded import LocalWorker

    worker = LocalWorker(
        lite0_package, redis_url, tmp_path_factory.mktemp("logs") / "worker.log",
        [SAMPLES, work_dir, s3.url(ALLOWED_PREFIX)], options=["--loglevel", "INFO"],
        env=python_env(KILN_ONLINE_FLUSH_MS="50", KILN_FETCH_ALLOWED_NETWORKS="127.0.0.1/32"),  # the test server
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
