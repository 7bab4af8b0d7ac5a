"""The webhooks' outbox (``webhook_outbox``) and its producer's cursor (``webhook_cursor``), on SQLite and PostgreSQL.

Nothing on the catalog's write path inserts events: the producer (:func:`produce`, run by the one dispatcher that
holds the ``webhooks`` lease, :mod:`pipeline.webhooks`) turns what is already durable into outbox rows:

- each entry of the change feed (:func:`db.history.read_changes`) becomes an ``item.changed`` event,
  ``event_id`` ``change:<cursor>``;
- each job that ended (``done``, ``failed`` or ``cancelled``, ``finished_at`` set) becomes a ``job.completed``
  event, ``event_id`` ``job:<job id>:<status>:<finished_at in microseconds since the epoch>`` (a job retried and
  ended again is a new event).

The rows are inserted and the cursor advanced in one transaction, and an ``event_id`` is inserted once at most
(``ON CONFLICT DO NOTHING``): as good as a transactional outbox, since the feed is itself durable, ordered and
resumable. The producer's first pass starts at the end of the feed and at that moment for jobs: the catalog's past
is not told. Later passes carry on from the cursor, so when webhooks are switched off and on again the changes
meanwhile are told then (those pruned from the history excepted).

A job's ``job.completed`` is produced after the ``item.changed`` events of the entries its sort wrote (it waits
while the feed has not read them yet). Ended jobs are looked for among those that ended since the previous pass,
minus :data:`JOB_SLACK` (a job marked ended by a transaction that commits late is still found); the events
already in the outbox are skipped. Delivered rows are pruned after ``INVSORT_WEBHOOK_RETENTION_DAYS`` (at least a
day, far beyond the slack), pending ones never.

Like :mod:`db.catalog`, every function takes the session as a keyword argument, runs in the caller's transaction
and never commits.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, delete, func, select, update
from sqlalchemy.orm import Session

from db.catalog import JobStatus, _insert, _rowcount
from db.history import MAX_CHANGES_PAGE, Change, feed_horizon, read_changes
from db.models import (
    TERMINAL_JOB_STATUSES,
    CatalogHistory,
    Lease,
    SortingJob,
    WebhookCursor,
    WebhookOutbox,
)

__all__ = [
    "CURSOR_NAME",
    "ITEM_CHANGED",
    "JOB_COMPLETED",
    "JOB_SLACK",
    "OutboxRow",
    "OutboxStats",
    "Produced",
    "change_event",
    "due_rows",
    "job_event",
    "lease_holder",
    "mark_delivered",
    "mark_failed",
    "outbox_stats",
    "produce",
    "prune_delivered",
]

_outbox = cast(Table, WebhookOutbox.__table__)
_cursor = cast(Table, WebhookCursor.__table__)
_jobs = cast(Table, SortingJob.__table__)
_history = cast(Table, CatalogHistory.__table__)
_leases = cast(Table, Lease.__table__)

ITEM_CHANGED = "item.changed"
JOB_COMPLETED = "job.completed"
CURSOR_NAME = "webhooks"
#: Ended jobs are looked for back to this long before the previous pass.
JOB_SLACK = timedelta(hours=1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_JOB_FIELDS = ("id", "status", "source", "model_name", "model_version", "total_items", "sorted_count",
               "needs_review_count", "failed_count", "error", "created_at", "started_at", "finished_at")
_ERROR_CHARS = 2000


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _body(event_id: str, event_type: str, timestamp: datetime, data: dict[str, Any]) -> str:
    """The request body of one event: Standard Webhooks' ``type`` / ``timestamp`` / ``data``, and ``id`` (the
    ``webhook-id`` header's value) for receivers that keep bodies."""
    envelope = {"id": event_id, "type": event_type, "timestamp": timestamp.isoformat(), "data": data}
    return json.dumps(envelope, ensure_ascii=False, separators=(",", ":"))


def change_event(change: Change) -> tuple[str, str, str]:
    """``(event_id, event_type, body)`` of the ``item.changed`` event of one change of the feed: ``data`` is the
    change as the feed gives it (:meth:`db.history.Change.to_json`)."""
    event_id = f"change:{change.cursor}"
    return event_id, ITEM_CHANGED, _body(event_id, ITEM_CHANGED, change.changed_at, change.to_json())


def job_event(job: JobStatus) -> tuple[str, str, str]:
    """``(event_id, event_type, body)`` of the ``job.completed`` event of a job that ended (``finished_at`` set).

    Raises:
        ValueError: the job has not ended.
    """
    if job.finished_at is None or job.status not in TERMINAL_JOB_STATUSES:
        raise ValueError(f"job {job.id} is {job.status}: only a job that ended has a job.completed event")
    micros = (job.finished_at - _EPOCH) // timedelta(microseconds=1)
    event_id = f"job:{job.id}:{job.status}:{micros}"
    record = asdict(job)
    data: dict[str, Any] = {"job_id" if name == "id" else name: record[name] for name in _JOB_FIELDS}
    data["processed"] = job.processed
    for name in ("created_at", "started_at", "finished_at"):
        data[name] = _iso(data[name])
    return event_id, JOB_COMPLETED, _body(event_id, JOB_COMPLETED, job.finished_at, data)


@dataclass(frozen=True, slots=True)
class Produced:
    """What one :func:`produce` call put in the outbox: ``changes`` (``item.changed`` rows inserted), ``jobs``
    (``job.completed`` rows inserted), ``cursor`` (the feed's cursor now), ``more`` (the feed had a full page: call
    again), ``waiting`` (ended jobs whose event waits for the feed to read their items' changes)."""

    changes: int
    jobs: int
    cursor: int
    more: bool
    waiting: int


def _insert_events(session: Session, events: Sequence[tuple[str, str, str]], now: datetime) -> int:
    if not events:
        return 0
    rows = [dict(event_id=e, event_type=t, payload=body, created_at=now, attempts=0, next_attempt_at=now)
            for e, t, body in events]
    stmt = _insert(session, _outbox).on_conflict_do_nothing(index_elements=[_outbox.c.event_id])
    # RETURNING counts the rows inserted (an executemany's rowcount is -1 on psycopg), the conflicts left out
    return len(session.execute(stmt.returning(_outbox.c.id), rows).all())


def _state(session: Session, now: datetime) -> Any:
    """The producer's cursor row, locked; created at the end of the feed (and now, for jobs) the first time."""
    stmt = select(_cursor).where(_cursor.c.name == CURSOR_NAME).with_for_update()
    row = session.execute(stmt).first()
    if row is None:
        ins = _insert(session, _cursor).values(name=CURSOR_NAME, feed_cursor=feed_horizon(session), jobs_after=now,
                                               started_at=now, updated_at=now)
        session.execute(ins.on_conflict_do_nothing(index_elements=[_cursor.c.name]))
        row = session.execute(stmt).one()
    return row


def _ended_jobs(session: Session, after: datetime) -> list[JobStatus]:
    stmt = select(_jobs).where(_jobs.c.status.in_(TERMINAL_JOB_STATUSES), _jobs.c.finished_at.is_not(None),
                               _jobs.c.finished_at > after).order_by(_jobs.c.finished_at, _jobs.c.id)
    return [JobStatus(**{name: row._mapping[name] for name in JobStatus.__dataclass_fields__})
            for row in session.execute(stmt)]


def _known(session: Session, event_ids: Sequence[str]) -> set[str]:
    found: set[str] = set()
    for i in range(0, len(event_ids), 500):
        chunk = event_ids[i : i + 500]
        found.update(session.execute(select(_outbox.c.event_id).where(_outbox.c.event_id.in_(chunk))).scalars())
    return found


def _last_sort_entry(session: Session, job_id: str) -> int:
    stmt = select(func.coalesce(func.max(_history.c.id), 0)).where(_history.c.job_id == job_id,
                                                                     _history.c.source == "model")
    return int(session.execute(stmt).scalar_one())


def produce(*, session: Session, events: Collection[str], now: datetime | None = None,
            limit: int = MAX_CHANGES_PAGE) -> Produced:
    """Turn the next page of the change feed (at most ``limit`` changes) and the jobs that ended since the last call
    into outbox rows, and advance the cursor; all in the caller's transaction (commit it right after: the cursor row
    stays locked until then). Only the event types in ``events`` are produced; the cursor moves past the others.

    Run by one process at a time (the ``webhooks`` lease); a second one waits for the cursor row's lock and inserts
    no duplicate. Needs READ COMMITTED on PostgreSQL (the change feed's rule).

    Returns:
        A :class:`Produced`.
    """
    now = now or datetime.now(UTC)
    state = _state(session, now)
    cursor, changes, more = state.feed_cursor, 0, False
    if ITEM_CHANGED in events:
        page = read_changes(session=session, since=cursor, limit=limit)
        changes = _insert_events(session, [change_event(c) for c in page.changes], now)
        cursor, more = page.next, len(page.changes) == limit
    else:
        cursor = max(cursor, feed_horizon(session))
    jobs_after, jobs, waiting = now, 0, 0
    if JOB_COMPLETED in events:
        ended = _ended_jobs(session, max(state.started_at, state.jobs_after - JOB_SLACK))
        by_id = {event[0]: (job, event) for job in ended for event in [job_event(job)]}
        known = _known(session, list(by_id))
        todo = []
        for event_id, (job, event) in by_id.items():
            if event_id in known:
                continue
            if ITEM_CHANGED in events and _last_sort_entry(session, job.id) > cursor:
                waiting += 1  # its items' changes are not all read yet: next time
                jobs_after = min(jobs_after, cast(datetime, job.finished_at))
                continue
            todo.append(event)
        jobs = _insert_events(session, todo, now)
    session.execute(update(_cursor).where(_cursor.c.name == CURSOR_NAME).values(
        feed_cursor=cursor, jobs_after=jobs_after, updated_at=now))
    return Produced(changes=changes, jobs=jobs, cursor=cursor, more=more, waiting=waiting)


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One pending event: what to send (``event_id``, ``event_type``, ``payload``: the exact body) and how many
    attempts it had."""

    id: int
    event_id: str
    event_type: str
    payload: str
    attempts: int
    created_at: datetime


def due_rows(*, session: Session, now: datetime, limit: int = 100) -> list[OutboxRow]:
    """The pending events whose next attempt is due at ``now``, the longest due first (an event never tried is due
    since it was produced, so those come in the order they were produced), at most ``limit``: read in the order of
    the partial index ``ix_webhook_outbox_due``, however long the backlog."""
    o = _outbox.c
    stmt = (select(o.id, o.event_id, o.event_type, o.payload, o.attempts, o.created_at)
            .where(o.delivered_at.is_(None), o.next_attempt_at <= now).order_by(o.next_attempt_at, o.id).limit(limit))
    return [OutboxRow(*row) for row in session.execute(stmt)]


def mark_delivered(*, session: Session, delivered: Sequence[tuple[int, int]], now: datetime) -> int:
    """Record ``delivered`` (``(row id, HTTP status)`` pairs) as delivered at ``now``, one attempt more each.
    Returns how many rows changed (a row delivered already is left alone)."""
    by_status: dict[int, list[int]] = {}
    for row_id, status in delivered:
        by_status.setdefault(status, []).append(row_id)
    changed = 0
    for status, ids in by_status.items():
        for i in range(0, len(ids), 500):
            changed += _rowcount(session.execute(update(_outbox).where(
                _outbox.c.id.in_(ids[i : i + 500]), _outbox.c.delivered_at.is_(None),
            ).values(delivered_at=now, attempts=_outbox.c.attempts + 1, last_status=status, last_error=None)))
    return changed


def mark_failed(*, session: Session, row_id: int, next_attempt_at: datetime, status: int | None, error: str) -> None:
    """Record a failed attempt of a pending row: one attempt more, due again at ``next_attempt_at``; ``status`` is
    the HTTP status (None: no answer), ``error`` what went wrong."""
    session.execute(update(_outbox).where(_outbox.c.id == row_id, _outbox.c.delivered_at.is_(None)).values(
        attempts=_outbox.c.attempts + 1, next_attempt_at=next_attempt_at, last_status=status,
        last_error=error[:_ERROR_CHARS]))


def prune_delivered(*, session: Session, older_than: datetime) -> int:
    """Delete the rows delivered before ``older_than``; pending rows are never deleted. Returns how many."""
    return _rowcount(session.execute(delete(_outbox).where(_outbox.c.delivered_at < older_than)))


def lease_holder(*, session: Session, name: str, now: datetime | None = None) -> str | None:
    """Who holds lease ``name`` now (None: nobody, or it expired)."""
    now = now or datetime.now(UTC)
    return session.execute(select(_leases.c.holder).where(_leases.c.name == name, _leases.c.expires_at >= now)
                           ).scalar_one_or_none()


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """The state of the webhooks: ``pending`` events (``due``: of them, due now), ``delivered`` (kept until
    pruned), ``oldest_pending`` (when the oldest pending one was produced), ``most_attempts`` (of a pending one),
    ``last_error`` and ``last_failed_event`` (the most recent failure of a pending one), ``next_attempt_at`` (the
    soonest), ``feed_cursor`` / ``feed_end`` (the producer's cursor and the end of the feed: the difference is what
    it has not read yet; ``feed_cursor`` None: it never ran), ``started_at`` (its first pass)."""

    pending: int
    due: int
    delivered: int
    oldest_pending: datetime | None
    most_attempts: int
    last_error: str | None
    last_failed_event: str | None
    next_attempt_at: datetime | None
    feed_cursor: int | None
    feed_end: int
    started_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        return {k: _iso(v) if isinstance(v, datetime) else v for k, v in asdict(self).items()}


def outbox_stats(*, session: Session, now: datetime | None = None) -> OutboxStats:
    """The figures of :class:`OutboxStats` (``invsort webhooks status``)."""
    now = now or datetime.now(UTC)
    o = _outbox.c
    pending = o.delivered_at.is_(None)
    count, due, oldest, most, soonest = session.execute(select(
        func.count(), func.count().filter(o.next_attempt_at <= now), func.min(o.created_at),
        func.coalesce(func.max(o.attempts), 0), func.min(o.next_attempt_at),
    ).where(pending)).one()
    delivered = session.execute(select(func.count()).where(o.delivered_at.is_not(None))).scalar_one()
    failed = session.execute(select(o.event_id, o.last_error).where(pending, o.last_error.is_not(None))
                             .order_by(o.next_attempt_at.desc()).limit(1)).first()
    state = session.execute(select(_cursor.c.feed_cursor, _cursor.c.started_at)
                            .where(_cursor.c.name == CURSOR_NAME)).first()
    return OutboxStats(
        pending=count, due=due, delivered=delivered, oldest_pending=oldest, most_attempts=most,
        last_error=None if failed is None else failed.last_error,
        last_failed_event=None if failed is None else failed.event_id, next_attempt_at=soonest,
        feed_cursor=None if state is None else state.feed_cursor, feed_end=feed_horizon(session),
        started_at=None if state is None else state.started_at,
    )


def pending_figures(*, session: Session, now: datetime | None = None) -> tuple[int, float, int]:
    """``(pending, oldest_age_s, most_attempts)`` of the outbox: the events not delivered yet, the age in seconds of
    the oldest of them (0 when none) and the most POSTs one of them has had. One query over the pending rows (the
    partial index ``ix_webhook_outbox_due``), cheap enough for every metrics scrape."""
    now = now or datetime.now(UTC)
    o = _outbox.c
    count, oldest, most = session.execute(select(func.count(), func.min(o.created_at),
                                                 func.coalesce(func.max(o.attempts), 0))
                                          .where(o.delivered_at.is_(None))).one()
    if oldest is not None and oldest.tzinfo is None:  # SQLite's aggregate loses the column's type
        oldest = datetime.fromisoformat(str(oldest)).replace(tzinfo=UTC)
    age = 0.0 if oldest is None else max(0.0, (now - oldest).total_seconds())
    return int(count), age, int(most)
