"""What kiln's processes do with the signals a shell, a terminal or a service manager sends to a
whole process group (Ctrl-C, a hang-up, `systemctl kill -s USR1`, `docker stop`): none of them may
end a process by its default action at any moment, since each process that dies so loses the
images it holds or leaves its files behind.

- `python -m worker` (a single worker, a supervisor, or a supervisor's worker process) calls
  `hold_until_ready` first thing: SIGUSR1 then logs every thread's stack (`log_stacks_on_sigusr1`)
  from the start, also while the model loads or Redis is not there yet, and SIGHUP waits until
  `release_when_ready`, once Celery (or the supervisor) has its handlers: from then on SIGHUP is a
  warm shutdown, as SIGTERM. Celery's own SIGHUP (restart in place, by `execv`) would leave the
  parent of a worker process waiting for a child that never stops, and leak a single worker's
  endpoint folder and decode processes.
- A process started inside `blocked(...)` inherits the mask: the supervisor starts its worker
  processes with SIGHUP and SIGUSR1 blocked (their interpreter's start is not covered otherwise),
  and the decode pool its processes and the resource tracker with every group signal blocked
  (they ignore them: worker/decode_pool.py).
"""

from __future__ import annotations

import contextlib
import faulthandler
import multiprocessing
import os
import select
import signal
import threading
from collections.abc import Iterable, Iterator

GROUP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1})
STARTING = frozenset({signal.SIGHUP, signal.SIGUSR1})  # what a new worker process must not die of


@contextlib.contextmanager
def blocked(signals: Iterable[signal.Signals]) -> Iterator[None]:
    """`signals` blocked in this thread for the block, so that a process started in it starts with
    them blocked (a child inherits its parent thread's mask, through `exec` too)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def hold_until_ready() -> None:
    """In the main thread, before any other starts: SIGUSR1 logs the stacks of all threads (one
    sent while this process started, blocked by its supervisor, comes now), and SIGHUP is blocked
    in every thread until `release_when_ready`."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    log_stacks_on_sigusr1()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})


def log_stacks_on_sigusr1() -> None:
    """SIGUSR1: every thread's stack to stderr, in one write headed by the process's name and pid.

    faulthandler takes the dump: C code, run by whichever thread the signal lands on, so it also
    comes while the main thread is stuck in C code (a model loading, a CUDA call, a read with no
    timeout), where Celery's own handler (Python, main thread only) would wait. Its writes go line
    by line, and a host's worker processes share one stderr and get the signal together: straight
    to stderr, their dumps came out interleaved mid-line. So it writes into a pipe, and a thread
    copies each dump out whole."""
    read_end, write_end = os.pipe()
    threading.Thread(target=_copy_stacks, args=(read_end,), name="kiln-stacks", daemon=True).start()
    faulthandler.register(signal.SIGUSR1, file=write_end, all_threads=True)


def _copy_stacks(read_end: int) -> None:
    while True:
        dump = os.read(read_end, 1 << 16)
        while select.select([read_end], [], [], 0.05)[0]:  # the rest of this dump: it comes at once
            dump += os.read(read_end, 1 << 16)
        name = multiprocessing.current_process().name
        out = memoryview(f"\nstacks of {name} (pid {os.getpid()}), on SIGUSR1:\n".encode() + dump)
        while out:
            out = out[os.write(2, out) :]


STOPS = (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT)
_stopped_by: list[int] = []  # the stop signal received while the process started, once it came


def exit_on_stop_until_ready() -> None:
    """A worker told to stop while it starts (imports, the Redis check, the model's load; before
    Celery's or the supervisor's handlers): exit through Python with the status it would have once
    up (`stop_status`), so that exit handlers run (a single worker's endpoint folder is removed).
    The default actions ended the process there and left that folder behind, and SIGINT printed a
    KeyboardInterrupt traceback. The first stop decides: the others are ignored from then on, so a
    second one cannot interrupt the exit (a traceback in an exit handler) or, once Python has put
    the default actions back as it exits, kill it with another status. A background job's
    ignored SIGINT stays ignored."""
    for signum in STOPS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _stop_while_starting)


def _stop_while_starting(signum: int, _: object) -> None:
    if not _stopped_by:
        _stopped_by.append(signum)
        for other in STOPS:
            if signal.getsignal(other) is _stop_while_starting:
                signal.signal(other, signal.SIG_IGN)
    exit_if_stopped()


def exit_if_stopped() -> None:
    """Raise the SystemExit of a stop received while starting, again. Raised from the handler, it
    is lost where the signal lands in a finalizer ("Exception ignored ..."): a worker process told
    to stop then loaded its model and served, and its parent waited for it forever. So the start
    calls this between its steps, and `pass_on_stop` hands a late one to Celery."""
    if _stopped_by:
        raise SystemExit(stop_status(_stopped_by[0] if _stopped_by[0] == signal.SIGQUIT else None))


def pass_on_stop() -> None:
    """Once Celery's handlers are in: a stop received while starting whose SystemExit was lost,
    sent again, to them (a warm or a cold shutdown as for any stop)."""
    if _stopped_by:
        signal.raise_signal(_stopped_by[0])


def stop_status(cold_by: int | None) -> int:
    """The exit status of a worker that stopped as asked: 0 after a warm shutdown (what ran has
    finished), 128 + N after a cold one by signal N (SIGQUIT, or Celery's second SIGINT), as a
    shell reports a death by that signal. The same for a single worker and a supervisor (which
    also returns 128 + N when a second signal N made it kill its processes), and whether the
    worker had loaded its model or not. Before, a single worker ended 0 after SIGQUIT where its
    supervisor ended 131, and 143 after a SIGTERM while it loaded against 0 once up: a service
    manager saw another status for the same request depending on the moment."""
    return 0 if cold_by is None else 128 + cold_by


def release_when_ready() -> None:
    """From the main thread, once the stop handlers are installed: SIGHUP does what SIGTERM does
    (a warm shutdown); one that came meanwhile is delivered now."""
    signal.signal(signal.SIGHUP, signal.getsignal(signal.SIGTERM))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
