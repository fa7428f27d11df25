"""`python -m worker`: start a Celery worker that serves a kiln `.pt2` from Redis."""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError

from worker.eviction import EvictingRedis, check_eviction_policy
from worker.manifest import PackageError, read_manifest
from worker.settings import WorkerSettings, settings_error

EPILOG = """\
Every option has a KILN_* environment variable (e.g. KILN_REDIS_URL, KILN_MODEL,
KILN_CONCURRENCY, KILN_ALLOWED_ROOTS); options given here win. See README.md for all settings.

examples:
  KILN_REDIS_URL=redis://queue:6379/0 python -m worker --model models/efficientnet_lite0-cpu-float32.pt2 \\
      --allowed-roots /data/images
  python -m worker --model lite0-cuda.pt2 --device cuda --concurrency 4    # one process per GPU
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m worker",
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
        help="worker processes: 1 runs solo; more run one prefork child each "
        "(on CUDA, one per GPU, round robin) [default: 1]",
    )
    parser.add_argument("--threads", type=int, help="torch threads per process [default: cores / processes]")
    parser.add_argument(
        "--decode-processes", type=int, help="CPU decoding processes per worker process [default: sized to the host]"
    )
    parser.add_argument("--gpu-decode", choices=["auto", "on", "off"], help="decode JPEGs on the GPU [default: auto]")
    parser.add_argument("--queues", help="comma-separated queues [default: kiln.bulk,kiln.online]")
    parser.add_argument(
        "--allowed-roots",
        help="folders whose files jobs may reference, separated by ':' or ',', and object-store prefixes "
        "such as s3://bucket/photos/ (comma-separated) [KILN_ALLOWED_ROOTS]",
    )
    parser.add_argument("--loglevel", default="INFO", help="log level [default: INFO]")
    parser.add_argument("--metrics-port", type=int, help="serve /metrics, /livez, /readyz here [KILN_METRICS_PORT]")
    parser.add_argument(
        "--task-events", action="store_const", const=True, help="send Celery task events (Flower) [KILN_TASK_EVENTS]"
    )
    return parser


def _settings(args: argparse.Namespace) -> WorkerSettings:
    given = {
        "model": args.model,
        "redis_url": args.redis_url,
        "device": args.device,
        "concurrency": args.concurrency,
        "threads": args.threads,
        "queues": args.queues,
        "allowed_roots": args.allowed_roots,
        "decode_processes": args.decode_processes,
        "gpu_decode": args.gpu_decode,
        "metrics_port": args.metrics_port,
        "task_events": args.task_events,
    }
    return WorkerSettings(**{k: v for k, v in given.items() if v is not None})


def device_for_child(settings: WorkerSettings, package_device: str, index: int) -> str:
    """The device of prefork child `index`: GPUs round robin, so each child owns one."""
    if package_device != "cuda" or (settings.device and ":" in settings.device):
        return settings.device or package_device
    import torch

    return f"cuda:{index % max(torch.cuda.device_count(), 1)}"


def _check_redis(settings: WorkerSettings) -> None:
    """Refuse a Redis that may evict kiln's keys (worker/eviction.py). One attempt: a Redis that
    is not up yet is left to Celery's connection retries (each logged), unchecked, since
    producers check it too before they submit anything."""
    import logging

    import redis

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
    args = _parser().parse_args(argv)
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
        print(f"error: {settings_error(e, 'its option, the environment or .env')}", file=sys.stderr)
        return 2
    except (ValueError, PackageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from worker.cxx_runtime import ensure_cxx_runtime

    ensure_cxx_runtime(settings.model)  # may restart this process with the C++ runtime preloaded

    try:
        _check_redis(settings)
    except EvictingRedis as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from celery import signals

    from worker import tasks
    from worker.celery_app import make_app
    from worker.consumer import stopped_by
    from worker.endpoint import start_endpoint
    from worker.lease import node_name
    from worker.plan import tasks_in_flight
    from worker.scratch import remove_process_scratch_dir

    # Known before the app is made: the broker reserves as many chunks as the worker runs at once.
    settings = settings.model_copy(update={"tasks_in_flight": tasks_in_flight(settings, manifest.device)})
    app = make_app(settings)
    tasks.register_tasks(app, settings)
    processes = settings.concurrency
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
    start_endpoint(settings)  # metrics and health, before any process loads the model
    if processes == 1:
        try:
            state = tasks.init_process(settings, settings.device, processes)
        except PackageError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        # Threads, not solo: while one chunk's last batch runs, the next chunks' images load.
        worker_args += ["--pool=threads", f"--concurrency={state.plan.tasks_in_flight}"]
    else:
        # Load in each child, never in the parent: CUDA must not be initialised before a fork,
        # and a child forked after the parent ran torch ops can hang (FACTS.md).
        @signals.worker_process_init.connect(weak=False)
        def _load_in_child(**_: object) -> None:
            from billiard.process import current_process

            device = device_for_child(settings, manifest.device, current_process().index)
            tasks.init_process(settings, device, processes)

        signals.worker_process_shutdown.connect(lambda **_: remove_process_scratch_dir(), weak=False)
        worker_args += ["--pool=prefork", f"--concurrency={processes}"]
    # app.start, not app.worker_main: worker_main drops Celery's exit status (a worker that stopped
    # on an unrecoverable error exited with 0).
    status = app.start(worker_args) or 0
    if stopped_by:
        print(f"error: the worker stopped on an error it cannot recover from: {stopped_by[-1]}", file=sys.stderr)
        return status or 1
    if status:
        print(f"error: the worker stopped with status {status}; the reason is logged above", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
