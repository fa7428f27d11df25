"""Object-store sources and references against a real S3-compatible server (moto's server mode, a
child process on loopback; tests/s3_server.py): fetching under allowed roots, the byte cap, the
deadline, lazy listing as producer sources, and the whole path through a real worker."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys

import pytest
from conftest import CATS, SAMPLES, python_env
from pydantic import ValidationError
from s3_server import ALLOWED_PREFIX

from producer.sources import SourceError, expand, object_roots
from worker.contract import InputError, Item
from worker.fetch import FetchPolicy, fetch
from worker.object_store import ObjectUrl, iter_objects, walk_files
from worker.settings import WorkerSettings

ROOT = f"s3://kiln-test/{ALLOWED_PREFIX}"


def kind_of(ref: str, policy: FetchPolicy) -> str:
    with pytest.raises(InputError) as caught:
        fetch(ref, policy)
    return caught.value.kind


@pytest.fixture(scope="module")
def objects(s3):
    """Objects inside the allowed prefix, next to it and outside it."""
    coffee = (SAMPLES / "coffee.jpg").read_bytes()
    s3.put(f"{ALLOWED_PREFIX}fetch/coffee.jpg", coffee)
    s3.put(f"{ALLOWED_PREFIX}fetch/empty.jpg", b"")
    s3.put("private/secret.jpg", b"SECRET")
    s3.put("allowed-evil/secret.jpg", b"SECRET")  # shares the root's name, not its prefix
    s3.put("allowed%2Fsecret.jpg", b"SECRET")
    return coffee


def test_objects_under_an_allowed_root_are_fetched(s3, objects):
    policy = FetchPolicy.create([ROOT], 10**7, 30)
    assert fetch(f"{ROOT}fetch/coffee.jpg", policy) == objects
    assert fetch(f"S3://kiln-test/{ALLOWED_PREFIX}fetch/coffee.jpg", policy) == objects  # schemes ignore case
    assert fetch(f"{ROOT}fetch/empty.jpg", policy) == b""  # a ranged read of an empty object: no bytes, no error
    assert kind_of(f"{ROOT}fetch/missing.jpg", policy) == "not_found"
    assert kind_of("s3://no-such-bucket/x.jpg", FetchPolicy.create(["s3://"], 10**7, 30)) == "not_found"
    assert fetch(f"{ROOT}fetch/coffee.jpg", FetchPolicy.create(["s3://"], 10**7, 30)) == objects  # every bucket
    assert fetch(f"{ROOT}fetch/coffee.jpg", FetchPolicy.create(["s3://kiln-test"], 10**7, 30)) == objects


@pytest.mark.parametrize(
    "ref",
    [
        "s3://kiln-test/private/secret.jpg",
        "s3://kiln-test/allowed-evil/secret.jpg",  # a prefix of the root's name is not inside it
        "s3://kiln-test/allowed%2Fsecret.jpg",  # keys are literal: %2F is no separator
        "s3://kiln-test/allowed/../private/secret.jpg",
        "s3://kiln-test/allowed/./../private/secret.jpg",
        "s3://kiln-test/allowed//private/secret.jpg",
        "s3://other-bucket/allowed/secret.jpg",
        "s3a://kiln-test/allowed/fetch/coffee.jpg",  # another scheme needs its own root
    ],
)
def test_objects_outside_the_roots_are_forbidden(s3, objects, ref):
    assert kind_of(ref, FetchPolicy.create([ROOT], 10**7, 30)) == "forbidden"


def test_percent_escapes_stay_literal(s3, objects):
    """Inside the root as written, and read as written: never the object the decoded key names."""
    ref = f"{ROOT}%2E%2E/private/secret.jpg"
    assert kind_of(ref, FetchPolicy.create([ROOT], 10**7, 30)) == "not_found"


def test_no_roots_means_no_object_store_access(s3, objects):
    assert kind_of(f"{ROOT}fetch/coffee.jpg", FetchPolicy()) == "forbidden"
    assert kind_of(f"{ROOT}fetch/coffee.jpg", FetchPolicy.create(["/"], 10**7, 30)) == "forbidden"  # folders only


@pytest.mark.parametrize(
    ("ref", "kind"),
    [
        ("s3://kiln-test", "bad_ref"),
        ("s3:///key.jpg", "bad_ref"),
        ("memory://kiln-test/allowed/x.jpg", "unsupported_ref"),  # fsspec serves it, kiln does not
        ("simplecache::s3://kiln-test/allowed/x.jpg", "unsupported_ref"),
        ("zip://x.jpg::s3://kiln-test/allowed/a.zip", "unsupported_ref"),
    ],
)
def test_malformed_and_unsupported_object_refs(ref, kind):
    assert kind_of(ref, FetchPolicy.create([ROOT, "s3://"], 10**7, 30)) == kind


def test_a_scheme_without_its_library_says_what_to_install():
    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    with pytest.raises(InputError, match="needs the gcsfs package") as caught:
        fetch("gs://bucket/cat.jpg", FetchPolicy.create(["gs://bucket/"], 10**7, 30))
    assert caught.value.kind == "unsupported_ref"


def test_the_byte_cap_holds_without_reading_the_object(s3):
    """A 24 MB object under a 64 kB cap: too_large, with this process reading far less than the
    object (/proc/self/io counts every byte read from a socket)."""
    s3.put(f"{ALLOWED_PREFIX}fetch/huge.jpg", b"\xff" * (24 * 2**20))
    policy = FetchPolicy.create([ROOT], 64 * 1024, 60)
    before = _bytes_read()
    assert kind_of(f"{ROOT}fetch/huge.jpg", policy) == "too_large"
    assert _bytes_read() - before < 4 * 2**20
    assert fetch(f"{ROOT}fetch/huge.jpg", FetchPolicy.create([ROOT], 32 * 2**20, 60))[:1] == b"\xff"


def _bytes_read() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


FETCH_ONE = """
import sys
from worker.contract import InputError
from worker.fetch import FetchPolicy, fetch
try:
    print("ok", len(fetch(sys.argv[1], FetchPolicy.create(["s3://"], 10**7, 3))))
except InputError as e:
    print(e.kind, e)
"""


def fetch_in_a_fresh_process(ref: str, env: dict[str, str]) -> str:
    """What `fetch` says in a new process configured by `env` alone (as a user configures kiln)."""
    done = subprocess.run([sys.executable, "-c", FETCH_ONE, ref], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_silent_endpoint_meets_the_fetch_deadline(s3):
    """An endpoint that accepts connections and never answers: fetch_failed at the deadline."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        said = fetch_in_a_fresh_process(
            "s3://bucket/cat.jpg", python_env(AWS_ENDPOINT_URL=f"http://127.0.0.1:{silent.getsockname()[1]}")
        )
    assert said.startswith("fetch_failed ") and "no complete answer within 3 s" in said, said


def test_fsspec_config_also_sets_the_endpoint(s3, objects):
    """FSSPEC_S3_ENDPOINT_URL (fsspec's configuration) instead of botocore's AWS_ENDPOINT_URL."""
    env = python_env(FSSPEC_S3_ENDPOINT_URL=s3.env["AWS_ENDPOINT_URL"])
    del env["AWS_ENDPOINT_URL"]
    assert fetch_in_a_fresh_process(f"{ROOT}fetch/coffee.jpg", env) == f"ok {len(objects)}"


def test_allowed_roots_setting_mixes_folders_and_object_prefixes(monkeypatch):
    monkeypatch.setenv("KILN_ALLOWED_ROOTS", "/data:/more,s3://bucket/2024-01-01T10:00/, gs://")
    roots = WorkerSettings().allowed_roots
    assert roots == ["/data", "/more", "s3://bucket/2024-01-01T10:00/", "gs://"]  # a URL is split by commas only
    policy = FetchPolicy.create(roots, 1, 1)
    assert policy.allowed_roots == ("/data/", "/more/")
    assert policy.object_roots == ("s3://bucket/2024-01-01T10:00/", "gs://")
    assert FetchPolicy.create(["s3://bucket/photos"], 1, 1).object_roots == ("s3://bucket/photos/",)
    for bad in ("ftp://host/x", "memory://x", "s3://bucket/a/../b", "s3://bucket/a//b", "s3:///x"):
        monkeypatch.setenv("KILN_ALLOWED_ROOTS", bad)
        with pytest.raises(ValidationError, match="allowed_roots"):
            WorkerSettings()


# -- sources ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tree(s3):
    for key in ("src/a/1.jpg", "src/a/2.PNG", "src/a/deep/3.webp", "src/a/notes.txt", "src/a/README", "src/b.jpg",
                "src/a-evil/4.jpg", "src/a/album/"):  # fmt: skip
        s3.put(key, b"x")  # src/a/album/: a folder marker, as consoles make them
    return "s3://kiln-test/src"


def refs(inputs) -> list[str]:
    return [i.ref for i in expand(inputs).items]


def test_a_prefix_lists_its_images_and_counts_the_rest(tree):
    found = expand([f"{tree}/a/"])
    expected = [f"{tree}/a/1.jpg", f"{tree}/a/2.PNG", f"{tree}/a/deep/3.webp"]
    assert [i.ref for i in found.items] == expected and all(i.key == i.ref for i in found.items)
    assert found.skipped == {".txt": 1, "": 1}  # the folder marker is no file
    assert refs([f"{tree}/a"]) == expected  # no trailing slash: still the prefix a/, never a-evil/


def test_globs_and_single_objects(tree):
    assert refs([f"{tree}/**/*.jpg"]) == [f"{tree}/a-evil/4.jpg", f"{tree}/a/1.jpg", f"{tree}/b.jpg"]
    assert refs([f"{tree}/*.jpg"]) == [f"{tree}/b.jpg"]
    assert refs([f"{tree}/a/*"]) == [f"{tree}/a/1.jpg", f"{tree}/a/2.PNG"]
    assert expand([f"{tree}/a/*"]).skipped == {".txt": 1, "": 1}
    assert refs([f"{tree}/a/missing.jpg"]) == [f"{tree}/a/missing.jpg"]  # one image: the worker looks it up


def test_manifests_keep_object_refs(tree, tmp_path):
    (tmp_path / "list.csv").write_text(f"key,url\nfirst,{tree}/b.jpg\n")
    assert [(i.key, i.ref) for i in expand([tmp_path / "list.csv"]).items] == [("first", f"{tree}/b.jpg")]


def test_bad_object_sources_say_what_is_wrong(tree):
    with pytest.raises(SourceError, match="The specified bucket does not exist"):
        expand(["s3://no-such-bucket/photos/"])
    with pytest.raises(SourceError, match="no images found in s3://kiln-test/src/nothing/"):
        expand([f"{tree}/nothing/"])
    with pytest.raises(SourceError, match="a glob in the bucket name"):
        expand(["s3://kiln-*/photos/"])
    with pytest.raises(SourceError, match="'\\*\\*' can only be an entire path component"):
        expand([f"{tree}/a**/*.jpg"])


def test_listing_is_lazy_page_by_page(s3):
    """1,500 objects are two ListObjectsV2 pages. An object added after the first item was taken
    still appears, as it sorts onto the second page: the listing was not read whole up front."""
    s3.fs.pipe({f"kiln-test/lazy/{i:05d}.jpg": b"x" for i in range(1500)})
    listing = iter_objects(ObjectUrl("s3", "kiln-test", "lazy/"))
    assert next(listing).key == "lazy/00000.jpg"
    s3.put("lazy/99999.jpg", b"x")
    rest = [o.key for o in listing]
    assert len(rest) == 1500 and rest[-1] == "lazy/99999.jpg"


def test_the_generic_walk_lists_folder_by_folder(tree, s3):
    """Stores without a paged listing (gcsfs, adlfs) are walked; the same walk over S3 here. The
    folder marker comes too: iter_objects leaves it out, whichever listing it used."""
    assert list(walk_files(s3.fs, "kiln-test/src/a/")) == [
        "kiln-test/src/a/1.jpg", "kiln-test/src/a/2.PNG", "kiln-test/src/a/README", "kiln-test/src/a/notes.txt",
        "kiln-test/src/a/album/", "kiln-test/src/a/deep/3.webp",
    ]  # fmt: skip


def test_roots_for_the_embedded_worker():
    items = [Item(key=r, ref=r) for r in ("s3://b/a/1.jpg", "s3://b/a/deep/2.jpg", "s3://b/top.jpg", "gs://c/x/3.jpg",
             "s3://b/a//evil.jpg", "s3://b/../up.jpg", "/data/4.jpg", "https://example.org/5.jpg")]  # fmt: skip
    assert object_roots(items) == ["gs://c/x/", "s3://b/"]
    assert object_roots(items[:2]) == ["s3://b/a/"]


# -- the whole path: producer -> Redis -> worker process -> records ----------------------------------


def test_a_worker_classifies_object_references(kiln, s3):
    """The session worker may read s3://kiln-test/allowed/ (and only that), through the endpoint and
    credentials of its standard AWS environment; the producer lists the prefix."""
    folder = f"{ALLOWED_PREFIX}e2e/"
    s3.put(folder + "coffee.jpg", SAMPLES / "coffee.jpg")
    s3.put(folder + "chelsea.jpg", SAMPLES / "chelsea.jpg")
    s3.put(folder + "notes.txt", b"not an image")
    s3.put(folder + "big.jpg", b"\xff\xd8" + b"\0" * (32 * 2**20))  # over the worker's 32 MiB cap
    s3.put("private/coffee.jpg", SAMPLES / "coffee.jpg")
    listed = expand([s3.url(folder)])
    assert listed.skipped == {".txt": 1}
    extra = [s3.url(folder + "missing.jpg"), s3.url("private/coffee.jpg"), s3.url("allowed-evil/secret.jpg")]
    kiln.submit(listed.items + [it for e in extra for it in expand([e]).items], job="s3-refs")
    counts = kiln.wait("s3-refs", timeout_s=180, progress=False)
    results = {r.key.removeprefix("s3://kiln-test/"): r for r in kiln.results("s3-refs")}
    outcome = {k: (r.topk[0].label if r.status == "ok" else r.error.kind) for k, r in results.items()}
    assert outcome.pop(f"{folder}chelsea.jpg") in CATS
    assert outcome == {
        f"{folder}coffee.jpg": "espresso",
        f"{folder}big.jpg": "too_large",
        f"{folder}missing.jpg": "not_found",
        "private/coffee.jpg": "forbidden",
        "allowed-evil/secret.jpg": "forbidden",
    }
    assert (counts.done, counts.failed) == (2, 4)
    assert "KILN_ALLOWED_ROOTS" in results["private/coffee.jpg"].error.message


def test_the_embedded_mode_labels_an_s3_prefix(s3, lite0_package, tmp_path):
    """`producer label s3://...` without KILN_REDIS_URL: its own worker may read exactly the
    prefixes the inputs name."""
    s3.put("embedded/coffee.jpg", SAMPLES / "coffee.jpg")
    s3.put("embedded/more/chelsea.jpg", SAMPLES / "chelsea.jpg")
    env = python_env(KILN_DATA_DIR=str(tmp_path / "data"), KILN_MODEL=str(lite0_package))
    env.pop("KILN_REDIS_URL", None)
    command = [sys.executable, "-m", "producer", "label", s3.url("embedded/"), "--out", str(tmp_path / "out.csv")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "2 labelled, 0 failed" in done.stderr, done.stderr
    assert "espresso" in done.stdout


def test_a_job_read_from_an_object_store_writes_its_shards_to_one(kiln, s3, tmp_path):
    """Issue #11 end to end on the S3 server: the producer lists an s3:// prefix, the session worker
    reads the objects and writes each chunk as one Parquet object under an s3:// out_dir (one PUT
    per shard), and the producer exports the shards: one row per image, read as one data set."""
    import pyarrow.parquet as pq

    folder = f"{ALLOWED_PREFIX}sharded/"
    refs = {
        s3.put(f"{folder}{i}-{name}", SAMPLES / name): name for i, name in enumerate(["coffee.jpg", "rocket.jpg"] * 3)
    }
    out_dir = s3.url("shards")
    submitted = kiln.submit([s3.url(folder)], job="s3-sharded", out_dir=out_dir)
    counts = kiln.wait(submitted, timeout_s=300, progress=False)
    assert (counts.total, counts.done, counts.failed) == (6, 6, 0)
    s3.fs.invalidate_cache()
    table = pq.read_table(f"{s3.bucket}/shards/s3-sharded", filesystem=s3.fs)
    labels = dict(zip(table.column("key").to_pylist(), table.column("label_1").to_pylist(), strict=True))
    assert sorted(labels) == sorted(refs)  # one row per image
    assert all(labels[ref] == "espresso" for ref, name in refs.items() if name == "coffee.jpg")
    out = tmp_path / "export.csv"
    command = [sys.executable, "-m", "producer", "export", "s3-sharded", "--out-dir", out_dir, "--out", str(out)]
    env = python_env(KILN_REDIS_URL=kiln.settings.redis_url)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(out.read_text().splitlines()) == 1 + len(refs)
