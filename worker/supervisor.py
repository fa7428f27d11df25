"""Several worker processes on one host, started and watched by `python -m worker`.

Each child is a whole worker: `python -m worker` again, with the same options and its index
(`--worker-index`), so it loads the package on its own device, plans its share of the host's
cores and consumes from Redis with chunk tasks on threads. Why whole workers rather than Celery's
prefork pool: a prefork child runs one chunk task at a time, too few images to fill a GPU's
batches, and why several per GPU: one process's GIL bounds how fast it feeds a GPU (worker/plan.py
has the figures).

The parent loads no model and touches no GPU. It serves the metrics and health endpoint (the
children write their metrics and health reports to its folder), turns SIGTERM or SIGINT into a
warm shutdown of every child (a second one: a cold shutdown), and starts a child again when it
dies while the others serve: a CUDA fault ends its process on purpose (worker/pipeline.py), and
its unacknowledged chunks go to the other workers meanwhile. A child that stops with status 2 (a
bad package or setting), or that dies within `EARLY_EXIT_S` of its start `EARLY_EXITS` times in a
row, stops them all: starting it again would only fail again.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from types import FrameType

log = logging.getLogger(__name__)

EARLY_EXIT_S = 30.0
EARLY_EXITS = 3
RESTART_DELAY_S = 1.0
POLL_S = 0.2


@dataclass
class _Child:
    index: int
    command: list[str]
    process: subprocess.Popen | None = None  # None: not running (stopped, or waiting for `restart_at`)
    started: float = 0.0
    restart_at: float = 0.0
    early_exits: int = 0  # exits in a row, each within EARLY_EXIT_S of its start
    status: int | None = None  # the last exit status

    def start(self) -> None:
        self.process = subprocess.Popen(self.command)
        self.started = time.monotonic()
        log.info("worker process %d started (pid %d)", self.index, self.process.pid)


def child_command(argv: list[str], index: int, processes: int) -> list[str]:
    """`python -m worker` with the parent's options and this child's place: the later options win."""
    return [sys.executable, "-m", "worker", *argv, "--worker-index", str(index), "--concurrency", str(processes)]


def supervise(argv: list[str], processes: int) -> int:
    """Run `processes` children of `python -m worker *argv` until they stop; returns the exit
    status: 0 after a shutdown that every child completed, else the first failing child's."""
    children = [_Child(i, child_command(argv, i, processes)) for i in range(processes)]
    signals_received: list[int] = []

    def on_signal(signum: int, _: FrameType | None) -> None:
        signals_received.append(signum)
        # Celery: SIGTERM is a warm shutdown (finish the running chunks), SIGQUIT a cold one.
        forwarded = signal.SIGTERM if len(signals_received) == 1 else signal.SIGQUIT
        log.info("%s: %s shutdown of %d worker processes", signal.Signals(signum).name,
                 "warm" if forwarded == signal.SIGTERM else "cold", processes)  # fmt: skip
        for child in children:
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(forwarded)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for child in children:
            child.start()
        log.info("%d worker processes started; each logs its own plan", processes)
        return _watch(children, signals_received)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _watch(children: list[_Child], signals_received: list[int]) -> int:
    failure: int | None = None
    while True:
        stopping = bool(signals_received) or failure is not None
        now = time.monotonic()
        for child in children:
            if child.process is None:
                if not stopping and now >= child.restart_at:
                    child.start()
                continue
            status = child.process.poll()
            if status is None:
                continue
            child.process, child.status = None, status
            if stopping:
                continue
            child.early_exits = child.early_exits + 1 if now - child.started < EARLY_EXIT_S else 0
            if status == 2 or child.early_exits >= EARLY_EXITS:
                why = "a bad package or setting" if status == 2 else f"{child.early_exits} times soon after its start"
                log.error("worker process %d stopped with status %d (%s): stopping them all", child.index, status, why)
                failure = status or 1
                for other in children:
                    if other.process is not None:
                        other.process.send_signal(signal.SIGTERM)
                break
            log.error("worker process %d exited with status %d: starting it again", child.index, status)
            child.restart_at = now + RESTART_DELAY_S
        if (signals_received or failure is not None) and all(child.process is None for child in children):
            break
        time.sleep(POLL_S)
    if failure is not None:
        return failure
    stopped_as_asked = (None, 0, -signal.SIGTERM, -signal.SIGINT, -signal.SIGQUIT)
    return next((child.status for child in children if child.status not in stopped_as_asked), 0)
