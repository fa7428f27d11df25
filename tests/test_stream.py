"""Streaming submit: bounded producer memory on a large listing, backpressure on the bulk queue,
one progress bar whose total is unknown until the listing ends, bounded-memory export, and (with
the sink's side merged: the `scale` branch) sharded jobs that resume by chunk."""

from __future__ import annotations

import base64
import csv
import json
import os
import shutil
import threading
import time
import tracemalloc
from collections import Counter

import pyarrow as pa
import pyarrow.dataset
import pyarrow.parquet as pq
import pytest
import redis
from conftest import SAMPLES, python_env
from test_producer_cli import producer
from test_producer_faults import Background, queued_images

from producer import Item, JobProgress, Kiln, SourceError, iter_items
from producer import client as client_module
from producer.embedded import LocalWorker
from producer.settings import ProducerSettings
from producer.sources import inputs_job_id
from worker.contract import BULK_QUEUE, Record, chunk_id, shard_name
from worker.records import arrow_schema, flat_row
from worker.store import ResultStore

SHARDED = pytest.mark.skipif(
    not hasattr(ResultStore, "begin_sharded"), reason="needs the sink's store (the scale branch) merged"
)


def item_list_bytes(folder: str, n: int) -> int:
    """What a list of `n` Items of files in `folder` takes (measured on 10,000, scaled)."""
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    sample = [Item(key=f"{folder}/{i:07d}.jpg", ref=f"{folder}/{i:07d}.jpg") for i in range(10_000)]
    size = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    del sample
    return size * n // 10_000


def test_a_large_listing_is_enqueued_in_bounded_memory(private_redis_url, tmp_path):
    """200,000 files (hard links of four photos) in one folder, enqueued with no worker running:
    the producer's peak memory (tracemalloc) is a small part of what a list of the items takes,
    although Redis now holds every chunk."""
    n = 200_000
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(n):
        if i % 50_000 == 0:  # a file system allows some 65,000 links to one file
            shutil.copy(SAMPLES / "coffee.jpg", first := folder / f"{i:07d}.jpg")
        else:
            os.link(first, folder / f"{i:07d}.jpg")
    as_list = item_list_bytes(str(folder), n)
    settings = ProducerSettings(redis_url=private_redis_url, chunk_size=1000, max_pending_chunks=1000)
    with Kiln(settings=settings) as kiln:
        kiln.store.redis.flushdb()
        tracemalloc.start()
        submitted = kiln.submit([folder], job="many")
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert (submitted.total, submitted.enqueued, submitted.keys) == (n, n, None)  # too many keys to keep
        assert kiln.store.redis.llen(BULK_QUEUE) == n // 1000
        assert kiln.counts("many").total == n
        kiln.store.redis.flushdb()
    print(f"peak {peak / 1e6:.1f} MB for {n} files; a list of the items: {as_list / 1e6:.1f} MB")
    assert peak < as_list / 4, (peak, as_list)


def test_backpressure_holds_the_queue_at_the_bound(private_redis_url, lite0_package, work_dir, tmp_path):
    """No worker: submit pauses with the bulk queue at KILN_MAX_PENDING_CHUNKS and never above it.
    A worker starts: the queue drains, the submission ends and every image gets its record."""
    url = private_redis_url
    folder = work_dir / "pressure"
    folder.mkdir()
    for i in range(24):
        shutil.copy(SAMPLES / "coffee.jpg", folder / f"{i:02d}.jpg")
    client = redis.Redis.from_url(url)
    client.flushdb()
    settings = ProducerSettings(redis_url=url, chunk_size=2, max_pending_chunks=3, poll_interval_s=0.05)
    depths: list[int] = []
    with Kiln(settings=settings) as kiln:
        submitting = Background(lambda: kiln.submit([folder], job="pressure"))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not depths or depths[-1] < 3):
            depths.append(client.llen(BULK_QUEUE))
            time.sleep(0.02)
        for _ in range(40):  # 2 s more: still paused, still at the bound
            depths.append(client.llen(BULK_QUEUE))
            time.sleep(0.05)
        assert submitting.is_alive(), "submit should pause while the queue is full"
        assert max(depths) == 3 and depths[-1] == 3, depths
        assert queued_images(client, "pressure") == 6  # 3 chunks of 2: Redis holds what workers reach soon
        worker = LocalWorker(lite0_package, url, tmp_path / "worker.log", [work_dir], env=python_env())
        try:
            watching = threading.Event()

            def watch() -> None:
                while not watching.is_set():
                    depths.append(client.llen(BULK_QUEUE))
                    time.sleep(0.02)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            submitted = submitting.outcome(300)
            counts = kiln.wait(submitted, timeout_s=300, progress=False, check=worker.check)
            watching.set()
            watcher.join()
        finally:
            worker.stop()
    assert max(depths) <= 3, depths
    assert (submitted.total, submitted.enqueued) == (24, 24)
    assert (counts.total, counts.done, counts.failed) == (24, 24, 0)
    client.close()


class Recording(JobProgress):
    """A real progress bar that also keeps what it was asked to show."""

    def __init__(self) -> None:
        super().__init__(enabled=True)
        self.shown: list[tuple[int, int | None, int | None]] = []

    def show(self, job: str, finished: int, total: int | None = None, listed: int | None = None) -> None:
        self.shown.append((finished, total, listed))
        super().show(job, finished, total, listed)


def test_progress_total_is_unknown_until_the_listing_ends(kiln, work_dir, capsys):
    folder = work_dir / "progress"
    folder.mkdir()
    for i in range(12):
        shutil.copy(SAMPLES / ("coffee.jpg" if i % 2 else "chelsea.jpg"), folder / f"{i:02d}.jpg")
    kiln.settings = kiln.settings.model_copy(update={"chunk_size": 2, "max_pending_chunks": 1, "poll_interval_s": 0.05})
    bar = Recording()
    submitted = kiln.submit([folder], job="progress", progress=bar)
    while_listing = list(bar.shown)
    counts = kiln.wait(submitted, timeout_s=300, progress=bar)
    bar.close()
    assert while_listing and all(total is None for _, total, _ in while_listing)  # unknown while listing
    assert [listed for _, _, listed in while_listing][-1] == 12
    assert bar.shown[-1] == (12, 12, None)  # known once the listing ended, and reached
    assert counts.done == 12
    err = capsys.readouterr().err
    assert "12/12" in err  # drawn with its total at the end (what is drawn between depends on tqdm's timing)


def test_resume_in_the_result_store_looks_up_each_chunk(kiln, work_dir):
    """A second run sends only the images without a record, chunk by chunk (one HMGET each)."""
    folder = work_dir / "resume-chunks"
    folder.mkdir()
    for i in range(5):
        shutil.copy(SAMPLES / "coffee.jpg", folder / f"{i}.jpg")
    kiln.settings = kiln.settings.model_copy(update={"chunk_size": 2})
    first = kiln.submit([folder], job="resume-chunks")
    kiln.wait(first, timeout_s=300, progress=False)
    for i in range(5, 8):
        shutil.copy(SAMPLES / "chelsea.jpg", folder / f"{i}.jpg")
    second = kiln.submit([folder], job="resume-chunks")
    assert (first.enqueued, second.total, second.enqueued) == (5, 8, 3)
    assert second.id == first.id == "resume-chunks"
    counts = kiln.wait(second, timeout_s=300, progress=False)
    assert (counts.total, counts.done) == (8, 8)


def test_a_key_for_two_images_is_refused_chunk_by_chunk(kiln, tmp_path):
    """Within a chunk, by the producer; across chunks, by the store's registration: the chunks
    before it stay enqueued and the error says so."""
    clash = tmp_path / "clash.csv"
    clash.write_text(f"key,path\nk,{SAMPLES / 'coffee.jpg'}\nk,{SAMPLES / 'chelsea.jpg'}\n")
    with pytest.raises(SourceError, match="key 'k' names two images"):
        kiln.submit([clash], job="clash-1")
    same = tmp_path / "same.csv"
    same.write_text(f"key,path\nk,{SAMPLES / 'coffee.jpg'}\nk,{SAMPLES / 'coffee.jpg'}\n")
    assert kiln.submit([same], job="same").total == 1  # one image named twice: once
    far = tmp_path / "far.csv"
    rows = [f"k{i},{SAMPLES / 'coffee.jpg'}" for i in range(4)] + [f"k0,{SAMPLES / 'chelsea.jpg'}"]
    far.write_text("key,path\n" + "\n".join(rows) + "\n")
    kiln.settings = kiln.settings.model_copy(update={"chunk_size": 2})
    from producer import JobConflict

    with pytest.raises(JobConflict, match="already holds image key 'k0'"):
        kiln.submit([far], job="clash-2")
    assert kiln.counts("clash-2").total == 4  # the chunks before it


def test_export_streams_in_bounded_memory(kiln, tmp_path, monkeypatch):
    """Past KEYS_KEPT records, export streams the result store page by page, unsorted; its peak
    memory is a small part of the records'."""
    monkeypatch.setattr(client_module, "KEYS_KEPT", 1000)
    n = 20_000
    records = [
        Record(job="big-export", key=f"{i:06d}", ref=f"/d/{i:06d}.jpg", status="ok", model="m",
               topk=[{"label": "espresso", "index": 967, "score": 0.9}])
        for i in range(n)
    ]  # fmt: skip
    kiln.store.register("big-export", [Item(key=r.key, ref=r.ref) for r in records])
    for start in range(0, n, 2000):
        kiln.store.write(records[start : start + 2000])
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    as_list = list(kiln.store.records("big-export"))
    in_memory = tracemalloc.get_traced_memory()[0] - base
    del as_list
    written, peaks = {}, {}
    for fmt in ("jsonl", "csv", "parquet"):
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        written[fmt] = kiln.export("big-export", tmp_path / f"out.{fmt}")
        peaks[fmt] = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    peak = max(peaks.values())
    assert written == {"jsonl": n, "csv": n, "parquet": n}
    keys = [json.loads(line)["key"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(keys) == [r.key for r in records]
    assert sorted(pq.read_table(tmp_path / "out.parquet").column("key").to_pylist()) == sorted(keys)
    print(f"export peaks { ({f: round(p / 1e6, 1) for f, p in peaks.items()}) } MB; a list: {in_memory / 1e6:.1f} MB")
    assert peak < in_memory / 2, (peak, in_memory)


def write_shard(folder, job: str, index: int, records: list[Record], topk: int = 5) -> None:
    path = folder / shard_name(job, chunk_id(index, [Item(key=r.key, ref=r.ref) for r in records]))
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = sorted((flat_row(r, topk) for r in records), key=lambda row: row["key"])
    pq.write_table(pa.Table.from_pylist(rows, schema=arrow_schema(topk)), path)


def test_export_of_shards_reads_them_in_chunk_order(tmp_path):
    """`export --out-dir` reads the shards with pyarrow.dataset (no Redis keys needed), in chunk
    order, each shard's rows sorted by key, into each format."""
    out_dir = tmp_path / "shards"
    tabby = [{"label": "tabby", "index": 281, "score": 0.5}]
    chunks = [
        [Record(job="s", key=f"{c}-{k}", ref=f"/x/{c}-{k}.jpg", status="ok", topk=tabby) for k in "ba"]
        for c in range(12)
    ]
    for index, records in enumerate(chunks):
        write_shard(out_dir, "s", index, records)
    (out_dir / "s" / "notes.txt").write_text("not a shard")
    env = {"KILN_REDIS_URL": "redis://127.0.0.1:1/0"}  # never reached: the shards are read directly
    for fmt in ("parquet", "csv", "jsonl"):
        out = tmp_path / f"s.{fmt}"
        done = producer("export", "s", "--out-dir", str(out_dir), "--out", str(out), **env)
        assert done.returncode == 0, done.stderr
        assert "wrote 24 records" in done.stderr
    keys = pq.read_table(tmp_path / "s.parquet").column("key").to_pylist()
    assert keys == [f"{c}-{k}" for c in range(12) for k in "ab"]
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rows] == keys and rows[0]["label_1"] == "tabby"
    missing = producer("export", "t", "--out-dir", str(out_dir), "--out", str(tmp_path / "t.csv"), **env)
    assert missing.returncode == 2 and "no Parquet shards" in missing.stderr


def test_cli_help_explains_out_dir_and_submit():
    for command in ("label", "submit", "export"):
        done = producer(command, "--help")
        assert done.returncode == 0 and "--out-dir URL" in done.stdout, done.stdout
    assert "KILN_MAX_PENDING_CHUNKS" in producer("--help").stdout
    assert "submit" in producer("--help").stdout


def test_iter_items_is_lazy_and_the_default_job_id_comes_from_the_inputs(tmp_path, monkeypatch):
    """The first items come before a later input is read (a bad manifest line fails only once
    reached); a missing input fails before anything is listed."""
    (tmp_path / "a").mkdir()
    for name in ("2.jpg", "1.jpg", "x.txt"):
        (tmp_path / "a" / name).write_bytes(b"x")
    (tmp_path / "m.jsonl").write_text('"a/1.jpg"\n[1]\n')
    skipped: Counter[str] = Counter()
    items = iter_items([tmp_path / "a", tmp_path / "m.jsonl"], skipped)
    assert [next(items).key, next(items).key] == [str(tmp_path / "a/1.jpg"), str(tmp_path / "a/2.jpg")]
    assert next(items).key == str(tmp_path / "a/1.jpg")  # the manifest's first line
    assert skipped == {".txt": 1}  # counted as the listing passed it
    with pytest.raises(SourceError, match=r"m.jsonl:2: expected an object"):
        next(items)
    with pytest.raises(SourceError, match="no such file"):
        iter_items([tmp_path / "a", tmp_path / "missing"]).__next__()
    monkeypatch.chdir(tmp_path)
    assert inputs_job_id(["a"]) == inputs_job_id([str(tmp_path / "a")]) != inputs_job_id(["a", "m.jsonl"])


def test_globs_come_sorted_folder_by_folder(tmp_path):
    for name in ("b/2.jpg", "b/1.jpg", "a/z.png", "a/.hidden.jpg", "c.jpg", ".h/4.jpg", "a/d/3.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")

    def keys(pattern: str) -> list[str]:
        return [i.key.removeprefix(f"{tmp_path}/") for i in iter_items([str(tmp_path / pattern)])]

    assert keys("**/*.jpg") == ["a/d/3.jpg", "b/1.jpg", "b/2.jpg", "c.jpg"]
    assert keys("*/*") == ["a/z.png", "b/1.jpg", "b/2.jpg"]
    assert keys("a/**") == ["a/d/3.jpg", "a/z.png"]
    assert keys("**/.*.jpg") == ["a/.hidden.jpg"]


def test_an_unreadable_folder_is_an_error_not_a_gap(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads every folder")
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked").chmod(0)
    try:
        with pytest.raises(SourceError, match="cannot list the folder"):
            list(iter_items([tmp_path]))
    finally:
        (tmp_path / "locked").chmod(0o755)


@SHARDED
def test_sharded_label_resume_and_export(private_redis_url, lite0_package, work_dir, tmp_path):
    """Needs the `scale` branch (worker side of sharded mode). A sharded job: shards under
    out_dir/JOB/, Redis holds no per-image keys; a second run skips every completed chunk."""
    folder = work_dir / "sharded"
    folder.mkdir()
    for i in range(7):
        shutil.copy(SAMPLES / ("coffee.jpg" if i % 2 else "chelsea.jpg"), folder / f"{i}.jpg")
    out_dir = tmp_path / "out"
    client = redis.Redis.from_url(private_redis_url)
    client.flushdb()
    settings = ProducerSettings(redis_url=private_redis_url, chunk_size=2)
    worker = LocalWorker(lite0_package, private_redis_url, tmp_path / "worker.log", [work_dir], env=python_env())
    try:
        with Kiln(settings=settings) as kiln:
            first = kiln.submit([folder], job="sharded", out_dir=str(out_dir))
            assert (first.total, first.enqueued, first.keys) == (7, 7, None)
            counts = kiln.wait(first, timeout_s=300, progress=False, check=worker.check)
            assert (counts.total, counts.done) == (7, 7)
            assert len(kiln.store.completed_chunks("sharded")) == 4
            assert not any(b":records" in k or b":items" in k for k in client.keys("kiln:{sharded}:*"))
            again = kiln.submit([folder], job="sharded", out_dir=str(out_dir))
            assert again.enqueued == 0 and client.llen(BULK_QUEUE) == 0
            written = kiln.export("sharded", tmp_path / "sharded.parquet")
    finally:
        worker.stop()
    assert written == 7 and len(list((out_dir / "sharded").glob("part-*.parquet"))) == 4
    table = pq.read_table(tmp_path / "sharded.parquet").to_pylist()
    assert {r["label_1"] for r in table if r["key"].endswith("1.jpg")} == {"espresso"}


@SHARDED
def test_sharded_resume_skips_completed_chunks_without_workers(private_redis_url, tmp_path):
    """Needs the `scale` branch. Chunks marked complete in the store are not sent again; the
    others are, with their deterministic ids and out_dir in the message."""
    client = redis.Redis.from_url(private_redis_url)
    client.flushdb()
    items = [Item(key=f"k{i}", ref=str(SAMPLES / "coffee.jpg")) for i in range(10)]
    settings = ProducerSettings(redis_url=private_redis_url, chunk_size=3)
    with Kiln(settings=settings) as kiln:
        first = kiln.submit(items, job="resume-sharded", out_dir=str(tmp_path))
        assert first.enqueued == 10 and client.llen(BULK_QUEUE) == 4
        ids = [chunk_id(i, items[i * 3 : i * 3 + 3]) for i in range(4)]
        client.delete(BULK_QUEUE)
        for chunk in ids[:3]:
            kiln.store.complete_chunk("resume-sharded", chunk, 3, 0)
        again = kiln.submit(items, job="resume-sharded", out_dir=str(tmp_path))
        assert (again.total, again.enqueued) == (10, 1)
        (raw,) = client.lrange(BULK_QUEUE, 0, -1)
        body = json.loads(base64.b64decode(json.loads(raw)["body"]))[0][0]
        assert (body["chunk"], body["out_dir"], [i["key"] for i in body["items"]]) == (ids[3], str(tmp_path), ["k9"])
        assert kiln.counts("resume-sharded").total == 10


def test_chunk_ids_are_deterministic():
    a = [Item(key="a", ref="/a.jpg"), Item(key="b", ref="/b.jpg")]
    assert chunk_id(3, a) == chunk_id(3, list(a)) and chunk_id(3, a).startswith("000000003-")
    assert chunk_id(3, a) != chunk_id(4, a) and chunk_id(3, a) != chunk_id(3, a[:1])
    assert chunk_id(3, a) != chunk_id(3, [Item(key="a", ref="/other.jpg"), a[1]])
    assert shard_name("j", chunk_id(0, a)).startswith("j/part-000000000-")


@SHARDED
def test_label_with_out_dir_writes_shards_and_resumes(lite0_worker, work_dir, tmp_path):
    """Needs the `scale` branch. `label --out-dir` as a user runs it: shards under URL/JOB/, the
    results file read from them, and a second run that finds every chunk done."""
    folder = work_dir / "cli-sharded"
    folder.mkdir()
    for name in ("coffee", "chelsea", "rocket"):
        shutil.copy(SAMPLES / f"{name}.jpg", folder)
    env = {"KILN_REDIS_URL": lite0_worker.redis_url, "KILN_CHUNK_SIZE": "2"}
    out_dir, out = tmp_path / "labels", tmp_path / "labels.csv"
    args = ["label", str(folder), "--job", "cli-sharded", "--out-dir", str(out_dir), "--out", str(out), "--no-progress"]
    first = producer(*args, **env)
    assert first.returncode == 0, first.stderr
    assert f"shards in {out_dir}/cli-sharded/" in first.stderr and "3 labelled, 0 failed" in first.stderr
    assert len(list((out_dir / "cli-sharded").glob("part-*.parquet"))) == 2
    rows = {row["key"].rsplit("/", 1)[1]: row["label_1"] for row in csv.DictReader(out.open())}
    assert rows["coffee.jpg"] == "espresso" and len(rows) == 3
    second = producer(*args, **env)
    assert second.returncode == 0 and "3 images (3 already done)" in second.stderr, second.stderr
