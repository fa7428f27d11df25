"""Prometheus metrics (worker/metrics.py) from real workers, of one process and of several (multiprocess mode):
what the records say is what the endpoint counts, summed over every process."""

from __future__ import annotations

import shutil
import urllib.request

import pytest
from conftest import SAMPLES
from prometheus_client.parser import text_string_to_metric_families
from test_health import monitored_worker, wait_for, wait_status

from producer import Kiln
from producer.settings import ProducerSettings
from worker.manifest import read_manifest


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.mark.parametrize("processes", [1, 2])
def test_metrics_count_what_the_records_say(processes, private_redis_url, lite0_package, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(SAMPLES, folder)
    (folder / "broken.jpg").write_bytes(b"not an image at all")
    options = ["--concurrency", str(processes), "--threads", "1", "--queues", "kiln.bulk"]
    with monitored_worker(lite0_package, private_redis_url, tmp_path, "--allowed-roots", str(folder), *options) as port:
        wait_status(port, "/readyz", 200, 180)
        with Kiln(settings=ProducerSettings(redis_url=private_redis_url, chunk_size=2)) as kiln:
            kiln.submit([folder], job="metered")
            counts = kiln.wait("metered", timeout_s=300, progress=False)
            records = list(kiln.results("metered"))
        samples = scrape(port)
        # Queue depths are as the health monitor last read them, every few seconds.
        wait_for(lambda: scrape(port).get(("kiln_queue_depth", (("queue", "kiln.bulk"),))) == 0, 30, "an empty queue")

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    ok = sum(r.status == "ok" for r in records)
    assert (counts.done, counts.failed) == (ok, 1) == (len(list(SAMPLES.glob("*.jpg"))), 1)
    assert value("kiln_images_total", status="ok", kind="") == ok
    assert value("kiln_images_total", status="error", kind="not_an_image") == 1
    chunks = -(-len(records) // 2)
    assert value("kiln_deliveries_total", task="chunk") == chunks
    assert value("kiln_redeliveries_total", task="chunk") == 0
    # fetch and decode once per image read; infer once per model call.
    assert value("kiln_stage_seconds_count", stage="fetch") == ok  # failed images carry no timings
    assert value("kiln_stage_seconds_count", stage="decode") == ok
    batches = value("kiln_batches_total")
    assert 1 <= batches <= ok and value("kiln_stage_seconds_count", stage="infer") == batches
    assert value("kiln_batch_fill_ratio_count") == batches and value("kiln_batch_fill_ratio_sum") <= batches
    assert value("kiln_stage_seconds_count", stage="write") >= chunks
    manifest = read_manifest(lite0_package)
    info = {"model": manifest.model, "weights_sha256": manifest.weights_sha256, "device": "cpu"}
    assert value("kiln_model_info", **info, compute_dtype=manifest.compute_dtype) == 1
    assert value("kiln_broker_up") == 1


def test_observing_many_values_at_once_gives_what_observing_each_gives():
    """`observe_all` updates prometheus-client's histogram fields directly (one update per bucket,
    not per value): its exposition must equal `observe` called for each value, bounds included."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from worker.metrics import observe_all

    values = [0.0, 0.0005, 0.0005001, 0.001, 0.003, 0.003, 0.2, 7.5, 30.0, 31.0, 1e9]
    texts = []
    for bulk in (True, False):
        registry = CollectorRegistry()
        histogram = Histogram(
            "latency_seconds", "t", ["stage"], buckets=(0.0005, 0.001, 0.0025, 0.5, 30), registry=registry
        )
        child = histogram.labels("decode")
        if bulk:
            observe_all(child, values)
            observe_all(child, [])
        else:
            for value in values:
                child.observe(value)
        text = generate_latest(registry).decode()
        texts.append([line for line in text.splitlines() if "_created" not in line])  # creation times differ
    assert any(line.startswith("latency_seconds_count") for line in texts[0])
    assert texts[0] == texts[1]
