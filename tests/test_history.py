"""The catalog's history (db/history.py, the history appends of db/catalog.py and db/reviews.py) and the change
feed (``invsort changes``, ``GET /v1/changes``), on real SQLite and PostgreSQL.

Every test that commits works in a database of its own (``pg_url`` below, a SQLite file per test).
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import bindparam, func, select, text, update
from sqlalchemy.orm import Session

from db import catalog, history, migrate, reviews
from db.history import Change, HistoryEntry
from db.models import CatalogHistory, CatalogItem, UTCDateTime
from db.session import get_engine, session_scope
from pipeline.errors import ConfigError, InvsortError
from pipeline.records import ItemResult
from pipeline.settings import build_settings
from worker.cli import main
from worker.web.app import create_app

CATEGORIES = ["Bag", "Coat", "Sandal", "Sneaker"]


@pytest.fixture
def pg_url(empty_pg_url: str) -> str:
    """A PostgreSQL database of this test's own, migrated: the tests here commit and read the whole history."""
    migrate.upgrade(empty_pg_url)
    return empty_pg_url


def _result(item_id: str, category: str | None = "Bag", *, status: str = "sorted", job_id: str = "job-1",
            version: str = "v1", confidence: float = 0.9) -> ItemResult:
    failed = status == "failed"
    return ItemResult(
        item_id=item_id, image_uri=f"s3://bucket/{item_id}.jpg", status=status,  # type: ignore[arg-type]
        category=None if failed else category, confidence=None if failed else confidence,
        topk=[] if failed else [[category, confidence], ["Coat", 0.05]], error="broken" if failed else None,
        model_name="fashion_mnist_cnn", model_version=version, job_id=job_id,
    )


def _upsert(url: str, rows: list[ItemResult]) -> int:
    with session_scope(url) as session:
        return catalog.upsert_items(session=session, rows=rows)


def _entries(url: str) -> list[HistoryEntry]:
    with session_scope(url) as session:
        ids = session.scalars(select(CatalogHistory.item_id).distinct()).all()
        found = [e for key in ids for e in history.item_history(session=session, item_id=key)]
    return sorted(found, key=lambda e: e.id)


def _all_changes(url: str, page: int = 1000) -> list[Change]:
    with session_scope(url) as session:
        return history.read_changes(session=session, since=0, limit=page).changes


def _check_chains(entries: list[HistoryEntry]) -> None:
    """Each entry's previous state is the entry before it of the same item, and ``changed`` says whether it differs."""
    last: dict[str, HistoryEntry] = {}
    for e in entries:
        before = last.get(e.item_id)
        assert (e.previous_category, e.previous_status) == ((None, None) if before is None else
                                                            (before.category, before.status)), e
        differs = before is None or (before.category, before.status) != (e.category, e.status)
        assert e.changed == differs, e
        last[e.item_id] = e


# --------------------------------------------------------------------------------------------------- history


def test_two_sorts_keep_both_predictions_with_the_previous_state(db_url):
    items = [f"photo-{i:02d}.png" for i in range(16)]
    first = [_result(i, CATEGORIES[n % 4], job_id="job-1", version="v1") for n, i in enumerate(items)]
    assert _upsert(db_url, first) == 16
    # The second model: a new category for half, needs_review for a quarter, the same for the rest.
    second = []
    for n, i in enumerate(items):
        category = CATEGORIES[(n + 1) % 4] if n < 8 else CATEGORIES[n % 4]
        second.append(_result(i, category, job_id="job-2", version="v2", status="needs_review" if n >= 12 else
                              "sorted", confidence=0.4))
    assert _upsert(db_url, second) == 16

    entries = _entries(db_url)
    assert len(entries) == 32, "both predictions of each photo"
    _check_chains(entries)
    by_job = defaultdict(list)
    for e in entries:
        by_job[e.job_id].append(e)
    assert all(e.changed and e.previous_status is None and e.source == "model" for e in by_job["job-1"])
    changed = {e.item_id for e in by_job["job-2"] if e.changed}
    assert changed == set(items[:8]) | set(items[12:]), "a new category or a new status is a change, nothing else"
    e = next(e for e in by_job["job-2"] if e.item_id == items[0])
    assert (e.previous_category, e.previous_status, e.category, e.status) == ("Bag", "sorted", "Coat", "sorted")
    assert (e.model_version, e.confidence, e.topk, e.reason) == ("v2", 0.4, [["Coat", 0.4], ["Coat", 0.05]], None)
    with session_scope(db_url) as session:
        assert session.connection().exec_driver_sql("SELECT count(*) FROM catalog_current").scalar() == 16
    feed = _all_changes(db_url)
    assert len(feed) == 16 + 12 and [c.cursor for c in feed] == sorted(c.cursor for c in feed)


def test_a_failed_row_is_history_too_with_its_reason(db_url):
    _upsert(db_url, [_result("a", "Bag")])
    _upsert(db_url, [_result("a", status="failed", job_id="job-2")])
    last = _entries(db_url)[-1]
    assert (last.status, last.category, last.reason, last.changed) == ("failed", None, "broken", True)
    assert (last.previous_status, last.previous_category) == ("sorted", "Bag")


def test_a_reviewed_row_gets_review_entries_and_no_model_entry(db_url):
    _upsert(db_url, [_result("shoe", "Bag", status="needs_review"), _result("boot", "Coat", status="needs_review"),
                     _result("bag", "Bag", status="needs_review")])
    with session_scope(db_url) as session:
        reviews.record_review(session=session, item_id="shoe", category="Sandal", reviewer="ana")
        assert reviews.accept_top1(session=session, item_ids=["boot", "bag"], reviewer="bo") == 2
    # A re-sort leaves the reviewed rows alone: no model entry for them, and the count says so.
    assert _upsert(db_url, [_result("shoe", "Sneaker", job_id="job-2"), _result("boot", "Bag", job_id="job-2"),
                            _result("new", "Bag", job_id="job-2")]) == 1
    with session_scope(db_url) as session:
        undo = reviews.undo_review(session=session, item_id="shoe", reviewer="cy")
        assert undo is not None
        shoe = history.item_history(session=session, item_id="shoe")
        boot = history.item_history(session=session, item_id="boot")
    assert [(e.source, e.reason, e.changed_by, e.status, e.category, e.job_id) for e in shoe] == [
        ("model", None, None, "needs_review", "Bag", "job-1"),
        ("review", "review", "ana", "reviewed", "Sandal", None),
        ("review", "undo", "cy", "needs_review", "Bag", None),
    ]
    assert [(e.previous_status, e.previous_category, e.changed) for e in shoe[1:]] == [
        ("needs_review", "Bag", True), ("reviewed", "Sandal", True)]
    assert [(e.source, e.reason, e.changed_by, e.status, e.category) for e in boot] == [
        ("model", None, None, "needs_review", "Coat"), ("review", "accept", "bo", "reviewed", "Coat")]
    assert boot[1].changed and boot[1].confidence is None
    _check_chains(_entries(db_url))


def test_rows_the_database_refuses_are_written_failed_with_history(db_url):
    rows = [_result(f"item-{i:03d}", CATEGORIES[i % 4]) for i in range(40)]
    rows[7] = replace(rows[7], status="bogus")  # type: ignore[arg-type]
    rows[30] = replace(rows[30], error="unpaired surrogate \udcff")
    assert _upsert(db_url, rows) == 40
    entries = {e.item_id: e for e in _entries(db_url)}
    assert len(entries) == 40
    for i in (7, 30):
        e = entries[f"item-{i:03d}"]
        assert e.status == "failed" and e.reason.startswith("the database refused this row") and e.changed
    assert entries["item-009"].status == "sorted" and entries["item-009"].category == "Coat"


def test_two_upserts_in_one_transaction_chain_their_entries(db_url):
    with session_scope(db_url) as session:
        catalog.upsert_items(session=session, rows=[_result("x", "Bag")])
        catalog.upsert_items(session=session, rows=[_result("x", "Coat", job_id="job-2")])
        catalog.upsert_items(session=session, rows=[_result("x", "Coat", job_id="job-3")])
    entries = _entries(db_url)
    assert [(e.category, e.changed, e.previous_category) for e in entries] == [
        ("Bag", True, None), ("Coat", True, "Bag"), ("Coat", False, "Coat")]


def test_long_ids_have_their_whole_id_in_the_history_and_the_feed(db_url):
    long_id = "s3://bucket/" + "k" * 2000
    _upsert(db_url, [_result(long_id, "Bag")])
    with session_scope(db_url) as session:
        (entry,) = history.item_history(session=session, item_id=long_id)
        stored = session.scalar(select(CatalogHistory.item_id))
    assert entry.item_id == long_id and stored == catalog.catalog_key(long_id) != long_id
    assert _all_changes(db_url)[0].item_id == long_id


def test_previous_entries_are_what_a_rollback_restores(db_url):
    _upsert(db_url, [_result("a", "Bag"), _result("b", "Coat")])
    _upsert(db_url, [_result("b", "Sandal", job_id="job-2"), _result("c", "Bag", job_id="job-2")])
    _upsert(db_url, [_result("b", "Sneaker", job_id="job-2")])  # a redelivered batch of job-2
    with session_scope(db_url) as session:
        got = {w.item_id: w for w in history.previous_entries(session=session, job_id="job-2")}
    assert sorted(got) == ["b", "c"]
    assert got["b"].entry.category == "Sneaker" and got["b"].latest
    assert got["b"].previous is not None and (got["b"].previous.category, got["b"].previous.job_id) == ("Coat", "job-1")
    assert got["c"].previous is None and got["c"].latest, "job-2 created c: nothing to go back to"
    _upsert(db_url, [_result("b", "Bag", job_id="job-3")])
    with session_scope(db_url) as session:
        reviews.record_review(session=session, item_id="c", category="Coat", reviewer="ana")
        got = {w.item_id: w for w in history.previous_entries(session=session, job_id="job-2")}
        assert list(history.previous_entries(session=session, job_id="no-such-job")) == []
    assert not got["b"].latest and not got["c"].latest, "changed since the job: a rollback leaves them alone"


def test_concurrent_sorts_and_reviews_of_the_same_items_chain_exactly(pg_url):
    # Two sorts and a reviewer on the same items at once: each entry's previous state is the one the write before
    # it left, whichever transaction that was.
    items = [f"hot-{i}" for i in range(20)]
    _upsert(pg_url, [_result(i, "Bag") for i in items])
    start = threading.Barrier(3)

    def sorter(seed: int) -> None:
        rng = random.Random(seed)
        start.wait()
        for n in range(15):
            mine = rng.sample(items, 12)
            _upsert(pg_url, [_result(i, rng.choice(CATEGORIES), job_id=f"job-{seed}-{n}",
                                     status=rng.choice(["sorted", "needs_review"])) for i in mine])

    def reviewer() -> None:
        rng = random.Random(99)
        start.wait()
        for _ in range(15):
            with session_scope(pg_url) as session:
                item = rng.choice(items)
                if rng.random() < 0.5:
                    reviews.record_review(session=session, item_id=item, category=rng.choice(CATEGORIES),
                                          reviewer="ana")
                else:
                    reviews.undo_review(session=session, item_id=item, reviewer="ana")

    with ThreadPoolExecutor(3) as pool:
        for f in [pool.submit(sorter, 1), pool.submit(sorter, 2), pool.submit(reviewer)]:
            f.result()
    entries = _entries(pg_url)
    _check_chains(entries)
    with session_scope(pg_url) as session:
        current = {r.item_id: (r.category, r.status) for r in catalog.iter_items(session=session)}
    last = {e.item_id: (e.category, e.status) for e in entries}
    assert last == current, "each item's latest entry is its row"


# ------------------------------------------------------------------------------------------------ retention


def test_prune_keeps_each_items_latest_entry(db_url):
    _upsert(db_url, [_result("a", "Bag"), _result("b", "Bag")])
    _upsert(db_url, [_result("a", "Coat", job_id="job-2")])
    _upsert(db_url, [_result("a", "Coat", job_id="job-3")])
    with session_scope(db_url) as session:
        assert history.prune_history(session=session, older_than=datetime.now(UTC) - timedelta(days=1)) == 0
        assert history.prune_history(session=session, older_than=datetime.now(UTC) + timedelta(days=1)) == 2
        kept = [(e.item_id, e.job_id) for e in _entries_in(session)]
        assert kept == [("a", "job-3"), ("b", "job-1")]
        with pytest.raises(ValueError, match="naive"):
            history.prune_history(session=session, older_than=datetime(2026, 1, 1))
    # The next write still finds the state it replaces.
    _upsert(db_url, [_result("a", "Bag", job_id="job-4")])
    last = _entries(db_url)[-1]
    assert (last.previous_category, last.changed) == ("Coat", True)
    assert history.retention_cutoff(30, now=datetime(2026, 3, 31, tzinfo=UTC)) == datetime(2026, 3, 1, tzinfo=UTC)
    with pytest.raises(ValueError):
        history.retention_cutoff(0)


def _entries_in(session: Session) -> list[HistoryEntry]:
    keys = session.scalars(select(CatalogHistory.item_id).distinct().order_by(CatalogHistory.item_id)).all()
    return [e for key in keys for e in history.item_history(session=session, item_id=key)]


def test_prune_history_command_uses_the_retention_setting(sqlite_url, monkeypatch):
    _upsert(sqlite_url, [_result("a", "Bag")])
    _upsert(sqlite_url, [_result("a", "Coat", job_id="job-2")])
    with session_scope(sqlite_url) as session:  # the first entry is 40 days old
        first = session.scalar(select(func.min(CatalogHistory.id)))
        session.execute(update(CatalogHistory).where(CatalogHistory.id == first)
                        .values(written_at=datetime.now(UTC) - timedelta(days=40)))
    unset = {k: None for k in os.environ if k.startswith("INVSORT_")}
    run = CliRunner()
    kept = run.invoke(main, ["db", "prune-history", "--db", sqlite_url], env=unset, catch_exceptions=False)
    assert kept.exit_code == 0 and "kept whole" in kept.stdout
    env = {**unset, "INVSORT_HISTORY_RETENTION_DAYS": "60"}
    none = run.invoke(main, ["db", "prune-history", "--db", sqlite_url], env=env, catch_exceptions=False)
    assert none.exit_code == 0 and none.stdout.startswith("0 history entries older than"), none.output
    env["INVSORT_HISTORY_RETENTION_DAYS"] = "30"
    one = run.invoke(main, ["db", "prune-history", "--db", sqlite_url], env=env, catch_exceptions=False)
    assert one.exit_code == 0 and one.stdout.startswith("1 history entry older than"), one.output
    assert len(_entries(sqlite_url)) == 1
    bad = run.invoke(main, ["db", "prune-history", "--days", "0", "--db", sqlite_url], env=unset)
    assert bad.exit_code == 2
    with pytest.raises(ConfigError, match="INVSORT_HISTORY_RETENTION_DAYS must be at least 1"):
        build_settings(history_retention_days=0)
    monkeypatch.setenv("INVSORT_HISTORY_RETENTION_DAYS", "")
    assert build_settings().history_retention_days is None


# ------------------------------------------------------------------------------------------------ the feed


def _make_changes(url: str) -> None:
    """A history with changes of every kind, unchanged re-sorts between them."""
    rng = random.Random(7)
    items = [f"item-{i:02d}" for i in range(12)]
    for n in range(6):
        rows = [_result(i, rng.choice(CATEGORIES[:2]), job_id=f"job-{n}", status=rng.choice(["sorted", "needs_review"]))
                for i in rng.sample(items, 8)]
        _upsert(url, rows)
    with session_scope(url) as session:
        reviews.record_review(session=session, item_id=items[0], category="Coat", reviewer="ana")
        reviews.accept_top1(session=session, item_ids=items[1:3], reviewer="bo")
        reviews.undo_review(session=session, item_id=items[1], reviewer="bo")


def test_the_feed_is_ordered_and_resumable_in_pages(db_url):
    _make_changes(db_url)
    full = _all_changes(db_url)
    entries = _entries(db_url)
    assert [c.cursor for c in full] == [e.id for e in entries if e.changed], "one entry per change, in order"
    assert len(entries) > len(full), "unchanged re-sorts are not in the feed"
    paged: list[Change] = []
    cursor = 0
    while True:
        with session_scope(db_url) as session:
            page = history.read_changes(session=session, since=cursor, limit=3)
        paged += page.changes
        assert page.next >= cursor and all(c.cursor <= page.next for c in page.changes)
        if not page.changes:
            break
        cursor = page.next
    assert paged == full, "pages of 3 give every change exactly once"
    with session_scope(db_url) as session:
        rest = history.read_changes(session=session, since=cursor, limit=1000)
        assert rest.changes == [] and rest.next == cursor >= max(e.id for e in entries)
        assert list(history.iter_changes(session=session, since=full[2].cursor, limit=2)) == full[3:5]
        with pytest.raises(ValueError, match="limit"):
            history.read_changes(session=session, limit=0)
        with pytest.raises(ValueError, match="since"):
            history.read_changes(session=session, since=-1)
    assert {c.source for c in full} == {"model", "review"}
    for change in full:
        assert change.previous_status is None or (
            (change.previous_category, change.previous_status) != (change.category, change.status))


def _cli(*args: object) -> Any:
    unset = {k: None for k in os.environ if k.startswith("INVSORT_")}
    return CliRunner().invoke(main, [str(a) for a in args], env=unset, catch_exceptions=False)


def test_the_cli_and_the_http_api_give_the_same_feed(db_url, tmp_path: Path):
    _make_changes(db_url)
    full = [c.to_json() for c in _all_changes(db_url)]

    out = _cli("changes", "--db", db_url, "--json")
    assert out.exit_code == 0, out.output
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert lines == full
    last_cursor = int(out.stderr.strip().removeprefix("next cursor: "))
    assert last_cursor >= max(e.id for e in _entries(db_url))
    part = _cli("changes", "--db", db_url, "--json", "--since", full[4]["cursor"], "--limit", 5)
    assert [json.loads(line) for line in part.stdout.splitlines()] == full[5:10]
    assert part.stderr.strip() == f"next cursor: {full[9]['cursor']}"
    human = _cli("changes", "--db", db_url)
    assert len(human.stdout.splitlines()) == len(full) and "new -> " in human.stdout

    settings = build_settings(database_url=db_url, local_roots=str(tmp_path))
    with TestClient(create_app(settings)) as client:
        answer = client.get("/v1/changes", params={"since": 0, "limit": 1000})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        paged, since = [], 0
        while True:
            page = client.get("/v1/changes", params={"since": since, "limit": 4}).json()
            paged += page["changes"]
            if not page["changes"]:
                break
            since = page["next"]
        assert client.get("/v1/changes", params={"limit": 0}).status_code == 422
        assert client.get("/v1/changes", params={"since": -1}).status_code == 422
    for got in (body["changes"], paged):
        assert [{**c, "changed_at": datetime.fromisoformat(c["changed_at"].replace("Z", "+00:00"))} for c in got] == [
            {**c, "changed_at": datetime.fromisoformat(c["changed_at"])} for c in full]
    assert body["next"] == last_cursor


def test_changes_follow_waits_for_new_changes(sqlite_url):
    _upsert(sqlite_url, [_result("a", "Bag")])
    result: list[Any] = []
    reader = threading.Thread(target=lambda: result.append(
        _cli("changes", "--db", sqlite_url, "--json", "--follow", "--interval", "0.05", "--limit", 3)))
    reader.start()
    time.sleep(0.5)
    assert reader.is_alive(), "it waits for more changes"
    _upsert(sqlite_url, [_result("a", "Coat", job_id="job-2"), _result("b", "Bag", job_id="job-2")])
    reader.join(30)
    assert not reader.is_alive()
    lines = [json.loads(line) for line in result[0].stdout.splitlines()]
    assert [(c["item_id"], c["category"], c["previous_category"]) for c in lines] == [
        ("a", "Bag", None), ("a", "Coat", "Bag"), ("b", "Bag", None)]


def test_postgresql_feed_waits_for_a_transaction_still_in_flight(pg_url):
    # The first writer draws its ids first and commits last: its entries must not be skipped by a reader that saw
    # the second writer's entries, which have higher ids and commit first.
    _upsert(pg_url, [_result("seed", "Bag")])
    with session_scope(pg_url) as session:
        start = history.read_changes(session=session, since=0).next
    engine = get_engine(pg_url)
    with Session(engine) as first:
        catalog.upsert_items(session=first, rows=[_result("slow", "Coat", job_id="job-slow")])
        _upsert(pg_url, [_result("fast", "Sandal", job_id="job-fast")])
        with session_scope(pg_url) as session:
            waiting = history.read_changes(session=session, since=start)
        assert waiting.changes == [] and waiting.next < _max_id(pg_url), "the later entry waits for the earlier one"
        first.commit()
    with session_scope(pg_url) as session:
        page = history.read_changes(session=session, since=waiting.next)
    assert [c.item_id for c in page.changes] == ["slow", "fast"]
    # A transaction that rolls back leaves nothing behind and holds nothing back.
    with Session(engine) as doomed:
        catalog.upsert_items(session=doomed, rows=[_result("ghost", "Bag")])
        doomed.rollback()
    _upsert(pg_url, [_result("after", "Bag")])
    with session_scope(pg_url) as session:
        assert [c.item_id for c in history.read_changes(session=session, since=page.next).changes] == ["after"]


def _max_id(url: str) -> int:
    with session_scope(url) as session:
        return session.scalar(select(func.max(CatalogHistory.id))) or 0


def test_postgresql_feed_refuses_repeatable_read(pg_url):
    with Session(get_engine(pg_url)) as session:
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        with pytest.raises(InvsortError, match="READ COMMITTED"):
            history.read_changes(session=session)


# ---------------------------------------------------------------------------------------------- migration


def test_the_upgrade_gives_every_existing_row_its_first_entry(empty_db_url):
    migrate.upgrade(empty_db_url, "0004")
    with session_scope(empty_db_url) as session:
        catalog_rows = [_result("a", "Bag"), _result("b", "Coat", status="needs_review")]
        c = session.connection()
        for r in catalog_rows:
            c.execute(text(
                "INSERT INTO catalog_items (item_id, image_uri, status, category, confidence, topk, model_name, "
                "model_version, job_id, updated_at) VALUES (:i, :u, :s, :c, :p, '[]', 'm', 'v1', 'job-0', :t)"
            ).bindparams(bindparam("t", type_=UTCDateTime())),
                {"i": r.item_id, "u": r.image_uri, "s": r.status, "c": r.category, "p": r.confidence,
                 "t": datetime(2026, 1, 1, tzinfo=UTC)})
        c.exec_driver_sql("UPDATE catalog_items SET status = 'reviewed', reviewed_by = 'ana', confidence = NULL "
                          "WHERE item_id = 'b'")
    migrate.upgrade(empty_db_url)
    entries = _entries(empty_db_url)
    assert [(e.item_id, e.source, e.status, e.changed, e.previous_status, e.changed_by, e.job_id) for e in entries] == [
        ("a", "model", "sorted", True, None, None, "job-0"), ("b", "review", "reviewed", True, None, "ana", None)]
    assert entries[0].written_at == datetime(2026, 1, 1, tzinfo=UTC)
    _upsert(empty_db_url, [_result("a", "Sandal", job_id="job-1")])
    assert _entries(empty_db_url)[-1].previous_category == "Bag"
    migrate.downgrade(empty_db_url, "0004")
    with session_scope(empty_db_url) as session:
        assert session.scalar(select(func.count()).select_from(CatalogItem)) == 2
        tables = get_engine(empty_db_url).dialect.get_table_names(session.connection())
        assert "catalog_history" not in tables


def test_the_feed_needs_the_token_when_the_server_has_one(sqlite_url, tmp_path: Path):
    token = "feed-token-0123456789"
    settings = build_settings(database_url=sqlite_url, local_roots=str(tmp_path), api_token=token)
    with TestClient(create_app(settings)) as client:
        assert client.get("/v1/changes").status_code == 401
        answer = client.get("/v1/changes", headers={"authorization": f"Bearer {token}"})
        assert answer.status_code == 200 and answer.json() == {"changes": [], "next": 0}
        schema = client.get("/openapi.json", headers={"authorization": f"Bearer {token}"}).json()
        assert schema["paths"]["/v1/changes"]["get"]["security"] == [{"token": []}]
