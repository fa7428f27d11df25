"""The result store against a real redis-server: idempotent upserts, counters, expiry."""

from __future__ import annotations

import pytest

from worker.contract import Label, Record
from worker.store import ResultStore


def ok(key: str, label: str = "espresso") -> Record:
    return Record(job="j", key=key, status="ok", topk=[Label(label=label, index=967, score=0.9)])


def failed(key: str) -> Record:
    return Record.failure("j", key, "fetch_failed", "connection refused")


@pytest.fixture
def store(redis_client):
    return ResultStore(redis_client, ttl_s=3600)


def test_redelivered_records_are_not_counted_twice(store):
    store.begin_job("j", 3)
    store.write([ok("a"), ok("b")])
    store.write([ok("a"), ok("b")])  # the same batch again, as after a redelivery
    store.write([failed("c")])
    counts = store.counts("j")
    assert (counts.total, counts.done, counts.failed, counts.complete) == (3, 2, 1, True)
    assert sorted(r.key for r in store.records("j")) == ["a", "b", "c"]


def test_a_retry_that_succeeds_replaces_the_failure(store):
    store.begin_job("j", 1)
    store.write([failed("a")])
    store.write([ok("a")])
    assert (store.counts("j").done, store.counts("j").failed) == (1, 0)
    assert store.get("j", "a").status == "ok"


def test_a_success_is_never_replaced_by_a_failure(store):
    store.begin_job("j", 1)
    store.write([ok("a")])
    store.write([failed("a")])
    assert (store.counts("j").done, store.counts("j").failed) == (1, 0)
    assert store.get("j", "a").topk[0].label == "espresso"


def test_recorded_keys_for_resume(store):
    store.begin_job("j", 3)
    store.write([ok("a"), failed("b")])
    assert store.recorded_keys("j") == {"a", "b"}
    assert store.recorded_keys("j", include_failed=False) == {"a"}


def test_one_write_can_span_jobs(store):
    store.write([ok("x"), Record(job="other", key="y", status="ok")])
    assert store.get("j", "x") is not None and store.get("other", "y") is not None


def test_keys_expire(store, redis_client):
    store.begin_job("j", 1)
    store.write([ok("a")])
    for part in ("meta", "records", "status"):
        assert 0 < redis_client.ttl(f"kiln:{{j}}:{part}") <= 3600
    forever = ResultStore(redis_client, ttl_s=0)
    forever.begin_job("k", 1)
    forever.write([Record(job="k", key="a", status="ok")])
    assert redis_client.ttl("kiln:{k}:records") == -1


def test_delivery_counts_and_replies(store):
    assert [store.count_deliveries("j", ["task-1"])[0] for _ in range(3)] == [1, 2, 3]
    assert store.count_deliveries("j", ["task-2", "task-1"]) == [1, 4]
    store.reply([("kiln:reply:r1", ok("a"))])
    assert store.wait_reply("kiln:reply:r1", 1).key == "a"
    assert store.wait_reply("kiln:reply:r1", 0.1) is None
