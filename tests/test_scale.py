"""bench/scale.py's smoke run: tiny-model jobs through a real redis-server, a real worker and
producer processes, in both output modes, every row measured and every export complete."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from packages import ROOT

pytestmark = pytest.mark.slow  # a worker, four producer and four export processes: ~1 minute here


def test_quick_run_measures_every_size_and_mode(tmp_path):
    out = tmp_path / "scale.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "scale.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    rows = {(row["size"], row["mode"]): row for row in results["rows"]}
    assert set(rows) == {(size, mode) for size in (1000, 5000) for mode in ("store", "sharded")}
    for (size, _), row in rows.items():
        assert row["images"] == row["exported_rows"] == size and row["failed"] == 0
        assert row["images_per_s"] > 0 and isinstance(row["first_record_s"], float)  # measured
        assert row["redis_peak_mb"] >= row["redis_baseline_mb"] > 0
        assert row["producer_peak_rss_mb"] > 10 and row["export_s"] > 0
    # The Redis store holds every record; sharded mode only the pending chunks and counters.
    for size in (1000, 5000):
        assert rows[size, "store"]["redis_kb_per_1k"] > rows[size, "sharded"]["redis_kb_per_1k"]
    assert any(t["what"].startswith("sharded 5,000: producer peak RSS") for t in results["targets"])
    assert "5,000 | sharded" in done.stdout  # the table
