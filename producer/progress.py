"""One progress bar over a job, from its first chunk to its last record (tqdm, on stderr).

The listing is streamed, so the job's size is unknown until it ends: until then the bar shows the
images finished, the rate and the images listed so far; once the listing ends it gets its total,
a percentage and an ETA. `submit` and `wait` can share one bar (as `label` does).
"""

from __future__ import annotations

import sys


class JobProgress:
    """A progress bar drawn on the first `show`; `enabled=False` draws nothing."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bar = None

    @property
    def total(self) -> int | None:
        """The bar's total: None while the listing runs."""
        return None if self._bar is None else self._bar.total

    def show(self, job: str, finished: int, total: int | None = None, listed: int | None = None) -> None:
        """`finished` images of `job` have a record; `total` once the listing has ended (None:
        unknown yet); `listed`: images listed so far, while the listing runs."""
        if not self.enabled:
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

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
