"""Reads and writes of the catalog and of sorting jobs, on SQLite and PostgreSQL.

Every function takes the :class:`~sqlalchemy.orm.Session` as a keyword argument and runs inside the
caller's transaction: nothing here commits. Writes to shared rows are single SQL statements that are safe when
many workers run them at once on PostgreSQL (counters are incremented in SQL, never read-modify-written in Python).
"""

from __future__ import annotations

import functools
import hashlib
import json
import operator
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any, TypedDict, cast

from sqlalchemy import CursorResult, Result, Table, func, literal, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from db.models import CatalogItem, SortingJob, SortingJobBatch, UTCDateTime
from pipeline.errors import InvsortError
from pipeline.records import ItemResult

__all__ = [
    "CatalogRow",
    "JobNotFoundError",
    "JobStateError",
    "JobStatus",
    "StatusCounts",
    "complete_job_if_done",
    "create_job",
    "fail_job",
    "finish_listing",
    "get_job",
    "iter_items",
    "list_jobs",
    "record_batch",
    "upsert_items",
]

_items = cast(Table, CatalogItem.__table__)
_jobs = cast(Table, SortingJob.__table__)
_batches = cast(Table, SortingJobBatch.__table__)

_RESULT_FIELDS = tuple(f.name for f in fields(ItemResult))


class StatusCounts(TypedDict):
    """Rows of a batch by status."""

    sorted_count: int
    needs_review_count: int
    failed_count: int


#: Batch states whose counts are in the job's counters (and in ``batches_done``).
FINISHED_BATCH_STATES = ("done", "failed")


class JobNotFoundError(InvsortError, LookupError):
    """No sorting job has the given id."""


class JobStateError(InvsortError):
    """The job is not in a state that allows the requested change."""


@dataclass(frozen=True, slots=True)
class JobStatus:
    """A snapshot of one ``sorting_jobs`` row."""

    id: str
    source: str
    model_path: str
    model_name: str
    model_version: str
    status: str
    total_items: int | None
    total_batches: int | None
    batches_done: int
    sorted_count: int
    needs_review_count: int
    failed_count: int
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime

    @property
    def processed(self) -> int:
        """Items with a result so far: sorted + needs_review + failed."""
        return self.sorted_count + self.needs_review_count + self.failed_count


@dataclass(frozen=True, slots=True)
class CatalogRow:
    """One ``catalog_items`` row as read back: an :class:`ItemResult` plus when it was written."""

    item_id: str
    image_uri: str
    status: str
    category: str | None
    confidence: float | None
    topk: list[list[str | float]]
    error: str | None
    model_name: str | None
    model_version: str | None
    job_id: str | None
    updated_at: datetime

    def to_result(self) -> ItemResult:
        """The row as the :class:`ItemResult` that was written (without ``updated_at``)."""
        return ItemResult(**{name: getattr(self, name) for name in _RESULT_FIELDS})


_JOB_FIELDS = tuple(f.name for f in fields(JobStatus))
_ROW_FIELDS = tuple(f.name for f in fields(CatalogRow))


def _rowcount(result: Result[Any]) -> int:
    """Rows an UPDATE matched (``execute`` of a DML statement returns a :class:`CursorResult`)."""
    return cast(CursorResult[Any], result).rowcount


def _now() -> datetime:
    return datetime.now(UTC)


def _insert(session: Session, table: Table) -> postgresql.Insert | sqlite.Insert:
    """The dialect's INSERT (which has ``on_conflict_do_update``) for the session's database."""
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise InvsortError(f"unsupported database dialect {name!r}: use SQLite or PostgreSQL")


# Columns written by upsert_items: ItemResult's fields, in their order, then updated_at. _row_values builds its
# tuples from the same list, so the two cannot drift apart (tests/test_db.py checks that they are every column of
# the table).
_UPSERT_COLUMNS = (*_RESULT_FIELDS, "updated_at")
_result_values = operator.attrgetter(*_RESULT_FIELDS)  # one C-level call per row for the whole tuple
_TOPK = _RESULT_FIELDS.index("topk")  # the one field stored as JSON text
_COLUMN_LIST = ", ".join(_UPSERT_COLUMNS)
_SET_ALL = ", ".join(f"{name} = excluded.{name}" for name in _UPSERT_COLUMNS if name != "item_id")

_SQLITE_UPSERT = (
    f"INSERT INTO catalog_items ({_COLUMN_LIST}) VALUES ({', '.join('?' * len(_UPSERT_COLUMNS))}) "
    f"ON CONFLICT (item_id) DO UPDATE SET {_SET_ALL}"
)


@dataclass(frozen=True, slots=True)
class _PgStaging:
    """The SQL of the PostgreSQL path: a per-connection staging table, filled by COPY, merged in one INSERT."""

    prepare: str
    copy: str
    merge: str


@functools.cache
def _pg_staging() -> _PgStaging:
    dialect = postgresql.dialect()
    columns = ", ".join(f"{name} {_items.c[name].type.compile(dialect=dialect)}" for name in _UPSERT_COLUMNS)
    # The name carries a digest of the column list: a connection that outlives a schema change (a pooler's
    # server connection) never reuses a staging table of the wrong shape.
    table = f"invsort_catalog_upsert_{hashlib.sha1(columns.encode(), usedforsecurity=False).hexdigest()[:10]}"
    return _PgStaging(
        # No constraints on the staging table: they are checked by the merge, which SQLAlchemy runs, so a
        # violation raises the usual sqlalchemy.exc.IntegrityError. ON COMMIT DELETE ROWS empties it after
        # every transaction; the DELETE empties it between two calls in one transaction.
        prepare=f"CREATE TEMPORARY TABLE IF NOT EXISTS {table} ({columns}) ON COMMIT DELETE ROWS; DELETE FROM {table}",
        copy=f"COPY {table} ({_COLUMN_LIST}) FROM STDIN",
        # ORDER BY: concurrent writers of overlapping items lock their rows in the same order (no deadlock).
        merge=(
            f"INSERT INTO catalog_items ({_COLUMN_LIST}) SELECT {_COLUMN_LIST} FROM {table} ORDER BY item_id "
            f"ON CONFLICT (item_id) DO UPDATE SET {_SET_ALL}"
        ),
    )


def _row_values(rows: Sequence[ItemResult], updated_at: Any) -> list[tuple[Any, ...]]:
    """One tuple per distinct item in ``_UPSERT_COLUMNS`` order, the last result of each item winning."""
    dumps = json.dumps  # what SQLAlchemy's JSON type uses by default: the same text on both databases
    by_id = {}
    for r in rows:
        v = _result_values(r)
        by_id[r.item_id] = (*v[:_TOPK], dumps(v[_TOPK]), *v[_TOPK + 1 :], updated_at)
    return list(by_id.values())


def upsert_items(*, session: Session, rows: Sequence[ItemResult]) -> int:
    """Insert or replace the catalog rows of ``rows``, keyed by ``item_id``, with one batched write.

    ``INSERT ... ON CONFLICT (item_id) DO UPDATE`` sets every column of an existing row to the new values,
    with one ``updated_at`` (now, UTC) for the whole call. If ``rows`` names an item more than once, its last
    result wins. Runs in the caller's transaction and does not commit; an empty ``rows`` does nothing.

    On PostgreSQL (psycopg 3) the rows are sent with ``COPY`` into a temporary staging table of the session's
    connection (created on first use, emptied at commit; needs the ``TEMPORARY`` privilege, which PostgreSQL
    grants to everyone by default) and merged with one ``INSERT ... SELECT``. On SQLite they go through one
    prepared statement with ``executemany``. Either way there is no per-row SQLAlchemy work: figures are in
    ``pipeline/bench/catalog.py``.

    Returns:
        The number of distinct items written.

    Raises:
        sqlalchemy.exc.IntegrityError: a row breaks a constraint (e.g. an unknown ``status``).
        sqlalchemy.exc.DataError: a value does not fit its column (e.g. a NUL character in a string).
        InvsortError: the session is not bound to SQLite or PostgreSQL with psycopg 3.
    """
    if not rows:
        return 0
    connection = session.connection(bind_arguments={"mapper": CatalogItem})
    dialect = connection.dialect
    now = _now()
    if dialect.name == "sqlite":
        # Stored as SQLAlchemy stores it (UTC text), converted once for the whole call.
        process = _items.c.updated_at.type.dialect_impl(dialect).bind_processor(dialect)
        values = _row_values(rows, process(now) if process else now)
        connection.exec_driver_sql(_SQLITE_UPSERT, values)
        return len(values)
    if dialect.name != "postgresql":
        raise InvsortError(f"unsupported database dialect {dialect.name!r}: use SQLite or PostgreSQL")
    if dialect.driver != "psycopg":
        raise InvsortError(f"PostgreSQL driver {dialect.driver!r} is not supported: use postgresql+psycopg://")
    values = _row_values(rows, now)
    sql = _pg_staging()
    dbapi_error = dialect.loaded_dbapi.Error
    try:
        with connection.connection.driver_connection.cursor() as cursor:  # type: ignore[union-attr]
            cursor.execute(sql.prepare)
            with cursor.copy(sql.copy) as copy:
                for value in values:
                    copy.write_row(value)
    except dbapi_error as exc:
        # Straight from the driver: wrap it as SQLAlchemy would have (DataError, OperationalError, ...).
        raise DBAPIError.instance(sql.copy, None, exc, dbapi_error, dialect=dialect) from exc
    connection.exec_driver_sql(sql.merge)
    return len(values)


def create_job(
    *,
    session: Session,
    source: str,
    model_path: str,
    model_name: str,
    model_version: str,
    job_id: str | None = None,
) -> str:
    """Insert a new sorting job in status ``listing``, created now.

    Returns:
        The job's id: ``job_id`` if given, else a new uuid4 string.

    Raises:
        sqlalchemy.exc.IntegrityError: a job with ``job_id`` already exists.
    """
    job_id = job_id or str(uuid.uuid4())
    now = _now()
    session.execute(
        _jobs.insert().values(
            id=job_id,
            source=source,
            model_path=model_path,
            model_name=model_name,
            model_version=model_version,
            status="listing",
            batches_done=0,
            sorted_count=0,
            needs_review_count=0,
            failed_count=0,
            created_at=now,
            updated_at=now,
        )
    )
    return job_id


def record_batch(
    *,
    session: Session,
    job_id: str,
    batch_no: int,
    sorted_count: int,
    needs_review_count: int,
    failed_count: int,
    state: str = "done",
) -> None:
    """Record the counts of one finished batch of a job and add them to the job's counters, exactly once.

    The first call that finishes ``(job_id, batch_no)`` (no row yet, or a ``queued``/``running`` row of a queued
    job) stores the counts, sets ``state`` (``done``, or ``failed`` for a batch given up on), drops the batch's
    stored items and adds its counts and 1 to ``batches_done``. A later call for the same batch (a redelivered
    task) replaces the stored counts and adds only the difference, leaving ``batches_done`` alone. Counters are
    incremented in SQL (``x = x + :delta``), so concurrent workers on PostgreSQL never lose an update.
    Sets the job's ``started_at`` if it is not set yet.
    Runs in the caller's transaction and does not commit. Returns None.

    Raises:
        ValueError: a count is negative.
        sqlalchemy.exc.IntegrityError: no job has ``job_id`` (foreign key).
        JobNotFoundError: no job has ``job_id`` (where the foreign key did not already say so).
    """
    counts = {
        "sorted_count": sorted_count,
        "needs_review_count": needs_review_count,
        "failed_count": failed_count,
    }
    if any(v < 0 for v in counts.values()):
        raise ValueError(f"batch counts must not be negative, got {counts}")
    if state not in FINISHED_BATCH_STATES:
        raise ValueError(f"a recorded batch is {' or '.join(FINISHED_BATCH_STATES)}, got {state!r}")
    now = _now()
    key = (_batches.c.job_id == job_id) & (_batches.c.batch_no == batch_no)

    # Write first (no read snapshot to go stale on SQLite); on PostgreSQL a concurrent delivery of the same
    # batch waits here for the first one to commit and then sees the conflict.
    ins = _insert(session, _batches).values(job_id=job_id, batch_no=batch_no, updated_at=now, **counts)
    ins = ins.on_conflict_do_nothing(index_elements=[_batches.c.job_id, _batches.c.batch_no])
    inserted = session.execute(ins.returning(_batches.c.batch_no)).first() is not None

    if inserted:
        first, delta = True, counts
        if state != "done":
            session.execute(update(_batches).where(key).values(state=state))
    else:
        old = session.execute(
            select(_batches.c.sorted_count, _batches.c.needs_review_count, _batches.c.failed_count,
                   _batches.c.state)
            .where(key)
            .with_for_update()
        ).one()
        # Counts of a batch that has not finished yet were never added to the job (a batch run item by item
        # keeps its running counts on its own row until it finishes).
        first = old.state not in FINISHED_BATCH_STATES
        delta = counts if first else {name: counts[name] - old._mapping[name] for name in counts}
        # A done batch's items are not needed again; a failed one keeps them for ``invsort jobs retry``.
        session.execute(update(_batches).where(key).values(
            updated_at=now, state=state, items=None if state == "done" else _batches.c.items, worker=None,
            heartbeat_at=None, **counts))

    now_param = literal(now, UTCDateTime())
    result = session.execute(
        update(_jobs)
        .where(_jobs.c.id == job_id)
        .values(
            batches_done=_jobs.c.batches_done + (1 if first else 0),
            started_at=func.coalesce(_jobs.c.started_at, now_param),
            updated_at=now_param,
            **{name: _jobs.c[name] + d for name, d in delta.items()},
        )
    )
    if _rowcount(result) != 1:
        raise JobNotFoundError(f"no sorting job {job_id!r}")


def finish_listing(*, session: Session, job_id: str, total_items: int, total_batches: int) -> None:
    """Mark the listing of a job as finished: set its totals and move it from ``listing`` to ``running``.

    Call :func:`complete_job_if_done` after committing: the batches may all be done already. Returns None.

    Raises:
        JobNotFoundError: no job has ``job_id``.
        JobStateError: the job is not in status ``listing``.
        ValueError: a total is negative.
    """
    if total_items < 0 or total_batches < 0:
        raise ValueError(f"totals must not be negative, got {total_items} items, {total_batches} batches")
    result = session.execute(
        update(_jobs)
        .where(_jobs.c.id == job_id, _jobs.c.status == "listing")
        .values(status="running", total_items=total_items, total_batches=total_batches, updated_at=_now())
    )
    if _rowcount(result) != 1:
        status = session.execute(select(_jobs.c.status).where(_jobs.c.id == job_id)).scalar_one_or_none()
        if status is None:
            raise JobNotFoundError(f"no sorting job {job_id!r}")
        raise JobStateError(f"job {job_id} is {status!r}, not 'listing': its listing cannot finish again")


def complete_job_if_done(*, session: Session, job_id: str) -> bool:
    """Mark the job ``done`` if its listing has finished and all its batches are recorded.

    One conditional UPDATE (``status='running' AND batches_done >= total_batches``), so when the submitter and
    workers call it concurrently, each in its own transaction after committing their own work, exactly one
    call completes the job. Does not commit.

    Returns:
        True if this call moved the job to ``done``; False if it is not finished yet, already done or failed,
        or does not exist.
    """
    now = _now()
    result = session.execute(
        update(_jobs)
        .where(
            _jobs.c.id == job_id,
            _jobs.c.status == "running",
            _jobs.c.total_batches.is_not(None),
            _jobs.c.batches_done >= _jobs.c.total_batches,
        )
        .values(status="done", finished_at=now, updated_at=now)
    )
    return _rowcount(result) == 1


def fail_job(*, session: Session, job_id: str, error: str) -> bool:
    """Mark a job that is still ``listing`` or ``running`` as ``failed`` with ``error``, finished now.

    A job that is already ``done``, ``failed`` or ``cancelled`` is left as it is. Does not commit.

    Returns:
        True if this call marked the job failed, False otherwise (finished already, or no such job).
    """
    now = _now()
    result = session.execute(
        update(_jobs)
        .where(_jobs.c.id == job_id, _jobs.c.status.in_(("listing", "running")))
        .values(status="failed", error=error, finished_at=now, updated_at=now)
    )
    return _rowcount(result) == 1


def _job_status(row: Any) -> JobStatus:
    m = row._mapping
    return JobStatus(**{name: m[name] for name in _JOB_FIELDS})


def get_job(*, session: Session, job_id: str) -> JobStatus | None:
    """The current state of one job.

    Returns:
        A :class:`JobStatus`, or None if no job has ``job_id``.
    """
    row = session.execute(select(_jobs).where(_jobs.c.id == job_id)).first()
    return None if row is None else _job_status(row)


def list_jobs(*, session: Session, limit: int = 20) -> list[JobStatus]:
    """The ``limit`` most recently created jobs.

    Returns:
        A list of :class:`JobStatus`, newest first.
    """
    rows = session.execute(select(_jobs).order_by(_jobs.c.created_at.desc(), _jobs.c.id).limit(limit))
    return [_job_status(row) for row in rows]


def iter_items(*, session: Session, job_id: str | None = None, chunk: int = 1000) -> Iterator[CatalogRow]:
    """Stream catalog rows ordered by ``item_id``, all of them or those last written by ``job_id``.

    Rows are fetched ``chunk`` at a time (a server-side cursor on PostgreSQL), so memory stays flat for
    exports of any size. Consume the iterator inside the session's transaction.

    Yields:
        One :class:`CatalogRow` per catalog item.
    """
    stmt = select(*(_items.c[name] for name in _ROW_FIELDS)).order_by(_items.c.item_id)
    if job_id is not None:
        stmt = stmt.where(_items.c.job_id == job_id)
    result = session.execute(stmt.execution_options(yield_per=chunk))
    try:
        for row in result:
            yield CatalogRow(*row)
    finally:
        result.close()
