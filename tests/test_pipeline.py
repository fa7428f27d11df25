"""The worker's in-process pipeline, without a broker: one record per image, whatever happens."""

from __future__ import annotations

import base64

import pytest

from worker.fetch import FetchPolicy
from worker.pipeline import Pipeline, PipelineConfig, Work

CATS = {"tiger cat", "Egyptian cat", "tabby"}


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
    wait. (FILL_S is made long here, so that only the condition decides, not the clock.)"""
    import queue
    import threading

    import worker.pipeline as module

    monkeypatch.setattr(module, "FILL_S", 600.0)
    assert pipeline.runtime.manifest.batch_min == 2
    ready: queue.Queue = queue.Queue()
    ready.put("first")
    pipeline._add_in_flight(1)  # the first alone: taken at once
    assert pipeline._gather(ready, 64, fill_to=2) == ["first"]

    ready.put("first")
    pipeline._add_in_flight(1)  # two in flight: the second is waited for, however late

    def second() -> None:
        while not ready.empty():  # once the first has been taken
            threading.Event().wait(0.01)
        ready.put("second")

    threading.Thread(target=second, daemon=True).start()
    assert pipeline._gather(ready, 64, fill_to=2) == ["first", "second"]
    pipeline._add_in_flight(-2)


def test_a_caller_that_stops_early_no_longer_counts_as_in_flight(pipeline, sample_photos):
    works = [Work("j", f"{name}-{i}", ref=str(path)) for i in range(3) for name, path in sample_photos.items()]
    batches = pipeline.run(works, topk=1)
    next(batches)
    batches.close()
    assert pipeline._in_flight == 0
