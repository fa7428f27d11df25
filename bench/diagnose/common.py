"""What the diagnosis scripts share: the repository on `sys.path` (they run as
`python3 bench/diagnose/NAME.py`), and a JSON file of results written as they come, so that a run
cut short by the device's time limit keeps what it measured."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


class Results(dict):
    """A dict of results that `save()` writes to `path` as JSON."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)

    def save(self) -> None:
        self.path.write_text(json.dumps(self, indent=1))


def resnet18_on_640x480(wheels: list[str]) -> tuple[str, Path, Path]:
    """Where the end-to-end diagnoses start: the carried `wheels` folders installed (the script
    re-executes with them), bench/gpu.py's ResNet-18 package built or reused, the C++ runtime
    preloaded (it may re-execute again), and its 8,192 640x480 JPEGs. Returns the package's path,
    the folder of JPEGs and bench/gpu.py's work folder."""
    from bench.gpu import SMALL, build_packages, dataset, install_wheels

    install_wheels([Path(p) for p in wheels])
    from worker.cxx_runtime import ensure_cxx_runtime

    package = build_packages(("resnet18",))["resnet18"]["path"]
    ensure_cxx_runtime(package)
    workdir = ROOT / "build" / "gpu-bench-work"
    workdir.mkdir(parents=True, exist_ok=True)
    return package, dataset("jpeg", 8192, SMALL), workdir


@contextlib.contextmanager
def mps_daemon() -> Iterator[dict[str, str] | None]:
    """CUDA MPS for the block (kernels of several processes then run on the GPU at once, instead
    of the GPU time-slicing between their contexts), quit after it. Yields the environment that
    its client processes need, or None where the host has no `nvidia-cuda-mps-control`."""
    control = shutil.which("nvidia-cuda-mps-control")
    if control is None:
        yield None
        return
    pipes = {"CUDA_MPS_PIPE_DIRECTORY": "/tmp/mps-pipe", "CUDA_MPS_LOG_DIRECTORY": "/tmp/mps-log"}
    for folder in pipes.values():
        os.makedirs(folder, exist_ok=True)
    env = dict(os.environ, **pipes)
    subprocess.run([control, "-d"], env=env, check=True)
    try:
        yield pipes
    finally:
        subprocess.run([control], input="quit\n", env=env, text=True, capture_output=True)


def worker_variant(
    results: Results,
    name: str,
    package: str,
    url: str,
    folder: Path,
    log: Path,
    env: dict[str, str],
    measure: Callable[[object], dict],
    shown: tuple[str, ...],
) -> None:
    """One end-to-end variant: bench/gpu.py's worker with `env` started and warmed up on `folder`,
    then `measure(worker)`; its row (or the error) saved under `name` with the environment, the
    plan line and the seconds it took, and the `shown` keys printed. The worker stops either way."""
    from bench.gpu import _worker, plan_line, warm

    started = time.perf_counter()
    worker = _worker(package, url, [folder], log, env)
    try:
        warm(url, folder, [worker])
        results[name] = {**measure(worker), "env": env, "plan": plan_line(log)}
    except Exception as e:
        results[name] = {"error": repr(e)[-1500:], "env": env}
    finally:
        worker.stop()
    results[name]["variant_s"] = round(time.perf_counter() - started, 1)
    results.save()
    print(name, {k: v for k, v in results[name].items() if k in (*shown, "error")}, flush=True)
