"""One progress bar over a job, from its first chunk to its last record (tqdm, on stderr).

The listing is streamed, so the job's size is unknown until it ends: until then the bar shows the
images finished, the rate and the images listed so far; once the listing ends it gets its total,
a percentage and an ETA. `submit` and `wait` can share one bar (as `label` does).

Where stderr is not a terminal (a CI log, a file, a pipe), a bar redrawn with carriage returns
twice a second only fills the log: there the same line, from tqdm's formatter, is printed whole
every `LOG_INTERVAL_S`, and once more at the end.
"""

from __future__ import annotations

import sys
import time

LOG_INTERVAL_S = 30.0


class JobProgress:
    """A progress bar drawn on the first `show`; `enabled=False` draws nothing."""

    def __init__(self, enabled: bool = True, terminal: bool | None = None) -> None:
        """`terminal`: draw a bar (True) or print a line now and then (False); default: whether
        stderr is a terminal."""
        self.enabled = enabled
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self._bar = None
        self._line: tuple[str, int, int | None, str] | None = None  # job, finished, total, postfix
        self._started = self._printed = 0.0
        self._initial = 0  # images finished before the first line: not part of the rate
        self._printed_line: tuple[str, int, int | None, str] | None = None

    @property
    def total(self) -> int | None:
        """The bar's total: None while the listing runs."""
        return None if self._bar is None else self._bar.total

    def show(self, job: str, finished: int, total: int | None = None, listed: int | None = None) -> None:
        """`finished` images of `job` have a record; `total` once the listing has ended (None:
        unknown yet); `listed`: images listed so far, while the listing runs."""
        if not self.enabled:
            return
        if not self.terminal:
            self._log(job, finished, total, "" if total is not None or listed is None else f"listed {listed}")
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=finished, desc=job, unit="img", dynamic_ncols=True, mininterval=0.5)
        bar = self._bar
        if total is not None and bar.total != total:
            bar.total = total
            bar.set_postfix_str("", refresh=False)
        elif listed is not None:
            bar.set_postfix_str(f"listed {listed}", refresh=False)
        bar.update(finished - bar.n)

    def write(self, line: str) -> None:
        """Print a line on stderr above the bar (where one is drawn) without breaking it."""
        if self._bar is None:
            print(line, file=sys.stderr)
        else:
            self._bar.write(line, file=sys.stderr)

    def _log(self, job: str, finished: int, total: int | None, postfix: str, force: bool = False) -> None:
        now = time.monotonic()
        if self._line is None:
            self._started = self._printed = now
            self._initial = finished
        self._initial = min(self._initial, finished)  # fewer finished (a retry took records back): no negative rate
        self._line = (job, finished, total, postfix)
        if force or now - self._printed >= LOG_INTERVAL_S:
            from tqdm import tqdm

            if self._line != self._printed_line:  # a line only where something moved
                line = tqdm.format_meter(
                    finished, total, now - self._started, prefix=job, unit="img", postfix=postfix or None,
                    ascii=True, initial=self._initial,
                )  # fmt: skip
                print(line, file=sys.stderr)
            self._printed, self._printed_line = now, self._line

    def close(self) -> None:
        if self._line is not None:  # the last state, once
            self._log(*self._line, force=True)
            self._line = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
