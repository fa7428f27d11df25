"""Several worker processes on one host, started and watched by `python -m worker`.

Each child is a whole worker: `python -m worker` again, with the same options and its index
(`--worker-index`), so it loads the package on its own device, plans its share of the host's
cores and consumes from Redis with chunk tasks on threads. Why whole workers rather than Celery's
prefork pool: a prefork child runs one chunk task at a time, too few images to fill a GPU's
batches, and why several per GPU: one process's GIL bounds how fast it feeds a GPU (worker/plan.py
has the figures).

The parent loads no model and creates no CUDA context (it imports torch to count the GPUs). It
serves the metrics and health endpoint (the children write their metrics and health reports to
its folder), and:

- SIGTERM, SIGINT or SIGHUP: a warm shutdown of every child (they finish their running chunks);
  a second one kills them (their chunks go to other workers when their leases lapse), and the
  parent exits with 128 + that signal's number. SIGQUIT: a cold shutdown, as Celery's (the
  children take no more chunks and give back the ones they reserved at once; a running chunk
  finishes, since its thread cannot be stopped: worker/pool.py), exit status 131. SIGUSR1: the
  parent logs its own threads' stacks and passes it on; each child logs its own and carries on.
- A child that dies while the others serve is started again, after 1 s, then 2, 4, ... up to
  `MAX_RESTART_DELAY_S` while it keeps dying: a CUDA fault ends its process on purpose
  (worker/pipeline.py), and its unacknowledged chunks go to the other workers meanwhile. A child
  that stops with status 2 (a bad package or setting), or dies within `EARLY_EXIT_S` of its start
  `EARLY_EXITS` times in a row, stops them all: starting it again would only fail again.
- A child whose parent is gone (killed with SIGKILL, or by the OOM killer) shuts down warm on
  its own (`stop_with_parent`), so no worker outlives its supervisor; in the embedded mode,
  whose Redis died with the producer, the supervisor and its children exit at once instead.
- Processes orphaned by a dead child (its decode processes) are re-parented to the supervisor
  (a Linux child subreaper) and reaped, so none stays a zombie, also where the supervisor is a
  container's PID 1.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

from worker.process_signals import STARTING, blocked, on_sigusr1, pass_on_stop, release_when_ready, stop_status

log = logging.getLogger(__name__)

EARLY_EXIT_S = 30.0
EARLY_EXITS = 3
RESTART_DELAY_S = 1.0
MAX_RESTART_DELAY_S = 60.0
STABLE_S = 600.0  # a child that ran this long before it died starts again after RESTART_DELAY_S
POLL_S = 0.2
_PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


@dataclass
class _Child:
    index: int
    command: list[str]
    process: subprocess.Popen | None = None  # None: not running (stopped, or waiting for `restart_at`)
    started: float = 0.0
    restart_at: float = 0.0
    restarts: int = 0  # exits in a row, each within STABLE_S of its start
    early_exits: int = 0  # exits in a row, each within EARLY_EXIT_S of its start
    status: int | None = None  # the exit status of its last stop that was asked for

    def start(self) -> None:
        # Started with SIGHUP and SIGUSR1 blocked: its Python has no handler for them until
        # `hold_until_ready` runs, and SIGUSR1 passed on in that time ended it ("killed by
        # SIGUSR1"; a few in a row stopped the whole worker).
        with blocked(STARTING):
            self.process = subprocess.Popen(self.command)
        self.started = time.monotonic()
        self.status = None
        from worker.health import expect_report  # here: the decode processes import this module too

        expect_report(self.process.pid)
        log.info("worker process %d started (pid %d)", self.index, self.process.pid)


def child_commands(argv: list[str], processes: int) -> list[list[str]]:
    """`python -m worker` with the parent's options, each child's place and the parent's pid (the
    later options win)."""
    parent = ["--parent-pid", str(os.getpid()), "--concurrency", str(processes)]
    return [[sys.executable, "-m", "worker", *argv, *parent, "--worker-index", str(i)] for i in range(processes)]


def describe_exit(status: int) -> str:
    """How a child's `Popen.returncode` reads in the log."""
    if status < 0:
        return f"was killed by {signal.Signals(-status).name} (status {exit_status(status)})"
    return f"exited with status {status}"


def exit_status(status: int) -> int:
    """A child's `Popen.returncode` as a shell reports it: 128 + N for death by signal N."""
    return 128 - status if status < 0 else status


def when_parent_exits(action: Callable[[], None], parent: int | None = None) -> None:
    """Run `action` (once, on a daemon thread) when this process's parent (`parent`, default: the
    current one) is gone: its parent pid changes when it is re-parented. A `parent` that is gone
    already runs it at once."""
    parent = os.getppid() if parent is None else parent

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        action()

    threading.Thread(target=watch, name="kiln-parent-watch", daemon=True).start()


def stop_with_parent(parent: int, at_once: bool = False) -> None:
    """In a worker process that the supervisor or another process (pid `parent`) started, first
    thing: a warm shutdown once that parent is gone, also if it died while this process was
    starting; with `at_once`, an exit there and then (its decode processes and worker processes
    follow it the same way)."""

    def stop() -> None:
        if at_once:
            log.warning("the parent process (pid %d) is gone, and its Redis with it: exiting", parent)
            os._exit(1)
        log.warning("the parent process (pid %d) is gone: shutting down", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    when_parent_exits(stop, parent)


def supervise(commands: list[list[str]]) -> int:
    """Run a child process of each command (`child_commands`) until they stop; returns the exit
    status: 0 after a shutdown that every child completed, else the first failing child's, or
    128 + N after a second signal N killed them."""
    _become_subreaper()
    children = [_Child(i, command) for i, command in enumerate(commands)]
    signals_received: list[int] = []

    def on_signal(signum: int, _: FrameType | None) -> None:
        signals_received.append(signum)
        first, name = len(signals_received) == 1, signal.Signals(signum).name
        if first and signum == signal.SIGQUIT:
            log.warning("SIGQUIT: cold shutdown of the worker processes; they give back the chunks they reserved "
                        "and finish the ones running (a thread cannot be stopped)")  # fmt: skip
        elif first:
            log.info("%s: warm shutdown of the worker processes (they finish their chunks)", name)
        else:
            log.warning("%s again: killing the worker processes; their chunks go to other workers when their "
                        "leases lapse (KILN_LEASE_S)", name)  # fmt: skip
        for child in children:
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(_stop_signal(signals_received))

    def pass_on_sigusr1() -> None:  # after the parent's own stacks (the thread that takes SIGUSR1)
        for child in children:
            process = child.process  # read once: the main thread sets it to None as a child ends
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGUSR1)

    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
    previous = {s: signal.signal(s, on_signal) for s in handled}
    on_sigusr1(pass_on_sigusr1)
    release_when_ready()  # SIGHUP, held by `python -m worker` until now, is a warm shutdown
    pass_on_stop()  # one that came as these were installed
    try:
        for child in children:
            if signals_received:  # stopped while starting them: the rest never start
                break
            _start(child, signals_received)
        if not signals_received:
            log.info("%d worker processes started; each logs its own plan", len(children))
        return _watch(children, signals_received)
    finally:
        for child in children:  # an error in the supervisor itself: no worker outlives it
            if child.process is not None and child.process.poll() is None:
                child.process.kill()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _start(child: _Child, signals_received: list[int]) -> None:
    """Start `child`; one that a signal came for while it started is stopped at once, as the
    signal handler stopped the others."""
    child.start()
    if signals_received:
        child.process.send_signal(_stop_signal(signals_received))


def _stop_signal(signals_received: list[int]) -> signal.Signals:
    """What the children get once the parent has received `signals_received`: for the first,
    SIGQUIT if it was one (Celery's cold shutdown), else SIGTERM (its warm shutdown); SIGKILL
    after a second."""
    if len(signals_received) > 1:
        return signal.SIGKILL
    return signal.SIGQUIT if signals_received[0] == signal.SIGQUIT else signal.SIGTERM


def _watch(children: list[_Child], signals_received: list[int]) -> int:
    failure: int | None = None
    while True:
        stopping = bool(signals_received) or failure is not None
        now = time.monotonic()
        for child in children:
            if child.process is None:
                if not stopping and now >= child.restart_at:
                    _start(child, signals_received)
                continue
            status = child.process.poll()
            if status is None:
                continue
            _forget(child.process.pid)
            child.process = None
            if stopping:
                child.status = status
                continue
            early = now - child.started < EARLY_EXIT_S
            child.early_exits = child.early_exits + 1 if early else 0
            if status == 2 or child.early_exits >= EARLY_EXITS:
                why = "a bad package or setting" if status == 2 else f"{child.early_exits} times soon after its start"
                log.error("worker process %d %s (%s): stopping them all", child.index, describe_exit(status), why)
                failure = exit_status(status) or 1
                for other in children:
                    if other.process is not None:
                        other.process.send_signal(signal.SIGTERM)
                break
            child.restarts = child.restarts + 1 if now - child.started < STABLE_S else 1
            delay = min(MAX_RESTART_DELAY_S, RESTART_DELAY_S * 2 ** (child.restarts - 1))
            log.log(logging.WARNING if status == 0 else logging.ERROR, "worker process %d %s: starting it again in "
                    "%.0f s", child.index, describe_exit(status), delay)  # fmt: skip
            child.restart_at = now + delay
        _reap_orphans({child.process.pid for child in children if child.process is not None})
        if (signals_received or failure is not None) and all(child.process is None for child in children):
            break
        time.sleep(POLL_S)
    if failure is not None:
        return failure
    if len(signals_received) > 1 or signal.SIGQUIT in signals_received:  # not a warm stop
        log.info("worker processes %s", "stopped cold" if len(signals_received) == 1 else "killed")
        return stop_status(signals_received[-1])
    # Stopped warm (0), or killed by the signal in the interpreter's first moments
    stops = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    stopped_as_asked = {None, 0, *(-s for s in stops)}
    status = next((exit_status(c.status) for c in children if c.status not in stopped_as_asked), 0)
    log.info("all %d worker processes stopped%s", len(children), f"; status {status}" if status else "")
    return status


def _become_subreaper() -> None:
    """Have the processes a dead child leaves behind re-parented here rather than to PID 1."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: orphans go to init, as for any process
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _reap_orphans(ours: set[int]) -> None:
    """Reap exited processes that are not our running children (re-parented orphans); ours are
    left for `Popen.poll`, which needs their status."""
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None or info.si_pid in ours:
            return
        os.waitpid(info.si_pid, 0)


def _forget(pid: int) -> None:
    """Remove a stopped child's health files from the endpoint folder: a later process given the
    same pid must not inherit its reports."""
    from worker.health import process_files

    for path in process_files(pid):
        path.unlink(missing_ok=True)
