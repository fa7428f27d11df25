"""The worker image and the compose stack against a real Docker engine (`make test` starts one
where it can: docker/engine.sh). Every container uses the host's network, so all traffic stays
on 127.0.0.1.

The base image is built from Debian packages (docker/debian-base.sh, cached under
/var/cache/kiln), as this host cannot pull from a registry; Docker's layer cache makes the
second run fast.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, SAMPLES

from producer import Item, Kiln
from producer.embedded import _free_port
from producer.settings import ProducerSettings

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1800)]

DOCKER = ROOT / "docker"
IMAGE = "kiln-worker:test"
REDIS_IMAGE = "kiln-redis:test"
BASE = "kiln-base:bookworm"


def run(*command: str | Path, timeout: float = 1200, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, command))} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return done


def _engine_problem() -> str | None:
    if not shutil.which("docker"):
        return "no docker CLI (make test installs docker.io as root: docker/engine.sh)"
    done = subprocess.run(["docker", "info"], capture_output=True, text=True)
    if done.returncode != 0:
        return (
            f"no Docker engine answers (make test starts one as root: docker/engine.sh): {done.stderr.strip()[-300:]}"
        )
    return None


def _compose_command() -> list[str] | None:
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


@pytest.fixture(scope="module")
def images() -> dict[str, float]:
    """Build the base (once per host), the Redis image and the worker image; the seconds each took."""
    problem = _engine_problem()
    if problem:
        pytest.skip(problem)
    if subprocess.run(["docker", "image", "inspect", BASE], capture_output=True).returncode and os.geteuid() != 0:
        pytest.skip(f"no {BASE} image, and building it (debootstrap) needs root: run docker/debian-base.sh as root")
    timings = {}
    for name, command in [
        ("base", [DOCKER / "debian-base.sh", BASE]),
        # The classic builder: this one needs nothing of BuildKit's, and every docker CLI has it.
        ("redis", ["env", "DOCKER_BUILDKIT=0", "docker", "build", "--network", "host", "-f",
                   DOCKER / "redis.Dockerfile", "--build-arg", f"BASE={BASE}", "-t", REDIS_IMAGE, DOCKER]),
        ("worker", [DOCKER / "build.sh", "-t", IMAGE, "--network", "host", "--build-arg", f"BASE={BASE}",
                    "--build-arg", "MAX_BATCH=12"]),
    ]:  # fmt: skip
        started = time.monotonic()
        run(*command, timeout=1500)
        timings[name] = round(time.monotonic() - started, 1)
    print(f"docker build times (s): {timings}")
    return timings


def inspect(image: str) -> dict:
    return json.loads(run("docker", "image", "inspect", image).stdout)[0]


def test_the_image_is_labelled_lean_and_runs_as_a_user(images):
    config = inspect(IMAGE)["Config"]
    manifest = json.loads(
        run(
            "docker", "run", "--rm", "--network", "host", "--entrypoint", "cat", IMAGE, "/opt/kiln-model/manifest.json"
        ).stdout
    )
    assert config["Labels"]["io.kiln.model"] == manifest["model"] == "efficientnet_lite0"
    assert config["Labels"]["io.kiln.weights-sha256"] == manifest["weights_sha256"]
    assert config["User"] == "kiln"
    assert config["Entrypoint"] == ["python", "-m", "worker"]
    assert config["Healthcheck"]["Test"] == ["CMD", "python", "-m", "worker.health"]
    # No compiler, no build stage leftovers, no tests or samples, no compiler caches.
    leftovers = run(
        "docker", "run", "--rm", "--network", "host", "--entrypoint", "sh", IMAGE, "-c",
        "command -v g++ gcc cc; ls -d /src /samples /tests /root/.cache ~/.cache /tmp/torchinductor_* 2>/dev/null;"
        "pip show triton 2>/dev/null | head -1; true",
    ).stdout  # fmt: skip
    assert leftovers.strip() == "", leftovers
    size_gb = inspect(IMAGE)["Size"] / 1e9
    print(f"image size: {size_gb:.2f} GB")


def test_a_wrong_or_corrupt_package_stops_the_container_with_the_reason(images, lite0_package, tmp_path):
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(lite0_package.read_bytes()[: lite0_package.stat().st_size // 2])
    not_aoti = tmp_path / "not-aoti.pt2"
    with zipfile.ZipFile(not_aoti, "w") as archive:
        archive.writestr("model/data.pkl", b"not a compiled model")
    not_zip = tmp_path / "not-zip.pt2"
    not_zip.write_bytes(b"\x7fELF this is no package")
    for package, reason in [(truncated, "zip"), (not_aoti, "not an AOTInductor package"), (not_zip, "zip")]:
        package.chmod(0o644)
        done = run(
            "docker", "run", "--rm", "--network", "host", "-e", "KILN_REDIS_URL=redis://127.0.0.1:1/0",
            "-v", f"{package}:/opt/kiln-model/model.pt2:ro", IMAGE, timeout=300, check=False,
        )  # fmt: skip
        assert done.returncode == 2, (package.name, done.returncode, done.stderr[-2000:])
        assert "error:" in done.stderr and reason in done.stderr, (package.name, done.stderr[-2000:])
        assert "Traceback" not in done.stderr, done.stderr[-2000:]


def test_too_little_shared_memory_stops_the_container_with_what_to_do(images, lite0_package, redis_url, tmp_path):
    """Docker's default /dev/shm (64 MB) is less than a GPU worker process's decode slots (75 MB at
    batch 256), and tmpfs hands pages out when first written: the worker died of SIGBUS mid-job.
    It reserves them at start now. Here a CPU worker with a decode process (28 slots of the test
    package's batch of 12, 4 MB) in a 1 MB /dev/shm."""
    package = tmp_path / "model.pt2"
    shutil.copyfile(lite0_package, package)
    package.chmod(0o644)
    name = f"kiln-shm-{uuid.uuid4().hex[:8]}"
    try:
        done = run(
            "docker", "run", "--rm", "--name", name, "--network", "host", "--shm-size=1m",
            "-e", f"KILN_REDIS_URL={redis_url}", "-e", "KILN_DECODE_PROCESSES=1", "-e", "KILN_METRICS_PORT=0",
            "-v", f"{package}:/opt/kiln-model/model.pt2:ro", IMAGE, timeout=300, check=False,
        )  # fmt: skip
    finally:
        run("docker", "rm", "-f", name, check=False)  # a worker that started after all must not outlive the test
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "error:" in done.stderr and "shared memory" in done.stderr and "--shm-size" in done.stderr, done.stderr[
        -2000:
    ]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]


def test_compose_names_the_folder_setting_it_lacks():
    """Without KILN_IMAGES (or KILN_OUT) compose stops and says which to set: before, it mounted an
    empty ./images it created in docker/, and only the producer's "no images found" hinted why."""
    compose = _compose_command()
    if compose is None:
        pytest.skip("no docker compose (make test installs docker-compose as root: docker/engine.sh)")
    env = {k: v for k, v in os.environ.items() if k not in ("KILN_IMAGES", "KILN_OUT")}
    for missing in ("KILN_IMAGES", "KILN_OUT"):
        done = subprocess.run(
            [*compose, "-f", DOCKER / "compose.yaml", "config"], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode != 0 and f"set {missing} to the absolute path" in done.stdout + done.stderr
        env[missing] = "/tmp"
    assert (
        subprocess.run([*compose, "-f", DOCKER / "compose.yaml", "config"], env=env, capture_output=True).returncode
        == 0
    )


@pytest.fixture(scope="module")
def stack(images, tmp_path_factory) -> Iterator[dict]:
    """Redis and two workers from docker/compose.yaml (with the host-network override)."""
    compose = _compose_command()
    if compose is None:
        pytest.skip("no docker compose (make test installs docker-compose as root: docker/engine.sh)")
    folder = tmp_path_factory.mktemp("images")
    out = tmp_path_factory.mktemp("out")
    for path in [folder, out]:
        path.chmod(0o777)
    for sample in SAMPLES.glob("*.jpg"):
        shutil.copy(sample, folder / sample.name)
    for i in range(60):
        shutil.copy(SAMPLES / ("coffee.jpg" if i % 2 else "chelsea.jpg"), folder / f"many-{i:03d}.jpg")
    port = _free_port()
    env = dict(
        os.environ, KILN_IMAGE=IMAGE, KILN_REDIS_IMAGE=REDIS_IMAGE, KILN_REDIS_PORT=str(port), KILN_IMAGES=str(folder),
        KILN_OUT=str(out), KILN_LEASE_S="10", COMPOSE_PROJECT_NAME=f"kilntest{uuid.uuid4().hex[:8]}",
    )  # fmt: skip
    base = [*compose, "-f", DOCKER / "compose.yaml", "-f", DOCKER / "compose.host.yaml"]
    try:
        started = time.monotonic()
        run(*base, "up", "-d", "--scale", "worker=2", "redis", "worker", env=env, timeout=600)
        containers = run(*base, "ps", "-q", "worker", env=env).stdout.split()
        assert len(containers) == 2, containers
        wait_healthy(containers, timeout_s=600)
        print(f"stack healthy in {time.monotonic() - started:.1f} s")
        yield {
            "run": base,
            "env": env,
            "folder": folder,
            "out": out,
            "url": f"redis://127.0.0.1:{port}/0",
            "workers": containers,
        }
    finally:
        logs = run(*base, "logs", "--tail", "40", env=env, check=False).stdout
        print(logs[-6000:])
        run(*base, "down", "-v", "--timeout", "10", env=env, check=False)


def health(container: str) -> str:
    return run("docker", "inspect", "--format", "{{.State.Health.Status}}", container, check=False).stdout.strip()


def wait_healthy(containers: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = [health(c) for c in containers]
        if all(s == "healthy" for s in states):
            return
        time.sleep(2)
    raise AssertionError(f"workers not healthy after {timeout_s} s: {states}")


def test_the_stack_labels_the_samples(stack):
    photos = ["/images/chelsea.jpg", "/images/coffee.jpg", "/images/rocket.jpg"]
    label = ["label", *photos, "--job", "samples", "--out", "/out/samples.csv", "--no-progress"]
    done = run(*stack["run"], "run", "--rm", "producer", *label, env=stack["env"], timeout=600)
    rows = {row["key"].rsplit("/", 1)[-1]: row for row in csv.DictReader((stack["out"] / "samples.csv").open())}
    assert rows["chelsea.jpg"]["label_1"] in {"tiger cat", "Egyptian cat", "tabby"}, done.stdout
    assert rows["coffee.jpg"]["label_1"] == "espresso"
    assert all(row["status"] == "ok" for row in rows.values())
    # Every export format works inside the image (Parquet needs pyarrow, which the image carries).
    run(*stack["run"], "run", "--rm", "producer", "export", "samples", "--out", "/out/samples.parquet",
        env=stack["env"], timeout=300)  # fmt: skip
    import pyarrow.parquet as pq

    table = pq.read_table(stack["out"] / "samples.parquet")
    assert sorted(k.rsplit("/", 1)[-1] for k in table.column("key").to_pylist()) == sorted(rows)


def test_a_worker_killed_mid_job_loses_nothing_and_duplicates_nothing(stack):
    names = sorted(p.name for p in stack["folder"].glob("many-*.jpg"))
    settings = ProducerSettings(redis_url=stack["url"], chunk_size=10)
    with Kiln(settings=settings) as kiln:
        kiln.submit([Item(key=name, ref=f"/images/{name}") for name in names], job="killed")
        deadline = time.monotonic() + 300
        while kiln.counts("killed").done < 5 and time.monotonic() < deadline:
            time.sleep(0.2)
        run("docker", "kill", stack["workers"][0])
        assert kiln.counts("killed").done < len(names), "the job finished before the kill: nothing to redeliver"
        counts = kiln.wait("killed", timeout_s=600, progress=False)
        records = list(kiln.results("killed"))
    assert (counts.total, counts.done, counts.failed) == (60, 60, 0)
    assert sorted(r.key for r in records) == names  # exactly one record per image
