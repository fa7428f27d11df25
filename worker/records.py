"""One flat row per record: the columns of CSV and Parquet exports and of sharded output alike.

Both sides import this module (the producer's export, the worker's shard sink), so one schema
serves both output modes. It imports no pyarrow until `arrow_schema` is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker.contract import Record

if TYPE_CHECKING:
    import pyarrow as pa


def flat_row(record: Record, topk: int) -> dict[str, object]:
    """One record as flat columns: top-k labels and scores side by side, then the error if any."""
    row: dict[str, object] = {"key": record.key, "ref": record.ref, "status": record.status}
    for rank in range(topk):
        label = record.topk[rank] if rank < len(record.topk) else None
        row[f"label_{rank + 1}"] = label.label if label else None
        row[f"score_{rank + 1}"] = round(label.score, 6) if label else None
    row["error_kind"] = record.error.kind if record.error else None
    row["error"] = record.error.message if record.error else None
    row["model"] = record.model
    row["worker"] = record.worker
    return row


def columns(topk: int) -> list[str]:
    """`flat_row`'s column names, in order."""
    return list(flat_row(Record(job="", key="", status="ok"), topk))


def arrow_schema(topk: int) -> pa.Schema:
    """The Arrow schema of `flat_row`'s columns: scores float64, every other column a string.

    Given explicitly, so that a shard whose rows are all failures (every label null) has the same
    types as any other, and the shards read as one data set. Raises ImportError without pyarrow."""
    import pyarrow as pa

    return pa.schema([(name, pa.float64() if name.startswith("score_") else pa.string()) for name in columns(topk)])
