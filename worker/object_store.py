"""Object-store URLs (`s3://bucket/key`, `gs://`, `az://`): parsing, allowed roots, and the fsspec
filesystems that read and list them.

Credentials and endpoints come from each library's standard environment and config (for S3,
botocore's: `AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, `AWS_ENDPOINT_URL`, `~/.aws/config`, instance roles),
plus fsspec's own config (`FSSPEC_S3_ENDPOINT_URL`, `~/.config/fsspec/*.json`): kiln adds none.
A reference names a bucket and a key only, never an endpoint, so a queue message cannot point a
worker at another server. Imports no fsspec until a store is used.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

# The schemes kiln reads, by the fsspec package that serves them. Other fsspec protocols are left
# out on purpose: `memory://`, `local://`, `zip://` or chained URLs (`simplecache::s3://`) would
# read the worker's own files or state around the allowed roots.
OBJECT_SCHEMES: dict[str, str] = {
    "s3": "s3fs",
    "s3a": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "az": "adlfs",
    "abfs": "adlfs",
    "abfss": "adlfs",
}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


@dataclass(frozen=True)
class ObjectUrl:
    """`scheme://bucket/key`: the scheme in lower case; `key` may be "" (the whole bucket)."""

    scheme: str
    bucket: str
    key: str

    @property
    def path(self) -> str:
        """The fsspec path: `bucket/key`."""
        return f"{self.bucket}/{self.key}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.key}"


def object_scheme(text: str) -> str | None:
    """The lower-case scheme of `text` if it is one of OBJECT_SCHEMES, else None."""
    match = _SCHEME.match(text)
    scheme = match.group(1).lower() if match else None
    return scheme if scheme in OBJECT_SCHEMES else None


def split_object_url(url: str) -> ObjectUrl:
    """`scheme://bucket/key` split into its parts, as written (no percent-decoding: fsspec reads
    keys literally). Raises ValueError for another scheme or a URL without a bucket."""
    scheme = object_scheme(url)
    if scheme is None:
        raise ValueError(f"{url!r} is not an object-store URL ({', '.join(s + '://' for s in OBJECT_SCHEMES)})")
    bucket, _, key = url[len(scheme) + 3 :].partition("/")
    if not bucket:
        raise ValueError(f"{url!r} names no bucket")
    return ObjectUrl(scheme, bucket, key)


def unsafe_segment(key: str) -> str | None:
    """The first "", "." or ".." segment of an object key, or None. Stores and the proxies before
    them differ on whether `a/../b` or `a//b` name `b` or a literal key: a prefix check on such a
    key proves nothing, so kiln refuses them."""
    return next((part for part in key.split("/") if part in ("", ".", "..")), None)


def parse_root(root: str) -> str:
    """An allowed root for object stores in its canonical form, compared as a string prefix:
    `s3://` (every bucket), `s3://bucket/` (one bucket), `s3://bucket/photos/` (keys under a
    prefix; a trailing "/" is added, so `photos` never admits `photos-evil/`).
    Raises ValueError for an unknown scheme or a prefix with an empty, "." or ".." segment."""
    scheme = object_scheme(root)
    if scheme is None:
        raise ValueError(f"{root!r}: object-store roots use one of {', '.join(s + '://' for s in OBJECT_SCHEMES)}")
    rest = root[len(scheme) + 3 :]
    if not rest:
        return f"{scheme}://"
    url = split_object_url(f"{scheme}://{rest}")
    prefix = url.key.rstrip("/")
    if prefix and unsafe_segment(prefix) is not None:
        raise ValueError(f"{root!r}: a root's prefix may not hold an empty, '.' or '..' segment")
    return f"{scheme}://{url.bucket}/" + (prefix + "/" if prefix else "")


def filesystem(scheme: str) -> Any:
    """The fsspec filesystem of `scheme`, configured from the standard environment (fsspec caches
    one instance per process, so connections and credentials are reused).
    Raises ImportError naming the package to install."""
    try:
        import fsspec

        return fsspec.filesystem(scheme)
    except ImportError as e:
        extra = " (pip install 'kiln[s3]')" if OBJECT_SCHEMES[scheme] == "s3fs" else ""
        raise ImportError(f"{scheme}:// needs the {OBJECT_SCHEMES[scheme]} package{extra}: {e}") from None


def glob_matcher(pattern: str) -> Callable[[str], object]:
    """A match function for fsspec paths (`bucket/key`) with fsspec's glob semantics (`**` spans
    folders, `*` stays within one). Raises ImportError without fsspec."""
    from fsspec.utils import glob_translate

    return re.compile(glob_translate(pattern)).match


def iter_objects(url: ObjectUrl) -> Iterator[ObjectUrl]:
    """Every object under `url`, a folder-like prefix (`url.key` is "" or ends in "/"), lazily: on
    S3 one listing page (1,000 keys) is in memory at a time, in key order; other stores are walked
    one folder at a time, each folder sorted. Folder markers (keys ending in "/") are left out.
    Raises FileNotFoundError (no such bucket), PermissionError, OSError."""
    fs = filesystem(url.scheme)
    if hasattr(fs, "_iterdir"):  # s3fs: ListObjectsV2 page by page
        paths = _iterate_async(fs, fs._iterdir(url.bucket, delimiter="", prefix=url.key))
        names = (info["name"] for info in paths if info.get("type") == "file")
    else:
        names = walk_files(fs, url.path)
    for name in names:
        if not name.endswith("/"):
            bucket, _, key = name.partition("/")
            yield ObjectUrl(url.scheme, bucket, key)


def walk_files(fs: Any, folder: str) -> Iterator[str]:
    """`bucket/key` of every file under `folder` (`bucket/` or `bucket/prefix/`), one folder's
    listing at a time, sorted, through fsspec's generic `walk`: for stores without a paged listing."""
    for parent, _, files in fs.walk(folder.rstrip("/")):
        for name in sorted(files):
            yield f"{parent}/{name}"


def _iterate_async(fs: Any, pages: Any) -> Iterator[Any]:
    """Drive an async generator on fsspec's I/O loop one item at a time, so that only what the
    generator holds (a listing page) is ever in memory."""
    from fsspec.asyn import sync

    try:
        while True:
            try:
                yield sync(fs.loop, pages.__anext__)
            except StopAsyncIteration:
                return
    finally:
        sync(fs.loop, pages.aclose)
