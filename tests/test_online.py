"""Online messages against a real worker: only kiln's reply keys are written, one bad request
costs no other its answer or record, only jobs that opted in take online records, and an
oversized message is refused before the worker parses or even keeps it."""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import CATS, SAMPLES, python_env
from http_server import serve_folder

from producer import Kiln
from producer.embedded import LocalWorker
from producer.settings import ProducerSettings
from worker.celery_app import make_app
from worker.contract import ONLINE_QUEUE, ONLINE_TASK, Item, reply_key
from worker.settings import CommonSettings
from worker.tasks import DEAD_LETTERS


@pytest.fixture
def raw_app(lite0_worker):
    app = make_app(CommonSettings(redis_url=lite0_worker.redis_url))
    yield app
    app.close()


def send_online(app, **message) -> None:
    app.send_task(ONLINE_TASK, args=[{"v": 1, **message}], queue=ONLINE_QUEUE)


def wait_for(condition, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_reply_to_that_is_not_a_reply_key_writes_nothing(kiln, raw_app):
    """reply_to naming a job's records: dead-lettered; the job keeps its records and its TTL-less life."""
    redis = kiln.store.redis
    redis.delete(DEAD_LETTERS)
    kiln.submit([SAMPLES / "coffee.jpg"], job="victim")
    kiln.wait("victim", timeout_s=60, progress=False)
    before = redis.hgetall("kiln:{victim}:records")
    ttl = redis.ttl("kiln:{victim}:records")
    coffee = str(SAMPLES / "coffee.jpg")
    send_online(raw_app, id="evil1", reply_to="kiln:{victim}:records", ref=coffee)
    send_online(raw_app, id="evil2", reply_to=reply_key("someone-else"), ref=coffee)  # not its own reply key
    wait_for(lambda: redis.llen(DEAD_LETTERS) >= 2)
    reasons = [json.loads(entry)["reason"] for entry in redis.lrange(DEAD_LETTERS, 0, -1)]
    assert all("reply_to" in reason for reason in reasons), reasons
    assert redis.exists(reply_key("someone-else")) == 0
    assert redis.hgetall("kiln:{victim}:records") == before
    assert abs(redis.ttl("kiln:{victim}:records") - ttl) < 60  # no EXPIRE of 300 s landed on it


def test_one_bad_reply_key_costs_no_other_request_its_answer_or_record(kiln, raw_app):
    """In one online batch, a request whose reply key holds a string fails alone: the others are
    answered and their job records written, and no EXPIRE lands on the string."""
    redis = kiln.store.redis
    redis.set(reply_key("taken"), "someone's string")
    kiln.store.register("live-batch", [Item(key=f"k{i}", ref=f"inline:{i}") for i in range(4)], online=True)
    data = (SAMPLES / "coffee.jpg").read_bytes()
    import base64

    b64 = base64.b64encode(data).decode()
    send_online(raw_app, id="taken", reply_to=reply_key("taken"), data_b64=b64, job="live-batch", key="k0")
    for i in range(1, 4):
        send_online(raw_app, id=f"fine{i}", reply_to=reply_key(f"fine{i}"), data_b64=b64, job="live-batch", key=f"k{i}")
    for i in range(1, 4):
        assert kiln.store.wait_reply(reply_key(f"fine{i}"), 60).topk[0].label == "espresso"
    counts = kiln.wait("live-batch", timeout_s=60, progress=False)
    assert (counts.total, counts.done, counts.failed) == (4, 4, 0)
    assert redis.get(reply_key("taken")) == b"someone's string" and redis.ttl(reply_key("taken")) == -1


def test_online_messages_write_only_into_jobs_that_allow_it(kiln, raw_app):
    kiln.submit([Item(key="k", ref=str(SAMPLES / "coffee.jpg"))], job="bulk-only")
    kiln.wait("bulk-only", timeout_s=60, progress=False)
    before = kiln.store.get("bulk-only", "k")
    # A hand-made message naming the bulk job's image: refused, the record untouched.
    send_online(raw_app, id="intruder", reply_to=reply_key("intruder"), ref=str(SAMPLES / "chelsea.jpg"),
                job="bulk-only", key="k")  # fmt: skip
    answer = kiln.store.wait_reply(reply_key("intruder"), 60)
    assert answer.error.kind == "forbidden" and "does not accept online requests" in answer.error.message
    assert kiln.store.get("bulk-only", "k") == before
    with pytest.raises(ValueError, match="bulk work only"):
        kiln.classify(SAMPLES / "chelsea.jpg", job="bulk-only", key="k2", timeout_s=60)
    # A job created by an online request takes its records, counted true.
    record = kiln.classify((SAMPLES / "coffee.jpg").read_bytes(), job="live", key="coffee", timeout_s=60)
    assert record.topk[0].label == "espresso"
    wait_for(lambda: kiln.store.get("live", "coffee") is not None)
    counts = kiln.counts("live")
    assert (counts.total, counts.done) == (1, 1)
    # ...but only for images it holds
    send_online(raw_app, id="stranger", reply_to=reply_key("stranger"), ref=str(SAMPLES / "chelsea.jpg"),
                job="live", key="not-registered")  # fmt: skip
    assert kiln.store.wait_reply(reply_key("stranger"), 60).error.kind == "forbidden"
    assert kiln.store.get("live", "not-registered") is None and kiln.counts("live").total == 1


def _memory_mb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) // 1024, int(fields["VmHWM"].split()[0]) // 1024


def test_a_huge_inline_image_is_refused_before_it_is_parsed(private_redis_url, lite0_package, tmp_path):
    """A 200 MB inline image sent by hand (the producer refuses it): the worker drops the
    message unread, its RSS peaks less than 300 MB above idle and returns to idle, and it
    goes on serving."""
    url = private_redis_url
    worker = LocalWorker(lite0_package, url, tmp_path / "worker.log", [SAMPLES], env=python_env())
    app = make_app(CommonSettings(redis_url=url))
    try:
        with Kiln(url) as kiln:
            assert kiln.classify(SAMPLES / "coffee.jpg", timeout_s=180).topk[0].label == "espresso"
            worker.check()
            pid = worker.process.pid
            time.sleep(2)
            idle, _ = _memory_mb(pid)
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS, to measure this message's peak
            huge = "A" * (200 * 1024 * 1024)
            send_online(app, id="huge", reply_to=reply_key("huge"), data_b64=huge)
            del huge
            wait_for(lambda: kiln.store.redis.llen(DEAD_LETTERS) >= 1, timeout_s=120)
            entry = json.loads(kiln.store.redis.lindex(DEAD_LETTERS, 0))
            assert "KILN_MAX_MESSAGE_BYTES" in entry["reason"] and entry["bytes"] > 200 * 1024 * 1024
            # still serving
            assert kiln.classify(SAMPLES / "coffee.jpg", timeout_s=120).topk[0].label == "espresso"
            rss, peak = _memory_mb(pid)
        log = worker.log_path.read_text()[-2000:]
        assert peak - idle < 300, (idle, peak, log)
        assert rss < idle * 1.1, (idle, rss, log)
    finally:
        app.close()
        worker.stop()


def test_inline_images_under_the_caps_leave_no_memory_behind(private_redis_url, lite0_package, tmp_path):
    """24 MB inline images (random bytes: `not_an_image`, so no decode at all), one and then four
    at once, as the last messages a worker gets: its RSS returns within 10% of idle. kombu kept
    each acknowledged message (body, envelope and parsed copy, ~4.5x the image) until the next
    delivery, so an idle worker held its last requests' images: +214 MB after six."""
    url = private_redis_url
    worker = LocalWorker(lite0_package, url, tmp_path / "worker.log", [SAMPLES], env=python_env())
    try:
        with Kiln(url) as kiln:
            assert kiln.classify(SAMPLES / "coffee.jpg", timeout_s=180).topk[0].label == "espresso"
            pid = worker.process.pid
            time.sleep(2)
            idle, _ = _memory_mb(pid)
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            assert kiln.classify(os.urandom(24 * 2**20), timeout_s=120).error.kind == "not_an_image"
            _, peak = _memory_mb(pid)
            with ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(lambda _: _classify_inline(url, os.urandom(24 * 2**20)), range(4)))
            assert answers == ["not_an_image"] * 4
            time.sleep(3)
            rss, _ = _memory_mb(pid)
        log = worker.log_path.read_text()[-2000:]
        print(f"idle {idle} MB; one 24 MB request: peak +{peak - idle} MB; after five: {rss - idle:+} MB")
        assert peak - idle < 300, (idle, peak, log)
        assert rss < idle * 1.1, (idle, rss, log)
    finally:
        worker.stop()


def _classify_inline(url: str, data: bytes) -> str:
    with Kiln(url) as kiln:
        return kiln.classify(data, timeout_s=120).error.kind


def test_the_producer_refuses_an_oversized_inline_image(kiln):
    kiln.settings = kiln.settings.model_copy(update={"max_inline_bytes": 1000})
    with pytest.raises(ValueError, match=r"over the inline limit of 1,000 \(KILN_MAX_INLINE_BYTES\)"):
        kiln.classify((SAMPLES / "coffee.jpg").read_bytes(), timeout_s=10)


def test_online_requests_pass_stalled_chunks_and_stalled_references(private_redis_url, lite0_package, tmp_path):
    """Every bulk chunk a worker process may hold, and four online requests by reference, wait on
    a server that does not answer: an online request for an inline image is answered at once all
    the same, and every stalled one once the server answers. Before, the online batch waited for a
    Celery task thread (the chunks held them all) and its images for an online load thread (the
    stalled references held them)."""
    url = private_redis_url
    answer, seen = threading.Event(), []
    env = python_env(KILN_FETCH_ALLOWED_NETWORKS="127.0.0.1/32", KILN_FETCH_TIMEOUT_S="300")
    options = ["--threads", "1", "--loglevel", "INFO"]
    with serve_folder(SAMPLES, gate=answer, seen=seen) as base:
        worker = LocalWorker(lite0_package, url, tmp_path / "w.log", [], options, env)
        callers = ThreadPoolExecutor(4)
        try:
            with Kiln(settings=ProducerSettings(redis_url=url, chunk_size=2)) as kiln:
                photos = [f"{base}/{path.name}#{i}" for path in sorted(SAMPLES.glob("*.jpg")) for i in range(4)]
                kiln.submit(photos, job="stalled")
                # The worker process's 2 chunks in flight, their fetch threads stalled on the server.
                wait_for(lambda: len(seen) >= 2, 180)
                stalled = [callers.submit(kiln.classify, f"{base}/coffee.jpg?{i}", 1, 300) for i in range(4)]
                wait_for(lambda: sum("?" in path for path in seen) == 4, 60)
                record = kiln.classify((SAMPLES / "chelsea.jpg").read_bytes(), topk=1, timeout_s=60)
                assert record.status == "ok" and record.topk[0].label in CATS
                answer.set()
                assert [future.result(120).topk[0].label for future in stalled] == ["espresso"] * 4
                counts = kiln.wait("stalled", timeout_s=300, progress=False, check=worker.check)
                assert (counts.done, counts.failed) == (len(photos), 0)
        finally:
            answer.set()
            callers.shutdown(wait=False, cancel_futures=True)
            worker.stop()


def test_a_request_whose_caller_gave_up_is_dropped_not_classified(private_redis_url, lite0_package, tmp_path):
    """`classify` with no worker times out; a worker started later drops the request (nobody reads
    its answer) instead of classifying it, while one kept in a job still runs: the job counts on
    its record. Before, the worker classified it for no one (a new user's finding)."""
    with Kiln(private_redis_url) as kiln:
        with pytest.raises(TimeoutError):
            kiln.classify(SAMPLES / "coffee.jpg", timeout_s=2)
        with pytest.raises(TimeoutError):
            kiln.classify(SAMPLES / "chelsea.jpg", timeout_s=2, job="kept", key="chelsea")
        worker = LocalWorker(lite0_package, private_redis_url, tmp_path / "worker.log", [SAMPLES],
                             ["--loglevel", "INFO"], env=python_env())  # fmt: skip
        try:
            wait_for(lambda: kiln.counts("kept").done == 1, 180)
            wait_for(lambda: "dropped online request" in worker.log_path.read_text(), 60)
            assert kiln.store.redis.llen(ONLINE_QUEUE) == 0
            assert [r.key for r in kiln.results("kept")] == ["chelsea"]
        finally:
            worker.stop()
