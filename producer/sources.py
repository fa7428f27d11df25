"""Expand what a user points at (folders, globs, image files, URLs, CSV/JSONL manifests) into job
items: a stable key (the record's identity, used to resume) and a reference a worker can fetch."""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from worker.contract import Item

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
MANIFEST_SUFFIXES = {".csv", ".jsonl", ".ndjson"}
URL_PREFIXES = ("http://", "https://", "file://")
REF_COLUMNS = ("ref", "path", "url", "uri", "file")
KEY_COLUMNS = ("key", "id")


class SourceError(ValueError):
    """An input that names no images, or a manifest that cannot be read."""


def expand(inputs: Iterable[str | Path]) -> list[Item]:
    """Items for every image the inputs name, in a stable order, without duplicates."""
    items: dict[str, Item] = {}
    for source in inputs:
        for item in _expand_one(str(source)):
            known = items.get(item.key)
            if known is not None and known.ref != item.ref:
                raise SourceError(f"key {item.key!r} names two images: {known.ref} and {item.ref}")
            items[item.key] = item
    if not items:
        raise SourceError("no images found in " + ", ".join(map(str, inputs)))
    return list(items.values())


def _expand_one(source: str) -> list[Item]:
    if source.startswith(URL_PREFIXES):
        return [Item(key=source, ref=source)]
    path = Path(source).expanduser()
    if path.is_dir():
        return [Item(key=f, ref=f) for f in _images_under(os.path.realpath(path))]
    if path.is_file():
        return _read_manifest(path) if path.suffix.lower() in MANIFEST_SUFFIXES else [_local(path)]
    if glob.has_magic(source):
        matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True))
        return [_local(p) for p in matches if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    raise SourceError(f"{source}: no such file, folder, URL or glob match")


def _images_under(folder: str) -> list[str]:
    """Image files below `folder`, sorted; strings and os.walk, since data sets run to millions."""
    found = []
    for parent, _, names in os.walk(folder):
        found += [os.path.join(parent, n) for n in names if os.path.splitext(n)[1].lower() in IMAGE_SUFFIXES]
    return sorted(found)


def _local(path: Path) -> Item:
    ref = str(path.resolve())
    return Item(key=ref, ref=ref)


def _read_manifest(path: Path) -> list[Item]:
    """CSV with a header (a `path`/`url`/`ref` column, optionally `key`/`id`), or JSONL of such
    objects or of plain strings. Relative paths are relative to the manifest's folder."""
    try:
        if path.suffix.lower() == ".csv":
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
        else:
            with open(path) as f:
                rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise SourceError(f"{path}: cannot read manifest: {e}") from e
    items = []
    for number, row in enumerate(rows, start=2 if path.suffix.lower() == ".csv" else 1):
        row = {"ref": row} if isinstance(row, str) else row
        if not isinstance(row, dict):
            raise SourceError(f"{path}:{number}: expected an object or a string")
        ref = next((str(row[c]) for c in REF_COLUMNS if row.get(c)), None)
        if ref is None:
            raise SourceError(f"{path}:{number}: no image reference (a column named one of {', '.join(REF_COLUMNS)})")
        if not ref.startswith(URL_PREFIXES):
            ref = str((path.parent / ref).resolve())
        key = next((str(row[c]) for c in KEY_COLUMNS if row.get(c)), ref)
        items.append(Item(key=key, ref=ref))
    return items


def default_job_id(items: list[Item]) -> str:
    """A job id derived from the image keys: the same inputs again resume the same job."""
    digest = hashlib.sha256("\n".join(sorted(i.key for i in items)).encode()).hexdigest()
    return f"job-{digest[:12]}"


def local_roots(items: list[Item]) -> list[str]:
    """The fewest folders that contain every local file of the items (for the embedded worker)."""
    folders = sorted({str(Path(i.ref).parent) for i in items if not i.ref.startswith(URL_PREFIXES)})
    roots: list[str] = []
    for folder in folders:
        if not any(Path(folder).is_relative_to(root) for root in roots):
            roots.append(folder)
    return roots
