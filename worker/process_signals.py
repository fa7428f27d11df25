"""What kiln's processes do with the signals a shell, a terminal or a service manager sends to a
whole process group (Ctrl-C, a hang-up, `systemctl kill -s USR1`, `docker stop`): none of them may
end a process by its default action at any moment, since each process that dies so loses the
images it holds or leaves its files behind.

- `python -m worker` (a single worker, a supervisor, or a supervisor's worker process) calls
  `hold_until_ready` first thing: SIGUSR1 then logs every thread's stack (`log_stacks_on_sigusr1`)
  from the start, also while the model loads or Redis is not there yet, for good (a thread of
  its own takes it, so no Python handler, Celery's included, ever sees it), and SIGHUP waits until
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

import atexit
import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator

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


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """A Ctrl-C (SIGINT) inside the block raises KeyboardInterrupt where the block ends, not inside
    it: for imports, since torch's and numpy's catch an interrupt raised while they load, or turn
    it into numpy's `ImportError: cannot load module more than once per process` (a hostile
    tester's Ctrl-C during `kiln models`). A second Ctrl-C raises at once: whoever presses it
    again will not wait (an import stuck on a network file system, say). Only where Python's own
    Ctrl-C handler is in place, in the main thread; elsewhere the block runs as it would."""
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    held: list[int] = []

    def hold(signum: int, _: object) -> None:
        if held:
            raise KeyboardInterrupt
        held.append(signum)

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if held:
        raise KeyboardInterrupt


def hold_until_ready() -> None:
    """In the main thread, before any other starts: SIGUSR1 is blocked in every thread (threads
    inherit the mask of the thread that starts them), and one thread of its own takes it and logs
    the stacks (`log_stacks_on_sigusr1`; one sent while this process started, blocked by its
    supervisor, comes now); SIGHUP is blocked until `release_when_ready`."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP, signal.SIGUSR1})
    log_stacks_on_sigusr1()


_on_sigusr1: list[Callable[[], None]] = []  # what else SIGUSR1 does here (the supervisor passes it on)


def on_sigusr1(action: Callable[[], None]) -> None:
    """Run `action` after each stack dump, on the thread that takes SIGUSR1."""
    _on_sigusr1.append(action)


def log_stacks_on_sigusr1() -> None:
    """SIGUSR1: every thread's stack to stderr, in one write headed by the process's name and pid.

    A thread of its own waits for the signal (`sigwait`), so the dump also comes while the main
    thread is in C code that lets other threads run (a read with no timeout, a CUDA call, most of
    a model's load), where a Python handler (Celery's) waits for the main thread. It reads the
    stacks with the GIL held (`sys._current_frames`): faulthandler, which read them without it
    from the signal handler, crashed a worker process with SIGSEGV when it dumped as threads
    started (CI). One write per dump: a host's worker processes share one stderr and get the
    signal together, and line-by-line writes came out interleaved mid-line."""
    threading.Thread(target=_stacks_on_sigusr1, name="kiln-stacks", daemon=True).start()


def _stacks_on_sigusr1() -> None:
    while True:
        signal.sigwait({signal.SIGUSR1})
        name = multiprocessing.current_process().name
        out = memoryview(f"\nstacks of {name} (pid {os.getpid()}), on SIGUSR1:\n{format_stacks()}".encode())
        while out:
            out = out[os.write(2, out) :]
        for action in _on_sigusr1:
            try:
                action()
            except Exception:  # this thread must live on: no other one takes SIGUSR1
                logging.getLogger(__name__).exception("passing SIGUSR1 on failed")


def format_stacks() -> str:
    """Every thread's stack but the caller's, most recent call first, in faulthandler's layout
    with the thread's name: `Thread 0x... "MainThread" (most recent call first):`, then a
    `  File "...", line N in name` line per frame."""
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    lines = []
    for ident, frame in sys._current_frames().items():
        if ident == threading.get_ident():
            continue
        lines.append(f'Thread 0x{ident:016x} "{names.get(ident, "?")}" (most recent call first):')
        lines += [
            f'  File "{f.filename}", line {f.lineno} in {f.name}' for f in reversed(traceback.extract_stack(frame))
        ]
    return "\n".join(lines) + "\n"


STOPS = (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT)
_stopped_by: list[int] = []  # the stop signal received while the process started, once it came


def exit_on_stop_until_ready() -> None:
    """A worker told to stop while it starts (imports, the Redis check, the model's load; before
    Celery's or the supervisor's handlers): exit through Python with the status it would have once
    up (`stop_status`), so that exit handlers run (a single worker's endpoint folder is removed).
    The default actions ended the process there and left that folder behind, and SIGINT printed a
    KeyboardInterrupt traceback. The first stop handled decides (of several pending at once, Python
    runs the lowest-numbered first): the others are ignored from then on, so a
    second one cannot interrupt the exit (a traceback in an exit handler) or, once Python has put
    the default actions back as it exits, kill it with another status. A background job's
    ignored SIGINT stays ignored."""
    for signum in STOPS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _stop_while_starting)
    sys.unraisablehook = _quiet_about_kept_stops
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPS)  # held across an exec (`before_exec`)


def _quiet_about_kept_stops(unraisable: sys.UnraisableHookArgs) -> None:
    """A stop's SystemExit that Python swallowed ("Exception ignored in ... SystemExit: 0"): the
    stop is kept and acted on at the start's next step, so the traceback only alarms."""
    if not (_stopped_by and unraisable.exc_type is SystemExit):
        sys.__unraisablehook__(unraisable)


def before_exec() -> None:
    """Before this process replaces itself (`os.execve`): a stop received so far exits now (the
    new image would not know of it), and where this process takes stops as it starts, they stay
    blocked across the exec until the new image's `exit_on_stop_until_ready` takes them: in the
    new interpreter's first ~30 ms their default action ended it (143, or a KeyboardInterrupt
    traceback)."""
    exit_if_stopped()
    if signal.getsignal(signal.SIGTERM) is _stop_while_starting:
        signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)


def _stop_while_starting(signum: int, _: object) -> None:
    if _stopped_by:  # exiting already: raised in an exit handler, another SystemExit is a traceback
        return
    _stopped_by.append(signum)
    # Not SIG_IGN now: a stop already pending would then raise "Signal N ignored due to race
    # condition". Only once the exit handlers run, before Python puts the default actions back.
    atexit.register(_ignore_stops)
    exit_if_stopped()


def _ignore_stops() -> None:
    for signum in STOPS:
        if signal.getsignal(signum) is _stop_while_starting:
            signal.signal(signum, signal.SIG_IGN)


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
