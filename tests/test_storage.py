"""pipeline.io.storage and pipeline.io.sources against real files in tmp_path and a real S3 API (moto server over
HTTP)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from pipeline.errors import InvsortError, SourceError
from pipeline.io.sources import iter_source
from pipeline.io.storage import (
    LocalStorage,
    ObjectReader,
    S3Storage,
    TooLargeError,
    local_path,
    make_reader,
    parse_s3_uri,
)
from pipeline.records import Item
from pipeline.settings import Settings


def _png(seed: int) -> bytes:
    img = np.full((4, 5, 3), seed % 256, dtype=np.uint8)
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def _jpeg(seed: int) -> bytes:
    img = np.full((6, 6, 3), seed % 256, dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return buf.tobytes()


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A photo folder with messy names; returns (root, {relative path of each image to list: bytes})."""
    root = tmp_path / "photos"
    images = {
        "a.jpg": _jpeg(1),
        "B.PNG": _png(2),
        "file#hash?.png": _png(3),
        "100% cotton.bmp": b"BM fake bmp bytes",
        "Boot/boot (1).jpg": _jpeg(4),
        "Boot/boot (2).JPEG": _jpeg(5),
        "sub/deeper/x.tif": b"II*\x00 fake tiff",
        "sub/deeper/y.tiff": b"II*\x00 fake tiff 2",
        "sub/z.webp": b"RIFF fake webp",
        "ünï cödé/фото 1.jpg": _jpeg(6),
    }
    for rel, data in images.items():
        _write(root / rel, data)
    # not listed: other suffixes, no suffix, hidden files and directories
    _write(root / "notes.txt", b"text")
    _write(root / "jpg", b"no suffix")
    _write(root / ".hidden.jpg", _jpeg(7))
    _write(root / "._a.jpg", b"AppleDouble")
    _write(root / ".cache/c.jpg", _jpeg(8))
    _write(root / "sub/.thumbs/t.png", _png(9))
    return root, images


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    return _write(tmp_path / "outside" / "secret.jpg", b"secret")


# ------------------------------------------------------------------------------------------ URIs


def test_uri_helpers_round_trip(tmp_path: Path) -> None:
    p = tmp_path / "Boot" / "boot (1) ünï #?%.jpg"
    uri = p.as_uri()  # how listings write local URIs
    assert not any(c in uri for c in " #?()ü") and "%28" in uri
    assert local_path(uri) == p
    assert local_path("file://localhost/data/a%20b.jpg") == Path("/data/a b.jpg")
    assert local_path("file:/data/a%20b.jpg") == Path("/data/a b.jpg")
    assert local_path("relative/x.jpg") == Path.cwd() / "relative" / "x.jpg"
    assert parse_s3_uri("s3://bucket/dir/k #1?.jpg") == ("bucket", "dir/k #1?.jpg")
    with pytest.raises(SourceError, match="host"):
        local_path("file://otherhost/x.jpg")
    with pytest.raises(SourceError, match="unsupported URI scheme 'http'"):
        local_path("http://example.com/x.jpg")
    with pytest.raises(SourceError, match="no bucket"):
        parse_s3_uri("s3:///key.jpg")


# ----------------------------------------------------------------------------------------- local


def test_local_list_recursive_sorted_filtered_and_round_trips(tree: tuple[Path, dict[str, bytes]]) -> None:
    root, images = tree
    storage = LocalStorage([root])
    it = storage.list(root.as_uri())
    assert isinstance(it, Iterator)
    uris = list(it)
    rels = [local_path(u).relative_to(root).as_posix() for u in uris]
    # files of a directory (sorted) before its subdirectories (sorted), depth first
    assert rels == [
        "100% cotton.bmp",
        "B.PNG",
        "a.jpg",
        "file#hash?.png",
        "Boot/boot (1).jpg",
        "Boot/boot (2).JPEG",
        "sub/z.webp",
        "sub/deeper/x.tif",
        "sub/deeper/y.tiff",
        "ünï cödé/фото 1.jpg",
    ]
    assert set(rels) == set(images)
    for uri, rel in zip(uris, rels, strict=True):
        assert uri == (root / rel).as_uri()
        assert storage.read(uri) == images[rel]
    # the same order every time, and a plain path works as the prefix too
    assert list(storage.list(str(root))) == uris


def test_local_read_plain_path_and_symlink_inside_root(tree: tuple[Path, dict[str, bytes]]) -> None:
    root, images = tree
    link = root / "link.jpg"
    link.symlink_to(root / "a.jpg")
    storage = LocalStorage([root])
    assert storage.read(str(root / "a.jpg")) == images["a.jpg"]
    assert storage.read(link.as_uri()) == images["a.jpg"]


def test_local_roots_given_through_a_symlink(tree: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    root, images = tree
    alias = tmp_path / "alias"
    alias.symlink_to(root)
    storage = LocalStorage([alias])  # resolved: files under the real directory are inside
    assert storage.read((root / "a.jpg").as_uri()) == images["a.jpg"]
    assert storage.read((alias / "a.jpg").as_uri()) == images["a.jpg"]


@pytest.mark.parametrize(
    "how", ["plain", "dotdot", "dotdot_uri", "symlink", "symlinked_dir", "prefix_sibling"]
)
def test_local_read_outside_roots_refused(
    tree: tuple[Path, dict[str, bytes]], outside: Path, tmp_path: Path, how: str
) -> None:
    root, _ = tree
    if how == "plain":
        uri = str(outside)
    elif how == "dotdot":
        uri = f"{root}/../outside/secret.jpg"
    elif how == "dotdot_uri":
        uri = f"{root.as_uri()}/sub/../../outside/secret.jpg"
    elif how == "symlink":
        link = root / "escape.jpg"
        link.symlink_to(outside)
        uri = link.as_uri()
    elif how == "symlinked_dir":
        (root / "escape_dir").symlink_to(outside.parent, target_is_directory=True)
        uri = (root / "escape_dir" / "secret.jpg").as_uri()
    else:  # /x/photos2 is not inside /x/photos
        uri = str(_write(tmp_path / "photos2" / "p.jpg", b"p"))
    storage = LocalStorage([root])
    with pytest.raises(PermissionError) as info:
        storage.read(uri)
    msg = str(info.value)
    assert "INVSORT_LOCAL_ROOTS" in msg and str(root) in msg and "outside the local roots" in msg
    # a symlinked directory is not followed when listing, so nothing outside is ever listed
    assert not any("secret" in u for u in storage.list(str(root)))


def test_local_empty_roots_refuse_everything(tree: tuple[Path, dict[str, bytes]]) -> None:
    root, _ = tree
    storage = LocalStorage([])
    for call in (storage.read, lambda u: list(storage.list(u))):
        with pytest.raises(PermissionError, match="no local roots are configured.*INVSORT_LOCAL_ROOTS"):
            call(str(root / "a.jpg"))


def test_local_missing_file_directory_and_oversize(tree: tuple[Path, dict[str, bytes]]) -> None:
    root, images = tree
    storage = LocalStorage([root])
    missing = root / "nope (1).jpg"
    with pytest.raises(FileNotFoundError, match=r"no such file: .*nope \(1\)\.jpg"):
        storage.read(missing.as_uri())
    with pytest.raises(IsADirectoryError):
        storage.read(str(root / "Boot"))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        storage.list(str(root / "nodir"))
    with pytest.raises(SourceError, match="not a directory"):
        storage.list(str(root / "a.jpg"))
    small = LocalStorage([root], max_bytes=len(images["a.jpg"]) - 1)
    with pytest.raises(TooLargeError, match="more than the limit") as info:
        small.read(str(root / "a.jpg"))
    assert isinstance(info.value, ValueError) and isinstance(info.value, InvsortError)
    assert small.read(str(root / "100% cotton.bmp")) == images["100% cotton.bmp"]


def test_local_list_outside_roots_refused(tree: tuple[Path, dict[str, bytes]], outside: Path) -> None:
    root, _ = tree
    with pytest.raises(PermissionError, match="INVSORT_LOCAL_ROOTS"):
        LocalStorage([root]).list(str(outside.parent))


# -------------------------------------------------------------------------------------------- S3


def _put_many(client: Any, bucket: str, objects: dict[str, bytes]) -> None:
    def put(kv: tuple[str, bytes]) -> None:
        client.put_object(Bucket=bucket, Key=kv[0], Body=kv[1])

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, objects.items()))


def test_s3_list_paginates_over_1000_objects(s3_server: str, s3_bucket: tuple[Any, str]) -> None:
    client, bucket = s3_bucket
    objects = {f"photos/img_{i:05d}.jpg": b"x" for i in range(1005)}
    objects |= {
        "photos/": b"",  # directory marker
        "photos/sub/": b"",
        "photos/notes.txt": b"t",
        "photos/.hidden.jpg": b"h",
        "photos/.cache/c.jpg": b"c",
        "photos/sub/Boot (1) ü #?.JPEG": b"b",
        "photos2/other.jpg": b"o",
    }
    _put_many(client, bucket, objects)
    storage = S3Storage(endpoint_url=s3_server)
    pages: list[int] = []
    storage.client.meta.events.register("before-call.s3.ListObjectsV2", lambda **_: pages.append(1))
    uris = list(storage.list(f"s3://{bucket}/photos/"))
    assert len(pages) == 2  # 1000 keys per page by default
    expected = [f"photos/img_{i:05d}.jpg" for i in range(1005)] + ["photos/sub/Boot (1) ü #?.JPEG"]
    assert uris == [f"s3://{bucket}/{k}" for k in expected]
    # raw prefix semantics at the storage level; iter_source treats the prefix as a directory
    assert f"s3://{bucket}/photos2/other.jpg" in set(storage.list(f"s3://{bucket}/photos"))
    reader = ObjectReader(LocalStorage([]), s3=storage)
    items = list(iter_source(f"s3://{bucket}/photos", reader))
    assert [i.uri for i in items] == uris and all(i.item_id == i.uri for i in items)


def test_s3_list_small_page_size_is_lazy(s3_server: str, s3_bucket: tuple[Any, str]) -> None:
    client, bucket = s3_bucket
    _put_many(client, bucket, {f"k/{i:02d}.png": b"p" for i in range(23)})
    storage = S3Storage(endpoint_url=s3_server, page_size=5)
    calls: list[str] = []
    storage.client.meta.events.register("before-call.s3.ListObjectsV2", lambda **_: calls.append("list"))
    it = storage.list(f"s3://{bucket}/k/")
    assert calls == []
    assert next(it) == f"s3://{bucket}/k/00.png"
    assert calls == ["list"]
    rest = list(it)
    assert len(rest) == 22 and len(calls) == 5


def test_s3_read_and_errors(s3_server: str, s3_bucket: tuple[Any, str]) -> None:
    client, bucket = s3_bucket
    data = _jpeg(3)
    key = "Boot/boot (1) ü #?.jpg"
    client.put_object(Bucket=bucket, Key=key, Body=data)
    storage = S3Storage(endpoint_url=s3_server)
    assert storage.read(f"s3://{bucket}/{key}") == data

    with pytest.raises(FileNotFoundError, match=f"no such object: s3://{bucket}/missing.jpg"):
        storage.read(f"s3://{bucket}/missing.jpg")
    with pytest.raises(FileNotFoundError, match="no such bucket: invsort-no-such-bucket"):
        storage.read("s3://invsort-no-such-bucket/a.jpg")
    with pytest.raises(FileNotFoundError, match="no such bucket: invsort-no-such-bucket"):
        list(storage.list("s3://invsort-no-such-bucket/photos/"))
    with pytest.raises(SourceError, match="no key"):
        storage.read(f"s3://{bucket}")

    small = S3Storage(client, max_bytes=len(data) - 1)
    with pytest.raises(TooLargeError, match="more than the limit") as info:
        small.read(f"s3://{bucket}/{key}")
    assert isinstance(info.value, ValueError)


def test_s3_no_botocore_exception_leaks() -> None:
    import botocore.config
    import botocore.exceptions
    import botocore.session
    from botocore.stub import Stubber

    # nothing listens on this port: a connection error, without retries
    dead = botocore.session.get_session().create_client(
        "s3",
        endpoint_url="http://127.0.0.1:9",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=botocore.config.Config(retries={"max_attempts": 1}, connect_timeout=2),
    )
    storage = S3Storage(dead)
    for call in (lambda: storage.read("s3://b/k.jpg"), lambda: list(storage.list("s3://b/p/"))):
        with pytest.raises(OSError) as info:
            call()
        assert not isinstance(info.value, botocore.exceptions.BotoCoreError | botocore.exceptions.ClientError)
        assert "EndpointConnectionError" in str(info.value) and "testing" not in str(info.value)

    # error codes the moto server does not produce, through botocore's own stubber
    stubbed = botocore.session.get_session().create_client(
        "s3", region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
    )
    storage = S3Storage(stubbed)
    cases: list[tuple[str, int, type[Exception], str]] = [
        ("AccessDenied", 403, PermissionError, "AccessDenied"),
        ("InvalidAccessKeyId", 403, PermissionError, "InvalidAccessKeyId"),
        ("InvalidObjectState", 403, PermissionError, "InvalidObjectState"),
        ("SlowDown", 503, OSError, "SlowDown"),
        ("InternalError", 500, OSError, "InternalError"),
    ]
    with Stubber(stubbed) as stub:
        for code, status, exc_type, text in cases:
            stub.add_client_error("get_object", code, "msg", status)
            with pytest.raises(exc_type, match=text) as info:
                storage.read("s3://b/k.jpg")
            assert not isinstance(info.value, botocore.exceptions.ClientError)
            assert type(info.value).__module__ == "builtins"
        stub.add_client_error("list_objects_v2", "AccessDenied", "denied", 403)
        with pytest.raises(PermissionError, match="ListObjectsV2.*AccessDenied"):
            list(storage.list("s3://b/p/"))


def test_s3_client_defaults_region(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    storage = S3Storage(endpoint_url="http://127.0.0.1:9", timeout_s=3.5)
    assert storage.client.meta.region_name == "us-east-1"
    assert storage.client.meta.config.read_timeout == 3.5
    assert storage.client.meta.config.retries == {"mode": "standard", "total_max_attempts": 6}


# ---------------------------------------------------------------------------------------- reader


def test_reader_dispatch_and_lazy_s3(
    tree: tuple[Path, dict[str, bytes]], s3_server: str, s3_bucket: tuple[Any, str]
) -> None:
    root, images = tree
    created: list[int] = []
    lock = threading.Lock()

    def factory() -> S3Storage:
        with lock:
            created.append(1)
        return S3Storage(endpoint_url=s3_server)

    reader = ObjectReader(LocalStorage([root]), s3_factory=factory)
    assert reader.read((root / "a.jpg").as_uri()) == images["a.jpg"]
    assert [i.uri for i in iter_source(str(root), reader)] == list(reader.list(str(root)))
    assert created == []  # local-only use never creates the S3 client
    with pytest.raises(SourceError, match=r"unsupported URI scheme 'http' in 'http://h/x.jpg': use file://"):
        reader.read("http://h/x.jpg")

    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="x.png", Body=b"png")
    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(reader.read, [f"s3://{bucket}/x.png"] * 32)) == {b"png"}
    assert created == [1]
    reader.close()


def test_make_reader_from_settings(tree: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    root, images = tree
    extra = _write(tmp_path / "extra" / "e.jpg", b"e")
    settings = Settings(local_roots=[root], max_image_bytes=1000, s3_endpoint_url="http://127.0.0.1:9")
    reader = make_reader(settings, extra_roots=[extra.parent])
    assert reader.read(str(extra)) == b"e"
    assert reader.read(str(root / "100% cotton.bmp")) == images["100% cotton.bmp"]
    big = _write(root / "big.png", b"x" * 1001)
    with pytest.raises(TooLargeError):
        reader.read(str(big))
    assert reader._s3 is None


# --------------------------------------------------------------------------------------- sources


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
    outside_manifest = _write(outside.parent / "m.csv", b"item_id,image_uri\na,secret.jpg\n")
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
    manifest = _write(manifest_dir / f"items.{fmt}", data)
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
    local = _write(tmp_path / "local" / "l.jpg", b"local")
    objects = {
        "lists/img/a (1).jpg": b"a",
        "photos/b #?.jpg": b"b",
        "lists/c.png": b"c",
    }
    _put_many(client, bucket, objects)
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
    manifest = _write(tmp_path / f"bad.{suffix}", text.encode())
    reader = ObjectReader(LocalStorage([tmp_path]))
    with pytest.raises(SourceError, match=message) as info:
        list(iter_source(str(manifest), reader))
    msg = str(info.value)
    assert str(manifest) in msg
    if line is not None:
        assert f"line {line}:" in msg


def test_malformed_manifest_rows_before_the_error_are_streamed(tmp_path: Path) -> None:
    manifest = _write(tmp_path / "m.jsonl", b'{"item_id": "a", "image_uri": "a.jpg"}\nnot json\n')
    items = iter_source(str(manifest), ObjectReader(LocalStorage([tmp_path])))
    assert next(items) == Item("a", (tmp_path / "a.jpg").as_uri())
    with pytest.raises(SourceError, match="line 2: bad JSON"):
        next(items)


def test_invalid_utf8_manifest(tmp_path: Path) -> None:
    manifest = _write(tmp_path / "m.csv", b"item_id,image_uri\na,x.jpg\nb,\xff\xfe.jpg\n")
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
    _put_many(client, bucket, {"shoes/a.jpg": b"1", "shoes-old/b.jpg": b"2", "top.png": b"3"})
    reader = ObjectReader(LocalStorage([]), s3=S3Storage(client))
    assert [i.uri for i in iter_source(f"s3://{bucket}/shoes", reader)] == [f"s3://{bucket}/shoes/a.jpg"]
    assert [i.uri for i in iter_source(f"s3://{bucket}", reader)] == [
        f"s3://{bucket}/shoes-old/b.jpg",
        f"s3://{bucket}/shoes/a.jpg",
        f"s3://{bucket}/top.png",
    ]


def test_reader_streams_lines_of_local_and_s3_objects_alike(
    tmp_path: Path, outside: Path, s3_server: str, s3_bucket: tuple[Any, str]
) -> None:
    client, bucket = s3_bucket
    body = b"\xef\xbb\xbfa,b\r\nc\rd\n\ne" + b"x" * (64 * 1024 - 15) + b"\r\nlast"  # a \r\n across two chunks
    local = _write(tmp_path / "m" / "lines.csv", body)
    client.put_object(Bucket=bucket, Key="m/lines.csv", Body=body)
    reader = ObjectReader(LocalStorage([tmp_path / "m"]), s3=S3Storage(client))
    expected = body.splitlines(keepends=True)
    assert list(reader.iter_lines(str(local))) == list(reader.iter_lines(local.as_uri())) == expected
    assert list(reader.iter_lines(f"s3://{bucket}/m/lines.csv")) == expected
    assert reader.local_kind(str(tmp_path / "m")) == "directory"
    assert reader.local_kind(local.as_uri()) == "file"
    assert reader.local_kind(str(tmp_path / "m" / "nope.csv")) is None
    with pytest.raises(PermissionError, match="INVSORT_LOCAL_ROOTS"):
        reader.iter_lines(str(outside))  # checked when called, before anything is opened
    with pytest.raises(PermissionError, match="INVSORT_LOCAL_ROOTS"):
        reader.local_kind(str(outside))
    with pytest.raises(FileNotFoundError, match="no such file"):
        next(reader.iter_lines(str(tmp_path / "m" / "nope.csv")))
    with pytest.raises(SourceError, match="unsupported URI scheme"):
        reader.iter_lines("ftp://host/m.csv")


def test_manifest_with_old_mac_line_endings(tmp_path: Path) -> None:
    manifest = _write(tmp_path / "m.csv", b"item_id,image_uri\ra,x.jpg\rb,y.jpg\r")
    items = list(iter_source(str(manifest), ObjectReader(LocalStorage([tmp_path]))))
    assert items == [Item("a", (tmp_path / "x.jpg").as_uri()), Item("b", (tmp_path / "y.jpg").as_uri())]
