"""What producers can point at: folders, globs, files, URLs and CSV/JSONL manifests."""

from __future__ import annotations

import json

import pytest

from producer.sources import SourceError, default_job_id, expand, local_roots


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for name in ("a/1.jpg", "a/2.PNG", "a/deep/3.webp", "a/notes.txt", "b.jpg"):
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def test_folders_recurse_and_keep_only_images(tree):
    items = expand([tree / "a"])
    assert [i.key for i in items] == [str(tree / p) for p in ("a/1.jpg", "a/2.PNG", "a/deep/3.webp")]
    assert all(i.key == i.ref for i in items)


def test_globs_files_and_urls(tree):
    items = expand([str(tree / "**" / "*.jpg"), tree / "b.jpg", "https://example.org/cat.jpg"])
    assert [i.key for i in items] == [str(tree / "a/1.jpg"), str(tree / "b.jpg"), "https://example.org/cat.jpg"]


def test_csv_and_jsonl_manifests(tree):
    (tree / "list.csv").write_text("id,path\nfirst,a/1.jpg\nsecond,https://example.org/x.png\n")
    (tree / "list.jsonl").write_text(json.dumps({"url": "b.jpg"}) + "\n" + json.dumps("a/2.PNG") + "\n")
    items = expand([tree / "list.csv", tree / "list.jsonl"])
    assert [(i.key, i.ref) for i in items] == [
        ("first", str(tree / "a/1.jpg")),
        ("second", "https://example.org/x.png"),
        (str(tree / "b.jpg"), str(tree / "b.jpg")),
        (str(tree / "a/2.PNG"), str(tree / "a/2.PNG")),
    ]


def test_bad_inputs_say_what_is_wrong(tree):
    with pytest.raises(SourceError, match="no such file"):
        expand([tree / "missing"])
    with pytest.raises(SourceError, match="no images found"):
        expand([str(tree / "*.gif")])
    (tree / "bad.csv").write_text("name\nx\n")
    with pytest.raises(SourceError, match=r"bad\.csv:2: no image reference"):
        expand([tree / "bad.csv"])
    (tree / "clash.csv").write_text("key,path\nk,a/1.jpg\nk,b.jpg\n")
    with pytest.raises(SourceError, match="names two images"):
        expand([tree / "clash.csv"])


def test_job_ids_and_roots(tree):
    items = expand([tree / "a", tree / "b.jpg"])
    assert default_job_id(items) == default_job_id(list(reversed(items)))
    assert local_roots(items) == [str(tree)]
    assert local_roots(expand([tree / "a"])) == [str(tree / "a")]
