"""Sharded output against real components: a real redis-server, real `python -m worker`
processes, the real Lite0 package and real photos. Chunk messages are sent as a producer sends
them (the store calls, then the task); the shards are read back with pyarrow, pandas and DuckDB.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from conftest import CATS, PYTHON, SAMPLES, python_env
from http_server import serve_folder
from pydantic import ValidationError

from producer.embedded import LocalWorker
from worker.celery_app import make_app
from worker.contract import BULK_QUEUE, CHUNK_TASK, ChunkMessage, Item, chunk_id, shard_name
from worker.records import columns
from worker.settings import CommonSettings
from worker.store import ResultStore

PHOTOS = ("chelsea.jpg", "coffee.jpg", "rocket.jpg")
TOPK = 3


def test_chunk_ids_follow_the_content_and_the_position():
    first = [Item(key="a", ref="/x/a.jpg"), Item(key="b", ref="/x/b.jpg")]
    same = [Item(key="a", ref="/x/a.jpg"), Item(key="b", ref="/x/b.jpg")]
    other_ref = [Item(key="a", ref="/x/a.jpg"), Item(key="b", ref="/y/b.jpg")]
    assert chunk_id(7, first) == chunk_id(7, same)
    assert chunk_id(7, first).startswith("000000007-") and len({chunk_id(7, first), chunk_id(8, first)}) == 2
    assert chunk_id(7, first) != chunk_id(7, other_ref) and chunk_id(7, first) != chunk_id(7, first[::-1])
    assert shard_name("job-1", chunk_id(7, first)) == f"job-1/part-{chunk_id(7, first)}.parquet"
    with pytest.raises(ValueError, match="outside"):
        chunk_id(10**9, first)


def test_a_sharded_message_names_both_its_chunk_and_its_folder():
    items = [{"key": "a", "ref": "/x/a.jpg"}]
    ok = ChunkMessage.model_validate({"job": "j", "items": items, "chunk": "000000001-0123abcd", "out_dir": "/o"})
    assert ok.out_dir == "/o"
    for bad in (
        {"chunk": "000000001-0123abcd"},  # no out_dir
        {"out_dir": "/o"},  # no chunk
        {"chunk": "1-zz", "out_dir": "/o"},
        {"chunk": "000000001-0123abcd", "out_dir": "/o", "job": ".."},  # a folder above out_dir
    ):
        with pytest.raises(ValidationError):
            ChunkMessage.model_validate({"job": "j", "items": items, **bad})


def photo_items(folder: Path, n: int) -> list[Item]:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        shutil.copy(SAMPLES / PHOTOS[i % len(PHOTOS)], folder / f"{i:03d}.jpg")
    return [Item(key=f"{i:03d}", ref=str(folder / f"{i:03d}.jpg")) for i in range(n)]


def send_sharded(app, store: ResultStore, job: str, out_dir: str, items: list[Item], chunk_size: int) -> list[dict]:
    """What a producer does for a sharded job: begin it, count and enqueue each chunk, end the listing.
    Returns the messages sent."""
    store.begin_sharded(job, out_dir, TOPK)
    messages = []
    for index, start in enumerate(range(0, len(items), chunk_size)):
        part = items[start : start + chunk_size]
        chunk = chunk_id(index, part)
        store.add_chunk(job, chunk, len(part))
        message = ChunkMessage(job=job, items=part, topk=TOPK, chunk=chunk, out_dir=out_dir).model_dump(mode="json")
        app.send_task(CHUNK_TASK, args=[message], queue=BULK_QUEUE)
        messages.append(message)
    store.finish_listing(job)
    return messages


def wait_for(condition: Callable[[], object], timeout_s: float, what: str, check: Callable[[], None] = lambda: None):
    deadline = time.monotonic() + timeout_s
    while not condition():
        check()
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.2)


def redis_parts(store: ResultStore, job: str) -> set[str]:
    return {key.decode().rsplit(":", 1)[1] for key in store.redis.keys(f"kiln:{{{job}}}:*")}


def assert_one_row_per_image(folder: Path, items: list[Item]) -> pd.DataFrame:
    """pyarrow, pandas and DuckDB each read the job's folder as one data set: one row per image."""
    keys = sorted(item.key for item in items)
    table = pq.read_table(folder)
    assert sorted(table.column("key").to_pylist()) == keys
    assert ds.dataset(folder, format="parquet").schema.names == columns(TOPK)
    frame = pd.read_parquet(folder)
    assert sorted(frame["key"]) == keys and list(frame.columns) == columns(TOPK)
    rows = duckdb.sql(f"SELECT key, count(*) FROM '{folder}/*.parquet' GROUP BY key").fetchall()
    assert sorted(rows) == [(key, 1) for key in keys]
    return frame.set_index("key")


@pytest.fixture
def raw_app(lite0_worker):
    app = make_app(CommonSettings(redis_url=lite0_worker.redis_url))
    yield app
    app.close()


def test_a_sharded_job_writes_one_shard_per_chunk_and_nothing_per_image_to_redis(
    kiln, raw_app, lite0_worker, work_dir, tmp_path
):
    job, out = "sharded-" + uuid.uuid4().hex[:8], tmp_path / "out"
    items = photo_items(work_dir / job, 10)
    messages = send_sharded(raw_app, kiln.store, job, str(out), items, chunk_size=4)
    wait_for(lambda: kiln.store.counts(job).complete, 120, "the job", lite0_worker.check)
    counts = kiln.store.counts(job)
    assert (counts.total, counts.done, counts.failed) == (10, 10, 0)
    shards = sorted(p.name for p in (out / job).iterdir())
    assert shards == sorted(Path(shard_name(job, m["chunk"])).name for m in messages) and len(shards) == 3
    frame = assert_one_row_per_image(out / job, items)
    assert frame.loc["000", "label_1"] in CATS and frame.loc["001", "label_1"] == "espresso"
    assert (frame["status"] == "ok").all() and frame["score_1"].between(0, 1).all()
    # Each shard's rows are sorted by key.
    for shard in (out / job).iterdir():
        keys = pq.read_table(shard).column("key").to_pylist()
        assert keys == sorted(keys)
    # Redis keeps counters and per-chunk bookkeeping only: O(chunks), no records, statuses or items.
    assert redis_parts(kiln.store, job) == {"meta", "listed", "chunks", "delivery", "executions"}
    assert kiln.store.completed_chunks(job) == {m["chunk"] for m in messages}
    assert kiln.store.redis.hlen(f"kiln:{{{job}}}:chunks") == 3

    # The same chunk sent again (a resumed producer, a lost acknowledgement): acknowledged unrun,
    # its shard left as it was counted. A temporary file that a killed worker left is ignored.
    first = out / job / Path(shard_name(job, messages[0]["chunk"])).name
    stray = out / job / f".{first.name}.0123abcd.tmp"
    stray.write_bytes(b"half a shard")
    written = first.stat().st_mtime_ns
    raw_app.send_task(CHUNK_TASK, args=[messages[0]], queue=BULK_QUEUE)
    wait_for(lambda: sum(kiln.store.executions(job).values()) == 4, 60, "the resent chunk", lite0_worker.check)
    wait_for(lambda: "its shard is written already" in lite0_worker.log_path.read_text(), 60, "the skip logged")
    assert first.stat().st_mtime_ns == written
    # A worker that died after writing the shard but before counting the chunk (the Redis state it
    # leaves, made here): the next delivery writes the shard again, whole, and counts it once.
    kiln.store.redis.hdel(f"kiln:{{{job}}}:chunks", messages[0]["chunk"])
    kiln.store.redis.hincrby(f"kiln:{{{job}}}:meta", "done", -4)
    raw_app.send_task(CHUNK_TASK, args=[messages[0]], queue=BULK_QUEUE)
    wait_for(lambda: kiln.store.counts(job).done == 10, 60, "the chunk counted again", lite0_worker.check)
    assert first.stat().st_mtime_ns != written
    assert_one_row_per_image(out / job, items)
    counts = kiln.store.counts(job)
    assert (counts.total, counts.done, counts.failed) == (10, 10, 0)
    temporary = [p.name for p in (out / job).iterdir() if p.name.startswith(".")]
    assert temporary == [stray.name]  # the worker left no temporary file of its own


def test_failures_and_poison_go_into_the_shard(kiln, raw_app, lite0_worker, work_dir, tmp_path):
    job, out = "sharded-fail-" + uuid.uuid4().hex[:8], tmp_path / "out"
    good = photo_items(work_dir / job, 2)
    (work_dir / job / "broken.jpg").write_bytes((SAMPLES / "coffee.jpg").read_bytes()[:3000])
    items = [*good, Item(key="broken", ref=str(work_dir / job / "broken.jpg")), Item(key="gone", ref="/nope.jpg")]
    send_sharded(raw_app, kiln.store, job, str(out), items, chunk_size=10)
    wait_for(lambda: kiln.store.counts(job).complete, 120, "the job", lite0_worker.check)
    counts = kiln.store.counts(job)
    assert (counts.total, counts.done, counts.failed) == (4, 2, 2)
    frame = assert_one_row_per_image(out / job, items)
    assert frame.loc["broken", "error_kind"] == "unreadable" and frame.loc["gone", "error_kind"] == "forbidden"
    assert frame.loc["gone", "status"] == "error" and pd.isna(frame.loc["gone", "label_1"])

    # A chunk that killed its workers each time: its images are poison rows in its shard.
    poison_job = "sharded-poison-" + uuid.uuid4().hex[:8]
    kiln.store.begin_sharded(poison_job, str(out), TOPK)
    chunk = chunk_id(0, good)
    kiln.store.add_chunk(poison_job, chunk, len(good))
    kiln.store.finish_listing(poison_job)
    task_id = "poison-" + uuid.uuid4().hex
    kiln.store.redis.hset(f"kiln:{{{poison_job}}}:delivery", task_id, "gone-host:1|2")
    message = ChunkMessage(job=poison_job, items=good, topk=TOPK, chunk=chunk, out_dir=str(out))
    raw_app.send_task(CHUNK_TASK, args=[message.model_dump(mode="json")], queue=BULK_QUEUE, task_id=task_id)
    wait_for(lambda: kiln.store.counts(poison_job).complete, 60, "the poison chunk", lite0_worker.check)
    assert kiln.store.counts(poison_job).failed == 2
    frame = assert_one_row_per_image(out / poison_job, good)
    assert set(frame["error_kind"]) == {"poison"} and "3 workers died" in frame["error"].iloc[0]


class Workers:
    """Real `python -m worker` processes on a Redis database of the test's own, stopped at the end."""

    def __init__(self, package: Path, url: str, roots: list[Path], logs: Path) -> None:
        self.package, self.url, self.roots, self.logs = package, url, roots, logs
        self.started: list[LocalWorker] = []

    def start(self, name: str, pythonpath: str = "", **env: str) -> LocalWorker:
        defaults = {"KILN_BATCH_SIZE": "4", "KILN_THREADS": "1", "KILN_FETCH_ALLOWED_NETWORKS": "127.0.0.1/32"}
        environment = python_env(**{**defaults, **env})
        if pythonpath:
            environment["PYTHONPATH"] = os.pathsep.join([pythonpath, environment["PYTHONPATH"]])
        options = ["--queues", BULK_QUEUE, "--loglevel", "INFO"]
        worker = LocalWorker(self.package, self.url, self.logs / f"{name}.log", self.roots, options, env=environment)
        self.started.append(worker)
        return worker

    def stop_all(self) -> None:
        for worker in self.started:
            worker.stop()


@pytest.fixture
def workers(private_redis_url, lite0_package, tmp_path) -> Iterator[Workers]:
    logs = tmp_path / "logs"
    logs.mkdir()
    started = Workers(lite0_package, private_redis_url, [tmp_path], logs)
    yield started
    started.stop_all()


@pytest.fixture
def private_app(private_redis_url):
    app = make_app(CommonSettings(redis_url=private_redis_url))
    yield app
    app.close()


def log_of(worker: LocalWorker) -> str:
    return worker.log_path.read_text(errors="replace")


def test_a_worker_killed_mid_chunk_leaves_one_row_per_image(workers, private_app, tmp_path):
    """kill -9 a worker in the middle of a chunk: no shard was written; after the lease, another
    worker runs the chunk again and its shard holds every image once, counted once."""
    store = ResultStore.from_url(workers.url)
    photos, out, job = tmp_path / "photos", tmp_path / "out", "killed"
    photo_items(photos, 24)
    first = workers.start("first", KILN_LEASE_S="5")
    with serve_folder(photos, delay_s=0.5) as base:  # slow fetches: the chunk runs for seconds
        items = [Item(key=f"{i:03d}", ref=f"{base}/{i:03d}.jpg") for i in range(24)]
        (message,) = send_sharded(private_app, store, job, str(out), items, chunk_size=24)
        wait_for(lambda: store.executions(job), 180, "the chunk to start", first.check)
        time.sleep(2)
        os.killpg(first.process.pid, signal.SIGKILL)
        first.process.wait(30)
        shard = out / shard_name(job, message["chunk"])
        assert not shard.exists() and store.counts(job).finished == 0, "the chunk finished before the kill"
        second = workers.start("second", KILN_LEASE_S="5")
        wait_for(lambda: store.counts(job).complete, 240, "the redelivered chunk", second.check)
    counts = store.counts(job)
    assert (counts.total, counts.done, counts.failed) == (24, 24, 0)
    assert list(store.executions(job).values()) == [2]
    frame = assert_one_row_per_image(out / job, items)
    assert set(frame["worker"].str.split(":").str[1]) == {str(second.process.pid)}


def test_an_unwritable_out_dir_loses_nothing_and_says_why(workers, private_app, tmp_path):
    """The shard cannot be written (out_dir lies under a file): the worker retries, gives the chunk
    back to the queue and logs why; nothing is counted done. Once out_dir is mended, the chunk
    completes with every image once."""
    store = ResultStore.from_url(workers.url)
    items = photo_items(tmp_path / "photos", 6)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    out, job = blocker / "out", "unwritable"
    worker = workers.start("worker", KILN_SINK_RETRY_S="2")
    send_sharded(private_app, store, job, str(out), items, chunk_size=6)
    wait_for(lambda: log_of(worker).count("giving chunk") >= 2, 240, "the chunk given back twice", worker.check)
    log = log_of(worker)
    assert "the output store failed to write shard" in log and "NotADirectoryError" in log, log[-3000:]
    assert f"{out}/{job}/part-" in log
    counts = store.counts(job)
    assert (counts.finished, store.completed_chunks(job)) == (0, set())
    assert "NotADirectoryError" in store.counts(job).sink_error  # what a producer can show its user
    blocker.unlink()  # mended: the next delivery writes the shard
    wait_for(lambda: store.counts(job).complete, 120, "the job after the fix", worker.check)
    counts = store.counts(job)
    assert (counts.total, counts.done, counts.failed) == (6, 6, 0) and store.counts(job).sink_error is None
    assert_one_row_per_image(out / job, items)


def test_a_shard_write_error_shows_at_once_and_a_warm_shutdown_gives_the_chunk_back(workers, private_app, tmp_path):
    """With the default KILN_SINK_RETRY_S (600 s): `kiln status` says why the shards are not
    written from the first failed attempt, and SIGTERM (a warm shutdown) gives the chunk back
    unwritten instead of waiting the retries out; a worker then writes it once the folder is
    mended. A new user saw "running, 0 done" for ten minutes, and a worker that two SIGTERMs did
    not stop."""
    store = ResultStore.from_url(workers.url)
    items = photo_items(tmp_path / "photos", 4)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    out, job = blocker / "out", "unwritable-long"
    worker = workers.start("worker")
    send_sharded(private_app, store, job, str(out), items, chunk_size=4)
    wait_for(lambda: store.counts(job).sink_error is not None, 240, "the write error noted", worker.check)
    status = subprocess.run([PYTHON, "-m", "producer", "status", job], capture_output=True, text=True,
                            env=python_env(KILN_REDIS_URL=workers.url), timeout=120)  # fmt: skip
    assert f"{job}: the workers cannot write its shards (they retry): " in status.stdout, status.stdout
    assert "NotADirectoryError" in status.stdout
    os.killpg(worker.process.pid, signal.SIGTERM)
    worker.process.wait(120)  # far less than the 600 s of retries it waited out before
    assert "giving chunk" in log_of(worker) and store.counts(job).finished == 0
    blocker.unlink()
    again = workers.start("again")
    wait_for(lambda: store.counts(job).complete, 240, "the chunk given back", again.check)
    assert store.counts(job).sink_error is None
    assert_one_row_per_image(out / job, items)


def test_a_worker_without_pyarrow_says_what_to_install_and_loses_nothing(workers, private_app, tmp_path):
    """A worker where pyarrow cannot be imported gives sharded chunks back, saying what to install;
    a worker that has it then writes them."""
    blocked = tmp_path / "no-pyarrow" / "pyarrow"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('No module named pyarrow (hidden by the test)')\n")
    store = ResultStore.from_url(workers.url)
    items = photo_items(tmp_path / "photos", 4)
    out, job = tmp_path / "out", "no-pyarrow"
    without = workers.start("without", pythonpath=str(blocked.parent), KILN_SINK_RETRY_S="2")
    send_sharded(private_app, store, job, str(out), items, chunk_size=4)
    wait_for(lambda: "giving chunk" in log_of(without), 240, "the chunk given back", without.check)
    assert "pip install 'kiln[parquet]'" in log_of(without), log_of(without)[-3000:]
    assert "pip install 'kiln[parquet]'" in store.counts(job).sink_error
    assert store.counts(job).finished == 0 and not out.exists()
    without.stop()
    with_pyarrow = workers.start("with")
    wait_for(lambda: store.counts(job).complete, 240, "the job on a worker with pyarrow", with_pyarrow.check)
    assert store.counts(job).done == 4
    assert_one_row_per_image(out / job, items)


def test_an_export_and_a_shard_have_one_schema(tmp_path):
    """Both output modes write the same columns and types, also where every image failed (no label
    at all to infer a type from)."""
    from producer.export import write_results
    from worker.contract import Record
    from worker.sink import write_shard

    records = [Record.failure("j", key, "not_found", "no such file") for key in ("b", "a")]
    write_results(records, tmp_path / "export.parquet", topk=TOPK)
    write_shard(str(tmp_path / "out"), "j", "000000000-00000000", records, TOPK)
    shard = pq.read_table(tmp_path / "out" / shard_name("j", "000000000-00000000"))
    assert shard.schema == pq.read_schema(tmp_path / "export.parquet")
    assert str(shard.schema.field("label_1").type) == "string" and shard.column("key").to_pylist() == ["a", "b"]


def test_metrics_of_a_sharded_job(private_redis_url, private_app, lite0_package, tmp_path):
    """Images, stages and batches are counted as in the Redis mode; one write per shard."""
    from test_health import monitored_worker, wait_status
    from test_metrics import scrape

    store = ResultStore.from_url(private_redis_url)
    items = photo_items(tmp_path / "photos", 6)
    options = ["--allowed-roots", str(tmp_path / "photos"), "--threads", "1", "--queues", BULK_QUEUE]
    with monitored_worker(lite0_package, private_redis_url, tmp_path, *options) as port:
        wait_status(port, "/readyz", 200, 180)
        send_sharded(private_app, store, "metered", str(tmp_path / "out"), items, chunk_size=3)
        wait_for(lambda: store.counts("metered").complete, 240, "the job")
        samples = scrape(port)

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("kiln_images_total", status="ok", kind="") == 6
    assert value("kiln_stage_seconds_count", stage="decode") == 6
    assert value("kiln_stage_seconds_count", stage="write") == 2  # one per shard
    batches = value("kiln_batches_total")
    assert batches >= 2 and value("kiln_stage_seconds_count", stage="infer") == batches


def test_a_chunk_writes_only_where_its_job_was_begun(kiln, raw_app, lite0_worker, tmp_path):
    """Messages that disagree with their job's output are dead-lettered with the reason, unrun:
    another out_dir, another top-k, no out_dir for a sharded job, an out_dir for a Redis-store job."""
    from worker.store import DEAD_LETTERS

    job, redis_job = "sharded-" + uuid.uuid4().hex[:8], "in-redis-" + uuid.uuid4().hex[:8]
    items = [Item(key="coffee", ref=str(SAMPLES / "coffee.jpg"))]
    chunk = chunk_id(0, items)
    kiln.store.begin_sharded(job, str(tmp_path / "out"), TOPK)
    kiln.submit(items, job=redis_job)
    sent = {
        f"(its out_dir: {tmp_path / 'out'})": dict(
            job=job, out_dir=str(tmp_path / "elsewhere"), chunk=chunk, topk=TOPK
        ),
        "writes top-3 shards": dict(job=job, out_dir=str(tmp_path / "out"), chunk=chunk, topk=5),
        "this chunk names none": dict(job=job, topk=TOPK),
        "(its out_dir: none)": dict(job=redis_job, out_dir=str(tmp_path / "out"), chunk=chunk, topk=TOPK),
    }
    for fields in sent.values():
        message = ChunkMessage(items=items, **fields).model_dump(mode="json")
        raw_app.send_task(CHUNK_TASK, args=[message], queue=BULK_QUEUE)

    def reasons() -> list[str]:
        entries = [json.loads(raw) for raw in kiln.store.redis.lrange(DEAD_LETTERS, 0, -1)]
        ours = [e for e in entries if isinstance(e["message"], dict) and e["message"].get("job") in (job, redis_job)]
        return [e["reason"] for e in ours]  # the list holds other tests' dead letters too

    wait_for(lambda: len(reasons()) == 4, 60, "four dead letters", lite0_worker.check)
    assert sorted(next(mark for mark in sent if mark in reason) for reason in reasons()) == sorted(sent)
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "out").exists()
    assert kiln.store.counts(job).finished == 0 and not kiln.store.completed_chunks(redis_job)


def test_a_shard_in_an_object_store_is_one_put(tmp_path):
    """A non-local out_dir gets the whole file in one `pipe_file` (fsspec's in-memory file system
    here; the s3 tests run the same path against an S3 server)."""
    import fsspec

    from worker.contract import Record
    from worker.sink import write_shard

    records = [Record.failure("j", "k", "not_found", "no such file")]
    assert write_shard("memory://bucket/out", "j", "000000000-00000000", records, TOPK) == 1
    fs = fsspec.filesystem("memory")
    assert fs.ls("/bucket/out/j", detail=False) == ["/bucket/out/j/part-000000000-00000000.parquet"]
    with fs.open("/bucket/out/j/part-000000000-00000000.parquet", "rb") as f:
        assert pq.read_table(f).column("error_kind").to_pylist() == ["not_found"]
