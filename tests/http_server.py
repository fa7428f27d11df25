"""A real HTTP server on loopback for reference-fetching tests: serves a folder, plus a few
paths that misbehave (slow, lying about its length, redirecting, dripping bytes)."""

from __future__ import annotations

import functools
import http.server
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DRIP_BYTES = 40  # one every DRIP_INTERVAL_S: a slow server that does finish, eventually
DRIP_INTERVAL_S = 0.5


class _Handler(http.server.SimpleHTTPRequestHandler):
    delay_s = 0.0
    gate: threading.Event | None = None
    seen: list[str] | None = None

    def do_GET(self) -> None:
        if self.seen is not None:
            self.seen.append(self.path)
        time.sleep(self.delay_s)
        if self.gate is not None:
            self.gate.wait()
        path, _, query = self.path.partition("?")
        if path == "/slow":
            time.sleep(3)
        if path == "/huge":
            self.send_response(200)
            self.send_header("Content-Length", str(10**12))
            self.end_headers()
            return
        if path == "/redirect":  # /redirect?to=URL
            self.send_response(302)
            self.send_header("Location", urllib.parse.parse_qs(query)["to"][0])
            self.end_headers()
            return
        if path in ("/drip-body", "/drip-headers"):
            self._drip(headers_first=path == "/drip-body")
            return
        super().do_GET()

    def _drip(self, headers_first: bool) -> None:
        """Send a response (no Content-Length) one byte at a time, each read finishing quickly."""
        body = b"x" * DRIP_BYTES
        if headers_first:
            self.send_response(200)
            self.end_headers()
            payload = body
        else:
            payload = b"HTTP/1.0 200 OK\r\nX-Padding: " + body + b"\r\n\r\nbody"
            self.close_connection = True
        try:
            for i in range(len(payload)):
                self.wfile.write(payload[i : i + 1])
                self.wfile.flush()
                time.sleep(DRIP_INTERVAL_S)
        except OSError:  # the client gave up
            pass

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def serve_folder(
    folder: Path, delay_s: float = 0.0, gate: threading.Event | None = None, seen: list[str] | None = None
) -> Iterator[str]:
    """Serve `folder` on 127.0.0.1 at a free port, answering each request after `delay_s`, and
    once `gate` is set where one is given; each request's path is appended to `seen` as it comes.
    Yields the base URL."""
    attributes = {"delay_s": delay_s, "gate": gate, "seen": seen}
    handler = functools.partial(type("Handler", (_Handler,), attributes), directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
