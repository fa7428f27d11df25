"""`python -m producer`: label images through kiln, follow jobs, export results."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import redis
from kombu.exceptions import OperationalError
from pydantic import ValidationError

from producer.client import (
    JobTimeout,
    Kiln,
    ListingStopped,
    SubmittedJob,
    checked_job_name,
    job_notes,
    local_out_dir,
)
from producer.embedded import EmbeddedError, LocalWorker, embedded_redis, ensure_default_model
from producer.export import check_out_dir, check_writable
from producer.faults import describe
from producer.progress import JobProgress
from producer.settings import ProducerSettings, default_model_path
from producer.sources import Expansion, SourceError, inputs_job_id, iter_items, local_roots, object_roots, one_line
from worker.argtypes import at_least, parse_command_line, point_at_nothing, program, run_main, seconds
from worker.contract import Record
from worker.manifest import PackageError, read_manifest
from worker.settings import EnvFileError, mask_url, setting_variables, settings_error, unknown_variables
from worker.store import JobCounts

EPILOG = """\
Without KILN_REDIS_URL, `label` runs everything itself: it starts a Redis (its data kept under
KILN_DATA_DIR, so a job can resume) and a local worker, labels the images and stops both. With
KILN_REDIS_URL set, it only enqueues and waits for the workers running there.

Inputs are listed lazily and enqueued chunk by chunk as they are listed; enqueuing pauses while
the bulk queue holds KILN_MAX_PENDING_CHUNKS chunks. The progress bar shows the images done and
listed so far until the listing ends, then the total, a percentage and an ETA.

--out-dir URL (a folder, or an fsspec URL such as s3://bucket/prefix) chooses sharded mode for the
job: workers write each chunk's records as one Parquet shard, URL/JOB/part-CHUNK.parquet, and Redis
keeps counters per chunk only. Run the same command again to resume: completed chunks are skipped.
Without it, records go to the Redis result store.

examples:
  python -m producer label samples/ --out results.csv
  python -m producer label /data/photos --job photos --out-dir /shared/labels --out photos.parquet
  KILN_REDIS_URL=redis://queue:6379/0 python -m producer submit manifest.csv --job big --out-dir s3://bucket/labels
  KILN_REDIS_URL=redis://queue:6379/0 python -m producer wait big       # progress until done; exit 1 if any failed
  KILN_REDIS_URL=redis://queue:6379/0 python -m producer export big --out-dir s3://bucket/labels --out big.parquet
  python -m producer label 'photos/**/*.jpg' list.csv --job holiday --topk 3 --out holiday.parquet
  KILN_REDIS_URL=redis://queue:6379/0 python -m producer status holiday
  KILN_REDIS_URL=redis://queue:6379/0 python -m producer export holiday --out holiday.jsonl
"""


def parser() -> argparse.ArgumentParser:
    """This command's argument parser (the `kiln` launcher also tries command lines on it)."""
    parser = argparse.ArgumentParser(
        prog=program("producer"),
        description="Enqueue image-classification jobs for kiln workers and collect their results.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    label = commands.add_parser(
        "label",
        help="classify images and write the results to a file",
        description="Enqueue the images, wait for their records with a progress bar, and write them to --out. "
        "With KILN_REDIS_URL the workers there do the work; without it (the embedded mode) label starts its own "
        "Redis and a local worker. Run it again to resume: images with a record are not sent again. Exit 0 when "
        "every image was labelled, 1 when some failed (their error records are written too), 2 for an error or "
        "--timeout, 130 on Ctrl-C.",
    )
    _job_arguments(label)
    label.add_argument("--out", type=Path, required=True, help="results file: .jsonl, .csv or .parquet")
    label.add_argument("--model", type=Path, help="embedded mode: package for the local worker [KILN_MODEL]")
    label.add_argument(
        "--timeout",
        type=seconds,
        help="give up after this many seconds, enqueuing and waiting together (what was enqueued keeps running)",
    )
    label.add_argument("--no-progress", action="store_true", help="no progress bar")
    label.add_argument(
        "--show",
        type=int,
        default=20,
        help="print a table of each image's labels when the job has at most this many [default: 20]",
    )
    submit = commands.add_parser(
        "submit",
        help="enqueue images for the workers and return (needs KILN_REDIS_URL)",
        description="Enqueue the images for the workers on KILN_REDIS_URL, pausing while the queue holds "
        "KILN_MAX_PENDING_CHUNKS chunks, and print the job's name once the last chunk is enqueued; `wait JOB` "
        "follows it and `export JOB` writes its records. Run it again to resume an interrupted submission.",
    )
    _job_arguments(submit)
    submit.add_argument(
        "--timeout",
        type=seconds,
        help="give up if the bulk queue is still full after this many seconds (what was enqueued stays) "
        "[default: wait for the workers as long as it takes]",
    )
    submit.add_argument("--no-progress", action="store_true", help="no progress bar")

    wait = commands.add_parser(
        "wait",
        help="wait until every image of a job has a record, with progress (after `submit`)",
        description="Wait until every image of job JOB (on KILN_REDIS_URL) has a record, with a progress bar on "
        "stderr, then print `JOB: complete, N done, F failed, T in all`. Exit 0 when none failed, 1 when some "
        "did, 2 for an error, after --timeout (the workers go on with the job), or when the submission listing "
        "the job stopped early and what it enqueued is done, 130 on Ctrl-C. It may start while `submit` still "
        "runs: the job is complete once every submission has listed all its images.",
    )
    _job_name(wait)
    wait.add_argument(
        "--timeout", type=seconds, help="give up after this many seconds (the workers go on with the job)"
    )
    wait.add_argument("--no-progress", action="store_true", help="no progress bar")
    status = commands.add_parser(
        "status",
        help="counters of a job",
        description="Print `JOB: STATE, N done, F failed, T in all` (STATE: complete, running, or listing "
        "stopped early), and what holds the job back where the workers said so.",
    )
    _job_name(status)
    export = commands.add_parser(
        "export",
        help="write a job's results to a file",
        description="Write the records of job JOB to --out, sorted by key. Exit 2 when the job was not finished "
        "when the export began (the file holds the records there were).",
    )
    _job_name(export)
    export.add_argument("--out", type=Path, required=True, help="results file: .jsonl, .csv or .parquet")
    export.add_argument(
        "--topk", type=at_least(1), help="label columns in CSV/Parquet, at most the job's top-k [default: the job's]"
    )
    export.add_argument(
        "--out-dir",
        metavar="URL",
        help="read a sharded job's Parquet shards from URL (default: the job's own, as recorded in Redis); "
        "works once the job's Redis keys have expired",
    )
    classify = commands.add_parser(
        "classify",
        help="classify one image now, through the online queue",
        description="Send one image to the workers' online queue (ahead of bulk work) and print its record as "
        "JSON. Exit 0 for an `ok` record, 1 for an error record, 2 when no worker answered in time.",
    )
    classify.add_argument("image", help="an image file (sent inline) or a URL the workers can fetch")
    classify.add_argument("--topk", type=at_least(1), default=5, help="labels to return [default: 5]")
    classify.add_argument("--timeout", type=seconds, help="seconds to wait for the answer [KILN_ONLINE_TIMEOUT_S]")
    for command in commands.choices.values():
        command.set_defaults(command_parser=command)  # for parse_command_line
    return parser


def _job_name(command: argparse.ArgumentParser) -> None:
    command.add_argument("job", metavar="JOB", help="the job's name, as `submit` printed it")


def _job_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "inputs", nargs="+", metavar="PATH", help="folders, image files, globs, URLs, CSV/JSONL manifests"
    )
    command.add_argument("--topk", type=at_least(1), default=5, help="labels per image [default: 5]")
    command.add_argument(
        "--job",
        help="job name; the same name again resumes it, or adds new images to it [default: derived from the inputs]",
    )
    command.add_argument(
        "--out-dir",
        metavar="URL",
        help="sharded mode: workers write the records as Parquet shards under URL/JOB/ (a folder, or an fsspec "
        "URL such as s3://bucket/prefix); Redis keeps counters per chunk only [default: the Redis result store]",
    )
    command.add_argument(
        "--retry-failed", action="store_true", help="also enqueue images whose record is an error (not with --out-dir)"
    )


def _out(text: str) -> None:
    """Print a line of the command's output. A reader that went away (`kiln wait J | head -0`) is
    not the job's failure: the rest goes nowhere, and the exit status still says how the job went
    (it was `error: [Errno 32] Broken pipe` and exit 2)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:  # and no second error when Python flushes stdout at exit
        point_at_nothing(sys.stdout)


def print_table(records: list[Record], topk: int = 5) -> None:
    """Top-k per image, one line each, sorted by key, named by the end of its key: its last part,
    and as many parts before it as tell it apart from the others' (`a/img.jpg`, `b/img.jpg`)."""
    names = _short_names([record.key for record in records])
    for record in sorted(records, key=lambda r: r.key):
        name = one_line(names[record.key] or record.key)
        if len(name) > 28:  # its end tells images apart: the start gives way
            name = "…" + name[-27:]
        if record.status == "ok":
            text = " | ".join(f"{x.label} {x.score:.2f}" for x in record.topk[:topk])
        else:
            text = f"ERROR {record.error.kind}: {record.error.message}"
        _out(f"{name:28s} {one_line(text)}")


def _short_names(keys: list[str]) -> dict[str, str]:
    """Each key's last `/`-separated parts, as few as make it unique among `keys`."""
    parts = {key: key.rstrip("/").split("/") for key in keys}
    depth = dict.fromkeys(keys, 1)
    while True:
        names = {key: "/".join(parts[key][-depth[key] :]) for key in keys}
        seen = Counter(names.values())
        clashing = [key for key in keys if seen[names[key]] > 1 and depth[key] < len(parts[key])]
        if not clashing:
            return names
        for key in clashing:
            depth[key] += 1


def _label(args: argparse.Namespace, settings: ProducerSettings) -> int:
    check_writable(args.out)  # refuse a bad --out before any work
    job = checked_job_name(args.job or inputs_job_id(args.inputs))  # as `Kiln.submit` names it
    if args.out_dir:
        check_out_dir(local_out_dir(args.out_dir), job)  # and a folder for shards that could not be read back here
    with contextlib.ExitStack() as stack:
        check = None
        if settings.redis_url:
            if args.model:
                raise ValueError("--model only applies to the embedded mode: with KILN_REDIS_URL, the workers choose")
        else:
            model = args.model or settings.model or ensure_default_model(default_model_path())
            if not Path(model).is_file():  # before Redis and the worker start, and say they did
                raise ValueError(f"{Path(model).absolute()}: no such package (--model, KILN_MODEL)")
            url = stack.enter_context(embedded_redis(settings.data_dir))
            # Listing passes first, for the folders and prefixes the local worker may read: each
            # holds one entry per folder, not per image.
            roots = local_roots(iter_items(args.inputs)) + object_roots(iter_items(args.inputs))
            # Its Redis dies with this process: a worker left without it exits at once.
            worker = LocalWorker(model, url, settings.data_dir / "worker.log", roots, ["--exit-with-parent"])
            stack.callback(worker.stop)
            settings = settings.model_copy(update={"redis_url": url})
            check = worker.check
            print(
                f"embedded mode: Redis and a local worker ({model.name}); data in {settings.data_dir}", file=sys.stderr
            )
        kiln = stack.enter_context(Kiln(settings=settings))
        if check is not None:
            _check_job_model(kiln, job, model)
        bar = JobProgress(not args.no_progress)
        stack.callback(bar.close)
        deadline = None if args.timeout is None else time.monotonic() + args.timeout
        submitted = _submit(kiln, args, bar)
        try:  # from the job's line on, Ctrl-C says what it means for the job (a test sends it then)
            _say_submitted(submitted, bar, say_skipped=False)  # skipped files: said once, at the end
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                counts = kiln.wait(submitted, timeout_s=left, progress=bar, check=check)
            except JobTimeout as e:  # said against the whole --timeout, not the part left to wait
                then = (
                    f"the workers go on with it: `kiln wait {submitted.id}` follows it, "
                    f"`kiln export {submitted.id} --out PATH` writes its records"
                    if check is None
                    else "run the same `kiln label` again to go on from there"
                )
                raise _after_timeout(e, submitted.id, args.timeout, then) from None
            bar.close()
            try:
                written = kiln.export(submitted, args.out, args.topk)
            except OSError as e:
                raise OSError(
                    f"{e}. The records are safe in job {submitted.id}: write them with "
                    f"`kiln export {submitted.id} --out PATH`"
                ) from e
            # The records are written: a Ctrl-C would stop only the table and the embedded worker's
            # and Redis's stop (20 s at most), and said "run the same command again to resume"
            # (a hostile tester's finding).
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            if submitted.out_dir is None and counts.total <= args.show:
                print_table(kiln.results(submitted), args.topk)
            by = kiln.counts(submitted.id).model
            done = (
                f"{counts.done} labelled, {counts.failed} failed{f' by {by}' if by else ''}; "
                f"wrote {_count(written, 'record')} to {args.out}"
            )
            print(done, file=sys.stderr)
        except KeyboardInterrupt:  # while it waits or exports
            if check is None:  # running the same `label` again would enqueue the queued images twice
                raise KeyboardInterrupt(
                    f"the workers go on with job {submitted.id}: `kiln wait {submitted.id}` follows it, "
                    f"`kiln export {submitted.id} --out PATH` writes its records"
                ) from None
            raise
        finally:  # also after a timeout, Ctrl-C or a failed export: what the listing left out
            bar.close()
            if submitted.skipped:
                print(Expansion([], submitted.skipped).skipped_summary(), file=sys.stderr)
    return 0 if counts.failed == 0 else 1


def _check_job_model(kiln: Kiln, job: str, package: Path) -> None:
    """Embedded mode: refuse a job whose records come from another model than the local worker's.
    Its default name comes from the inputs, so labelling them again with another model resumed
    the old job: its records came back with exit 0, or, unfinished, it waited for ever on chunks
    the local worker gives back (a hostile tester's finding)."""
    bound = kiln.counts(job).model  # None for a job not in Redis yet
    if bound is not None and bound != (mine := read_manifest(package).model_key):
        raise ValueError(
            f"job {job} holds the records of {bound}, and this run's worker serves {mine}: give another --job "
            "(the default name comes from the inputs, not the model)"
        )


def _submit(kiln: Kiln, args: argparse.Namespace, bar: JobProgress) -> SubmittedJob:
    """Enqueue the inputs (streamed, with backpressure), drawing on `bar`."""
    return kiln.submit(
        args.inputs,
        job=args.job,
        topk=args.topk,
        retry_failed=args.retry_failed,
        out_dir=args.out_dir,
        progress=bar,
        timeout_s=args.timeout,
    )


def _say_submitted(submitted: SubmittedJob, bar: JobProgress, say_skipped: bool = True) -> None:
    """Say what was enqueued and, with `say_skipped`, which files the listing left out."""
    resumed = submitted.total - submitted.enqueued
    others = submitted.job_total - submitted.total if submitted.out_dir is None else 0
    bar.write(
        f"job {submitted.id}: {_count(submitted.total, 'image')}"
        + (f" ({resumed} already done)" if resumed else "")
        + (
            f"; {submitted.failed_before} of those failed before: --retry-failed runs them again"
            if submitted.failed_before
            else ""
        )
        + (f"; the job also holds {_count(others, 'image')} of other submissions" if others > 0 else "")
        + (f"; shards in {submitted.out_dir}/{submitted.id}/" if submitted.out_dir else "")
    )
    if say_skipped and submitted.skipped:
        bar.write(Expansion([], submitted.skipped).skipped_summary())


def _wait(kiln: Kiln, args: argparse.Namespace) -> int:
    """`wait JOB`: 0 once every image has a record and none failed, 1 if some failed; a timeout
    raises JobTimeout (exit 2), saying that the workers go on."""
    bar = JobProgress(not args.no_progress)
    with contextlib.closing(bar):
        try:
            counts = kiln.wait(args.job, timeout_s=args.timeout, progress=bar)
        except JobTimeout as e:
            then = (
                f"the workers go on with it: `kiln wait {args.job}` again, or `kiln export {args.job} --out PATH` "
                "for what is done"
            )
            raise _after_timeout(e, args.job, args.timeout, then) from None
    _out(f"{args.job}: complete, {counts.done} done, {counts.failed} failed, {counts.total} in all")
    _why_failed(kiln, args.job, counts.failed)
    return 0 if counts.failed == 0 else 1


def _why_failed(kiln: Kiln, job: str, failed: int) -> None:
    """Why images failed, by error kind (from the records of the first thousand: the counters do
    not say), where to read each one's reason, and how to run them again."""
    if not failed:
        return
    kinds = kiln.failure_kinds(job)
    if kinds:  # a Redis-store job
        read = sum(kinds.values())
        of = "" if read == failed else f" (the first {read})"
        print(f"failed{of}: " + ", ".join(f"{n} {kind}" for kind, n in kinds.most_common()), file=sys.stderr)
    print(f"the failed images' records say why: `kiln export {job} --out FILE`", file=sys.stderr)
    if kinds:
        print(f"once the cause is fixed, `kiln submit ... --job {job} --retry-failed` runs them again", file=sys.stderr)


def _after_timeout(error: JobTimeout, job: str, timeout: float, then: str) -> JobTimeout:
    """`error` said against the command's --timeout, with what to do next (`then`)."""
    return JobTimeout(
        f"job {job}: {error.progress} after --timeout {timeout:g} s; {then}",
        error.finished,
        error.total,
        error.total_is_final,
    )


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _classify_input(kiln: Kiln, image: str) -> bytes | str:
    """The bytes of a local image file (sent inline), or a URL as given. Raises ValueError for a
    local path that is missing or not a file: the workers could not read it either."""
    if "://" in image:
        return image
    path = Path(image).expanduser()
    if not path.exists():
        raise ValueError(f"{path.absolute()}: no such file")
    if not path.is_file():
        raise ValueError(f"{path.absolute()}: not a file (classify takes one image; use `label` for a folder)")
    kiln.check_inline(path.stat().st_size)  # before reading a huge file into memory
    return path.read_bytes()


def _counts_at_once(kiln: Kiln, job: str) -> JobCounts | None:
    """The job's counters where Redis answers at once and holds the job, else None: shards are
    read without Redis, also after its keys expired or with Redis away."""
    try:
        return kiln.store.counts(job) if kiln.store.exists(job) else None
    except redis.RedisError:
        return None


def _export_topk(kiln: Kiln, args: argparse.Namespace) -> int:
    """The label columns to export: the job's top-k, or fewer if asked; more would be empty."""
    job_topk = kiln.job_topk(args.job) or 5
    if args.topk is not None and args.topk > job_topk:
        print(
            f"note: job {args.job} has {job_topk} labels per image; writing {job_topk} label columns", file=sys.stderr
        )
    return job_topk if args.topk is None else min(args.topk, job_topk)


def main(argv: list[str] | None = None) -> int:
    args = parse_command_line(parser(), argv)
    try:
        settings = ProducerSettings()
    except ValidationError as e:
        print(f"error: {settings_error(e)}", file=sys.stderr)
        return 2
    except EnvFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in unknown_variables(setting_variables()):
        print(f"note: {line}", file=sys.stderr)
    try:
        if args.command == "label":
            return _label(args, settings)
        with Kiln(settings=settings) as kiln:
            shards_given = args.command == "export" and args.out_dir
            if args.command in ("status", "export") and not shards_given and not kiln.exists(args.job):
                raise ValueError(f"no job named {args.job!r} in {settings.redis_url}")
            if args.command == "submit":
                bar = JobProgress(not args.no_progress)
                with contextlib.closing(bar):
                    submitted = _submit(kiln, args, bar)
                    _say_submitted(submitted, bar)
                _out(submitted.id)
            if args.command == "wait":
                return _wait(kiln, args)
            if args.command == "status":
                counts = kiln.counts(args.job)
                state = (
                    "complete" if counts.complete
                    else "listing stopped early (run its submission again)" if counts.listing == "stopped"
                    else "running (its submission's heartbeat is late: killed, or Redis was away)"
                    if counts.listing == "lapsed"
                    else "running"
                )  # fmt: skip
                _out(f"{args.job}: {state}, {counts.done} done, {counts.failed} failed, {counts.total} in all")
                _why_failed(kiln, args.job, counts.failed)
                for note in job_notes(args.job, counts):
                    _out(note)
            elif args.command == "export":
                # Shards carry their own label columns, and are read without Redis.
                topk = 5 if shards_given else _export_topk(kiln, args)
                # Read first: it may finish meanwhile. Shards named by --out-dir are checked too where
                # Redis answers and still holds their job (a script exported right after submit, exit 0).
                counts = _counts_at_once(kiln, args.job) if shards_given else kiln.counts(args.job)
                written = kiln.export(args.job, args.out, topk, out_dir=args.out_dir)
                print(f"wrote {_count(written, 'record')} to {args.out}", file=sys.stderr)
                if counts is not None and not counts.complete:
                    # Exit 2: a script must not take the file for the whole job.
                    then = (
                        "run its submission again to enqueue the rest (its listing stopped early), then export it"
                        if counts.listing == "stopped"
                        else f"export it again once `kiln status {args.job}` says complete"
                    )
                    print(
                        f"error: job {args.job} was not finished when the export began ({counts.finished} of "
                        f"{counts.total} images had records then), so {args.out} may lack some: {then}",
                        file=sys.stderr,
                    )
                    return 2
            elif args.command == "classify":
                record = kiln.classify(_classify_input(kiln, args.image), topk=args.topk, timeout_s=args.timeout)
                _out(record.model_dump_json(indent=2, exclude_none=True))
                return 0 if record.status == "ok" else 1
        return 0
    except (redis.RedisError, OperationalError) as e:  # one the retries did not describe
        print(f"error: {describe(e, settings.redis_url or '')}", file=sys.stderr)
        return 2
    except (SourceError, EmbeddedError, PackageError, ValueError, OSError, TimeoutError, ListingStopped) as e:
        print(f"error: {mask_url(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if e.args:  # said where it was caught
            print(f"interrupted: {e.args[0]}", file=sys.stderr)
        elif args.command == "wait":
            print(f"interrupted: the workers go on with job {args.job}; `kiln wait {args.job}` follows it again",
                  file=sys.stderr)  # fmt: skip
        else:
            print("interrupted: records written so far are kept; run the same command again to resume",
                  file=sys.stderr)  # fmt: skip
        return 130


if __name__ == "__main__":
    sys.exit(run_main(main))
