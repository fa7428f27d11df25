"""Pipeline.warm_up() where it fails: the worker starts cold, and nothing says it warmed up."""

from __future__ import annotations

import subprocess
import textwrap

from conftest import PYTHON, python_env

# Out of memory while warming up (four worker processes starting on one GPU can be), made here
# with an address-space limit: the decode's allocations fail, as a CUDA OOM would on the GPU.
SCRIPT = textwrap.dedent(
    """
    import logging, resource, sys
    import torchvision.io  # loaded before the limit: the failure is the decode's own
    from worker.pipeline import Pipeline, PipelineConfig
    from worker.runtime import load_runtime

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    pipeline = Pipeline(load_runtime(sys.argv[1]), PipelineConfig(gpu_decode=True))
    used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (used + 8 * 2**20, resource.RLIM_INFINITY))
    warmed = pipeline.warm_up()
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    print("warm_up returned", warmed, flush=True)
    """
)


def test_a_failed_warm_up_does_not_report_a_warm_up(lite0_package):
    """init_process logs "warmed up the GPU path with N images in X s" whenever warm_up() says it
    did: after a failure, that line followed the warning that the process starts cold."""
    done = subprocess.run(
        [PYTHON, "-c", SCRIPT, str(lite0_package)], env=python_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warming up the GPU path failed" in done.stderr
    assert "warm_up returned False" in done.stdout, done.stdout
