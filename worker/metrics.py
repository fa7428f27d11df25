"""Prometheus metrics of a worker (prometheus-client), in multiprocess mode so that every worker
process of a parent (worker/supervisor.py) counts.

`enable(directory)` runs in the worker's main process before any child starts: it points
prometheus-client at a folder where every process keeps its values (PROMETHEUS_MULTIPROC_DIR,
inherited by children). Until then every `observe_*` call returns at once, so a worker started
without `KILN_METRICS_PORT` pays nothing. The HTTP endpoint (worker/monitor.py) aggregates the
folder at each scrape and adds the queue depths, read from Redis at that moment.

Names (all prefixed `kiln_`) are listed in README.md, "Metrics".
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from worker.contract import Record

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
STAGES = ("fetch", "decode", "infer", "write")
# Per-stage latency buckets, in seconds: a decode of a small JPEG is ~1 ms, a CPU batch several seconds.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_FILL_BUCKETS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)

_metrics: SimpleNamespace | None = None


def enable(directory: Path) -> None:
    """Turn metrics on for this process and the children it forks from now on; values go to
    `directory` (created; it should be empty: one folder per worker start)."""
    directory.mkdir(parents=True, exist_ok=True)
    os.environ[MULTIPROC_ENV] = str(directory)


def _define() -> SimpleNamespace | None:
    """The metric objects, created on first use in each process (after `enable`, so that
    worker processes write to the shared folder); None where metrics are off."""
    global _metrics
    if _metrics is None and os.environ.get(MULTIPROC_ENV):
        from prometheus_client import Counter, Gauge, Histogram

        _metrics = SimpleNamespace(
            images=Counter("kiln_images", "Images recorded, by status and error kind", ["status", "kind"]),
            batches=Counter("kiln_batches", "Model calls (batches) whose records were written"),
            batch_fill=Histogram("kiln_batch_fill_ratio", "Images in a batch / the batch size", buckets=_FILL_BUCKETS),
            stage=Histogram(
                "kiln_stage_seconds",
                "Latency of a pipeline stage: fetch and decode per image, infer per batch, write per store write",
                ["stage"],
                buckets=_LATENCY_BUCKETS,
            ),
            deliveries=Counter("kiln_deliveries", "Task deliveries, by task kind", ["task"]),
            redeliveries=Counter("kiln_redeliveries", "Deliveries of a task seen before, by task kind", ["task"]),
            poison=Counter("kiln_poison_messages", "Tasks given up after KILN_MAX_DELIVERIES, by task kind", ["task"]),
            model=Gauge(
                "kiln_model_info",
                "The package each worker process serves (value 1)",
                ["model", "weights_sha256", "device", "compute_dtype"],
                multiprocess_mode="max",
            ),
        )
    return _metrics


def observe_records(records: Sequence[Record], write_s: float | None, batch_size: int | None = None) -> None:
    """Count written records and observe their stage timings (`Record.timings_ms`).

    `records` are those of one store write, which took `write_s` seconds (None: records of a
    shard, which is written whole later and observed by `observe_write`); when they came from
    one model call, pass `batch_size` (the images per call) to observe the batch and its fill."""
    m = _define()
    if m is None or not records:
        return
    if write_s is not None:
        m.stage.labels("write").observe(write_s)
    # Label lookups and multiprocess writes cost microseconds each: count per label, not per image.
    kinds = Counter((r.status, r.error.kind if r.error else "") for r in records)
    for (status, kind), count in kinds.items():
        m.images.labels(status, kind).inc(count)
    fetch_s: list[float] = []
    decode_s: list[float] = []
    inferred = 0
    infer_ms = None
    for record in records:
        timings = record.timings_ms
        if not timings:
            continue
        if "fetch" in timings:
            fetch_s.append(timings["fetch"] / 1e3)
        if "decode" in timings:
            decode_s.append(timings["decode"] / 1e3)
        if "infer" in timings:  # the whole batch's model call, the same in each of its records
            inferred += 1
            infer_ms = timings["infer"]
    observe_all(m.stage.labels("fetch"), fetch_s)
    observe_all(m.stage.labels("decode"), decode_s)
    if infer_ms is not None and batch_size:
        m.stage.labels("infer").observe(infer_ms / 1e3)
        m.batches.inc()
        m.batch_fill.observe(min(1.0, inferred / batch_size))


def observe_all(histogram: Any, values: Sequence[float]) -> None:
    """`histogram.observe(v)` for each of `values`, with one update per bucket used and one of the
    sum. In multiprocess mode every update is a locked write to a memory-mapped file (~5 us per
    `observe`, two per image): per write of 128 records that was a few % of a tiny model's
    throughput. Uses `Histogram.observe`'s own fields (prometheus-client 0.20-0.26); should they
    change, this falls back to `observe`, and tests/test_metrics.py checks both give the same."""
    if not values:
        return
    try:
        bounds, buckets, total = histogram._upper_bounds, histogram._buckets, histogram._sum
    except AttributeError:  # another prometheus-client: the public way
        for value in values:
            histogram.observe(value)
        return
    counts = Counter(bisect_left(bounds, value) for value in values)  # the first bound >= value, as observe
    for index, count in counts.items():
        buckets[index].inc(count)
    total.inc(sum(values))


def observe_write(write_s: float) -> None:
    """Observe one store write whose records `observe_records` counted already (a shard)."""
    m = _define()
    if m is not None:
        m.stage.labels("write").observe(write_s)


def observe_deliveries(task: str, deliveries: Iterable[int], max_deliveries: int) -> None:
    """Count deliveries of `task` ("chunk" or "online"), given each message's delivery count."""
    m = _define()
    if m is None:
        return
    for count in deliveries:
        m.deliveries.labels(task).inc()
        if count > 1:
            m.redeliveries.labels(task).inc()
        if count > max_deliveries:
            m.poison.labels(task).inc()


def observe_model(manifest: Any) -> None:
    """Publish the loaded package's identity (a `worker.manifest.Manifest`)."""
    m = _define()
    if m is not None:
        m.model.labels(manifest.model, manifest.weights_sha256, manifest.device, manifest.compute_dtype).set(1)
