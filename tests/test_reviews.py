"""Human decisions win: db/reviews.py and the upsert's respect for reviewed rows, on real SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from db import catalog, migrate, reviews
from db.catalog import CatalogRow
from db.models import CatalogItem, Review
from db.reviews import ItemNotFoundError, ReviewError
from db.session import session_scope
from pipeline.records import ItemResult

CLASSES = ["Bag", "Coat", "Sandal", "Sneaker"]


@pytest.fixture
def pg_url(empty_pg_url: str) -> str:
    """A PostgreSQL database of this test's own, migrated: the review queue and the log read every row, and other
    modules' tests (workers, the API) commit rows into the session's shared database."""
    migrate.upgrade(empty_pg_url)
    return empty_pg_url


def _result(item_id: str, category: str = "Bag", confidence: float = 0.6, *, status: str = "needs_review",
            job_id: str | None = "job-1", version: str = "v1") -> ItemResult:
    return ItemResult(
        item_id=item_id, image_uri=f"s3://bucket/{item_id}.jpg", status=status,  # type: ignore[arg-type]
        category=category, confidence=confidence, topk=[[category, confidence], ["Coat", 0.1]],
        model_name="fashion_mnist_cnn", model_version=version, job_id=job_id,
    )


def _row(session: Session, item_id: str) -> CatalogRow:
    row = catalog.get_item(session=session, item_id=item_id)
    assert row is not None
    return row


def _log(session: Session, item_id: str | None = None) -> list[reviews.Review]:
    return list(reviews.iter_reviews(session=session, item_id=item_id))


def test_a_review_keeps_the_models_prediction_beside_the_humans(db_session):
    catalog.upsert_items(session=db_session, rows=[_result("shoe", "Bag", 0.61)])
    before = datetime.now(UTC)

    review = reviews.record_review(session=db_session, item_id="shoe", category="Sandal", reviewer="ana",
                                   allowed=CLASSES)

    row = _row(db_session, "shoe")
    assert (row.status, row.category, row.confidence) == ("reviewed", "Sandal", None)
    assert (row.model_category, row.model_confidence) == ("Bag", 0.61)
    assert row.reviewed_by == "ana" and row.reviewed_at == row.updated_at >= before - timedelta(seconds=1)
    assert row.topk == [["Bag", 0.61], ["Coat", 0.1]] and row.model_version == "v1", "the sort's output stays"
    # the log: reviewer, time and the model version it corrected
    assert _log(db_session) == [review]
    assert (review.action, review.item_id, review.category, review.reviewer) == ("review", "shoe", "Sandal", "ana")
    assert review.decided_at == row.reviewed_at and review.decided_at.tzinfo is not None
    assert (review.model_name, review.model_version) == ("fashion_mnist_cnn", "v1")
    assert (review.model_category, review.model_confidence) == ("Bag", 0.61)
    assert (review.previous_status, review.previous_category, review.undone_at, review.undoes) == (
        "needs_review", "Bag", None, None)


def test_a_re_sort_leaves_a_reviewed_row_entirely_as_it_is(db_session):
    catalog.upsert_items(session=db_session, rows=[_result("shoe"), _result("other")])
    reviews.record_review(session=db_session, item_id="shoe", category="Sneaker", reviewer="ana")
    reviewed = _row(db_session, "shoe")

    again = [_result("shoe", "Coat", 0.99, status="sorted", job_id="job-2", version="v2"),
             _result("other", "Coat", 0.99, status="sorted", job_id="job-2", version="v2"),
             _result("new", job_id="job-2")]
    assert catalog.upsert_items(session=db_session, rows=again) == 2, "the reviewed row is not counted"

    assert _row(db_session, "shoe") == reviewed, "category, status, updated_at, job_id: every column kept"
    assert _row(db_session, "other").to_result() == again[1]
    assert _row(db_session, "new").to_result() == again[2]
    assert again[0].status == "sorted", "the ItemResult keeps what the sort found"
    assert [r.item_id for r in catalog.iter_items(session=db_session, job_id="job-2")] == ["new", "other"]
    assert [r.item_id for r in catalog.iter_items(session=db_session, status="reviewed")] == ["shoe"]


def test_a_refused_re_sort_of_a_reviewed_row_does_not_fail_it(db_session):
    catalog.upsert_items(session=db_session, rows=[_result("shoe")])
    reviews.record_review(session=db_session, item_id="shoe", category=None, reviewer="ana")
    reviewed = _row(db_session, "shoe")
    bogus = _result("shoe", status="bogus")  # the CHECK constraint refuses it; its failed row meets the review

    assert catalog.upsert_items(session=db_session, rows=[bogus, _result("ok")]) == 1

    assert _row(db_session, "shoe") == reviewed
    assert bogus.status == "failed" and _row(db_session, "ok").status == "needs_review"


def test_not_a_product(db_session):
    catalog.upsert_items(session=db_session, rows=[_result("cat-photo", "Bag", 0.3)])
    review = reviews.record_review(session=db_session, item_id="cat-photo", category=None, reviewer="ana",
                                   allowed=CLASSES)
    row = _row(db_session, "cat-photo")
    assert (row.status, row.category, row.model_category, row.model_confidence) == ("reviewed", None, "Bag", 0.3)
    assert review.category is None and review.model_category == "Bag"


def test_undo_restores_the_row_and_marks_the_decision_undone(db_session):
    original = _result("shoe", "Bag", 0.42)
    catalog.upsert_items(session=db_session, rows=[original])
    decision = reviews.record_review(session=db_session, item_id="shoe", category="Coat", reviewer="ana")

    undo = reviews.undo_review(session=db_session, item_id="shoe", reviewer="bo")

    row = _row(db_session, "shoe")
    assert row.to_result() == original
    assert (row.model_category, row.model_confidence, row.reviewed_by, row.reviewed_at) == (None,) * 4
    assert undo is not None and undo.reviewer == "bo"
    assert (undo.action, undo.undoes, undo.category, undo.previous_status, undo.previous_category) == (
        "undo", decision.id, "Bag", "reviewed", "Coat")
    log = _log(db_session, "shoe")
    assert [e.action for e in log] == ["review", "undo"]
    assert log[0].undone_at == undo.decided_at and log[1] == undo
    assert reviews.undo_review(session=db_session, item_id="shoe", reviewer="bo") is None, "nothing left to undo"
    # undone, the row is the sort's again: a re-sort replaces it
    catalog.upsert_items(session=db_session, rows=[_result("shoe", "Sandal", 0.99, status="sorted")])
    assert _row(db_session, "shoe").category == "Sandal"


def test_undo_steps_back_through_a_changed_mind(db_session):
    catalog.upsert_items(session=db_session, rows=[_result("shoe", "Bag", 0.5, status="sorted")])
    reviews.record_review(session=db_session, item_id="shoe", category="Coat", reviewer="ana")
    first = _row(db_session, "shoe")
    reviews.record_review(session=db_session, item_id="shoe", category="Sandal", reviewer="bo")
    second = _row(db_session, "shoe")
    assert (second.category, second.reviewed_by, second.model_category, second.model_confidence) == (
        "Sandal", "bo", "Bag", 0.5), "the model's prediction is kept from the first decision"

    reviews.undo_review(session=db_session, item_id="shoe", reviewer="bo")
    back = _row(db_session, "shoe")
    assert replace(back, updated_at=first.updated_at) == first, "the first decision is back, by ana"

    reviews.undo_review(session=db_session, item_id="shoe", reviewer="bo")
    assert _row(db_session, "shoe").to_result() == _result("shoe", "Bag", 0.5, status="sorted")
    assert [(e.action, e.undone_at is not None) for e in _log(db_session, "shoe")] == [
        ("review", True), ("review", True), ("undo", False), ("undo", False)]


def test_batch_accept_takes_the_top1_and_skips_reviewed_and_failed_rows(db_session):
    failed = ItemResult(item_id="broken", image_uri="s3://bucket/broken.jpg", status="failed", error="not an image")
    catalog.upsert_items(session=db_session, rows=[_result("a", "Bag", 0.7), _result("b", "Coat", 0.8), failed,
                                                   _result("c", "Sandal", 0.9)])
    reviews.record_review(session=db_session, item_id="c", category="Sneaker", reviewer="ana")

    assert reviews.accept_top1(session=db_session, item_ids=["a", "b", "broken", "c", "a"], reviewer="bo") == 2

    a, b, c = (_row(db_session, x) for x in "abc")
    assert (a.status, a.category, a.confidence, a.model_category, a.model_confidence, a.reviewed_by) == (
        "reviewed", "Bag", None, "Bag", 0.7, "bo")
    assert (b.category, b.model_confidence) == ("Coat", 0.8)
    assert (c.category, c.reviewed_by) == ("Sneaker", "ana"), "a human decision is not replaced by the model's"
    assert _row(db_session, "broken").status == "failed"
    accepts = [e for e in _log(db_session) if e.action == "accept"]
    assert sorted((e.item_id, e.category, e.model_version, e.previous_status) for e in accepts) == [
        ("a", "Bag", "v1", "needs_review"), ("b", "Coat", "v1", "needs_review")]
    assert reviews.accept_top1(session=db_session, item_ids=["a", "b"], reviewer="bo") == 0
    # accepted rows undo like any other decision
    reviews.undo_review(session=db_session, item_id="a", reviewer="bo")
    assert _row(db_session, "a").to_result() == _result("a", "Bag", 0.7)


def test_batch_accept_of_an_unknown_item_changes_nothing(db_session):
    catalog.upsert_items(session=db_session, rows=[_result("a")])
    with pytest.raises(ItemNotFoundError, match="'ghost'.*nothing accepted"):
        reviews.accept_top1(session=db_session, item_ids=["a", "ghost"], reviewer="bo")
    assert _row(db_session, "a").status == "needs_review" and _log(db_session) == []


def test_unknown_items_and_categories_are_refused(db_session):
    catalog.upsert_items(session=db_session, rows=[_result("shoe")])
    with pytest.raises(ItemNotFoundError, match="no catalog item 'ghost'"):
        reviews.record_review(session=db_session, item_id="ghost", category="Bag", reviewer="ana")
    with pytest.raises(ItemNotFoundError):
        reviews.undo_review(session=db_session, item_id="ghost", reviewer="ana")
    with pytest.raises(ReviewError, match="'Hat' is not one of the allowed categories: Bag, Coat"):
        reviews.record_review(session=db_session, item_id="shoe", category="Hat", reviewer="ana", allowed=CLASSES)
    for category, reviewer in [("", "ana"), ("x" * 256, "ana"), ("Bag", ""), ("Bag", "nul\x00")]:
        with pytest.raises(ReviewError):
            reviews.record_review(session=db_session, item_id="shoe", category=category, reviewer=reviewer)
    assert _row(db_session, "shoe").status == "needs_review" and _log(db_session) == []
    assert reviews.undo_review(session=db_session, item_id="shoe", reviewer="ana") is None, "never reviewed"


def test_review_queue_is_least_confident_first_with_keyset_pages(db_session):
    rows = [_result(f"q-{i:02d}", confidence=[0.5, 0.2, 0.9, 0.2, 0.7][i % 5], job_id=f"job-{i % 2}")
            for i in range(20)]
    rows.append(_result("sure", "Bag", 0.99, status="sorted"))
    catalog.upsert_items(session=db_session, rows=rows)
    expected = sorted((r.confidence, r.item_id) for r in rows if r.status == "needs_review")

    pages, after = [], None
    while page := reviews.review_queue(session=db_session, limit=6, after=after):
        pages.append(page)
        after = (page[-1].confidence, page[-1].item_id)
    assert [len(p) for p in pages] == [6, 6, 6, 2]
    assert [(r.confidence, r.item_id) for p in pages for r in p] == expected

    # a row reviewed meanwhile leaves the queue; the next page neither repeats nor skips a row
    first = reviews.review_queue(session=db_session, limit=6)
    reviews.record_review(session=db_session, item_id=first[2].item_id, category="Coat", reviewer="ana")
    nxt = reviews.review_queue(session=db_session, limit=6, after=(first[-1].confidence, first[-1].item_id))
    assert [r.item_id for r in nxt] == [i for _, i in expected[6:12]]
    assert all(isinstance(r, CatalogRow) and r.status == "needs_review" for r in nxt)
    only_1 = reviews.review_queue(session=db_session, limit=100, job_id="job-1")
    assert {r.job_id for r in only_1} == {"job-1"} and len(only_1) == 10
    with pytest.raises(ValueError, match="limit"):
        reviews.review_queue(session=db_session, limit=0)


def test_reviews_of_long_ids_and_the_log_since(db_session):
    long_id = "s3://bucket/" + "deep/" * 300 + "shoe.jpg"
    catalog.upsert_items(session=db_session, rows=[_result(long_id, confidence=0.1), _result("short", confidence=0.2)])
    assert [r.item_id for r in reviews.review_queue(session=db_session)] == [long_id, "short"]
    after = reviews.review_queue(session=db_session, limit=1)[0]
    assert [r.item_id for r in reviews.review_queue(session=db_session, after=(after.confidence, long_id))] == [
        "short"]

    review = reviews.record_review(session=db_session, item_id=long_id, category="Coat", reviewer="ana")
    assert review.item_id == long_id and _row(db_session, long_id).category == "Coat"
    assert [e.item_id for e in _log(db_session, long_id)] == [long_id]
    assert reviews.accept_top1(session=db_session, item_ids=["short"], reviewer="bo") == 1
    later = datetime.now(UTC) + timedelta(hours=1)
    assert len(list(reviews.iter_reviews(session=db_session, since=review.decided_at))) == 2
    assert list(reviews.iter_reviews(session=db_session, since=later)) == []
    with pytest.raises(ValueError, match="naive"):
        list(reviews.iter_reviews(session=db_session, since=datetime(2026, 1, 1)))


def test_a_sort_waiting_on_a_review_being_committed_leaves_the_review(pg_url):
    # PostgreSQL: the sort's upsert waits for the reviewer's row lock, then sees the reviewed row and skips it.
    item = f"race-{uuid.uuid4().hex}"
    with session_scope(pg_url) as session:
        catalog.upsert_items(session=session, rows=[_result(item)])
    written: list[int] = []
    try:
        with session_scope(pg_url) as reviewer:
            reviews.record_review(session=reviewer, item_id=item, category="Coat", reviewer="ana")

            def sort() -> None:
                with session_scope(pg_url) as session:
                    written.append(catalog.upsert_items(session=session, rows=[_result(item, "Bag", 0.99)]))

            sorter = threading.Thread(target=sort)
            sorter.start()
            time.sleep(0.5)
            assert sorter.is_alive(), "the upsert waits for the review's row lock"
        sorter.join(30)
        assert written == [0]
        with session_scope(pg_url) as session:
            row = _row(session, item)
            assert (row.status, row.category, row.model_category) == ("reviewed", "Coat", "Bag")
    finally:
        with session_scope(pg_url) as session:
            session.execute(delete(CatalogItem).where(CatalogItem.item_id == item))
            session.execute(delete(Review).where(Review.item_id == item))


def test_downgrade_gives_reviewed_rows_back_to_the_model(empty_db_url):
    migrate.upgrade(empty_db_url)
    with session_scope(empty_db_url) as session:
        catalog.upsert_items(session=session, rows=[_result("a", "Bag", 0.4, status="sorted"), _result("b")])
        reviews.record_review(session=session, item_id="a", category="Coat", reviewer="ana")
        reviews.record_review(session=session, item_id="b", category=None, reviewer="ana")
    migrate.downgrade(empty_db_url, "0003")
    with session_scope(empty_db_url) as session:
        got = session.connection().exec_driver_sql(
            "SELECT item_id, status, category, confidence FROM catalog_items ORDER BY item_id").all()
    assert [tuple(r) for r in got] == [("a", "sorted", "Bag", 0.4), ("b", "needs_review", "Bag", 0.6)]
    migrate.upgrade(empty_db_url)
    with session_scope(empty_db_url) as session:
        assert session.scalar(select(CatalogItem.status).where(CatalogItem.item_id == "a")) == "sorted"
