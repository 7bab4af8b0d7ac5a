"""The catalog and job functions of db/ against real SQLite and PostgreSQL (no mocks)."""

from __future__ import annotations

import os
import random
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import delete, event, func, select, text, update
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from db import catalog
from db.catalog import JobNotFoundError, JobStateError
from db.models import CatalogHistory, CatalogItem, SortingJob
from db.session import dispose_engines, get_engine, safe_url, session_scope
from pipeline.records import ItemResult
from tests.fixtures.pg import migrated_pg_database


@pytest.fixture(scope="module")
def pg_url():
    """A PostgreSQL catalog of this module's own: its round-trip tests read every row of the table, so rows that
    other modules' tests committed to the session's shared database would be counted (they were, run out of
    alphabetical order)."""
    yield from migrated_pg_database()


def _uid() -> str:
    return uuid.uuid4().hex


def _result(item_id: str, n: int = 0, *, job_id: str | None = None, status: str = "sorted") -> ItemResult:
    return ItemResult(
        item_id=item_id,
        image_uri=f"s3://bucket/photos/{item_id}.jpg",
        status=status,  # type: ignore[arg-type]
        category=f"category-{n}",
        confidence=0.5 + n / 1000,
        topk=[[f"category-{n}", 0.5 + n / 1000], ["Sandal", 0.125], ["Ankle boot", 0.0625]],
        error=None,
        model_name="fashion_mnist_cnn",
        model_version=f"v{n}",
        job_id=job_id,
    )


def _new_job(session: Session, **kw) -> str:
    return catalog.create_job(
        session=session,
        source=kw.pop("source", "s3://bucket/photos/"),
        model_path="bundled:fashion_mnist_cnn",
        model_name="fashion_mnist_cnn",
        model_version="1",
        **kw,
    )


def _record(session: Session, job_id: str, batch_no: int, s: int, r: int, f: int) -> None:
    catalog.record_batch(
        session=session,
        job_id=job_id,
        batch_no=batch_no,
        sorted_count=s,
        needs_review_count=r,
        failed_count=f,
    )


def _rows_by_id(session: Session) -> dict[str, catalog.CatalogRow]:
    return {row.item_id: row for row in catalog.iter_items(session=session)}


# --- upsert_items -------------------------------------------------------------------------------------------


def test_upsert_round_trips_every_field(db_session):
    job_id = str(uuid.uuid4())
    ok = _result("shoe-1", 7, job_id=job_id)
    review = ItemResult(
        item_id="shoe-2",
        image_uri="file:///photos/shoe 2.png",
        status="needs_review",
        category="Sneaker",
        confidence=0.25,
        topk=[["Sneaker", 0.25], ["Sandal", 0.2]],
        model_name="resnet",
        model_version="2024-11",
        job_id=job_id,
    )
    failed = ItemResult(
        item_id="shoe-3 ünïcödé/with/slashes",
        image_uri="s3://bucket/broken.jpg",
        status="failed",
        error="cannot decode image: truncated JPEG",
    )
    before = datetime.now(UTC)

    assert catalog.upsert_items(session=db_session, rows=[ok, review, failed]) == 3

    rows = _rows_by_id(db_session)
    assert set(rows) == {"shoe-1", "shoe-2", "shoe-3 ünïcödé/with/slashes"}
    for written in (ok, review, failed):
        assert rows[written.item_id].to_result() == written
    stamps = {row.updated_at for row in rows.values()}
    assert len(stamps) == 1, "one updated_at for the whole batch"
    (stamp,) = stamps
    assert stamp.tzinfo is not None and stamp.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= stamp <= datetime.now(UTC) + timedelta(seconds=1)
    # The ORM model reads the same values (aware datetime, JSON list).
    orm = db_session.get(CatalogItem, "shoe-1")
    assert orm.topk == ok.topk and orm.updated_at == stamp and orm.confidence == ok.confidence


def test_upsert_twice_replaces_rows_without_duplicates(db_session):
    first = [_result(f"item-{i}", i, job_id="job-a") for i in range(5)]
    assert catalog.upsert_items(session=db_session, rows=first) == 5
    stamp1 = _rows_by_id(db_session)["item-0"].updated_at

    second = [_result(f"item-{i}", 100 + i, job_id="job-b", status="needs_review") for i in range(3, 8)]
    second[0].error = "re-sorted"
    second[0].topk = []
    assert catalog.upsert_items(session=db_session, rows=second) == 5

    rows = _rows_by_id(db_session)
    assert sorted(rows) == [f"item-{i}" for i in range(8)]
    assert db_session.scalar(select(func.count()).select_from(CatalogItem)) == 8
    for r in first[:3]:
        assert rows[r.item_id].to_result() == r
    for r in second:
        assert rows[r.item_id].to_result() == r, "every column is replaced by the new values"
    assert rows["item-3"].updated_at >= stamp1
    assert rows["item-3"].topk == []


def test_upsert_same_item_twice_in_one_call_keeps_the_last(db_session):
    rows = [_result("dup", 1), _result("other", 2), _result("dup", 3)]
    assert catalog.upsert_items(session=db_session, rows=rows) == 2
    assert _rows_by_id(db_session)["dup"].to_result() == rows[2]


def test_upsert_nothing_is_a_no_op(db_session):
    assert catalog.upsert_items(session=db_session, rows=[]) == 0
    assert list(catalog.iter_items(session=db_session)) == []


def test_upsert_ten_thousand_rows_in_one_call(db_session):
    n = 10_000
    rows = [_result(f"bulk-{i:05d}", i % 50, job_id="bulk") for i in range(n)]
    calls: list[tuple[bool, int]] = []

    def count(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("INSERT"):
            calls.append((executemany, len(parameters) if executemany else 1))

    connection = db_session.connection()
    event.listen(connection, "before_cursor_execute", count)
    try:
        assert catalog.upsert_items(session=db_session, rows=rows) == n
    finally:
        event.remove(connection, "before_cursor_execute", count)

    # One batched execution (executemany / insertmanyvalues), not 10,000 statements: SQLite's limit on bound
    # parameters per statement never applies.
    assert 1 <= len(calls) <= 20, calls[:5]
    assert db_session.scalar(select(func.count()).select_from(CatalogItem)) == n
    read = list(catalog.iter_items(session=db_session, job_id="bulk", chunk=997))
    assert [r.item_id for r in read] == [r.item_id for r in rows]
    assert read[1234].to_result() == rows[1234]

    # Again: every row is updated in place.
    for r in rows:
        r.status = "needs_review"
    assert catalog.upsert_items(session=db_session, rows=rows) == n
    assert (
        db_session.scalar(select(func.count()).select_from(CatalogItem).where(CatalogItem.status == "sorted"))
        == 0
    )


def test_status_check_rejects_unknown_status(db_session):
    catalog.upsert_items(session=db_session, rows=[_result("bad")])
    with pytest.raises(IntegrityError), db_session.begin_nested():
        db_session.execute(update(CatalogItem).where(CatalogItem.item_id == "bad").values(status="bogus"))
    # upsert_items does not raise: the row the database refuses is written as failed, with the reason
    row = _result("bad", status="bogus")
    assert catalog.upsert_items(session=db_session, rows=[row, _result("good", 2)]) == 2
    read = _rows_by_id(db_session)
    assert read["good"].to_result() == _result("good", 2)
    assert read["bad"].status == "failed" and read["bad"].category is None and read["bad"].topk == []
    assert read["bad"].error.startswith("the database refused this row: ")
    assert "ck_catalog_items_status" in read["bad"].error
    assert read["bad"].to_result() == row, "the ItemResult was changed in place to the row written"


# Strings that break naive COPY text encoding or JSON escaping: separators, escapes, NULL markers, non-ASCII.
NASTY = [
    "tab\there",
    "line\nbreak",
    "carriage\rreturn",
    "back\\slash and \\N and \\t",
    "\\N",
    "\\.",
    "quotes ' \" `",
    "ünïcödé 商品 📷",
    "",
    "trailing space ",
]


def test_upsert_columns_are_every_column_of_the_table():
    assert sorted(catalog._UPSERT_COLUMNS) == sorted(CatalogItem.__table__.columns.keys())


def test_upsert_escapes_awkward_strings_everywhere(db_session):
    rows = [
        ItemResult(
            item_id=f"s3://bucket/{i}/{text_}",
            image_uri=f"file:///photos/{text_}.jpg",
            status="failed" if i % 2 else "needs_review",
            category=text_,
            confidence=None if i % 2 else 0.5,
            topk=[[text_, 0.5], ['"quoted" \\ name', 0.25]],
            error=text_ if i % 2 else None,
            model_name=text_,
            model_version=text_[:64],
            job_id=str(i),
        )
        for i, text_ in enumerate(NASTY)
    ]
    assert catalog.upsert_items(session=db_session, rows=rows) == len(rows)
    read = _rows_by_id(db_session)
    assert len(read) == len(rows)
    for r in rows:
        assert read[r.item_id].to_result() == r
    assert read[rows[4].item_id].category == "\\N", "the string \\N is text, not NULL"
    assert read[rows[8].item_id].category == "", "an empty string is not NULL"
    assert read[rows[1].item_id].confidence is None


def test_upsert_null_and_non_null_error_both_ways(db_session):
    failed = ItemResult(item_id="e", image_uri="s3://b/e.jpg", status="failed", error="timeout after 30 s")
    catalog.upsert_items(session=db_session, rows=[failed, _result("ok", 1)])
    read = _rows_by_id(db_session)
    assert read["e"].error == "timeout after 30 s" and read["e"].category is None and read["e"].topk == []
    assert read["ok"].error is None

    # Re-sorted: the error goes back to NULL and the other way round.
    catalog.upsert_items(session=db_session, rows=[_result("e", 2), replace(failed, item_id="ok")])
    read = _rows_by_id(db_session)
    assert read["e"].to_result() == _result("e", 2) and read["e"].error is None
    assert read["ok"].to_result() == replace(failed, item_id="ok")


def test_upsert_duplicates_in_one_batch_last_wins(db_session):
    rows = [_result(f"d-{i % 7}", i) for i in range(50)]  # every id 7 or 8 times, interleaved
    assert catalog.upsert_items(session=db_session, rows=rows) == 7
    read = _rows_by_id(db_session)
    assert len(read) == 7
    for k in range(7):
        last = max(i for i in range(50) if i % 7 == k)
        assert read[f"d-{k}"].to_result() == rows[last]


def test_reupsert_replaces_fields_and_leaves_other_rows_alone(db_session, monkeypatch):
    catalog.upsert_items(session=db_session, rows=[_result("keep", 1, job_id="j1"), _result("redo", 1, job_id="j1")])
    before = _rows_by_id(db_session)
    later = datetime.now(UTC) + timedelta(seconds=5)
    new = replace(_result("redo", 9, job_id="j2", status="needs_review"), model_name="other", error="low confidence")
    monkeypatch.setattr(catalog, "_now", lambda: later)
    assert catalog.upsert_items(session=db_session, rows=[new]) == 1
    after = _rows_by_id(db_session)
    assert after["redo"].to_result() == new
    assert after["redo"].updated_at == later
    assert after["keep"] == before["keep"], "a row not in the batch keeps every column, updated_at included"
    assert db_session.scalar(select(func.count()).select_from(CatalogItem)) == 2


def test_upsert_five_thousand_rows_round_trip_exactly(db_session):
    rows = [
        ItemResult(
            item_id=f"s3://invsort-photos/2024/11/{i:06d}-{NASTY[i % len(NASTY)]}.jpg",
            image_uri=f"s3://invsort-photos/2024/11/{i:06d}.jpg",
            status="failed" if i % 50 == 0 else "sorted",
            category=None if i % 50 == 0 else f"class-{i % 10}",
            confidence=None if i % 50 == 0 else 1 / (i + 3),
            topk=[] if i % 50 == 0 else [[f"class-{(i + j) % 10}", 1 / (i + 3 + j)] for j in range(5)],
            error="bad\tjpeg\n" if i % 50 == 0 else None,
            model_name="fashion_mnist_cnn",
            model_version="v3",
            job_id="big",
        )
        for i in range(5000)
    ]
    assert catalog.upsert_items(session=db_session, rows=rows) == 5000
    read = list(catalog.iter_items(session=db_session, job_id="big"))
    assert sorted(r.item_id for r in rows) == sorted(r.item_id for r in read)
    by_id = {r.item_id: r.to_result() for r in read}
    assert all(by_id[r.item_id] == r for r in rows), "floats, JSON and strings come back exactly"


def test_two_upserts_in_one_transaction_do_not_replay_the_first(db_session):
    catalog.upsert_items(session=db_session, rows=[_result("first", 1)])
    db_session.execute(update(CatalogItem).where(CatalogItem.item_id == "first").values(category="edited"))
    catalog.upsert_items(session=db_session, rows=[_result("second", 2)])
    read = _rows_by_id(db_session)
    assert read["first"].category == "edited", "the second call wrote only its own rows"
    assert read["second"].to_result() == _result("second", 2)


def test_an_error_that_is_not_a_refused_row_is_raised_and_leaves_nothing(empty_db_url):
    # No catalog table: the database refuses the statement, not a row, so nothing is blamed on the rows.
    with session_scope(empty_db_url) as session, pytest.raises(DBAPIError) as info:
        catalog.upsert_items(session=session, rows=[_result("ghost", 1)])
    assert not isinstance(info.value, DataError | IntegrityError)


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("error", "NUL \x00 inside", "NUL"),
        ("category", "c" * 256, "value too long for type character varying(255)"),
        ("model_version", "v" * 65, "value too long for type character varying(64)"),
    ],
    ids=["nul-character", "category-too-long", "model-version-too-long"],
)
def test_postgresql_refused_values_fail_their_row_alone(pg_session, field, value, reason):
    row = replace(_result("refused", 1), **{field: value})
    assert catalog.upsert_items(session=pg_session, rows=[_result("other", 2), row]) == 2
    read = _rows_by_id(pg_session)
    assert read["other"].to_result() == _result("other", 2)
    assert read["refused"].status == "failed" and reason in read["refused"].error
    assert row.status == "failed" and row.error == read["refused"].error


def test_refused_rows_among_many_fail_alone_and_the_rest_are_written(db_session):
    rows = [_result(f"many-{i:04d}", i % 7) for i in range(1000)]
    bad = {17: "bogus", 503: "unknown", 998: "x"}
    for i, status in bad.items():
        rows[i] = replace(rows[i], status=status)  # type: ignore[arg-type]
    rows[600] = replace(rows[600], error="unpaired surrogate \udcff in the text")
    assert catalog.upsert_items(session=db_session, rows=rows) == 1000
    read = _rows_by_id(db_session)
    assert len(read) == 1000
    refused = {k for k, row in read.items() if row.error and row.error.startswith("the database refused")}
    assert refused == {f"many-{i:04d}" for i in [*bad, 600]}
    assert read["many-0600"].status == "failed" and "surrogate" in read["many-0600"].error
    assert all(read[r.item_id].to_result() == r for r in rows), "refused rows were changed in place to the failed row"
    assert sum(r.status == "failed" for r in rows) == 4


def test_an_id_the_databases_cannot_encode_fails_under_its_derived_key(db_session):
    odd = "manifest-id-\udcff-\ud800"  # unpaired surrogates: a JSON manifest can give them
    row = _result(odd, 1)
    assert catalog.upsert_items(session=db_session, rows=[row, _result("plain", 2)]) == 2
    read = _rows_by_id(db_session)
    key = next(k for k in read if k.startswith("manifest-id-"))
    assert key.startswith("manifest-id-\\xff-\\ud800#sha256:") and len(key) == len("manifest-id-\\xff-\\ud800") + 72
    assert read[key].status == "failed" and "encode" in read[key].error
    assert row.status == "failed" and read["plain"].to_result() == _result("plain", 2)
    catalog.upsert_items(session=db_session, rows=[_result(odd, 3)])
    assert len(_rows_by_id(db_session)) == 2, "the derived key is deterministic: the same item finds its row"


LONG_IDS = {
    "1026 ascii": "file:///photos/" + "d/" * 503 + "x.jpg",
    "1100-character path": "file:///tmp/" + "p" * 1084 + ".png",
    "S3 key of 1024 bytes": "s3://a-bucket-name/photos/" + "k" * 1017,
    "2100 bytes in 700 characters": "商品" * 350,
    "10000 characters": "m" * 10_000,
}


@pytest.mark.parametrize("item_id", LONG_IDS.values(), ids=LONG_IDS.keys())
def test_long_ids_are_stored_whole_and_found_again(db_session, item_id):
    key = catalog.catalog_key(item_id)
    assert key != item_id and len(key) <= 1024 and len(key.encode()) <= 2048
    assert key.startswith(item_id[:100]) and key[-72:-64] == "#sha256:"
    row = replace(_result("placeholder", 1, job_id="long"), item_id=item_id, image_uri=item_id)
    assert catalog.upsert_items(session=db_session, rows=[row, _result("short", 2, job_id="long")]) == 2
    read = list(catalog.iter_items(session=db_session, job_id="long"))
    assert sorted(r.item_id for r in read) == sorted([item_id, "short"])
    assert next(r for r in read if r.item_id == item_id).to_result() == row
    stored = db_session.execute(select(CatalogItem.item_id, CatalogItem.item_id_full)).all()
    assert sorted(stored) == sorted([(key, item_id), ("short", None)])
    again = replace(row, category="re-sorted")
    catalog.upsert_items(session=db_session, rows=[again])
    assert _rows_by_id(db_session)[item_id].to_result() == again, "a re-sort replaces the row, no duplicate"


def test_catalog_key_keeps_ids_that_fit_and_derives_distinct_keys_for_the_rest():
    assert catalog.catalog_key("x" * 1024) == "x" * 1024
    assert catalog.catalog_key("é" * 1024) == "é" * 1024, "2048 UTF-8 bytes still fit"
    assert catalog.catalog_key("商" * 600) == "商" * 600  # 1800 bytes
    assert catalog.catalog_key("商" * 700) != "商" * 700  # 2100 bytes: more than the index takes
    a, b = catalog.catalog_key("y" * 2000 + "a"), catalog.catalog_key("y" * 2000 + "b")
    assert a != b and a[:952] == b[:952] == "y" * 952
    assert catalog.catalog_key("z" * 1025) == catalog.catalog_key("z" * 1025)
    odd = catalog.catalog_key("\x00" * 2000)
    assert odd.startswith("\\x00\\x00") and "\x00" not in odd and len(odd) <= 1024


def test_postgresql_row_refused_even_as_failed_is_left_out_and_logged(pg_session, caplog):
    hopeless = _result("hopeless", 1, job_id="j" * 37)  # the failed row keeps job_id: refused again
    assert catalog.upsert_items(session=pg_session, rows=[hopeless, _result("fine", 2)]) == 1
    assert list(_rows_by_id(pg_session)) == ["fine"]
    assert hopeless.status == "failed" and "character varying(36)" in hopeless.error
    assert "not written, even as a failed row" in caplog.text


def test_concurrent_overlapping_upserts_on_postgresql_do_not_deadlock(pg_url):
    ids = [f"overlap-{_uid()}" for _ in range(400)]
    start = threading.Barrier(4)

    def worker(seed: int) -> None:
        mine = ids[:]
        random.Random(seed).shuffle(mine)
        start.wait()
        for i in range(0, len(mine), 100):
            with session_scope(pg_url) as session:
                catalog.upsert_items(session=session, rows=[_result(x, seed) for x in mine[i : i + 100]])

    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(worker, range(4)))
        with session_scope(pg_url) as session:
            assert session.scalar(select(func.count()).where(CatalogItem.item_id.in_(ids))) == len(ids)
    finally:
        with session_scope(pg_url) as session:
            session.execute(delete(CatalogItem).where(CatalogItem.item_id.in_(ids)))
            session.execute(delete(CatalogHistory).where(CatalogHistory.item_id.in_(ids)))


def test_job_status_check_rejects_unknown_status(db_session):
    job_id = _new_job(db_session)
    with pytest.raises(IntegrityError):
        db_session.execute(update(SortingJob).where(SortingJob.id == job_id).values(status="bogus"))


def test_iter_items_filters_by_job_and_streams_in_chunks(db_session):
    catalog.upsert_items(session=db_session, rows=[_result(f"a-{i:02d}", i, job_id="A") for i in range(23)])
    catalog.upsert_items(session=db_session, rows=[_result(f"b-{i:02d}", i, job_id="B") for i in range(5)])
    a = list(catalog.iter_items(session=db_session, job_id="A", chunk=4))
    assert [r.item_id for r in a] == [f"a-{i:02d}" for i in range(23)]
    assert len(list(catalog.iter_items(session=db_session, chunk=3))) == 28
    assert list(catalog.iter_items(session=db_session, job_id="nope")) == []


# --- jobs ---------------------------------------------------------------------------------------------------


def test_create_and_get_job(db_session):
    before = datetime.now(UTC)
    job_id = _new_job(db_session, source="/photos")
    uuid.UUID(job_id)  # a uuid4 string by default
    job = catalog.get_job(session=db_session, job_id=job_id)
    assert job is not None
    assert (job.id, job.source, job.status) == (job_id, "/photos", "listing")
    assert (job.model_path, job.model_name, job.model_version) == (
        "bundled:fashion_mnist_cnn",
        "fashion_mnist_cnn",
        "1",
    )
    assert (job.total_items, job.total_batches, job.started_at, job.finished_at, job.error) == (None,) * 5
    assert (job.batches_done, job.processed) == (0, 0)
    assert job.created_at.tzinfo is not None and job.created_at >= before - timedelta(seconds=1)

    assert _new_job(db_session, job_id="my-own-id") == "my-own-id"


def test_get_job_unknown_is_none(db_session):
    assert catalog.get_job(session=db_session, job_id=str(uuid.uuid4())) is None


def test_list_jobs_newest_first(db_session):
    ids = [_new_job(db_session) for _ in range(3)]
    for i, job_id in enumerate(ids):  # distinct, increasing creation times, after any job other tests committed
        created = datetime(2100, 1, 1, tzinfo=UTC) + timedelta(minutes=i)
        db_session.execute(update(SortingJob).where(SortingJob.id == job_id).values(created_at=created))
    assert [j.id for j in catalog.list_jobs(session=db_session)][:3] == ids[::-1]
    assert [j.id for j in catalog.list_jobs(session=db_session, limit=2)] == ids[:0:-1]


def test_record_batch_redelivery_does_not_double_count(db_session):
    job_id = _new_job(db_session)
    _record(db_session, job_id, 0, 5, 2, 1)
    job = catalog.get_job(session=db_session, job_id=job_id)
    assert (job.sorted_count, job.needs_review_count, job.failed_count, job.batches_done) == (5, 2, 1, 1)
    assert job.started_at is not None and job.status == "listing"
    started = job.started_at

    # Delivered again with the same counts: nothing changes.
    _record(db_session, job_id, 0, 5, 2, 1)
    job = catalog.get_job(session=db_session, job_id=job_id)
    assert (job.sorted_count, job.needs_review_count, job.failed_count, job.batches_done) == (5, 2, 1, 1)

    # Delivered again with other counts (a re-run saw one more failure): only the difference is applied.
    _record(db_session, job_id, 0, 4, 2, 2)
    _record(db_session, job_id, 1, 10, 0, 0)
    job = catalog.get_job(session=db_session, job_id=job_id)
    assert (job.sorted_count, job.needs_review_count, job.failed_count, job.batches_done) == (14, 2, 2, 2)
    assert job.processed == 18
    assert job.started_at == started


def test_record_batch_rejects_negative_counts_and_unknown_jobs(db_session):
    with pytest.raises(ValueError, match="negative"):
        _record(db_session, "x", 0, -1, 0, 0)
    with pytest.raises((IntegrityError, JobNotFoundError)):
        _record(db_session, str(uuid.uuid4()), 0, 1, 0, 0)


def test_complete_job_only_once_and_only_when_listed_and_all_batches_done(db_session):
    job_id = _new_job(db_session)

    def record(batch_no: int) -> None:
        _record(db_session, job_id, batch_no, 2, 1, 0)

    def complete() -> bool:
        return catalog.complete_job_if_done(session=db_session, job_id=job_id)

    record(0)
    record(1)
    assert not complete(), "still listing: more batches may come"
    catalog.finish_listing(session=db_session, job_id=job_id, total_items=9, total_batches=3)
    assert catalog.get_job(session=db_session, job_id=job_id).status == "running"
    assert not complete(), "batch 2 is not done"
    record(1)  # a redelivery does not count as another batch
    assert not complete()
    record(2)
    assert complete()
    assert not complete(), "completed once"
    job = catalog.get_job(session=db_session, job_id=job_id)
    assert job.status == "done" and job.finished_at is not None and job.finished_at >= job.started_at
    assert (job.total_items, job.total_batches, job.batches_done, job.processed) == (9, 3, 3, 9)
    assert not catalog.fail_job(session=db_session, job_id=job_id, error="too late"), "done stays done"
    assert catalog.get_job(session=db_session, job_id=job_id).status == "done"


def test_complete_job_right_after_listing_when_batches_finished_first(db_session):
    job_id = _new_job(db_session)
    for b in range(2):
        _record(db_session, job_id, b, 1, 0, 0)
    catalog.finish_listing(session=db_session, job_id=job_id, total_items=2, total_batches=2)
    assert catalog.complete_job_if_done(session=db_session, job_id=job_id)


def test_empty_job_completes_when_listing_finishes(db_session):
    job_id = _new_job(db_session)
    catalog.finish_listing(session=db_session, job_id=job_id, total_items=0, total_batches=0)
    assert catalog.complete_job_if_done(session=db_session, job_id=job_id)
    assert not catalog.complete_job_if_done(session=db_session, job_id=str(uuid.uuid4()))


def test_finish_listing_errors(db_session):
    with pytest.raises(JobNotFoundError):
        catalog.finish_listing(session=db_session, job_id=str(uuid.uuid4()), total_items=1, total_batches=1)
    job_id = _new_job(db_session)
    catalog.finish_listing(session=db_session, job_id=job_id, total_items=1, total_batches=1)
    with pytest.raises(JobStateError, match="'running'"):
        catalog.finish_listing(session=db_session, job_id=job_id, total_items=1, total_batches=1)


def test_fail_job(db_session):
    job_id = _new_job(db_session)
    assert catalog.fail_job(session=db_session, job_id=job_id, error="listing failed: access denied")
    job = catalog.get_job(session=db_session, job_id=job_id)
    assert (job.status, job.error) == ("failed", "listing failed: access denied")
    assert job.finished_at is not None
    assert not catalog.complete_job_if_done(session=db_session, job_id=job_id)
    assert not catalog.fail_job(session=db_session, job_id=job_id, error="again")


# --- concurrency on PostgreSQL (committed transactions, unique ids, cleaned up) -----------------------------


@pytest.fixture
def committed_job(pg_url):
    with session_scope(pg_url) as session:
        job_id = _new_job(session)
    yield job_id
    with session_scope(pg_url) as session:
        session.execute(delete(SortingJob).where(SortingJob.id == job_id))  # batches go with it (CASCADE)


def test_concurrent_record_batch_gives_exact_totals(pg_url, committed_job):
    job_id = committed_job
    n_batches = 40
    counts = {b: (b % 7 + 1, b % 3, b % 2) for b in range(n_batches)}
    # Every batch is delivered twice (acks_late redelivery), in random order, by 4 workers at once.
    deliveries = [b for b in range(n_batches) for _ in range(2)]
    random.Random(1234).shuffle(deliveries)
    start = threading.Barrier(4)

    def worker(my_deliveries: list[int]) -> None:
        start.wait()
        for b in my_deliveries:
            with session_scope(pg_url) as session:
                s, r, f = counts[b]
                _record(session, job_id, b, s, r, f)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(worker, [deliveries[i::4] for i in range(4)]))

    with session_scope(pg_url) as session:
        job = catalog.get_job(session=session, job_id=job_id)
        stored = session.execute(
            text("SELECT count(*) FROM sorting_job_batches WHERE job_id = :j"), {"j": job_id}
        ).scalar_one()
    assert job.batches_done == n_batches == stored
    assert job.sorted_count == sum(c[0] for c in counts.values())
    assert job.needs_review_count == sum(c[1] for c in counts.values())
    assert job.failed_count == sum(c[2] for c in counts.values())


def test_concurrent_completion_happens_exactly_once(pg_url, committed_job):
    job_id = committed_job
    with session_scope(pg_url) as session:
        for b in range(3):
            _record(session, job_id, b, 1, 0, 0)
        catalog.finish_listing(session=session, job_id=job_id, total_items=3, total_batches=3)
    start = threading.Barrier(8)

    def try_complete(_: int) -> bool:
        start.wait()
        with session_scope(pg_url) as session:
            return catalog.complete_job_if_done(session=session, job_id=job_id)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(try_complete, range(8)))
    assert results.count(True) == 1


# --- engines and sessions -----------------------------------------------------------------------------------


def test_sqlite_engine_is_cached_and_configured(tmp_path):
    url = f"sqlite:///{tmp_path / 'new' / 'dir' / 'x.db'}"
    try:
        engine = get_engine(url)
        assert get_engine(url) is engine
        assert (tmp_path / "new" / "dir").is_dir()
        with engine.connect() as conn:
            names = ("journal_mode", "busy_timeout", "foreign_keys", "synchronous")
            pragmas = {p: conn.exec_driver_sql(f"PRAGMA {p}").scalar() for p in names}
        assert pragmas == {"journal_mode": "wal", "busy_timeout": 30000, "foreign_keys": 1, "synchronous": 1}
    finally:
        dispose_engines(url)
    assert get_engine(url) is not engine
    dispose_engines(url)


def test_session_scope_commits_or_rolls_back(sqlite_url):
    with session_scope(sqlite_url) as session:
        catalog.upsert_items(session=session, rows=[_result("kept")])
    with pytest.raises(RuntimeError), session_scope(sqlite_url) as session:
        catalog.upsert_items(session=session, rows=[_result("lost")])
        raise RuntimeError("boom")
    with session_scope(sqlite_url) as session:
        assert list(_rows_by_id(session)) == ["kept"]


def test_safe_url_hides_the_password():
    shown = safe_url("postgresql+psycopg://invsort:s3cr%40t@db.example:5432/catalog")
    assert "s3cr" not in shown and "***" in shown and "db.example" in shown


def test_forked_child_gets_its_own_engine(sqlite_url):
    parent = get_engine(sqlite_url)
    with session_scope(sqlite_url) as session:  # the parent has a pooled connection open
        catalog.upsert_items(session=session, rows=[_result("from-parent")])
    pid = os.fork()
    if pid == 0:  # child: exit status 0 only if it got a fresh engine that works
        code = 1
        try:
            child = get_engine(sqlite_url)
            with session_scope(sqlite_url) as session:
                catalog.upsert_items(session=session, rows=[_result("from-child")])
            code = 0 if child is not parent else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert get_engine(sqlite_url) is parent
    with session_scope(sqlite_url) as session:
        assert sorted(_rows_by_id(session)) == ["from-child", "from-parent"]


def test_postgresql_url_without_driver_uses_psycopg(pg_url):
    url = pg_url.replace("postgresql+psycopg://", "postgresql://")
    try:
        assert get_engine(url).dialect.driver == "psycopg"
    finally:
        dispose_engines(url)
