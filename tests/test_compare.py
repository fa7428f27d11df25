"""bench/compare.py's smoke run: kiln, the in-process ceiling and eager on real JPEGs, through a
real redis-server and real worker processes, with every process of each contender measured."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from packages import ROOT

pytestmark = pytest.mark.slow  # four child processes load torch and a model: ~2 minutes here


def test_quick_run_measures_every_process(tmp_path):
    out = tmp_path / "compare.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "compare.py"), "--quick", "--no-ray", "--out", str(out),
         "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    rows = {row["contender"]: row for row in results["rows"]}
    assert set(rows) == {"ceiling", "eager", "kiln x1", "kiln x2"}
    for row in rows.values():
        assert row["images"] == 48 and row["failed"] == 0
        assert row["images_per_s"] > 0 and row["cpu_s_per_1k"] > 0 and row["peak_rss_mb"] > 100
    assert rows["ceiling"]["ratio_images_per_s"] == 1.0
    # redis-server, the producer and every worker process count towards kiln's CPU and memory.
    assert rows["kiln x2"]["processes"] >= 4
    assert "redis-server" in rows["kiln x2"]["process_names"]
    assert results["ray_unavailable"] == "--no-ray" and "kiln x1" in done.stdout
    assert (tmp_path / "compare.png").stat().st_size > 10_000
