"""The history of the catalog (``catalog_history``): every state of every catalog row, what a rollback restores,
the change feed, and pruning, on SQLite and PostgreSQL.

Entries are appended by the writers, in the transaction of each write: :func:`db.catalog.upsert_items` (sorts,
source ``model``), :mod:`db.reviews` (decisions and undos, source ``review``) and :func:`record_history` for any
other writer (a rollback: source ``rollback``). Each entry is the row as that write left it, with the item's state
before (``previous_category`` / ``previous_status``) and ``changed``: whether the category or status differs from
it, or the item is new. Like :mod:`db.catalog`, every function takes the session as a keyword argument, runs in
the caller's transaction and never commits.

Retention: ``INVSORT_HISTORY_RETENTION_DAYS`` (unset: keep everything); :func:`prune_history` deletes what is
older, ``invsort db prune-history`` runs it, and ``invsort beat`` daily when the retention is set.

A re-categorisation (:mod:`pipeline.recategorize`) reads what its job changed (:func:`category_pairs`), and a
rollback of a job puts back what it replaced (:func:`restore_previous`, under the rows' locks).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import Select, Table, bindparam, delete, exists, func, select, text, update
from sqlalchemy.orm import Session

from db.catalog import HISTORY_SEQUENCE, MARKER_BASE, _now, _rowcount, catalog_key, record_history
from db.models import CatalogHistory, CatalogItem
from pipeline.errors import InvsortError
from pipeline.records import REVIEWED

__all__ = [
    "MAX_CHANGES_PAGE",
    "Change",
    "ChangePage",
    "HistoryEntry",
    "JobWrite",
    "RollbackCounts",
    "category_pairs",
    "feed_horizon",
    "item_history",
    "iter_changes",
    "previous_entries",
    "prune_history",
    "read_changes",
    "record_history",
    "restore_previous",
    "retention_cutoff",
]

_history = cast(Table, CatalogHistory.__table__)
_items = cast(Table, CatalogItem.__table__)

#: Most changes one read of the feed returns.
MAX_CHANGES_PAGE = 1000


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One ``catalog_history`` entry: the catalog row of ``item_id`` as one write left it.

    ``item_id`` is the item's whole id. ``source`` is ``model`` (a sort of job ``job_id``), ``review`` (a decision
    or undo by ``changed_by``; ``reason`` is ``review``, ``accept`` or ``undo``) or ``rollback``. For a sort,
    ``reason`` is the row's ``error`` (why it failed, or ``unknown``). ``previous_category`` / ``previous_status``
    are the item's state before the write (None: the item was new), ``changed`` whether the category or status
    differs from it. ``written_at`` is the row's ``updated_at`` after the write (UTC).
    """

    id: int
    item_id: str
    job_id: str | None
    model_name: str | None
    model_version: str | None
    category: str | None
    confidence: float | None
    status: str
    topk: list[list[str | float]] | None
    reason: str | None
    source: str
    changed_by: str | None
    changed: bool
    previous_category: str | None
    previous_status: str | None
    written_at: datetime


_ENTRY_FIELDS = tuple(f.name for f in fields(HistoryEntry))


@dataclass(frozen=True, slots=True)
class Change:
    """One entry of the change feed: an item whose category or status changed (or that is new).

    ``cursor`` is the entry's id: pass the last one read as ``since`` to read on. ``previous_*`` is the item's
    state before (None: the item is new). ``source``, ``job_id`` and ``changed_by`` say who changed it (a sort's
    job, a reviewer, a rollback).
    """

    cursor: int
    item_id: str
    category: str | None
    status: str
    previous_category: str | None
    previous_status: str | None
    model_version: str | None
    source: str
    job_id: str | None
    changed_by: str | None
    changed_at: datetime

    def to_json(self) -> dict[str, Any]:
        """The change as a JSON object (``changed_at`` in ISO 8601, UTC): a line of ``invsort changes --json``."""
        record = {f.name: getattr(self, f.name) for f in fields(self)}
        record["changed_at"] = self.changed_at.isoformat()
        return record


@dataclass(frozen=True, slots=True)
class ChangePage:
    """One read of the change feed: ``changes`` in cursor order, and ``next``, the cursor to read on from.

    ``next`` is the last change's cursor when the page is full; otherwise the feed's horizon (the highest id that
    is final, :func:`feed_horizon`), so that the next read starts after the entries that changed nothing too; and
    never below the cursor read from.
    """

    changes: list[Change]
    next: int


@dataclass(frozen=True, slots=True)
class JobWrite:
    """What one job did to one item, and what a rollback of the job would restore.

    ``entry`` is the job's (last) entry of the item. ``previous`` is the item's entry before the job's first one:
    the state to restore (None: the job created the item, there is nothing to go back to). ``latest`` says
    whether ``entry`` is still the item's latest entry; when it is not, something changed the item after the job
    (a later sort, a person's decision, a rollback) and a rollback should leave it alone.
    """

    item_id: str
    entry: HistoryEntry
    previous: HistoryEntry | None
    latest: bool


def _entry_columns(table: Any) -> list[Any]:
    """The columns of :class:`HistoryEntry` in its order from ``table`` (an alias of ``catalog_history``), the
    item's whole id from the ``catalog_items`` row joined as ``_items``."""
    whole_id = func.coalesce(_items.c.item_id_full, table.c.item_id)
    return [whole_id if name == "item_id" else table.c[name] for name in _ENTRY_FIELDS]


def _entry(values: Any) -> HistoryEntry:
    return HistoryEntry(*values)


def item_history(*, session: Session, item_id: str) -> list[HistoryEntry]:
    """Every entry of one item (its whole id), oldest first: its sorts, decisions and rollbacks.

    Returns:
        A list of :class:`HistoryEntry`, in the order they were written; empty for an unknown item.
    """
    stmt = (
        select(*_entry_columns(_history))
        .select_from(_history.outerjoin(_items, _items.c.item_id == _history.c.item_id))
        .where(_history.c.item_id == catalog_key(item_id))
        .order_by(_history.c.id)
    )
    return [_entry(row) for row in session.execute(stmt)]


def previous_entries(*, session: Session, job_id: str, chunk: int = 1000) -> Iterator[JobWrite]:
    """For each item that job ``job_id``'s sort wrote, the job's entry and the item's entry before it: what a
    rollback of the job restores.

    Only the sort's own entries count (source ``model`` and this ``job_id``); an item the job wrote twice (a
    redelivered batch) gives one :class:`JobWrite`: the job's last entry, and the entry before the job's first.
    Items whose previous entry was pruned (older than the retention) come with ``previous`` None like new items;
    keep the history longer than the jobs you may want to take back. Rows are fetched ``chunk`` at a time (a
    server-side cursor on PostgreSQL); consume the iterator inside the session's transaction.

    Yields:
        One :class:`JobWrite` per item, ordered by the item's catalog key.
    """
    job = (
        select(_history.c.item_id, func.min(_history.c.id).label("first_id"), func.max(_history.c.id).label("last_id"))
        .where(_history.c.job_id == job_id, _history.c.source == "model")
        .group_by(_history.c.item_id)
        .subquery("job")
    )
    entry, prev, before, newer = (_history.alias(name) for name in ("entry", "prev", "before", "newer"))
    previous_id = (
        select(func.max(before.c.id))
        .where(before.c.item_id == job.c.item_id, before.c.id < job.c.first_id)
        .scalar_subquery()
    )
    superseded = exists().where(newer.c.item_id == job.c.item_id, newer.c.id > job.c.last_id)
    stmt = (
        select(*_entry_columns(entry), *(prev.c[name] for name in _ENTRY_FIELDS), ~superseded)
        .select_from(
            job.join(entry, entry.c.id == job.c.last_id)
            .outerjoin(prev, prev.c.id == previous_id)
            .outerjoin(_items, _items.c.item_id == job.c.item_id)
        )
        .order_by(job.c.item_id)
    )
    n = len(_ENTRY_FIELDS)
    result = session.execute(stmt.execution_options(yield_per=chunk))
    try:
        for row in result:
            current = _entry(row[:n])
            previous = None if row[n] is None else _entry((row[n], current.item_id, *row[n + 2 : 2 * n]))
            yield JobWrite(item_id=current.item_id, entry=current, previous=previous, latest=bool(row[2 * n]))
    finally:
        result.close()


# The oldest writer of catalog_history still in flight: the smallest marker among the advisory locks that
# db.catalog's writers hold until they commit (keys MARKER_BASE + marker, in this database).
_PG_OLDEST_MARKER = text(
    "SELECT min(((l.classid::bigint << 32) | l.objid::bigint) - :base) FROM pg_locks l "
    "WHERE l.locktype = 'advisory' AND l.objsubid = 1 "
    "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
    "AND (l.classid::bigint >> 16) = :namespace"
)
_PG_DRAWN = text(
    "SELECT current_setting('transaction_isolation'), CASE WHEN is_called THEN last_value ELSE 0 END "
    f"FROM {HISTORY_SEQUENCE}"
)


def feed_horizon(session: Session) -> int:
    """The highest history id up to which the change feed is final: every entry with an id up to it that will
    ever be visible is visible now (0: none yet).

    SQLite has one writer at a time, so ids become visible in the order they were drawn: the horizon is the
    highest id. On PostgreSQL they do not: a transaction may draw id 100, another draw 101 and commit first. Every
    writer of ``catalog_history`` draws a marker id before its entries and holds an advisory lock on it until it
    ends (:mod:`db.catalog`), so the horizon is, read in this order, the last id drawn (``M``), then the smallest
    marker still locked (``L``): ``min(M, L - 1)``; the entries are read by a later statement. An id up to ``M``
    was drawn before ``M`` was read, by a writer that had locked its marker first: if that writer is still in
    flight its marker is at least ``L``, so its ids are above ``L``; if it has ended, its entries are committed
    (visible to the next statement) or rolled back (gone for good). A writer that starts later draws ids above
    ``M``. A writer that keeps its transaction open holds the horizon back until it ends.

    Needs READ COMMITTED on PostgreSQL (its default): each statement must see what committed before it began.

    Raises:
        InvsortError: on PostgreSQL, the transaction's isolation level is not READ COMMITTED.
    """
    if session.get_bind().dialect.name != "postgresql":
        return int(session.execute(select(func.coalesce(func.max(_history.c.id), 0))).scalar_one())
    isolation, drawn = session.execute(_PG_DRAWN).one()
    if isolation != "read committed":
        raise InvsortError(f"the change feed needs transactions at READ COMMITTED, this one is {isolation.upper()}")
    oldest = session.execute(_PG_OLDEST_MARKER, {"base": MARKER_BASE, "namespace": MARKER_BASE >> 48}).scalar()
    return int(drawn) if oldest is None else min(int(drawn), int(oldest) - 1)


def _changes_select() -> Select[Any]:
    h = _history
    whole_id = func.coalesce(_items.c.item_id_full, h.c.item_id)
    return select(
        h.c.id, whole_id, h.c.category, h.c.status, h.c.previous_category, h.c.previous_status, h.c.model_version,
        h.c.source, h.c.job_id, h.c.changed_by, h.c.written_at,
    ).select_from(h.outerjoin(_items, _items.c.item_id == h.c.item_id))


def read_changes(*, session: Session, since: int = 0, limit: int = 100) -> ChangePage:
    """One page of the change feed: the entries that changed an item's category or status (or added the item)
    after cursor ``since``, in cursor order, one per change; at most ``limit``.

    Ordered and resumable: pass the page's ``next`` as ``since`` to read on; reading page after page this way
    gives every change exactly once, whatever commits meanwhile. Only entries up to the :func:`feed_horizon` are
    read: on PostgreSQL an entry of a transaction still in flight holds back every entry with a higher id until it
    commits or rolls back (nothing is ever skipped; a transaction left open delays the feed). Entries pruned
    before they were read (:func:`prune_history`) are gone. The feed reads the primary key from ``since`` on.

    Run it in a transaction of its own (READ COMMITTED on PostgreSQL).

    Returns:
        A :class:`ChangePage`.

    Raises:
        ValueError: ``since`` is negative or ``limit`` is not within 1..1000.
        InvsortError: see :func:`feed_horizon`.
    """
    if since < 0:
        raise ValueError(f"since must be a cursor (0 or more), got {since}")
    if not 1 <= limit <= MAX_CHANGES_PAGE:
        raise ValueError(f"limit must be within 1..{MAX_CHANGES_PAGE}, got {limit}")
    horizon = feed_horizon(session)
    stmt = (
        _changes_select()
        .where(_history.c.id > since, _history.c.id <= horizon, _history.c.changed.is_(True))
        .order_by(_history.c.id)
        .limit(limit)
    )
    changes = [Change(*row) for row in session.execute(stmt)]
    return ChangePage(changes=changes, next=changes[-1].cursor if len(changes) == limit else max(since, horizon))


def iter_changes(*, session: Session, since: int = 0, limit: int = 100) -> Iterator[Change]:
    """The changes of :func:`read_changes` (``next`` left out: the last change's ``cursor`` is a cursor too).

    Yields:
        :class:`Change` objects, ``cursor`` increasing.
    """
    yield from read_changes(session=session, since=since, limit=limit).changes


def retention_cutoff(days: int, *, now: datetime | None = None) -> datetime:
    """The time before which entries are older than ``days`` days (from ``now``, default now, UTC).

    Raises:
        ValueError: ``days`` is below 1.
    """
    if days < 1:
        raise ValueError(f"the history retention is at least 1 day, got {days}")
    return (now or datetime.now(UTC)) - timedelta(days=days)


def prune_history(*, session: Session, older_than: datetime) -> int:
    """Delete the entries written before ``older_than``, except each item's latest entry (the item's current
    state: the next write's previous state, what a rollback goes back to).

    Consumers of the change feed that have not read the deleted entries yet never will: keep the retention longer
    than they may lag behind. Does not commit.

    Returns:
        How many entries were deleted.

    Raises:
        ValueError: ``older_than`` is a naive datetime.
    """
    if older_than.tzinfo is None or older_than.utcoffset() is None:
        raise ValueError(f"naive datetime {older_than!r}: pass a timezone-aware datetime (UTC)")
    newer = _history.alias("newer")
    stmt = delete(_history).where(
        _history.c.written_at < older_than,
        exists().where(newer.c.item_id == _history.c.item_id, newer.c.id > _history.c.id),
    )
    return _rowcount(session.execute(stmt))


# --- what a job changed, and taking it back --------------------------------------------------------------------


def category_pairs(*, session: Session, job_id: str) -> Counter[tuple[str, str]]:
    """How many items job ``job_id``'s sort moved from each category to each other one, from the history: per
    item the job wrote, its category before the job (:func:`previous_entries`) and the job's. Unchanged pairs
    count too (``Boot`` -> ``Boot``), so the counts sum to the items the job wrote. A category that is null (a
    ``failed`` row, or no entry before: a new item) is ``""``. Reviewed rows the job left alone are not in it.

    Returns:
        ``Counter({(from_category, to_category): items})``.
    """
    pairs: Counter[tuple[str, str]] = Counter()
    for write in previous_entries(session=session, job_id=job_id):
        before = write.previous.category if write.previous is not None else None
        pairs[(before or "", write.entry.category or "")] += 1
    return pairs


@dataclass(frozen=True, slots=True)
class RollbackCounts:
    """What :func:`restore_previous` did with the items of a job: ``restored`` (the entry before the job put back),
    ``changed_since`` (something wrote the item after the job: left alone), ``created`` (the job created the
    item, or its previous entry was pruned: nothing to go back to, left in place), ``reviewed`` (a person decided
    on it since: left alone)."""

    restored: int = 0
    changed_since: int = 0
    created: int = 0
    reviewed: int = 0

    def __add__(self, other: RollbackCounts) -> RollbackCounts:
        return RollbackCounts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


# The restored columns, as bind parameters (a name of a column cannot be one in an UPDATE's SET).
_RESTORED = ("category", "confidence", "status", "topk", "model_name", "model_version", "error", "job_id")
_RESTORE = (
    update(_items)
    .where(_items.c.item_id == bindparam("b_key"))
    .values(**{name: bindparam(f"b_{name}", type_=_items.c[name].type) for name in _RESTORED},
            updated_at=bindparam("b_updated_at", type_=_items.c.updated_at.type),
            model_category=None, model_confidence=None, reviewed_by=None, reviewed_at=None)
)


def _lock_rows(session: Session, keys: Sequence[str]) -> dict[str, str]:
    """Lock the catalog rows of ``keys`` until the transaction ends (SQLite: its write lock first, so that what
    is read next stays true) and return their statuses by key."""
    if session.get_bind().dialect.name == "sqlite":
        session.execute(update(_items).where(_items.c.item_id.in_(keys)).values(status=_items.c.status))
    stmt = (select(_items.c.item_id, _items.c.status).where(_items.c.item_id.in_(keys)).order_by(_items.c.item_id)
            .with_for_update())
    return {key: status for key, status in session.execute(stmt)}


def restore_previous(*, session: Session, job_id: str, writes: Sequence[JobWrite]) -> RollbackCounts:
    """Roll back job ``job_id``'s writes of ``writes`` (from :func:`previous_entries`, at most a few hundred): put
    each item's entry before the job back into its catalog row, where the job's entry is still the item's latest.

    The rows are locked first (``SELECT ... FOR UPDATE`` in key order on PostgreSQL; the write lock on SQLite),
    and under the lock each is checked again: a row that a person has decided on (``reviewed``), or whose latest
    history entry is no longer the job's (a later sort, decision or rollback), is left alone, and so is an item the
    job created (nothing to go back to: the catalog's readers saw it; it stays). A restored row gets the previous
    entry's category, confidence, status, top-k, model and reason as its ``error`` (none when that entry was a
    person's undo), that entry's job when it was a sort's, ``updated_at`` now, and one history entry (source
    ``rollback``, ``job_id`` = ``job_id``, through :func:`record_history` under the same locks). Runs in the
    caller's transaction and does not commit.

    Returns:
        :class:`RollbackCounts` of ``writes``.
    """
    by_key = {catalog_key(w.item_id): w for w in writes}
    if not by_key:
        return RollbackCounts()
    keys = sorted(by_key)
    statuses = _lock_rows(session, keys)
    latest = dict(session.execute(select(_history.c.item_id, func.max(_history.c.id))
                                  .where(_history.c.item_id.in_(keys)).group_by(_history.c.item_id)).all())
    counts = dict(restored=0, changed_since=0, created=0, reviewed=0)
    now, params = _now(), []
    for key in keys:
        write, status = by_key[key], statuses.get(key)
        previous = write.previous
        if status == REVIEWED:
            counts["reviewed"] += 1
        elif status is None or latest.get(key) != write.entry.id or (previous and previous.status == REVIEWED):
            counts["changed_since"] += 1  # deleted, written since, or a state a sort cannot put back
        elif previous is None:
            counts["created"] += 1
        else:
            values = {name: getattr(previous, name) for name in _RESTORED if name not in ("error", "job_id")}
            values.update(topk=previous.topk or [], error=None if previous.source == "review" else previous.reason,
                          job_id=previous.job_id if previous.source == "model" else None)
            params.append({"b_key": key, "b_updated_at": now, **{f"b_{k}": v for k, v in values.items()}})
    if params:
        session.execute(_RESTORE, params)
        counts["restored"] = record_history(session=session, keys=[p["b_key"] for p in params], source="rollback",
                                            job_id=job_id)
    return RollbackCounts(**counts)
