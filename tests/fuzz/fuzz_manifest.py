"""Fuzz the manifest parser with mutated real manifests (atheris, coverage-guided).

Run (ten minutes; options are libFuzzer's, the defaults below apply to those not given):

    .venv/bin/python -m tests.fuzz.fuzz_manifest -max_total_time=600

Each input is one manifest file, read four ways through the public entry point
:func:`pipeline.io.sources.iter_source` (which calls :func:`~pipeline.io.sources.iter_manifest`): as ``.csv`` and
as ``.jsonl``, each from a real local file (``LocalStorage`` under a temporary root) and from S3 (an
``S3Storage`` whose client serves the bytes through botocore's own ``StreamingBody``, in 7-byte chunks so that
lines and ``\\r\\n`` endings are split across chunks).

The contract: :class:`~pipeline.errors.SourceError`, or items whose ``item_id`` is a non-empty stripped string,
unique in the manifest, and whose ``uri`` is ``file://`` (readable back by :func:`~pipeline.io.storage.local_path`
and checkable against the local roots: a ``PermissionError`` or a ``SourceError``) or ``s3://bucket/key``; the
same items from the local file and from S3 for ``s3://`` rows and row order. A finding is any other exception or
warning, a broken item, a hang (``-timeout``) or a memory spike (the peak RSS growing by more than
``FUZZ_SPIKE_MB``, default 256 MiB, or ``-rss_limit_mb``). libFuzzer writes the input to
``.fuzz/manifest/crash-*``; re-run one with ``python -m tests.fuzz.fuzz_manifest FILE``. Every finding becomes a
test in ``tests/test_fuzz_regressions.py``.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings

import atheris

with atheris.instrument_imports(include=["pipeline", "csv", "json"]):
    from pipeline.errors import SourceError
    from pipeline.io.sources import iter_source
    from pipeline.io.storage import LocalStorage, ObjectReader, S3Storage, local_path, parse_s3_uri, uri_scheme
    from pipeline.records import Item

from botocore.response import StreamingBody  # noqa: E402

from tests.fuzz.common import WORK, Finding, KnownFindings, RssGuard, main  # noqa: E402
from tests.fuzz.seeds import MANIFEST_TOKENS, manifest_seeds  # noqa: E402

GUARD = RssGuard(int(os.environ.get("FUZZ_SPIKE_MB", 256)))
DEFAULTS = {"-max_len": "65536", "-timeout": "10", "-rss_limit_mb": "2048", "-print_final_stats": "1"}
BUCKET, PREFIX = "catalogue", "manifests/2026"

# Findings reported but not yet fixed, each with its failing test in tests/test_fuzz_regressions.py, so that a long
# run goes on past them: Known(name, exception type, message pattern, our innermost function; "" for the harness's
# own checks). Every finding of 2026-11-30 is fixed, so none is listed: a recurrence stops the run.
KNOWN = KnownFindings([])


class _Client:
    """The one S3 call a manifest read makes, answered with the fuzzer's bytes in botocore's own body type."""

    body = b""

    def get_object(self, *, Bucket: str, Key: str) -> dict[str, object]:  # noqa: N803 (boto3's names)
        return {"Body": _ChunkedBody(io.BytesIO(self.body), len(self.body))}


class _ChunkedBody(StreamingBody):
    def iter_lines(self, chunk_size: int = 1024, keepends: bool = False):  # type: ignore[no-untyped-def]
        return super().iter_lines(chunk_size=7, keepends=keepends)


ROOT = WORK / "manifest" / "root"  # the local root; the manifest is written at the same depth as S3's key
MANIFEST_DIR = ROOT / "manifests" / "2026"
MANIFEST_DIR.mkdir(parents=True, exist_ok=True)
CLIENT = _Client()
READER = ObjectReader(LocalStorage([ROOT]), s3=S3Storage(CLIENT))


def _items(source: str) -> list[Item] | SourceError:
    try:
        return list(iter_source(source, READER))
    except SourceError as exc:
        if not str(exc):
            raise Finding("SourceError without a reason") from exc
        return exc


def _check_items(items: list[Item], where: str) -> None:
    seen: set[str] = set()
    for item in items:
        if not isinstance(item.item_id, str) or not item.item_id or item.item_id != item.item_id.strip():
            raise Finding(f"{where}: bad item_id {item.item_id!r}")
        if item.item_id in seen:
            raise Finding(f"{where}: duplicate item_id {item.item_id!r} let through")
        seen.add(item.item_id)
        for field, value in (("item_id", item.item_id), ("uri", item.uri)):
            try:
                value.encode("utf-8")  # what the catalog (PostgreSQL, SQLite) and the task queue store
            except UnicodeEncodeError as exc:
                raise Finding(f"{where}: {field} {value!r} is not valid Unicode: {exc.reason}") from None
        scheme = uri_scheme(item.uri)
        if scheme == "s3":
            bucket, key = parse_s3_uri(item.uri)
            if not bucket or not key:
                raise Finding(f"{where}: s3 URI without bucket or key: {item.uri!r}")
        elif scheme == "file":
            local_path(item.uri)
            with contextlib.suppress(PermissionError, SourceError):  # outside the roots: refused, as it should
                READER.local_kind(item.uri)
        else:
            raise Finding(f"{where}: item URI is neither file: nor s3://: {item.uri!r}")


def _same_rows(local: list[Item] | SourceError, s3: list[Item] | SourceError, suffix: str) -> None:
    """The local and the S3 copy of a manifest give the same rows; relative paths resolve to a local file and
    to an S3 object, so only rows that are a URI in one read are compared with the other."""
    if isinstance(local, SourceError) or isinstance(s3, SourceError):
        if isinstance(local, SourceError) and isinstance(s3, SourceError):
            return
        if isinstance(s3, SourceError) and "the top of bucket" in str(s3):
            return  # ../ up to or above the top of the bucket: only an S3 manifest can go too far up
        raise Finding(f"{suffix}: the local manifest gives {local!r}, the S3 one {s3!r}")
    if [i.item_id for i in local] != [i.item_id for i in s3]:
        raise Finding(f"{suffix}: local and S3 reads give different ids")
    for a, b in zip(local, s3, strict=True):
        if (uri_scheme(a.uri) == "s3" or uri_scheme(b.uri) == "file") and a.uri != b.uri:
            raise Finding(f"{suffix}: row {a.item_id!r}: local {a.uri!r}, S3 {b.uri!r}")


def test_one_input(data: bytes) -> None:
    CLIENT.body = data
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for suffix in (".csv", ".jsonl"):
                path = MANIFEST_DIR / f"m{suffix}"
                path.write_bytes(data)
                local = _items(str(path))
                s3 = _items(f"s3://{BUCKET}/{PREFIX}/m{suffix}")
                for items, where in ((local, f"local {suffix}"), (s3, f"s3 {suffix}")):
                    if not isinstance(items, SourceError):
                        _check_items(items, where)
                _same_rows(local, s3, suffix)
    except Exception as exc:
        if not KNOWN.tolerate(exc, data):
            raise
    GUARD.check(f"{len(data)} bytes starting {data[:24]!r}")


if __name__ == "__main__":
    main("manifest", test_one_input, manifest_seeds, MANIFEST_TOKENS, DEFAULTS)
