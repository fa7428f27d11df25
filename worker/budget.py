"""A memory budget shared by the decode threads of one process."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class MemoryBudget:
    """At most `capacity` bytes held at once by all holders together. A request larger than the
    whole budget is granted alone, once nothing else is held: a huge image waits for the others
    to finish instead of failing."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held = 0
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, size: int) -> Iterator[None]:
        """Block until `size` bytes fit in the budget, hold them for the block, then give them back."""
        with self._changed:
            self._changed.wait_for(lambda: self.held == 0 or self.held + size <= self.capacity)
            self.held += size
        try:
            yield
        finally:
            with self._changed:
                self.held -= size
                self._changed.notify_all()
