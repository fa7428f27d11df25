"""A real HTTP server on loopback for reference-fetching tests: serves a folder, plus a few
paths that misbehave (slow, lying about its length)."""

from __future__ import annotations

import functools
import http.server
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class _Handler(http.server.SimpleHTTPRequestHandler):
    delay_s = 0.0

    def do_GET(self) -> None:
        time.sleep(self.delay_s)
        if self.path == "/slow":
            time.sleep(3)
        if self.path == "/huge":
            self.send_response(200)
            self.send_header("Content-Length", str(10**12))
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def serve_folder(folder: Path, delay_s: float = 0.0) -> Iterator[str]:
    """Serve `folder` on 127.0.0.1 at a free port, answering each request after `delay_s`; yields
    the base URL."""
    handler = functools.partial(type("Handler", (_Handler,), {"delay_s": delay_s}), directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
