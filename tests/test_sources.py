"""pipeline.io.sources: what a source yields (a local folder in its several spellings, an S3 prefix, a CSV or JSON
Lines manifest, local or on S3) and how a bad one is refused, against real files in tmp_path and a real S3 API (moto
server over HTTP)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

import pytest

from pipeline.errors import SourceError
from pipeline.io import sources
from pipeline.io.sources import iter_source
from pipeline.io.storage import LocalStorage, ObjectReader, S3Storage, local_path
from pipeline.records import Item
from tests.fixtures.files import put_objects, write_file


def test_iter_source_local_directory_forms(
    tree: tuple[Path, dict[str, bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, images = tree
    reader = ObjectReader(LocalStorage([root]))
    items = iter_source(str(root), reader)
    assert isinstance(items, Iterator)
    first = next(items)
    assert first == Item(item_id=(root / "100% cotton.bmp").as_uri(), uri=(root / "100% cotton.bmp").as_uri())
    all_items = [first, *items]
    assert len(all_items) == len(images)
    assert list(iter_source(root.as_uri(), reader)) == all_items
    monkeypatch.chdir(root.parent)
    assert list(iter_source("photos", reader)) == all_items
    assert list(iter_source("./photos/Boot", reader)) == [
        Item((root / "Boot/boot (1).jpg").as_uri(), (root / "Boot/boot (1).jpg").as_uri()),
        Item((root / "Boot/boot (2).JPEG").as_uri(), (root / "Boot/boot (2).JPEG").as_uri()),
    ]


def test_iter_source_errors(
    tree: tuple[Path, dict[str, bytes]], outside: Path, s3_bucket: tuple[Any, str]
) -> None:
    root, _ = tree
    client, bucket = s3_bucket
    reader = ObjectReader(LocalStorage([root]), s3_factory=lambda: S3Storage(client))
    with pytest.raises(SourceError, match=r"source not found: .*nope"):
        iter_source(str(root / "nope"), reader)
    with pytest.raises(SourceError, match=r"source not found: .*m\.csv"):
        iter_source(str(root / "m.csv"), reader)
    with pytest.raises(
        SourceError, match="unsupported URI scheme 'ftp' in source.*file://DIR.*s3://bucket/prefix.*manifest"
    ):
        iter_source("ftp://host/photos", reader)
    with pytest.raises(SourceError, match="INVSORT_LOCAL_ROOTS"):
        iter_source(str(outside.parent), reader)
    with pytest.raises(SourceError, match="not a manifest"):
        iter_source(str(root / "a.jpg"), reader)
    with pytest.raises(SourceError, match="no such bucket: invsort-missing-bucket"):
        list(iter_source("s3://invsort-missing-bucket/photos", reader))
    with pytest.raises(SourceError, match="no such object"):
        list(iter_source(f"s3://{bucket}/none.jsonl", reader))
    outside_manifest = write_file(outside.parent / "m.csv", b"item_id,image_uri\na,secret.jpg\n")
    with pytest.raises(SourceError, match="INVSORT_LOCAL_ROOTS"):
        iter_source(str(outside_manifest), reader)


def _csv_manifest(rows: list[tuple[str, str]]) -> bytes:
    lines = ["sku,item_id,notes,image_uri", ""]  # extra columns, a blank line
    lines += [f'{i},"{item_id}",n{i},"{uri}"' for i, (item_id, uri) in enumerate(rows)]
    return ("\ufeff" + "\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


def _jsonl_manifest(rows: list[tuple[Any, str]]) -> bytes:
    lines = [json.dumps({"item_id": i, "image_uri": u, "extra": [1]}, ensure_ascii=False) for i, u in rows]
    lines.insert(1, "   ")
    return ("\n".join(lines) + "\n").encode("utf-8")


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "ndjson"])
def test_local_manifest(
    fmt: str, tree: tuple[Path, dict[str, bytes]], s3_server: str, s3_bucket: tuple[Any, str]
) -> None:
    root, images = tree
    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="p/ü (1).jpg", Body=b"from s3")
    s3 = S3Storage(client)
    rows: list[tuple[Any, str]] = [
        ("sku-1", "../photos/a.jpg"),  # relative to the manifest's directory
        ("sku-2", "Boot/boot (1).jpg"),
        ("sku-3", str(root / "ünï cödé" / "фото 1.jpg")),  # absolute path
        ("sku-4", (root / "sub/z.webp").as_uri()),
        ("sku-5", f"s3://{bucket}/p/ü (1).jpg"),
    ]
    manifest_dir = root if fmt == "csv" else root / "lists"
    if fmt != "csv":
        rows[0] = (123, "../a.jpg")
        rows[1] = ("sku-2", "../Boot/boot (1).jpg")
    data = _csv_manifest(rows) if fmt == "csv" else _jsonl_manifest(rows)
    manifest = write_file(manifest_dir / f"items.{fmt}", data)
    reader = ObjectReader(LocalStorage([root]), s3=s3)
    items = list(iter_source(str(manifest), reader))
    assert items == [
        Item("sku-1" if fmt == "csv" else "123", (root / "a.jpg").as_uri()),
        Item("sku-2", (root / "Boot/boot (1).jpg").as_uri()),
        Item("sku-3", (root / "ünï cödé" / "фото 1.jpg").as_uri()),
        Item("sku-4", (root / "sub/z.webp").as_uri()),
        Item("sku-5", f"s3://{bucket}/p/ü (1).jpg"),
    ]
    assert list(iter_source(manifest.as_uri(), reader)) == items
    got = [reader.read(i.uri) for i in items]
    assert got == [
        images["a.jpg"],
        images["Boot/boot (1).jpg"],
        images["ünï cödé/фото 1.jpg"],
        images["sub/z.webp"],
        b"from s3",
    ]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_s3_manifest(fmt: str, s3_server: str, s3_bucket: tuple[Any, str], tmp_path: Path) -> None:
    client, bucket = s3_bucket
    local = write_file(tmp_path / "local" / "l.jpg", b"local")
    objects = {
        "lists/img/a (1).jpg": b"a",
        "photos/b #?.jpg": b"b",
        "lists/c.png": b"c",
    }
    put_objects(client, bucket, objects)
    rows: list[tuple[Any, str]] = [
        ("A", "img/a (1).jpg"),
        ("B", "../photos/b #?.jpg"),
        ("C", f"s3://{bucket}/lists/c.png"),
        ("D", "./c.png"),
        ("L", str(local)),
    ]
    data = _csv_manifest(rows) if fmt == "csv" else _jsonl_manifest(rows)
    client.put_object(Bucket=bucket, Key=f"lists/m.{fmt}", Body=data)
    reader = ObjectReader(LocalStorage([local.parent]), s3=S3Storage(client))
    items = list(iter_source(f"s3://{bucket}/lists/m.{fmt}", reader))
    assert items == [
        Item("A", f"s3://{bucket}/lists/img/a (1).jpg"),
        Item("B", f"s3://{bucket}/photos/b #?.jpg"),
        Item("C", f"s3://{bucket}/lists/c.png"),
        Item("D", f"s3://{bucket}/lists/c.png"),
        Item("L", local.as_uri()),
    ]
    assert [reader.read(i.uri) for i in items] == [b"a", b"b", b"c", b"c", b"local"]


MALFORMED_CSV = [
    ("item_id,uri\na,x.jpg\n", 1, "no 'image_uri' column"),
    ("item_id,image_uri\na,x.jpg\n,y.jpg\n", 3, "empty item_id"),
    ("item_id,image_uri\n\na,x.jpg\nb\n", 4, "no image_uri"),
    ("item_id,image_uri\na,x.jpg\nb,  \n", 3, "empty image_uri"),
    ("item_id,image_uri\na,x.jpg\nb,http://h/b.jpg\n", 3, "unsupported URI scheme 'http'"),
    ("item_id,image_uri\na,x.jpg\nb,y.jpg\na,z.jpg\n", 4, r"duplicate item_id 'a' \(first on line 2\)"),
    ('item_id,image_uri\na,"x.jpg\n', 2, "bad CSV: unexpected end of data"),
    ("", None, "empty"),
]
MALFORMED_JSONL = [
    ('{"item_id": "a", "image_uri": "x.jpg"}\n{"item_id": "b"}\n', 2, "no image_uri"),
    ('{"item_id": "a", "image_uri": "x.jpg"}\n\n{"item_id": "b", "image_uri": "y.jpg"\n', 3, "bad JSON"),
    ('["a", "x.jpg"]\n', 1, "expected a JSON object"),
    ('{"item_id": "", "image_uri": "x.jpg"}\n', 1, "empty item_id"),
    ('{"item_id": null, "image_uri": "x.jpg"}\n', 1, "no item_id"),
    ('{"item_id": "a", "image_uri": 5}\n', 1, "image_uri must be a string"),
    ('{"item_id": 1, "image_uri": "x.jpg"}\n{"item_id": "1", "image_uri": "y.jpg"}\n', 2, "first on line 1"),
]


@pytest.mark.parametrize(
    ("suffix", "text", "line", "message"),
    [("csv", *c) for c in MALFORMED_CSV] + [("jsonl", *c) for c in MALFORMED_JSONL],
)
def test_malformed_local_manifest(
    tmp_path: Path, suffix: str, text: str, line: int | None, message: str
) -> None:
    manifest = write_file(tmp_path / f"bad.{suffix}", text.encode())
    reader = ObjectReader(LocalStorage([tmp_path]))
    with pytest.raises(SourceError, match=message) as info:
        list(iter_source(str(manifest), reader))
    msg = str(info.value)
    assert str(manifest) in msg
    if line is not None:
        assert f"line {line}:" in msg


def test_malformed_manifest_rows_before_the_error_are_streamed(tmp_path: Path) -> None:
    manifest = write_file(tmp_path / "m.jsonl", b'{"item_id": "a", "image_uri": "a.jpg"}\nnot json\n')
    items = iter_source(str(manifest), ObjectReader(LocalStorage([tmp_path])))
    assert next(items) == Item("a", (tmp_path / "a.jpg").as_uri())
    with pytest.raises(SourceError, match="line 2: bad JSON"):
        next(items)


def test_duplicates_are_found_exactly_after_the_ids_leave_memory(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Past ``SEEN_IN_MEMORY`` ids the duplicate check keeps them in a temporary SQLite file (flat memory): the
    same rows are streamed and the same error raised, naming both lines, whichever side of the spill they are."""
    monkeypatch.setattr(sources, "SEEN_IN_MEMORY", 3)
    rows = [f"id-{i},img/{i}.jpg" for i in range(10)]
    for first, dup in ((1, 8), (6, 9)):  # first met before the spill / after it
        text = "item_id,image_uri\n" + "\n".join([*rows[:dup], f"id-{first},again.jpg", *rows[dup:]]) + "\n"
        manifest = write_file(tmp_path / f"m{first}.csv", text.encode())
        items = iter_source(str(manifest), ObjectReader(LocalStorage([tmp_path])))
        got = [next(items) for _ in range(dup)]
        assert got == [Item(f"id-{i}", (tmp_path / f"img/{i}.jpg").as_uri()) for i in range(dup)]
        with pytest.raises(SourceError, match=rf"line {dup + 2}: duplicate item_id 'id-{first}' \(first on line "
                                              rf"{first + 2}\)"):
            next(items)
    manifest = write_file(tmp_path / "ok.csv", ("item_id,image_uri\n" + "\n".join(rows) + "\n").encode())
    assert len(list(iter_source(str(manifest), ObjectReader(LocalStorage([tmp_path]))))) == 10


def test_the_duplicate_check_is_exact_on_disk() -> None:
    seen = sources.SeenIds(in_memory=2)
    ids = ["a", "b", "c", "é", "a\x00b", "A", " a", "a"]
    assert [seen.first_line(item_id, line) for line, item_id in enumerate(ids, 1)] == [
        None, None, None, None, None, None, None, 1]
    assert seen.first_line("c", 100) == 3 and seen.first_line("a\x00b", 101) == 5 and seen.first_line("d", 102) is None
    assert seen._db is not None and not seen._memory  # the ids are on disk
    seen.close()
    seen.close()


def test_invalid_utf8_manifest(tmp_path: Path) -> None:
    manifest = write_file(tmp_path / "m.csv", b"item_id,image_uri\na,x.jpg\nb,\xff\xfe.jpg\n")
    with pytest.raises(SourceError, match="not valid UTF-8"):
        list(iter_source(str(manifest), ObjectReader(LocalStorage([tmp_path]))))


@pytest.mark.parametrize(
    ("suffix", "text", "line", "message"),
    [
        ("csv", "item_id,image_uri\na,x.jpg\nb,y.jpg\na,z.jpg\n", 4, "duplicate item_id 'a'"),
        ("jsonl", '{"item_id": "a", "image_uri": "x.jpg"}\n{oops}\n', 2, "bad JSON"),
        ("csv", "item_id,image_uri\na,../../x.jpg\n", 2, "goes above the top of bucket"),
        ("csv", "item_id,image_uri\na,x.jpg\nb,\xff.jpg\n", 3, "not valid UTF-8"),
    ],
)
def test_malformed_s3_manifest(
    s3_server: str, s3_bucket: tuple[Any, str], suffix: str, text: str, line: int, message: str
) -> None:
    client, bucket = s3_bucket
    body = text.encode("latin-1") if "\xff" in text else text.encode()
    client.put_object(Bucket=bucket, Key=f"m/bad.{suffix}", Body=body)
    reader = ObjectReader(LocalStorage([]), s3=S3Storage(client))
    with pytest.raises(SourceError, match=message) as info:
        list(iter_source(f"s3://{bucket}/m/bad.{suffix}", reader))
    assert f"s3://{bucket}/m/bad.{suffix}, line {line}:" in str(info.value)


def test_s3_prefix_source_is_a_directory(s3_server: str, s3_bucket: tuple[Any, str]) -> None:
    client, bucket = s3_bucket
    put_objects(client, bucket, {"shoes/a.jpg": b"1", "shoes-old/b.jpg": b"2", "top.png": b"3"})
    reader = ObjectReader(LocalStorage([]), s3=S3Storage(client))
    assert [i.uri for i in iter_source(f"s3://{bucket}/shoes", reader)] == [f"s3://{bucket}/shoes/a.jpg"]
    assert [i.uri for i in iter_source(f"s3://{bucket}", reader)] == [
        f"s3://{bucket}/shoes-old/b.jpg",
        f"s3://{bucket}/shoes/a.jpg",
        f"s3://{bucket}/top.png",
    ]


def test_manifest_with_old_mac_line_endings(tmp_path: Path) -> None:
    manifest = write_file(tmp_path / "m.csv", b"item_id,image_uri\ra,x.jpg\rb,y.jpg\r")
    items = list(iter_source(str(manifest), ObjectReader(LocalStorage([tmp_path]))))
    assert items == [Item("a", (tmp_path / "x.jpg").as_uri()), Item("b", (tmp_path / "y.jpg").as_uri())]


def _odd_names_tree(tmp_path: Path) -> tuple[Path, dict[bytes, bytes]]:
    """Real files whose names are awkward in URIs: bytes that are not UTF-8, a literal '%' (alone, before hex
    digits, and spelling the escape of a byte that is also a real name), '#', '?', a newline, and a path of 1,100
    characters. Returns the folder and {raw path bytes: content}."""
    root = tmp_path / "odd"
    root.mkdir()
    raw_root = os.fsencode(root)
    names = [b"bad\xff\xfe.png", b"latin1-caf\xe9.jpg", b"100%.png", b"a%41.png", b"b%FF.png", b"b%25FF.png",
             b"hash#and?query.png", b"new\nline.png", "ünïcödé 商品.png".encode()]
    deep = raw_root + b"/" + b"/".join([b"d" * 200] * 4)
    os.makedirs(deep)
    names.append(deep[len(raw_root) + 1 :] + b"/" + b"x" * (1100 - len(deep) - 1 - 4) + b".png")
    files = {}
    for i, name in enumerate(names):
        path = raw_root + b"/" + name
        with open(path, "wb") as f:
            f.write(b"content %d" % i)
        files[path] = b"content %d" % i
    assert len(max(files, key=len)) == 1100
    return root, files


def test_local_names_of_any_bytes_and_length_round_trip_through_their_uris(tmp_path: Path) -> None:
    root, files = _odd_names_tree(tmp_path)
    reader = ObjectReader(LocalStorage([root]))
    items = list(iter_source(str(root), reader))
    assert len(items) == len(files) == len({it.uri for it in items}), "one distinct URI per file"
    for it in items:
        assert it.item_id == it.uri and it.uri.isascii() and it.uri.startswith("file:///")
        raw = os.fsencode(local_path(it.uri))
        assert raw in files, raw
        assert reader.read(it.uri) == files[raw]
    by_name = {os.fsencode(local_path(it.uri)).rsplit(b"/", 1)[1]: it.uri for it in items}
    assert by_name[b"bad\xff\xfe.png"].endswith("/bad%FF%FE.png")
    assert by_name[b"b%FF.png"].endswith("/b%25FF.png"), "a literal % is escaped: never read as a byte"
    assert by_name[b"b%25FF.png"].endswith("/b%2525FF.png")
    assert by_name[b"new\nline.png"].endswith("/new%0Aline.png")
    top = [it.uri.rsplit("/", 1)[1] for it in items if it.uri.count("/") == root.as_uri().count("/") + 1]
    assert top == sorted(top, key=lambda u: os.fsdecode(unquote_to_bytes(u))), "files in name order"


def test_messages_about_names_that_are_not_utf8_are_storable_text(tmp_path: Path) -> None:
    root = tmp_path / "gone"
    root.mkdir()
    uri = Path(os.fsdecode(os.fsencode(root) + b"/gone\xff.png")).as_uri()
    with pytest.raises(FileNotFoundError) as info:
        ObjectReader(LocalStorage([root])).read(uri)
    assert str(info.value) == f"no such file: {root}/gone\\xff.png"
    str(info.value).encode("utf-8")  # no surrogate left: a database can store it as a row's error
