"""Write a job's records to a file: JSONL, CSV or Parquet, chosen by the file's extension.

Records stream into the file in batches, so an export of any size takes bounded memory: from the
Redis result store (`write_results`, sorted by key only when asked, since sorting needs every
record at once) or from a sharded job's Parquet shards (`write_shards`, in chunk order, each
shard's rows sorted by key). Written to a temporary file beside the target and renamed, so a
reader never sees half a file; the file gets the umask's permissions, as any file the user makes.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from worker.atomic_file import replacing
from worker.contract import Record
from worker.records import arrow_schema, columns, flat_row

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}
BATCH_ROWS = 2_000  # rows converted and written at once: a few MB at most


def export_format(path: Path) -> str:
    """The format of a results file, by its name. Raises ValueError for a folder or an unknown
    extension; `.json` too, whose readers expect one JSON document, not a record a line."""
    if path.is_dir():
        raise ValueError(f"{path}: a folder; name the results file in it (for example {path / 'results.csv'})")
    fmt = FORMATS.get(path.suffix.lower())
    if path.suffix.lower() == ".json":
        raise ValueError(f"{path}: results are written as JSON Lines, a record a line: name the file .jsonl")
    if fmt is None:
        raise ValueError(f"{path}: unknown results format; use one of {', '.join(sorted(FORMATS))}")
    return fmt


def write_results(records: Iterable[Record], path: Path, topk: int = 5, sort: bool = True) -> int:
    """Write records (sorted by key if `sort`, which holds them all; else as they come, in
    bounded memory); return how many. JSONL holds whole records, CSV and Parquet `flat_row`s
    (worker/records.py: the shards' schema too)."""
    fmt = export_format(path)
    if sort:
        records = sorted(records, key=lambda r: r.key)
    with _replacing(path) as tmp:
        if fmt == "jsonl":
            return _write_rows(tmp, fmt, (r.model_dump(mode="json", exclude_none=True) for r in records), [])
        rows = (flat_row(r, topk) for r in records)
        if fmt == "csv":
            return _write_rows(tmp, fmt, rows, columns(topk))
        pa, _, _ = _pyarrow()
        schema = arrow_schema(topk)
        return _write_parquet(tmp, schema, (pa.RecordBatch.from_pylist(b, schema=schema) for b in _batched(rows)))


def write_shards(folder: str, path: Path) -> int:
    """Write a sharded job's records (the Parquet shards in `folder`, a path or an fsspec URL)
    to one file, shard by shard in name (chunk) order; return how many rows. Holds one shard and
    one output row group (`BATCH_ROWS`) at a time, whatever the job's size."""
    fmt = export_format(path)
    schema, batches = shard_batches(folder)
    with _replacing(path) as tmp:
        if fmt == "parquet":
            return _write_parquet(tmp, schema, _regrouped(batches, schema))
        rows = (row for batch in batches for row in batch.to_pylist())
        return _write_rows(tmp, fmt, rows, schema.names)


def shard_batches(folder: str):
    """The schema of the Parquet shards in `folder` (a path or an fsspec URL) and their record
    batches, shard by shard in name order, each shard opened only when reached (a dataset scan
    kept every shard's metadata: 740 MB for 7,813 shards, bench/results/scale.json). Raises
    ValueError if there are none."""
    _, pq, _ = _pyarrow()
    import fsspec

    fs, root = fsspec.core.url_to_fs(folder)
    files = sorted(f for f in fs.find(root) if f.endswith(".parquet")) if fs.isdir(root) else []
    if not files:
        raise ValueError(f"{folder}: no Parquet shards there (has a worker completed a chunk of the job yet?)")
    with fs.open(files[0], "rb") as f:
        schema = pq.read_schema(f)

    def batches():
        for name in files:
            with fs.open(name, "rb") as f:
                yield from pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS)

    return schema, batches()


def _regrouped(batches: Iterable, schema) -> Iterator:
    """Shards' small batches (a chunk's rows each) as batches of about `BATCH_ROWS` rows: one
    Parquet row group each, instead of one per shard."""
    pa, _, _ = _pyarrow()
    held, rows = [], 0
    for batch in batches:
        held.append(batch)
        rows += batch.num_rows
        if rows >= BATCH_ROWS:
            yield from pa.Table.from_batches(held, schema).combine_chunks().to_batches()
            held, rows = [], 0
    if held:
        yield from pa.Table.from_batches(held, schema).combine_chunks().to_batches()


def check_writable(path: Path) -> str:
    """Check, before any work, that results can be written to `path`: a known format, and a
    folder (created if missing) where a file can be made. Returns the format. Raises ValueError
    for an unknown extension, OSError (naming `path`) where no file can be written there."""
    fmt = export_format(path)
    with _replacing(path, keep=False):
        pass
    return fmt


def check_out_dir(out_dir: str, job: str) -> None:
    """Check, before any work, that `label` can read back the shards of a local `out_dir`: the
    job's folder in it (made if missing), where this host can write. `submit` does not check: its
    workers' folder may not be this host's. Raises OSError naming it; fsspec URLs are not checked."""
    if "://" in out_dir:
        return
    folder = Path(out_dir).expanduser() / job
    try:
        with _replacing(folder / ".kiln-write-check", keep=False):
            pass
    except OSError as e:
        raise OSError(f"--out-dir {out_dir}: cannot write the job's shards in {folder} ({e})") from e


@contextlib.contextmanager
def _replacing(path: Path, keep: bool = True) -> Iterator[Path]:
    """`worker.atomic_file.replacing`, making `path`'s folder first. Raises OSError naming
    `path` where its folder or the file cannot be made."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OSError(f"cannot write {path}: {path.parent} (or a folder above it) is a file, not a folder") from None
    except OSError as e:
        raise OSError(f"cannot write {path}: cannot make its folder: {e.strerror}") from e
    with replacing(path, keep) as tmp:
        yield tmp


def _write_rows(path: Path, fmt: str, rows: Iterable[dict], columns: list[str]) -> int:
    written = 0
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns) if fmt == "csv" else None
        if writer is not None:
            writer.writeheader()
        for batch in _batched(rows):
            if writer is not None:
                writer.writerows(batch)
            else:
                f.writelines(json.dumps(row, separators=(",", ":"), ensure_ascii=False) + "\n" for row in batch)
            written += len(batch)
    return written


def _write_parquet(path: Path, schema, batches: Iterable) -> int:
    _, pq, _ = _pyarrow()
    written = 0
    with pq.ParquetWriter(path, schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
            written += batch.num_rows
    return written


def _batched(rows: Iterable[dict]) -> Iterator[list[dict]]:
    rows = iter(rows)
    while batch := list(itertools.islice(rows, BATCH_ROWS)):
        yield batch


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.dataset as ds
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("Parquet needs pyarrow: pip install 'kiln[parquet]'") from None
    return pa, pq, ds
