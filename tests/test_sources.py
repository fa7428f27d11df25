"""What producers can point at: folders, globs, files, URLs and CSV/JSONL manifests."""

from __future__ import annotations

import json

import pytest

from producer.sources import SourceError, default_job_id, expand, inputs_job_id, local_roots
from worker.contract import Item


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for name in ("a/1.jpg", "a/2.PNG", "a/deep/3.webp", "a/notes.txt", "b.jpg"):
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def keys(inputs) -> list[str]:
    return [i.key for i in expand(inputs).items]


def test_folders_recurse_and_keep_only_images(tree):
    found = expand([tree / "a"])
    assert [i.key for i in found.items] == [str(tree / p) for p in ("a/1.jpg", "a/2.PNG", "a/deep/3.webp")]
    assert all(i.key == i.ref for i in found.items)
    assert found.skipped == {".txt": 1}


def test_globs_files_and_urls(tree):
    inputs = [str(tree / "**" / "*.jpg"), tree / "b.jpg", "https://example.org/cat.jpg"]
    assert keys(inputs) == [str(tree / "a/1.jpg"), str(tree / "b.jpg"), "https://example.org/cat.jpg"]


def test_no_file_is_skipped_silently(tree):
    """HEIC, HEIF and AVIF photos join the job (the worker records what it makes of them); every
    other file a folder or glob leaves out is counted by extension for the job summary."""
    for name in ("a/4.heic", "a/5.HEIF", "a/6.avif", "a/raw.cr2", "a/deep/.DS_Store", "a/README", "a/x.txt"):
        (tree / name).write_bytes(b"x")
    found = expand([tree / "a"])
    assert {k.rsplit("/", 1)[1] for k in (i.key for i in found.items)} >= {"4.heic", "5.HEIF", "6.avif"}
    assert found.skipped == {".txt": 2, ".cr2": 1, "": 2}
    summary = found.skipped_summary()
    assert summary.startswith("skipped 5 files without an image extension: .txt 2, ") and "(no extension) 2" in summary
    assert expand([str(tree / "a" / "*")]).skipped == {".txt": 2, ".cr2": 1, "": 1}
    with pytest.raises(SourceError, match=r"no images found .*skipped 2 files without an image extension: .txt 2"):
        expand([str(tree / "a" / "*.txt")])


def test_a_skipped_file_counts_once_whichever_inputs_overlap_on_it(tree, monkeypatch):
    """`a/*` and `./a/*`, or a folder and a glob in it, list the same left-out files: each is
    counted once. Before, overlapping globs counted them once per input."""
    monkeypatch.chdir(tree)
    once = {".txt": 1}
    assert expand(["a/*", "./a/*"]).skipped == once
    assert expand([tree / "a", "a/*.txt", str(tree / "a" / "notes.txt")]).skipped == once
    assert expand(["a", "b.jpg"]).skipped == once


def test_a_skipped_extension_with_control_characters_is_shown_escaped(tree):
    (tree / "a" / "evil.t\x1b[2Jx\n").write_bytes(b"x")
    summary = expand([tree / "a"]).skipped_summary()
    assert "\x1b" not in summary and "\n" not in summary and ".t\\x1b[2jx\\n 1" in summary, summary


def test_csv_and_jsonl_manifests(tree):
    (tree / "list.csv").write_text("id,path\nfirst,a/1.jpg\nsecond,https://example.org/x.png\n")
    (tree / "list.jsonl").write_text(json.dumps({"url": "b.jpg"}) + "\n" + json.dumps("a/2.PNG") + "\n")
    items = expand([tree / "list.csv", tree / "list.jsonl"]).items
    assert [(i.key, i.ref) for i in items] == [
        ("first", str(tree / "a/1.jpg")),
        ("second", "https://example.org/x.png"),
        (str(tree / "b.jpg"), str(tree / "b.jpg")),
        (str(tree / "a/2.PNG"), str(tree / "a/2.PNG")),
    ]


def test_a_spreadsheet_csv_with_a_byte_order_mark(tree):
    (tree / "excel.csv").write_bytes("path,key\r\na/1.jpg,één\r\n".encode("utf-8-sig"))
    (tree / "bom.jsonl").write_bytes((json.dumps({"path": "b.jpg"}) + "\n").encode("utf-8-sig"))
    items = expand([tree / "excel.csv", tree / "bom.jsonl"]).items
    assert [(i.key, i.ref) for i in items] == [("één", str(tree / "a/1.jpg")), (str(tree / "b.jpg"),) * 2]


@pytest.mark.parametrize(
    ("name", "content", "line", "reason"),
    [
        # JSONL: blank lines count, and the error names the line, not "line 1 column 2"
        ("m.jsonl", '"a/1.jpg"\n\n{"path": "b.jpg"}\n\n  \n{"path": \n', 6, "invalid JSON at column"),
        ("m.jsonl", '"a/1.jpg"\n\n[1, 2]\n', 3, "expected an object or a string"),
        ("m.jsonl", '"a/1.jpg"\n{"name": "x"}\n', 2, "no image reference"),
        ("m.jsonl", '\n\n{"path": "b.jpg", "key": ""}\n{"path": "a/1.jpg", "key": "' + "k" * 5000 + '"}\n', 4, "key"),
        # CSV: blank lines and a quoted field over two lines count too
        ("m.csv", "key,path\n\nk1,a/1.jpg\n\n\nk2,\n", 6, "no image reference"),
        ("m.csv", 'key,path\n"two\nlines",a/1.jpg\nk3,\n', 4, "no image reference"),
        ("m.csv", "name,size\nx,1\n", 1, "no image reference column in the header"),
        ("m.csv", "path\na/1.jpg\nb\x00.jpg\n", 3, "NUL"),
        # a manifest that is not UTF-8 names the line of the first bad byte
        ("m.csv", b"path\na/1.jpg\n\nb\xe9.jpg\n", 4, "not UTF-8"),
        # one key for two images
        ("m.csv", "key,path\nk,a/1.jpg\n\nk,b.jpg\n", 4, "names two images"),
        # a quote left open (the rest of the file was one reference), text after a closing quote
        # (it was glued on: '"a"b.jpg' read as ab.jpg)
        ("m.csv", 'path\na/1.jpg\n"b.jpg,c\n', 3, "unexpected end of data (a quote left open?)"),
        ("m.csv", 'path\na/1.jpg\n"a"b.jpg\n', 3, "',' expected after '\"'"),
    ],
)
def test_every_manifest_error_names_its_file_and_line(tree, name, content, line, reason):
    path = tree / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SourceError) as raised:
        expand([path])
    message = str(raised.value)
    assert message.startswith(f"{path}:{line}: ") and reason in message, message


def test_bad_inputs_say_what_is_wrong(tree):
    with pytest.raises(SourceError, match="no such file"):
        expand([tree / "missing"])
    with pytest.raises(SourceError, match="no images found"):
        expand([str(tree / "*.gif")])


def test_one_input_is_a_list_of_one_and_an_empty_name_is_refused(tree, monkeypatch):
    """A lone name is one input, not its characters ("w: no such file"); an empty name (an unset
    `$DIR`) meant the current folder, listed whole: refused, as what is no name at all is."""
    assert keys(str(tree / "a")) == keys([tree / "a"]) == keys(tree / "a")
    monkeypatch.chdir(tree)
    for empty in ("", "  ", [""], [str(tree / "b.jpg"), ""]):
        with pytest.raises(SourceError, match="an empty input name"):
            expand(empty)
    for no_name in ([b"/data"], [Item(key="k", ref="/x.jpg")], [None]):
        with pytest.raises(SourceError, match="is not an input"):
            expand(no_name)
    with pytest.raises(SourceError, match="an empty input name"):
        inputs_job_id([""])


def test_job_ids_and_roots(tree):
    items = expand([tree / "a", tree / "b.jpg"]).items
    assert default_job_id(items) == default_job_id(list(reversed(items)))
    assert local_roots(items) == [str(tree)]
    assert local_roots(expand([tree / "a"]).items) == [str(tree / "a")]


def test_default_job_ids_do_not_collide():
    def job(*names: str) -> str:
        return default_job_id([Item(key=n, ref=n) for n in names])

    assert job("x", "y") != job("x\ny")
    assert job("a,b") != job("a", "b") and job('"x"') != job("x")
    assert job("x", "y") == job("y", "x")


def test_an_input_given_twice_is_listed_once(tree):
    """`label photos photos/` (or a folder twice through a link) lists, and counts what it
    skipped, once."""
    (tree / "link").symlink_to(tree / "a")
    found = expand([tree / "a", str(tree / "a") + "/", tree / "link", tree / "b.jpg", tree / "b.jpg"])
    assert keys([tree / "a", tree / "b.jpg"]) == [i.key for i in found.items]
    assert found.skipped == {".txt": 1}
