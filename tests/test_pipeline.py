"""The worker's in-process pipeline, without a broker: one record per image, whatever happens."""

from __future__ import annotations

import base64
import threading

import pytest
from conftest import CATS
from http_server import serve_folder
from test_worker import _wait_until

from worker.fetch import FetchPolicy
from worker.pipeline import Pipeline, PipelineConfig, Work, _Image, _OnlineFirst, _Request


@pytest.fixture
def pipeline(lite0_runtime, sample_photos):
    policy = FetchPolicy.create([str(sample_photos["chelsea"].parent)], 10**7, 5)
    pipe = Pipeline(lite0_runtime, PipelineConfig(policy=policy, fetch_threads=2, batch_size=2))
    yield pipe
    pipe.close()


def test_every_image_gets_exactly_one_record(pipeline, sample_photos, tmp_path):
    (tmp_path / "notes.jpg").write_text("not really a jpeg")
    works = [Work("j", name, ref=str(path)) for name, path in sample_photos.items()]
    works += [
        Work("j", "missing", ref=str(sample_photos["chelsea"].parent / "missing.jpg")),
        Work("j", "outside", ref=str(tmp_path / "notes.jpg")),
        Work("j", "inline", data_b64=base64.b64encode(sample_photos["coffee"].read_bytes()).decode()),
        Work("j", "garbage", data_b64="!!! not base64"),
    ]
    batches = list(pipeline.run(works, topk=3))
    records = {record.key: record for batch in batches for _, record in batch}
    assert sorted(records) == sorted(w.key for w in works)
    assert sum(len(b) for b in batches) == len(works)
    assert max(sum(r.status == "ok" for _, r in b) for b in batches) <= 2  # batch_size
    assert records["chelsea"].topk[0].label in CATS
    assert records["coffee"].topk[0].label == records["inline"].topk[0].label == "espresso"
    assert len(records["coffee"].topk) == 3
    kinds = {key: records[key].error.kind for key in ("missing", "outside", "garbage")}
    assert kinds == {"missing": "not_found", "outside": "forbidden", "garbage": "bad_message"}
    ok = records["coffee"]
    assert ok.model == "efficientnet_lite0" and len(ok.model_digest) == 64 and ok.worker
    assert {"fetch", "decode", "infer"} <= set(ok.timings_ms)


def test_empty_input(pipeline):
    assert list(pipeline.run([], topk=5)) == []


def test_the_model_waits_for_a_second_image_while_more_are_on_their_way(pipeline, monkeypatch):
    """A package pads a single image to its smallest batch (2) and pays for both: while the
    callers have other images on their way, the model waits for one more. A lone image does not
    wait, nor does an online one, whose caller is waiting. (FILL_S is made long here, so that only
    the condition decides, not the clock.)"""
    import queue

    import worker.pipeline as module

    monkeypatch.setattr(module, "FILL_S", 600.0)
    assert pipeline.runtime.manifest.batch_min == 2
    request = _Request(1)
    first, second = (_Image(Work("bulk", key, ref="x"), request) for key in ("first", "second"))
    ready: queue.Queue = queue.Queue()
    ready.put(first)
    pipeline._add_in_flight(1)  # the first alone: taken at once
    assert pipeline._gather(ready, 64, fill_to=2) == [first]

    ready.put(first)
    pipeline._add_in_flight(1)  # two in flight: the second is waited for, however late

    def put_second() -> None:
        while not ready.empty():  # once the first has been taken
            threading.Event().wait(0.01)
        ready.put(second)

    threading.Thread(target=put_second, daemon=True).start()
    assert pipeline._gather(ready, 64, fill_to=2) == [first, second]

    online = _Image(Work("online", "o", data_b64="", reply_to="kiln:reply:o"), request)
    ready.put(online)  # two still in flight, but an online image's caller waits: taken at once
    assert pipeline._gather(ready, 64, fill_to=2) == [online]
    pipeline._add_in_flight(-2)


def test_images_count_as_in_flight_until_their_records_are_made(pipeline, sample_photos):
    """The model waits for more images only while some have no record yet: records that a caller
    has not taken (it is writing the last ones, or it stopped early) do not count. Before, they
    counted until taken, and every batch of other callers, online ones too, waited FILL_S."""
    works = [Work("j", f"{name}-{i}", ref=str(path)) for i in range(3) for name, path in sample_photos.items()]
    batches = pipeline.run(works, topk=1)
    next(batches)  # takes its first records, then takes no more
    _wait_until(lambda: pipeline._in_flight == 0, 120, "its other records to be made")
    batches.close()
    assert pipeline._in_flight == 0


def test_an_online_image_goes_before_a_bulk_jobs_fetches(lite0_runtime, sample_photos):
    """An online request (inline bytes, a reply list) while a bulk job's fetches hang: it gets its
    record with every bulk fetch still waiting. Before, it queued behind them in the fetch threads
    (and the decode processes), and `classify` timed out after 30 s behind slow references."""
    gate = threading.Event()
    with serve_folder(sample_photos["chelsea"].parent, gate=gate) as base:
        policy = FetchPolicy.create([], 10**7, 120, allowed_networks=["127.0.0.1/32"])
        pipe = Pipeline(lite0_runtime, PipelineConfig(policy=policy, fetch_threads=2, batch_size=2))
        bulk_records: list = []
        online_records: list = []
        bulk = [Work("bulk", f"{i}", ref=f"{base}/chelsea.jpg") for i in range(8)]
        inline = base64.b64encode(sample_photos["coffee"].read_bytes()).decode()
        online = [Work("online", "coffee", data_b64=inline, reply_to="kiln:reply:test")]
        consume = lambda works, into: into.extend(pair for part in pipe.run(works, 1) for pair in part)  # noqa: E731
        bulk_thread = threading.Thread(target=consume, args=(bulk, bulk_records), daemon=True)
        online_thread = threading.Thread(target=consume, args=(online, online_records), daemon=True)
        try:
            bulk_thread.start()
            _wait_until(lambda: pipe._in_flight >= 4, 60, "the bulk window (2 batches) to be in flight")
            online_thread.start()
            online_thread.join(120)
            assert not online_thread.is_alive(), "the online image waited for the bulk job's fetches"
            assert not bulk_records
            ((_, record),) = online_records
            assert record.status == "ok" and record.topk[0].label == "espresso"
        finally:
            gate.set()
            bulk_thread.join(120)
            pipe.close()
        assert len(bulk_records) == 8 and all(r.status == "ok" for _, r in bulk_records)


def test_online_units_leave_a_stage_queue_first():
    request = _Request(1)
    units = [_Image(Work("bulk", f"{i}", ref="x"), request) for i in range(3)]
    urgent = _Image(Work("online", "o", data_b64="", reply_to="r"), request)
    lanes = _OnlineFirst()
    for unit in [*units[:2], urgent, units[2]]:
        lanes.put(unit)
    assert lanes.qsize() == 4
    assert [lanes.get_nowait() for _ in range(4)] == [urgent, *units]
