"""Sharded output: a chunk's records as one Parquet shard, `out_dir/shard_name(job, chunk)`.

A shard appears whole or not at all. In a local (or mounted shared) folder it is written under a
hidden temporary name in the same folder, flushed to disk, then renamed over the shard's name; in
an object store (s3://, gs://, ...) it is one PUT of the whole file. So a redelivered chunk
rewrites the same shard with the same rows, and a reader never sees half a shard or a row twice.
Readers skip the temporary files: their names start with a dot and do not end in `.parquet`.

pyarrow and fsspec are imported only here, when a shard is written (`pip install 'kiln[parquet]'`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from worker.atomic_file import replacing
from worker.contract import Record, shard_name
from worker.records import arrow_schema, flat_row
from worker.retry import Unavailable

INSTALL_HINT = "sharded output (out_dir) needs pyarrow and fsspec on the worker: pip install 'kiln[parquet]'"


class SinkUnavailable(Unavailable):
    """A shard could not be written for longer than the worker was willing to retry."""

    service = "the output store"


def shard_url(out_dir: str, job: str, chunk: str) -> str:
    """The shard's full URL (or path, for a local out_dir)."""
    return f"{out_dir.rstrip('/')}/{shard_name(job, chunk)}"


def write_shard(out_dir: str, job: str, chunk: str, records: Iterable[Record], topk: int) -> int:
    """Write `records` (one per image key) as the shard of (job, chunk), one row each, sorted by
    key, in the columns of `worker.records.flat_row`; return the rows written.

    Raises ImportError (saying what to install) without pyarrow or fsspec, and the file system's
    error (OSError and kin) when the shard cannot be written: the shard is then either absent or
    the whole one an earlier delivery wrote."""
    try:
        import fsspec
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from e
    rows = [flat_row(record, topk) for record in sorted(records, key=lambda r: r.key)]
    table = pa.Table.from_pylist(rows, schema=arrow_schema(topk))
    fs, path = fsspec.core.url_to_fs(shard_url(out_dir, job, chunk))
    if "file" in fs.protocol:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with replacing(path, durable=True) as tmp:
            pq.write_table(table, str(tmp))
    else:
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer)
        fs.pipe_file(path, buffer.getvalue().to_pybytes())  # one PUT: the object appears whole
    return len(rows)
