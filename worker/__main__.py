"""`python -m worker`: start a Celery worker that serves a kiln `.pt2` from Redis."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import TYPE_CHECKING, get_args

from worker.process_signals import exit_if_stopped, exit_on_stop_until_ready, hold_until_ready, stop_status

if TYPE_CHECKING:
    from worker.settings import WorkerSettings

EPILOG = """\
Every option but --loglevel has a KILN_* environment variable (e.g. KILN_REDIS_URL, KILN_MODEL,
KILN_CONCURRENCY, KILN_ALLOWED_ROOTS); options given here win. See README.md for all settings.

examples:
  KILN_REDIS_URL=redis://queue:6379/0 python -m worker --model models/efficientnet_lite0-cpu-float32.pt2 \\
      --allowed-roots /data/images
  python -m worker --model resnet18-cuda.pt2          # on a GPU host: 4 processes per GPU on 16 cores each
  python -m worker --model lite0-cpu.pt2 --concurrency 2 --threads 4   # two processes, 4 torch threads each
"""


def parser() -> argparse.ArgumentParser:
    """This command's argument parser (the `kiln` launcher also tries command lines on it)."""
    from worker.argtypes import program
    from worker.settings import WorkerSettings

    def choices(field: str) -> tuple[str, ...]:  # the settings' own Literal: one list of names
        return get_args(WorkerSettings.model_fields[field].annotation)

    parser = argparse.ArgumentParser(
        prog=program("worker", "kiln worker"),
        description="Serve image-classification jobs from Redis with a compiled kiln package. Each worker "
        "process loads the package once; run as many workers on as many hosts as you like.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", help="the .pt2 package to serve [KILN_MODEL]")
    parser.add_argument("--redis-url", help="Redis broker and result store [KILN_REDIS_URL]")
    parser.add_argument("--device", help="cpu, cuda or cuda:N [default: the package's device]")
    parser.add_argument(
        "--concurrency",
        type=int,
        help="worker processes on this host, each a whole worker (GPUs round robin) [KILN_CONCURRENCY; default: 1 "
        "on the CPU; with a CUDA package, --processes-per-gpu for each GPU]",
    )
    parser.add_argument(
        "--processes-per-gpu",
        type=int,
        help="worker processes per GPU when --concurrency is not given [KILN_PROCESSES_PER_GPU; default: one per 4 "
        "cores of a GPU's share of the host, at most 4]",
    )
    # Set by a parent worker for each worker process it starts (worker/supervisor.py); --parent-pid
    # also by any process that starts a worker it must not outlive (producer/embedded.py).
    parser.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    # The embedded mode's: its Redis dies with the producer, so a worker whose parent is gone has
    # nothing a warm shutdown could finish (it would retry writing its chunks for
    # KILN_REDIS_RETRY_S); passed on to a supervisor's worker processes with the other options.
    parser.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--threads", type=int, help="torch threads per process [KILN_THREADS; default: cores / processes, 1 on a GPU]"
    )
    parser.add_argument(
        "--decode-processes",
        type=int,
        help="CPU decoding processes per worker process [KILN_DECODE_PROCESSES; default: 0 on the CPU; on a GPU, "
        "the cores left once each worker process has one, shared among them]",
    )
    parser.add_argument(
        "--gpu-decode",
        choices=choices("gpu_decode"),
        help="decode JPEGs on the GPU, with a CUDA package [KILN_GPU_DECODE, default: auto]",
    )
    parser.add_argument(
        "--gpu-decoder",
        choices=choices("gpu_decoder"),
        help="the GPU JPEG decoder, where JPEGs are decoded on the GPU; nvimgcodec needs pip install 'kiln[gpu]'; "
        "auto takes it where it is installed and each GPU has two worker processes or more [KILN_GPU_DECODER, "
        "default: auto]",
    )
    parser.add_argument("--queues", help="comma-separated queues [default: kiln.bulk,kiln.online]")
    parser.add_argument(
        "--allowed-roots",
        help="folders whose files jobs may reference, separated by ':' or ',', and object-store prefixes "
        "such as s3://bucket/photos/ (comma-separated) [KILN_ALLOWED_ROOTS]",
    )
    parser.add_argument("--loglevel", default="INFO", help="log level [default: INFO]")
    parser.add_argument(
        "--metrics-port",
        type=int,
        help="serve /metrics, /livez, /readyz on this port; 0: any free one, written to KILN_METRICS_PORT_FILE "
        "[KILN_METRICS_PORT]",
    )
    parser.add_argument(
        "--task-events", action="store_const", const=True, help="send Celery task events (Flower) [KILN_TASK_EVENTS]"
    )
    return parser


def _settings(args: argparse.Namespace) -> WorkerSettings:
    from worker.settings import WorkerSettings

    given = {
        "model": args.model,
        "redis_url": args.redis_url,
        "device": args.device,
        "concurrency": args.concurrency,
        "processes_per_gpu": args.processes_per_gpu,
        "threads": args.threads,
        "queues": args.queues,
        "allowed_roots": args.allowed_roots,
        "decode_processes": args.decode_processes,
        "gpu_decode": args.gpu_decode,
        "gpu_decoder": args.gpu_decoder,
        "metrics_port": args.metrics_port,
        "task_events": args.task_events,
    }
    return WorkerSettings(**{k: v for k, v in given.items() if v is not None})


def gpus_used(settings: WorkerSettings, package_device: str) -> int:
    """GPUs this host's worker processes share: 0 on the CPU, 1 where a device index is given."""
    if (settings.device or package_device).split(":")[0] != "cuda":
        return 0
    if settings.device and ":" in settings.device:
        return 1
    import torch

    return torch.cuda.device_count()  # no CUDA context: the worker processes are new processes, not forks


def device_for_process(settings: WorkerSettings, package_device: str, index: int, gpus: int) -> str:
    """The device of worker process `index` on this host of `gpus` (`gpus_used`): GPUs round robin,
    so each process has one."""
    if package_device != "cuda" or (settings.device and ":" in settings.device):
        return settings.device or package_device
    return f"cuda:{index % max(gpus, 1)}"


def _check_redis(settings: WorkerSettings) -> None:
    """Refuse a Redis that may evict kiln's keys (worker/eviction.py). One attempt: a Redis that
    is not up yet is left to Celery's connection retries (each logged), unchecked, since
    producers check it too before they submit anything."""
    import redis

    from worker.eviction import check_eviction_policy

    timeout = settings.redis_timeout_s
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        check_eviction_policy(client, settings.allow_evicting_redis)
    except redis.RedisError as e:
        logging.getLogger("worker").warning(
            "could not read Redis's maxmemory-policy (%s: %s); it is not checked for this start", type(e).__name__, e
        )
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    hold_until_ready()  # first, before any thread starts and before the slow imports
    exit_on_stop_until_ready()  # no default action ends it from here on
    args = parser().parse_args(argv)

    from pydantic import ValidationError

    from worker.eviction import EvictingRedis
    from worker.manifest import PackageError, read_manifest
    from worker.settings import setting_variables, settings_error, unknown_variables

    if args.parent_pid is not None:  # a parent killed while this process starts stops it too
        from worker.supervisor import stop_with_parent

        stop_with_parent(args.parent_pid, at_once=args.exit_with_parent)
    if args.worker_index is not None:  # its log lines say which of the host's worker processes wrote them
        import multiprocessing

        multiprocessing.current_process().name = f"worker-{args.worker_index}"
    logging.basicConfig(
        level=args.loglevel.upper(), format="[%(asctime)s: %(levelname)s/%(processName)s] %(name)s: %(message)s"
    )
    try:
        settings = _settings(args)
        if not settings.model:
            raise ValueError("no model: pass --model PATH.pt2 (or set KILN_MODEL)")
        if not settings.redis_url:
            raise ValueError("no Redis: pass --redis-url or set KILN_REDIS_URL (e.g. redis://localhost:6379/0)")
        manifest = read_manifest(settings.model)
    except ValidationError as e:
        print(f"error: {settings_error(e, 'the command line, the environment or .env')}", file=sys.stderr)
        return 2
    except (ValueError, PackageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from worker.cxx_runtime import ensure_cxx_runtime
    from worker.fetch import roots_notes

    ensure_cxx_runtime(settings.model)  # may restart this process with the C++ runtime preloaded
    if args.worker_index is None:  # said once, by the process the user started
        for line in unknown_variables(setting_variables()):
            logging.getLogger("worker").warning("%s", line)
        said, *notes = roots_notes(settings.allowed_roots)
        logging.getLogger("worker").log(logging.INFO if settings.allowed_roots else logging.WARNING, "%s", said)
        for line in notes:
            logging.getLogger("worker").warning("%s", line)

    try:
        _check_redis(settings)
    except EvictingRedis as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from worker.endpoint import start_endpoint
    from worker.plan import host_cores, tasks_in_flight, worker_processes

    gpus = gpus_used(settings, manifest.device)
    processes = worker_processes(settings, manifest.device, gpus, host_cores())
    if args.worker_index is not None and not 0 <= args.worker_index < processes:
        print(f"error: --worker-index {args.worker_index} is not one of {processes} worker processes", file=sys.stderr)
        return 2
    if processes > 1 and args.worker_index is None:
        from worker.supervisor import child_commands, supervise

        start_endpoint(settings, children=True)  # before the children start: they report to its folder
        exit_if_stopped()
        return supervise(child_commands(sys.argv[1:] if argv is None else argv, processes))

    from celery.signals import worker_shutting_down

    from worker import tasks
    from worker.celery_app import make_app
    from worker.consumer import stopped_by
    from worker.endpoint import start_health_report
    from worker.lease import node_name

    # Known before the app is made: the broker reserves as many chunks as the worker runs at once.
    settings = settings.model_copy(update={"tasks_in_flight": tasks_in_flight(settings, manifest.device)})
    app = make_app(settings)
    tasks.register_tasks(app, settings)
    worker_args = [
        "worker",
        f"--hostname={node_name()}",
        f"--queues={','.join(settings.queues)}",
        f"--loglevel={args.loglevel}",
        "--without-mingle",
        "--without-gossip",
    ]
    if settings.task_events:
        worker_args.append("--task-events")
    if args.worker_index is None:
        start_endpoint(settings)  # metrics and health, before the model loads
    else:
        start_health_report(settings)  # to the parent's endpoint, where it has one
    device = device_for_process(settings, manifest.device, args.worker_index or 0, gpus)
    try:
        exit_if_stopped()
        state = tasks.init_process(settings, device, processes)
    except PackageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Threads, not solo: while one chunk's last batch runs, the next chunks' images load.
    # (worker/pool.py: Celery's thread pool, whose cold shutdown completes; app.conf.worker_pool)
    worker_args += [f"--concurrency={state.plan.task_threads}"]
    # After a stop signal the status is `stop_status`'s, not Celery's (0 after its cold shutdown).
    shutdowns: list[tuple[str, str]] = []  # (signal name, "Warm" or "Cold"), as Celery announces them
    worker_shutting_down.connect(lambda sig, how, **_: shutdowns.append((sig, how)), weak=False)
    # app.start, not app.worker_main: worker_main drops Celery's exit status (a worker that stopped
    # on an unrecoverable error exited with 0).
    exit_if_stopped()  # from here Celery's handlers take over (KilnWorker passes a late stop on)
    try:
        status = app.start(worker_args) or 0
    finally:  # Celery has stopped its task threads: the decode processes and their shared memory go
        state.pipeline.close()
    if stopped_by:
        print(f"error: the worker stopped on an error it cannot recover from: {stopped_by[-1]}", file=sys.stderr)
        return status or 1
    if shutdowns:
        cold = [signal.Signals[sig] for sig, how in shutdowns if how == "Cold"]
        return stop_status(cold[0] if cold else None)
    if status:
        print(f"error: the worker stopped with status {status}; the reason is logged above", file=sys.stderr)
    return status


if __name__ == "__main__":
    from worker.argtypes import run_main

    sys.exit(run_main(main))
