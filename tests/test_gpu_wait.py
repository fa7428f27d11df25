"""KILN_GPU_WAIT=block (worker/gpu_wait.py): the flag goes to the NVIDIA driver through ctypes, so
these tests build small stand-ins for libcuda.so.1 with the host's C compiler (the one that
AOTInductor compiles packages with) and load them in a child process, where `ctypes` finds them
first on LD_LIBRARY_PATH. On the H200, bench/gpu.py's `block` workers ran with the real driver
(bench/results/gpu-h200-camera-fix.log)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import python_env

import worker.tasks
from worker.settings import WorkerSettings

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")

# Two GPUs; every call records its arguments in the file that KILN_TEST_CUDA_LOG names.
DRIVER = r"""
#include <stdio.h>
#include <stdlib.h>
static void note(const char *what, int a, int b) {
    FILE *f = fopen(getenv("KILN_TEST_CUDA_LOG"), "a");
    fprintf(f, "%s %d %d\n", what, a, b);
    fclose(f);
}
int cuInit(unsigned flags) { note("cuInit", flags, 0); return INIT_RESULT; }
int cuDeviceGetCount(int *count) { *count = 2; return 0; }
int cuDeviceGet(int *device, int ordinal) { *device = 10 + ordinal; return 0; }
#ifdef WITH_SET_FLAGS
int cuDevicePrimaryCtxSetFlags_v2(int device, unsigned flags) { note("setflags", device, flags); return 0; }
#endif
"""


def _driver(folder: Path, init_result: int = 0, set_flags: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "cuda.c"
    source.write_text(DRIVER)
    defines = [f"-DINIT_RESULT={init_result}"] + (["-DWITH_SET_FLAGS"] if set_flags else [])
    subprocess.run(["cc", "-shared", "-fPIC", *defines, "-o", str(folder / "libcuda.so.1"), str(source)], check=True)
    return folder


def _block_while_waiting(driver: Path, log: Path) -> str:
    code = "from worker.gpu_wait import block_while_waiting; print(repr(block_while_waiting()))"
    env = python_env(LD_LIBRARY_PATH=str(driver), KILN_TEST_CUDA_LOG=str(log))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_block_sets_blocking_sync_on_every_gpus_primary_context(tmp_path):
    log = tmp_path / "calls.log"
    assert _block_while_waiting(_driver(tmp_path / "ok"), log) == "None"
    assert log.read_text().splitlines() == [
        "cuInit 0 0",
        "setflags 10 4",
        "setflags 11 4",
    ]  # CU_CTX_SCHED_BLOCKING_SYNC


def test_a_driver_that_fails_or_lacks_the_call_is_a_reason_not_a_traceback(tmp_path):
    log = tmp_path / "calls.log"
    assert "CUDA error 100" in _block_while_waiting(_driver(tmp_path / "no-device", init_result=100), log)
    old = _driver(tmp_path / "old", set_flags=False)
    assert "no cuDevicePrimaryCtxSetFlags_v2" in _block_while_waiting(old, log)


class _Loaded(Exception):
    """Stands for the model loading that follows the flag."""


@pytest.mark.parametrize("wait", ["block", "spin"])
def test_only_a_worker_for_a_gpu_package_touches_the_driver(monkeypatch, lite0_package, wait):
    """A CPU package waits for no GPU: no driver call, so no warning where the driver fails (a GPU
    host serving a CPU package, or CUDA_VISIBLE_DEVICES="")."""
    calls = []
    monkeypatch.setattr(worker.tasks, "block_while_waiting", lambda: calls.append("block"))

    def loaded(*_args, **_kwargs):
        raise _Loaded

    monkeypatch.setattr("worker.runtime.load_runtime", loaded)
    settings = WorkerSettings(_env_file=None, model=str(lite0_package), gpu_wait=wait)
    for device in (None, "cuda:0"):
        with pytest.raises(_Loaded):
            worker.tasks.init_process(settings, device, 1)
    assert calls == (["block"] if wait == "block" else [])
