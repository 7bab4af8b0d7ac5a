"""pipeline.bench.catalog (invsort bench catalog): tiny runs on real SQLite and PostgreSQL, leaving the user's
tables and schemas alone; the command as a real process, its refusals in-process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select, text

from db import catalog
from db.models import CatalogItem
from db.session import session_scope
from pipeline.bench.catalog import bench_upserts, make_rows
from pipeline.errors import InvsortError
from pipeline.records import ItemResult
from worker.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _catalog_count(url: str) -> int:
    with session_scope(url) as session:
        return session.scalar(select(func.count()).select_from(CatalogItem))


def _bench_schemas(url: str) -> set[str]:
    with session_scope(url) as session:
        return set(session.scalars(text("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'invsort_bench_%'")))


def test_make_rows_look_like_the_workers_rows():
    rows = make_rows(200, job_id="j", seed=3)
    assert len({r.item_id for r in rows}) == 200
    assert all(r.item_id.startswith("s3://") and 55 <= len(r.item_id) <= 70 for r in rows)
    ok = [r for r in rows if r.status != "failed"]
    failed = [r for r in rows if r.status == "failed"]
    assert ok and failed and {r.status for r in ok} == {"sorted", "needs_review"}
    assert all(len(r.topk) == 5 and r.topk[0] == [r.category, r.confidence] and r.error is None for r in ok)
    assert all(r.error and r.category is None and r.topk == [] for r in failed)
    again = make_rows(200, job_id="j", seed=4)
    assert [r.item_id for r in again] == [r.item_id for r in rows] and again[0].category != rows[0].category


@pytest.mark.parametrize("batch_size", [64, 500])
def test_bench_upserts_reports_sane_figures_and_leaves_the_catalog_alone(db_url, batch_size):
    mine = ItemResult(item_id="user-row", image_uri="s3://b/u.jpg", status="sorted", category="Bag", confidence=0.9)
    with session_scope(db_url) as session:
        catalog.upsert_items(session=session, rows=[mine])
    before = _catalog_count(db_url)
    schemas = _bench_schemas(db_url) if db_url.startswith("postgresql") else set()

    result = bench_upserts(db_url, rows=500, batch_size=batch_size)

    assert result["backend"] in ("sqlite", "postgresql") and db_url.startswith(result["backend"])
    assert (result["rows"], result["batch_size"]) == (500, batch_size)
    for name in ("fresh", "reupsert"):
        assert result[f"{name}_s"] > 0 and result[f"{name}_rows_per_s"] > 0
        # seconds are rounded to 0.1 ms and rows/s to 1: a pass of a few ms is off by up to ~1% after rounding
        seconds, rate = result[f"{name}_s"], result[f"{name}_rows_per_s"]
        assert 500 / (seconds + 5e-5) - 1 <= rate <= 500 / max(seconds - 5e-5, 1e-9) + 1, (seconds, rate)
    assert _catalog_count(db_url) == before, "the benchmark wrote into a scratch table, not the user's"
    with session_scope(db_url) as session:
        assert [r.to_result() for r in catalog.iter_items(session=session) if r.item_id == "user-row"] == [mine]
        session.execute(CatalogItem.__table__.delete().where(CatalogItem.item_id == "user-row"))
    if db_url.startswith("postgresql"):
        assert _bench_schemas(db_url) == schemas, "the scratch schema is dropped"


def test_bench_upserts_on_sqlite_removes_its_scratch_file(sqlite_url, tmp_path):
    before = sorted(p.name for p in tmp_path.iterdir())
    bench_upserts(sqlite_url, rows=50, batch_size=16)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_bench_upserts_rejects_nonsense(sqlite_url):
    with pytest.raises(ValueError, match="at least 1"):
        bench_upserts(sqlite_url, rows=0)
    with pytest.raises(ValueError, match="at least 1"):
        bench_upserts(sqlite_url, rows=10, batch_size=0)
    with pytest.raises(InvsortError, match="SQLite or PostgreSQL"):
        bench_upserts("mysql://localhost/catalog", rows=10)


def test_cli_prints_one_json_line_per_batch_size(db_url):
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "bench", "catalog", db_url, "--rows", "40", "--batch-size", "8",
         "--batch-size", "40"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["batch_size"], r["rows"]) for r in lines] == [(8, 40), (40, 40)]
    assert all(r["backend"] == db_url.split("+")[0].split(":")[0] for r in lines)


def test_cli_refuses_nonsense_in_one_line():
    args = ["bench", "catalog", "mysql://localhost/x", "--rows", "10"]  # few rows: the default 100,000 take ~2 s
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 1 and result.stderr.strip().splitlines() == [
        "Error: unsupported database mysql://localhost/x: use a SQLite or PostgreSQL URL"
    ]
    zero = CliRunner().invoke(main, ["bench", "catalog", "sqlite://", "--rows", "0"], catch_exceptions=False)
    assert zero.exit_code == 2 and "Invalid value for '--rows'" in zero.stderr
