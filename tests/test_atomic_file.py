"""worker/atomic_file.py: result files, shards and packages appear whole, with the umask's mode."""

from __future__ import annotations

import os

import pytest

from worker.atomic_file import replacing


def test_the_target_is_replaced_whole_only_when_the_block_succeeds(tmp_path):
    target = tmp_path / "r.csv"
    target.write_text("old")
    with replacing(target, durable=True) as tmp:
        tmp.write_text("new")
        assert target.read_text() == "old" and tmp.name.startswith(".r.csv.") and tmp.suffix == ".tmp"
    assert target.read_text() == "new"
    with pytest.raises(RuntimeError), replacing(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("the writer failed")
    assert target.read_text() == "new"
    with replacing(target, keep=False) as tmp:  # only checks that a file can be made there
        pass
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["r.csv"]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_the_file_gets_the_umasks_mode_not_0600(tmp_path, umask):
    old = os.umask(umask)
    try:
        with replacing(tmp_path / "model.pt2", suffix=".pt2") as tmp:
            assert tmp.suffix == ".pt2"
    finally:
        os.umask(old)
    assert (tmp_path / "model.pt2").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_file_that_cannot_be_made_is_named_by_its_target(tmp_path):
    missing = tmp_path / "missing" / "r.csv"
    with pytest.raises(OSError, match=r"cannot write .*/missing/r\.csv: No such file or directory"), replacing(missing):
        pass
