"""Expand what a user points at (folders, globs, image files, URLs, CSV/JSONL manifests, object-store
prefixes and globs) into job items: a stable key (the record's identity, used to resume) and a
reference a worker can fetch."""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from worker.contract import Item
from worker.object_store import (
    OBJECT_SCHEMES,
    ObjectUrl,
    glob_matcher,
    iter_objects,
    object_scheme,
    split_object_url,
    unsafe_segment,
)

# Every suffix a photo pipeline may hand us, also those a worker refuses by format (HEIC, PNM):
# such a file still gets a record saying why, instead of vanishing from the job.
IMAGE_SUFFIXES = {
    ".jpg", ".jpeg", ".jpe", ".jfif", ".mpo", ".png", ".gif", ".bmp", ".dib", ".tif", ".tiff", ".webp", ".avif",
    ".heic", ".heif", ".ppm", ".pgm", ".pbm",
}  # fmt: skip
MANIFEST_SUFFIXES = {".csv", ".jsonl", ".ndjson"}
URL_PREFIXES = ("http://", "https://", "file://", *(f"{scheme}://" for scheme in OBJECT_SCHEMES))
REF_COLUMNS = ("ref", "path", "url", "uri", "file")
KEY_COLUMNS = ("key", "id")


class SourceError(ValueError):
    """An input that names no images, or a manifest that cannot be read (`file:line: reason`)."""


@dataclass
class Expansion:
    """What the inputs name: the job's items, and the files left out of folders and globs.

    `skipped` counts the left-out files by lower-case extension ("" for none)."""

    items: list[Item]
    skipped: Counter[str] = field(default_factory=Counter)

    def skipped_summary(self) -> str:
        """e.g. "skipped 3 files without an image extension: .txt 2, (no extension) 1"; "" when none."""
        if not self.skipped:
            return ""
        parts = ", ".join(f"{ext or '(no extension)'} {n}" for ext, n in self.skipped.most_common())
        total = sum(self.skipped.values())
        return f"skipped {total} {'file' if total == 1 else 'files'} without an image extension: {parts}"


def expand(inputs: Iterable[str | Path]) -> Expansion:
    """Items for every image the inputs name, in a stable order, without duplicates.

    Raises SourceError for an input that names nothing, an unreadable manifest, or one key that
    names two different images."""
    inputs = list(inputs)
    found: dict[str, tuple[Item, str]] = {}  # key -> (item, where it came from)
    skipped: Counter[str] = Counter()
    for source in inputs:
        for item, origin in _expand_one(str(source), skipped):
            known = found.get(item.key)
            if known is not None and known[0].ref != item.ref:
                raise SourceError(
                    f"{origin}: key {item.key!r} names two images: {known[0].ref} ({known[1]}) and {item.ref}"
                )
            found[item.key] = (item, origin)
    if not found:
        detail = Expansion([], skipped).skipped_summary()
        raise SourceError("no images found in " + ", ".join(map(str, inputs)) + (f" ({detail})" if detail else ""))
    return Expansion([item for item, _ in found.values()], skipped)


def _expand_one(source: str, skipped: Counter[str]) -> Iterator[tuple[Item, str]]:
    if object_scheme(source) is not None:
        yield from ((Item(key=ref, ref=ref), source) for ref in _objects(source, skipped))
        return
    if source.startswith(URL_PREFIXES):
        yield Item(key=source, ref=source), source
        return
    path = Path(source).expanduser()
    if path.is_dir():
        for f in _images_under(os.path.realpath(path), skipped):
            yield Item(key=f, ref=f), source
    elif path.is_file():
        if path.suffix.lower() in MANIFEST_SUFFIXES:
            yield from _read_manifest(path)
        else:
            yield _local(path), source
    elif glob.has_magic(source):
        for match in sorted(glob.glob(str(path), recursive=True)):
            if os.path.isfile(match) and _is_image(match, skipped):
                yield _local(Path(match)), source
    else:
        raise SourceError(f"{source}: no such file, folder, URL or glob match")


def _is_image(name: str, skipped: Counter[str]) -> bool:
    suffix = os.path.splitext(name)[1].lower()
    if suffix in IMAGE_SUFFIXES:
        return True
    skipped[suffix] += 1
    return False


def _objects(source: str, skipped: Counter[str]) -> Iterator[str]:
    """The object URLs a source names, listed lazily: `s3://bucket/photos/` or `s3://bucket/photos`
    (every image under the prefix `photos/`), a glob (`s3://bucket/photos/**/*.jpg`, listing from its
    literal prefix `photos/`), or one image (`s3://bucket/photos/cat.jpg`, by its extension; the
    worker finds out whether it exists)."""
    try:
        url = split_object_url(source)
    except ValueError as e:
        raise SourceError(str(e)) from None
    if glob.has_magic(url.bucket):
        raise SourceError(f"{source}: a glob in the bucket name would list every bucket; name the bucket")
    if not glob.has_magic(url.key) and os.path.splitext(url.key)[1].lower() in IMAGE_SUFFIXES:
        yield str(url)
        return
    try:
        matches = None
        if glob.has_magic(url.key):
            matches = glob_matcher(url.path)
            prefix = url.key[: next(i for i, c in enumerate(url.key) if c in "*?[")].rpartition("/")[0]
        else:
            prefix = url.key.rstrip("/")
        folder = ObjectUrl(url.scheme, url.bucket, prefix + "/" if prefix else "")
        for found in iter_objects(folder):
            if (matches is None or matches(found.path)) and _is_image(found.key, skipped):
                yield str(found)
    except (OSError, ImportError, ValueError) as e:  # no such bucket, access denied, no s3fs, a bad glob
        raise SourceError(f"{source}: {e}") from None


def _images_under(folder: str, skipped: Counter[str]) -> list[str]:
    """Image files below `folder`, sorted; strings and os.walk, since data sets run to millions."""
    found = []
    for parent, _, names in os.walk(folder):
        found += [os.path.join(parent, n) for n in names if _is_image(n, skipped)]
    return sorted(found)


def _local(path: Path) -> Item:
    ref = str(path.resolve())
    return Item(key=ref, ref=ref)


def _read_manifest(path: Path) -> Iterator[tuple[Item, str]]:
    """CSV with a header (a `path`/`url`/`ref` column, optionally `key`/`id`), or JSONL of such
    objects or of plain strings; UTF-8, with or without a BOM (spreadsheets write one). Relative
    paths are relative to the manifest's folder. Every error names `file:line`, counting blank lines."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SourceError(f"{path}: cannot read manifest: {e.strerror or e}") from e
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        reason = f"not UTF-8 text (byte {data[e.start]:#04x}); save the manifest as UTF-8"
        raise SourceError(f"{path}:{line}: {reason}") from e
    rows = _csv_rows(path, text) if path.suffix.lower() == ".csv" else _jsonl_rows(path, text)
    for line, row in rows:
        where = f"{path}:{line}"
        ref = next((str(row[c]) for c in REF_COLUMNS if row.get(c) not in (None, "")), None)
        if ref is None:
            raise SourceError(f"{where}: no image reference (a column named one of {', '.join(REF_COLUMNS)})")
        if "\x00" in ref:
            raise SourceError(f"{where}: the image reference contains a NUL byte")
        if not ref.startswith(URL_PREFIXES):
            ref = str((path.parent / ref).resolve())
        key = next((str(row[c]) for c in KEY_COLUMNS if row.get(c) not in (None, "")), ref)
        try:
            yield Item(key=key, ref=ref), where
        except ValidationError as e:
            problem = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors(include_url=False))
            raise SourceError(f"{where}: {problem}") from None


def _csv_rows(path: Path, text: str) -> Iterator[tuple[int, dict]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return
        header = [name.strip().lower() for name in header]
        if not any(c in header for c in REF_COLUMNS):
            raise SourceError(
                f"{path}:{reader.line_num}: no image reference column in the header "
                f"(name one of {', '.join(REF_COLUMNS)}; found {', '.join(map(repr, header))})"
            )
        while True:
            start = reader.line_num + 1  # a quoted field may span lines: name the row's first
            row = next(reader, None)
            if row is None:
                return
            if row:  # the csv module yields [] for a blank line
                yield start, dict(zip(header, row, strict=False))
    except csv.Error as e:
        raise SourceError(f"{path}:{reader.line_num}: {e}") from None


def _jsonl_rows(path: Path, text: str) -> Iterator[tuple[int, dict]]:
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines: JSON may hold U+2028
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SourceError(f"{path}:{number}: invalid JSON at column {e.colno}: {e.msg}") from None
        if isinstance(row, str):
            row = {"ref": row}
        if not isinstance(row, dict):
            raise SourceError(f"{path}:{number}: expected an object or a string, got {type(row).__name__}")
        yield number, row


def default_job_id(items: list[Item]) -> str:
    """A job id derived from the image keys: the same inputs again resume the same job.

    The keys are hashed as a JSON list, so no two different key sets share an id (joining them
    with a separator let ["x", "y"] and ["x\\ny"] collide)."""
    digest = hashlib.sha256(json.dumps(sorted(i.key for i in items)).encode()).hexdigest()
    return f"job-{digest[:16]}"


def object_roots(items: list[Item]) -> list[str]:
    """The fewest object-store prefixes (`s3://bucket/folder/`) that contain every object reference
    of the items (for the embedded worker, as local_roots). References the worker refuses anyway
    (no key, an empty, "." or ".." segment) give none."""
    folders = set()
    for ref in (i.ref for i in items if object_scheme(i.ref) is not None):
        try:
            url = split_object_url(ref)
        except ValueError:
            continue
        folder = url.key.rpartition("/")[0]
        if url.key and (not folder or unsafe_segment(folder) is None):
            folders.add(f"{url.scheme}://{url.bucket}/" + (folder + "/" if folder else ""))
    roots: list[str] = []
    for folder in sorted(folders):  # a prefix sorts before every prefix it contains
        if not any(folder.startswith(root) for root in roots):
            roots.append(folder)
    return roots


def local_roots(items: list[Item]) -> list[str]:
    """The fewest folders that contain every local file of the items (for the embedded worker)."""
    folders = sorted({str(Path(i.ref).parent) for i in items if not i.ref.startswith(URL_PREFIXES)})
    roots: list[str] = []
    for folder in folders:
        if not any(Path(folder).is_relative_to(root) for root in roots):
            roots.append(folder)
    return roots
