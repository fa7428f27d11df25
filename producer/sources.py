"""Expand what a user points at (folders, globs, image files, URLs, CSV/JSONL manifests, object-store
prefixes and globs) into job items: a stable key (the record's identity, used to resume) and a
reference a worker can fetch.

`iter_items` streams: it holds one folder's entry names at a time (never the whole tree) and one
manifest line, so a producer lists a data set of any size in bounded memory. Its order is stable
for the same inputs (each folder's entries by name, depth first), which resume relies on: the
same inputs give the same chunks.
"""

from __future__ import annotations

import csv
import fnmatch
import glob
import hashlib
import itertools
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
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
SKIPS_TOLD_APART = 100_000  # left-out paths kept to count each once (a few MB at most)


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
        # most first; ties by name, files without an extension last: the same summary every run
        order = sorted(self.skipped.items(), key=lambda pair: (-pair[1], pair[0] == "", pair[0]))
        parts = ", ".join(f"{one_line(ext) or '(no extension)'} {n}" for ext, n in order)
        total = sum(self.skipped.values())
        return f"skipped {total} {'file' if total == 1 else 'files'} without an image extension: {parts}"


def one_line(text: str) -> str:
    """`text` with its control characters escaped, for a terminal (a file may be named "a\\nb.jpg")."""
    return text if text.isprintable() else repr(text)[1:-1]


class _Skips:
    """Counts the files that folders and globs leave out into `counts`, by lower-case extension,
    each file once although overlapping inputs (`d/*` and `./d/*`, `d` and `d/*.txt`) list it
    again. Only with several inputs are paths kept to tell, and only the first SKIPS_TOLD_APART:
    past them a file listed twice counts twice (memory stays bounded whatever the job's size)."""

    def __init__(self, counts: Counter[str], several_inputs: bool) -> None:
        self.counts = counts
        self._seen: set[str] | None = set() if several_inputs else None

    def add(self, path: str) -> None:
        if self._seen is not None and len(self._seen) < SKIPS_TOLD_APART:
            if path in self._seen:
                return
            self._seen.add(path)
        self.counts[os.path.splitext(path)[1].lower()] += 1


def iter_items(
    inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], skipped: Counter[str] | None = None
) -> Iterator[Item]:
    """Items for every image the inputs (one, or several) name, lazily, in a stable order.

    `skipped` (if given) counts, as the listing goes, the files that folders and globs left out,
    by lower-case extension. Every input is checked before the first item comes (a missing path
    fails before anything is listed). Duplicates are not looked for: that needs every key (see
    `expand`). Raises SourceError for an input that names nothing (`input_names`), an unreadable folder or
    manifest (`file:line: reason`), and, once the listing ends, for inputs that named no image."""
    for item, _ in _listing(inputs, Counter() if skipped is None else skipped):
        yield item


def input_names(inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[str]:
    """The names of `inputs`, one input or several (iterated, a lone string was its characters).
    Raises SourceError for an empty name, which meant the current folder, listed whole (an unset
    `$DIR` in `kiln label "$DIR"`), and for what is no name (bytes, an Item among names)."""
    if isinstance(inputs, str | os.PathLike):
        inputs = [inputs]
    names = []
    for source in inputs:
        name = os.fspath(source) if isinstance(source, str | os.PathLike) else None
        if not isinstance(name, str):
            raise SourceError(f"{source!r} is not an input: give folders, files, globs, URLs or manifests by name")
        if not name.strip():
            raise SourceError("an empty input name: name a folder (`.` for this one), file, glob, URL or manifest")
        names.append(name)
    return names


def _listing(
    inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], skipped: Counter[str]
) -> Iterator[tuple[Item, str]]:
    """(item, where it came from) for every image of the inputs; an input given twice (`a a`, or
    `photos photos/`) is listed once."""
    unique: dict[str, str] = {}
    for source in input_names(inputs):
        unique.setdefault(_identity(source), source)
    inputs = list(unique.values())
    skips = _Skips(skipped, len(inputs) > 1)
    sources = [_expand_one(source, skips) for source in inputs]  # each checks its input now
    found = 0
    for item, origin in itertools.chain.from_iterable(sources):
        found += 1
        yield item, origin
    if not found:
        detail = Expansion([], skipped).skipped_summary()
        raise SourceError("no images found in " + ", ".join(inputs) + (f" ({detail})" if detail else ""))


def expand(inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> Expansion:
    """Items for every image the inputs name, in `iter_items` order, without duplicates: for small
    jobs and callers that need the whole list (it holds every item).

    Raises what `iter_items` raises, and SourceError for one key that names two images."""
    found: dict[str, tuple[Item, str]] = {}  # key -> (item, where it came from)
    skipped: Counter[str] = Counter()
    for item, origin in _listing(inputs, skipped):
        known = found.get(item.key)
        if known is not None and known[0].ref != item.ref:
            raise SourceError(
                f"{origin}: key {item.key!r} names two images: {known[0].ref} ({known[1]}) and {item.ref}"
            )
        found[item.key] = (item, origin)
    return Expansion([item for item, _ in found.values()], skipped)


def _identity(source: str) -> str:
    """What an input names: a local path's real path, any other input's text."""
    if "://" in source or glob.has_magic(source):
        return source
    return os.path.realpath(os.path.expanduser(source))


def _expand_one(source: str, skipped: _Skips) -> Iterator[tuple[Item, str]]:
    """The items of one input, as a lazy iterator; checks the input itself at once."""
    if object_scheme(source) is not None:
        return ((Item(key=ref, ref=ref), source) for ref in _objects(source, skipped))
    if source.startswith(URL_PREFIXES):
        return iter([(Item(key=source, ref=source), source)])
    path = Path(source).expanduser()
    if path.is_dir():
        return ((Item(key=f, ref=f), source) for f in _images_under(os.path.realpath(path), skipped))
    if path.is_file():
        if path.suffix.lower() in MANIFEST_SUFFIXES:
            return _read_manifest(path)
        return iter([(_local(path), source)])
    if glob.has_magic(source):
        return ((_local(Path(f)), source) for f in _glob(os.path.abspath(path), skipped))
    raise SourceError(f"{source}: no such file, folder, URL or glob match")


def _is_image(path: str, skipped: _Skips) -> bool:
    """Whether `path` has an image's extension; counts it in `skipped` where not."""
    if os.path.splitext(path)[1].lower() in IMAGE_SUFFIXES:
        return True
    skipped.add(path)
    return False


def _objects(source: str, skipped: _Skips) -> Iterator[str]:
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
            if (matches is None or matches(found.path)) and _is_image(str(found), skipped):
                yield str(found)
    except (OSError, ImportError, ValueError) as e:  # no such bucket, access denied, no s3fs, a bad glob
        raise SourceError(f"{source}: {e}") from None


def _entries(folder: str) -> tuple[list[str], set[str], set[str]]:
    """A folder's entry names, sorted; the names of its sub folders; those of them that are links.

    Only this folder's names are held: a data set's tree is never listed whole."""
    names: list[str] = []
    folders: set[str] = set()
    links: set[str] = set()
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                names.append(entry.name)
                if entry.is_dir():
                    folders.add(entry.name)
                    if entry.is_symlink():
                        links.add(entry.name)
    except OSError as e:
        raise SourceError(f"{folder}: cannot list the folder: {e.strerror or e}") from e
    names.sort()
    return names, folders, links


def _images_under(folder: str, skipped: _Skips) -> Iterator[str]:
    """Image files below `folder`, each folder's entries by name, depth first. Like os.walk, links
    to folders are not followed (no cycles); an unreadable folder is an error, not a gap."""
    names, folders, links = _entries(folder)
    for name in names:
        path = os.path.join(folder, name)
        if name in folders:
            if name not in links:
                yield from _images_under(path, skipped)
        elif _is_image(path, skipped):
            yield path


def _glob(pattern: str, skipped: _Skips) -> Iterator[str]:
    """Files matching an absolute glob pattern (`**` for any depth), in `_images_under` order:
    Python's glob lists in the file system's order, which changes as a folder grows."""
    parts = pattern.split(os.sep)
    first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    root = os.sep.join(parts[:first]) or os.sep
    if os.path.isdir(root):
        yield from _glob_in(root, parts[first:] + ["*"] * (parts[-1] == "**"), skipped)


def _glob_in(folder: str, parts: list[str], skipped: _Skips) -> Iterator[str]:
    part, rest = parts[0], parts[1:]
    names, folders, links = _entries(folder)
    for name in names:
        path = os.path.join(folder, name)
        hidden = name.startswith(".")  # as in glob: only a pattern starting with a dot matches them
        if part == "**":
            # `**` is any number of folders, none included: try the rest here, then go deeper
            if rest and len(rest) == 1 and name not in folders and _matches(name, rest[0]):
                if _is_image(path, skipped):
                    yield path
            elif rest and len(rest) > 1 and name in folders and _matches(name, rest[0]):
                yield from _glob_in(path, rest[1:], skipped)
            if name in folders and name not in links and not hidden:
                yield from _glob_in(path, parts, skipped)
        elif _matches(name, part):
            if rest and name in folders:
                yield from _glob_in(path, rest, skipped)
            elif not rest and name not in folders and _is_image(path, skipped):
                yield path


def _matches(name: str, part: str) -> bool:
    return fnmatch.fnmatchcase(name, part) and (part.startswith(".") or not name.startswith("."))


def _local(path: Path) -> Item:
    ref = str(path.resolve())
    return Item(key=ref, ref=ref)


def _read_manifest(path: Path) -> Iterator[tuple[Item, str]]:
    """CSV with a header (a `path`/`url`/`ref` column, optionally `key`/`id`), or JSONL of such
    objects or of plain strings; UTF-8, with or without a BOM (spreadsheets write one). Relative
    paths are relative to the manifest's folder. Read line by line, so a manifest of any size
    streams. Every error names `file:line`, counting blank lines."""
    try:
        with open(path, "rb") as f:
            lines = _text_lines(path, f)
            rows = _csv_rows(path, lines) if path.suffix.lower() == ".csv" else _jsonl_rows(path, lines)
            yield from _manifest_items(path, rows)
    except OSError as e:
        raise SourceError(f"{path}: cannot read manifest: {e.strerror or e}") from e


def _text_lines(path: Path, f: Iterable[bytes]) -> Iterator[str]:
    """The file's lines as text (split at \n only: JSON may hold U+2028), the BOM dropped."""
    for number, raw in enumerate(f, start=1):
        try:
            yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as e:
            reason = f"not UTF-8 text (byte {raw[e.start]:#04x}); save the manifest as UTF-8"
            raise SourceError(f"{path}:{number}: {reason}") from e


def _manifest_items(path: Path, rows: Iterable[tuple[int, dict]]) -> Iterator[tuple[Item, str]]:
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
            item = Item(key=key, ref=ref)
        except ValidationError as e:
            problem = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors(include_url=False))
            raise SourceError(f"{where}: {problem}") from None
        yield item, where


def _csv_rows(path: Path, lines: Iterator[str]) -> Iterator[tuple[int, dict]]:
    # strict: a quote left open swallowed the rest of the file as one reference, and text after a
    # closing quote was glued on ('"a"b.jpg' read as ab.jpg); both are errors naming the line.
    reader = csv.reader(lines, strict=True)
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
        hint = " (a quote left open?)" if "unexpected end of data" in str(e) else ""
        raise SourceError(f"{path}:{reader.line_num}: {e}{hint}") from None


def _jsonl_rows(path: Path, lines: Iterator[str]) -> Iterator[tuple[int, dict]]:
    for number, line in enumerate(lines, start=1):
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


def default_job_id(items: Sequence[Item]) -> str:
    """A job id derived from the image keys (for a list of Items): the same keys again resume the
    same job. The keys are hashed as a JSON list, so no two different key sets share an id
    (joining them with a separator let ["x", "y"] and ["x\\ny"] collide)."""
    return _job_digest(sorted(i.key for i in items))


def inputs_job_id(inputs: Iterable[str | Path]) -> str:
    """A job id derived from the inputs as given (folders, globs and manifests made absolute,
    URLs as they are), not from the images: a streamed listing has no key set until it ends. The
    same inputs again resume the same job, a grown folder included."""
    return _job_digest([_absolute(source) for source in input_names(inputs)])


def _absolute(source: str) -> str:
    return source if "://" in source else os.path.abspath(os.path.expanduser(source))


def _job_digest(names: list[str]) -> str:
    return f"job-{hashlib.sha256(json.dumps(names).encode()).hexdigest()[:16]}"


def object_roots(items: Iterable[Item]) -> list[str]:
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


def local_roots(items: Iterable[Item]) -> list[str]:
    """The fewest folders that contain every local file of the items (for the embedded worker).
    Holds one entry per folder, not per item, so it takes a streamed listing."""
    folders = sorted({os.path.dirname(i.ref) for i in items if not i.ref.startswith(URL_PREFIXES)})
    roots: list[str] = []
    for folder in folders:
        if not any(Path(folder).is_relative_to(root) for root in roots):
            roots.append(folder)
    return roots
