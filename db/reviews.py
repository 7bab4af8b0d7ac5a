"""Human review decisions on catalog rows, on SQLite and PostgreSQL: human decisions win.

A decision makes a catalog row ``reviewed``: its ``category`` becomes the human's (None: "not a product /
unknown"), its ``confidence`` null, and the model's top-1 and probability move to ``model_category`` /
``model_confidence`` (the first time; a second decision on the same row keeps them), with ``reviewed_by`` and
``reviewed_at``. :func:`db.catalog.upsert_items` never overwrites a reviewed row, so no later sort or re-sort
changes it. Every decision is appended to ``reviews`` (who, when, the model version and prediction it corrected,
the row as it was before), and so is every undo; each decision and undo also appends the row's new state to
``catalog_history`` (source ``review``, the decision in ``reason``, the reviewer in ``changed_by``). Like
:mod:`db.catalog`, every function takes the session as a keyword argument, runs in the caller's transaction and
never commits.

Each write locks the rows it decides on before reading them (``SELECT ... FOR UPDATE`` in ``item_id`` order on
PostgreSQL; the write lock first on SQLite), so two reviewers of one item, or a reviewer and a sort, never lose
each other's work: the later one sees the earlier one's row.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Row, Table, func, insert, select, tuple_, update
from sqlalchemy.orm import Session

from db.catalog import CatalogRow, _select_rows, catalog_key, record_history
from db.models import CatalogItem
from db.models import Review as ReviewModel
from pipeline.errors import InvsortError
from pipeline.records import REVIEWED, printable

__all__ = [
    "ItemNotFoundError",
    "Review",
    "ReviewError",
    "accept_top1",
    "iter_reviews",
    "record_review",
    "review_queue",
    "undo_review",
]

_items = cast(Table, CatalogItem.__table__)
_reviews = cast(Table, ReviewModel.__table__)

#: Item ids locked and updated per statement (well under SQLite's limit of bound parameters).
_CHUNK = 500
MAX_QUEUE_PAGE = 1000
_TEXT_LIMIT = 255  # reviewer and category columns: varchar(255)


class ItemNotFoundError(InvsortError, LookupError):
    """The catalog has no row for the given item id."""


class ReviewError(InvsortError, ValueError):
    """A decision that cannot be recorded: a category that is not allowed, an empty or too long reviewer or
    category, text the database cannot store."""


@dataclass(frozen=True, slots=True)
class Review:
    """One entry of the ``reviews`` log.

    ``action`` is ``review`` (:func:`record_review`), ``accept`` (:func:`accept_top1`) or ``undo``
    (:func:`undo_review`, which names the entry it undid in ``undoes``). ``category`` is what the entry set
    (None: not a product / unknown; for an undo, what the row got back). ``model_*`` is the model's prediction
    the decision corrected or confirmed, ``previous_*`` the row before it. ``undone_at`` is set on a decision
    that was undone later.
    """

    id: int
    item_id: str
    action: str
    category: str | None
    reviewer: str
    decided_at: datetime
    model_name: str | None
    model_version: str | None
    model_category: str | None
    model_confidence: float | None
    previous_status: str
    previous_category: str | None
    previous_reviewed_by: str | None
    previous_reviewed_at: datetime | None
    undone_at: datetime | None
    undoes: int | None


_REVIEW_FIELDS = tuple(f.name for f in fields(Review))
# What a decision reads of a row before it writes it.
_LOCKED = (
    _items.c.item_id, _items.c.status, _items.c.category, _items.c.confidence, _items.c.model_name,
    _items.c.model_version, _items.c.model_category, _items.c.model_confidence, _items.c.reviewed_by,
    _items.c.reviewed_at,
)


def _now() -> datetime:
    return datetime.now(UTC)


def _check_text(what: str, value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ReviewError(f"{what} must be a non-empty string, got {value!r}")
    if len(value) > _TEXT_LIMIT:
        raise ReviewError(f"{what} must be at most {_TEXT_LIMIT} characters, got {len(value)}")
    if printable(value) != value:
        raise ReviewError(f"{what} {printable(value)!r} has a NUL or an unpaired surrogate, which cannot be stored")


def _chunks(keys: Sequence[str]) -> Iterator[Sequence[str]]:
    for i in range(0, len(keys), _CHUNK):
        yield keys[i : i + _CHUNK]


def _lock(session: Session, keys: Sequence[str]) -> dict[str, Row[Any]]:
    """The rows of ``keys`` (catalog keys) that exist, by key, locked until the transaction ends."""
    found: dict[str, Row[Any]] = {}
    sqlite = session.get_bind().dialect.name == "sqlite"
    for chunk in _chunks(sorted(set(keys))):
        if sqlite:
            # Take SQLite's write lock before reading: a read snapshot could go stale before the write.
            session.execute(update(_items).where(_items.c.item_id.in_(chunk)).values(status=_items.c.status))
        stmt = select(*_LOCKED).where(_items.c.item_id.in_(chunk)).order_by(_items.c.item_id).with_for_update()
        found.update((row.item_id, cast(Row[Any], row)) for row in session.execute(stmt))
    return found


def _lock_one(session: Session, item_id: str) -> Row[Any]:
    row = _lock(session, [catalog_key(item_id)]).get(catalog_key(item_id))
    if row is None:
        raise ItemNotFoundError(f"no catalog item {printable(item_id)[:300]!r}")
    return row


def _append(session: Session, item_id: str, values: dict[str, Any]) -> Review:
    """Append one entry to the log; ``item_id`` is the whole id, ``values`` every column but ``id``."""
    review_id = session.execute(insert(_reviews).values(**values).returning(_reviews.c.id)).scalar_one()
    return Review(**{**values, "id": review_id, "item_id": item_id})


def _entry(row: Row[Any], *, action: str, category: str | None, reviewer: str, now: datetime) -> dict[str, Any]:
    """The log entry of a decision on the locked ``row``: the model's prediction and the row as it is now."""
    first = row.status != REVIEWED
    return {
        "item_id": row.item_id, "action": action, "category": category, "reviewer": reviewer, "decided_at": now,
        "model_name": row.model_name, "model_version": row.model_version,
        "model_category": row.category if first else row.model_category,
        "model_confidence": row.confidence if first else row.model_confidence,
        "previous_status": row.status, "previous_category": row.category,
        "previous_reviewed_by": row.reviewed_by, "previous_reviewed_at": row.reviewed_at,
        "undone_at": None, "undoes": None,
    }


def record_review(
    *, session: Session, item_id: str, category: str | None, reviewer: str, allowed: Sequence[str] | None = None
) -> Review:
    """Record a human's decision on one item: its category, or None for "not a product / unknown".

    The row becomes ``reviewed`` with ``category``, no ``confidence``, ``reviewed_by`` = ``reviewer`` and
    ``reviewed_at`` = ``updated_at`` = now; the model's top-1 and probability go to ``model_category`` /
    ``model_confidence`` unless the row was reviewed already (a second decision keeps the model's prediction and
    replaces the first; :func:`undo_review` steps back through them). Any row can be reviewed, ``failed`` ones
    included (their model prediction is null). The decision is appended to ``reviews``. Does not commit.

    Returns:
        The :class:`Review` appended.

    Raises:
        ReviewError: ``category`` is not in ``allowed`` (when given), or ``category`` / ``reviewer`` is empty,
            over 255 characters or holds a NUL or an unpaired surrogate.
        ItemNotFoundError: the catalog has no row for ``item_id``.
    """
    _check_text("reviewer", reviewer)
    if category is not None:
        _check_text("category", category)
        if allowed is not None and category not in set(allowed):
            shown = ", ".join(sorted(allowed)[:50])
            raise ReviewError(f"category {category!r} is not one of the allowed categories: {shown}")
    row = _lock_one(session, item_id)
    now = _now()
    entry = _entry(row, action="review", category=category, reviewer=reviewer, now=now)
    session.execute(
        update(_items).where(_items.c.item_id == row.item_id).values(
            status=REVIEWED, category=category, confidence=None, model_category=entry["model_category"],
            model_confidence=entry["model_confidence"], reviewed_by=reviewer, reviewed_at=now, updated_at=now,
        )
    )
    record_history(session=session, keys=[row.item_id], source="review", reason="review", changed_by=reviewer)
    return _append(session, item_id, entry)


def undo_review(*, session: Session, item_id: str, reviewer: str) -> Review | None:
    """Undo the latest decision on one item that is not undone yet, whoever made it.

    The row goes back to what it was before that decision: its earlier status, category and confidence (the
    model's, from ``model_category`` / ``model_confidence``, which are cleared with ``reviewed_by`` and
    ``reviewed_at``), or, when the decision replaced an earlier one, that earlier decision. ``updated_at``
    becomes now. The decision gets ``undone_at`` and an ``undo`` entry by ``reviewer`` is appended. Calling it
    again steps further back; on a row that is not ``reviewed`` it does nothing (a sort may have rewritten the
    row since, so nothing older is restored). Does not commit.

    Returns:
        The ``undo`` :class:`Review` appended, or None when there was nothing to undo.

    Raises:
        ReviewError: ``reviewer`` is empty, over 255 characters or holds a NUL or an unpaired surrogate.
        ItemNotFoundError: the catalog has no row for ``item_id``.
    """
    _check_text("reviewer", reviewer)
    row = _lock_one(session, item_id)
    if row.status != REVIEWED:
        return None
    last = session.execute(
        select(_reviews)
        .where(_reviews.c.item_id == row.item_id, _reviews.c.action != "undo", _reviews.c.undone_at.is_(None))
        .order_by(_reviews.c.id.desc())
        .limit(1)
    ).first()
    if last is None:
        return None
    now = _now()
    if last.previous_status == REVIEWED:
        restored = {"category": last.previous_category, "reviewed_by": last.previous_reviewed_by,
                    "reviewed_at": last.previous_reviewed_at}
    else:
        restored = {"category": last.previous_category, "confidence": last.model_confidence,
                    "model_category": None, "model_confidence": None, "reviewed_by": None, "reviewed_at": None}
    session.execute(update(_items).where(_items.c.item_id == row.item_id)
                    .values(status=last.previous_status, updated_at=now, **restored))
    record_history(session=session, keys=[row.item_id], source="review", reason="undo", changed_by=reviewer)
    session.execute(update(_reviews).where(_reviews.c.id == last.id).values(undone_at=now))
    entry = _entry(row, action="undo", category=last.previous_category, reviewer=reviewer, now=now)
    entry.update(model_name=last.model_name, model_version=last.model_version,
                 model_category=last.model_category, model_confidence=last.model_confidence, undoes=last.id)
    return _append(session, item_id, entry)


def accept_top1(*, session: Session, item_ids: Sequence[str], reviewer: str) -> int:
    """Accept the model's top-1 of each item as the human's category (a page accepted at once, or one item).

    Each row that is not ``reviewed`` yet and has a top-1 becomes ``reviewed`` with its ``category`` unchanged,
    the model's category and probability in ``model_category`` / ``model_confidence``, no ``confidence``,
    ``reviewed_by`` = ``reviewer``, ``reviewed_at`` = ``updated_at`` = now, and an ``accept`` entry is appended
    to ``reviews``. Rows already reviewed (a human's decision is not replaced by the model's) and rows without a
    top-1 (``failed``) are skipped. All or nothing: an unknown id changes nothing. Does not commit.

    Returns:
        How many rows were accepted.

    Raises:
        ReviewError: ``reviewer`` is empty, over 255 characters or holds a NUL or an unpaired surrogate.
        ItemNotFoundError: the catalog has no row for one of ``item_ids`` (the message names the first).
    """
    _check_text("reviewer", reviewer)
    whole = {catalog_key(i): i for i in item_ids}
    rows = _lock(session, list(whole))
    missing = [whole[key] for key in whole if key not in rows]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ItemNotFoundError(f"no catalog item {printable(missing[0])[:300]!r}{more}: nothing accepted")
    todo = [row for row in rows.values() if row.status != REVIEWED and row.category is not None]
    if not todo:
        return 0
    now = _now()
    for chunk in _chunks([row.item_id for row in todo]):
        session.execute(
            update(_items).where(_items.c.item_id.in_(chunk)).values(
                status=REVIEWED, model_category=_items.c.category, model_confidence=_items.c.confidence,
                confidence=None, reviewed_by=reviewer, reviewed_at=now, updated_at=now,
            )
        )
    record_history(session=session, keys=[row.item_id for row in todo], source="review", reason="accept",
                   changed_by=reviewer)
    entries = [_entry(row, action="accept", category=row.category, reviewer=reviewer, now=now) for row in todo]
    session.execute(insert(_reviews), entries)
    return len(todo)


def review_queue(
    *, session: Session, limit: int = 50, after: tuple[float, str] | None = None, job_id: str | None = None
) -> list[CatalogRow]:
    """One page of the review queue: ``needs_review`` rows (of ``job_id``'s sort, if given), least confident
    first, ties by item key.

    Keyset pagination: pass ``after`` = ``(confidence, item_id)`` of the last row of the previous page (its
    ``item_id`` as returned, the whole id) to get the next page; rows reviewed meanwhile simply leave the queue,
    and no row is shown twice or skipped. Rows without a confidence (a sort always sets one) are not in the
    queue. A partial index on the ``needs_review`` rows serves it.

    Returns:
        Up to ``limit`` :class:`CatalogRow` objects, in queue order; an empty list after the last page.

    Raises:
        ValueError: ``limit`` is not within 1..1000.
    """
    if not 1 <= limit <= MAX_QUEUE_PAGE:
        raise ValueError(f"limit must be within 1..{MAX_QUEUE_PAGE}, got {limit}")
    order = (_items.c.confidence, _items.c.item_id)
    stmt = _select_rows().where(_items.c.status == "needs_review", _items.c.confidence.is_not(None))
    if job_id is not None:
        stmt = stmt.where(_items.c.job_id == job_id)
    if after is not None:
        stmt = stmt.where(tuple_(*order) > tuple_(float(after[0]), catalog_key(after[1])))
    rows = session.execute(stmt.order_by(*order).limit(limit))
    return [CatalogRow(*row) for row in rows]


def iter_reviews(
    *, session: Session, since: datetime | None = None, item_id: str | None = None, chunk: int = 1000
) -> Iterator[Review]:
    """Stream the ``reviews`` log in the order it was written (by ``id``), undos and undone decisions included.

    ``since`` keeps the entries decided at or after it (timezone-aware); ``item_id`` keeps one item's history.
    Entries are fetched ``chunk`` at a time (a server-side cursor on PostgreSQL); consume the iterator inside
    the session's transaction.

    Yields:
        One :class:`Review` per entry, its ``item_id`` the item's whole id.

    Raises:
        ValueError: ``since`` is a naive datetime (raised when the iterator is first advanced).
    """
    if since is not None and (since.tzinfo is None or since.utcoffset() is None):
        raise ValueError(f"naive datetime {since!r}: pass a timezone-aware datetime (UTC)")
    whole_id = func.coalesce(_items.c.item_id_full, _reviews.c.item_id)
    stmt = select(*(whole_id if name == "item_id" else _reviews.c[name] for name in _REVIEW_FIELDS))
    stmt = stmt.select_from(_reviews.outerjoin(_items, _items.c.item_id == _reviews.c.item_id))
    if since is not None:
        stmt = stmt.where(_reviews.c.decided_at >= since)
    if item_id is not None:
        stmt = stmt.where(_reviews.c.item_id == catalog_key(item_id))
    result = session.execute(stmt.order_by(_reviews.c.id).execution_options(yield_per=chunk))
    try:
        for row in result:
            yield Review(*row)
    finally:
        result.close()
