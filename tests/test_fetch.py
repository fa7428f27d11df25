"""Fetching image references: allowed roots, file:// and http(s):// against a real server."""

from __future__ import annotations

import os

import pytest
from http_server import serve_folder

from worker.contract import InputError
from worker.fetch import FetchPolicy, fetch


@pytest.fixture
def images(tmp_path, sample_photos):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "coffee.jpg").write_bytes(sample_photos["coffee"].read_bytes())
    return folder


def kind_of(ref: str, policy: FetchPolicy) -> str:
    with pytest.raises(InputError) as caught:
        fetch(ref, policy)
    return caught.value.kind


def test_local_paths_under_allowed_roots(images):
    policy = FetchPolicy.create([str(images)], 10**7, 5)
    data = fetch(str(images / "coffee.jpg"), policy)
    assert data[:2] == b"\xff\xd8"
    assert fetch((images / "coffee.jpg").as_uri(), policy) == data
    assert kind_of(str(images / "missing.jpg"), policy) == "not_found"
    (images / "album").mkdir()
    assert kind_of(str(images / "album"), policy) == "fetch_failed"  # a folder
    assert kind_of("coffee.jpg", policy) == "unsupported_ref"  # relative


def test_paths_outside_the_roots_are_forbidden(images, tmp_path):
    policy = FetchPolicy.create([str(images)], 10**7, 5)
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(b"x")
    assert kind_of(str(outside), policy) == "forbidden"
    assert kind_of(str(images / ".." / "secret.jpg"), policy) == "forbidden"
    os.symlink(outside, images / "link.jpg")  # a link inside the root that leads out of it
    assert kind_of(str(images / "link.jpg"), policy) == "forbidden"
    assert kind_of("/etc/passwd", FetchPolicy()) == "forbidden"  # no roots: no local files at all


def test_oversized_files_are_refused_without_reading(images):
    assert kind_of(str(images / "coffee.jpg"), FetchPolicy.create([str(images)], 1000, 5)) == "too_large"


def test_unsupported_schemes(images):
    assert kind_of("s3://bucket/cat.jpg", FetchPolicy()) == "unsupported_ref"
    assert kind_of("ftp://host/cat.jpg", FetchPolicy()) == "unsupported_ref"


def test_http_references(images):
    with serve_folder(images) as base:
        policy = FetchPolicy(max_bytes=10**7, timeout_s=1)
        assert fetch(f"{base}/coffee.jpg", policy) == (images / "coffee.jpg").read_bytes()
        assert kind_of(f"{base}/missing.jpg", policy) == "not_found"
        assert kind_of(f"{base}/huge", policy) == "too_large"  # refused from its Content-Length
        assert kind_of(f"{base}/coffee.jpg", FetchPolicy(max_bytes=1000)) == "too_large"
        assert kind_of(f"{base}/slow", policy) == "fetch_failed"  # timeout
    assert kind_of(f"{base}/coffee.jpg", policy) == "fetch_failed"  # server gone
