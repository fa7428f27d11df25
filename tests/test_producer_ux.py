"""What a new user meets first on the producer side: retrying failed images, `classify` on a
local path, an output path that cannot be written, output permissions, invalid settings, a job
that does not exist, no worker consuming, and `export --topk` bounds."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import threading
import time

import pytest
from conftest import PYTHON, ROOT, SAMPLES, python_env
from test_producer_cli import producer

from producer import JobNotFound, Kiln
from producer.embedded import LocalWorker
from producer.settings import ProducerSettings
from producer.sources import Expansion, SourceError


def test_retry_failed_waits_for_the_new_records(lite0_worker, work_dir, tmp_path):
    """The old error records of retried images do not count as finished: `label --retry-failed`
    waits for the new records and writes them."""
    folder = work_dir / "retry"
    folder.mkdir()
    (folder / "late.jpg").write_bytes(b"not a jpeg yet")
    shutil.copy(SAMPLES / "chelsea.jpg", folder)
    env = {"KILN_REDIS_URL": lite0_worker.redis_url}
    first = producer(
        "label", str(folder), "--job", "retry", "--out", str(tmp_path / "first.jsonl"), "--no-progress", **env
    )
    assert first.returncode == 1, first.stderr
    assert "1 labelled, 1 failed" in first.stderr
    for command in ("status", "wait"):  # the counters do not say why: the records' kinds, where to read more
        said = producer(command, "retry", **env)
        assert "failed: 1 not_an_image\n" in said.stderr, said.stderr
        assert "the failed images' records say why: `kiln export retry --out FILE`" in said.stderr, said.stderr
        assert "`kiln submit ... --job retry --retry-failed` runs them again" in said.stderr, said.stderr
    with Kiln(lite0_worker.redis_url) as kiln:
        assert kiln.failure_kinds("retry") == {"not_an_image": 1}
        assert kiln.failure_kinds("retry", limit=0) == {}

    shutil.copy(SAMPLES / "coffee.jpg", folder / "late.jpg")  # fixed in place: the same key and reference
    plain = producer("label", str(folder), "--job", "retry", "--out", str(tmp_path / "plain.jsonl"), "--no-progress",
                     **env)  # fmt: skip
    assert plain.returncode == 1 and "1 labelled, 1 failed" in plain.stderr, plain.stderr  # resumed: kept as it was
    assert "2 images (2 already done); 1 of those failed before: --retry-failed runs them again" in plain.stderr
    out = tmp_path / "again.jsonl"
    again = producer(
        "label", str(folder), "--job", "retry", "--retry-failed", "--out", str(out), "--no-progress", **env
    )
    assert again.returncode == 0, again.stderr
    assert "2 labelled, 0 failed" in again.stderr and "failed before" not in again.stderr
    records = {json.loads(line)["key"].rsplit("/", 1)[-1]: json.loads(line) for line in out.read_text().splitlines()}
    assert records["late.jpg"]["status"] == "ok" and records["late.jpg"]["topk"][0]["label"] == "espresso"
    with Kiln(lite0_worker.redis_url) as kiln:
        counts = kiln.counts("retry")
    assert (counts.total, counts.done, counts.failed) == (2, 2, 0)


@pytest.mark.parametrize(("image", "message"), [("nosuch.jpg", "no such file"), (".", "not a file")])
def test_classify_refuses_a_missing_path_or_a_folder_locally(lite0_worker, tmp_path, image, message):
    done = subprocess.run(
        [PYTHON, "-m", "producer", "classify", image], capture_output=True, text=True, cwd=tmp_path, timeout=120,
        env=python_env(KILN_REDIS_URL=lite0_worker.redis_url),
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr and str(tmp_path) in done.stderr and not done.stdout


def test_label_refuses_a_missing_package_before_the_embedded_mode_starts(tmp_path):
    """A --model that names nothing: one error line, before Redis and a worker start and before
    "embedded mode: ..." says they did (it said so, then the worker's exit status 2)."""
    environment = python_env(KILN_DATA_DIR=str(tmp_path / "d"))
    environment.pop("KILN_REDIS_URL", None)  # the embedded mode
    done = subprocess.run(
        [PYTHON, "-m", "producer", "label", str(SAMPLES), "--model", "nosuch.pt2", "--out", "r.csv"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120, env=environment,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"error: {tmp_path / 'nosuch.pt2'}: no such package (--model, KILN_MODEL)\n"


def test_classify_exits_non_zero_on_an_error_record(lite0_worker, tmp_path):
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"no image here")
    done = producer("classify", str(junk), KILN_REDIS_URL=lite0_worker.redis_url)
    assert done.returncode == 1, done.stderr
    assert json.loads(done.stdout)["error"]["kind"] == "not_an_image"


def test_classify_sends_a_relative_path_absolute(kiln, monkeypatch):
    monkeypatch.chdir(SAMPLES)
    record = kiln.classify("coffee.jpg", topk=1, timeout_s=120)
    assert record.status == "ok", record.error
    assert record.ref == str(SAMPLES / "coffee.jpg") and record.topk[0].label == "espresso"


@pytest.mark.parametrize("out", ["/proc/kiln-results.csv", "{tmp}/a-file/results.csv"])
def test_an_unwritable_out_is_refused_before_the_job(lite0_worker, tmp_path, out):
    (tmp_path / "a-file").write_text("a file, not a folder")
    out = out.format(tmp=tmp_path)
    job = f"never-{tmp_path.name}"
    done = producer("label", str(SAMPLES / "coffee.jpg"), "--job", job, "--out", out, "--no-progress",
                    KILN_REDIS_URL=lite0_worker.redis_url)  # fmt: skip
    assert done.returncode == 2 and f"cannot write {out}" in done.stderr, done.stderr
    assert ".kiln-results" not in done.stderr and ".results" not in done.stderr  # no temporary file named
    with Kiln(lite0_worker.redis_url) as kiln:
        assert not kiln.exists(job)  # refused before anything was enqueued


def test_a_write_failing_after_the_job_says_how_to_export(lite0_worker, work_dir, tmp_path):
    """The folder passes the check, then turns into a file while the job runs: the message says
    that the records are kept in the job and how to write them."""
    folder = work_dir / "slow"
    folder.mkdir()
    for i in range(24):
        shutil.copy(SAMPLES / "coffee.jpg", folder / f"{i:02d}.jpg")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    command = [PYTHON, "-m", "producer", "label", str(folder), "--job", "late-write", "--out", str(out_dir / "r.csv"),
               "--no-progress"]  # fmt: skip
    env = python_env(KILN_REDIS_URL=lite0_worker.redis_url, KILN_CHUNK_SIZE="4")
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env) as label:
        first = label.stderr.readline()  # "job late-write: 24 images": enqueued, now waiting
        assert first.startswith("job late-write"), first
        out_dir.rmdir()
        out_dir.write_text("now a file")
        rest = label.stderr.read()
        assert label.wait(timeout=300) == 2, rest
    assert f"cannot write {out_dir / 'r.csv'}" in rest
    assert "The records are safe in job late-write" in rest and "kiln export late-write --out PATH" in rest
    exported = producer("export", "late-write", "--out", str(tmp_path / "r.csv"), KILN_REDIS_URL=lite0_worker.redis_url)
    assert exported.returncode == 0 and "wrote 24 records" in exported.stderr


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_files_get_the_umask_mode(lite0_worker, kiln, tmp_path, umask):
    kiln.submit([SAMPLES / "coffee.jpg"], job="modes")
    kiln.wait("modes", timeout_s=120, progress=False)
    old = os.umask(umask)
    try:
        written = kiln.export("modes", tmp_path / "api.csv")
        # the CLI's export and label, in processes that inherit the umask
        exported = producer(
            "export", "modes", "--out", str(tmp_path / "cli.parquet"), KILN_REDIS_URL=kiln.settings.redis_url
        )
        labelled = producer("label", str(SAMPLES / "coffee.jpg"), "--job", "modes", "--out", str(tmp_path / "l.jsonl"),
                            "--no-progress", KILN_REDIS_URL=kiln.settings.redis_url)  # fmt: skip
    finally:
        os.umask(old)
    assert written == 1 and exported.returncode == 0 and labelled.returncode == 0, exported.stderr + labelled.stderr
    for name in ("api.csv", "cli.parquet", "l.jsonl"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


@pytest.mark.parametrize(
    ("command", "variable"),
    [
        ([PYTHON, "-m", "producer", "status", "x"], "KILN_CHUNK_SIZE"),
        ([PYTHON, str(ROOT / "kiln_cli.py"), "label", "x", "--out", "r.csv"], "KILN_CHUNK_SIZE"),
        ([PYTHON, str(ROOT / "kiln_cli.py"), "classify", "x.jpg"], "KILN_POLL_INTERVAL_S"),
        ([PYTHON, "-m", "worker", "--model", "m.pt2"], "KILN_CONCURRENCY"),
        ([PYTHON, str(ROOT / "kiln_cli.py"), "worker", "--model", "m.pt2"], "KILN_RESULT_TTL_S"),
    ],
)
def test_an_invalid_setting_is_one_line_and_exit_2(tmp_path, command, variable):
    """From the environment or from .env (in the working folder), for every CLI entry point."""
    (tmp_path / ".env").write_text("KILN_POLL_INTERVAL_S=-1\nKILN_RESULT_TTL_S=forever\n")
    env = python_env(KILN_CHUNK_SIZE="abc", KILN_CONCURRENCY="many", KILN_REDIS_URL="redis://127.0.0.1:9/0")
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: invalid setting"), done.stderr
    assert variable in lines[0] and "Traceback" not in done.stderr


ENTRY_POINTS = [
    [PYTHON, "-m", "producer", "status", "x"],
    [PYTHON, str(ROOT / "kiln_cli.py"), "label", "x", "--out", "r.csv"],
    [PYTHON, "-m", "worker", "--model", "m.pt2"],
    [PYTHON, "-m", "worker.health"],
]


@pytest.mark.parametrize("command", ENTRY_POINTS)
@pytest.mark.parametrize(
    "text", ["KILN_CHUNK_SIZE=8\n".encode("utf-16"), "KILN_JOB=café\n".encode("latin-1"), b"\x00\xc3(\n"]
)
def test_a_env_file_that_is_not_utf8_is_one_line_naming_it(tmp_path, command, text):
    """UTF-16 as Windows' editors save it, Latin-1, binary: pydantic-settings' UnicodeDecodeError
    traceback came out of every CLI (a hostile tester's finding)."""
    (tmp_path / ".env").write_bytes(text)
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=python_env(), timeout=120)
    assert done.returncode in (1, 2) and "Traceback" not in done.stderr, done.stderr
    assert f"{tmp_path / '.env'} is not UTF-8 text (byte " in done.stderr and "save it as UTF-8" in done.stderr


@pytest.mark.parametrize("command", ENTRY_POINTS)
def test_a_env_file_of_utf16_without_a_byte_order_mark_is_one_line_naming_it(tmp_path, command):
    """It decodes as UTF-8 with a NUL after each letter, so no name in it was a setting's: it was
    ignored without a word (a hostile tester's finding)."""
    (tmp_path / ".env").write_bytes("KILN_CHUNK_SIZE=8\n".encode("utf-16-le"))
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=python_env(), timeout=120)
    assert done.returncode in (1, 2) and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(f"error: {tmp_path / '.env'} holds NUL bytes (UTF-16 or UTF-32 text"), done.stderr


def test_a_env_file_that_is_a_pipe_is_read_once(tmp_path):
    """Settings from a named pipe written once (a secrets manager's way): the NUL check opened it
    a second time and waited for a writer for ever (a hostile tester's finding)."""
    os.mkfifo(tmp_path / ".env")

    def write_once() -> None:
        with open(tmp_path / ".env", "w") as pipe:  # waits for the reader
            pipe.write("KILN_REDIS_URL=redis://127.0.0.1:9/0\nKILN_REDIS_RETRY_S=0.1\n")

    writer = threading.Thread(target=write_once, daemon=True)
    writer.start()
    command = [PYTHON, "-m", "producer", "status", "x"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=python_env(), timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "127.0.0.1:9" in done.stderr, done.stderr  # the pipe's settings were read, and used


def test_settings_told_to_read_no_env_file_read_none(tmp_path, monkeypatch):
    """`_env_file=None` (as the benchmarks and tests construct settings) reads no .env: a bad one in
    the current folder is not theirs to refuse."""
    from worker.settings import WorkerSettings

    (tmp_path / ".env").write_bytes("KILN_CHUNK_SIZE=8\n".encode("utf-16-le"))
    monkeypatch.chdir(tmp_path)
    assert WorkerSettings(_env_file=None).model is None


def test_env_files_named_to_the_settings_are_checked_as_dot_env_is(tmp_path):
    """A list of files, a file in another encoding asked for by name (hostile testers' findings:
    a list was not checked, and an error then named `None`)."""
    from worker.settings import EnvFileError, WorkerSettings

    utf16 = tmp_path / "settings.env"
    utf16.write_bytes("KILN_FETCH_THREADS=3\n".encode("utf-16-le"))
    with pytest.raises(EnvFileError, match=f"{utf16} holds NUL bytes"):
        WorkerSettings(_env_file=[str(tmp_path / "absent.env"), str(utf16)])
    assert WorkerSettings(_env_file=utf16, _env_file_encoding="utf-16-le").fetch_threads == 3


def test_a_env_file_the_user_cannot_read_is_one_line_naming_it(tmp_path):
    """A .env only its owner may read (a deployment's secrets), read by another user: here root
    without the capability to read what it does not own (util-linux's setpriv)."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv, to run the CLI without the right to read any file")
    (tmp_path / ".env").write_text("KILN_CHUNK_SIZE=8\n")
    (tmp_path / ".env").chmod(0)
    unprivileged = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    command = [*unprivileged, PYTHON, "-m", "producer", "status", "x"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=python_env(), timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(f"error: cannot read {tmp_path / '.env'}: Permission denied"), done.stderr


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis://:hunter2@127.0.0.1:6379/0?socket_timout=5", "kiln takes no URL parameter socket_timout"),
        ("redis://127.0.0.1:6379/0?socket_timeout=5", "timeouts and retries are KILN_REDIS_TIMEOUT_S"),
        ("redis://127.0.0.1:6379/0?password=hunter2&db=1", "kiln takes no URL parameter db, password"),
        ("redis://:hunter2@127.0.0.1:70000/0", "the port is a number from 1 to 65535"),
        ("redis://:hunter2/x@127.0.0.1:6379/0", "the port is a number from 1 to 65535"),
        ("redis://:hunter2#x@127.0.0.1:6379/0", "the port is a number from 1 to 65535"),
        ("redis://:hunter2 x@127.0.0.1:6379/0", "a URL holds no spaces"),
        ("redis://127.0.0.1:6379/zero", "the database after the host is a number"),
        ("redis://127.0.0.1:0/0", "port 0"),
        ("http://127.0.0.1:6379/0", "use redis://[:password@]host[:port][/db], or rediss://"),
        ("unix:///tmp/redis.sock", "no unix:// sockets"),
        ("redis://hunter2@127.0.0.1:6379/0", "a password goes after a colon"),
        ("redis://127.0.0.1:6379/0#hunter2", "no #fragment"),
        ("redis://:hunter2%zz@127.0.0.1:6379/0", "not a percent-escape"),
        ("redis://127.0.0.1:6379/99999999999", "the database after the host is a number"),
    ],
)
@pytest.mark.parametrize("command", [["producer", "wait", "x"], ["worker", "--model", "m.pt2"], ["worker.health"]])
def test_a_redis_url_that_workers_cannot_use_is_one_line(tmp_path, url, says, command):
    """What Celery's broker or redis-py would refuse only at the first connection, in a traceback
    (unknown parameters, other schemes, bad ports and databases), is said before anything
    connects, with no part of the password, for producers, workers and the health check alike."""
    done = subprocess.run([PYTHON, "-m", *command], capture_output=True, text=True, cwd=tmp_path,
                          env=python_env(KILN_REDIS_URL=url), timeout=120)  # fmt: skip
    assert done.returncode == (1 if command == ["worker.health"] else 2), done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "invalid setting KILN_REDIS_URL=" in lines[0], done.stderr
    assert says in lines[0] and "hunter2" not in done.stderr


@pytest.mark.parametrize(
    "url",
    ["redis://queue", "redis://:pw@queue:6380/3", "redis://user:p@ss@queue:1/2", "redis://[::1]:6379/0",
     "rediss://:pw@queue:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/ssl/ca.pem"],
)  # fmt: skip
def test_the_redis_urls_workers_take_are_accepted(url):
    assert ProducerSettings(_env_file=None, redis_url=url).redis_url == url
    assert ProducerSettings(_env_file=None, redis_url="").redis_url is None  # empty: unset


def test_waiting_for_a_job_that_does_not_exist_raises(kiln, tmp_path):
    with pytest.raises(JobNotFound, match="no job named 'nosuchjob'"):
        kiln.wait("nosuchjob", timeout_s=60, progress=False)
    with pytest.raises(JobNotFound):
        kiln.results("nosuchjob")
    with pytest.raises(JobNotFound):
        kiln.export("nosuchjob", tmp_path / "r.csv")
    assert not (tmp_path / "r.csv").exists()


def test_label_says_when_no_worker_takes_a_chunk(private_redis_url, tmp_path):
    """No worker consumes this database: after 30 s, one line says what to check, and `label`
    keeps waiting (here until its --timeout)."""
    done = producer("label", str(SAMPLES / "coffee.jpg"), "--out", str(tmp_path / "r.csv"), "--timeout", "45",
                    "--no-progress", KILN_REDIS_URL=private_redis_url)  # fmt: skip
    assert done.returncode == 2, done.stderr
    notes = [line for line in done.stderr.splitlines() if "no worker has taken a chunk yet" in line]
    assert len(notes) == 1, done.stderr
    assert f"KILN_REDIS_URL={private_redis_url}" in notes[0] and "kiln.bulk" in notes[0]
    # it kept waiting until the timeout, which counts from the start (enqueuing included)
    assert "0 of 1 images after --timeout 45 s; the workers go on with it: `kiln wait job-" in done.stderr


def test_export_topk_bounds(lite0_worker, tmp_path):
    env = {"KILN_REDIS_URL": lite0_worker.redis_url}
    labelled = producer("label", str(SAMPLES / "coffee.jpg"), "--job", "three", "--topk", "3",
                        "--out", str(tmp_path / "l.csv"), "--no-progress", **env)  # fmt: skip
    assert labelled.returncode == 0, labelled.stderr
    for bad in ("0", "-2", "x"):
        refused = producer("export", "three", "--topk", bad, "--out", str(tmp_path / "r.csv"), **env)
        assert refused.returncode == 2 and "--topk" in refused.stderr, refused.stderr
    wide = producer("export", "three", "--topk", "9", "--out", str(tmp_path / "wide.csv"), **env)
    assert wide.returncode == 0 and "job three has 3 labels per image" in wide.stderr, wide.stderr
    header = next(csv.reader((tmp_path / "wide.csv").open()))
    assert "label_3" in header and "label_4" not in header
    default = producer("export", "three", "--out", str(tmp_path / "default.csv"), **env)
    assert default.returncode == 0 and "note" not in default.stderr
    assert "label_3" in next(csv.reader((tmp_path / "default.csv").open()))
    narrow = producer("export", "three", "--topk", "1", "--out", str(tmp_path / "narrow.csv"), **env)
    header = next(csv.reader((tmp_path / "narrow.csv").open()))
    assert narrow.returncode == 0 and "label_1" in header and "label_2" not in header


def test_label_says_what_it_skipped_also_when_it_stops_early(private_redis_url, tmp_path):
    """The summary of the files a folder's listing left out comes once, at the end, also when
    `label` gives up (here: no worker, --timeout). Before, only a completed label said it."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(SAMPLES / "coffee.jpg", folder / "coffee.jpg")
    (folder / "notes.txt").write_text("not an image")
    done = producer("label", str(folder), str(folder), "--out", str(tmp_path / "r.csv"), "--timeout", "2",
                    "--no-progress", KILN_REDIS_URL=private_redis_url)  # fmt: skip
    assert done.returncode == 2 and "0 of 1 images after --timeout 2 s" in done.stderr, done.stderr
    assert done.stderr.count("skipped 1 file without an image extension: .txt 1") == 1, done.stderr


def test_the_table_keeps_one_line_per_image(capsys):
    from producer.__main__ import print_table
    from worker.contract import Record

    records = [Record.failure("j", "/data/new\nline.jpg", "unreadable", "corrupt\nor truncated")]
    print_table(records)
    assert capsys.readouterr().out == "new\\nline.jpg                ERROR unreadable: corrupt\\nor truncated\n"


def test_export_of_an_unfinished_job_says_so(private_redis_url, tmp_path):
    """No worker consumes this database: `export` writes the records there are (none), says the
    job is not finished, where it used to say only "wrote 0 records", and exits 2, where a script
    took the partial file for the job with exit 0 (a new user's finding)."""
    env = {"KILN_REDIS_URL": private_redis_url}
    submitted = producer("submit", str(SAMPLES / "coffee.jpg"), "--job", "early", "--no-progress", **env)
    assert submitted.returncode == 0, submitted.stderr
    exported = producer("export", "early", "--out", str(tmp_path / "early.jsonl"), **env)
    assert exported.returncode == 2, exported.stderr
    assert "wrote 0 records" in exported.stderr
    assert "error: job early was not finished when the export began (0 of 1 images had records then)" in exported.stderr


def test_submit_takes_one_source_as_it_takes_a_list(private_redis_url):
    """`kiln.submit("folder")`: one source as given, not its characters (a new user's "m: no such
    file"); no source at all says so; a submission's repr does not list its images' keys."""
    with Kiln(private_redis_url) as kiln:
        one = kiln.submit(str(SAMPLES), job="one-source")
        assert one.total == len(list(SAMPLES.glob("*.jpg")))
        assert kiln.submit(SAMPLES, job="one-source").total == one.total  # a Path, the same submission
        for nothing in ([], iter(()), ()):
            with pytest.raises(SourceError, match="no inputs given"):
                kiln.submit(nothing, job="none")
        with pytest.raises(SourceError, match="the expansion holds none"):  # it waited for ever on 0 of 0
            kiln.submit(Expansion([]), job="none")
        with pytest.raises(SourceError, match="is not an input"):
            kiln.submit([None, str(SAMPLES)], job="none")
        assert "keys" not in repr(one) and "one-source" in repr(one)


def test_a_misspelt_setting_is_named_with_the_one_meant(private_redis_url, lite0_package, tmp_path):
    """pydantic-settings ignores a `KILN_*` variable it does not know: a misspelt setting used to
    be dropped in silence. The producer and the worker name it, with the closest real one; a
    producer's setting in a worker's environment (one `.env` for both) is no surprise to either."""
    env = {"KILN_REDIS_URL": private_redis_url, "KILN_BATCH_SZE": "64", "KILN_MAX_PENDING_CHUNKS": "8"}
    done = producer("status", "nojob", **env)
    assert done.returncode == 2 and "no job named 'nojob'" in done.stderr, done.stderr
    notes = [line for line in done.stderr.splitlines() if line.startswith("note:")]
    assert notes == ["note: KILN_BATCH_SZE is not a kiln setting and is ignored (did you mean KILN_BATCH_SIZE?)"]
    # The same in the .env file that settings are read from, as a new user's typo was, and went unsaid
    settings = f"KILN_REDIS_URL={private_redis_url}\nKILN_CHUNK_SZE=12\nKILN_MAX_PENDING_CHUNKS=8\n"
    (tmp_path / ".env").write_text(settings)
    environment = python_env()
    environment.pop("KILN_REDIS_URL", None)
    done = subprocess.run([PYTHON, "-m", "producer", "status", "nojob"], capture_output=True, text=True,
                          env=environment, cwd=tmp_path, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "no job named 'nojob'" in done.stderr, done.stderr  # .env's Redis, used
    notes = [line for line in done.stderr.splitlines() if line.startswith("note:")]
    assert notes == [
        "note: KILN_CHUNK_SZE (in .env) is not a kiln setting and is ignored (did you mean KILN_CHUNK_SIZE?)"
    ]
    worker = LocalWorker(lite0_package, private_redis_url, tmp_path / "w.log", [], ["--threads", "1"],
                         env=python_env(KILN_BTACH_SIZE="64", KILN_CHUNK_SIZE="16"))  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while "is not a kiln setting" not in worker.log_path.read_text() and time.monotonic() < deadline:
            worker.check()
            time.sleep(0.2)
        log = worker.log_path.read_text()
        assert "KILN_BTACH_SIZE is not a kiln setting and is ignored (did you mean KILN_BATCH_SIZE?)" in log, log
        assert "KILN_CHUNK_SIZE" not in log
    finally:
        worker.stop()


def test_progress_in_a_log_is_whole_lines(capsys, monkeypatch):
    """Where stderr is not a terminal (a CI log), the progress is a whole line now and then and
    once at the end, not a bar redrawn with carriage returns twice a second."""
    from producer import progress

    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    bar = progress.JobProgress(terminal=False)
    bar.show("job-x", 0, listed=128)
    bar.show("job-x", 64, listed=256)
    bar.show("job-x", 64, listed=256)  # nothing new: no line
    bar.write("job job-x: 256 images")
    bar.show("job-x", 256, total=256)
    bar.close()
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert lines[0].startswith("job-x: 0img") and "listed 128" in lines[0]
    assert lines[1].startswith("job-x: 64img") and "listed 256" in lines[1]
    assert lines[2] == "job job-x: 256 images"
    assert lines[3].startswith("job-x: 100%") and "256/256" in lines[3]
    assert len(lines) == 4


def test_progress_in_a_log_rates_only_what_finished_while_it_watched(capsys, monkeypatch):
    """`kiln wait` on a job half done: its rate counts the images finished since it started."""
    from producer import progress

    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    clock = iter([100.0, 110.0, 110.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    bar = progress.JobProgress(terminal=False)
    bar.show("job-x", 9000, total=10000)
    bar.show("job-x", 9500, total=10000)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert "9500/10000" in lines[1] and "50.00img/s" in lines[1], lines  # 500 in 10 s, not 9,500


def test_progress_in_a_log_never_rates_below_zero(capsys, monkeypatch):
    """A retry of failed images takes their records back: fewer finished than at the start."""
    from producer import progress

    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    clock = iter([100.0, 110.0, 120.0, 120.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    bar = progress.JobProgress(terminal=False)
    for finished in (50, 0, 10):
        bar.show("job-x", finished, total=60)
    bar.close()
    assert "-" not in "".join(line.split("]")[0].split("[")[1] for line in capsys.readouterr().err.splitlines())


def test_the_table_names_images_by_their_ends(capsys):
    """A URL by its last part, and a long name by its end, marked: the table cut file:// keys at
    28 characters with no sign of it (a new user's finding)."""
    from producer.__main__ import print_table
    from worker.contract import Record

    records = [Record.failure("j", "file:///tmp/nu/imgs/img04.jpg", "unreadable", "x"),
               Record.failure("j", "/d/holiday-2026-photo-number-000123.jpg", "unreadable", "x")]  # fmt: skip
    print_table(records)
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["…026-photo-number-000123.jpg ERROR unreadable: x", f"{'img04.jpg':28s} ERROR unreadable: x"]


def test_the_table_tells_images_of_one_name_apart(capsys):
    """Two images of one file name in different folders: named by as many of the folders as
    tell them apart (the table showed `img.jpg` twice, a new user's finding)."""
    from producer.__main__ import print_table
    from worker.contract import Record

    keys = ["/data/mixed/a/sub/img.jpg", "/data/mixed/b/sub/img.jpg", "/data/mixed/c.jpg", "/data/mixed/img.jpg"]
    print_table([Record.failure("j", key, "unreadable", "x") for key in keys])
    names = [line.split(" ERROR")[0].strip() for line in capsys.readouterr().out.splitlines()]
    assert names == ["a/sub/img.jpg", "b/sub/img.jpg", "c.jpg", "mixed/img.jpg"]


def test_export_of_an_unfinished_sharded_job_by_its_out_dir_says_so(private_redis_url, tmp_path):
    """`export JOB --out-dir URL`, the README's form for sharded jobs, reads the shards without
    Redis; while Redis still holds the job, an unfinished one exits 2 there too (a hostile
    tester's finding: it wrote the shards there were with exit 0)."""
    from worker.contract import Record
    from worker.sink import write_shard

    env = {"KILN_REDIS_URL": private_redis_url, "KILN_CHUNK_SIZE": "1"}
    out_dir = tmp_path / "shards"
    photos = [str(SAMPLES / "coffee.jpg"), str(SAMPLES / "rocket.jpg")]
    submitted = producer("submit", *photos, "--job", "halfway", "--out-dir", str(out_dir), "--no-progress", **env)
    assert submitted.returncode == 0, submitted.stderr
    tabby = [{"label": "tabby", "index": 281, "score": 0.5}]
    record = Record(job="halfway", key=photos[0], ref=photos[0], status="ok", topk=tabby)
    write_shard(str(out_dir), "halfway", "c0", [record], 5)
    exported = producer("export", "halfway", "--out-dir", str(out_dir), "--out", str(tmp_path / "h.csv"), **env)
    assert exported.returncode == 2 and "wrote 1 record" in exported.stderr, exported.stderr
    assert "job halfway was not finished when the export began (0 of 2 images had records then)" in exported.stderr
