"""`python -m producer` as a user runs it: the embedded mode (its own Redis and worker), resume,
the remote mode against running workers, and the result files."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator

import pyarrow.parquet as pq
import pytest
import redis
from conftest import CATS, PYTHON, SAMPLES, python_env
from packages import build_cached

from producer import Item, Kiln
from producer.settings import ProducerSettings
from worker.store import LISTER_TTL_S, JobConflict


def producer(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = python_env(**env)
    if "KILN_REDIS_URL" not in env:
        environment.pop("KILN_REDIS_URL", None)
    return subprocess.run(
        [PYTHON, "-m", "producer", *args], capture_output=True, text=True, env=environment, timeout=300
    )


def test_embedded_mode_labels_and_resumes(tmp_path, lite0_package):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("chelsea", "coffee"):
        shutil.copy(SAMPLES / f"{name}.jpg", images)
    env = {"KILN_DATA_DIR": str(tmp_path / "data"), "KILN_MODEL": str(lite0_package)}

    first = producer("label", str(images), "--job", "album", "--out", str(tmp_path / "first.csv"), **env)
    assert first.returncode == 0, first.stderr
    assert "embedded mode" in first.stderr and "2 labelled, 0 failed" in first.stderr
    assert "espresso" in first.stdout  # the top-5 table
    rows = {
        row["key"].rsplit("/", 1)[-1]: row for row in csv.DictReader((tmp_path / "first.csv").read_text().splitlines())
    }
    assert rows["chelsea.jpg"]["label_1"] in CATS and rows["coffee.jpg"]["label_1"] == "espresso"
    assert float(rows["coffee.jpg"]["score_1"]) > 0.8

    for name in ("rocket", "astronaut"):
        shutil.copy(SAMPLES / f"{name}.jpg", images)
    second = producer("label", str(images), "--job", "album", "--out", str(tmp_path / "all.jsonl"), **env)
    assert second.returncode == 0, second.stderr
    assert "4 images (2 already done)" in second.stderr
    records = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert len(records) == 4 and {r["status"] for r in records} == {"ok"}
    assert "4 labelled, 0 failed by efficientnet_lite0@" in second.stderr

    # The same inputs with another model: the job holds Lite0's records, which came back with
    # exit 0 as the other model's (a hostile tester's finding). Refused, before anything is sent.
    tiny = build_cached("tiny", ["factories:tiny", "--max-batch", "8", "--tune-batch", "4"])
    other = producer("label", str(images), "--job", "album", "--out", str(tmp_path / "o.csv"), "--model", str(tiny),
                     **{**env, "KILN_MODEL": ""})  # fmt: skip
    assert other.returncode == 2, other.stderr
    assert "job album holds the records of efficientnet_lite0@" in other.stderr and "serves tiny@" in other.stderr


def test_remote_mode_status_and_export(lite0_worker, tmp_path):
    env = {"KILN_REDIS_URL": lite0_worker.redis_url}
    out = tmp_path / "remote.parquet"
    labelled = producer("label", str(SAMPLES / "coffee.jpg"), str(SAMPLES / "chelsea.jpg"), "--job", "remote",
                        "--topk", "3", "--out", str(out), "--no-progress", **env)  # fmt: skip
    assert labelled.returncode == 0, labelled.stderr
    assert "embedded" not in labelled.stderr
    table = pq.read_table(out).to_pylist()
    assert len(table) == 2 and {"label_3", "score_3"} <= set(table[0]) and "label_4" not in table[0]

    status = producer("status", "remote", **env)
    assert status.returncode == 0 and "remote: complete, 2 done, 0 failed, 2 in all" in status.stdout
    waited = producer("wait", "remote", "--no-progress", **env)
    assert waited.returncode == 0 and "remote: complete, 2 done, 0 failed, 2 in all" in waited.stdout
    exported = producer("export", "remote", "--out", str(tmp_path / "remote.jsonl"), **env)
    assert exported.returncode == 0 and len((tmp_path / "remote.jsonl").read_text().splitlines()) == 2
    assert "note" not in exported.stderr, exported.stderr

    online = producer("classify", str(SAMPLES / "coffee.jpg"), "--topk", "1", **env)
    assert online.returncode == 0, online.stderr
    assert json.loads(online.stdout)["topk"][0]["label"] == "espresso"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["label", "samples", "--out", "results.xlsx"], "unknown results format"),
        (["label", "samples", "--out", "results.json"], "results are written as JSON Lines"),
        (["label", "samples", "--out", "samples"], "samples: a folder; name the results file in it"),
        (["label", "/no/such/folder", "--out", "r.csv"], "no such file, folder"),
        (["status", "never-ran"], "no job named 'never-ran'"),
        (["wait", "never-ran"], "no job named 'never-ran'"),
        # a mistyped option: its command's usage, which lists the options (the top level's listed commands)
        (["label", "samples", "--tpok", "3", "--out", "r.csv"], "label [-h] [--topk TOPK]"),
    ],
)
def test_clear_errors(lite0_worker, args, message):
    done = producer(*args, KILN_REDIS_URL=lite0_worker.redis_url)
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_model_option_needs_the_embedded_mode(lite0_worker, lite0_package):
    done = producer("label", str(SAMPLES), "--out", "r.csv", "--model", str(lite0_package),
                    KILN_REDIS_URL=lite0_worker.redis_url)  # fmt: skip
    assert done.returncode == 2 and "--model only applies to the embedded mode" in done.stderr


@pytest.mark.parametrize("command", ["label", "submit"])
def test_timeout_bounds_the_enqueuing_too(command, private_redis_url, tmp_path):
    """No worker consumes and the bulk queue's bound is 2 chunks: `--timeout` ends the command
    while it waits for room, with the two chunks enqueued and what to do. Before, `label --timeout`
    bounded only the wait for records, and waited for room for ever."""
    args = ["--job", "stalled", "--timeout", "2", "--no-progress"] + (["--out", "r.csv"] * (command == "label"))
    env = {"KILN_REDIS_URL": private_redis_url, "KILN_MAX_PENDING_CHUNKS": "2", "KILN_CHUNK_SIZE": "1"}
    done = producer(command, str(SAMPLES), *args, **env)  # the subprocess's own timeout is the failure
    assert done.returncode == 2, done.stderr
    assert "job stalled: the bulk queue still held 2 chunks" in done.stderr and "with 2 of the 3 images" in done.stderr
    assert "Are workers consuming kiln.bulk?" in done.stderr


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_timeouts_are_numbers_of_seconds_above_zero(value):
    done = producer("classify", str(SAMPLES / "coffee.jpg"), "--timeout", value)
    assert done.returncode == 2 and "--timeout" in done.stderr and "number of seconds" in done.stderr, done.stderr


def test_wait_follows_a_submitted_job_and_gives_up_at_its_timeout(private_redis_url):
    """`submit` then `wait`, as a producer script runs them: with no worker consuming, `wait
    --timeout` ends with how far the job got and what to do next (the job stays queued)."""
    env = {"KILN_REDIS_URL": private_redis_url}
    submitted = producer("submit", str(SAMPLES), "--job", "queued", "--no-progress", **env)
    assert submitted.returncode == 0, submitted.stderr
    waited = producer("wait", "queued", "--timeout", "1", **env)
    assert waited.returncode == 2, waited.stderr
    assert "job queued: 0 of 6 images after --timeout 1 s; the workers go on with it" in waited.stderr
    assert "`kiln wait queued` again" in waited.stderr


def test_ctrl_c_on_a_remote_label_says_the_workers_go_on(private_redis_url, tmp_path):
    """Ctrl-C while a remote `label` waits: the workers go on with the job, so it says how to
    follow it and export it. It said "run the same command again to resume", and doing so
    enqueued the images still queued a second time (a new user's finding)."""
    labelling = subprocess.Popen(
        [PYTHON, "-m", "producer", "label", str(SAMPLES), "--job", "stopped", "--out", str(tmp_path / "x.csv"),
         "--no-progress"],
        env=python_env(KILN_REDIS_URL=private_redis_url), stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert labelling.stderr.readline().startswith("job stopped: 6 images")  # submitted: now it waits
        labelling.send_signal(signal.SIGINT)
        err = labelling.communicate(timeout=60)[1]
    finally:
        labelling.kill()
    assert labelling.returncode == 130, err
    assert "interrupted: the workers go on with job stopped: `kiln wait stopped` follows it" in err
    assert "run the same command again" not in err


def test_wait_notices_a_job_that_disappears(private_redis_url):
    """The job's keys deleted (or expired, or Redis restarted without its data) while `wait`
    follows it: it says so and exits 2, instead of waiting for ever."""
    env = {"KILN_REDIS_URL": private_redis_url}
    assert producer("submit", str(SAMPLES), "--job", "vanish", "--no-progress", **env).returncode == 0
    environment = python_env(**env)
    waiting = subprocess.Popen([PYTHON, "-m", "producer", "wait", "vanish", "--no-progress"], env=environment,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        time.sleep(2)
        client = redis.Redis.from_url(private_redis_url)
        client.delete(*client.keys("kiln:{vanish}:*"))
        _, err = waiting.communicate(timeout=60)
    finally:
        waiting.kill()
    assert waiting.returncode == 2 and "job vanish: no longer in" in err and "expired or were deleted" in err, err


def _wait_process(url: str, job: str) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-m", "producer", "wait", job, "--no-progress", "--timeout", "120"],
                            env=python_env(KILN_REDIS_URL=url), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


@contextlib.contextmanager
def _listing_slowly(url: str, job: str, photos: list, pause_s: float) -> Iterator[threading.Thread]:
    """`Kiln.submit` of the photos (chunks of 2) in a thread, pausing for `pause_s` once the first
    chunk is sent; yields the thread then (the submission still listing), and joins it after."""
    listed = threading.Event()

    def items() -> Iterator[Item]:
        for i, photo in enumerate(photos):
            if i == 2:
                listed.set()
                time.sleep(pause_s)
            yield Item(key=f"{i}-{photo.name}", ref=str(photo))

    with Kiln(settings=ProducerSettings(redis_url=url, chunk_size=2)) as kiln:
        submitter = threading.Thread(target=kiln.submit, args=(items(), job))
        submitter.start()
        try:
            assert listed.wait(60)
            yield submitter
        finally:
            submitter.join()


def test_wait_beside_a_running_submit_waits_for_the_whole_listing(lite0_worker):
    """`kiln wait` started while `submit` still lists the job: it waits until the listing has
    ended, not only for the images enqueued so far, which the worker labels during the listing's
    pause. Before, it said "complete, 2 in all"."""
    job, photos = f"listing-{uuid.uuid4().hex[:8]}", sorted(SAMPLES.glob("*.jpg"))
    with _listing_slowly(lite0_worker.redis_url, job, photos, 6.0) as submitter:
        waiting = _wait_process(lite0_worker.redis_url, job)
        out, err = waiting.communicate(timeout=180)
        assert not submitter.is_alive()  # wait ended after the listing, not before
    assert waiting.returncode == 0, err
    assert f"{job}: complete, {len(photos)} done, 0 failed, {len(photos)} in all" in out


def test_wait_stops_when_the_submission_listing_the_job_stops_early(lite0_worker, tmp_path):
    """A `submit` interrupted mid-listing (Ctrl-C): once the worker has labelled what it
    enqueued, `wait` says that the listing stopped and how to go on (exit 2), instead of waiting
    for chunks that will never come; `status` says so too. A producer killed outright stops its
    listing's heartbeat, which lapses in LISTER_TTL_S."""
    job = f"stopped-{uuid.uuid4().hex[:8]}"
    script = tmp_path / "submit.py"
    script.write_text(
        "import sys, time\nfrom pathlib import Path\nfrom producer import Item, Kiln\n"
        "def items():\n"
        "    for i, p in enumerate(sorted(Path(sys.argv[2]).glob('*.jpg'))):\n"
        "        if i == 2 and sys.argv[4] == 'pause':\n"
        "            print('listed', flush=True)\n"
        "            time.sleep(600)\n"
        "        yield Item(key=str(i), ref=str(p))\n"
        "Kiln(sys.argv[1]).submit(items(), job=sys.argv[3])\n"
    )
    env = python_env(KILN_REDIS_URL=lite0_worker.redis_url, KILN_CHUNK_SIZE="2")
    submitting = subprocess.Popen([PYTHON, str(script), lite0_worker.redis_url, str(SAMPLES), job, "pause"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert submitting.stdout.readline().strip() == "listed", submitting.stderr.read()
        client = redis.Redis.from_url(lite0_worker.redis_url)
        ((submission, state),) = client.hgetall(f"kiln:{{{job}}}:listers").items()
        assert state.startswith(b"running ")  # with the time of its last beat, and the beat itself:
        assert 0 < client.ttl(f"kiln:{{{job}}}:lister:{submission.decode()}") <= LISTER_TTL_S
        submitting.send_signal(signal.SIGINT)
        submitting.communicate(timeout=60)
    finally:
        submitting.kill()
    waiting = _wait_process(lite0_worker.redis_url, job)
    _, err = waiting.communicate(timeout=180)
    assert waiting.returncode == 2, err
    assert f"job {job}: the submission listing it stopped before its end" in err and "after 2 images" in err
    assert "run that submission again to enqueue the rest" in err
    status = producer("status", job, KILN_REDIS_URL=lite0_worker.redis_url)
    assert "listing stopped early" in status.stdout, status.stdout
    # A submission of its own that ended (label's) is not held by the other one's stop, nor does
    # it end that one's part: the job's listing stays stopped ...
    with Kiln(lite0_worker.redis_url) as kiln:
        mine = kiln.submit([Item(key="mine", ref=str(SAMPLES / "coffee.jpg"))], job=job)
        assert kiln.wait(mine, timeout_s=120, progress=False).done == 1
    again = _wait_process(lite0_worker.redis_url, job)
    assert again.wait(120) == 2, again.communicate()[1]
    # ... until the stopped submission runs again (the same first images: the same submission).
    resumed = subprocess.run([PYTHON, str(script), lite0_worker.redis_url, str(SAMPLES), job, "go"], env=env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    waiting = _wait_process(lite0_worker.redis_url, job)
    out, err = waiting.communicate(timeout=180)
    photos = len(list(SAMPLES.glob("*.jpg")))
    assert waiting.returncode == 0 and f"{job}: complete, {photos + 1} done" in out, err


def test_a_submission_refused_at_its_first_chunk_leaves_the_job_as_it_was(lite0_worker, tmp_path):
    """A complete job kept in Redis (its keys kept for good), submitted to again with --out-dir (a
    conflict): the listing it opened is put back, the job stays complete, and keeps its TTL."""
    env = {"KILN_REDIS_URL": lite0_worker.redis_url}
    job = f"kept-{uuid.uuid4().hex[:8]}"
    done = producer("label", str(SAMPLES / "coffee.jpg"), "--job", job, "--out", str(tmp_path / "r.csv"),
                    "--no-progress", **env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    client = redis.Redis.from_url(lite0_worker.redis_url)
    client.persist(f"kiln:{{{job}}}:meta")
    refused = producer("submit", str(SAMPLES), "--job", job, "--out-dir", str(tmp_path / "shards"), **env)
    assert refused.returncode == 2 and "keeps its records in Redis" in refused.stderr, refused.stderr
    status = producer("status", job, **env)
    assert f"{job}: complete, 1 done, 0 failed, 1 in all" in status.stdout, status.stdout
    assert client.ttl(f"kiln:{{{job}}}:meta") == -1


def test_a_new_job_whose_submission_enqueued_nothing_is_not_left_behind(private_redis_url, tmp_path):
    """A sharded submission that times out waiting for room before its first chunk (the queue
    full of another job's chunks, no worker): no job of 0 images that would never complete."""
    env = {"KILN_REDIS_URL": private_redis_url, "KILN_MAX_PENDING_CHUNKS": "1", "KILN_CHUNK_SIZE": "1"}
    assert producer("submit", str(SAMPLES / "coffee.jpg"), "--job", "filler", **env).returncode == 0
    stalled = producer("submit", str(SAMPLES), "--job", "new-shards", "--out-dir", str(tmp_path / "shards"),
                       "--timeout", "2", "--no-progress", **env)  # fmt: skip
    assert stalled.returncode == 2 and "the bulk queue still held 1 chunks" in stalled.stderr, stalled.stderr
    status = producer("status", "new-shards", **env)
    assert status.returncode == 2 and "no job named 'new-shards'" in status.stderr, status.stderr


def test_a_grown_folder_submitted_again_takes_the_stopped_submissions_place(private_redis_url, tmp_path):
    """`submit` of a folder stopped by its --timeout (no worker, the queue full), then the folder
    grown by an image that lists first and submitted again: the same inputs are the same
    submission, so its listing ends, and the job is running, not stopped early."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("coffee", "chelsea", "rocket"):
        shutil.copy(SAMPLES / f"{name}.jpg", folder / f"{name}.jpg")
    env = {"KILN_REDIS_URL": private_redis_url, "KILN_CHUNK_SIZE": "1"}
    stalled = producer("submit", str(folder), "--job", "grown", "--timeout", "2", "--no-progress",
                       KILN_MAX_PENDING_CHUNKS="1", **env)  # fmt: skip
    assert stalled.returncode == 2 and "with 1 of the 2 images" in stalled.stderr, stalled.stderr
    assert "listing stopped early" in producer("status", "grown", **env).stdout
    shutil.copy(SAMPLES / "astronaut.jpg", folder / "000-first.jpg")
    again = producer("submit", str(folder), "--job", "grown", "--no-progress", **env)
    assert again.returncode == 0, again.stderr
    status = producer("status", "grown", **env)
    assert "grown: running, 0 done, 0 failed, 4 in all" in status.stdout, status.stdout


def test_a_stopped_submission_run_again_that_enqueues_nothing_stays_stopped(private_redis_url, tmp_path):
    """A folder's submission stopped by its --timeout (no worker, the queue full), run again and
    stopped again before its first chunk: the job is as it was, stopped early, not a submission
    whose heartbeat is late (that entry had been deleted with the second run's)."""
    env = {"KILN_REDIS_URL": private_redis_url, "KILN_CHUNK_SIZE": "1", "KILN_MAX_PENDING_CHUNKS": "1"}
    for _ in range(2):
        stalled = producer("submit", str(SAMPLES), "--job", "again", "--timeout", "2", "--no-progress", **env)
        assert stalled.returncode == 2 and "the bulk queue still held 1 chunks" in stalled.stderr, stalled.stderr
        status = producer("status", "again", **env)
        assert "again: listing stopped early" in status.stdout, status.stdout


def test_concurrent_submissions_to_one_job_each_hold_its_listing_open(lite0_worker, tmp_path):
    """Several producers filling one job: while one still lists, another one finishing (or one
    refused at its first chunk) neither completes the job nor stops its listing; `wait` ends
    when the last one has listed everything."""
    job, photos = f"shared-{uuid.uuid4().hex[:8]}", sorted(SAMPLES.glob("*.jpg"))
    env = {"KILN_REDIS_URL": lite0_worker.redis_url}
    with _listing_slowly(lite0_worker.redis_url, job, photos, 12.0) as slow:
        other = producer("submit", str(SAMPLES / "coffee.jpg"), "--job", job, "--no-progress", **env)
        assert other.returncode == 0, other.stderr
        refused = producer("submit", str(SAMPLES), "--job", job, "--out-dir", str(tmp_path / "s"), **env)
        assert refused.returncode == 2, refused.stderr
        time.sleep(3)  # the worker labels what was enqueued
        status = producer("status", job, **env)
        assert f"{job}: running, 3 done, 0 failed, 3 in all" in status.stdout, status.stdout
        waiting = _wait_process(lite0_worker.redis_url, job)
        out, err = waiting.communicate(timeout=180)
        assert not slow.is_alive()
    assert waiting.returncode == 0, err
    assert f"{job}: complete, {len(photos) + 1} done, 0 failed, {len(photos) + 1} in all" in out


def test_a_lapsed_heartbeat_renewed_after_a_redis_outage_does_not_end_wait(lite0_worker):
    """A heartbeat that expired while Redis was away: the live submission renews it within a
    third of its lifetime once Redis is back, so `wait` waits that long before it calls the
    listing stopped. Here a second submission's heartbeat has lapsed while the job's records
    are all written; it is renewed after 4 s and finished after 6: wait exits 0, not 2."""
    job = f"outage-{uuid.uuid4().hex[:8]}"
    with Kiln(lite0_worker.redis_url) as kiln:
        kiln.wait(kiln.submit([Item(key="a", ref=str(SAMPLES / "coffee.jpg"))], job=job), timeout_s=120,
                  progress=False)  # fmt: skip
        store = kiln.store
        store.open_listing(job, "second")
        store.redis.delete(f"kiln:{{{job}}}:lister:second")  # expired during the outage
        assert store.counts(job).listing == "lapsed"
        waiting = _wait_process(lite0_worker.redis_url, job)
        time.sleep(4)
        store.keep_listing(job, "second")
        time.sleep(2)
        store.finish_listing(job, "second")
        out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0 and f"{job}: complete, 1 done" in out, err


def test_a_reader_that_goes_away_does_not_change_the_exit_status(private_redis_url):
    """`kiln submit ... | head -0`, `kiln status J | true`: the command's output has nowhere to go,
    but it did its work, and says so by its exit status alone (it was `Broken pipe` and exit 2)."""
    read, write = os.pipe()
    os.close(read)  # a pipe whose reader is gone: the first write fails with EPIPE
    try:
        env = python_env(KILN_REDIS_URL=private_redis_url)
        for args in (["submit", str(SAMPLES), "--job", "piped", "--no-progress"], ["status", "piped"]):
            done = subprocess.run([PYTHON, "-m", "producer", *args], stdout=write, stderr=subprocess.PIPE, text=True,
                                  env=env, timeout=120)  # fmt: skip
            assert done.returncode == 0 and "error" not in done.stderr, (args, done.stderr)
    finally:
        os.close(write)
    status = producer("status", "piped", KILN_REDIS_URL=private_redis_url)
    assert "piped: running, 0 done, 0 failed, 6 in all" in status.stdout, status.stdout


@pytest.mark.parametrize("out_dir", [False, True])
def test_a_job_keeps_the_top_k_it_was_started_with(private_redis_url, tmp_path, out_dir):
    """A second submission asking more (or fewer) labels per image is refused, in both modes:
    an export has one column per label, so a Redis-store job's records of 7 were cut to its 2
    without a word (a new user's finding); sharded jobs refused it already."""
    env = {"KILN_REDIS_URL": private_redis_url}
    shards = ["--out-dir", str(tmp_path / "shards")] * out_dir
    first = producer("submit", str(SAMPLES / "coffee.jpg"), "--job", "tk", "--topk", "2", *shards, **env)
    assert first.returncode == 0, first.stderr
    other = producer("submit", str(SAMPLES / "rocket.jpg"), "--job", "tk", "--topk", "7", *shards, **env)
    assert other.returncode == 2 and "job tk was started with topk=2, not 7" in other.stderr, other.stderr
    assert "1 in all" in producer("status", "tk", **env).stdout
    with Kiln(private_redis_url) as kiln, pytest.raises(JobConflict, match="topk=2, not 3"):
        kiln.submit([Item(key="r", ref=str(SAMPLES / "rocket.jpg"))], job="tk", topk=3,
                    out_dir=str(tmp_path / "shards") if out_dir else None)  # fmt: skip


def test_a_relative_out_dir_is_the_producers_folder_not_the_workers(lite0_worker, tmp_path):
    """`label --out-dir shards`, run in a folder of its own: the worker (working elsewhere) writes
    the shards there and label reads them back. Before, they went under the worker's working
    folder, and label said there were none (a new user's finding)."""
    job = f"relative-{uuid.uuid4().hex[:8]}"
    done = subprocess.run(
        [PYTHON, "-m", "producer", "label", str(SAMPLES / "coffee.jpg"), "--job", job, "--out-dir", "shards",
         "--out", "coffee.csv", "--no-progress"],
        cwd=tmp_path, env=python_env(KILN_REDIS_URL=lite0_worker.redis_url), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"shards in {tmp_path / 'shards'}/{job}/" in done.stderr
    assert len(list((tmp_path / "shards" / job).glob("*.parquet"))) == 1
    assert "coffee" in (tmp_path / "coffee.csv").read_text()


@pytest.mark.parametrize("out_dir", ["/proc/kiln-shards", "blocker/shards", "shards"])
def test_label_refuses_an_out_dir_it_could_not_read_back(private_redis_url, tmp_path, out_dir):
    """A folder that cannot be made (under /proc, under a file), or whose job folder is a file:
    refused before anything is enqueued. Before, the job never finished and said nothing of why
    (a new user's and a hostile tester's findings)."""
    (tmp_path / "blocker").write_text("a file where a folder should be")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "nowhere").write_text("a file where the job's folder should be")
    out_dir = out_dir if out_dir.startswith("/") else str(tmp_path / out_dir)
    done = producer("label", str(SAMPLES / "coffee.jpg"), "--job", "nowhere", "--out-dir", out_dir,
                    "--out", str(tmp_path / "r.csv"), KILN_REDIS_URL=private_redis_url)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"--out-dir {out_dir}: cannot write the job's shards in {out_dir}/nowhere" in done.stderr
    assert "no job named 'nowhere'" in producer("status", "nowhere", KILN_REDIS_URL=private_redis_url).stderr


@pytest.mark.parametrize("given", ["../shards", "file://../shards", "file://{tmp}/x/../shards"])
def test_an_out_dir_names_one_folder_however_it_is_written(private_redis_url, tmp_path, given):
    """Made absolute and normal: `../shards` from a folder beside it and the absolute path are one
    out_dir, not "another" (a hostile tester's finding); a relative file:// URL too (its shards
    went under the worker's folder); and a Path is taken as a str."""
    here = tmp_path / "here"
    here.mkdir()
    env = python_env(KILN_REDIS_URL=private_redis_url)
    first = subprocess.run([PYTHON, "-m", "producer", "submit", str(SAMPLES / "coffee.jpg"), "--job", "one-dir",
                            "--out-dir", given.format(tmp=tmp_path), "--no-progress"],
                           cwd=here, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert first.returncode == 0 and f"shards in {tmp_path / 'shards'}/one-dir/" in first.stderr, first.stderr
    with Kiln(private_redis_url) as kiln:
        again = kiln.submit([SAMPLES / "coffee.jpg"], job="one-dir", out_dir=tmp_path / "shards")
    assert again.out_dir == str(tmp_path / "shards")


@pytest.mark.parametrize("job", [".", ".."])
def test_a_job_name_of_dots_is_refused(private_redis_url, tmp_path, job):
    """`out_dir/..` is the folder above the shards: its export would read other jobs' shards."""
    done = producer("submit", str(SAMPLES / "coffee.jpg"), "--job", job, "--out-dir", str(tmp_path / "s"),
                    KILN_REDIS_URL=private_redis_url)  # fmt: skip
    assert done.returncode == 2 and "not dots only" in done.stderr, done.stderr
