"""Photos in every format a folder or S3 prefix is listed by (pipeline.io.storage.IMAGE_SUFFIXES), made from the
bundled example photos, sorted end to end into SQLite; and what a listing leaves out is said, never silent."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from PIL import Image

from db.catalog import iter_items
from db.session import session_scope
from pipeline.io.storage import IMAGE_SUFFIXES, LocalStorage, S3Storage
from tests.fixtures.files import put_objects
from tests.images import example_files
from worker.cli import main

# suffix -> (Pillow format, lossless for a grayscale photo)
FORMATS: dict[str, tuple[str, bool]] = {
    ".jpg": ("JPEG", False), ".jpeg": ("JPEG", False), ".jpe": ("JPEG", False), ".jfif": ("JPEG", False),
    ".png": ("PNG", True), ".webp": ("WEBP", False), ".bmp": ("BMP", True), ".dib": ("BMP", True),
    ".tif": ("TIFF", True), ".tiff": ("TIFF", True), ".gif": ("GIF", True), ".avif": ("AVIF", False),
    ".jp2": ("JPEG2000", False), ".j2k": ("JPEG2000", False), ".pgm": ("PPM", True), ".pnm": ("PPM", True),
    ".ppm": ("PPM", True), ".pbm": ("PPM", False),
}


def encoded(photo: Path, suffix: str) -> bytes:
    """``photo`` (a grayscale PNG) re-encoded in the format of ``suffix``."""
    fmt, _ = FORMATS[suffix]
    im = Image.open(photo).convert("L")
    if suffix == ".pbm":
        im = im.convert("1")
    elif suffix == ".ppm" or fmt in ("JPEG", "AVIF"):
        im = im.convert("RGB")
    buf = io.BytesIO()
    im.save(buf, fmt, **({"irreversible": False} if fmt == "JPEG2000" else {}))
    return buf.getvalue()


def test_every_listed_suffix_has_a_format_here() -> None:
    assert set(FORMATS) == set(IMAGE_SUFFIXES)


def test_a_folder_of_every_format_is_sorted_and_what_is_left_out_is_said(tmp_path: Path, sqlite_url: str,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    photo = example_files()[0]
    src = tmp_path / "photos"
    src.mkdir()
    (src / "original.png").write_bytes(photo.read_bytes())
    for suffix in sorted(IMAGE_SUFFIXES):
        (src / f"photo{suffix.upper() if suffix == '.gif' else suffix}").write_bytes(encoded(photo, suffix))
    (src / "notes.txt").write_text("not a photo")
    (src / "scan").write_bytes(encoded(photo, ".png"))  # a photo without a suffix: left out, and said so
    (src / ".DS_Store").write_bytes(b"\0")

    with caplog.at_level(logging.INFO, logger="pipeline.io.storage"):
        result = CliRunner().invoke(main, ["sort", str(src), "--db", sqlite_url, "--no-progress"],
                                    catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"sorted {len(IMAGE_SUFFIXES) + 1} images" in result.output
    said = [r.getMessage() for r in caplog.records if r.name == "pipeline.io.storage"]
    assert said[0].startswith(f"{src}: left out 2 file(s) whose names are not photos (.txt 1, no suffix 1; "
                              "e.g. notes.txt, scan)"), said
    assert said[1] == f"{src}: left out 1 hidden name(s) (starting with '.')"
    with session_scope(sqlite_url) as session:
        rows = {Path(r.image_uri).name: r for r in iter_items(session=session)}
    assert set(rows) == {"original.png", *(f"photo{s.upper() if s == '.gif' else s}" for s in IMAGE_SUFFIXES)}
    failed = {name: r.error for name, r in rows.items() if r.status == "failed"}
    assert failed == {}
    original = rows.pop("original.png")
    for name, row in rows.items():
        suffix = Path(name).suffix.lower()
        if FORMATS[suffix][1]:  # the same pixels: the same answer
            assert row.category == original.category and row.confidence == pytest.approx(original.confidence,
                                                                                          abs=1e-5), name


def test_an_s3_listing_says_what_it_left_out(s3_server: str, s3_bucket: tuple[Any, str],
                                             caplog: pytest.LogCaptureFixture) -> None:
    client, bucket = s3_bucket
    png = example_files()[0].read_bytes()
    put_objects(client, bucket, {"p/a.png": png, "p/b.GIF": png, "p/readme.md": b"r", "p/c.heic": b"h",
                                 "p/.hidden/x.png": png, "p/sub/": b""})
    with caplog.at_level(logging.INFO, logger="pipeline.io.storage"):
        uris = list(S3Storage(endpoint_url=s3_server).list(f"s3://{bucket}/p/"))
    assert uris == [f"s3://{bucket}/p/a.png", f"s3://{bucket}/p/b.GIF"]
    said = [r.getMessage() for r in caplog.records if r.name == "pipeline.io.storage"]
    # keys come in S3's order: c.heic before readme.md
    assert said[0].startswith(f"s3://{bucket}/p/: left out 2 file(s) whose names are not photos (.heic 1, .md 1; "
                              "e.g. c.heic, readme.md); photos are listed by suffix: .avif .bmp"), said
    assert f"s3://{bucket}/p/: left out 1 hidden name(s) (starting with '.')" in said


def test_a_folder_of_photos_alone_says_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "a.png").write_bytes(example_files()[0].read_bytes())
    with caplog.at_level(logging.INFO, logger="pipeline.io.storage"):
        assert len(list(LocalStorage([str(tmp_path)]).list(str(tmp_path)))) == 1
    assert [r for r in caplog.records if r.name == "pipeline.io.storage"] == []
