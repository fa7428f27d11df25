"""Write a job's records to a file: JSONL, CSV or Parquet, chosen by the file's extension.

Written to a temporary file beside the target and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from worker.contract import Record
from worker.records import arrow_schema, columns, flat_row

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}


def export_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown results format; use one of {', '.join(sorted(FORMATS))}")
    return fmt


def write_results(records: Iterable[Record], path: Path, topk: int = 5) -> int:
    """Write records sorted by key; return how many."""
    fmt = export_format(path)
    rows = sorted(records, key=lambda r: r.key)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        {"jsonl": _jsonl, "csv": _csv, "parquet": _parquet}[fmt](rows, Path(tmp), topk)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return len(rows)


def _jsonl(rows: list[Record], path: Path, topk: int) -> None:
    with open(path, "w") as f:
        for record in rows:
            f.write(record.model_dump_json(exclude_none=True) + "\n")


def _csv(rows: list[Record], path: Path, topk: int) -> None:
    flat = [flat_row(r, topk) for r in rows]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns(topk))
        writer.writeheader()
        writer.writerows(flat)


def _parquet(rows: list[Record], path: Path, topk: int) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("Parquet needs pyarrow: pip install 'kiln[parquet]'") from None
    table = pa.Table.from_pylist([flat_row(r, topk) for r in rows], schema=arrow_schema(topk))
    pq.write_table(table, path)
