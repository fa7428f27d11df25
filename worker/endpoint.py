"""The worker's HTTP endpoint, one per worker (its main process): `/metrics` (Prometheus text
format, every process's values aggregated), `/livez` and `/readyz` (200 or 503, with the reasons).

Started by `python -m worker` when `KILN_METRICS_PORT` is set; port 0 takes any free port and
writes it to `KILN_METRICS_PORT_FILE`.
"""

from __future__ import annotations

import atexit
import logging
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from worker import metrics
from worker.health import HealthMonitor, endpoint_folder
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in progress never holds the worker's exit


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args: Any) -> None:  # a scrape every few seconds is not news
        pass


def _queue_collector(monitor: HealthMonitor) -> Any:
    from prometheus_client.core import GaugeMetricFamily

    class QueueCollector:
        """Queue depths and broker reachability, as the health monitor last read them."""

        def collect(self) -> Iterator[Any]:
            state = monitor.state
            depth = GaugeMetricFamily(
                "kiln_queue_depth", "Messages waiting in a queue this worker consumes", labels=["queue"]
            )
            for queue, count in state.queue_depths.items():
                depth.add_metric([queue], count)
            yield depth
            yield GaugeMetricFamily(
                "kiln_broker_up", "1 if the last ping reached the broker", value=int(state.broker_ok)
            )

    return QueueCollector()


def _app(monitor: HealthMonitor, directory: Path) -> Callable[..., Iterable[bytes]]:
    from prometheus_client import CollectorRegistry, make_wsgi_app, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(directory))
    registry.register(_queue_collector(monitor))
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in ("/livez", "/readyz"):
            problems = monitor.live() if path == "/livez" else monitor.ready()
            status = "503 Service Unavailable" if problems else "200 OK"
            start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
            return [("\n".join(problems) if problems else "ok").encode() + b"\n"]
        return metrics_app(environ, start_response)

    return app


def start_endpoint(settings: WorkerSettings, children: bool = False) -> None:
    """Serve metrics and health from this process, if KILN_METRICS_PORT is set. Call before the
    model loads, and before any worker process starts (`children`: this process starts them and
    consumes nothing itself): it turns metrics on for them. Exits with status 2, saying why, where
    the port cannot be bound."""
    if settings.metrics_port is None:
        return
    directory = Path(tempfile.mkdtemp(prefix="kiln-metrics-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    metrics.enable(directory)
    monitor = HealthMonitor(settings, directory, "parent" if children else "worker")
    monitor.start()
    try:
        server = make_server(
            "", settings.metrics_port, _app(monitor, directory), server_class=_Server, handler_class=_QuietHandler
        )
    except OSError as e:  # the port is taken, or not ours to bind: say so, as for any bad setting
        print(f"error: cannot serve metrics and health on port {settings.metrics_port}: {e}; choose another port, "
              "or 0 for any free one (KILN_METRICS_PORT_FILE then says which)", file=sys.stderr)  # fmt: skip
        raise SystemExit(2) from None
    port = server.server_address[1]
    if settings.metrics_port_file:
        Path(settings.metrics_port_file).write_text(str(port))
    threading.Thread(target=server.serve_forever, name="kiln-endpoint", daemon=True).start()
    log.info("metrics and health on port %d: /metrics, /livez, /readyz", port)


def start_health_report(settings: WorkerSettings) -> None:
    """In a worker process a parent started: monitor this process and report to the parent's
    endpoint folder (inherited as PROMETHEUS_MULTIPROC_DIR), where the parent has an endpoint."""
    directory = endpoint_folder()
    if directory:
        HealthMonitor(settings, directory, "child").start()
