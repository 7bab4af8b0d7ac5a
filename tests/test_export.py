"""``invsort export`` (db/export.py): CSV, JSON Lines and Parquet of the catalog, streamed, with the catalog page's
filters, on real SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import uuid
from datetime import datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from db import catalog, export, migrate, reviews
from db.queries import ItemFilters
from db.session import session_scope
from pipeline.errors import InvsortError
from pipeline.records import ItemResult
from worker.cli import main

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = ["Bag", "Coat", "Sandal"]


def _rows(prefix: str, n: int) -> list[ItemResult]:
    """``n`` rows: sorted, needs_review and failed ones, three categories, two model versions, one long id."""
    rows = []
    for i in range(n):
        item_id = f"{prefix}-{i:04d}" + ("/é" + "x" * 1100 if i == 7 else "")
        if i % 10 == 9:
            rows.append(ItemResult(item_id=item_id, image_uri=f"s3://b/{i}.jpg", status="failed",
                                   error="broken, \"bad\"", model_name="m", model_version="v1", job_id=prefix))
            continue
        category, confidence = CATEGORIES[i % 3], round(0.3 + (i % 7) / 10, 2)
        rows.append(ItemResult(
            item_id=item_id, image_uri=f"s3://b/{i}.jpg", status="sorted" if confidence >= 0.5 else "needs_review",
            category=category, confidence=confidence, topk=[[category, confidence], ["Other, \"quoted\"", 0.01]],
            model_name="m", model_version="v2" if i % 2 else "v1", job_id=prefix))
    return rows


@pytest.fixture
def filled(empty_db_url: str) -> tuple[str, str, list[catalog.CatalogRow]]:
    """A database of this test's own (SQLite or PostgreSQL; other tests read the shared one's whole catalog), the job
    id of its rows (their prefix) and its rows as stored, by key."""
    db_url = empty_db_url
    migrate.upgrade(db_url)
    job = str(uuid.uuid4())
    with session_scope(db_url) as session:
        catalog.upsert_items(session=session, rows=_rows(job, 2345))
        reviews.record_review(session=session, item_id=f"{job}-0001", category="Sandal", reviewer="ana")
    with session_scope(db_url) as session:
        stored = list(catalog.iter_items(session=session, job_id=job))
    return db_url, job, stored


def _export(url: str, *args: str) -> tuple[bytes, str]:
    result = CliRunner().invoke(main, ["export", "--db", url, *args])
    assert result.exit_code == 0, result.output
    return result.stdout_bytes, result.stderr


def _plain(value: object) -> object:
    return value.isoformat() if isinstance(value, datetime) else value


def test_csv_and_jsonl_hold_every_row_of_the_filters(filled) -> None:
    url, job, stored = filled
    data, note = _export(url, "--format", "csv", "--job", job)
    assert note.strip() == f"{len(stored)} rows exported as csv"
    got = list(csv.DictReader(io.StringIO(data.decode("utf-8"), newline="")))
    assert [r["item_id"] for r in got] == [r.item_id for r in stored], "every row once, in key order, long ids whole"
    for line, row in zip(got, stored, strict=True):
        assert line["status"] == row.status and line["category"] == (row.category or "")
        assert line["confidence"] == ("" if row.confidence is None else str(row.confidence))
        assert (json.loads(line["topk"]) if line["topk"] else []) == row.topk
        assert datetime.fromisoformat(line["updated_at"]) == row.updated_at
    assert list(got[0]) == list(export.EXPORT_COLUMNS)

    data, _ = _export(url, "--format", "jsonl", "--job", job, "--status", "sorted", "--min-confidence", "0.6",
                      "--max-confidence", "0.8")
    objects = [json.loads(line) for line in data.decode("utf-8").splitlines()]
    expected = [r for r in stored if r.status == "sorted" and 0.6 <= r.confidence <= 0.8]  # type: ignore[operator]
    assert len(expected) > 100
    assert objects == [{name: _plain(getattr(r, name)) for name in export.EXPORT_COLUMNS} for r in expected]


@pytest.mark.parametrize(("option", "value", "keep"), [
    ("--status", "reviewed", lambda r: r.status == "reviewed"),
    ("--category", "Coat", lambda r: r.category == "Coat"),
    ("--model-version", "v2", lambda r: r.model_version == "v2"),
    ("--max-confidence", "0.4", lambda r: r.confidence is not None and r.confidence <= 0.4),
])
def test_each_filter(filled, option: str, value: str, keep) -> None:
    url, job, stored = filled
    data, _ = _export(url, "--format", "jsonl", "--job", job, option, value)
    ids = [json.loads(line)["item_id"] for line in data.decode().splitlines()]
    assert ids == [r.item_id for r in stored if keep(r)] and ids


def test_parquet_has_typed_columns_in_row_groups(filled, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    url, job, stored = filled
    out = tmp_path / "out" / "catalog.parquet"
    _, note = _export(url, "--out", str(out), "--job", job, "--row-group-rows", "1000")  # the format from the suffix
    assert note.strip() == f"{len(stored)} rows exported as parquet to {out}"
    assert [p.name for p in out.parent.iterdir()] == ["catalog.parquet"], "no temporary file left"
    meta = pq.ParquetFile(out).metadata
    assert meta.num_rows == len(stored) and meta.num_row_groups == 3
    assert [meta.row_group(i).num_rows for i in range(3)] == [1000, 1000, len(stored) - 2000]
    table = pq.read_table(out)
    assert table.schema == export.parquet_schema()
    assert str(table.schema.field("confidence").type) == "double"
    assert str(table.schema.field("updated_at").type) == "timestamp[us, tz=UTC]"
    got = table.to_pylist()
    assert [r["item_id"] for r in got] == [r.item_id for r in stored]
    for line, row in zip(got, stored, strict=True):
        assert (line["status"], line["category"], line["confidence"]) == (row.status, row.category, row.confidence)
        assert [[t["category"], t["probability"]] for t in line["topk"]] == row.topk
        assert line["updated_at"] == row.updated_at and line["reviewed_at"] == row.reviewed_at
    reviewed = next(r for r in got if r["status"] == "reviewed")
    assert (reviewed["category"], reviewed["reviewed_by"], reviewed["confidence"]) == ("Sandal", "ana", None)


def test_parquet_to_a_pipe(sqlite_url: str) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    with session_scope(sqlite_url) as session:
        catalog.upsert_items(session=session, rows=_rows("p", 30))
    run = subprocess.run([sys.executable, "-m", "worker.cli", "export", "--format", "parquet", "--db", sqlite_url],
                         capture_output=True, cwd=ROOT, timeout=120, check=False)
    assert run.returncode == 0, run.stderr.decode()
    assert pq.read_table(io.BytesIO(run.stdout)).num_rows == 30


def test_an_empty_export_and_the_refusals(sqlite_url: str, tmp_path: Path, monkeypatch) -> None:
    data, note = _export(sqlite_url, "--format", "csv")
    assert data.decode().splitlines() == [",".join(export.EXPORT_COLUMNS)] and "0 rows" in note
    runner = CliRunner()
    result = runner.invoke(main, ["export", "--db", sqlite_url])
    assert result.exit_code == 2 and "give --format" in result.output
    result = runner.invoke(main, ["export", "--db", sqlite_url, "--format", "csv", "--min-confidence", "0.9",
                                  "--max-confidence", "0.1"])
    assert result.exit_code == 2 and "is above --max-confidence" in result.output
    result = runner.invoke(main, ["export", "--db", sqlite_url, "--format", "csv", "--status", "lost"])
    assert result.exit_code == 2

    # Without pyarrow: one line that says what to install, and no file.
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    out = tmp_path / "exports" / "x.parquet"
    result = runner.invoke(main, ["export", "--db", sqlite_url, "--out", str(out)])
    assert result.exit_code == 1 and "pip install 'invsort[parquet]'" in result.output
    assert not out.parent.exists(), "refused before anything is written"
    with pytest.raises(InvsortError, match="pyarrow"):
        export.parquet_schema()


def test_walk_items_reads_in_keyset_pages(sqlite_url: str) -> None:
    with session_scope(sqlite_url) as session:
        catalog.upsert_items(session=session, rows=_rows("w", 25))
    walked = list(export.walk_items(sqlite_url, ItemFilters(status="failed"), chunk=1))
    assert [r.item_id for r in walked] == ["w-0009", "w-0019"]
    assert len(list(export.walk_items(sqlite_url, chunk=7))) == 25
