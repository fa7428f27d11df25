"""worker/malloc.py: memory the model frees is kept for its next batch."""

from __future__ import annotations

import subprocess

import pytest
from conftest import PYTHON, python_env

# Allocates, touches and frees a 96 MB block ten times (a model's activations, batch after batch)
# and prints the page faults of the last nine.
_FAULTS = """
import resource, sys
import torch
from worker.malloc import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory() is None
torch.ones(24 * 2**20).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(9):
    torch.ones(24 * 2**20).sum()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(malloc: str) -> int:
    command = [PYTHON, "-c", _FAULTS, malloc]
    done = subprocess.run(command, capture_output=True, text=True, env=python_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def test_a_freed_block_is_used_again_without_faulting_its_pages_in():
    """glibc's default unmaps a block this large on free, so each allocation faults all of its
    24,576 pages in again (and the kernel zeroes them): a CPU worker spent as much system time on
    it as on its model. Counted in page faults, not time."""
    default, kept = _faults("default"), _faults("kept")
    print(f"page faults in nine allocations: {default} by default, {kept} kept")
    if default < 9 * 20_000:
        pytest.skip(f"this C library keeps the blocks by default ({default} faults in nine allocations)")
    assert kept < default / 2, (kept, default)
