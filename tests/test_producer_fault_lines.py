"""How the producer describes Redis faults: every URL masked, one line with what to do."""

from __future__ import annotations

import pytest
import redis
from kombu.exceptions import OperationalError

from producer.faults import describe, transient
from worker.settings import mask_url


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("redis://:s3cret@host:6379/0", "redis://:***@host:6379/0"),
        ("rediss://user:p@ss@host/1?ssl_cert_reqs=none", "rediss://user:***@host/1?ssl_cert_reqs=none"),
        ("unix://:pw@/run/redis.sock?db=2", "unix://:***@/run/redis.sock?db=2"),
        (
            "no job named 'x' in redis://:pw@h:1/0, nor in redis://:other@h:2/0",
            "no job named 'x' in redis://:***@h:1/0, nor in redis://:***@h:2/0",
        ),
        ("redis://host:6379/0 and user@example.org", "redis://host:6379/0 and user@example.org"),
        ("redis://h:1/0?password=s3cret&db=1", "redis://h:1/0?password=***&db=1"),
        ("unix:///run/redis.sock?db=2&Password=pw", "unix:///run/redis.sock?db=2&Password=***"),
    ],
)
def test_passwords_in_urls_are_masked(text, masked):
    assert mask_url(text) == masked


def test_each_fault_says_what_to_do():
    url = "redis://:pw@queue:6379/0"
    oom = redis.OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")
    wrapped = OperationalError("lost")
    wrapped.__cause__ = redis.ConnectionError("Error 111 connecting to queue:6379. Connection refused.")
    assert "raise its maxmemory" in describe(oom, url) and transient(oom)
    assert "refused the credentials" in describe(redis.AuthenticationError("WRONGPASS"), url)
    assert not transient(redis.AuthenticationError("WRONGPASS"))
    assert "read-only replica" in describe(redis.ReadOnlyError("READONLY"), url)
    line = describe(wrapped, url)
    assert line.startswith("cannot reach Redis at redis://:***@queue:6379/0 (Error 111") and transient(wrapped)
    assert "pw" not in line.replace("points", "")
