"""A real S3-compatible server on loopback for object-store tests: moto's server mode
(`python -m moto.server`) as a child process, as s3fs's own tests run it, reached through the
standard AWS environment only (so kiln is tested with the configuration a user would give it)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUCKET = "kiln-test"
ALLOWED_PREFIX = "allowed/"  # the session worker's object-store root is s3://kiln-test/allowed/


@dataclass
class S3Server:
    """A running moto server and its one bucket. `env` is what any process needs to reach it."""

    env: dict[str, str]
    bucket: str = BUCKET
    _fs: Any = field(default=None, repr=False)

    @property
    def fs(self) -> Any:
        """s3fs on this server, for tests to write and read objects."""
        if self._fs is None:
            import s3fs

            self._fs = s3fs.S3FileSystem(
                key=self.env["AWS_ACCESS_KEY_ID"],
                secret=self.env["AWS_SECRET_ACCESS_KEY"],
                endpoint_url=self.env["AWS_ENDPOINT_URL"],
                skip_instance_cache=True,
            )
        return self._fs

    def url(self, key: str) -> str:
        """`s3://kiln-test/<key>`."""
        return f"s3://{self.bucket}/{key}"

    def put(self, key: str, data: bytes | Path) -> str:
        """Write one object (bytes, or a local file's bytes); returns its s3:// URL."""
        self.fs.pipe_file(f"{self.bucket}/{key}", data.read_bytes() if isinstance(data, Path) else data)
        return self.url(key)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_s3(log_path: Path, timeout_s: float = 120) -> Iterator[S3Server]:
    """Start moto's server on a free loopback port, create the bucket, and yield the server. The
    port is chosen before moto binds it, so a port taken in between is retried with another."""
    for _ in range(5):
        port = _free_port()
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            if _wait_until_up(process, f"http://127.0.0.1:{port}", timeout_s):
                break
        except BaseException:
            _stop(process)
            raise
    else:
        raise RuntimeError(f"moto server did not start; see {log_path}:\n{log_path.read_text()[-2000:]}")
    env = {
        "AWS_ACCESS_KEY_ID": "kiln-test-key",
        "AWS_SECRET_ACCESS_KEY": "kiln-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",  # botocore's standard variable, as a user sets it
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,  # nothing from the developer's own ~/.aws
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    server = S3Server(env)
    try:
        server.fs.mkdir(BUCKET)
        yield server
    finally:
        _stop(process)


def _wait_until_up(process: subprocess.Popen, url: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False  # the port was taken: try another
        try:
            with urllib.request.urlopen(url + "/moto-api/", timeout=5):
                return True
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise RuntimeError(f"moto server on {url} did not answer within {timeout_s} s")


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
