"""Fetching image references: allowed roots, file:// and http(s):// against a real server."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading

import pytest
from http_server import serve_folder

from worker.contract import InputError
from worker.fetch import FetchPolicy, fetch, roots_notes


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
    assert kind_of("ftp://host/cat.jpg", FetchPolicy()) == "unsupported_ref"
    assert kind_of("s3://bucket/cat.jpg", FetchPolicy()) == "forbidden"  # known; no root allows it


LOOPBACK = ["127.0.0.1/32"]  # the test server's address, allowed as an operator would allow an intranet


def test_http_references(images):
    with serve_folder(images) as base:
        policy = FetchPolicy.create([], 10**7, 1, LOOPBACK)
        assert fetch(f"{base}/coffee.jpg", policy) == (images / "coffee.jpg").read_bytes()
        assert kind_of(f"{base}/missing.jpg", policy) == "not_found"
        assert kind_of(f"{base}/huge", policy) == "too_large"  # refused from its Content-Length
        assert kind_of(f"{base}/coffee.jpg", FetchPolicy.create([], 1000, 1, LOOPBACK)) == "too_large"
        assert kind_of(f"{base}/slow", policy) == "fetch_failed"  # timeout
        assert fetch(f"{base}/redirect?to={base}/coffee.jpg", policy)[:2] == b"\xff\xd8"  # http -> http is fine
    assert kind_of(f"{base}/coffee.jpg", policy) == "fetch_failed"  # server gone


def test_redirects_are_checked_on_every_hop(images):
    with serve_folder(images) as base:
        policy = FetchPolicy.create([str(images)], 10**7, 5, LOOPBACK)
        for target in ("ftp://127.0.0.1/coffee.jpg", (images / "coffee.jpg").as_uri(), "gopher://127.0.0.1:6379/"):
            assert kind_of(f"{base}/redirect?to={target}", policy) == "unsupported_ref", target
        # Allowed first hop, then an address outside the allowed networks: refused before connecting.
        for target in ("http://127.0.0.2:6379/", "http://169.254.169.254/latest/meta-data/", "http://10.1.2.3/",
                       "http://[::1]:6379/", "http://[::ffff:127.0.0.2]:6379/", "http://0.0.0.0:6379/"):  # fmt: skip
            assert kind_of(f"{base}/redirect?to={target}", policy) == "forbidden_address", target


def test_internal_addresses_are_refused_unless_allowed(images):
    with serve_folder(images) as base:
        port = base.rsplit(":", 1)[1]
        closed = FetchPolicy(max_bytes=10**7, timeout_s=5)
        assert kind_of(f"{base}/coffee.jpg", closed) == "forbidden_address"
        assert kind_of(f"http://localhost:{port}/coffee.jpg", closed) == "forbidden_address"  # checked after DNS
        assert kind_of(f"http://2130706433:{port}/coffee.jpg", closed) == "forbidden_address"  # 127.0.0.1 as a number
        assert fetch(f"http://localhost:{port}/coffee.jpg", FetchPolicy.create([], 10**7, 5, ["127.0.0.0/8", "::1"]))


# IPv6 forms that a gateway or tunnel delivers to an internal IPv4 address, and deprecated ranges.
EMBEDDED_INTERNAL = [
    "64:ff9b::a00:1",  # NAT64 (RFC 6052) of 10.0.0.1
    "64:ff9b::a9fe:a9fe",  # NAT64 of the metadata service 169.254.169.254
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    "64:ff9b:1::a00:1",  # local-use NAT64 (RFC 8215)
    "2002:a00:1::1",  # 6to4 of 10.0.0.1
    "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
    "2001:0:4136:e378:8000:63bf:f5ff:fffe",  # Teredo, client 10.0.0.1
    "2a00:1450::5efe:a00:1",  # ISATAP interface id of 10.0.0.1
    "::127.0.0.1",  # IPv4-compatible (deprecated)
    "::8.8.8.8",
    "fec0::1",  # site-local (deprecated)
]


@pytest.mark.parametrize("address", EMBEDDED_INTERNAL)
def test_ipv6_forms_of_internal_ipv4_addresses_are_refused(images, address):
    closed = FetchPolicy(max_bytes=10**7, timeout_s=5)
    assert kind_of(f"http://[{address}]/coffee.jpg", closed) == "forbidden_address"
    if address == "64:ff9b::7f00:1":  # stands for the test server's 127.0.0.1, which the hop's policy allows
        return
    with serve_folder(images) as base:  # and on a redirect hop
        hop = FetchPolicy.create([], 10**7, 5, LOOPBACK)
        assert kind_of(f"{base}/redirect?to=http://[{address}]:6379/", hop) == "forbidden_address"


def test_an_embedded_address_is_judged_by_the_ipv4_address_it_stands_for(images):
    # Allowing 10.0.0.0/8 allows its NAT64 form too: the check passes, the connection then fails here.
    policy = FetchPolicy.create([], 10**7, 5, ["10.0.0.0/8"])
    assert kind_of("http://[64:ff9b::a00:1]/coffee.jpg", policy) != "forbidden_address"
    closed = FetchPolicy(max_bytes=10**7, timeout_s=5)
    assert kind_of("http://[64:ff9b::a00:1]/coffee.jpg", closed) == "forbidden_address"


@pytest.mark.parametrize("path", ["/drip-body", "/drip-headers"])
def test_a_dripping_server_meets_the_total_deadline(images, path):
    """Each byte comes well within the read timeout; only a deadline on the whole fetch stops it."""
    with serve_folder(images) as base:
        with pytest.raises(InputError, match="no complete answer within 2 s") as caught:
            fetch(base + path, FetchPolicy.create([], 10**7, 2, LOOPBACK))
        assert caught.value.kind == "fetch_failed"


@pytest.mark.parametrize(
    "ref", ["/data/cat\0.jpg", "file:///data/cat%00.jpg", "file:///data/\0", "http://host/a\0b", "http://[::1/x",
            "http://host/a\nb", "/data/\udcff\ud800.jpg"],
)  # fmt: skip
def test_malformed_references_are_bad_refs(images, ref):
    assert kind_of(ref, FetchPolicy.create([str(images), "/data"], 10**7, 5)) == "bad_ref"


def test_a_fifo_is_refused_without_blocking(images):
    os.mkfifo(images / "pipe.jpg")
    outcome = []
    reader = threading.Thread(target=lambda: outcome.append(kind_of(str(images / "pipe.jpg"), policy)), daemon=True)
    policy = FetchPolicy.create([str(images)], 10**7, 5)
    reader.start()
    reader.join(60)
    assert outcome == ["fetch_failed"]


SWAPPER = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
a, b = sys.argv[1].encode(), sys.argv[2].encode()
print("swapping", flush=True)
while True:
    if libc.renameat2(-100, a, -100, b, 2) != 0:  # AT_FDCWD, RENAME_EXCHANGE
        raise OSError(ctypes.get_errno(), "renameat2")
"""


def test_a_symlink_swapped_in_during_reads_never_leads_outside(tmp_path):
    """Another process swaps a folder inside the root with a symlink to the outside, atomically
    (renameat2 RENAME_EXCHANGE, in a loop), while 4000 reads of a file in that folder go on: each read
    returns the inside file or fails, and never returns the outside one."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "album").mkdir(parents=True)
    outside.mkdir()
    (root / "album" / "cat.jpg").write_bytes(b"inside")
    (outside / "cat.jpg").write_bytes(b"SECRET")
    (root / "decoy").symlink_to(outside)
    swapper = subprocess.Popen(
        [sys.executable, "-c", SWAPPER, str(root / "album"), str(root / "decoy")], stdout=subprocess.PIPE, text=True
    )
    policy = FetchPolicy.create([str(root)], 10**7, 5)
    outcomes = []
    try:
        assert swapper.stdout.readline() == "swapping\n"
        for _ in range(4000):
            try:
                outcomes.append(fetch(str(root / "album" / "cat.jpg"), policy))
            except InputError as e:
                outcomes.append(e.kind)
        assert swapper.poll() is None, "the swapper stopped"
    finally:
        swapper.kill()
        swapper.wait()
    assert b"SECRET" not in outcomes
    assert b"inside" in outcomes and "forbidden" in outcomes  # the swaps did happen during the reads
    assert set(outcomes) <= {b"inside", "forbidden", "not_found", "fetch_failed"}


def test_the_one_call_open_stays_beneath_its_root(tmp_path):
    """worker/beneath.py, the fast path: links that stay inside the root open; `..` above it and
    links out of it do not (the checked path then refuses them, with the reason)."""
    from worker.beneath import open_beneath

    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "a.jpg").write_bytes(b"inside")
    (tmp_path / "outside.jpg").write_bytes(b"outside")
    (root / "sub" / "in.jpg").symlink_to("../a.jpg")
    (root / "out.jpg").symlink_to(tmp_path / "outside.jpg")
    (root / "up.jpg").symlink_to("../outside.jpg")
    fd = open_beneath(str(root), "sub/in.jpg")
    if fd is None:
        pytest.skip("no openat2 here: the checked path serves every file")
    assert os.read(fd, 100) == b"inside"
    os.close(fd)
    for escape in ("out.jpg", "up.jpg", "../outside.jpg", "sub/../../outside.jpg"):
        assert open_beneath(str(root), escape) is None, escape


def test_a_worker_says_where_it_reads_images_and_which_roots_are_not_folders(tmp_path):
    """Said at start: with no roots every local job failed as `forbidden`, and with a typo'd root
    likewise, while the worker said nothing (a new user's finding)."""
    (none,) = roots_notes([])
    assert "no KILN_ALLOWED_ROOTS" in none and "every local path and object-store reference is refused" in none
    typo = tmp_path / "typo"
    said, *notes = roots_notes([str(tmp_path), str(typo), "s3://bucket/prefix"])
    assert said == f"reads images under: {os.path.realpath(tmp_path)}, {os.path.realpath(typo)}, s3://bucket/prefix"
    assert notes == [f"allowed root {typo} is not a folder on this host: nothing under it can be read"]
    if importlib.util.find_spec("gcsfs") is None:  # an object store whose library is missing: said too
        (_, missing) = roots_notes(["gs://bucket/"])
        assert missing.startswith("allowed root gs://bucket/: ") and "gcsfs" in missing
