"""What the fuzz harnesses (tests/fuzz/, README "Fuzzing") found, one test each, and property tests of the manifest
parser (hypothesis).

Each test asserts the documented behaviour: the clean error (:class:`~pipeline.errors.ImageError`,
:class:`~pipeline.errors.SourceError`, the storages' documented ``OSError`` subclasses) or a correct result, with no
stray exception, warning or memory spike. The inputs are the fuzzer's own files (``tests/data/fuzz/``), or built
here when a few bytes say the same more plainly. While a finding is open its test fails: that is the point.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from botocore.response import StreamingBody
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.errors import ImageError, SourceError
from pipeline.io.images import batch_decodable_jpeg, check_image_header, decode_image
from pipeline.io.sources import iter_manifest, iter_source
from pipeline.io.storage import LocalStorage, ObjectReader, S3Storage, local_path, uri_scheme
from tests.images import photo_jpeg

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data" / "fuzz"

# -------------------------------------------------------------------------------------------------- decode


def _opencv_shape(data: bytes) -> tuple[int, ...] | None:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    return None if img is None else img.shape


_PEAK_RSS_CHILD = """
import resource, sys, time
from pipeline.errors import ImageError
from pipeline.io.images import decode_image
data = open(sys.argv[1], "rb").read()
decode_image(open(sys.argv[2], "rb").read(), size=(24, 32))  # a real photo first: buffers and pools set up
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
try:
    decode_image(data, size=(24, 32))
    outcome = "decoded"
except ImageError as exc:
    outcome = "ImageError: " + str(exc)
grew_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(f"{grew_mib:.0f} {time.perf_counter() - start:.2f} {outcome}")
"""


def _decode_in_child(path: Path, tmp_path: Path) -> tuple[float, float, str]:
    """Decode ``path`` in a fresh process: (peak RSS growth in MiB, seconds, outcome)."""
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(photo_jpeg())
    proc = subprocess.run([sys.executable, "-c", _PEAK_RSS_CHILD, str(path), str(photo)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=True)
    grew, seconds, outcome = proc.stdout.strip().splitlines()[-1].split(" ", 2)
    return float(grew), float(seconds), outcome


def _png_with_chunk_length(kind: bytes, length: int) -> bytes:
    """A real 16x16 PNG with a ``kind`` chunk header claiming ``length`` bytes (IDAT: its own; else inserted
    before IDAT)."""
    ok, buf = cv2.imencode(".png", np.full((16, 16, 3), 128, np.uint8))
    assert ok
    data = bytearray(buf.tobytes())
    i = data.index(b"IDAT") - 4
    if kind == b"IDAT":
        data[i : i + 4] = struct.pack(">I", length)
    else:
        data[i:i] = struct.pack(">I", length) + kind + b"\x00" * 8
    return bytes(data)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["idat_committed", "text_built", "first_chunk_not_ihdr"])
def test_png_chunk_claiming_more_bytes_than_the_file_fails_without_a_memory_spike(
    name: str, tmp_path: Path
) -> None:
    """Found by fuzz_decode (a mutated length byte): OpenCV's PNG reader allocates and fills a buffer of the
    length a chunk header claims (IDAT, tEXt...) before reading it, so a 109-byte 16x16 PNG took 2 GiB and 1.5 s
    (8 decode threads: 16 GiB), and check_image_header (dimensions only) let it through. The file must fail with
    ImageError, without the spike."""
    if name == "idat_committed":
        path = DATA / "decode_png_idat_length_2gib.png"
    elif name == "first_chunk_not_ihdr":  # 20 bytes: the signature, then an IEND chunk claiming 4 GB (10-min run)
        path = DATA / "decode_png_huge_first_chunk_oracle_oom.png"
    else:
        path = tmp_path / "text.png"
        path.write_bytes(_png_with_chunk_length(b"tEXt", 0x7FFF_FFF0))
    grew_mib, seconds, outcome = _decode_in_child(path, tmp_path)
    assert outcome.startswith("ImageError"), outcome
    assert grew_mib < 128, f"peak RSS grew by {grew_mib:.0f} MiB decoding a {path.stat().st_size}-byte file"
    assert seconds < 0.5


def test_png_chunk_length_within_the_file_still_decodes() -> None:
    """The other side of the check above: a PNG whose chunks all fit decodes as before."""
    ok, buf = cv2.imencode(".png", np.full((16, 16, 3), 128, np.uint8))
    assert decode_image(buf.tobytes(), size=(16, 16)).shape == (16, 16, 3)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_float_tiff_with_a_non_finite_pixel_keeps_its_other_pixels(value: float) -> None:
    """Found by fuzz_decode (a mutated float TIFF): one NaN or infinite pixel in a float image made
    ``cv2.normalize`` return NaN everywhere; the uint8 cast warned (an error under pytest) and gave an all-black
    photo, sorted as if it were one. It must decode to the other pixels' gradient, or fail with ImageError."""
    img = np.tile(np.linspace(0.2, 0.8, 16, dtype=np.float32), (16, 1))
    img[0, 0] = value
    ok, buf = cv2.imencode(".tif", img)
    assert ok and _opencv_shape(buf.tobytes()) == (16, 16)
    try:
        out = decode_image(buf.tobytes(), size=(16, 16), in_chans=1)
    except ImageError:
        return
    row = out[8, :, 0].astype(int)
    assert row[-1] - row[0] > 100, f"the gradient is gone: {row.tolist()}"


def test_float32_rgb_tiff_is_decoded_not_refused_as_not_an_image() -> None:
    """Found by fuzz_decode: a 3-channel float32 TIFF (OpenCV decodes it; ``decode_image`` scales floats to 8 bits)
    is refused as "not an image" by check_image_header, whose Pillow fallback cannot open it."""
    img = np.dstack([np.tile(np.linspace(0.0, 1.0, 16, dtype=np.float32), (16, 1))] * 3)
    ok, buf = cv2.imencode(".tif", img)
    assert ok and _opencv_shape(buf.tobytes()) == (16, 16, 3)
    out = decode_image(buf.tobytes(), size=(16, 16))
    assert out.shape == (16, 16, 3) and int(out[8, -1, 0]) - int(out[8, 0, 0]) > 200


@pytest.mark.parametrize(
    "name",
    [
        "decode_float_tiff_rgb_nan.tif",  # 3 x float32 TIFF with non-finite pixels: Pillow cannot open it
        "decode_tiff_bad_tag_uint8.tif",  # a TIFF with a tag value Pillow refuses (SyntaxError); libtiff reads it
        "decode_ppm_no_space_after_maxval.ppm",  # "P6\n32 24\n255" then the pixels: Pillow: "Token too long"
        "decode_jpeg_ff00_before_sof.jpg",  # see test_jpeg_header_reads_the_frame_header_libjpeg_reads
    ],
)
def test_file_opencv_decodes_is_not_refused_as_not_an_image(name: str) -> None:
    """Found by fuzz_decode: check_image_header leaves formats it does not parse to Pillow, which is stricter than
    OpenCV; a file OpenCV decodes is then refused with a reason that is not true. It must decode, or fail with
    ImageError for a reason that holds (not "not an image")."""
    data = (DATA / name).read_bytes()
    assert _opencv_shape(data) is not None  # the premise: OpenCV decodes it, within the limits
    try:
        decode_image(data, size=(24, 32))
    except ImageError as exc:
        assert not str(exc).startswith(("not an image", "not a decodable image")), str(exc)


def _jpeg_with_stray_ff00_and_fake_frame(real_hw: tuple[int, int] | None = None) -> bytes:
    """A real 56x40 JPEG; after its APP0 segment four stray bytes ``FF 00 00 06`` (libjpeg skips them as
    extraneous data) and a comment segment whose text is an 8x8 frame header. ``real_hw``: the real frame header's
    dimensions rewritten (the scan data stays the 56x40 one)."""
    data = photo_jpeg(0, (40, 56))
    end = 4 + int.from_bytes(data[4:6], "big")
    fake_sof = b"\xff\xc0\x00\x0b\x08\x00\x08\x00\x08\x01\x01\x11\x00"
    comment = b"\xff\xfe" + struct.pack(">H", 2 + len(fake_sof)) + fake_sof
    out = bytearray(data[:end] + b"\xff\x00\x00\x06" + comment + data[end:])
    if real_hw is not None:
        j = out.index(b"\xff\xc0", end + 4 + len(comment))
        out[j + 5 : j + 9] = struct.pack(">HH", *real_hw)
    return bytes(out)


def test_jpeg_header_reads_the_frame_header_libjpeg_reads() -> None:
    """Found by fuzz_decode (decode_jpeg_ff00_before_sof.jpg, refused as "not an image"): ``_jpeg_header`` takes the
    byte pair FF 00 for a marker and its next two bytes for a length, jumps, and reads whatever it lands on as the
    frame header; libjpeg skips FF 00 and stray bytes up to the next marker. Built here to land on a comment that
    looks like an 8x8 frame: the header must declare what OpenCV decodes."""
    data = _jpeg_with_stray_ff00_and_fake_frame()
    h, w = _opencv_shape(data)[:2]  # type: ignore[index]
    header = check_image_header(data)
    assert (header.width, header.height) == (w, h) == (56, 40)
    assert decode_image(data, size=(40, 56)).shape == (40, 56, 3)


def test_jpeg_header_walk_cannot_smuggle_a_huge_frame_past_the_pixel_limit() -> None:
    """The same walk, as a decompression bomb: the real frame header says 16000x16000 px (256 M pixels, 768 MB
    decoded), the comment says 8x8. check_image_header passed it (decode_bytes 320), and OpenCV decoded all of
    it (1.5 GiB peak, 6 s) before the dimension check after decoding refused it. It must be refused from its
    header, before any pixel buffer exists, as decode_image documents."""
    data = _jpeg_with_stray_ff00_and_fake_frame(real_hw=(16000, 16000))
    with pytest.raises(ImageError, match="image dimensions too large: 16000x16000 px"):
        check_image_header(data, max_pixels=100_000_000)


def test_jpeg_frame_header_cut_short_is_an_image_error() -> None:
    """Found by fuzz_decode against pipeline/io/headers.py (decode_jpeg_sof_cut_short.jpg, 16 bytes): ``_jpeg_header``
    checks that 7 bytes follow a frame header's length field but unpacks 8 (height, width, components at +3..+8),
    so a file cut inside that header raised ``struct.error``. With an end-of-image marker earlier in the file (inside
    an APP0 segment, built here) it reached decode_image and batch_decodable_jpeg too; each must say ImageError."""
    with pytest.raises(ImageError):
        check_image_header((DATA / "decode_jpeg_sof_cut_short.jpg").read_bytes())
    built = b"\xff\xd8\xff\xe0\x00\x04\xff\xd9\xff\xc0\x00\x11\x08\x00\x10\x00\x10"
    with pytest.raises(ImageError):
        check_image_header(built)
    with pytest.raises(ImageError):
        decode_image(built, size=(8, 8))
    with contextlib.suppress(ImageError):  # refusing it (ImageError) or leaving it to decode_image (False)
        assert batch_decodable_jpeg(built) is False


_BIGTIFF_VALUE_FAR = (  # a BigTIFF with 2 tags: ImageWidth (3 LONGs, so stored at an offset: 2**63), ImageLength 16
    b"II+\x00\x08\x00\x00\x00" + struct.pack("<QQ", 16, 2)
    + struct.pack("<HHQQ", 256, 4, 3, 2**63) + struct.pack("<HHQQ", 257, 3, 1, 16)
)


@pytest.mark.parametrize(
    "data",
    [(DATA / "decode_bigtiff_offset_2p63.tif").read_bytes(), _BIGTIFF_VALUE_FAR],
    ids=["first-directory", "tag-value"],
)
def test_bigtiff_offset_past_2_63_is_an_image_error(data: bytes) -> None:
    """Found by fuzz_decode against pipeline/io/headers.py (decode_bigtiff_offset_2p63.tif, 96 bytes): a BigTIFF
    offset (8 bytes) of 2**63 or more made ``struct.unpack_from`` raise OverflowError, which ``_tiff_header`` does not
    catch (only struct.error), out of check_image_header and decode_image."""
    with pytest.raises(ImageError):
        check_image_header(data)
    with pytest.raises(ImageError):
        decode_image(data, size=(8, 8))


# ----------------------------------------------------------------------------------------------- manifests


class _Client:
    """The one S3 call a manifest read makes, answered with ``body`` in botocore's own body type."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    def get_object(self, *, Bucket: str, Key: str) -> dict[str, object]:  # noqa: N803 (boto3's names)
        return {"Body": StreamingBody(io.BytesIO(self.body), len(self.body))}


def _manifest(tmp_path: Path, name: str, data: bytes) -> tuple[str, ObjectReader]:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path), ObjectReader(LocalStorage([tmp_path]))


@pytest.mark.parametrize(
    "image_uri",
    ["\\ud800.jpg", "photos/\\udfff/a.jpg", "/srv/photos/\\ud83d.jpg"],
    ids=["relative", "relative-dir", "absolute"],
)
def test_jsonl_image_uri_with_a_lone_surrogate_is_a_source_error(tmp_path: Path, image_uri: str) -> None:
    """Found by review, confirmed by fuzz_manifest: a JSON ``\\uD800`` escape is a lone surrogate, not a character;
    ``Path.as_uri()`` raised UnicodeEncodeError out of iter_manifest (the CLI's traceback, not its one line)."""
    line = '{"item_id": "a", "image_uri": "' + image_uri + '"}\n'
    source, reader = _manifest(tmp_path, "m.jsonl", b'{"item_id": "ok", "image_uri": "ok.jpg"}\n' + line.encode())
    with pytest.raises(SourceError, match=r"m\.jsonl, line 2"):
        list(iter_source(source, reader))


def test_jsonl_item_id_with_a_lone_surrogate_is_a_source_error(tmp_path: Path) -> None:
    """Found by fuzz_manifest's check that ids are valid Unicode: an item_id with a lone surrogate escape
    (``"\\udc80"``) was let through, and no catalog can store it (PostgreSQL, SQLite and the task queue's JSON all
    encode UTF-8): the batch's write would fail, not the manifest line."""
    source, reader = _manifest(tmp_path, "m.jsonl", b'{"item_id": "\\udc80", "image_uri": "a.jpg"}\n')
    with pytest.raises(SourceError, match=r"m\.jsonl, line 1"):
        list(iter_source(source, reader))


@pytest.mark.parametrize(
    "line",
    [b"[" * 100_000, b'{"item_id": {"a": ' * 5_000 + b"1", b'{"item_id": ' + b"7" * 5_000 + b', "image_uri": "a"}'],
    ids=["deep-array", "deep-object", "5000-digit-id"],
)
def test_jsonl_line_json_cannot_parse_is_a_source_error(tmp_path: Path, line: bytes) -> None:
    """Found by review, confirmed by fuzz_manifest: ``json.loads`` raises RecursionError for a line nested deeper
    than the recursion limit and ValueError for an integer of more than 4300 digits, neither a JSONDecodeError, so
    they left iter_manifest unwrapped instead of as "bad JSON" naming the line."""
    source, reader = _manifest(tmp_path, "m.jsonl", b'{"item_id": "ok", "image_uri": "ok.jpg"}\n' + line + b"\n")
    with pytest.raises(SourceError, match=r"m\.jsonl, line 2"):
        list(iter_source(source, reader))


_NUL_MANIFESTS = {
    "fuzzed.csv": (DATA / "manifest_nul_in_path.csv").read_bytes(),  # a raw NUL in a relative path
    "escaped.jsonl": b'{"item_id": "a", "image_uri": "photos/a\\u0000b.jpg"}\n',
    "percent.csv": b"item_id,image_uri\na,file:///srv/photos/a%00b.jpg\n",
}


@pytest.mark.parametrize("name", sorted(_NUL_MANIFESTS))
def test_nul_byte_in_an_image_path_is_a_clean_error(tmp_path: Path, name: str) -> None:
    """Found by fuzz_manifest (manifest_nul_in_path.csv): a NUL byte in image_uri (raw, ``\\u0000`` or ``%00``)
    makes a file URI the manifest accepts, and every read of it (LocalStorage.check, os.path.realpath) raised a bare
    ``ValueError: embedded null byte``, none of the errors the storage documents. The manifest may refuse the line,
    or the read may fail as documented."""
    source, reader = _manifest(tmp_path, name, _NUL_MANIFESTS[name])
    try:
        items = list(iter_source(source, reader))
    except SourceError:
        return
    assert items
    for item in items:
        with pytest.raises((SourceError, FileNotFoundError, PermissionError)):
            reader.local_kind(item.uri)
        with pytest.raises((SourceError, FileNotFoundError, PermissionError)):
            reader.read(item.uri)


def test_local_storage_refuses_a_nul_byte_as_documented(tmp_path: Path) -> None:
    """The storage side of the finding above, for a job's own source too (``invsort sort file:///x%00y``)."""
    storage = LocalStorage([tmp_path])
    uri = tmp_path.as_uri() + "/a%00b.jpg"
    for call in (storage.read, storage.kind, storage.iter_lines):
        with pytest.raises((SourceError, FileNotFoundError, PermissionError)):
            result = call(uri)
            if hasattr(result, "__next__"):
                next(result)
    with pytest.raises(SourceError):
        iter_source(uri, ObjectReader(storage))


@pytest.mark.parametrize("image_uri", ["..", "../", "x/../.."])
def test_s3_manifest_relative_path_to_the_top_of_the_bucket_is_a_source_error(image_uri: str) -> None:
    """Found by fuzz_manifest (manifest_s3_relative_to_bucket_root.csv, ``../..`` beside ``manifests/2026/m.csv``):
    a relative image_uri that climbs to the top of the bucket resolved to ``s3://bucket/``, an object URI with no key,
    where an explicit ``s3://bucket`` is refused ("has no key"); the item then failed at read time instead of the
    manifest naming the line."""
    data = b"item_id,image_uri\nok,ok.jpg\ntop," + image_uri.encode() + b"\n"
    reader = ObjectReader(LocalStorage([]), s3=S3Storage(_Client(data)))
    with pytest.raises(SourceError, match=r"m\.csv, line 3"):
        list(iter_source("s3://bucket/cat/m.csv", reader))


def test_s3_manifest_committed_fuzz_file_is_refused_or_gives_object_keys() -> None:
    data = (DATA / "manifest_s3_relative_to_bucket_root.csv").read_bytes()
    reader = ObjectReader(LocalStorage([]), s3=S3Storage(_Client(data)))
    try:
        items = list(iter_source("s3://catalogue/manifests/2026/m.csv", reader))
    except SourceError:
        return
    assert all(i.uri.split("/", 3)[3:] not in ([], [""]) for i in items if i.uri.startswith("s3://")), items


# ----------------------------------------------------------------------------------- manifest properties

_CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")  # both: findings above
_IDS = st.text(_CHARS, min_size=1, max_size=12).filter(lambda s: s == s.strip() and s != "")
_SEGMENT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00/"), min_size=1, max_size=8)
_REL = st.lists(_SEGMENT, min_size=1, max_size=3).map("/".join).filter(
    lambda p: p == p.strip() and uri_scheme(p) is None and all(s not in (".", "..") for s in p.split("/"))
)
_ROWS = st.lists(st.tuples(_IDS, _REL), min_size=1, max_size=6, unique_by=lambda r: r[0])


def _csv_bytes(rows: list[tuple[str, str]], bom: bool) -> bytes:
    import csv

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(["image_uri", "note", "item_id"])
    for item_id, rel in rows:
        writer.writerow([rel, "x, \"y\"", item_id])
    return (b"\xef\xbb\xbf" if bom else b"") + out.getvalue().encode()


def _jsonl_bytes(rows: list[tuple[str, str]], bom: bool) -> bytes:
    body = "".join(json.dumps({"image_uri": rel, "item_id": item_id}, ensure_ascii=bool(len(rel) % 2)) + "\n"
                   for item_id, rel in rows)
    return (b"\xef\xbb\xbf" if bom else b"") + body.encode()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=_ROWS, fmt=st.sampled_from(["csv", "jsonl"]), bom=st.booleans())
def test_manifest_round_trips_unicode_ids_and_relative_paths(rows: list[tuple[str, str]], fmt: str, bom: bool) -> None:
    """Any Unicode id and relative path (quoting, commas, CR/LF inside fields, BOM, non-ASCII, escapes) comes back
    as written: the id itself, and a URI naming the file beside the manifest locally, the object beside it on S3."""
    data = _csv_bytes(rows, bom) if fmt == "csv" else _jsonl_bytes(rows, bom)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "cat" / f"m.{fmt}"
        manifest.parent.mkdir()
        manifest.write_bytes(data)
        local = list(iter_manifest(str(manifest), ObjectReader(LocalStorage([tmp]))))
    assert [i.item_id for i in local] == [r[0] for r in rows]
    assert [local_path(i.uri) for i in local] == [Path(os.path.normpath(manifest.parent / r[1])) for r in rows]

    reader = ObjectReader(LocalStorage([]), s3=S3Storage(_Client(data)))
    s3 = list(iter_manifest(f"s3://bucket/cat/m.{fmt}", reader))
    assert [(i.item_id, i.uri) for i in s3] == [(r[0], f"s3://bucket/cat/{r[1]}") for r in rows]
