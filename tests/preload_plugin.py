"""Loaded with `-p tests.preload_plugin` (see pyproject.toml), before pytest captures output:
where this host is known to need the C++ runtime preloaded for AOTInductor packages
(worker/cxx_runtime.py), restart the test run with it, so that tests load packages in-process."""

from worker.cxx_runtime import ensure_cxx_runtime

ensure_cxx_runtime()
