"""Loaded with `-p tests.preload_plugin` (see pyproject.toml), before pytest captures output:
where this host needs the C++ runtime preloaded for AOTInductor packages (worker/cxx_runtime.py),
restart the test run with it, so that tests load packages in-process.

On a host not yet probed, the probe needs a package: build the one the tests load anyway first."""

from worker.cxx_runtime import ensure_cxx_runtime, verdict_known

if verdict_known():
    ensure_cxx_runtime()
else:
    from tests.packages import build_lite0

    print("kiln: first test run on this host: building the test package to probe the C++ runtime", flush=True)
    ensure_cxx_runtime(build_lite0())
