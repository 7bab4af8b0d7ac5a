"""pipeline.io.storage against real files in tmp_path and a real S3 API (moto server over HTTP): URIs, local and S3
listing and reading, the errors users see, and the reader that dispatches between them. What a source (folder,
prefix, manifest) yields is tests/test_sources.py's."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import InvsortError, SourceError, TransientError
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
from pipeline.settings import Settings
from tests.fixtures.files import jpeg_bytes, put_objects, write_file

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
        uri = str(write_file(tmp_path / "photos2" / "p.jpg", b"p"))
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


def test_local_read_of_a_fifo_or_a_dangling_link_ends_at_once(tree: tuple[Path, dict[str, bytes]],
                                                               outside: Path) -> None:
    """A named pipe inside the roots (a manifest can name anything) is read as empty rather than waited on for
    ever (so its row fails as an empty file); a link to nothing says whether its target would be outside."""
    root, _ = tree
    fifo = root / "pipe.jpg"
    os.mkfifo(fifo)
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(LocalStorage([root]).read, str(fifo)).result(timeout=10) == b""
        writer = os.open(fifo, os.O_RDWR)  # a writer that holds the pipe open and has written nothing
        try:
            assert pool.submit(LocalStorage([root]).read, str(fifo)).result(timeout=10) == b""
        finally:
            os.close(writer)
    (root / "gone.jpg").symlink_to(root / "never-written.jpg")
    with pytest.raises(FileNotFoundError, match="no such file: .*gone.jpg"):
        LocalStorage([root]).read(str(root / "gone.jpg"))
    (root / "gone-out.jpg").symlink_to(outside.parent / "never-written.jpg")
    with pytest.raises(PermissionError, match="outside the local roots"):
        LocalStorage([root]).read(str(root / "gone-out.jpg"))


def test_local_list_outside_roots_refused(tree: tuple[Path, dict[str, bytes]], outside: Path) -> None:
    root, _ = tree
    with pytest.raises(PermissionError, match="INVSORT_LOCAL_ROOTS"):
        LocalStorage([root]).list(str(outside.parent))


# -------------------------------------------------------------------------------------------- S3


@pytest.mark.slow  # 1012 objects put over HTTP: ~5 s; the paging itself is the next test's, with pages of 5
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
    put_objects(client, bucket, objects)
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
    put_objects(client, bucket, {f"k/{i:02d}.png": b"p" for i in range(23)})
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
    data = jpeg_bytes(3)
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
        with pytest.raises(TransientError) as info:  # an unreachable endpoint is not the item's fault
            call()
        assert isinstance(info.value, OSError)
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
        ("NoSuchKey", 404, FileNotFoundError, "no such object"),
        ("InvalidRange", 416, OSError, "InvalidRange"),
        # transient: still failing after botocore's retries (the stubber answers once, without retrying)
        ("SlowDown", 503, TransientError, "SlowDown"),
        ("InternalError", 500, TransientError, "InternalError"),
        ("ServiceUnavailable", 503, TransientError, "ServiceUnavailable"),
        ("BadGateway", 502, TransientError, "BadGateway"),
        ("TooManyRequests", 429, TransientError, "TooManyRequests"),
        ("RequestTimeout", 400, TransientError, "RequestTimeout"),
        ("Throttling", 400, TransientError, "Throttling"),
    ]
    with Stubber(stubbed) as stub:
        for code, status, exc_type, text in cases:
            stub.add_client_error("get_object", code, "msg", status)
            with pytest.raises(exc_type, match=text) as info:
                storage.read("s3://b/k.jpg")
            assert not isinstance(info.value, botocore.exceptions.ClientError)
            if exc_type is TransientError:
                assert "retry later" in str(info.value)
            else:  # a 4xx answer fails the item: a builtin error, never a TransientError
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
    config = storage.client.meta.config
    assert (config.read_timeout, config.connect_timeout, config.max_pool_connections) == (3.5, 10.0, 32)
    assert config.retries == {"mode": "standard", "total_max_attempts": 10}


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
    extra = write_file(tmp_path / "extra" / "e.jpg", b"e")
    settings = Settings(local_roots=[root], max_image_bytes=1000, s3_endpoint_url="http://127.0.0.1:9")
    reader = make_reader(settings, extra_roots=[extra.parent])
    assert reader.read(str(extra)) == b"e"
    assert reader.read(str(root / "100% cotton.bmp")) == images["100% cotton.bmp"]
    big = write_file(root / "big.png", b"x" * 1001)
    with pytest.raises(TooLargeError):
        reader.read(str(big))
    assert reader._s3 is None


def test_make_reader_gives_s3_the_retry_timeout_and_pool_settings() -> None:
    settings = Settings(s3_endpoint_url="http://127.0.0.1:9", s3_retry_mode="adaptive", s3_max_attempts=4,
                        fetch_timeout_s=7, s3_connect_timeout_s=2.5, s3_max_pool_connections=8, fetch_concurrency=4)
    reader = make_reader(settings)
    s3 = reader.s3
    config = s3.client.meta.config
    assert config.retries == {"mode": "adaptive", "total_max_attempts": 4} and s3.max_attempts == 4
    assert (config.read_timeout, config.connect_timeout, config.max_pool_connections) == (7, 2.5, 8)
    assert s3.client.meta.endpoint_url == "http://127.0.0.1:9"
    assert reader.fetch_concurrency == 4
    assert make_reader(settings).s3 is s3  # one client per process and settings: its connections outlive a task
    # Every fetch thread gets a connection: the pool grows to the fetch concurrency.
    wider = make_reader(settings.model_copy(update={"fetch_concurrency": 48})).s3.client.meta.config
    assert wider.max_pool_connections == 48


def test_reader_streams_lines_of_local_and_s3_objects_alike(
    tmp_path: Path, outside: Path, s3_server: str, s3_bucket: tuple[Any, str]
) -> None:
    client, bucket = s3_bucket
    body = b"\xef\xbb\xbfa,b\r\nc\rd\n\ne" + b"x" * (64 * 1024 - 15) + b"\r\nlast"  # a \r\n across two chunks
    local = write_file(tmp_path / "m" / "lines.csv", body)
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
