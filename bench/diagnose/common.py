"""What the diagnosis scripts share: the repository on `sys.path` (they run as
`python3 bench/diagnose/NAME.py`), and a JSON file of results written as they come, so that a run
cut short by the device's time limit keeps what it measured."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


class Results(dict):
    """A dict of results that `save()` writes to `path` as JSON."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)

    def save(self) -> None:
        self.path.write_text(json.dumps(self, indent=1))
